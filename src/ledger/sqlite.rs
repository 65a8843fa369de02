//! The SQLite store: opening the file, its one connection, and how its synchronous calls
//! reach async callers.
//!
//! Owns: the [`Sqlite`] store (a connection behind a std `Mutex`, shared by clones), opening
//! and configuring it (directory, mode 0600, WAL, busy timeout, migrations), its transactions
//! (`BEGIN IMMEDIATE`, the fsync-less ones), the operator's next step for SQLite errors, and
//! its [`Backend`] implementation: each call runs on tokio's blocking pool.
//! Must never: run SQL on a runtime thread (every [`Backend`] method goes through
//! [`blocking`]), or hold the connection's lock across an await.
//!
//! The connection sits behind a std `Mutex`: every call is short and synchronous, and a call
//! runs whole on one blocking-pool thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::{
    ApplyOutcome, ApplyRequest, Backend, CheckoutRecord, Delivery, DeliveryFilter, DeliveryUpdate,
    Discovered, LedgerCounts, LedgerError, LedgerGauges, ListFilter, LookingGone, NotFoundOutcome,
    NotedChanges, OpenCheckout, RecordAndClaim, Result, ResumePoint, TrackOutcome, TrackedVia,
    TransitionRecord, WatchEntry, migrate, timestamp,
};
use crate::domain::{CheckoutId, FirestoreLocation, Source, VerifyTicket};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::CheckoutFacts;
use crate::settings::HookSettings;

/// The SQLite store. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub(crate) struct Sqlite {
    /// The one connection; every call holds it for one transaction.
    connection: Arc<Mutex<Connection>>,
    /// The database file (or `:memory:`), for errors.
    pub(super) path: Arc<str>,
}

/// Runs `call` on tokio's blocking pool and waits for it without blocking the runtime. `path`
/// names the store in the error if the call panicked (its transaction rolled back).
pub(super) async fn blocking<T: Send + 'static>(
    path: &str,
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|error| {
            Err(LedgerError {
                path: path.to_owned(),
                message: format!("the ledger call failed: {error}"),
            })
        })
}

impl Sqlite {
    /// Runs `call` with this store on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Sqlite) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        blocking(&self.path, move || call(&store)).await
    }

    /// Runs `call`, which answers each of `count` items, on the blocking pool; if it panics,
    /// every item gets the error.
    async fn run_all<T: Send + 'static>(
        &self,
        count: usize,
        call: impl FnOnce(&Sqlite) -> Vec<Result<T>> + Send + 'static,
    ) -> Vec<Result<T>> {
        let store = self.clone();
        match blocking(&self.path, move || Ok(call(&store))).await {
            Ok(results) => results,
            Err(error) => (0..count)
                .map(|_| {
                    Err(LedgerError {
                        path: error.path.clone(),
                        message: error.message.clone(),
                    })
                })
                .collect(),
        }
    }
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    fn path(&self) -> PathBuf {
        PathBuf::from(&*self.path)
    }

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    async fn track(&self, facts: &CheckoutFacts, via: TrackedVia) -> Result<TrackOutcome> {
        let facts = facts.clone();
        self.run(move |db| db.track(&facts, via)).await
    }

    async fn apply(
        &self,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome> {
        let verified = verified.clone();
        let hooks = hooks.to_vec();
        self.run(move |db| db.apply(&verified, source, changed_at, &hooks, refund_watch))
            .await
    }

    async fn apply_all(
        &self,
        requests: Vec<ApplyRequest>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Vec<Result<ApplyOutcome>> {
        let hooks = hooks.to_vec();
        self.run_all(requests.len(), move |db| {
            db.apply_all(&requests, &hooks, refund_watch)
        })
        .await
    }

    async fn begin_discovery_epoch(&self, now_time: DateTime<Utc>) -> Result<DateTime<Utc>> {
        self.run(move |db| db.begin_discovery_epoch(now_time)).await
    }

    async fn last_discovery_round(&self, kind: &str) -> Result<Option<DateTime<Utc>>> {
        let kind = kind.to_owned();
        self.run(move |db| db.last_discovery_round(&kind)).await
    }

    async fn finish_discovery_round(&self, kind: &str, started_at: DateTime<Utc>) -> Result<()> {
        let kind = kind.to_owned();
        self.run(move |db| db.finish_discovery_round(&kind, started_at))
            .await
    }

    async fn record_discovered(&self, found: &[CheckoutFacts]) -> Result<Vec<Discovered>> {
        let found = found.to_vec();
        self.run(move |db| db.record_discovered(&found)).await
    }

    async fn open_checkouts(&self) -> Result<Vec<OpenCheckout>> {
        self.run(move |db| db.open_checkouts()).await
    }

    async fn issue_ticket(&self) -> Result<VerifyTicket> {
        self.run(move |db| db.issue_ticket()).await
    }

    async fn issue_tickets(
        &self,
        wanted: &[(CheckoutId, Option<VerifyTicket>)],
    ) -> Result<Vec<Option<VerifyTicket>>> {
        let wanted = wanted.to_vec();
        self.run(move |db| db.issue_tickets(&wanted)).await
    }

    async fn last_ticket(&self) -> Result<VerifyTicket> {
        self.run(move |db| db.last_ticket()).await
    }

    async fn note_changes(&self, ids: &[CheckoutId]) -> Result<NotedChanges> {
        let ids = ids.to_vec();
        self.run(move |db| db.note_changes(&ids)).await
    }

    async fn note_not_found(&self, id: &CheckoutId) -> Result<NotFoundOutcome> {
        let id = id.clone();
        self.run(move |db| db.note_not_found(&id)).await
    }

    async fn looking_gone(&self) -> Result<LookingGone> {
        self.run(move |db| db.looking_gone()).await
    }

    async fn save_resume_points(&self, points: &[ResumePoint]) -> Result<()> {
        let points = points.to_vec();
        self.run(move |db| db.save_resume_points(&points)).await
    }

    async fn forget_resume_token(&self, id: &CheckoutId) -> Result<()> {
        let id = id.clone();
        self.run(move |db| db.forget_resume_token(&id)).await
    }

    async fn note_listen_refusal(
        &self,
        id: &CheckoutId,
        code: &str,
        message: &str,
        document: &str,
        next_retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let id = id.clone();
        let code = code.to_owned();
        let message = message.to_owned();
        let document = document.to_owned();
        self.run(move |db| db.note_listen_refusal(&id, &code, &message, &document, next_retry_at))
            .await
    }

    async fn clear_listen_refusal(&self, id: &CheckoutId) -> Result<()> {
        let id = id.clone();
        self.run(move |db| db.clear_listen_refusal(&id)).await
    }

    async fn clear_listen_refusals(&self) -> Result<()> {
        self.run(move |db| db.clear_listen_refusals()).await
    }

    async fn probe_documents(
        &self,
        only: Option<&CheckoutId>,
    ) -> Result<Vec<(CheckoutId, FirestoreLocation)>> {
        let only = only.cloned();
        self.run(move |db| db.probe_documents(only.as_ref())).await
    }

    async fn watch_set(&self) -> Result<Vec<WatchEntry>> {
        self.run(move |db| db.watch_set()).await
    }

    async fn expire_refund_watch(&self, now_time: DateTime<Utc>) -> Result<Vec<CheckoutId>> {
        self.run(move |db| db.expire_refund_watch(now_time)).await
    }

    async fn checkout(&self, id: &CheckoutId) -> Result<Option<CheckoutRecord>> {
        let id = id.clone();
        self.run(move |db| db.checkout(&id)).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<CheckoutRecord>> {
        let filter = filter.clone();
        self.run(move |db| db.list(&filter)).await
    }

    async fn transitions(&self, id: &CheckoutId) -> Result<Vec<TransitionRecord>> {
        let id = id.clone();
        self.run(move |db| db.transitions(&id)).await
    }

    async fn counts(&self) -> Result<LedgerCounts> {
        self.run(move |db| db.counts()).await
    }

    async fn data_version(&self) -> Result<i64> {
        self.run(move |db| db.data_version()).await
    }

    async fn check_writable(&self) -> Result<()> {
        self.run(move |db| db.check_writable()).await
    }

    async fn recover_running_deliveries(&self) -> Result<usize> {
        self.run(move |db| db.recover_running_deliveries()).await
    }

    async fn record_and_claim(
        &self,
        outcomes: &[(String, DeliveryUpdate)],
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<RecordAndClaim> {
        let outcomes = outcomes.to_vec();
        self.run(move |db| db.record_and_claim(&outcomes, now_time, limit))
            .await
    }

    async fn retry_delivery(&self, event_id: &str) -> Result<bool> {
        let event_id = event_id.to_owned();
        self.run(move |db| db.retry_delivery(&event_id)).await
    }

    async fn retry_dead_deliveries(&self) -> Result<usize> {
        self.run(move |db| db.retry_dead_deliveries()).await
    }

    async fn replay_deliveries(
        &self,
        since: DateTime<Utc>,
        status: Option<&str>,
        hooks: &[(String, Vec<String>)],
        include_imported: bool,
    ) -> Result<Vec<String>> {
        let status = status.map(str::to_owned);
        let hooks = hooks.to_vec();
        self.run(move |db| db.replay_deliveries(since, status.as_deref(), &hooks, include_imported))
            .await
    }

    async fn deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>> {
        let filter = filter.clone();
        self.run(move |db| db.deliveries(&filter)).await
    }

    async fn delivery(&self, event_id: &str) -> Result<Option<Delivery>> {
        let event_id = event_id.to_owned();
        self.run(move |db| db.delivery(&event_id)).await
    }

    async fn deliveries_of(&self, checkout_id: &CheckoutId) -> Result<Vec<Delivery>> {
        let checkout_id = checkout_id.clone();
        self.run(move |db| db.deliveries_of(&checkout_id)).await
    }

    async fn gauges(&self) -> Result<LedgerGauges> {
        self.run(move |db| db.gauges()).await
    }
}

/// What the operator can do about an SQLite failure, as a blank line and a next step; empty
/// when the error is not one an operator can act on (or not an SQLite error at all).
fn next_step(error: &(dyn std::any::Any + 'static)) -> &'static str {
    use rusqlite::ErrorCode;
    let Some(code) = error
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
    else {
        return "";
    };
    match code {
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
            "\n\nanother process held a write lock on the ledger for over 10 s (a backup tool, an \
             sqlite3 shell?); let it finish and try again"
        }
        ErrorCode::ReadOnly => {
            "\n\nthe ledger is read-only for this user: paywatch writes the file and its -wal and \
             -shm files beside it; check their owner and mode and the directory's"
        }
        ErrorCode::NotADatabase => {
            "\n\nthis file is not a paywatch ledger (or it is damaged); check [ledger] path, or \
             restore the ledger from a backup (paywatch never overwrites it)"
        }
        ErrorCode::DiskFull => "\n\nthe disk holding the ledger is full",
        ErrorCode::CannotOpen | ErrorCode::PermissionDenied => {
            "\n\ncheck that the ledger's directory exists and this user may write to it"
        }
        _ => "",
    }
}

/// Prepared statements kept per connection (rusqlite's default, 16, is fewer than the
/// statements the daemon reuses).
const STATEMENT_CACHE: usize = 64;

pub(super) fn now() -> String {
    timestamp(Utc::now())
}

impl Sqlite {
    /// Opens (creating if needed) the ledger at `path`: the directory is created, the file is
    /// made mode 0600, WAL and a busy timeout are turned on, and migrations run.
    ///
    /// # Errors
    ///
    /// Names the path and what failed (directory not writable, newer schema, ...).
    pub(super) fn open(path: &Path) -> Result<Sqlite> {
        let shown = path.display().to_string();
        let fail = |message: String| LedgerError {
            path: shown.clone(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| {
                fail(format!(
                    "cannot create directory '{}': {error}",
                    parent.display()
                ))
            })?;
        }
        create_private_file(path)
            .map_err(|error| fail(format!("cannot create the file: {error}")))?;
        tighten_permissions(path);
        let connection = Connection::open(path)
            .map_err(|error| fail(format!("cannot open: {error}{}", next_step(&error))))?;
        Sqlite::configure(connection, shown.clone())
    }

    /// Opens an existing ledger for reading only, without migrating it (`check-config` looks
    /// at it while a daemon may be running on it).
    ///
    /// # Errors
    ///
    /// Names the path and what failed.
    pub(super) fn open_read_only(path: &Path) -> Result<Sqlite> {
        let shown = path.display().to_string();
        let connection = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|connection| {
            connection.busy_timeout(Duration::from_secs(10))?;
            Ok(connection)
        })
        .map_err(|error| LedgerError {
            path: shown.clone(),
            message: format!("cannot open for reading: {error}"),
        })?;
        Ok(Sqlite {
            connection: Arc::new(Mutex::new(connection)),
            path: shown.into(),
        })
    }

    /// An in-memory ledger, for tests.
    ///
    /// # Errors
    ///
    /// Only if SQLite itself fails.
    pub(super) fn open_in_memory() -> Result<Sqlite> {
        let connection = Connection::open_in_memory().map_err(|error| LedgerError {
            path: ":memory:".into(),
            message: error.to_string(),
        })?;
        Sqlite::configure(connection, ":memory:".into())
    }

    fn configure(mut connection: Connection, path: String) -> Result<Sqlite> {
        let fail = |message: String| LedgerError {
            path: path.clone(),
            message,
        };
        connection
            .busy_timeout(Duration::from_secs(10))
            .map_err(|error| fail(error.to_string()))?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .map_err(|error| fail(format!("cannot configure: {error}{}", next_step(&error))))?;
        migrate::migrate(&mut connection).map_err(fail)?;
        // Every statement of the hot paths (apply, tickets, notes, the outbox) is prepared once
        // and reused: parsing SQL cost about a fifth of the daemon's CPU per transition.
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Sqlite {
            connection: Arc::new(Mutex::new(connection)),
            path: path.into(),
        })
    }

    /// Starts a write transaction that takes the write lock at once (`BEGIN IMMEDIATE`), so a
    /// read followed by a write cannot fail with SQLITE_BUSY when another connection (a CLI
    /// command) committed in between; it waits for the busy timeout instead.
    pub(super) fn write<'c>(
        &self,
        connection: &'c mut Connection,
        context: &str,
    ) -> Result<rusqlite::Transaction<'c>> {
        connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.error(context, e))
    }

    /// Runs `write` in one write transaction whose commit skips its fsync (synchronous
    /// NORMAL). Only for writes that matter once a later fsync'd commit follows them (a
    /// verification, a resume token): in WAL mode that commit's fsync makes every earlier frame
    /// durable too; a write lost in a crash before such a commit was not needed yet.
    pub(super) fn write_without_fsync<T>(
        &self,
        context: &str,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut connection = self.lock();
        let synchronous = |connection: &Connection, level: &str| {
            connection
                .prepare_cached(&format!("PRAGMA synchronous = {level}"))
                .and_then(|mut statement| statement.execute([]))
                .map_err(|e| self.error(context, e))
        };
        synchronous(&connection, "NORMAL")?;
        let written = (|| {
            let transaction = self.write(&mut connection, context)?;
            let value = write(&transaction).map_err(|e| self.error(context, e))?;
            transaction.commit().map_err(|e| self.error(context, e))?;
            Ok(value)
        })();
        synchronous(&connection, "FULL")?;
        written
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is safe to keep using.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn error(
        &self,
        context: &str,
        error: impl std::fmt::Display + 'static,
    ) -> LedgerError {
        LedgerError {
            path: self.path.to_string(),
            message: format!("{context}: {error}{}", next_step(&error)),
        }
    }
}

/// Creates the file with mode 0600 if it does not exist (SQLite would create it 0644).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// Makes an existing ledger file and its `-wal` and `-shm` companions mode 0600 if group or
/// others could read them (a file made by hand, by a restore, or by an older paywatch). SQLite
/// gives new `-wal` and `-shm` files the database file's mode, so this keeps them private too.
/// A file we may not change (another user's) is left as it is, with a warning.
fn tighten_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        let Ok(metadata) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 == 0 {
            continue;
        }
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => tracing::info!(
                file = %file.display(),
                "ledger file was mode {mode:o}, readable by others; it is now 0600"
            ),
            Err(error) => tracing::warn!(
                file = %file.display(),
                "ledger file is mode {mode:o}, readable by others, and cannot be made 0600: {error}; \
                 check its owner and run chmod 600 on it"
            ),
        }
    }
}

/// A refunded total as the ledger stores it; absent or unreadable counts as zero.
pub(super) fn refunded_total(text: Option<&str>) -> rust_decimal::Decimal {
    text.and_then(crate::domain::parse_decimal)
        .unwrap_or(rust_decimal::Decimal::ZERO)
}

/// Reads a time the ledger stored (RFC 3339).
pub(super) fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}
