//! The client against a scripted HTTP server on loopback.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use futures::StreamExt;

use super::*;
use crate::settings::Secret;

/// One scripted answer: status, extra headers, body, delay.
#[derive(Clone)]
struct Answer {
    status: u16,
    retry_after: Option<&'static str>,
    content_type: &'static str,
    location: Option<String>,
    body: String,
    /// Send the body in chunks without a length, then never finish.
    stall_after_body: bool,
    delay: Duration,
}

fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status,
        retry_after: None,
        content_type: "application/json",
        location: None,
        body: body.to_owned(),
        stall_after_body: false,
        delay: Duration::ZERO,
    }
}

#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<(String, HeaderMap, Instant)>>,
}

async fn serve(State(script): State<Arc<Script>>, request: axum::extract::Request) -> Response {
    let uri = request.uri().to_string();
    script
        .seen
        .lock()
        .expect("lock")
        .push((uri, request.headers().clone(), Instant::now()));
    let next = script.answers.lock().expect("lock").pop_front();
    let Some(next) = next else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response();
    };
    tokio::time::sleep(next.delay).await;
    let status = StatusCode::from_u16(next.status).expect("status");
    let headers = [("content-type", next.content_type)];
    let mut response = if next.stall_after_body {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = next
            .body
            .into_bytes()
            .chunks(64 * 1024)
            .map(|chunk| Ok(chunk.to_vec()))
            .collect();
        let body = futures::stream::iter(chunks).chain(futures::stream::pending());
        (status, headers, axum::body::Body::from_stream(body)).into_response()
    } else {
        (status, headers, next.body).into_response()
    };
    if let Some(value) = next.retry_after {
        response
            .headers_mut()
            .insert("retry-after", value.parse().expect("header"));
    }
    if let Some(value) = next.location {
        response
            .headers_mut()
            .insert("location", value.parse().expect("header"));
    }
    response
}

async fn start(answers: Vec<Answer>) -> (Client, Arc<Script>) {
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
    tokio::spawn(async move { axum::serve(listener, app).await });
    let credentials = ApiCredentials {
        key: Secret::new("test-key"),
        secret: Secret::new("test-secret"),
    };
    let client = Client::new(
        &format!("http://{addr}/mer/v2.0"),
        &credentials,
        Duration::from_secs(2),
        Duration::from_millis(500),
        RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(10),
            max: Duration::from_secs(2),
        },
    )
    .expect("client");
    (client, script)
}

const CHECKOUT: &str = r#"{"success":true,"elapsed":12,"result":{"id":"1653241101733169556","requestId":"ORD-1234-r1","orderId":"ORD-1234","currency":"AED","amount":19.99,"status":"PENDING","totalRefunded":0.0,"firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc1"}}"#;

fn ticket() -> VerifyTicket {
    VerifyTicket::new(1)
}

fn id() -> CheckoutId {
    "1653241101733169556".parse().expect("id")
}

#[tokio::test]
async fn get_checkout_sends_auth_headers_and_keeps_exact_amount() {
    let (client, script) = start(vec![answer(200, CHECKOUT)]).await;
    let checkout = client.get_checkout(&id(), ticket()).await.expect("success");
    assert_eq!(checkout.facts().amount.to_string(), "19.99");
    assert_eq!(checkout.status(), &CheckoutStatus::Pending);
    assert!(checkout.raw_json().contains("19.99"));
    let seen = script.seen.lock().expect("lock");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "/mer/v2.0/checkout/1653241101733169556");
    assert_eq!(
        seen[0].1.get("x-paymennt-api-key").map(|v| v.as_bytes()),
        Some(&b"test-key"[..])
    );
    assert_eq!(
        seen[0].1.get("x-paymennt-api-secret").map(|v| v.as_bytes()),
        Some(&b"test-secret"[..])
    );
}

#[tokio::test]
async fn http_400_carries_paymennts_message_and_is_not_retried() {
    let body = r#"{"success":false,"elapsed":3,"error":"Checkout not found for API merchant"}"#;
    let (client, script) = start(vec![answer(400, body), answer(200, CHECKOUT)]).await;
    let error = client.get_checkout(&id(), ticket()).await.expect_err("400");
    assert!(!error.is_retryable());
    assert!(error.is_not_found());
    assert!(
        error
            .to_string()
            .contains("Checkout not found for API merchant"),
        "{error}"
    );
    assert_eq!(
        script.seen.lock().expect("lock").len(),
        1,
        "a 4xx must not be retried"
    );
}

#[tokio::test]
async fn an_html_404_page_is_a_failure_to_retry_not_a_missing_checkout() {
    let page = Answer {
        content_type: "text/html; charset=utf-8",
        ..answer(
            404,
            "<html><body><h1>404 Not Found</h1>Checkout not found</body></html>",
        )
    };
    let (client, script) = start(vec![page.clone(), page.clone(), page.clone(), page]).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("not paymennt");
    assert!(
        matches!(error, Error::NotPaymennt { status: 404, .. }),
        "{error:?}"
    );
    assert!(
        !error.is_not_found(),
        "an HTML page says nothing about a checkout"
    );
    assert!(error.is_retryable());
    assert!(error.is_configuration_problem());
    let text = error.to_string();
    assert!(
        text.contains(client.base_url()),
        "names the base URL: {text}"
    );
    assert!(text.contains("text/html"), "{text}");
    assert!(text.contains("base_url"), "{text}");
    assert_eq!(script.seen.lock().expect("lock").len(), 4, "retried");
}

#[tokio::test]
async fn json_that_is_not_paymennts_wrapper_is_not_a_missing_checkout() {
    // A gateway's own JSON 404 (no `success`), and a 404 wrapper without an error message.
    for body in [
        r#"{"message":"Checkout not found"}"#,
        r#"{"success":false}"#,
    ] {
        let (client, _script) = start(vec![answer(404, body); 4]).await;
        let error = client
            .get_checkout(&id(), ticket())
            .await
            .expect_err("not paymennt");
        assert!(
            matches!(error, Error::NotPaymennt { .. }),
            "{body}: {error:?}"
        );
        assert!(!error.is_not_found(), "{body}");
    }
    // paymennt's own answer, but about something else, is not "checkout not found".
    let (client, _script) = start(vec![answer(
        404,
        r#"{"success":false,"error":"Endpoint not found"}"#,
    )])
    .await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("refused");
    assert!(matches!(error, Error::Rejected { .. }), "{error:?}");
    assert!(!error.is_not_found());
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_other_host_receives_nothing() {
    let (other, other_script) = start(vec![answer(200, CHECKOUT)]).await;
    let location = format!("{}checkout/{}", other.base_url(), id());
    let redirect = Answer {
        location: Some(location.clone()),
        ..answer(302, "")
    };
    let (client, script) = start(vec![redirect]).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("redirects are refused");
    assert!(
        matches!(error, Error::Redirected { status: 302, .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&location),
        "names the Location: {error}"
    );
    assert!(!error.is_retryable());
    assert_eq!(script.seen.lock().expect("lock").len(), 1);
    assert!(
        other_script.seen.lock().expect("lock").is_empty(),
        "the credentials never reached the other listener"
    );
}

#[tokio::test]
async fn an_oversized_body_is_refused_while_it_is_read() {
    // 1.5 MiB, then the server never finishes: only a reader that stops at the cap returns
    // before the request timeout.
    let endless = Answer {
        stall_after_body: true,
        ..answer(200, &"x".repeat(MAX_BODY_BYTES + MAX_BODY_BYTES / 2))
    };
    let (client, _script) = start(vec![endless]).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("too large");
    assert!(matches!(error, Error::TooLarge { .. }), "{error:?}");
    assert!(error.to_string().contains("1048576 bytes"), "{error}");
    // A declared length over the cap is refused before reading.
    let declared = answer(200, &"y".repeat(MAX_BODY_BYTES + 1));
    let (client, _script) = start(vec![declared]).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("too large");
    assert!(matches!(error, Error::TooLarge { .. }), "{error:?}");
}

/// A client for `base` with made-up credentials, no retries and 1 s timeouts.
fn client_for(base: &str) -> Result<Client, crate::settings::SettingsError> {
    let credentials = ApiCredentials {
        key: Secret::new("k"),
        secret: Secret::new("s"),
    };
    let policy = RetryPolicy {
        max_retries: 0,
        base: Duration::from_millis(5),
        max: Duration::from_millis(10),
    };
    let second = Duration::from_secs(1);
    Client::new(base, &credentials, second, second, policy)
}

#[test]
fn plaintext_to_a_non_loopback_host_is_refused() {
    for url in [
        "http://api.paymennt.com/mer/v2.0/",
        "http://10.0.0.1/mer/v2.0/",
        "ftp://127.0.0.1/",
    ] {
        let error = client_for(url).expect_err(url);
        assert!(error.to_string().contains(url), "{error}");
    }
    for url in [
        "https://api.paymennt.com/mer/v2.0/",
        "http://127.0.0.1:9/mer/v2.0/",
        "http://[::1]:9/",
        "http://localhost:9/",
    ] {
        client_for(url).expect(url);
    }
}

#[test]
fn request_urls_are_the_base_with_segments_appended() {
    for base in [
        "https://api.paymennt.com/mer/v2.0/",
        "https://api.paymennt.com/mer/v2.0",
    ] {
        let client = client_for(base).expect(base);
        assert_eq!(
            client.url(&["checkout", "1796029149840968147"]).as_str(),
            "https://api.paymennt.com/mer/v2.0/checkout/1796029149840968147"
        );
        assert_eq!(
            client.url(&["webhooks", "7", "disable"]).as_str(),
            "https://api.paymennt.com/mer/v2.0/webhooks/7/disable"
        );
    }
    let root = client_for("http://127.0.0.1:9/").expect("root");
    assert_eq!(
        root.url(&["checkout", "link"]).as_str(),
        "http://127.0.0.1:9/checkout/link"
    );
}

#[tokio::test]
async fn paymennts_text_cannot_forge_a_log_line() {
    let forged = r#"{"success":false,"error":"Checkout not found\nINFO paywatch::payment: PAID checkout=1 order=X 100.00 AED"}"#;
    let (client, _script) = start(vec![answer(400, forged)]).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("refused");
    // The daemon logs this error as a field of one line; its text must stay one line.
    let text = error.to_string();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(!text.contains('\r'), "{text}");
    assert!(
        text.contains(r"\nINFO paywatch::payment: PAID"),
        "escaped, still readable: {text}"
    );
    assert!(error.is_not_found(), "still paymennt's not-found answer");
}

#[tokio::test]
async fn success_false_with_http_200_is_an_error() {
    let body = r#"{"success":false,"elapsed":3,"error":"Invalid request"}"#;
    let (client, _script) = start(vec![answer(200, body)]).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("success false");
    assert!(error.to_string().contains("Invalid request"), "{error}");
}

#[tokio::test]
async fn http_500_is_retried_then_succeeds() {
    let failure = r#"{"success":false,"error":"internal"}"#;
    let (client, script) = start(vec![
        answer(500, failure),
        answer(502, "oops"),
        answer(200, CHECKOUT),
    ])
    .await;
    let checkout = client
        .get_checkout(&id(), ticket())
        .await
        .expect("third attempt succeeds");
    assert_eq!(checkout.id(), &id());
    assert_eq!(script.seen.lock().expect("lock").len(), 3);
}

#[tokio::test]
async fn retries_stop_at_the_limit() {
    let failure = r#"{"success":false,"error":"internal"}"#;
    let answers = vec![answer(500, failure); 6];
    let (client, script) = start(answers).await;
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("all fail");
    assert!(error.is_retryable());
    assert_eq!(
        script.seen.lock().expect("lock").len(),
        4,
        "1 attempt + 3 retries"
    );
}

#[tokio::test]
async fn http_429_honours_retry_after() {
    let limited = Answer {
        retry_after: Some("1"),
        ..answer(429, "{}")
    };
    let (client, script) = start(vec![limited, answer(200, CHECKOUT)]).await;
    client
        .get_checkout(&id(), ticket())
        .await
        .expect("succeeds after waiting");
    let seen = script.seen.lock().expect("lock");
    assert_eq!(seen.len(), 2);
    let waited = seen[1].2.duration_since(seen[0].2);
    assert!(
        waited >= Duration::from_millis(950),
        "waited only {waited:?}"
    );
}

#[tokio::test]
async fn a_slow_answer_times_out_and_is_retried() {
    let slow = Answer {
        delay: Duration::from_secs(3),
        ..answer(200, CHECKOUT)
    };
    let (client, script) = start(vec![slow, answer(200, CHECKOUT)]).await;
    client
        .get_checkout(&id(), ticket())
        .await
        .expect("second attempt succeeds");
    assert_eq!(script.seen.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn connection_refused_is_a_retryable_network_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let credentials = ApiCredentials {
        key: Secret::new("k"),
        secret: Secret::new("s"),
    };
    let client = Client::new(
        &format!("http://{addr}/mer/v2.0/"),
        &credentials,
        Duration::from_secs(1),
        Duration::from_secs(1),
        RetryPolicy {
            max_retries: 1,
            base: Duration::from_millis(5),
            max: Duration::from_millis(10),
        },
    )
    .expect("client");
    let error = client
        .get_checkout(&id(), ticket())
        .await
        .expect_err("refused");
    assert!(matches!(error, Error::Connect(_)), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(error.reached(), Reached::No, "no connection: never sent");
    assert!(error.may_send_again());
    assert!(!error.to_string().contains('s') || !error.to_string().contains("secret"));
}

#[tokio::test]
async fn an_answer_may_omit_the_coordinates_but_not_half_of_them() {
    // Get Checkout need not repeat where the document is (the create-link response said so).
    let body =
        r#"{"success":true,"result":{"id":"1","amount":1,"currency":"AED","status":"PAID"}}"#;
    let partial = r#"{"success":true,"result":{"id":"1","amount":1,"currency":"AED","status":"PAID","firebaseDatabase":"p"}}"#;
    let (client, _script) = start(vec![answer(200, body), answer(200, partial)]).await;
    let verified = client
        .get_checkout(&"1".parse().expect("id"), ticket())
        .await
        .expect("no coordinates is fine for an answer");
    assert_eq!(verified.facts().location, None);
    let error = client
        .get_checkout(&"1".parse().expect("id"), ticket())
        .await
        .expect_err("half the coordinates");
    assert!(error.to_string().contains("firebaseCollection"), "{error}");
}

#[tokio::test]
async fn unknown_status_is_kept() {
    let body = CHECKOUT.replace("\"PENDING\"", "\"On hold\"");
    let (client, _script) = start(vec![answer(200, &body)]).await;
    let checkout = client
        .get_checkout(&id(), ticket())
        .await
        .expect("unknown status is fine");
    assert_eq!(
        checkout.status(),
        &CheckoutStatus::Unknown("On hold".into())
    );
}

#[tokio::test]
async fn search_sends_the_filters() {
    let page = r#"{"success":true,"result":{"page":0,"size":20,"totalPages":1,"totalElements":0,"content":[]}}"#;
    let (client, script) = start(vec![answer(200, page)]).await;
    let query = SearchQuery {
        order_id: Some("ORD 1&2".into()),
        statuses: vec![CheckoutStatus::Paid, CheckoutStatus::PartiallyRefunded],
        ..SearchQuery::default()
    };
    let result = client.search(&query).await.expect("page");
    assert_eq!(result.total_elements, 0);
    let seen = script.seen.lock().expect("lock");
    assert_eq!(
        seen[0].0,
        "/mer/v2.0/checkout?orderId=ORD+1%262&status=PAID%2CPARTIALLY_REFUNDED"
    );
}

#[test]
fn backoff_grows_and_is_capped() {
    let policy = RetryPolicy {
        max_retries: 10,
        base: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let error = Error::Network("x".into());
    for retry in 0..10 {
        let delay = policy.delay(retry, &error);
        let ceiling = (Duration::from_millis(100) * 2u32.pow(retry)).min(Duration::from_secs(1));
        assert!(
            delay <= ceiling && delay >= ceiling / 2,
            "retry {retry}: {delay:?}"
        );
    }
    let limited = Error::RateLimited {
        retry_after: Some(Duration::from_secs(120)),
    };
    assert_eq!(policy.delay(0, &limited), Duration::from_secs(1));
}

fn link_request(order_id: &str, request_id: &str) -> LinkRequest {
    LinkRequest {
        request_id: request_id.to_owned(),
        order_id: order_id.to_owned(),
        ..LinkRequest::default()
    }
}

/// Issue 20 §3: one `link create` made five links. A create whose answer is late is not sent
/// again: paymennt may have made the link.
#[tokio::test]
async fn a_create_that_times_out_is_not_sent_again() {
    let slow = Answer {
        delay: Duration::from_secs(2),
        ..answer(200, CHECKOUT)
    };
    let (client, script) = start(vec![slow, answer(200, CHECKOUT)]).await;
    let error = client
        .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
        .await
        .expect_err("the answer came after the timeout");
    assert!(matches!(error, Error::Timeout(_)), "{error:?}");
    assert_eq!(error.reached(), Reached::Maybe);
    assert_eq!(script.seen.lock().expect("lock").len(), 1, "sent once");
}

#[tokio::test]
async fn a_create_answered_with_a_5xx_or_an_unreadable_2xx_is_not_sent_again() {
    for first in [
        answer(500, r#"{"success":false,"error":"internal"}"#),
        answer(503, "<html>maintenance</html>"),
        answer(200, r#"{"success":true,"result":{"id":"#),
        Answer {
            content_type: "text/html",
            ..answer(200, "<html>hello</html>")
        },
    ] {
        let status = first.status;
        let (client, script) = start(vec![first, answer(200, CHECKOUT)]).await;
        let error = client
            .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
            .await
            .expect_err("first answer is a failure");
        assert_eq!(error.reached(), Reached::Maybe, "{status}: {error:?}");
        assert!(!error.may_send_again(), "{status}: {error:?}");
        assert_eq!(
            script.seen.lock().expect("lock").len(),
            1,
            "{status}: sent once"
        );
    }
}

#[tokio::test]
async fn a_create_is_sent_again_after_a_429_with_retry_after_only() {
    let limited = Answer {
        retry_after: Some("0"),
        ..answer(429, r#"{"success":false,"error":"slow down"}"#)
    };
    let (client, script) = start(vec![limited, answer(200, CHECKOUT)]).await;
    client
        .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
        .await
        .expect("sent again after paymennt's Retry-After");
    assert_eq!(script.seen.lock().expect("lock").len(), 2);

    let bare = answer(429, r#"{"success":false,"error":"slow down"}"#);
    let (client, script) = start(vec![bare, answer(200, CHECKOUT)]).await;
    let error = client
        .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
        .await
        .expect_err("a 429 without Retry-After is not sent again");
    assert_eq!(error.reached(), Reached::Answered);
    assert_eq!(script.seen.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn a_create_refused_by_paymennt_is_answered_not_unknown() {
    let (client, script) = start(vec![answer(
        400,
        r#"{"success":false,"error":"Invalid amount"}"#,
    )])
    .await;
    let error = client
        .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
        .await
        .expect_err("refused");
    assert_eq!(error.reached(), Reached::Answered);
    assert_eq!(script.seen.lock().expect("lock").len(), 1);
}

/// A connection reset after the request was sent: paymennt may have it.
#[tokio::test]
async fn a_create_whose_connection_is_reset_after_sending_is_not_sent_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Read the whole request (headers and body), then close without an answer.
            let mut buffer = vec![0u8; 64 * 1024];
            let mut read = Vec::new();
            while let Ok(n) = socket.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                read.extend_from_slice(&buffer[..n]);
                if read.windows(4).any(|w| w == b"\r\n\r\n") && read.ends_with(b"}") {
                    break;
                }
            }
            drop(socket);
        }
    });
    let client = Client::new(
        &format!("http://{addr}/mer/v2.0/"),
        &ApiCredentials {
            key: Secret::new("k"),
            secret: Secret::new("s"),
        },
        Duration::from_secs(1),
        Duration::from_secs(2),
        RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(5),
            max: Duration::from_millis(10),
        },
    )
    .expect("client");
    let error = client
        .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
        .await
        .expect_err("closed without an answer");
    assert!(matches!(error, Error::Network(_)), "{error:?}");
    assert_eq!(error.reached(), Reached::Maybe);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one connection, one request"
    );
}

/// Connect refused: the request never left, so it is sent again once paymennt is there.
#[tokio::test]
async fn a_create_is_sent_again_when_no_connection_could_be_made() {
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let script = Arc::new(Script {
        answers: Mutex::new(vec![answer(200, CHECKOUT)].into()),
        ..Script::default()
    });
    let client = Client::new(
        &format!("http://{addr}/mer/v2.0/"),
        &ApiCredentials {
            key: Secret::new("k"),
            secret: Secret::new("s"),
        },
        Duration::from_secs(1),
        Duration::from_secs(2),
        RetryPolicy {
            max_retries: 20,
            base: Duration::from_millis(100),
            max: Duration::from_millis(200),
        },
    )
    .expect("client");
    let create = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .create_link(&link_request("ORD-1234", "ORD-1234-r1"), ticket())
                .await
        }
    });
    // The first attempt is refused (nothing listens); paymennt then comes up on the address.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!create.is_finished(), "still trying");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let app = Router::new()
        .fallback(any(serve))
        .with_state(script.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let created = create.await.expect("join").expect("sent again and created");
    assert_eq!(created.id(), &id());
    assert_eq!(
        script.seen.lock().expect("lock").len(),
        1,
        "one request arrived"
    );
}

#[test]
fn only_a_call_that_never_left_or_a_429_with_retry_after_may_be_sent_again() {
    let cases: Vec<(Error, Reached, bool)> = vec![
        (Error::Connect("refused".into()), Reached::No, true),
        (Error::Network("reset".into()), Reached::Maybe, false),
        (
            Error::Timeout(Duration::from_secs(1)),
            Reached::Maybe,
            false,
        ),
        (
            Error::Server {
                status: 502,
                message: "x".into(),
            },
            Reached::Maybe,
            false,
        ),
        (Error::Malformed("x".into()), Reached::Maybe, false),
        (
            Error::TooLarge {
                base_url: "b".into(),
                limit: 1,
            },
            Reached::Maybe,
            false,
        ),
        (
            Error::NotPaymennt {
                base_url: "b".into(),
                status: 200,
                content_type: "text/html".into(),
                excerpt: "x".into(),
            },
            Reached::Maybe,
            false,
        ),
        (
            Error::NotPaymennt {
                base_url: "b".into(),
                status: 404,
                content_type: "text/html".into(),
                excerpt: "x".into(),
            },
            Reached::Answered,
            false,
        ),
        (
            Error::RateLimited {
                retry_after: Some(Duration::from_secs(1)),
            },
            Reached::Answered,
            true,
        ),
        (
            Error::RateLimited { retry_after: None },
            Reached::Answered,
            false,
        ),
        (
            Error::Rejected {
                status: 400,
                message: "x".into(),
            },
            Reached::Answered,
            false,
        ),
        (
            Error::Redirected {
                status: 302,
                location: "x".into(),
            },
            Reached::Answered,
            false,
        ),
    ];
    for (error, reached, again) in cases {
        assert_eq!(error.reached(), reached, "{error:?}");
        assert_eq!(error.may_send_again(), again, "{error:?}");
    }
}

#[tokio::test]
async fn find_link_searches_the_orders_links_and_matches_the_request_id() {
    let page = r#"{"success":true,"result":{"page":0,"size":100,"totalPages":1,"totalElements":2,"content":[
        {"id":"1653241101733169555","requestId":"ORD-1234-other","orderId":"ORD-1234"},
        {"id":"1653241101733169556","requestId":"ORD-1234-r1","orderId":"ORD-1234"}]}}"#;
    let (client, script) = start(vec![answer(200, page), answer(200, CHECKOUT)]).await;
    let since = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:14:05Z")
        .expect("time")
        .with_timezone(&Utc);
    let found = client
        .find_link(&link_request("ORD-1234", "ORD-1234-r1"), since, ticket())
        .await
        .expect("search and get")
        .expect("found");
    assert_eq!(found.id(), &id());
    {
        let seen = script.seen.lock().expect("lock");
        assert_eq!(
            seen[0].0,
            "/mer/v2.0/checkout?type=LINK&afterTimestamp=2026-01-02+03%3A04%3A05&orderId=ORD-1234&requestId=ORD-1234-r1&page=0&size=100"
        );
        assert_eq!(seen[1].0, "/mer/v2.0/checkout/1653241101733169556");
    }

    let empty = r#"{"success":true,"result":{"page":0,"size":100,"totalPages":0,"totalElements":0,"content":[]}}"#;
    let (client, _script) = start(vec![answer(200, empty)]).await;
    assert!(
        client
            .find_link(&link_request("ORD-1234", "ORD-1234-r1"), since, ticket())
            .await
            .expect("search")
            .is_none()
    );
}

#[tokio::test]
async fn a_webhook_registration_whose_answer_is_lost_is_not_sent_again() {
    let webhook =
        r#"{"success":true,"result":{"id":"7","address":"https://a.example/","enabled":true}}"#;
    let (client, script) = start(vec![
        answer(502, r#"{"success":false,"error":"bad gateway"}"#),
        answer(200, webhook),
    ])
    .await;
    let error = client
        .create_webhook("https://a.example/")
        .await
        .expect_err("the first answer is a 502");
    assert_eq!(error.reached(), Reached::Maybe);
    assert_eq!(script.seen.lock().expect("lock").len(), 1, "sent once");
}

/// Issue 22: the interactive commands are told of each retry (a line on stderr); a create
/// whose answer is lost is not retried, so its observer sees no retry.
#[tokio::test]
async fn the_retry_observer_sees_each_retry_of_a_read_and_none_of_a_lost_create() {
    let failure = r#"{"success":false,"error":"internal"}"#;
    let (client, _script) = start(vec![
        answer(500, failure),
        answer(502, "oops"),
        answer(200, CHECKOUT),
        answer(500, failure),
    ])
    .await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let client = client.with_retry_notice(Arc::new(move |event: &CallEvent<'_>| {
        let line = match event {
            CallEvent::Sending => "sending".to_owned(),
            CallEvent::Retrying {
                error,
                attempt,
                attempts,
                ..
            } => format!("retry {attempt}/{attempts}: {}", error.is_retryable()),
            CallEvent::Finished => "finished".to_owned(),
        };
        log.lock().expect("lock").push(line);
    }));
    client
        .get_checkout(&id(), ticket())
        .await
        .expect("third attempt succeeds");
    assert_eq!(
        *seen.lock().expect("lock"),
        ["sending", "retry 2/4: true", "retry 3/4: true", "finished"]
    );
    seen.lock().expect("lock").clear();
    client
        .create_link(&link_request("ORD-1", "ORD-1-r1"), ticket())
        .await
        .expect_err("a 5xx");
    assert_eq!(*seen.lock().expect("lock"), ["sending", "finished"]);
}
