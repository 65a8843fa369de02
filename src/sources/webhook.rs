//! Webhook intake: a notification from paymennt (`POST /webhooks/paymennt`) becomes a nudge.
//!
//! Owns: reading the checkout id out of a notification, the optional HMAC-SHA256 signature
//! check, rate limits per source address and per checkout, and sending the nudge (source
//! `webhook`) for a tracked checkout.
//! Must never: read a status, amount or anything else from the body as a fact. A notification
//! only says "verify checkout X"; a forged one costs at most one Get Checkout.
//!
//! # What is checked (and what is not)
//!
//! paymennt's OpenAPI spec documents the webhook objects (`address`, `hmacKey`, `enabled`,
//! `failed`) but not the notification's body or how it is signed. So:
//!
//! - The body must be a JSON object of at most `[http] max_body_bytes`; the checkout id is taken
//!   from the first of `checkoutId`, `checkout_id`, `checkout.id`, `data.checkoutId`, `data.id`,
//!   `result.id`, `id` that is present. Nothing else in it is read.
//! - Signature: when the request carries the `[http] webhook_signature_header` header (default
//!   `X-Paymennt-Signature`) AND a key is configured (`[http] webhook_hmac_key`), the header must
//!   be the hex HMAC-SHA256 of the raw body keyed with the key's text (an optional `sha256=`
//!   prefix is accepted); a mismatch is refused with 401. Unsigned notifications are accepted, as
//!   are signed ones when no key is configured (the signature is then not checked): either way
//!   the checkout is verified with Get Checkout before anything is recorded.
//! - Not checked: the sender's address (rate limits only), timestamps or replay (a replayed
//!   notification is one more nudge, and nudges are idempotent).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::domain::{CheckoutId, Source, printable};
use crate::ledger::Ledger;
use crate::settings::{HttpSettings, Secret, SettingsError};
use crate::sources::Nudge;

/// Keys a rate limiter may hold before the idle ones are dropped (bounds memory under a flood
/// of distinct addresses or ids).
const RATE_LIMIT_KEYS: usize = 10_000;

/// What became of a notification; the HTTP layer turns it into a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// The checkout is tracked: the verifier was nudged.
    Nudged(CheckoutId),
    /// The checkout is not tracked: nothing was done.
    Unknown(CheckoutId),
    /// A well-formed notification naming no checkout (paymennt's "test webhook" call, say).
    NoCheckout,
    /// Not a notification: the message says what is wrong.
    Malformed(String),
    /// A signature was present and did not match the configured key.
    BadSignature,
    /// Too many notifications from this address or for this checkout.
    RateLimited {
        /// "address" or "checkout".
        scope: &'static str,
        /// When one more would be accepted.
        retry_after: Duration,
    },
    /// The daemon is shutting down or the ledger cannot be read: try again later.
    Unavailable(String),
}

/// Turns notifications into nudges. Shared by the HTTP handlers.
pub struct WebhookIntake {
    ledger: Ledger,
    nudges: mpsc::Sender<Nudge>,
    hmac_key: Option<Secret>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    per_checkout: DefaultKeyedRateLimiter<CheckoutId>,
    /// Refusals (rate limits, bad signatures) are warned about at most once a minute, so a
    /// flood of them cannot flood the log.
    refusals: std::sync::Mutex<Refusals>,
    /// Wakes a discovery round when a notification names a checkout the ledger does not know
    /// (discovery coalesces and spaces the wake-ups); `None` with discovery off.
    discovery_wake: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// Refusals since the last warning.
#[derive(Default)]
struct Refusals {
    last_warning: Option<Instant>,
    unreported: u64,
}

/// How often refused notifications are warned about.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for WebhookIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookIntake")
            .field("signature_key_configured", &self.hmac_key.is_some())
            .finish_non_exhaustive()
    }
}

fn per_minute(count: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN))
}

impl WebhookIntake {
    /// An intake checking `ledger` for tracked checkouts and nudging through `nudges`.
    ///
    /// # Errors
    ///
    /// The HMAC key is configured but cannot be read.
    pub fn new(
        settings: &HttpSettings,
        ledger: Ledger,
        nudges: mpsc::Sender<Nudge>,
    ) -> Result<WebhookIntake, SettingsError> {
        Ok(WebhookIntake {
            ledger,
            nudges,
            hmac_key: settings.webhook_hmac_key()?,
            per_address: RateLimiter::keyed(per_minute(settings.webhook_rate_per_address)),
            per_checkout: RateLimiter::keyed(per_minute(settings.webhook_rate_per_checkout)),
            refusals: std::sync::Mutex::new(Refusals::default()),
            discovery_wake: None,
        })
    }

    /// Makes a notification for a checkout the ledger does not know wake a discovery round
    /// through `wake`, so a link created elsewhere is watched within seconds.
    pub fn set_discovery_wake(&mut self, wake: std::sync::Arc<tokio::sync::Notify>) {
        self.discovery_wake = Some(wake);
    }

    /// Warns about a refusal, or counts it if a warning went out within the last minute.
    fn refused(&self, from: IpAddr, what: &str) {
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = refusals
            .last_warning
            .is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY);
        if due {
            let earlier = std::mem::take(&mut refusals.unreported);
            refusals.last_warning = Some(Instant::now());
            tracing::warn!(%from, refused_since_last_warning = earlier, "webhook notification refused: {what}");
        } else {
            refusals.unreported += 1;
            tracing::debug!(%from, "webhook notification refused: {what}");
        }
    }

    /// Whether signatures are checked (a key is configured).
    pub fn checks_signatures(&self) -> bool {
        self.hmac_key.is_some()
    }

    /// Handles one notification from `from`, with the signature header's value if present.
    pub async fn receive(&self, from: IpAddr, signature: Option<&[u8]>, body: &[u8]) -> Intake {
        let seen_at = Instant::now();
        if let Err(retry_after) = check(&self.per_address, &from) {
            self.refused(
                from,
                "too many from this address ([http] webhook_rate_per_address)",
            );
            return Intake::RateLimited {
                scope: "address",
                retry_after,
            };
        }
        match (signature, &self.hmac_key) {
            (Some(signature), Some(key)) => {
                if !signature_matches(key, signature, body) {
                    self.refused(from, "its signature does not match [http] webhook_hmac_key (check that the key is the hmacKey paymennt returned for this webhook: paywatch webhooks list --show-hmac-key)");
                    return Intake::BadSignature;
                }
            }
            (Some(_), None) => {
                tracing::debug!(%from, "webhook notification is signed but no [http] webhook_hmac_key is configured; signature not checked");
            }
            (None, _) => {}
        }
        let id = match checkout_id_of(body) {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::info!(%from, "webhook notification names no checkout; nothing to verify");
                return Intake::NoCheckout;
            }
            Err(message) => return Intake::Malformed(message),
        };
        if let Err(retry_after) = check(&self.per_checkout, &id) {
            self.refused(
                from,
                &format!("too many for checkout {id} ([http] webhook_rate_per_checkout)"),
            );
            return Intake::RateLimited {
                scope: "checkout",
                retry_after,
            };
        }
        let ledger = self.ledger.clone();
        let lookup = id.clone();
        let tracked = match tokio::task::spawn_blocking(move || ledger.checkout(&lookup)).await {
            Ok(Ok(record)) => record.is_some(),
            Ok(Err(error)) => {
                tracing::error!(checkout = %id, %error, "webhook: cannot read the ledger");
                return Intake::Unavailable("the ledger cannot be read".into());
            }
            Err(error) => {
                tracing::error!(checkout = %id, %error, "webhook: ledger task failed");
                return Intake::Unavailable("the ledger cannot be read".into());
            }
        };
        if !tracked {
            // With discovery on, an early discovery round is woken: discovery coalesces the
            // wake-ups and spaces its rounds, so a flood of forged ids cannot become a flood of
            // searches; nothing else is called, so an unknown id costs no Get Checkout.
            if let Some(wake) = &self.discovery_wake {
                wake.notify_one();
            }
            tracing::info!(checkout = %id, %from, "webhook notification for a checkout that is not tracked; ignored");
            return Intake::Unknown(id);
        }
        let nudge = Nudge {
            checkout_id: id.clone(),
            source: Source::Webhook,
            seen_at,
            changed_at: None,
            seen_after: None,
            ticket: None,
        };
        if self.nudges.send(nudge).await.is_err() {
            return Intake::Unavailable("paywatch is shutting down".into());
        }
        tracing::debug!(checkout = %id, %from, "webhook notification: verifying");
        Intake::Nudged(id)
    }
}

/// Counts one event against `key`; when over the limit, how long until the next is allowed.
fn check<K: Clone + std::hash::Hash + Eq>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), Duration> {
    if limiter.len() > RATE_LIMIT_KEYS {
        limiter.retain_recent();
    }
    limiter
        .check_key(key)
        .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
}

/// Whether `signature` (hex, optionally `sha256=`-prefixed) is the HMAC-SHA256 of `body`.
/// The comparison is constant-time.
fn signature_matches(key: &Secret, signature: &[u8], body: &[u8]) -> bool {
    let text = signature.trim_ascii();
    let text = text.strip_prefix(b"sha256=").unwrap_or(text);
    let Ok(expected) = hex::decode(text) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The hex HMAC-SHA256 of `body` under `key`: what a signed notification carries.
pub fn sign(key: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// The checkout id a notification names: `Ok(None)` for a JSON object naming none.
///
/// # Errors
///
/// Not JSON, not an object, or an id that cannot be a checkout id (named in the message).
pub fn checkout_id_of(body: &[u8]) -> Result<Option<CheckoutId>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("the body is not JSON: {error}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "the body must be a JSON object".to_owned())?;
    const PLACES: [(&str, Option<&str>); 7] = [
        ("checkoutId", None),
        ("checkout_id", None),
        ("checkout", Some("id")),
        ("data", Some("checkoutId")),
        ("data", Some("id")),
        ("result", Some("id")),
        ("id", None),
    ];
    for (outer, inner) in PLACES {
        let Some(found) = object.get(outer) else {
            continue;
        };
        let found = match inner {
            Some(inner) => match found.get(inner) {
                Some(found) => found,
                None => continue,
            },
            None => found,
        };
        let field = inner.map_or_else(|| outer.to_owned(), |inner| format!("{outer}.{inner}"));
        let text = match found {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Number(number) => number.to_string(),
            serde_json::Value::Null => continue,
            other => {
                return Err(format!(
                    "'{field}' must be a checkout id, got {}",
                    printable(&other.to_string())
                ));
            }
        };
        return text
            .parse::<CheckoutId>()
            .map(Some)
            .map_err(|error| format!("'{field}': {error}"));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkout_id_is_found_in_the_usual_places() {
        for body in [
            r#"{"checkoutId":"1234"}"#,
            r#"{"checkout":{"id":"1234","status":"PAID"}}"#,
            r#"{"event":"x","data":{"id":1234}}"#,
            r#"{"success":true,"result":{"id":"1234"}}"#,
            r#"{"id":"1234","status":"PAID"}"#,
        ] {
            assert_eq!(
                checkout_id_of(body.as_bytes()).expect(body),
                Some("1234".parse().expect("id")),
                "{body}"
            );
        }
        assert_eq!(checkout_id_of(br#"{"event":"test"}"#).expect("no id"), None);
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(
            checkout_id_of(b"{nope")
                .expect_err("not json")
                .contains("not JSON")
        );
        assert!(
            checkout_id_of(b"[1]")
                .expect_err("array")
                .contains("object")
        );
        let error = checkout_id_of(br#"{"checkout":{"id":"12; DROP"}}"#).expect_err("bad id");
        assert!(error.contains("checkout.id"), "{error}");
        let error = checkout_id_of(br#"{"checkoutId":[1]}"#).expect_err("array id");
        assert!(error.contains("checkoutId"), "{error}");
    }

    #[test]
    fn signatures_are_hex_hmac_sha256_of_the_body() {
        let key = Secret::new("0123456789abcdef");
        let body = br#"{"checkoutId":"1"}"#;
        let signature = sign("0123456789abcdef", body);
        assert_eq!(signature.len(), 64);
        assert!(signature_matches(&key, signature.as_bytes(), body));
        assert!(signature_matches(
            &key,
            format!("sha256={signature}").as_bytes(),
            body
        ));
        assert!(!signature_matches(&key, signature.as_bytes(), b"{}"));
        assert!(!signature_matches(
            &Secret::new("other"),
            signature.as_bytes(),
            body
        ));
        assert!(!signature_matches(&key, b"not hex", body));
    }
}
