//! Config loading: layers, unknown keys, bad values, secrets.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paywatch.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    let (_dir, path) = write_config(text);
    let env: Vec<(OsString, OsString)> = env
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
    Settings::load_with_env(Some(&path), env)
}

#[test]
fn the_shipped_example_loads() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/paywatch.toml");
    let text = std::fs::read_to_string(example).expect("config/paywatch.toml exists");
    // Hook programs are resolved when the daemon starts, so the example's paths need not exist.
    let settings = load(&text, &[]).expect("example config is valid");
    assert_eq!(
        settings.ledger.path,
        PathBuf::from("/var/lib/paywatch/paywatch.db")
    );
}

#[test]
fn defaults_apply_and_durations_parse() {
    let settings = load(
        "[reconcile]\ninterval = \"90s\"\n[daemon]\ndrain_timeout = \"2m\"\n",
        &[],
    )
    .expect("valid");
    assert_eq!(settings.reconcile.interval, Duration::from_secs(90));
    assert_eq!(settings.daemon.drain_timeout, Duration::from_secs(120));
    assert_eq!(
        settings.paymennt.base_url(),
        "https://api.test.paymennt.com/mer/v2.0/"
    );
    assert_eq!(settings.firestore.stream_mode, StreamMode::Multiplexed);
    assert_eq!(settings.firestore.add_ack_timeout, Duration::from_secs(10));
}

#[test]
fn environment_overrides_the_file() {
    let settings = load(
        "[ledger]\npath = \"/tmp/a.db\"\n",
        &[
            ("PAYWATCH_LEDGER__PATH", "/tmp/b.db"),
            ("PAYWATCH_FIRESTORE__STREAM_MODE", "per-document"),
            (
                "PAYWATCH_PAYMENNT__BASE_URL",
                "http://127.0.0.1:8790/mer/v2.0",
            ),
            ("PAYWATCH_HOOKS_CONCURRENCY", "9"),
            // Variables paywatch gives to hooks are not settings.
            ("PAYWATCH_EVENT_ID", "evt_1"),
        ],
    )
    .expect("valid");
    assert_eq!(settings.ledger.path, PathBuf::from("/tmp/b.db"));
    assert_eq!(settings.firestore.stream_mode, StreamMode::PerDocument);
    assert_eq!(
        settings.paymennt.base_url(),
        "http://127.0.0.1:8790/mer/v2.0/"
    );
    assert_eq!(settings.hooks_concurrency, 9);
}

#[test]
fn unknown_key_is_an_error_naming_file_and_key() {
    let (_dir, path) = write_config("# paymennt\n\n[paymennt]\napi_scret = \"x\"\n");
    let error = Settings::load_with_env(Some(&path), Vec::new()).expect_err("unknown key");
    let text = error.to_string();
    assert!(
        text.contains(&format!("{} (line 4)", path.display())),
        "names the file and the line: {text}"
    );
    assert!(text.contains("paymennt.api_scret"), "{text}");
    assert!(
        text.contains("did you mean 'paymennt.api_secret'"),
        "{text}"
    );

    let error = load(
        "[[hooks]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ntimout = \"3s\"\n",
        &[],
    )
    .expect_err("unknown hook key");
    assert!(error.to_string().contains("hooks[0].timout"), "{error}");
    assert!(error.to_string().contains("(line 4)"), "{error}");
    let error = load("ledgr = 1\n", &[]).expect_err("unknown top-level key");
    assert!(error.to_string().contains("(line 1)"), "{error}");

    let error = load("", &[("PAYWATCH_LEDGER__PAHT", "/x")]).expect_err("unknown env key");
    assert!(
        error.to_string().contains("PAYWATCH_LEDGER__PAHT"),
        "{error}"
    );
}

#[test]
fn bad_duration_names_key_and_value() {
    let error = load("[reconcile]\ninterval = \"soon\"\n", &[]).expect_err("bad duration");
    let text = error.to_string();
    assert!(text.contains("reconcile.interval"), "{text}");
    assert!(text.contains("soon"), "{text}");
}

#[test]
fn bad_value_from_environment_names_the_variable() {
    let error = load("", &[("PAYWATCH_RECONCILE__INTERVAL", "often")]).expect_err("bad duration");
    assert!(
        error.to_string().contains("PAYWATCH_RECONCILE__INTERVAL"),
        "{error}"
    );
}

#[test]
fn missing_required_hook_field_is_named() {
    let error = load("[[hooks]]\nname = \"mark-paid\"\n", &[]).expect_err("missing command");
    assert!(error.to_string().contains("command"), "{error}");
}

#[test]
fn invalid_toml_gives_the_line() {
    let error = load("[ledger]\npath = \n", &[]).expect_err("invalid toml");
    assert!(error.to_string().contains("line 2"), "{error}");
}

#[test]
fn plaintext_only_on_loopback() {
    assert!(
        load(
            "[paymennt]\nbase_url = \"http://127.0.0.1:1/mer/v2.0/\"\n",
            &[]
        )
        .is_ok()
    );
    let error = load(
        "[paymennt]\nbase_url = \"http://api.paymennt.com/mer/v2.0/\"\n",
        &[],
    )
    .expect_err("plaintext to a remote host");
    assert!(error.to_string().contains("paymennt.base_url"), "{error}");
    let error = load("[firestore]\nendpoint = \"http://10.0.0.1:8080\"\n", &[])
        .expect_err("plaintext to a remote host");
    assert!(error.to_string().contains("firestore.endpoint"), "{error}");
}

#[test]
fn hook_status_typo_is_an_error() {
    let error = load(
        "[[hooks]]\nname = \"a\"\ncommand = [\"/bin/true\"]\nstatuses = [\"PAYED\"]\n",
        &[],
    )
    .expect_err("unknown status");
    assert!(error.to_string().contains("PAYED"), "{error}");
}

#[test]
fn missing_config_file_is_an_error() {
    let error = Settings::load_with_env(Some(Path::new("/nonexistent/paywatch.toml")), Vec::new())
        .expect_err("missing file");
    assert!(
        error.to_string().contains("/nonexistent/paywatch.toml"),
        "{error}"
    );
}

#[test]
fn secrets_resolve_from_file_and_never_print() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_path = dir.path().join("secret");
    std::fs::write(&secret_path, "topsecretvalue-123\n").expect("write");
    let text = format!(
        "[paymennt]\napi_key = \"key-1\"\napi_secret_file = \"{}\"\n",
        secret_path.display()
    );
    let settings = load(&text, &[]).expect("valid");
    let credentials = settings.paymennt.credentials().expect("resolves");
    assert_eq!(credentials.secret.expose(), "topsecretvalue-123");
    let debug = format!("{settings:?} {credentials:?}");
    assert!(!debug.contains("topsecretvalue"), "{debug}");
    assert!(!debug.contains("key-1"), "{debug}");
}

#[test]
fn unreadable_secret_file_is_named() {
    let settings = load(
        "[paymennt]\napi_key = \"k\"\napi_secret_file = \"/nonexistent/secret\"\n",
        &[],
    )
    .expect("valid");
    let error = settings.paymennt.credentials().expect_err("unreadable");
    assert!(error.to_string().contains("/nonexistent/secret"), "{error}");
    assert!(error.to_string().contains("api_secret_file"), "{error}");
}

#[test]
fn a_secret_with_a_bad_type_is_not_quoted() {
    let settings = load(
        "[paymennt]\napi_key = \"k\"\napi_secret = 987654321987\n",
        &[],
    )
    .expect("valid");
    let error = format!("{settings:?}");
    assert!(!error.contains("987654321987"));
}

#[test]
fn missing_secret_says_where_to_put_it() {
    let settings = load("[paymennt]\napi_key = \"k\"\n", &[]).expect("valid");
    let error = settings.paymennt.credentials().expect_err("no secret");
    assert!(
        error.to_string().contains("PAYWATCH_PAYMENNT__API_SECRET"),
        "{error}"
    );
}

#[test]
fn an_unknown_choice_lists_the_accepted_values() {
    let error = load("[firestore]\nstream_mode = \"fast\"\n", &[]).expect_err("bad mode");
    let text = error.to_string();
    assert!(
        text.contains(
            "'firestore.stream_mode' value 'fast' is not one of: multiplexed, per-document"
        ),
        "{text}"
    );
    let error = load("", &[("PAYWATCH_LOG__FORMAT", "xml")]).expect_err("bad format");
    assert!(
        error.to_string().contains("PAYWATCH_LOG__FORMAT"),
        "{error}"
    );
    assert!(error.to_string().contains("text, json"), "{error}");
}

#[test]
fn absurd_durations_are_refused() {
    let error = load("[reconcile]\ninterval = \"500years\"\n", &[]).expect_err("too long");
    assert!(
        error.to_string().contains("'reconcile.interval'"),
        "{error}"
    );
    assert!(error.to_string().contains("too long"), "{error}");
}

#[test]
fn a_numeric_looking_secret_from_the_environment_stays_verbatim() {
    let settings = load(
        "[paymennt]\napi_key = \"k\"\n",
        &[
            ("PAYWATCH_PAYMENNT__API_SECRET", "00123"),
            ("PAYWATCH_PAYMENNT__API_KEY", "1e5"),
        ],
    )
    .expect("valid");
    let credentials = settings.paymennt.credentials().expect("resolves");
    assert_eq!(credentials.secret.expose(), "00123");
    assert_eq!(credentials.key.expose(), "1e5");
}

#[test]
fn discovery_types_and_overlap_can_be_set_from_the_environment() {
    let settings = load(
        "",
        &[
            ("PAYWATCH_DISCOVERY__TYPES", "LINK, WEB,"),
            ("PAYWATCH_DISCOVERY__OVERLAP", "2m"),
        ],
    )
    .expect("valid");
    assert_eq!(settings.discovery.types, ["LINK", "WEB"]);
    assert_eq!(settings.discovery.overlap, Duration::from_secs(120));
    let single = load("", &[("PAYWATCH_DISCOVERY__TYPES", "QR")]).expect("valid");
    assert_eq!(single.discovery.types, ["QR"]);
    let error = load("", &[("PAYWATCH_DISCOVERY__TYPES", "LINK,SHOP")]).expect_err("unknown");
    assert!(error.to_string().contains("unknown type 'SHOP'"), "{error}");
    let error = load("[discovery]\noverlap = \"2days\"\n", &[]).expect_err("bounded");
    assert!(error.to_string().contains("'discovery.overlap'"), "{error}");
}

#[test]
fn discovery_defaults_follow_the_credentials_and_every_number_is_bounded() {
    let settings = load("", &[]).expect("valid");
    assert_eq!(settings.discovery.types, ["LINK"]);
    assert_eq!(settings.discovery.interval, Duration::from_secs(30));
    assert_eq!(
        settings.discovery.lookback,
        Duration::from_secs(7 * 24 * 3600)
    );
    assert_eq!(settings.reconcile.page_size, 100);
    assert!(
        !settings.discovery.is_enabled(&settings.paymennt),
        "no credentials: off"
    );
    let with_credentials =
        load("[paymennt]\napi_key = \"k\"\napi_secret = \"s\"\n", &[]).expect("valid");
    assert!(
        with_credentials
            .discovery
            .is_enabled(&with_credentials.paymennt)
    );
    let off = load(
        "[paymennt]\napi_key = \"k\"\napi_secret = \"s\"\n[discovery]\nenabled = false\n",
        &[],
    )
    .expect("valid");
    assert!(!off.discovery.is_enabled(&off.paymennt));
    for (text, named) in [
        ("[discovery]\ninterval = \"0s\"\n", "'discovery.interval'"),
        (
            "[discovery]\ninterval = \"2days\"\n",
            "'discovery.interval'",
        ),
        (
            "[discovery]\nlookback = \"400days\"\n",
            "'discovery.lookback'",
        ),
        ("[discovery]\npage_size = 0\n", "'discovery.page_size'"),
        ("[reconcile]\npage_size = 1001\n", "'reconcile.page_size'"),
        ("[discovery]\ntypes = []\n", "'discovery.types'"),
        ("[discovery]\ntypes = [\"LINKS\"]\n", "'LINKS'"),
    ] {
        let error = load(text, &[]).expect_err(text).to_string();
        assert!(error.contains(named), "{text}: {error}");
    }
}

#[test]
fn hook_settings_debug_shows_env_names_but_never_values() {
    let settings = load(
        "[[hooks]]\nname = \"a\"\ncommand = [\"/bin/true\"]\nenv = { SHOP_TOKEN = \"tok-very-secret\" }\n",
        &[],
    )
    .expect("valid");
    for shown in [format!("{settings:?}"), format!("{:?}", settings.hooks[0])] {
        assert!(shown.contains("SHOP_TOKEN"), "{shown}");
        assert!(!shown.contains("tok-very-secret"), "{shown}");
    }
}

#[test]
fn every_number_and_duration_is_bounded_and_the_error_names_key_value_and_bound() {
    const HOOK: &str = "[[hooks]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n";
    // (config text, key, value as shown, bound as shown)
    let cases = [
        (
            "hooks_concurrency = 100000\n",
            "hooks_concurrency",
            "100000",
            "at most 256",
        ),
        (
            "hooks_concurrency = 0\n",
            "hooks_concurrency",
            "0",
            "at least 1",
        ),
        (
            "[paymennt]\nmax_retries = 1000\n",
            "paymennt.max_retries",
            "1000",
            "at most 20",
        ),
        (
            "[paymennt]\nconcurrency = 100000\n",
            "paymennt.concurrency",
            "100000",
            "at most 256",
        ),
        (
            "[paymennt]\nconcurrency = 0\n",
            "paymennt.concurrency",
            "0",
            "at least 1",
        ),
        (
            "[paymennt]\nconnect_timeout = \"0s\"\n",
            "paymennt.connect_timeout",
            "0s",
            "at least 100ms",
        ),
        (
            "[paymennt]\nconnect_timeout = \"2h\"\n",
            "paymennt.connect_timeout",
            "2h",
            "at most 5m",
        ),
        (
            "[paymennt]\nrequest_timeout = \"1day\"\n",
            "paymennt.request_timeout",
            "1day",
            "at most 10m",
        ),
        (
            "[firestore]\ntargets_per_stream = 1000000\n",
            "firestore.targets_per_stream",
            "1000000",
            "at most 10000",
        ),
        (
            "[firestore]\nstreams_per_connection = 0\n",
            "firestore.streams_per_connection",
            "0",
            "at least 1",
        ),
        (
            "[firestore]\nstreams_per_connection = 5000\n",
            "firestore.streams_per_connection",
            "5000",
            "at most 1000",
        ),
        (
            "[firestore]\nidle_timeout = \"10ms\"\n",
            "firestore.idle_timeout",
            "10ms",
            "at least 1s",
        ),
        (
            "[firestore]\nidle_timeout = \"2days\"\n",
            "firestore.idle_timeout",
            "2days",
            "at most 1h",
        ),
        (
            "[firestore]\nadd_ack_timeout = \"1h\"\n",
            "firestore.add_ack_timeout",
            "1h",
            "at most 10m",
        ),
        (
            "[firestore]\nrefund_watch = \"20years\"\n",
            "firestore.refund_watch",
            "20years",
            "at most",
        ),
        (
            "[reconcile]\ninterval = \"10ms\"\n",
            "reconcile.interval",
            "10ms",
            "at least 1s",
        ),
        (
            "[reconcile]\ninterval = \"30days\"\n",
            "reconcile.interval",
            "30days",
            "at most 1day",
        ),
        (
            "[reconcile]\nstartup_grace = \"1h\"\n",
            "reconcile.startup_grace",
            "1h",
            "at most 10m",
        ),
        (
            "[daemon]\ndrain_timeout = \"1day\"\n",
            "daemon.drain_timeout",
            "1day",
            "at most 1h",
        ),
    ];
    for (text, key, value, bound) in cases {
        let error = load(text, &[]).expect_err(key).to_string();
        for part in [format!("'{key}'"), format!("'{value}'"), bound.to_owned()] {
            assert!(error.contains(&part), "{key}: {part} missing from: {error}");
        }
    }
    let hook_cases = [
        (
            "timeout = \"2days\"\n",
            "hooks[0].timeout",
            "2days",
            "at most 1day",
        ),
        (
            "timeout = \"0s\"\n",
            "hooks[0].timeout",
            "0s",
            "at least 100ms",
        ),
        (
            "max_attempts = 0\n",
            "hooks[0].max_attempts",
            "0",
            "at least 1",
        ),
        (
            "max_attempts = 4000000000\n",
            "hooks[0].max_attempts",
            "4000000000",
            "at most 1000",
        ),
        (
            "max_age = \"5years\"\n",
            "hooks[0].max_age",
            "5years",
            "at most",
        ),
        (
            "permanent_exit_codes = [0]\n",
            "hooks[0].permanent_exit_codes",
            "0",
            "1 to 255",
        ),
        (
            "permanent_exit_codes = [300]\n",
            "hooks[0].permanent_exit_codes",
            "300",
            "1 to 255",
        ),
    ];
    for (text, key, value, bound) in hook_cases {
        let error = load(&format!("{HOOK}{text}"), &[])
            .expect_err(key)
            .to_string();
        for part in [format!("'{key}'"), format!("'{value}'"), bound.to_owned()] {
            assert!(error.contains(&part), "{key}: {part} missing from: {error}");
        }
    }
    // From the environment, the variable is named.
    let error = load("", &[("PAYWATCH_HOOKS_CONCURRENCY", "70000")])
        .expect_err("too many")
        .to_string();
    assert!(error.contains("PAYWATCH_HOOKS_CONCURRENCY"), "{error}");
    assert!(error.contains("at most 256"), "{error}");
    // The shipped defaults sit inside every bound.
    load("", &[]).expect("defaults are valid");
}

#[test]
fn firestore_auth_modes_parse_and_an_unknown_one_lists_the_choices() {
    for mode in FirestoreAuthMode::ALL {
        let settings =
            load(&format!("[firestore]\nauth = \"{}\"\n", mode.as_str()), &[]).expect("valid");
        assert_eq!(settings.firestore.auth_mode(), mode);
    }
    let error = load("[firestore]\nauth = \"oauth\"\n", &[]).expect_err("unknown mode");
    let text = error.to_string();
    assert!(
        text.contains("'firestore.auth' value 'oauth'")
            && text.contains("service-account, application-default, none, firebase-anonymous"),
        "{text}"
    );
}

#[test]
fn firestore_auth_defaults_to_service_account_only_with_a_key_file() {
    let settings = load(
        "[firestore]\ncredentials = \"/etc/paywatch/key.json\"\n",
        &[],
    )
    .expect("valid");
    assert_eq!(
        settings.firestore.auth_mode(),
        FirestoreAuthMode::ServiceAccount
    );
    let settings = load("[firestore]\nauth = \"none\"\n", &[]).expect("valid");
    assert_eq!(settings.firestore.auth_mode(), FirestoreAuthMode::None);
}

#[test]
fn the_firebase_api_key_is_a_secret_and_new_urls_and_ca_files_are_checked() {
    let settings = load(
        "[firestore]\nauth = \"firebase-anonymous\"\napi_key = \"AIza-secret-value\"\n",
        &[],
    )
    .expect("valid");
    assert!(!format!("{settings:?}").contains("AIza-secret-value"));
    let error = load(
        "[firestore]\ntoken_endpoint = \"http://example.com/token\"\n",
        &[],
    )
    .expect_err("plaintext to a remote host");
    assert!(
        error.to_string().contains("firestore.token_endpoint"),
        "{error}"
    );
    let error =
        load("[paymennt]\nca_file = \"/nonexistent/ca.pem\"\n", &[]).expect_err("missing CA file");
    assert!(
        error.to_string().contains("'paymennt.ca_file'")
            && error.to_string().contains("/nonexistent/ca.pem"),
        "{error}"
    );
    let (_dir, not_pem) = write_config("not a certificate");
    let error = load(
        &format!("[firestore]\nca_file = \"{}\"\n", not_pem.display()),
        &[],
    )
    .expect_err("not PEM");
    assert!(error.to_string().contains("no PEM certificate"), "{error}");
}

/// Issue 21: the API key goes to Firestore only when asked; asking without a key is an error;
/// the identity file sits next to the ledger.
#[test]
fn the_api_key_reaches_firestore_only_when_asked_and_the_identity_sits_by_the_ledger() {
    use crate::sources::firestore::FirestoreAuth;
    let settings = load("[firestore]\nauth = \"none\"\napi_key = \"k\"\n", &[]).expect("valid");
    assert!(!settings.firestore.send_api_key_to_firestore);
    assert!(matches!(
        crate::sources::firestore::FirestoreAuth::from_settings(&settings.firestore),
        Ok(FirestoreAuth::None {
            send_api_key: false,
            ..
        })
    ));
    let asked = load(
        "[firestore]\nauth = \"none\"\napi_key = \"k\"\nsend_api_key_to_firestore = true\n",
        &[],
    )
    .expect("valid");
    assert!(matches!(
        crate::sources::firestore::FirestoreAuth::from_settings(&asked.firestore),
        Ok(FirestoreAuth::None {
            send_api_key: true,
            ..
        })
    ));
    let no_key = load(
        "[firestore]\nauth = \"none\"\nsend_api_key_to_firestore = true\n",
        &[],
    )
    .expect("loads");
    let error = crate::sources::firestore::FirestoreAuth::from_settings(&no_key.firestore)
        .expect_err("no key to send");
    assert!(
        error.to_string().contains("send_api_key_to_firestore"),
        "{error}"
    );
    let ledger = LedgerSettings {
        path: std::path::PathBuf::from("/var/lib/paywatch/paywatch.db"),
        ..LedgerSettings::default()
    };
    assert_eq!(
        ledger.firebase_identity_path(),
        std::path::PathBuf::from("/var/lib/paywatch/paywatch.db.firebase-identity")
    );
}

#[test]
fn firestore_database_defaults_and_is_checked() {
    let settings = load("", &[]).expect("valid");
    assert_eq!(settings.firestore.database, "(default)");
    let settings = load("[firestore]\ndatabase = \"payments-eu\"\n", &[]).expect("valid");
    assert_eq!(settings.firestore.database, "payments-eu");
    let error = load("[firestore]\ndatabase = \"Bad/Db\"\n", &[]).expect_err("bad database");
    let text = error.to_string();
    assert!(
        text.contains("'firestore.database' value 'Bad/Db' is invalid"),
        "{text}"
    );
}

#[test]
fn the_http_listener_is_off_by_default_and_on_loopback_in_the_shipped_config() {
    let settings = load("", &[]).expect("defaults");
    assert_eq!(settings.http.listen, None);
    assert!(settings.firestore.enabled);
    assert_eq!(settings.http.token().expect("no token"), None);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/paywatch.toml");
    let text = std::fs::read_to_string(example).expect("config/paywatch.toml exists");
    let shipped = load(&text, &[]).expect("example config is valid");
    let listen = shipped.http.listen.expect("the example listens");
    assert!(listen.ip().is_loopback(), "{listen}");
}

#[test]
fn http_settings_are_bounded_and_named() {
    for (text, key) in [
        ("[http]\nmax_body_bytes = 10\n", "http.max_body_bytes"),
        (
            "[http]\nwebhook_rate_per_checkout = 0\n",
            "http.webhook_rate_per_checkout",
        ),
        (
            "[http]\nwebhook_rate_per_address = 0\n",
            "http.webhook_rate_per_address",
        ),
        (
            "[http]\nwebhook_signature_header = \"bad header\"\n",
            "http.webhook_signature_header",
        ),
        (
            "[http]\nverify_failing_after = \"0s\"\n",
            "http.verify_failing_after",
        ),
        ("[http]\nlisten = \"not an address\"\n", "listen"),
        ("[http]\nlisten_on = \"127.0.0.1:1\"\n", "http.listen_on"),
    ] {
        let error = load(text, &[]).expect_err(text).to_string();
        assert!(error.contains(key), "{text}: {error}");
    }
}

#[test]
fn the_http_token_comes_from_the_config_a_file_or_the_environment_and_is_never_shown() {
    let settings = load("[http]\ntoken = \"t0ken-value\"\n", &[]).expect("valid");
    let token = settings.http.token().expect("resolves").expect("set");
    assert_eq!(token.expose(), "t0ken-value");
    assert!(!format!("{settings:?}").contains("t0ken-value"));
    let settings = load("", &[("PAYWATCH_HTTP__TOKEN", "from-env")]).expect("valid");
    assert_eq!(
        settings
            .http
            .token()
            .expect("resolves")
            .expect("set")
            .expose(),
        "from-env"
    );
    let settings = load("[http]\ntoken_file = \"/nonexistent/token\"\n", &[]).expect("valid");
    let error = settings.http.token().expect_err("missing file").to_string();
    assert!(error.contains("http.token_file"), "{error}");
    let settings = load("[http]\nwebhook_hmac_key = \"\"\n", &[]).expect("valid");
    let error = settings
        .http
        .webhook_hmac_key()
        .expect_err("empty")
        .to_string();
    assert!(error.contains("http.webhook_hmac_key"), "{error}");
}

/// Issue 24: a URL hook's keys, each refusal naming the hook and key, never a secret.
#[test]
fn url_hooks_are_checked_naming_the_key_never_the_secret() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let hook = |keys: &str| format!("[[hooks]]\nname = \"shop\"\n{keys}\n");
    let settings = load(
        &hook(&format!(
            "url = \"https://shop.example/paywatch?token=t0k3n\"\nsecret = \"{SECRET}\"\n\
             headers = {{ \"X-Shop\" = \"eu-1\" }}\nstatuses = [\"PAID\"]"
        )),
        &[],
    )
    .expect("a url hook");
    let shop = settings.hook("shop").expect("hook");
    assert!(shop.command.is_empty());
    assert_eq!(shop.signing_secrets().expect("secret").len(), 1);
    let debug = format!("{shop:?}");
    assert!(
        !debug.contains("MfKQ9r8") && !debug.contains("t0k3n") && !debug.contains("eu-1"),
        "{debug}"
    );
    assert_eq!(
        shown_url("https://u:p@shop.example:8443/in?token=t0k3n"),
        "https://…@shop.example:8443/in?…"
    );
    assert!(
        load(
            &hook(&format!(
                "url = \"http://127.0.0.1:9/in\"\nsecret = \"{SECRET}\""
            )),
            &[]
        )
        .is_ok(),
        "plain http to loopback"
    );

    for (keys, expected) in [
        (
            format!(
                "url = \"https://a.example/\"\ncommand = [\"/bin/true\"]\nsecret = \"{SECRET}\""
            ),
            "hook 'shop' has both 'command' and 'url'",
        ),
        (
            "statuses = [\"PAID\"]".to_owned(),
            "'hooks[0].command' of hook 'shop' is empty",
        ),
        (
            format!("url = \"http://shop.example/in?token=t0k3n\"\nsecret = \"{SECRET}\""),
            "'hooks[0].url' value 'http://shop.example/in?…' uses plaintext http to a non-loopback host",
        ),
        (
            "url = \"https://a.example/\"\nsecret = \"whsec_bm90IGxvbmcgZW5vdWdo\"".to_owned(),
            "'hooks[0].secret' of hook 'shop' is not a Standard Webhooks secret: it decodes to 15 bytes",
        ),
        (
            "url = \"https://a.example/\"\nsecret = \"hunter2-hunter2-hunter2\"".to_owned(),
            "'hooks[0].secret' of hook 'shop' is not a Standard Webhooks secret: it does not start with 'whsec_'",
        ),
        (
            format!(
                "url = \"https://a.example/\"\nsecret = \"{SECRET}\"\nprevious_secret = \"whsec_!!\""
            ),
            "'hooks[0].previous_secret' of hook 'shop' is not a Standard Webhooks secret",
        ),
        (
            format!(
                "url = \"https://a.example/\"\nsecret = \"{SECRET}\"\nheaders = {{ \"webhook-id\" = \"x\" }}"
            ),
            "sets 'webhook-id', which paywatch writes itself",
        ),
        (
            format!(
                "url = \"https://a.example/\"\nsecret = \"{SECRET}\"\nheaders = {{ \"bad name\" = \"x\" }}"
            ),
            "has invalid header name 'bad name'",
        ),
        (
            format!(
                "url = \"https://a.example/\"\nsecret = \"{SECRET}\"\nheaders = {{ \"X-A\" = \"a\\nb\" }}"
            ),
            "the value of 'X-A' has characters an HTTP header cannot hold",
        ),
        (
            format!("url = \"https://a.example/\"\nsecret = \"{SECRET}\"\nenv = {{ A = \"b\" }}"),
            "'hooks[0].env' of hook 'shop' applies only to a command hook",
        ),
        (
            format!("command = [\"/bin/true\"]\nsecret = \"{SECRET}\""),
            "'hooks[0].secret' of hook 'shop' applies only to a url hook",
        ),
        (
            format!(
                "url = \"https://a.example/\"\nsecret = \"{SECRET}\"\nca_file = \"/nonexistent/ca.pem\""
            ),
            "'hooks[0].ca_file': cannot read the CA file '/nonexistent/ca.pem'",
        ),
    ] {
        let error = load(&hook(&keys), &[]).expect_err(&keys).to_string();
        assert!(error.contains(expected), "{keys}:\n{error}");
        assert!(
            !error.contains("MfKQ9r8") && !error.contains("hunter2") && !error.contains("t0k3n"),
            "{error}"
        );
    }
}

/// Issue 24: a URL hook's secret from a file or the systemd credential, checked when the hook
/// is resolved; a missing or malformed one names where it came from, never the value.
#[test]
fn url_hook_secrets_come_from_a_file_or_the_credential() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hook = HookSettings::for_tests("shop", &[]);
    hook.command.clear();
    hook.url = Some("https://a.example/".into());
    let error = hook.signing_secrets().expect_err("none");
    assert!(error.contains("paywatch-hook-shop-secret"), "{error}");
    let file = dir.path().join("secret");
    std::fs::write(&file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("write");
    hook.secret_file = Some(file.clone());
    let previous = dir.path().join("previous");
    std::fs::write(&previous, "not-a-whsec-value-at-all").expect("write");
    hook.previous_secret_file = Some(previous);
    let error = hook.signing_secrets().expect_err("bad previous");
    assert!(error.starts_with("'previous_secret_file' ("), "{error}");
    assert!(!error.contains("not-a-whsec"), "{error}");
    hook.previous_secret_file = None;
    let secrets = hook.signing_secrets().expect("from the file");
    assert_eq!(
        secrets[0].expose(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    );
}

#[test]
fn a_postgresql_ledger_url_excludes_path_and_hides_its_password() {
    let url = "postgresql://paywatch:pw-in-the-url@db.internal:5432/paywatch";
    let settings = load(&format!("[ledger]\nurl = \"{url}\"\n"), &[]).expect("valid");
    let shown = format!("{settings:?}");
    assert!(!shown.contains("pw-in-the-url"), "{shown}");
    assert_eq!(settings.ha.lease, std::time::Duration::from_secs(10));
    let both = load(
        &format!("[ledger]\npath = \"/tmp/x.db\"\nurl = \"{url}\"\n"),
        &[],
    )
    .expect_err("path and url");
    let text = both.to_string();
    assert!(
        text.contains("'ledger.path'") && text.contains("'ledger.url'"),
        "{text}"
    );
    assert!(!text.contains("pw-in-the-url"), "{text}");
    let both = load(
        "[ledger]\npath = \"/tmp/x.db\"\n",
        &[("PAYWATCH_LEDGER__URL", url)],
    )
    .expect_err("path in the file, url in the environment");
    assert!(both.to_string().contains("both"), "{both}");
    let not_pg = load("[ledger]\nurl = \"mysql://u:hidden-pw@h/d\"\n", &[]).expect_err("mysql");
    let text = not_pg.to_string();
    assert!(
        text.contains("postgresql://") && !text.contains("hidden-pw"),
        "{text}"
    );
    let stray = load("[ledger]\nca_file = \"/etc/hosts\"\n", &[]).expect_err("ca without url");
    assert!(stray.to_string().contains("'ledger.url'"), "{stray}");
}

#[test]
fn the_ledger_password_comes_from_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("db-password");
    std::fs::write(&file, "from-the-file\n").expect("write");
    let settings = load(
        &format!(
            "[ledger]\nurl = \"postgresql://paywatch@db/paywatch\"\npassword_file = \"{}\"\n",
            file.display()
        ),
        &[],
    )
    .expect("valid");
    let password = settings
        .ledger
        .password()
        .expect("read")
        .expect("a password");
    assert_eq!(password.expose(), "from-the-file");
    let missing = load(
        "[ledger]\nurl = \"postgresql://paywatch@db/paywatch\"\npassword_file = \"/nonexistent/pw\"\n",
        &[],
    )
    .expect_err("missing file");
    assert!(
        missing.to_string().contains("'ledger.password_file'"),
        "{missing}"
    );
}

#[test]
fn the_lease_is_bounded() {
    for (value, bound) in [("1s", "2s"), ("6m", "5m")] {
        let error = load(&format!("[ha]\nlease = \"{value}\"\n"), &[]).expect_err(value);
        let text = error.to_string();
        assert!(
            text.contains("'ha.lease'") && text.contains(value) && text.contains(bound),
            "{text}"
        );
    }
    let settings = load("", &[("PAYWATCH_HA__LEASE", "30s")]).expect("valid");
    assert_eq!(settings.ha.lease, std::time::Duration::from_secs(30));
}
