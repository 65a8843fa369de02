//! The HTTP routes: one handler per endpoint, answering JSON.
//!
//! Owns: mapping requests to the webhook intake, the track code shared with `paywatch track`,
//! and the health checks, and their outcomes to status codes and small JSON bodies.
//! Must never: trust a webhook body's status, or compare the bearer token in variable time.
//!
//! | route | answers |
//! | --- | --- |
//! | `POST /webhooks/paymennt` | 202 `{"accepted": true}` (the same for tracked, untracked and id-less notifications), 400 malformed, 401 bad or missing signature, 413 too large, 429 too many from the address |
//! | `POST /v1/checkouts` | 201 tracked, 200 already tracked (the `--json` shape), 400 naming the field, 401 bad token, 404 off (no token configured) |
//! | (both above, on a standby daemon) | 503 `{"error": "standby: ..."}` |
//! | `GET /healthz` | 200 / 503 `{ok, problems}` |
//! | `GET /readyz` | 200 / 503 `{ready, problems, streams, streams_connected}` (a standby: 503, its problem "standby: ...") |
//!
//! A new route is one `.route(...)` line in [`router`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{HttpContext, NewlyTracked, TrackEndpoint};
use crate::domain::Source;
use crate::ledger::TrackOutcome;
use crate::sources::Nudge;
use crate::sources::webhook::Intake;

/// The listener's routes over `context`.
pub fn router(context: Arc<HttpContext>) -> Router {
    let limit = context.max_body_bytes;
    Router::new()
        .route("/webhooks/paymennt", post(webhook))
        .route("/v1/checkouts", post(track))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(context)
}

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A standby daemon takes no webhook and no checkout: 503 naming why, so a load balancer
/// (which follows `/readyz`) or the sender tries the active daemon.
fn refused_on_standby(context: &HttpContext) -> Option<Response> {
    context.health.standby().map(|why| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{why}; send this to the active daemon"),
        )
    })
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint: paywatch serves POST /webhooks/paymennt, POST /v1/checkouts, GET /healthz, GET /readyz and GET /metrics",
    )
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: webhooks and checkouts take POST, /healthz, /readyz and /metrics take GET",
    )
}

/// A body that could not be read: too large (413) or cut off (400).
fn body_rejected(rejection: &BytesRejection, limit: usize) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {limit} bytes ([http] max_body_bytes)"),
        )
    } else {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the body cannot be read: {rejection}"),
        )
    }
}

async fn webhook(
    State(context): State<Arc<HttpContext>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(refused) = refused_on_standby(&context) {
        return refused;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_rejected(&rejection, context.max_body_bytes),
    };
    let signature = headers
        .get(&context.signature_header)
        .map(HeaderValue::as_bytes);
    match context.intake.receive(from.ip(), signature, &body).await {
        // One body for every accepted notification: tracked, untracked or naming none.
        Intake::Accepted => {
            (StatusCode::ACCEPTED, Json(json!({ "accepted": true }))).into_response()
        }
        Intake::Malformed(message) => error(StatusCode::BAD_REQUEST, &message),
        Intake::BadSignature => error(
            StatusCode::UNAUTHORIZED,
            &format!(
                "the {} signature does not match the configured key",
                context.signature_header
            ),
        ),
        Intake::Unsigned => error(
            StatusCode::UNAUTHORIZED,
            &format!(
                "the notification carries no {} signature, and this listener requires one",
                context.signature_header
            ),
        ),
        Intake::RateLimited { retry_after } => {
            let seconds = retry_after.as_secs().max(1);
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("too many notifications from this address; retry in {seconds} s"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
        Intake::Unavailable(message) => error(StatusCode::SERVICE_UNAVAILABLE, &message),
    }
}

/// Whether the request's `Authorization: Bearer` token is `endpoint`'s (constant-time).
fn authorized(headers: &HeaderMap, endpoint: &TrackEndpoint) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    bool::from(given.trim_ascii().ct_eq(endpoint.token.expose().as_bytes()))
}

async fn track(
    State(context): State<Arc<HttpContext>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(refused) = refused_on_standby(&context) {
        return refused;
    }
    let Some(endpoint) = &context.track else {
        return error(
            StatusCode::NOT_FOUND,
            "the track endpoint is off: set [http] token (or token_file, or the systemd credential paywatch-http-token) to turn it on",
        );
    };
    if !authorized(&headers, endpoint) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send 'Authorization: Bearer <[http] token>'",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_rejected(&rejection, context.max_body_bytes),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "request body: not UTF-8 text");
    };
    let facts = match crate::paymennt::intake::track_input(text, "request body") {
        Ok(facts) => facts,
        Err(rejected) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": rejected.message, "field": rejected.field })),
            )
                .into_response();
        }
    };
    let seen_at = Instant::now();
    let ledger = &endpoint.ledger;
    let tracked = async {
        let outcome = ledger
            .track(&facts, crate::ledger::TrackedVia::Track)
            .await?;
        let record = ledger.checkout(&facts.id).await?;
        Ok::<_, crate::ledger::LedgerError>((outcome, record))
    }
    .await;
    let (outcome, record) = match tracked {
        Ok((outcome, Some(record))) => (outcome, record),
        Ok((_, None)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the checkout vanished from the ledger",
            );
        }
        Err(problem) => {
            tracing::error!(checkout = %facts.id, error = %problem, "track endpoint: cannot record the checkout");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the checkout cannot be recorded in the ledger; see paywatch's log",
            );
        }
    };
    let status = match outcome {
        TrackOutcome::Added => {
            tracing::info!(checkout = %facts.id, "tracked through the HTTP track endpoint");
            if let Some(location) = facts.location.clone() {
                let _ = endpoint
                    .watch
                    .send(NewlyTracked {
                        checkout_id: facts.id.clone(),
                        location,
                    })
                    .await;
            }
            let _ = endpoint
                .nudges
                .send(Nudge {
                    checkout_id: facts.id.clone(),
                    source: Source::Manual,
                    seen_at,
                    changed_at: None,
                    seen_after: None,
                    ticket: None,
                })
                .await;
            StatusCode::CREATED
        }
        TrackOutcome::AlreadyTracked => StatusCode::OK,
    };
    (status, Json(record)).into_response()
}

async fn healthz(State(context): State<Arc<HttpContext>>) -> Response {
    let liveness = context.health.liveness().await;
    let status = if liveness.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(liveness)).into_response()
}

/// The Prometheus text exposition (see [`crate::metrics`]); 503 naming the problem when the
/// ledger gauges cannot be read.
async fn metrics(State(context): State<Arc<HttpContext>>) -> Response {
    metrics_response(&context.metrics, &context.ledger).await
}

/// `/metrics`' answer: 200 with the text, or 503 naming the error (logged at warn).
pub(super) async fn metrics_response(
    metrics: &crate::metrics::Metrics,
    ledger: &crate::ledger::Ledger,
) -> Response {
    match super::metrics_exposition(metrics, ledger).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::warn!("/metrics: {error}; check the ledger file and its disk");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{error}\n"),
            )
                .into_response()
        }
    }
}

async fn readyz(State(context): State<Arc<HttpContext>>) -> Response {
    let readiness = context.health.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn the_http_answer_is_the_text_format_or_a_503_naming_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("paywatch.db");
        let ledger = Ledger::open(&path).await.expect("ledger");
        let verified = crate::paymennt::VerifiedCheckout::for_tests(
            r#"{"id":"1","currency":"AED","amount":1,"status":"PENDING","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d1"}"#,
        );
        ledger
            .apply(
                &verified,
                Source::Reconcile,
                None,
                &[],
                std::time::Duration::from_secs(60),
            )
            .await
            .expect("recorded");
        let metrics = Metrics::new();

        let response = metrics_response(&metrics, &ledger).await;
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(
            response.headers().get(http::header::CONTENT_TYPE),
            Some(&http::HeaderValue::from_static(
                crate::metrics::CONTENT_TYPE
            ))
        );
        assert_eq!(
            crate::metrics::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        assert!(
            text.contains("# TYPE paywatch_checkouts_watched gauge\n"),
            "{text}"
        );

        // A row edited by hand into garbage: the scrape fails loudly instead of serving zeros.
        let raw = rusqlite::Connection::open(&path).expect("raw open");
        raw.execute("UPDATE checkouts SET created_at = 'yesterday'", [])
            .expect("corrupt");
        let response = metrics_response(&metrics, &ledger).await;
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        assert!(
            text.contains("cannot read the ledger for /metrics")
                && text.contains("checkouts.created_at 'yesterday'"),
            "{text}"
        );
    }
}
