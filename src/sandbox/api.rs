//! The sandbox's HTTP side: paymennt's Merchant API under `/mer/v2.0/`, the admin endpoints under
//! `/_sandbox/`, and the payment page under `/pay/` ([`crate::sandbox::pay_page`]).
//!
//! Owns: routes, request parsing, paymennt's `{success, elapsed, error, result}` wrapper, the API
//! key check, and applying injected API faults (latency, 500, 429, a create answered late) and
//! the Get Checkout counter.
//! Must never: change a checkout except through [`SandboxState`], or answer with anything but the
//! wrapper on the Merchant API (no plain-text rejections, not even for malformed JSON; `GET
//! /webhooks` answers an array of wrappers, as paymennt's spec says).
//!
//! # Admin endpoints (no authentication: the sandbox is a loopback tool; never expose it)
//!
//! | method and path | does |
//! | --- | --- |
//! | `GET /_sandbox/checkouts` | every checkout, oldest first (not counted as Get Checkout) |
//! | `GET /_sandbox/checkouts/{id}` | one checkout (not counted as Get Checkout) |
//! | `POST /_sandbox/checkouts/{id}/{pay,fail,cancel,expire,authorize,refund}` | the action; `refund?amount=X` refunds part |
//! | `POST /_sandbox/documents/{id}` body `{"status": "PAID"}` | sets the document's status, not the checkout's (a lying document) |
//! | `DELETE /_sandbox/documents/{id}` | deletes the document upstream; the checkout stays |
//! | `GET /_sandbox/faults` | fault settings and Get Checkout counts |
//! | `POST /_sandbox/faults` body [`FaultUpdate`] | changes faults; `{"close_listen_streams": true}` drops Listen streams; `{"refuse_listen_documents": ["doc-id"]}` refuses those documents' Listen targets (PERMISSION_DENIED); `{"create_answer_delay_ms": 700}` answers Create payment link and Create new webhook that long after making the link or webhook; `{"resume_token_max_age_ms": 1000}` makes older resume tokens get the full state (0: never) |
//! | `GET /_sandbox/firebase-auth` | Firebase Auth counters: sign-ups, refreshes, refused sign-ups, the hourly sign-up limit (served by [`crate::sandbox::auth`]) |
//!
//! Admin answers use the same wrapper; an unknown checkout is HTTP 404 there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Serialize;

use crate::domain::{CheckoutId, CheckoutStatus, Currency, parse_decimal, printable};
use crate::paymennt::wire::{CheckoutPage, EnvelopeOut, LinkRequest};
use crate::sandbox::faults::{ApiFault, FaultSettings, FaultUpdate};
use crate::sandbox::pay_page;
use crate::sandbox::state::{CheckoutAction, SandboxError, SandboxState, SearchFilter};

/// The Merchant API's base path (the daemon's `base_url` ends with it plus `/`).
pub const API_BASE_PATH: &str = "/mer/v2.0";

/// The API key headers, as paymennt's spec names them.
const API_KEY_HEADER: &str = "x-paymennt-api-key";
const API_SECRET_HEADER: &str = "x-paymennt-api-secret";

/// What the HTTP side needs: the state and the credentials it accepts.
#[derive(Clone)]
pub struct ApiContext {
    /// The shared state.
    pub state: SandboxState,
    /// The accepted `X-Paymennt-Api-Key` and `X-Paymennt-Api-Secret`.
    pub credentials: Arc<ApiCredentials>,
}

/// The payment page needs only the state.
impl axum::extract::FromRef<ApiContext> for SandboxState {
    fn from_ref(context: &ApiContext) -> SandboxState {
        context.state.clone()
    }
}

/// The one key pair the sandbox accepts.
pub struct ApiCredentials {
    /// `X-Paymennt-Api-Key`.
    pub api_key: String,
    /// `X-Paymennt-Api-Secret`.
    pub api_secret: String,
}

impl std::fmt::Debug for ApiCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCredentials")
            .field("api_key", &self.api_key)
            .field("api_secret", &"<redacted>")
            .finish()
    }
}

/// When the request arrived, for the wrapper's `elapsed`.
#[derive(Debug, Clone, Copy)]
struct RequestStart(Instant);

impl RequestStart {
    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.0.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// The whole HTTP app: Merchant API, admin endpoints and payment page.
pub fn router(context: ApiContext) -> Router {
    let merchant = Router::new()
        .route("/checkout/link", post(create_link))
        .route("/checkout", get(search_checkouts))
        .route("/checkout/{checkout_id}", get(get_checkout))
        .route("/checkout/{checkout_id}/cancel", post(cancel_checkout))
        .route("/checkout/{checkout_id}/refund", post(refund_checkout))
        .route("/webhooks", get(list_webhooks).post(create_webhook))
        .route("/webhooks/{webhook_id}", get(get_webhook))
        .route("/webhooks/{webhook_id}/{action}", post(webhook_action))
        .fallback(merchant_not_found)
        .method_not_allowed_fallback(merchant_method_not_allowed)
        .layer(middleware::from_fn_with_state(
            context.clone(),
            merchant_gate,
        ));
    let admin = Router::new()
        .route("/checkouts", get(admin_list))
        .route("/checkouts/{checkout_id}", get(admin_get))
        .route("/checkouts/{checkout_id}/{action}", post(admin_action))
        .route(
            "/documents/{checkout_id}",
            post(admin_lie_document).delete(admin_delete_document),
        )
        .route("/faults", get(admin_faults).post(admin_update_faults))
        .layer(middleware::from_fn(stamp_start));
    Router::new()
        .nest(API_BASE_PATH, merchant)
        .nest("/_sandbox", admin)
        .route(
            "/pay/{checkout_key}",
            get(pay_page::show).post(pay_page::pay),
        )
        .route("/pay/{checkout_key}/cancel", post(pay_page::cancel))
        .with_state(context)
}

/// Counts Get Checkout calls, applies injected faults, checks the API key, then hands on.
async fn merchant_gate(
    State(context): State<ApiContext>,
    mut request: Request,
    next: Next,
) -> Response {
    let start = RequestStart(Instant::now());
    if request.method() == Method::GET
        && let Some(checkout_id) = get_checkout_target(request.uri().path())
    {
        context.state.faults().count_get_checkout(checkout_id);
    }
    let is_search = request.method() == Method::GET && is_search_path(request.uri().path());
    if is_search {
        context.state.faults().count_search();
    }
    let latency = context.state.faults().api_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match context.state.faults().next_api_fault() {
        ApiFault::None => {}
        ApiFault::ServerError => {
            return failure(
                start,
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error (injected by the sandbox)",
            );
        }
        ApiFault::Throttled {
            retry_after_seconds,
        } => {
            let mut response = failure(
                start,
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests (injected by the sandbox)",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
            return response;
        }
    }
    if !authorized(request.headers(), &context.credentials) {
        return failure(
            start,
            StatusCode::UNAUTHORIZED,
            "Unauthorized: missing or invalid X-Paymennt-Api-Key / X-Paymennt-Api-Secret",
        );
    }
    if is_search && context.state.faults().search_refused() {
        return failure(
            start,
            StatusCode::FORBIDDEN,
            "Forbidden: this API key may not search checkouts (refused by the sandbox)",
        );
    }
    request.extensions_mut().insert(start);
    next.run(request).await
}

/// Stamps the arrival time for admin requests.
async fn stamp_start(mut request: Request, next: Next) -> Response {
    request
        .extensions_mut()
        .insert(RequestStart(Instant::now()));
    next.run(request).await
}

/// The checkout id of a Get Checkout path (`/checkout/{id}`, with or without the base path).
fn get_checkout_target(path: &str) -> Option<&str> {
    let path = path.strip_prefix(API_BASE_PATH).unwrap_or(path);
    let id = path.strip_prefix("/checkout/")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Whether a path is Search Checkouts (`/checkout`, with or without the base path).
fn is_search_path(path: &str) -> bool {
    let path = path.strip_prefix(API_BASE_PATH).unwrap_or(path);
    path == "/checkout" || path == "/checkout/"
}

fn authorized(headers: &HeaderMap, credentials: &ApiCredentials) -> bool {
    let matches = |name: &str, expected: &str| {
        headers
            .get(name)
            .is_some_and(|value| value.as_bytes() == expected.as_bytes())
    };
    matches(API_KEY_HEADER, &credentials.api_key)
        && matches(API_SECRET_HEADER, &credentials.api_secret)
}

/// `{success: true, elapsed, result}` with HTTP 200.
fn success<T: Serialize>(start: RequestStart, result: T) -> Response {
    let body = EnvelopeOut {
        success: true,
        elapsed: start.elapsed_ms(),
        error: None,
        result: Some(result),
    };
    (StatusCode::OK, Json(body)).into_response()
}

/// `{success: false, elapsed, error}` with `status`.
fn failure(start: RequestStart, status: StatusCode, message: &str) -> Response {
    let body = EnvelopeOut::<()> {
        success: false,
        elapsed: start.elapsed_ms(),
        error: Some(message.to_owned()),
        result: None,
    };
    (status, Json(body)).into_response()
}

/// A state error as the Merchant API answers it.
fn merchant_failure(start: RequestStart, error: &SandboxError) -> Response {
    let status = match error {
        SandboxError::BadRequest(_) | SandboxError::NotFound => StatusCode::BAD_REQUEST,
        SandboxError::DocumentWrite(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    failure(start, status, &error.to_string())
}

fn checkout_not_found(start: RequestStart) -> Response {
    merchant_failure(start, &SandboxError::NotFound)
}

async fn merchant_not_found(request: Request) -> Response {
    let start = started(&request);
    failure(start, StatusCode::NOT_FOUND, "No such endpoint")
}

async fn merchant_method_not_allowed(request: Request) -> Response {
    let start = started(&request);
    failure(start, StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
}

fn started(request: &Request) -> RequestStart {
    request
        .extensions()
        .get::<RequestStart>()
        .copied()
        .unwrap_or(RequestStart(Instant::now()))
}

/// Parses a path checkout id; an id that cannot exist is simply not found.
fn path_checkout_id(path: Result<Path<String>, PathRejection>) -> Option<CheckoutId> {
    path.ok().and_then(|Path(id)| id.parse().ok())
}

async fn create_link(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = match parse_link_request(body) {
        Ok(request) => request,
        Err(message) => return failure(start, StatusCode::BAD_REQUEST, &message),
    };
    match context.state.create_link(&request).await {
        Ok(checkout) => {
            // The link exists from here on; a slow answer does not undo it.
            let delay = context.state.faults().create_answer_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            success(start, checkout)
        }
        Err(error) => merchant_failure(start, &error),
    }
}

/// Parses a create-link body, naming the first missing required field.
fn parse_link_request(body: Result<Bytes, BytesRejection>) -> Result<LinkRequest, String> {
    let body = body.map_err(|rejection| format!("Invalid request body: {rejection}"))?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|error| format!("Malformed JSON request body: {error}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "The request body must be a JSON object".to_owned())?;
    for name in ["requestId", "orderId", "description", "currency", "amount"] {
        if object.get(name).is_none_or(serde_json::Value::is_null) {
            return Err(format!("{name} is required"));
        }
    }
    // Parsed again from the bytes (not the Value) so the amount keeps its exact digits.
    serde_json::from_slice(&body).map_err(|error| format!("Invalid request: {error}"))
}

async fn get_checkout(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    match path_checkout_id(path).and_then(|id| context.state.checkout(&id)) {
        Some(checkout) => success(start, checkout),
        None => checkout_not_found(start),
    }
}

async fn search_checkouts(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return failure(start, StatusCode::BAD_REQUEST, "Invalid query string");
    };
    match search(&context.state, &query) {
        Ok(page) => success(start, page),
        Err(message) => failure(start, StatusCode::BAD_REQUEST, &message),
    }
}

/// Search Checkouts as paymennt's OpenAPI spec describes it: `type`, `orderId`, `requestId`,
/// `status` (a comma-separated list, either spelling), `afterId`, `afterTimestamp`
/// (`yyyy-mm-dd HH:MM:SS`, UTC), `page` (from 0) and `size` (at least 1, default 20); results
/// ordered by id. Anything malformed is a 400 naming the parameter.
fn search(state: &SandboxState, query: &HashMap<String, String>) -> Result<CheckoutPage, String> {
    let number = |name: &str, default: i64, min: i64| -> Result<i64, String> {
        match query.get(name) {
            None => Ok(default),
            Some(text) => text
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= min)
                .ok_or_else(|| {
                    format!(
                        "{name} '{}' must be a whole number ≥ {min}",
                        printable(text)
                    )
                }),
        }
    };
    let page = number("page", 0, 0)?;
    let size = number("size", 20, 1)?;
    let mut statuses = Vec::new();
    if let Some(list) = query.get("status") {
        for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match CheckoutStatus::parse(text) {
                CheckoutStatus::Unknown(_) => {
                    return Err(format!(
                        "status '{}' is not a checkout status",
                        printable(text)
                    ));
                }
                status => statuses.push(status),
            }
        }
    }
    let kind = match query.get("type").map(|t| t.trim()) {
        None | Some("") => None,
        Some(kind) if crate::paymennt::wire::CHECKOUT_TYPES.contains(&kind) => {
            Some(kind.to_owned())
        }
        Some(other) => {
            return Err(format!(
                "type '{}' is not one of {}",
                printable(other),
                crate::paymennt::wire::CHECKOUT_TYPES.join(", ")
            ));
        }
    };
    let after_id = match query.get("afterId") {
        None => None,
        Some(text) => Some(
            text.trim()
                .parse::<u128>()
                .map_err(|_| format!("afterId '{}' must be a whole number", printable(text)))?,
        ),
    };
    let after_timestamp = match query.get("afterTimestamp") {
        None => None,
        Some(text) => Some(
            chrono::NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S")
                .map_err(|_| {
                    format!(
                        "afterTimestamp '{}' must be a date and time as yyyy-mm-dd HH:MM:SS",
                        printable(text)
                    )
                })?
                .and_utc(),
        ),
    };
    let filter = SearchFilter {
        order_id: query.get("orderId").cloned(),
        request_id: query.get("requestId").cloned(),
        statuses,
        kind,
        after_id,
        after_timestamp,
    };
    let matching = state.search(&filter);
    let total = i64::try_from(matching.len()).unwrap_or(i64::MAX);
    let skip = usize::try_from(page.saturating_mul(size)).unwrap_or(usize::MAX);
    let take = usize::try_from(size).unwrap_or(usize::MAX);
    Ok(CheckoutPage {
        page,
        size,
        total_pages: (total + size - 1) / size,
        total_elements: total,
        content: matching.into_iter().skip(skip).take(take).collect(),
    })
}

async fn cancel_checkout(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(id) = path_checkout_id(path) else {
        return checkout_not_found(start);
    };
    match context.state.cancel(&id).await {
        Ok(checkout) => success(start, checkout),
        Err(error) => merchant_failure(start, &error),
    }
}

async fn refund_checkout(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return failure(start, StatusCode::BAD_REQUEST, "Invalid query string");
    };
    let required = |name: &str| {
        query
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{name} is required"))
    };
    let parsed = (|| {
        let amount_text = required("amount")?;
        let amount = parse_decimal(amount_text)
            .filter(|amount| *amount > rust_decimal::Decimal::ZERO)
            .ok_or_else(|| "amount must be a number greater than 0".to_owned())?;
        let currency: Currency = required("currency")?
            .parse()
            .map_err(|_| "currency must be a 3-letter ISO 4217 code".to_owned())?;
        required("note")?;
        Ok::<_, String>((amount, currency))
    })();
    let (amount, currency) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return failure(start, StatusCode::BAD_REQUEST, &message),
    };
    let Some(id) = path_checkout_id(path) else {
        return checkout_not_found(start);
    };
    let Some(existing) = context.state.checkout(&id) else {
        return checkout_not_found(start);
    };
    if existing.currency.as_deref() != Some(currency.as_str()) {
        let message = format!(
            "currency {currency} does not match the checkout currency {}",
            existing.currency.as_deref().unwrap_or("?")
        );
        return failure(start, StatusCode::BAD_REQUEST, &message);
    }
    match context.state.refund(&id, Some(amount)).await {
        Ok(checkout) => success(start, checkout),
        Err(error) => merchant_failure(start, &error),
    }
}

/// `WebhookResponse`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookOut {
    id: String,
    hmac_key: String,
    address: String,
    failed: bool,
    enabled: bool,
}

impl From<crate::sandbox::state::WebhookRecord> for WebhookOut {
    fn from(hook: crate::sandbox::state::WebhookRecord) -> WebhookOut {
        WebhookOut {
            id: hook.id,
            hmac_key: hook.hmac_key,
            address: hook.address,
            failed: hook.failed,
            enabled: hook.enabled,
        }
    }
}

/// paymennt's answer for an unknown webhook id (HTTP 400, as the spec's `GetWebhookErrorResponse`).
fn webhook_not_found(start: RequestStart) -> Response {
    failure(
        start,
        StatusCode::BAD_REQUEST,
        "Webhook not found for API merchant",
    )
}

/// `GET /webhooks`: the spec answers a bare array of wrappers, one per webhook.
async fn list_webhooks(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
) -> Response {
    let webhooks: Vec<EnvelopeOut<WebhookOut>> = context
        .state
        .webhooks()
        .into_iter()
        .map(|hook| EnvelopeOut {
            success: true,
            elapsed: start.elapsed_ms(),
            error: None,
            result: Some(WebhookOut::from(hook)),
        })
        .collect();
    (StatusCode::OK, Json(webhooks)).into_response()
}

async fn get_webhook(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    Path(id): Path<String>,
) -> Response {
    match context.state.webhook(&id) {
        Some(hook) => success(start, WebhookOut::from(hook)),
        None => webhook_not_found(start),
    }
}

async fn webhook_action(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let hook = match action.as_str() {
        "test" => context.state.test_webhook(&id),
        "disable" => context.state.set_webhook_enabled(&id, false),
        "enable" => context.state.set_webhook_enabled(&id, true),
        "delete" => context.state.delete_webhook(&id),
        _ => return failure(start, StatusCode::NOT_FOUND, "No such endpoint"),
    };
    match hook {
        Some(hook) => success(start, WebhookOut::from(hook)),
        None => webhook_not_found(start),
    }
}

async fn create_webhook(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let address = body
        .map_err(|rejection| format!("Invalid request body: {rejection}"))
        .and_then(|body| {
            serde_json::from_slice::<serde_json::Value>(&body)
                .map_err(|error| format!("Malformed JSON request body: {error}"))
        })
        .and_then(|value| {
            value
                .get("address")
                .and_then(serde_json::Value::as_str)
                .filter(|a| !a.trim().is_empty())
                .map(str::to_owned)
                .ok_or_else(|| "address is required".to_owned())
        });
    match address {
        Ok(address) => {
            let webhook = WebhookOut::from(context.state.add_webhook(&address));
            // Registered from here on; a slow answer does not undo it.
            let delay = context.state.faults().create_answer_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            success(start, webhook)
        }
        Err(message) => failure(start, StatusCode::BAD_REQUEST, &message),
    }
}

/// An admin-side state error: like the Merchant API's, but an unknown checkout is a 404.
fn admin_failure(start: RequestStart, id: &str, error: &SandboxError) -> Response {
    match error {
        SandboxError::NotFound => failure(
            start,
            StatusCode::NOT_FOUND,
            &format!("no checkout with id '{}' in this sandbox", printable(id)),
        ),
        other => merchant_failure(start, other),
    }
}

async fn admin_list(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
) -> Response {
    let checkouts: Vec<_> = context
        .state
        .checkout_ids()
        .iter()
        .filter_map(|id| context.state.checkout(id))
        .collect();
    success(start, checkouts)
}

async fn admin_get(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    Path(id): Path<String>,
) -> Response {
    match id.parse().ok().and_then(|id| context.state.checkout(&id)) {
        Some(checkout) => success(start, checkout),
        None => admin_failure(start, &id, &SandboxError::NotFound),
    }
}

async fn admin_action(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    Path((id, verb)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let amount = match query.get("amount").map(|text| (text, parse_decimal(text))) {
        None => None,
        Some((_, Some(amount))) => Some(amount),
        Some((text, None)) => {
            let message = format!("amount '{}' is not a decimal number", printable(text));
            return failure(start, StatusCode::BAD_REQUEST, &message);
        }
    };
    let action = match (verb.as_str(), amount) {
        ("pay", None) => CheckoutAction::Pay,
        ("fail", None) => CheckoutAction::Fail,
        ("cancel", None) => CheckoutAction::Cancel,
        ("expire", None) => CheckoutAction::Expire,
        ("authorize", None) => CheckoutAction::Authorize,
        ("refund", None) => CheckoutAction::Refund,
        ("refund", Some(amount)) => CheckoutAction::PartialRefund(amount),
        (_, Some(_))
            if ["pay", "fail", "cancel", "expire", "authorize"].contains(&verb.as_str()) =>
        {
            return failure(
                start,
                StatusCode::BAD_REQUEST,
                "only refund takes an amount",
            );
        }
        _ => {
            let message = format!(
                "unknown action '{}': expected pay, fail, cancel, expire, authorize or refund",
                printable(&verb)
            );
            return failure(start, StatusCode::NOT_FOUND, &message);
        }
    };
    let Ok(checkout_id) = id.parse::<CheckoutId>() else {
        return admin_failure(start, &id, &SandboxError::NotFound);
    };
    match context.state.apply(&checkout_id, action).await {
        Ok(checkout) => success(start, checkout),
        Err(error) => admin_failure(start, &id, &error),
    }
}

async fn admin_lie_document(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let status = body
        .ok()
        .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .and_then(|value| value.get("status")?.as_str().map(str::to_owned));
    let Some(status) = status else {
        return failure(
            start,
            StatusCode::BAD_REQUEST,
            r#"expected a JSON body such as {"status": "PAID"}"#,
        );
    };
    let Ok(checkout_id) = id.parse::<CheckoutId>() else {
        return admin_failure(start, &id, &SandboxError::NotFound);
    };
    match context.state.lie_document(&checkout_id, &status).await {
        Ok(()) => success(start, serde_json::json!({ "documentStatus": status })),
        Err(error) => admin_failure(start, &id, &error),
    }
}

async fn admin_delete_document(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    Path(id): Path<String>,
) -> Response {
    let Ok(checkout_id) = id.parse::<CheckoutId>() else {
        return admin_failure(start, &id, &SandboxError::NotFound);
    };
    match context.state.delete_document(&checkout_id).await {
        Ok(()) => success(start, serde_json::json!({ "deleted": true })),
        Err(error) => admin_failure(start, &id, &error),
    }
}

/// The body of `GET /_sandbox/faults`.
#[derive(Debug, Serialize)]
struct FaultsOut {
    settings: FaultSettings,
    /// Get Checkout requests since the sandbox started, per checkout id.
    get_checkout_calls: HashMap<String, u64>,
    /// Get Checkout requests since the sandbox started, in total.
    get_checkout_calls_total: u64,
    /// Search Checkouts requests since the sandbox started.
    search_calls: u64,
}

async fn admin_faults(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
) -> Response {
    let faults = context.state.faults();
    success(
        start,
        FaultsOut {
            settings: faults.settings(),
            get_checkout_calls: faults.get_checkout_call_counts(),
            get_checkout_calls_total: faults.total_get_checkout_calls(),
            search_calls: faults.search_calls(),
        },
    )
}

async fn admin_update_faults(
    State(context): State<ApiContext>,
    Extension(start): Extension<RequestStart>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let update = body
        .map_err(|rejection| format!("Invalid request body: {rejection}"))
        .and_then(|body| {
            serde_json::from_slice::<FaultUpdate>(&body)
                .map_err(|error| format!("Malformed fault update: {error}"))
        });
    match update.and_then(|update| context.state.faults().update(update)) {
        Ok(settings) => success(start, settings),
        Err(message) => failure(start, StatusCode::BAD_REQUEST, &message),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sandbox::documents::DocumentStore;
    use crate::sandbox::faults::Faults;
    use crate::sandbox::state::{StateConfig, StatusSpelling};
    use axum::body::Body;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    /// The sandbox's router over a fresh state, for tests that call it without a socket.
    pub(crate) fn app() -> (Router, SandboxState) {
        let state = SandboxState::new(
            StateConfig {
                project_id: "paywatch-sandbox".into(),
                collection: "checkouts".into(),
                status_spelling: StatusSpelling::Upper,
                expiry_minute: Duration::from_secs(60),
                public_base_url: "http://127.0.0.1:1".into(),
                search: Default::default(),
            },
            Arc::new(DocumentStore::new()),
            Faults::new(FaultSettings::default()),
            CancellationToken::new(),
        );
        let context = ApiContext {
            state: state.clone(),
            credentials: Arc::new(ApiCredentials {
                api_key: "k".into(),
                api_secret: "s".into(),
            }),
        };
        (router(context), state)
    }

    async fn call(
        app: &Router,
        request: axum::http::Request<Body>,
    ) -> (StatusCode, serde_json::Value) {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let json = serde_json::from_slice(&bytes).expect("a JSON body");
        (status, json)
    }

    fn authed(method: &str, uri: &str, body: &str) -> axum::http::Request<Body> {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("X-Paymennt-Api-Key", "k")
            .header("X-Paymennt-Api-Secret", "s")
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("request")
    }

    #[tokio::test]
    async fn malformed_json_gets_the_wrapper() {
        let (app, _) = app();
        let (status, json) = call(&app, authed("POST", "/mer/v2.0/checkout/link", "{nope")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["success"], false);
        assert!(json["elapsed"].is_i64());
        assert!(
            json["error"]
                .as_str()
                .expect("message")
                .contains("Malformed JSON")
        );
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_get_the_wrapper() {
        let (app, _) = app();
        let (status, json) = call(&app, authed("GET", "/mer/v2.0/nothing", "")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["success"], false);
        let (status, json) = call(&app, authed("DELETE", "/mer/v2.0/checkout/link", "")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(json["success"], false);
    }

    #[tokio::test]
    async fn get_checkout_calls_are_counted_even_when_refused() {
        let (app, state) = app();
        let request = axum::http::Request::builder()
            .uri("/mer/v2.0/checkout/123")
            .body(Body::empty())
            .expect("request");
        let (status, _) = call(&app, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, json) = call(&app, authed("GET", "/mer/v2.0/checkout/123", "")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"], "Checkout not found for API merchant");
        assert_eq!(state.faults().get_checkout_calls("123"), 2);
    }

    #[tokio::test]
    async fn admin_actions_reject_unknown_verbs_and_ids() {
        let (app, _) = app();
        let (status, json) = call(&app, authed("POST", "/_sandbox/checkouts/1/explode", "")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(json["error"].as_str().expect("message").contains("explode"));
        let (status, json) = call(&app, authed("POST", "/_sandbox/checkouts/1/pay", "")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            json["error"]
                .as_str()
                .expect("message")
                .contains("no checkout")
        );
    }

    #[test]
    fn get_checkout_target_matches_only_get_checkout() {
        assert_eq!(get_checkout_target("/mer/v2.0/checkout/42"), Some("42"));
        assert_eq!(get_checkout_target("/checkout/42"), Some("42"));
        assert_eq!(get_checkout_target("/checkout/42/cancel"), None);
        assert_eq!(get_checkout_target("/checkout/link/"), None);
        assert_eq!(get_checkout_target("/checkout"), None);
    }
}
