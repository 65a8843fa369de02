//! Metrics: the ledger-derived gauges, the stream clocks, buckets and label hygiene.

use super::*;
use crate::ledger::{DeliveryFilter, DeliveryState, DeliveryUpdate, Ledger, TrackedVia};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::Checkout;
use crate::settings::HookSettings;

const WATCH: Duration = Duration::from_secs(3600);

fn checkout_json(id: &str, status: &str) -> String {
    format!(
        r#"{{"id":"{id}","orderId":"ORD-{id}","requestId":"REQ-{id}","currency":"AED","amount":100.00,"status":"{status}","totalRefunded":0,"firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-{id}"}}"#
    )
}

async fn apply(ledger: &Ledger, id: &str, status: &str, hooks: &[HookSettings]) {
    let verified = VerifiedCheckout::for_tests(&checkout_json(id, status));
    ledger
        .apply(&verified, Source::Firestore, None, hooks, WATCH)
        .await
        .expect("apply");
}

async fn track(ledger: &Ledger, id: &str) {
    let wire: Checkout = serde_json::from_str(&checkout_json(id, "PENDING")).expect("json");
    ledger
        .track(&wire.facts().expect("facts"), TrackedVia::Track)
        .await
        .expect("track");
}

/// The value of the sample written exactly as `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

async fn render(
    metrics: &Metrics,
    ledger: &Ledger,
    now: DateTime<Utc>,
    instant: Instant,
) -> String {
    let gauges = ledger.gauges().await.expect("gauges");
    metrics
        .inner
        .as_ref()
        .expect("enabled")
        .render(&gauges, now, instant)
        .expect("render")
}

#[tokio::test]
async fn ledger_gauges_count_watched_checkouts_and_paid_ones_with_undelivered_hooks() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let hooks = [HookSettings::for_tests("crm", &["PAID"])];
    track(&ledger, "chk-unverified-1").await;
    apply(&ledger, "chk-pending-1", "PENDING", &hooks).await;
    apply(&ledger, "chk-pending-2", "PENDING", &hooks).await;
    apply(&ledger, "chk-paid-1", "PENDING", &hooks).await;
    apply(&ledger, "chk-paid-1", "PAID", &hooks).await;
    apply(&ledger, "chk-failed-1", "FAILED", &hooks).await;
    let metrics = Metrics::new();

    let text = metrics
        .render(&ledger.gauges().await.expect("gauges"))
        .expect("exposition");
    let watched = |status: &str| {
        sample(
            &text,
            &format!("paywatch_checkouts_watched{{status=\"{status}\"}}"),
        )
    };
    assert_eq!(watched("PENDING"), Some(2.0), "{text}");
    assert_eq!(watched("PAID"), Some(1.0), "PAID stays watched for refunds");
    assert_eq!(watched("UNVERIFIED"), Some(1.0));
    assert_eq!(watched("FAILED"), Some(0.0), "final: no longer watched");
    assert_eq!(
        sample(
            &text,
            "paywatch_hook_deliveries{hook=\"crm\",state=\"pending\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "paywatch_paid_checkouts_hooks_undelivered"),
        Some(1.0)
    );
    for id in ["chk-unverified-1", "chk-pending-1", "chk-paid-1", "doc-"] {
        assert!(!text.contains(id), "'{id}' leaked into the exposition");
    }

    // Delivered: the gauge falls back; dead: it counts again (a person must act).
    let delivery = ledger
        .deliveries(&DeliveryFilter {
            state: Some(DeliveryState::Pending),
            ..DeliveryFilter::default()
        })
        .await
        .expect("deliveries")
        .pop()
        .expect("one pending delivery");
    ledger
        .finish_delivery(&delivery.event_id, &DeliveryUpdate::Delivered)
        .expect("finish");
    let text = metrics
        .render(&ledger.gauges().await.expect("gauges"))
        .expect("exposition");
    assert_eq!(
        sample(&text, "paywatch_paid_checkouts_hooks_undelivered"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_hook_deliveries{hook=\"crm\",state=\"pending\"}"
        ),
        None,
        "series of states that emptied are dropped: {text}"
    );
    assert_eq!(
        sample(&text, "paywatch_hook_oldest_undelivered_age_seconds"),
        Some(0.0)
    );
    ledger
        .finish_delivery(
            &delivery.event_id,
            &DeliveryUpdate::Dead {
                exit_code: Some(1),
                error: "exit 1".into(),
            },
        )
        .expect("finish");
    let text = metrics
        .render(&ledger.gauges().await.expect("gauges"))
        .expect("exposition");
    assert_eq!(
        sample(&text, "paywatch_paid_checkouts_hooks_undelivered"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_hook_deliveries{hook=\"crm\",state=\"dead\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn ages_are_measured_from_the_oldest_row_at_scrape_time() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let hooks = [HookSettings::for_tests("crm", &["PAID"])];
    apply(&ledger, "chk-1", "PENDING", &hooks).await;
    apply(&ledger, "chk-2", "PAID", &hooks).await;
    ledger
        .save_resume_points(&[crate::ledger::ResumePoint {
            checkout_id: "chk-1".parse().expect("id"),
            token: vec![1, 2, 3],
            read_time: None,
        }])
        .await
        .expect("token");
    let metrics = Metrics::new();
    let later = Utc::now() + chrono::Duration::seconds(90);
    let text = render(&metrics, &ledger, later, Instant::now()).await;
    for name in [
        "paywatch_checkout_pending_oldest_age_seconds",
        "paywatch_hook_oldest_undelivered_age_seconds",
        "paywatch_resume_token_oldest_age_seconds",
    ] {
        let age = sample(&text, name).unwrap_or_else(|| panic!("{name} missing: {text}"));
        assert!((90.0..120.0).contains(&age), "{name} = {age}");
    }

    // Nothing to measure: 0, never a stale age.
    let empty = Ledger::open_in_memory().expect("ledger");
    let text = render(&metrics, &empty, later, Instant::now()).await;
    for name in [
        "paywatch_checkout_pending_oldest_age_seconds",
        "paywatch_hook_oldest_undelivered_age_seconds",
        "paywatch_resume_token_oldest_age_seconds",
        "paywatch_paid_checkouts_hooks_undelivered",
    ] {
        assert_eq!(sample(&text, name), Some(0.0), "{name}");
    }
}

#[tokio::test]
async fn a_stream_reports_its_last_message_age_until_it_ends() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let metrics = Metrics::new();
    let clock = metrics.listen_stream("pc-test-734bc", 7);
    let open = metrics.listen_stream_open("pc-test-734bc");
    let series = "paywatch_listen_last_message_age_seconds{project=\"pc-test-734bc\",stream=\"7\"}";
    let text = render(
        &metrics,
        &ledger,
        Utc::now(),
        Instant::now() + Duration::from_secs(40),
    )
    .await;
    let age = sample(&text, series).unwrap_or_else(|| panic!("missing: {text}"));
    assert!((40.0..45.0).contains(&age), "age {age}");
    assert_eq!(
        sample(
            &text,
            "paywatch_listen_streams_open{project=\"pc-test-734bc\"}"
        ),
        Some(1.0)
    );

    metrics.listen_message(7);
    let text = render(&metrics, &ledger, Utc::now(), Instant::now()).await;
    let age = sample(&text, series).expect("still there");
    assert!(age < 5.0, "a message resets the age: {age}");

    drop(open);
    drop(clock);
    let text = render(&metrics, &ledger, Utc::now(), Instant::now()).await;
    assert_eq!(
        sample(&text, series),
        None,
        "an ended stream leaves: {text}"
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_listen_streams_open{project=\"pc-test-734bc\"}"
        ),
        Some(0.0)
    );
}

/// The `le` bounds of one histogram series, in order.
fn bucket_bounds(text: &str, prefix: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .map(|rest| {
            let start = rest.find("le=\"").expect("an le label") + 4;
            let end = start + rest[start..].find('"').expect("a closing quote");
            match &rest[start..end] {
                "+Inf" => f64::INFINITY,
                bound => bound.parse().expect("a number"),
            }
        })
        .collect()
}

fn declared(buckets: &[f64]) -> Vec<f64> {
    buckets.iter().copied().chain([f64::INFINITY]).collect()
}

#[tokio::test]
async fn histograms_have_the_declared_buckets_and_count_each_outcome() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let metrics = Metrics::new();
    let ok: Result<(), crate::paymennt::Error> = Ok(());
    let timeout: Result<(), crate::paymennt::Error> =
        Err(crate::paymennt::Error::Timeout(Duration::from_secs(10)));
    let not_found: Result<(), crate::paymennt::Error> = Err(crate::paymennt::Error::Rejected {
        status: 404,
        message: "Checkout not found".into(),
    });
    let label = crate::paymennt::client::outcome_label;
    metrics.paymennt_call(
        PaymenntCall::GetCheckout,
        label(&ok),
        Duration::from_millis(120),
    );
    metrics.paymennt_call(
        PaymenntCall::GetCheckout,
        label(&ok),
        Duration::from_millis(30),
    );
    metrics.paymennt_call(
        PaymenntCall::GetCheckout,
        label(&timeout),
        Duration::from_secs(12),
    );
    metrics.paymennt_call(
        PaymenntCall::Search,
        label(&not_found),
        Duration::from_millis(80),
    );
    metrics.hook_attempt(
        "crm",
        (DeliveryUpdate::Delivered).label(),
        Some(Duration::from_millis(15)),
    );
    metrics.hook_attempt(
        "crm",
        (DeliveryUpdate::Dead {
            exit_code: None,
            error: "hook 'crm' is not configured".into(),
        })
        .label(),
        None,
    );
    let text = render(&metrics, &ledger, Utc::now(), Instant::now()).await;

    let get_ok =
        "paywatch_paymennt_request_duration_seconds_bucket{call=\"get_checkout\",outcome=\"ok\",";
    assert_eq!(bucket_bounds(&text, get_ok), declared(&PAYMENNT_BUCKETS));
    assert_eq!(
        bucket_bounds(
            &text,
            "paywatch_hook_attempt_duration_seconds_bucket{hook=\"crm\","
        ),
        declared(&HOOK_BUCKETS)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_paymennt_request_duration_seconds_bucket{call=\"get_checkout\",outcome=\"ok\",le=\"0.05\"}"
        ),
        Some(1.0),
        "30 ms falls in the 50 ms bucket, 120 ms does not"
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_paymennt_request_duration_seconds_count{call=\"get_checkout\",outcome=\"ok\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_paymennt_request_duration_seconds_count{call=\"get_checkout\",outcome=\"timeout\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_paymennt_request_duration_seconds_count{call=\"search\",outcome=\"not_found\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_hook_attempts_total{hook=\"crm\",outcome=\"delivered\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_hook_attempts_total{hook=\"crm\",outcome=\"dead\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "paywatch_hook_attempt_duration_seconds_count{hook=\"crm\"}"
        ),
        Some(1.0),
        "an attempt that never started has no latency"
    );
}

#[tokio::test]
async fn an_unknown_status_is_one_label_whatever_paymennt_sent() {
    assert_eq!(
        status_label(&CheckoutStatus::parse("ON_HOLD_chk-123")),
        UNKNOWN_STATUS
    );
    assert_eq!(status_label(&CheckoutStatus::Paid), "PAID");
    let metrics = Metrics::new();
    metrics.transition(&CheckoutStatus::parse("weird chk-42"), Source::Firestore);
    let text = render(
        &metrics,
        &Ledger::open_in_memory().expect("ledger"),
        Utc::now(),
        Instant::now(),
    )
    .await;
    assert!(!text.contains("chk-42"), "{text}");
    assert_eq!(
        sample(
            &text,
            "paywatch_transitions_total{status=\"UNKNOWN\",source=\"firestore\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn disabled_metrics_count_nothing_and_expose_nothing() {
    let metrics = Metrics::disabled();
    metrics.transition(&CheckoutStatus::Paid, Source::Firestore);
    let _clock = metrics.listen_stream("p", 1);
    let _open = metrics.listen_stream_open("p");
    let ledger = Ledger::open_in_memory().expect("ledger");
    assert_eq!(
        metrics
            .render(&ledger.gauges().await.expect("gauges"))
            .expect("empty"),
        ""
    );
    assert!(!metrics.is_enabled());
}

#[tokio::test]
async fn two_registries_do_not_share_counts() {
    let (first, second) = (Metrics::new(), Metrics::new());
    first.transition(&CheckoutStatus::Paid, Source::Firestore);
    let ledger = Ledger::open_in_memory().expect("ledger");
    let series = "paywatch_transitions_total{status=\"PAID\",source=\"firestore\"}";
    let first_text = first
        .render(&ledger.gauges().await.expect("gauges"))
        .expect("first");
    let second_text = second
        .render(&ledger.gauges().await.expect("gauges"))
        .expect("second");
    assert_eq!(sample(&first_text, series), Some(1.0));
    assert_eq!(sample(&second_text, series), None);
}

#[tokio::test]
async fn process_figures_and_the_build_are_exported_as_prometheus_exporters_do() {
    let metrics = Metrics::new();
    let ledger = Ledger::open_in_memory().expect("ledger");
    let text = render(&metrics, &ledger, Utc::now(), Instant::now()).await;
    assert_eq!(
        sample(
            &text,
            &format!(
                "paywatch_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{text}"
    );
    let figure = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name}: {text}"));
    assert!(figure("process_resident_memory_bytes") > 1_000_000.0);
    assert!(figure("process_virtual_memory_bytes") > 1_000_000.0);
    assert!(
        figure("process_open_fds") >= 3.0,
        "stdin, stdout, stderr at least"
    );
    assert!(figure("process_max_fds") >= figure("process_open_fds"));
    assert!(figure("process_cpu_seconds_total") >= 0.0);
    let started = figure("process_start_time_seconds");
    let now = Utc::now().timestamp() as f64;
    assert!(
        started > now - 86_400.0 && started <= now + 1.0,
        "{started} vs {now}"
    );
}
