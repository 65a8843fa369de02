//! The hook outbox: deliveries queued with their transition, and their progress.
//!
//! Owns: the `hook_deliveries` table. A delivery is at-least-once: it is `running` while a
//! command runs, and a `running` row found at start (the daemon died) goes back to `pending`.
//! Must never: change a transition, or hand out two deliveries of one checkout and hook at once.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde::Serialize;

use super::sqlite::{Sqlite, now};
use super::{Result, timestamp};
use crate::domain::{CheckoutId, CheckoutStatus};

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// Its command is running.
    Running,
    /// Its command exited 0.
    Delivered,
    /// Given up: out of attempts, too old, or a permanent exit code.
    Dead,
}

impl DeliveryState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Running => "running",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    /// Parses the stored spelling (also what `--state` accepts).
    pub fn parse(text: &str) -> Option<DeliveryState> {
        match text {
            "pending" => Some(DeliveryState::Pending),
            "running" => Some(DeliveryState::Running),
            "delivered" => Some(DeliveryState::Delivered),
            "dead" => Some(DeliveryState::Dead),
            _ => None,
        }
    }
}

/// A delivery with what its hook needs to know about the transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Stable across attempts and restarts; hooks de-duplicate on it.
    pub event_id: String,
    /// The hook's name.
    pub hook: String,
    /// The checkout.
    pub checkout_id: String,
    /// The merchant's order id.
    pub order_id: Option<String>,
    /// The merchant's request id.
    pub request_id: Option<String>,
    /// The transition.
    pub transition_id: i64,
    /// Status before.
    pub previous_status: Option<CheckoutStatus>,
    /// Status after.
    pub status: CheckoutStatus,
    /// What led to the verification.
    pub source: String,
    /// When it was verified.
    pub verified_at: String,
    /// The amount, exact decimal text.
    pub amount: String,
    /// ISO 4217 currency.
    pub currency: String,
    /// State.
    pub state: DeliveryState,
    /// Attempts started so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_attempt_at: String,
    /// The last attempt's exit code.
    pub last_exit_code: Option<i32>,
    /// The last attempt's failure, described.
    pub last_error: Option<String>,
    /// Whether `hooks replay` made it.
    pub replay: bool,
    /// When it was queued.
    pub created_at: String,
    /// When it was delivered.
    pub delivered_at: Option<String>,
    /// The refunded total before this entry, when the entry changed it (exact decimal text).
    pub refunded_from: Option<String>,
    /// The refunded total Get Checkout gave with this entry (exact decimal text).
    pub refunded_to: Option<String>,
    /// The verified checkout JSON, verbatim.
    #[serde(skip)]
    pub verified_json: String,
    /// How the checkout came to be tracked (`link-create`, `track`, `track-fetch`, `discovery`).
    pub tracked_via: String,
}

/// How an attempt ended, as the dispatcher decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryUpdate {
    /// Exit 0.
    Delivered,
    /// Failed; try again at `next_attempt_at`.
    Retry {
        /// When to try again.
        next_attempt_at: DateTime<Utc>,
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// What happened.
        error: String,
    },
    /// The attempt never happened (paywatch could not start the hook: out of descriptors or
    /// processes): try again at `next_attempt_at`, and its attempt is not counted.
    Postponed {
        /// When to try again.
        next_attempt_at: DateTime<Utc>,
        /// Why it could not start.
        error: String,
    },
    /// Failed for good.
    Dead {
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// What happened.
        error: String,
    },
}

impl DeliveryUpdate {
    /// How the attempt ended, as the metrics label (`delivered`, `retry`, `postponed`, `dead`).
    pub fn label(&self) -> &'static str {
        match self {
            DeliveryUpdate::Delivered => "delivered",
            DeliveryUpdate::Retry { .. } => "retry",
            DeliveryUpdate::Postponed { .. } => "postponed",
            DeliveryUpdate::Dead { .. } => "dead",
        }
    }
}

/// Filters for [`Ledger::deliveries`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only this state.
    pub state: Option<DeliveryState>,
    /// Only this checkout.
    pub checkout_id: Option<String>,
    /// At most this many rows (newest first).
    pub limit: Option<usize>,
}

/// Queues one delivery in the caller's transaction; returns its event id.
pub(super) fn queue_in(
    transaction: &Transaction<'_>,
    transition_id: i64,
    checkout_id: &str,
    hook: &str,
    replay: bool,
) -> rusqlite::Result<String> {
    let event_id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    let time = now();
    transaction
        .prepare_cached(
            "INSERT INTO hook_deliveries (event_id, transition_id, checkout_id, hook, state, attempts,
                next_attempt_at, replay, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?6, ?5, ?5)",
        )?
        .execute(params![event_id, transition_id, checkout_id, hook, time, replay])?;
    Ok(event_id)
}

/// What [`Ledger::record_and_claim`] did.
#[derive(Debug, Default)]
pub struct RecordAndClaim {
    /// The deliveries claimed (now `running`, attempt counted), in claim order.
    pub claimed: Vec<Delivery>,
    /// Outcomes not written, as (index into the outcomes given, why): their rows stay `running`.
    pub refused: Vec<(usize, String)>,
    /// When fewer than the limit were claimed: when the next delivery is due, if any is pending.
    pub next_due: Option<DateTime<Utc>>,
}

/// Writes one attempt's outcome in the caller's connection or transaction.
fn finish_in(
    connection: &Connection,
    event_id: &str,
    update: &DeliveryUpdate,
    time: &str,
) -> rusqlite::Result<()> {
    match update {
        DeliveryUpdate::Delivered => connection
            .prepare_cached(
                "UPDATE hook_deliveries SET state = 'delivered', delivered_at = ?2, updated_at = ?2,
                        last_exit_code = 0, last_error = NULL WHERE event_id = ?1",
            )?
            .execute(params![event_id, time]),
        DeliveryUpdate::Retry {
            next_attempt_at,
            exit_code,
            error,
        } => connection.execute(
            "UPDATE hook_deliveries SET state = 'pending', next_attempt_at = ?2, last_exit_code = ?3,
                    last_error = ?4, updated_at = ?5 WHERE event_id = ?1",
            params![event_id, timestamp(*next_attempt_at), exit_code, error, time],
        ),
        DeliveryUpdate::Postponed {
            next_attempt_at,
            error,
        } => connection.execute(
            "UPDATE hook_deliveries SET state = 'pending', next_attempt_at = ?2,
                    attempts = max(attempts - 1, 0), last_exit_code = NULL, last_error = ?3,
                    updated_at = ?4 WHERE event_id = ?1",
            params![event_id, timestamp(*next_attempt_at), error, time],
        ),
        DeliveryUpdate::Dead { exit_code, error } => connection.execute(
            "UPDATE hook_deliveries SET state = 'dead', last_exit_code = ?2, last_error = ?3,
                    updated_at = ?4 WHERE event_id = ?1",
            params![event_id, exit_code, error, time],
        ),
    }
    .map(|_| ())
}

/// The earliest time a pending delivery at the head of its queue can be claimed.
fn next_due_in(connection: &Connection) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let next: Option<String> = connection.query_row(
        &format!(
            "SELECT min(d.next_attempt_at) FROM hook_deliveries d
             WHERE d.state = 'pending' AND {HEAD_OF_QUEUE}"
        ),
        [],
        |row| row.get(0),
    )?;
    Ok(next
        .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
        .map(|t| t.with_timezone(&Utc)))
}

/// A pending delivery `d` may run: no other delivery of its checkout and hook is running (a
/// revived older one must not overlap a later one already started), and none queued before it
/// is still pending (so a revived older delivery goes before later ones not yet delivered).
/// Queue order is the row order: a delivery's first queueing, never its revival, places it.
const HEAD_OF_QUEUE: &str = "NOT EXISTS (
        SELECT 1 FROM hook_deliveries e
        WHERE e.checkout_id = d.checkout_id AND e.hook = d.hook AND e.rowid <> d.rowid
          AND (e.state = 'running' OR (e.state = 'pending' AND e.rowid < d.rowid)))";

const DELIVERY_COLUMNS: &str = "SELECT d.event_id, d.hook, d.checkout_id, c.order_id, c.request_id,
        d.transition_id, t.from_status, t.to_status, t.source, t.verified_at, c.amount, c.currency,
        d.state, d.attempts, d.next_attempt_at, d.last_exit_code, d.last_error, d.replay,
        d.created_at, d.delivered_at, t.verified_json, t.refunded_from, t.refunded_to,
        c.tracked_via
    FROM hook_deliveries d
    JOIN transitions t ON t.id = d.transition_id
    JOIN checkouts c ON c.id = d.checkout_id";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    let state: String = row.get(12)?;
    Ok(Delivery {
        event_id: row.get(0)?,
        hook: row.get(1)?,
        checkout_id: row.get(2)?,
        order_id: row.get(3)?,
        request_id: row.get(4)?,
        transition_id: row.get(5)?,
        previous_status: row
            .get::<_, Option<String>>(6)?
            .as_deref()
            .map(CheckoutStatus::parse),
        status: CheckoutStatus::parse(&row.get::<_, String>(7)?),
        source: row.get(8)?,
        verified_at: row.get(9)?,
        amount: row.get(10)?,
        currency: row.get(11)?,
        state: DeliveryState::parse(&state).unwrap_or(DeliveryState::Pending),
        attempts: row.get(13)?,
        next_attempt_at: row.get(14)?,
        last_exit_code: row.get(15)?,
        last_error: row.get(16)?,
        replay: row.get(17)?,
        created_at: row.get(18)?,
        delivered_at: row.get(19)?,
        verified_json: row.get(20)?,
        refunded_from: row.get(21)?,
        refunded_to: row.get(22)?,
        tracked_via: row.get(23)?,
    })
}

impl Sqlite {
    /// Puts deliveries left `running` by a daemon that died back to `pending`, due now.
    /// Returns how many.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn recover_running_deliveries(&self) -> Result<usize> {
        let time = now();
        self.lock()
            .execute(
                "UPDATE hook_deliveries SET state = 'pending', next_attempt_at = ?1, updated_at = ?1,
                        last_error = coalesce(last_error, 'interrupted: paywatch stopped while the hook ran')
                 WHERE state = 'running'",
                [time],
            )
            .map_err(|e| self.error("recover deliveries", e))
    }

    /// Claims up to `limit` due deliveries, marking them `running` and counting the attempt,
    /// all in one transaction (one commit however many it claims).
    ///
    /// A delivery is due when its time has come, no other delivery of the same checkout and
    /// hook is running, and no earlier one is still pending: one checkout's events reach a hook
    /// one at a time and in queue order, a revived (`hooks retry`) older one included.
    ///
    /// # Errors
    ///
    /// SQL failures.
    #[cfg(test)]
    pub(super) fn claim_due_deliveries(
        &self,
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        Ok(self.record_and_claim(&[], now_time, limit)?.claimed)
    }

    /// The dispatcher's one commit per round: writes the outcomes of finished attempts, then
    /// claims up to `limit` due deliveries (as [`Ledger::claim_due_deliveries`]), in one
    /// transaction. An outcome written here frees its checkout and hook's next event for the
    /// claim of the same transaction, so order holds.
    ///
    /// An outcome the ledger refuses (its statement fails) does not stop the others or the
    /// claim: it is handed back in [`RecordAndClaim::refused`], its row still `running`, for
    /// the caller to write again. When fewer than `limit` are claimed, also says when the next
    /// delivery is due ([`Ledger::next_delivery_due`]), so the caller needs no second call.
    ///
    /// This commit skips its fsync (synchronous NORMAL), so a hook's start waits for no disk
    /// flush. That keeps every promise of the outbox: the commit is in the log before any
    /// claimed process starts, so a killed daemon (SIGKILL, a panic) loses nothing of it; only a
    /// power loss or OS crash can lose it, together with every later commit (the log is
    /// replayed in order up to the last flushed frame), and then the rows are back as they were
    /// before it: an outcome not recorded or a claim not made, so the delivery runs again with
    /// the same event id, which at-least-once allows. The next fsync'd commit (the verifier's
    /// next transition) makes it durable too. Transitions and queued deliveries are always
    /// flushed.
    ///
    /// # Errors
    ///
    /// SQL failures of the transaction itself (begin, claim, commit): nothing was written.
    pub(super) fn record_and_claim(
        &self,
        outcomes: &[(String, DeliveryUpdate)],
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<RecordAndClaim> {
        self.write_without_fsync("claim", |transaction| {
            let time = now();
            let mut refused = Vec::new();
            for (index, (event_id, update)) in outcomes.iter().enumerate() {
                if let Err(error) = finish_in(transaction, event_id, update, &time) {
                    if transaction.is_autocommit() {
                        // SQLite rolled the whole transaction back (a full disk, an I/O
                        // error): nothing of this round stands.
                        return Err(error);
                    }
                    refused.push((index, self.error("finish delivery", error).to_string()));
                }
            }
            let due: Vec<Delivery> = if limit == 0 {
                Vec::new()
            } else {
                transaction
                    .prepare_cached(&format!(
                        "{DELIVERY_COLUMNS}
                         WHERE d.state = 'pending' AND d.next_attempt_at <= ?1
                           AND {HEAD_OF_QUEUE}
                         ORDER BY d.next_attempt_at, d.rowid LIMIT ?2"
                    ))?
                    .query_map(
                        params![timestamp(now_time), limit as i64],
                        delivery_from_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?
            };
            let mut claimed = Vec::with_capacity(due.len());
            for mut delivery in due {
                transaction
                    .prepare_cached(
                        "UPDATE hook_deliveries SET state = 'running', attempts = attempts + 1, updated_at = ?2
                         WHERE event_id = ?1",
                    )?
                    .execute(params![delivery.event_id, time])?;
                delivery.state = DeliveryState::Running;
                delivery.attempts += 1;
                claimed.push(delivery);
            }
            let next_due = if claimed.len() < limit {
                next_due_in(transaction)?
            } else {
                None
            };
            Ok(RecordAndClaim {
                claimed,
                refused,
                next_due,
            })
        })
    }

    /// Records how an attempt ended.
    ///
    /// # Errors
    ///
    /// SQL failures.
    #[cfg(test)]
    pub(super) fn finish_delivery(&self, event_id: &str, update: &DeliveryUpdate) -> Result<()> {
        let time = now();
        finish_in(&self.lock(), event_id, update, &time)
            .map_err(|e| self.error("finish delivery", e))
    }

    /// Revives a dead delivery (or hurries a pending one): pending, due now, attempts reset.
    /// Returns false if there is no such event or it is delivered or running.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn retry_delivery(&self, event_id: &str) -> Result<bool> {
        let time = now();
        self.lock()
            .execute(
                "UPDATE hook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, updated_at = ?2
                 WHERE event_id = ?1 AND state IN ('dead', 'pending')",
                params![event_id, time],
            )
            .map(|changed| changed == 1)
            .map_err(|e| self.error("retry delivery", e))
    }

    /// Revives every dead delivery; returns how many.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn retry_dead_deliveries(&self) -> Result<usize> {
        let time = now();
        self.lock()
            .execute(
                "UPDATE hook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?1, updated_at = ?1
                 WHERE state = 'dead'",
                [time],
            )
            .map_err(|e| self.error("retry dead deliveries", e))
    }

    /// Queues new deliveries (new event ids, marked replay) of past transitions verified at or
    /// after `since`, for `hooks` (names), optionally only for one status. Returns the event ids.
    ///
    /// # Errors
    ///
    /// SQL failures.
    ///
    /// Imported baselines (source `discovery-import`: statuses a checkout reached before
    /// paywatch could see it) are left out unless `include_imported`.
    pub(super) fn replay_deliveries(
        &self,
        since: DateTime<Utc>,
        status: Option<&str>,
        hooks: &[(String, Vec<String>)],
        include_imported: bool,
    ) -> Result<Vec<String>> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "replay")?;
        let transitions: Vec<(i64, String, String)> = {
            let mut statement = transaction
                .prepare(
                    "SELECT id, checkout_id, to_status FROM transitions
                     WHERE verified_at >= ?1 AND (?2 IS NULL OR to_status = ?2)
                       AND (?3 OR source <> 'discovery-import')
                     ORDER BY id",
                )
                .map_err(|e| self.error("replay", e))?;
            let rows = statement
                .query_map(params![timestamp(since), status, include_imported], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(|e| self.error("replay", e))?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(|e| self.error("replay", e))?
        };
        let mut events = Vec::new();
        for (transition_id, checkout_id, to_status) in transitions {
            for (hook, statuses) in hooks {
                if statuses.is_empty() || statuses.iter().any(|s| s == &to_status) {
                    events.push(
                        queue_in(&transaction, transition_id, &checkout_id, hook, true)
                            .map_err(|e| self.error("replay", e))?,
                    );
                }
            }
        }
        transaction.commit().map_err(|e| self.error("replay", e))?;
        Ok(events)
    }

    /// Deliveries matching `filter`, newest first.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>> {
        let connection = self.lock();
        let limit = filter.limit.map(|l| l as i64).unwrap_or(-1);
        let mut statement = connection
            .prepare_cached(&format!(
                "{DELIVERY_COLUMNS} WHERE (?1 IS NULL OR d.state = ?1) AND (?2 IS NULL OR d.checkout_id = ?2)
                 ORDER BY d.rowid DESC LIMIT ?3"
            ))
            .map_err(|e| self.error("deliveries", e))?;
        let rows = statement
            .query_map(
                params![
                    filter.state.map(DeliveryState::as_str),
                    filter.checkout_id,
                    limit
                ],
                delivery_from_row,
            )
            .map_err(|e| self.error("deliveries", e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.error("deliveries", e))
    }

    /// One delivery.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn delivery(&self, event_id: &str) -> Result<Option<Delivery>> {
        self.lock()
            .query_row(
                &format!("{DELIVERY_COLUMNS} WHERE d.event_id = ?1"),
                [event_id],
                delivery_from_row,
            )
            .optional()
            .map_err(|e| self.error("delivery", e))
    }

    /// The earliest time a pending delivery can be claimed, for the dispatcher's timer.
    ///
    /// Only deliveries at the head of their checkout and hook's queue count (the ones
    /// [`Ledger::claim_due_deliveries`] could hand out): a later event waiting behind one that is
    /// running or retrying later is not due, so the dispatcher never wakes for it in vain.
    ///
    /// # Errors
    ///
    /// SQL failures.
    #[cfg(test)]
    pub(super) fn next_delivery_due(&self) -> Result<Option<DateTime<Utc>>> {
        next_due_in(&self.lock()).map_err(|e| self.error("next due", e))
    }

    /// Transitions of one checkout as deliveries would see them, for `events`.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn deliveries_of(&self, checkout_id: &CheckoutId) -> Result<Vec<Delivery>> {
        self.deliveries(&DeliveryFilter {
            checkout_id: Some(checkout_id.to_string()),
            ..DeliveryFilter::default()
        })
    }
}
