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
    let path = dir.join("paywatch.toml");
    let text = common::sandbox_config_text(dir, sandbox, "multiplexed", "")
        .replacen("[firestore]\n", &format!("[firestore]\n{firestore}"), 1)
        .replacen("[paymennt]\n", &format!("[paymennt]\n{paymennt}"), 1);
    std::fs::write(&path, text).expect("write config");
    let settings = Settings::load_with_env(Some(&path), Vec::new()).expect("test config is valid");
    (settings, path)
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
    let seen = sandbox.listen_headers_seen();
    assert!(
        seen.iter().all(|h| h.authorization.is_none()
            && h.api_key.as_deref() == Some(sandbox.firebase_auth().web_api_key())
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
    let (settings, config) = auth_settings(
        dir.path(),
        &sandbox,
        &format!(
            "auth = \"firebase-anonymous\"\napi_key = \"{}\"\nidentity_endpoint = \"{}\"\ntoken_endpoint = \"{}\"\n",
            sandbox.firebase_auth().web_api_key(),
            sandbox.identity_endpoint(),
            sandbox.token_endpoint()
        ),
        "",
    );
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
    let text = daemon
        .metrics
        .exposition(&ledger)
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
    let (settings, config) = auth_settings(
        dir.path(),
        &sandbox,
        &format!(
            "auth = \"firebase-anonymous\"\napi_key = \"{}\"\nidentity_endpoint = \"{}\"\ntoken_endpoint = \"{}\"\n",
            sandbox.firebase_auth().web_api_key(),
            sandbox.identity_endpoint(),
            sandbox.token_endpoint()
        ),
        "",
    );
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
    let auth = settings.firestore.resolve_auth().expect("auth");
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
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_paywatch"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("GOOGLE_APPLICATION_CREDENTIALS", &key)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("paywatch starts");
    wait_for("a Listen call", DEADLINE, || async {
        (!sandbox.listen_headers_seen().is_empty()).then_some(())
    })
    .await;
    sandbox.state().pay(&id).await.expect("paid");
    wait_status(&ledger, &id, "PAID").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(sandbox.auth_counts().refused_calls, 0);
    assert!(sandbox.listen_headers_seen().iter().all(|h| {
        h.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer ey"))
    }));
    sandbox.shutdown().await;
}
