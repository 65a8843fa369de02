//! A URL hook against a scripted HTTP server on loopback. (The reference Standard Webhooks
//! libraries verify deliveries end to end in tests/url_hooks.rs.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::serve::ListenerExt;

use super::*;
use crate::domain::CheckoutStatus;
use crate::hooks::answer::MAX_RETRY_AFTER;

/// The example secret of the Standard Webhooks specification.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A second secret (a rotation).
const NEXT_SECRET: &str = "whsec_dGhpcyBpcyBhbm90aGVyIHRlc3Qga2V5IG9mIDMyIGJ5dGVz";

/// One scripted answer.
#[derive(Clone, Default)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status,
        body: body.to_owned(),
        ..Answer::default()
    }
}

/// A request the server saw.
struct Seen {
    path: String,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
}

impl Script {
    fn seen(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().expect("lock")
    }
}

async fn serve(State(script): State<Arc<Script>>, request: axum::extract::Request) -> Response {
    let path = request.uri().path().to_owned();
    let headers = request.headers().clone();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .expect("body")
        .to_vec();
    script.seen().push(Seen {
        path,
        headers,
        body,
    });
    let next = script
        .answers
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or_else(|| answer(204, ""));
    tokio::time::sleep(next.delay).await;
    let mut response = (
        StatusCode::from_u16(next.status).expect("status"),
        next.body,
    )
        .into_response();
    for (name, value) in next.headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header"));
    }
    response
}

/// A server answering `answers` in order (then 204), and its base URL.
async fn start(answers: Vec<Answer>) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        answers: Mutex::new(answers.into()),
        ..Script::default()
    });
    let app = Router::new()
        .fallback(any(serve))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counted = script.clone();
    let listener = listener.tap_io(move |_| {
        counted.connections.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), script)
}

fn hook(base: &str, secrets: &[&str], timeout: Duration) -> UrlHook {
    let url = reqwest::Url::parse(&format!("{base}/paywatch")).expect("url");
    UrlHook::new("shop", url, secrets, timeout).expect("hook")
}

fn event() -> HookEvent {
    HookEvent::synthetic("shop", CheckoutStatus::Paid)
}

fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    seen.headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_else(|| panic!("header {name} missing"))
}

#[test]
fn the_signature_is_the_specifications_example() {
    // The test vector of the Standard Webhooks reference libraries.
    let key = SigningKey::from_secret(SECRET).expect("key");
    assert_eq!(
        sign(
            &[key],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    let keys = [
        SigningKey::from_secret(SECRET).expect("key"),
        SigningKey::from_secret(NEXT_SECRET).expect("key"),
    ];
    let both = sign(&keys, "msg_1", 1, b"{}");
    let parts: Vec<&str> = both.split(' ').collect();
    assert_eq!(parts.len(), 2, "{both}");
    assert_eq!(parts[0], sign(&keys[..1], "msg_1", 1, b"{}"));
    assert_eq!(parts[1], sign(&keys[1..], "msg_1", 1, b"{}"));
    assert_eq!(format!("{:?}", keys[0]), "SigningKey([redacted])");
}

#[tokio::test]
async fn a_delivery_posts_the_event_json_with_the_standard_webhooks_headers() {
    let (base, script) = start(vec![answer(200, "ok")]).await;
    let hook = hook(&base, &[SECRET], Duration::from_secs(5));
    let event = event();
    let before = Utc::now().timestamp();
    let outcome = deliver(&hook, &event, &CancellationToken::new()).await;
    assert!(outcome.delivered(), "{}", outcome.describe());
    assert_eq!(outcome.describe(), "HTTP 200 OK");
    let seen = script.seen();
    let seen = &seen[0];
    assert_eq!(seen.path, "/paywatch");
    assert_eq!(
        seen.body,
        event.to_json(),
        "the command hook's stdin, exactly"
    );
    assert_eq!(header(seen, "content-type"), "application/json");
    assert_eq!(header(seen, "user-agent"), USER_AGENT);
    assert!(USER_AGENT.starts_with("paywatch/"));
    assert_eq!(header(seen, "webhook-id"), event.event_id);
    let timestamp: i64 = header(seen, "webhook-timestamp").parse().expect("seconds");
    assert!((before..=before + 5).contains(&timestamp), "{timestamp}");
    let key = SigningKey::from_secret(SECRET).expect("key");
    assert_eq!(
        header(seen, "webhook-signature"),
        sign(&[key], &event.event_id, timestamp, &seen.body)
    );
}

#[tokio::test]
async fn a_rotation_signs_with_both_secrets_current_first() {
    let (base, script) = start(vec![]).await;
    let hook = hook(&base, &[NEXT_SECRET, SECRET], Duration::from_secs(5));
    assert_eq!(hook.key_count(), 2);
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    assert!(outcome.delivered(), "204: {}", outcome.describe());
    let seen = script.seen();
    let signature = header(&seen[0], "webhook-signature");
    let timestamp: i64 = header(&seen[0], "webhook-timestamp")
        .parse()
        .expect("seconds");
    let id = header(&seen[0], "webhook-id");
    let current = sign(
        &[SigningKey::from_secret(NEXT_SECRET).expect("key")],
        id,
        timestamp,
        &seen[0].body,
    );
    let previous = sign(
        &[SigningKey::from_secret(SECRET).expect("key")],
        id,
        timestamp,
        &seen[0].body,
    );
    assert_eq!(signature, format!("{current} {previous}"));
}

#[tokio::test]
async fn extra_headers_are_sent() {
    let (base, script) = start(vec![]).await;
    let mut settings = crate::settings::HookSettings::for_tests("shop", &[]);
    settings.command = vec![];
    settings.url = Some(format!("{base}/in?token=abc"));
    settings.secret = Some(crate::settings::Secret::new(SECRET));
    settings.headers.insert("X-Shop".into(), "eu-1".into());
    let hook = UrlHook::resolve(&settings).expect("resolves");
    assert!(!format!("{hook:?}").contains("abc"), "{hook:?}");
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    assert!(outcome.delivered(), "{}", outcome.describe());
    assert_eq!(header(&script.seen()[0], "x-shop"), "eu-1");
}

#[tokio::test]
async fn connections_are_kept_alive_and_reused() {
    let (base, script) = start(vec![]).await;
    let hook = hook(&base, &[SECRET], Duration::from_secs(5));
    for _ in 0..20 {
        let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
        assert!(outcome.delivered(), "{}", outcome.describe());
    }
    assert_eq!(script.seen().len(), 20);
    assert_eq!(
        script.connections.load(Ordering::SeqCst),
        1,
        "one pooled connection"
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_names_its_location() {
    let (elsewhere, other) = start(vec![]).await;
    let redirect = Answer {
        headers: vec![("location", format!("{elsewhere}/stolen"))],
        ..answer(301, "moved")
    };
    let (base, script) = start(vec![redirect]).await;
    let hook = hook(&base, &[SECRET], Duration::from_secs(5));
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    assert!(!outcome.delivered());
    let text = outcome.describe();
    assert!(
        text.starts_with(&format!(
            "HTTP 301 Moved Permanently, a redirect to '{elsewhere}/stolen' (not followed"
        )),
        "{text}"
    );
    assert_eq!(script.seen().len(), 1);
    assert!(other.seen().is_empty(), "the other host received nothing");
}

#[tokio::test]
async fn failures_are_described_with_a_scrubbed_capped_excerpt() {
    crate::domain::register_secret("sk_live_echoed_secret_value_123");
    let long = format!(
        "refused:\n  sk_live_echoed_secret_value_123 {}",
        "x".repeat(MAX_ANSWER_BYTES * 2)
    );
    let (base, _script) = start(vec![answer(422, &long), answer(410, "gone")]).await;
    let hook = hook(&base, &[SECRET], Duration::from_secs(5));
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    let Ending::Answered(answer) = &outcome.ending else {
        panic!("an answer: {outcome:?}");
    };
    assert_eq!(answer.status, 422);
    assert!(answer.is_permanent());
    assert!(
        !answer.excerpt.contains("sk_live_echoed"),
        "{}",
        answer.excerpt
    );
    assert!(
        answer.excerpt.starts_with("refused: "),
        "{}",
        answer.excerpt
    );
    assert!(answer.excerpt.chars().count() <= EXCERPT_CHARS + 1);
    assert!(
        outcome
            .describe()
            .starts_with("HTTP 422 Unprocessable Entity: refused: ")
    );

    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    let text = outcome.describe();
    assert!(
        text.contains("HTTP 410 Gone (the endpoint says it is gone for good"),
        "{text}"
    );
}

#[tokio::test]
async fn retry_after_is_read_as_seconds_or_a_date() {
    let date = (Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
    let (base, _script) = start(vec![
        Answer {
            headers: vec![("retry-after", "7".into())],
            ..answer(429, "")
        },
        Answer {
            headers: vec![("retry-after", date)],
            ..answer(503, "")
        },
    ])
    .await;
    let hook = hook(&base, &[SECRET], Duration::from_secs(5));
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    let Ending::Answered(answer) = &outcome.ending else {
        panic!("{outcome:?}");
    };
    assert_eq!(answer.asked_wait(), Some(Duration::from_secs(7)));
    assert!(!answer.is_permanent());
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    let Ending::Answered(answer) = &outcome.ending else {
        panic!("{outcome:?}");
    };
    let wait = answer.asked_wait().expect("a wait");
    assert!(
        (Duration::from_secs(100)..=Duration::from_secs(121)).contains(&wait),
        "{wait:?}"
    );
    assert_eq!(parse_retry_after("junk"), None);
    let far = HttpAnswer {
        status: 429,
        retry_after: Some(Duration::from_secs(86_400)),
        location: None,
        excerpt: String::new(),
    };
    assert_eq!(far.asked_wait(), Some(MAX_RETRY_AFTER), "bounded");
}

#[tokio::test]
async fn no_answer_is_a_request_failure_without_the_url() {
    // A port nobody listens on: bind, take the port, close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let url = reqwest::Url::parse(&format!("http://{addr}/in?token=sekrit")).expect("url");
    let refused = UrlHook::new("shop", url, &[SECRET], Duration::from_secs(5)).expect("hook");
    let outcome = deliver(&refused, &event(), &CancellationToken::new()).await;
    let Ending::RequestFailed(text) = &outcome.ending else {
        panic!("{outcome:?}");
    };
    assert!(text.starts_with("cannot connect"), "{text}");
    assert!(!text.contains("sekrit"), "{text}");

    let (base, _script) = start(vec![Answer {
        delay: Duration::from_secs(10),
        ..answer(200, "")
    }])
    .await;
    let hook = hook(&base, &[SECRET], Duration::from_millis(300));
    let outcome = deliver(&hook, &event(), &CancellationToken::new()).await;
    assert_eq!(
        outcome.ending,
        Ending::RequestFailed("timed out after 300ms".into())
    );
    assert!(
        outcome.duration < Duration::from_secs(5),
        "{:?}",
        outcome.duration
    );
}

#[tokio::test]
async fn shutdown_abandons_the_request_and_a_stopped_hook_sends_nothing() {
    let (base, script) = start(vec![Answer {
        delay: Duration::from_secs(30),
        ..answer(200, "")
    }])
    .await;
    let hook = hook(&base, &[SECRET], Duration::from_secs(60));
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
    });
    let outcome = deliver(&hook, &event(), &stop).await;
    assert!(
        matches!(outcome.ending, Ending::Interrupted(_)),
        "{outcome:?}"
    );
    let seen = script.seen().len();
    let outcome = deliver(&hook, &event(), &stop).await;
    assert_eq!(outcome.ending, Ending::Stopped(None));
    assert_eq!(script.seen().len(), seen, "nothing sent");
}
