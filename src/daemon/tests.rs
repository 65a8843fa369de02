//! The daemon's own loops against an on-disk ledger: noting changes before resume tokens.

use std::time::{Duration, Instant};

use super::*;
use crate::domain::Source;
use crate::paymennt::VerifiedCheckout;

const DEADLINE: Duration = Duration::from_secs(20);

/// A verified checkout whose request took the ledger's next ticket (as the verifier's do).
fn verified(ledger: &Ledger, id: &str) -> VerifiedCheckout {
    let ticket = ledger.issue_ticket().expect("ticket");
    VerifiedCheckout::for_tests_with(
        &format!(
            r#"{{"id":"{id}","orderId":"ORD-{id}","requestId":"REQ-{id}","currency":"AED","amount":10.00,"status":"PENDING","totalRefunded":0,"firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-{id}"}}"#
        ),
        ticket,
        chrono::Utc::now(),
    )
}

/// Records checkout `id` as verified PENDING (watched, no change pending).
fn verify_once(ledger: &Ledger, id: &str) {
    ledger
        .apply(
            &verified(ledger, id),
            Source::Reconcile,
            None,
            &[],
            Duration::from_secs(3600),
        )
        .expect("verified once");
}

fn id(text: &str) -> CheckoutId {
    text.parse().expect("checkout id")
}

fn changed(text: &str) -> ListenEvent {
    ListenEvent::Changed(Nudge {
        checkout_id: id(text),
        source: Source::Firestore,
        seen_at: Instant::now(),
        changed_at: None,
        seen_after: None,
        ticket: None,
    })
}

fn checkpoint(ids: &[&str], token: &str) -> ListenEvent {
    ListenEvent::Checkpoint {
        tokens: ids
            .iter()
            .map(|text| (id(text), token.as_bytes().to_vec()))
            .collect(),
        read_time: None,
    }
}

/// (resume token, needs_verify) of a watched checkout.
fn state(ledger: &Ledger, text: &str) -> (Option<String>, bool) {
    let entry = ledger
        .watch_set()
        .expect("watch set")
        .into_iter()
        .find(|entry| entry.checkout_id == id(text))
        .expect("watched");
    (
        entry
            .resume_token
            .map(|token| String::from_utf8_lossy(&token).into_owned()),
        entry.needs_verify,
    )
}

/// Runs the daemon's listener loop over `events` into `ledger` (its nudges are drained);
/// cancel it with the token.
fn consume(
    ledger: &Ledger,
    events: mpsc::Receiver<ListenEvent>,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let (nudges, mut nudged) = mpsc::channel(64);
    tokio::spawn(async move { while nudged.recv().await.is_some() {} });
    let cancel = CancellationToken::new();
    let health = Health::new(
        ledger.clone(),
        None,
        tokio::sync::watch::channel(crate::verifier::VerifierStats::default()).1,
        Duration::from_secs(60),
    );
    let task = tokio::spawn(consume_listen_events(
        events,
        ledger.clone(),
        nudges,
        health,
        cancel.clone(),
        crate::metrics::Metrics::disabled(),
        "none",
    ));
    (task, cancel)
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_change_that_could_not_be_noted_keeps_its_own_retry_and_blocks_only_its_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    let ledger = Ledger::open(&path).expect("ledger");
    for checkout in ["1", "2", "3"] {
        verify_once(&ledger, checkout);
        assert_eq!(state(&ledger, checkout), (None, false));
    }
    // The ledger refuses to note checkout 1 (as a busy or failing disk would).
    let other = rusqlite::Connection::open(&path).expect("second connection");
    other
        .execute_batch(
            "CREATE TRIGGER refuse_one BEFORE UPDATE OF needs_verify ON checkouts
             WHEN NEW.id = '1' BEGIN SELECT RAISE(ABORT, 'database is locked (test)'); END;",
        )
        .expect("trigger");

    let (events, receiver) = mpsc::channel(64);
    let (task, cancel) = consume(&ledger, receiver);

    // Checkout 1 changes; noting it fails, so its token is not saved.
    events.send(changed("1")).await.expect("send");
    events.send(checkpoint(&["1"], "t1")).await.expect("send");
    // Later, checkout 2 changes and a checkpoint covers both: checkout 1's change is still
    // not noted, so its token must not be saved (a shared flag cleared by 2's note did).
    events.send(changed("2")).await.expect("send");
    events
        .send(checkpoint(&["1", "2"], "t2"))
        .await
        .expect("send");
    // A checkpoint of an unrelated checkout is saved: it shows the batches above are done.
    events.send(checkpoint(&["3"], "t3")).await.expect("send");
    until("checkout 3's token", || state(&ledger, "3").0.is_some()).await;
    assert_eq!(
        state(&ledger, "1"),
        (None, false),
        "no token saved past checkout 1's unnoted change"
    );

    // The ledger recovers: the running loop notes checkout 1 on its own, with no new event.
    other
        .execute_batch("DROP TRIGGER refuse_one")
        .expect("drop trigger");
    until("checkout 1 to be noted", || state(&ledger, "1").1).await;
    assert!(state(&ledger, "2").1, "checkout 2's change is noted too");
    // From then on its tokens are saved again.
    events
        .send(checkpoint(&["1", "2"], "t4"))
        .await
        .expect("send");
    until("checkout 1's token", || {
        state(&ledger, "1").0.as_deref() == Some("t4")
    })
    .await;

    cancel.cancel();
    task.await.expect("the loop ends");
}

#[tokio::test]
async fn a_batch_of_checkpoints_is_saved_in_one_write_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(&dir.path().join("paywatch.db")).expect("ledger");
    let ids: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    for checkout in &ids {
        verify_once(&ledger, checkout);
    }
    // One batch, as a start-up's first snapshots arrive: twenty checkpoints, a later token for
    // checkout 1, checkout 2's token forgotten (a RESET), then a checkpoint of checkout 3.
    let (events, receiver) = mpsc::channel(64);
    for checkout in &ids {
        events
            .send(checkpoint(&[checkout.as_str()], &format!("a-{checkout}")))
            .await
            .expect("send");
    }
    events.send(checkpoint(&["1"], "b-1")).await.expect("send");
    events
        .send(ListenEvent::ForgetToken(id("2")))
        .await
        .expect("send");
    events.send(checkpoint(&["3"], "c-3")).await.expect("send");
    let before = crate::ledger::testing::wal_commits(&ledger);
    let (task, cancel) = consume(&ledger, receiver);
    until("checkout 3's last token", || {
        state(&ledger, "3").0.as_deref() == Some("c-3")
    })
    .await;
    assert_eq!(
        state(&ledger, "1").0.as_deref(),
        Some("b-1"),
        "the later token wins"
    );
    assert_eq!(state(&ledger, "2").0, None, "forgotten after it was saved");
    assert_eq!(state(&ledger, "20").0.as_deref(), Some("a-20"));
    // The checkpoints before the forget in one write, the forget, the last checkpoint: three
    // commits where one per checkpoint took 22.
    let commits = crate::ledger::testing::wal_commits(&ledger) - before;
    assert_eq!(commits, 3, "{commits} commits for one batch");
    cancel.cancel();
    task.await.expect("the loop ends");
}

/// Issue 21: running as root with a hook that would run as root is warned about, naming the
/// hook; not as another user, and not when every hook has its own `run_as`.
#[test]
fn root_with_hooks_running_as_root_is_warned_about() {
    let mut plain = crate::settings::HookSettings::for_tests("mark-paid", &[]);
    let mut switched = crate::settings::HookSettings::for_tests("notify", &[]);
    switched.run_as = Some("shop".into());
    let warning = root_warning(true, &[plain.clone(), switched.clone()]).expect("a warning");
    assert!(
        warning.contains("hook(s) 'mark-paid' run as root"),
        "{warning}"
    );
    assert!(!warning.contains("notify"), "{warning}");
    assert!(warning.contains("run_as"), "names the fix: {warning}");
    assert_eq!(root_warning(false, &[plain.clone()]), None, "not root");
    assert_eq!(root_warning(true, &[]), None, "no hooks");
    plain.run_as = Some("shop:shop".into());
    let mut posted = crate::settings::HookSettings::for_tests("shop", &[]);
    posted.command.clear();
    posted.url = Some("https://shop.example/paywatch".into());
    assert_eq!(
        root_warning(true, &[plain, switched, posted]),
        None,
        "every command hook switches user; a URL hook (issue 24) runs no process"
    );
}

/// Issue 21: the open-file limit must hold the connection cap plus the daemon's own share;
/// the refusal names both numbers.
#[test]
fn an_open_file_limit_too_low_for_the_connection_cap_is_refused_naming_both() {
    let mut settings = Settings::load_with_env(None, Vec::new()).expect("the defaults load");
    settings.http.listen = Some("127.0.0.1:0".parse().expect("addr"));
    settings.http.max_connections = 256;
    let needed = open_files_needed(&settings);
    assert_eq!(
        needed,
        256 + RESERVED_FDS
            + 4 * settings.hooks_concurrency as u64
            + settings.paymennt.concurrency as u64
    );
    assert!(check_open_file_limit(&settings, needed).is_ok());
    let error = check_open_file_limit(&settings, 300).expect_err("too low");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "the open-file limit is 300, but [http] max_connections = 256 needs at least {needed}"
        )),
        "{text}"
    );
    assert!(text.contains("LimitNOFILE="), "{text}");
    // Without a listener the cap costs nothing.
    settings.http.listen = None;
    assert!(check_open_file_limit(&settings, 300).is_ok());
}
