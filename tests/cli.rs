//! The command line as a user meets it: exit codes, messages, JSON shapes, and bad input that
//! leaves the ledger untouched.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use paywatch::ledger::Ledger;
use serde_json::Value;

use crate::common;
use crate::common::process::{paywatch, run, run_with_stdin, stderr, stdout};

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
    let first = run_with_stdin(&config, &["track", "-"], RESPONSE);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).contains("now watched"), "{}", stdout(&first));
    let second = run_with_stdin(&config, &["track", "-"], RESPONSE);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stdout(&second).contains("already tracked"));

    let status = run(&config, &["status", "1653241101733169556", "--json"]);
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

    let list = run(&config, &["list", "--json"]);
    let json: Value = serde_json::from_slice(&list.stdout).expect("list --json is JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    let unverified = run(&config, &["list", "--status", "UNVERIFIED"]);
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
    (
        "reserved document id",
        r#"{"id":"3","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"__name__"}"#,
        "firebaseDocument '__name__' is invalid: ids of the form __...__ are reserved",
    ),
    (
        "document id with a slash",
        r#"{"id":"4","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"a/b"}"#,
        "firebaseDocument 'a/b' is invalid",
    ),
    (
        "empty collection",
        r#"{"id":"5","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"","firebaseDocument":"d"}"#,
        "firebaseCollection '' is invalid",
    ),
    ("not an object", r#"[1,2,3]"#, "JSON object"),
];

#[tokio::test]
async fn bad_responses_exit_2_with_a_clear_message_and_leave_the_ledger_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path());
    assert!(
        run_with_stdin(&config, &["track", "-"], RESPONSE)
            .status
            .success()
    );
    let ledger_path = dir.path().join("paywatch.db");
    let before = Ledger::open(&ledger_path)
        .await
        .expect("ledger")
        .list(&Default::default())
        .await
        .expect("list");
    for (what, input, expected) in BAD_RESPONSES {
        let output = run_with_stdin(&config, &["track", "-"], input);
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
        .await
        .expect("ledger")
        .list(&Default::default())
        .await
        .expect("list");
    assert_eq!(before, after, "nothing recorded was changed");

    // Without an id: where the ledger is and its counts (an SQLite ledger has no lease).
    let summary = run(&config, &["status"]);
    assert!(summary.status.success(), "{}", stderr(&summary));
    assert!(
        stdout(&summary).contains("(sqlite)"),
        "{}",
        stdout(&summary)
    );
    assert!(
        stdout(&summary).contains("1 watched"),
        "{}",
        stdout(&summary)
    );
    assert!(
        stdout(&summary).contains("has no lease"),
        "{}",
        stdout(&summary)
    );

    let missing_file = run(&config, &["track", "/nonexistent/response.json"]);
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
        let output = run(&config, args);
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
    let output = run(&config, &["list"]);
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
        run_with_stdin(&good, &["track", "-"], RESPONSE)
            .status
            .success()
    );
    // An id that names nothing paywatch holds is an input error, for every command.
    for args in [
        &["status", "42"][..],
        &["events", "42"][..],
        &["hooks", "retry", "evt_nothing"][..],
    ] {
        let unknown = run(&good, args);
        assert_eq!(
            unknown.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&unknown)
        );
    }
    let unknown = run(&good, &["status", "42"]);
    assert!(
        stderr(&unknown).contains("not tracked"),
        "{}",
        stderr(&unknown)
    );
    // check-config --online against an unreachable paymennt names that, not Search Checkouts.
    let online = run(&good, &["check-config", "--online"]);
    assert!(!online.status.success());
    assert!(
        !stdout(&online).contains("Search Checkouts is what"),
        "{}",
        stdout(&online)
    );
    // paymennt unreachable: a runtime failure, and the secret is not in the message.
    let fetch = run(&good, &["track", "--checkout-id", "42"]);
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
    let check = run(&config, &["check-config"]);
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
        let output = run(&config, args);
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
        run(
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
    let ledger = Ledger::open(&dir.path().join("paywatch.db"))
        .await
        .expect("ledger");
    let record = ledger
        .checkout(&id.parse().expect("id"))
        .await
        .expect("read")
        .expect("tracked");
    assert_eq!(record.tracked_via, "link-create");
    assert_eq!(record.status.as_ref().map(|s| s.as_str()), Some("PENDING"));
    drop(ledger);

    sandbox
        .state()
        .pay(&id.parse().expect("id"))
        .await
        .expect("pay");
    let config_for_blocking = config.clone();
    let id_for_blocking = id.clone();
    let (track, events, check) = tokio::task::spawn_blocking(move || {
        let track = run(
            &config_for_blocking,
            &["track", "--checkout-id", &id_for_blocking],
        );
        let events = run(
            &config_for_blocking,
            &["events", &id_for_blocking, "--json"],
        );
        let events_text = run(&config_for_blocking, &["events", &id_for_blocking]);
        let check = run(&config_for_blocking, &["check-config", "--online"]);
        (track, (events, events_text), check)
    })
    .await
    .expect("join");
    let (events, events_text) = events;
    // "No previous status" has one spelling: the payment log line's.
    assert!(
        stdout(&events_text).contains(" untracked -> PENDING "),
        "{}",
        stdout(&events_text)
    );
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

/// The links the sandbox holds for `order_id` (its Search Checkouts by order id).
fn links_for(sandbox: &paywatch::sandbox::Sandbox, order_id: &str) -> usize {
    sandbox
        .state()
        .search(&paywatch::sandbox::state::SearchFilter {
            order_id: Some(order_id.to_owned()),
            kind: Some("LINK".into()),
            ..Default::default()
        })
        .len()
}

/// A config for `sandbox` whose paymennt calls time out after `request_timeout`.
fn config_with_timeout(
    dir: &Path,
    sandbox: &paywatch::sandbox::Sandbox,
    request_timeout: &str,
) -> PathBuf {
    let text = common::sandbox_config_text(dir, sandbox, "multiplexed", "").replace(
        "max_retries = 5\n",
        &format!("max_retries = 5\nrequest_timeout = \"{request_timeout}\"\n"),
    );
    assert!(
        text.contains("request_timeout"),
        "the config has the timeout"
    );
    let path = dir.join("paywatch.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

fn link_create_args<'a>(order_id: &'a str, request_id: &'a str) -> Vec<&'a str> {
    vec![
        "link",
        "create",
        "--order",
        order_id,
        "--amount",
        "25.00",
        "--currency",
        "AED",
        "--request-id",
        request_id,
    ]
}

/// Issue 20 §3 ("One `link create` made five links"): paymennt makes the link but answers
/// after the client's timeout. The create is not sent again; the link is found by its
/// requestId, printed, tracked, and reported as recovered: one link for the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_create_leaves_one_link_which_is_recovered() {
    let sandbox = paywatch::sandbox::Sandbox::start(paywatch::sandbox::SandboxOptions {
        faults: paywatch::sandbox::FaultSettings {
            create_answer_delay_ms: 700,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("sandbox starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_timeout(dir.path(), &sandbox, "300ms");
    let output = tokio::task::spawn_blocking(move || {
        run(&config, &link_create_args("ORD-SLOW", "ORD-SLOW-r1"))
    })
    .await
    .expect("join");
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("recovered"), "says it was recovered: {text}");
    assert_eq!(
        links_for(&sandbox, "ORD-SLOW"),
        1,
        "exactly one link: {text}"
    );
    let link = &sandbox.state().search(&Default::default())[0];
    let url = link
        .redirect_url
        .clone()
        .expect("the link has a payment page");
    assert_eq!(stdout(&output).trim(), url, "the link is printed");
    assert!(
        stderr(&output).contains(&format!(
            "checkout {} (order ORD-SLOW) created and tracked",
            link.id.as_ref().expect("id").0
        )),
        "the checkout id the next command needs: {}",
        stderr(&output)
    );
    let id = link.id.clone().expect("id").0;
    let ledger = Ledger::open(&dir.path().join("paywatch.db"))
        .await
        .expect("ledger");
    let record = ledger
        .checkout(&id.parse().expect("id"))
        .await
        .expect("read")
        .expect("tracked as link create would");
    assert_eq!(record.tracked_via, "link-create");
    assert_eq!(record.status.as_ref().map(|s| s.as_str()), Some("PENDING"));
    sandbox.shutdown().await;
}

/// A create whose answer is lost and whose link cannot be found: the outcome is unknown (exit
/// 3), the message names the order and the requestId to check, and no second link is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_that_cannot_be_found_is_an_unknown_outcome_never_a_second_link() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_timeout(dir.path(), &sandbox, "300ms");
    let run_blocking = |args: Vec<&'static str>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || run(&config, &args))
    };

    // paymennt fails the create with a 500 without making a link: nothing to find.
    sandbox.faults().fail_next_api_requests(1);
    let output = run_blocking(link_create_args("ORD-LOST", "ORD-LOST-r1"))
        .await
        .expect("join");
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("outcome"), "{text}");
    assert!(text.contains("unknown"), "{text}");
    assert!(text.contains("'ORD-LOST'"), "names the order: {text}");
    assert!(
        text.contains("'ORD-LOST-r1'"),
        "names the requestId: {text}"
    );
    assert!(stdout(&output).is_empty(), "no link printed");
    assert_eq!(links_for(&sandbox, "ORD-LOST"), 0, "not sent again: {text}");

    // paymennt makes the link and answers late, and searching is refused: the link exists
    // but cannot be found. Still one link, and exit 3. (Set at run time, as an operator would.)
    let admin = sandbox.admin_url();
    let http = reqwest::Client::new();
    let answer = http
        .post(format!("{admin}faults"))
        .json(&serde_json::json!({"create_answer_delay_ms": 700, "refuse_search": true}))
        .send()
        .await
        .expect("faults set");
    assert!(answer.status().is_success());
    let output = run_blocking(link_create_args("ORD-HIDDEN", "ORD-HIDDEN-r1"))
        .await
        .expect("join");
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("'ORD-HIDDEN-r1'"), "{text}");
    assert!(
        text.contains("may not search"),
        "says why looking failed: {text}"
    );
    assert_eq!(
        links_for(&sandbox, "ORD-HIDDEN"),
        1,
        "one link, never two: {text}"
    );
    sandbox.shutdown().await;
}

/// No connection could be made: the create never left, so it is sent again, and succeeds once
/// paymennt is there; one link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_could_not_connect_is_sent_again() {
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("paywatch.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = \"{}\"\n[paymennt]\nbase_url = \"http://{addr}/mer/v2.0/\"\napi_key = \"{}\"\napi_secret = \"{}\"\nmax_retries = 8\n",
            dir.path().join("paywatch.db").display(),
            paywatch::sandbox::DEFAULT_API_KEY,
            paywatch::sandbox::DEFAULT_API_SECRET,
        ),
    )
    .expect("config written");
    let mut process = paywatch()
        .config(&config)
        .args(link_create_args("ORD-CONN", "ORD-CONN-r1"))
        .env("RUST_LOG", "paywatch=debug")
        .start();
    // Wait for the first refused attempt, then bring paymennt up on that address.
    process.expect_line("sending again").await;
    let sandbox = paywatch::sandbox::Sandbox::start(paywatch::sandbox::SandboxOptions {
        api_listen: addr,
        ..Default::default()
    })
    .await
    .expect("sandbox starts on the address");
    let status = process
        .wait_exit_within(3 * common::DEADLINE)
        .await
        .expect("paywatch finishes");
    let text = process.log();
    assert_eq!(status.code(), Some(0), "{text}");
    assert_eq!(links_for(&sandbox, "ORD-CONN"), 1, "{text}");
    sandbox.shutdown().await;
}

/// `webhooks register` is sent once too: paymennt registers the address but answers after the
/// timeout; the new webhook is found in the list (not the one registered before for the same
/// address) and printed as recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_register_leaves_one_new_webhook_which_is_recovered() {
    let sandbox = common::sandbox().await;
    let address = "http://127.0.0.1:8788/webhooks/paymennt";
    let old = sandbox.state().add_webhook(address);
    sandbox
        .faults()
        .set_create_answer_delay(std::time::Duration::from_millis(700));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_timeout(dir.path(), &sandbox, "300ms");
    let output = tokio::task::spawn_blocking(move || {
        run(&config, &["webhooks", "register", address, "--json"])
    })
    .await
    .expect("join");
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("recovered"), "{text}");
    let registered: Vec<_> = sandbox
        .state()
        .webhooks()
        .into_iter()
        .filter(|w| w.address == address)
        .collect();
    assert_eq!(
        registered.len(),
        2,
        "the old one and exactly one new: {text}"
    );
    let printed: Value = serde_json::from_slice(&output.stdout).expect("--json");
    assert_ne!(printed["id"], old.id.as_str(), "not the old webhook");
    assert_eq!(printed["id"], registered[1].id.as_str());
    sandbox.shutdown().await;
}

/// `check-config --online` proves Firestore access by opening a Listen on a tracked checkout's
/// document: CURRENT in so many ms, or the exact refusal with a next step for the auth mode and
/// a non-zero exit. Nothing is written to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_proves_firestore_access_or_names_the_refusal() {
    let (sandbox, _dir, settings, config, ledger) = common::setup("multiplexed", "").await;
    let first = common::create_and_track(&sandbox, &ledger, "ORD-C1").await;
    let second = common::create_and_track(&sandbox, &ledger, "ORD-C2").await;
    let document_of = async |id| {
        ledger
            .checkout(id)
            .await
            .expect("read")
            .expect("tracked")
            .firebase
            .document
    };
    let (first_document, second_document) = (document_of(&first).await, document_of(&second).await);
    drop(ledger);
    let ledger_bytes = || std::fs::read(&settings.ledger.path).expect("ledger file");
    let before = ledger_bytes();
    let run_blocking = |args: Vec<String>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&config, &args)
        })
    };

    // Access: one Listen for the project, CURRENT in some milliseconds.
    let output = run_blocking(vec!["check-config".into(), "--online".into()])
        .await
        .expect("join");
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stdout(&output);
    let line = text
        .lines()
        .find(|line| line.contains("firestore access"))
        .unwrap_or_else(|| panic!("an access line in {text}"));
    assert!(
        line.starts_with("ok   firestore access with auth=none: Listen on checkout")
            && line.contains("was CURRENT in")
            && line.contains(" ms (document exists)"),
        "{line}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("firestore access"))
            .count(),
        1,
        "one project, one check: {text}"
    );

    // Refused: the exact code and message, the next step for auth=none, a non-zero exit.
    sandbox.faults().refuse_listen_document(&first_document);
    let output = run_blocking(vec![
        "check-config".into(),
        "--online".into(),
        "--checkout-id".into(),
        first.to_string(),
    ])
    .await
    .expect("join");
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let text = stdout(&output);
    let line = text
        .lines()
        .find(|line| line.contains("firestore access"))
        .unwrap_or_else(|| panic!("an access line in {text}"));
    assert!(
        line.starts_with(&format!(
            "FAIL firestore access refused for checkout {first}'s document"
        )) && line.contains(&first_document)
            && line.contains("PERMISSION_DENIED: Missing or insufficient permissions.")
            && line.contains("PERMISSION_DENIED with auth=none:")
            && line.contains("firebase-anonymous"),
        "{line}"
    );

    // --checkout-id picks the document: the other one is readable.
    assert_ne!(first_document, second_document);
    let output = run_blocking(vec![
        "check-config".into(),
        "--online".into(),
        "--checkout-id".into(),
        second.to_string(),
    ])
    .await
    .expect("join");
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains(&format!("Listen on checkout {second}'s document")));

    // An untracked id is a usage error.
    let output = run_blocking(vec![
        "check-config".into(),
        "--online".into(),
        "--checkout-id".into(),
        "999".into(),
    ])
    .await
    .expect("join");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("not tracked"),
        "{}",
        stderr(&output)
    );

    assert!(before == ledger_bytes(), "check-config wrote to the ledger");
    sandbox.shutdown().await;
}

/// A paymennt stand-in on loopback that answers every request with `body` (HTTP 200).
async fn canned_paymennt(body: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("address");
    let app = axum::Router::new().fallback(move || async move {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}/mer/v2.0/"), server)
}

/// paymennt answering with a Firestore document that cannot exist: `track --checkout-id` and
/// `link create` exit 2 naming the field and the value, and record nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_document_in_paymennts_answer_is_a_usage_error() {
    const ANSWER: &str = r#"{"success":true,"elapsed":1,"result":{"id":"7001","orderId":"ORD-7","requestId":"ORD-7-r1","currency":"AED","amount":10,"status":"PENDING","firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"__reserved__"}}"#;
    let (base_url, server) = canned_paymennt(ANSWER).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("paywatch.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = \"{}\"\n[paymennt]\nbase_url = \"{base_url}\"\napi_key = \"k\"\napi_secret = \"s\"\nmax_retries = 0\n",
            dir.path().join("paywatch.db").display()
        ),
    )
    .expect("config written");
    for args in [
        vec!["track", "--checkout-id", "7001"],
        vec![
            "link",
            "create",
            "--order",
            "ORD-7",
            "--amount",
            "10",
            "--currency",
            "AED",
        ],
    ] {
        let config = config.clone();
        let args_shown = args.join(" ");
        let output = tokio::task::spawn_blocking(move || run(&config, &args))
            .await
            .expect("join");
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args_shown}: {text}");
        assert!(
            text.contains(
                "firebaseDocument '__reserved__' is invalid: ids of the form __...__ are reserved"
            ),
            "{args_shown}: {text}"
        );
    }
    let ledger = Ledger::open(&dir.path().join("paywatch.db"))
        .await
        .expect("ledger");
    assert!(
        ledger
            .list(&Default::default())
            .await
            .expect("list")
            .is_empty(),
        "nothing recorded"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_register_list_test_disable_keep_the_hmac_key_out_of_output_unless_asked() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, config) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    let run_blocking = |args: Vec<String>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&config, &args)
        })
    };
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let refused = run_blocking(args(&["webhooks", "register", "http://shop.example/hook"]))
        .await
        .expect("ran");
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("https"), "{}", stderr(&refused));

    let registered = run_blocking(args(&[
        "webhooks",
        "register",
        "http://127.0.0.1:9/webhooks/paymennt",
        "--json",
    ]))
    .await
    .expect("ran");
    assert!(registered.status.success(), "{}", stderr(&registered));
    let hook = sandbox
        .state()
        .webhooks()
        .pop()
        .expect("registered in paymennt");
    let json: Value = serde_json::from_slice(&registered.stdout).expect("JSON");
    assert_eq!(json["id"], hook.id);
    assert_eq!(json["enabled"], true);
    assert!(json.get("hmacKey").is_none(), "{json}");
    assert!(!stdout(&registered).contains(&hook.hmac_key));
    assert!(!stderr(&registered).contains(&hook.hmac_key));
    let listed = run_blocking(args(&["webhooks", "list"]))
        .await
        .expect("ran");
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains(&hook.id), "{}", stdout(&listed));
    assert!(!stdout(&listed).contains(&hook.hmac_key));
    let shown = run_blocking(args(&["webhooks", "list", "--show-hmac-key"]))
        .await
        .expect("ran");
    assert!(
        stdout(&shown).contains(&hook.hmac_key),
        "{}",
        stdout(&shown)
    );

    let tested = run_blocking(args(&["webhooks", "test", &hook.id]))
        .await
        .expect("ran");
    assert!(tested.status.success(), "{}", stderr(&tested));
    common::wait_for("the test call", common::DEADLINE, || async {
        (!sandbox.state().webhook_attempts().is_empty()).then_some(())
    })
    .await;
    let disabled = run_blocking(args(&["webhooks", "disable", &hook.id, "--json"]))
        .await
        .expect("ran");
    assert!(disabled.status.success(), "{}", stderr(&disabled));
    let json: Value = serde_json::from_slice(&disabled.stdout).expect("JSON");
    assert_eq!(json["enabled"], false);
    let unknown = run_blocking(args(&["webhooks", "disable", "424242"]))
        .await
        .expect("ran");
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("Webhook not found"),
        "{}",
        stderr(&unknown)
    );
    let bad = run_blocking(args(&["webhooks", "test", "../checkout"]))
        .await
        .expect("ran");
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    sandbox.shutdown().await;
}

/// The two `api_key`s of the config file (paymennt's and the Firebase Web API key) cannot be
/// confused silently: check-config names the Firebase one by its last four characters and
/// fails when it is paymennt's.
#[test]
fn check_config_names_the_firebase_key_and_refuses_paymennts_in_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |firebase_key: &str| {
        let path = dir.path().join("paywatch.toml");
        let text = format!(
            "[ledger]\npath = \"{}\"\n[paymennt]\nbase_url = \"http://127.0.0.1:9/mer/v2.0/\"\n\
             api_key = \"paymennt-key-0123456789\"\napi_secret = \"s\"\n\
             [firestore]\nendpoint = \"http://127.0.0.1:9\"\nauth = \"none\"\napi_key = \"{firebase_key}\"\n",
            dir.path().join("paywatch.db").display()
        );
        std::fs::write(&path, text).expect("config written");
        path
    };
    let good = run(&config("AIzaSyFirebase-key-WXYZ"), &["check-config"]);
    assert!(
        stdout(&good).contains("Firebase Web API key …WXYZ loaded"),
        "{}",
        stdout(&good)
    );
    let mixed = run(&config("paymennt-key-0123456789"), &["check-config"]);
    assert!(!mixed.status.success(), "{}", stdout(&mixed));
    assert!(
        stdout(&mixed).contains("is paymennt's API key"),
        "{}",
        stdout(&mixed)
    );
}

/// A paymennt on loopback that accepts connections and never answers (issue 22, "Silence
/// while waiting"). Returns its base URL; the connections are held until the task is aborted.
async fn silent_paymennt() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("http://{address}/mer/v2.0/"), server)
}

/// A config whose paymennt is `base_url`, each call timing out after 500 ms, retried
/// `max_retries` times.
fn silent_config(dir: &Path, base_url: &str, max_retries: u32) -> PathBuf {
    let path = dir.join("paywatch.toml");
    let text = format!(
        "[ledger]\npath = \"{}\"\n[paymennt]\nbase_url = \"{base_url}\"\napi_key = \"k\"\napi_secret = \"s\"\nmax_retries = {max_retries}\nrequest_timeout = \"500ms\"\n",
        dir.join("paywatch.db").display()
    );
    std::fs::write(&path, text).expect("config written");
    path
}

/// What a command against a silent paymennt wrote on stderr (a pipe), when its first retry
/// line came, and how it ended.
struct Waited {
    code: Option<i32>,
    stderr: String,
    first_retry: Option<std::time::Duration>,
    took: std::time::Duration,
}

/// Runs paywatch with stderr read line by line as it comes; gives up (killing it) after
/// `limit`.
fn run_reading_stderr(config: &Path, args: &[&str], limit: std::time::Duration) -> Waited {
    use std::io::BufRead as _;
    let started = std::time::Instant::now();
    let mut child = paywatch()
        .config(config)
        .args(args)
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("paywatch starts");
    let pipe = child.stderr.take().expect("stderr piped");
    let (lines, received) = std::sync::mpsc::channel::<(String, std::time::Duration)>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe)
            .split(b'\n')
            .map_while(Result::ok)
        {
            let line = String::from_utf8_lossy(&line).into_owned();
            if lines.send((line, started.elapsed())).is_err() {
                break;
            }
        }
    });
    let mut stderr = String::new();
    let mut first_retry = None;
    let code = loop {
        match received.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok((line, at)) => {
                if first_retry.is_none() && line.contains("; retrying (") {
                    first_retry = Some(at);
                }
                stderr.push_str(&line);
                stderr.push('\n');
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
    };
    let took = started.elapsed();
    let _ = reader.join();
    while let Ok((line, _)) = received.try_recv() {
        stderr.push_str(&line);
        stderr.push('\n');
    }
    Waited {
        code,
        stderr,
        first_retry,
        took,
    }
}

/// Plain text only: no escape sequence, carriage return or spinner glyph (indicatif's
/// spinners are braille patterns) in a stderr that is a pipe.
fn assert_plain(text: &str) {
    assert!(
        !text.contains('\u{1b}') && !text.contains('\r'),
        "escapes in piped stderr: {text:?}"
    );
    assert!(
        !text.chars().any(|c| ('\u{2800}'..='\u{28ff}').contains(&c)),
        "a spinner in piped stderr: {text:?}"
    );
}

/// Issue 22: `link create` against a paymennt that never answers says on stderr that it
/// retries (within seconds, not after 78 s of silence), and `--timeout` ends it; the create
/// may have been sent, so the outcome is unknown (exit 3) naming the order, the requestId,
/// the deadline and paymennt's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_create_against_a_silent_paymennt_says_it_retries_and_stops_at_the_timeout() {
    let (base_url, server) = silent_paymennt().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = silent_config(dir.path(), &base_url, 2);
    let mut args = vec!["--timeout", "4s"];
    args.extend(link_create_args("ORD-SILENT", "ORD-SILENT-r1"));
    let waited = tokio::task::spawn_blocking(move || {
        run_reading_stderr(&config, &args, std::time::Duration::from_secs(30))
    })
    .await
    .expect("join");
    server.abort();
    let text = &waited.stderr;
    let first_retry = waited.first_retry.expect("a retry line");
    assert!(
        first_retry < std::time::Duration::from_secs(4),
        "the first retry line came after {first_retry:?}: {text}"
    );
    assert!(
        text.contains("paymennt did not answer within 500ms; retrying (2/3) in "),
        "{text}"
    );
    assert_eq!(waited.code, Some(3), "{text}");
    assert!(text.contains("--timeout 4s"), "names the deadline: {text}");
    assert!(text.contains(&base_url), "names paymennt's address: {text}");
    assert!(
        text.contains("'ORD-SILENT-r1'"),
        "names the requestId: {text}"
    );
    assert!(
        waited.took < std::time::Duration::from_secs(8),
        "the deadline held: {:?}",
        waited.took
    );
    assert_plain(text);
}

/// Issue 22: `check-config --online` against a silent paymennt says it retries, and
/// `--timeout` ends it with exit 1 naming paymennt's address and what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_against_a_silent_paymennt_says_it_retries_and_stops_at_the_timeout() {
    let (base_url, server) = silent_paymennt().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Six attempts of 500 ms each cannot end before the 2 s deadline: the deadline, not the
    // last attempt, ends the command however the machine is loaded.
    let config = silent_config(dir.path(), &base_url, 5);
    let waited = tokio::task::spawn_blocking(move || {
        run_reading_stderr(
            &config,
            &["check-config", "--online", "--timeout", "2s"],
            std::time::Duration::from_secs(30),
        )
    })
    .await
    .expect("join");
    server.abort();
    let text = &waited.stderr;
    let first_retry = waited.first_retry.expect("a retry line");
    assert!(
        first_retry < std::time::Duration::from_secs(2),
        "the first retry line came after {first_retry:?}: {text}"
    );
    assert_eq!(waited.code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "paymennt at {base_url} did not answer within --timeout 2s"
        )),
        "{text}"
    );
    assert!(text.contains("check that paymennt is reachable"), "{text}");
    assert!(
        waited.took < std::time::Duration::from_secs(6),
        "the deadline held: {:?}",
        waited.took
    );
    assert_plain(text);
}

#[test]
fn timeout_is_bounded_and_stated_in_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = offline_config(dir.path());
    let help = run(&config, &["link", "create", "--help"]);
    assert!(
        stdout(&help).contains("--timeout <DURATION>"),
        "{}",
        stdout(&help)
    );
    assert!(
        stdout(&help).contains("[default: 60s]"),
        "{}",
        stdout(&help)
    );
    let out_of_bounds = run(&config, &["--timeout", "2h", "check-config"]);
    assert_eq!(out_of_bounds.status.code(), Some(2));
    assert!(
        stderr(&out_of_bounds).contains("from 1s to 1h"),
        "{}",
        stderr(&out_of_bounds)
    );
}

/// Issue 25: a `[ledger] url` nothing answers at is named (`host:port/database`, what to
/// check) with exit 1, never with the URL's password; both keys set is exit 2 naming both.
#[test]
fn a_postgresql_ledger_url_is_named_without_its_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("paywatch.toml");
    let url = "postgresql://paywatch:hunter2-in-url@127.0.0.1:9/paywatch";
    std::fs::write(&config, format!("[ledger]\nurl = \"{url}\"\n")).expect("write");
    // A command cannot run (exit 1); check-config reports it as a failed check (exit 2).
    for (args, code) in [(&["status", "abc"][..], 1), (&["check-config"][..], 2)] {
        let output = run(&config, args);
        let text = format!("{}{}", stdout(&output), stderr(&output));
        assert_eq!(output.status.code(), Some(code), "{args:?}: {text}");
        assert!(text.contains("127.0.0.1:9/paywatch"), "{args:?}: {text}");
        assert!(
            text.contains("check that PostgreSQL runs there"),
            "{args:?}: {text}"
        );
        assert!(!text.contains("hunter2-in-url"), "{args:?}: {text}");
    }
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = \"{}\"\nurl = \"{url}\"\n",
            dir.path().join("x.db").display()
        ),
    )
    .expect("write");
    let output = run(&config, &["status", "abc"]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("'ledger.path'") && text.contains("'ledger.url'"),
        "{text}"
    );
    assert!(!text.contains("hunter2-in-url"), "{text}");
}
