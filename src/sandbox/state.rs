//! The sandbox's one shared state: checkouts, their lifecycle, and their Firestore documents.
//!
//! Owns: every checkout the sandbox has issued, the rules for moving between statuses (with
//! paymennt-style errors for impossible moves), expiry timers, registered webhooks and their
//! notifications (signed, retried), and writing each checkout's document through the
//! [`DocumentSink`] after every change.
//! Must never: speak HTTP or gRPC (the API and Listen layers do), or let a document write run
//! ahead of the checkout change it reports.
//!
//! # Ordering of document writes
//!
//! Each checkout carries a document version, bumped under the state lock by every change (a
//! status change, a lying document, a delete). Writes of one checkout's document are serialised
//! by a per-checkout async lock and a write whose version is older than the one already written
//! is skipped. So with a write delay (a fault) the checkout changes at once, its document changes
//! later, and the last word is always the latest change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use gcloud_sdk::google::firestore::v1::Value;
use gcloud_sdk::google::firestore::v1::value::ValueType;
use rand::Rng;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{CheckoutId, CheckoutStatus, Currency, FirestoreLocation, format_money};
use crate::paymennt::wire::{Checkout, JsonDecimal, LinkRequest, WireId};
use crate::sandbox::faults::Faults;
use crate::sandbox::sink::DocumentSink;

/// How statuses are spelled in API responses and documents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatusSpelling {
    /// `PARTIALLY_REFUNDED`, as paymennt's guides and examples write it (the default).
    #[default]
    Upper,
    /// `Partially refunded`, as the OpenAPI enum writes it.
    Spec,
}

impl StatusSpelling {
    /// `status` in this spelling.
    pub fn spell(self, status: &CheckoutStatus) -> &str {
        match self {
            StatusSpelling::Upper => status.as_str(),
            StatusSpelling::Spec => status.spec_spelling(),
        }
    }
}

/// Something the sandbox can do to a checkout, as the customer, paymennt or the merchant would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutAction {
    /// PENDING → AUTHORIZED.
    Authorize,
    /// PENDING or AUTHORIZED → PAID.
    Pay,
    /// PENDING or AUTHORIZED → FAILED.
    Fail,
    /// PENDING or AUTHORIZED → CANCELLED.
    Cancel,
    /// PENDING or AUTHORIZED → EXPIRED.
    Expire,
    /// PAID or PARTIALLY_REFUNDED → REFUNDED, refunding what is left.
    Refund,
    /// PAID or PARTIALLY_REFUNDED → PARTIALLY_REFUNDED (or REFUNDED when nothing is left).
    PartialRefund(Decimal),
}

impl CheckoutAction {
    /// The verb, as the CLI and the admin endpoints name it.
    pub fn verb(&self) -> &'static str {
        match self {
            CheckoutAction::Authorize => "authorize",
            CheckoutAction::Pay => "pay",
            CheckoutAction::Fail => "fail",
            CheckoutAction::Cancel => "cancel",
            CheckoutAction::Expire => "expire",
            CheckoutAction::Refund => "refund",
            CheckoutAction::PartialRefund(_) => "partially refund",
        }
    }
}

/// Why the state refused a request. The message is what paymennt-style clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// Invalid input or an impossible transition (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// No such checkout (HTTP 400 with paymennt's message).
    #[error("Checkout not found for API merchant")]
    NotFound,
    /// The checkout changed but its document could not be written (HTTP 500).
    #[error("the checkout document could not be written: {0}")]
    DocumentWrite(String),
}

/// The order Search Checkouts answers in. paymennt's spec promises none, so discovery must be
/// correct under each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SearchOrder {
    /// Oldest id first.
    #[default]
    Asc,
    /// Newest id first.
    Desc,
    /// A shuffled order, the same for every request of one sandbox (so pages do not overlap),
    /// as an order by some internal key would be.
    Random,
}

/// How the sandbox hands out checkout ids. paymennt's spec says nothing of their growth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckoutIds {
    /// Each id greater than every earlier one.
    #[default]
    Growing,
    /// Random 19-digit ids, unrelated to creation time.
    Random,
}

/// How Search Checkouts behaves: its order, the ids it sees, and how long a new checkout takes
/// to become visible to it (an index that lags behind commits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SearchBehaviour {
    /// The order of results.
    pub order: SearchOrder,
    /// How ids are handed out.
    pub ids: CheckoutIds,
    /// A checkout is found by searches only this long after its creation.
    pub visibility_delay: Duration,
}

/// Settings of the state that do not change while the sandbox runs.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// The Firebase project id answered as `firebaseDatabase`.
    pub project_id: String,
    /// The collection holding checkout documents (`firebaseCollection`).
    pub collection: String,
    /// How statuses are spelled.
    pub status_spelling: StatusSpelling,
    /// How long one `expiresIn` minute lasts (60 s for real; tests shrink it).
    pub expiry_minute: Duration,
    /// Base of the redirect URL, e.g. `http://127.0.0.1:8790` (no trailing slash).
    pub public_base_url: String,
    /// How Search Checkouts orders, sees and lags.
    pub search: SearchBehaviour,
}

/// The shared state. Cheap to clone; every clone sees the same checkouts.
#[derive(Clone)]
pub struct SandboxState {
    inner: Arc<StateInner>,
}

struct StateInner {
    config: StateConfig,
    /// Where documents go.
    sink: Arc<dyn DocumentSink>,
    /// Fault switches (write delay, call counts).
    faults: Faults,
    /// Checkouts; a std mutex because no critical section awaits.
    checkouts: Mutex<Checkouts>,
    /// Webhooks registered through `POST /webhooks`.
    webhooks: Mutex<Vec<WebhookRecord>>,
    /// Every notification attempt, oldest first.
    webhook_attempts: Mutex<Vec<WebhookAttempt>>,
    /// Sends notifications.
    webhook_client: reqwest::Client,
    /// Stops expiry timers and delayed writes at shutdown.
    shutdown: CancellationToken,
    /// Keys the shuffle of [`SearchOrder::Random`].
    search_seed: u64,
    /// Expiry timers and delayed writes, so shutdown can wait for them.
    tasks: TaskTracker,
}

#[derive(Default)]
struct Checkouts {
    by_id: HashMap<CheckoutId, CheckoutRecord>,
    /// Ids in creation order.
    order: Vec<CheckoutId>,
    /// checkoutKey → id, for the payment page.
    by_key: HashMap<String, CheckoutId>,
    /// displayIds in use.
    display_ids: HashSet<String>,
}

/// A registered webhook: called with every checkout change while enabled.
#[derive(Clone)]
pub struct WebhookRecord {
    /// Its id.
    pub id: String,
    /// The HMAC key each notification is signed with (hex HMAC-SHA256 of the body in
    /// [`WEBHOOK_SIGNATURE_HEADER`]).
    pub hmac_key: String,
    /// The endpoint.
    pub address: String,
    /// Whether notifications are sent.
    pub enabled: bool,
    /// Whether the last notification failed after every retry.
    pub failed: bool,
}

impl std::fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRecord")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("enabled", &self.enabled)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// The header carrying a notification's signature. paymennt's spec does not document one; this
/// is the sandbox's choice, and paywatch's default `[http] webhook_signature_header`.
pub const WEBHOOK_SIGNATURE_HEADER: &str = "X-Paymennt-Signature";

/// Delays before each retry of a notification that was not answered with 2xx.
const WEBHOOK_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
];

/// One attempt to deliver a notification, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    /// The webhook.
    pub webhook_id: String,
    /// The checkout the notification was about (None: a test call).
    pub checkout_id: Option<CheckoutId>,
    /// The HTTP status answered, or None if the request failed.
    pub status: Option<u16>,
}

struct CheckoutRecord {
    id: CheckoutId,
    display_id: String,
    checkout_key: String,
    request_id: String,
    order_id: String,
    currency: Currency,
    amount: Decimal,
    status: CheckoutStatus,
    total_refunded: Decimal,
    used_payment_method: Option<&'static str>,
    customer: Option<serde_json::Value>,
    billing_address: Option<serde_json::Value>,
    delivery_address: Option<serde_json::Value>,
    branch_id: Option<i64>,
    /// Where the payment page sends the customer afterwards (`returnUrl`), if given.
    return_url: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    location: FirestoreLocation,
    /// Bumped by every change of the document's intended content.
    doc_version: u64,
    /// The last document version written; the lock serialises this checkout's writes.
    written: Arc<tokio::sync::Mutex<u64>>,
}

/// What the document should become.
enum DocumentWrite {
    Put(BTreeMap<String, Value>),
    Delete,
}

/// One write of one checkout's document, with what is needed to order it.
struct PendingWrite {
    checkout_id: CheckoutId,
    location: FirestoreLocation,
    version: u64,
    written: Arc<tokio::sync::Mutex<u64>>,
    write: DocumentWrite,
}

/// Filters of a checkout search (`GET /checkout`).
#[derive(Debug, Clone, Default)]
pub struct SearchFilter {
    /// Only this order id.
    pub order_id: Option<String>,
    /// Only this request id.
    pub request_id: Option<String>,
    /// Only these statuses (empty = any).
    pub statuses: Vec<CheckoutStatus>,
    /// Only this checkout type (every sandbox checkout is a `LINK`).
    pub kind: Option<String>,
    /// Only checkouts whose id is greater.
    pub after_id: Option<u128>,
    /// Only checkouts created after this time.
    pub after_timestamp: Option<DateTime<Utc>>,
}

impl SandboxState {
    /// A state writing documents to `sink`. Background work stops when `shutdown` is cancelled.
    pub fn new(
        config: StateConfig,
        sink: Arc<dyn DocumentSink>,
        faults: Faults,
        shutdown: CancellationToken,
    ) -> SandboxState {
        SandboxState {
            inner: Arc::new(StateInner {
                config,
                sink,
                faults,
                checkouts: Mutex::new(Checkouts::default()),
                webhooks: Mutex::new(Vec::new()),
                webhook_attempts: Mutex::new(Vec::new()),
                webhook_client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap_or_default(),
                shutdown,
                search_seed: rand::random(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    fn checkouts(&self) -> MutexGuard<'_, Checkouts> {
        // Poisoning means a panic elsewhere mid-update; the maps are still consistent enough for
        // a test stand-in, and refusing every later request would hide the original panic.
        self.inner
            .checkouts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state's fixed settings.
    pub fn config(&self) -> &StateConfig {
        &self.inner.config
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Creates a PENDING payment-link checkout and writes its document, as
    /// `POST /checkout/link` does.
    ///
    /// # Errors
    ///
    /// [`SandboxError::BadRequest`] naming the first invalid field, or
    /// [`SandboxError::DocumentWrite`] if the sink failed (the checkout exists anyway).
    pub async fn create_link(&self, request: &LinkRequest) -> Result<Checkout, SandboxError> {
        let valid = validate_link_request(request)?;
        let now = Utc::now();
        let (checkout, write, expires_in) = {
            let mut checkouts = self.checkouts();
            let id = match self.inner.config.search.ids {
                CheckoutIds::Growing => unique_checkout_id(&checkouts, now),
                CheckoutIds::Random => random_checkout_id(&checkouts),
            };
            let display_id = unique_display_id(&checkouts);
            let checkout_key = hex::encode(rand::random::<[u8; 24]>());
            let location = FirestoreLocation::new(
                &self.inner.config.project_id,
                &self.inner.config.collection,
                &firestore_auto_id(),
            )
            .map_err(|error| SandboxError::BadRequest(error.to_string()))?;
            let record = CheckoutRecord {
                id: id.clone(),
                display_id: display_id.clone(),
                checkout_key: checkout_key.clone(),
                request_id: request.request_id.clone(),
                order_id: request.order_id.clone(),
                currency: valid.currency,
                amount: valid.amount,
                status: CheckoutStatus::Pending,
                total_refunded: zero_like(valid.amount),
                used_payment_method: None,
                customer: request
                    .customer
                    .as_ref()
                    .and_then(|c| serde_json::to_value(c).ok()),
                billing_address: request
                    .billing_address
                    .as_ref()
                    .and_then(|a| serde_json::to_value(a).ok()),
                delivery_address: request
                    .delivery_address
                    .as_ref()
                    .and_then(|a| serde_json::to_value(a).ok()),
                branch_id: request.branch_id,
                return_url: valid.return_url,
                created_at: now,
                updated_at: now,
                location,
                doc_version: 1,
                written: Arc::new(tokio::sync::Mutex::new(0)),
            };
            let write = self.pending_write(&record, DocumentWrite::Put(self.fields(&record)));
            let checkout = self.wire(&record);
            checkouts.display_ids.insert(display_id);
            checkouts.by_key.insert(checkout_key, id.clone());
            checkouts.order.push(id.clone());
            checkouts.by_id.insert(id, record);
            (checkout, write, request.expires_in)
        };
        tracing::info!(
            checkout = %write.checkout_id,
            order = %crate::domain::printable(&request.order_id),
            amount = %format_money(valid.amount),
            currency = %valid.currency,
            document = %write.location.document_name(),
            "sandbox: payment link created"
        );
        if let Some(minutes) = expires_in {
            self.schedule_expiry(write.checkout_id.clone(), minutes);
        }
        self.dispatch(write).await?;
        Ok(checkout)
    }

    /// The checkout as Get Checkout answers it, without counting a call.
    pub fn checkout(&self, id: &CheckoutId) -> Option<Checkout> {
        self.checkouts()
            .by_id
            .get(id)
            .map(|record| self.wire(record))
    }

    /// The checkout's current status.
    pub fn status(&self, id: &CheckoutId) -> Option<CheckoutStatus> {
        self.checkouts()
            .by_id
            .get(id)
            .map(|record| record.status.clone())
    }

    /// Where the checkout's document lives.
    pub fn location(&self, id: &CheckoutId) -> Option<FirestoreLocation> {
        self.checkouts()
            .by_id
            .get(id)
            .map(|record| record.location.clone())
    }

    /// The link's `returnUrl`, if it was given.
    pub fn return_url(&self, id: &CheckoutId) -> Option<String> {
        self.checkouts()
            .by_id
            .get(id)
            .and_then(|record| record.return_url.clone())
    }

    /// The id of the checkout with this `checkoutKey` (from a redirect URL).
    pub fn id_for_key(&self, checkout_key: &str) -> Option<CheckoutId> {
        self.checkouts().by_key.get(checkout_key).cloned()
    }

    /// Every checkout id, oldest first.
    pub fn checkout_ids(&self) -> Vec<CheckoutId> {
        self.checkouts().order.clone()
    }

    /// How many Get Checkout requests arrived for `id`.
    pub fn get_checkout_calls(&self, id: &CheckoutId) -> u64 {
        self.inner.faults.get_checkout_calls(id.as_str())
    }

    /// Checkouts matching `filter`, in the configured [`SearchOrder`], without those created
    /// less than the configured visibility delay ago.
    pub fn search(&self, filter: &SearchFilter) -> Vec<Checkout> {
        let behaviour = self.inner.config.search;
        let visible_before = chrono::Duration::from_std(behaviour.visibility_delay)
            .ok()
            .and_then(|delay| Utc::now().checked_sub_signed(delay))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let checkouts = self.checkouts();
        let mut found: Vec<&CheckoutRecord> = checkouts
            .order
            .iter()
            .filter_map(|id| checkouts.by_id.get(id))
            .filter(|record| {
                filter
                    .order_id
                    .as_ref()
                    .is_none_or(|order_id| &record.order_id == order_id)
                    && filter
                        .request_id
                        .as_ref()
                        .is_none_or(|request_id| &record.request_id == request_id)
                    && (filter.statuses.is_empty() || filter.statuses.contains(&record.status))
                    && filter.kind.as_deref().is_none_or(|kind| kind == "LINK")
                    && filter
                        .after_id
                        .is_none_or(|after| numeric_id(&record.id) > Some(after))
                    && filter
                        .after_timestamp
                        .is_none_or(|after| record.created_at > after)
                    && record.created_at <= visible_before
            })
            .collect();
        match behaviour.order {
            SearchOrder::Asc => found.sort_by_key(|record| numeric_id(&record.id)),
            SearchOrder::Desc => {
                found.sort_by_key(|record| std::cmp::Reverse(numeric_id(&record.id)))
            }
            SearchOrder::Random => {
                let seed = self.inner.search_seed;
                found.sort_by_key(|record| {
                    use std::hash::{Hash, Hasher};
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    (seed, record.id.as_str()).hash(&mut hasher);
                    hasher.finish()
                })
            }
        }
        found.into_iter().map(|record| self.wire(record)).collect()
    }

    /// Applies `action` to the checkout and writes its document.
    ///
    /// # Errors
    ///
    /// [`SandboxError::NotFound`] for an unknown id, [`SandboxError::BadRequest`] for a move the
    /// checkout's status does not allow (e.g. paying a cancelled checkout) or a bad refund
    /// amount, [`SandboxError::DocumentWrite`] if the sink failed (the checkout changed anyway).
    pub async fn apply(
        &self,
        id: &CheckoutId,
        action: CheckoutAction,
    ) -> Result<Checkout, SandboxError> {
        let (checkout, write, from, to) = {
            let mut checkouts = self.checkouts();
            let record = checkouts.by_id.get_mut(id).ok_or(SandboxError::NotFound)?;
            let from = record.status.clone();
            transition(record, action)?;
            record.updated_at = Utc::now();
            record.doc_version += 1;
            let fields = self.fields(record);
            let write = self.pending_write(record, DocumentWrite::Put(fields));
            (self.wire(record), write, from, record.status.clone())
        };
        tracing::info!(
            checkout = %id,
            action = action.verb(),
            from = %from,
            to = %to,
            "sandbox: checkout status changed"
        );
        self.dispatch(write).await?;
        self.notify_webhooks(&checkout);
        Ok(checkout)
    }

    /// Sends a `checkout.updated` notification about `checkout` to every enabled webhook.
    fn notify_webhooks(&self, checkout: &Checkout) {
        let id = checkout.id.as_ref().and_then(|id| id.0.parse().ok());
        let body = serde_json::json!({ "event": "checkout.updated", "checkout": checkout });
        for hook in self.webhooks().into_iter().filter(|hook| hook.enabled) {
            self.deliver(hook, id.clone(), body.to_string());
        }
    }

    /// Delivers one notification in the background, retrying until a 2xx or the retries run
    /// out (then the webhook is marked failed, as paymennt's `failed` flag says).
    fn deliver(&self, hook: WebhookRecord, checkout_id: Option<CheckoutId>, body: String) {
        let state = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let signature = sign_notification(&hook.hmac_key, body.as_bytes());
            let mut delays = WEBHOOK_RETRY_DELAYS.iter();
            loop {
                let sent = state
                    .inner
                    .webhook_client
                    .post(&hook.address)
                    .header("content-type", "application/json")
                    .header(WEBHOOK_SIGNATURE_HEADER, &signature)
                    .body(body.clone())
                    .send();
                let status = tokio::select! {
                    () = shutdown.cancelled() => return,
                    sent = sent => sent.ok().map(|response| response.status().as_u16()),
                };
                state
                    .inner
                    .webhook_attempts
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(WebhookAttempt {
                        webhook_id: hook.id.clone(),
                        checkout_id: checkout_id.clone(),
                        status,
                    });
                let delivered = status.is_some_and(|code| (200..300).contains(&code));
                let Some(delay) = delays.next().filter(|_| !delivered) else {
                    state.update_webhook(&hook.id, |record| record.failed = !delivered);
                    if !delivered {
                        tracing::warn!(webhook = %hook.id, address = %hook.address, ?status, "sandbox: webhook notification failed after every retry");
                    }
                    return;
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(*delay) => {}
                }
            }
        });
    }

    fn update_webhook(
        &self,
        id: &str,
        change: impl FnOnce(&mut WebhookRecord),
    ) -> Option<WebhookRecord> {
        let mut hooks = self
            .inner
            .webhooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let hook = hooks.iter_mut().find(|hook| hook.id == id)?;
        change(hook);
        Some(hook.clone())
    }

    /// One webhook.
    pub fn webhook(&self, id: &str) -> Option<WebhookRecord> {
        self.update_webhook(id, |_| {})
    }

    /// Enables or disables a webhook.
    pub fn set_webhook_enabled(&self, id: &str, enabled: bool) -> Option<WebhookRecord> {
        self.update_webhook(id, |record| record.enabled = enabled)
    }

    /// Deletes a webhook; returns it as it was.
    pub fn delete_webhook(&self, id: &str) -> Option<WebhookRecord> {
        let mut hooks = self
            .inner
            .webhooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = hooks.iter().position(|hook| hook.id == id)?;
        Some(hooks.remove(index))
    }

    /// Sends a test notification (`{"event": "test", "webhookId": …}`) to a webhook.
    pub fn test_webhook(&self, id: &str) -> Option<WebhookRecord> {
        let hook = self.webhook(id)?;
        let body = serde_json::json!({ "event": "test", "webhookId": id }).to_string();
        self.deliver(hook.clone(), None, body);
        Some(hook)
    }

    /// Every notification attempt so far, oldest first.
    pub fn webhook_attempts(&self) -> Vec<WebhookAttempt> {
        self.inner
            .webhook_attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// PENDING or AUTHORIZED → PAID. See [`SandboxState::apply`].
    ///
    /// # Errors
    ///
    /// As [`SandboxState::apply`].
    pub async fn pay(&self, id: &CheckoutId) -> Result<Checkout, SandboxError> {
        self.apply(id, CheckoutAction::Pay).await
    }

    /// PENDING or AUTHORIZED → FAILED. See [`SandboxState::apply`].
    ///
    /// # Errors
    ///
    /// As [`SandboxState::apply`].
    pub async fn fail(&self, id: &CheckoutId) -> Result<Checkout, SandboxError> {
        self.apply(id, CheckoutAction::Fail).await
    }

    /// PENDING or AUTHORIZED → CANCELLED. See [`SandboxState::apply`].
    ///
    /// # Errors
    ///
    /// As [`SandboxState::apply`].
    pub async fn cancel(&self, id: &CheckoutId) -> Result<Checkout, SandboxError> {
        self.apply(id, CheckoutAction::Cancel).await
    }

    /// PENDING or AUTHORIZED → EXPIRED. See [`SandboxState::apply`].
    ///
    /// # Errors
    ///
    /// As [`SandboxState::apply`].
    pub async fn expire(&self, id: &CheckoutId) -> Result<Checkout, SandboxError> {
        self.apply(id, CheckoutAction::Expire).await
    }

    /// PENDING → AUTHORIZED. See [`SandboxState::apply`].
    ///
    /// # Errors
    ///
    /// As [`SandboxState::apply`].
    pub async fn authorize(&self, id: &CheckoutId) -> Result<Checkout, SandboxError> {
        self.apply(id, CheckoutAction::Authorize).await
    }

    /// Refunds `amount`, or everything left when `None`. See [`SandboxState::apply`].
    ///
    /// # Errors
    ///
    /// As [`SandboxState::apply`].
    pub async fn refund(
        &self,
        id: &CheckoutId,
        amount: Option<Decimal>,
    ) -> Result<Checkout, SandboxError> {
        let action = match amount {
            Some(amount) => CheckoutAction::PartialRefund(amount),
            None => CheckoutAction::Refund,
        };
        self.apply(id, action).await
    }

    /// Sets the document's `status` field to `status_text` WITHOUT changing the checkout: a
    /// lying document. Get Checkout keeps answering the true status, so a daemon that records
    /// what the document says is caught.
    ///
    /// # Errors
    ///
    /// [`SandboxError::NotFound`] for an unknown id, [`SandboxError::DocumentWrite`] if the sink
    /// failed.
    pub async fn lie_document(
        &self,
        id: &CheckoutId,
        status_text: &str,
    ) -> Result<(), SandboxError> {
        let write = {
            let mut checkouts = self.checkouts();
            let record = checkouts.by_id.get_mut(id).ok_or(SandboxError::NotFound)?;
            record.doc_version += 1;
            let mut fields = self.fields(record);
            fields.insert("status".into(), string_value(status_text));
            fields.insert("updatedAt".into(), timestamp_value(Utc::now()));
            self.pending_write(record, DocumentWrite::Put(fields))
        };
        tracing::info!(
            checkout = %id,
            document_status = %crate::domain::printable(status_text),
            "sandbox: document status set without changing the checkout"
        );
        self.dispatch(write).await
    }

    /// Deletes the checkout's document upstream; the checkout itself stays.
    ///
    /// # Errors
    ///
    /// [`SandboxError::NotFound`] for an unknown id, [`SandboxError::DocumentWrite`] if the sink
    /// failed.
    pub async fn delete_document(&self, id: &CheckoutId) -> Result<(), SandboxError> {
        let write = {
            let mut checkouts = self.checkouts();
            let record = checkouts.by_id.get_mut(id).ok_or(SandboxError::NotFound)?;
            record.doc_version += 1;
            self.pending_write(record, DocumentWrite::Delete)
        };
        tracing::info!(checkout = %id, "sandbox: document deleted");
        self.dispatch(write).await
    }

    /// Registers a webhook (`POST /webhooks`): every checkout change is sent to it from now on.
    pub fn add_webhook(&self, address: &str) -> WebhookRecord {
        let record = WebhookRecord {
            id: unique_numeric_id(Utc::now()),
            hmac_key: hex::encode(rand::random::<[u8; 16]>()),
            address: address.to_owned(),
            enabled: true,
            failed: false,
        };
        self.inner
            .webhooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(record.clone());
        record
    }

    /// Registered webhooks, oldest first.
    pub fn webhooks(&self) -> Vec<WebhookRecord> {
        self.inner
            .webhooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits for expiry timers and delayed writes to stop (after the shutdown token fired).
    pub async fn wait_background(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn schedule_expiry(&self, id: CheckoutId, minutes: i64) {
        let minutes = u32::try_from(minutes).unwrap_or(u32::MAX);
        let after = self.inner.config.expiry_minute.saturating_mul(minutes);
        let state = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(after) => {
                    if state.status(&id) == Some(CheckoutStatus::Pending) {
                        // Expiry loses a race with a payment harmlessly: the transition is
                        // refused and nothing is written.
                        if let Err(error) = state.apply(&id, CheckoutAction::Expire).await {
                            tracing::debug!(checkout = %id, %error, "sandbox: expiry skipped");
                        }
                    }
                }
            }
        });
    }

    fn pending_write(&self, record: &CheckoutRecord, write: DocumentWrite) -> PendingWrite {
        PendingWrite {
            checkout_id: record.id.clone(),
            location: record.location.clone(),
            version: record.doc_version,
            written: record.written.clone(),
            write,
        }
    }

    /// Writes now, or later if a write delay is set (then errors are only logged).
    async fn dispatch(&self, write: PendingWrite) -> Result<(), SandboxError> {
        let delay = self.inner.faults.document_write_delay();
        if delay.is_zero() {
            return self.write(write).await;
        }
        let state = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(delay) => {
                    let id = write.checkout_id.clone();
                    if let Err(error) = state.write(write).await {
                        tracing::warn!(checkout = %id, %error, "sandbox: delayed document write failed");
                    }
                }
            }
        });
        Ok(())
    }

    async fn write(&self, write: PendingWrite) -> Result<(), SandboxError> {
        let mut written = write.written.lock().await;
        if *written >= write.version {
            // A newer change of this document has already been written.
            return Ok(());
        }
        let result = match &write.write {
            DocumentWrite::Put(fields) => self.inner.sink.put(&write.location, fields).await,
            DocumentWrite::Delete => self.inner.sink.delete(&write.location).await,
        };
        match result {
            Ok(()) => {
                *written = write.version;
                Ok(())
            }
            Err(error) => {
                tracing::warn!(checkout = %write.checkout_id, error = %format!("{error:#}"), "sandbox: document write failed");
                Err(SandboxError::DocumentWrite(format!("{error:#}")))
            }
        }
    }

    /// The checkout's document fields, as the sandbox's paymennt writes them. The daemon must
    /// never trust them; they only signal that something changed.
    fn fields(&self, record: &CheckoutRecord) -> BTreeMap<String, Value> {
        let spelling = self.inner.config.status_spelling;
        BTreeMap::from([
            ("checkoutId".into(), string_value(record.id.as_str())),
            (
                "status".into(),
                string_value(spelling.spell(&record.status)),
            ),
            // Money as exact decimal text, never a double.
            ("amount".into(), string_value(&record.amount.to_string())),
            ("currency".into(), string_value(record.currency.as_str())),
            (
                "totalRefunded".into(),
                string_value(&record.total_refunded.to_string()),
            ),
            ("updatedAt".into(), timestamp_value(record.updated_at)),
        ])
    }

    /// The checkout as the Merchant API answers it.
    fn wire(&self, record: &CheckoutRecord) -> Checkout {
        let spelling = self.inner.config.status_spelling;
        let status = match spelling {
            StatusSpelling::Upper => record.status.clone(),
            // `CheckoutStatus` serialises in upper case; `Unknown` carries any text verbatim, so
            // it is how the spec spelling reaches the wire.
            StatusSpelling::Spec => {
                CheckoutStatus::Unknown(record.status.spec_spelling().to_owned())
            }
        };
        let used_payment_method = record.used_payment_method.map(|method| match spelling {
            StatusSpelling::Upper => method.to_ascii_uppercase(),
            StatusSpelling::Spec => method.to_owned(),
        });
        Checkout {
            id: Some(WireId(record.id.as_str().to_owned())),
            display_id: Some(record.display_id.clone()),
            checkout_key: Some(record.checkout_key.clone()),
            request_id: Some(record.request_id.clone()),
            order_id: Some(record.order_id.clone()),
            currency: Some(record.currency.as_str().to_owned()),
            amount: Some(JsonDecimal(record.amount)),
            cash_amount: Some(JsonDecimal(zero_like(record.amount))),
            status: Some(status),
            total_refunded: Some(JsonDecimal(record.total_refunded)),
            redirect_url: Some(format!(
                "{}/pay/{}",
                self.inner.config.public_base_url, record.checkout_key
            )),
            used_payment_method,
            customer: record.customer.clone(),
            subscription_id: None,
            billing_address: record.billing_address.clone(),
            delivery_address: record.delivery_address.clone(),
            firebase_database: Some(record.location.project.clone()),
            firebase_collection: Some(record.location.collection.clone()),
            firebase_document: Some(record.location.document.clone()),
            timestamp: Some(iso_timestamp(record.created_at)),
            branch_id: record.branch_id.map(|id| WireId(id.to_string())),
            branch_name: record.branch_id.map(|_| "Sandbox branch".to_owned()),
        }
    }
}

/// The parts of a create-link request that need checking.
struct ValidLink {
    amount: Decimal,
    currency: Currency,
    return_url: Option<String>,
}

fn validate_link_request(request: &LinkRequest) -> Result<ValidLink, SandboxError> {
    for (name, value) in [
        ("requestId", &request.request_id),
        ("orderId", &request.order_id),
        ("description", &request.description),
        ("currency", &request.currency),
    ] {
        if value.trim().is_empty() {
            return Err(SandboxError::BadRequest(format!("{name} is required")));
        }
    }
    let currency: Currency = request.currency.parse().map_err(|_| {
        SandboxError::BadRequest(format!(
            "currency '{}' is invalid, expected a 3-letter ISO 4217 code",
            crate::domain::printable(&request.currency)
        ))
    })?;
    let amount = request.amount.0;
    if amount <= Decimal::ZERO {
        return Err(SandboxError::BadRequest(
            "amount must be greater than 0".into(),
        ));
    }
    if let Some(minutes) = request.expires_in
        && !(15..=10080).contains(&minutes)
    {
        return Err(SandboxError::BadRequest(format!(
            "expiresIn must be between 15 and 10080 minutes, got {minutes}"
        )));
    }
    let return_url = match request.return_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => match reqwest::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url.to_string()),
            _ => {
                return Err(SandboxError::BadRequest(format!(
                    "returnUrl '{}' must be an http or https URL",
                    crate::domain::printable(text)
                )));
            }
        },
    };
    Ok(ValidLink {
        amount,
        currency,
        return_url,
    })
}

/// Moves `record` by `action`, or explains why it cannot move.
fn transition(record: &mut CheckoutRecord, action: CheckoutAction) -> Result<(), SandboxError> {
    use CheckoutStatus as S;
    let refused = || {
        SandboxError::BadRequest(format!(
            "Cannot {} a checkout in status {}",
            action.verb(),
            record.status
        ))
    };
    match action {
        CheckoutAction::Authorize => {
            if record.status != S::Pending {
                return Err(refused());
            }
            record.status = S::Authorized;
            record.used_payment_method = Some("Card");
        }
        CheckoutAction::Pay
        | CheckoutAction::Fail
        | CheckoutAction::Cancel
        | CheckoutAction::Expire => {
            if !matches!(record.status, S::Pending | S::Authorized) {
                return Err(refused());
            }
            record.status = match action {
                CheckoutAction::Pay => {
                    record.used_payment_method = Some("Card");
                    S::Paid
                }
                CheckoutAction::Fail => S::Failed,
                CheckoutAction::Cancel => S::Cancelled,
                _ => S::Expired,
            };
        }
        CheckoutAction::Refund | CheckoutAction::PartialRefund(_) => {
            if !matches!(record.status, S::Paid | S::PartiallyRefunded) {
                return Err(refused());
            }
            let left = record.amount - record.total_refunded;
            let amount = match action {
                CheckoutAction::PartialRefund(amount) => amount,
                _ => left,
            };
            if amount <= Decimal::ZERO {
                return Err(SandboxError::BadRequest(
                    "Refund amount must be greater than 0".into(),
                ));
            }
            if amount > left {
                return Err(SandboxError::BadRequest(format!(
                    "Refund amount {} exceeds the refundable amount {}",
                    format_money(amount),
                    format_money(left)
                )));
            }
            record.total_refunded += amount;
            record.status = if record.total_refunded == record.amount {
                S::Refunded
            } else {
                S::PartiallyRefunded
            };
        }
    }
    Ok(())
}

/// The hex HMAC-SHA256 of a notification body under the webhook's key.
fn sign_notification(key: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    match hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC accepts keys of any length.
        Err(_) => String::new(),
    }
}

/// Zero with the same number of decimals as `like` (`0.00` next to `100.00`).
fn zero_like(like: Decimal) -> Decimal {
    Decimal::new(0, like.scale())
}

/// A paymennt-like 19-digit id: creation milliseconds followed by six random digits.
fn unique_numeric_id(now: DateTime<Utc>) -> String {
    let millis = u64::try_from(now.timestamp_millis()).unwrap_or(0) % 10_000_000_000_000;
    let millis = millis.max(1_000_000_000_000);
    let random: u64 = rand::rng().random_range(0..1_000_000);
    format!("{millis}{random:06}")
}

/// A checkout id as a number (sandbox ids always are).
fn numeric_id(id: &CheckoutId) -> Option<u128> {
    id.as_str().parse().ok()
}

/// A fresh id greater than every id so far: paymennt's ids grow with creation, which is what
/// Search Checkouts' `afterId` relies on.
fn unique_checkout_id(checkouts: &Checkouts, now: DateTime<Utc>) -> CheckoutId {
    let newest = checkouts.order.last().and_then(numeric_id);
    loop {
        let mut candidate = unique_numeric_id(now);
        if let (Some(newest), Ok(number)) = (newest, candidate.parse::<u128>())
            && number <= newest
        {
            candidate = (newest + 1).to_string();
        }
        if let Ok(id) = candidate.parse::<CheckoutId>()
            && !checkouts.by_id.contains_key(&id)
        {
            return id;
        }
    }
}

/// A fresh random 19-digit id, unrelated to creation time.
fn random_checkout_id(checkouts: &Checkouts) -> CheckoutId {
    loop {
        let number: u64 = rand::rng().random_range(1_000_000_000_000_000_000..u64::MAX);
        if let Ok(id) = number.to_string().parse::<CheckoutId>()
            && !checkouts.by_id.contains_key(&id)
        {
            return id;
        }
    }
}

/// Six upper-case letters and digits, unused so far.
fn unique_display_id(checkouts: &Checkouts) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    loop {
        let candidate: String = (0..6)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        if !checkouts.display_ids.contains(&candidate) {
            return candidate;
        }
    }
}

/// A 20-character document id, like Firestore's auto ids. Deliberately unrelated to the checkout
/// id, so a client that guesses the document from the id is caught.
fn firestore_auto_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// ISO 8601 with milliseconds and offset (`2024-05-01T10:00:00.123+00:00`), as the spec's
/// `yyyy-MM-ddTHH:mm:ss.SSSZZ`.
pub(crate) fn iso_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, false)
}

fn string_value(text: &str) -> Value {
    Value {
        value_type: Some(ValueType::StringValue(text.to_owned())),
    }
}

fn timestamp_value(at: DateTime<Utc>) -> Value {
    Value {
        value_type: Some(ValueType::TimestampValue(
            crate::sandbox::documents::timestamp_from_micros(at.timestamp_micros()),
        )),
    }
}

#[cfg(test)]
mod tests;
