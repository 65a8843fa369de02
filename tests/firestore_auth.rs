//! `[firestore] auth`: the daemon pays a checkout through the sandbox in each auth mode, the
//! sandbox checking callers as production does (`iam`, `rules`), over TLS with `ca_file`; and
//! what a wrong key, a missing key file and a failing token refresh do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use paywatch::ledger::Ledger;
use paywatch::sandbox::{
    FirestoreAuthCheck, Sandbox, SandboxOptions, ServerTls, TestCertificates, TestServiceAccount,
};
use paywatch::settings::{FirestoreAuthMode, Settings, SettingsError};
use paywatch::sources::firestore::{ListenEvent, Listener, WatchTarget};
use tokio_util::sync::CancellationToken;

use crate::common::process::{self, Process, paywatch};
use crate::common::{self, DEADLINE, Daemon, create_and_track, wait_for, wait_status};

async fn sandbox_with(options: SandboxOptions) -> Sandbox {
    Sandbox::start(SandboxOptions {
        heartbeat_interval: Duration::from_secs(2),
        expiry_minute: Duration::from_millis(10),
        ..options
    })
    .await
    .expect("sandbox starts")
}

/// Writes a config for `sandbox` with `firestore` lines added to `[firestore]` and `paymennt`
/// lines to `[paymennt]`, and loads it without the process environment.
fn auth_settings(
    dir: &Path,
    sandbox: &Sandbox,
    firestore: &str,
    paymennt: &str,
) -> (Settings, PathBuf) {
    let text = common::sandbox_config_text(dir, sandbox, "multiplexed", "")
        .replacen("[firestore]\n", &format!("[firestore]\n{firestore}"), 1)
        .replacen("[paymennt]\n", &format!("[paymennt]\n{paymennt}"), 1);
    common::load_config(dir, &text)
}

/// Tracks a checkout, starts the daemon, pays, and waits for PAID (the reconciler runs hourly
/// in these configs, so PAID comes through the Listen stream).
async fn pays_through_listen(sandbox: &Sandbox, dir: &Path, settings: &Settings, config: &Path) {
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(sandbox, &ledger, "auth-1").await;
    let daemon = Daemon::start(settings, config).await;
    wait_for("a Listen call", DEADLINE, || async {
        (!sandbox.listen_headers_seen().is_empty()).then_some(())
    })
    .await;
    sandbox.state().pay(&id).await.expect("paid");
    wait_status(&ledger, &id, "PAID").await;
    daemon.stop().await;
    let _ = dir;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_mode_pays_through_an_iam_sandbox_with_verified_jwts() {
    let account = TestServiceAccount::generate("paywatch-sandbox").expect("test key");
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Iam(account.iam.clone()),
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(dir.path(), "key.json", &account.key_json);
    let (settings, config) = auth_settings(
        dir.path(),
        &sandbox,
        &format!(
            "auth = \"service-account\"\ncredentials = \"{}\"\n",
            key.display()
        ),
        "",
    );
    assert_eq!(
        settings.firestore.auth_mode(),
        FirestoreAuthMode::ServiceAccount
    );
    pays_through_listen(&sandbox, dir.path(), &settings, &config).await;
    let seen = sandbox.listen_headers_seen();
    assert!(
        seen.iter().all(|h| h
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer ey"))
            && h.resource_prefix.as_deref()
                == Some("projects/paywatch-sandbox/databases/(default)")),
        "{seen:?}"
    );
    assert_eq!(sandbox.auth_counts().refused_calls, 0);
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_service_account_key_is_refused_and_reported_as_rejected_credentials() {
    let trusted = TestServiceAccount::generate("paywatch-sandbox").expect("test key");
    let wrong = TestServiceAccount::generate("paywatch-sandbox").expect("test key");
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Iam(trusted.iam),
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(dir.path(), "wrong.json", &wrong.key_json);
    let (settings, _) = auth_settings(
        dir.path(),
        &sandbox,
        &format!(
            "auth = \"service-account\"\ncredentials = \"{}\"\n",
            key.display()
        ),
        "",
    );
    let options = paywatch::daemon::listener_options(&settings).expect("options");
    let (sender, mut events) = tokio::sync::mpsc::channel(64);
    let cancel = CancellationToken::new();
    let listener = Listener::start(options, sender, cancel.clone()).expect("listener starts");
    let location =
        paywatch::domain::FirestoreLocation::new("paywatch-sandbox", "checkouts", "doc1")
            .expect("location");
    listener.watch(WatchTarget {
        checkout_id: "1".parse().expect("id"),
        location,
        resume_token: None,
        resume_read_time: None,
    });
    let message = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await {
                Some(ListenEvent::PermanentFailure { message, .. }) => return message,
                Some(_) => continue,
                None => panic!("listener stopped"),
            }
        }
    })
    .await
    .expect("the refusal is reported");
    assert!(message.contains("rejected the credentials"), "{message}");
    assert!(sandbox.auth_counts().refused_calls >= 1);
    cancel.cancel();
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unreadable_credentials_stop_startup_with_a_config_error() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-key.json");
    let (settings, _) = auth_settings(
        dir.path(),
        &sandbox,
        &format!("credentials = \"{}\"\n", missing.display()),
        "",
    );
    // A configured key file makes service-account the default mode.
    assert_eq!(
        settings.firestore.auth_mode(),
        FirestoreAuthMode::ServiceAccount
    );
    let error = paywatch::daemon::listener_options(&settings).expect_err("missing key file");
    let text = format!("{error:#}");
    assert!(
        text.contains("firestore auth 'service-account'") && text.contains("no-such-key.json"),
        "{text}"
    );
    assert!(
        error.chain().any(|cause| cause.is::<SettingsError>()),
        "exit code 2"
    );

    // firebase-anonymous without its API key.
    let (settings, _) = auth_settings(dir.path(), &sandbox, "auth = \"firebase-anonymous\"\n", "");
    let error = paywatch::daemon::listener_options(&settings).expect_err("no api key");
    let text = format!("{error:#}");
    assert!(
        text.contains("'firebase-anonymous'") && text.contains("firestore.api_key"),
        "{text}"
    );
    assert!(error.chain().any(|cause| cause.is::<SettingsError>()));

    // A key file that is not a key: named, exit code 2, contents never shown.
    let garbage = write(
        dir.path(),
        "garbage.json",
        "{\"private_key\": \"secret-material\"",
    );
    let (settings, _) = auth_settings(
        dir.path(),
        &sandbox,
        &format!(
            "auth = \"service-account\"\ncredentials = \"{}\"\n",
            garbage.display()
        ),
        "",
    );
    let options = paywatch::daemon::listener_options(&settings).expect("file exists");
    let (sender, _events) = tokio::sync::mpsc::channel(8);
    let Err(error) = Listener::start(options, sender, CancellationToken::new()) else {
        panic!("an unusable key stops startup");
    };
    let text = format!("{error:#}");
    assert!(
        text.contains("garbage.json") && !text.contains("secret-material"),
        "{text}"
    );
    assert!(error.chain().any(|cause| cause.is::<SettingsError>()));
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_mode_over_tls_pays_through_a_rules_sandbox_without_an_authorization_header() {
    let certificates = TestCertificates::generate().expect("test CA");
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Rules {
            require_sign_in: false,
        },
        firestore_tls: Some(ServerTls::from(&certificates)),
        api_tls: Some(ServerTls::from(&certificates)),
        ..SandboxOptions::default()
    })
    .await;
    assert!(
        sandbox
            .firestore_endpoint()
            .starts_with("https://localhost:")
    );
    assert!(sandbox.api_base_url().starts_with("https://localhost:"));
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = write(dir.path(), "ca.pem", &certificates.ca_pem);
    let (settings, config) = auth_settings(
        dir.path(),
        &sandbox,
        &format!(
            "auth = \"none\"\napi_key = \"{}\"\nca_file = \"{}\"\n",
            sandbox.firebase_auth().web_api_key(),
            ca.display()
        ),
        &format!("ca_file = \"{}\"\n", ca.display()),
    );
    pays_through_listen(&sandbox, dir.path(), &settings, &config).await;
    // Issue 21: no `x-goog-api-key` to Firestore (the Firebase SDKs send none) although
    // `api_key` is set: only `send_api_key_to_firestore = true` sends it.
    let seen = sandbox.listen_headers_seen();
    assert!(
        seen.iter().all(|h| h.authorization.is_none()
            && h.api_key.is_none()
            && h.resource_prefix.as_deref()
                == Some("projects/paywatch-sandbox/databases/(default)")),
        "{seen:?}"
    );
    let counts = sandbox.auth_counts();
    assert_eq!((counts.refused_calls, counts.denied_targets), (0, 0));
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_file_the_test_ca_is_not_trusted() {
    let certificates = TestCertificates::generate().expect("test CA");
    let sandbox = sandbox_with(SandboxOptions {
        api_tls: Some(ServerTls::from(&certificates)),
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut settings, _) = auth_settings(dir.path(), &sandbox, "", "");
    settings.paymennt.max_retries = 0;
    let client = paywatch::paymennt::Client::from_settings(&settings.paymennt).expect("client");
    let id: paywatch::domain::CheckoutId = "1".parse().expect("id");
    let error = client
        .get_checkout(&id, paywatch::domain::VerifyTicket::new(1))
        .await
        .expect_err("an unknown CA is refused");
    let text = format!("{error:#}").to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("tls") || text.contains("connect"),
        "{text}"
    );
    assert_eq!(sandbox.state().get_checkout_calls(&id), 0);
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firebase_anonymous_mode_renews_its_token_and_the_stream_survives() {
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Rules {
            require_sign_in: true,
        },
        firebase_token_lifetime: Duration::from_secs(2),
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (settings, config) = auth_settings(dir.path(), &sandbox, &anonymous_lines(&sandbox), "");
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "anon-1").await;
    let daemon = Daemon::start(&settings, &config).await;
    // Several token lifetimes pass: each token is renewed ahead of its expiry.
    wait_for("three token refreshes", DEADLINE, || async {
        (sandbox.auth_counts().refreshes >= 3).then_some(())
    })
    .await;
    sandbox.state().pay(&id).await.expect("paid");
    wait_status(&ledger, &id, "PAID").await;
    // A reopen on a renewed token is planned, not a reconnect after a failure.
    let text = paywatch::http::metrics_exposition(&daemon.metrics, &ledger)
        .await
        .expect("the ledger is readable");
    let exposition = crate::common::exposition::parse(&text).expect("exposition");
    let reconnects: f64 = exposition
        .named("paywatch_listen_reconnects_total")
        .map(|sample| sample.value)
        .sum();
    assert!(text.contains("paywatch_listen_reconnects"), "{text}");
    assert_eq!(reconnects, 0.0, "{text}");
    daemon.stop().await;
    let counts = sandbox.auth_counts();
    assert_eq!(counts.sign_ups, 1, "{counts:?}");
    // No stream outlived its token, and no call was refused.
    assert_eq!(
        (counts.expired_streams, counts.refused_calls),
        (0, 0),
        "{counts:?}"
    );
    let seen = sandbox.listen_headers_seen();
    assert!(
        seen.iter().all(|h| h
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer sandbox-id-token-"))),
        "{seen:?}"
    );
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_refresh_is_refused_then_recovers_and_the_payment_arrives() {
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Rules {
            require_sign_in: true,
        },
        firebase_token_lifetime: Duration::from_secs(2),
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (settings, config) = auth_settings(dir.path(), &sandbox, &anonymous_lines(&sandbox), "");
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "anon-2").await;
    let daemon = Daemon::start(&settings, &config).await;
    wait_for("the first sign-in", DEADLINE, || async {
        (sandbox.auth_counts().sign_ups >= 1).then_some(())
    })
    .await;
    // Firebase Auth stops issuing tokens: the token expires, Firestore ends the stream
    // UNAUTHENTICATED, and reconnecting fails until Firebase Auth works again.
    sandbox.firebase_auth().refuse_refresh(true);
    sandbox.firebase_auth().refuse_sign_up(true);
    wait_for("the stream to outlive its token", DEADLINE, || async {
        (sandbox.auth_counts().expired_streams >= 1).then_some(())
    })
    .await;
    sandbox.state().pay(&id).await.expect("paid");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        common::status_of(&ledger, &id).as_deref(),
        Some("PAID"),
        "no token, no Listen"
    );
    // What check-config --online says about it.
    let auth = paywatch::sources::firestore::FirestoreAuth::from_settings(&settings.firestore)
        .expect("auth");
    let error = paywatch::sources::firestore::check_credentials(
        &settings.firestore.endpoint(),
        &auth,
        None,
        true,
    )
    .await
    .expect_err("sign-in refused");
    let text = format!("{error:#}");
    assert!(
        text.contains("OPERATION_NOT_ALLOWED")
            && text.contains("auth = \"none\"")
            && !text.contains(sandbox.firebase_auth().web_api_key()),
        "{text}"
    );
    // Firebase Auth recovers: a new token, the stream reopens, the payment arrives.
    sandbox.firebase_auth().refuse_refresh(false);
    sandbox.firebase_auth().refuse_sign_up(false);
    wait_status(&ledger, &id, "PAID").await;
    daemon.stop().await;
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_web_api_key_is_named_without_its_value() {
    let sandbox = common::sandbox().await;
    let auth = paywatch::sources::firestore::FirestoreAuth::FirebaseAnonymous {
        api_key: paywatch::settings::Secret::new("wrong-key-value"),
        identity_endpoint: sandbox.identity_endpoint(),
        token_endpoint: sandbox.token_endpoint(),
        send_api_key: false,
        identity_file: None,
    };
    let error = paywatch::sources::firestore::check_credentials(
        &sandbox.firestore_endpoint(),
        &auth,
        None,
        true,
    )
    .await
    .expect_err("wrong key");
    let text = format!("{error:#}");
    assert!(
        text.contains("API key not valid")
            && text.contains("[firestore] api_key")
            && !text.contains("wrong-key-value"),
        "{text}"
    );
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_default_mode_uses_google_application_credentials() {
    let account = TestServiceAccount::generate("paywatch-sandbox").expect("test key");
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Iam(account.iam.clone()),
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(dir.path(), "adc.json", &account.key_json);
    let (settings, config) =
        auth_settings(dir.path(), &sandbox, "auth = \"application-default\"\n", "");
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "adc-1").await;
    // The variable is process-wide: give it to a child daemon only.
    let child = paywatch()
        .config(&config)
        .env("GOOGLE_APPLICATION_CREDENTIALS", &key)
        .log_discarded()
        .run();
    wait_for("a Listen call", DEADLINE, || async {
        (!sandbox.listen_headers_seen().is_empty()).then_some(())
    })
    .await;
    sandbox.state().pay(&id).await.expect("paid");
    wait_status(&ledger, &id, "PAID").await;
    child.kill_9();
    assert_eq!(sandbox.auth_counts().refused_calls, 0);
    assert!(sandbox.listen_headers_seen().iter().all(|h| {
        h.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer ey"))
    }));
    sandbox.shutdown().await;
}

/// The `[firestore]` lines of `firebase-anonymous` against `sandbox`.
fn anonymous_lines(sandbox: &Sandbox) -> String {
    format!(
        "auth = \"firebase-anonymous\"\napi_key = \"{}\"\nidentity_endpoint = \"{}\"\ntoken_endpoint = \"{}\"\n",
        sandbox.firebase_auth().web_api_key(),
        sandbox.identity_endpoint(),
        sandbox.token_endpoint()
    )
}

/// Starts `paywatch run` (the release path: a process of its own), its log in `log`.
fn start_binary(config: &Path, log: &Path) -> Process {
    paywatch()
        .config(config)
        .env("NO_COLOR", "1")
        .log_to(log)
        .run()
}

/// Issue 21, section 3: the anonymous identity is kept next to the ledger (mode 0600) and
/// reused: ten starts of the daemon sign up one Firebase user. When Firebase Auth refuses the
/// stored identity, one new user is signed up, with a warning, and that one is kept. No log
/// line carries a refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_restarts_sign_up_once_and_a_refused_identity_once_more() {
    use std::os::unix::fs::PermissionsExt as _;
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Rules {
            require_sign_in: true,
        },
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (settings, config) = auth_settings(dir.path(), &sandbox, &anonymous_lines(&sandbox), "");
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    create_and_track(&sandbox, &ledger, "restart-1").await;
    let mut logs = Vec::new();
    // One start: wait for a Listen call carrying an ID token (obtained, and kept, before it).
    let run_once = |run: usize| {
        let log = dir.path().join(format!("daemon-{run}.log"));
        let config = config.clone();
        let sandbox = &sandbox;
        async move {
            let seen_before = sandbox
                .listen_headers_seen()
                .iter()
                .filter(|h| h.authorization.is_some())
                .count();
            let child = start_binary(&config, &log);
            wait_for("a Listen call with an ID token", DEADLINE, || async {
                (sandbox
                    .listen_headers_seen()
                    .iter()
                    .filter(|h| h.authorization.is_some())
                    .count()
                    > seen_before)
                    .then_some(())
            })
            .await;
            child.stop().await;
            std::fs::read_to_string(&log).expect("log")
        }
    };
    for run in 0..10 {
        logs.push(run_once(run).await);
    }
    let counts = sandbox.auth_counts();
    eprintln!(
        "figure: sign-ups over 10 starts of the daemon = {} (refreshes {})",
        counts.sign_ups, counts.refreshes
    );
    assert_eq!(counts.sign_ups, 1, "{counts:?}");
    let identity = settings.ledger.firebase_identity_path();
    let mode = std::fs::metadata(&identity)
        .expect("the identity is kept")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // Firebase Auth no longer knows the user: one new sign-up, logged at warn, then kept.
    sandbox.firebase_auth().revoke_refresh_tokens();
    let refused = run_once(10).await;
    assert_eq!(sandbox.auth_counts().sign_ups, 2);
    let warning = refused
        .lines()
        .find(|line| line.contains("refused the stored anonymous identity"))
        .unwrap_or_else(|| panic!("no warning:\n{refused}"));
    assert!(
        warning.contains("WARN") && warning.contains("INVALID_REFRESH_TOKEN"),
        "{warning}"
    );
    logs.push(refused);
    logs.push(run_once(11).await);
    assert_eq!(
        sandbox.auth_counts().sign_ups,
        2,
        "the new identity is kept"
    );

    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&identity).expect("identity")).expect("JSON");
    let token = kept["refresh_token"].as_str().expect("a refresh token");
    assert!(token.starts_with("sandbox-refresh-"), "{kept}");
    for log in &logs {
        assert!(
            !log.contains("sandbox-refresh-"),
            "a refresh token in a log:\n{log}"
        );
        assert!(
            !log.contains(sandbox.firebase_auth().web_api_key()),
            "{log}"
        );
    }
    sandbox.shutdown().await;
}

/// Issue 21, section 6: with sign-in required and `auth = "none"`, Firestore (and now the
/// sandbox) lets the Listen call in and removes each target with PERMISSION_DENIED. The daemon
/// notes each refusal, warns, and `/readyz` says how many documents are refused and what to
/// try (`firebase-anonymous`); `check-config --online` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_required_refuses_each_target_and_readiness_says_what_to_try() {
    let sandbox = sandbox_with(SandboxOptions {
        firestore_auth: FirestoreAuthCheck::Rules {
            require_sign_in: true,
        },
        ..SandboxOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("paywatch.toml");
    let text = common::sandbox_config_text(
        dir.path(),
        &sandbox,
        "multiplexed",
        "[http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .replacen(
        "[firestore]\n",
        &format!(
            "[firestore]\nauth = \"none\"\napi_key = \"{}\"\n",
            sandbox.firebase_auth().web_api_key()
        ),
        1,
    );
    std::fs::write(&path, text).expect("write config");
    let settings = Settings::load_with_env(Some(&path), Vec::new()).expect("valid");
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let first = create_and_track(&sandbox, &ledger, "signin-1").await;
    let second = create_and_track(&sandbox, &ledger, "signin-2").await;
    let daemon = Daemon::start(&settings, &path).await;
    for id in [&first, &second] {
        let refusal = wait_for("the refusal to be noted", DEADLINE, || async {
            ledger
                .checkout(id)
                .expect("read")
                .and_then(|record| record.listen_refused)
        })
        .await;
        assert_eq!(refusal.code, "PERMISSION_DENIED", "{refusal:?}");
    }
    let counts = sandbox.auth_counts();
    assert_eq!(counts.refused_calls, 0, "the calls are let in: {counts:?}");
    assert!(counts.denied_targets >= 2, "{counts:?}");
    let response = reqwest::get(format!("{}/readyz", daemon.http_url()))
        .await
        .expect("readyz");
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = response.json().await.expect("JSON");
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("refuses to watch 2 checkout document(s)")
            && problems.contains("PERMISSION_DENIED with auth=none")
            && problems.contains("firebase-anonymous"),
        "{problems}"
    );
    assert!(
        sandbox
            .listen_headers_seen()
            .iter()
            .all(|h| h.api_key.is_none()),
        "no API key to Firestore"
    );
    daemon.stop().await;

    let output = process::run(&path, &["check-config", "--online"]);
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{report}");
    assert!(
        report.contains("PERMISSION_DENIED with auth=none")
            && report.contains("firebase-anonymous"),
        "{report}"
    );
    sandbox.shutdown().await;
}
