//! Interop: paywatch's Firestore side against an independent emulator, the npm package
//! `@firestore-emulator/server` (tests/interop/, pinned in package-lock.json): the listener and
//! `ExternalFirestore` on their own, and the whole daemon (Firestore endpoint = the emulator,
//! paymennt API = the sandbox, which writes its documents into the emulator) in both modes.
//!
//! Setup once: `npm ci --prefix tests/interop`. Without Node or node_modules these tests print a
//! skip message and pass, except under `CI=true`, where that is a failure.
//!
//! The emulator differs from production in ways these tests pin down (docs/firestore-interop.md):
//! it never sends resume tokens (so no Checkpoint ever carries one and a restart resumes by the
//! full resend), it reports every change as a RESET followed by the full state, it reads only the
//! first request of a Listen stream (so multiplexed mode falls back to one target per stream),
//! and it sends no heartbeats.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use gcloud_sdk::google::firestore::v1::{
    ListenRequest, ListenResponse, Target, Value, firestore_client::FirestoreClient,
    listen_request, listen_response, target, target_change::TargetChangeType, value,
};
use paywatch::domain::{CheckoutId, FirestoreLocation};
use paywatch::ledger::{Ledger, ListFilter, TrackedVia};
use paywatch::paymennt::wire::LinkRequest;
use paywatch::sandbox::external::ExternalFirestore;
use paywatch::sandbox::sink::DocumentSink;
use paywatch::sandbox::{Sandbox, SandboxOptions};
use paywatch::settings::Settings;
use paywatch::sources::firestore::{
    ListenEvent, Listener, ListenerHandle, ListenerOptions, StreamMode, WatchTarget,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::common::{self, Daemon, history, wait_status};

/// The project every interop document lives in.
const PROJECT: &str = "paywatch-interop";

/// How long any single expected thing may take.
const DEADLINE: Duration = Duration::from_secs(15);

/// For the 200-stream tests: a single-threaded emulator answering 200 Listen calls on a busy
/// 2-core machine can leave one unanswered, which the listener abandons and reopens after
/// its open timeout (10 s); this leaves room for that.
const HEAVY_DEADLINE: Duration = Duration::from_secs(40);

/// Held by the tests that open 200 streams, so two of them never share the 2 CPUs of a small CI
/// machine with each other (each has its own emulator, a single-threaded Node process).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running emulator; killed on drop (and it exits by itself when our stdin pipe closes).
struct Emulator {
    child: tokio::process::Child,
    endpoint: String,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Skips (returns None) without Node or node_modules, unless CI=true, where it panics.
async fn emulator() -> Option<Emulator> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let skip = |why: String| {
        if in_ci {
            panic!("interop: {why} (CI=true makes this a failure)");
        }
        eprintln!("interop: skipped: {why}");
        None
    };
    let dir = interop_dir();
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok {
        return skip("Node.js (`node`) is not installed or not on PATH".into());
    }
    if !dir.join("node_modules/@firestore-emulator/server").is_dir() {
        return skip(format!(
            "the emulator is not installed: run `npm ci` in {}",
            dir.display()
        ));
    }
    let mut child = tokio::process::Command::new("node")
        .arg("emulator.mjs")
        .arg("0")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node emulator.mjs");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = timeout(DEADLINE, lines.next_line())
        .await
        .expect("the emulator printed its ready line in time")
        .expect("read the emulator's stdout")
        .expect("the emulator printed a ready line before exiting");
    let address = line
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("unexpected first line from the emulator: {line}"))
        .to_owned();
    // Drain the rest of stdout so the emulator never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(&address).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the emulator does not accept connections on {address}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(Emulator {
        child,
        endpoint: format!("http://{address}"),
    })
}

fn location(document: &str) -> FirestoreLocation {
    FirestoreLocation::new(PROJECT, "checkouts", document).expect("valid location")
}

fn checkout(document: &str) -> CheckoutId {
    document.parse().expect("valid checkout id")
}

fn fields(status: &str) -> BTreeMap<String, Value> {
    BTreeMap::from([(
        "status".to_owned(),
        Value {
            value_type: Some(value::ValueType::StringValue(status.to_owned())),
        },
    )])
}

/// A listener with its event receiver.
struct Running {
    handle: ListenerHandle,
    events: mpsc::Receiver<ListenEvent>,
    cancel: CancellationToken,
}

impl Running {
    fn start(options: ListenerOptions) -> Running {
        let (sender, events) = mpsc::channel(4096);
        let cancel = CancellationToken::new();
        let handle = Listener::start(options, sender, cancel.clone()).expect("listener starts");
        Running {
            handle,
            events,
            cancel,
        }
    }

    fn watch(&self, document: &str, resume_token: Option<Vec<u8>>) {
        self.handle.watch(WatchTarget {
            checkout_id: checkout(document),
            location: location(document),
            resume_token,
            resume_read_time: None,
        });
    }

    /// Receives events until `done` says so; returns them all. Panics after [`DEADLINE`].
    async fn until(
        &mut self,
        what: &str,
        done: impl FnMut(&ListenEvent) -> bool,
    ) -> Vec<ListenEvent> {
        self.until_within(what, DEADLINE, done).await
    }

    /// [`Running::until`] with its own deadline.
    async fn until_within(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&ListenEvent) -> bool,
    ) -> Vec<ListenEvent> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {seen:#?}"))
                .expect("the listener keeps the channel open");
            let stop = done(&event);
            seen.push(event);
            if stop {
                return seen;
            }
        }
    }

    async fn changed(&mut self, document: &str) -> Vec<ListenEvent> {
        let id = checkout(document);
        self.until(
            &format!("Changed({document})"),
            |e| matches!(e, ListenEvent::Changed(n) if n.checkout_id == id),
        )
        .await
    }

    async fn stop(self) {
        self.cancel.cancel();
        timeout(DEADLINE, self.handle.closed())
            .await
            .expect("the listener's tasks end promptly after cancel");
    }
}

fn changed_at_of(events: &[ListenEvent], document: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let id = checkout(document);
    events.iter().find_map(|e| match e {
        ListenEvent::Changed(n) if n.checkout_id == id => n.changed_at,
        _ => None,
    })
}

fn tokens_in(events: &[ListenEvent]) -> usize {
    events
        .iter()
        .map(|e| match e {
            ListenEvent::Checkpoint { tokens, .. } => tokens.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reports_first_snapshot_change_and_delete_in_both_modes() {
    let Some(emulator) = emulator().await else {
        return;
    };
    let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
    for (mode, document) in [
        (StreamMode::Multiplexed, "both-modes-m"),
        (StreamMode::PerDocument, "both-modes-p"),
    ] {
        sink.put(&location(document), &fields("PENDING"))
            .await
            .expect("create document");
        let mut listener = Running::start(ListenerOptions::local(&emulator.endpoint, mode));
        listener.watch(document, None);
        let first = listener.changed(document).await;
        assert!(
            first.iter().any(|e| matches!(e, ListenEvent::Connected { project, targets: 1, .. } if project == PROJECT)),
            "{mode:?}: Connected before the first change: {first:#?}"
        );
        assert!(
            changed_at_of(&first, document).is_some(),
            "{mode:?}: update_time carried"
        );
        assert_eq!(listener.handle.watched(), 1);
        assert_eq!(listener.handle.open_streams(), 1);

        sink.put(&location(document), &fields("PAID"))
            .await
            .expect("update document");
        let update = listener.changed(document).await;
        assert!(changed_at_of(&update, document) >= changed_at_of(&first, document));

        sink.delete(&location(document))
            .await
            .expect("delete document");
        let deleted = listener.changed(document).await;
        // Interop finding: no resume token is ever sent, so no checkpoint carries one.
        assert_eq!(tokens_in(&[first, update, deleted].concat()), 0, "{mode:?}");
        listener.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reports_changes_made_while_down() {
    let Some(emulator) = emulator().await else {
        return;
    };
    let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
    let (changed, unchanged) = ("restart-changed", "restart-unchanged");
    sink.put(&location(changed), &fields("PENDING"))
        .await
        .expect("create");
    sink.put(&location(unchanged), &fields("PENDING"))
        .await
        .expect("create");

    let options = ListenerOptions::local(&emulator.endpoint, StreamMode::PerDocument);
    let mut first = Running::start(options.clone());
    first.watch(changed, None);
    first.watch(unchanged, None);
    let mut seen = first.changed(changed).await;
    if changed_at_of(&seen, unchanged).is_none() {
        seen.extend(first.changed(unchanged).await);
    }
    let saved = tokens_in(&seen);
    first.stop().await;

    // While the daemon is down.
    sink.put(&location(changed), &fields("PAID"))
        .await
        .expect("update while down");
    let paid_at = chrono::Utc::now();

    let mut second = Running::start(options);
    // The emulator gave no tokens to save (interop finding), so both resume from scratch.
    assert_eq!(saved, 0, "the emulator sends no resume tokens");
    second.watch(changed, None);
    second.watch(unchanged, None);
    let seen = second.changed(changed).await;
    let at = changed_at_of(&seen, changed).expect("update_time of the new version");
    assert!(
        at <= paid_at && at >= paid_at - chrono::Duration::seconds(10),
        "{at} vs {paid_at}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_documents_per_document_mode_all_report() {
    let _heavy = HEAVY.lock().await;
    let Some(emulator) = emulator().await else {
        return;
    };
    let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
    let documents: Vec<String> = (0..200).map(|i| format!("many-{i:03}")).collect();
    for document in &documents {
        sink.put(&location(document), &fields("PENDING"))
            .await
            .expect("create");
    }
    let mut listener = Running::start(ListenerOptions::local(
        &emulator.endpoint,
        StreamMode::PerDocument,
    ));
    for document in &documents {
        listener.watch(document, None);
    }
    let mut waiting: HashSet<CheckoutId> = documents.iter().map(|d| checkout(d)).collect();
    listener
        .until_within(
            "a first Changed for each of 200 documents",
            HEAVY_DEADLINE,
            |e| {
                if let ListenEvent::Changed(n) = e {
                    waiting.remove(&n.checkout_id);
                }
                waiting.is_empty()
            },
        )
        .await;
    assert_eq!(listener.handle.watched(), 200);
    assert_eq!(listener.handle.open_streams(), 200);
    assert_eq!(
        listener.handle.connections(),
        2,
        "100 streams per connection"
    );
    for document in &documents[..50] {
        listener.handle.unwatch(&checkout(document));
    }
    assert_eq!(listener.handle.watched(), 150);
    let start = Instant::now();
    while listener.handle.open_streams() != 150 {
        assert!(start.elapsed() < DEADLINE, "unwatched streams close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_stream_is_reopened_by_the_idle_watchdog() {
    let Some(emulator) = emulator().await else {
        return;
    };
    let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
    let document = "idle-watchdog";
    sink.put(&location(document), &fields("PENDING"))
        .await
        .expect("create");
    let mut options = ListenerOptions::local(&emulator.endpoint, StreamMode::Multiplexed);
    // The emulator sends no heartbeats: every stream is silent after its initial state.
    options.idle_timeout = Duration::from_millis(700);
    let mut listener = Running::start(options);
    listener.watch(document, None);
    listener.changed(document).await;
    let seen = listener
        .until("Disconnected by the idle watchdog", |e| {
            matches!(e, ListenEvent::Disconnected { .. })
        })
        .await;
    let Some(ListenEvent::Disconnected { reason, .. }) = seen.last() else {
        panic!("ended on Disconnected");
    };
    assert!(reason.contains("no message"), "{reason}");
    listener
        .until("Connected again", |e| {
            matches!(e, ListenEvent::Connected { .. })
        })
        .await;
    // The reopened stream still reports changes.
    sink.put(&location(document), &fields("PAID"))
        .await
        .expect("update");
    listener.changed(document).await;
    listener.stop().await;
}

/// Multiplexed mode against the emulator, which reads only a stream's first request: targets
/// added to a live stream are never acknowledged, move to fresh streams after `add_ack_timeout`,
/// and the project falls back to one target per stream. Every document is watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiplexed_mode_falls_back_to_one_target_per_stream() {
    let Some(emulator) = emulator().await else {
        return;
    };
    let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
    let documents: Vec<String> = (0..5).map(|i| format!("fallback-{i}")).collect();
    for document in &documents {
        sink.put(&location(document), &fields("PENDING"))
            .await
            .expect("create");
    }
    let mut options = ListenerOptions::local(&emulator.endpoint, StreamMode::Multiplexed);
    options.add_ack_timeout = Duration::from_millis(500);
    let mut listener = Running::start(options);
    let started = Instant::now();
    listener.watch(&documents[0], None);
    listener.changed(&documents[0]).await;
    assert_eq!(listener.handle.open_streams(), 1);
    // Live adds on the open stream: never acknowledged by the emulator.
    for document in &documents[1..] {
        listener.watch(document, None);
    }
    let mut waiting: HashSet<CheckoutId> = documents[1..].iter().map(|d| checkout(d)).collect();
    listener
        .until_within(
            "a first Changed for each live-added document",
            HEAVY_DEADLINE,
            |e| {
                if let ListenEvent::Changed(n) = e {
                    waiting.remove(&n.checkout_id);
                }
                waiting.is_empty()
            },
        )
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "only after the ack timeout"
    );
    assert_eq!(listener.handle.watched(), 5);
    assert_eq!(listener.handle.open_streams(), 5, "one target per stream");
    // Changes reach every one of them, and unwatching closes a stream.
    sink.put(&location(&documents[4]), &fields("PAID"))
        .await
        .expect("update");
    listener.changed(&documents[4]).await;
    listener.handle.unwatch(&checkout(&documents[4]));
    let start = Instant::now();
    while listener.handle.open_streams() != 4 {
        assert!(start.elapsed() < DEADLINE, "the unwatched stream closes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listener.stop().await;
}

/// Pins the emulator's own Listen behaviour on a raw stream (no listener), for
/// docs/firestore-interop.md: full state again on each change (RESET), no resume tokens, no
/// DocumentDelete, and only the first request of a stream read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_protocol_differences_on_a_raw_stream() {
    let Some(emulator) = emulator().await else {
        return;
    };
    let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
    let (first, second) = ("raw-first", "raw-second");
    sink.put(&location(first), &fields("PENDING"))
        .await
        .expect("create");
    sink.put(&location(second), &fields("PENDING"))
        .await
        .expect("create");

    let mut client = FirestoreClient::connect(emulator.endpoint.clone())
        .await
        .expect("connect");
    let (requests, outgoing) = mpsc::unbounded_channel();
    let add = |id: i32, document: &str| ListenRequest {
        database: location(document).database_name(),
        labels: Default::default(),
        request_options: None,
        target_change: Some(listen_request::TargetChange::AddTarget(Target {
            target_id: id,
            once: false,
            expected_count: None,
            target_type: Some(target::TargetType::Documents(target::DocumentsTarget {
                documents: vec![location(document).document_name()],
            })),
            resume_type: Some(target::ResumeType::ResumeToken(b"not-a-token".to_vec())),
        })),
    };
    requests.send(add(1, first)).expect("queue AddTarget 1");
    requests.send(add(2, second)).expect("queue AddTarget 2");
    let mut responses = client
        .listen(tokio_stream::wrappers::UnboundedReceiverStream::new(
            outgoing,
        ))
        .await
        .expect("listen")
        .into_inner();
    let mut take = async |n: usize| take_described(&mut responses, n).await;
    // The resume token is ignored: the full state is sent. CURRENT and the marker carry no token.
    assert_eq!(
        take(4).await,
        [
            "ADD[1] token=0",
            "DOC[1]",
            "CURRENT[1] token=0",
            "NO_CHANGE[] token=0"
        ]
    );
    // A second AddTarget on the live stream is never read: writing the second document first
    // and then the first shows nothing for target 2 before target 1's change.
    sink.put(&location(second), &fields("PAID"))
        .await
        .expect("update second");
    sink.put(&location(first), &fields("PAID"))
        .await
        .expect("update first");
    assert_eq!(
        take(4).await,
        [
            "RESET[1] token=0",
            "DOC[1]",
            "CURRENT[1] token=0",
            "NO_CHANGE[] token=0"
        ]
    );
    // A delete is a RESET with no document, not a DocumentDelete.
    sink.delete(&location(first)).await.expect("delete first");
    assert_eq!(
        take(3).await,
        [
            "RESET[1] token=0",
            "CURRENT[1] token=0",
            "NO_CHANGE[] token=0"
        ]
    );
    drop(requests);
}

/// The next `n` responses, described compactly: "ADD[1] token=0", "DOC[1]", ...
async fn take_described(responses: &mut tonic::Streaming<ListenResponse>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let response = timeout(DEADLINE, responses.message())
            .await
            .unwrap_or_else(|_| panic!("a response in time; had {out:?}"))
            .expect("no stream error")
            .expect("the stream stays open");
        out.push(match &response.response_type {
            Some(listen_response::ResponseType::TargetChange(c)) => format!(
                "{}{:?} token={}",
                TargetChangeType::try_from(c.target_change_type)
                    .map(|t| t.as_str_name())
                    .unwrap_or("?"),
                c.target_ids,
                c.resume_token.len()
            ),
            Some(listen_response::ResponseType::DocumentChange(c)) => {
                format!("DOC{:?}", c.target_ids)
            }
            Some(listen_response::ResponseType::DocumentDelete(d)) => {
                format!("DELETE{:?}", d.removed_target_ids)
            }
            Some(listen_response::ResponseType::DocumentRemove(d)) => {
                format!("REMOVE_DOC{:?}", d.removed_target_ids)
            }
            Some(listen_response::ResponseType::Filter(f)) => {
                format!("FILTER[{}]={}", f.target_id, f.count)
            }
            None => "EMPTY".into(),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The daemon against the emulator: paywatch's Firestore endpoint is the emulator, its paymennt
// API is the sandbox, and the sandbox writes its checkout documents into the emulator.
// ---------------------------------------------------------------------------------------------

/// Both stream modes, as the config spells them.
const MODES: [&str; 2] = ["multiplexed", "per-document"];

/// The multiplexed fallback's ack timeout in these tests (production default: 10 s).
const ADD_ACK_TIMEOUT: &str = "1s";

/// An emulator, a sandbox writing into it, and a daemon config pointed at both.
struct Stack {
    // Dropped last: the sandbox and daemon talk to it.
    _emulator: Emulator,
    sandbox: Sandbox,
    ledger: Ledger,
    settings: Settings,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// None when the emulator is unavailable (skipped, see [`emulator`]).
    async fn start(mode: &str, expiry_minute: Duration) -> Option<Stack> {
        let emulator = emulator().await?;
        let sink = ExternalFirestore::new(&emulator.endpoint).expect("sink");
        let sandbox = Sandbox::start(SandboxOptions {
            expiry_minute,
            document_sink: Some(Arc::new(sink)),
            ..SandboxOptions::default()
        })
        .await
        .expect("sandbox starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let text = common::config_text(
            dir.path(),
            &sandbox.api_base_url(),
            &emulator.endpoint,
            sandbox.api_key(),
            sandbox.api_secret(),
            mode,
            "",
        )
        .replace(
            "[firestore]\n",
            &format!("[firestore]\nadd_ack_timeout = \"{ADD_ACK_TIMEOUT}\"\n"),
        );
        let path = dir.path().join("paywatch.toml");
        std::fs::write(&path, text).expect("write config");
        let settings = Settings::load_with_env(Some(&path), Vec::new()).expect("valid config");
        assert_eq!(settings.firestore.endpoint(), emulator.endpoint);
        assert_eq!(settings.firestore.add_ack_timeout, Duration::from_secs(1));
        let ledger = Ledger::open(&settings.ledger.path).await.expect("ledger");
        Some(Stack {
            _emulator: emulator,
            sandbox,
            ledger,
            settings,
            path,
            _dir: dir,
        })
    }

    async fn daemon(&self) -> Daemon {
        Daemon::start(&self.settings, &self.path).await
    }

    async fn track(&self, order: &str) -> CheckoutId {
        common::create_and_track(&self.sandbox, &self.ledger, order).await
    }

    /// A link that expires after `minutes` sandbox minutes, tracked.
    async fn track_expiring(&self, order: &str, minutes: i64) -> CheckoutId {
        let request = LinkRequest {
            expires_in: Some(minutes),
            ..common::link_request(order, "100.00")
        };
        let checkout = self
            .sandbox
            .state()
            .create_link(&request)
            .await
            .expect("link created");
        let facts = checkout.facts().expect("complete");
        self.ledger
            .track(&facts, TrackedVia::Track)
            .await
            .expect("tracked");
        facts.id
    }

    fn calls(&self, id: &CheckoutId) -> u64 {
        self.sandbox.state().get_checkout_calls(id)
    }

    /// The source of the transition to `status`.
    async fn source_of(&self, id: &CheckoutId, status: &str) -> String {
        self.ledger
            .transitions(id)
            .await
            .expect("transitions")
            .into_iter()
            .find(|t| t.to.as_str() == status)
            .unwrap_or_else(|| panic!("{id} has a transition to {status}"))
            .source
    }

    async fn count(&self, status: &str) -> usize {
        self.ledger
            .list(&ListFilter {
                statuses: vec![status.into()],
                ..Default::default()
            })
            .await
            .expect("list")
            .len()
    }

    async fn stop(self) {
        self.sandbox.shutdown().await;
    }
}

/// Waits until the daemon watches exactly `n` checkouts.
async fn wait_watched(daemon: &Daemon, n: usize) {
    let mut status = daemon.status.clone();
    timeout(common::DEADLINE, status.wait_for(|s| s.watched == n))
        .await
        .unwrap_or_else(|_| panic!("the daemon watches {n} checkouts in time"))
        .expect("daemon status");
}

/// A link's first snapshot, pay, fail, partial and full refund, and expiry each reach the ledger
/// verified, with the right history, through the emulator's Listen in both modes; a document
/// deleted upstream is re-verified, records nothing and later changes still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_daemon_records_every_lifecycle_in_both_modes() {
    for mode in MODES {
        let started = Instant::now();
        // One sandbox minute = 400 ms: the expiring link (15 minutes, paymennt's minimum)
        // expires 6 s after creation.
        let Some(stack) = Stack::start(mode, Duration::from_millis(400)).await else {
            return;
        };
        // Created first, so it is the first target of the first stream in multiplexed mode and
        // is verified PENDING well before it expires.
        let expiring = stack.track_expiring("ORD-EXPIRE", 15).await;
        let paid = stack.track("ORD-PAY").await;
        let failed = stack.track("ORD-FAIL").await;
        let deleted = stack.track("ORD-DELETE").await;
        let daemon = stack.daemon().await;
        for id in [&expiring, &paid, &failed, &deleted] {
            wait_status(&stack.ledger, id, "PENDING").await;
        }

        // A link created while the daemon runs: its document is watched (first snapshot).
        let cli_ledger = Ledger::open(&stack.settings.ledger.path)
            .await
            .expect("ledger");
        let late = common::create_and_track(&stack.sandbox, &cli_ledger, "ORD-LATE").await;
        wait_watched(&daemon, 5).await;
        wait_status(&stack.ledger, &late, "PENDING").await;
        stack.sandbox.state().pay(&late).await.expect("pay");
        wait_status(&stack.ledger, &late, "PAID").await;

        stack.sandbox.state().pay(&paid).await.expect("pay");
        wait_status(&stack.ledger, &paid, "PAID").await;
        stack
            .sandbox
            .state()
            .refund(&paid, Some("40.00".parse().expect("decimal")))
            .await
            .expect("partial refund");
        wait_status(&stack.ledger, &paid, "PARTIALLY_REFUNDED").await;
        stack
            .sandbox
            .state()
            .refund(&paid, None)
            .await
            .expect("refund");
        wait_status(&stack.ledger, &paid, "REFUNDED").await;
        assert_eq!(
            history(&stack.ledger, &paid).await,
            ["PENDING", "PAID", "PARTIALLY_REFUNDED", "REFUNDED"],
            "{mode}"
        );
        for status in ["PAID", "PARTIALLY_REFUNDED", "REFUNDED"] {
            assert_eq!(
                stack.source_of(&paid, status).await,
                "firestore",
                "{mode} {status}"
            );
        }

        stack.sandbox.state().fail(&failed).await.expect("fail");
        wait_status(&stack.ledger, &failed, "FAILED").await;
        assert_eq!(
            history(&stack.ledger, &failed).await,
            ["PENDING", "FAILED"],
            "{mode}"
        );

        // Deleted upstream: a nudge like any change. Get Checkout still says PENDING, so nothing
        // is recorded and the checkout stays watched; a later payment rewrites the document.
        let calls = stack.calls(&deleted);
        stack
            .sandbox
            .state()
            .delete_document(&deleted)
            .await
            .expect("delete upstream");
        common::wait_for("the delete to be re-verified", common::DEADLINE, || async {
            (stack.calls(&deleted) > calls).then_some(())
        })
        .await;
        assert_eq!(
            common::status_of(&stack.ledger, &deleted).await.as_deref(),
            Some("PENDING")
        );
        stack.sandbox.state().pay(&deleted).await.expect("pay");
        wait_status(&stack.ledger, &deleted, "PAID").await;
        assert_eq!(
            history(&stack.ledger, &deleted).await,
            ["PENDING", "PAID"],
            "{mode}"
        );
        assert_eq!(stack.source_of(&deleted, "PAID").await, "firestore");

        // The sandbox's timer expires the link; the document change brings EXPIRED.
        wait_status(&stack.ledger, &expiring, "EXPIRED").await;
        assert_eq!(
            history(&stack.ledger, &expiring).await,
            ["PENDING", "EXPIRED"],
            "{mode}"
        );
        assert_eq!(stack.source_of(&expiring, "EXPIRED").await, "firestore");

        // Still watched: PAID (late), PAID (deleted); the final ones were dropped.
        wait_watched(&daemon, 2).await;
        daemon.stop().await;
        stack.stop().await;
        eprintln!(
            "{mode}: lifecycles against the emulator in {:?}",
            started.elapsed()
        );
    }
}

/// Stop the daemon, pay while it is down, restart: PAID is recorded. The emulator has no resume
/// tokens, so the restart resumes by the full resend: every checkout is reported changed and
/// re-verified (against the sandbox or production only the changed one is: see tests/daemon.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_daemon_restart_resumes_by_the_full_resend_in_both_modes() {
    for mode in MODES {
        let Some(stack) = Stack::start(mode, Duration::from_secs(60)).await else {
            return;
        };
        let mut ids = Vec::new();
        for n in 0..4 {
            ids.push(stack.track(&format!("ORD-{n}")).await);
        }
        let daemon = stack.daemon().await;
        // Each checkout is verified for its first snapshot from Listen (the reconciler's
        // start-up sweep waits for that snapshot and then needs no call). Stop once every one
        // is verified and nothing is pending.
        common::wait_for("first snapshots verified", common::DEADLINE, || async {
            let set = stack.ledger.watch_set().await.expect("watch set");
            let done =
                ids.iter().all(|id| stack.calls(id) >= 1) && set.iter().all(|e| !e.needs_verify);
            done.then_some(())
        })
        .await;
        daemon.stop().await;
        let set = stack.ledger.watch_set().await.expect("watch set");
        assert_eq!(set.len(), 4);
        assert!(
            set.iter()
                .all(|e| e.resume_token.is_none() && !e.needs_verify),
            "{mode}: verified, and no token to resume with (the emulator sends none)"
        );
        let before: Vec<u64> = ids.iter().map(|id| stack.calls(id)).collect();
        stack
            .sandbox
            .state()
            .pay(&ids[0])
            .await
            .expect("pay while down");

        let daemon = stack.daemon().await;
        wait_status(&stack.ledger, &ids[0], "PAID").await;
        assert_eq!(
            history(&stack.ledger, &ids[0]).await,
            ["PENDING", "PAID"],
            "{mode}"
        );
        // Nothing needed verifying at start, so every further Get Checkout comes from the
        // listener reporting the checkout changed (the reconciler's startup sweep may carry out
        // such a nudge itself, as the change also marks the checkout needs_verify first).
        for id in &ids[1..] {
            let before = before[ids.iter().position(|x| x == id).expect("listed")];
            common::wait_for(
                "the full resend to re-verify an unchanged checkout",
                common::DEADLINE,
                || async { (stack.calls(id) > before).then_some(()) },
            )
            .await;
            assert_eq!(history(&stack.ledger, id).await, ["PENDING"], "{mode}");
        }
        daemon.stop().await;
        stack.stop().await;
    }
}

/// 200 checkouts watched at once, verified, paid, all recorded, in both modes. In multiplexed
/// mode the emulator acknowledges only each stream's first target, so this also runs the
/// listener's fallback to one target per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_daemon_two_hundred_checkouts_all_complete_in_both_modes() {
    const CHECKOUTS: usize = 200;
    let _heavy = HEAVY.lock().await;
    for mode in MODES {
        let Some(stack) = Stack::start(mode, Duration::from_secs(60)).await else {
            return;
        };
        let mut ids = Vec::with_capacity(CHECKOUTS);
        for n in 0..CHECKOUTS {
            ids.push(stack.track(&format!("ORD-{n}")).await);
        }
        let started = Instant::now();
        let daemon = stack.daemon().await;
        wait_watched(&daemon, CHECKOUTS).await;
        common::wait_for(
            "every checkout verified PENDING",
            common::DEADLINE,
            || async { (stack.count("PENDING").await == CHECKOUTS).then_some(()) },
        )
        .await;
        let verified = started.elapsed();
        for id in &ids {
            stack.sandbox.state().pay(id).await.expect("pay");
        }
        common::wait_for("every payment recorded", common::DEADLINE, || async {
            (stack.count("PAID").await == CHECKOUTS).then_some(())
        })
        .await;
        for id in &ids {
            assert_eq!(
                history(&stack.ledger, id).await,
                ["PENDING", "PAID"],
                "{mode}"
            );
            // Each payment came through the emulator's Listen (the reconciler ran only at start).
            assert_eq!(stack.source_of(id, "PAID").await, "firestore", "{mode}");
        }
        eprintln!(
            "{mode}: {CHECKOUTS} checkouts verified after {verified:?}, all paid after {:?}",
            started.elapsed()
        );
        daemon.stop().await;
        stack.stop().await;
    }
}
