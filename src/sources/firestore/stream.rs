//! One Listen stream: a task that opens it, feeds its [`StreamState`], and reopens it.
//!
//! The task owns the stream's targets across reconnects. It takes commands (add, remove,
//! close) from the pool, sends the state machine's requests on the open stream, and sends its
//! events on the listener's channel in order (waiting when the channel is full, which in turn
//! stops reading the stream: gRPC flow control pushes back to the server).
//!
//! Reconnects: backoff with jitter (see `backoff.rs`); RESOURCE_EXHAUSTED and permanent
//! failures wait the maximum; INVALID_ARGUMENT on a resumed stream drops the tokens and retries
//! at once, a second time is permanent; UNAUTHENTICATED / PERMISSION_DENIED on a stream that
//! was healthy is retried quietly a few times (an access token may have expired) before it is
//! reported. A stream with no message for `idle_timeout` is reopened.
//!
//! Opening: a listener opens at most `OPENS_AT_ONCE` calls at a time (see `shared.rs`); a task
//! waits for a permit before it connects and holds it until its call is answered.
//!
//! Memory: in per-document mode every watched checkout has a task, so what a task holds for as
//! long as it lives is kept small (its future, its two channels, its call's buffers); what lives
//! only while a step runs (opening the call, handling a response, a send waiting on a full
//! channel) is boxed for that time.
//!
//! Refused targets (a `REMOVE` with a cause for one document) are parked by the state machine;
//! this task asks for them again when their (long) retry time comes, on the open stream.
//!
//! Unacknowledged targets (multiplexed mode): a target whose `ADD` has not come `add_ack_timeout`
//! after its AddTarget went out, while the server did acknowledge another target on the same
//! session and the stream has been quiet for `add_ack_timeout` too (a backlog still being
//! delivered is not silence), is removed from the stream and handed back to the pool, which
//! watches it on a fresh stream (see `pool.rs`). Production acknowledges every AddTarget within
//! moments, so this never fires there; the npm emulator reads only the first request of a stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::channel::mpsc;
use gcloud_sdk::google::firestore::v1::{ListenRequest, ListenResponse};
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};

use super::backoff::Backoff;
use super::listen::{ListenEvent, WatchTarget};
use super::shared::{Connection, Context, DatabaseShared};
use super::state::{
    AUTH_RETRIES, Action, Disposition, Fault, StreamHistory, StreamState, classify, code_name,
    permanent_message, summary,
};
use crate::domain::{CheckoutId, WatchedDocument, printable};
use crate::settings::StreamMode;

/// How long a Listen call may go without its response headers before it is abandoned and opened
/// again (at most `idle_timeout`). Firestore answers at once; a call left unanswered (a half-open
/// connection, an overloaded emulator) must not hold its checkouts unwatched for a whole idle
/// timeout.
const LISTEN_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands targets a stream took off (never acknowledged by the server) back to whoever placed
/// them: `(database, stream key, targets)`. Given by the pool, so this module needs no pool.
pub(crate) type Relocate = Arc<dyn Fn(&str, u64, Vec<WatchTarget>) + Send + Sync>;

/// What the pool asks of a stream task.
///
/// Small on purpose: each command queued is one allocation of its size.
#[derive(Debug)]
pub(crate) enum StreamCommand {
    /// Watch this checkout on this stream; its document, made by the pool, shares the pool's
    /// collection path.
    Add(Box<(WatchTarget, WatchedDocument)>),
    /// Stop watching it.
    Remove(CheckoutId),
    /// The stream has no targets left: end the task.
    Close,
}

/// How a session (one opened stream) ended.
enum SessionEnd {
    /// Reopen after this delay (something went wrong).
    Retry(Duration, String),
    /// Reopen at once, as planned (new credentials): nothing went wrong.
    Reopen(String),
    /// End the task (cancelled, closed, or the daemon dropped the event receiver).
    Stop,
}

/// Counts a stream against its connection for as long as the task lives.
struct ConnectionLease(Arc<Connection>);

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts an open session in [`Context::open_streams`].
struct OpenGuard<'a>(&'a Context);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The task of one Listen stream.
pub(crate) struct StreamTask {
    /// The listener's shared parts (options, connector, events channel, cancel token).
    pub(crate) context: Arc<Context>,
    /// The database's shared parts (its name, its permanent-failure flag).
    pub(crate) database: Arc<DatabaseShared>,
    /// The connection this stream uses (already counted by the pool).
    pub(crate) connection: Arc<Connection>,
    /// This stream's number, for logs.
    pub(crate) key: u64,
    /// Commands from the pool (see [`command_channel`]).
    pub(crate) commands: mpsc::UnboundedReceiver<StreamCommand>,
    /// Where targets the server never acknowledged go.
    pub(crate) relocate: Relocate,
}

impl StreamTask {
    /// Runs until cancelled or closed.
    pub(crate) async fn run(self) {
        let StreamTask {
            context,
            database,
            connection,
            key,
            mut commands,
            relocate,
        } = self;
        let _lease = ConnectionLease(Arc::clone(&connection));
        let _clock = context
            .options
            .metrics
            .listen_stream(&database.project, key);
        let options = &context.options;
        let mut state = StreamState::new(
            database.database.clone(),
            options.checkpoint_interval,
            (options.refused_retry_initial, options.refused_retry_max),
        );
        let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
        let mut delay = Duration::ZERO;
        let mut auth_retries = 0;
        let session = Session {
            context: &context,
            database: &database,
            connection: &connection,
            key,
            relocate: &relocate,
        };
        loop {
            if !session.wait(delay, &mut state, &mut commands).await {
                break;
            }
            match session
                .run(&mut state, &mut commands, &mut backoff, &mut auth_retries)
                .await
            {
                SessionEnd::Stop => break,
                end @ (SessionEnd::Retry(..) | SessionEnd::Reopen(_)) => {
                    let (next, reason, planned) = match end {
                        SessionEnd::Retry(next, reason) => (next, reason, false),
                        SessionEnd::Reopen(reason) => (Duration::ZERO, reason, true),
                        SessionEnd::Stop => unreachable!("matched above"),
                    };
                    state.disconnect();
                    delay = next;
                    let event = ListenEvent::Disconnected {
                        project: database.project.clone(),
                        stream: key,
                        reason,
                        retry_in: next,
                        planned,
                    };
                    if !session.emit(event).await {
                        break;
                    }
                }
            }
        }
        tracing::debug!(database = %database.database, stream = key, "listen stream task ended");
    }
}

/// A request waiting to be sent on a Listen call. Boxed: the call's channel keeps its last
/// node allocated, with room for one item, for as long as the call is open, and a ListenRequest
/// is large (616 bytes: its target may hold a whole structured query).
type QueuedRequest = Box<ListenRequest>;

/// The channel of a stream task's commands, from the pool.
///
/// futures' unbounded channel rather than tokio's: tokio's allocates its state padded to cache
/// lines and a first block of 32 slots (about 1.3 KiB per channel, for as long as the stream
/// lives), futures' a small state and one node per queued item (about 0.1 KiB). A stream task
/// has two (this one and its call's [`request_channel`]): in per-document mode, one per
/// watched checkout.
pub(crate) fn command_channel() -> (
    mpsc::UnboundedSender<StreamCommand>,
    mpsc::UnboundedReceiver<StreamCommand>,
) {
    mpsc::unbounded()
}

/// The channel of a Listen call's requests (see [`command_channel`] for its kind).
fn request_channel() -> (
    mpsc::UnboundedSender<QueuedRequest>,
    mpsc::UnboundedReceiver<QueuedRequest>,
) {
    mpsc::unbounded()
}

/// A Listen call just opened.
struct Opened {
    /// Where the call's requests go.
    requests: mpsc::UnboundedSender<QueuedRequest>,
    /// The call's responses.
    responses: tonic::codec::Streaming<gcloud_sdk::google::firestore::v1::ListenResponse>,
    /// Targets sent in its first requests.
    targets: usize,
}

/// The borrowed context of a stream task, with the steps of its loop.
struct Session<'a> {
    context: &'a Context,
    database: &'a DatabaseShared,
    connection: &'a Arc<Connection>,
    key: u64,
    relocate: &'a Relocate,
}

impl Session<'_> {
    /// Waits `delay` while applying commands; false when the task must end.
    async fn wait(
        &self,
        delay: Duration,
        state: &mut StreamState,
        commands: &mut mpsc::UnboundedReceiver<StreamCommand>,
    ) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                _ = self.context.cancel.cancelled() => return false,
                command = commands.next() => match command {
                    None | Some(StreamCommand::Close) => return false,
                    Some(StreamCommand::Add(placed)) => {
                        let (target, document) = *placed;
                        state.add_document(target, document);
                    }
                    Some(StreamCommand::Remove(id)) => { state.remove(&id); }
                },
                _ = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    /// Sends an event unless cancelled; false when the task must end.
    ///
    /// Boxed while it waits (a full channel): the send future is large, and the stream task
    /// would otherwise carry its room for as long as it lives.
    async fn emit(&self, event: ListenEvent) -> bool {
        Box::pin(self.emit_now(event)).await
    }

    /// [`Session::emit`], unboxed.
    async fn emit_now(&self, event: ListenEvent) -> bool {
        tokio::select! {
            biased;
            _ = self.context.cancel.cancelled() => false,
            sent = self.context.events.send(event) => sent.is_ok(),
        }
    }

    /// Connects and opens the Listen call with the stream's targets.
    ///
    /// Its own (boxed) future: the connection and the call's futures are large and live only
    /// while opening, so the task does not carry their room while the stream runs.
    async fn open(
        &self,
        state: &mut StreamState,
        backoff: &mut Backoff,
        auth_retries: &mut u32,
    ) -> Result<Opened, SessionEnd> {
        let shared = self.context;
        let project = &self.database.project;
        let idle = shared.options.idle_timeout;
        // Held until the call is answered (see `OPENS_AT_ONCE`). The semaphore is never closed.
        let _permit = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => return Err(SessionEnd::Stop),
            permit = shared.opening.acquire() => permit.ok(),
        };
        let client = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => return Err(SessionEnd::Stop),
            client = self.connection.client(&shared.connector, &self.database.database) => client,
        };
        let mut client = match client {
            Ok(client) => client,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(project = %project, stream = self.key, connection = self.connection.index,
                    retry_in = ?delay, "could not connect to Firestore: {error:#}");
                return Err(SessionEnd::Retry(delay, format!("{error:#}")));
            }
        };

        let (requests, outgoing) = request_channel();
        for request in state.connect() {
            // The receiver is alive: it is moved into the call below.
            let _ = requests.unbounded_send(Box::new(request));
        }
        let outgoing = outgoing.map(|request| *request);
        let targets = state.len();
        tracing::debug!(project = %project, stream = self.key, targets, "opening listen stream");
        let opened = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => return Err(SessionEnd::Stop),
            opened = tokio::time::timeout(idle.min(LISTEN_OPEN_TIMEOUT), client.listen(outgoing)) => opened,
        };
        match opened {
            Err(_) => {
                let delay = backoff.next_delay();
                tracing::warn!(project = %project, stream = self.key, retry_in = ?delay,
                    "Firestore did not answer the listen call within {:?}; opening it again",
                    idle.min(LISTEN_OPEN_TIMEOUT));
                Err(SessionEnd::Retry(
                    delay,
                    "no answer to the listen call".into(),
                ))
            }
            Ok(Err(status)) => Err(self.on_status(status, state, backoff, auth_retries).await),
            Ok(Ok(response)) => Ok(Opened {
                requests,
                responses: response.into_inner(),
                targets,
            }),
        }
    }

    /// Opens the stream, runs it until it ends, and says what next.
    async fn run(
        &self,
        state: &mut StreamState,
        commands: &mut mpsc::UnboundedReceiver<StreamCommand>,
        backoff: &mut Backoff,
        auth_retries: &mut u32,
    ) -> SessionEnd {
        let shared = self.context;
        let project = &self.database.project;
        let idle = shared.options.idle_timeout;
        let Opened {
            requests,
            mut responses,
            targets,
        } = match Box::pin(self.open(state, backoff, auth_retries)).await {
            Ok(opened) => opened,
            Err(end) => return end,
        };
        shared.open_streams.fetch_add(1, Ordering::SeqCst);
        let _open = OpenGuard(shared);
        let _open_metric = shared.options.metrics.listen_stream_open(project);
        tracing::info!(project = %project, stream = self.key, connection = self.connection.index,
            targets, "listen stream open");
        if !self
            .emit(ListenEvent::Connected {
                project: project.clone(),
                stream: self.key,
                targets,
            })
            .await
        {
            return SessionEnd::Stop;
        }

        state.note_sent(std::time::Instant::now());
        // Below the idle timeout, or a silent stream would be reopened before it fires.
        let ack_timeout = shared.options.add_ack_timeout.min(idle / 2);
        let multiplexed = shared.options.mode == StreamMode::Multiplexed;
        let mut deadline = Instant::now() + idle;
        // When the last response was handled: a target counts as unacknowledged only once the
        // stream has also been quiet for the ack timeout, so a stream still delivering a backlog
        // (the daemon busy, flow control holding the server back) never loses targets.
        let mut progress = Instant::now();
        // Renewed credentials (firebase-anonymous): Firestore checks a stream's token when it
        // opens and ends a stream that outlives it, so reopen on the new token (resuming).
        let mut renewed = shared.connector.renewed();
        renewed.borrow_and_update();
        loop {
            let ack_deadline = if multiplexed {
                state
                    .next_ack_deadline(ack_timeout)
                    .map(|at| Instant::from_std(at).max(progress + ack_timeout))
            } else {
                None
            };
            let refused_retry = state.next_refused_retry().map(Instant::from_std);
            // One timer for the three deadlines (a timer is about 100 bytes of the task, per
            // stream, for as long as it lives); which one came is decided when it fires.
            let wake_at = [ack_deadline, refused_retry]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => return SessionEnd::Stop,
                command = commands.next() => {
                    let request = match command {
                        None | Some(StreamCommand::Close) => return SessionEnd::Stop,
                        Some(StreamCommand::Add(placed)) => {
                            let (target, document) = *placed;
                            state.add_document(target, document)
                        }
                        Some(StreamCommand::Remove(id)) => state.remove(&id),
                    };
                    if let Some(request) = request {
                        let _ = requests.unbounded_send(Box::new(request));
                        state.note_sent(std::time::Instant::now());
                    }
                }
                message = responses.message() => {
                    // Boxed while it runs: its locals (a response, a status, the actions and
                    // the sends of their events) would otherwise be room in every stream's task.
                    let handled = Box::pin(self.on_message(message, state, &requests, backoff, auth_retries));
                    if let Some(end) = handled.await {
                        return end;
                    }
                    // Counted after the events were handed over: a full channel is not silence.
                    progress = Instant::now();
                    deadline = progress + idle;
                }
                Ok(()) = renewed.changed() => {
                    tracing::debug!(project = %project, stream = self.key,
                        "the Firebase ID token was renewed; reopening the listen stream on it");
                    return SessionEnd::Reopen("the Firebase ID token was renewed".into());
                }
                _ = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    if ack_deadline.is_some_and(|at| at <= now) {
                        let (moved, removals) = state.take_unacknowledged(std::time::Instant::now(), ack_timeout);
                        for request in removals {
                            let _ = requests.unbounded_send(Box::new(request));
                        }
                        if !moved.is_empty() {
                            tracing::info!(project = %project, stream = self.key, targets = moved.len(),
                                "the server did not acknowledge (ADD) targets added to this stream within \
                                 {ack_timeout:?}; watching them on a fresh stream");
                            (self.relocate)(&self.database.database, self.key, moved);
                        }
                    } else if refused_retry.is_some_and(|at| at <= now) {
                        let requests_due = state.retry_refused(std::time::Instant::now());
                        if !requests_due.is_empty() {
                            tracing::debug!(project = %project, stream = self.key, targets = requests_due.len(),
                                "asking Firestore again for refused documents");
                        }
                        for request in requests_due {
                            let _ = requests.unbounded_send(Box::new(request));
                        }
                        state.note_sent(std::time::Instant::now());
                    } else if deadline <= now {
                        let unacknowledged = state.unacknowledged();
                        if unacknowledged > 0 {
                            tracing::warn!(project = %project, stream = self.key, unacknowledged,
                                "the server never acknowledged (ADD) some targets of this stream");
                        }
                        let delay = backoff.next_delay();
                        tracing::warn!(project = %project, stream = self.key, targets = state.len(),
                            retry_in = ?delay, "listen stream silent for {idle:?}; reopening it");
                        return SessionEnd::Retry(delay, format!("no message for {idle:?}"));
                    }
                }
            }
        }
    }

    /// Handles what the call's response stream gave: a response (its events are emitted, its
    /// requests sent), its end, or an error. `Some` when the session ends.
    async fn on_message(
        &self,
        message: Result<Option<ListenResponse>, Status>,
        state: &mut StreamState,
        requests: &mpsc::UnboundedSender<QueuedRequest>,
        backoff: &mut Backoff,
        auth_retries: &mut u32,
    ) -> Option<SessionEnd> {
        let project = &self.database.project;
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                let delay = backoff.next_delay();
                tracing::info!(project = %project, stream = self.key, retry_in = ?delay,
                    "listen stream ended by the server");
                return Some(SessionEnd::Retry(
                    delay,
                    "the server ended the stream".into(),
                ));
            }
            Err(status) => return Some(self.on_status(status, state, backoff, auth_retries).await),
        };
        self.context.options.metrics.listen_message(self.key);
        tracing::debug!(project = %project, stream = self.key, "listen response: {}", summary(&response));
        if self.database.failed.swap(false, Ordering::SeqCst) {
            tracing::info!(database = %self.database.database, "Firestore accepts this database again");
        }
        let mut actions = Vec::new();
        let fault = state.on_response(response, std::time::Instant::now(), &mut actions);
        for action in actions {
            match action {
                Action::Emit(event) => {
                    if !self.emit_now(event).await {
                        return Some(SessionEnd::Stop);
                    }
                }
                Action::Send(request) => {
                    let _ = requests.unbounded_send(request);
                }
                Action::ResetBackoff => backoff.reset(),
                Action::LiveAddAcknowledged => self.database.live_add_acknowledged(),
            }
        }
        state.note_sent(std::time::Instant::now());
        if let Err(fault) = fault {
            return Some(self.on_fault(fault, backoff));
        }
        None
    }

    /// A fault decided by the state machine from a response.
    fn on_fault(&self, fault: Fault, backoff: &mut Backoff) -> SessionEnd {
        match fault {
            Fault::Transient(reason) => {
                let delay = backoff.next_delay();
                tracing::warn!(database = %self.database.database, stream = self.key, retry_in = ?delay,
                    "reopening listen stream: {reason}");
                SessionEnd::Retry(delay, reason)
            }
        }
    }

    /// A status that ended (or refused) the stream.
    async fn on_status(
        &self,
        status: Status,
        state: &mut StreamState,
        backoff: &mut Backoff,
        auth_retries: &mut u32,
    ) -> SessionEnd {
        let code = status.code();
        let message = status.message().to_owned();
        let history = StreamHistory {
            resumed: state.resumed(),
            retried_without_tokens: state.retried_without_tokens(),
            heard_from_server: state.heard_from_server(),
            removal_in_flight: state.removal_in_flight(),
            auth_retries: *auth_retries,
        };
        let disposition = classify(code, &message, &history);
        let reason = format!("{}: {}", code_name(code), printable(&message));
        let database = &self.database.database;
        if disposition != Disposition::AuthRetry && history.heard_from_server {
            *auth_retries = 0;
        }
        match disposition {
            Disposition::Transient => {
                let delay = backoff.next_delay();
                tracing::warn!(database = %database, stream = self.key, targets = state.len(),
                    retry_in = ?delay, "listen stream failed: {reason}");
                SessionEnd::Retry(delay, reason)
            }
            Disposition::AuthRetry => {
                *auth_retries = if history.heard_from_server {
                    1
                } else {
                    *auth_retries + 1
                };
                let delay = backoff.next_delay();
                tracing::warn!(database = %database, stream = self.key, retry_in = ?delay,
                    attempt = *auth_retries, of = AUTH_RETRIES,
                    "Firestore refused the credentials of a stream that was working ({reason}); \
                     an access token may have expired, reopening with fresh credentials");
                SessionEnd::Retry(delay, reason)
            }
            Disposition::Exhausted => {
                let delay = backoff.max_delay();
                tracing::warn!(database = %database, stream = self.key, retry_in = ?delay,
                    "Firestore quota exhausted; backing off: {reason}");
                SessionEnd::Retry(delay, reason)
            }
            Disposition::RetryWithoutTokens => {
                tracing::warn!(database = %database, stream = self.key,
                    "Firestore refused the resume tokens ({reason}); retrying once without them, \
                     which re-verifies every checkout on this stream");
                let mut actions = Vec::new();
                state.forget_all_tokens(&mut actions);
                for action in actions {
                    if let Action::Emit(event) = action
                        && !self.emit(event).await
                    {
                        return SessionEnd::Stop;
                    }
                }
                SessionEnd::Retry(Duration::ZERO, reason)
            }
            Disposition::Permanent => self.permanent(code, &message, backoff).await,
        }
    }

    /// Reports a permanent failure once per database, then retries rarely.
    async fn permanent(&self, code: Code, message: &str, backoff: &mut Backoff) -> SessionEnd {
        let delay = backoff.max_delay();
        let database = &self.database.database;
        let text = permanent_message(database, self.context.connector.endpoint(), code, message);
        if !self.database.failed.swap(true, Ordering::SeqCst) {
            tracing::error!(database = %database, "{text}");
            let event = ListenEvent::PermanentFailure {
                project: self.database.project.clone(),
                message: text,
            };
            if !self.emit(event).await {
                return SessionEnd::Stop;
            }
        } else {
            tracing::debug!(database = %database, stream = self.key, "still refused: {}", code_name(code));
        }
        SessionEnd::Retry(
            delay,
            format!("{}: {}", code_name(code), printable(message)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `start` returns.
    fn future_size<A, F: std::future::Future>(_start: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A per-document stream costs its task's future for as long as it lives: the large,
    /// short-lived parts (connecting, opening the call, handling a response, a send waiting on
    /// a full channel) are boxed while they run, not carried by every task. It was 5,144 bytes,
    /// then 2,040 with the response handling inline; 1,616 now (debug build).
    #[test]
    fn a_stream_task_stays_small() {
        let size = future_size(StreamTask::run);
        assert!(size <= 1700, "the stream task's future is {size} bytes");
    }

    /// A channel keeps its last node, with room for one item, while it lives: items are kept
    /// small (a ListenRequest is 616 bytes and a WatchTarget 144, boxed they are 8).
    #[test]
    fn channel_items_are_small() {
        assert!(std::mem::size_of::<StreamCommand>() <= 32);
        assert!(std::mem::size_of::<QueuedRequest>() <= 8);
    }

    /// A stream's two channels (commands from the pool, requests to its call), with an item
    /// through each as in a stream's life, hold little while they live. Tokio's unbounded
    /// channels held about 1.3 KiB each (state padded to cache lines, a first block of 32
    /// slots): per watched checkout in per-document mode.
    #[test]
    fn a_stream_s_channels_stay_small() {
        let mut channels = None;
        let held = allocation_counter::measure(|| {
            let (commands, mut command_receiver) = command_channel();
            let (requests, mut request_receiver) = request_channel();
            let _ = commands.unbounded_send(StreamCommand::Close);
            let _ = requests.unbounded_send(Box::new(ListenRequest::default()));
            assert!(matches!(
                command_receiver.try_recv(),
                Ok(StreamCommand::Close)
            ));
            assert!(request_receiver.try_recv().is_ok());
            channels = Some((commands, command_receiver, requests, request_receiver));
        });
        assert!(channels.is_some());
        assert!(
            (1..=512).contains(&held.bytes_current),
            "a stream's channels hold {} bytes",
            held.bytes_current
        );
    }

    /// In per-document mode a stream holds one checkout: the document the pool made for it
    /// shares the pool's collection path, where a path of the stream's own (its text) costs
    /// about 190 bytes more per checkout.
    #[test]
    fn a_stream_shares_the_pool_s_collection_path() {
        use crate::domain::{CollectionPaths, FirestoreLocation};
        let location = FirestoreLocation::new("p", "checkouts", "c1").expect("location");
        let target = WatchTarget {
            checkout_id: "c1".parse().expect("checkout id"),
            location: location.clone(),
            resume_token: None,
            resume_read_time: None,
        };
        let document = CollectionPaths::default().document(&location);
        let new_state = || {
            StreamState::new(
                "projects/p/databases/(default)".into(),
                Duration::from_secs(300),
                (Duration::from_secs(1), Duration::from_secs(2)),
            )
        };
        let (mut own, mut shared) = (new_state(), new_state());
        let own_bytes = allocation_counter::measure(|| {
            let own_document = CollectionPaths::default().document(&location);
            own.add_document(target.clone(), own_document);
        })
        .bytes_current;
        let shared_bytes = allocation_counter::measure(|| {
            shared.add_document(target.clone(), document.clone());
        })
        .bytes_current;
        assert!(
            shared_bytes + 150 <= own_bytes,
            "a target added with the pool's document holds {shared_bytes} bytes, with a path of \
             its own {own_bytes}"
        );
    }
}
