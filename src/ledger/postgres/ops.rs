//! The ledger's operations on PostgreSQL, each one transaction, every daemon write fenced.
//!
//! Owns: [`PgStore::begin_write`], the one way a write transaction starts (on a daemon's store
//! it passes the fence with the epoch of the role the keeper publishes, and a standby's write is
//! refused before it reaches the database), pooled connections, and the SQL of tracking a
//! checkout, Listen resume points, clearing listen refusals, single tickets and discovery's
//! epoch and rounds. The rest is in `apply.rs`, `outbox.rs` and `reads.rs`.
//! Must never: write from a daemon's store without the fence (the schema refuses that too), or
//! record a status that did not come from Get Checkout (tracking records none).
//!
//! Money crosses as exact decimal text (`CAST($n::TEXT AS NUMERIC)`), never as a float.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Transaction};

use super::{PgError, PgStore, fence};
use crate::domain::{CheckoutId, TrackedVia, VerifyTicket};
use crate::ledger::{ResumePoint, TrackOutcome};
use crate::paymennt::wire::CheckoutFacts;

/// How many times a save of resume tokens is tried when it deadlocks.
const SAVE_ATTEMPTS: u32 = 3;

/// Why an attempt to save resume tokens failed: a deadlock PostgreSQL broke by aborting it
/// (worth another attempt), or anything else.
enum SaveFailure {
    Deadlock(PgError),
    Other(PgError),
}

impl PgStore {
    /// A pooled connection.
    pub(super) async fn client(&self) -> Result<Object, PgError> {
        self.pool()
            .get()
            .await
            .map_err(|error| PgError::from_pool(self.target(), &error))
    }

    /// Starts a write transaction on `client`: on a daemon's store (one given the keeper's
    /// role, [`PgStore::with_role`]) it is fenced at the current epoch, and refused at once
    /// while standing by.
    ///
    /// # Errors
    ///
    /// [`PgError::Fenced`] while standing by or when the epoch is no longer current; database
    /// failures.
    pub async fn begin_write<'c>(
        &self,
        client: &'c mut Object,
    ) -> Result<Transaction<'c>, PgError> {
        let epoch = match self.role() {
            None => None,
            Some(role) => Some(role.borrow().epoch().ok_or_else(|| PgError::Fenced {
                target: self.target().describe().to_owned(),
                detail: "this daemon is standing by (it does not hold the lease)".to_owned(),
            })?),
        };
        let transaction = client
            .transaction()
            .await
            .map_err(|error| self.db(&error))?;
        if let Some(epoch) = epoch {
            fence(&transaction, self.target(), epoch).await?;
        }
        Ok(transaction)
    }

    pub(super) fn db(&self, error: &tokio_postgres::Error) -> PgError {
        PgError::from_db(self.target(), error)
    }

    /// Records a checkout to watch; tracking it again changes nothing. The status in `facts`
    /// is not recorded (only a verified one is). Facts without Firebase coordinates are
    /// refused.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; no coordinates; database failures.
    pub async fn track(
        &self,
        facts: &CheckoutFacts,
        via: TrackedVia,
    ) -> Result<TrackOutcome, PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let outcome = self.track_in(&transaction, facts, via, false).await?;
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(outcome)
    }

    /// Saves Listen resume tokens, for still-watched checkouts only, in one transaction, in
    /// order (a checkout's later token replaces its earlier one).
    ///
    /// Each token's row shares its checkout's row (the foreign key), while a group of answers
    /// locks its checkouts' rows in its own order (`apply_all`): the two can deadlock, and when
    /// PostgreSQL aborts this save, it is made again (up to [`SAVE_ATTEMPTS`] times). Tokens
    /// dropped here would stay unsaved until the target's next checkpoint, and a daemon taking
    /// over meanwhile would verify those checkouts again.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`] (a paused daemon cannot move a cursor); database failures
    /// (then none of them is saved).
    pub async fn save_resume_points(&self, points: &[ResumePoint]) -> Result<(), PgError> {
        let mut attempt = 1;
        loop {
            match self.save_resume_points_once(points).await {
                Err(SaveFailure::Deadlock(error)) if attempt < SAVE_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        "saving resume tokens deadlocked with another write; saving them again: {error}"
                    );
                    attempt += 1;
                }
                Err(SaveFailure::Deadlock(error) | SaveFailure::Other(error)) => {
                    return Err(error);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// One attempt of [`PgStore::save_resume_points`].
    async fn save_resume_points_once(&self, points: &[ResumePoint]) -> Result<(), SaveFailure> {
        let failure = |error: tokio_postgres::Error| {
            let deadlock =
                error.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED);
            let error = self.db(&error);
            if deadlock {
                SaveFailure::Deadlock(error)
            } else {
                SaveFailure::Other(error)
            }
        };
        let mut client = self.client().await.map_err(SaveFailure::Other)?;
        let transaction = self
            .begin_write(&mut client)
            .await
            .map_err(SaveFailure::Other)?;
        // The checkouts first, shared, in the one order every writer of several checkouts
        // locks them in (their ids ascending; see `lock_in_order`), so this save and a group of
        // answers wait for each other rather than deadlock.
        let mut ordered: Vec<&ResumePoint> = points.iter().collect();
        ordered.sort_by(|a, b| a.checkout_id.as_str().cmp(b.checkout_id.as_str()));
        let ids: Vec<&str> = ordered
            .iter()
            .map(|point| point.checkout_id.as_str())
            .collect();
        super::apply::lock_in_order(&transaction, &ids, "FOR KEY SHARE")
            .await
            .map_err(failure)?;
        let statement = transaction
            .prepare_cached(
                "INSERT INTO listen_targets (checkout_id, resume_token, read_time, updated_at)
                 SELECT id, $2, $3, $4 FROM checkouts WHERE id = $1 AND watched
                 ON CONFLICT (checkout_id) DO UPDATE SET
                    resume_token = excluded.resume_token,
                    read_time = excluded.read_time,
                    updated_at = excluded.updated_at",
            )
            .await
            .map_err(failure)?;
        let updated = super::apply::now_ms();
        // A stable sort: a checkout's later token still replaces its earlier one.
        for point in ordered {
            transaction
                .execute(
                    &statement,
                    &[
                        &point.checkout_id.as_str(),
                        &point.token,
                        &point.read_time.map(super::apply::millis),
                        &updated,
                    ],
                )
                .await
                .map_err(failure)?;
        }
        transaction.commit().await.map_err(failure)
    }

    /// Drops a checkout's resume token (after a RESET or an existence-filter mismatch).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn forget_resume_token(&self, id: &CheckoutId) -> Result<(), PgError> {
        self.write_one(
            "DELETE FROM listen_targets WHERE checkout_id = $1",
            &[&id.as_str()],
        )
        .await
        .map(drop)
    }

    /// Forgets every listen refusal (at daemon start).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn clear_listen_refusals(&self) -> Result<(), PgError> {
        self.write_one("DELETE FROM listen_refusals", &[])
            .await
            .map(drop)
    }

    /// Hands out the next verification ticket (the counter only grows).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn issue_ticket(&self) -> Result<VerifyTicket, PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let row = transaction
            .query_one(
                "UPDATE verify_tickets SET last = last + 1 WHERE id = 1 RETURNING last",
                &[],
            )
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(VerifyTicket::new(row.get(0)))
    }

    /// The last ticket handed out: every ticket issued after this call is greater.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn last_ticket(&self) -> Result<VerifyTicket, PgError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT last FROM verify_tickets WHERE id = 1", &[])
            .await
            .map_err(|error| self.db(&error))?;
        Ok(VerifyTicket::new(row.get(0)))
    }

    /// When discovery first ran on this ledger, setting it to `now_time` if it never ran.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn begin_discovery_epoch(
        &self,
        now_time: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let row = transaction
            .query_one(
                "WITH inserted AS (
                     INSERT INTO discovery_epoch (id, epoch) VALUES (1, $1)
                     ON CONFLICT (id) DO NOTHING RETURNING epoch)
                 SELECT epoch FROM inserted
                 UNION ALL SELECT epoch FROM discovery_epoch WHERE id = 1
                 LIMIT 1",
                &[&super::apply::millis(now_time)],
            )
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(row.get(0))
    }

    /// When the last complete discovery round for checkout type `kind` started, if one did.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn last_discovery_round(&self, kind: &str) -> Result<Option<DateTime<Utc>>, PgError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT started_at FROM discovery_rounds WHERE kind = $1",
                &[&kind],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Records that a discovery round for `kind`, started at `started_at`, saw every page.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn finish_discovery_round(
        &self,
        kind: &str,
        started_at: DateTime<Utc>,
    ) -> Result<(), PgError> {
        self.write_one(
            "INSERT INTO discovery_rounds (kind, started_at, finished_at) VALUES ($1, $2, $3)
             ON CONFLICT (kind) DO UPDATE SET started_at = excluded.started_at,
                finished_at = excluded.finished_at",
            &[
                &kind,
                &super::apply::millis(started_at),
                &super::apply::now_ms(),
            ],
        )
        .await
        .map(drop)
    }

    /// One statement in a write transaction of its own; the rows it touched.
    pub(super) async fn write_one(
        &self,
        sql: &str,
        parameters: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let touched = transaction
            .execute(sql, parameters)
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(touched)
    }
}
