//! Webhook intake: a notification from paymennt (`POST /webhooks/paymennt`) becomes a nudge.
//!
//! Owns: reading the checkout id out of a notification, the HMAC-SHA256 signature check, the
//! per-address rate limit, the per-checkout notification windows (coalescing), and sending the
//! nudge (source `webhook`) for a tracked checkout.
//! Must never: read a status, amount or anything else from the body as a fact (a notification
//! only says "verify checkout X"), refuse or drop a notification because of what *other*
//! notifications did for the same checkout, answer differently for tracked and untracked
//! checkouts, or write a log line per notification not acted on.
//!
//! # What is checked (and what is not)
//!
//! paymennt's OpenAPI spec documents the webhook objects (`address`, `hmacKey`, `enabled`,
//! `failed`) but not the notification's body or how it is signed. So:
//!
//! - The body must be a JSON object of at most `[http] max_body_bytes`; the checkout id is taken
//!   from the first of `checkoutId`, `checkout_id`, `checkout.id`, `data.checkoutId`, `data.id`,
//!   `result.id`, `id` that is present. Nothing else in it is read.
//! - Signature: with a key configured (`[http] webhook_hmac_key`), the `[http]
//!   webhook_signature_header` header (default `X-Paymennt-Signature`) must be the hex
//!   HMAC-SHA256 of the raw body keyed with the key's text (an optional `sha256=` prefix is
//!   accepted); a mismatch is refused with 401, and so is a notification without the header
//!   unless `[http] webhook_require_signature = false`. Without a key, nothing is checked:
//!   either way the checkout is verified with Get Checkout before anything is recorded.
//! - Per source address (an IPv6 address counted by its /64, which one host usually holds
//!   whole): at most `[http] webhook_rate_per_address` a minute, then 429.
//! - Not checked: timestamps or replay (a replayed notification is one more nudge, and nudges
//!   are idempotent).
//!
//! # Windows: notifications coalesce, never refused per checkout
//!
//! Per checkout, a notification opens a window of `60 s / [http] webhook_rate_per_checkout`
//! and is verified at once; the others arriving within it are folded into one nudge sent when
//! the window ends (which opens the next window). So a checkout costs at most one Get Checkout
//! per window however many notifications name it (forged ones included), and every accepted
//! notification is followed by a verification that starts after it arrived: a flood can delay
//! a genuine notification by one window, never lose it.
//!
//! # One answer, counted logs
//!
//! Every accepted notification gets the same 202 body, whether its checkout is tracked or not
//! (or it names none), so the answer tells nobody which checkouts paywatch watches. What was
//! not acted on (untracked ids, id-less test calls, refusals) is counted and logged at most a
//! line a minute or so (one at once after a quiet minute, then the minute's counts), never a
//! line each.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::domain::{CheckoutId, Source, printable};
use crate::ledger::Ledger;
use crate::settings::{HttpSettings, Secret, SettingsError};
use crate::sources::Nudge;

/// Keys the address rate limiter may hold before the idle ones are dropped (bounds memory
/// under a flood of distinct addresses).
const RATE_LIMIT_KEYS: usize = 10_000;

/// How often the counts of notifications not acted on are logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What became of a notification; the HTTP layer turns it into a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Accepted. Deliberately one outcome whether the checkout is tracked (it will be
    /// verified, at once or when its window ends), untracked (nothing is done) or the
    /// notification names none (paymennt's "test webhook" call, say): the answer must not
    /// tell which checkouts are tracked.
    Accepted,
    /// Not a notification: the message says what is wrong.
    Malformed(String),
    /// A signature was present and did not match the configured key.
    BadSignature,
    /// A key is configured, signatures are required, and this notification carries none.
    Unsigned,
    /// Too many notifications from this address (or its IPv6 /64).
    RateLimited {
        /// When one more would be accepted.
        retry_after: Duration,
    },
    /// The ledger cannot be read: try again later.
    Unavailable(String),
}

/// Turns notifications into nudges. Shared by the HTTP handlers.
pub struct WebhookIntake {
    ledger: Ledger,
    nudges: mpsc::Sender<Nudge>,
    hmac_key: Option<Secret>,
    /// Whether a notification without a signature is refused when a key is configured.
    require_signature: bool,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    /// The per-checkout windows (shared with their tasks).
    windows: Arc<Windows>,
    /// Notifications not acted on, logged as counts (shared with the summary task).
    tally: Arc<Tally>,
    /// Whether the summary task runs (started with the first notification, inside the runtime).
    summary_started: std::sync::Once,
    /// Cancelled when the intake is dropped (the HTTP listener stopped): window tasks send what
    /// they hold at once and end, so the verifier's channel closes for the drain.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    /// Wakes a discovery round when a notification names a checkout the ledger does not know
    /// (discovery coalesces and spaces the wake-ups); `None` with discovery off.
    discovery_wake: Option<Arc<tokio::sync::Notify>>,
}

impl std::fmt::Debug for WebhookIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookIntake")
            .field("signature_key_configured", &self.hmac_key.is_some())
            .field("require_signature", &self.require_signature)
            .field("window", &self.windows.length)
            .finish_non_exhaustive()
    }
}

fn per_minute(count: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN))
}

/// The length of a checkout's notification window for `[http] webhook_rate_per_checkout`.
pub fn window_length(rate_per_checkout: u32) -> Duration {
    Duration::from_secs(60) / rate_per_checkout.max(1)
}

/// The key an address is rate limited under: an IPv4 address (or an IPv4-mapped IPv6 one) as
/// itself, any other IPv6 address by its /64, since one host usually holds a whole /64 and
/// could otherwise take a fresh address for every notification.
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
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
        let stop = CancellationToken::new();
        Ok(WebhookIntake {
            ledger,
            nudges,
            hmac_key: settings.webhook_hmac_key()?,
            require_signature: settings.webhook_require_signature,
            per_address: RateLimiter::keyed(per_minute(settings.webhook_rate_per_address)),
            windows: Arc::new(Windows {
                length: window_length(settings.webhook_rate_per_checkout),
                open: Mutex::new(HashMap::new()),
            }),
            tally: Arc::new(Tally::new(settings.webhook_signature_header.clone())),
            summary_started: std::sync::Once::new(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            discovery_wake: None,
        })
    }

    /// Makes a notification for a checkout the ledger does not know wake a discovery round
    /// through `wake`, so a link created elsewhere is watched within seconds.
    pub fn set_discovery_wake(&mut self, wake: Arc<tokio::sync::Notify>) {
        self.discovery_wake = Some(wake);
    }

    /// Whether signatures are checked (a key is configured).
    pub fn checks_signatures(&self) -> bool {
        self.hmac_key.is_some()
    }

    /// Counts a notification not acted on; logs the counts if no line went out lately.
    fn not_acted(&self, what: NotActed, from: IpAddr) {
        self.summary_started.call_once(|| {
            let (tally, stop) = (Arc::clone(&self.tally), self.stop.clone());
            tokio::spawn(log_summaries(tally, stop));
        });
        if let Some(summary) = self.tally.note(what, from, Instant::now()) {
            summary.log();
        }
    }

    /// The one place where a notification names a checkout that is not tracked. It is counted
    /// (no log line of its own) and, with discovery on, wakes an early discovery round:
    /// discovery coalesces the wake-ups and spaces its rounds, so a flood of forged ids cannot
    /// become a flood of searches; nothing else is called, so an unknown id costs no Get
    /// Checkout.
    fn not_tracked(&self, id: &CheckoutId, from: IpAddr) {
        tracing::trace!(checkout = %id, %from, "webhook notification for a checkout that is not tracked");
        if let Some(wake) = &self.discovery_wake {
            wake.notify_one();
        }
        self.not_acted(NotActed::NotTracked, from);
    }

    /// Handles one notification from `from`, with the signature header's value if present.
    pub async fn receive(&self, from: IpAddr, signature: Option<&[u8]>, body: &[u8]) -> Intake {
        let seen_at = Instant::now();
        if let Err(retry_after) = check(&self.per_address, &address_key(from)) {
            self.not_acted(NotActed::RateLimited, from);
            return Intake::RateLimited { retry_after };
        }
        match (signature, &self.hmac_key) {
            (Some(signature), Some(key)) => {
                if !signature_matches(key, signature, body) {
                    self.not_acted(NotActed::BadSignature, from);
                    return Intake::BadSignature;
                }
            }
            (None, Some(_)) if self.require_signature => {
                self.not_acted(NotActed::Unsigned, from);
                return Intake::Unsigned;
            }
            (Some(_), None) => {
                tracing::trace!(%from, "webhook notification is signed but no [http] webhook_hmac_key is configured; signature not checked");
            }
            (None, _) => {}
        }
        let id = match checkout_id_of(body) {
            Ok(Some(id)) => id,
            Ok(None) => {
                self.not_acted(NotActed::NoCheckout, from);
                return Intake::Accepted;
            }
            Err(message) => return Intake::Malformed(message),
        };
        let tracked = match self.ledger.checkout(&id).await {
            Ok(record) => record.is_some(),
            Err(error) => {
                tracing::error!(checkout = %id, %error, "webhook: cannot read the ledger");
                return Intake::Unavailable("the ledger cannot be read".into());
            }
        };
        if !tracked {
            self.not_tracked(&id, from);
            return Intake::Accepted;
        }
        // From here on nothing awaits: the window's task (not this request, which its client
        // may abandon) sends the nudges, so an open window always ends in a verification.
        match self.windows.note(&id, seen_at) {
            Noted::Opened => {
                tracing::debug!(checkout = %id, %from, "webhook notification: verifying");
                tokio::spawn(run_window(
                    Arc::clone(&self.windows),
                    id,
                    seen_at,
                    self.nudges.clone(),
                    self.stop.clone(),
                ));
            }
            Noted::Folded => {
                tracing::trace!(checkout = %id, %from, "webhook notification folded into its checkout's window");
            }
        }
        Intake::Accepted
    }
}

/// A webhook nudge for `checkout_id`, first noticed at `seen_at`.
fn webhook_nudge(checkout_id: CheckoutId, seen_at: Instant) -> Nudge {
    Nudge {
        checkout_id,
        source: Source::Webhook,
        seen_at,
        changed_at: None,
        seen_after: None,
        ticket: None,
    }
}

/// The checkouts with a notification window open.
struct Windows {
    /// How long a window lasts.
    length: Duration,
    /// Each open window, with when the first notification folded into it arrived (`None`:
    /// none yet, so the window ends without a nudge).
    open: Mutex<HashMap<CheckoutId, Option<Instant>>>,
}

/// What [`Windows::note`] did.
#[derive(Debug, PartialEq, Eq)]
enum Noted {
    /// No window was open: this one opens it (and is verified at once).
    Opened,
    /// Folded into the open window: verified when it ends.
    Folded,
}

impl Windows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CheckoutId, Option<Instant>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a notification for `id` that arrived `at`.
    fn note(&self, id: &CheckoutId, at: Instant) -> Noted {
        let mut open = self.lock();
        match open.get_mut(id) {
            Some(folded) => {
                folded.get_or_insert(at);
                Noted::Folded
            }
            None => {
                open.insert(id.clone(), None);
                Noted::Opened
            }
        }
    }

    /// `id`'s window ended: when the first notification folded into it arrived (the next
    /// window opens, empty), or `None` when none was (the window closes: the next notification
    /// opens a new one). One step under the lock, so no notification falls between the two.
    fn end(&self, id: &CheckoutId) -> Option<Instant> {
        let mut open = self.lock();
        match open.get_mut(id) {
            Some(folded @ Some(_)) => folded.take(),
            Some(None) | None => {
                open.remove(id);
                None
            }
        }
    }

    /// Closes `id`'s window, returning when its first folded notification arrived, if any.
    fn close(&self, id: &CheckoutId) -> Option<Instant> {
        self.lock().remove(id).flatten()
    }
}

/// One checkout's windows: nudges at once for the notification that opened it, then at the end
/// of each window that folded any, until one ends empty. When `stop` fires (the HTTP listener
/// is gone) what the window holds is nudged at once.
async fn run_window(
    windows: Arc<Windows>,
    id: CheckoutId,
    seen_at: Instant,
    nudges: mpsc::Sender<Nudge>,
    stop: CancellationToken,
) {
    let mut next = Some(seen_at);
    loop {
        if let Some(seen_at) = next
            && nudges
                .send(webhook_nudge(id.clone(), seen_at))
                .await
                .is_err()
        {
            // The verifier is gone (shutting down); the next start's reconciler verifies it.
            windows.close(&id);
            return;
        }
        let stopping = tokio::select! {
            () = tokio::time::sleep(windows.length) => false,
            () = stop.cancelled() => true,
        };
        if stopping {
            if let Some(seen_at) = windows.close(&id) {
                let _ = nudges.send(webhook_nudge(id.clone(), seen_at)).await;
            }
            return;
        }
        next = windows.end(&id);
        if next.is_none() {
            return;
        }
    }
}

/// Why a notification was not turned into a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotActed {
    /// It names a checkout that is not tracked.
    NotTracked,
    /// It names no checkout (a test call).
    NoCheckout,
    /// Refused: no signature while one is required.
    Unsigned,
    /// Refused: the signature does not match the key.
    BadSignature,
    /// Refused: too many from its address.
    RateLimited,
}

impl NotActed {
    const ALL: [NotActed; 5] = [
        NotActed::NotTracked,
        NotActed::NoCheckout,
        NotActed::Unsigned,
        NotActed::BadSignature,
        NotActed::RateLimited,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn is_refusal(self) -> bool {
        matches!(
            self,
            NotActed::Unsigned | NotActed::BadSignature | NotActed::RateLimited
        )
    }
}

/// Counts of notifications not acted on since the last line about them.
struct Tally {
    /// The signature header's name, for the hint.
    signature_header: String,
    state: Mutex<TallyState>,
}

#[derive(Default)]
struct TallyState {
    counts: [u64; NotActed::ALL.len()],
    /// The address of the latest one counted.
    last_from: Option<IpAddr>,
    /// When the last line went out.
    last_line: Option<Instant>,
}

/// One line's worth of counts.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    counts: [u64; NotActed::ALL.len()],
    last_from: Option<IpAddr>,
    signature_header: String,
}

impl Tally {
    fn new(signature_header: String) -> Tally {
        Tally {
            signature_header,
            state: Mutex::new(TallyState::default()),
        }
    }

    /// Counts one from `from` at `now`: the summary to log now (this one included) when no
    /// line went out within the last [`SUMMARY_EVERY`], so the first after a quiet spell is
    /// seen at once; else `None` (the counts wait for [`Tally::take`]).
    fn note(&self, what: NotActed, from: IpAddr, now: Instant) -> Option<Summary> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.counts[what.index()] += 1;
        state.last_from = Some(from);
        let due = state
            .last_line
            .is_none_or(|at| now.saturating_duration_since(at) >= SUMMARY_EVERY);
        due.then(|| self.summary(&mut state, now))
    }

    /// The counts since the last line, if any, as a summary to log at `now`.
    fn take(&self, now: Instant) -> Option<Summary> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.counts.iter().any(|count| *count > 0)).then(|| self.summary(&mut state, now))
    }

    fn summary(&self, state: &mut TallyState, now: Instant) -> Summary {
        state.last_line = Some(now);
        Summary {
            counts: std::mem::take(&mut state.counts),
            last_from: state.last_from.take(),
            signature_header: self.signature_header.clone(),
        }
    }
}

impl Summary {
    fn count(&self, what: NotActed) -> u64 {
        self.counts[what.index()]
    }

    /// Logs it: a warning when anything was refused (the operator may need to act), else info.
    fn log(&self) {
        let refused = NotActed::ALL
            .iter()
            .any(|what| what.is_refusal() && self.count(*what) > 0);
        let last_from = self
            .last_from
            .map(|from| from.to_string())
            .unwrap_or_default();
        if refused {
            tracing::warn!(%last_from, "{self}");
        } else {
            tracing::info!(%last_from, "{self}");
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("webhook notifications not acted on lately:")?;
        let mut first = true;
        for what in NotActed::ALL {
            let count = self.count(what);
            if count == 0 {
                continue;
            }
            f.write_str(if first { " " } else { "; " })?;
            first = false;
            match what {
                NotActed::NotTracked => {
                    write!(f, "{count} for checkouts that are not tracked (ignored)")
                }
                NotActed::NoCheckout => {
                    write!(f, "{count} naming no checkout (a test call; ignored)")
                }
                NotActed::Unsigned => write!(
                    f,
                    "{count} refused without a {} signature ([http] webhook_hmac_key is set; if paymennt's notifications carry none, set [http] webhook_require_signature = false)",
                    self.signature_header
                ),
                NotActed::BadSignature => write!(
                    f,
                    "{count} refused with a signature that does not match [http] webhook_hmac_key (check it is the hmacKey paymennt returned: paywatch webhooks list --show-hmac-key)"
                ),
                NotActed::RateLimited => write!(
                    f,
                    "{count} refused over [http] webhook_rate_per_address (behind a reverse proxy every notification comes from the proxy: raise it)"
                ),
            }?;
        }
        Ok(())
    }
}

/// Logs the tally's counts once every [`SUMMARY_EVERY`] while there are any, until `stop`.
async fn log_summaries(tally: Arc<Tally>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => {
                if let Some(summary) = tally.take(Instant::now()) {
                    summary.log();
                }
                return;
            }
        }
        if let Some(summary) = tally.take(Instant::now()) {
            summary.log();
        }
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
mod tests;
