//! The built-in Firestore: `google.firestore.v1.Firestore` Listen and GetDocument over the
//! sandbox's [`DocumentStore`], written by hand over gcloud-sdk's prost types.
//!
//! Owns: the gRPC service (routing by path, as tonic-build's server stubs would; gcloud-sdk only
//! generates clients), one task per Listen stream, the Listen wire sequences, resume tokens, the
//! heartbeat, and the record of call headers seen.
//! Must never: change a document. Callers are checked by [`crate::sandbox::auth`] (`open`
//! accepts any or no `authorization`, like an emulator; `rules` and `iam` check as production
//! does, and a stream outliving its caller's token ends UNAUTHENTICATED).
//!
//! # Behaviour, and the choices where production is not documented
//!
//! As the official server SDKs' watch code expects the service to answer; for each `AddTarget` of
//! a documents target:
//! `TargetChange{ADD,[id]}`, a `DocumentChange` per existing document, `TargetChange{CURRENT,[id],
//! token, read_time}`, then a global `TargetChange{NO_CHANGE,[], token, read_time}`. A missing
//! document sends nothing (no `DocumentDelete`). After a commit: `DocumentChange` (or
//! `DocumentDelete{removed_target_ids}`) to every target watching the document, then a global
//! marker. A heartbeat marker goes out every `heartbeat_interval` while the stream has targets.
//! With a resume token or `read_time`, only documents changed after that point are sent (a delete
//! in the gap comes as `DocumentDelete`). Writes between two wake-ups are coalesced, as Firestore
//! does: the latest state of the document is sent once.
//!
//! Errors that end the stream:
//! - `database` malformed: INVALID_ARGUMENT; well-formed but not this sandbox's
//!   `projects/<project>/databases/(default)`: NOT_FOUND (what Firestore answers for a database
//!   that does not exist). Checked on every request.
//! - a document name not under `database`, or not `.../documents/<collection>/<id>[/...]`:
//!   INVALID_ARGUMENT; an empty documents target or a target with neither documents nor query:
//!   INVALID_ARGUMENT.
//! - a duplicate active target id or a negative one: INVALID_ARGUMENT; `RemoveTarget` of an id
//!   that is not active: NOT_FOUND.
//! - an undecodable resume token, one from another sandbox run, or one from the future:
//!   INVALID_ARGUMENT (the `firestore` crate then drops its tokens and retries once).
//! - shutdown, or [`crate::sandbox::faults::Faults::close_listen_streams`]: UNAVAILABLE.
//!
//! A resume token older than the `resume_token_max_age_ms` fault resumes nothing: the target
//! gets its full state, as a fresh target would (Firestore's answer to a token from before a
//! long disconnect); [`FirestoreService::full_resends`] counts them.
//!
//! With `rules` requiring sign-in, a caller without an ID token gets its Listen stream, and
//! every target it adds is removed with a PERMISSION_DENIED cause (as Firestore does); only
//! GetDocument, a single call, is refused outright.
//!
//! A target naming a document listed in the `refuse_listen_documents` fault is answered with
//! `REMOVE` carrying PERMISSION_DENIED ("Missing or insufficient permissions.", Firestore's
//! words for a security-rules denial); the stream and its other targets carry on.
//!
//! `target_id` 0 is supported: the server assigns the lowest free id and reports it in `ADD`;
//! afterwards a non-zero id is answered with `REMOVE` carrying an INVALID_ARGUMENT cause, as the
//! proto says. Query targets are answered with `REMOVE` carrying an UNIMPLEMENTED cause (other
//! targets on the stream carry on). `once: true` ends the target with `REMOVE` after `CURRENT`.
//! A client that half-closes its request stream keeps receiving changes until it hangs up.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use gcloud_sdk::google::firestore::v1::listen_request::TargetChange as RequestedChange;
use gcloud_sdk::google::firestore::v1::listen_response::ResponseType;
use gcloud_sdk::google::firestore::v1::target::{ResumeType, TargetType};
use gcloud_sdk::google::firestore::v1::target_change::TargetChangeType;
use gcloud_sdk::google::firestore::v1::{
    Document, DocumentChange, DocumentDelete, GetDocumentRequest, ListenRequest, ListenResponse,
    Target, TargetChange,
};
use gcloud_sdk::google::rpc::Status as RpcStatus;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::Service;
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::sandbox::auth::{Admitted, CallerCheck, PERMISSION_DENIED_MESSAGE};
use crate::sandbox::documents::{
    DocumentStore, ResumePoint, StoreView, micros_from_timestamp, timestamp_from_micros,
};
use crate::sandbox::faults::Faults;

/// The gRPC path of Listen.
const LISTEN_PATH: &str = "/google.firestore.v1.Firestore/Listen";
/// The gRPC path of GetDocument.
const GET_DOCUMENT_PATH: &str = "/google.firestore.v1.Firestore/GetDocument";
/// How many call-header records are kept (oldest dropped first).
const HEADERS_KEPT: usize = 1024;
/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 256;

/// Headers of one call to the built-in Firestore, kept for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenHeaders {
    /// `"Listen"` or `"GetDocument"`.
    pub method: &'static str,
    /// The `google-cloud-resource-prefix` header, if sent.
    pub resource_prefix: Option<String>,
    /// The `authorization` header, if sent (checked only in `rules` and `iam` modes).
    pub authorization: Option<String>,
    /// The `x-goog-api-key` header (the Firebase Web API key), if sent.
    pub api_key: Option<String>,
}

/// The record of call headers, shared by the service and the sandbox handle.
#[derive(Debug, Clone, Default)]
pub struct HeadersLog {
    seen: Arc<Mutex<VecDeque<SeenHeaders>>>,
}

impl HeadersLog {
    fn record(&self, headers: SeenHeaders) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.len() == HEADERS_KEPT {
            seen.pop_front();
        }
        seen.push_back(headers);
    }

    /// Every record kept, oldest first.
    pub fn all(&self) -> Vec<SeenHeaders> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Settings of the built-in Firestore.
#[derive(Debug, Clone)]
pub struct FirestoreConfig {
    /// The only project served; the database is always `(default)`.
    pub project_id: String,
    /// How often an idle stream gets a global NO_CHANGE marker with a fresh token.
    pub heartbeat_interval: Duration,
    /// The collection of checkout documents (what `rules` lets callers read).
    pub collection: String,
}

/// The `google.firestore.v1.Firestore` service: give it to `tonic::transport::Server`.
#[derive(Clone)]
pub struct FirestoreService {
    inner: Arc<ServiceInner>,
}

struct ServiceInner {
    store: Arc<DocumentStore>,
    /// `projects/<project>/databases/(default)`.
    database: String,
    heartbeat_interval: Duration,
    /// `<database>/documents/<collection>/`: the prefix of readable documents under `rules`.
    readable_prefix: String,
    caller: Arc<CallerCheck>,
    faults: Faults,
    headers: HeadersLog,
    /// Ends every stream (UNAVAILABLE) when cancelled.
    shutdown: CancellationToken,
    /// The stream tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Numbers streams in the logs.
    next_stream: AtomicU64,
    /// Targets whose resume token was too old, answered with their full state.
    full_resends: AtomicU64,
}

impl FirestoreService {
    /// A service over `store`. Streams end when `shutdown` is cancelled.
    pub fn new(
        config: FirestoreConfig,
        store: Arc<DocumentStore>,
        faults: Faults,
        headers: HeadersLog,
        caller: Arc<CallerCheck>,
        shutdown: CancellationToken,
    ) -> FirestoreService {
        let database = format!("projects/{}/databases/(default)", config.project_id);
        FirestoreService {
            inner: Arc::new(ServiceInner {
                store,
                readable_prefix: format!("{database}/documents/{}/", config.collection),
                database,
                heartbeat_interval: config.heartbeat_interval,
                caller,
                faults,
                headers,
                shutdown,
                tasks: TaskTracker::new(),
                next_stream: AtomicU64::new(1),
                full_resends: AtomicU64::new(0),
            }),
        }
    }

    /// Targets added with a resume token older than the `resume_token_max_age_ms` fault, which
    /// got their full state instead of the changes.
    pub fn full_resends(&self) -> u64 {
        self.inner.full_resends.load(Ordering::SeqCst)
    }

    /// Waits for every stream task to end (after the shutdown token fired).
    pub async fn wait_streams(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl NamedService for FirestoreService {
    const NAME: &'static str = "google.firestore.v1.Firestore";
}

impl Service<http::Request<tonic::body::Body>> for FirestoreService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        match request.uri().path() {
            LISTEN_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<ListenResponse, ListenRequest>::default());
                Ok(grpc.streaming(ListenMethod(inner), request).await)
            }),
            GET_DOCUMENT_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<Document, GetDocumentRequest>::default());
                Ok(grpc.unary(GetDocumentMethod(inner), request).await)
            }),
            other => {
                let message = format!("the sandbox does not implement {other}");
                Box::pin(async move { Ok(Status::unimplemented(message).into_http()) })
            }
        }
    }
}

fn seen_headers(method: &'static str, metadata: &tonic::metadata::MetadataMap) -> SeenHeaders {
    let text = |name: &str| {
        metadata
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    SeenHeaders {
        method,
        resource_prefix: text("google-cloud-resource-prefix"),
        authorization: text("authorization"),
        api_key: text("x-goog-api-key"),
    }
}

struct ListenMethod(Arc<ServiceInner>);

impl StreamingService<ListenRequest> for ListenMethod {
    type Response = ListenResponse;
    type ResponseStream = ReceiverStream<Result<ListenResponse, Status>>;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<ListenRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            inner
                .headers
                .record(seen_headers("Listen", request.metadata()));
            if inner.faults.refuse_listen() {
                return Err(Status::unavailable(
                    "the sandbox refuses Listen calls (injected fault)",
                ));
            }
            let admitted = inner.caller.admit(request.metadata())?;
            let (out, receiver) = mpsc::channel(STREAM_BUFFER);
            let stream_id = inner.next_stream.fetch_add(1, Ordering::Relaxed);
            let session = ListenSession::new(inner.clone(), stream_id, out, admitted);
            inner.tasks.spawn(session.run(request.into_inner()));
            Ok(tonic::Response::new(ReceiverStream::new(receiver)))
        })
    }
}

struct GetDocumentMethod(Arc<ServiceInner>);

impl UnaryService<GetDocumentRequest> for GetDocumentMethod {
    type Response = Document;
    type Future = BoxFuture<'static, Result<tonic::Response<Document>, Status>>;

    fn call(&mut self, request: tonic::Request<GetDocumentRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            inner
                .headers
                .record(seen_headers("GetDocument", request.metadata()));
            let admitted = inner.caller.admit(request.metadata())?;
            let name = request.into_inner().name;
            if admitted.rules && (!admitted.signed_in || !inner.readable_by_rules(&name)) {
                return Err(Status::permission_denied(PERMISSION_DENIED_MESSAGE));
            }
            match check_document_name(&inner.database, &name) {
                Ok(()) => {}
                Err(status) if status.code() == Code::InvalidArgument => {
                    // Under another well-formed database: that database does not exist here.
                    if let Some(database) = database_of(&name)
                        && check_database(&inner.database, database).is_err()
                    {
                        return Err(Status::not_found(format!(
                            "the database of '{name}' does not exist in this sandbox"
                        )));
                    }
                    return Err(status);
                }
                Err(status) => return Err(status),
            }
            inner
                .store
                .get(&name)
                .map(tonic::Response::new)
                .ok_or_else(|| Status::not_found(format!("Document \"{name}\" not found.")))
        })
    }
}

impl ServiceInner {
    /// Whether the sandbox's security rules let a caller read `name`: a checkout document by
    /// its exact name (`<database>/documents/<collection>/<id>`), nothing else.
    fn readable_by_rules(&self, name: &str) -> bool {
        let reserved = |id: &str| id.starts_with("__") && id.ends_with("__");
        name.strip_prefix(&self.readable_prefix)
            .is_some_and(|id| !id.is_empty() && !id.contains('/') && !reserved(id))
    }
}

/// Checks a ListenRequest's `database` against the one served.
fn check_database(expected: &str, database: &str) -> Result<(), Status> {
    let parts: Vec<&str> = database.split('/').collect();
    let well_formed = parts.len() == 4
        && parts[0] == "projects"
        && parts[2] == "databases"
        && !parts[1].is_empty()
        && !parts[3].is_empty();
    if !well_formed {
        return Err(Status::invalid_argument(format!(
            "database '{database}' is not of the form projects/{{project}}/databases/{{database}}"
        )));
    }
    if database != expected {
        return Err(Status::not_found(format!(
            "the database {database} does not exist (this sandbox serves only {expected})"
        )));
    }
    Ok(())
}

/// The `projects/p/databases/d` prefix of a document name, if it has one.
fn database_of(name: &str) -> Option<&str> {
    let cut = name.find("/documents/")?;
    Some(&name[..cut])
}

/// Checks that `name` is a document under `database`: `<database>/documents/<coll>/<id>[/..]`.
fn check_document_name(database: &str, name: &str) -> Result<(), Status> {
    let relative = name
        .strip_prefix(database)
        .and_then(|rest| rest.strip_prefix("/documents/"));
    let Some(relative) = relative else {
        return Err(Status::invalid_argument(format!(
            "document name '{name}' is not under the database {database}"
        )));
    };
    let segments: Vec<&str> = relative.split('/').collect();
    let ok = segments.len().is_multiple_of(2) && segments.iter().all(|segment| !segment.is_empty());
    if !ok {
        return Err(Status::invalid_argument(format!(
            "document name '{name}' must be {database}/documents/<collection>/<document id>"
        )));
    }
    Ok(())
}

/// Why a stream stops.
enum Stop {
    /// End the stream with this status.
    Fail(Status),
    /// The client went away; nothing more can be sent.
    Gone,
}

/// One Listen stream: its targets and how far it has been brought up to date.
struct ListenSession {
    inner: Arc<ServiceInner>,
    stream_id: u64,
    out: mpsc::Sender<Result<ListenResponse, Status>>,
    /// Active targets and their document names.
    targets: BTreeMap<i32, Vec<String>>,
    /// Document name → the active targets watching it.
    watchers: HashMap<String, BTreeSet<i32>>,
    /// Woken by a commit of a document this stream watches (registered with the store).
    commits: Arc<Notify>,
    /// Every commit up to this sequence has been delivered for the active targets.
    position: u64,
    /// The last read time sent, so read times never go back on this stream.
    last_read_micros: i64,
    /// A target with id 0 was added: the server assigns ids from now on.
    server_assigns_ids: bool,
    /// Who opened the stream: whether rules apply, and when its token expires.
    admitted: Admitted,
}

impl Drop for ListenSession {
    /// The store stops waking this stream for its documents.
    fn drop(&mut self) {
        for name in self.watchers.keys() {
            self.inner.store.unwatch(name, self.stream_id);
        }
    }
}

impl ListenSession {
    fn new(
        inner: Arc<ServiceInner>,
        stream_id: u64,
        out: mpsc::Sender<Result<ListenResponse, Status>>,
        admitted: Admitted,
    ) -> ListenSession {
        let position = inner.store.read(|view| view.snapshot().0);
        ListenSession {
            inner,
            stream_id,
            out,
            targets: BTreeMap::new(),
            watchers: HashMap::new(),
            commits: Arc::new(Notify::new()),
            position,
            last_read_micros: 0,
            server_assigns_ids: false,
            admitted,
        }
    }

    async fn run(mut self, mut requests: Streaming<ListenRequest>) {
        tracing::info!(
            stream = self.stream_id,
            "sandbox firestore: Listen stream opened"
        );
        let commits = Arc::clone(&self.commits);
        let mut close = self.inner.faults.close_streams_signal();
        let shutdown = self.inner.shutdown.clone();
        let period = self.inner.heartbeat_interval.max(Duration::from_millis(1));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut requests_open = true;
        let token_expires = self.admitted.expires_at;
        let outcome = loop {
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => Err(Stop::Fail(Status::unavailable("the sandbox is shutting down"))),
                _ = close.changed() => Err(Stop::Fail(Status::unavailable("the sandbox closed this stream (injected fault)"))),
                () = self.out.closed() => Err(Stop::Gone),
                message = requests.message(), if requests_open => match message {
                    Ok(Some(request)) => self.handle(request).await,
                    Ok(None) => {
                        // Half-closed: keep sending changes until the client hangs up.
                        requests_open = false;
                        Ok(())
                    }
                    Err(_) => Err(Stop::Gone),
                },
                () = commits.notified() => self.deliver(false).await,
                _ = heartbeat.tick() => self.deliver(true).await,
                () = sleep_until_or_never(token_expires) => {
                    self.inner.caller.expired_streams.fetch_add(1, Ordering::SeqCst);
                    Err(Stop::Fail(Status::unauthenticated("Missing or invalid authentication.")))
                }
            };
            if let Err(stop) = step {
                break stop;
            }
        };
        match outcome {
            Stop::Fail(status) => {
                tracing::info!(
                    stream = self.stream_id,
                    code = ?status.code(),
                    message = status.message(),
                    "sandbox firestore: Listen stream ended with an error"
                );
                // Never wait here: a client that stopped reading must not hold up shutdown. If
                // its buffer is full the stream just ends when the sender is dropped.
                let _ = self.out.try_send(Err(status));
            }
            Stop::Gone => {
                tracing::info!(
                    stream = self.stream_id,
                    "sandbox firestore: Listen stream closed by the client"
                );
            }
        }
    }

    async fn handle(&mut self, request: ListenRequest) -> Result<(), Stop> {
        check_database(&self.inner.database, &request.database).map_err(Stop::Fail)?;
        match request.target_change {
            Some(RequestedChange::AddTarget(target)) => self.add_target(target).await,
            Some(RequestedChange::RemoveTarget(target_id)) => self.remove_target(target_id).await,
            // A request that neither adds nor removes changes nothing.
            None => Ok(()),
        }
    }

    async fn add_target(&mut self, target: Target) -> Result<(), Stop> {
        let Target {
            target_id,
            once,
            target_type,
            resume_type,
            ..
        } = target;
        if target_id < 0 {
            return Err(fail_invalid(format!(
                "target_id {target_id} must not be negative"
            )));
        }
        if target_id != 0 && self.server_assigns_ids {
            let cause = RpcStatus {
                code: Code::InvalidArgument as i32,
                message: "once a target with target_id 0 was added, every target must use 0".into(),
                details: Vec::new(),
            };
            return self.send(remove_with_cause(target_id, cause)).await;
        }
        if target_id != 0 && self.targets.contains_key(&target_id) {
            return Err(fail_invalid(format!(
                "target_id {target_id} is already active on this stream"
            )));
        }
        if self.admitted.rules && !self.admitted.signed_in {
            // The rules require a signed-in user: Firestore opens the stream and removes each
            // target with PERMISSION_DENIED; it does not refuse the Listen call itself.
            return self.deny_target(target_id).await;
        }
        let documents = match target_type {
            Some(TargetType::Query(_)) if self.admitted.rules => {
                return self.deny_target(target_id).await;
            }
            Some(TargetType::Documents(documents)) => documents.documents,
            Some(TargetType::Query(_)) => {
                let cause = RpcStatus {
                    code: Code::Unimplemented as i32,
                    message: "the sandbox supports documents targets only".into(),
                    details: Vec::new(),
                };
                return self.send(remove_with_cause(target_id, cause)).await;
            }
            None => {
                return Err(fail_invalid(
                    "the target has neither documents nor a query".into(),
                ));
            }
        };
        if documents.is_empty() {
            return Err(fail_invalid(
                "the documents target lists no documents".into(),
            ));
        }
        if self.admitted.rules
            && !documents
                .iter()
                .all(|name| self.inner.readable_by_rules(name))
        {
            return self.deny_target(target_id).await;
        }
        let mut names: Vec<String> = Vec::with_capacity(documents.len());
        for name in documents {
            check_document_name(&self.inner.database, &name).map_err(Stop::Fail)?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if names
            .iter()
            .any(|name| self.inner.faults.listen_refuses(name))
        {
            tracing::info!(
                stream = self.stream_id,
                target = target_id,
                "sandbox firestore: target refused (injected fault)"
            );
            let cause = RpcStatus {
                code: Code::PermissionDenied as i32,
                message: "Missing or insufficient permissions.".into(),
                details: Vec::new(),
            };
            return self.send(remove_with_cause(target_id, cause)).await;
        }
        let resume = match resume_type {
            None => None,
            Some(ResumeType::ResumeToken(token)) if token.is_empty() => None,
            Some(ResumeType::ResumeToken(token)) => {
                let (seq, age) = self
                    .inner
                    .store
                    .decode_token_with_age(&token)
                    .map_err(|error| fail_invalid(error.to_string()))?;
                match self.inner.faults.resume_token_max_age() {
                    // Too old to resume from: the whole state again, as after a long
                    // disconnect (no RESET: the target is new on this stream).
                    Some(max_age) if age > max_age => {
                        self.inner.full_resends.fetch_add(1, Ordering::SeqCst);
                        None
                    }
                    _ => Some(ResumePoint::Seq(seq)),
                }
            }
            Some(ResumeType::ReadTime(read_time)) => {
                Some(ResumePoint::Micros(micros_from_timestamp(&read_time)))
            }
        };
        let id = if target_id == 0 {
            self.server_assigns_ids = true;
            (1..=i32::MAX)
                .find(|candidate| !self.targets.contains_key(candidate))
                .ok_or_else(|| fail_invalid("no target id is free".into()))?
        } else {
            target_id
        };

        // One consistent view: bring existing targets up to date and take the new target's
        // state at the same commit, so one marker covers both.
        let (catch_up, initial, seq, read_micros) = self.inner.store.read(|view| {
            for name in &names {
                view.watch(name, self.stream_id, &self.commits);
            }
            let (seq, read_micros) = view.snapshot();
            let catch_up = self.changes_since_position(view);
            let initial: Vec<ListenResponse> = names
                .iter()
                .filter_map(|name| {
                    let entry = view.entry(name)?;
                    match (resume, &entry.document) {
                        (None, Some(document)) => Some(document_change(document, vec![id])),
                        (None, None) => None,
                        (Some(point), _) if !entry.changed_after(point) => None,
                        (Some(_), Some(document)) => Some(document_change(document, vec![id])),
                        (Some(_), None) => {
                            Some(document_delete(name, vec![id], entry.changed_micros))
                        }
                    }
                })
                .collect();
            (catch_up, initial, seq, read_micros)
        });
        self.position = seq;
        // Recorded at once (the store already wakes this stream for them), so a stream that
        // ends while sending below still lets go of every document it registered.
        for name in &names {
            self.watchers.entry(name.clone()).or_default().insert(id);
        }
        for response in catch_up {
            self.send(response).await?;
        }
        self.send(target_change(TargetChangeType::Add, vec![id], None))
            .await?;
        for response in initial {
            self.send(response).await?;
        }
        tracing::debug!(
            stream = self.stream_id,
            target = id,
            documents = names.len(),
            resumed = resume.is_some(),
            "sandbox firestore: target added"
        );
        self.targets.insert(id, names);
        let read_micros = self.next_read_micros(read_micros);
        let token = self.inner.store.token(seq);
        self.send(target_change(
            TargetChangeType::Current,
            vec![id],
            Some((token.clone(), read_micros)),
        ))
        .await?;
        if once {
            self.forget_target(id);
            self.send(target_change(TargetChangeType::Remove, vec![id], None))
                .await?;
        }
        self.send(target_change(
            TargetChangeType::NoChange,
            Vec::new(),
            Some((token, read_micros)),
        ))
        .await
    }

    /// The rules refuse this target: REMOVE with a PERMISSION_DENIED cause, as Firestore
    /// tells a listener its target is not allowed (the other targets carry on).
    async fn deny_target(&mut self, target_id: i32) -> Result<(), Stop> {
        self.inner
            .caller
            .denied_targets
            .fetch_add(1, Ordering::SeqCst);
        let cause = RpcStatus {
            code: Code::PermissionDenied as i32,
            message: PERMISSION_DENIED_MESSAGE.into(),
            details: Vec::new(),
        };
        self.send(remove_with_cause(target_id, cause)).await
    }

    async fn remove_target(&mut self, target_id: i32) -> Result<(), Stop> {
        if !self.targets.contains_key(&target_id) {
            return Err(Stop::Fail(Status::not_found(format!(
                "target_id {target_id} is not active on this stream"
            ))));
        }
        self.forget_target(target_id);
        tracing::debug!(
            stream = self.stream_id,
            target = target_id,
            "sandbox firestore: target removed"
        );
        self.send(target_change(
            TargetChangeType::Remove,
            vec![target_id],
            None,
        ))
        .await
    }

    fn forget_target(&mut self, target_id: i32) {
        if let Some(names) = self.targets.remove(&target_id) {
            for name in names {
                if let Some(watching) = self.watchers.get_mut(&name) {
                    watching.remove(&target_id);
                    if watching.is_empty() {
                        self.watchers.remove(&name);
                        self.inner.store.unwatch(&name, self.stream_id);
                    }
                }
            }
        }
    }

    /// Sends what changed since the last delivery, then a global marker; on a heartbeat the
    /// marker goes out even if nothing changed.
    async fn deliver(&mut self, heartbeat: bool) -> Result<(), Stop> {
        let (changes, seq, read_micros) = self.inner.store.read(|view| {
            let (seq, read_micros) = view.snapshot();
            (self.changes_since_position(view), seq, read_micros)
        });
        self.position = seq;
        if self.targets.is_empty() || (changes.is_empty() && !heartbeat) {
            return Ok(());
        }
        for response in changes {
            self.send(response).await?;
        }
        let read_micros = self.next_read_micros(read_micros);
        let token = self.inner.store.token(seq);
        self.send(target_change(
            TargetChangeType::NoChange,
            Vec::new(),
            Some((token, read_micros)),
        ))
        .await
    }

    /// Changes of watched documents after `self.position`, in commit order, one per document.
    fn changes_since_position(&self, view: &StoreView<'_>) -> Vec<ListenResponse> {
        let position = self.position;
        let names: Vec<&str> = match view.changed_since(position) {
            Some(names) => names
                .into_iter()
                .filter(|name| self.watchers.contains_key(*name))
                .collect(),
            // The log no longer reaches back: check every watched document.
            None => self.watchers.keys().map(String::as_str).collect(),
        };
        let mut seen = BTreeSet::new();
        let mut changes = Vec::new();
        for name in names {
            if !seen.insert(name) {
                continue;
            }
            let (Some(entry), Some(watching)) = (view.entry(name), self.watchers.get(name)) else {
                continue;
            };
            if !entry.changed_after(ResumePoint::Seq(position)) {
                continue;
            }
            let target_ids: Vec<i32> = watching.iter().copied().collect();
            changes.push(match &entry.document {
                Some(document) => document_change(document, target_ids),
                None => document_delete(name, target_ids, entry.changed_micros),
            });
        }
        changes
    }

    fn next_read_micros(&mut self, candidate: i64) -> i64 {
        self.last_read_micros = self.last_read_micros.max(candidate);
        self.last_read_micros
    }

    /// Sends one response, waiting while the client is slow, but never past shutdown.
    async fn send(&self, response: ListenResponse) -> Result<(), Stop> {
        tokio::select! {
            sent = self.out.send(Ok(response)) => sent.map_err(|_| Stop::Gone),
            () = self.inner.shutdown.cancelled() => {
                Err(Stop::Fail(Status::unavailable("the sandbox is shutting down")))
            }
        }
    }
}

fn fail_invalid(message: String) -> Stop {
    Stop::Fail(Status::invalid_argument(message))
}

fn target_change(
    kind: TargetChangeType,
    target_ids: Vec<i32>,
    marker: Option<(Vec<u8>, i64)>,
) -> ListenResponse {
    let (resume_token, read_time) = match marker {
        Some((token, micros)) => (token, Some(timestamp_from_micros(micros))),
        None => (Vec::new(), None),
    };
    ListenResponse {
        response_type: Some(ResponseType::TargetChange(TargetChange {
            target_change_type: kind as i32,
            target_ids,
            cause: None,
            resume_token,
            read_time,
        })),
    }
}

fn remove_with_cause(target_id: i32, cause: RpcStatus) -> ListenResponse {
    ListenResponse {
        response_type: Some(ResponseType::TargetChange(TargetChange {
            target_change_type: TargetChangeType::Remove as i32,
            target_ids: vec![target_id],
            cause: Some(cause),
            resume_token: Vec::new(),
            read_time: None,
        })),
    }
}

fn document_change(document: &Document, target_ids: Vec<i32>) -> ListenResponse {
    ListenResponse {
        response_type: Some(ResponseType::DocumentChange(DocumentChange {
            document: Some(document.clone()),
            target_ids,
            removed_target_ids: Vec::new(),
        })),
    }
}

fn document_delete(name: &str, removed_target_ids: Vec<i32>, micros: i64) -> ListenResponse {
    ListenResponse {
        response_type: Some(ResponseType::DocumentDelete(DocumentDelete {
            document: name.to_owned(),
            removed_target_ids,
            read_time: Some(timestamp_from_micros(micros)),
        })),
    }
}

/// Sleeps until `at`, or for ever when there is no such time.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: &str = "projects/p/databases/(default)";

    #[test]
    fn database_checks_tell_malformed_from_unknown() {
        assert!(check_database(DB, DB).is_ok());
        let malformed = check_database(DB, "projects/p").expect_err("malformed");
        assert_eq!(malformed.code(), Code::InvalidArgument);
        let other = check_database(DB, "projects/q/databases/(default)").expect_err("other");
        assert_eq!(other.code(), Code::NotFound);
        let named = check_database(DB, "projects/p/databases/other").expect_err("other db");
        assert_eq!(named.code(), Code::NotFound);
    }

    #[test]
    fn document_names_must_be_documents_under_the_database() {
        assert!(check_document_name(DB, &format!("{DB}/documents/c/d")).is_ok());
        assert!(check_document_name(DB, &format!("{DB}/documents/c/d/sub/e")).is_ok());
        for bad in [
            format!("{DB}/documents/c"),
            format!("{DB}/documents/c//d"),
            format!("{DB}/documents/"),
            "projects/q/databases/(default)/documents/c/d".to_owned(),
            "c/d".to_owned(),
        ] {
            let error = check_document_name(DB, &bad).expect_err("invalid name");
            assert_eq!(error.code(), Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn headers_log_keeps_the_latest() {
        let log = HeadersLog::default();
        for _ in 0..HEADERS_KEPT + 5 {
            log.record(SeenHeaders {
                method: "Listen",
                resource_prefix: None,
                authorization: None,
                api_key: None,
            });
        }
        assert_eq!(log.all().len(), HEADERS_KEPT);
    }
}
