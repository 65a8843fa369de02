//! The PostgreSQL store behind the ledger's one interface.
//!
//! Owns: `impl Backend for PgStore`: each method calls the store's operation of the same name
//! and turns a [`PgError`] into a [`LedgerError`] naming `host:port/database`.
//! Must never: hold SQL (that is in `ops.rs`, `apply.rs`, `outbox.rs`, `reads.rs`), or show the
//! URL or a password (errors name only the target).

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{PgError, PgStore};
use crate::domain::{CheckoutId, FirestoreLocation, Source, TrackedVia, VerifyTicket};
use crate::ledger::{
    ApplyOutcome, ApplyRequest, Backend, CheckoutRecord, Delivery, DeliveryFilter, DeliveryUpdate,
    Discovered, LedgerCounts, LedgerError, LedgerGauges, ListFilter, LookingGone, NotFoundOutcome,
    NotedChanges, OpenCheckout, RecordAndClaim, Result, ResumePoint, TrackOutcome,
    TransitionRecord, WatchEntry,
};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::CheckoutFacts;
use crate::settings::HookSettings;

impl PgStore {
    /// A PostgreSQL failure as a ledger failure: the target as the path, the rest as the
    /// message (without repeating "ledger TARGET:").
    pub(crate) fn ledger_error(&self, error: &PgError) -> LedgerError {
        let target = self.target().describe().to_owned();
        let text = error.to_string();
        let prefix = format!("ledger {target}: ");
        let message = text.strip_prefix(&prefix).unwrap_or(&text).to_owned();
        LedgerError {
            path: target,
            message,
        }
    }

    fn ledger<T>(&self, result: std::result::Result<T, PgError>) -> Result<T> {
        result.map_err(|error| self.ledger_error(&error))
    }
}

#[async_trait::async_trait]
impl Backend for PgStore {
    fn path(&self) -> PathBuf {
        PathBuf::from(self.target().describe())
    }

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    async fn track(&self, facts: &CheckoutFacts, via: TrackedVia) -> Result<TrackOutcome> {
        self.ledger(PgStore::track(self, facts, via).await)
    }

    async fn apply(
        &self,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome> {
        self.ledger(PgStore::apply(self, verified, source, changed_at, hooks, refund_watch).await)
    }

    async fn apply_all(
        &self,
        requests: Vec<ApplyRequest>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Vec<Result<ApplyOutcome>> {
        PgStore::apply_all(self, &requests, hooks, refund_watch)
            .await
            .into_iter()
            .map(|outcome| self.ledger(outcome))
            .collect()
    }

    async fn begin_discovery_epoch(&self, now_time: DateTime<Utc>) -> Result<DateTime<Utc>> {
        self.ledger(PgStore::begin_discovery_epoch(self, now_time).await)
    }

    async fn last_discovery_round(&self, kind: &str) -> Result<Option<DateTime<Utc>>> {
        self.ledger(PgStore::last_discovery_round(self, kind).await)
    }

    async fn finish_discovery_round(&self, kind: &str, started_at: DateTime<Utc>) -> Result<()> {
        self.ledger(PgStore::finish_discovery_round(self, kind, started_at).await)
    }

    async fn record_discovered(&self, found: &[CheckoutFacts]) -> Result<Vec<Discovered>> {
        self.ledger(PgStore::record_discovered(self, found).await)
    }

    async fn open_checkouts(&self) -> Result<Vec<OpenCheckout>> {
        self.ledger(PgStore::open_checkouts(self).await)
    }

    async fn issue_ticket(&self) -> Result<VerifyTicket> {
        self.ledger(PgStore::issue_ticket(self).await)
    }

    async fn issue_tickets(
        &self,
        wanted: &[(CheckoutId, Option<VerifyTicket>)],
    ) -> Result<Vec<Option<VerifyTicket>>> {
        self.ledger(PgStore::issue_tickets(self, wanted).await)
    }

    async fn last_ticket(&self) -> Result<VerifyTicket> {
        self.ledger(PgStore::last_ticket(self).await)
    }

    async fn note_changes(&self, ids: &[CheckoutId]) -> Result<NotedChanges> {
        self.ledger(PgStore::note_changes(self, ids).await)
    }

    async fn note_not_found(&self, id: &CheckoutId) -> Result<NotFoundOutcome> {
        self.ledger(PgStore::note_not_found(self, id).await)
    }

    async fn looking_gone(&self) -> Result<LookingGone> {
        self.ledger(PgStore::looking_gone(self).await)
    }

    async fn save_resume_points(&self, points: &[ResumePoint]) -> Result<()> {
        self.ledger(PgStore::save_resume_points(self, points).await)
    }

    async fn forget_resume_token(&self, id: &CheckoutId) -> Result<()> {
        self.ledger(PgStore::forget_resume_token(self, id).await)
    }

    async fn note_listen_refusal(
        &self,
        id: &CheckoutId,
        code: &str,
        message: &str,
        document: &str,
        next_retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        self.ledger(
            PgStore::note_listen_refusal(self, id, code, message, document, next_retry_at).await,
        )
    }

    async fn clear_listen_refusal(&self, id: &CheckoutId) -> Result<()> {
        self.ledger(PgStore::clear_listen_refusal(self, id).await)
    }

    async fn clear_listen_refusals(&self) -> Result<()> {
        self.ledger(PgStore::clear_listen_refusals(self).await)
    }

    async fn probe_documents(
        &self,
        only: Option<&CheckoutId>,
    ) -> Result<Vec<(CheckoutId, FirestoreLocation)>> {
        self.ledger(PgStore::probe_documents(self, only).await)
    }

    async fn watch_set(&self) -> Result<Vec<WatchEntry>> {
        self.ledger(PgStore::watch_set(self).await)
    }

    async fn expire_refund_watch(&self, now_time: DateTime<Utc>) -> Result<Vec<CheckoutId>> {
        self.ledger(PgStore::expire_refund_watch(self, now_time).await)
    }

    async fn checkout(&self, id: &CheckoutId) -> Result<Option<CheckoutRecord>> {
        self.ledger(PgStore::checkout(self, id).await)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<CheckoutRecord>> {
        self.ledger(PgStore::list(self, filter).await)
    }

    async fn transitions(&self, id: &CheckoutId) -> Result<Vec<TransitionRecord>> {
        self.ledger(PgStore::transitions(self, id).await)
    }

    async fn counts(&self) -> Result<LedgerCounts> {
        self.ledger(PgStore::counts(self).await)
    }

    async fn data_version(&self) -> Result<i64> {
        self.ledger(PgStore::data_version(self).await)
    }

    async fn check_writable(&self) -> Result<()> {
        self.ledger(PgStore::check_writable(self).await)
    }

    async fn recover_running_deliveries(&self) -> Result<usize> {
        self.ledger(PgStore::recover_running_deliveries(self).await)
    }

    async fn record_and_claim(
        &self,
        outcomes: &[(String, DeliveryUpdate)],
        now_time: DateTime<Utc>,
        limit: usize,
    ) -> Result<RecordAndClaim> {
        self.ledger(PgStore::record_and_claim(self, outcomes, now_time, limit).await)
    }

    async fn retry_delivery(&self, event_id: &str) -> Result<bool> {
        self.ledger(PgStore::retry_delivery(self, event_id).await)
    }

    async fn retry_dead_deliveries(&self) -> Result<usize> {
        self.ledger(PgStore::retry_dead_deliveries(self).await)
    }

    async fn replay_deliveries(
        &self,
        since: DateTime<Utc>,
        status: Option<&str>,
        hooks: &[(String, Vec<String>)],
        include_imported: bool,
    ) -> Result<Vec<String>> {
        self.ledger(PgStore::replay_deliveries(self, since, status, hooks, include_imported).await)
    }

    async fn deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<Delivery>> {
        self.ledger(PgStore::deliveries(self, filter).await)
    }

    async fn delivery(&self, event_id: &str) -> Result<Option<Delivery>> {
        self.ledger(PgStore::delivery(self, event_id).await)
    }

    async fn deliveries_of(&self, checkout_id: &CheckoutId) -> Result<Vec<Delivery>> {
        self.ledger(PgStore::deliveries_of(self, checkout_id).await)
    }

    async fn gauges(&self) -> Result<LedgerGauges> {
        self.ledger(PgStore::gauges(self).await)
    }
}
