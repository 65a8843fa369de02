//! The secrets sweep: with recognisable credentials, run paywatch's whole flow (link create,
//! the daemon in text and JSON log formats at debug level, payments, API errors and retries,
//! refunds, hooks, every read command with `--json`, check-config online) and assert that no
//! secret appears in any log line, error message, output, ledger byte, hook environment or hook
//! stdin.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use paywatch::ledger::{DeliveryFilter, DeliveryState, Ledger};
use paywatch::sandbox::{Sandbox, SandboxOptions};

use crate::common::{self, DEADLINE};

/// The paymennt API key: sent to paymennt, nowhere else.
const API_KEY: &str = "pk_SWEEPKEY_7f3a9c";
/// The paymennt API secret: read from a file, sent to paymennt, nowhere else.
const API_SECRET: &str = "sk_SWEEPSECRET_2e8b41";

/// Everything the sweep collected, by where it came from.
#[derive(Default)]
struct Places(Vec<(String, Vec<u8>)>);

impl Places {
    fn add(&mut self, place: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.0.push((place.into(), bytes.into()));
    }

    fn add_output(&mut self, place: &str, output: &Output) {
        self.add(format!("{place} (stdout)"), output.stdout.clone());
        self.add(format!("{place} (stderr)"), output.stderr.clone());
    }

    fn add_file(&mut self, place: &str, path: &Path) {
        if let Ok(bytes) = std::fs::read(path) {
            self.add(place, bytes);
        }
    }

    fn text_of(&self, place_prefix: &str) -> String {
        self.0
            .iter()
            .filter(|(place, _)| place.starts_with(place_prefix))
            .map(|(_, bytes)| String::from_utf8_lossy(bytes).into_owned())
            .collect()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn paywatch(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_paywatch"));
        command.arg("--config").arg(&self.config).args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PAYWATCH_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        command
            .stdin(Stdio::null())
            .output()
            .expect("paywatch runs")
    }

    fn start_daemon(&self, log_format: &str, log: &Path) -> Child {
        let stderr = std::fs::File::create(log).expect("log file");
        Command::new(env!("CARGO_BIN_EXE_paywatch"))
            .arg("--config")
            .arg(&self.config)
            .args(["--log-format", log_format, "run"])
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("daemon starts")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn stop(mut child: Child) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let until = Instant::now() + DEADLINE;
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < until, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_delivered(ledger: &Ledger, count: usize) {
    common::wait_for("hook deliveries", DEADLINE, || {
        let delivered = ledger
            .deliveries(&DeliveryFilter {
                state: Some(DeliveryState::Delivered),
                ..DeliveryFilter::default()
            })
            .map(|d| d.len())
            .unwrap_or(0);
        async move { (delivered >= count).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_outputs_the_ledger_or_hooks() {
    let sandbox = Sandbox::start(SandboxOptions {
        api_key: API_KEY.into(),
        api_secret: API_SECRET.into(),
        heartbeat_interval: Duration::from_secs(2),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("api-secret");
    std::fs::write(&secret_file, format!("{API_SECRET}\n")).expect("secret file");
    let hook_dir = dir.path().join("hook-seen");
    std::fs::create_dir_all(&hook_dir).expect("mkdir");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "env > '{dir}/env-'\"$PAYWATCH_EVENT_ID\"\ncat > '{dir}/stdin-'\"$PAYWATCH_EVENT_ID\"\n",
            dir = hook_dir.display()
        ),
    )
    .expect("hook");
    let config = dir.path().join("paywatch.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = \"{ledger}\"\n\n\
             [paymennt]\nbase_url = \"{base}\"\napi_key = \"{API_KEY}\"\napi_secret_file = \"{secret}\"\nmax_retries = 5\n\n\
             [firestore]\nendpoint = \"{endpoint}\"\n\n\
             [reconcile]\ninterval = \"2s\"\n\n\
             [log]\nlevel = \"debug\"\n\n\
             [[hooks]]\nname = \"record\"\ncommand = [\"/bin/sh\", \"{hook}\"]\n",
            ledger = dir.path().join("paywatch.db").display(),
            base = sandbox.api_base_url(),
            secret = secret_file.display(),
            endpoint = sandbox.firestore_endpoint(),
            hook = hook.display(),
        ),
    )
    .expect("config");
    let setup = Setup { dir, config };
    let mut places = Places::default();

    // Links made by paywatch itself, and a bad request paymennt refuses.
    let mut ids = Vec::new();
    for order in ["SWEEP-1", "SWEEP-2"] {
        let output = setup.paywatch(&[
            "link",
            "create",
            "--order",
            order,
            "--amount",
            "25.00",
            "--currency",
            "AED",
        ]);
        assert!(output.status.success(), "{output:?}");
        places.add_output(&format!("link create {order}"), &output);
    }
    let ledger = Ledger::open(&setup.path("paywatch.db")).expect("ledger");
    for record in ledger.list(&Default::default()).expect("list") {
        ids.push(record.id.parse().expect("id"));
    }
    assert_eq!(ids.len(), 2);
    let refused = setup.paywatch(&["track", "--checkout-id", "999999999"]);
    places.add_output("track unknown id", &refused);

    // The daemon, text logs at debug: a payment through API errors and retries, a refund.
    let text_log = setup.path("daemon-text.log");
    let daemon = setup.start_daemon("text", &text_log);
    common::wait_status(&ledger, &ids[0], "PENDING").await;
    sandbox.faults().fail_next_api_requests(3);
    sandbox.state().pay(&ids[0]).await.expect("pay");
    common::wait_status(&ledger, &ids[0], "PAID").await;
    sandbox
        .state()
        .refund(&ids[0], Some("5.00".parse().expect("decimal")))
        .await
        .expect("refund");
    common::wait_status(&ledger, &ids[0], "PARTIALLY_REFUNDED").await;
    wait_delivered(&ledger, 3).await;
    tokio::task::block_in_place(|| stop(daemon));

    // Again with JSON logs, throttled answers this time.
    let json_log = setup.path("daemon-json.log");
    let daemon = setup.start_daemon("json", &json_log);
    sandbox.faults().throttle_next_api_requests(2, 1);
    sandbox.state().pay(&ids[1]).await.expect("pay");
    common::wait_status(&ledger, &ids[1], "PAID").await;
    wait_delivered(&ledger, 5).await;
    tokio::task::block_in_place(|| stop(daemon));
    places.add_file("daemon log (text)", &text_log);
    places.add_file("daemon log (json)", &json_log);

    // Every read command, in both output forms.
    for id in &ids {
        let id = id.to_string();
        for args in [
            vec!["status", id.as_str()],
            vec!["status", id.as_str(), "--json"],
            vec!["events", id.as_str(), "--json"],
        ] {
            let output = setup.paywatch(&args);
            assert!(output.status.success(), "{args:?}: {output:?}");
            places.add_output(&args.join(" "), &output);
        }
    }
    for args in [
        vec!["list", "--json"],
        vec!["hooks", "list", "--json"],
        vec!["check-config"],
        vec!["check-config", "--online"],
    ] {
        let output = setup.paywatch(&args);
        places.add_output(&args.join(" "), &output);
    }

    // What the hooks saw, and every byte of the ledger.
    let mut hook_files = 0;
    for entry in std::fs::read_dir(&hook_dir).expect("hook dir") {
        let path = entry.expect("entry").path();
        places.add_file(&format!("hook {}", path.display()), &path);
        hook_files += 1;
    }
    for suffix in ["", "-wal", "-shm"] {
        places.add_file(
            &format!("ledger file paywatch.db{suffix}"),
            &setup.path(&format!("paywatch.db{suffix}")),
        );
    }

    // The sweep looked where it matters: the payment line, the retries and the hook's view.
    let text = places.text_of("daemon log (text)");
    assert!(text.contains("PAID checkout="), "{text}");
    assert!(
        places
            .text_of("daemon log (json)")
            .contains("PAID checkout=")
    );
    assert_eq!(hook_files, 10, "env and stdin of five deliveries");
    assert!(places.text_of("hook").contains("PAYWATCH_EVENT_ID="));
    assert!(
        places
            .text_of("ledger file paywatch.db")
            .contains("SWEEP-1")
    );

    for secret in [API_KEY, API_SECRET] {
        for (place, bytes) in &places.0 {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "the secret {secret} leaked into {place}"
            );
        }
    }
    sandbox.shutdown().await;
}
