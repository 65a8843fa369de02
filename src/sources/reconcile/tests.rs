//! Unit tests of `reconcile`.

use std::time::Instant;

use super::*;
use crate::ledger::TrackedVia;
use crate::paymennt::wire::{Checkout, CheckoutFacts};

fn facts(id: &str, listened: bool) -> CheckoutFacts {
    let location = if listened {
        format!(
            r#","firebaseDatabase":"p","firebaseCollection":"checkouts","firebaseDocument":"d{id}""#
        )
    } else {
        String::new()
    };
    let json = format!(
        r#"{{"id":"{id}","orderId":"ORD-{id}","currency":"AED","amount":1,"status":"PENDING"{location}}}"#
    );
    let wire: Checkout = serde_json::from_str(&json).expect("json");
    // An answer's facts may lack a document (as discovery's search results may).
    wire.answer_facts().expect("facts")
}

fn id(text: &str) -> CheckoutId {
    text.parse().expect("id")
}

/// Checkouts 1 (the listener's first snapshot reports it), 2 (resumes with a token),
/// 3 (Firestore refused its document) and 4 (no document: discovery found it without one),
/// none verified yet.
async fn ledger() -> Ledger {
    let ledger = Ledger::open_in_memory().expect("ledger");
    for n in ["1", "2", "3"] {
        ledger
            .track(&facts(n, true), TrackedVia::Track)
            .await
            .expect("track");
    }
    ledger
        .record_discovered(&[facts("4", false)])
        .await
        .expect("discovered");
    ledger
        .save_resume_points(&[crate::ledger::ResumePoint {
            checkout_id: id("2"),
            token: vec![1, 2, 3],
            read_time: None,
        }])
        .await
        .expect("token");
    ledger
        .note_listen_refusal(&id("3"), "PERMISSION_DENIED", "no", "d3", None)
        .await
        .expect("refusal");
    ledger
}

async fn received(nudges: &mut mpsc::Receiver<Nudge>, count: usize) -> Vec<CheckoutId> {
    let mut ids = Vec::new();
    while ids.len() < count {
        let nudge = tokio::time::timeout(Duration::from_secs(10), nudges.recv())
            .await
            .expect("a nudge in time")
            .expect("the sweep is running");
        assert_eq!(nudge.source, crate::domain::Source::Reconcile);
        assert!(nudge.seen_after.is_some(), "nudges carry the counter");
        ids.push(nudge.checkout_id);
    }
    ids
}

#[tokio::test]
async fn the_start_up_sweep_leaves_to_the_first_snapshot_only_what_it_reports() {
    let ledger = ledger().await;
    let (sender, mut nudges) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let sweep = {
        let (ledger, cancel) = (ledger.clone(), cancel.clone());
        let startup = StartupSweep {
            counter_at_start: ledger.last_ticket().await.expect("counter"),
            snapshot_grace: Duration::from_secs(3600),
        };
        tokio::spawn(async move {
            startup_sweep(&ledger, &sender, startup, &cancel, &Metrics::disabled()).await;
        })
    };
    // Checkout 1 has the lowest id: had it been nudged now, it would have come first.
    assert_eq!(received(&mut nudges, 3).await, [id("2"), id("3"), id("4")]);
    assert!(matches!(
        nudges.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), sweep)
        .await
        .expect("the sweep ends when cancelled")
        .expect("no panic");
    assert!(nudges.recv().await.is_none(), "and nudged nothing more");
}

#[tokio::test]
async fn after_the_grace_only_checkouts_the_snapshot_did_not_answer_are_nudged() {
    for answered in [false, true] {
        let ledger = ledger().await;
        let (sender, mut nudges) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        // Checkout 1's first snapshot is answered (or not) before the grace ends.
        let before = ledger.last_ticket().await.expect("counter");
        let grace = Duration::from_millis(200);
        let started = Instant::now();
        let sweep = {
            let ledger = ledger.clone();
            let startup = StartupSweep {
                counter_at_start: before,
                snapshot_grace: grace,
            };
            tokio::spawn(async move {
                startup_sweep(&ledger, &sender, startup, &cancel, &Metrics::disabled()).await;
            })
        };
        assert_eq!(received(&mut nudges, 3).await, [id("2"), id("3"), id("4")]);
        if answered {
            let ticket = ledger.issue_ticket().await.expect("ticket");
            assert!(ticket > before);
            let json = r#"{"id":"1","orderId":"ORD-1","currency":"AED","amount":1,"status":"PENDING","firebaseDatabase":"p","firebaseCollection":"checkouts","firebaseDocument":"d1"}"#;
            let answer =
                crate::paymennt::VerifiedCheckout::for_tests_with(json, ticket, chrono::Utc::now());
            ledger
                .apply(
                    &answer,
                    crate::domain::Source::Firestore,
                    None,
                    &[],
                    Duration::from_secs(60),
                )
                .await
                .expect("apply");
        }
        tokio::time::timeout(Duration::from_secs(10), sweep)
            .await
            .expect("the sweep ends after its grace")
            .expect("no panic");
        let rest: Vec<CheckoutId> = std::iter::from_fn(|| nudges.try_recv().ok())
            .map(|nudge| nudge.checkout_id)
            .collect();
        if answered {
            assert_eq!(rest, Vec::<CheckoutId>::new());
        } else {
            assert_eq!(rest, [id("1")]);
            assert!(started.elapsed() >= grace, "not before the grace");
        }
    }
}
