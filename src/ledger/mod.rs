//! The ledger: checkouts, their verified history, the hook outbox and resume state.
//!
//! Owns: the one async interface every other module uses to read and write what paywatch
//! knows ([`Ledger`], whose methods are those of [`Backend`]), and every SQL statement in
//! paywatch. Each method is one transaction, so writes that belong together (a transition and
//! its hook deliveries) land together or not at all.
//! Must never: record a status that did not come from Get Checkout. [`Backend::apply`] takes a
//! [`VerifiedCheckout`](crate::paymennt::VerifiedCheckout), which only the paymennt client can build.
//!
//! Layout: [`Backend`] is the interface a store implements: SQLite (`sqlite.rs`: opening, the
//! connection, and how its synchronous calls reach the blocking pool) and PostgreSQL
//! ([`postgres`], [`Ledger::postgres`]); `copy.rs` copies the one into the other. Its SQL is split by job: `transitions.rs` (track, apply, the outbox fan-out),
//! `tickets.rs` (verification tickets, noted changes, "not found" counts), `listen_state.rs`
//! (resume points, Listen refusals, probes, the watch set, the refund watch), `discovery.rs`
//! (epoch, rounds, discovered checkouts, open checkouts), `queries.rs` (what the CLI and
//! status read), `outbox.rs` (hook deliveries), `gauges.rs` (the metrics' figures) and
//! `migrate.rs` (the schema).

mod backend;
mod copy;
mod discovery;
mod gauges;
mod listen_state;
mod migrate;
mod outbox;
pub mod postgres;
mod queries;
mod sqlite;
mod tickets;
mod transitions;

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};

pub use crate::domain::TrackedVia;
pub use backend::Backend;
pub use copy::{CopyCounts, CopyError, copy_to_postgres};
pub use discovery::{Discovered, DiscoveredOutcome, OpenCheckout};
pub use gauges::{LedgerGauges, UndeliveredCount};
pub use listen_state::{ResumePoint, WatchEntry};
pub use migrate::SCHEMA_VERSION;
pub use outbox::{Delivery, DeliveryFilter, DeliveryState, DeliveryUpdate, RecordAndClaim};
pub use queries::{
    CheckoutRecord, FirebaseCoordinates, LedgerCounts, ListFilter, ListenRefusal, TransitionRecord,
};
use sqlite::Sqlite;
pub use tickets::{LookingGone, NOT_FOUND_LIMIT, NotFoundOutcome, NotedChanges};
pub use transitions::{ApplyOutcome, ApplyRequest, TrackOutcome};

/// A ledger failure. The message names the database file.
#[derive(Debug, thiserror::Error)]
#[error("ledger {path}: {message}")]
pub struct LedgerError {
    /// The database file (or `:memory:`).
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// The result type of ledger calls.
pub type Result<T> = std::result::Result<T, LedgerError>;

/// A handle on the ledger: a shared pointer to its backend, so its methods are those of
/// [`Backend`], each awaited (`ledger.track(&facts, via).await`). Cheap to clone; clones share
/// one backend (for SQLite, one connection).
#[derive(Clone)]
pub struct Ledger {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.backend.path())
            .finish()
    }
}

impl std::ops::Deref for Ledger {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Ledger {
    /// Opens (creating if needed) the SQLite ledger at `path`: the directory is created, the
    /// file is made mode 0600, WAL and a busy timeout are turned on, and migrations run.
    ///
    /// # Errors
    ///
    /// Names the path and what failed (directory not writable, newer schema, ...).
    pub async fn open(path: &Path) -> Result<Ledger> {
        let path = path.to_owned();
        let shown = path.display().to_string();
        sqlite::blocking(&shown, move || Sqlite::open(&path))
            .await
            .map(Ledger::sqlite)
    }

    /// Opens an existing SQLite ledger for reading only, without migrating it (`check-config`
    /// looks at it while a daemon may be running on it).
    ///
    /// # Errors
    ///
    /// Names the path and what failed.
    pub async fn open_read_only(path: &Path) -> Result<Ledger> {
        let path = path.to_owned();
        let shown = path.display().to_string();
        sqlite::blocking(&shown, move || Sqlite::open_read_only(&path))
            .await
            .map(Ledger::sqlite)
    }

    /// An in-memory SQLite ledger, for tests. Opening it does not touch the disk, so it needs
    /// no runtime.
    ///
    /// # Errors
    ///
    /// Only if SQLite itself fails.
    pub fn open_in_memory() -> Result<Ledger> {
        Sqlite::open_in_memory().map(Ledger::sqlite)
    }

    /// The ledger on an open PostgreSQL store (see [`postgres::PgStore::open`]); a daemon's
    /// store ([`postgres::PgStore::with_role`]) writes only while it holds the lease.
    pub fn postgres(store: postgres::PgStore) -> Ledger {
        Ledger {
            backend: Arc::new(store),
        }
    }

    fn sqlite(store: Sqlite) -> Ledger {
        Ledger {
            backend: Arc::new(store),
        }
    }
}

/// Direct access to the SQLite store, for tests that look at or tamper with rows.
#[cfg(test)]
impl Ledger {
    /// The SQLite store behind this handle.
    ///
    /// # Panics
    ///
    /// If the ledger is not SQLite.
    pub(crate) fn store(&self) -> &Sqlite {
        self.backend
            .as_any()
            .downcast_ref::<Sqlite>()
            .expect("a SQLite ledger")
    }

    /// The SQLite connection, locked.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.store().lock()
    }

    /// See [`Sqlite::mark_needs_verify`].
    pub(crate) fn mark_needs_verify(
        &self,
        ids: &[crate::domain::CheckoutId],
        seen_after: crate::domain::VerifyTicket,
    ) -> Result<()> {
        self.store().mark_needs_verify(ids, seen_after)
    }

    /// See [`Sqlite::claim_due_deliveries`].
    pub(crate) fn claim_due_deliveries(
        &self,
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        self.store().claim_due_deliveries(now_time, limit)
    }

    /// See [`Sqlite::finish_delivery`].
    pub(crate) fn finish_delivery(&self, event_id: &str, update: &DeliveryUpdate) -> Result<()> {
        self.store().finish_delivery(event_id, update)
    }

    /// See [`Sqlite::next_delivery_due`].
    pub(crate) fn next_delivery_due(&self) -> Result<Option<DateTime<Utc>>> {
        self.store().next_delivery_due()
    }
}

/// Formats a time the way the ledger stores it: RFC 3339, UTC, milliseconds.
pub fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Helpers for tests elsewhere in the crate that look at what the ledger wrote.
#[cfg(test)]
pub(crate) mod testing {
    use super::Ledger;

    /// How many transactions have been committed to the ledger's write-ahead log so far: the
    /// frames of the current WAL generation that end a transaction (a commit frame carries the
    /// database size; others carry 0). Valid while no checkpoint restarts the log (a small test).
    pub(crate) fn wal_commits(ledger: &Ledger) -> usize {
        let mut wal = ledger.path().into_os_string();
        wal.push("-wal");
        let bytes = std::fs::read(&wal).unwrap_or_default();
        if bytes.len() < 32 {
            return 0;
        }
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let page_size = word(8) as usize;
        let salts = &bytes[16..24];
        let mut commits = 0;
        let mut at = 32;
        while at + 24 + page_size <= bytes.len() {
            if &bytes[at + 8..at + 16] != salts {
                break;
            }
            if word(at + 4) != 0 {
                commits += 1;
            }
            at += 24 + page_size;
        }
        commits
    }
}

#[cfg(test)]
mod tests;
