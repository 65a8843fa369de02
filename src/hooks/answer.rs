//! What a URL hook's endpoint answered, as the retry policy and the logs see it.
//!
//! Owns: [`HttpAnswer`] (a status, `Retry-After`, a redirect's `Location` and a scrubbed
//! excerpt) and which answers are success, permanent failures or worth retrying.
//! Must never: do I/O, or hold more of an answer than its excerpt.

use std::time::Duration;

/// The longest `Retry-After` honoured: a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What an endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// `Retry-After` (seconds or an HTTP date), as a wait from now, if given.
    pub retry_after: Option<Duration>,
    /// `Location`, for a redirect (not followed), printable.
    pub location: Option<String>,
    /// The start of the body, secrets scrubbed, printable, at most [`EXCERPT_CHARS`].
    pub excerpt: String,
}

impl HttpAnswer {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A 4xx other than 408 and 429: the endpoint refuses this event, and will again.
    pub fn is_permanent(&self) -> bool {
        (400..500).contains(&self.status) && !matches!(self.status, 408 | 429)
    }

    /// One line: `HTTP 500: <excerpt>`, `HTTP 302, a redirect to '…' (not followed; …)`.
    pub fn describe(&self) -> String {
        let reason = reqwest::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|status| status.canonical_reason())
            .map(|reason| format!(" {reason}"))
            .unwrap_or_default();
        let mut text = format!("HTTP {}{reason}", self.status);
        if (300..400).contains(&self.status) {
            text.push_str(&format!(
                ", a redirect to '{}' (not followed; check the hook's url)",
                self.location.as_deref().unwrap_or("(no Location)")
            ));
        }
        if self.status == 410 {
            text.push_str(" (the endpoint says it is gone for good; check the hook's url)");
        }
        if !self.excerpt.is_empty() && !self.is_success() {
            text.push_str(&format!(": {}", self.excerpt));
        }
        text
    }

    /// How long the endpoint asked to wait (`Retry-After`, on a 429 or 503), at most
    /// [`MAX_RETRY_AFTER`].
    pub fn asked_wait(&self) -> Option<Duration> {
        if !matches!(self.status, 429 | 503) {
            return None;
        }
        self.retry_after.map(|wait| wait.min(MAX_RETRY_AFTER))
    }
}
