//! URL hooks (issue 24) verified by the reference Standard Webhooks libraries, not only by
//! paywatch's own code: a merchant's endpoint in Python (PyPI `standardwebhooks`,
//! tests/webhooks/receiver.py) and one in Node (npm `standardwebhooks`, receiver.mjs) check
//! every delivery the daemon or `paywatch hooks test` sends them.
//!
//! Setup once (CI's .ci/run does it):
//!
//! ```sh
//! python3 -m venv tests/webhooks/.venv
//! tests/webhooks/.venv/bin/pip install -r tests/webhooks/requirements.txt
//! npm ci --prefix tests/webhooks
//! ```
//!
//! The Python receiver runs on `PAYWATCH_TEST_PYTHON` if set, else tests/webhooks/.venv's
//! python, else `python3` (with the library installed some other way). Without a receiver's
//! runtime or library these tests print a skip message and pass, except under `CI=true`,
//! where that is a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paywatch::ledger::{DeliveryState, Ledger};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{self, DEADLINE, Daemon, wait_for};

/// The secret paywatch signs with (the Standard Webhooks specification's example).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The secret being rotated out.
const OLD_SECRET: &str = "whsec_dGhpcyBpcyBhbm90aGVyIHRlc3Qga2V5IG9mIDMyIGJ5dGVz";

/// Which reference library verifies.
#[derive(Debug, Clone, Copy)]
enum Library {
    Python,
    Node,
}

const LIBRARIES: [Library; 2] = [Library::Python, Library::Node];

fn webhooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhooks")
}

/// Skips (None) with a message, or fails under CI=true.
fn skip(why: String) -> Option<Receiver> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if in_ci {
        panic!("url hooks: {why} (CI=true makes this a failure; .ci/run installs it)");
    }
    eprintln!("url hooks: skipped: {why}");
    None
}

/// A running receiver; killed on drop (it also exits when its stdin closes).
struct Receiver {
    _child: Child,
    port: u16,
    /// One JSON object per request, in arrival order.
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// Starts the receiver of `library`, verifying with `secrets`, answering `answers` in
    /// order (then 200), a redirect pointing at `location`.
    async fn start(
        library: Library,
        secrets: &[&str],
        answers: &str,
        location: &str,
    ) -> Option<Receiver> {
        let dir = webhooks_dir();
        let mut command = match library {
            Library::Python => {
                let venv = dir.join(".venv/bin/python3");
                let python = std::env::var_os("PAYWATCH_TEST_PYTHON")
                    .map(PathBuf::from)
                    .or_else(|| venv.exists().then_some(venv))
                    .unwrap_or_else(|| PathBuf::from("python3"));
                let probe = std::process::Command::new(&python)
                    .args(["-c", "import standardwebhooks"])
                    .output();
                if !probe.is_ok_and(|output| output.status.success()) {
                    return skip(format!(
                        "{} cannot import standardwebhooks (see tests/url_hooks.rs for the setup)",
                        python.display()
                    ));
                }
                let mut command = Command::new(python);
                command.arg(dir.join("receiver.py"));
                command
            }
            Library::Node => {
                if !dir.join("node_modules/standardwebhooks").exists() {
                    return skip(
                        "tests/webhooks/node_modules has no standardwebhooks (npm ci --prefix tests/webhooks)"
                            .into(),
                    );
                }
                let mut command = Command::new("node");
                command.arg(dir.join("receiver.mjs"));
                command
            }
        };
        for secret in secrets {
            command.args(["--secret", secret]);
        }
        command.args(["--answers", answers, "--location", location]);
        let mut child = match command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(error) => return skip(format!("cannot start the {library:?} receiver: {error}")),
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the receiver says where it listens in time")
            .expect("read")
            .expect("a first line");
        let port: u16 = first
            .strip_prefix("listening ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let record: Value = serde_json::from_str(&line).expect("a JSON line");
                sink.lock().expect("lock").push(record);
            }
        });
        Some(Receiver {
            _child: child,
            port,
            seen,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/paywatch?shop=eu", self.port)
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits until `count` requests have arrived, and returns them.
    async fn wait_for(&self, count: usize, deadline: Duration) -> Vec<Value> {
        wait_for(&format!("{count} requests"), deadline, || async {
            let seen = self.seen();
            (seen.len() >= count).then_some(seen)
        })
        .await
    }
}

/// Asserts what every delivery must show a reference library: it verifies with each secret,
/// and the same library rejects it tampered with or replayed outside the tolerance.
fn assert_verifies(library: Library, record: &Value, secrets: usize) {
    let verified = record["verified"].as_array().expect("verdicts");
    assert_eq!(verified.len(), secrets);
    for verdict in verified {
        assert!(verdict.is_null(), "{library:?}: does not verify: {record}");
    }
    for (what, expected) in [
        ("tampered_body", "No matching signature"),
        ("tampered_timestamp", "No matching signature"),
        ("stale", "too old"),
    ] {
        let verdict = record[what]
            .as_str()
            .unwrap_or_else(|| panic!("{library:?}: a delivery {what} was accepted: {record}"));
        assert!(verdict.contains(expected), "{library:?} {what}: {verdict}");
    }
    let headers = &record["headers"];
    assert!(
        headers["user-agent"]
            .as_str()
            .is_some_and(|agent| agent.starts_with("paywatch/")),
        "{record}"
    );
    assert_eq!(headers["content-type"], "application/json", "{record}");
    let body: Value = serde_json::from_str(record["body"].as_str().expect("body")).expect("JSON");
    assert_eq!(headers["webhook-id"], body["event_id"], "{record}");
}

/// A daemon over a sandbox, with one URL hook `shop` whose extra keys are `keys`.
async fn daemon_with_hook(
    dir: &Path,
    sandbox: &paywatch::sandbox::Sandbox,
    url: &str,
    keys: &str,
) -> (Daemon, Ledger) {
    let extra = format!(
        "[[hooks]]\nname = \"shop\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nstatuses = [\"PAID\"]\n{keys}\n"
    );
    let (settings, path) = common::settings(dir, sandbox, "multiplexed", &extra);
    let ledger = Ledger::open(&settings.ledger.path).await.expect("ledger");
    let daemon = Daemon::start(&settings, &path).await;
    (daemon, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_checkout_is_posted_and_verifies_with_both_reference_libraries() {
    for library in LIBRARIES {
        let Some(receiver) = Receiver::start(library, &[SECRET], "", "").await else {
            continue;
        };
        let sandbox = common::sandbox().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (daemon, ledger) = daemon_with_hook(
            dir.path(),
            &sandbox,
            &receiver.url(),
            "headers = { \"X-Shop\" = \"eu-1\" }",
        )
        .await;
        let id = common::create_and_track(&sandbox, &ledger, "ORD-URL-1").await;
        sandbox.state().pay(&id).await.expect("pay");
        let seen = receiver.wait_for(1, DEADLINE).await;
        let record = &seen[0];
        assert_verifies(library, record, 1);
        assert_eq!(record["path"], "/paywatch?shop=eu");
        assert_eq!(record["headers"]["x-shop"], "eu-1");
        let body: Value =
            serde_json::from_str(record["body"].as_str().expect("body")).expect("JSON");
        assert_eq!(body["status"], "PAID");
        assert_eq!(body["checkout_id"], id.as_str());
        assert_eq!(body["order_id"], "ORD-URL-1");
        assert_eq!(body["amount"], "100.00");
        assert_eq!(body["test"], false);
        let delivery = wait_for("the delivery recorded", DEADLINE, || async {
            ledger
                .deliveries_of(&id)
                .await
                .expect("deliveries")
                .into_iter()
                .find(|d| d.state == DeliveryState::Delivered)
        })
        .await;
        assert_eq!(delivery.event_id, record["headers"]["webhook-id"]);
        daemon.stop().await;
        sandbox.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_500_carries_the_same_webhook_id_and_verifies_again() {
    for library in LIBRARIES {
        let Some(receiver) = Receiver::start(library, &[SECRET], "500", "").await else {
            continue;
        };
        let sandbox = common::sandbox().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (daemon, ledger) = daemon_with_hook(dir.path(), &sandbox, &receiver.url(), "").await;
        let id = common::create_and_track(&sandbox, &ledger, "ORD-URL-2").await;
        sandbox.state().pay(&id).await.expect("pay");
        // The first retry is due about 5 s (±20%) after the 500.
        let seen = receiver.wait_for(2, DEADLINE).await;
        assert_eq!(seen[0]["status"], 500);
        assert_eq!(seen[1]["status"], 200);
        assert_eq!(
            seen[0]["headers"]["webhook-id"], seen[1]["headers"]["webhook-id"],
            "{library:?}: the same event id on the retry"
        );
        for record in &seen {
            assert_verifies(library, record, 1);
        }
        let attempts: Vec<Value> = seen
            .iter()
            .map(|r| {
                serde_json::from_str::<Value>(r["body"].as_str().expect("body")).expect("JSON")
                    ["attempt"]
                    .clone()
            })
            .collect();
        assert_eq!(attempts, [1, 2]);
        let delivery = wait_for("the retried delivery recorded", DEADLINE, || async {
            ledger
                .deliveries_of(&id)
                .await
                .expect("deliveries")
                .into_iter()
                .find(|d| d.state == DeliveryState::Delivered)
        })
        .await;
        assert_eq!(delivery.attempts, 2);
        daemon.stop().await;
        sandbox.shutdown().await;
    }
}

/// A merchant's config with one URL hook `shop` and `keys`, for `paywatch hooks test`.
fn merchant_config(dir: &Path, url: &str, keys: &str) -> PathBuf {
    let path = dir.join("paywatch.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\npath = \"{}\"\n\n[[hooks]]\nname = \"shop\"\nurl = \"{url}\"\n{keys}\n",
            dir.join("paywatch.db").display()
        ),
    )
    .expect("write the config");
    path
}

fn hooks_test(config: &Path) -> std::process::Output {
    common::process::run(config, &["hooks", "test", "shop", "--status", "paid"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_test_posts_a_signed_test_event_and_a_rotation_signs_with_both_secrets() {
    for library in LIBRARIES {
        let Some(receiver) = Receiver::start(library, &[SECRET, OLD_SECRET], "", "").await else {
            continue;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = merchant_config(
            dir.path(),
            &receiver.url(),
            &format!("secret = \"{SECRET}\"\nprevious_secret = \"{OLD_SECRET}\""),
        );
        let output = tokio::task::spawn_blocking(move || hooks_test(&config))
            .await
            .expect("join");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("hook     shop\n"), "{stdout}");
        assert!(
            stdout.contains(&format!(
                "url      POST http://127.0.0.1:{}/paywatch?…",
                receiver.port
            )),
            "the query is not shown: {stdout}"
        );
        assert!(
            stdout.contains("result   delivered: HTTP 200 OK after "),
            "{stdout}"
        );
        assert!(stdout.contains("status   200\n"), "{stdout}");
        let seen = receiver.wait_for(1, DEADLINE).await;
        let record = &seen[0];
        // Each secret verifies on its own: a merchant on either side of the rotation accepts it.
        assert_verifies(library, record, 2);
        let signatures = record["headers"]["webhook-signature"]
            .as_str()
            .expect("signature");
        assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
        let body: Value =
            serde_json::from_str(record["body"].as_str().expect("body")).expect("JSON");
        assert_eq!(body["test"], true);
    }
}

/// The hook's secret from the systemd credential `paywatch-hook-shop-secret` (no `secret` in the
/// config): the delivery verifies with it, and the secret appears nowhere in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_from_the_systemd_credential_signs_the_delivery() {
    for library in LIBRARIES {
        let Some(receiver) = Receiver::start(library, &[SECRET], "", "").await else {
            continue;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let credentials = dir.path().join("credentials");
        std::fs::create_dir(&credentials).expect("credentials directory");
        std::fs::write(
            credentials.join("paywatch-hook-shop-secret"),
            format!("{SECRET}\n"),
        )
        .expect("write the credential");
        let config = merchant_config(dir.path(), &receiver.url(), "");
        let output = tokio::task::spawn_blocking(move || {
            common::process::paywatch()
                .config(&config)
                .env("CREDENTIALS_DIRECTORY", &credentials)
                .args(["hooks", "test", "shop", "--status", "paid"])
                .output()
        })
        .await
        .expect("join");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "the secret is shown: {stdout}\n{stderr}"
        );
        let seen = receiver.wait_for(1, DEADLINE).await;
        assert_verifies(library, &seen[0], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_and_hooks_test_names_its_location() {
    for library in LIBRARIES {
        let Some(elsewhere) = Receiver::start(library, &[SECRET], "", "").await else {
            continue;
        };
        let Some(receiver) = Receiver::start(
            library,
            &[SECRET],
            "302",
            &format!("{}/stolen", elsewhere.url()),
        )
        .await
        else {
            continue;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = merchant_config(
            dir.path(),
            &receiver.url(),
            &format!("secret = \"{SECRET}\""),
        );
        let output = tokio::task::spawn_blocking(move || hooks_test(&config))
            .await
            .expect("join");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("result   NOT delivered: HTTP 302 Found, a redirect to"),
            "{stdout}"
        );
        assert!(stdout.contains("/stolen"), "{stdout}");
        assert!(
            stderr.contains("(a real delivery would be retried)"),
            "{stderr}"
        );
        assert_eq!(receiver.wait_for(1, DEADLINE).await.len(), 1);
        // The paywatch process has ended: anything it would have sent elsewhere has arrived.
        assert!(
            elsewhere.seen().is_empty(),
            "{library:?}: the redirect was followed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_dead_at_once_and_hooks_test_says_so() {
    let Some(receiver) = Receiver::start(Library::Python, &[SECRET], "422,422", "").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = merchant_config(
        dir.path(),
        &receiver.url(),
        &format!("secret = \"{SECRET}\""),
    );
    let output = tokio::task::spawn_blocking(move || hooks_test(&config))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("HTTP 422 Unprocessable Entity: refused by the test receiver"),
        "{stdout}"
    );
    assert!(
        stdout.contains("answer   refused by the test receiver"),
        "{stdout}"
    );
    assert!(
        stderr.contains("a permanent answer: a real delivery would be dead at once"),
        "{stderr}"
    );

    // And the daemon makes it a dead letter after one attempt.
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, ledger) = daemon_with_hook(dir.path(), &sandbox, &receiver.url(), "").await;
    let id = common::create_and_track(&sandbox, &ledger, "ORD-URL-4").await;
    sandbox.state().pay(&id).await.expect("pay");
    let dead = wait_for("the dead letter", DEADLINE, || async {
        ledger
            .deliveries_of(&id)
            .await
            .expect("deliveries")
            .into_iter()
            .find(|d| d.state == DeliveryState::Dead)
    })
    .await;
    assert_eq!(dead.attempts, 1);
    assert!(
        dead.last_error
            .as_deref()
            .is_some_and(|e| e.contains("HTTP 422") && e.contains("a permanent answer")),
        "{:?}",
        dead.last_error
    );
    daemon.stop().await;
    sandbox.shutdown().await;
}
