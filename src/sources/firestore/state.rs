//! The per-stream protocol state machine: Listen responses in, [`ListenEvent`]s and requests out.
//!
//! Pure: no I/O, no clock of its own (the caller passes `now`), so the unit tests below can feed
//! scripted [`ListenResponse`] sequences and check every event. The stream task in `stream.rs`
//! owns one [`StreamState`] per Listen stream and carries out its [`Action`]s in order.
//!
//! The rules follow the Listen wire sequences for a documents target and when a resume token may
//! be persisted, as Google's `google/firestore/v1` protos and the official server SDKs' watch code
//! (`@google-cloud/firestore`'s `watch.ts`) show them:
//! - a document event (change, delete, remove) for a target is a [`ListenEvent::Changed`] at once;
//! - a target added without a resume token, or RESET, is verified once it is CURRENT even when no
//!   document came (a missing document produces no event in production);
//! - resume tokens are adopted, and offered as a [`ListenEvent::Checkpoint`], only at a global
//!   consistent snapshot (`NO_CHANGE`, no target ids, with a read time) and only for targets that
//!   have been CURRENT on this stream session;
//! - RESET and existence-filter mismatches drop the token ([`ListenEvent::ForgetToken`]);
//! - a target `REMOVE` with a cause (PERMISSION_DENIED for one document, NOT_FOUND, ...) refuses
//!   that checkout only ([`ListenEvent::TargetRefused`]): it is parked and asked for again after
//!   a long, growing delay ([`StreamState::retry_refused`]) while the stream and its other
//!   targets carry on; once it is CURRENT again, [`ListenEvent::TargetRecovered`];
//! - a target whose `ADD` does not come within the ack timeout, on a session where the server
//!   did acknowledge an earlier target, is taken off the stream ([`StreamState::take_unacknowledged`])
//!   for the pool to place on a fresh stream: some servers (the npm emulator) read only the first
//!   request of a stream. Its id stays reserved until a `REMOVE` or the next session.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use gcloud_sdk::google::firestore::v1::{
    ListenRequest, ListenResponse, Target, TargetChange, listen_request, listen_response, target,
    target_change::TargetChangeType,
};
use tonic::Code;

use super::listen::{ListenEvent, WatchTarget};
#[cfg(test)]
use crate::domain::CollectionPaths;
use crate::domain::{CheckoutId, Source, WatchedDocument, printable};
use crate::sources::Nudge;

/// Something the stream task must do, in this order, after feeding the state machine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send this event on the listener's channel.
    Emit(ListenEvent),
    /// Send this request on the open Listen stream (boxed: requests are large, events small).
    Send(Box<ListenRequest>),
    /// The stream is healthy (a token or CURRENT arrived): start the next backoff from scratch.
    ResetBackoff,
    /// The server acknowledged (`ADD`) a target that was not the first request of the session:
    /// it reads targets added to a live stream. Sent at most once per session.
    LiveAddAcknowledged,
}

/// Why the stream must be closed, decided from a response (not from the transport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Reopen the stream after the usual backoff.
    Transient(String),
}

/// How the stream task should treat a gRPC status that ended the stream (or failed to open it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Reopen after the next backoff delay.
    Transient,
    /// Reopen after the maximum backoff delay (RESOURCE_EXHAUSTED).
    Exhausted,
    /// Forget every resume token of the stream and reopen at once (INVALID_ARGUMENT on resume).
    RetryWithoutTokens,
    /// UNAUTHENTICATED or PERMISSION_DENIED after the stream was healthy: an access token may
    /// have expired under it. Reopen after the next backoff delay, quietly, a few times.
    AuthRetry,
    /// The database refuses us: report once, then retry rarely.
    Permanent,
}

/// Consecutive UNAUTHENTICATED / PERMISSION_DENIED endings, counted from the one that hit a
/// healthy stream, after which the refusal is reported as permanent.
pub(crate) const AUTH_RETRIES: u32 = 3;

/// What a stream task knows when a status ends its stream.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StreamHistory {
    /// Some target on the stream was added with a resume token.
    pub(crate) resumed: bool,
    /// The stream already dropped its tokens once after INVALID_ARGUMENT.
    pub(crate) retried_without_tokens: bool,
    /// A message arrived on this session: the server accepted the stream and its credentials.
    pub(crate) heard_from_server: bool,
    /// A RemoveTarget of ours was not yet answered.
    pub(crate) removal_in_flight: bool,
    /// UNAUTHENTICATED / PERMISSION_DENIED endings in a row, counted since one hit a healthy
    /// stream (0: none, or the last one was on a stream that never worked).
    pub(crate) auth_retries: u32,
}

/// Classifies a status that ended a Listen stream (by its gRPC code and the stream's history,
/// never by the message text).
///
/// - UNAUTHENTICATED / PERMISSION_DENIED on a stream that was healthy: the access token may have
///   expired under a long-lived stream (the official Node SDK retries UNAUTHENTICATED), so it is
///   retried, [`AUTH_RETRIES`] times in a row, before it counts as a refusal. On a stream that
///   never worked the credentials are refused: permanent.
/// - NOT_FOUND after the server spoke, or while a RemoveTarget was in flight: the server had
///   already removed a target we removed (note 1.5 item 7): reopen. NOT_FOUND for a stream
///   that never worked: the database does not exist: permanent.
pub(crate) fn classify(code: Code, message: &str, history: &StreamHistory) -> Disposition {
    let auth_retry = history.heard_from_server || (1..AUTH_RETRIES).contains(&history.auth_retries);
    match code {
        Code::Unauthenticated | Code::PermissionDenied if auth_retry => Disposition::AuthRetry,
        Code::Unauthenticated | Code::PermissionDenied => Disposition::Permanent,
        Code::NotFound if history.heard_from_server || history.removal_in_flight => {
            Disposition::Transient
        }
        Code::NotFound => Disposition::Permanent,
        Code::FailedPrecondition if message.to_ascii_lowercase().contains("datastore mode") => {
            Disposition::Permanent
        }
        Code::InvalidArgument if history.resumed && !history.retried_without_tokens => {
            Disposition::RetryWithoutTokens
        }
        Code::InvalidArgument => Disposition::Permanent,
        Code::ResourceExhausted => Disposition::Exhausted,
        _ => Disposition::Transient,
    }
}

/// The gRPC name of a status code, as Google documents it (`PERMISSION_DENIED`).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The operator-facing text for a permanent failure of `database`
/// (`projects/{p}/databases/{d}`): what happened, then what to check.
pub(crate) fn permanent_message(
    database: &str,
    endpoint: &str,
    code: Code,
    message: &str,
) -> String {
    let detail = printable(message);
    let (what, check) = match code {
        Code::Unauthenticated => (
            "Firestore rejected the credentials",
            "check that [firestore] credentials (or GOOGLE_APPLICATION_CREDENTIALS) names a valid \
             service-account key that has not been deleted or disabled",
        ),
        Code::PermissionDenied => (
            "the service account may not read this project's Firestore",
            "grant the service account roles/datastore.viewer (or roles/datastore.user) on the \
             project, and check that the Cloud Firestore API is enabled for it",
        ),
        Code::NotFound => (
            "the database does not exist",
            "check firebaseDatabase in the create-link response, [firestore] database, and that \
             the project has that Firestore database in Native mode",
        ),
        Code::FailedPrecondition => (
            "the database is in Datastore mode, which has no Listen",
            "use a database in Firestore Native mode",
        ),
        _ => (
            "Firestore refused the Listen request",
            "check the project id and the document paths of the checkouts in this project",
        ),
    };
    let code = code_name(code);
    format!(
        "{what}: '{database}' at {endpoint} answered {code}: {detail}\n\n{check}; \
         paywatch keeps retrying this database every backoff_max"
    )
}

/// A resume token. A global snapshot's token applies to every target of the stream: they share
/// one copy of it.
type Token = Arc<[u8]>;

/// A target's progress on the current stream session.
#[derive(Debug, Clone, Default)]
struct Session {
    /// The server acknowledged the AddTarget (`ADD`).
    acked: bool,
    /// Its AddTarget was the first request of the session.
    first: bool,
    /// When its AddTarget went out (stamped by [`StreamState::note_sent`]).
    sent_at: Option<Instant>,
    /// The target has been CURRENT since it was added (or last RESET) on this session.
    current: bool,
    /// It was added with a resume token.
    resumed: bool,
    /// A verification is owed once the target is CURRENT, unless a document event pays it first
    /// (added without a token, or RESET).
    verify_at_current: bool,
    /// A token that applies to this target, not yet adopted (adoption waits for a snapshot).
    pending_token: Option<Token>,
    /// Something happened since the last checkpoint (document event, CURRENT, RESET): the next
    /// snapshot checkpoints this target whatever the interval.
    dirty: bool,
}

/// One watched checkout on this stream.
#[derive(Debug, Clone)]
struct TargetEntry {
    /// The checkout this target watches.
    checkout_id: CheckoutId,
    /// The document (its full resource name is built when a request needs it).
    document: WatchedDocument,
    /// The token to resume with on the next session; adopted only at a snapshot while CURRENT.
    resume_token: Option<Token>,
    /// Whether the document exists, as far as this process has seen (None: not known).
    exists: Option<bool>,
    /// The read time of the last consistent snapshot this target was CURRENT in (from the
    /// ledger at start: the persisted token's read time). Every document version up to it has
    /// been reported: a resent document whose update time is not after it (a full resend after
    /// a token expired, a RESET) is not reported again.
    seen_through: Option<DateTime<Utc>>,
    /// When this target's token was last offered in a Checkpoint.
    last_checkpoint: Option<Instant>,
    /// Progress on the open session; None while disconnected or not yet sent.
    session: Option<Session>,
    /// RemoveTarget was sent; events for it are ignored until its REMOVE.
    removing: bool,
    /// Firestore refused this target this many times in a row (0: not refused since it was
    /// last CURRENT).
    refusals: u32,
}

/// A stream's targets by id, in id order. A sorted vector: ids are handed out in increasing
/// order, so adding one is a push, and the entries stay packed (a `BTreeMap` filled in order
/// leaves its nodes about half full, which doubled the listener's memory per checkout).
/// Removal shifts the entries after it: at most `targets_per_stream` (10,000).
#[derive(Debug, Default)]
struct Targets(Vec<(i32, TargetEntry)>);

impl Targets {
    fn position(&self, id: i32) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(key, _)| *key)
    }

    fn get(&self, id: &i32) -> Option<&TargetEntry> {
        let at = self.position(*id).ok()?;
        self.0.get(at).map(|(_, entry)| entry)
    }

    fn get_mut(&mut self, id: &i32) -> Option<&mut TargetEntry> {
        let at = self.position(*id).ok()?;
        self.0.get_mut(at).map(|(_, entry)| entry)
    }

    fn contains_key(&self, id: &i32) -> bool {
        self.position(*id).is_ok()
    }

    /// Adds or replaces the target `id`; returns the entry it replaced.
    fn insert(&mut self, id: i32, entry: TargetEntry) -> Option<TargetEntry> {
        match self.position(id) {
            Ok(at) => self
                .0
                .get_mut(at)
                .map(|(_, old)| std::mem::replace(old, entry)),
            Err(at) => {
                // A per-document stream holds one target: room for one, not Vec's first four.
                if self.0.is_empty() {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, (id, entry));
                None
            }
        }
    }

    fn remove(&mut self, id: &i32) -> Option<TargetEntry> {
        let at = self.position(*id).ok()?;
        let (_, entry) = self.0.remove(at);
        self.shrink();
        Some(entry)
    }

    fn retain(&mut self, mut keep: impl FnMut(&i32, &mut TargetEntry) -> bool) {
        self.0.retain_mut(|(id, entry)| keep(id, entry));
        self.shrink();
    }

    /// Gives back most of the room a stream that lost most of its targets no longer needs.
    fn shrink(&mut self) {
        if self.0.capacity() > 16 && self.0.len() * 4 < self.0.capacity() {
            self.0.shrink_to(self.0.len() * 2);
        }
    }

    fn keys(&self) -> impl Iterator<Item = &i32> {
        self.0.iter().map(|(id, _)| id)
    }

    fn values(&self) -> impl Iterator<Item = &TargetEntry> {
        self.0.iter().map(|(_, entry)| entry)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut TargetEntry> {
        self.0.iter_mut().map(|(_, entry)| entry)
    }

    fn iter(&self) -> impl Iterator<Item = (&i32, &TargetEntry)> {
        self.0.iter().map(|(id, entry)| (id, entry))
    }
}

/// A checkout whose target Firestore removed with a cause: parked until `retry_at`.
#[derive(Debug, Clone)]
struct RefusedTarget {
    /// The target, with its token.
    entry: TargetEntry,
    /// When to send its AddTarget again.
    retry_at: Instant,
}

/// The protocol state of one Listen stream (all its targets), across reconnects.
#[derive(Debug)]
pub(crate) struct StreamState {
    /// `projects/{p}/databases/(default)`, sent on every request.
    database: String,
    /// Targets by the id we chose. Removed targets stay until the server's REMOVE (or reconnect).
    targets: Targets,
    /// The live (not removing) target of each checkout.
    by_checkout: HashMap<CheckoutId, i32>,
    /// The next id to try; ids are never 0 and never reused while in use.
    next_id: i32,
    /// A Listen stream is open and the targets have been sent on it.
    connected: bool,
    /// Minimum time between checkpoints of a target whose only news is a heartbeat token.
    checkpoint_interval: Duration,
    /// The tokens were dropped once after INVALID_ARGUMENT; a second one is permanent.
    retried_without_tokens: bool,
    /// A message arrived on the current session.
    heard_from_server: bool,
    /// AddTargets built on the current session (the first one is the stream's first request).
    session_adds: usize,
    /// Targets the server acknowledged (ADD, or CURRENT without ADD) on the current session.
    session_acks: usize,
    /// [`Action::LiveAddAcknowledged`] was already emitted on the current session.
    live_add_reported: bool,
    /// AddTargets built but not yet stamped with their send time.
    unstamped: Vec<i32>,
    /// Stamped AddTargets in send order (oldest first), pruned lazily once acknowledged.
    awaiting_ack: VecDeque<(Instant, i32)>,
    /// Checkouts Firestore refused, parked until their retry time (they hold no target id).
    refused: HashMap<CheckoutId, RefusedTarget>,
    /// The first and the longest delay before a refused target is asked for again.
    refused_retry: (Duration, Duration),
}

impl StreamState {
    /// An empty, disconnected stream for `database`. A refused target is asked for again after
    /// `refused_retry.0`, doubling with each refusal in a row up to `refused_retry.1`.
    pub(crate) fn new(
        database: String,
        checkpoint_interval: Duration,
        refused_retry: (Duration, Duration),
    ) -> StreamState {
        StreamState {
            database,
            targets: Targets::default(),
            by_checkout: HashMap::new(),
            next_id: 1,
            connected: false,
            checkpoint_interval,
            retried_without_tokens: false,
            heard_from_server: false,
            session_adds: 0,
            session_acks: 0,
            live_add_reported: false,
            unstamped: Vec::new(),
            awaiting_ack: VecDeque::new(),
            refused: HashMap::new(),
            refused_retry,
        }
    }

    /// Checkouts watched by this stream (not counting ones being removed), refused ones included.
    pub(crate) fn len(&self) -> usize {
        self.by_checkout.len() + self.refused.len()
    }

    /// Checkouts Firestore refused, waiting for their retry.
    #[cfg(test)]
    pub(crate) fn refused(&self) -> usize {
        self.refused.len()
    }

    /// Whether a RemoveTarget of ours is not yet answered.
    pub(crate) fn removal_in_flight(&self) -> bool {
        self.targets.values().any(|t| t.removing)
    }

    /// When the earliest refused target is due to be asked for again.
    pub(crate) fn next_refused_retry(&self) -> Option<Instant> {
        self.refused.values().map(|r| r.retry_at).min()
    }

    /// Asks again for every refused target due at `now`: they get fresh ids. Returns the
    /// AddTargets to send if a stream is open (else they go out at the next [`Self::connect`]).
    pub(crate) fn retry_refused(&mut self, now: Instant) -> Vec<ListenRequest> {
        let due: Vec<CheckoutId> = self
            .refused
            .iter()
            .filter(|(_, r)| r.retry_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut requests = Vec::new();
        for checkout_id in due {
            let Some(refused) = self.refused.remove(&checkout_id) else {
                continue;
            };
            let id = self.allocate_id();
            self.by_checkout.insert(checkout_id, id);
            self.targets.insert(id, refused.entry);
            if self.connected {
                requests.push(self.add_request(id));
            }
        }
        requests
    }

    /// Whether a message arrived on the current session (the credentials were accepted).
    pub(crate) fn heard_from_server(&self) -> bool {
        self.heard_from_server
    }

    /// Whether a target of the current session was added with a resume token.
    pub(crate) fn resumed(&self) -> bool {
        self.targets
            .values()
            .any(|t| t.session.as_ref().is_some_and(|s| s.resumed))
    }

    /// Targets sent on this session that the server has not acknowledged with ADD.
    pub(crate) fn unacknowledged(&self) -> usize {
        self.targets
            .values()
            .filter(|t| !t.removing && t.session.as_ref().is_some_and(|s| !s.acked))
            .count()
    }

    /// Whether the tokens were already dropped once after INVALID_ARGUMENT.
    pub(crate) fn retried_without_tokens(&self) -> bool {
        self.retried_without_tokens
    }

    /// Starts watching a checkout. Returns the AddTarget to send if a stream is open.
    /// A checkout already watched here is left as it is.
    #[cfg(test)]
    pub(crate) fn add(&mut self, target: WatchTarget) -> Option<ListenRequest> {
        let document = CollectionPaths::default().document(&target.location);
        self.add_document(target, document)
    }

    /// [`StreamState::add`] with the target's document already made (at `target.location`), its
    /// collection path shared with the pool's: a stream of one checkout would otherwise hold a
    /// collection path of its own.
    pub(crate) fn add_document(
        &mut self,
        target: WatchTarget,
        document: WatchedDocument,
    ) -> Option<ListenRequest> {
        debug_assert!(document.is_at(&target.location));
        if self.by_checkout.contains_key(&target.checkout_id)
            || self.refused.contains_key(&target.checkout_id)
        {
            return None;
        }
        let id = self.allocate_id();
        let entry = TargetEntry {
            checkout_id: target.checkout_id.clone(),
            document,
            resume_token: target
                .resume_token
                .filter(|t| !t.is_empty())
                .map(Token::from),
            exists: None,
            seen_through: target.resume_read_time,
            last_checkpoint: None,
            session: None,
            removing: false,
            refusals: 0,
        };
        self.by_checkout.insert(target.checkout_id, id);
        self.targets.insert(id, entry);
        if self.connected {
            Some(self.add_request(id))
        } else {
            None
        }
    }

    /// Stops watching a checkout. Returns the RemoveTarget to send if a stream is open.
    pub(crate) fn remove(&mut self, checkout_id: &CheckoutId) -> Option<ListenRequest> {
        if self.refused.remove(checkout_id).is_some() {
            return None;
        }
        let id = self.by_checkout.remove(checkout_id)?;
        let sent = self.targets.get(&id).is_some_and(|t| t.session.is_some());
        if self.connected && sent {
            if let Some(entry) = self.targets.get_mut(&id) {
                entry.removing = true;
            }
            Some(self.request(listen_request::TargetChange::RemoveTarget(id)))
        } else {
            self.targets.remove(&id);
            None
        }
    }

    /// A new stream session is opening: every target is (re)added, with its token if it has one.
    pub(crate) fn connect(&mut self) -> Vec<ListenRequest> {
        // Targets being removed are gone with the old stream: their ids are free again.
        self.targets.retain(|_, t| !t.removing);
        self.connected = true;
        self.heard_from_server = false;
        self.reset_session_counters();
        let ids: Vec<i32> = self.targets.keys().copied().collect();
        ids.into_iter().map(|id| self.add_request(id)).collect()
    }

    /// The stream closed: tokens not adopted at a snapshot are dropped with the session.
    pub(crate) fn disconnect(&mut self) {
        self.connected = false;
        self.reset_session_counters();
        self.targets.retain(|_, t| !t.removing);
        for target in self.targets.values_mut() {
            target.session = None;
        }
    }

    fn reset_session_counters(&mut self) {
        self.session_adds = 0;
        self.session_acks = 0;
        self.live_add_reported = false;
        self.unstamped.clear();
        self.awaiting_ack.clear();
    }

    /// The AddTargets built since the last call have been sent at `now`: their ack clocks start.
    pub(crate) fn note_sent(&mut self, now: Instant) {
        for id in self.unstamped.drain(..) {
            if let Some(session) = self.targets.get_mut(&id).and_then(|t| t.session.as_mut())
                && session.sent_at.is_none()
            {
                session.sent_at = Some(now);
                self.awaiting_ack.push_back((now, id));
            }
        }
    }

    /// Whether `id` is a live target of this session, sent at `sent_at`, still unacknowledged.
    fn still_awaiting(&self, id: i32, sent_at: Instant) -> bool {
        self.targets.get(&id).is_some_and(|t| {
            !t.removing
                && t.session
                    .as_ref()
                    .is_some_and(|s| !s.acked && s.sent_at == Some(sent_at))
        })
    }

    /// When the oldest unacknowledged AddTarget runs out of `timeout`, if the server has shown on
    /// this session that it answers (acknowledged some target). None: nothing to watch for.
    pub(crate) fn next_ack_deadline(&mut self, timeout: Duration) -> Option<Instant> {
        if !self.connected || self.session_acks == 0 {
            return None;
        }
        while let Some(&(sent_at, id)) = self.awaiting_ack.front() {
            if self.still_awaiting(id, sent_at) {
                return Some(sent_at + timeout);
            }
            self.awaiting_ack.pop_front();
        }
        None
    }

    /// Takes off this stream every target whose ADD has not come within `timeout` although the
    /// server acknowledged another target on this session, for the pool to watch elsewhere.
    ///
    /// Returns the targets (with their resume tokens) and the RemoveTargets to send: the server
    /// may have the target after all (a slow ADD), so it is removed properly and its id stays
    /// reserved until the server's REMOVE or the next session, never reused before. A server that
    /// ignores the RemoveTarget too leaves only that reserved id behind, dropped at reconnect.
    pub(crate) fn take_unacknowledged(
        &mut self,
        now: Instant,
        timeout: Duration,
    ) -> (Vec<WatchTarget>, Vec<ListenRequest>) {
        let mut moved = Vec::new();
        let mut requests = Vec::new();
        if !self.connected || self.session_acks == 0 {
            return (moved, requests);
        }
        while let Some(&(sent_at, id)) = self.awaiting_ack.front() {
            if !self.still_awaiting(id, sent_at) {
                self.awaiting_ack.pop_front();
                continue;
            }
            if sent_at + timeout > now {
                break;
            }
            self.awaiting_ack.pop_front();
            let Some(entry) = self.targets.get_mut(&id) else {
                continue;
            };
            entry.removing = true;
            self.by_checkout.remove(&entry.checkout_id);
            moved.push(WatchTarget {
                checkout_id: entry.checkout_id.clone(),
                location: entry.document.location(),
                resume_token: entry.resume_token.as_deref().map(<[u8]>::to_vec),
                resume_read_time: entry.seen_through,
            });
            requests.push(self.request(listen_request::TargetChange::RemoveTarget(id)));
        }
        (moved, requests)
    }

    /// After INVALID_ARGUMENT on a resumed stream: drop every token (the next session re-adds
    /// every target without one, so each is verified again).
    pub(crate) fn forget_all_tokens(&mut self, out: &mut Vec<Action>) {
        self.retried_without_tokens = true;
        for target in self.targets.values_mut() {
            if target.resume_token.take().is_some() {
                out.push(Action::Emit(ListenEvent::ForgetToken(
                    target.checkout_id.clone(),
                )));
            }
        }
    }

    /// Feeds one response. Events and requests are appended to `out` in the order they must be
    /// carried out. An error means the stream must be closed (after the actions in `out`).
    pub(crate) fn on_response(
        &mut self,
        response: ListenResponse,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), Fault> {
        self.heard_from_server = true;
        let Some(response) = response.response_type else {
            tracing::debug!("listen response without a type; ignored");
            return Ok(());
        };
        match response {
            listen_response::ResponseType::TargetChange(change) => {
                self.on_target_change(change, now, out)
            }
            listen_response::ResponseType::DocumentChange(change) => {
                let changed_at = change
                    .document
                    .as_ref()
                    .and_then(|d| d.update_time.as_ref())
                    .and_then(to_datetime);
                let name = change.document.map(|d| d.name).unwrap_or_default();
                for id in change.target_ids.iter() {
                    self.document_event(*id, &name, Some(true), changed_at, now, out);
                }
                for id in change.removed_target_ids.iter() {
                    if !change.target_ids.contains(id) {
                        self.document_event(*id, &name, Some(false), changed_at, now, out);
                    }
                }
                if change.target_ids.is_empty() && change.removed_target_ids.is_empty() {
                    self.document_event_by_name(&name, Some(true), changed_at, now, out);
                }
                Ok(())
            }
            listen_response::ResponseType::DocumentDelete(delete) => {
                let at = delete.read_time.as_ref().and_then(to_datetime);
                self.removal(&delete.document, &delete.removed_target_ids, at, now, out);
                Ok(())
            }
            listen_response::ResponseType::DocumentRemove(remove) => {
                let at = remove.read_time.as_ref().and_then(to_datetime);
                self.removal(&remove.document, &remove.removed_target_ids, at, now, out);
                Ok(())
            }
            listen_response::ResponseType::Filter(filter) => {
                self.on_filter(filter.target_id, filter.count, now, out);
                Ok(())
            }
        }
    }

    fn removal(
        &mut self,
        name: &str,
        ids: &[i32],
        at: Option<DateTime<Utc>>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if ids.is_empty() {
            self.document_event_by_name(name, Some(false), at, now, out);
        } else {
            for id in ids {
                self.document_event(*id, name, Some(false), at, now, out);
            }
        }
    }

    fn document_event_by_name(
        &mut self,
        name: &str,
        exists: Option<bool>,
        changed_at: Option<DateTime<Utc>>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let ids: Vec<i32> = self
            .targets
            .iter()
            .filter(|(_, t)| t.document.is_named(name))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            tracing::debug!(document = %printable(name), "document event for no target; ignored");
        }
        for id in ids {
            self.document_event(id, name, exists, changed_at, now, out);
        }
    }

    fn document_event(
        &mut self,
        id: i32,
        name: &str,
        exists: Option<bool>,
        changed_at: Option<DateTime<Utc>>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(target) = self.targets.get_mut(&id) else {
            tracing::debug!(
                target_id = id,
                "document event for an unknown target; ignored"
            );
            return;
        };
        if target.removing {
            return;
        }
        if !name.is_empty() && !target.document.is_named(name) {
            // Not expected for a one-document target; verify anyway, it costs one Get Checkout.
            tracing::debug!(target_id = id, document = %printable(name), "document event names another document");
        }
        let already_seen = exists == Some(true)
            && target.exists != Some(false)
            && changed_at.is_some()
            && changed_at <= target.seen_through;
        target.exists = exists;
        if let Some(session) = target.session.as_mut() {
            session.verify_at_current = false;
            session.dirty = true;
        }
        if already_seen {
            // Resent, not changed: this version was reported before the snapshot this target
            // was last CURRENT in (a full resend after the token expired costs no Get
            // Checkout for the documents that did not change).
            tracing::trace!(
                target_id = id,
                "document resent unchanged; not verified again"
            );
            return;
        }
        out.push(changed(&target.checkout_id, now, changed_at));
    }

    fn on_filter(&mut self, id: i32, count: i32, now: Instant, out: &mut Vec<Action>) {
        let Some(target) = self.targets.get_mut(&id) else {
            tracing::debug!(
                target_id = id,
                "existence filter for an unknown target; ignored"
            );
            return;
        };
        if target.removing {
            return;
        }
        let server_exists = count > 0;
        // An unknown local state with count 1 is consistent: a changed document would have been
        // sent before the filter. Count 0 with an unknown state may hide a delete: verify.
        let mismatch = match target.exists {
            Some(known) => known != server_exists,
            None => !server_exists,
        };
        if !mismatch {
            return;
        }
        tracing::debug!(target_id = id, count, "existence filter mismatch");
        if target.resume_token.take().is_some() {
            out.push(Action::Emit(ListenEvent::ForgetToken(
                target.checkout_id.clone(),
            )));
        }
        target.exists = Some(server_exists);
        if let Some(session) = target.session.as_mut() {
            session.pending_token = None;
            session.verify_at_current = false;
            session.dirty = true;
        }
        out.push(changed(&target.checkout_id, now, None));
    }

    fn on_target_change(
        &mut self,
        change: TargetChange,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), Fault> {
        let kind = TargetChangeType::try_from(change.target_change_type);
        // One allocation per response, shared by every target it applies to.
        let token = (!change.resume_token.is_empty()).then(|| Token::from(change.resume_token));
        match kind {
            Ok(TargetChangeType::NoChange) => {
                if change.target_ids.is_empty() {
                    if token.is_some() {
                        out.push(Action::ResetBackoff);
                    }
                    for target in self.targets.values_mut() {
                        if let (Some(session), Some(token)) = (target.session.as_mut(), &token)
                            && session.acked
                        {
                            session.pending_token = Some(Token::clone(token));
                        }
                    }
                    if let Some(read_time) = change.read_time.as_ref() {
                        self.snapshot(to_datetime(read_time), now, out);
                    }
                } else {
                    self.apply_token(&change.target_ids, token, out);
                }
            }
            Ok(TargetChangeType::Add) => {
                for id in &change.target_ids {
                    match self.targets.get_mut(id).and_then(|t| t.session.as_mut()) {
                        Some(session) => {
                            if !session.acked {
                                session.acked = true;
                                self.session_acks += 1;
                            }
                            if !session.first && !self.live_add_reported {
                                self.live_add_reported = true;
                                out.push(Action::LiveAddAcknowledged);
                            }
                        }
                        None => tracing::debug!(target_id = id, "ADD for an unknown target"),
                    }
                }
                self.apply_token(&change.target_ids, token, out);
            }
            Ok(TargetChangeType::Current) => {
                let ids = self.ids_or_all(&change.target_ids);
                for id in &ids {
                    let Some(target) = self.targets.get_mut(id) else {
                        continue;
                    };
                    if target.removing {
                        continue;
                    }
                    let Some(session) = target.session.as_mut() else {
                        continue;
                    };
                    // Tolerated: CURRENT before ADD (the ADD was lost or never sent).
                    if !session.acked {
                        session.acked = true;
                        self.session_acks += 1;
                    }
                    if !session.current {
                        session.current = true;
                        session.dirty = true;
                    }
                    if target.refusals > 0 {
                        target.refusals = 0;
                        out.push(Action::Emit(ListenEvent::TargetRecovered {
                            checkout_id: target.checkout_id.clone(),
                        }));
                    }
                    if session.verify_at_current {
                        session.verify_at_current = false;
                        // CURRENT without the document: it does not exist (note 1.5 item 2).
                        if target.exists.is_none() {
                            target.exists = Some(false);
                        }
                        out.push(changed(&target.checkout_id, now, None));
                    }
                }
                out.push(Action::ResetBackoff);
                self.apply_token(&ids, token, out);
                // A CURRENT with empty target ids and a read time is a consistent snapshot too.
                if change.target_ids.is_empty()
                    && let Some(read_time) = change.read_time.as_ref()
                {
                    self.snapshot(to_datetime(read_time), now, out);
                }
            }
            Ok(TargetChangeType::Reset) => {
                for id in self.ids_or_all(&change.target_ids) {
                    let Some(target) = self.targets.get_mut(&id) else {
                        continue;
                    };
                    if target.removing {
                        continue;
                    }
                    if target.resume_token.take().is_some() {
                        out.push(Action::Emit(ListenEvent::ForgetToken(
                            target.checkout_id.clone(),
                        )));
                    }
                    target.exists = None;
                    if let Some(session) = target.session.as_mut() {
                        session.current = false;
                        session.pending_token = None;
                        session.verify_at_current = true;
                        session.dirty = true;
                    }
                }
            }
            Ok(TargetChangeType::Remove) => {
                return self.on_remove(&change.target_ids, change.cause, now, out);
            }
            Err(_) => {
                tracing::debug!(
                    kind = change.target_change_type,
                    "unknown target change type; ignored"
                );
            }
        }
        Ok(())
    }

    /// A token sent for explicit targets: kept until the next snapshot adopts it.
    fn apply_token(&mut self, ids: &[i32], token: Option<Token>, out: &mut Vec<Action>) {
        let Some(token) = token else { return };
        let mut applied = false;
        for id in ids {
            if let Some(session) = self.targets.get_mut(id).and_then(|t| t.session.as_mut()) {
                session.pending_token = Some(Token::clone(&token));
                applied = true;
            }
        }
        if applied {
            out.push(Action::ResetBackoff);
        }
    }

    /// The given ids, or every target sent on this session when the list is empty.
    fn ids_or_all(&self, ids: &[i32]) -> Vec<i32> {
        if ids.is_empty() {
            self.targets
                .iter()
                .filter(|(_, t)| t.session.as_ref().is_some_and(|s| s.acked))
                .map(|(id, _)| *id)
                .collect()
        } else {
            ids.to_vec()
        }
    }

    /// A global consistent snapshot: adopt tokens of CURRENT targets and offer them.
    fn snapshot(&mut self, read_time: Option<DateTime<Utc>>, now: Instant, out: &mut Vec<Action>) {
        let mut tokens = Vec::new();
        // Checkpointed at or before this instant: due again. One subtraction per snapshot, not
        // one per target (a snapshot looks at every target of the stream).
        let due_before = now.checked_sub(self.checkpoint_interval);
        for target in self.targets.values_mut() {
            if target.removing {
                continue;
            }
            let Some(session) = target.session.as_mut() else {
                continue;
            };
            if !session.current {
                continue;
            }
            let Some(token) = session.pending_token.take() else {
                continue;
            };
            let due = session.dirty
                || target
                    .last_checkpoint
                    .is_none_or(|at| due_before.is_some_and(|due_before| at <= due_before));
            if due {
                session.dirty = false;
                target.last_checkpoint = Some(now);
                tokens.push((target.checkout_id.clone(), token.to_vec()));
            }
            target.resume_token = Some(token);
            if read_time.is_some() {
                target.seen_through = read_time;
            }
        }
        // A healthy snapshot: INVALID_ARGUMENT from now on is a new problem.
        self.retried_without_tokens = false;
        if !tokens.is_empty() {
            out.push(Action::Emit(ListenEvent::Checkpoint { tokens, read_time }));
        }
    }

    fn on_remove(
        &mut self,
        ids: &[i32],
        cause: Option<gcloud_sdk::google::rpc::Status>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), Fault> {
        let cause = cause.filter(|c| c.code != 0);
        for id in self.ids_or_all(ids) {
            let Some(target) = self.targets.get(&id) else {
                tracing::debug!(target_id = id, "REMOVE for an unknown target");
                continue;
            };
            if target.removing {
                // Our own RemoveTarget, acknowledged: the id is free.
                self.targets.remove(&id);
                continue;
            }
            let Some(cause) = cause.as_ref() else {
                return Err(Fault::Transient(format!(
                    "the server removed target {id} without a cause"
                )));
            };
            let code = Code::from_i32(cause.code);
            let resumed = target.session.as_ref().is_some_and(|s| s.resumed);
            match code {
                Code::InvalidArgument | Code::FailedPrecondition if resumed => {
                    // The token was refused: re-add the target without it (new id), verify.
                    let Some(mut entry) = self.targets.remove(&id) else {
                        continue;
                    };
                    if entry.resume_token.take().is_some() {
                        out.push(Action::Emit(ListenEvent::ForgetToken(
                            entry.checkout_id.clone(),
                        )));
                    }
                    entry.session = None;
                    let new_id = self.allocate_id();
                    self.by_checkout.insert(entry.checkout_id.clone(), new_id);
                    self.targets.insert(new_id, entry);
                    let request = self.add_request(new_id);
                    out.push(Action::Send(Box::new(request)));
                }
                Code::PermissionDenied
                | Code::Unauthenticated
                | Code::NotFound
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Unimplemented => {
                    // Firestore refuses this one document (security rules, IAM conditions, a
                    // name it cannot serve): park it; the stream and its other targets go on.
                    self.refuse(id, code, &cause.message, now, out);
                }
                _ => {
                    return Err(Fault::Transient(format!(
                        "the server removed target {id}: {}: {}",
                        code_name(code),
                        printable(&cause.message)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Parks target `id` as refused and reports it; its id is free (the server removed it).
    fn refuse(&mut self, id: i32, code: Code, message: &str, now: Instant, out: &mut Vec<Action>) {
        let Some(mut entry) = self.targets.remove(&id) else {
            return;
        };
        self.by_checkout.remove(&entry.checkout_id);
        entry.session = None;
        entry.refusals = entry.refusals.saturating_add(1);
        let (initial, max) = self.refused_retry;
        let doublings = entry.refusals.saturating_sub(1).min(16);
        let retry_in = initial.saturating_mul(1 << doublings).min(max);
        out.push(Action::Emit(ListenEvent::TargetRefused {
            checkout_id: entry.checkout_id.clone(),
            document: entry.document.document_name(),
            code: code_name(code),
            message: printable(message),
            refusals: entry.refusals,
            retry_in,
        }));
        self.refused.insert(
            entry.checkout_id.clone(),
            RefusedTarget {
                entry,
                retry_at: now + retry_in,
            },
        );
    }

    fn allocate_id(&mut self) -> i32 {
        // Bounded: there are fewer targets than ids, so a free id turns up.
        loop {
            let id = self.next_id;
            self.next_id = if self.next_id == i32::MAX {
                1
            } else {
                self.next_id + 1
            };
            if !self.targets.contains_key(&id) {
                return id;
            }
        }
    }

    /// Marks `id` as sent on this session and builds its AddTarget.
    fn add_request(&mut self, id: i32) -> ListenRequest {
        let (document, token) = match self.targets.get_mut(&id) {
            Some(target) => {
                target.session = Some(Session {
                    resumed: target.resume_token.is_some(),
                    verify_at_current: target.resume_token.is_none(),
                    first: self.session_adds == 0,
                    ..Session::default()
                });
                self.session_adds += 1;
                self.unstamped.push(id);
                (
                    target.document.document_name(),
                    target.resume_token.as_deref().map(<[u8]>::to_vec),
                )
            }
            None => (String::new(), None),
        };
        self.request(listen_request::TargetChange::AddTarget(Target {
            target_id: id,
            once: false,
            expected_count: None,
            target_type: Some(target::TargetType::Documents(target::DocumentsTarget {
                documents: vec![document],
            })),
            resume_type: token.map(target::ResumeType::ResumeToken),
        }))
    }

    fn request(&self, change: listen_request::TargetChange) -> ListenRequest {
        ListenRequest {
            database: self.database.clone(),
            labels: Default::default(),
            request_options: None,
            target_change: Some(change),
        }
    }
}

fn changed(checkout_id: &CheckoutId, now: Instant, changed_at: Option<DateTime<Utc>>) -> Action {
    Action::Emit(ListenEvent::Changed(Nudge {
        checkout_id: checkout_id.clone(),
        source: Source::Firestore,
        seen_at: now,
        changed_at,
        seen_after: None,
        ticket: None,
    }))
}

/// A one-line description of a response for debug logs (never the document's fields).
pub(crate) fn summary(response: &ListenResponse) -> String {
    match &response.response_type {
        Some(listen_response::ResponseType::TargetChange(c)) => format!(
            "{} {:?} token={}B read_time={}",
            TargetChangeType::try_from(c.target_change_type)
                .map(|t| t.as_str_name())
                .unwrap_or("UNKNOWN"),
            c.target_ids,
            c.resume_token.len(),
            c.read_time.is_some()
        ),
        Some(listen_response::ResponseType::DocumentChange(c)) => format!(
            "DocumentChange {} targets={:?} removed={:?}",
            printable(c.document.as_ref().map(|d| d.name.as_str()).unwrap_or("")),
            c.target_ids,
            c.removed_target_ids
        ),
        Some(listen_response::ResponseType::DocumentDelete(d)) => format!(
            "DocumentDelete {} removed={:?}",
            printable(&d.document),
            d.removed_target_ids
        ),
        Some(listen_response::ResponseType::DocumentRemove(d)) => format!(
            "DocumentRemove {} removed={:?}",
            printable(&d.document),
            d.removed_target_ids
        ),
        Some(listen_response::ResponseType::Filter(f)) => {
            format!("ExistenceFilter target={} count={}", f.target_id, f.count)
        }
        None => "empty".to_owned(),
    }
}

/// A protobuf timestamp as UTC, None when out of range.
pub(crate) fn to_datetime(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

#[cfg(test)]
pub(super) mod tests;
