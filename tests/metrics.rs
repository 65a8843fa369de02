//! The metrics exposition of a daemon running against the in-process sandbox: it parses with a
//! strict parser, its counters and gauges move with a payment, its histograms have the declared
//! buckets, and no checkout id ever appears in it.

use paywatch::domain::CheckoutId;
use paywatch::ledger::{DeliveryState, Ledger};
use paywatch::metrics::{HOOK_BUCKETS, PAYMENNT_BUCKETS};
use paywatch::settings::Settings;
use std::time::Duration;

use crate::common::exposition::{self, Exposition};
use crate::common::{self, DEADLINE, Daemon, create_and_track, wait_for, wait_status};

/// Scrapes the daemon's metrics, parses them strictly, and checks that no checkout id, order
/// id or document name leaked into the text.
/// Scrapes `/metrics` over the daemon's HTTP listener as Prometheus would, or, for a daemon
/// without one, reads the same exposition in-process.
async fn scrape(daemon: &Daemon, ledger: &Ledger, secrets: &[&str]) -> Exposition {
    let http = *daemon.http.borrow();
    let text = match http {
        Some(addr) => {
            let response = reqwest::get(format!("http://{addr}/metrics"))
                .await
                .expect("GET /metrics");
            assert_eq!(response.status(), 200);
            assert_eq!(
                response
                    .headers()
                    .get("content-type")
                    .and_then(|value| value.to_str().ok()),
                Some("text/plain; version=0.0.4; charset=utf-8")
            );
            response.text().await.expect("body")
        }
        None => paywatch::http::metrics_exposition(&daemon.metrics, ledger)
            .await
            .expect("the ledger is readable"),
    };
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "'{secret}' appears in the exposition:\n{text}"
        );
    }
    exposition::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

fn delivered(ledger: &Ledger, id: &CheckoutId) -> bool {
    ledger
        .deliveries_of(id)
        .expect("ledger read")
        .iter()
        .any(|delivery| delivery.state == DeliveryState::Delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_parses_and_moves_with_a_payment() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hook = "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[[hooks]]\nname = \"notify\"\ncommand = [\"/bin/true\"]\nstatuses = [\"PAID\"]\n";
    let (settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", hook);
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "ORD-METRICS-1").await;
    let record = ledger.checkout(&id).expect("read").expect("tracked");
    let project = record.firebase.database.clone();
    let secrets = [
        id.as_str(),
        "ORD-METRICS-1",
        record.firebase.document.as_str(),
    ];
    let daemon = Daemon::start(&settings, &path).await;
    wait_status(&ledger, &id, "PENDING").await;

    // Before the payment.
    let before = scrape(&daemon, &ledger, &secrets).await;
    let paid = [("status", "PAID"), ("source", "firestore")];
    assert_eq!(before.value("paywatch_transitions_total", &paid), None);
    assert_eq!(
        before.value("paywatch_checkouts_watched", &[("status", "PENDING")]),
        Some(1.0)
    );
    assert_eq!(
        before.value("paywatch_reconcile_sweeps_total", &[("kind", "startup")]),
        Some(1.0)
    );
    let get_ok = [("call", "get_checkout"), ("outcome", "ok")];
    let calls_before = before
        .value("paywatch_paymennt_request_duration_seconds_count", &get_ok)
        .expect("the first verification was timed");
    assert!(calls_before >= 1.0);
    let age = before
        .value("paywatch_checkout_pending_oldest_age_seconds", &[])
        .expect("gauge present");
    assert!(
        (0.0..DEADLINE.as_secs_f64()).contains(&age),
        "pending age {age}"
    );

    sandbox.state().pay(&id).await.expect("pay");
    wait_status(&ledger, &id, "PAID").await;
    wait_for("the PAID hook to be delivered", DEADLINE, || async {
        delivered(&ledger, &id).then_some(())
    })
    .await;

    let after = scrape(&daemon, &ledger, &secrets).await;
    assert_eq!(after.value("paywatch_transitions_total", &paid), Some(1.0));
    // The first PENDING came from Firestore's first snapshot or the startup sweep, whichever won.
    let pending: f64 = after
        .named("paywatch_transitions_total")
        .filter(|sample| sample.labels.get("status").map(String::as_str) == Some("PENDING"))
        .map(|sample| sample.value)
        .sum();
    assert_eq!(pending, 1.0);
    assert!(
        after
            .value("paywatch_paymennt_request_duration_seconds_count", &get_ok)
            .expect("timed")
            > calls_before,
        "the payment's Get Checkout was timed"
    );
    assert!(
        after
            .value("paywatch_verifications_total", &[("source", "firestore")])
            .expect("counted")
            >= 2.0
    );
    assert_eq!(
        after.value("paywatch_checkouts_watched", &[("status", "PAID")]),
        Some(1.0),
        "PAID stays watched for refunds"
    );
    assert_eq!(
        after.value("paywatch_checkouts_watched", &[("status", "PENDING")]),
        Some(0.0)
    );
    assert_eq!(
        after.value("paywatch_checkout_pending_oldest_age_seconds", &[]),
        Some(0.0)
    );
    let notify = [("hook", "notify"), ("outcome", "delivered")];
    assert_eq!(
        after.value("paywatch_hook_attempts_total", &notify),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "paywatch_hook_attempt_duration_seconds_count",
            &[("hook", "notify")]
        ),
        Some(1.0)
    );
    assert_eq!(
        after.value("paywatch_paid_checkouts_hooks_undelivered", &[]),
        Some(0.0)
    );
    assert_eq!(
        after.value("paywatch_hook_oldest_undelivered_age_seconds", &[]),
        Some(0.0)
    );
    let project_label = [("project", project.as_str())];
    assert!(
        after
            .value("paywatch_listen_streams_open", &project_label)
            .expect("streams counted per project")
            >= 1.0
    );
    assert!(
        after
            .value("paywatch_listen_reconnects_total", &project_label)
            .is_some(),
        "a project's reconnect counter exists from its first stream on"
    );
    let stream_ages: Vec<f64> = after
        .named("paywatch_listen_last_message_age_seconds")
        .filter(|sample| sample.labels.get("project") == Some(&project))
        .map(|sample| sample.value)
        .collect();
    assert!(
        !stream_ages.is_empty(),
        "each stream reports its last message"
    );
    assert!(
        stream_ages.iter().all(|age| *age < DEADLINE.as_secs_f64()),
        "{stream_ages:?}"
    );
    assert!(
        after
            .value("paywatch_resume_token_oldest_age_seconds", &[])
            .is_some()
    );

    // Histograms carry exactly the declared buckets.
    let mut paymennt = PAYMENNT_BUCKETS.to_vec();
    paymennt.push(f64::INFINITY);
    assert_eq!(
        after.bucket_bounds("paywatch_paymennt_request_duration_seconds", &get_ok),
        paymennt
    );
    let mut hooks = HOOK_BUCKETS.to_vec();
    hooks.push(f64::INFINITY);
    assert_eq!(
        after.bucket_bounds(
            "paywatch_hook_attempt_duration_seconds",
            &[("hook", "notify")]
        ),
        hooks
    );
    for (family, info) in &after.families {
        // paywatch's own, or the process figures every exporter names alike.
        assert!(
            family.starts_with("paywatch_") || family.starts_with("process_"),
            "{family}"
        );
        assert!(!info.help.is_empty(), "{family} has no help");
    }
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(after.families.contains_key(process), "no {process}");
    }

    daemon.stop().await;
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_server_drops_are_counted_as_reconnects_and_reopen() {
    let (sandbox, _dir, settings, path, ledger) = common::setup("multiplexed", "").await;
    let id = create_and_track(&sandbox, &ledger, "ORD-METRICS-2").await;
    let project = sandbox.project_id().to_owned();
    let daemon = Daemon::start(&settings, &path).await;
    wait_status(&ledger, &id, "PENDING").await;
    let project_label = [("project", project.as_str())];
    let before = scrape(&daemon, &ledger, &[id.as_str()]).await;
    let reconnects = before
        .value("paywatch_listen_reconnects_total", &project_label)
        .expect("counter exists");

    sandbox.faults().close_listen_streams();
    wait_for(
        "the drop counted and the stream reopened",
        DEADLINE,
        || async {
            let now = scrape(&daemon, &ledger, &[id.as_str()]).await;
            let counted = now
                .value("paywatch_listen_reconnects_total", &project_label)
                .is_some_and(|count| count > reconnects);
            let open = now
                .value("paywatch_listen_streams_open", &project_label)
                .is_some_and(|count| count >= 1.0);
            (counted && open).then_some(())
        },
    )
    .await;

    daemon.stop().await;
    sandbox.shutdown().await;
}

/// A first start with checkouts never verified: the listener's first snapshot reports each,
/// and the reconciler's start-up sweep, which leaves them to that snapshot for a grace, finds
/// each answered since. One Get Checkout per checkout, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_verifies_each_checkout_once() {
    const CHECKOUTS: usize = 20;
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A grace well past the first snapshot's verification, even on a loaded machine.
    let text = common::sandbox_config_text(dir.path(), &sandbox, "multiplexed", "")
        .replace("[reconcile]\n", "[reconcile]\nstartup_grace = \"15s\"\n");
    let path = dir.path().join("paywatch.toml");
    std::fs::write(&path, text).expect("write config");
    let settings = Settings::load_with_env(Some(&path), Vec::new()).expect("valid");
    assert_eq!(settings.reconcile.startup_grace, Duration::from_secs(15));
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let mut ids = Vec::new();
    for n in 0..CHECKOUTS {
        ids.push(create_and_track(&sandbox, &ledger, &format!("ORD-ONCE-{n}")).await);
    }
    let daemon = Daemon::start(&settings, &path).await;
    for id in &ids {
        wait_status(&ledger, id, "PENDING").await;
    }
    // The start-up sweep's second part, after its grace, finds every one answered.
    let after_snapshot = [("kind", "startup_after_snapshot")];
    // Its grace is 15 s; the whole suite on two cores can stretch that a good deal further.
    let exposition = wait_for("the start-up sweep's second part", 4 * DEADLINE, || async {
        let exposition = scrape(&daemon, &ledger, &[]).await;
        (exposition.value("paywatch_reconcile_sweeps_total", &after_snapshot) == Some(1.0))
            .then_some(exposition)
    })
    .await;
    assert_eq!(
        exposition.value("paywatch_reconcile_nudges_total", &after_snapshot),
        Some(0.0)
    );
    assert_eq!(
        exposition.value("paywatch_reconcile_nudges_total", &[("kind", "startup")]),
        Some(0.0)
    );
    assert_eq!(
        exposition.value("paywatch_verifications_total", &[("source", "reconcile")]),
        Some(0.0)
    );
    for id in &ids {
        assert_eq!(
            sandbox.state().faults().get_checkout_calls(id.as_str()),
            1,
            "Get Checkout calls for checkout {id}"
        );
    }
    daemon.stop().await;
    sandbox.shutdown().await;
}
