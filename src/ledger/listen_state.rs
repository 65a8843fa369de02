//! What the Firestore listener keeps in the ledger: resume points, refusals, the watch set.
//!
//! Owns: `listen_targets` (resume tokens and read times), `listen_refusals`, the documents
//! `check-config --online` probes, the watch set the listener follows, and the end of the
//! refund watch of settled checkouts.
//! Must never: keep a resume token for a checkout no longer watched, or stop watching a
//! checkout with a change not yet verified.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::sqlite::{Sqlite, now};
use super::{Result, timestamp};
use crate::domain::{CheckoutId, FirestoreLocation};

/// A checkout the listener should watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEntry {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// Its document.
    pub location: FirestoreLocation,
    /// The last persisted resume token, if any.
    pub resume_token: Option<Vec<u8>>,
    /// The read time the token came with (stored to the millisecond, rounded down).
    pub resume_read_time: Option<DateTime<Utc>>,
    /// Whether a change was seen but not yet verified, or no status is recorded yet.
    pub needs_verify: bool,
}

/// A Listen resume token to save with [`Ledger::save_resume_points`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The checkout whose target the token resumes.
    pub checkout_id: CheckoutId,
    /// Firestore's opaque resume token.
    pub token: Vec<u8>,
    /// The read time of the snapshot the token came with.
    pub read_time: Option<DateTime<Utc>>,
}
impl Sqlite {
    /// Persists resume tokens (only for still-watched checkouts): the checkpoints of one or
    /// several snapshots (the listener's batch of events), in one transaction, each token with
    /// the read time of its own snapshot, in order, so a checkout's later token replaces its
    /// earlier one.
    ///
    /// No fsync of its own: a token lost in a crash only makes Firestore resend changes the
    /// daemon may already have verified (verifying again changes nothing), and a token that
    /// survives always has the change notes written before it ([`Ledger::mark_needs_verify`]):
    /// in WAL mode a commit becomes durable only with every commit before it. The next fsync'd
    /// commit (a verification) makes it durable. Skipping the fsync keeps a change's own
    /// checkpoint from sitting between its answer and the ledger.
    ///
    /// # Errors
    ///
    /// SQL failures (then none of them is saved).
    pub(super) fn save_resume_points(&self, points: &[ResumePoint]) -> Result<()> {
        self.write_without_fsync("save tokens", |transaction| {
            let mut statement = transaction.prepare_cached(
                "INSERT INTO listen_targets (checkout_id, resume_token, read_time, updated_at)
                 SELECT id, ?2, ?3, ?4 FROM checkouts WHERE id = ?1 AND watched = 1
                 ON CONFLICT (checkout_id) DO UPDATE SET
                    resume_token = excluded.resume_token,
                    read_time = excluded.read_time,
                    updated_at = excluded.updated_at",
            )?;
            let updated = now();
            for point in points {
                statement.execute(params![
                    point.checkout_id.as_str(),
                    point.token,
                    point.read_time.map(timestamp),
                    updated
                ])?;
            }
            Ok(())
        })
    }

    /// Drops a checkout's resume token (after a RESET or an existence-filter mismatch).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn forget_resume_token(&self, id: &CheckoutId) -> Result<()> {
        self.lock()
            .execute(
                "DELETE FROM listen_targets WHERE checkout_id = ?1",
                [id.as_str()],
            )
            .map(|_| ())
            .map_err(|e| self.error("forget token", e))
    }

    /// Notes that Firestore refused to watch a checkout's document (see [`ListenRefusal`]).
    /// A checkout not in the ledger is ignored.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn note_listen_refusal(
        &self,
        id: &CheckoutId,
        code: &str,
        message: &str,
        document: &str,
        next_retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let at = now();
        self.lock()
            .execute(
                "INSERT INTO listen_refusals (checkout_id, refusal_code, refusal_message,
                    refused_document, first_refused_at, last_refused_at, refusal_count, next_retry_at)
                 SELECT id, ?2, ?3, ?4, ?5, ?5, 1, ?6 FROM checkouts WHERE id = ?1
                 ON CONFLICT (checkout_id) DO UPDATE SET
                    refusal_code = excluded.refusal_code,
                    refusal_message = excluded.refusal_message,
                    refused_document = excluded.refused_document,
                    last_refused_at = excluded.last_refused_at,
                    refusal_count = refusal_count + 1,
                    next_retry_at = excluded.next_retry_at",
                params![
                    id.as_str(),
                    code,
                    message,
                    document,
                    at,
                    next_retry_at.map(timestamp)
                ],
            )
            .map(|_| ())
            .map_err(|e| self.error("note listen refusal", e))
    }

    /// Forgets a checkout's listen refusal (Firestore accepts its document again).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn clear_listen_refusal(&self, id: &CheckoutId) -> Result<()> {
        self.lock()
            .execute(
                "DELETE FROM listen_refusals WHERE checkout_id = ?1",
                [id.as_str()],
            )
            .map(|_| ())
            .map_err(|e| self.error("clear listen refusal", e))
    }

    /// Forgets every listen refusal (at daemon start: the new listener asks Firestore afresh
    /// and notes what it refuses again).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn clear_listen_refusals(&self) -> Result<()> {
        self.lock()
            .execute("DELETE FROM listen_refusals", [])
            .map(|_| ())
            .map_err(|e| self.error("clear listen refusals", e))
    }

    /// One checkout per Firebase project (a watched one if the project has any, else the newest),
    /// or just `only`, with its document: what `check-config --online` opens a Listen on.
    /// Reads the `checkouts` table only, so it works on any schema version.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn probe_documents(
        &self,
        only: Option<&CheckoutId>,
    ) -> Result<Vec<(CheckoutId, FirestoreLocation)>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT id, firebase_database, firebase_collection, firebase_document
                 FROM checkouts WHERE ?1 IS NULL OR id = ?1
                 ORDER BY watched DESC, created_at DESC, id",
            )
            .map_err(|e| self.error("probe documents", e))?;
        let rows = statement
            .query_map([only.map(CheckoutId::as_str)], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| self.error("probe documents", e))?;
        let mut seen = std::collections::HashSet::new();
        let mut documents = Vec::new();
        for row in rows {
            let (id, project, collection, document) =
                row.map_err(|e| self.error("probe documents", e))?;
            if !seen.insert(project.clone()) {
                continue;
            }
            if let (Ok(id), Ok(location)) = (
                id.parse::<CheckoutId>(),
                FirestoreLocation::new(&project, &collection, &document),
            ) {
                documents.push((id, location));
            }
        }
        Ok(documents)
    }

    /// Every watched checkout with its document and resume token.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn watch_set(&self) -> Result<Vec<WatchEntry>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT c.id, c.firebase_database, c.firebase_collection, c.firebase_document,
                        t.resume_token, c.needs_verify, c.status, t.read_time
                 FROM checkouts c LEFT JOIN listen_targets t ON t.checkout_id = c.id
                 WHERE c.watched = 1 AND c.firebase_database <> '' ORDER BY c.created_at, c.id",
            )
            .map_err(|e| self.error("watch set", e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Option<Vec<u8>>>(4)?,
                    row.get::<_, bool>(5)?,
                    row.get::<_, Option<String>>(6)?,
                    row.get::<_, Option<String>>(7)?,
                ))
            })
            .map_err(|e| self.error("watch set", e))?;
        let mut entries = Vec::new();
        for row in rows {
            let (id, database, collection, document, token, needs_verify, status, read_time) =
                row.map_err(|e| self.error("watch set", e))?;
            // Unparsable: unknown, which only costs verifications (never skips one).
            let resume_read_time = read_time
                .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
                .map(|time| time.with_timezone(&Utc));
            // Rows were validated on the way in; a row edited by hand into garbage is skipped
            // with a warning rather than stopping the daemon.
            let (Ok(checkout_id), Ok(location)) = (
                id.parse::<CheckoutId>(),
                FirestoreLocation::new(&database, &collection, &document),
            ) else {
                tracing::warn!(checkout = %crate::domain::printable(&id), "skipping a ledger row with an invalid id or Firebase coordinates");
                continue;
            };
            entries.push(WatchEntry {
                checkout_id,
                location,
                resume_token: token,
                resume_read_time,
                needs_verify: needs_verify || status.is_none(),
            });
        }
        Ok(entries)
    }

    /// Stops watching PAID checkouts whose refund-watch period has ended; returns their ids.
    /// A checkout with a change not yet verified stays watched until it is verified (the
    /// change may be the refund).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn expire_refund_watch(&self, now_time: DateTime<Utc>) -> Result<Vec<CheckoutId>> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "refund watch")?;
        let ids: Vec<String> = {
            let mut statement = transaction
                .prepare_cached("SELECT id FROM checkouts WHERE watched = 1 AND needs_verify = 0 AND watch_until IS NOT NULL AND watch_until <= ?1")
                .map_err(|e| self.error("refund watch", e))?;
            let rows = statement
                .query_map([timestamp(now_time)], |row| row.get(0))
                .map_err(|e| self.error("refund watch", e))?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(|e| self.error("refund watch", e))?
        };
        for id in &ids {
            transaction
                .execute(
                    "UPDATE checkouts SET watched = 0, updated_at = ?2 WHERE id = ?1",
                    params![id, now()],
                )
                .map_err(|e| self.error("refund watch", e))?;
            transaction
                .execute("DELETE FROM listen_targets WHERE checkout_id = ?1", [id])
                .map_err(|e| self.error("refund watch", e))?;
        }
        transaction
            .commit()
            .map_err(|e| self.error("refund watch", e))?;
        Ok(ids.into_iter().filter_map(|id| id.parse().ok()).collect())
    }
}
