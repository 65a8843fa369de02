//! The daemon end to end against the in-process sandbox, in both stream modes: payments reach
//! the ledger verified, restarts resume, faults are survived, lies are not recorded, signals
//! drain and reload.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use paywatch::ledger::Ledger;

use crate::common::process::{self, paywatch};
use crate::common::{
    self, DEADLINE, Daemon, create_and_track, history, status_of, wait_for, wait_status,
};

const MODES: [&str; 2] = ["multiplexed", "per-document"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_then_pay_records_paid_with_its_history_in_both_modes() {
    for mode in MODES {
        let (sandbox, _dir, settings, path, ledger) = common::setup(mode, "").await;
        let id = create_and_track(&sandbox, &ledger, "ORD-1").await;
        let daemon = Daemon::start(&settings, &path).await;
        wait_status(&ledger, &id, "PENDING").await;
        sandbox.state().pay(&id).await.expect("pay");
        wait_status(&ledger, &id, "PAID").await;
        assert_eq!(history(&ledger, &id), ["PENDING", "PAID"], "mode {mode}");
        let paid = ledger
            .transitions(&id)
            .expect("transitions")
            .pop()
            .expect("paid transition");
        assert_eq!(paid.source, "firestore", "mode {mode}");
        assert!(
            paid.latency_ms.is_some(),
            "a Firestore change has a measured latency"
        );
        assert!(
            paid.verified_json.contains("\"PAID\""),
            "the verified JSON is kept"
        );
        daemon.stop().await;
        sandbox.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_checkouts_are_watched_and_all_payments_arrive_in_both_modes() {
    const CHECKOUTS: usize = 1000;
    for mode in MODES {
        let (sandbox, _dir, settings, path, ledger) = common::setup(mode, "").await;
        let mut ids = Vec::with_capacity(CHECKOUTS);
        for n in 0..CHECKOUTS {
            ids.push(create_and_track(&sandbox, &ledger, &format!("ORD-{n}")).await);
        }
        let started = Instant::now();
        let daemon = Daemon::start(&settings, &path).await;
        let mut status = daemon.status.clone();
        tokio::time::timeout(DEADLINE, status.wait_for(|s| s.watched == CHECKOUTS))
            .await
            .expect("all watched")
            .expect("status");
        wait_for(
            "every checkout verified PENDING",
            Duration::from_secs(60),
            || async {
                let unverified = ledger
                    .list(&paywatch::ledger::ListFilter {
                        statuses: vec!["UNVERIFIED".into()],
                        ..Default::default()
                    })
                    .expect("list");
                unverified.is_empty().then_some(())
            },
        )
        .await;
        for id in &ids {
            sandbox.state().pay(id).await.expect("pay");
        }
        wait_for(
            "every payment recorded",
            Duration::from_secs(60),
            || async {
                let paid = ledger
                    .list(&paywatch::ledger::ListFilter {
                        statuses: vec!["PAID".into()],
                        ..Default::default()
                    })
                    .expect("list");
                (paid.len() == CHECKOUTS).then_some(())
            },
        )
        .await;
        eprintln!(
            "{mode}: {CHECKOUTS} checkouts watched, verified and paid in {:?}",
            started.elapsed()
        );
        daemon.stop().await;
        sandbox.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_tracked_while_running_is_watched_without_a_restart() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    let daemon = Daemon::start(&settings, &path).await;
    // Another connection to the ledger file, as `paywatch track` in another process would be.
    let cli_ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let tracked_at = Instant::now();
    let id = create_and_track(&sandbox, &cli_ledger, "ORD-LATE").await;
    let mut status = daemon.status.clone();
    // About 200 ms (the ledger's change poll); a figure, not a timed assertion: a loaded CI
    // machine must not fail it, so it waits up to the usual deadline.
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.watched == 1))
        .await
        .expect("watched while running")
        .expect("status");
    eprintln!("tracked checkout watched after {:?}", tracked_at.elapsed());
    wait_status(&cli_ledger, &id, "PENDING").await;
    sandbox.state().pay(&id).await.expect("pay");
    wait_status(&cli_ledger, &id, "PAID").await;
    daemon.stop().await;
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_without_reverifying_and_catches_changes_made_while_down() {
    for mode in MODES {
        let (sandbox, _dir, settings, path, ledger) = common::setup(mode, "").await;
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(create_and_track(&sandbox, &ledger, &format!("ORD-{n}")).await);
        }
        let daemon = Daemon::start(&settings, &path).await;
        for id in &ids {
            wait_status(&ledger, id, "PENDING").await;
        }
        wait_for("resume tokens persisted", DEADLINE, || async {
            let set = ledger.watch_set().expect("watch set");
            set.iter()
                .all(|entry| entry.resume_token.is_some() && !entry.needs_verify)
                .then_some(())
        })
        .await;
        daemon.stop().await;

        let calls_before: Vec<u64> = ids
            .iter()
            .map(|id| sandbox.state().get_checkout_calls(id))
            .collect();
        sandbox
            .state()
            .pay(&ids[0])
            .await
            .expect("pay while the daemon is down");

        let daemon = Daemon::start(&settings, &path).await;
        wait_status(&ledger, &ids[0], "PAID").await;
        daemon.stop().await;
        let calls_after: Vec<u64> = ids
            .iter()
            .map(|id| sandbox.state().get_checkout_calls(id))
            .collect();
        assert!(
            calls_after[0] > calls_before[0],
            "the changed checkout was verified"
        );
        assert_eq!(
            calls_after[1..],
            calls_before[1..],
            "mode {mode}: unchanged checkouts were not re-verified"
        );
        assert_eq!(history(&ledger, &ids[0]), ["PENDING", "PAID"]);
        sandbox.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_closed_by_the_server_reconnect_and_catch_up() {
    for mode in MODES {
        let (sandbox, _dir, settings, path, ledger) = common::setup(mode, "").await;
        let first = create_and_track(&sandbox, &ledger, "ORD-A").await;
        let second = create_and_track(&sandbox, &ledger, "ORD-B").await;
        let daemon = Daemon::start(&settings, &path).await;
        wait_status(&ledger, &first, "PENDING").await;
        wait_status(&ledger, &second, "PENDING").await;
        sandbox.faults().close_listen_streams();
        // A change right after the drop: delivered once the stream is back (resumed by token).
        sandbox.state().pay(&first).await.expect("pay");
        wait_status(&ledger, &first, "PAID").await;
        sandbox.faults().close_listen_streams();
        sandbox.state().fail(&second).await.expect("fail");
        wait_status(&ledger, &second, "FAILED").await;
        daemon.stop().await;
        sandbox.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_retried_and_never_produce_an_unverified_record() {
    let (sandbox, _dir, settings, path, ledger) = common::setup("multiplexed", "").await;
    let id = create_and_track(&sandbox, &ledger, "ORD-500").await;
    let daemon = Daemon::start(&settings, &path).await;
    wait_status(&ledger, &id, "PENDING").await;
    sandbox.faults().fail_next_api_requests(3);
    let calls = sandbox.state().get_checkout_calls(&id);
    sandbox.state().pay(&id).await.expect("pay");
    wait_status(&ledger, &id, "PAID").await;
    assert!(
        sandbox.state().get_checkout_calls(&id) >= calls + 4,
        "three 500s, then the answer"
    );
    assert_eq!(history(&ledger, &id), ["PENDING", "PAID"]);
    daemon.stop().await;
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_claiming_paid_while_the_api_says_pending_records_nothing() {
    let (sandbox, _dir, settings, path, ledger) = common::setup("multiplexed", "").await;
    let id = create_and_track(&sandbox, &ledger, "ORD-LIE").await;
    let daemon = Daemon::start(&settings, &path).await;
    wait_status(&ledger, &id, "PENDING").await;
    let calls = sandbox.state().get_checkout_calls(&id);
    sandbox
        .state()
        .lie_document(&id, "PAID")
        .await
        .expect("lying document");
    // The daemon reacts to the change by asking paymennt, which says PENDING.
    wait_for(
        "the lie to be checked with Get Checkout",
        DEADLINE,
        || async { (sandbox.state().get_checkout_calls(&id) > calls).then_some(()) },
    )
    .await;
    daemon.stop().await;
    assert_eq!(status_of(&ledger, &id).as_deref(), Some("PENDING"));
    assert_eq!(history(&ledger, &id), ["PENDING"]);
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_costs_at_most_one_extra_call() {
    let (sandbox, _dir, settings, path, ledger) = common::setup("multiplexed", "").await;
    let id = create_and_track(&sandbox, &ledger, "ORD-BURST").await;
    let daemon = Daemon::start(&settings, &path).await;
    wait_status(&ledger, &id, "PENDING").await;
    // Slow answers, so the burst lands while a call is in flight.
    sandbox.faults().set_api_latency(Duration::from_millis(300));
    let calls = sandbox.state().get_checkout_calls(&id);
    for _ in 0..10 {
        sandbox
            .state()
            .lie_document(&id, "PENDING")
            .await
            .expect("document write");
    }
    sandbox.state().pay(&id).await.expect("pay");
    wait_status(&ledger, &id, "PAID").await;
    daemon.stop().await;
    let extra = sandbox.state().get_checkout_calls(&id) - calls;
    assert!(extra <= 3, "11 changes in a burst cost {extra} calls");
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_config_is_rejected_then_sigterm_drains() {
    let (sandbox, _dir, _, path, ledger) = common::setup("multiplexed", "").await;
    let id = create_and_track(&sandbox, &ledger, "ORD-SIG").await;
    let mut process = paywatch().config(&path).run();
    process.expect_line("paywatch is running").await;
    wait_status(&ledger, &id, "PENDING").await;

    // Unchanged: reloaded, and nothing claimed to have changed.
    process.signal(Signal::SIGHUP);
    process
        .expect_line("config reloaded: nothing changed")
        .await;
    let good = std::fs::read_to_string(&path)
        .expect("config")
        .replace("interval = \"1h\"", "interval = \"2h\"");
    std::fs::write(&path, &good).expect("rewrite config");
    process.signal(Signal::SIGHUP);
    process
        .expect_line("config reloaded: reconcile.interval changed")
        .await;

    std::fs::write(&path, format!("{good}\n[bogus]\nkey = 1\n")).expect("break config");
    process.signal(Signal::SIGHUP);
    process.expect_line("config reload failed").await;
    // Still running on the old config: a payment is recorded.
    sandbox.state().pay(&id).await.expect("pay");
    wait_status(&ledger, &id, "PAID").await;

    process.signal(Signal::SIGTERM);
    process.expect_line("paywatch stopped").await;
    let status = process.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_hook_runs_then_restart_delivers_it_exactly_once_as_delivered() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = dir.path().join("runs");
    let first = dir.path().join("first");
    // First run: note itself and block (as if the merchant's system hung). Later runs: succeed.
    let hook = common::shell_hook(
        dir.path(),
        "mark-paid",
        &["PAID"],
        &format!(
            "echo \"$PAYWATCH_EVENT_ID $PAYWATCH_STATUS $$\" >> '{runs}'\nif [ ! -e '{first}' ]; then touch '{first}'; exec sleep 60; fi\nexit 0\n",
            runs = runs.display(),
            first = first.display()
        ),
    );
    let hooks = format!("{hook}timeout = \"120s\"\n");
    let (settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", &hooks);
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "ORD-KILL").await;

    let mut process = paywatch().config(&path).run();
    process.expect_line("paywatch is running").await;
    wait_status(&ledger, &id, "PENDING").await;
    sandbox.state().pay(&id).await.expect("pay");
    let run_lines = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_for("the hook to start", DEADLINE, || async {
        (run_lines().len() == 1).then_some(())
    })
    .await;

    process.signal(Signal::SIGKILL);
    process.wait_exit().await;
    // The orphaned hook (its own process group) is ended, as a reboot would.
    let orphan: i32 = run_lines()[0]
        .split_whitespace()
        .nth(2)
        .and_then(|pid| pid.parse().ok())
        .expect("hook pid");
    let _ = kill(Pid::from_raw(-orphan), Signal::SIGKILL);

    let deliveries = ledger.deliveries_of(&id).expect("deliveries");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(
        deliveries[0].state,
        paywatch::ledger::DeliveryState::Running,
        "the daemon died mid-delivery"
    );
    let event_id = deliveries[0].event_id.clone();

    let mut process = paywatch().config(&path).run();
    process.expect_line("paywatch is running").await;
    wait_for(
        "the delivery to complete after restart",
        2 * DEADLINE,
        || async {
            let delivery = ledger.delivery(&event_id).expect("read")?;
            (delivery.state == paywatch::ledger::DeliveryState::Delivered).then_some(())
        },
    )
    .await;
    process.signal(Signal::SIGTERM);
    let status = process.wait_exit().await;
    assert!(status.success());

    let lines = run_lines();
    assert_eq!(
        lines.len(),
        2,
        "at least once: run again after the restart, and only once more: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|line| line.starts_with(&format!("{event_id} PAID"))),
        "same event id each time: {lines:?}"
    );
    let deliveries = ledger.deliveries_of(&id).expect("deliveries");
    assert_eq!(deliveries.len(), 1, "recorded once");
    assert_eq!(deliveries[0].attempts, 2);
    assert_eq!(
        history(&ledger, &id),
        ["PENDING", "PAID"],
        "the verified transition survived the kill"
    );
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_cannot_read_the_daemons_environment_or_memory() {
    use std::os::unix::fs::MetadataExt;
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    // The hook tries the daemon (its parent) the ways a same-user process could.
    let hook = common::shell_hook(
        dir.path(),
        "nosy",
        &["PAID"],
        &format!(
            "for f in environ mem cmdline; do\n  if cat /proc/$PPID/$f > '{out}.$f' 2>> '{out}.err'; then echo \"$f readable\" >> '{out}'; else echo \"$f denied\" >> '{out}'; fi\ndone\n",
            out = out.display()
        ),
    );
    let (settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", &hook);
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "ORD-NOSY").await;
    // Root (with CAP_SYS_PTRACE) may read any process, so as root the daemon and its hook run
    // as an unprivileged user, as in production; otherwise as this test's own user.
    let root = std::fs::metadata("/proc/self").expect("proc").uid() == 0;
    let launcher: &[&str] = if root {
        for name in ["", "paywatch.db", "paywatch.db-wal", "paywatch.db-shm"] {
            let file = dir.path().join(name);
            if file.exists() {
                std::os::unix::fs::chown(&file, Some(65534), Some(65534)).expect("chown");
            }
        }
        &[
            "/usr/bin/setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]
    } else {
        &[]
    };
    let secret = sandbox.api_secret().to_owned();
    let mut process = paywatch()
        .launcher(launcher)
        .env("PAYWATCH_PAYMENNT__API_SECRET", &secret)
        .config(&path)
        .run();
    process.expect_line("paywatch is running").await;
    wait_status(&ledger, &id, "PENDING").await;
    sandbox.state().pay(&id).await.expect("pay");
    let report = wait_for("the hook to run", DEADLINE, || async {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        (text.lines().count() == 3).then_some(text)
    })
    .await;
    process.signal(Signal::SIGTERM);
    process.wait_exit().await;
    assert_eq!(
        report, "environ denied\nmem denied\ncmdline readable\n",
        "cmdline is public; environ and memory are not"
    );
    for name in ["environ", "mem", "err", "cmdline"] {
        let seen = std::fs::read(format!("{}.{name}", out.display())).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&seen).contains(&secret),
            "the secret reached the hook through {name}"
        );
    }
    let environ = std::fs::read(format!("{}.environ", out.display())).unwrap_or_default();
    assert!(
        environ.is_empty(),
        "the hook read {} bytes of environ",
        environ.len()
    );
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_ledger_is_refused() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    let daemon = Daemon::start(&settings, &path).await;
    let (_controls, receiver) = tokio::sync::mpsc::channel(1);
    let options = paywatch::daemon::RunOptions {
        config_path: Some(path.clone()),
        log: paywatch::logging::LogHandle::detached(),
        status: None,
        notifier: paywatch::daemon::notify::Notifier::disabled(),
        http_addr: None,
        metrics: paywatch::metrics::Metrics::new(),
    };
    let second = tokio::time::timeout(
        DEADLINE,
        paywatch::daemon::run(settings.clone(), receiver, options),
    )
    .await
    .expect("the second daemon gives up at once");
    let error = second.expect_err("refused");
    assert!(
        format!("{error:#}").contains("already running"),
        "{error:#}"
    );
    daemon.stop().await;
    // Once the first has stopped, the ledger is free again.
    let again = Daemon::start(&settings, &path).await;
    again.stop().await;
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_dies_stops_the_daemon_with_an_error_naming_it() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    // Loading refuses this now; set directly, it panics the hook dispatcher's semaphore, which
    // used to leave the daemon running with no hook ever delivered.
    settings.hooks_concurrency = usize::MAX;
    let (_controls, receiver) = tokio::sync::mpsc::channel(1);
    let options = paywatch::daemon::RunOptions {
        config_path: Some(path.clone()),
        log: paywatch::logging::LogHandle::detached(),
        status: None,
        notifier: paywatch::daemon::notify::Notifier::disabled(),
        http_addr: None,
        metrics: paywatch::metrics::Metrics::new(),
    };
    let ended = tokio::time::timeout(DEADLINE, paywatch::daemon::run(settings, receiver, options))
        .await
        .expect("the daemon stops by itself, at once");
    let error = format!("{:#}", ended.expect_err("stops with an error (exit 1)"));
    assert!(
        error.contains("the hook dispatcher task panicked"),
        "{error}"
    );
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_refused_the_lock_never_opens_or_migrates_the_ledger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::config_text(
        dir.path(),
        "http://127.0.0.1:9/mer/v2.0/",
        "http://127.0.0.1:9",
        "key",
        "secret",
        "multiplexed",
        "",
    );
    let (settings, path) = common::load_config(dir.path(), &text);
    // Another daemon holds the lock (here: this test).
    let lock = std::fs::File::create(dir.path().join("paywatch.db.lock")).expect("lock file");
    lock.try_lock().expect("locked");
    let (_controls, receiver) = tokio::sync::mpsc::channel(1);
    let options = paywatch::daemon::RunOptions {
        config_path: Some(path.clone()),
        log: paywatch::logging::LogHandle::detached(),
        status: None,
        notifier: paywatch::daemon::notify::Notifier::disabled(),
        http_addr: None,
        metrics: paywatch::metrics::Metrics::new(),
    };
    let refused =
        tokio::time::timeout(DEADLINE, paywatch::daemon::run(settings, receiver, options))
            .await
            .expect("refused at once");
    let error = refused.expect_err("refused");
    assert!(
        format!("{error:#}").contains("already running"),
        "{error:#}"
    );
    assert!(
        !dir.path().join("paywatch.db").exists(),
        "the ledger was created (and migrated) before the lock was checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_object_per_line_with_the_payment_line() {
    let (sandbox, _dir, _, path, ledger) = common::setup("multiplexed", "").await;
    let id = create_and_track(&sandbox, &ledger, "ORD-JSON").await;
    let mut process = paywatch()
        .args(["--log-format", "json"])
        .config(&path)
        .run();
    process.expect_line("paywatch is running").await;
    wait_status(&ledger, &id, "PENDING").await;
    sandbox.state().pay(&id).await.expect("pay");
    process.expect_line("PAID checkout=").await;
    process.signal(Signal::SIGTERM);
    process.expect_line("paywatch stopped").await;
    let seen = process.lines();
    let paid = seen
        .iter()
        .find(|line| line.contains("PAID checkout="))
        .expect("payment line");
    let object: serde_json::Value =
        serde_json::from_str(paid).expect("each line is one JSON object");
    let message = object["message"].as_str().expect("message field");
    assert!(
        message.starts_with(&format!(
            "PAID checkout={id} order=ORD-JSON 100.00 AED (was PENDING; verified "
        )),
        "{message}"
    );
    assert_eq!(object["level"], "INFO");
    assert_eq!(object["source"], "firestore");
    for line in &seen {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    sandbox.shutdown().await;
}

/// Firestore refuses one document (as a project's security rules can): only that checkout is
/// refused, noted in the ledger and shown by `status`; the other checkout on the same
/// multiplexed stream is still paid through Firestore, and the refused one through the
/// reconciler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_document_leaves_the_other_checkouts_of_its_stream_alone() {
    // The reconciler stays an hour away until the stream's part is proven (a sweep racing the
    // stream could record the open checkout's payment first); a reload then brings it to 2 s.
    let (sandbox, _dir, settings, path, ledger) = common::setup("multiplexed", "").await;
    let open = create_and_track(&sandbox, &ledger, "ORD-OPEN").await;
    let refused = create_and_track(&sandbox, &ledger, "ORD-REFUSED").await;
    let document = ledger
        .checkout(&refused)
        .expect("read")
        .expect("tracked")
        .firebase
        .document;
    sandbox.faults().refuse_listen_document(&document);
    let daemon = Daemon::start(&settings, &path).await;

    // The refusal is noted for that checkout alone.
    let refusal = wait_for("the refusal to be noted", DEADLINE, || async {
        ledger
            .checkout(&refused)
            .expect("read")
            .and_then(|record| record.listen_refused)
    })
    .await;
    assert_eq!(refusal.code, "PERMISSION_DENIED");
    assert!(
        refusal.document.ends_with(&format!("/{document}")),
        "{refusal:?}"
    );
    assert!(
        refusal.message.contains("insufficient permissions"),
        "{refusal:?}"
    );
    wait_status(&ledger, &open, "PENDING").await;
    let record = ledger.checkout(&open).expect("read").expect("tracked");
    assert!(record.listen_refused.is_none());

    // The other checkout is paid through its (still open) Firestore stream.
    sandbox.state().pay(&open).await.expect("pay");
    wait_status(&ledger, &open, "PAID").await;
    let paid = ledger
        .transitions(&open)
        .expect("transitions")
        .pop()
        .expect("paid");
    assert_eq!(
        paid.source, "firestore",
        "noticed by the stream, not the sweep"
    );

    // `status` shows the refusal, as text and JSON.
    let (config, id) = (path.clone(), refused.to_string());
    let text = tokio::task::spawn_blocking(move || process::run(&config, &["status", &id]))
        .await
        .expect("join");
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("REFUSED by Firestore: PERMISSION_DENIED"),
        "{text}"
    );
    let (config, id) = (path.clone(), refused.to_string());
    let json =
        tokio::task::spawn_blocking(move || process::run(&config, &["status", &id, "--json"]))
            .await
            .expect("join");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json");
    assert_eq!(json["listen_refused"]["code"], "PERMISSION_DENIED");

    // The refused checkout is still covered: the reconciler records its payment.
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        text.replace("interval = \"1h\"", "interval = \"2s\""),
    )
    .expect("config");
    daemon.control(paywatch::daemon::Control::Reload).await;
    sandbox.state().pay(&refused).await.expect("pay");
    wait_status(&ledger, &refused, "PAID").await;
    let paid = ledger
        .transitions(&refused)
        .expect("transitions")
        .pop()
        .expect("paid");
    assert_eq!(paid.source, "reconcile");
    daemon.stop().await;
    sandbox.shutdown().await;
}

/// Issue 21, section 6: a resume token too old to resume from (the sandbox's
/// `resume_token_max_age` fault, as after a long disconnect) gets every document again. The
/// daemon verifies only the documents that changed since the snapshot it last saw (by their
/// update time): a full resend of 1,000 unchanged documents costs no Get Checkout, and the one
/// paid while the daemon was disconnected costs one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_resend_costs_get_checkout_only_for_changed_documents() {
    const CHECKOUTS: usize = 1000;
    let (sandbox, _dir, settings, path, ledger) = common::setup("multiplexed", "").await;
    let mut ids = Vec::with_capacity(CHECKOUTS);
    for n in 0..CHECKOUTS {
        ids.push(create_and_track(&sandbox, &ledger, &format!("RESEND-{n}")).await);
    }
    let daemon = Daemon::start(&settings, &path).await;
    let checkpointed = || {
        let set = ledger.watch_set().expect("watch set");
        set.into_iter()
            .filter(|entry| !entry.needs_verify)
            .filter_map(|entry| Some((entry.checkout_id, entry.resume_token?)))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let before = wait_for(
        "every checkout verified and checkpointed",
        Duration::from_secs(90),
        || async {
            let tokens = checkpointed();
            (tokens.len() == CHECKOUTS).then_some(tokens)
        },
    )
    .await;
    let calls_before = sandbox.faults().total_get_checkout_calls();

    // Firestore goes away; one checkout is paid meanwhile; tokens expire.
    sandbox
        .faults()
        .set_resume_token_max_age(Some(Duration::from_millis(1)));
    sandbox.faults().set_refuse_listen(true);
    sandbox.faults().close_listen_streams();
    let paid = ids[CHECKOUTS / 2].clone();
    sandbox.state().pay(&paid).await.expect("pay");
    sandbox.faults().set_refuse_listen(false);

    // Every target comes back in full, and is checkpointed again after it.
    wait_for(
        "every target resent and checkpointed again",
        Duration::from_secs(90),
        || async {
            let tokens = checkpointed();
            (sandbox.listen_full_resends() >= CHECKOUTS as u64
                && tokens.len() == CHECKOUTS
                && tokens
                    .iter()
                    .all(|(id, token)| before.get(id) != Some(token)))
            .then_some(())
        },
    )
    .await;
    wait_status(&ledger, &paid, "PAID").await;
    let calls = sandbox.faults().total_get_checkout_calls() - calls_before;
    eprintln!(
        "figure: Get Checkout calls after a full resend of {} unchanged documents (and 1 changed) = {calls}",
        CHECKOUTS - 1
    );
    assert_eq!(calls, 1, "only the paid checkout is verified again");
    daemon.stop().await;
    sandbox.shutdown().await;
}

/// The config of `settings` with paymennt's API secret replaced by a wrong one.
fn with_wrong_secret(
    dir: &std::path::Path,
    sandbox: &paywatch::sandbox::Sandbox,
    extra: &str,
) -> std::path::PathBuf {
    let (_, path) = common::settings(dir, sandbox, "multiplexed", extra);
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace(sandbox.api_secret(), "not-the-secret");
    assert!(
        text.contains("not-the-secret"),
        "the secret is in the config: {text}"
    );
    std::fs::write(&path, text).expect("config written");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_credentials_paymennt_refuses_exits_2_naming_the_keys() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Discovery's first search is the first API call.
    let path = with_wrong_secret(dir.path(), &sandbox, "[discovery]\nenabled = true\n");
    let mut process = paywatch().config(&path).run();
    process
        .expect_line("paymennt refuses the API credentials")
        .await;
    let status = process.wait_exit().await;
    let seen = process.lines();
    assert_eq!(status.code(), Some(2), "{}", seen.join("\n"));
    let refusal = seen
        .iter()
        .find(|line| line.contains("paymennt refuses the API credentials"))
        .expect("the refusal line");
    assert!(refusal.contains("ERROR"), "{refusal}");
    assert!(
        refusal.contains("[paymennt] api_key and api_secret"),
        "{refusal}"
    );
    process.expect_line("wait_for_api").await;
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_for_api_a_refused_key_keeps_running_and_readyz_says_why() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = with_wrong_secret(
        dir.path(),
        &sandbox,
        "[discovery]\nenabled = true\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
    );
    let settings = paywatch::settings::Settings::load_with_env(
        Some(&path),
        vec![("PAYWATCH_DAEMON__WAIT_FOR_API".into(), "true".into())],
    )
    .expect("config");
    let daemon = Daemon::start(&settings, &path).await;
    let url = format!("{}/readyz", daemon.http_url());
    let body = wait_for("readyz naming the refused credentials", DEADLINE, || {
        let url = url.clone();
        async move {
            let response = reqwest::get(&url).await.ok()?;
            let code = response.status().as_u16();
            let body = response.text().await.ok()?;
            (code == 503 && body.contains("paymennt refuses the API credentials")).then_some(body)
        }
    })
    .await;
    assert!(!body.contains("not-the-secret"), "{body}");
    daemon.stop().await;
    sandbox.shutdown().await;
}
