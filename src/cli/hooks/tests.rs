//! Unit tests of `hooks`.

use std::time::Duration;

use super::*;
use crate::domain::Source;
use crate::ledger::{ApplyOutcome, DeliveryUpdate};
use crate::paymennt::VerifiedCheckout;
use crate::settings::HookSettings;

fn settings(hooks: Vec<HookSettings>) -> Settings {
    let mut settings = Settings::load_with_env(None, Vec::new()).expect("defaults load");
    settings.hooks = hooks;
    settings
}

async fn transition(
    ledger: &Ledger,
    id: &str,
    status: &str,
    hooks: &[HookSettings],
) -> Vec<String> {
    let json = format!(
        r#"{{"id":"{id}","orderId":"O-{id}","currency":"AED","amount":1,"status":"{status}","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d{id}"}}"#
    );
    let outcome = ledger
        .apply(
            &VerifiedCheckout::for_tests(&json),
            Source::Reconcile,
            None,
            hooks,
            Duration::from_secs(60),
        )
        .await
        .expect("apply");
    let ApplyOutcome::Transition { deliveries, .. } = outcome else {
        panic!("no change");
    };
    deliveries
}

fn kill(ledger: &Ledger, event_id: &str) {
    ledger
        .finish_delivery(
            event_id,
            &DeliveryUpdate::Dead {
                exit_code: Some(1),
                error: "exit 1".into(),
            },
        )
        .expect("dead");
}

fn retry_args(event_id: Option<&str>) -> RetryArgs {
    RetryArgs {
        event_id: event_id.map(str::to_owned),
        all_dead: event_id.is_none(),
    }
}

fn hook(name: &str, statuses: &[&str]) -> HookSettings {
    HookSettings::for_tests(name, statuses)
}

#[tokio::test]
async fn retry_revives_a_dead_delivery_and_explains_every_other_case() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let hooks = [hook("h", &[])];
    let event = transition(&ledger, "1", "PAID", &hooks).await.remove(0);
    kill(&ledger, &event);

    let message = retry(&ledger, &retry_args(Some(&event)))
        .await
        .expect("revived");
    assert!(message.starts_with(&format!("queued {event} again (hook h, checkout 1, PAID)")));
    let revived = ledger
        .delivery(&event)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(revived.state, DeliveryState::Pending);
    assert_eq!(revived.attempts, 0);

    let error = retry(&ledger, &retry_args(Some("evt_nope")))
        .await
        .expect_err("unknown");
    assert_eq!(
        error.to_string(),
        "no hook delivery with event id 'evt_nope'\n\nlist them with: paywatch hooks list"
    );
    assert_eq!(
        crate::cli::exit_code(&error),
        std::process::ExitCode::from(2),
        "an id the ledger does not have is an input error"
    );

    let claimed = ledger.claim_due_deliveries(Utc::now(), 10).expect("claim");
    assert_eq!(claimed.len(), 1);
    let error = retry(&ledger, &retry_args(Some(&event)))
        .await
        .expect_err("running");
    assert!(error.to_string().contains("is running now"), "{error}");

    ledger
        .finish_delivery(&event, &DeliveryUpdate::Delivered)
        .expect("delivered");
    let error = retry(&ledger, &retry_args(Some(&event)))
        .await
        .expect_err("delivered");
    assert!(
        error.to_string().contains("was already delivered at 20"),
        "{error}"
    );
    assert!(
        error.to_string().contains("paywatch hooks replay"),
        "{error}"
    );
}

#[tokio::test]
async fn retry_all_dead_counts() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let hooks = [hook("a", &[]), hook("b", &[])];
    assert_eq!(
        retry(&ledger, &retry_args(None)).await.expect("none"),
        "no dead deliveries"
    );
    for event in transition(&ledger, "1", "PAID", &hooks).await {
        kill(&ledger, &event);
    }
    let message = retry(&ledger, &retry_args(None)).await.expect("two");
    assert!(
        message.starts_with("queued 2 dead deliveries again"),
        "{message}"
    );
    assert_eq!(ledger.counts().await.expect("counts").hooks_dead, 0);
}

#[tokio::test]
async fn replay_queues_new_events_per_hook_status_filter() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let hooks = vec![hook("all", &[]), hook("paid", &["paid"])];
    transition(&ledger, "1", "PENDING", &[]).await;
    transition(&ledger, "1", "PAID", &[]).await;
    transition(&ledger, "2", "FAILED", &[]).await;
    let settings = settings(hooks);
    let now = Utc::now();
    let args = |since: &str, status: Option<&str>, hooks: &[&str]| ReplayArgs {
        since: since.into(),
        status: status.map(str::to_owned),
        hooks: hooks.iter().map(|s| s.to_string()).collect(),
        include_imported: false,
        json: false,
    };

    let report = replay(&ledger, &settings, &args("1h", None, &[]), now)
        .await
        .expect("replay");
    assert_eq!(report.queued.len(), 4, "3 changes to 'all', PAID to 'paid'");
    assert!(report.describe().starts_with("queued 4 deliveries"));
    let delivery = ledger
        .delivery(&report.queued[0])
        .await
        .expect("read")
        .expect("exists");
    assert!(delivery.replay);
    assert_eq!(delivery.state, DeliveryState::Pending);

    let report = replay(
        &ledger,
        &settings,
        &args("1h", Some("paid"), &["paid"]),
        now,
    )
    .await
    .expect("replay");
    assert_eq!(report.queued.len(), 1);
    assert_eq!(report.hooks, ["paid"]);

    let future = (now + chrono::Duration::hours(1)).to_rfc3339();
    let report = replay(&ledger, &settings, &args(&future, None, &[]), now)
        .await
        .expect("replay");
    assert!(report.queued.is_empty());
    assert!(report.describe().contains("nothing queued"));

    let error = replay(&ledger, &settings, &args("1h", None, &["nope"]), now)
        .await
        .expect_err("unknown hook");
    assert_eq!(
        error.to_string(),
        "no hook named 'nope'\n\nhooks configured in built-in defaults: all, paid"
    );
    assert_eq!(
        crate::cli::exit_code(&error),
        std::process::ExitCode::from(2)
    );
    let error = replay(&ledger, &settings, &args("1h", Some("SHIPPED"), &[]), now)
        .await
        .expect_err("status");
    assert!(
        error.to_string().contains("known statuses: PENDING"),
        "{error}"
    );
}

#[tokio::test]
async fn replay_leaves_imported_baselines_out_unless_asked() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let settings = settings(vec![hook("paid", &["paid"])]);
    ledger
        .begin_discovery_epoch(Utc::now())
        .await
        .expect("discovery epoch");
    let imported = r#"{"id":"1","orderId":"O-1","currency":"AED","amount":1,"status":"PAID","timestamp":"2020-01-01T00:00:00.000+0000","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d1"}"#;
    let wire: crate::paymennt::wire::Checkout = serde_json::from_str(imported).expect("json");
    ledger
        .record_discovered(&[wire.facts().expect("facts")])
        .await
        .expect("discovered");
    ledger
        .apply(
            &VerifiedCheckout::for_tests(imported),
            Source::Firestore,
            None,
            &settings.hooks,
            Duration::from_secs(60),
        )
        .await
        .expect("apply");
    transition(&ledger, "2", "PAID", &[]).await;
    let args = |include_imported| ReplayArgs {
        since: "1h".into(),
        status: None,
        hooks: Vec::new(),
        include_imported,
        json: false,
    };
    let now = Utc::now();
    let report = replay(&ledger, &settings, &args(false), now)
        .await
        .expect("replay");
    assert_eq!(report.queued.len(), 1, "only the live payment");
    let report = replay(&ledger, &settings, &args(true), now)
        .await
        .expect("replay");
    assert_eq!(report.queued.len(), 2, "the baseline too, when asked");
    let mut sources: Vec<String> = Vec::new();
    for event in &report.queued {
        let delivery = ledger.delivery(event).await.expect("read");
        sources.push(delivery.expect("exists").source);
    }
    assert_eq!(sources, ["discovery-import", "reconcile"]);
}

#[test]
fn since_accepts_rfc3339_dates_and_durations_back() {
    let now = DateTime::parse_from_rfc3339("2024-05-03T12:00:00Z")
        .expect("time")
        .with_timezone(&Utc);
    let at = |text: &str| parse_since(text, now).map(crate::ledger::timestamp);
    assert_eq!(
        at("2024-05-01T10:00:00+02:00").expect("rfc 3339"),
        "2024-05-01T08:00:00.000Z"
    );
    assert_eq!(at("2024-05-01").expect("date"), "2024-05-01T00:00:00.000Z");
    assert_eq!(at("2h").expect("hours"), "2024-05-03T10:00:00.000Z");
    assert_eq!(at("3days").expect("days"), "2024-04-30T12:00:00.000Z");
    assert_eq!(at("1h 30m ago").expect("ago"), "2024-05-03T10:30:00.000Z");
    let error = at("yesterday").expect_err("not a time");
    assert!(
        error
            .to_string()
            .starts_with("--since 'yesterday' is not a time\n\n"),
        "{error}"
    );
}
