//! Two `paywatch run` processes on one PostgreSQL ledger (the throwaway cluster; skipped
//! without PostgreSQL, failing under `CI=true`): one acts, the other stands by. The active one
//! is SIGKILLed, the standby takes over and is itself SIGSTOPped past its lease while a
//! restarted daemon takes over, then resumed. Payments go on throughout; every one is recorded
//! PAID exactly once in its checkout's history and hooked.
//!
//! The lease is 3 s here, so the test is quick; `PAYWATCH_TEST_LEASE=10s` runs it at the
//! default lease, and the takeover times it prints are the note's figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use nix::sys::signal::Signal;
use paywatch::domain::CheckoutId;
use paywatch::ledger::{DeliveryState, Ledger};
use paywatch::sandbox::Sandbox;

use crate::common::process::{Process, paywatch, stdout};
use crate::common::{self, create_and_track, history, postgres, wait_for, wait_status};

/// The lease the pair runs with.
fn lease() -> String {
    std::env::var("PAYWATCH_TEST_LEASE").unwrap_or_else(|_| "3s".to_owned())
}

/// A free loopback port (bound, read, released), so each daemon keeps one address across its
/// roles.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A config for one daemon of the pair: the shared ledger at `url` with `lease`, its own HTTP
/// port, and `hook`.
fn write_config(
    dir: &Path,
    name: &str,
    sandbox: &Sandbox,
    url: &str,
    lease: &str,
    hook: &str,
) -> (std::path::PathBuf, u16) {
    let port = free_port();
    let text = common::sandbox_config_text(
        dir,
        sandbox,
        "multiplexed",
        &format!("[ha]\nlease = \"{lease}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n{hook}"),
    );
    let path_line = format!("path = \"{}\"", dir.join("paywatch.db").display());
    let text = text.replace(&path_line, &format!("url = \"{url}\""));
    (
        common::process::write_config_named(dir, &format!("{name}.toml"), &text),
        port,
    )
}

/// `GET /readyz` on `port`: the status code and body.
async fn readyz(port: u16) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz answers");
    let code = response.status().as_u16();
    (code, response.text().await.unwrap_or_default())
}

/// Waits until `/readyz` on `port` answers `code`.
async fn wait_ready(port: u16, code: u16) -> String {
    wait_for(
        &format!("/readyz on {port} to answer {code}"),
        common::DEADLINE,
        || async move {
            match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
                Ok(response) if response.status().as_u16() == code => {
                    Some(response.text().await.unwrap_or_default())
                }
                _ => None,
            }
        },
    )
    .await
}

/// A PAID hook that appends `EVENT CHECKOUT STATUS` to `dir/runs.txt` at each run: its
/// `[[hooks]]` table and the file.
fn recording_hook(dir: &Path) -> (String, std::path::PathBuf) {
    let runs = dir.join("runs.txt");
    let hook = common::shell_hook(
        dir,
        "record",
        &["PAID"],
        &format!(
            "echo \"$PAYWATCH_EVENT_ID $PAYWATCH_CHECKOUT_ID $PAYWATCH_STATUS\" >> '{}'\n",
            runs.display()
        ),
    );
    (hook, runs)
}

/// Hook runs recorded by [`recording_hook`]: checkout -> (event id, status) of each run.
fn hook_runs(runs: &Path) -> BTreeMap<String, Vec<(String, String)>> {
    let mut seen: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for line in std::fs::read_to_string(runs).unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [event, checkout, status] = fields[..] {
            seen.entry(checkout.to_owned())
                .or_default()
                .push((event.to_owned(), status.to_owned()));
        }
    }
    seen
}

/// Creates, tracks and pays `count` links named `ORD-{round}-{n}`.
async fn pay_some(
    sandbox: &Sandbox,
    ledger: &Ledger,
    round: &str,
    count: usize,
) -> Vec<CheckoutId> {
    let mut ids = Vec::new();
    for n in 0..count {
        let id = create_and_track(sandbox, ledger, &format!("ORD-{round}-{n}")).await;
        sandbox.state().pay(&id).await.expect("pay");
        ids.push(id);
    }
    ids
}

/// Starts a daemon of the pair, its log in `dir/NAME.log`.
fn start(config: &Path, dir: &Path, name: &str) -> Process {
    paywatch()
        .config(config)
        .log_to(&dir.join(format!("{name}.log")))
        .run()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_fails_over_on_sigkill_and_sigstop_and_every_payment_is_recorded_once_and_hooked() {
    let Some(url) = postgres::database() else {
        return;
    };
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, runs) = recording_hook(dir.path());
    let (config_a, port_a) = write_config(dir.path(), "a", &sandbox, &url, &lease(), &hook);
    let (config_b, port_b) = write_config(dir.path(), "b", &sandbox, &url, &lease(), &hook);
    let ledger = postgres::operator_ledger(&url).await;

    // A wins the lease; B stands by, says so, and takes no webhook.
    let mut a = start(&config_a, dir.path(), "a");
    a.expect_line("role: active").await;
    a.expect_line("paywatch is running").await;
    let mut b = start(&config_b, dir.path(), "b");
    b.expect_line("standby: the ledger's lease is held by")
        .await;
    wait_ready(port_a, 200).await;
    let (code, body) = readyz(port_b).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("standby"), "{body}");
    let webhook = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port_b}/webhooks/paymennt"))
        .body("{}")
        .send()
        .await
        .expect("webhook answered");
    assert_eq!(webhook.status().as_u16(), 503, "a standby refuses webhooks");
    for (port, role, active) in [(port_a, "active", 1.0), (port_b, "standby", 0.0)] {
        let healthz = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .expect("healthz answers");
        assert_eq!(
            healthz.status().as_u16(),
            200,
            "the {role} daemon is healthy"
        );
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text");
        let exposition = common::exposition::parse(&text).expect("the exposition parses");
        assert_eq!(
            exposition.value("paywatch_active", &[]),
            Some(active),
            "paywatch_active on the {role} daemon"
        );
    }
    let status =
        tokio::task::block_in_place(|| paywatch().config(&config_b).arg("status").output());
    let printed = stdout(&status);
    assert!(
        printed.contains(&format!(":{}:", a.pid())) && printed.contains("epoch 1"),
        "status names the holder (A) and its epoch:\n{printed}"
    );

    // A third daemon whose config it could never act on (a hook program that is not there)
    // fails at its start, exit 2, rather than stand by until its takeover.
    let broken = std::fs::read_to_string(&config_b)
        .expect("config")
        .replace("\"/bin/sh\"", "\"/nonexistent/sh\"");
    let broken = common::process::write_config_named(dir.path(), "broken.toml", &broken);
    let output = tokio::task::block_in_place(|| paywatch().config(&broken).arg("run").output());
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        common::process::stderr(&output)
    );
    assert!(common::process::stderr(&output).contains("/nonexistent/sh"));

    // A reload while standing by re-reads the config for the next term.
    b.signal(Signal::SIGHUP);
    b.expect_line("config reloaded; it applies when this daemon becomes active")
        .await;

    let mut paid = pay_some(&sandbox, &ledger, "A", 4).await;
    for id in &paid {
        wait_status(&ledger, id, "PAID").await;
    }

    // SIGKILL the active daemon while payments go on: B takes over within the lease (plus a
    // poll), resumes the Listen streams and records them.
    let killed = Instant::now();
    tokio::task::block_in_place(|| a.kill_9());
    paid.extend(pay_some(&sandbox, &ledger, "KILL", 4).await);
    b.expect_line("role: active").await;
    let after_kill = killed.elapsed();
    b.expect_line("paywatch is running").await;
    for id in &paid {
        wait_status(&ledger, id, "PAID").await;
    }
    wait_ready(port_b, 200).await;

    // The killed daemon comes back (as systemd restarts it) and stands by.
    let mut a = start(&config_a, dir.path(), "a");
    a.expect_line("standby: the ledger's lease is held by")
        .await;

    // SIGSTOP the active daemon past its lease: A takes over; B, resumed, finds its lease
    // gone, records nothing more and stands by.
    let stopped = Instant::now();
    b.signal(Signal::SIGSTOP);
    paid.extend(pay_some(&sandbox, &ledger, "STOP", 4).await);
    a.expect_line("role: active").await;
    let after_stop = stopped.elapsed();
    b.signal(Signal::SIGCONT);
    b.expect_line("role: standby").await;
    paid.extend(pay_some(&sandbox, &ledger, "AFTER", 4).await);
    for id in &paid {
        wait_status(&ledger, id, "PAID").await;
    }
    wait_ready(port_a, 200).await;
    let (code, body) = readyz(port_b).await;
    assert_eq!(code, 503, "the resumed daemon stands by: {body}");

    // Every payment: PAID once in its history, its PAID hook delivered, and every run of it
    // under one event id (a rerun after a takeover keeps the id).
    wait_for("every PAID hook delivered", common::DEADLINE, || async {
        for id in &paid {
            let deliveries = ledger.deliveries_of(id).await.expect("deliveries");
            if deliveries.is_empty()
                || deliveries
                    .iter()
                    .any(|d| d.state != DeliveryState::Delivered)
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    let hooked = hook_runs(&runs);
    for id in &paid {
        let statuses = history(&ledger, id).await;
        assert_eq!(
            statuses.iter().filter(|status| *status == "PAID").count(),
            1,
            "{id}: history {statuses:?}"
        );
        let runs_of = hooked.get(&id.to_string()).cloned().unwrap_or_default();
        assert!(!runs_of.is_empty(), "{id}: the PAID hook never ran");
        let events: BTreeSet<&String> = runs_of.iter().map(|(event, _)| event).collect();
        assert_eq!(
            events.len(),
            1,
            "{id}: runs under several event ids: {runs_of:?}"
        );
    }
    let reruns: usize = hooked.values().map(|runs| runs.len() - 1).sum();

    eprintln!(
        "failover at a {} lease: SIGKILL to the standby active in {:.1} s; SIGSTOP to the \
         standby active in {:.1} s; {} payments, {} hook reruns",
        lease(),
        after_kill.as_secs_f64(),
        after_stop.as_secs_f64(),
        paid.len(),
        reruns
    );

    assert!(a.stop().await.success(), "A exits cleanly");
    assert!(b.stop().await.success(), "B exits cleanly");
}

/// A paymennt response to `track` (the create-link answer's shape).
const RESPONSE: &str = r#"{"success":true,"elapsed":12,"result":{"id":"1653241101733169556","displayId":"QS3IM5","requestId":"ORD-1234-r1","orderId":"ORD-1234","currency":"AED","amount":19.99,"status":"PENDING","redirectUrl":"https://pay.test.paymennt.com/checkout/abc","firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-1"}}"#;

#[test]
fn the_commands_work_on_a_postgresql_ledger_and_status_names_the_lease() {
    let Some(url) = postgres::database() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::process::write_config(
        dir.path(),
        &format!(
            "[ledger]\nurl = \"{url}\"\n[paymennt]\nbase_url = \"http://127.0.0.1:9/mer/v2.0/\"\n\
             api_key = \"k\"\napi_secret = \"s\"\nmax_retries = 0\n"
        ),
    );
    let run = |args: &[&str]| {
        let output = paywatch().config(&config).args(args).output();
        assert_eq!(
            output.status.code(),
            Some(0),
            "paywatch {args:?}: {}",
            common::process::stderr(&output)
        );
        stdout(&output)
    };

    // No daemon has run: the summary says no lease was ever held.
    let summary = run(&["status"]);
    assert!(summary.contains("(postgresql)"), "{summary}");
    assert!(summary.contains("never held"), "{summary}");

    let tracked = paywatch()
        .config(&config)
        .args(["track", "-"])
        .stdin(RESPONSE.as_bytes())
        .output();
    assert!(
        tracked.status.success(),
        "{}",
        common::process::stderr(&tracked)
    );
    assert!(
        stdout(&tracked).contains("now watched"),
        "{}",
        stdout(&tracked)
    );

    let status: serde_json::Value =
        serde_json::from_str(&run(&["status", "1653241101733169556", "--json"])).expect("JSON");
    assert_eq!(status["order_id"], "ORD-1234");
    assert_eq!(status["amount"], "19.99");
    let list: serde_json::Value = serde_json::from_str(&run(&["list", "--json"])).expect("JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert!(run(&["events", "1653241101733169556"]).contains("no verified status yet"));
    run(&["hooks", "list"]);
    let summary: serde_json::Value =
        serde_json::from_str(&run(&["status", "--json"])).expect("JSON");
    assert_eq!(summary["backend"], "postgresql");
    assert_eq!(summary["checkouts"], 1);
    assert_eq!(summary["watched"], 1);
    assert!(summary.get("lease").is_none(), "{summary}");

    // check-config reaches the database and says no daemon holds the lease.
    let checked = paywatch().config(&config).arg("check-config").output();
    let printed = stdout(&checked);
    assert!(printed.contains("(PostgreSQL) reached"), "{printed}");
    assert!(printed.contains("lease never held"), "{printed}");
    assert!(
        !printed.contains(&url),
        "the URL is never printed: {printed}"
    );

    // A role that owns its database, as the service guide sets it up, with a wrong password
    // (from password_file): the daemon exits 2 naming the key, never the password; with the
    // right one the commands work (and migrate the empty database).
    let cluster = postgres::cluster().expect("the cluster runs");
    let own_url = postgres::database().expect("a second database");
    let database = own_url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .expect("a database name")
        .to_owned();
    let user = format!("pw_{database}");
    cluster.psql(
        &database,
        &format!(
            "CREATE ROLE {user} LOGIN PASSWORD 'right-password-123'; \
             ALTER DATABASE {database} OWNER TO {user}"
        ),
    );
    cluster.require_password_for(&user);
    let password_file = dir.path().join("db-password");
    let guarded = common::process::write_config_named(
        dir.path(),
        "guarded.toml",
        &format!(
            "[ledger]\nurl = \"postgresql://{user}@127.0.0.1:{port}/{database}?sslmode=disable\"\n\
             password_file = \"{file}\"\n[paymennt]\napi_key = \"k\"\napi_secret = \"s\"\n\
             [firestore]\nenabled = false\n",
            port = cluster.port(),
            file = password_file.display()
        ),
    );
    std::fs::write(&password_file, "wrong-password-xyz\n").expect("password file");
    let output = paywatch().config(&guarded).arg("run").output();
    let said = common::process::stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(said.contains("ledger.password_file"), "{said}");
    assert!(!said.contains("wrong-password-xyz"), "{said}");
    std::fs::write(&password_file, "right-password-123\n").expect("password file");
    let output = paywatch().config(&guarded).arg("status").output();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        common::process::stderr(&output)
    );
    // And a daemon as that role (no superuser) takes the lease and writes through the fence.
    let mut daemon = paywatch()
        .config(&guarded)
        .log_to(&dir.path().join("guarded.log"))
        .run();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            daemon.expect_line("role: active").await;
            daemon.expect_line("paywatch is running").await;
            assert!(daemon.stop().await.success());
        });

    // A database that cannot be reached: exit 1 naming where it is, never the URL.
    let away = common::process::write_config_named(
        dir.path(),
        "away.toml",
        "[ledger]\nurl = \"postgresql://paywatch:hunter2@127.0.0.1:1/paywatch\"\n\
         [paymennt]\napi_key = \"k\"\napi_secret = \"s\"\n[firestore]\nenabled = false\n",
    );
    for command in ["status", "run"] {
        let output = paywatch().config(&away).arg(command).output();
        assert_eq!(
            output.status.code(),
            Some(1),
            "paywatch {command}: {}",
            common::process::stderr(&output)
        );
        let said = common::process::stderr(&output);
        assert!(said.contains("127.0.0.1:1/paywatch"), "{said}");
        assert!(said.contains("check that PostgreSQL runs there"), "{said}");
        assert!(!said.contains("hunter2"), "{said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_loses_its_database_stops_acting_and_acts_again_when_it_returns() {
    let Some(url) = postgres::database() else {
        return;
    };
    let Some(cluster) = postgres::cluster() else {
        return;
    };
    // The daemon reaches the database through a proxy the test cuts and restores.
    let proxy = postgres::Proxy::start(cluster.port()).await;
    let proxied = url.replace(
        &format!("127.0.0.1:{}/", cluster.port()),
        &format!("127.0.0.1:{}/", proxy.port),
    );
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, runs) = recording_hook(dir.path());
    let (config, port) = write_config(dir.path(), "lost", &sandbox, &proxied, "2s", &hook);
    let ledger = postgres::operator_ledger(&url).await;
    let before = pay_some(&sandbox, &ledger, "BEFORE", 1).await;
    let mut daemon = start(&config, dir.path(), "lost");
    daemon.expect_line("role: active").await;
    wait_status(&ledger, &before[0], "PAID").await;

    // The database goes away: within the lease the daemon stops acting, says so at error, and
    // stands by (alive, not ready), without exiting.
    proxy.cut();
    let said = daemon
        .expect_line("the ledger was unreachable for the whole lease")
        .await;
    assert!(said.contains("ERROR"), "{said}");
    wait_ready(port, 503).await;
    let during = pay_some(&sandbox, &ledger, "DURING", 2).await;
    assert!(daemon.try_wait().is_none(), "the daemon keeps running");

    // It returns: the daemon takes the lease again with a new epoch and catches up.
    proxy.restore();
    let won = daemon.expect_line("role: active").await;
    assert!(won.contains("epoch=2"), "{won}");
    for id in &during {
        wait_status(&ledger, id, "PAID").await;
    }
    wait_ready(port, 200).await;
    wait_for("the PAID hooks delivered", common::DEADLINE, || async {
        let hooked = hook_runs(&runs);
        during
            .iter()
            .chain(&before)
            .all(|id| hooked.contains_key(&id.to_string()))
            .then_some(())
    })
    .await;
    assert!(daemon.stop().await.success());
}
