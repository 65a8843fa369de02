//! The SQLite ledger: checkouts, their verified history, the hook outbox and resume state.
//!
//! Owns: every SQL statement in paywatch. Each public method is one transaction, so writes
//! that belong together (a transition and its hook deliveries) land together or not at all.
//! Must never: record a status that did not come from Get Checkout. [`Ledger::apply`] takes a
//! [`VerifiedCheckout`], which only the paymennt client can build.
//!
//! The connection sits behind a std `Mutex`: every call is short and synchronous. Async code
//! calls the ledger from `spawn_blocking` so the runtime's threads never wait on the disk.

mod gauges;
mod migrate;
mod outbox;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

pub use crate::domain::TrackedVia;
use crate::domain::{CheckoutId, CheckoutStatus, FirestoreLocation, Source, VerifyTicket};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::CheckoutFacts;
use crate::settings::HookSettings;

pub use gauges::{LedgerGauges, UndeliveredCount};
pub use migrate::SCHEMA_VERSION;
pub use outbox::{Delivery, DeliveryFilter, DeliveryState, DeliveryUpdate, RecordAndClaim};

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

/// A handle on the ledger. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct Ledger {
    connection: Arc<Mutex<Connection>>,
    path: Arc<str>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

/// Whether `track` added a checkout or already had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackOutcome {
    /// The checkout is new to the ledger.
    Added,
    /// The checkout was already tracked; nothing changed.
    AlreadyTracked,
}

/// A checkout as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckoutRecord {
    /// paymennt's checkout id.
    pub id: String,
    /// The merchant's order id.
    pub order_id: Option<String>,
    /// The merchant's request id.
    pub request_id: Option<String>,
    /// paymennt's short display id.
    pub display_id: Option<String>,
    /// The last verified status; `None` until verified.
    pub status: Option<String>,
    /// The amount, exact decimal text.
    pub amount: String,
    /// ISO 4217 currency.
    pub currency: String,
    /// Total refunded, exact decimal text.
    pub total_refunded: Option<String>,
    /// The payment page.
    pub redirect_url: Option<String>,
    /// Whether the daemon listens to its document.
    pub watched: bool,
    /// For PAID checkouts: when watching for refunds ends.
    pub watch_until: Option<String>,
    /// Where its Firestore document lives.
    pub firebase: FirebaseCoordinates,
    /// How it was tracked.
    pub tracked_via: String,
    /// When it was tracked.
    pub created_at: String,
    /// When the row last changed.
    pub updated_at: String,
    /// When its status was last verified.
    pub verified_at: Option<String>,
    /// Firestore refuses to watch its document (the reconciler still checks it), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_refused: Option<ListenRefusal>,
}

/// Firestore's refusal to watch one checkout's document, as last reported by the listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenRefusal {
    /// The gRPC code name, e.g. `PERMISSION_DENIED`.
    pub code: String,
    /// Firestore's message.
    pub message: String,
    /// The document's full resource name.
    pub document: String,
    /// When it was first refused (in this run of refusals).
    pub first_refused_at: String,
    /// When it was last refused.
    pub last_refused_at: String,
    /// Refusals in a row.
    pub count: i64,
    /// When the listener asks again.
    pub next_retry_at: Option<String>,
}

/// The three Firebase coordinates, as paymennt names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirebaseCoordinates {
    /// `firebaseDatabase` (the Google Cloud project id).
    pub database: String,
    /// `firebaseCollection`.
    pub collection: String,
    /// `firebaseDocument`.
    pub document: String,
}

impl CheckoutRecord {
    /// The document location (validated when the checkout was tracked).
    pub fn location(&self) -> Option<FirestoreLocation> {
        FirestoreLocation::new(
            &self.firebase.database,
            &self.firebase.collection,
            &self.firebase.document,
        )
        .ok()
    }
}

/// One verified status change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransitionRecord {
    /// Sequence number (increasing over the whole ledger).
    pub id: i64,
    /// The checkout.
    pub checkout_id: String,
    /// Status before; `None` for the first verified status.
    pub from: Option<String>,
    /// Status after.
    pub to: String,
    /// What led to the verification.
    pub source: String,
    /// When the change happened upstream, if known.
    pub changed_at: Option<String>,
    /// When Get Checkout confirmed it.
    pub verified_at: String,
    /// Milliseconds from change to verification, if known.
    pub latency_ms: Option<i64>,
    /// The refunded total recorded before, when this entry changed it (exact decimal text).
    pub refunded_from: Option<String>,
    /// The refunded total Get Checkout gave with this entry (exact decimal text).
    pub refunded_to: Option<String>,
    /// The Get Checkout result, verbatim.
    #[serde(skip)]
    pub verified_json: String,
}

impl TransitionRecord {
    /// Whether this entry is a refund that left the status unchanged.
    pub fn is_refund_only(&self) -> bool {
        self.from.as_deref() == Some(self.to.as_str()) && self.refunded_from.is_some()
    }
}

/// What [`Ledger::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The status or the refunded total changed: a history entry and its hook deliveries were
    /// written (a refund that left the status unchanged goes to hooks of PARTIALLY_REFUNDED).
    Transition {
        /// The new transition.
        transition: Box<TransitionRecord>,
        /// Event ids of the deliveries queued for it.
        deliveries: Vec<String>,
        /// Whether the checkout is still watched.
        watched: bool,
    },
    /// The verified status equals the recorded one; only the verification time was updated.
    Unchanged,
    /// The answer is older than one already applied (its request has an earlier ticket); it
    /// was ignored and changed nothing: a pending verification stays pending.
    Stale,
}

/// What [`Ledger::note_not_found`] did with paymennt's "checkout not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFoundOutcome {
    /// Counted; the checkout is still watched.
    Counted {
        /// Not-found answers in a row for this checkout.
        count: u32,
    },
    /// [`NOT_FOUND_LIMIT`] answers in a row: the checkout is no longer watched (a pending
    /// verification stays noted).
    Unwatched {
        /// Not-found answers in a row for this checkout.
        count: u32,
    },
    /// Many watched checkouts look gone at once: that is a configuration problem (another
    /// environment, merchant or address), not checkouts vanishing. Nothing is unwatched.
    ManyLookGone(LookingGone),
}

/// Watched checkouts whose latest answer from paymennt was "checkout not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LookingGone {
    /// Watched checkouts paymennt last said do not exist.
    pub checkouts: i64,
    /// All watched checkouts.
    pub watched: i64,
}

impl LookingGone {
    /// Five or more at once, or (two or more and) a tenth of the watched set: then paymennt is
    /// not saying that checkouts vanished, the configuration points at the wrong place.
    pub fn is_configuration_problem(&self) -> bool {
        self.checkouts >= 5 || (self.checkouts >= 2 && self.checkouts * 10 >= self.watched)
    }
}

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

/// An open (watched) checkout as the reconciler compares it with a search result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenCheckout {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// The last verified status; `None` until verified.
    pub status: Option<CheckoutStatus>,
    /// The last verified refunded total (zero when paymennt gave none).
    pub total_refunded: rust_decimal::Decimal,
    /// Whether it must be verified with Get Checkout whatever a search says: a change was seen
    /// but not verified, or no status is recorded yet.
    pub needs_verify: bool,
    /// Whether it has a Firestore document to listen to (discovered checkouts may not).
    pub listened: bool,
    /// Whether a resume token is saved for it: Firestore then reports only changes after the
    /// token, not its current state.
    pub resumable: bool,
    /// Whether Firestore refused to watch its document at the last try.
    pub refused: bool,
    /// The ticket of the request whose answer was recorded last, if any.
    pub verified_with: Option<VerifyTicket>,
}

/// What [`Ledger::record_discovered`] did with one checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// What discovery changed.
    pub outcome: DiscoveredOutcome,
    /// Whether it has Firebase coordinates (else it is checked by the reconciler only).
    pub listened: bool,
}

/// What [`Ledger::record_discovered`] changed for one checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveredOutcome {
    /// The checkout is new to the ledger.
    Added,
    /// The checkout was tracked without Firebase coordinates (checked by the reconciler only)
    /// and now has them: it is moved onto the listener.
    Located,
}

/// Filters for [`Ledger::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only these statuses (any of them); empty means all. `UNVERIFIED` matches no status yet.
    pub statuses: Vec<String>,
    /// Only this order id.
    pub order_id: Option<String>,
    /// Only watched (open) checkouts.
    pub watched_only: bool,
    /// At most this many rows (newest first).
    pub limit: Option<usize>,
}

/// Counts for the status line and `check-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerCounts {
    /// All checkouts.
    pub checkouts: i64,
    /// Watched checkouts.
    pub watched: i64,
    /// Deliveries pending or running.
    pub hooks_pending: i64,
    /// Dead deliveries.
    pub hooks_dead: i64,
}

/// How many "checkout not found" answers in a row stop a checkout being watched.
pub const NOT_FOUND_LIMIT: u32 = 3;

/// Prepared statements kept per connection (rusqlite's default, 16, is fewer than the
/// statements the daemon reuses).
const STATEMENT_CACHE: usize = 64;

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

/// What [`Ledger::note_changes`] wrote: where the ticket counter stood when the changes were
/// seen, and a ticket for each change's verification, in the order of the ids given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotedChanges {
    /// The counter before this batch's tickets: every later ticket clears the notes.
    pub seen_after: VerifyTicket,
    /// One ticket per id, each later than `seen_after` and than the one before it.
    pub tickets: Vec<VerifyTicket>,
}

/// A verified answer to record with [`Ledger::apply_all`].
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    /// What Get Checkout said.
    pub verified: VerifiedCheckout,
    /// What noticed the change.
    pub source: Source,
    /// When the change happened upstream, if known.
    pub changed_at: Option<DateTime<Utc>>,
}

/// Formats a time the way the ledger stores it: RFC 3339, UTC, milliseconds.
pub fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn now() -> String {
    timestamp(Utc::now())
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path`: the directory is created, the file is
    /// made mode 0600, WAL and a busy timeout are turned on, and migrations run.
    ///
    /// # Errors
    ///
    /// Names the path and what failed (directory not writable, newer schema, ...).
    pub fn open(path: &Path) -> Result<Ledger> {
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
        Ledger::configure(connection, shown.clone())
    }

    /// Opens an existing ledger for reading only, without migrating it (`check-config` looks
    /// at it while a daemon may be running on it).
    ///
    /// # Errors
    ///
    /// Names the path and what failed.
    pub fn open_read_only(path: &Path) -> Result<Ledger> {
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
        Ok(Ledger {
            connection: Arc::new(Mutex::new(connection)),
            path: shown.into(),
        })
    }

    /// An in-memory ledger, for tests.
    ///
    /// # Errors
    ///
    /// Only if SQLite itself fails.
    pub fn open_in_memory() -> Result<Ledger> {
        let connection = Connection::open_in_memory().map_err(|error| LedgerError {
            path: ":memory:".into(),
            message: error.to_string(),
        })?;
        Ledger::configure(connection, ":memory:".into())
    }

    fn configure(mut connection: Connection, path: String) -> Result<Ledger> {
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
        Ok(Ledger {
            connection: Arc::new(Mutex::new(connection)),
            path: path.into(),
        })
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&*self.path)
    }

    /// Starts a write transaction that takes the write lock at once (`BEGIN IMMEDIATE`), so a
    /// read followed by a write cannot fail with SQLITE_BUSY when another connection (a CLI
    /// command) committed in between; it waits for the busy timeout instead.
    fn write<'c>(
        &self,
        connection: &'c mut Connection,
        context: &str,
    ) -> Result<rusqlite::Transaction<'c>> {
        connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.error(context, e))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is safe to keep using.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, context: &str, error: impl std::fmt::Display + 'static) -> LedgerError {
        LedgerError {
            path: self.path.to_string(),
            message: format!("{context}: {error}{}", next_step(&error)),
        }
    }

    /// Records a checkout to watch. Tracking the same checkout again changes nothing.
    ///
    /// The status in `facts` is not recorded: only a verified status is. It stays empty until
    /// the daemon (or `track --checkout-id`) verifies it.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn track(&self, facts: &CheckoutFacts, via: TrackedVia) -> Result<TrackOutcome> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "track")?;
        let outcome =
            track_in(&transaction, facts, via, false).map_err(|e| self.error("track", e))?;
        transaction.commit().map_err(|e| self.error("track", e))?;
        Ok(outcome)
    }

    /// Records a verified checkout: tracks it if new, and if its status differs from the
    /// recorded one, appends a transition and queues one delivery per matching hook, all in
    /// one transaction.
    ///
    /// `refund_watch` is how long a PAID checkout stays watched.
    ///
    /// # Errors
    ///
    /// SQL failures; nothing is written then.
    pub fn apply(
        &self,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "apply")?;
        let outcome = apply_in(
            &transaction,
            verified,
            source,
            changed_at,
            hooks,
            refund_watch,
        )
        .map_err(|e| self.error("apply", e))?;
        transaction.commit().map_err(|e| self.error("apply", e))?;
        Ok(outcome)
    }

    /// Records several verified answers in one transaction, so one fsync covers them all
    /// (group commit): each is applied exactly as [`Ledger::apply`] would, in order, and the
    /// outcomes come back in the same order. If any of them fails, none of the group is
    /// written and each is applied again in a transaction of its own, so one failing answer
    /// fails alone.
    pub fn apply_all(
        &self,
        requests: &[ApplyRequest],
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Vec<Result<ApplyOutcome>> {
        let apply_one = |request: &ApplyRequest| {
            self.apply(
                &request.verified,
                request.source,
                request.changed_at,
                hooks,
                refund_watch,
            )
        };
        if requests.len() <= 1 {
            return requests.iter().map(apply_one).collect();
        }
        let together = {
            let mut connection = self.lock();
            (|| {
                let transaction = self.write(&mut connection, "apply")?;
                let mut outcomes = Vec::with_capacity(requests.len());
                for request in requests {
                    let outcome = apply_in(
                        &transaction,
                        &request.verified,
                        request.source,
                        request.changed_at,
                        hooks,
                        refund_watch,
                    )
                    .map_err(|e| self.error("apply", e))?;
                    outcomes.push(outcome);
                }
                transaction.commit().map_err(|e| self.error("apply", e))?;
                Ok::<_, LedgerError>(outcomes)
            })()
        };
        match together {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(error) => {
                tracing::debug!(%error, answers = requests.len(), "a group of answers failed together; recording each on its own");
                requests.iter().map(apply_one).collect()
            }
        }
    }

    /// When discovery first ran on this ledger (its epoch), setting it to `now` if it never
    /// ran. A checkout created before the epoch and first verified in a status that is not
    /// open is recorded as a baseline (see [`Source::DiscoveryImport`]).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn begin_discovery_epoch(&self, now_time: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "discovery epoch")?;
        let epoch: String = (|| {
            transaction.execute(
                "INSERT INTO discovery_epoch (id, epoch) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
                [timestamp(now_time)],
            )?;
            transaction.query_row("SELECT epoch FROM discovery_epoch WHERE id = 1", [], |row| {
                row.get(0)
            })
        })()
        .map_err(|e| self.error("discovery epoch", e))?;
        transaction
            .commit()
            .map_err(|e| self.error("discovery epoch", e))?;
        Ok(parse_time(&epoch).unwrap_or(now_time))
    }

    /// When the last complete discovery round for checkout type `kind` started, if one did.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn last_discovery_round(&self, kind: &str) -> Result<Option<DateTime<Utc>>> {
        let started: Option<String> = self
            .lock()
            .query_row(
                "SELECT started_at FROM discovery_rounds WHERE kind = ?1",
                [kind],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error("discovery round", e))?;
        Ok(started.as_deref().and_then(parse_time))
    }

    /// Records that a discovery round for checkout type `kind`, started at `started_at`, saw
    /// every page of its search: the next round searches from there (minus the overlap).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn finish_discovery_round(&self, kind: &str, started_at: DateTime<Utc>) -> Result<()> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "discovery round")?;
        transaction
            .execute(
                "INSERT INTO discovery_rounds (kind, started_at, finished_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind) DO UPDATE SET started_at = excluded.started_at,
                    finished_at = excluded.finished_at",
                params![kind, timestamp(started_at), now()],
            )
            .map_err(|e| self.error("discovery round", e))?;
        transaction
            .commit()
            .map_err(|e| self.error("discovery round", e))
    }

    /// Tracks the checkouts discovery found that the ledger does not have yet
    /// (`tracked_via = "discovery"`), and gives Firebase coordinates to tracked checkouts that
    /// had none (discovered earlier without them), which moves them onto the listener.
    ///
    /// One read finds which of `found` are new; only when something is new is anything
    /// written (one transaction), so a round over checkouts already tracked costs no write. A
    /// checkout without Firebase coordinates is tracked with empty ones: the reconciler checks
    /// it, the listener cannot. The result lists only what changed.
    ///
    /// # Errors
    ///
    /// SQL failures; nothing is written then.
    pub fn record_discovered(&self, found: &[CheckoutFacts]) -> Result<Vec<Discovered>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::Value::from(
            found
                .iter()
                .map(|facts| facts.id.as_str())
                .collect::<Vec<_>>(),
        )
        .to_string();
        let known: std::collections::HashMap<String, bool> = {
            let connection = self.lock();
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, firebase_database <> '' FROM checkouts
                     WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(|e| self.error("discovery", e))?;
            let rows = statement
                .query_map([&ids], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(|e| self.error("discovery", e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| self.error("discovery", e))?
        };
        let mut seen = std::collections::HashSet::new();
        let changes: Vec<(&CheckoutFacts, DiscoveredOutcome)> = found
            .iter()
            .filter(|facts| seen.insert(facts.id.as_str()))
            .filter_map(|facts| match known.get(facts.id.as_str()) {
                None => Some((facts, DiscoveredOutcome::Added)),
                Some(false) if facts.location.is_some() => {
                    Some((facts, DiscoveredOutcome::Located))
                }
                Some(_) => None,
            })
            .collect();
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "discovery")?;
        let mut recorded = Vec::with_capacity(changes.len());
        for (facts, outcome) in changes {
            let changed = match outcome {
                DiscoveredOutcome::Added => {
                    track_in(&transaction, facts, TrackedVia::Discovery, true)
                        .map(|tracked| tracked == TrackOutcome::Added)
                }
                DiscoveredOutcome::Located => locate_in(&transaction, facts),
            }
            .map_err(|e| self.error("discovery", e))?;
            if !changed {
                continue;
            }
            recorded.push(Discovered {
                checkout_id: facts.id.clone(),
                outcome,
                listened: facts.location.is_some(),
            });
        }
        transaction
            .commit()
            .map_err(|e| self.error("discovery", e))?;
        Ok(recorded)
    }

    /// Every watched checkout with what the reconciler compares (listened to or not), by id.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn open_checkouts(&self) -> Result<Vec<OpenCheckout>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, status, total_refunded, needs_verify, firebase_database <> '',
                        EXISTS (SELECT 1 FROM listen_targets t WHERE t.checkout_id = checkouts.id),
                        EXISTS (SELECT 1 FROM listen_refusals r WHERE r.checkout_id = checkouts.id),
                        verify_requested_ticket
                 FROM checkouts WHERE watched = 1 ORDER BY id",
            )
            .map_err(|e| self.error("open checkouts", e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, bool>(3)?,
                    row.get::<_, bool>(4)?,
                    row.get::<_, bool>(5)?,
                    row.get::<_, bool>(6)?,
                    row.get::<_, Option<i64>>(7)?,
                ))
            })
            .map_err(|e| self.error("open checkouts", e))?;
        let mut open = Vec::new();
        for row in rows {
            let (id, status, refunded, needs_verify, listened, resumable, refused, verified_with) =
                row.map_err(|e| self.error("open checkouts", e))?;
            let Ok(checkout_id) = id.parse::<CheckoutId>() else {
                tracing::warn!(checkout = %crate::domain::printable(&id), "skipping a ledger row with an invalid id");
                continue;
            };
            open.push(OpenCheckout {
                checkout_id,
                needs_verify: needs_verify || status.is_none(),
                status: status.as_deref().map(CheckoutStatus::parse),
                total_refunded: refunded_total(refunded.as_deref()),
                listened,
                resumable,
                refused,
                verified_with: verified_with.map(VerifyTicket::new),
            });
        }
        Ok(open)
    }

    /// Hands out the next verification ticket: take one before sending Get Checkout (or
    /// Create payment link) and the answer is ordered by it. The counter lives in the ledger, so
    /// it only grows, across restarts and across processes sharing the file.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn issue_ticket(&self) -> Result<VerifyTicket> {
        self.write_without_fsync("ticket", next_ticket_in)
    }

    /// Tickets for several verifications in one transaction (the verifier's group of waiting
    /// requests): for each `(checkout, seen_after)`, in order, the next ticket, unless
    /// `seen_after` is given and the checkout was already verified by a request with a ticket
    /// issued after it (the counter read after its change was seen): that answer reflects the
    /// change, so no new request is needed and `None` comes back. Every ticket is distinct and
    /// greater than any issued before.
    ///
    /// # Errors
    ///
    /// SQL failures (then no ticket of the group was issued).
    pub fn issue_tickets(
        &self,
        wanted: &[(CheckoutId, Option<VerifyTicket>)],
    ) -> Result<Vec<Option<VerifyTicket>>> {
        self.write_without_fsync("ticket", |transaction| {
            wanted
                .iter()
                .map(|(id, seen_after)| ticket_unless_covered_in(transaction, id, *seen_after))
                .collect()
        })
    }

    /// Runs `write` in one write transaction whose commit skips its fsync (synchronous
    /// NORMAL). Only for writes that matter once a later fsync'd commit follows them (a
    /// verification, a resume token): in WAL mode that commit's fsync makes every earlier frame
    /// durable too; a write lost in a crash before such a commit was not needed yet.
    fn write_without_fsync<T>(
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

    /// The last ticket handed out: every ticket issued after this call is greater. Read when a
    /// change is seen, before its nudge goes out, and give it to [`Ledger::mark_needs_verify`].
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn last_ticket(&self) -> Result<VerifyTicket> {
        last_ticket_in(&self.lock()).map_err(|e| self.error("ticket", e))
    }

    /// Notes that a change was seen on these checkouts, when the ticket counter stood at
    /// `seen_after` ([`Ledger::last_ticket`]), and is not yet verified, so a crash before
    /// verification is caught by the reconciler at the next start.
    ///
    /// Only a verification requested with a later ticket clears the note ([`Ledger::apply`]);
    /// one already applied with such a ticket means this note is not needed. Tickets are exact,
    /// so the order of the two writes does not matter.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn mark_needs_verify(&self, ids: &[CheckoutId], seen_after: VerifyTicket) -> Result<()> {
        // No fsync of its own: the note matters only once the resume token that would let a
        // restart skip the change is durable, and in WAL mode that token cannot be durable
        // without this earlier commit. Until then a restart hears of the change from Firestore
        // again.
        self.write_without_fsync("mark", |transaction| mark_in(transaction, ids, seen_after))
    }

    /// What the listener does with each batch of changes, in one transaction without fsync (as
    /// [`Ledger::mark_needs_verify`]): reads the ticket counter (`seen_after`), notes the
    /// change on each of `ids` with it, and issues one ticket per id, in order, for the
    /// verification the change asks for ([`crate::sources::Nudge::ticket`]). Each ticket is
    /// later than `seen_after`, so its answer clears the note.
    ///
    /// # Errors
    ///
    /// SQL failures (then nothing is noted and no ticket issued).
    pub fn note_changes(&self, ids: &[CheckoutId]) -> Result<NotedChanges> {
        self.write_without_fsync("note changes", |transaction| {
            let seen_after = last_ticket_in(transaction)?;
            mark_in(transaction, ids, seen_after)?;
            // The batch's tickets in one statement: the counter moves past all of them.
            let count = i64::try_from(ids.len()).unwrap_or(i64::MAX);
            let last: i64 = transaction
                .prepare_cached(
                    "UPDATE verify_tickets SET last = last + ?1 WHERE id = 1 RETURNING last",
                )?
                .query_row([count], |row| row.get(0))?;
            let tickets = (last - count + 1..=last).map(VerifyTicket::new).collect();
            Ok(NotedChanges {
                seen_after,
                tickets,
            })
        })
    }

    /// Counts paymennt's answer that the checkout does not exist. After [`NOT_FOUND_LIMIT`] in a
    /// row the checkout stops being watched (a mistyped or foreign id would otherwise be asked
    /// about forever) -- unless many watched checkouts look gone at once
    /// ([`LookingGone::is_configuration_problem`]): then nothing is unwatched. Unwatching never
    /// clears a pending verification.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn note_not_found(&self, id: &CheckoutId) -> Result<NotFoundOutcome> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "not found")?;
        let count: Option<u32> = transaction
            .query_row(
                "UPDATE checkouts SET not_found_count = not_found_count + 1 WHERE id = ?1
                 RETURNING not_found_count",
                [id.as_str()],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error("not found", e))?;
        let count = count.unwrap_or(0);
        let looking_gone = looking_gone_in(&transaction).map_err(|e| self.error("not found", e))?;
        if looking_gone.is_configuration_problem() {
            transaction
                .commit()
                .map_err(|e| self.error("not found", e))?;
            return Ok(NotFoundOutcome::ManyLookGone(looking_gone));
        }
        let unwatch = count >= NOT_FOUND_LIMIT;
        if unwatch {
            transaction
                .execute(
                    "UPDATE checkouts SET watched = 0, updated_at = ?2 WHERE id = ?1",
                    params![id.as_str(), now()],
                )
                .map_err(|e| self.error("not found", e))?;
            transaction
                .execute(
                    "DELETE FROM listen_targets WHERE checkout_id = ?1",
                    [id.as_str()],
                )
                .map_err(|e| self.error("not found", e))?;
        }
        transaction
            .commit()
            .map_err(|e| self.error("not found", e))?;
        Ok(if unwatch {
            NotFoundOutcome::Unwatched { count }
        } else {
            NotFoundOutcome::Counted { count }
        })
    }

    /// How many watched checkouts paymennt last said do not exist (`check-config` reports it).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn looking_gone(&self) -> Result<LookingGone> {
        looking_gone_in(&self.lock()).map_err(|e| self.error("looking gone", e))
    }

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
    pub fn save_resume_points(&self, points: &[ResumePoint]) -> Result<()> {
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
    pub fn forget_resume_token(&self, id: &CheckoutId) -> Result<()> {
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
    pub fn note_listen_refusal(
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
    pub fn clear_listen_refusal(&self, id: &CheckoutId) -> Result<()> {
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
    pub fn clear_listen_refusals(&self) -> Result<()> {
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
    pub fn probe_documents(
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
    pub fn watch_set(&self) -> Result<Vec<WatchEntry>> {
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
    pub fn expire_refund_watch(&self, now_time: DateTime<Utc>) -> Result<Vec<CheckoutId>> {
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

    /// One checkout.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn checkout(&self, id: &CheckoutId) -> Result<Option<CheckoutRecord>> {
        let connection = self.lock();
        connection
            .query_row(
                &format!("{CHECKOUT_COLUMNS} WHERE id = ?1"),
                [id.as_str()],
                checkout_from_row,
            )
            .optional()
            .map_err(|e| self.error("read checkout", e))
    }

    /// Checkouts matching `filter`, newest first.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<CheckoutRecord>> {
        let mut sql = format!("{CHECKOUT_COLUMNS} WHERE 1 = 1");
        let mut values: Vec<String> = Vec::new();
        if !filter.statuses.is_empty() {
            let mut parts = Vec::new();
            for status in &filter.statuses {
                if status.eq_ignore_ascii_case("UNVERIFIED") {
                    parts.push("status IS NULL".to_owned());
                } else {
                    values.push(CheckoutStatus::parse(status).as_str().to_owned());
                    parts.push(format!("status = ?{}", values.len()));
                }
            }
            sql.push_str(&format!(" AND ({})", parts.join(" OR ")));
        }
        if let Some(order_id) = &filter.order_id {
            values.push(order_id.clone());
            sql.push_str(&format!(" AND order_id = ?{}", values.len()));
        }
        if filter.watched_only {
            sql.push_str(" AND watched = 1");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        let connection = self.lock();
        let mut statement = connection
            .prepare(&sql)
            .map_err(|e| self.error("list", e))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values.iter()), checkout_from_row)
            .map_err(|e| self.error("list", e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.error("list", e))
    }

    /// A checkout's transitions, oldest first.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn transitions(&self, id: &CheckoutId) -> Result<Vec<TransitionRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(&format!(
                "{TRANSITION_COLUMNS} WHERE checkout_id = ?1 ORDER BY id"
            ))
            .map_err(|e| self.error("transitions", e))?;
        let rows = statement
            .query_map([id.as_str()], transition_from_row)
            .map_err(|e| self.error("transitions", e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.error("transitions", e))
    }

    /// Counts for status lines.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn counts(&self) -> Result<LedgerCounts> {
        let connection = self.lock();
        connection
            .query_row(
                "SELECT (SELECT count(*) FROM checkouts),
                        (SELECT count(*) FROM checkouts WHERE watched = 1),
                        (SELECT count(*) FROM hook_deliveries WHERE state IN ('pending', 'running')),
                        (SELECT count(*) FROM hook_deliveries WHERE state = 'dead')",
                [],
                |row| {
                    Ok(LedgerCounts {
                        checkouts: row.get(0)?,
                        watched: row.get(1)?,
                        hooks_pending: row.get(2)?,
                        hooks_dead: row.get(3)?,
                    })
                },
            )
            .map_err(|e| self.error("counts", e))
    }

    /// SQLite's `data_version`: changes when another connection (a CLI `track`) commits.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub fn data_version(&self) -> Result<i64> {
        self.lock()
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(|e| self.error("data_version", e))
    }

    /// Takes the write lock and releases it without writing: proof that a write would go
    /// through (the health check).
    ///
    /// # Errors
    ///
    /// The file is read-only, locked by another writer past the busy timeout, or gone bad.
    pub fn check_writable(&self) -> Result<()> {
        self.lock()
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .map_err(|e| self.error("write check", e))
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

fn looking_gone_in(connection: &Connection) -> rusqlite::Result<LookingGone> {
    connection.query_row(
        "SELECT count(*) FILTER (WHERE not_found_count > 0), count(*)
         FROM checkouts WHERE watched = 1",
        [],
        |row| {
            Ok(LookingGone {
                checkouts: row.get(0)?,
                watched: row.get(1)?,
            })
        },
    )
}

/// A refunded total as the ledger stores it; absent or unreadable counts as zero.
fn refunded_total(text: Option<&str>) -> rust_decimal::Decimal {
    text.and_then(crate::domain::parse_decimal)
        .unwrap_or(rust_decimal::Decimal::ZERO)
}

/// Why a checkout cannot be inserted: it has nowhere to be watched.
#[derive(Debug)]
struct NoLocation(CheckoutId);

impl std::fmt::Display for NoLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkout {} is not tracked and paymennt's answer has no Firebase coordinates \
             (firebaseDatabase, firebaseCollection, firebaseDocument); track its create-link response",
            self.0
        )
    }
}

impl std::error::Error for NoLocation {}

fn track_in(
    transaction: &rusqlite::Transaction<'_>,
    facts: &CheckoutFacts,
    via: TrackedVia,
    reconcile_only_allowed: bool,
) -> rusqlite::Result<TrackOutcome> {
    let (project, collection, document) = match &facts.location {
        Some(location) => (
            location.project.as_str(),
            location.collection.as_str(),
            location.document.as_str(),
        ),
        None if reconcile_only_allowed => ("", "", ""),
        None => {
            return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
                NoLocation(facts.id.clone()),
            )));
        }
    };
    let time = now();
    let inserted = transaction
        .prepare_cached(
            "INSERT INTO checkouts (id, order_id, request_id, display_id, amount, currency, status,
                total_refunded, redirect_url, firebase_database, firebase_collection,
                firebase_document, watched, needs_verify, tracked_via, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?8, ?9, ?10, ?11, 1, 1, ?12, ?13, ?13)
         ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            facts.id.as_str(),
            facts.order_id,
            facts.request_id,
            facts.display_id,
            facts.amount.to_string(),
            facts.currency.as_str(),
            facts.total_refunded.map(|d| d.to_string()),
            facts.redirect_url,
            project,
            collection,
            document,
            via.as_str(),
            time,
        ])?;
    Ok(if inserted == 1 {
        TrackOutcome::Added
    } else {
        TrackOutcome::AlreadyTracked
    })
}

/// Gives a checkout tracked without Firebase coordinates the ones in `facts`.
fn locate_in(
    transaction: &rusqlite::Transaction<'_>,
    facts: &CheckoutFacts,
) -> rusqlite::Result<bool> {
    let Some(location) = &facts.location else {
        return Ok(false);
    };
    let changed = transaction
        .prepare_cached(
            "UPDATE checkouts SET firebase_database = ?2, firebase_collection = ?3,
                firebase_document = ?4, updated_at = ?5
             WHERE id = ?1 AND firebase_database = ''",
        )?
        .execute(params![
            facts.id.as_str(),
            location.project,
            location.collection,
            location.document,
            now(),
        ])?;
    Ok(changed == 1)
}

/// Reads a time the ledger stored (RFC 3339).
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Takes the next verification ticket from the counter.
fn last_ticket_in(connection: &Connection) -> rusqlite::Result<VerifyTicket> {
    connection
        .prepare_cached("SELECT last FROM verify_tickets WHERE id = 1")?
        .query_row([], |row| row.get(0))
        .map(VerifyTicket::new)
}

/// Notes a change on each of `ids`, seen when the ticket counter stood at `seen_after`
/// (see [`Ledger::mark_needs_verify`]).
fn mark_in(
    transaction: &rusqlite::Transaction<'_>,
    ids: &[CheckoutId],
    seen_after: VerifyTicket,
) -> rusqlite::Result<()> {
    let mut statement = transaction.prepare_cached(
        "UPDATE checkouts SET needs_verify = 1,
                needs_verify_after = coalesce(needs_verify_after, ?2)
         WHERE id = ?1
           AND (verify_requested_ticket IS NULL OR verify_requested_ticket <= ?2)",
    )?;
    for id in ids {
        statement.execute(params![id.as_str(), seen_after.number()])?;
    }
    Ok(())
}

/// The next ticket, unless `seen_after` is given and checkout `id` was already verified by a
/// request with a later ticket.
fn ticket_unless_covered_in(
    transaction: &rusqlite::Transaction<'_>,
    id: &CheckoutId,
    seen_after: Option<VerifyTicket>,
) -> rusqlite::Result<Option<VerifyTicket>> {
    if let Some(seen_after) = seen_after {
        let requested: Option<i64> = transaction
            .prepare_cached("SELECT verify_requested_ticket FROM checkouts WHERE id = ?1")?
            .query_row([id.as_str()], |row| row.get(0))
            .optional()?
            .flatten();
        if requested.is_some_and(|requested| requested > seen_after.number()) {
            return Ok(None);
        }
    }
    next_ticket_in(transaction).map(Some)
}

fn next_ticket_in(transaction: &rusqlite::Transaction<'_>) -> rusqlite::Result<VerifyTicket> {
    transaction
        .prepare_cached("UPDATE verify_tickets SET last = last + 1 WHERE id = 1 RETURNING last")?
        .query_row([], |row| row.get(0))
        .map(VerifyTicket::new)
}

fn apply_in(
    transaction: &rusqlite::Transaction<'_>,
    verified: &VerifiedCheckout,
    source: Source,
    changed_at: Option<DateTime<Utc>>,
    hooks: &[HookSettings],
    refund_watch: Duration,
) -> rusqlite::Result<ApplyOutcome> {
    let facts = verified.facts();
    let status = verified.status();
    let id = facts.id.as_str();
    let ticket = verified.ticket().number();
    type Existing = (Option<String>, Option<i64>, Option<String>, String);
    let existing: Option<Existing> = transaction
        .prepare_cached(
            "SELECT status, verify_requested_ticket, total_refunded, tracked_via
             FROM checkouts WHERE id = ?1",
        )?
        .query_row([id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let (previous, previous_refunded, tracked_via) = match existing {
        None => {
            let via = match source {
                Source::Manual => TrackedVia::TrackFetch,
                _ => TrackedVia::Track,
            };
            track_in(transaction, facts, via, false)?;
            (None, None, via.as_str().to_owned())
        }
        // An answer to a request sent before the one already applied says nothing newer, and
        // could say something older: it is ignored.
        Some((_, Some(applied), _, _)) if applied > ticket => return Ok(ApplyOutcome::Stale),
        Some((status, _, refunded, via)) => (status, refunded, via),
    };
    let source = if previous.is_none()
        && tracked_via == TrackedVia::Discovery.as_str()
        && is_baseline_in(transaction, verified)?
    {
        Source::DiscoveryImport
    } else {
        source
    };
    // A change of the refunded total counts only once a status was verified: before that, the
    // recorded total is a tracked claim, not history.
    let refunded_now = facts.total_refunded.unwrap_or(rust_decimal::Decimal::ZERO);
    let refunded_before = refunded_total(previous_refunded.as_deref());
    let refund_changed = previous.is_some() && refunded_now != refunded_before;
    let verified_at = verified.verified_at();
    let verified_text = timestamp(verified_at);
    // What paymennt said about the order replaces what a tracked response claimed; the change
    // flag clears only if this request's ticket was issued after the earliest change not yet
    // verified was seen.
    transaction
        .prepare_cached(
            "UPDATE checkouts SET
                order_id = coalesce(?2, order_id), request_id = coalesce(?3, request_id),
                display_id = coalesce(?4, display_id), amount = ?5, currency = ?6,
                total_refunded = ?7, redirect_url = coalesce(?8, redirect_url),
                verified_at = ?9, verify_requested_ticket = ?10, not_found_count = 0,
                needs_verify = CASE WHEN needs_verify_after IS NULL OR needs_verify_after < ?10
                                    THEN 0 ELSE needs_verify END,
                needs_verify_after = CASE WHEN needs_verify_after < ?10
                                    THEN NULL ELSE needs_verify_after END,
                updated_at = ?9
         WHERE id = ?1",
        )?
        .execute(params![
            id,
            facts.order_id,
            facts.request_id,
            facts.display_id,
            facts.amount.to_string(),
            facts.currency.as_str(),
            facts.total_refunded.map(|d| d.to_string()),
            facts.redirect_url,
            verified_text,
            ticket,
        ])?;
    let previous_status = previous.as_deref().map(CheckoutStatus::parse);
    let status_changed = previous_status.as_ref() != Some(status);
    if !status_changed && !refund_changed {
        return Ok(ApplyOutcome::Unchanged);
    }
    let refunded_from = refund_changed.then(|| refunded_before.to_string());
    let refunded_to = facts.total_refunded.map(|d| d.to_string());
    if !status_changed {
        // A refund that left the status as it was (a second partial refund): its own entry,
        // for the hooks of PARTIALLY_REFUNDED. The watch is unchanged.
        return record_entry(
            transaction,
            verified,
            source,
            changed_at,
            previous.as_deref(),
            (refunded_from, refunded_to),
            hooks
                .iter()
                .filter(|hook| hook.fires_on(&CheckoutStatus::PartiallyRefunded)),
            true,
        );
    }
    let (watched, watch_until) = if status.is_final() {
        (false, None)
    } else if status.is_settled() {
        let until = chrono::Duration::from_std(refund_watch)
            .ok()
            .and_then(|d| verified_at.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        (true, Some(timestamp(until)))
    } else {
        (true, None)
    };
    transaction
        .prepare_cached(
            "UPDATE checkouts SET status = ?2, watched = ?3, watch_until = ?4 WHERE id = ?1",
        )?
        .execute(params![id, status.as_str(), watched, watch_until])?;
    if !watched {
        transaction
            .prepare_cached("DELETE FROM listen_targets WHERE checkout_id = ?1")?
            .execute([id])?;
    }
    // A baseline is history, not news: no hook is told of it.
    let told = source != Source::DiscoveryImport;
    record_entry(
        transaction,
        verified,
        source,
        changed_at,
        previous.as_deref(),
        (refunded_from, refunded_to),
        hooks.iter().filter(|hook| told && hook.fires_on(status)),
        watched,
    )
}

/// Whether the first verified status of a checkout discovery found is a baseline: a status it
/// reached before paywatch could have seen it. That is a status that is not open, of a checkout
/// paymennt created before discovery's epoch (when discovery first ran on this ledger). A
/// checkout created after the epoch is new business, whatever status it is first seen in; one
/// whose answer carries no readable creation time is treated as new business too (a hook told
/// twice can deduplicate on the order; a hook never told cannot act).
fn is_baseline_in(
    transaction: &rusqlite::Transaction<'_>,
    verified: &VerifiedCheckout,
) -> rusqlite::Result<bool> {
    if verified.status().is_open() {
        return Ok(false);
    }
    let Some(created) = verified.created_at() else {
        return Ok(false);
    };
    let epoch: Option<String> = transaction
        .prepare_cached("SELECT epoch FROM discovery_epoch WHERE id = 1")?
        .query_row([], |row| row.get(0))
        .optional()?;
    Ok(epoch
        .as_deref()
        .and_then(parse_time)
        .is_some_and(|epoch| created < epoch))
}

/// Appends one history entry and queues a delivery for each of `hooks`.
#[allow(clippy::too_many_arguments)]
fn record_entry<'h>(
    transaction: &rusqlite::Transaction<'_>,
    verified: &VerifiedCheckout,
    source: Source,
    changed_at: Option<DateTime<Utc>>,
    previous: Option<&str>,
    (refunded_from, refunded_to): (Option<String>, Option<String>),
    hooks: impl Iterator<Item = &'h HookSettings>,
    watched: bool,
) -> rusqlite::Result<ApplyOutcome> {
    let id = verified.id().as_str();
    let verified_at = verified.verified_at();
    let latency_ms = changed_at.map(|changed| (verified_at - changed).num_milliseconds().max(0));
    transaction
        .prepare_cached(
            "INSERT INTO transitions (checkout_id, from_status, to_status, source, changed_at,
                verified_at, latency_ms, verified_json, refunded_from, refunded_to)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            id,
            previous,
            verified.status().as_str(),
            source.as_str(),
            changed_at.map(timestamp),
            timestamp(verified_at),
            latency_ms,
            verified.raw_json(),
            refunded_from,
            refunded_to,
        ])?;
    let transition_id = transaction.last_insert_rowid();
    let mut deliveries = Vec::new();
    for hook in hooks {
        deliveries.push(outbox::queue_in(
            transaction,
            transition_id,
            id,
            &hook.name,
            false,
        )?);
    }
    let transition = transaction
        .prepare_cached(&format!("{TRANSITION_COLUMNS} WHERE id = ?1"))?
        .query_row([transition_id], transition_from_row)?;
    Ok(ApplyOutcome::Transition {
        transition: Box::new(transition),
        deliveries,
        watched,
    })
}

// The refusal columns have names of their own, so the filters of `list` stay unambiguous.
const CHECKOUT_COLUMNS: &str =
    "SELECT id, order_id, request_id, display_id, status, amount, currency,
        total_refunded, redirect_url, watched, watch_until, firebase_database, firebase_collection,
        firebase_document, tracked_via, created_at, updated_at, verified_at,
        refusal_code, refusal_message, refused_document, first_refused_at, last_refused_at,
        refusal_count, next_retry_at
     FROM checkouts LEFT JOIN listen_refusals ON listen_refusals.checkout_id = checkouts.id";

fn checkout_from_row(row: &Row<'_>) -> rusqlite::Result<CheckoutRecord> {
    Ok(CheckoutRecord {
        id: row.get(0)?,
        order_id: row.get(1)?,
        request_id: row.get(2)?,
        display_id: row.get(3)?,
        status: row.get(4)?,
        amount: row.get(5)?,
        currency: row.get(6)?,
        total_refunded: row.get(7)?,
        redirect_url: row.get(8)?,
        watched: row.get(9)?,
        watch_until: row.get(10)?,
        firebase: FirebaseCoordinates {
            database: row.get(11)?,
            collection: row.get(12)?,
            document: row.get(13)?,
        },
        tracked_via: row.get(14)?,
        created_at: row.get(15)?,
        updated_at: row.get(16)?,
        verified_at: row.get(17)?,
        listen_refused: match row.get::<_, Option<String>>(18)? {
            None => None,
            Some(code) => Some(ListenRefusal {
                code,
                message: row.get(19)?,
                document: row.get(20)?,
                first_refused_at: row.get(21)?,
                last_refused_at: row.get(22)?,
                count: row.get(23)?,
                next_retry_at: row.get(24)?,
            }),
        },
    })
}

const TRANSITION_COLUMNS: &str =
    "SELECT id, checkout_id, from_status, to_status, source, changed_at,
        verified_at, latency_ms, verified_json, refunded_from, refunded_to FROM transitions";

fn transition_from_row(row: &Row<'_>) -> rusqlite::Result<TransitionRecord> {
    Ok(TransitionRecord {
        id: row.get(0)?,
        checkout_id: row.get(1)?,
        from: row.get(2)?,
        to: row.get(3)?,
        source: row.get(4)?,
        changed_at: row.get(5)?,
        verified_at: row.get(6)?,
        latency_ms: row.get(7)?,
        verified_json: row.get(8)?,
        refunded_from: row.get(9)?,
        refunded_to: row.get(10)?,
    })
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
