//! Interop: the Firestore listener and `ExternalFirestore` against an independent emulator, the
//! npm package `@firestore-emulator/server` (tests/interop/, pinned in package-lock.json).
//!
//! Setup once: `cd tests/interop && npm ci`. Without Node or node_modules these tests print a
//! skip message and pass, except under `CI=true`, where that is a failure.
//!
//! The emulator differs from production in ways these tests pin down (docs/firestore-interop.md):
//! it never sends resume tokens (so no Checkpoint ever carries one), it reports every change as a
//! RESET followed by the full state, it reads only the first request of a Listen stream (so a
//! multiplexed stream carries one target), and it sends no heartbeats.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use gcloud_sdk::google::firestore::v1::{
    ListenRequest, ListenResponse, Target, Value, firestore_client::FirestoreClient,
    listen_request, listen_response, target, target_change::TargetChangeType, value,
};
use paywatch::domain::{CheckoutId, FirestoreLocation};
use paywatch::sandbox::external::ExternalFirestore;
use paywatch::sandbox::sink::DocumentSink;
use paywatch::sources::firestore::{
    ListenEvent, Listener, ListenerHandle, ListenerOptions, StreamMode, WatchTarget,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// The project every interop document lives in.
const PROJECT: &str = "paywatch-interop";

/// How long any single expected thing may take.
const DEADLINE: Duration = Duration::from_secs(15);

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
        });
    }

    /// Receives events until `done` says so; returns them all. Panics at the deadline.
    async fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&ListenEvent) -> bool,
    ) -> Vec<ListenEvent> {
        let deadline = Instant::now() + DEADLINE;
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
        .until("a first Changed for each of 200 documents", |e| {
            if let ListenEvent::Changed(n) = e {
                waiting.remove(&n.checkout_id);
            }
            waiting.is_empty()
        })
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
