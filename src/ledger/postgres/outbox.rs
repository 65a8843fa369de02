//! The hook outbox on PostgreSQL: deliveries queued with their transition, claimed in order per
//! checkout and hook, their outcomes, revival and replay.
//!
//! Owns: the PostgreSQL SQL of the `hook_deliveries` table, with the semantics of SQLite's
//! `outbox.rs` (at-least-once; one delivery of a checkout and hook at a time, in queue order,
//! a revived older one first). Queue order is the `seq` column (SQLite's rowid).
//! Must never: write outside a fenced transaction ([`PgStore::begin_write`]), change a
//! transition, or hand out two deliveries of one checkout and hook at once.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::apply::{millis, now_ms};
use super::{PgError, PgStore};
use crate::domain::{CheckoutId, CheckoutStatus};
use crate::ledger::{
    Delivery, DeliveryFilter, DeliveryState, DeliveryUpdate, RecordAndClaim, timestamp,
};

/// The claim lock (an advisory lock, key "paywoutb" in ASCII): `record_and_claim` holds it until
/// its transaction ends, so two claimers (a daemon's dispatcher and, during a failover, no
/// other: the fence refuses a stale one, but a second process must not race it either) claim
/// one after the other, as SQLite's single writer does, and never hand out one delivery, or two
/// of one checkout and hook, twice.
const CLAIM_LOCK: i64 = 8_097_887_158_866_900_066;

/// A pending delivery `d` may run: no other delivery of its checkout and hook is running, and
/// none queued before it is still pending (SQLite's `HEAD_OF_QUEUE`).
const HEAD_OF_QUEUE: &str = "NOT EXISTS (
        SELECT 1 FROM hook_deliveries e
        WHERE e.checkout_id = d.checkout_id AND e.hook = d.hook AND e.seq <> d.seq
          AND (e.state = 'running' OR (e.state = 'pending' AND e.seq < d.seq)))";

const DELIVERY_COLUMNS: &str = "SELECT d.event_id, d.hook, d.checkout_id, c.order_id, c.request_id,
        d.transition_id, t.from_status, t.to_status, t.source, t.verified_at, c.amount::TEXT,
        c.currency, d.state, d.attempts, d.next_attempt_at, d.last_exit_code, d.last_error,
        d.replay, d.created_at, d.delivered_at, t.verified_json, t.refunded_from::TEXT,
        t.refunded_to::TEXT, c.tracked_via
    FROM hook_deliveries d
    JOIN transitions t ON t.id = d.transition_id
    JOIN checkouts c ON c.id = d.checkout_id";

fn delivery_from_row(row: &Row) -> Result<Delivery, tokio_postgres::Error> {
    let state: String = row.try_get(12)?;
    let attempts: i32 = row.try_get(13)?;
    Ok(Delivery {
        event_id: row.try_get(0)?,
        hook: row.try_get(1)?,
        checkout_id: row.try_get(2)?,
        order_id: row.try_get(3)?,
        request_id: row.try_get(4)?,
        transition_id: row.try_get(5)?,
        previous_status: row
            .try_get::<_, Option<String>>(6)?
            .as_deref()
            .map(CheckoutStatus::parse),
        status: CheckoutStatus::parse(&row.try_get::<_, String>(7)?),
        source: row.try_get(8)?,
        verified_at: timestamp(row.try_get(9)?),
        amount: row.try_get(10)?,
        currency: row.try_get(11)?,
        state: DeliveryState::parse(&state).unwrap_or(DeliveryState::Pending),
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: timestamp(row.try_get(14)?),
        last_exit_code: row.try_get(15)?,
        last_error: row.try_get(16)?,
        replay: row.try_get(17)?,
        created_at: timestamp(row.try_get(18)?),
        delivered_at: row.try_get::<_, Option<DateTime<Utc>>>(19)?.map(timestamp),
        verified_json: row.try_get(20)?,
        refunded_from: row.try_get(21)?,
        refunded_to: row.try_get(22)?,
        tracked_via: row.try_get(23)?,
    })
}

impl PgStore {
    /// Queues one delivery in the caller's transaction; returns its event id (stable across
    /// attempts, restarts and failovers).
    pub(super) async fn queue_in(
        &self,
        transaction: &Transaction<'_>,
        transition_id: i64,
        checkout_id: &str,
        hook: &str,
        replay: bool,
    ) -> Result<String, PgError> {
        let event_id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let statement = transaction
            .prepare_cached(
                "INSERT INTO hook_deliveries (event_id, transition_id, checkout_id, hook, state,
                    attempts, next_attempt_at, replay, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, 'pending', 0, $5, $6, $5, $5)",
            )
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .execute(
                &statement,
                &[
                    &event_id,
                    &transition_id,
                    &checkout_id,
                    &hook,
                    &now_ms(),
                    &replay,
                ],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(event_id)
    }

    /// Queues one delivery per hook of `hooks`, in that order, in one statement of the caller's
    /// transaction; returns their event ids.
    pub(super) async fn queue_all_in(
        &self,
        transaction: &Transaction<'_>,
        transition_id: i64,
        checkout_id: &str,
        hooks: &[&str],
        replay: bool,
    ) -> Result<Vec<String>, PgError> {
        match hooks {
            [] => return Ok(Vec::new()),
            [hook] => {
                return Ok(vec![
                    self.queue_in(transaction, transition_id, checkout_id, hook, replay)
                        .await?,
                ]);
            }
            _ => {}
        }
        let event_ids: Vec<String> = hooks
            .iter()
            .map(|_| format!("evt_{}", uuid::Uuid::now_v7().simple()))
            .collect();
        let statement = transaction
            .prepare_cached(
                "INSERT INTO hook_deliveries (event_id, transition_id, checkout_id, hook, state,
                    attempts, next_attempt_at, replay, created_at, updated_at)
                 SELECT event_id, $3, $4, hook, 'pending', 0, $5, $6, $5, $5
                 FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS q (event_id, hook, n)
                 ORDER BY n",
            )
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .execute(
                &statement,
                &[
                    &event_ids,
                    &hooks,
                    &transition_id,
                    &checkout_id,
                    &now_ms(),
                    &replay,
                ],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(event_ids)
    }

    /// Puts deliveries left `running` (by a daemon that died, or one that lost the lease) back
    /// to `pending`, due now; returns how many.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn recover_running_deliveries(&self) -> Result<usize, PgError> {
        self.write_one(
            "UPDATE hook_deliveries SET state = 'pending', next_attempt_at = $1, updated_at = $1,
                    last_error = coalesce(last_error, 'interrupted: paywatch stopped while the hook ran')
             WHERE state = 'running'",
            &[&now_ms()],
        )
        .await
        .map(|count| usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// Writes finished attempts' outcomes, then claims up to `limit` due deliveries, in one
    /// fenced transaction (see [`crate::ledger::Backend::record_and_claim`]). An outcome the
    /// database refuses is handed back in [`RecordAndClaim::refused`] without undoing the others
    /// or the claim: the round is first tried as one transaction, and only if an outcome fails
    /// is it run again with each outcome in a savepoint (three round trips each instead of one).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`] (a daemon that lost the lease claims nothing); database
    /// failures of the transaction itself: nothing was written.
    pub async fn record_and_claim(
        &self,
        outcomes: &[(String, DeliveryUpdate)],
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<RecordAndClaim, PgError> {
        match self.claim_round(outcomes, now_time, limit, false).await? {
            Some(round) => Ok(round),
            None => self
                .claim_round(outcomes, now_time, limit, true)
                .await
                .map(Option::unwrap_or_default),
        }
    }

    /// One round of [`PgStore::record_and_claim`]; without `savepoints`, `None` (nothing
    /// written) when an outcome fails.
    async fn claim_round(
        &self,
        outcomes: &[(String, DeliveryUpdate)],
        now_time: DateTime<Utc>,
        limit: usize,
        savepoints: bool,
    ) -> Result<Option<RecordAndClaim>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let mut transaction = self.begin_write(&mut client).await?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK])
            .await
            .map_err(db)?;
        let time = now_ms();
        let mut refused = Vec::new();
        if !savepoints {
            // The common outcome in one statement: every delivered one at once.
            let delivered: Vec<&str> = outcomes
                .iter()
                .filter(|(_, update)| *update == DeliveryUpdate::Delivered)
                .map(|(event_id, _)| event_id.as_str())
                .collect();
            if !delivered.is_empty() {
                let statement = transaction
                    .prepare_cached(
                        "UPDATE hook_deliveries SET state = 'delivered', delivered_at = $2,
                            updated_at = $2, last_exit_code = 0, last_error = NULL
                         WHERE event_id = ANY($1)",
                    )
                    .await
                    .map_err(db)?;
                match transaction.execute(&statement, &[&delivered, &time]).await {
                    Ok(_) => {}
                    Err(error) if error.is_closed() => return Err(db(error)),
                    Err(_) => return Ok(None),
                }
            }
        }
        for (index, (event_id, update)) in outcomes.iter().enumerate() {
            if !savepoints && *update == DeliveryUpdate::Delivered {
                continue;
            }
            if !savepoints {
                match finish_in(&transaction, event_id, update, time).await {
                    Ok(()) => continue,
                    Err(error) if error.is_closed() => return Err(db(error)),
                    // Rolled back as the transaction is dropped; the caller runs the round
                    // again with savepoints.
                    Err(_) => return Ok(None),
                }
            }
            let savepoint = transaction.savepoint("outcome").await.map_err(db)?;
            match finish_in(&savepoint, event_id, update, time).await {
                Ok(()) => savepoint.commit().await.map_err(db)?,
                Err(error) => {
                    if error.is_closed() {
                        return Err(db(error));
                    }
                    savepoint.rollback().await.map_err(db)?;
                    refused.push((index, db(error).to_string()));
                }
            }
        }
        let mut claimed: Vec<Delivery> = if limit == 0 {
            Vec::new()
        } else {
            let statement = transaction
                .prepare_cached(&format!(
                    "{DELIVERY_COLUMNS}
                     WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND {HEAD_OF_QUEUE}
                     ORDER BY d.next_attempt_at, d.seq LIMIT $2"
                ))
                .await
                .map_err(db)?;
            let rows = transaction
                .query(
                    &statement,
                    &[&now_time, &i64::try_from(limit).unwrap_or(i64::MAX)],
                )
                .await
                .map_err(db)?;
            rows.iter()
                .map(delivery_from_row)
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        if !claimed.is_empty() {
            let ids: Vec<&str> = claimed.iter().map(|d| d.event_id.as_str()).collect();
            let statement = transaction
                .prepare_cached(
                    "UPDATE hook_deliveries SET state = 'running', attempts = attempts + 1,
                        updated_at = $2
                     WHERE event_id = ANY($1)",
                )
                .await
                .map_err(db)?;
            transaction
                .execute(&statement, &[&ids, &time])
                .await
                .map_err(db)?;
            for delivery in &mut claimed {
                delivery.state = DeliveryState::Running;
                delivery.attempts += 1;
            }
        }
        let next_due = if claimed.len() < limit {
            next_due_in(&transaction).await.map_err(db)?
        } else {
            None
        };
        transaction.commit().await.map_err(db)?;
        Ok(Some(RecordAndClaim {
            claimed,
            refused,
            next_due,
        }))
    }

    /// The earliest time a pending delivery at the head of its queue can be claimed.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn next_delivery_due(&self) -> Result<Option<DateTime<Utc>>, PgError> {
        let client = self.client().await?;
        next_due_in(&client).await.map_err(|error| self.db(&error))
    }

    /// Records how one attempt ended, in a fenced transaction of its own.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn finish_delivery(
        &self,
        event_id: &str,
        update: &DeliveryUpdate,
    ) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        finish_in(&transaction, event_id, update, now_ms())
            .await
            .map_err(|error| self.db(&error))?;
        transaction.commit().await.map_err(|error| self.db(&error))
    }

    /// Revives a dead delivery (or hurries a pending one); false if there is no such event or
    /// it is delivered or running.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn retry_delivery(&self, event_id: &str) -> Result<bool, PgError> {
        self.write_one(
            "UPDATE hook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = $2,
                updated_at = $2
             WHERE event_id = $1 AND state IN ('dead', 'pending')",
            &[&event_id, &now_ms()],
        )
        .await
        .map(|changed| changed == 1)
    }

    /// Revives every dead delivery; returns how many.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn retry_dead_deliveries(&self) -> Result<usize, PgError> {
        self.write_one(
            "UPDATE hook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = $1,
                updated_at = $1
             WHERE state = 'dead'",
            &[&now_ms()],
        )
        .await
        .map(|count| usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// Queues replay deliveries of past transitions (see
    /// [`crate::ledger::Backend::replay_deliveries`]).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn replay_deliveries(
        &self,
        since: DateTime<Utc>,
        status: Option<&str>,
        hooks: &[(String, Vec<String>)],
        include_imported: bool,
    ) -> Result<Vec<String>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let rows = transaction
            .query(
                "SELECT id, checkout_id, to_status FROM transitions
                 WHERE verified_at >= $1 AND ($2::TEXT IS NULL OR to_status = $2)
                   AND ($3 OR source <> 'discovery-import')
                 ORDER BY id",
                &[&millis(since), &status, &include_imported],
            )
            .await
            .map_err(db)?;
        let mut events = Vec::new();
        for row in rows {
            let transition_id: i64 = row.get(0);
            let checkout_id: String = row.get(1);
            let to_status: String = row.get(2);
            for (hook, statuses) in hooks {
                if statuses.is_empty() || statuses.iter().any(|s| s == &to_status) {
                    events.push(
                        self.queue_in(&transaction, transition_id, &checkout_id, hook, true)
                            .await?,
                    );
                }
            }
        }
        transaction.commit().await.map_err(db)?;
        Ok(events)
    }

    /// Deliveries matching `filter`, newest first.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let client = self.client().await?;
        let limit = filter
            .limit
            .map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = client
            .query(
                &format!(
                    "{DELIVERY_COLUMNS}
                     WHERE ($1::TEXT IS NULL OR d.state = $1)
                       AND ($2::TEXT IS NULL OR d.checkout_id = $2)
                     ORDER BY d.seq DESC LIMIT $3"
                ),
                &[
                    &filter.state.map(DeliveryState::as_str),
                    &filter.checkout_id,
                    &limit,
                ],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(delivery_from_row)
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    /// One delivery.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn delivery(&self, event_id: &str) -> Result<Option<Delivery>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("{DELIVERY_COLUMNS} WHERE d.event_id = $1"),
                &[&event_id],
            )
            .await
            .map_err(db)?;
        row.as_ref().map(delivery_from_row).transpose().map_err(db)
    }

    /// Transitions of one checkout as deliveries would see them.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn deliveries_of(&self, checkout_id: &CheckoutId) -> Result<Vec<Delivery>, PgError> {
        self.deliveries(&DeliveryFilter {
            checkout_id: Some(checkout_id.to_string()),
            ..DeliveryFilter::default()
        })
        .await
    }
}

/// Writes one attempt's outcome.
async fn finish_in(
    transaction: &Transaction<'_>,
    event_id: &str,
    update: &DeliveryUpdate,
    time: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    match update {
        DeliveryUpdate::Delivered => {
            transaction
                .execute(
                    "UPDATE hook_deliveries SET state = 'delivered', delivered_at = $2,
                        updated_at = $2, last_exit_code = 0, last_error = NULL
                     WHERE event_id = $1",
                    &[&event_id, &time],
                )
                .await
        }
        DeliveryUpdate::Retry {
            next_attempt_at,
            exit_code,
            error,
        } => {
            transaction
                .execute(
                    "UPDATE hook_deliveries SET state = 'pending', next_attempt_at = $2,
                        last_exit_code = $3, last_error = $4, updated_at = $5
                     WHERE event_id = $1",
                    &[
                        &event_id,
                        &millis(*next_attempt_at),
                        exit_code,
                        error,
                        &time,
                    ],
                )
                .await
        }
        DeliveryUpdate::Postponed {
            next_attempt_at,
            error,
        } => {
            transaction
                .execute(
                    "UPDATE hook_deliveries SET state = 'pending', next_attempt_at = $2,
                        attempts = greatest(attempts - 1, 0), last_exit_code = NULL,
                        last_error = $3, updated_at = $4
                     WHERE event_id = $1",
                    &[&event_id, &millis(*next_attempt_at), error, &time],
                )
                .await
        }
        DeliveryUpdate::Dead { exit_code, error } => {
            transaction
                .execute(
                    "UPDATE hook_deliveries SET state = 'dead', last_exit_code = $2,
                        last_error = $3, updated_at = $4
                     WHERE event_id = $1",
                    &[&event_id, exit_code, error, &time],
                )
                .await
        }
    }
    .map(drop)
}

async fn next_due_in(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<Option<DateTime<Utc>>, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT min(d.next_attempt_at) FROM hook_deliveries d
                 WHERE d.state = 'pending' AND {HEAD_OF_QUEUE}"
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}
