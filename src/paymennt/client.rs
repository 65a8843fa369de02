//! The HTTP client for paymennt's Merchant API.
//!
//! Owns: requests to paymennt (auth headers, timeouts, retries) and the only constructor of
//! [`VerifiedCheckout`]: a checkout status counts as verified only when it came from here.
//! Must never: retry a 4xx other than 429, send a call that creates something (Create payment
//! link, Create new webhook) a second time unless the first provably never reached paymennt,
//! put a credential in an error or log, send one to another host (redirects are not followed;
//! plaintext only to loopback), read an unbounded body, or hold money in a float. Text paymennt
//! sends is escaped, and scrubbed of every configured secret (an upstream that echoes our request
//! quotes the credential headers), before it reaches an error.
//!
//! # Calls that create something are sent once
//!
//! Reads (Get Checkout, Search Checkouts, list webhooks) are retried on any failure that may go
//! away ([`Error::is_retryable`]). A call that creates something is not: paymennt's spec says
//! nothing of rejecting a repeated `requestId`, so a second Create payment link after a timeout
//! makes a second link (and, with `sendSms`/`sendEmail`, a second message to the customer). Such
//! a call is sent again only when [`Error::may_send_again`] holds: the connection was never
//! made (connect refused, DNS failure, connect timeout), or paymennt answered 429 with
//! `Retry-After`. Any other failure is returned; [`Error::reached`] tells the caller whether
//! paymennt may have acted on it, and [`Client::find_link`] looks for the link such a call may
//! have made.
//!
//! Only paymennt's own JSON answer (`{success: false, error}` on a JSON response) counts as
//! paymennt refusing a request; anything else (an HTML 404 page, a proxy, a maintenance page,
//! a wrong path in `base_url`) is [`Error::NotPaymennt`], a failure to retry that names the base
//! URL, never "this checkout does not exist".

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::wire::{
    Checkout, CheckoutFacts, CheckoutPage, CheckoutShapeError, LinkRequest, Webhook, WebhookId,
};
use crate::domain::{CheckoutId, CheckoutStatus, VerifyTicket, printable};
use crate::metrics::{Metrics, PaymenntCall};
use crate::settings::{ApiCredentials, PaymenntSettings, SettingsError, is_loopback_host};

/// The largest answer body read; reading stops (and the call fails) past it. A checkout is a
/// few KiB and a search page of 100 checkouts well under this.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a call to paymennt failed. [`Error::is_retryable`] says whether trying again may help.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// paymennt refused the request: its own JSON wrapper with `success: false` and an `error`
    /// (HTTP 4xx other than 429, or 2xx).
    #[error("paymennt refused the request (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// paymennt's `error` message, escaped.
        message: String,
    },
    /// The answer is not paymennt's API: not its JSON wrapper (an HTML error page, a proxy or
    /// maintenance page, a wrong path in `base_url`). Retried: it says nothing about a checkout.
    #[error(
        "the answer from {base_url} is not paymennt's API (HTTP {status}, content type '{content_type}'): {excerpt}\n\n\
         check [paymennt] base_url (paymennt's ends in /mer/v2.0/) and any proxy in between"
    )]
    NotPaymennt {
        /// The base URL in use.
        base_url: String,
        /// HTTP status.
        status: u16,
        /// The `Content-Type` header, escaped (empty if absent).
        content_type: String,
        /// The start of the body, escaped.
        excerpt: String,
    },
    /// The answer was a redirect. Redirects are never followed: the API key and secret would go
    /// along to whatever host it names.
    #[error(
        "paymennt's address answered HTTP {status}, a redirect to '{location}'; it is not followed, so the API credentials never go to another host\n\n\
         check [paymennt] base_url (use the address the redirect names if you trust it)"
    )]
    Redirected {
        /// HTTP status.
        status: u16,
        /// The `Location` header, escaped.
        location: String,
    },
    /// The answer body is larger than [`MAX_BODY_BYTES`]; reading stopped there.
    #[error(
        "the answer from {base_url} is larger than {limit} bytes; reading stopped\n\ncheck [paymennt] base_url"
    )]
    TooLarge {
        /// The base URL in use.
        base_url: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// paymennt failed (HTTP 5xx).
    #[error("paymennt failed (HTTP {status}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// paymennt's `error` message, or the start of the body.
        message: String,
    },
    /// Too many requests (HTTP 429).
    #[error("paymennt is rate limiting us (HTTP 429){}", retry_after.map(|d| format!("; retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// The `Retry-After` delay, if given.
        retry_after: Option<Duration>,
    },
    /// The request timed out.
    #[error("paymennt did not answer within {0:?}")]
    Timeout(Duration),
    /// No connection could be made (DNS failure, connect refused or timed out, TLS handshake):
    /// the request was never sent.
    #[error("cannot connect to paymennt: {0}")]
    Connect(String),
    /// The connection failed after it was made (reset, closed mid-answer): the request may
    /// have been sent.
    #[error("cannot reach paymennt: {0}")]
    Network(String),
    /// The answer was not the JSON paymennt documents.
    #[error("paymennt's answer could not be read: {0}")]
    Malformed(String),
    /// The checkout lacks a field paywatch needs.
    #[error("paymennt's checkout is unusable: {0}")]
    Shape(#[from] CheckoutShapeError),
}

impl Error {
    /// Whether the same request may succeed later: network errors, timeouts, 5xx, 429, and an
    /// answer that is not paymennt's (a proxy or maintenance page may go away).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Server { .. }
                | Error::RateLimited { .. }
                | Error::Timeout(_)
                | Error::Connect(_)
                | Error::Network(_)
                | Error::NotPaymennt { .. }
        )
    }

    /// Whether paymennt may have received, and acted on, the request that failed this way.
    pub fn reached(&self) -> Reached {
        match self {
            Error::Connect(_) => Reached::No,
            // Read in full, and what it says is known: paymennt's refusal, its 429, a redirect
            // (not followed), a 4xx page from something else, or a checkout lacking a field
            // (paymennt did act: the answer says so).
            Error::Rejected { .. }
            | Error::RateLimited { .. }
            | Error::Redirected { .. }
            | Error::Shape(_) => Reached::Answered,
            Error::NotPaymennt { status, .. } if (400..500).contains(status) => Reached::Answered,
            // Sent, and no readable answer: a timeout or a reset after sending, a 5xx, a 2xx
            // whose body could not be read or is not paymennt's.
            Error::Timeout(_)
            | Error::Network(_)
            | Error::Server { .. }
            | Error::NotPaymennt { .. }
            | Error::TooLarge { .. }
            | Error::Malformed(_) => Reached::Maybe,
        }
    }

    /// Whether a call that creates something (Create payment link, Create new webhook) may be
    /// sent again after this error: only when it provably never reached paymennt (no connection
    /// was made) or paymennt asked for it to be sent later (429 with `Retry-After`).
    pub fn may_send_again(&self) -> bool {
        match self {
            Error::Connect(_) => true,
            Error::RateLimited { retry_after } => retry_after.is_some(),
            _ => false,
        }
    }

    /// Whether the answer points at the configuration rather than at one checkout: something
    /// other than paymennt answered, redirected us elsewhere, or sent more than any answer of
    /// paymennt's would be.
    pub fn is_configuration_problem(&self) -> bool {
        matches!(
            self,
            Error::NotPaymennt { .. } | Error::Redirected { .. } | Error::TooLarge { .. }
        )
    }

    /// The delay paymennt asked for (429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// Whether paymennt refused the API credentials themselves (HTTP 401), rather than one
    /// request.
    pub fn refuses_credentials(&self) -> bool {
        matches!(self, Error::Rejected { status: 401, .. })
    }

    /// Whether paymennt itself said the checkout does not exist: its JSON wrapper with
    /// `success: false` and its not-found error (paymennt's OpenAPI spec: "Checkout not found
    /// for API merchant"). Nothing else counts: an HTML 404 page is [`Error::NotPaymennt`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Rejected { message, .. } if message.to_ascii_lowercase().contains("checkout not found"))
    }
}

/// Whether a failed request may have reached paymennt and been acted on ([`Error::reached`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// No connection was made: the request was never sent, nothing happened at paymennt.
    No,
    /// An answer was read in full, and it says what happened (a refusal: nothing was done).
    Answered,
    /// The request may have reached paymennt and been acted on; only asking paymennt tells.
    Maybe,
}

/// A checkout as Get Checkout (or Create payment link) returned it: the only kind of status
/// paywatch records or hands to a hook.
///
/// It can only be built inside this module, from an authenticated paymennt response.
#[derive(Debug, Clone)]
pub struct VerifiedCheckout {
    facts: CheckoutFacts,
    status: CheckoutStatus,
    wire: Checkout,
    raw_json: String,
    ticket: VerifyTicket,
    verified_at: DateTime<Utc>,
}

impl VerifiedCheckout {
    fn from_result(raw_json: &str, ticket: VerifyTicket) -> Result<VerifiedCheckout, Error> {
        let wire: Checkout =
            serde_json::from_str(raw_json).map_err(|error| malformed("checkout", &error))?;
        let facts = wire.answer_facts()?;
        let status = facts
            .status
            .clone()
            .ok_or(Error::Shape(CheckoutShapeError::Missing("status")))?;
        Ok(VerifiedCheckout {
            facts,
            status,
            wire,
            raw_json: raw_json.to_owned(),
            ticket,
            verified_at: Utc::now(),
        })
    }

    /// A verified checkout from a literal result object, for unit tests only.
    #[cfg(test)]
    pub(crate) fn for_tests(raw_json: &str) -> VerifiedCheckout {
        VerifiedCheckout::from_result(raw_json, VerifyTicket::new(i64::MAX))
            .expect("test checkout JSON is valid")
    }

    /// [`VerifiedCheckout::for_tests`] for a request sent with `ticket`, verified at
    /// `verified_at` (a wall clock that may have stepped).
    #[cfg(test)]
    pub(crate) fn for_tests_with(
        raw_json: &str,
        ticket: VerifyTicket,
        verified_at: DateTime<Utc>,
    ) -> VerifiedCheckout {
        let mut verified =
            VerifiedCheckout::from_result(raw_json, ticket).expect("test checkout JSON is valid");
        verified.verified_at = verified_at;
        verified
    }

    /// The checked fields.
    pub fn facts(&self) -> &CheckoutFacts {
        &self.facts
    }

    /// The verified status.
    pub fn status(&self) -> &CheckoutStatus {
        &self.status
    }

    /// The checkout id.
    pub fn id(&self) -> &CheckoutId {
        &self.facts.id
    }

    /// The decoded wire object.
    pub fn wire(&self) -> &Checkout {
        &self.wire
    }

    /// The `result` object exactly as paymennt sent it.
    pub fn raw_json(&self) -> &str {
        &self.raw_json
    }

    /// When paymennt created the checkout, if its answer says so readably.
    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        self.wire.created_at()
    }

    /// When the answer arrived.
    pub fn verified_at(&self) -> DateTime<Utc> {
        self.verified_at
    }

    /// The ledger's ticket for the request, taken before it was first sent (before any retry):
    /// the answer reflects every change committed at paymennt before the ticket was issued.
    pub fn ticket(&self) -> VerifyTicket {
        self.ticket
    }
}

/// Search filters for `GET /checkout`.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Filter by checkout type (`LINK`, `WEB`, ...).
    pub kind: Option<String>,
    /// Only checkouts with a greater id (`afterId`).
    pub after_id: Option<u128>,
    /// Only checkouts created after this time (`afterTimestamp`, sent as
    /// `yyyy-mm-dd HH:MM:SS` UTC, the format paymennt's spec documents).
    pub after_timestamp: Option<DateTime<Utc>>,
    /// Filter by order id.
    pub order_id: Option<String>,
    /// Filter by request id.
    pub request_id: Option<String>,
    /// Filter by statuses (sent comma-separated).
    pub statuses: Vec<CheckoutStatus>,
    /// Page number, from 0.
    pub page: Option<u32>,
    /// Page size.
    pub size: Option<u32>,
}

/// How far before the send [`Client::find_link`] searches from: paymennt's clock (which sets a
/// checkout's creation time) may be behind ours.
pub const FIND_LINK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// The most search pages (of 100) [`Client::find_link`] reads for one order.
const FIND_LINK_MAX_PAGES: u32 = 10;

/// `afterTimestamp`'s format in paymennt's spec (`yyyy-mm-dd HH:MM:SS`).
pub const AFTER_TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// Retry timing: exponential from `base`, capped at `max`, with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first delay.
    pub base: Duration,
    /// The largest delay (also caps a 429's Retry-After).
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0-based), given what the error asked for.
    pub fn delay(&self, retry: u32, error: &Error) -> Duration {
        if let Some(asked) = error.retry_after() {
            return asked.min(self.max);
        }
        let exponential = self.base.saturating_mul(2u32.saturating_pow(retry.min(16)));
        let capped = exponential.min(self.max);
        // Full jitter: anywhere in [capped/2, capped], so bursts of clients spread out.
        let low = capped / 2;
        let spread = capped.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(rand::rng().random_range(0..=spread))
    }
}

/// Whether paymennt refuses the API credentials, as the latest Get Checkout or Search
/// Checkouts answer said: shared by every clone of a client, and handed on to the client a
/// config reload builds, so readiness sees it whichever client made the call.
#[derive(Debug, Clone, Default)]
pub struct CredentialStatus {
    refused: Arc<Mutex<Option<String>>>,
    accepted: Arc<std::sync::atomic::AtomicBool>,
}

impl CredentialStatus {
    /// Whether paymennt accepted the credentials at least once.
    pub fn ever_accepted(&self) -> bool {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What paymennt said when it refused the credentials, while it does.
    pub fn refused(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes one answer: a refusal of the credentials is logged at error once (until an answer
    /// is accepted again), with the keys to check.
    fn note<T>(&self, base_url: &str, result: &Result<T, Error>) {
        match result {
            Ok(_) => {
                self.accepted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if self.lock().take().is_some() {
                    tracing::info!("paymennt accepts the API credentials again");
                }
            }
            Err(error) if error.refuses_credentials() => {
                let first = self.lock().replace(error.to_string()).is_none();
                if first {
                    tracing::error!(
                        base_url,
                        "paymennt refuses the API credentials: {error}; no checkout can be verified until this is fixed: \
                         check [paymennt] api_key and api_secret (or api_key_file / api_secret_file, or the systemd \
                         credentials paymennt-api-key and paymennt-api-secret) and [paymennt] environment (test keys \
                         work only against test, live keys only against live)"
                    );
                }
            }
            Err(_) => {}
        }
    }
}

/// A step of one call to paymennt, as a [`CallObserver`] sees it.
#[derive(Debug)]
pub enum CallEvent<'a> {
    /// The call's first attempt is about to be sent.
    Sending,
    /// An attempt failed with `error`; attempt number `attempt` (from 1) of at most `attempts`
    /// is sent after `delay`.
    Retrying {
        /// Why the last attempt failed.
        error: &'a Error,
        /// The number of the attempt about to be sent (2 for the first retry).
        attempt: u32,
        /// The most attempts this call makes.
        attempts: u32,
        /// The pause before it.
        delay: Duration,
    },
    /// The call is over (answered, or failed for good).
    Finished,
}

/// Told of each [`CallEvent`] of a [`Client`]'s calls ([`Client::with_retry_notice`]). Called
/// inline: it must not block.
pub type CallObserver = Arc<dyn Fn(&CallEvent<'_>) + Send + Sync>;

/// A paymennt API client. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    request_timeout: Duration,
    retry: RetryPolicy,
    metrics: Metrics,
    credentials: CredentialStatus,
    observer: Option<CallObserver>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Builds a client from settings, resolving the API credentials.
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] when the credentials cannot be resolved or the base URL is invalid.
    pub fn from_settings(settings: &PaymenntSettings) -> Result<Client, SettingsError> {
        let credentials = settings.credentials()?;
        let client = Client::new(
            &settings.base_url(),
            &credentials,
            settings.connect_timeout,
            settings.request_timeout,
            RetryPolicy {
                max_retries: settings.max_retries,
                base: Duration::from_millis(250),
                max: Duration::from_secs(30),
            },
        )?;
        match &settings.ca_file {
            Some(path) => client.trusting_ca_file(path, &credentials, settings.connect_timeout),
            None => Ok(client),
        }
    }

    /// This client, also trusting the CA certificates of the PEM file `path` (`[paymennt]
    /// ca_file`) on top of the built-in roots.
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] naming the file when it cannot be read or holds no certificate.
    fn trusting_ca_file(
        self,
        path: &std::path::Path,
        credentials: &ApiCredentials,
        connect_timeout: Duration,
    ) -> Result<Client, SettingsError> {
        let pem = crate::settings::read_ca_file(path)
            .map_err(|problem| SettingsError(format!("'paymennt.ca_file': {problem}")))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| {
            SettingsError(format!(
                "'paymennt.ca_file': the CA file '{}' is not valid PEM: {error}",
                path.display()
            ))
        })?;
        let http = http_builder(credentials, connect_timeout, self.request_timeout)?
            .tls_certs_merge(certificates)
            .build()
            .map_err(|error| SettingsError(format!("cannot build the HTTP client: {error}")))?;
        Ok(Client { http, ..self })
    }

    /// Builds a client for `base_url` (ending in `/mer/v2.0/`).
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] naming the bad URL or credential (never its value).
    pub fn new(
        base_url: &str,
        credentials: &ApiCredentials,
        connect_timeout: Duration,
        request_timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Client, SettingsError> {
        let normalized = if base_url.ends_with('/') {
            base_url.to_owned()
        } else {
            format!("{base_url}/")
        };
        let base = Url::parse(&normalized).map_err(|error| {
            SettingsError(format!(
                "paymennt base URL '{}' is invalid: {error}",
                printable(base_url)
            ))
        })?;
        // The credentials go in every request: never in plaintext over a network.
        match base.scheme() {
            "https" => {}
            "http" if base.host_str().is_some_and(is_loopback_host) => {}
            "http" => {
                return Err(SettingsError(format!(
                    "paymennt base URL '{}' uses plaintext http to a non-loopback host; the API credentials would cross the network unencrypted\n\nuse https, or a 127.0.0.1 / localhost address",
                    printable(base_url)
                )));
            }
            other => {
                return Err(SettingsError(format!(
                    "paymennt base URL '{}' has unsupported scheme '{}'\n\nuse https",
                    printable(base_url),
                    printable(other)
                )));
            }
        }
        let http = http_builder(credentials, connect_timeout, request_timeout)?
            .build()
            .map_err(|error| SettingsError(format!("cannot build the HTTP client: {error}")))?;
        Ok(Client {
            http,
            base,
            request_timeout,
            retry,
            metrics: Metrics::disabled(),
            credentials: CredentialStatus::default(),
            observer: None,
        })
    }

    /// The same client, timing its Get Checkout and Search calls in `metrics`.
    pub fn with_metrics(self, metrics: Metrics) -> Client {
        Client { metrics, ..self }
    }

    /// The same client, noting whether paymennt refuses the credentials in `credentials`
    /// (shared with an earlier client, so a reload keeps what was seen).
    pub fn with_credential_status(self, credentials: CredentialStatus) -> Client {
        Client {
            credentials,
            ..self
        }
    }

    /// The same client, telling `observer` when a call is sent, sent again and done: what the
    /// interactive commands show a person waiting (a line per retry, a spinner). The daemon
    /// sets none; its retries are debug logs.
    pub fn with_retry_notice(self, observer: CallObserver) -> Client {
        Client {
            observer: Some(observer),
            ..self
        }
    }

    /// Whether paymennt refuses this client's credentials, as far as its calls have seen.
    pub fn credential_status(&self) -> &CredentialStatus {
        &self.credentials
    }

    /// The base URL in use.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Get Checkout: `GET /checkout/{checkoutId}`, with retries.
    ///
    /// # Errors
    ///
    /// The last attempt's [`Error`].
    pub async fn get_checkout(
        &self,
        id: &CheckoutId,
        ticket: VerifyTicket,
    ) -> Result<VerifiedCheckout, Error> {
        let started = std::time::Instant::now();
        let result = self.fetch_checkout(id, ticket).await;
        self.metrics.paymennt_call(
            PaymenntCall::GetCheckout,
            outcome_label(&result),
            started.elapsed(),
        );
        self.credentials.note(self.base.as_str(), &result);
        result
    }

    async fn fetch_checkout(
        &self,
        id: &CheckoutId,
        ticket: VerifyTicket,
    ) -> Result<VerifiedCheckout, Error> {
        let raw = self
            .call(|| self.http.get(self.url(&["checkout", id.as_str()])))
            .await?;
        let verified = VerifiedCheckout::from_result(&raw, ticket)?;
        if verified.id() != id {
            return Err(Error::Malformed(format!(
                "asked for checkout {id}, paymennt answered with checkout {}",
                verified.id()
            )));
        }
        Ok(verified)
    }

    /// Create payment link: `POST /checkout/link`.
    ///
    /// Sent once: again only when [`Error::may_send_again`] holds (no connection was made, or a
    /// 429 with `Retry-After`). Nothing in paymennt's spec says a repeated `requestId` is
    /// refused, so a second send after a timeout would make a second link.
    ///
    /// # Errors
    ///
    /// The last attempt's [`Error`]; when its [`Error::reached`] is [`Reached::Maybe`] the link
    /// may exist: look for it with [`Client::find_link`], never by sending the request again.
    pub async fn create_link(
        &self,
        request: &LinkRequest,
        ticket: VerifyTicket,
    ) -> Result<VerifiedCheckout, Error> {
        let raw = self
            .call_once(|| {
                self.http
                    .post(self.url(&["checkout", "link"]))
                    .json(request)
            })
            .await?;
        VerifiedCheckout::from_result(&raw, ticket)
    }

    /// Looks for the payment link a Create payment link with `request` made, after a failure
    /// that leaves it unknown: Search Checkouts for the order's LINK checkouts created since
    /// `since` (paymennt's `afterTimestamp`, minus [`FIND_LINK_MARGIN`] for clock skew), the
    /// one whose `requestId` is the request's, then Get Checkout for it.
    ///
    /// # Returns
    ///
    /// The link, verified; `None` if no checkout with that `requestId` is found.
    ///
    /// # Errors
    ///
    /// The [`Error`] of a search or Get Checkout that failed (each retried as reads are).
    pub async fn find_link(
        &self,
        request: &LinkRequest,
        since: DateTime<Utc>,
        ticket: VerifyTicket,
    ) -> Result<Option<VerifiedCheckout>, Error> {
        let mut query = SearchQuery {
            kind: Some("LINK".into()),
            order_id: Some(request.order_id.clone()),
            request_id: Some(request.request_id.clone()),
            after_timestamp: Some(since - FIND_LINK_MARGIN),
            page: Some(0),
            size: Some(100),
            ..SearchQuery::default()
        };
        let mut found: Vec<CheckoutId> = Vec::new();
        for page in 0..FIND_LINK_MAX_PAGES {
            query.page = Some(page);
            let result = self.search(&query).await?;
            // Matched here too: the filters narrow the search, the requestId decides.
            for checkout in &result.content {
                if checkout.request_id.as_deref() == Some(request.request_id.as_str())
                    && let Some(id) = checkout
                        .id
                        .as_ref()
                        .and_then(|id| id.0.parse::<CheckoutId>().ok())
                    && !found.contains(&id)
                {
                    found.push(id);
                }
            }
            if i64::from(page) + 1 >= result.total_pages || result.content.is_empty() {
                break;
            }
        }
        found.sort_by_key(|id: &CheckoutId| id.as_str().parse::<u128>().unwrap_or(u128::MAX));
        let Some(first) = found.first() else {
            return Ok(None);
        };
        if found.len() > 1 {
            tracing::warn!(
                request_id = %printable(&request.request_id),
                order = %printable(&request.order_id),
                links = ?found.iter().map(CheckoutId::as_str).collect::<Vec<_>>(),
                "paymennt holds more than one link with this requestId; the oldest is used; check the others at paymennt"
            );
        }
        self.get_checkout(first, ticket).await.map(Some)
    }

    /// Search checkouts: `GET /checkout`.
    ///
    /// # Errors
    ///
    /// The last attempt's [`Error`].
    pub async fn search(&self, query: &SearchQuery) -> Result<CheckoutPage, Error> {
        let started = std::time::Instant::now();
        let result = self.search_once(query).await;
        self.metrics.paymennt_call(
            PaymenntCall::Search,
            outcome_label(&result),
            started.elapsed(),
        );
        self.credentials.note(self.base.as_str(), &result);
        result
    }

    async fn search_once(&self, query: &SearchQuery) -> Result<CheckoutPage, Error> {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(kind) = &query.kind {
            pairs.push(("type", kind.clone()));
        }
        if let Some(after_id) = query.after_id {
            pairs.push(("afterId", after_id.to_string()));
        }
        if let Some(after) = query.after_timestamp {
            pairs.push((
                "afterTimestamp",
                after.format(AFTER_TIMESTAMP_FORMAT).to_string(),
            ));
        }
        if let Some(order_id) = &query.order_id {
            pairs.push(("orderId", order_id.clone()));
        }
        if let Some(request_id) = &query.request_id {
            pairs.push(("requestId", request_id.clone()));
        }
        if !query.statuses.is_empty() {
            let joined: Vec<&str> = query.statuses.iter().map(CheckoutStatus::as_str).collect();
            pairs.push(("status", joined.join(",")));
        }
        if let Some(page) = query.page {
            pairs.push(("page", page.to_string()));
        }
        if let Some(size) = query.size {
            pairs.push(("size", size.to_string()));
        }
        let raw = self
            .call(|| self.http.get(self.url(&["checkout"])).query(&pairs))
            .await?;
        serde_json::from_str(&raw).map_err(|error| malformed("checkout page", &error))
    }

    /// Create new webhook: `POST /webhooks` with `{"address": …}`. The answer holds the
    /// webhook's `hmacKey`.
    ///
    /// Sent once, as [`Client::create_link`] is: a second send could register the address
    /// twice (and paymennt would then call it twice per change).
    ///
    /// # Errors
    ///
    /// The last attempt's [`Error`]; when its [`Error::reached`] is [`Reached::Maybe`] the
    /// webhook may exist: look for it with [`Client::list_webhooks`].
    pub async fn create_webhook(&self, address: &str) -> Result<Webhook, Error> {
        let body = serde_json::json!({ "address": address });
        let raw = self
            .call_once(|| self.http.post(self.url(&["webhooks"])).json(&body))
            .await?;
        webhook_of(&raw)
    }

    /// List webhooks: `GET /webhooks`. paymennt's spec answers an array of wrappers; a wrapper
    /// whose `result` is an array of webhooks is read too.
    ///
    /// # Errors
    ///
    /// The last attempt's [`Error`].
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, Error> {
        let raw = self
            .call(|| {
                self.http
                    .get(self.url(&["webhooks"]))
                    .query(&[("page", "0"), ("size", "1000")])
            })
            .await?;
        let items: Vec<serde_json::Value> =
            serde_json::from_str(&raw).map_err(|error| malformed("webhooks", &error))?;
        items
            .into_iter()
            .map(|item| {
                let webhook = match item.get("success") {
                    Some(serde_json::Value::Bool(true)) | None => {
                        item.get("result").cloned().unwrap_or(item)
                    }
                    Some(_) => {
                        return Err(Error::Rejected {
                            status: 200,
                            message: item
                                .get("error")
                                .and_then(serde_json::Value::as_str)
                                .map(printable)
                                .unwrap_or_else(|| "a webhook entry says success: false".into()),
                        });
                    }
                };
                serde_json::from_value(webhook).map_err(|error| malformed("webhook", &error))
            })
            .collect()
    }

    /// `POST /webhooks/{id}/{action}` for `test` (a test call to its address), `disable`,
    /// `enable`, `delete`; and `GET /webhooks/{id}` for `get`.
    ///
    /// # Errors
    ///
    /// The last attempt's [`Error`]; an unknown action is refused before any call.
    pub async fn webhook_action(&self, id: &WebhookId, action: &str) -> Result<Webhook, Error> {
        let raw = match action {
            "get" => {
                self.call(|| self.http.get(self.url(&["webhooks", id.as_str()])))
                    .await?
            }
            "test" | "disable" | "enable" | "delete" => {
                self.call(|| self.http.post(self.url(&["webhooks", id.as_str(), action])))
                    .await?
            }
            other => {
                return Err(Error::Rejected {
                    status: 0,
                    message: format!("unknown webhook action '{}'", printable(other)),
                });
            }
        };
        webhook_of(&raw)
    }

    /// The base URL (which always ends in `/`) with `segments` appended. Segments are fixed
    /// words and validated ids, so nothing can escape the base; appending them costs a fraction
    /// of parsing a joined URL, which every Get Checkout did.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request, retrying what may succeed later; returns the `result` JSON text.
    async fn call(&self, build: impl Fn() -> reqwest::RequestBuilder) -> Result<String, Error> {
        self.send(build, Error::is_retryable, "retrying paymennt call")
            .await
    }

    /// Sends a request that creates something: again only when [`Error::may_send_again`]
    /// holds (no connection was made, or paymennt's 429 with `Retry-After`).
    async fn call_once(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<String, Error> {
        self.send(
            build,
            Error::may_send_again,
            "sending again: the request never reached paymennt, or it asked us to wait",
        )
        .await
    }

    /// Sends a request, again (up to the policy's retries) while `send_again` holds for its
    /// error, telling the observer ([`Client::with_retry_notice`]) each step.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        send_again: fn(&Error) -> bool,
        log_message: &'static str,
    ) -> Result<String, Error> {
        self.notify(&CallEvent::Sending);
        let mut retry = 0;
        let result = loop {
            match self.attempt(build()).await {
                Ok(result) => break Ok(result),
                Err(error) if send_again(&error) && retry < self.retry.max_retries => {
                    let delay = self.retry.delay(retry, &error);
                    tracing::debug!(%error, retry = retry + 1, delay_ms = delay.as_millis() as u64, "{log_message}");
                    self.notify(&CallEvent::Retrying {
                        error: &error,
                        attempt: retry + 2,
                        attempts: self.retry.max_retries.saturating_add(1),
                        delay,
                    });
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                Err(error) => break Err(error),
            }
        };
        self.notify(&CallEvent::Finished);
        result
    }

    fn notify(&self, event: &CallEvent<'_>) {
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }

    async fn attempt(&self, request: reqwest::RequestBuilder) -> Result<String, Error> {
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_error(error))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .map(|value| printable(&String::from_utf8_lossy(value.as_bytes())))
                .unwrap_or_else(|| "(no Location header)".into());
            return Err(Error::Redirected {
                status: status.as_u16(),
                location,
            });
        }
        let retry_after = parse_retry_after(response.headers());
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default();
        let body = self.read_body(response).await?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Error::RateLimited { retry_after });
        }
        // `GET /webhooks` answers a bare array of wrappers (paymennt's spec): the array is the
        // result, read by the caller.
        if status.is_success()
            && is_json(&content_type)
            && body.trim_ascii_start().first() == Some(&b'[')
        {
            return String::from_utf8(body)
                .map_err(|_| Error::Malformed("the answer is not UTF-8".into()));
        }
        // paymennt's own answer: JSON (its spec: "Content type for responses will always be
        // application/json") in its wrapper, which always says `success`.
        let wrapper = is_json(&content_type)
            .then(|| serde_json::from_slice::<Wrapper>(&body).ok())
            .flatten()
            .filter(|wrapper| wrapper.success.is_some());
        if status.is_server_error() {
            return Err(Error::Server {
                status: status.as_u16(),
                message: match wrapper.and_then(|w| w.error) {
                    Some(message) => printable(&message),
                    None => body_excerpt(&body),
                },
            });
        }
        let not_paymennt = || Error::NotPaymennt {
            base_url: self.base.to_string(),
            status: status.as_u16(),
            content_type: printable(&content_type),
            excerpt: body_excerpt(&body),
        };
        if !(status.is_success() || status.is_client_error()) {
            return Err(not_paymennt());
        }
        match wrapper {
            Some(Wrapper {
                success: Some(false),
                error: Some(message),
                ..
            }) => Err(Error::Rejected {
                status: status.as_u16(),
                message: printable(&message),
            }),
            Some(Wrapper {
                success: Some(true),
                result,
                ..
            }) if status.is_success() => result
                .map(|raw| raw.get().to_owned())
                .ok_or_else(|| Error::Malformed("success is true but there is no result".into())),
            _ => Err(not_paymennt()),
        }
    }

    /// Reads the body chunk by chunk, stopping as soon as it passes [`MAX_BODY_BYTES`].
    async fn read_body(&self, mut response: reqwest::Response) -> Result<Vec<u8>, Error> {
        let too_large = || Error::TooLarge {
            base_url: self.base.to_string(),
            limit: MAX_BODY_BYTES,
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_BODY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.transport_error(error))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn transport_error(&self, error: reqwest::Error) -> Error {
        // A connect error first: a connect timeout is also a timeout, but no request was sent.
        let connect = error.is_connect();
        if error.is_timeout() && !connect {
            Error::Timeout(self.request_timeout)
        } else {
            // Without the URL: it is ours and shown elsewhere; the cause chain says what failed.
            let error = error.without_url();
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            let text = crate::domain::scrub_secrets(&text).into_owned();
            if connect {
                Error::Connect(text)
            } else {
                Error::Network(text)
            }
        }
    }
}

/// paymennt's answer wrapper, as read here: `success` must be present for it to count.
#[derive(Deserialize)]
struct Wrapper {
    success: Option<bool>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    result: Option<Box<RawValue>>,
}

/// Whether a `Content-Type` is JSON (`application/json`, with or without parameters).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

fn webhook_of(raw: &str) -> Result<Webhook, Error> {
    serde_json::from_str(raw).map_err(|error| malformed("webhook", &error))
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs; it is treated as absent).
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The start of a body for an error message: every registered secret scrubbed from it before it
/// is cut (an upstream that echoes our request quotes the credential headers), then printable.
fn body_excerpt(body: &[u8]) -> String {
    let text = crate::domain::scrubbed_excerpt(body, 200);
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        crate::domain::printable(text.trim())
    }
}

/// An answer that could not be decoded as `what`. serde's message can quote values from the
/// answer, so it is scrubbed of secrets like any excerpt.
fn malformed(what: &str, error: &serde_json::Error) -> Error {
    Error::Malformed(format!(
        "{what}: {}",
        crate::domain::scrub_secrets(&error.to_string())
    ))
}

/// The HTTP client builder with the API credentials as default headers and the timeouts.
fn http_builder(
    credentials: &ApiCredentials,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::ClientBuilder, SettingsError> {
    let mut headers = HeaderMap::new();
    let mut key = HeaderValue::from_str(credentials.key.expose()).map_err(|_| {
        SettingsError("'paymennt.api_key' contains characters not allowed in an HTTP header".into())
    })?;
    key.set_sensitive(true);
    let mut secret = HeaderValue::from_str(credentials.secret.expose()).map_err(|_| {
        SettingsError(
            "'paymennt.api_secret' contains characters not allowed in an HTTP header".into(),
        )
    })?;
    secret.set_sensitive(true);
    headers.insert("X-Paymennt-Api-Key", key);
    headers.insert("X-Paymennt-Api-Secret", secret);
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        // Never follow a redirect: the credential headers would go along to the host it
        // names. A 3xx is an error naming its Location.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("paywatch/", env!("CARGO_PKG_VERSION"))))
}

/// How a paymennt call ended, as the metrics label
/// (`paywatch_paymennt_request_duration_seconds{outcome}`).
pub fn outcome_label<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) if error.is_not_found() => "not_found",
        Err(Error::Rejected { .. }) => "rejected",
        Err(Error::Server { .. }) => "server_error",
        Err(Error::RateLimited { .. }) => "rate_limited",
        Err(Error::Timeout(_)) => "timeout",
        Err(Error::Connect(_) | Error::Network(_)) => "network",
        Err(Error::Malformed(_) | Error::Shape(_)) => "malformed",
        // Something other than paymennt answered: a configuration problem, not a checkout's.
        Err(Error::NotPaymennt { .. } | Error::Redirected { .. } | Error::TooLarge { .. }) => {
            "not_paymennt"
        }
    }
}

#[cfg(test)]
mod tests;
