//! The dispatcher end to end against an on-disk ledger, with shell scripts as hooks.
//!
//! Transitions are recorded with [`Ledger::apply`] (which needs a verified checkout, so these
//! tests live inside the crate). Retry schedules are milliseconds; every wait has a deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;
use crate::domain::Source;
use crate::hooks::retry::RetrySchedule;
use crate::hooks::runner::HookCommand;
use crate::hooks::runner::tests::is_running;
use crate::ledger::testing::wal_commits;
use crate::ledger::{DeliveryFilter, DeliveryState};
use crate::paymennt::VerifiedCheckout;
use crate::settings::HookSettings;

const WATCH: Duration = Duration::from_secs(3600);
const DEADLINE: Duration = Duration::from_secs(20);

/// A verified checkout `id` in `status`, with this order id (any text).
fn verified(id: &str, status: &str, order_id: &str) -> VerifiedCheckout {
    let json = serde_json::json!({
        "id": id,
        "orderId": order_id,
        "requestId": format!("REQ-{id}"),
        "currency": "AED",
        "amount": 100.5,
        "status": status,
        "totalRefunded": 0,
        "firebaseDatabase": "pc-test-734bc",
        "firebaseCollection": "checkouts",
        "firebaseDocument": format!("doc-{id}"),
        "customer": {"email": "secret.customer@example.com"},
    });
    VerifiedCheckout::for_tests(&json.to_string())
}

/// What `apply` needs to queue a delivery for every status.
fn settings(name: &str) -> HookSettings {
    HookSettings {
        name: name.into(),
        command: vec!["/bin/sh".into()],
        statuses: vec![],
        timeout: Duration::from_secs(5),
        max_attempts: None,
        max_age: None,
        env: Default::default(),
        permanent_exit_codes: vec![],
        run_as: None,
        ..HookSettings::for_tests(name, &[])
    }
}

/// A hook `name` running `body` with `/bin/sh SCRIPT DIR` in `dir` (the program is `/bin/sh`,
/// not the script: exec'ing a file just written can fail with ETXTBSY while another test
/// thread forks). Retries come after 10 ms, 20 ms, then 40 ms.
fn hook(dir: &Path, name: &str, body: &str) -> HookSpec {
    let script = dir.join(format!("{name}.sh"));
    std::fs::write(&script, body).expect("write the script");
    let mut command = HookCommand::new(name, "/bin/sh");
    command.args = vec![script.display().to_string(), dir.display().to_string()];
    command.working_dir = dir.to_path_buf();
    command.timeout = Duration::from_secs(10);
    command.kill_grace = Duration::from_millis(200);
    HookSpec {
        target: HookTarget::Command(command),
        policy: RetryPolicy {
            max_attempts: 10,
            max_age: None,
            permanent_exit_codes: vec![],
            schedule: RetrySchedule::new(
                vec![
                    Duration::from_millis(10),
                    Duration::from_millis(20),
                    Duration::from_millis(40),
                ],
                0.2,
            ),
        },
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    ledger: Ledger,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("ledger/paywatch.db"))
            .await
            .expect("ledger");
        Fixture { dir, ledger }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Records a transition and returns the event ids queued for it.
    async fn transition(
        &self,
        id: &str,
        status: &str,
        order_id: &str,
        hooks: &[&str],
    ) -> Vec<String> {
        let hooks: Vec<HookSettings> = hooks.iter().map(|name| settings(name)).collect();
        match self
            .ledger
            .apply(
                &verified(id, status, order_id),
                Source::Firestore,
                None,
                &hooks,
                WATCH,
            )
            .await
            .expect("apply")
        {
            crate::ledger::ApplyOutcome::Transition { deliveries, .. } => deliveries,
            other => panic!("{id} {status} is no change: {other:?}"),
        }
    }

    async fn delivery(&self, event_id: &str) -> Delivery {
        self.ledger
            .delivery(event_id)
            .await
            .expect("read")
            .expect("exists")
    }

    fn start(&self, hooks: Vec<HookSpec>, concurrency: usize) -> Running {
        let dispatcher = Dispatcher::new(self.ledger.clone(), HookSet::new(hooks), concurrency)
            .with_poll_interval(Duration::from_millis(50));
        let handle = dispatcher.handle();
        let (shutdown, kill) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(dispatcher.run(shutdown.clone(), kill.clone()));
        Running {
            handle,
            shutdown,
            kill,
            task,
        }
    }

    /// Waits until the delivery reaches `state`, failing after [`DEADLINE`].
    async fn until_state(&self, event_id: &str, state: DeliveryState) -> Delivery {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let delivery = self.delivery(event_id).await;
            if delivery.state == state {
                return delivery;
            }
            assert!(
                Instant::now() < deadline,
                "{event_id} never became {state:?}: {delivery:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.file(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

struct Running {
    handle: DispatcherHandle,
    shutdown: CancellationToken,
    kill: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Shuts down and waits for the loop to end, failing after [`DEADLINE`].
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the dispatcher stopped in time")
            .expect("the dispatcher did not panic");
    }
}

async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_hook_failing_twice_is_delivered_on_attempt_three_and_order_holds() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "flaky",
        r#"read -r event
echo "$PAYWATCH_STATUS $PAYWATCH_ATTEMPT $PAYWATCH_EVENT_ID $(printf '%s' "$event" | grep -c "\"event_id\":\"$PAYWATCH_EVENT_ID\"")" >> "$1/calls"
if [ "$PAYWATCH_STATUS" = PENDING ] && [ "$PAYWATCH_ATTEMPT" -lt 3 ]; then
  echo "not yet" >&2
  exit 1
fi
"#,
    );
    let pending = fx.transition("1", "PENDING", "ORD-1", &["flaky"]).await;
    let paid = fx.transition("1", "PAID", "ORD-1", &["flaky"]).await;
    let running = fx.start(vec![spec], 4);

    let first = fx.until_state(&pending[0], DeliveryState::Delivered).await;
    let second = fx.until_state(&paid[0], DeliveryState::Delivered).await;
    running.stop().await;

    assert_eq!(first.attempts, 3);
    assert_eq!(first.last_exit_code, Some(0));
    assert_eq!(first.last_error, None);
    assert!(first.delivered_at.is_some());
    assert_eq!(second.attempts, 1);
    let expected: Vec<String> = [
        ("PENDING", 1, &pending[0]),
        ("PENDING", 2, &pending[0]),
        ("PENDING", 3, &pending[0]),
        ("PAID", 1, &paid[0]),
    ]
    .iter()
    .map(|(status, attempt, event)| format!("{status} {attempt} {event} 1"))
    .collect();
    assert_eq!(
        fx.lines("calls"),
        expected,
        "same event id in env and stdin on every attempt; PAID waits for PENDING"
    );
}

#[tokio::test]
async fn a_hanging_hook_is_killed_at_its_timeout_with_its_children_and_retried() {
    let fx = Fixture::new().await;
    let mut spec = hook(
        fx.path(),
        "hang",
        r#"echo "$PAYWATCH_ATTEMPT" >> "$1/calls"
if [ "$PAYWATCH_ATTEMPT" = 1 ]; then
  sleep 1000 &
  echo $! > "$1/child.pid"
  sleep 1000
fi
"#,
    );
    if let HookTarget::Command(command) = &mut spec.target {
        command.timeout = Duration::from_millis(300);
    }
    let event = fx.transition("1", "PAID", "ORD-1", &["hang"]).await;
    let started = Instant::now();
    let running = fx.start(vec![spec], 2);

    let delivery = fx.until_state(&event[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(delivery.attempts, 2);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fx.lines("calls"), ["1", "2"]);
    let child: u32 = fx.lines("child.pid")[0].parse().expect("a pid");
    eventually("the hook's background child to die", async || {
        !is_running(child)
    })
    .await;
}

#[tokio::test]
async fn a_permanent_exit_code_is_dead_at_once_and_later_events_go_on() {
    let fx = Fixture::new().await;
    let mut spec = hook(
        fx.path(),
        "picky",
        r#"echo "$PAYWATCH_STATUS" >> "$1/calls"
[ "$PAYWATCH_STATUS" = PAID ] || { echo "unknown order" >&2; exit 64; }
"#,
    );
    spec.policy.permanent_exit_codes = vec![64];
    let pending = fx.transition("1", "PENDING", "ORD-1", &["picky"]).await;
    let paid = fx.transition("1", "PAID", "ORD-1", &["picky"]).await;
    let running = fx.start(vec![spec], 1);

    let dead = fx.until_state(&pending[0], DeliveryState::Dead).await;
    fx.until_state(&paid[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(dead.attempts, 1);
    assert_eq!(dead.last_exit_code, Some(64));
    assert_eq!(
        dead.last_error.as_deref(),
        Some("exit 64: a permanent exit code, not retried")
    );
    assert_eq!(fx.lines("calls"), ["PENDING", "PAID"]);
}

#[tokio::test]
async fn a_delivery_dead_after_max_attempts_is_revived_by_retry() {
    let fx = Fixture::new().await;
    let mut spec = hook(
        fx.path(),
        "down",
        r#"echo "$PAYWATCH_ATTEMPT" >> "$1/calls"
[ -e "$1/fixed" ] || exit 3
"#,
    );
    spec.policy.max_attempts = 3;
    let event = fx.transition("1", "PAID", "ORD-1", &["down"]).await;
    let running = fx.start(vec![spec], 2);

    let dead = fx.until_state(&event[0], DeliveryState::Dead).await;
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_exit_code, Some(3));
    assert_eq!(
        dead.last_error.as_deref(),
        Some("exit 3: gave up after 3 attempts (max_attempts)")
    );

    std::fs::write(fx.file("fixed"), "").expect("fix the merchant's system");
    assert!(fx.ledger.retry_delivery(&event[0]).await.expect("retry"));
    // No wake: another process (the CLI) did this; the poll interval finds it.
    let delivered = fx.until_state(&event[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(delivered.attempts, 1, "retry starts the count again");
    assert_eq!(delivered.event_id, event[0]);
    assert_eq!(fx.lines("calls"), ["1", "2", "3", "1"]);
}

#[tokio::test]
async fn one_checkouts_events_run_in_order_while_checkouts_run_in_parallel() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "ordered",
        r#"echo "$PAYWATCH_CHECKOUT_ID $PAYWATCH_STATUS start $(date +%s%N)" >> "$1/log"
sleep "0.0$(( $$ % 4 ))"
echo "$PAYWATCH_CHECKOUT_ID $PAYWATCH_STATUS end $(date +%s%N)" >> "$1/log"
"#,
    );
    let running = fx.start(vec![spec], 4);
    let checkouts: Vec<String> = (1..=20).map(|n| format!("c{n}")).collect();
    let statuses = ["PENDING", "PAID", "REFUNDED"];
    let mut events = Vec::new();
    for status in statuses {
        for checkout in &checkouts {
            events.extend(fx.transition(checkout, status, "ORD", &["ordered"]).await);
            running.handle.wake();
        }
    }
    for event in &events {
        fx.until_state(event, DeliveryState::Delivered).await;
    }
    running.stop().await;

    let lines = fx.lines("log");
    assert_eq!(lines.len(), 2 * events.len(), "each ran exactly once");
    let mut per_checkout: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    let (mut live, mut most_live) = (0, 0);
    let mut timeline: Vec<(u128, i32)> = Vec::new();
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        let [checkout, status, phase, time] = fields[..] else {
            panic!("bad line {line:?}");
        };
        per_checkout
            .entry(checkout)
            .or_default()
            .push((status, phase));
        let time: u128 = time.parse().expect("nanoseconds");
        timeline.push((time, if phase == "start" { 1 } else { -1 }));
    }
    // Ends sort before starts at the same instant, so touching runs do not count as overlap.
    timeline.sort();
    for (_, step) in timeline {
        live += step;
        most_live = most_live.max(live);
    }
    for (checkout, seen) in per_checkout {
        let expected: Vec<(&str, &str)> = statuses
            .iter()
            .flat_map(|status| [(*status, "start"), (*status, "end")])
            .collect();
        assert_eq!(
            seen, expected,
            "checkout {checkout}: one at a time, in order"
        );
    }
    assert!(most_live > 1, "different checkouts ran concurrently");
    assert!(most_live <= 4, "at most the concurrency limit: {most_live}");
}

#[tokio::test]
async fn hostile_order_ids_reach_the_hook_as_inert_data() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "inert",
        r#"printf '%s' "$PAYWATCH_ORDER_ID" > "$1/order.env"
cat > "$1/event.json"
"#,
    );
    let hostile = "$(touch pwned) `touch pwned2` \"; touch pwned3; '\n\u{0}\u{7}\\xff Ã© \u{FFFD}";
    let event = fx.transition("1", "PAID", hostile, &["inert"]).await;
    let running = fx.start(vec![spec], 1);
    fx.until_state(&event[0], DeliveryState::Delivered).await;
    running.stop().await;

    for name in ["pwned", "pwned2", "pwned3"] {
        assert!(!fx.file(name).exists(), "{name} was created");
        assert!(!Path::new("/").join(name).exists(), "/{name} was created");
    }
    let env = std::fs::read_to_string(fx.file("order.env")).expect("env written");
    assert_eq!(
        env,
        hostile.replace('\0', "\u{FFFD}"),
        "env: NUL replaced only"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.file("event.json")).expect("stdin written"))
            .expect("valid JSON");
    assert_eq!(json["order_id"], hostile, "stdin: exactly");
    assert_eq!(json["checkout"]["orderId"], hostile);
    assert_eq!(json["event_id"], event[0].as_str());
    assert_eq!(json["test"], false);
    assert_eq!(json["amount"], "100.50");
}

#[tokio::test]
async fn the_daemons_environment_is_not_the_hooks() {
    let fx = Fixture::new().await;
    let spec = hook(fx.path(), "env", "cat /proc/$$/environ > \"$1/environ\"\n");
    let event = fx.transition("1", "PAID", "ORD-1", &["env"]).await;
    let running = fx.start(vec![spec], 1);
    fx.until_state(&event[0], DeliveryState::Delivered).await;
    running.stop().await;

    let environ = std::fs::read(fx.file("environ")).expect("written");
    let names: Vec<String> = environ
        .split(|byte| *byte == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            entry.split('=').next().unwrap_or_default().to_owned()
        })
        .collect();
    let inherited: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name != "PATH" && name != "LANG")
        .collect();
    assert!(!inherited.is_empty(), "the test process has an environment");
    for name in &inherited {
        assert!(!names.contains(name), "{name} leaked into the hook");
    }
    for name in &names {
        assert!(
            name == "PATH" || name == "LANG" || name.starts_with("PAYWATCH_"),
            "unexpected variable {name}"
        );
    }
}

#[tokio::test]
async fn a_delivery_interrupted_by_a_crash_runs_again_at_start_and_is_delivered_once() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "resume",
        "echo \"$PAYWATCH_EVENT_ID $PAYWATCH_ATTEMPT\" >> \"$1/calls\"\n",
    );
    let event = fx.transition("1", "PAID", "ORD-1", &["resume"]).await;
    // A daemon claimed it and died: the row is running, attempt 1 counted.
    let claimed = fx
        .ledger
        .claim_due_deliveries(Utc::now(), 10)
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(fx.delivery(&event[0]).await.state, DeliveryState::Running);

    let running = fx.start(vec![spec], 1);
    let delivered = fx.until_state(&event[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(delivered.attempts, 2);
    assert_eq!(fx.lines("calls"), [format!("{} 2", event[0])]);
    let all = fx
        .ledger
        .deliveries(&DeliveryFilter::default())
        .await
        .expect("list");
    assert_eq!(all.len(), 1, "recorded once");
}

#[tokio::test]
async fn an_outcome_the_ledger_refused_is_recorded_by_the_running_dispatcher() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "note",
        "echo \"$PAYWATCH_CHECKOUT_ID $PAYWATCH_ATTEMPT\" >> \"$1/calls\"\n",
    );
    let first = fx.transition("1", "PAID", "ORD-1", &["note"]).await;
    let second = fx.transition("2", "PAID", "ORD-2", &["note"]).await;
    // The ledger refuses to record checkout 1's outcome (a full or failing disk).
    let other = rusqlite::Connection::open(fx.ledger.path()).expect("second connection");
    other
        .execute_batch(
            "CREATE TRIGGER refuse_outcome BEFORE UPDATE OF state ON hook_deliveries
             WHEN OLD.checkout_id = '1' AND NEW.state <> 'running'
             BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END;",
        )
        .expect("trigger");
    // One slot: checkout 2's hook can start only once checkout 1's attempt has given up
    // writing its outcome and freed the slot.
    let running = fx.start(vec![spec], 1);
    fx.until_state(&second[0], DeliveryState::Delivered).await;
    assert_eq!(fx.delivery(&first[0]).await.state, DeliveryState::Running);

    // The ledger recovers: the running dispatcher writes the outcome, no restart needed.
    other
        .execute_batch("DROP TRIGGER refuse_outcome")
        .expect("drop trigger");
    let delivered = fx.until_state(&first[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(delivered.attempts, 1, "recorded, not run again");
    assert_eq!(fx.lines("calls"), ["1 1", "2 1"]);
}

#[tokio::test]
async fn a_revived_older_delivery_waits_for_the_later_one_running_and_never_overlaps_it() {
    let fx = Fixture::new().await;
    // REFUNDED blocks until released; every run notes its start and end.
    let spec = hook(
        fx.path(),
        "order",
        r#"echo "start $PAYWATCH_STATUS" >> "$1/calls"
if [ "$PAYWATCH_STATUS" = REFUNDED ]; then
  while [ ! -e "$1/release" ]; do sleep 0.02; done
fi
echo "end $PAYWATCH_STATUS" >> "$1/calls"
"#,
    );
    let paid = fx.transition("1", "PAID", "ORD-1", &["order"]).await;
    let refunded = fx.transition("1", "REFUNDED", "ORD-1", &["order"]).await;
    // PAID went dead earlier (say the merchant's system was down for days).
    let claimed = fx
        .ledger
        .claim_due_deliveries(Utc::now(), 10)
        .expect("claim");
    assert_eq!(claimed[0].event_id, paid[0]);
    fx.ledger
        .finish_delivery(
            &paid[0],
            &DeliveryUpdate::Dead {
                exit_code: Some(1),
                error: "exit 1".into(),
            },
        )
        .expect("dead");
    let running = fx.start(vec![spec], 4);
    fx.until_state(&refunded[0], DeliveryState::Running).await;
    eventually("REFUNDED to start", async || {
        fx.lines("calls") == ["start REFUNDED"]
    })
    .await;

    // `paywatch hooks retry` on PAID while REFUNDED runs.
    assert!(fx.ledger.retry_delivery(&paid[0]).await.expect("retry"));
    running.handle.wake();
    // For ten poll intervals PAID must stay pending (it used to start at once, beside REFUNDED).
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(
            fx.delivery(&paid[0]).await.state,
            DeliveryState::Pending,
            "PAID started while REFUNDED was running: {:?}",
            fx.lines("calls")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(fx.file("release"), "").expect("release");
    fx.until_state(&paid[0], DeliveryState::Delivered).await;
    fx.until_state(&refunded[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(
        fx.lines("calls"),
        ["start REFUNDED", "end REFUNDED", "start PAID", "end PAID"],
        "one at a time"
    );
}

#[tokio::test]
async fn shutdown_lets_a_running_hook_finish() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "slow",
        "touch \"$1/started\"\nsleep 0.3\ntouch \"$1/finished\"\n",
    );
    let event = fx.transition("1", "PAID", "ORD-1", &["slow"]).await;
    let running = fx.start(vec![spec], 1);
    eventually("the hook to start", async || fx.file("started").exists()).await;
    // Queued after shutdown began: must not start.
    let later = fx.transition("2", "PAID", "ORD-2", &["slow"]).await;
    running.stop().await;

    assert!(fx.file("finished").exists(), "the hook ran to its end");
    let delivery = fx.delivery(&event[0]).await;
    assert_eq!(delivery.state, DeliveryState::Delivered);
    let untouched = fx.delivery(&later[0]).await;
    assert_eq!(untouched.state, DeliveryState::Pending);
    assert_eq!(untouched.attempts, 0);
}

#[tokio::test]
async fn the_kill_token_stops_a_hook_past_the_drain_and_it_stays_pending() {
    let fx = Fixture::new().await;
    let spec = hook(fx.path(), "stuck", "touch \"$1/started\"\nsleep 1000\n");
    let event = fx.transition("1", "PAID", "ORD-1", &["stuck"]).await;
    let Running {
        shutdown,
        kill,
        mut task,
        ..
    } = fx.start(vec![spec], 1);
    eventually("the hook to start", async || fx.file("started").exists()).await;
    shutdown.cancel();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut task)
            .await
            .is_err(),
        "the drain waits for the running hook"
    );
    kill.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stopped after the kill")
        .expect("no panic");

    let delivery = fx.delivery(&event[0]).await;
    assert_eq!(
        delivery.state,
        DeliveryState::Pending,
        "runs again at the next start"
    );
    assert_eq!(delivery.attempts, 1);
    let error = delivery.last_error.expect("the interruption is recorded");
    assert!(error.starts_with("stopped by shutdown after "), "{error}");
    let due = DateTime::parse_from_rfc3339(&delivery.next_attempt_at).expect("time");
    assert!(due <= Utc::now(), "due at once");
}

#[tokio::test]
async fn a_delivery_for_a_removed_hook_is_dead_and_a_reload_plus_retry_delivers_it() {
    let fx = Fixture::new().await;
    let event = fx.transition("1", "PAID", "ORD-1", &["gone"]).await;
    let running = fx.start(vec![hook(fx.path(), "other", "exit 0\n")], 1);
    let dead = fx.until_state(&event[0], DeliveryState::Dead).await;
    assert_eq!(
        dead.last_error.as_deref(),
        Some("hook 'gone' is not configured (removed or renamed?)")
    );

    running
        .handle
        .reload(HookSet::new([hook(fx.path(), "gone", "exit 0\n")]));
    assert!(running.handle.hooks().get("gone").is_some());
    assert!(fx.ledger.retry_delivery(&event[0]).await.expect("retry"));
    running.handle.wake();
    fx.until_state(&event[0], DeliveryState::Delivered).await;
    running.stop().await;
}

#[test]
fn log_tails_are_bounded_and_cut_on_a_character_boundary() {
    assert_eq!(log_tail("oops\n"), "oops");
    let long = "é".repeat(LOG_TAIL_BYTES);
    let tail = log_tail(&long);
    assert!(tail.len() <= LOG_TAIL_BYTES);
    assert!(tail.chars().all(|c| c == 'é'));
}

#[test]
fn backoff_doubles_to_a_cap_and_resets() {
    let mut backoff = Backoff::default();
    assert_eq!(backoff.next(), Duration::from_millis(200));
    assert_eq!(backoff.next(), Duration::from_millis(400));
    for _ in 0..20 {
        backoff.next();
    }
    assert_eq!(backoff.next(), MAX_LEDGER_BACKOFF);
    backoff.reset();
    assert_eq!(backoff.next(), Duration::from_millis(200));
}

/// A log sink for one test.
///
/// A scoped (`set_default`) subscriber is not enough: tracing caches each call site's interest
/// process-wide, and a call site first reached by another test's thread at the moment this one
/// registers its subscriber can be cached as "never", silently dropping a line (seen under load).
/// So the lib tests share one global subscriber, installed once, that writes each event to the
/// sink of the thread it happened on; the test runtime is single-threaded, so the dispatcher's
/// tasks log on the test's thread.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

thread_local! {
    static THREAD_SINK: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the current thread's sink, if it has one.
struct ThreadSink;

impl std::io::Write for ThreadSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        THREAD_SINK.with(|sink| {
            if let Some(captured) = sink.borrow().as_ref() {
                captured
                    .0
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .extend_from_slice(bytes);
            }
        });
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Starts capturing this thread's INFO and higher log lines.
    fn this_thread() -> Captured {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadSink)
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            // If another test installed one first, the assertions below say what is missing.
            let _ = tracing::subscriber::set_global_default(subscriber);
        });
        let captured = Captured::default();
        THREAD_SINK.with(|sink| *sink.borrow_mut() = Some(captured.clone()));
        captured
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

#[tokio::test]
async fn each_attempt_logs_one_line_and_a_dead_one_says_how_to_retry() {
    let captured = Captured::this_thread();

    let fx = Fixture::new().await;
    let mut spec = hook(
        fx.path(),
        "logged",
        r#"[ "$PAYWATCH_STATUS" = PAID ] && exit 0
echo "db is down" >&2
[ "$PAYWATCH_ATTEMPT" = 1 ] && exit 1
exit 64
"#,
    );
    spec.policy.permanent_exit_codes = vec![64];
    let pending = fx.transition("77", "PENDING", "ORD-77", &["logged"]).await;
    let paid = fx.transition("77", "PAID", "ORD-77", &["logged"]).await;
    let running = fx.start(vec![spec], 1);
    fx.until_state(&pending[0], DeliveryState::Dead).await;
    fx.until_state(&paid[0], DeliveryState::Delivered).await;
    running.stop().await;

    let logs = captured.text();
    let outcomes: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("event_id="))
        .collect();
    assert_eq!(outcomes.len(), 3, "one line per attempt:\n{logs}");
    let common = |line: &str, event: &str, status: &str, attempt: u32| {
        for field in [
            format!("event_id={event}"),
            "hook=logged".to_owned(),
            "checkout=77".to_owned(),
            format!("status={status}"),
            format!("attempt={attempt}"),
            "duration_ms=".to_owned(),
        ] {
            assert!(line.contains(&field), "{field} missing in {line}");
        }
    };
    assert!(outcomes[0].contains(" WARN "), "{}", outcomes[0]);
    assert!(outcomes[0].contains("hook failed; will retry"));
    assert!(outcomes[0].contains("exit_code=1"));
    assert!(
        outcomes[0].contains("stderr=\"db is down\""),
        "{}",
        outcomes[0]
    );
    common(outcomes[0], &pending[0], "PENDING", 1);
    assert!(outcomes[1].contains(" ERROR "), "{}", outcomes[1]);
    assert!(
        outcomes[1].contains(&format!(
            "hook delivery dead; once fixed, run: paywatch hooks retry {}",
            pending[0]
        )),
        "{}",
        outcomes[1]
    );
    assert!(outcomes[1].contains("exit_code=64"));
    common(outcomes[1], &pending[0], "PENDING", 2);
    assert!(outcomes[2].contains(" INFO "), "{}", outcomes[2]);
    assert!(outcomes[2].contains("hook delivered"));
    assert!(outcomes[2].contains("exit_code=0"));
    common(outcomes[2], &paid[0], "PAID", 1);
    assert!(
        !logs.contains("secret.customer@example.com") && !logs.contains("ORD-77"),
        "the checkout is never logged at info:\n{logs}"
    );
}

#[tokio::test]
async fn the_next_due_time_ignores_events_queued_behind_a_retrying_one() {
    let fx = Fixture::new().await;
    let first = fx.transition("1", "PENDING", "ORD-1", &["h"]).await;
    fx.transition("1", "PAID", "ORD-1", &["h"]).await;
    let claimed = fx
        .ledger
        .claim_due_deliveries(Utc::now(), 10)
        .expect("claim");
    assert_eq!(claimed.len(), 1, "only the head of the queue");
    assert_eq!(
        fx.ledger.next_delivery_due().expect("next"),
        None,
        "PAID waits for the running PENDING: nothing is due"
    );
    let later = Utc::now() + chrono::Duration::minutes(10);
    fx.ledger
        .finish_delivery(
            &first[0],
            &DeliveryUpdate::Retry {
                next_attempt_at: later,
                exit_code: Some(1),
                error: "exit 1".into(),
            },
        )
        .expect("retry later");
    let due = fx.ledger.next_delivery_due().expect("next").expect("due");
    assert_eq!(
        crate::ledger::timestamp(due),
        crate::ledger::timestamp(later),
        "the PENDING retry, not the PAID behind it"
    );
}

/// A hook by this name makes its attempt panic (only in unit tests), as a bug in paywatch would.
pub(super) const PANICKING_HOOK: &str = "panics-in-tests";

#[tokio::test]
async fn a_panic_during_an_attempt_is_recorded_as_a_retry_and_the_dispatcher_goes_on() {
    let fx = Fixture::new().await;
    let panicking = hook(fx.path(), PANICKING_HOOK, "exit 0\n");
    let fine = hook(fx.path(), "fine", "exit 0\n");
    let events = fx
        .transition("91", "PAID", "ORD-91", &[PANICKING_HOOK, "fine"])
        .await;
    let running = fx.start(vec![panicking, fine], 2);
    let deadline = Instant::now() + DEADLINE;
    let retried = loop {
        let delivery = fx.delivery(&events[0]).await;
        if delivery.state == DeliveryState::Pending && delivery.attempts == 1 {
            break delivery;
        }
        assert!(
            Instant::now() < deadline,
            "the panicked attempt stayed {:?}",
            delivery.state
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        retried
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("paywatch failed while running the hook")),
        "{retried:?}"
    );
    fx.until_state(&events[1], DeliveryState::Delivered).await;
    assert!(!running.task.is_finished(), "the dispatcher goes on");
    running.stop().await;
}

#[tokio::test]
async fn an_outcome_and_the_claim_it_frees_share_one_commit_and_no_poll_is_waited() {
    let fx = Fixture::new().await;
    let spec = hook(
        fx.path(),
        "serial",
        "echo \"$PAYWATCH_STATUS\" >> \"$1/calls\"\n",
    );
    let statuses = ["PENDING", "PAID", "REFUNDED"];
    let mut events = Vec::new();
    for status in statuses {
        events.extend(fx.transition("1", status, "ORD-1", &["serial"]).await);
    }
    let before = wal_commits(&fx.ledger);
    // A poll interval far beyond the deadline: every claim must come from a wake.
    let dispatcher = Dispatcher::new(fx.ledger.clone(), HookSet::new(vec![spec]), 1)
        .with_poll_interval(Duration::from_secs(3600));
    let (shutdown, kill) = (CancellationToken::new(), CancellationToken::new());
    let running = Running {
        handle: dispatcher.handle(),
        task: tokio::spawn(dispatcher.run(shutdown.clone(), kill.clone())),
        shutdown,
        kill,
    };
    for event in &events {
        fx.until_state(event, DeliveryState::Delivered).await;
    }
    running.stop().await;
    assert_eq!(fx.lines("calls"), statuses, "one at a time, in order");
    // One checkout's events run one after another: the first claim, then one commit per
    // outcome that also claims the next event (the last claims none). Writing each outcome
    // in its own commit would take 2 per delivery.
    let commits = wal_commits(&fx.ledger) - before;
    assert_eq!(
        commits,
        events.len() + 1,
        "{commits} commits for {} deliveries",
        events.len()
    );
}

/// A hook by this name fails to spawn with EMFILE (only in unit tests) while
/// [`EMFILE_FAILURES`] is above zero, as when paywatch is out of descriptors.
pub(super) const EMFILE_HOOK: &str = "emfile-in-tests";

/// How many more spawns of [`EMFILE_HOOK`] fail.
static EMFILE_FAILURES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The spawn error injected for `hook`, if any (see [`EMFILE_HOOK`]).
pub(super) fn injected_spawn_error(hook: &str) -> Option<std::io::Error> {
    use std::sync::atomic::Ordering;
    if hook != EMFILE_HOOK {
        return None;
    }
    EMFILE_FAILURES
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(1)
        })
        .ok()
        .map(|_| std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32))
}

/// Issue 21: a hook paywatch cannot start for lack of descriptors (EMFILE) is retried soon
/// without using up an attempt: with max_attempts = 1 and two failed spawns it is still
/// delivered, as attempt 1.
#[tokio::test]
async fn a_spawn_failing_with_emfile_is_retried_without_counting_an_attempt() {
    use std::sync::atomic::Ordering;
    let fx = Fixture::new().await;
    let mut spec = hook(
        fx.path(),
        EMFILE_HOOK,
        "echo \"$PAYWATCH_ATTEMPT\" >> \"$1/attempts\"\n",
    );
    spec.policy.max_attempts = 1;
    EMFILE_FAILURES.store(2, Ordering::Release);
    let events = fx.transition("77", "PAID", "ORD-77", &[EMFILE_HOOK]).await;
    let started = Instant::now();
    let running = fx.start(vec![spec], 1);
    let delivered = fx.until_state(&events[0], DeliveryState::Delivered).await;
    running.stop().await;
    assert_eq!(
        EMFILE_FAILURES.load(Ordering::Acquire),
        0,
        "both injected failures were hit"
    );
    assert_eq!(delivered.attempts, 1, "{delivered:?}");
    assert_eq!(
        fx.lines("attempts"),
        ["1"],
        "the hook ran once, as attempt 1"
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "retried soon, not after the hook's backoff: {waited:?}"
    );
}
