//! `[http]`: the optional HTTP listener (webhook intake, the track endpoint, health checks).
//!
//! Owns: the section's plain data, its defaults and resolving its two secrets.
//! Must never: put a secret's value in a message.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::{Secret, resolve_optional_secret};
use super::{SettingsError, default_true, err};

/// The systemd credential name of the HTTP listener's bearer token (`POST /v1/checkouts`).
pub const CREDENTIAL_HTTP_TOKEN: &str = "paywatch-http-token";
/// The systemd credential name of the webhook HMAC key (the `hmacKey` paymennt returned).
pub const CREDENTIAL_WEBHOOK_HMAC_KEY: &str = "paywatch-webhook-hmac-key";

/// `[http]`: the optional HTTP listener (webhook intake, track endpoint, health checks).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on, e.g. `127.0.0.1:8788`. Unset: no listener.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Bearer token of `POST /v1/checkouts`. Unset (and no file or credential): that endpoint is
    /// off.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the bearer token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The `hmacKey` paymennt returned for the webhook: signatures are checked with it.
    #[serde(default)]
    pub webhook_hmac_key: Option<Secret>,
    /// A file holding the webhook HMAC key.
    #[serde(default)]
    pub webhook_hmac_key_file: Option<PathBuf>,
    /// The request header carrying a webhook's HMAC-SHA256 signature.
    #[serde(default = "default_signature_header")]
    pub webhook_signature_header: String,
    /// With a key configured, whether a notification without a signature is refused (401).
    /// `false` accepts unsigned ones too (still only a nudge, verified with Get Checkout).
    #[serde(default = "default_true")]
    pub webhook_require_signature: bool,
    /// The largest request body accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Webhook notifications accepted per minute from one source address.
    #[serde(default = "default_webhook_rate_per_address")]
    pub webhook_rate_per_address: u32,
    /// Get Checkout calls per minute for one checkout caused by webhook notifications: the
    /// length of its notification window is a minute divided by this (more notifications are
    /// folded into the window's end, never refused).
    #[serde(default = "default_webhook_rate_per_checkout")]
    pub webhook_rate_per_checkout: u32,
    /// `/readyz` fails once Get Checkout has failed without a success for this long.
    #[serde(default = "default_verify_failing_after", with = "humantime_serde")]
    pub verify_failing_after: Duration,
    /// A request's line and headers must arrive within this, counted from the connection's
    /// opening or, on a kept-alive connection, from the end of the previous response.
    #[serde(default = "default_http_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request, its body and its answer included, must be done within this (408 otherwise).
    #[serde(default = "default_http_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    #[serde(default = "default_http_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// At most this many connections are open at once; at the cap, accepting pauses (new
    /// connections wait in the kernel's backlog, holding none of the daemon's descriptors).
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
}

fn default_signature_header() -> String {
    "X-Paymennt-Signature".into()
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_webhook_rate_per_address() -> u32 {
    120
}
fn default_webhook_rate_per_checkout() -> u32 {
    10
}
fn default_verify_failing_after() -> Duration {
    Duration::from_secs(300)
}
fn default_http_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_http_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_http_idle_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_http_max_connections() -> usize {
    256
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: None,
            token: None,
            token_file: None,
            webhook_hmac_key: None,
            webhook_hmac_key_file: None,
            webhook_signature_header: default_signature_header(),
            webhook_require_signature: true,
            max_body_bytes: default_max_body_bytes(),
            webhook_rate_per_address: default_webhook_rate_per_address(),
            webhook_rate_per_checkout: default_webhook_rate_per_checkout(),
            verify_failing_after: default_verify_failing_after(),
            header_timeout: default_http_header_timeout(),
            request_timeout: default_http_request_timeout(),
            idle_timeout: default_http_idle_timeout(),
            max_connections: default_http_max_connections(),
        }
    }
}

impl HttpSettings {
    /// The bearer token of the track endpoint: `token`, else `token_file`, else the systemd
    /// credential `paywatch-http-token`; `None` when none is configured (the endpoint is off).
    ///
    /// # Errors
    ///
    /// An empty value or an unreadable file, named (never the value).
    pub fn token(&self) -> Result<Option<Secret>, SettingsError> {
        resolve_optional_secret(
            "http.token",
            self.token.as_ref(),
            self.token_file.as_deref(),
            CREDENTIAL_HTTP_TOKEN,
        )
    }

    /// The webhook HMAC key: `webhook_hmac_key`, else its file, else the systemd credential
    /// `paywatch-webhook-hmac-key`; `None` when none is configured.
    ///
    /// # Errors
    ///
    /// An empty value or an unreadable file, named (never the value).
    pub fn webhook_hmac_key(&self) -> Result<Option<Secret>, SettingsError> {
        resolve_optional_secret(
            "http.webhook_hmac_key",
            self.webhook_hmac_key.as_ref(),
            self.webhook_hmac_key_file.as_deref(),
            CREDENTIAL_WEBHOOK_HMAC_KEY,
        )
    }
}

impl HttpSettings {
    /// Checks the signature header's name.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        if ::http::HeaderName::from_bytes(self.webhook_signature_header.as_bytes()).is_err() {
            return Err(err(format!(
                "{origin}: 'http.webhook_signature_header' value '{}' is not a valid HTTP header name",
                crate::domain::printable(&self.webhook_signature_header)
            )));
        }
        Ok(())
    }
}
