//! The journal against an on-disk ledger: noting changes before resume tokens.

use std::time::{Duration, Instant};

use super::*;
use crate::domain::Source;
use crate::paymennt::VerifiedCheckout;

const DEADLINE: Duration = Duration::from_secs(20);

/// A verified checkout whose request took the ledger's next ticket (as the verifier's do).
async fn verified(ledger: &Ledger, id: &str) -> VerifiedCheckout {
    let ticket = ledger.issue_ticket().await.expect("ticket");
    VerifiedCheckout::for_tests_with(
        &format!(
            r#"{{"id":"{id}","orderId":"ORD-{id}","requestId":"REQ-{id}","currency":"AED","amount":10.00,"status":"PENDING","totalRefunded":0,"firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-{id}"}}"#
        ),
        ticket,
        chrono::Utc::now(),
    )
}

/// Records checkout `id` as verified PENDING (watched, no change pending).
async fn verify_once(ledger: &Ledger, id: &str) {
    ledger
        .apply(
            &verified(ledger, id).await,
            Source::Reconcile,
            None,
            &[],
            Duration::from_secs(3600),
        )
        .await
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
async fn state(ledger: &Ledger, text: &str) -> (Option<String>, bool) {
    let entry = ledger
        .watch_set()
        .await
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

/// Health is not what these tests look at.
struct Unobserved;

impl ListenObserver for Unobserved {
    fn note(&self, _event: &ListenEvent) {}
    fn forget_refusal(&self, _checkout_id: &CheckoutId) {}
}

/// Runs the journal over `events` into `ledger` (its nudges are drained);
/// cancel it with the token.
fn consume(
    ledger: &Ledger,
    events: mpsc::Receiver<ListenEvent>,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let (nudges, mut nudged) = mpsc::channel(64);
    tokio::spawn(async move { while nudged.recv().await.is_some() {} });
    let cancel = CancellationToken::new();
    let health = Unobserved;
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

async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
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
    let ledger = Ledger::open(&path).await.expect("ledger");
    for checkout in ["1", "2", "3"] {
        verify_once(&ledger, checkout).await;
        assert_eq!(state(&ledger, checkout).await, (None, false));
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
    until("checkout 3's token", async || {
        state(&ledger, "3").await.0.is_some()
    })
    .await;
    assert_eq!(
        state(&ledger, "1").await,
        (None, false),
        "no token saved past checkout 1's unnoted change"
    );

    // The ledger recovers: the running loop notes checkout 1 on its own, with no new event.
    other
        .execute_batch("DROP TRIGGER refuse_one")
        .expect("drop trigger");
    until("checkout 1 to be noted", async || {
        state(&ledger, "1").await.1
    })
    .await;
    assert!(
        state(&ledger, "2").await.1,
        "checkout 2's change is noted too"
    );
    // From then on its tokens are saved again.
    events
        .send(checkpoint(&["1", "2"], "t4"))
        .await
        .expect("send");
    until("checkout 1's token", async || {
        state(&ledger, "1").await.0.as_deref() == Some("t4")
    })
    .await;

    cancel.cancel();
    task.await.expect("the loop ends");
}

#[tokio::test]
async fn a_batch_of_checkpoints_is_saved_in_one_write_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(&dir.path().join("paywatch.db"))
        .await
        .expect("ledger");
    let ids: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    for checkout in &ids {
        verify_once(&ledger, checkout).await;
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
    until("checkout 3's last token", async || {
        state(&ledger, "3").await.0.as_deref() == Some("c-3")
    })
    .await;
    assert_eq!(
        state(&ledger, "1").await.0.as_deref(),
        Some("b-1"),
        "the later token wins"
    );
    assert_eq!(
        state(&ledger, "2").await.0,
        None,
        "forgotten after it was saved"
    );
    assert_eq!(state(&ledger, "20").await.0.as_deref(), Some("a-20"));
    // The checkpoints before the forget in one write, the forget, the last checkpoint: three
    // commits where one per checkpoint took 22.
    let commits = crate::ledger::testing::wal_commits(&ledger) - before;
    assert_eq!(commits, 3, "{commits} commits for one batch");
    cancel.cancel();
    task.await.expect("the loop ends");
}
