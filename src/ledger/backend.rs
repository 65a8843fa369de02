//! The ledger's interface: what a store must do, as async methods.
//!
//! Owns: the [`Backend`] trait, the one interface through which the rest of paywatch reads and
//! writes the ledger (through [`Ledger`](super::Ledger), which derefs to it). A store (SQLite,
//! or PostgreSQL: `postgres::PgStore`) implements every method; each is one transaction.
//! Must never: hold SQL, or let a caller record a status not verified with Get Checkout (only
//! [`VerifiedCheckout`] reaches [`Backend::apply`]).

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{
    ApplyOutcome, ApplyRequest, CheckoutRecord, Delivery, DeliveryFilter, DeliveryUpdate,
    Discovered, LedgerCounts, LedgerGauges, ListFilter, LookingGone, NotFoundOutcome, NotedChanges,
    OpenCheckout, RecordAndClaim, Result, ResumePoint, TrackOutcome, TrackedVia, TransitionRecord,
    WatchEntry,
};
use crate::domain::{CheckoutId, FirestoreLocation, Source, VerifyTicket};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::CheckoutFacts;
use crate::settings::HookSettings;

/// What a ledger store does. Every method is async: a store that blocks (SQLite) runs its work
/// on the blocking pool, so callers never wait on the disk on the runtime's threads.
///
/// # Errors
///
/// Every fallible method fails with a [`LedgerError`](super::LedgerError) naming the store and
/// what failed; nothing of a failed call is written.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Where the store lives (the SQLite file, or `:memory:`), for logs and errors.
    fn path(&self) -> PathBuf;

    /// The store itself, so tests can reach what only it has.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;

    /// Records a checkout to watch. Tracking the same checkout again changes nothing.
    async fn track(&self, facts: &CheckoutFacts, via: TrackedVia) -> Result<TrackOutcome>;

    /// Records a verified checkout: tracks it if new, and if its status differs from the
    /// recorded one, appends a transition and queues one delivery per matching hook, all in
    /// one transaction.
    async fn apply(
        &self,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome>;

    /// Records several verified answers in one transaction, so one fsync covers them all
    /// (group commit): each is applied exactly as [`Ledger::apply`] would, in order, and the
    /// outcomes come back in the same order. If any of them fails, none of the group is
    /// written and each is applied again in a transaction of its own, so one failing answer
    /// fails alone.
    async fn apply_all(
        &self,
        requests: Vec<ApplyRequest>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Vec<Result<ApplyOutcome>>;

    /// When discovery first ran on this ledger (its epoch), setting it to `now` if it never
    /// ran. A checkout created before the epoch and first verified in a status that is not
    /// open is recorded as a baseline (see [`Source::DiscoveryImport`]).
    async fn begin_discovery_epoch(&self, now_time: DateTime<Utc>) -> Result<DateTime<Utc>>;

    /// When the last complete discovery round for checkout type `kind` started, if one did.
    async fn last_discovery_round(&self, kind: &str) -> Result<Option<DateTime<Utc>>>;

    /// Records that a discovery round for checkout type `kind`, started at `started_at`, saw
    /// every page of its search: the next round searches from there (minus the overlap).
    async fn finish_discovery_round(&self, kind: &str, started_at: DateTime<Utc>) -> Result<()>;

    /// Tracks the checkouts discovery found that the ledger does not have yet
    /// (`tracked_via = "discovery"`), and gives Firebase coordinates to tracked checkouts that
    /// had none (discovered earlier without them), which moves them onto the listener.
    async fn record_discovered(&self, found: &[CheckoutFacts]) -> Result<Vec<Discovered>>;

    /// Every watched checkout with what the reconciler compares (listened to or not), by id.
    async fn open_checkouts(&self) -> Result<Vec<OpenCheckout>>;

    /// Hands out the next verification ticket: take one before sending Get Checkout (or
    /// Create payment link) and the answer is ordered by it. The counter lives in the ledger, so
    /// it only grows, across restarts and across processes sharing the file.
    async fn issue_ticket(&self) -> Result<VerifyTicket>;

    /// Tickets for several verifications in one transaction (the verifier's group of waiting
    /// requests): for each `(checkout, seen_after)`, in order, the next ticket, unless
    /// `seen_after` is given and the checkout was already verified by a request with a ticket
    /// issued after it (the counter read after its change was seen): that answer reflects the
    /// change, so no new request is needed and `None` comes back. Every ticket is distinct and
    /// greater than any issued before.
    async fn issue_tickets(
        &self,
        wanted: &[(CheckoutId, Option<VerifyTicket>)],
    ) -> Result<Vec<Option<VerifyTicket>>>;

    /// The last ticket handed out: every ticket issued after this call is greater. Read when a
    /// change is seen, before its nudge goes out, and give it to [`Ledger::mark_needs_verify`].
    async fn last_ticket(&self) -> Result<VerifyTicket>;

    /// What the listener does with each batch of changes, in one transaction without fsync (as
    /// [`Ledger::mark_needs_verify`]): reads the ticket counter (`seen_after`), notes the
    /// change on each of `ids` with it, and issues one ticket per id, in order, for the
    /// verification the change asks for ([`crate::sources::Nudge::ticket`]). Each ticket is
    /// later than `seen_after`, so its answer clears the note.
    async fn note_changes(&self, ids: &[CheckoutId]) -> Result<NotedChanges>;

    /// Counts paymennt's answer that the checkout does not exist. After [`NOT_FOUND_LIMIT`] in a
    /// row the checkout stops being watched (a mistyped or foreign id would otherwise be asked
    /// about forever) -- unless many watched checkouts look gone at once
    /// ([`LookingGone::is_configuration_problem`]): then nothing is unwatched. Unwatching never
    /// clears a pending verification.
    async fn note_not_found(&self, id: &CheckoutId) -> Result<NotFoundOutcome>;

    /// How many watched checkouts paymennt last said do not exist (`check-config` reports it).
    async fn looking_gone(&self) -> Result<LookingGone>;

    /// Persists resume tokens (only for still-watched checkouts): the checkpoints of one or
    /// several snapshots (the listener's batch of events), in one transaction, each token with
    /// the read time of its own snapshot, in order, so a checkout's later token replaces its
    /// earlier one.
    async fn save_resume_points(&self, points: &[ResumePoint]) -> Result<()>;

    /// Drops a checkout's resume token (after a RESET or an existence-filter mismatch).
    async fn forget_resume_token(&self, id: &CheckoutId) -> Result<()>;

    /// Notes that Firestore refused to watch a checkout's document (see [`ListenRefusal`]).
    /// A checkout not in the ledger is ignored.
    async fn note_listen_refusal(
        &self,
        id: &CheckoutId,
        code: &str,
        message: &str,
        document: &str,
        next_retry_at: Option<DateTime<Utc>>,
    ) -> Result<()>;

    /// Forgets a checkout's listen refusal (Firestore accepts its document again).
    async fn clear_listen_refusal(&self, id: &CheckoutId) -> Result<()>;

    /// Forgets every listen refusal (at daemon start: the new listener asks Firestore afresh
    /// and notes what it refuses again).
    async fn clear_listen_refusals(&self) -> Result<()>;

    /// One checkout per Firebase project (a watched one if the project has any, else the newest),
    /// or just `only`, with its document: what `check-config --online` opens a Listen on.
    /// Reads the `checkouts` table only, so it works on any schema version.
    async fn probe_documents(
        &self,
        only: Option<&CheckoutId>,
    ) -> Result<Vec<(CheckoutId, FirestoreLocation)>>;

    /// Every watched checkout with its document and resume token.
    async fn watch_set(&self) -> Result<Vec<WatchEntry>>;

    /// Stops watching PAID checkouts whose refund-watch period has ended; returns their ids.
    /// A checkout with a change not yet verified stays watched until it is verified (the
    /// change may be the refund).
    async fn expire_refund_watch(&self, now_time: DateTime<Utc>) -> Result<Vec<CheckoutId>>;

    /// One checkout.
    async fn checkout(&self, id: &CheckoutId) -> Result<Option<CheckoutRecord>>;

    /// Checkouts matching `filter`, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<CheckoutRecord>>;

    /// A checkout's transitions, oldest first.
    async fn transitions(&self, id: &CheckoutId) -> Result<Vec<TransitionRecord>>;

    /// Counts for status lines.
    async fn counts(&self) -> Result<LedgerCounts>;

    /// SQLite's `data_version`: changes when another connection (a CLI `track`) commits.
    async fn data_version(&self) -> Result<i64>;

    /// Takes the write lock and releases it without writing: proof that a write would go
    /// through (the health check).
    async fn check_writable(&self) -> Result<()>;

    /// Puts deliveries left `running` by a daemon that died back to `pending`, due now.
    /// Returns how many.
    async fn recover_running_deliveries(&self) -> Result<usize>;

    /// The dispatcher's one commit per round: writes the outcomes of finished attempts, then
    /// claims up to `limit` due deliveries (as [`Ledger::claim_due_deliveries`]), in one
    /// transaction. An outcome written here frees its checkout and hook's next event for the
    /// claim of the same transaction, so order holds.
    async fn record_and_claim(
        &self,
        outcomes: &[(String, DeliveryUpdate)],
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<RecordAndClaim>;

    /// Revives a dead delivery (or hurries a pending one): pending, due now, attempts reset.
    /// Returns false if there is no such event or it is delivered or running.
    async fn retry_delivery(&self, event_id: &str) -> Result<bool>;

    /// Revives every dead delivery; returns how many.
    async fn retry_dead_deliveries(&self) -> Result<usize>;

    /// Queues new deliveries (new event ids, marked replay) of past transitions verified at or
    /// after `since`, for `hooks` (names), optionally only for one status. Returns the event ids.
    async fn replay_deliveries(
        &self,
        since: DateTime<Utc>,
        status: Option<&str>,
        hooks: &[(String, Vec<String>)],
        include_imported: bool,
    ) -> Result<Vec<String>>;

    /// Deliveries matching `filter`, newest first.
    async fn deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>>;

    /// One delivery.
    async fn delivery(&self, event_id: &str) -> Result<Option<Delivery>>;

    /// Transitions of one checkout as deliveries would see them, for `events`.
    async fn deliveries_of(&self, checkout_id: &CheckoutId) -> Result<Vec<Delivery>>;

    /// The figures behind the ledger-derived gauges, read in one read transaction.
    async fn gauges(&self) -> Result<LedgerGauges>;
}
