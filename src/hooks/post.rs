//! URL hooks: one event POSTed to the merchant's endpoint, signed per Standard Webhooks.
//!
//! Owns: the pooled HTTP client of a URL hook, the Standard Webhooks headers and signature
//! ([`sign`]), one POST of one event to an exact outcome ([`deliver`]), and reading (a capped
//! excerpt of) the answer. The dispatcher owns retries and what an outcome means for a
//! delivery ([`crate::hooks::retry`]).
//!
//! Must never: follow a redirect (the event would go to a host nobody configured), put a
//! signing secret anywhere but into the HMAC key, log the event body or a URL's query (which
//! may carry a token: [`crate::settings::shown_url`]), or read more than
//! [`MAX_ANSWER_BYTES`] of an answer.
//!
//! # A delivery
//!
//! `POST url` with the body the command hooks read on stdin ([`HookEvent::to_json`], one
//! schema for both), and these headers:
//!
//! | header              | value                                                             |
//! | ------------------- | ----------------------------------------------------------------- |
//! | `content-type`      | `application/json`                                                |
//! | `user-agent`        | `paywatch/VERSION`                                                |
//! | `webhook-id`        | the event id: the same on every retry of the delivery             |
//! | `webhook-timestamp` | Unix seconds of this attempt                                      |
//! | `webhook-signature` | `v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the key   |
//! |                     | after `whsec_` (base64-decoded); during a rotation one signature  |
//! |                     | per secret, current first, separated by a space                   |
//!
//! plus the hook's fixed `headers`. The client keeps connections alive and pooled, follows no
//! redirect, trusts the built-in roots plus the hook's `ca_file`, and gives the whole exchange
//! the hook's `timeout`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use sha2::Sha256;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hooks::answer::HttpAnswer;
use crate::hooks::event::HookEvent;
use crate::hooks::runner::{Ending, HookOutcome};
use crate::settings::{HookSettings, shown_url};

/// The `user-agent` of every delivery.
pub const USER_AGENT: &str = concat!("paywatch/", env!("CARGO_PKG_VERSION"));

/// The most of an answer's body paywatch reads (the rest is not read; the connection is then
/// not reused).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How many characters of an answer go into a log line and the ledger's error.
pub const EXCERPT_CHARS: usize = 200;

/// The longest wait for a TCP (and TLS) connection, within the hook's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// A decoded signing key (the bytes after `whsec_`). Its `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// The key of a `whsec_…` secret.
    ///
    /// # Errors
    ///
    /// What is wrong with the secret, never its value.
    pub fn from_secret(secret: &str) -> Result<SigningKey, String> {
        crate::settings::secret::signing_key(secret).map(SigningKey)
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

/// One URL hook, ready to deliver.
#[derive(Clone)]
pub struct UrlHook {
    /// The hook's configured name.
    pub name: String,
    /// Where events are POSTed.
    pub url: reqwest::Url,
    /// The signing keys, current first, then the previous one during a rotation.
    keys: Vec<SigningKey>,
    /// The fixed extra headers.
    pub headers: HeaderMap,
    /// How long one delivery (connect, send, answer) may take.
    pub timeout: Duration,
    /// The extra CA file trusted, if any.
    pub ca_file: Option<PathBuf>,
    /// The pooled keep-alive client (cheap to clone: one pool).
    client: reqwest::Client,
}

impl PartialEq for UrlHook {
    fn eq(&self, other: &UrlHook) -> bool {
        self.name == other.name
            && self.url == other.url
            && self.keys == other.keys
            && self.headers == other.headers
            && self.timeout == other.timeout
            && self.ca_file == other.ca_file
    }
}

impl std::fmt::Debug for UrlHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlHook")
            .field("name", &self.name)
            .field("url", &shown_url(self.url.as_str()))
            .field("keys", &self.keys.len())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl UrlHook {
    /// Builds the hook of a `[[hooks]]` entry with a `url`: its secrets resolved and checked,
    /// its client built.
    ///
    /// # Errors
    ///
    /// A lowercase message without the hook's name (the caller adds it): a bad URL, secret,
    /// header or CA file, named, never a secret's value.
    pub fn resolve(settings: &HookSettings) -> Result<UrlHook, String> {
        let text = settings.url.as_deref().unwrap_or_default();
        let url = reqwest::Url::parse(text)
            .map_err(|error| format!("'url' value '{}' is not a URL: {error}", shown_url(text)))?;
        let keys = settings
            .signing_secrets()?
            .iter()
            .map(|secret| SigningKey::from_secret(secret.expose()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut headers = HeaderMap::new();
        for (name, value) in &settings.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                format!(
                    "'headers' has invalid header name '{}'",
                    crate::domain::printable(name)
                )
            })?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| format!("'headers' value of '{name}' cannot be an HTTP header"))?;
            // Kept out of any debug output of the HTTP stack: it may be the merchant's token.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = build_client(settings.timeout, settings.ca_file.as_deref())?;
        Ok(UrlHook {
            name: settings.name.clone(),
            url,
            keys,
            headers,
            timeout: settings.timeout,
            ca_file: settings.ca_file.clone(),
            client,
        })
    }

    /// A hook with these parts (tests): no extra headers, no CA file.
    ///
    /// # Errors
    ///
    /// A secret that is not `whsec_` + base64, or a client that cannot be built.
    #[cfg(test)]
    pub fn new(
        name: &str,
        url: reqwest::Url,
        secrets: &[&str],
        timeout: Duration,
    ) -> Result<UrlHook, String> {
        Ok(UrlHook {
            name: name.to_owned(),
            url,
            keys: secrets
                .iter()
                .map(|secret| SigningKey::from_secret(secret))
                .collect::<Result<_, _>>()?,
            headers: HeaderMap::new(),
            timeout,
            ca_file: None,
            client: build_client(timeout, None)?,
        })
    }

    /// How many secrets sign each event (2 during a rotation).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

fn build_client(
    timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        // Never follow a redirect: a 3xx is a failure naming its Location.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .connect_timeout(timeout.min(CONNECT_TIMEOUT))
        .pool_idle_timeout(POOL_IDLE)
        .tcp_nodelay(true);
    if let Some(path) = ca_file {
        let pem = crate::settings::read_ca_file(path)
            .map_err(|problem| format!("'ca_file': {problem}"))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| {
            format!(
                "'ca_file': the CA file '{}' is not valid PEM: {error}",
                path.display()
            )
        })?;
        builder = builder.tls_certs_merge(certificates);
    }
    builder
        .build()
        .map_err(|error| format!("cannot build the HTTP client: {error}"))
}

/// The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under
/// each key, separated by spaces.
pub fn sign(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    keys.iter()
        .map(|key| {
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0)
                .expect("HMAC takes a key of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            let digest = mac.finalize().into_bytes();
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// POSTs `event` to `hook` once and reports exactly how it ended. Never panics on the
/// endpoint's behaviour and returns within about the hook's timeout.
///
/// If `stop` is cancelled during the exchange, the request is abandoned and the ending is
/// [`Ending::Interrupted`]; if it already is, nothing is sent ([`Ending::Stopped`]).
pub async fn deliver(hook: &UrlHook, event: &HookEvent, stop: &CancellationToken) -> HookOutcome {
    if stop.is_cancelled() {
        return outcome(Ending::Stopped(None), Duration::ZERO);
    }
    let body = event.to_json();
    let timestamp = Utc::now().timestamp();
    let Ok(id) = HeaderValue::from_str(&event.event_id) else {
        return outcome(
            Ending::RequestFailed("the event id cannot be an HTTP header".to_owned()),
            Duration::ZERO,
        );
    };
    let mut signature = HeaderValue::from_str(&sign(&hook.keys, &event.event_id, timestamp, &body))
        .expect("base64 is a valid header value");
    signature.set_sensitive(true);
    let request = hook
        .client
        .post(hook.url.clone())
        .headers(hook.headers.clone())
        .header(CONTENT_TYPE, "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp)
        .header("webhook-signature", signature)
        .timeout(hook.timeout)
        .body(body);
    let started = Instant::now();
    let exchange = async {
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|value: &HeaderValue| value.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header(RETRY_AFTER).and_then(|value| parse_retry_after(&value));
        let location = header(LOCATION).map(|value| crate::domain::printable(&value));
        let mut read = Vec::new();
        // The status decides; a body that fails half-way only shortens the excerpt.
        while read.len() < MAX_ANSWER_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        Ok::<HttpAnswer, reqwest::Error>(HttpAnswer {
            status,
            retry_after,
            location,
            excerpt: excerpt(&read),
        })
    };
    let ending = tokio::select! {
        _ = stop.cancelled() => Ending::Interrupted(started.elapsed()),
        result = exchange => match result {
            Ok(answer) => {
                if answer.status == 410 {
                    tracing::warn!(
                        hook = %hook.name,
                        url = %shown_url(hook.url.as_str()),
                        "the hook's endpoint answered 410 Gone: it says it will never take an event again; \
                         check the hook's url with the merchant, or remove the hook"
                    );
                }
                Ending::Answered(answer)
            }
            Err(error) => Ending::RequestFailed(describe_error(&error, hook.timeout)),
        },
    };
    outcome(ending, started.elapsed())
}

fn outcome(ending: Ending, duration: Duration) -> HookOutcome {
    HookOutcome {
        ending,
        duration,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        pid: None,
    }
}

/// The first [`EXCERPT_CHARS`] of an answer, lossy UTF-8, secrets scrubbed, control characters
/// escaped, whitespace runs folded (one line).
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let scrubbed = crate::domain::scrub_secrets(&folded);
    let mut out: String = scrubbed
        .chars()
        .take(EXCERPT_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if scrubbed.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    out
}

/// `Retry-After`: delay-seconds or an HTTP date, as a wait from now (never negative).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (date.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// A failed exchange in one line, without the URL (its query may hold a token) and with
/// secrets scrubbed: `timed out after 10s`, `cannot connect: Connection refused (os error 111)`.
fn describe_error(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("timed out after {}", humantime::format_duration(timeout));
    }
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !causes.contains(&text) {
            causes.push(text);
        }
        source = cause.source();
    }
    let what = if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let text = if causes.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {}", causes.join(": "))
    };
    crate::domain::scrub_secrets(&text).into_owned()
}

#[cfg(test)]
mod tests;
