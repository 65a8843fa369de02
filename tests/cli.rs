//! The command line as a user meets it: exit codes, messages, JSON shapes, and bad input that
//! leaves the ledger untouched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use paywatch::ledger::Ledger;
use serde_json::Value;

use crate::common;

/// Runs `paywatch --config CONFIG ARGS...` with a clean environment, feeding `stdin`.
fn paywatch(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_paywatch"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PAYWATCH_CONFIG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PAYWATCH_") {
            command.env_remove(name);
        }
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("paywatch starts");
    if let Some(mut pipe) = child.stdin.take() {
        use std::io::Write;
        pipe.write_all(stdin.unwrap_or_default().as_bytes())
            .expect("stdin written");
    }
    child.wait_with_output().expect("paywatch finishes")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A config with a ledger in `dir` and a paymennt base URL that nothing listens on.
fn offline_config(dir: &Path) -> PathBuf {
    let path = dir.join("paywatch.toml");
    let text = format!(
        "[ledger]\npath = \"{}\"\n[paymennt]\nbase_url = \"http://127.0.0.1:9/mer/v2.0/\"\napi_key = \"k\"\napi_secret = \"s\"\nmax_retries = 0\n",
        dir.join("paywatch.db").display()
    );
    std::fs::write(&path, text).expect("config written");
    path
}

const RESPONSE: &str = r#"{"success":true,"elapsed":12,"result":{"id":"1653241101733169556","displayId":"QS3IM5","requestId":"ORD-1234-r1","orderId":"ORD-1234","currency":"AED","amount":19.99,"status":"PENDING","redirectUrl":"https://pay.test.paymennt.com/checkout/abc","firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-1"}}"#;

#[test]
fn track_records_a_response_once_and_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path());
    let first = paywatch(&config, &["track", "-"], Some(RESPONSE));
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).contains("now watched"), "{}", stdout(&first));
    let second = paywatch(&config, &["track", "-"], Some(RESPONSE));
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stdout(&second).contains("already tracked"));

    let status = paywatch(&config, &["status", "1653241101733169556", "--json"], None);
    assert!(status.status.success(), "{}", stderr(&status));
    let json: Value = serde_json::from_slice(&status.stdout).expect("status --json is JSON");
    assert_eq!(json["id"], "1653241101733169556");
    assert_eq!(json["order_id"], "ORD-1234");
    assert_eq!(json["request_id"], "ORD-1234-r1");
    assert_eq!(json["amount"], "19.99", "amounts are exact decimal strings");
    assert_eq!(json["currency"], "AED");
    assert_eq!(
        json["status"],
        Value::Null,
        "a tracked response's status is not verified"
    );
    assert_eq!(
        json["redirect_url"],
        "https://pay.test.paymennt.com/checkout/abc"
    );
    assert!(json["updated_at"].is_string());
    assert_eq!(json["watched"], true);

    let list = paywatch(&config, &["list", "--json"], None);
    let json: Value = serde_json::from_slice(&list.stdout).expect("list --json is JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    let unverified = paywatch(&config, &["list", "--status", "UNVERIFIED"], None);
    assert!(stdout(&unverified).contains("1653241101733169556"));
}

/// Bad inputs for `track`, each with a word its message must contain.
const BAD_RESPONSES: &[(&str, &str, &str)] = &[
    (
        "malformed JSON",
        r#"{"success":true,"result":{"id":"#,
        "not valid JSON",
    ),
    (
        "missing document",
        r#"{"id":"1","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c"}"#,
        "firebaseDocument",
    ),
    (
        "missing id",
        r#"{"amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d"}"#,
        "'id'",
    ),
    (
        "negative amount",
        r#"{"id":"2","amount":-5,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d"}"#,
        "amount",
    ),
    (
        "error response",
        r#"{"success":false,"elapsed":3,"error":"Checkout not found for API merchant"}"#,
        "Checkout not found",
    ),
    (
        "hostile id",
        r#"{"id":"../../admin","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d"}"#,
        "checkout id",
    ),
    ("not an object", r#"[1,2,3]"#, "JSON object"),
];

#[test]
fn bad_responses_exit_2_with_a_clear_message_and_leave_the_ledger_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path());
    assert!(
        paywatch(&config, &["track", "-"], Some(RESPONSE))
            .status
            .success()
    );
    let ledger_path = dir.path().join("paywatch.db");
    let before = Ledger::open(&ledger_path)
        .expect("ledger")
        .list(&Default::default())
        .expect("list");
    for (what, input, expected) in BAD_RESPONSES {
        let output = paywatch(&config, &["track", "-"], Some(input));
        assert_eq!(output.status.code(), Some(2), "{what}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(expected),
            "{what}: message {:?} lacks {expected:?}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("stdin"),
            "{what}: the message names the input"
        );
    }
    let after = Ledger::open(&ledger_path)
        .expect("ledger")
        .list(&Default::default())
        .expect("list");
    assert_eq!(before, after, "nothing recorded was changed");

    let missing_file = paywatch(&config, &["track", "/nonexistent/response.json"], None);
    assert_eq!(missing_file.status.code(), Some(2));
    assert!(stderr(&missing_file).contains("/nonexistent/response.json"));
}

#[test]
fn link_create_validates_before_calling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "link",
                "create",
                "--order",
                "O1",
                "--amount",
                "-5",
                "--currency",
                "AED",
            ],
            "--amount",
        ),
        (
            &[
                "link",
                "create",
                "--order",
                "O1",
                "--amount",
                "0",
                "--currency",
                "AED",
            ],
            "greater than 0",
        ),
        (
            &[
                "link",
                "create",
                "--order",
                "O1",
                "--amount",
                "10",
                "--currency",
                "DIRHAM",
            ],
            "--currency",
        ),
        (
            &[
                "link",
                "create",
                "--order",
                "O1",
                "--amount",
                "10",
                "--currency",
                "AED",
                "--expires-in",
                "14",
            ],
            "15 to 10080",
        ),
    ];
    for (args, expected) in cases {
        let output = paywatch(&config, args, None);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    assert!(
        !dir.path().join("paywatch.db").exists(),
        "no ledger written for rejected input"
    );
}

#[test]
fn config_errors_exit_2_and_runtime_failures_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[ledger]\npaht = \"/tmp/x.db\"\n").expect("write");
    let output = paywatch(&config, &["list"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("ledger.paht"),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("did you mean 'ledger.path'"),
        "{}",
        stderr(&output)
    );

    let good = offline_config(dir.path());
    assert!(
        paywatch(&good, &["track", "-"], Some(RESPONSE))
            .status
            .success()
    );
    let unknown = paywatch(&good, &["status", "42"], None);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("not tracked"),
        "{}",
        stderr(&unknown)
    );
    // paymennt unreachable: a runtime failure, and the secret is not in the message.
    let fetch = paywatch(&good, &["track", "--checkout-id", "42"], None);
    assert_eq!(fetch.status.code(), Some(1), "{}", stderr(&fetch));
    assert!(
        !stderr(&fetch).contains("api_secret = "),
        "{}",
        stderr(&fetch)
    );
}

#[test]
fn check_config_finds_a_hook_program_on_the_hooks_own_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("hook-bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let program = bin.join("mark-paid-somewhere");
    std::fs::write(&program, "#!/bin/sh\nexit 0\n").expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = offline_config(dir.path());
    let mut text = std::fs::read_to_string(&config).expect("read");
    text.push_str(&format!(
        "\n[[hooks]]\nname = \"mine\"\ncommand = [\"mark-paid-somewhere\"]\nenv = {{ PATH = \"{}\", TOKEN = \"hook-token-value\" }}\n",
        bin.display()
    ));
    std::fs::write(&config, text).expect("write");
    let check = paywatch(&config, &["check-config"], None);
    let expected = format!("ok   hook 'mine' runs {}", program.display());
    assert!(
        stdout(&check).contains(&expected),
        "the daemon would run it, so check-config must find it: {}\n{}",
        stdout(&check),
        stderr(&check)
    );
    assert!(!stdout(&check).contains("hook-token-value"));
}

#[test]
fn an_out_of_range_setting_exits_2_naming_key_value_and_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path());
    let text = std::fs::read_to_string(&config).expect("read");
    // Above tokio's semaphore maximum this used to panic the hook dispatcher at run time.
    std::fs::write(
        &config,
        format!("hooks_concurrency = 2305843009213693952\n{text}"),
    )
    .expect("write");
    for args in [&["check-config"][..], &["run"][..]] {
        let output = paywatch(&config, args, None);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(
                "'hooks_concurrency' value '2305843009213693952' is too large (at most 256)"
            ),
            "{}",
            stderr(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_create_track_and_events_against_the_sandbox() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_settings, config) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    let config_for_blocking = config.clone();
    let created = tokio::task::spawn_blocking(move || {
        paywatch(
            &config_for_blocking,
            &[
                "link",
                "create",
                "--order",
                "ORD-9",
                "--amount",
                "19.99",
                "--currency",
                "aed",
                "--json",
            ],
            None,
        )
    })
    .await
    .expect("join");
    assert!(created.status.success(), "{}", stderr(&created));
    let response: Value =
        serde_json::from_slice(&created.stdout).expect("--json prints the response");
    let id = response["id"].as_str().expect("id").to_owned();
    assert_eq!(response["amount"].to_string(), "19.99");
    assert_eq!(response["currency"], "AED");
    let ledger = Ledger::open(&dir.path().join("paywatch.db")).expect("ledger");
    let record = ledger
        .checkout(&id.parse().expect("id"))
        .expect("read")
        .expect("tracked");
    assert_eq!(record.tracked_via, "link-create");
    assert_eq!(record.status.as_deref(), Some("PENDING"));
    drop(ledger);

    sandbox
        .state()
        .pay(&id.parse().expect("id"))
        .await
        .expect("pay");
    let config_for_blocking = config.clone();
    let id_for_blocking = id.clone();
    let (track, events, check) = tokio::task::spawn_blocking(move || {
        let track = paywatch(
            &config_for_blocking,
            &["track", "--checkout-id", &id_for_blocking],
            None,
        );
        let events = paywatch(
            &config_for_blocking,
            &["events", &id_for_blocking, "--json"],
            None,
        );
        let check = paywatch(&config_for_blocking, &["check-config", "--online"], None);
        (track, events, check)
    })
    .await
    .expect("join");
    assert!(track.status.success(), "{}", stderr(&track));
    assert!(stdout(&track).contains("PAID"), "{}", stdout(&track));
    let json: Value = serde_json::from_slice(&events.stdout).expect("events --json");
    let transitions = json["transitions"].as_array().expect("transitions");
    assert_eq!(transitions.len(), 2);
    assert_eq!(transitions[0]["from"], Value::Null);
    assert_eq!(transitions[0]["to"], "PENDING");
    assert_eq!(transitions[1]["from"], "PENDING");
    assert_eq!(transitions[1]["to"], "PAID");
    assert_eq!(transitions[1]["source"], "manual");
    assert_eq!(
        transitions[1]["checkout"]["status"], "PAID",
        "the verified JSON is embedded"
    );
    assert!(
        check.status.success(),
        "check-config --online against the sandbox: {}\n{}",
        stdout(&check),
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("paymennt answered"),
        "{}",
        stdout(&check)
    );
    assert!(
        stdout(&check).contains("ok   discovery is "),
        "check-config says whether discovery runs: {}",
        stdout(&check)
    );
    sandbox.shutdown().await;
}
