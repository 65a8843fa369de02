//! Ledger: migrations, tracking, transitions, outbox, resume state.

use std::os::unix::fs::PermissionsExt;

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::*;
use crate::domain::{CheckoutId, CheckoutStatus, Source, VerifyTicket};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::{Checkout, CheckoutFacts};
use crate::settings::HookSettings;

/// The tests that run on both backends: each `NAME(ledger)` becomes `NAME::sqlite` (an
/// in-memory SQLite ledger) and `NAME::postgres` (a fresh database on the throwaway cluster, as
/// a daemon holding the lease, so every write passes the fence; skipped with the cluster's
/// message when PostgreSQL is absent, failing under `CI=true`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Ledger::open_in_memory().expect("ledger")).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(ledger) = super::postgres_ledger().await {
                    super::$name(ledger).await;
                }
            }
        }
    )*};
}

on_both_backends!(
    probes_pick_one_checkout_per_project,
    concurrent_claims_never_hand_out_a_delivery_twice,
    concurrent_first_answers_for_one_checkout_are_recorded_one_after_the_other,
    gauges_read_the_same_as_on_sqlite,
    listen_refusals_are_noted_counted_shown_and_cleared,
    a_group_of_answers_is_recorded_as_each_would_be_alone,
    tracking_twice_is_not_an_error_and_records_no_status,
    apply_records_transitions_only_on_change_and_queues_matching_hooks,
    final_status_stops_watching_and_drops_the_token,
    transitions_are_append_only,
    refund_watch_expires,
    list_filters_by_status_and_order,
    deliveries_are_claimed_in_order_per_checkout_and_hook,
    running_deliveries_are_recovered_and_dead_ones_revived,
    a_revived_older_delivery_never_runs_beside_a_later_running_one,
    a_revived_older_delivery_runs_before_a_later_pending_one,
    replay_queues_new_events_for_past_transitions,
    an_answer_to_an_older_request_is_ignored,
    a_clock_stepped_back_does_not_make_a_paid_answer_stale,
    noted_changes_carry_tickets_whose_answers_clear_the_notes,
    a_stale_answer_keeps_the_checkout_marked_for_verification,
    a_verification_requested_before_a_change_does_not_clear_it,
    verified_facts_replace_what_a_tracked_response_claimed,
    repeated_not_found_stops_watching_but_keeps_a_pending_verification,
    many_checkouts_looking_gone_at_once_stay_watched,
    a_refund_watch_does_not_end_while_a_change_is_unverified,
    an_answer_without_coordinates_updates_a_tracked_checkout_but_cannot_add_one,
    a_refund_that_keeps_the_status_is_an_entry_for_partially_refunded_hooks,
    discovered_checkouts_are_tracked_once_and_without_coordinates_are_not_listened_to,
    a_reconcile_only_checkout_that_gains_coordinates_moves_onto_the_listener,
    discovery_rounds_and_the_epoch_are_remembered,
    a_discovered_checkout_settled_before_the_epoch_is_a_baseline_without_hooks,
    without_an_epoch_nothing_is_a_baseline,
    record_and_claim_writes_outcomes_and_claims_the_events_they_free_in_one_call,
    one_failing_answer_in_a_group_fails_alone,
    a_group_of_tickets_is_what_each_request_would_get_alone,
    a_ticket_is_not_needed_once_a_later_request_answered
);

/// A PostgreSQL ledger on a fresh database, as a daemon holding the lease (for five minutes,
/// longer than any test here), or `None` (skip message printed) without PostgreSQL.
async fn postgres_ledger() -> Option<Ledger> {
    let url = postgres::cluster::database()?;
    let settings = crate::settings::LedgerSettings {
        url: Some(crate::settings::Secret::new(&url)),
        ..crate::settings::LedgerSettings::default()
    };
    let session = postgres::Session::Daemon {
        idle_limit: Duration::from_secs(30),
    };
    let store = postgres::PgStore::open(&settings, session)
        .await
        .expect("open the PostgreSQL ledger");
    let epoch = store
        .lease(&crate::settings::HaSettings {
            lease: Duration::from_secs(300),
        })
        .elect()
        .await
        .expect("elect")
        .expect("the only candidate wins");
    // The receiver keeps the last role after the sender is gone.
    let (_, role) = tokio::sync::watch::channel(postgres::Role::Active { epoch });
    Some(Ledger::postgres(store.with_role(role)))
}

/// The PostgreSQL store behind `ledger`, if it is one.
fn pg(ledger: &Ledger) -> Option<&postgres::PgStore> {
    ledger.backend.as_any().downcast_ref::<postgres::PgStore>()
}

/// `SELECT count(*) ...` (portable SQL) on either backend.
async fn count(ledger: &Ledger, sql: &str) -> i64 {
    match pg(ledger) {
        Some(store) => {
            let client = store.pool().get().await.expect("connection");
            client
                .query_one(sql, &[])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
        None => ledger
            .lock()
            .query_row(sql, [], |row| row.get(0))
            .expect("count"),
    }
}

/// One statement (portable SQL) on either backend, outside the ledger's interface (an operator
/// tampering), with the database's refusal as text.
async fn execute(ledger: &Ledger, sql: &str) -> std::result::Result<(), String> {
    match pg(ledger) {
        Some(store) => {
            let client = store.pool().get().await.expect("connection");
            client
                .batch_execute(sql)
                .await
                .map_err(|error| error.to_string())
        }
        None => ledger
            .lock()
            .execute_batch(sql)
            .map_err(|error| error.to_string()),
    }
}

/// The test-only operations of both backends, awaited.
trait TestOps {
    async fn claim_due(&self, now_time: DateTime<Utc>, limit: usize) -> Result<Vec<Delivery>>;
    async fn finish(&self, event_id: &str, update: &DeliveryUpdate) -> Result<()>;
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>>;
    async fn mark(&self, ids: &[CheckoutId], seen_after: VerifyTicket) -> Result<()>;
}

impl TestOps for Ledger {
    async fn claim_due(&self, now_time: DateTime<Utc>, limit: usize) -> Result<Vec<Delivery>> {
        match pg(self) {
            Some(_) => self
                .record_and_claim(&[], now_time, limit)
                .await
                .map(|round| round.claimed),
            None => self.claim_due_deliveries(now_time, limit),
        }
    }

    async fn finish(&self, event_id: &str, update: &DeliveryUpdate) -> Result<()> {
        match pg(self) {
            Some(store) => store
                .finish_delivery(event_id, update)
                .await
                .map_err(|error| store.ledger_error(&error)),
            None => self.finish_delivery(event_id, update),
        }
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        match pg(self) {
            Some(store) => store
                .next_delivery_due()
                .await
                .map_err(|error| store.ledger_error(&error)),
            None => self.next_delivery_due(),
        }
    }

    async fn mark(&self, ids: &[CheckoutId], seen_after: VerifyTicket) -> Result<()> {
        match pg(self) {
            Some(store) => store
                .mark_needs_verify(ids, seen_after)
                .await
                .map_err(|error| store.ledger_error(&error)),
            None => self.mark_needs_verify(ids, seen_after),
        }
    }
}

fn checkout_json(id: &str, status: &str) -> String {
    format!(
        r#"{{"id":"{id}","orderId":"ORD-{id}","requestId":"REQ-{id}","currency":"AED","amount":100.00,"status":"{status}","totalRefunded":0,"firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-{id}"}}"#
    )
}

fn verified(id: &str, status: &str) -> VerifiedCheckout {
    VerifiedCheckout::for_tests(&checkout_json(id, status))
}

fn facts(id: &str) -> CheckoutFacts {
    let wire: Checkout = serde_json::from_str(&checkout_json(id, "PENDING")).expect("json");
    wire.facts().expect("facts")
}

const WATCH: Duration = Duration::from_secs(3600);

fn hook(name: &str, statuses: &[&str]) -> HookSettings {
    HookSettings::for_tests(name, statuses)
}

#[tokio::test]
async fn open_creates_a_private_file_and_migrates_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/paywatch.db");
    let ledger = Ledger::open(&path).await.expect("open");
    ledger
        .track(&facts("1"), TrackedVia::Track)
        .await
        .expect("track");
    drop(ledger);
    let mode = std::fs::metadata(&path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Reopening keeps the data and does not re-run migrations.
    let ledger = Ledger::open(&path).await.expect("reopen");
    assert_eq!(ledger.counts().await.expect("counts").checkouts, 1);
    let version: i64 = ledger
        .lock()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, SCHEMA_VERSION);
    let journal: String = ledger
        .lock()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(journal, "wal");
}

#[tokio::test]
async fn an_existing_ledger_and_its_wal_and_shm_are_made_private_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    let ledger = Ledger::open(&path).await.expect("open");
    ledger
        .track(&facts("1"), TrackedVia::Track)
        .await
        .expect("track");
    let companions: Vec<std::path::PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| dir.path().join(format!("paywatch.db{suffix}")))
        .collect();
    // Opened by hand or restored with loose modes while the WAL is still there.
    for file in &companions {
        assert!(file.exists(), "{} exists while open", file.display());
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let again = Ledger::open(&path).await.expect("reopen");
    for file in &companions {
        let mode = std::fs::metadata(file)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    drop((ledger, again));
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    drop(Ledger::open(&path).await.expect("open"));
    let connection = Connection::open(&path).expect("raw open");
    connection
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .expect("bump");
    drop(connection);
    let error = Ledger::open(&path).await.expect_err("newer schema");
    assert!(error.to_string().contains("newer paywatch"), "{error}");
}

async fn tracking_twice_is_not_an_error_and_records_no_status(ledger: Ledger) {
    assert_eq!(
        ledger
            .track(&facts("1"), TrackedVia::Track)
            .await
            .expect("track"),
        TrackOutcome::Added
    );
    assert_eq!(
        ledger
            .track(&facts("1"), TrackedVia::Track)
            .await
            .expect("track"),
        TrackOutcome::AlreadyTracked
    );
    let record = ledger
        .checkout(&"1".parse().expect("id"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        record.status, None,
        "a tracked response's status is not verified"
    );
    assert_eq!(record.amount, "100.00");
    assert!(record.watched);
    assert_eq!(
        ledger
            .transitions(&"1".parse().expect("id"))
            .await
            .expect("transitions"),
        vec![]
    );
}

async fn apply_records_transitions_only_on_change_and_queues_matching_hooks(ledger: Ledger) {
    let hooks = [hook("all", &[]), hook("paid-only", &["PAID"])];
    let id: CheckoutId = "7".parse().expect("id");
    let first = ledger
        .apply(
            &verified("7", "PENDING"),
            Source::Reconcile,
            None,
            &hooks,
            WATCH,
        )
        .await
        .expect("apply");
    let ApplyOutcome::Transition { deliveries, .. } = first else {
        panic!("first status is a transition")
    };
    assert_eq!(
        deliveries.len(),
        1,
        "only the all-statuses hook fires on PENDING"
    );
    assert_eq!(
        ledger
            .apply(
                &verified("7", "PENDING"),
                Source::Firestore,
                None,
                &hooks,
                WATCH
            )
            .await
            .expect("apply"),
        ApplyOutcome::Unchanged
    );
    let changed_at = Utc::now() - chrono::Duration::milliseconds(150);
    let paid = ledger
        .apply(
            &verified("7", "Paid"),
            Source::Firestore,
            Some(changed_at),
            &hooks,
            WATCH,
        )
        .await
        .expect("apply");
    let ApplyOutcome::Transition {
        transition,
        deliveries,
        watched,
    } = paid
    else {
        panic!("PAID is a transition")
    };
    assert_eq!(deliveries.len(), 2);
    assert!(watched, "PAID stays watched for refunds");
    assert_eq!(
        transition.from.as_ref().map(CheckoutStatus::as_str),
        Some("PENDING")
    );
    assert_eq!(transition.to.as_str(), "PAID");
    assert_eq!(transition.source, "firestore");
    assert!(transition.latency_ms.is_some_and(|ms| ms >= 150));
    let history = ledger.transitions(&id).await.expect("history");
    assert_eq!(
        history.iter().map(|t| t.to.as_str()).collect::<Vec<_>>(),
        ["PENDING", "PAID"]
    );
    assert!(
        history[1].verified_json.contains("\"Paid\""),
        "the raw verified JSON is kept verbatim"
    );
    let record = ledger.checkout(&id).await.expect("read").expect("exists");
    assert!(record.watch_until.is_some());
}

async fn final_status_stops_watching_and_drops_the_token(ledger: Ledger) {
    let id: CheckoutId = "9".parse().expect("id");
    ledger
        .track(&facts("9"), TrackedVia::Track)
        .await
        .expect("track");
    ledger
        .save_resume_points(&[ResumePoint {
            checkout_id: id.clone(),
            token: vec![1, 2, 3],
            read_time: None,
        }])
        .await
        .expect("save");
    assert_eq!(
        ledger.watch_set().await.expect("set")[0].resume_token,
        Some(vec![1, 2, 3])
    );
    record(&ledger, &verified("9", "FAILED"), &[]).await;
    assert!(ledger.watch_set().await.expect("set").is_empty());
    assert_eq!(
        count(&ledger, "SELECT count(*) FROM listen_targets").await,
        0
    );
}

async fn transitions_are_append_only(ledger: Ledger) {
    ledger
        .apply(&verified("1", "PAID"), Source::Manual, None, &[], WATCH)
        .await
        .expect("apply");
    let update = execute(&ledger, "UPDATE transitions SET to_status = 'FAILED'").await;
    assert!(update.is_err());
    let delete = execute(&ledger, "DELETE FROM transitions").await;
    assert!(delete.is_err());
}

async fn refund_watch_expires(ledger: Ledger) {
    ledger
        .apply(
            &verified("5", "PAID"),
            Source::Reconcile,
            None,
            &[],
            Duration::from_secs(60),
        )
        .await
        .expect("apply");
    assert!(
        ledger
            .expire_refund_watch(Utc::now())
            .await
            .expect("expire")
            .is_empty()
    );
    let later = Utc::now() + chrono::Duration::seconds(61);
    assert_eq!(
        ledger.expire_refund_watch(later).await.expect("expire"),
        vec!["5".parse::<CheckoutId>().expect("id")]
    );
    assert!(ledger.watch_set().await.expect("set").is_empty());
}

async fn list_filters_by_status_and_order(ledger: Ledger) {
    ledger
        .apply(&verified("1", "PAID"), Source::Reconcile, None, &[], WATCH)
        .await
        .expect("apply");
    ledger
        .apply(
            &verified("2", "PENDING"),
            Source::Reconcile,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    ledger
        .track(&facts("3"), TrackedVia::Track)
        .await
        .expect("track");
    let paid = ledger
        .list(&ListFilter {
            statuses: vec!["paid".into()],
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(
        paid.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["1"]
    );
    let unverified = ledger
        .list(&ListFilter {
            statuses: vec!["UNVERIFIED".into()],
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(
        unverified.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["3"]
    );
    let by_order = ledger
        .list(&ListFilter {
            order_id: Some("ORD-2".into()),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(by_order.len(), 1);
}

async fn deliveries_are_claimed_in_order_per_checkout_and_hook(ledger: Ledger) {
    let hooks = [hook("h", &[])];
    ledger
        .apply(
            &verified("1", "PENDING"),
            Source::Reconcile,
            None,
            &hooks,
            WATCH,
        )
        .await
        .expect("apply");
    record(&ledger, &verified("1", "PAID"), &hooks).await;
    record(&ledger, &verified("2", "PAID"), &hooks).await;
    let later = Utc::now() + chrono::Duration::seconds(1);
    let first = ledger.claim_due(later, 10).await.expect("claim");
    // Checkout 1's PAID waits behind its PENDING; checkout 2 runs in parallel.
    let mut claimed: Vec<(String, String)> = first
        .iter()
        .map(|d| (d.checkout_id.clone(), d.status.to_string()))
        .collect();
    claimed.sort();
    assert_eq!(
        claimed,
        [
            ("1".to_string(), "PENDING".to_string()),
            ("2".to_string(), "PAID".to_string())
        ]
    );
    assert!(
        ledger.claim_due(later, 10).await.expect("claim").is_empty(),
        "nothing more until they finish"
    );
    let pending_one = first.iter().find(|d| d.checkout_id == "1").expect("one");
    ledger
        .finish(&pending_one.event_id, &DeliveryUpdate::Delivered)
        .await
        .expect("finish");
    let second = ledger.claim_due(later, 10).await.expect("claim");
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].status.as_str(), "PAID");
    assert_eq!(
        second[0].previous_status.as_ref().map(|s| s.as_str()),
        Some("PENDING")
    );
    assert_eq!(second[0].attempts, 1);
}

async fn running_deliveries_are_recovered_and_dead_ones_revived(ledger: Ledger) {
    ledger
        .apply(
            &verified("1", "PAID"),
            Source::Reconcile,
            None,
            &[hook("h", &[])],
            WATCH,
        )
        .await
        .expect("apply");
    let later = Utc::now() + chrono::Duration::seconds(1);
    let claimed = ledger.claim_due(later, 10).await.expect("claim");
    let event_id = claimed[0].event_id.clone();
    assert_eq!(
        ledger.recover_running_deliveries().await.expect("recover"),
        1
    );
    let again = ledger.claim_due(later, 10).await.expect("claim");
    assert_eq!(
        again[0].event_id, event_id,
        "the same event id on every attempt"
    );
    assert_eq!(again[0].attempts, 2);
    ledger
        .finish(
            &event_id,
            &DeliveryUpdate::Dead {
                exit_code: Some(3),
                error: "exit 3".into(),
            },
        )
        .await
        .expect("dead");
    assert_eq!(ledger.counts().await.expect("counts").hooks_dead, 1);
    assert!(ledger.retry_delivery(&event_id).await.expect("retry"));
    let revived = ledger
        .delivery(&event_id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(revived.state, DeliveryState::Pending);
    assert_eq!(revived.attempts, 0);
    assert!(!ledger.retry_delivery("evt_missing").await.expect("retry"));
}

/// Records `status` for checkout 1 with hook "h" and returns its event id.
async fn queue_one(ledger: &Ledger, status: &str) -> String {
    match ledger
        .apply(
            &verified("1", status),
            Source::Firestore,
            None,
            &[hook("h", &[])],
            WATCH,
        )
        .await
        .expect("apply")
    {
        ApplyOutcome::Transition { deliveries, .. } => deliveries[0].clone(),
        other => panic!("{status} is no change: {other:?}"),
    }
}

async fn claimed_statuses(ledger: &Ledger) -> Vec<String> {
    let later = Utc::now() + chrono::Duration::seconds(1);
    ledger
        .claim_due(later, 10)
        .await
        .expect("claim")
        .into_iter()
        .map(|d| d.status.to_string())
        .collect()
}

async fn dead(ledger: &Ledger, event_id: &str) {
    ledger
        .finish(
            event_id,
            &DeliveryUpdate::Dead {
                exit_code: Some(3),
                error: "exit 3".into(),
            },
        )
        .await
        .expect("dead");
}

async fn a_revived_older_delivery_never_runs_beside_a_later_running_one(ledger: Ledger) {
    let paid = queue_one(&ledger, "PAID").await;
    assert_eq!(claimed_statuses(&ledger).await, ["PAID"]);
    dead(&ledger, &paid).await;
    let refunded = queue_one(&ledger, "REFUNDED").await;
    assert_eq!(
        claimed_statuses(&ledger).await,
        ["REFUNDED"],
        "REFUNDED is running"
    );
    // `hooks retry` on the dead PAID while REFUNDED runs: PAID must wait.
    assert!(ledger.retry_delivery(&paid).await.expect("retry"));
    assert!(
        claimed_statuses(&ledger).await.is_empty(),
        "never two deliveries of one checkout and hook at once"
    );
    assert_eq!(ledger.next_due().await.expect("next due"), None);
    ledger
        .finish(&refunded, &DeliveryUpdate::Delivered)
        .await
        .expect("finish");
    assert_eq!(claimed_statuses(&ledger).await, ["PAID"]);
}

async fn a_revived_older_delivery_runs_before_a_later_pending_one(ledger: Ledger) {
    let paid = queue_one(&ledger, "PAID").await;
    assert_eq!(claimed_statuses(&ledger).await, ["PAID"]);
    dead(&ledger, &paid).await;
    let refunded = queue_one(&ledger, "REFUNDED").await;
    // REFUNDED failed once and waits for its retry; PAID is revived meanwhile.
    assert_eq!(claimed_statuses(&ledger).await, ["REFUNDED"]);
    ledger
        .finish(
            &refunded,
            &DeliveryUpdate::Retry {
                next_attempt_at: Utc::now(),
                exit_code: Some(1),
                error: "exit 1".into(),
            },
        )
        .await
        .expect("retry later");
    assert!(ledger.retry_delivery(&paid).await.expect("retry"));
    assert_eq!(claimed_statuses(&ledger).await, ["PAID"], "PAID first");
    assert!(claimed_statuses(&ledger).await.is_empty(), "REFUNDED waits");
    ledger
        .finish(&paid, &DeliveryUpdate::Delivered)
        .await
        .expect("finish");
    assert_eq!(claimed_statuses(&ledger).await, ["REFUNDED"]);
}

async fn replay_queues_new_events_for_past_transitions(ledger: Ledger) {
    ledger
        .apply(&verified("1", "PAID"), Source::Reconcile, None, &[], WATCH)
        .await
        .expect("apply");
    ledger
        .apply(
            &verified("2", "FAILED"),
            Source::Reconcile,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    let since = Utc::now() - chrono::Duration::hours(1);
    let events = ledger
        .replay_deliveries(since, Some("PAID"), &[("h".into(), vec![])], false)
        .await
        .expect("replay");
    assert_eq!(events.len(), 1);
    let delivery = ledger
        .delivery(&events[0])
        .await
        .expect("read")
        .expect("exists");
    assert!(delivery.replay);
    assert_eq!(delivery.checkout_id, "1");
}

/// An answer to a request sent with `ticket`, verified when the wall clock read `clock`.
fn answer(id: &str, status: &str, ticket: VerifyTicket, clock: DateTime<Utc>) -> VerifiedCheckout {
    VerifiedCheckout::for_tests_with(&checkout_json(id, status), ticket, clock)
}

/// Records `answer` as a verification nudged by Firestore would (no change time, the test's
/// refund watch), with `hooks` configured.
async fn record(ledger: &Ledger, answer: &VerifiedCheckout, hooks: &[HookSettings]) {
    ledger
        .apply(answer, Source::Firestore, None, hooks, WATCH)
        .await
        .expect("apply");
}

/// A ticket for checkout `id` unless a request sent after `seen` has answered it already.
async fn ticket_unless_covered(
    ledger: &Ledger,
    id: &CheckoutId,
    seen: VerifyTicket,
) -> Option<VerifyTicket> {
    ledger
        .issue_tickets(&[(id.clone(), Some(seen))])
        .await
        .expect("ticket")
        .into_iter()
        .next()
        .flatten()
}

async fn needs_verify(ledger: &Ledger, id: &str) -> bool {
    let id: CheckoutId = id.parse().expect("id");
    count(
        ledger,
        &format!("SELECT count(*) FROM checkouts WHERE id = '{id}' AND needs_verify"),
    )
    .await
        == 1
}

async fn an_answer_to_an_older_request_is_ignored(ledger: Ledger) {
    let first = ledger.issue_ticket().await.expect("ticket");
    let second = ledger.issue_ticket().await.expect("ticket");
    assert!(second > first);
    let now = Utc::now();
    record(&ledger, &answer("1", "PAID", second, now), &[]).await;
    assert_eq!(
        ledger
            .apply(
                &answer("1", "PENDING", first, now),
                Source::Manual,
                None,
                &[],
                WATCH
            )
            .await
            .expect("apply"),
        ApplyOutcome::Stale
    );
    assert_eq!(history(&ledger, "1").await, ["PAID"]);
}

async fn a_clock_stepped_back_does_not_make_a_paid_answer_stale(ledger: Ledger) {
    let before_step = Utc::now();
    let pending = ledger.issue_ticket().await.expect("ticket");
    ledger
        .apply(
            &answer("1", "PENDING", pending, before_step),
            Source::Reconcile,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    // NTP (or a VM restore) steps the clock back an hour; the customer pays.
    let after_step = before_step - chrono::Duration::hours(1);
    let change_seen = ledger.last_ticket().await.expect("counter");
    ledger
        .mark(&["1".parse().expect("id")], change_seen)
        .await
        .expect("mark");
    let paid = ledger.issue_ticket().await.expect("ticket");
    let outcome = ledger
        .apply(
            &answer("1", "PAID", paid, after_step),
            Source::Firestore,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    assert!(
        matches!(outcome, ApplyOutcome::Transition { .. }),
        "{outcome:?}"
    );
    assert_eq!(history(&ledger, "1").await, ["PENDING", "PAID"]);
    assert!(!needs_verify(&ledger, "1").await, "the change is verified");
}

#[tokio::test]
async fn tickets_keep_growing_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    let ledger = Ledger::open(&path).await.expect("open");
    ledger.issue_ticket().await.expect("ticket");
    let before = ledger.issue_ticket().await.expect("ticket");
    // A change note stores a ticket, durably.
    ledger
        .track(&facts("1"), TrackedVia::Track)
        .await
        .expect("track");
    ledger
        .mark(&["1".parse().expect("id")], before)
        .await
        .expect("mark");
    drop(ledger);
    let reopened = Ledger::open(&path).await.expect("reopen");
    assert_eq!(reopened.last_ticket().await.expect("counter"), before);
    assert!(reopened.issue_ticket().await.expect("ticket") > before);
}

async fn noted_changes_carry_tickets_whose_answers_clear_the_notes(ledger: Ledger) {
    for id in ["1", "2"] {
        ledger
            .track(&facts(id), TrackedVia::Track)
            .await
            .expect("track");
    }
    let asked = ledger.issue_ticket().await.expect("ticket");
    for id in ["1", "2"] {
        record(&ledger, &answer(id, "PENDING", asked, Utc::now()), &[]).await;
    }
    let before = ledger.last_ticket().await.expect("counter");
    let ids: Vec<CheckoutId> = ["1", "2"]
        .iter()
        .map(|id| id.parse().expect("id"))
        .collect();
    let noted = ledger.note_changes(&ids).await.expect("noted");
    assert_eq!(noted.seen_after, before);
    assert_eq!(noted.tickets.len(), 2);
    assert!(noted.tickets[0] > before && noted.tickets[1] > noted.tickets[0]);
    assert!(needs_verify(&ledger, "1").await && needs_verify(&ledger, "2").await);
    // An answer to a request sent before the change was seen clears nothing ...
    ledger
        .apply(
            &answer("1", "PENDING", before, Utc::now()),
            Source::Manual,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    assert!(needs_verify(&ledger, "1").await);
    // ... the answer to the ticket issued with the note does.
    record(
        &ledger,
        &answer("1", "PAID", noted.tickets[0], Utc::now()),
        &[],
    )
    .await;
    assert!(!needs_verify(&ledger, "1").await);
    assert!(
        needs_verify(&ledger, "2").await,
        "checkout 2's verification is still to come"
    );
    assert!(ledger.issue_ticket().await.expect("ticket") > noted.tickets[1]);
}

async fn a_stale_answer_keeps_the_checkout_marked_for_verification(ledger: Ledger) {
    let id: CheckoutId = "3".parse().expect("id");
    let now = Utc::now();
    let early = ledger.issue_ticket().await.expect("ticket");
    let late = ledger.issue_ticket().await.expect("ticket");
    ledger
        .apply(
            &answer("3", "PENDING", late, now),
            Source::Manual,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    let seen = ledger.last_ticket().await.expect("counter");
    ledger
        .mark(std::slice::from_ref(&id), seen)
        .await
        .expect("mark");
    assert_eq!(
        ledger
            .apply(
                &answer("3", "PAID", early, now),
                Source::Firestore,
                None,
                &[],
                WATCH
            )
            .await
            .expect("apply"),
        ApplyOutcome::Stale
    );
    assert!(
        needs_verify(&ledger, "3").await,
        "a stale answer clears nothing"
    );
    assert!(ledger.watch_set().await.expect("set")[0].needs_verify);
    // The retry, with a fresh ticket, is recorded and clears the mark.
    let retry = ledger.issue_ticket().await.expect("ticket");
    record(&ledger, &answer("3", "PAID", retry, now), &[]).await;
    assert_eq!(history(&ledger, "3").await, ["PENDING", "PAID"]);
    assert!(!needs_verify(&ledger, "3").await);
}

async fn history(ledger: &Ledger, id: &str) -> Vec<String> {
    ledger
        .transitions(&id.parse().expect("id"))
        .await
        .expect("transitions")
        .into_iter()
        .map(|t| t.to.as_str().to_owned())
        .collect()
}

async fn a_verification_requested_before_a_change_does_not_clear_it(ledger: Ledger) {
    let id: CheckoutId = "4".parse().expect("id");
    let now = Utc::now();
    let first = ledger.issue_ticket().await.expect("ticket");
    ledger
        .apply(
            &answer("4", "PENDING", first, now),
            Source::Reconcile,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    // A call goes out, then the document changes, then the call answers (old status).
    let in_flight = ledger.issue_ticket().await.expect("ticket");
    let change_seen = ledger.last_ticket().await.expect("counter");
    ledger
        .mark(std::slice::from_ref(&id), change_seen)
        .await
        .expect("mark");
    record(&ledger, &answer("4", "PENDING", in_flight, now), &[]).await;
    assert!(
        ledger.watch_set().await.expect("set")[0].needs_verify,
        "the change is still unverified"
    );
    // The verification the change asked for clears it.
    let asked = ledger.issue_ticket().await.expect("ticket");
    record(&ledger, &answer("4", "PAID", asked, now), &[]).await;
    assert!(!ledger.watch_set().await.expect("set")[0].needs_verify);
    // A mark arriving after the verification that covered it changes nothing.
    ledger
        .mark(std::slice::from_ref(&id), change_seen)
        .await
        .expect("mark");
    assert!(!ledger.watch_set().await.expect("set")[0].needs_verify);
}

async fn verified_facts_replace_what_a_tracked_response_claimed(ledger: Ledger) {
    let claimed: Checkout = serde_json::from_str(
        r#"{"id":"8","orderId":"ORD-FAKE","amount":1.00,"currency":"USD","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d"}"#,
    )
    .expect("json");
    ledger
        .track(&claimed.facts().expect("facts"), TrackedVia::Track)
        .await
        .expect("track");
    ledger
        .apply(
            &verified("8", "PAID"),
            Source::Firestore,
            None,
            &[hook("h", &[])],
            WATCH,
        )
        .await
        .expect("apply");
    let record = ledger
        .checkout(&"8".parse().expect("id"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        (
            record.order_id.as_deref(),
            record.amount.as_str(),
            record.currency.as_str()
        ),
        (Some("ORD-8"), "100.00", "AED")
    );
    let delivery = ledger
        .claim_due(Utc::now() + chrono::Duration::seconds(1), 1)
        .await
        .expect("claim")
        .pop()
        .expect("one delivery");
    assert_eq!(
        (delivery.order_id.as_deref(), delivery.amount.as_str()),
        (Some("ORD-8"), "100.00")
    );
}

async fn repeated_not_found_stops_watching_but_keeps_a_pending_verification(ledger: Ledger) {
    let id: CheckoutId = "6".parse().expect("id");
    ledger
        .track(&facts("6"), TrackedVia::Track)
        .await
        .expect("track");
    assert!(
        needs_verify(&ledger, "6").await,
        "tracked, not yet verified"
    );
    for count in 1..NOT_FOUND_LIMIT {
        assert_eq!(
            ledger.note_not_found(&id).await.expect("note"),
            NotFoundOutcome::Counted { count }
        );
    }
    assert_eq!(
        ledger.note_not_found(&id).await.expect("note"),
        NotFoundOutcome::Unwatched {
            count: NOT_FOUND_LIMIT
        }
    );
    assert!(ledger.watch_set().await.expect("set").is_empty());
    assert!(
        needs_verify(&ledger, "6").await,
        "unwatching never clears a pending verification"
    );
}

async fn many_checkouts_looking_gone_at_once_stay_watched(ledger: Ledger) {
    let ids: Vec<CheckoutId> = (1..=6)
        .map(|n| n.to_string().parse().expect("id"))
        .collect();
    for id in &ids {
        ledger
            .track(&facts(id.as_str()), TrackedVia::Track)
            .await
            .expect("track");
    }
    // Three sweeps in which paymennt says every one of them does not exist.
    let mut outcomes = Vec::new();
    for _ in 0..NOT_FOUND_LIMIT + 1 {
        for id in &ids {
            outcomes.push(ledger.note_not_found(id).await.expect("note"));
        }
    }
    assert_eq!(
        ledger.watch_set().await.expect("set").len(),
        6,
        "{outcomes:?}"
    );
    assert!(
        !outcomes
            .iter()
            .any(|o| matches!(o, NotFoundOutcome::Unwatched { .. })),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.last(),
        Some(&NotFoundOutcome::ManyLookGone(LookingGone {
            checkouts: 6,
            watched: 6
        }))
    );
    assert!(
        ledger
            .looking_gone()
            .await
            .expect("read")
            .is_configuration_problem()
    );
    // A verified answer for one of them means it is not gone.
    ledger
        .apply(
            &verified("1", "PENDING"),
            Source::Reconcile,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    assert_eq!(ledger.looking_gone().await.expect("read").checkouts, 5);
}

#[tokio::test]
async fn one_missing_checkout_among_many_is_not_a_configuration_problem() {
    let cases = [
        (1, 1, false),
        (1, 30, false),
        (2, 20, true),
        (2, 21, false),
        (5, 1000, true),
        (4, 1000, false),
    ];
    for (checkouts, watched, expected) in cases {
        assert_eq!(
            LookingGone { checkouts, watched }.is_configuration_problem(),
            expected,
            "{checkouts} of {watched}"
        );
    }
}

async fn a_refund_watch_does_not_end_while_a_change_is_unverified(ledger: Ledger) {
    let id: CheckoutId = "5".parse().expect("id");
    let paid = ledger.issue_ticket().await.expect("ticket");
    ledger
        .apply(
            &answer("5", "PAID", paid, Utc::now()),
            Source::Reconcile,
            None,
            &[],
            Duration::from_secs(60),
        )
        .await
        .expect("apply");
    // The document changes (a refund?) just before the watch ends.
    let seen = ledger.last_ticket().await.expect("counter");
    ledger
        .mark(std::slice::from_ref(&id), seen)
        .await
        .expect("mark");
    let later = Utc::now() + chrono::Duration::seconds(61);
    assert!(
        ledger
            .expire_refund_watch(later)
            .await
            .expect("expire")
            .is_empty()
    );
    assert!(
        ledger.watch_set().await.expect("set")[0].needs_verify,
        "still watched and pending"
    );
    // Once verified, the watch ends.
    let verified_again = ledger.issue_ticket().await.expect("ticket");
    ledger
        .apply(
            &answer("5", "PAID", verified_again, Utc::now()),
            Source::Reconcile,
            None,
            &[],
            Duration::from_secs(60),
        )
        .await
        .expect("apply");
    assert_eq!(
        ledger.expire_refund_watch(later).await.expect("expire"),
        vec![id]
    );
    assert!(ledger.watch_set().await.expect("set").is_empty());
}

async fn an_answer_without_coordinates_updates_a_tracked_checkout_but_cannot_add_one(
    ledger: Ledger,
) {
    let bare = r#"{"id":"9","amount":100.00,"currency":"AED","status":"PAID"}"#;
    let error = ledger
        .apply(
            &VerifiedCheckout::for_tests(bare),
            Source::Manual,
            None,
            &[],
            WATCH,
        )
        .await
        .expect_err("nowhere to watch it");
    assert!(
        error.to_string().contains("no Firebase coordinates"),
        "{error}"
    );
    ledger
        .track(&facts("9"), TrackedVia::Track)
        .await
        .expect("track");
    ledger
        .apply(
            &VerifiedCheckout::for_tests(bare),
            Source::Manual,
            None,
            &[],
            WATCH,
        )
        .await
        .expect("apply");
    assert_eq!(history(&ledger, "9").await, ["PAID"]);
}

fn refunded(id: &str, status: &str, total: &str) -> VerifiedCheckout {
    VerifiedCheckout::for_tests(&checkout_json(id, status).replace(
        r#""totalRefunded":0"#,
        &format!(r#""totalRefunded":{total}"#),
    ))
}

async fn a_refund_that_keeps_the_status_is_an_entry_for_partially_refunded_hooks(ledger: Ledger) {
    let hooks = [
        hook("refunds", &["PARTIALLY_REFUNDED"]),
        hook("paid", &["PAID"]),
    ];
    let apply = async |checkout: &VerifiedCheckout| {
        ledger
            .apply(checkout, Source::Firestore, None, &hooks, WATCH)
            .await
            .expect("apply")
    };
    apply(&verified("1", "PAID")).await;
    let first = apply(&refunded("1", "PARTIALLY_REFUNDED", "10.00")).await;
    let ApplyOutcome::Transition { deliveries, .. } = &first else {
        panic!("a status change: {first:?}");
    };
    assert_eq!(deliveries.len(), 1);
    let second = apply(&refunded("1", "PARTIALLY_REFUNDED", "25.50")).await;
    let ApplyOutcome::Transition {
        transition,
        deliveries,
        watched,
    } = &second
    else {
        panic!("a refund of its own: {second:?}");
    };
    assert!(transition.is_refund_only());
    assert_eq!(transition.refunded_from.as_deref(), Some("10.00"));
    assert_eq!(transition.refunded_to.as_deref(), Some("25.50"));
    assert_eq!(deliveries.len(), 1, "only the PARTIALLY_REFUNDED hook");
    assert!(watched);
    let delivery = ledger
        .delivery(&deliveries[0])
        .await
        .expect("read")
        .expect("queued");
    assert_eq!(delivery.hook, "refunds");
    assert_eq!(
        (
            delivery.refunded_from.as_deref(),
            delivery.refunded_to.as_deref()
        ),
        (Some("10.00"), Some("25.50"))
    );
    assert_eq!(
        apply(&refunded("1", "PARTIALLY_REFUNDED", "25.50")).await,
        ApplyOutcome::Unchanged,
        "the same total again is nothing new"
    );
    let id: CheckoutId = "1".parse().expect("id");
    assert_eq!(ledger.transitions(&id).await.expect("history").len(), 3);
}

async fn discovered_checkouts_are_tracked_once_and_without_coordinates_are_not_listened_to(
    ledger: Ledger,
) {
    let wire: Checkout =
        serde_json::from_str(r#"{"id":"7","currency":"AED","amount":5,"status":"PENDING"}"#)
            .expect("json");
    let bare = wire.answer_facts().expect("facts without coordinates");
    let found = ledger
        .record_discovered(&[facts("5"), bare.clone(), facts("5")])
        .await
        .expect("record");
    assert_eq!(
        found
            .iter()
            .map(|d| (d.checkout_id.as_str(), d.outcome, d.listened))
            .collect::<Vec<_>>(),
        [
            ("5", DiscoveredOutcome::Added, true),
            ("7", DiscoveredOutcome::Added, false)
        ],
        "a duplicate within a page counts once"
    );
    let before = ledger.data_version().await.expect("version");
    let again = ledger
        .record_discovered(&[facts("5"), bare])
        .await
        .expect("record");
    assert!(again.is_empty(), "nothing new: {again:?}");
    assert_eq!(
        ledger.data_version().await.expect("version"),
        before,
        "checkouts already tracked cost no write"
    );
    let watched: Vec<String> = ledger
        .watch_set()
        .await
        .expect("watch set")
        .into_iter()
        .map(|entry| entry.checkout_id.to_string())
        .collect();
    assert_eq!(watched, ["5"], "no document to listen to for 7");
    let open = ledger.open_checkouts().await.expect("open");
    assert_eq!(open.len(), 2, "the reconciler checks both");
    assert!(open.iter().all(|checkout| checkout.needs_verify));
    assert_eq!(
        ledger
            .checkout(&"7".parse().expect("id"))
            .await
            .expect("read")
            .expect("tracked")
            .tracked_via,
        "discovery"
    );
}

async fn a_reconcile_only_checkout_that_gains_coordinates_moves_onto_the_listener(ledger: Ledger) {
    let wire: Checkout =
        serde_json::from_str(r#"{"id":"7","currency":"AED","amount":5,"status":"PENDING"}"#)
            .expect("json");
    ledger
        .record_discovered(&[wire.answer_facts().expect("facts")])
        .await
        .expect("record");
    assert!(ledger.watch_set().await.expect("watch set").is_empty());
    let found = ledger
        .record_discovered(&[facts("7")])
        .await
        .expect("record");
    assert_eq!(
        found
            .iter()
            .map(|d| (d.checkout_id.as_str(), d.outcome, d.listened))
            .collect::<Vec<_>>(),
        [("7", DiscoveredOutcome::Located, true)]
    );
    let watched: Vec<String> = ledger
        .watch_set()
        .await
        .expect("watch set")
        .into_iter()
        .map(|entry| entry.checkout_id.to_string())
        .collect();
    assert_eq!(watched, ["7"]);
    assert!(
        ledger
            .record_discovered(&[facts("7")])
            .await
            .expect("record")
            .is_empty(),
        "located once"
    );
}

async fn discovery_rounds_and_the_epoch_are_remembered(ledger: Ledger) {
    assert_eq!(
        ledger.last_discovery_round("LINK").await.expect("read"),
        None
    );
    let first = Utc::now() - chrono::Duration::hours(1);
    let epoch = ledger.begin_discovery_epoch(first).await.expect("epoch");
    assert_eq!(timestamp(epoch), timestamp(first));
    let later = ledger
        .begin_discovery_epoch(Utc::now())
        .await
        .expect("epoch");
    assert_eq!(later, epoch, "the epoch is set once");
    let started = Utc::now();
    ledger
        .finish_discovery_round("LINK", started)
        .await
        .expect("finish");
    assert_eq!(
        ledger
            .last_discovery_round("LINK")
            .await
            .expect("read")
            .map(timestamp),
        Some(timestamp(started))
    );
    assert_eq!(
        ledger.last_discovery_round("WEB").await.expect("read"),
        None,
        "per type"
    );
}

/// A checkout as Get Checkout answers it, created at `created`.
fn verified_created(id: &str, status: &str, created: DateTime<Utc>) -> VerifiedCheckout {
    let mut value: serde_json::Value =
        serde_json::from_str(&checkout_json(id, status)).expect("json");
    value["timestamp"] = timestamp(created).into();
    VerifiedCheckout::for_tests(&value.to_string())
}

async fn a_discovered_checkout_settled_before_the_epoch_is_a_baseline_without_hooks(
    ledger: Ledger,
) {
    let hooks = vec![hook("all", &[])];
    let epoch = ledger
        .begin_discovery_epoch(Utc::now())
        .await
        .expect("epoch");
    let before = epoch - chrono::Duration::days(2);
    let after = epoch + chrono::Duration::seconds(1);
    ledger
        .record_discovered(&[facts("1"), facts("2"), facts("3"), facts("4")])
        .await
        .expect("discovered");
    ledger
        .track(&facts("5"), TrackedVia::Track)
        .await
        .expect("track");
    let apply = async |verified: VerifiedCheckout| match ledger
        .apply(&verified, Source::Firestore, None, &hooks, WATCH)
        .await
        .expect("apply")
    {
        ApplyOutcome::Transition {
            transition,
            deliveries,
            ..
        } => (transition.source, deliveries.len()),
        other => panic!("expected a transition, got {other:?}"),
    };
    // Paid before discovery began: history, not news.
    assert_eq!(
        apply(verified_created("1", "PAID", before)).await,
        ("discovery-import".to_owned(), 0)
    );
    // Still open when first seen: tracked as usual, and its payment later is news.
    assert_eq!(
        apply(verified_created("2", "PENDING", before)).await,
        ("firestore".to_owned(), 1)
    );
    assert_eq!(
        apply(verified_created("2", "PAID", before)).await,
        ("firestore".to_owned(), 1)
    );
    // Created after the epoch and paid before a round found it: new business.
    assert_eq!(
        apply(verified_created("3", "PAID", after)).await,
        ("firestore".to_owned(), 1)
    );
    // A refund of a baseline, after tracking began, is news.
    assert_eq!(
        apply(verified_created("1", "REFUNDED", before)).await,
        ("firestore".to_owned(), 1)
    );
    // No readable creation time: new business (a hook told twice can deduplicate).
    assert_eq!(
        apply(verified("4", "PAID")).await,
        ("firestore".to_owned(), 1)
    );
    // Tracked by hand: never a baseline.
    assert_eq!(
        apply(verified_created("5", "PAID", before)).await,
        ("firestore".to_owned(), 1)
    );
    let history = ledger
        .transitions(&"1".parse().expect("id"))
        .await
        .expect("history");
    assert_eq!(history[0].to.as_str(), "PAID");
    assert!(
        history[0].verified_json.contains("\"PAID\""),
        "the raw answer is kept"
    );
}

async fn without_an_epoch_nothing_is_a_baseline(ledger: Ledger) {
    ledger
        .record_discovered(&[facts("1")])
        .await
        .expect("discovered");
    let outcome = ledger
        .apply(
            &verified_created("1", "PAID", Utc::now() - chrono::Duration::days(1)),
            Source::Reconcile,
            None,
            &[hook("all", &[])],
            WATCH,
        )
        .await
        .expect("apply");
    assert!(
        matches!(&outcome, ApplyOutcome::Transition { transition, deliveries, .. }
            if transition.source == "reconcile" && deliveries.len() == 1),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn an_upgraded_ledger_takes_its_oldest_discovery_cursor_as_the_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    {
        let connection = Connection::open(&path).expect("open");
        for version in 1..=6 {
            let sql = migrate::migration_for_tests(version);
            connection.execute_batch(sql).expect("migration");
        }
        connection
            .pragma_update(None, "user_version", 6)
            .expect("version");
        connection
            .execute(
                "INSERT INTO discovery_cursor (kind, after_id, updated_at)
                 VALUES ('LINK', '9', '2024-05-01T10:00:00.000Z'),
                        ('WEB', '3', '2024-06-01T10:00:00.000Z')",
                [],
            )
            .expect("cursor");
    }
    let ledger = Ledger::open(&path).await.expect("migrated");
    assert_eq!(
        timestamp(
            ledger
                .begin_discovery_epoch(Utc::now())
                .await
                .expect("epoch")
        ),
        "2024-05-01T10:00:00.000Z"
    );
    assert_eq!(
        ledger
            .last_discovery_round("WEB")
            .await
            .expect("read")
            .map(timestamp)
            .as_deref(),
        Some("2024-06-01T10:00:00.000Z")
    );
}

async fn listen_refusals_are_noted_counted_shown_and_cleared(ledger: Ledger) {
    ledger
        .track(&facts("1"), TrackedVia::Track)
        .await
        .expect("track");
    ledger
        .track(&facts("2"), TrackedVia::Track)
        .await
        .expect("track");
    let id: CheckoutId = "1".parse().expect("id");
    let document = "projects/pc-test-734bc/databases/(default)/documents/checkouts/doc-1";
    ledger
        .note_listen_refusal(&id, "PERMISSION_DENIED", "denied", document, None)
        .await
        .expect("note");
    ledger
        .note_listen_refusal(
            &id,
            "PERMISSION_DENIED",
            "still denied",
            document,
            Some(Utc::now()),
        )
        .await
        .expect("note again");
    // A checkout the ledger does not have is ignored, not an error.
    let unknown: CheckoutId = "9".parse().expect("id");
    ledger
        .note_listen_refusal(&unknown, "NOT_FOUND", "x", document, None)
        .await
        .expect("unknown id");

    let record = ledger.checkout(&id).await.expect("read").expect("tracked");
    let refusal = record.listen_refused.expect("refusal shown");
    assert_eq!(refusal.code, "PERMISSION_DENIED");
    assert_eq!(refusal.message, "still denied");
    assert_eq!(refusal.document, document);
    assert_eq!(refusal.count, 2);
    assert!(refusal.next_retry_at.is_some());
    // The join does not disturb list filters or other checkouts.
    let listed = ledger
        .list(&ListFilter {
            watched_only: true,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 2);
    let other = listed.iter().find(|r| r.id == "2").expect("listed");
    assert!(other.listen_refused.is_none());
    let json = serde_json::to_value(other).expect("json");
    assert!(json.get("listen_refused").is_none(), "{json}");

    ledger.clear_listen_refusal(&id).await.expect("clear");
    let record = ledger.checkout(&id).await.expect("read").expect("tracked");
    assert!(record.listen_refused.is_none());
    ledger
        .note_listen_refusal(&id, "NOT_FOUND", "gone", document, None)
        .await
        .expect("note");
    ledger.clear_listen_refusals().await.expect("clear all");
    let record = ledger.checkout(&id).await.expect("read").expect("tracked");
    assert!(record.listen_refused.is_none());
}

#[tokio::test]
async fn probe_documents_picks_one_checkout_per_project_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    let ledger = Ledger::open(&path).await.expect("open");
    ledger
        .track(&facts("1"), TrackedVia::Track)
        .await
        .expect("track");
    ledger
        .track(&facts("2"), TrackedVia::Track)
        .await
        .expect("track");
    let other = checkout_json("3", "PENDING").replace("pc-test-734bc", "other-project");
    let wire: Checkout = serde_json::from_str(&other).expect("json");
    ledger
        .track(&wire.facts().expect("facts"), TrackedVia::Track)
        .await
        .expect("track");
    drop(ledger);
    let modified = std::fs::metadata(&path).expect("file").modified().ok();
    let reader = Ledger::open_read_only(&path).await.expect("read only");
    let mut probes: Vec<(String, String)> = reader
        .probe_documents(None)
        .await
        .expect("probe")
        .into_iter()
        .map(|(id, location)| (location.project, id.to_string()))
        .collect();
    probes.sort();
    assert_eq!(probes.len(), 2, "{probes:?}");
    assert_eq!(probes[0].0, "other-project");
    assert_eq!(probes[1].0, "pc-test-734bc");
    let only: CheckoutId = "2".parse().expect("id");
    let probes = reader.probe_documents(Some(&only)).await.expect("probe");
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].0, only);
    let unknown: CheckoutId = "404".parse().expect("id");
    assert!(
        reader
            .probe_documents(Some(&unknown))
            .await
            .expect("probe")
            .is_empty()
    );
    assert!(
        reader.track(&facts("4"), TrackedVia::Track).await.is_err(),
        "read only"
    );
    assert_eq!(
        std::fs::metadata(&path).expect("file").modified().ok(),
        modified
    );
    assert!(
        Ledger::open_read_only(&dir.path().join("missing.db"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_ledger_from_before_webhooks_accepts_webhook_transitions_after_migrating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.db");
    // A ledger as the release before webhooks left it: schema version 2, one transition.
    {
        let connection = Connection::open(&path).expect("raw open");
        connection
            .execute_batch(include_str!("migrations/0001_init.sql"))
            .expect("0001");
        connection
            .execute_batch(include_str!("migrations/0002_verification_times.sql"))
            .expect("0002");
        connection
            .pragma_update(None, "user_version", 2)
            .expect("version");
    }
    let ledger = Ledger::open(&path).await.expect("migrates");
    ledger
        .apply(&verified("1", "PENDING"), Source::Manual, None, &[], WATCH)
        .await
        .expect("manual");
    ledger
        .apply(&verified("1", "PAID"), Source::Webhook, None, &[], WATCH)
        .await
        .expect("a webhook-led transition is recorded");
    let sources: Vec<String> = ledger
        .transitions(&"1".parse().expect("id"))
        .await
        .expect("transitions")
        .into_iter()
        .map(|t| t.source)
        .collect();
    assert_eq!(sources, ["manual", "webhook"]);
    // The check still refuses what no source is, and the append-only triggers still hold.
    let connection = ledger.lock();
    let refused = connection.execute(
        "INSERT INTO transitions (checkout_id, to_status, source, verified_at, verified_json) \
         VALUES ('1', 'PAID', 'bogus', 'x', '{}')",
        [],
    );
    assert!(refused.is_err(), "an unknown source is refused");
    assert!(
        connection.execute("DELETE FROM transitions", []).is_err(),
        "transitions stay append-only"
    );
    let check: String = connection
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
}

async fn record_and_claim_writes_outcomes_and_claims_the_events_they_free_in_one_call(
    ledger: Ledger,
) {
    let hooks = [hook("h", &[])];
    for id in ["1", "2", "3"] {
        for status in ["PENDING", "PAID"] {
            record(&ledger, &verified(id, status), &hooks).await;
        }
    }
    let later = Utc::now() + chrono::Duration::seconds(1);
    let first = ledger
        .record_and_claim(&[], later, 10)
        .await
        .expect("claim");
    assert_eq!(
        first.claimed.len(),
        3,
        "one batch claims every due delivery"
    );
    assert!(first.claimed.iter().all(|d| d.status.as_str() == "PENDING"));
    assert_eq!(
        first.next_due, None,
        "the PAIDs wait behind running PENDINGs"
    );

    // Checkout 3's outcome is refused (a failing statement); the others are written and the
    // PAIDs they free are claimed in the same call, checkout 3's PAID not.
    let trigger = if pg(&ledger).is_some() {
        "CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused (test)'; END $$;
         CREATE TRIGGER refuse_outcome BEFORE UPDATE OF state ON hook_deliveries FOR EACH ROW
         WHEN (OLD.checkout_id = '3' AND NEW.state <> 'running')
         EXECUTE FUNCTION refuse_outcome();"
    } else {
        "CREATE TEMP TRIGGER refuse_outcome BEFORE UPDATE OF state ON hook_deliveries
         WHEN OLD.checkout_id = '3' AND NEW.state <> 'running'
         BEGIN SELECT RAISE(ABORT, 'refused (test)'); END;"
    };
    execute(&ledger, trigger).await.expect("trigger");
    let outcomes: Vec<(String, DeliveryUpdate)> = first
        .claimed
        .iter()
        .map(|d| (d.event_id.clone(), DeliveryUpdate::Delivered))
        .collect();
    let second = ledger
        .record_and_claim(&outcomes, later, 10)
        .await
        .expect("round");
    let refused_index = first
        .claimed
        .iter()
        .position(|d| d.checkout_id == "3")
        .expect("3 claimed");
    assert_eq!(second.refused.len(), 1);
    assert_eq!(second.refused[0].0, refused_index);
    assert!(
        second.refused[0].1.contains("refused (test)"),
        "{:?}",
        second.refused
    );
    let mut freed: Vec<(String, String)> = second
        .claimed
        .iter()
        .map(|d| (d.checkout_id.clone(), d.status.to_string()))
        .collect();
    freed.sort();
    assert_eq!(
        freed,
        [("1".into(), "PAID".into()), ("2".into(), "PAID".into())]
    );
    for delivery in &first.claimed {
        let state = ledger
            .delivery(&delivery.event_id)
            .await
            .expect("read")
            .expect("exists")
            .state;
        let expected = if delivery.checkout_id == "3" {
            DeliveryState::Running
        } else {
            DeliveryState::Delivered
        };
        assert_eq!(state, expected, "checkout {}", delivery.checkout_id);
    }

    // Written again once the ledger takes it: checkout 3's PAID follows in the same call.
    let drop_trigger = if pg(&ledger).is_some() {
        "DROP TRIGGER refuse_outcome ON hook_deliveries"
    } else {
        "DROP TRIGGER refuse_outcome"
    };
    execute(&ledger, drop_trigger).await.expect("drop trigger");
    let third = ledger
        .record_and_claim(&outcomes[refused_index..=refused_index], later, 10)
        .await
        .expect("round");
    assert!(third.refused.is_empty());
    assert_eq!(third.claimed.len(), 1);
    assert_eq!(third.claimed[0].checkout_id, "3");
    assert_eq!(third.claimed[0].status.as_str(), "PAID");
    // On SQLite its own commit skips the fsync; every other commit still flushes (FULL = 2).
    if pg(&ledger).is_none() {
        let synchronous: i64 = ledger
            .lock()
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .expect("pragma");
        assert_eq!(synchronous, 2);
    }
}

/// A verified answer with no Firebase coordinates, for a checkout the ledger does not track:
/// applying it fails (nothing says where to watch it).
fn untrackable(id: &str) -> VerifiedCheckout {
    VerifiedCheckout::for_tests(&format!(
        r#"{{"id":"{id}","orderId":"ORD-{id}","currency":"AED","amount":1,"status":"PAID"}}"#
    ))
}

fn request(verified: VerifiedCheckout) -> ApplyRequest {
    ApplyRequest {
        verified,
        source: Source::Firestore,
        changed_at: None,
    }
}

/// `grouped` on either backend; `alone` on SQLite, so PostgreSQL's group also matches what
/// SQLite records for each answer alone.
async fn a_group_of_answers_is_recorded_as_each_would_be_alone(grouped: Ledger) {
    let hooks = [hook("notify", &["PAID"])];
    let alone = Ledger::open_in_memory().expect("ledger");
    for ledger in [&grouped, &alone] {
        ledger
            .track(&facts("2"), TrackedVia::Track)
            .await
            .expect("track");
    }
    let answers = [
        verified("1", "PENDING"),
        verified("2", "PAID"),
        verified("3", "CANCELLED"),
    ];
    let requests: Vec<ApplyRequest> = answers.iter().cloned().map(request).collect();
    let outcomes: Vec<ApplyOutcome> = grouped
        .apply_all(requests.to_vec(), &hooks, WATCH)
        .await
        .into_iter()
        .map(|outcome| outcome.expect("recorded"))
        .collect();
    for (answer, outcome) in answers.iter().zip(&outcomes) {
        let single = alone
            .apply(answer, Source::Firestore, None, &hooks, WATCH)
            .await
            .expect("recorded");
        match (outcome, single) {
            (
                ApplyOutcome::Transition {
                    transition,
                    deliveries,
                    watched,
                },
                ApplyOutcome::Transition {
                    transition: expected,
                    deliveries: expected_deliveries,
                    watched: expected_watched,
                },
            ) => {
                assert_eq!(transition.to, expected.to);
                assert_eq!(transition.from, expected.from);
                assert_eq!(deliveries.len(), expected_deliveries.len());
                assert_eq!(*watched, expected_watched);
            }
            (grouped, single) => panic!("grouped {grouped:?} but alone {single:?}"),
        }
    }
    for id in ["1", "2", "3"] {
        assert_eq!(
            history(&grouped, id).await,
            history(&alone, id).await,
            "checkout {id}"
        );
    }
    assert_eq!(history(&grouped, "2").await, ["PAID"]);
}

async fn one_failing_answer_in_a_group_fails_alone(ledger: Ledger) {
    let requests = [
        request(verified("1", "PAID")),
        request(untrackable("2")),
        request(verified("3", "PAID")),
    ];
    let outcomes = ledger.apply_all(requests.to_vec(), &[], WATCH).await;
    assert!(matches!(outcomes[0], Ok(ApplyOutcome::Transition { .. })));
    assert!(outcomes[1].is_err(), "{:?}", outcomes[1]);
    assert!(matches!(outcomes[2], Ok(ApplyOutcome::Transition { .. })));
    assert_eq!(history(&ledger, "1").await, ["PAID"]);
    assert_eq!(history(&ledger, "3").await, ["PAID"]);
    assert_eq!(
        ledger
            .checkout(&"2".parse().expect("id"))
            .await
            .expect("read"),
        None
    );
}

async fn a_group_of_tickets_is_what_each_request_would_get_alone(ledger: Ledger) {
    let (covered, open, untracked): (CheckoutId, CheckoutId, CheckoutId) = (
        "1".parse().expect("id"),
        "2".parse().expect("id"),
        "9".parse().expect("id"),
    );
    for id in ["1", "2"] {
        ledger
            .track(&facts(id), TrackedVia::Track)
            .await
            .expect("track");
    }
    let seen = ledger.last_ticket().await.expect("counter");
    let asked = ledger.issue_ticket().await.expect("ticket");
    record(&ledger, &answer("1", "PENDING", asked, Utc::now()), &[]).await;
    let tickets = ledger
        .issue_tickets(&[
            (covered.clone(), Some(seen)),
            (open.clone(), Some(seen)),
            (untracked, Some(seen)),
            (covered, None),
        ])
        .await
        .expect("tickets");
    // Checkout 1 was answered by a request sent after `seen`: no ticket; the others get
    // distinct ones, in order, after every ticket before; `None` always asks.
    assert_eq!(tickets.len(), 4);
    assert_eq!(tickets[0], None);
    let issued: Vec<VerifyTicket> = tickets[1..].iter().flatten().copied().collect();
    assert_eq!(issued.len(), 3, "{tickets:?}");
    assert!(issued[0] > asked);
    assert!(
        issued.windows(2).all(|pair| pair[0] < pair[1]),
        "{issued:?}"
    );
    assert!(ledger.issue_ticket().await.expect("ticket") > issued[2]);
    // The open checkout's ticket is what it would have got alone: a request is needed.
    assert!(ticket_unless_covered(&ledger, &open, seen).await.is_some());
}

async fn a_ticket_is_not_needed_once_a_later_request_answered(ledger: Ledger) {
    let id: CheckoutId = "1".parse().expect("id");
    ledger
        .track(&facts("1"), TrackedVia::Track)
        .await
        .expect("track");
    // Never verified: a ticket is issued.
    let seen = ledger.last_ticket().await.expect("counter");
    let first = ticket_unless_covered(&ledger, &id, seen)
        .await
        .expect("never verified: a request is needed");
    assert!(first > seen);
    record(&ledger, &answer("1", "PENDING", first, Utc::now()), &[]).await;
    // A change seen before that request was sent is covered by its answer ...
    assert_eq!(ticket_unless_covered(&ledger, &id, seen).await, None);
    // ... one seen after it was sent is not.
    let later = ledger.last_ticket().await.expect("counter");
    let second = ticket_unless_covered(&ledger, &id, later)
        .await
        .expect("a change after the last request needs a new one");
    assert!(second > first);
    // An untracked checkout always needs a request.
    let other: CheckoutId = "9".parse().expect("id");
    assert!(
        ticket_unless_covered(&ledger, &other, later)
            .await
            .is_some()
    );
}

/// Figures, not assertions (run with `--ignored --nocapture`): verified transitions/s through
/// `apply_all` in groups of 64, and one `apply`'s latency, on an SQLite file (fsync on) and on
/// the throwaway PostgreSQL cluster (which runs with fsync off: a lower bound for a real server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures; run with --ignored --nocapture"]
#[allow(clippy::print_stdout)]
async fn figures_transitions_per_second_on_both_backends() {
    const CHECKOUTS: usize = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Ledger::open(&dir.path().join("paywatch.db"))
        .await
        .expect("ledger");
    let mut ledgers = vec![("sqlite (file, fsync on)", sqlite)];
    if let Some(ledger) = postgres_ledger().await {
        ledgers.push(("postgresql (test cluster, fsync off)", ledger));
    }
    for (name, ledger) in ledgers {
        let ids: Vec<String> = (0..CHECKOUTS).map(|n| format!("{}", 100_000 + n)).collect();
        for id in &ids {
            ledger
                .track(&facts(id), TrackedVia::Track)
                .await
                .expect("track");
        }
        let started = std::time::Instant::now();
        for chunk in ids.chunks(64) {
            let requests: Vec<ApplyRequest> = chunk
                .iter()
                .map(|id| request(verified(id, "PENDING")))
                .collect();
            for outcome in ledger
                .apply_all(requests, &[hook("h", &["PAID"])], WATCH)
                .await
            {
                outcome.expect("applied");
            }
        }
        let grouped = CHECKOUTS as f64 / started.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        for id in ids.iter().take(300) {
            let started = std::time::Instant::now();
            ledger
                .apply(
                    &verified(id, "PAID"),
                    Source::Firestore,
                    None,
                    &[hook("h", &["PAID"])],
                    WATCH,
                )
                .await
                .expect("apply");
            latencies.push(started.elapsed());
        }
        latencies.sort();
        let at =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        // The dispatcher's rounds: claim up to 64, record them delivered in the next round.
        let later = Utc::now() + chrono::Duration::seconds(1);
        let started = std::time::Instant::now();
        let mut outcomes: Vec<(String, DeliveryUpdate)> = Vec::new();
        let mut delivered = 0;
        loop {
            let round = ledger
                .record_and_claim(&outcomes, later, 64)
                .await
                .expect("round");
            delivered += outcomes.len();
            if round.claimed.is_empty() {
                break;
            }
            outcomes = round
                .claimed
                .into_iter()
                .map(|d| (d.event_id, DeliveryUpdate::Delivered))
                .collect();
        }
        let deliveries = delivered as f64 / started.elapsed().as_secs_f64();
        println!(
            "{name}: {grouped:.0} transitions/s grouped by 64; one apply with a hook p50 {:?} \
             p99 {:?}; {deliveries:.0} deliveries/s recorded and claimed by 64 ({delivered})",
            at(0.5),
            at(0.99)
        );
    }
}

/// The gauges' figures after the same operations, on `ledger` and on SQLite (times only
/// compared for presence: the two ledgers are written a moment apart).
async fn gauges_read_the_same_as_on_sqlite(ledger: Ledger) {
    let sqlite = Ledger::open_in_memory().expect("ledger");
    let hooks = [hook("crm", &["PAID"]), hook("audit", &[])];
    let mut figures = Vec::new();
    for ledger in [&ledger, &sqlite] {
        ledger
            .track(&facts("10"), TrackedVia::Track)
            .await
            .expect("track");
        record(ledger, &verified("11", "PENDING"), &[]).await;
        record(ledger, &verified("12", "PENDING"), &hooks).await;
        record(ledger, &verified("12", "PAID"), &hooks).await;
        record(ledger, &verified("13", "FAILED"), &hooks).await;
        ledger
            .save_resume_points(&[ResumePoint {
                checkout_id: "11".parse().expect("id"),
                token: vec![7],
                read_time: None,
            }])
            .await
            .expect("save");
        let later = Utc::now() + chrono::Duration::seconds(1);
        let claimed = ledger.claim_due(later, 2).await.expect("claim");
        ledger
            .finish(
                &claimed[0].event_id,
                &DeliveryUpdate::Dead {
                    exit_code: Some(1),
                    error: "no".into(),
                },
            )
            .await
            .expect("finish");
        let gauges = ledger.gauges().await.expect("gauges");
        figures.push((
            gauges.watched_by_status,
            gauges.undelivered_by_hook,
            gauges.paid_with_undelivered_hooks,
            gauges.oldest_undelivered.is_some(),
            gauges.oldest_pending.is_some(),
            gauges.oldest_resume_token.is_some(),
            ledger.counts().await.expect("counts"),
        ));
    }
    assert_eq!(figures[0], figures[1]);
    assert_eq!(figures[0].2, 1, "one PAID checkout with undelivered hooks");
}

/// Two answers for one checkout new to the ledger, recorded at the same time (a later request's
/// PAID and an earlier request's PENDING), over and over: the history never starts twice and
/// never goes back from PAID, whichever transaction runs first (PostgreSQL's writers run
/// concurrently; SQLite's one at a time).
async fn concurrent_first_answers_for_one_checkout_are_recorded_one_after_the_other(
    ledger: Ledger,
) {
    let clock = Utc::now();
    for n in 0..40 {
        let id = format!("{}", 500 + n);
        let earlier = ledger.issue_ticket().await.expect("ticket");
        let later = ledger.issue_ticket().await.expect("ticket");
        let pending = answer(&id, "PENDING", earlier, clock);
        let paid = answer(&id, "PAID", later, clock);
        let (first, second) = tokio::join!(
            ledger.apply(&paid, Source::Firestore, None, &[], WATCH),
            ledger.apply(&pending, Source::Firestore, None, &[], WATCH),
        );
        first.expect("paid");
        second.expect("pending");
        let history = history(&ledger, &id).await;
        assert!(
            history == ["PAID"] || history == ["PENDING", "PAID"],
            "checkout {id}: {history:?}"
        );
    }
}

/// Two claimers at once (on PostgreSQL, two connections) never hand out one delivery twice,
/// nor two deliveries of one checkout and hook together.
async fn concurrent_claims_never_hand_out_a_delivery_twice(ledger: Ledger) {
    let hooks = [hook("h", &[])];
    for n in 0..10 {
        let id = format!("{}", 700 + n);
        record(&ledger, &verified(&id, "PENDING"), &hooks).await;
        record(&ledger, &verified(&id, "PAID"), &hooks).await;
    }
    let later = Utc::now() + chrono::Duration::seconds(1);
    let mut handed_out = Vec::new();
    for _ in 0..5 {
        let (first, second) = tokio::join!(
            ledger.record_and_claim(&[], later, 3),
            ledger.record_and_claim(&[], later, 3),
        );
        let claimed: Vec<Delivery> = first
            .expect("claim")
            .claimed
            .into_iter()
            .chain(second.expect("claim").claimed)
            .collect();
        let mut checkouts: Vec<&str> = claimed.iter().map(|d| d.checkout_id.as_str()).collect();
        checkouts.sort_unstable();
        let before = checkouts.len();
        checkouts.dedup();
        assert_eq!(before, checkouts.len(), "one checkout's two events at once");
        let outcomes: Vec<(String, DeliveryUpdate)> = claimed
            .iter()
            .map(|d| (d.event_id.clone(), DeliveryUpdate::Delivered))
            .collect();
        ledger
            .record_and_claim(&outcomes, later, 0)
            .await
            .expect("record");
        handed_out.extend(claimed.into_iter().map(|d| d.event_id));
    }
    let total = handed_out.len();
    handed_out.sort();
    handed_out.dedup();
    assert_eq!(total, handed_out.len(), "a delivery handed out twice");
    assert_eq!(total, 20, "every delivery handed out once");
}

/// `probe_documents` on either backend (the SQLite-only test above also checks it reads a file
/// without writing it).
async fn probes_pick_one_checkout_per_project(ledger: Ledger) {
    for id in ["1", "2"] {
        ledger
            .track(&facts(id), TrackedVia::Track)
            .await
            .expect("track");
    }
    let other = checkout_json("3", "PENDING").replace("pc-test-734bc", "other-project");
    let wire: Checkout = serde_json::from_str(&other).expect("json");
    ledger
        .track(&wire.facts().expect("facts"), TrackedVia::Track)
        .await
        .expect("track");
    let mut probes: Vec<String> = ledger
        .probe_documents(None)
        .await
        .expect("probe")
        .into_iter()
        .map(|(_, location)| location.project)
        .collect();
    probes.sort();
    assert_eq!(probes, ["other-project", "pc-test-734bc"]);
    let only: CheckoutId = "2".parse().expect("id");
    let probes = ledger.probe_documents(Some(&only)).await.expect("probe");
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].0, only);
    let unknown: CheckoutId = "404".parse().expect("id");
    assert!(
        ledger
            .probe_documents(Some(&unknown))
            .await
            .expect("probe")
            .is_empty()
    );
}

#[tokio::test]
async fn postgres_tickets_keep_growing_across_processes() {
    let Some(first) = postgres_ledger().await else {
        return;
    };
    let issued = first.issue_ticket().await.expect("ticket");
    let store = pg(&first).expect("PostgreSQL");
    let settings = crate::settings::LedgerSettings {
        url: Some(crate::settings::Secret::new(format!(
            "postgresql://postgres@{}?sslmode=disable",
            store.target().describe()
        ))),
        ..crate::settings::LedgerSettings::default()
    };
    // Another process on the same database (an operator's command).
    let second = Ledger::postgres(
        postgres::PgStore::open(&settings, postgres::Session::Operator)
            .await
            .expect("open again"),
    );
    assert_eq!(second.last_ticket().await.expect("last"), issued);
    assert!(second.issue_ticket().await.expect("ticket") > issued);
    assert!(first.issue_ticket().await.expect("ticket") > issued);
}
