//! Tests of the stream tasks and pool against a scripted Listen server on loopback.
//!
//! The fake hands each incoming Listen call to the test (headers, request stream, response
//! sender), so a test plays the server's side message by message: headers, resume after an
//! error, permanent failures, INVALID_ARGUMENT on resume, live AddTarget/RemoveTarget.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use gcloud_sdk::google::firestore::v1::{
    Document, DocumentChange, ListenRequest, ListenResponse, listen_request, listen_response,
    target, target_change::TargetChangeType,
};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::listen::{ListenEvent, ListenerOptions, WatchTarget};
use super::{Listener, ListenerHandle};
use crate::domain::{CheckoutId, FirestoreLocation};
use crate::settings::StreamMode;

const DEADLINE: Duration = Duration::from_secs(10);

/// One Listen call received by the fake.
struct Call {
    headers: tonic::metadata::MetadataMap,
    requests: Streaming<ListenRequest>,
    responses: mpsc::Sender<Result<ListenResponse, Status>>,
    /// Sends the call's response headers, on a fake that holds them ([`Fake::holding_headers`]).
    answer: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Call {
    /// Sends the response headers of a call held by [`Fake::holding_headers`].
    fn answer_headers(&mut self) {
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(());
        }
    }

    async fn request(&mut self) -> ListenRequest {
        timeout(DEADLINE, self.requests.message())
            .await
            .expect("a request in time")
            .expect("no error on the request stream")
            .expect("the client keeps the stream open")
    }

    /// The next request must add a target: returns (id, document, resume token).
    async fn add(&mut self) -> (i32, String, Option<Vec<u8>>) {
        let request = self.request().await;
        assert_eq!(request.database, "projects/p/databases/(default)");
        match request.target_change {
            Some(listen_request::TargetChange::AddTarget(t)) => {
                let Some(target::TargetType::Documents(docs)) = t.target_type else {
                    panic!("a documents target");
                };
                let token = match t.resume_type {
                    Some(target::ResumeType::ResumeToken(token)) => Some(token),
                    _ => None,
                };
                assert_eq!(docs.documents.len(), 1);
                (t.target_id, docs.documents[0].clone(), token)
            }
            other => panic!("expected AddTarget, got {other:?}"),
        }
    }

    async fn send(&self, response: ListenResponse) {
        self.responses
            .send(Ok(response))
            .await
            .expect("client reads");
    }

    async fn fail(&self, status: Status) {
        self.responses
            .send(Err(status))
            .await
            .expect("client reads");
    }

    /// ADD, optional document, CURRENT and a global marker with `token`.
    async fn initial(&self, id: i32, document: Option<&str>, token: &[u8]) {
        self.send(tc(TargetChangeType::Add, &[id], b"")).await;
        if let Some(name) = document {
            self.send(doc(name, id)).await;
        }
        self.send(tc(TargetChangeType::Current, &[id], token)).await;
        self.send(tc(TargetChangeType::NoChange, &[], token)).await;
    }
}

fn tc(kind: TargetChangeType, ids: &[i32], token: &[u8]) -> ListenResponse {
    super::state::tests::tc(kind, ids, token, Some(1_700_000_000))
}

fn doc(name: &str, id: i32) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::DocumentChange(
            DocumentChange {
                document: Some(Document {
                    name: name.to_owned(),
                    fields: Default::default(),
                    create_time: None,
                    update_time: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                }),
                target_ids: vec![id],
                removed_target_ids: vec![],
            },
        )),
    }
}

/// The fake `google.firestore.v1.Firestore` service: Listen only.
#[derive(Clone)]
struct FakeFirestore {
    calls: mpsc::UnboundedSender<Call>,
    /// Answer a call's headers only when the test says so ([`Call::answer_headers`]).
    hold_headers: bool,
}

impl tonic::server::NamedService for FakeFirestore {
    const NAME: &'static str = "google.firestore.v1.Firestore";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for FakeFirestore {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let listen = Listen {
            calls: self.calls.clone(),
            hold_headers: self.hold_headers,
        };
        Box::pin(async move {
            if request.uri().path() != "/google.firestore.v1.Firestore/Listen" {
                return Ok(Status::unimplemented("fake: Listen only").into_http());
            }
            let codec = tonic_prost::ProstCodec::<ListenResponse, ListenRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .streaming(listen, request)
                .await)
        })
    }
}

struct Listen {
    calls: mpsc::UnboundedSender<Call>,
    hold_headers: bool,
}

impl tonic::server::StreamingService<ListenRequest> for Listen {
    type Response = ListenResponse;
    type ResponseStream = ReceiverStream<Result<ListenResponse, Status>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<ListenRequest>>) -> Self::Future {
        let (responses, stream) = mpsc::channel(64);
        let headers = request.metadata().clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let call = Call {
            headers,
            requests: request.into_inner(),
            responses,
            answer: Some(answer),
        };
        let sent = self.calls.send(call);
        let hold_headers = self.hold_headers;
        Box::pin(async move {
            sent.map_err(|_| Status::unavailable("fake: test gone"))?;
            if hold_headers {
                answered
                    .await
                    .map_err(|_| Status::unavailable("fake: call dropped"))?;
            }
            Ok(Response::new(ReceiverStream::new(stream)))
        })
    }
}

/// A fake server on a loopback port, and the calls it receives.
struct Fake {
    endpoint: String,
    calls: mpsc::UnboundedReceiver<Call>,
    stop: CancellationToken,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Fake {
    async fn start() -> Fake {
        Fake::start_with(false).await
    }

    /// A fake that sends a call's response headers only on [`Call::answer_headers`].
    async fn holding_headers() -> Fake {
        Fake::start_with(true).await
    }

    async fn start_with(hold_headers: bool) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let address = listener.local_addr().expect("address");
        let (sender, calls) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(FakeFirestore {
                    calls: sender,
                    hold_headers,
                })
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
        });
        Fake {
            endpoint: format!("http://{address}"),
            calls,
            stop,
        }
    }

    async fn call(&mut self) -> Call {
        timeout(DEADLINE, self.calls.recv())
            .await
            .expect("a Listen call in time")
            .expect("server running")
    }
}

struct Running {
    handle: ListenerHandle,
    events: mpsc::Receiver<ListenEvent>,
    cancel: CancellationToken,
}

impl Running {
    fn start(endpoint: &str, configure: impl FnOnce(&mut ListenerOptions)) -> Running {
        let mut options = ListenerOptions::local(endpoint, StreamMode::PerDocument);
        options.backoff_initial = Duration::from_millis(20);
        options.backoff_max = Duration::from_millis(200);
        configure(&mut options);
        let (sender, events) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let handle = Listener::start(options, sender, cancel.clone()).expect("start");
        Running {
            handle,
            events,
            cancel,
        }
    }

    fn watch(&self, name: &str, token: Option<&[u8]>) {
        self.handle.watch(WatchTarget {
            checkout_id: id(name),
            location: FirestoreLocation::new("p", "checkouts", name).expect("location"),
            resume_token: token.map(<[u8]>::to_vec),
            resume_read_time: None,
        });
    }

    async fn next(&mut self) -> ListenEvent {
        timeout(DEADLINE, self.events.recv())
            .await
            .expect("an event in time")
            .expect("channel open")
    }

    /// The next event that is not Connected/Disconnected.
    async fn next_news(&mut self) -> ListenEvent {
        loop {
            match self.next().await {
                ListenEvent::Connected { .. } | ListenEvent::Disconnected { .. } => continue,
                event => return event,
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        timeout(DEADLINE, self.handle.closed())
            .await
            .expect("tasks end after cancel");
    }
}

fn id(name: &str) -> CheckoutId {
    name.parse().expect("checkout id")
}

fn document(name: &str) -> String {
    format!("projects/p/databases/(default)/documents/checkouts/{name}")
}

fn is_changed(event: &ListenEvent, name: &str) -> bool {
    matches!(event, ListenEvent::Changed(n) if n.checkout_id == id(name))
}

#[tokio::test]
async fn headers_first_snapshot_and_resume_after_a_stream_error() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |_| {});
    listener.watch("a", None);

    let mut call = fake.call().await;
    assert_eq!(
        call.headers
            .get("google-cloud-resource-prefix")
            .and_then(|v| v.to_str().ok()),
        Some("projects/p/databases/(default)")
    );
    assert_eq!(
        call.headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer owner")
    );
    assert_eq!(
        call.add().await,
        (1, document("a"), None),
        "per-document: id 1"
    );
    call.initial(1, Some(&document("a")), b"t1").await;
    assert!(matches!(
        listener.next().await,
        ListenEvent::Connected { targets: 1, .. }
    ));
    assert!(is_changed(&listener.next().await, "a"));
    assert_eq!(
        listener.next().await,
        ListenEvent::Checkpoint {
            tokens: vec![(id("a"), b"t1".to_vec())],
            read_time: chrono::DateTime::from_timestamp(1_700_000_000, 0),
        }
    );
    assert_eq!(listener.handle.open_streams(), 1);

    call.fail(Status::unavailable("backend restarting")).await;
    let event = listener.next().await;
    assert!(
        matches!(&event, ListenEvent::Disconnected { reason, .. } if reason.contains("UNAVAILABLE")),
        "{event:?}"
    );
    let mut call = fake.call().await;
    assert_eq!(
        call.add().await,
        (1, document("a"), Some(b"t1".to_vec())),
        "resumed with the checkpointed token"
    );
    // Unchanged while away: no document, so no Changed; just a new checkpoint.
    call.initial(1, None, b"t2").await;
    assert!(matches!(
        listener.next().await,
        ListenEvent::Connected { .. }
    ));
    assert_eq!(
        listener.next().await,
        ListenEvent::Checkpoint {
            tokens: vec![(id("a"), b"t2".to_vec())],
            read_time: chrono::DateTime::from_timestamp(1_700_000_000, 0),
        }
    );
    listener.stop().await;
}

#[tokio::test]
async fn permanent_failure_is_reported_once_per_project_and_recovers() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |_| {});
    listener.watch("a", None);
    listener.watch("b", None);
    // Two streams (per-document), each refused twice.
    for _ in 0..4 {
        let call = fake.call().await;
        call.fail(Status::permission_denied(
            "Missing or insufficient permissions.",
        ))
        .await;
    }
    let mut failures = Vec::new();
    while let Ok(event) = listener.events.try_recv() {
        if let ListenEvent::PermanentFailure { project, message } = event {
            failures.push((project, message));
        }
    }
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert_eq!(failures[0].0, "p");
    assert!(
        failures[0].1.contains("roles/datastore.viewer"),
        "{}",
        failures[0].1
    );
    // The project comes back (e.g. IAM fixed): the next attempt works.
    let mut call = fake.call().await;
    let (target, name, _) = call.add().await;
    call.initial(target, Some(&name), b"t").await;
    let checkout = if name == document("a") { "a" } else { "b" };
    assert!(is_changed(&listener.next_news().await, checkout));
    listener.stop().await;
}

#[tokio::test]
async fn invalid_argument_on_resume_forgets_tokens_and_retries_at_once() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |_| {});
    listener.watch("a", Some(b"expired"));
    let mut call = fake.call().await;
    assert_eq!(call.add().await.2, Some(b"expired".to_vec()));
    call.fail(Status::invalid_argument("resume token expired"))
        .await;
    assert_eq!(
        listener.next_news().await,
        ListenEvent::ForgetToken(id("a"))
    );
    let mut call = fake.call().await;
    assert_eq!(call.add().await, (1, document("a"), None));
    call.initial(1, None, b"fresh").await;
    // Without a token the first snapshot is verified, even though the document is missing.
    assert!(is_changed(&listener.next_news().await, "a"));
    listener.stop().await;
}

#[tokio::test]
async fn multiplexed_targets_are_added_and_removed_on_the_live_stream() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |o| {
        o.mode = StreamMode::Multiplexed;
        o.targets_per_stream = 2;
    });
    listener.watch("a", None);
    let mut call = fake.call().await;
    assert_eq!(call.add().await, (1, document("a"), None));
    call.initial(1, Some(&document("a")), b"t1").await;
    assert!(is_changed(&listener.next_news().await, "a"));
    listener.watch("b", None);
    assert_eq!(call.add().await, (2, document("b"), None), "same stream");
    listener.watch("c", None);
    let mut second = fake.call().await;
    assert_eq!(
        second.add().await,
        (1, document("c"), None),
        "a full stream: a new one"
    );
    listener.handle.unwatch(&id("a"));
    let request = call.request().await;
    assert_eq!(
        request.target_change,
        Some(listen_request::TargetChange::RemoveTarget(1))
    );
    assert_eq!(listener.handle.watched(), 2);
    listener.stop().await;
}

/// The npm emulator reads only the first request of a stream. Multiplexed mode must still watch
/// everything: unacknowledged live adds move to fresh streams, then one target per stream.
#[tokio::test]
async fn targets_a_server_never_acknowledges_move_to_fresh_streams_then_one_per_stream() {
    const ACK_TIMEOUT: Duration = Duration::from_millis(300);
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |o| {
        o.mode = StreamMode::Multiplexed;
        o.targets_per_stream = 10;
        o.add_ack_timeout = ACK_TIMEOUT;
    });
    listener.watch("a", None);
    let mut first = fake.call().await;
    assert_eq!(first.add().await, (1, document("a"), None));
    first.initial(1, Some(&document("a")), b"").await;
    assert!(is_changed(&listener.next_news().await, "a"));

    // Three live adds the server ignores: each is removed after the timeout and re-added as the
    // first request of a fresh stream, where it is acknowledged.
    let mut open = Vec::new();
    for (n, name) in ["b", "c", "d"].into_iter().enumerate() {
        listener.watch(name, None);
        let (target, added, _) = first.add().await;
        assert_eq!(added, document(name), "a live add on the first stream");
        let sent = tokio::time::Instant::now();
        let request = first.request().await;
        assert_eq!(
            request.target_change,
            Some(listen_request::TargetChange::RemoveTarget(target)),
            "the unacknowledged target is removed properly (the server may have it)"
        );
        assert!(
            sent.elapsed() >= ACK_TIMEOUT.mul_f32(0.9),
            "not before the timeout"
        );
        let mut fresh = fake.call().await;
        assert_eq!(fresh.add().await, (1, document(name), None), "round {n}");
        fresh.initial(1, Some(&document(name)), b"").await;
        assert!(is_changed(&listener.next_news().await, name));
        open.push(fresh);
    }
    assert_eq!(listener.handle.watched(), 4);

    // Degraded: a new checkout gets its own stream at once, with no live add.
    let asked = tokio::time::Instant::now();
    listener.watch("e", None);
    let mut own = fake.call().await;
    assert_eq!(own.add().await, (1, document("e"), None));
    assert!(asked.elapsed() < ACK_TIMEOUT, "no ack timeout to wait for");
    own.initial(1, None, b"").await;
    assert!(is_changed(&listener.next_news().await, "e"));
    assert!(
        timeout(Duration::from_millis(50), first.requests.message())
            .await
            .is_err(),
        "nothing more is added to the first stream"
    );
    assert_eq!(listener.handle.open_streams(), 5);

    // Unwatching a checkout alone on its stream closes that stream; no RemoveTarget is needed.
    listener.handle.unwatch(&id("e"));
    let ended = timeout(DEADLINE, own.requests.message())
        .await
        .expect("the stream ends in time");
    assert!(
        !matches!(ended, Ok(Some(_))),
        "the client hung up rather than sending {ended:?}"
    );
    let start = tokio::time::Instant::now();
    while listener.handle.open_streams() != 4 {
        assert!(start.elapsed() < DEADLINE, "the stream closes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listener.stop().await;
}

/// Production acknowledges live adds: nothing moves and the multiplexed stream keeps them all.
#[tokio::test]
async fn acknowledged_live_adds_stay_on_their_stream() {
    const ACK_TIMEOUT: Duration = Duration::from_millis(200);
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |o| {
        o.mode = StreamMode::Multiplexed;
        o.add_ack_timeout = ACK_TIMEOUT;
    });
    listener.watch("a", None);
    let mut call = fake.call().await;
    assert_eq!(call.add().await.0, 1);
    call.initial(1, Some(&document("a")), b"").await;
    assert!(is_changed(&listener.next_news().await, "a"));
    for (n, name) in ["b", "c", "d", "e"].into_iter().enumerate() {
        listener.watch(name, None);
        let (target, added, _) = call.add().await;
        assert_eq!(
            (target, added),
            (i32::try_from(n).expect("small") + 2, document(name))
        );
        // Slower than usual but within the timeout.
        tokio::time::sleep(ACK_TIMEOUT / 2).await;
        call.initial(target, None, b"").await;
        assert!(is_changed(&listener.next_news().await, name));
    }
    // Well past the timeout: no RemoveTarget, no new stream.
    assert!(
        timeout(ACK_TIMEOUT * 3, call.requests.message())
            .await
            .is_err(),
        "no request after the acknowledged adds"
    );
    assert!(fake.calls.try_recv().is_err(), "no second stream");
    assert_eq!(listener.handle.open_streams(), 1);
    listener.stop().await;
}

/// A stream still delivering other messages is not quiet: a slow ADD behind them is waited for
/// (production under backpressure), however long past the ack timeout it comes.
#[tokio::test]
async fn a_slow_add_on_a_busy_stream_is_waited_for() {
    const ACK_TIMEOUT: Duration = Duration::from_millis(200);
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |o| {
        o.mode = StreamMode::Multiplexed;
        o.add_ack_timeout = ACK_TIMEOUT;
    });
    listener.watch("a", None);
    let mut call = fake.call().await;
    assert_eq!(call.add().await.0, 1);
    call.initial(1, Some(&document("a")), b"").await;
    assert!(is_changed(&listener.next_news().await, "a"));
    listener.watch("b", None);
    assert_eq!(call.add().await, (2, document("b"), None));
    // Messages keep coming (about a) for three ack timeouts before b's ADD.
    let until = tokio::time::Instant::now() + ACK_TIMEOUT * 3;
    while tokio::time::Instant::now() < until {
        call.send(tc(TargetChangeType::NoChange, &[1], b"")).await;
        tokio::time::sleep(ACK_TIMEOUT / 4).await;
    }
    call.initial(2, None, b"").await;
    assert!(is_changed(&listener.next_news().await, "b"));
    assert!(
        timeout(ACK_TIMEOUT * 2, call.requests.message())
            .await
            .is_err(),
        "no RemoveTarget"
    );
    assert!(fake.calls.try_recv().is_err(), "no second stream");
    listener.stop().await;
}

#[tokio::test]
async fn connection_refused_is_retried_and_cancel_ends_the_tasks() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut listener = Running::start(&format!("http://127.0.0.1:{port}"), |_| {});
    listener.watch("a", None);
    for _ in 0..2 {
        let event = listener.next().await;
        assert!(
            matches!(&event, ListenEvent::Disconnected { reason, .. } if reason.contains("could not connect")),
            "{event:?}"
        );
    }
    assert_eq!(listener.handle.open_streams(), 0);
    assert_eq!(listener.handle.watched(), 1);
    listener.stop().await;
}

#[tokio::test]
async fn plaintext_to_a_remote_host_is_refused_at_start() {
    let (sender, _events) = mpsc::channel(1);
    let options = ListenerOptions::local("http://203.0.113.5:8080", StreamMode::Multiplexed);
    let error = Listener::start(options, sender, CancellationToken::new()).expect_err("refused");
    assert!(error.to_string().contains("refusing plaintext"), "{error}");
}

#[tokio::test]
async fn checkouts_of_two_projects_are_watched_at_once_each_with_its_database() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |options| {
        options.mode = StreamMode::Multiplexed;
    });
    for (project, name) in [("shop-eu", "a"), ("shop-us", "b")] {
        listener.handle.watch(WatchTarget {
            checkout_id: id(name),
            location: FirestoreLocation::new(project, "checkouts", name).expect("location"),
            resume_token: None,
            resume_read_time: None,
        });
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut call = fake.call().await;
        let prefix = call
            .headers
            .get("google-cloud-resource-prefix")
            .and_then(|v| v.to_str().ok())
            .expect("resource prefix header")
            .to_owned();
        let request = call.request().await;
        assert_eq!(
            request.database, prefix,
            "each stream names its own database"
        );
        let Some(listen_request::TargetChange::AddTarget(target)) = request.target_change else {
            panic!("expected AddTarget");
        };
        let Some(target::TargetType::Documents(docs)) = target.target_type else {
            panic!("a documents target");
        };
        assert!(
            docs.documents[0].starts_with(&format!("{prefix}/documents/")),
            "{docs:?}"
        );
        call.initial(target.target_id, None, b"t").await;
        seen.push((prefix, call));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let prefixes: Vec<&str> = seen.iter().map(|(prefix, _)| prefix.as_str()).collect();
    assert_eq!(
        prefixes,
        [
            "projects/shop-eu/databases/(default)",
            "projects/shop-us/databases/(default)"
        ]
    );
    let mut changed = Vec::new();
    while changed.len() < 2 {
        if let ListenEvent::Changed(nudge) = listener.next_news().await {
            changed.push(nudge.checkout_id.to_string());
        }
    }
    changed.sort();
    assert_eq!(
        changed,
        ["a", "b"],
        "both projects' first snapshots are reported"
    );
    listener.stop().await;
}

fn remove_with_cause(id: i32, code: tonic::Code, message: &str) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::TargetChange(
            gcloud_sdk::google::firestore::v1::TargetChange {
                target_change_type: TargetChangeType::Remove as i32,
                target_ids: vec![id],
                cause: Some(gcloud_sdk::google::rpc::Status {
                    code: code as i32,
                    message: message.into(),
                    details: vec![],
                }),
                resume_token: vec![],
                read_time: None,
            },
        )),
    }
}

/// One document refused by the project's rules must not take the stream's other checkouts
/// down: the refused one is reported and asked for again on the same open stream.
#[tokio::test]
async fn a_refused_target_leaves_the_stream_and_its_other_targets_alone() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |o| {
        o.mode = StreamMode::Multiplexed;
        o.refused_retry_initial = Duration::from_millis(300);
    });
    listener.watch("a", None);
    let mut call = fake.call().await;
    assert_eq!(call.add().await, (1, document("a"), None));
    call.initial(1, None, b"t1").await;
    assert!(is_changed(&listener.next_news().await, "a"));
    assert!(matches!(
        listener.next_news().await,
        ListenEvent::Checkpoint { .. }
    ));
    listener.watch("denied", None);
    assert_eq!(call.add().await, (2, document("denied"), None));
    call.send(tc(TargetChangeType::Add, &[2], b"")).await;
    call.send(remove_with_cause(
        2,
        tonic::Code::PermissionDenied,
        "Missing or insufficient permissions.",
    ))
    .await;
    let event = listener.next_news().await;
    let ListenEvent::TargetRefused {
        checkout_id,
        document: name,
        code,
        message,
        refusals,
        ..
    } = event
    else {
        panic!("expected TargetRefused, got {event:?}");
    };
    assert_eq!(
        (checkout_id, name.as_str(), code, refusals),
        (
            id("denied"),
            document("denied").as_str(),
            "PERMISSION_DENIED",
            1
        )
    );
    assert!(message.contains("insufficient permissions"), "{message}");
    // The stream carries on: a change of the other document is reported at once.
    call.send(doc(&document("a"), 1)).await;
    assert!(is_changed(&listener.next_news().await, "a"));
    assert_eq!(
        listener.handle.watched(),
        2,
        "the refused one is still watched"
    );
    // After the retry delay the refused document is asked for again, on the same stream.
    let (target, name, _) = call.add().await;
    assert_eq!((target, name), (3, document("denied")));
    call.initial(3, Some(&document("denied")), b"t3").await;
    assert!(is_changed(&listener.next_news().await, "denied"));
    assert_eq!(
        listener.next_news().await,
        ListenEvent::TargetRecovered {
            checkout_id: id("denied")
        }
    );
    listener.stop().await;
}

/// UNAUTHENTICATED on a stream that was working (an access token expired under it) is retried
/// quietly; only when it persists is it reported, once.
#[tokio::test]
async fn unauthenticated_after_a_healthy_stream_is_retried_before_it_is_reported() {
    let mut fake = Fake::start().await;
    let mut listener = Running::start(&fake.endpoint, |_| {});
    listener.watch("a", None);
    let mut call = fake.call().await;
    let (target, _, _) = call.add().await;
    call.initial(target, None, b"t1").await;
    assert!(is_changed(&listener.next_news().await, "a"));
    call.fail(Status::unauthenticated("token expired")).await;
    // Refused at open AUTH_RETRIES - 1 more times: still retried, nothing reported.
    for _ in 1..super::state::AUTH_RETRIES {
        let call = fake.call().await;
        call.fail(Status::unauthenticated("token expired")).await;
    }
    let call = fake.call().await;
    let mut news = Vec::new();
    while let Ok(event) = listener.events.try_recv() {
        if !matches!(
            event,
            ListenEvent::Connected { .. }
                | ListenEvent::Disconnected { .. }
                | ListenEvent::Checkpoint { .. }
        ) {
            news.push(event);
        }
    }
    assert_eq!(news, vec![], "no permanent failure yet");
    // Once more: it persists, so it is reported.
    call.fail(Status::unauthenticated("token expired")).await;
    let event = listener.next_news().await;
    assert!(
        matches!(&event, ListenEvent::PermanentFailure { message, .. } if message.contains("UNAUTHENTICATED")),
        "{event:?}"
    );
    listener.stop().await;
}

/// `[firestore] database`: the database id is in the header, the request and the names.
#[tokio::test]
async fn a_named_database_is_used_in_every_name_and_header() {
    let mut fake = Fake::start().await;
    let listener = Running::start(&fake.endpoint, |_| {});
    let location = FirestoreLocation::new("p", "checkouts", "a")
        .and_then(|l| l.with_database("payments-eu"))
        .expect("location");
    listener.handle.watch(WatchTarget {
        checkout_id: id("a"),
        location,
        resume_token: None,
        resume_read_time: None,
    });
    let mut call = fake.call().await;
    assert_eq!(
        call.headers
            .get("google-cloud-resource-prefix")
            .and_then(|v| v.to_str().ok()),
        Some("projects/p/databases/payments-eu")
    );
    let request = call.request().await;
    assert_eq!(request.database, "projects/p/databases/payments-eu");
    let Some(listen_request::TargetChange::AddTarget(target)) = request.target_change else {
        panic!("expected AddTarget");
    };
    let Some(target::TargetType::Documents(docs)) = target.target_type else {
        panic!("a documents target");
    };
    assert_eq!(
        docs.documents,
        ["projects/p/databases/payments-eu/documents/checkouts/a"]
    );
    listener.stop().await;
}

/// Listen calls are opened `OPENS_AT_ONCE` at a time: a call waiting for its response headers
/// holds its permit, and the next call goes out as soon as one is answered. Without the bound,
/// every checkout's call goes out at once (per-document mode, one call per checkout).
#[tokio::test]
async fn listen_calls_are_opened_a_few_at_a_time() {
    use super::shared::OPENS_AT_ONCE;
    let mut fake = Fake::holding_headers().await;
    let listener = Running::start(&fake.endpoint, |_| {});
    for n in 0..OPENS_AT_ONCE + 3 {
        listener.watch(&format!("c{n}"), None);
    }
    let mut held = Vec::new();
    for _ in 0..OPENS_AT_ONCE {
        held.push(fake.call().await);
    }
    let beyond = timeout(Duration::from_millis(300), fake.calls.recv()).await;
    assert!(
        beyond.is_err(),
        "a call beyond the first {OPENS_AT_ONCE} went out before any was answered"
    );
    for call in held.iter_mut().take(2) {
        call.answer_headers();
    }
    let mut next = vec![fake.call().await, fake.call().await];
    for call in &mut next {
        call.answer_headers();
    }
    listener.stop().await;
}

/// A Listen call the server never answers (no response headers) is given up after the open
/// timeout (the idle timeout when shorter), reported as a disconnection naming it, and opened
/// again; the reopened call serves the target.
#[tokio::test]
async fn a_listen_call_that_never_answers_is_reported_and_opened_again() {
    let mut fake = Fake::holding_headers().await;
    let mut listener = Running::start(&fake.endpoint, |options| {
        options.idle_timeout = Duration::from_millis(300);
    });
    listener.watch("a", None);
    let _unanswered = fake.call().await;
    match listener.next().await {
        ListenEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("no answer to the listen call"), "{reason}");
        }
        other => panic!("expected the unanswered call to be reported, got {other:?}"),
    }
    let mut reopened = fake.call().await;
    reopened.answer_headers();
    let (_, document, _) = reopened.add().await;
    assert_eq!(
        document,
        "projects/p/databases/(default)/documents/checkouts/a"
    );
    listener.stop().await;
}
