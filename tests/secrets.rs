//! The secrets sweep: with recognisable credentials (paymennt API key and secret, a
//! service-account private key checked by the sandbox as IAM would, the HTTP track token and the
//! webhook HMAC key, a URL hook's signing secret), run paywatch's whole flow (link create, the daemon in text and JSON log
//! formats at debug level, payments, API errors and retries, refunds, hooks, the HTTP endpoints
//! and `/metrics`, every read command with `--json`, check-config online) and assert that no
//! secret appears in any log line, error message, output, response, ledger byte, hook environment,
//! hook stdin or URL hook request.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use paywatch::ledger::{DeliveryFilter, DeliveryState, Ledger};
use paywatch::sandbox::{FirestoreAuthCheck, Sandbox, SandboxOptions, TestServiceAccount};

use crate::common::process::{self, Process, paywatch};
use crate::common::{self, DEADLINE};

/// The paymennt API key: sent to paymennt, nowhere else.
const API_KEY: &str = "pk_SWEEPKEY_7f3a9c";
/// The paymennt API secret: read from a file, sent to paymennt, nowhere else.
const API_SECRET: &str = "sk_SWEEPSECRET_2e8b41";
/// The bearer token of `POST /v1/checkouts`: read from a file, compared, never shown.
const HTTP_TOKEN: &str = "tok_SWEEPHTTP_c0ffee99";
/// The webhook signature key.
const HMAC_KEY: &str = "hk_SWEEPHMAC_5a5a17";
/// A URL hook's signing secret (issue 24): read from a file, used as an HMAC key, never sent.
const HOOK_SECRET: &str = "whsec_U1dFRVBIT09LU0VDUkVUXzAxMjM0NTY3ODlhYg==";
/// Its key, base64-decoded.
const HOOK_KEY: &str = "SWEEPHOOKSECRET_0123456789ab";

/// A URL hook's endpoint on loopback: answers 200 and keeps every request (headers and body).
async fn start_recording_endpoint() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use axum::extract::State;
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;
    async fn record(State(seen): State<Seen>, request: axum::extract::Request) -> &'static str {
        let mut kept = format!("{:?}\n", request.headers()).into_bytes();
        let body = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        kept.extend_from_slice(&body);
        seen.lock().expect("lock").push(kept);
        "ok"
    }
    let seen = Seen::default();
    let app = axum::Router::new()
        .fallback(axum::routing::any(record))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/paywatch"), seen)
}

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
    /// `paywatch --config CONFIG ARGS...`, to completion.
    fn run(&self, args: &[&str]) -> Output {
        process::run(&self.config, args)
    }

    /// `paywatch run`, its log in `log`.
    fn start_daemon(&self, log_format: &str, log: &Path) -> Process {
        paywatch()
            .config(&self.config)
            .args(["--log-format", log_format])
            .log_to(log)
            .run()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn wait_delivered(ledger: &Ledger, count: usize) {
    common::wait_for("hook deliveries", DEADLINE, || async {
        let delivered = ledger
            .deliveries(&DeliveryFilter {
                state: Some(DeliveryState::Delivered),
                ..DeliveryFilter::default()
            })
            .await
            .map(|d| d.len())
            .unwrap_or(0);
        (delivered >= count).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_outputs_the_ledger_or_hooks() {
    let account = TestServiceAccount::generate("paywatch-sandbox").expect("test key");
    let sandbox = Sandbox::start(SandboxOptions {
        api_key: API_KEY.into(),
        api_secret: API_SECRET.into(),
        heartbeat_interval: Duration::from_secs(2),
        firestore_auth: FirestoreAuthCheck::Iam(account.iam.clone()),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("api-secret");
    std::fs::write(&secret_file, format!("{API_SECRET}\n")).expect("secret file");
    let key_file = dir.path().join("service-account.json");
    std::fs::write(&key_file, &account.key_json).expect("key file");
    let token_file = dir.path().join("http-token");
    std::fs::write(&token_file, format!("{HTTP_TOKEN}\n")).expect("token file");
    // The private key's body: any one line of it in a log would be a leak.
    let key: serde_json::Value = serde_json::from_str(&account.key_json).expect("key json");
    let private_key_lines: Vec<String> = key["private_key"]
        .as_str()
        .expect("private_key")
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() > 40)
        .map(str::to_owned)
        .collect();
    assert!(private_key_lines.len() > 10);
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
    let (endpoint_url, endpoint_seen) = start_recording_endpoint().await;
    let hook_secret_file = dir.path().join("hook.whsec");
    std::fs::write(&hook_secret_file, format!("{HOOK_SECRET}\n")).expect("hook secret file");
    let config = dir.path().join("paywatch.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = \"{ledger}\"\n\n\
             [paymennt]\nbase_url = \"{base}\"\napi_key = \"{API_KEY}\"\napi_secret_file = \"{secret}\"\nmax_retries = 5\n\n\
             [firestore]\nendpoint = \"{endpoint}\"\nauth = \"service-account\"\ncredentials = \"{key}\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{token}\"\nwebhook_hmac_key = \"{HMAC_KEY}\"\n\n\
             [reconcile]\ninterval = \"2s\"\n\n\
             [log]\nlevel = \"debug\"\n\n\
             [[hooks]]\nname = \"record\"\ncommand = [\"/bin/sh\", \"{hook}\"]\n\n\
             [[hooks]]\nname = \"post\"\nurl = \"{endpoint_url}\"\nsecret_file = \"{hook_secret}\"\n",
            ledger = dir.path().join("paywatch.db").display(),
            base = sandbox.api_base_url(),
            secret = secret_file.display(),
            endpoint = sandbox.firestore_endpoint(),
            key = key_file.display(),
            token = token_file.display(),
            hook = hook.display(),
            hook_secret = hook_secret_file.display(),
        ),
    )
    .expect("config");
    let setup = Setup { dir, config };
    let mut places = Places::default();

    // Links made by paywatch itself, and a bad request paymennt refuses.
    let mut ids = Vec::new();
    for order in ["SWEEP-1", "SWEEP-2"] {
        let output = setup.run(&[
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
    let ledger = Ledger::open(&setup.path("paywatch.db"))
        .await
        .expect("ledger");
    for record in ledger.list(&Default::default()).await.expect("list") {
        ids.push(record.id.parse().expect("id"));
    }
    assert_eq!(ids.len(), 2);
    let refused = setup.run(&["track", "--checkout-id", "999999999"]);
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
    // Three for the command hook, three for the URL hook.
    wait_delivered(&ledger, 6).await;
    sweep_http(&text_log, &sandbox, &mut places).await;
    daemon.stop().await;

    // Again with JSON logs, throttled answers this time.
    let json_log = setup.path("daemon-json.log");
    let daemon = setup.start_daemon("json", &json_log);
    sandbox.faults().throttle_next_api_requests(2, 1);
    sandbox.state().pay(&ids[1]).await.expect("pay");
    common::wait_status(&ledger, &ids[1], "PAID").await;
    // Five for the two links, one for the checkout tracked over HTTP; for each of two hooks.
    wait_delivered(&ledger, 12).await;
    daemon.stop().await;
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
            let output = setup.run(&args);
            assert!(output.status.success(), "{args:?}: {output:?}");
            places.add_output(&args.join(" "), &output);
        }
    }
    for args in [
        vec!["list", "--json"],
        vec!["hooks", "list", "--json"],
        vec!["hooks", "test", "post"],
        vec!["check-config"],
        vec!["check-config", "--online"],
    ] {
        let output = setup.run(&args);
        places.add_output(&args.join(" "), &output);
    }

    // What the hooks saw, and every byte of the ledger.
    let mut hook_files = 0;
    for entry in std::fs::read_dir(&hook_dir).expect("hook dir") {
        let path = entry.expect("entry").path();
        places.add_file(&format!("hook {}", path.display()), &path);
        hook_files += 1;
    }
    let requests = endpoint_seen.lock().expect("lock").clone();
    assert!(
        requests.len() >= 7,
        "six deliveries and a test: {}",
        requests.len()
    );
    for (n, request) in requests.into_iter().enumerate() {
        places.add(format!("url hook request {n}"), request);
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
    assert_eq!(hook_files, 12, "env and stdin of six deliveries");
    assert!(places.text_of("hook").contains("PAYWATCH_EVENT_ID="));
    assert!(
        places
            .text_of("ledger file paywatch.db")
            .contains("SWEEP-1")
    );

    assert!(
        places
            .text_of("http")
            .contains("paywatch_transitions_total")
    );
    assert!(
        places
            .text_of("url hook request")
            .contains("webhook-signature")
    );
    assert!(
        places
            .text_of("check-config")
            .contains("hook 'post' posts to http://127.0.0.1")
    );
    let mut secrets: Vec<&str> = vec![
        API_KEY,
        API_SECRET,
        HTTP_TOKEN,
        HMAC_KEY,
        "Bearer ey",
        HOOK_SECRET,
        &HOOK_SECRET[6..],
        HOOK_KEY,
    ];
    secrets.extend(private_key_lines.iter().map(String::as_str));
    for secret in secrets {
        for (place, bytes) in &places.0 {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "the secret {secret} leaked into {place}"
            );
        }
    }
    sandbox.shutdown().await;
}

/// Calls every HTTP endpoint of the daemon whose log is `log` (it logs its bound address), with
/// the right token, a wrong one and none, and keeps every answer.
async fn sweep_http(log: &Path, sandbox: &Sandbox, places: &mut Places) {
    let addr = common::wait_for("the HTTP listener's address", DEADLINE, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text.split_whitespace().find_map(|word| {
            word.strip_prefix("listen=")
                .map(|addr| addr.trim_matches('"').to_owned())
        });
        async move { addr }
    })
    .await;
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let created = sandbox
        .state()
        .create_link(&common::link_request("SWEEP-HTTP", "7.00"))
        .await
        .expect("link");
    let body = serde_json::json!({ "success": true, "elapsed": 1, "result": created }).to_string();
    for (name, token) in [
        ("right token", Some(HTTP_TOKEN)),
        ("wrong token", Some("tok_wrong")),
        ("no token", None),
    ] {
        let mut request = http
            .post(format!("{base}/v1/checkouts"))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST /v1/checkouts");
        let status = response.status();
        let text = response.text().await.expect("body");
        if name == "right token" {
            assert!(status.is_success(), "{status}: {text}");
        } else {
            assert_eq!(status, 401, "{name}: {text}");
        }
        places.add(format!("http POST /v1/checkouts ({name})"), text);
    }
    let bad = http
        .post(format!("{base}/v1/checkouts"))
        .bearer_auth(HTTP_TOKEN)
        .body("{not json")
        .send()
        .await
        .expect("POST");
    places.add(
        "http POST /v1/checkouts (bad body)",
        bad.text().await.expect("body"),
    );
    let webhook = http
        .post(format!("{base}/webhooks/paymennt"))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"checkoutId\":\"{}\"}}",
            created.id.as_ref().map(|id| id.0.as_str()).unwrap_or("1")
        ))
        .send()
        .await
        .expect("POST webhook");
    places.add(
        "http POST /webhooks/paymennt",
        webhook.text().await.expect("body"),
    );
    for path in ["/metrics", "/healthz", "/readyz", "/nope"] {
        let response = http.get(format!("{base}{path}")).send().await.expect("GET");
        places.add(
            format!("http GET {path}"),
            response.text().await.expect("body"),
        );
    }
}

/// The Firebase Web API key (sent to Firebase Auth in `?key=`).
const FIREBASE_KEY: &str = "AIzaSWEEPFIREBASE_9d1e77";

/// An upstream that echoes every request back, as a misrouted `base_url` or a debugging proxy
/// may: the credential headers first, then the others and the request line. Firebase Auth paths
/// get it as Firebase's JSON refusal (`error.message`, request line first, so the `?key=` is
/// quoted), anything else as a 200 text page (not paymennt's API).
async fn start_echoing_upstream() -> String {
    use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
    use axum::response::IntoResponse;
    async fn echo(method: Method, uri: Uri, headers: HeaderMap) -> axum::response::Response {
        let mut named: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        // x-paymennt-api-secret, then x-paymennt-api-key, then the rest.
        named.sort_by_key(|(name, _)| {
            (
                !name.starts_with("x-paymennt"),
                std::cmp::Reverse(name.clone()),
            )
        });
        let headers: Vec<String> = named
            .iter()
            .map(|(name, value)| format!("{name}: {value}"))
            .collect();
        let request = format!("{method} {uri}");
        if uri.path().contains("accounts:signUp") || uri.path().ends_with("/token") {
            let message = format!("{request}\n{}", headers.join("\n"));
            let body = serde_json::json!({ "error": { "code": 400, "message": message } });
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        } else {
            let text = format!("{}\n{request}", headers.join("\n"));
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the echo");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(echo);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// Issue 21 §4: an upstream echoing request headers made `check-config --online` print the API
/// secret, and the verifier's and discovery's error lines quote the same excerpt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_an_echoing_upstream_quotes_reaches_check_config_or_error_lines() {
    let sandbox = common::sandbox().await;
    let echo = start_echoing_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger_path = dir.path().join("paywatch.db");
    let ledger = Ledger::open(&ledger_path).await.expect("ledger");
    let id = common::create_and_track(&sandbox, &ledger, "ECHO-1").await;
    drop(ledger);
    let paymennt = format!(
        "[paymennt]\nbase_url = \"{echo}/mer/v2.0/\"\napi_key = \"{API_KEY}\"\napi_secret = \"{API_SECRET}\"\nmax_retries = 0\n\n"
    );
    let common_text = format!(
        "[ledger]\npath = \"{}\"\n\n{paymennt}[reconcile]\ninterval = \"1h\"\n\n[log]\nlevel = \"info\"\n\n",
        ledger_path.display()
    );
    // check-config --online, with Firebase Auth at the echo too.
    let online = dir.path().join("online.toml");
    std::fs::write(
        &online,
        format!(
            "{common_text}[firestore]\nendpoint = \"{firestore}\"\nauth = \"firebase-anonymous\"\napi_key = \"{FIREBASE_KEY}\"\nidentity_endpoint = \"{echo}/v1\"\ntoken_endpoint = \"{echo}/v1/token\"\n\n[discovery]\nenabled = true\n",
            firestore = sandbox.firestore_endpoint()
        ),
    )
    .expect("config");
    let setup = Setup {
        dir,
        config: online,
    };
    let mut places = Places::default();
    let output = setup.run(&["check-config", "--online"]);
    assert!(
        !output.status.success(),
        "the echo is not paymennt: {output:?}"
    );
    places.add_output("check-config --online", &output);
    let report = places.text_of("check-config");
    assert!(report.contains("not paymennt's API"), "{report}");

    // The daemon: the verifier's Get Checkout and discovery's search both fail on the echo.
    let daemon_config = setup.path("daemon.toml");
    std::fs::write(
        &daemon_config,
        format!("{common_text}[firestore]\nenabled = false\n\n[discovery]\nenabled = true\n"),
    )
    .expect("config");
    let daemon_setup = Setup {
        dir: tempfile::tempdir().expect("tempdir"),
        config: daemon_config,
    };
    let log = setup.path("daemon.log");
    let daemon = daemon_setup.start_daemon("text", &log);
    let lines = common::poll_until(DEADLINE, Duration::from_millis(20), || {
        let lines = daemon.lines();
        let verifier = lines
            .iter()
            .find(|line| line.contains("Get Checkout failed") && line.contains(id.as_str()));
        let discovery = lines.iter().find(|line| line.contains("discovery cannot "));
        let found = verifier.cloned().zip(discovery.cloned());
        async move { found }
    })
    .await;
    let (verifier_line, discovery_line) = lines.unwrap_or_else(|| {
        panic!(
            "no error line from the verifier and discovery in time; the log:\n{}",
            daemon.log()
        )
    });
    daemon.stop().await;
    places.add_file("daemon log", &log);
    for secret in [API_KEY, API_SECRET, FIREBASE_KEY] {
        for (place, bytes) in &places.0 {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "the secret {secret} leaked into {place}:\n{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    // The secrets were quoted (so the sweep tested something), and scrubbed.
    assert!(
        report.contains("signUp?key=[redacted]"),
        "Firebase Auth's refusal quoted the key, scrubbed: {report}"
    );
    for line in [&report, &verifier_line, &discovery_line] {
        assert!(
            line.contains(REDACTED_MARK),
            "the echo was quoted, scrubbed: {line}"
        );
    }
    sandbox.shutdown().await;
}

/// What a scrubbed secret reads as.
const REDACTED_MARK: &str = "[redacted]";
