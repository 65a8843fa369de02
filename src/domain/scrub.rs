//! Scrubbing secrets out of foreign text: the process's list of secret values, and the function
//! every excerpt of an answer from elsewhere goes through before it reaches a log line, an
//! error, the ledger or a hook.
//!
//! Owns: the list (configured secrets register themselves when read, see
//! `settings::Secret::new`; tokens obtained at run time register as they arrive, the latest
//! [`ROTATING_KEPT`] of them kept) and [`scrub_secrets`].
//! Must never: hold anything but secret values, or show them: the list is write-only from
//! outside, and the only way a value comes back out is as `[redacted]`.
//!
//! Why a process-wide list rather than passing the secrets to each excerpt: an upstream that
//! echoes our request (a proxy's error page quoting headers, a misrouted `base_url`, Firebase
//! Auth quoting its `?key=`) can put *any* configured secret into *any* answer, and excerpts
//! are built in many places (the paymennt client, Firebase Auth, the Firestore probe,
//! check-config). One list that every secret joins when it is read, and one function that
//! [`crate::domain::printable`] (the escaping every foreign text already goes through) calls,
//! leave no excerpt to forget.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{PoisonError, RwLock};

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Values shorter than this are not scrubbed: they would blank out ordinary words, and a secret
/// of three characters protects nothing anyway.
pub const MIN_SCRUBBED_LEN: usize = 4;

/// Run-time tokens kept (each renewal adds two: the Firebase ID token and its refresh token);
/// older ones have expired.
pub const ROTATING_KEPT: usize = 32;

/// The registered values, each in every form an echo may show it in.
struct Registry {
    /// Configured secrets: kept for the life of the process.
    pinned: Vec<String>,
    /// Tokens obtained at run time (each in its forms), oldest first.
    rotating: VecDeque<Vec<String>>,
}

static REGISTRY: RwLock<Registry> = RwLock::new(Registry {
    pinned: Vec::new(),
    rotating: VecDeque::new(),
});

/// `value` as it may appear in an echoed request: itself, JSON-escaped, percent-encoded (a
/// query string or form).
fn forms(value: &str) -> Vec<String> {
    let mut forms = vec![value.to_owned()];
    let json = serde_json::to_string(value).unwrap_or_default();
    let json = json
        .strip_prefix('"')
        .and_then(|json| json.strip_suffix('"'))
        .unwrap_or_default();
    // Some encoders (PHP's, say) also escape `/` in JSON strings.
    let json_slashes = json.replace('/', "\\/");
    let encoded = percent_encoded(value);
    for form in [json.to_owned(), json_slashes, encoded] {
        if !form.is_empty() && !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// Percent-encodes every byte outside the URL-unreserved set (as a query string would).
fn percent_encoded(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Registers a configured secret: from now on it is scrubbed from every foreign text.
pub fn register_secret(value: &str) {
    if value.len() < MIN_SCRUBBED_LEN {
        return;
    }
    let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    for form in forms(value) {
        if !registry.pinned.contains(&form) {
            registry.pinned.push(form);
        }
    }
}

/// Registers a token obtained at run time (a Firebase ID or refresh token): scrubbed like a
/// configured secret while it is among the latest [`ROTATING_KEPT`].
pub fn register_rotating_secret(value: &str) {
    if value.len() < MIN_SCRUBBED_LEN {
        return;
    }
    let forms = forms(value);
    let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    if registry.rotating.contains(&forms) {
        return;
    }
    registry.rotating.push_back(forms);
    while registry.rotating.len() > ROTATING_KEPT {
        registry.rotating.pop_front();
    }
}

/// `text` with every registered secret replaced by `[redacted]`. Cheap when none occurs
/// (borrowed back as is).
pub fn scrub_secrets(text: &str) -> Cow<'_, str> {
    let registry = REGISTRY.read().unwrap_or_else(PoisonError::into_inner);
    let mut scrubbed = Cow::Borrowed(text);
    // Longest first, so a secret that contains another is replaced whole.
    let mut found: Vec<&str> = registry
        .pinned
        .iter()
        .chain(registry.rotating.iter().flatten())
        .map(String::as_str)
        .filter(|secret| text.contains(secret))
        .collect();
    found.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    for secret in found {
        if scrubbed.contains(secret) {
            scrubbed = Cow::Owned(scrubbed.replace(secret, REDACTED));
        }
    }
    scrubbed
}

/// The start of a foreign body, scrubbed *before* it is cut (a secret straddling the cut would
/// otherwise leave its first characters behind): at most `limit` bytes of it, on a character
/// boundary. Only the first `limit` plus 4 KiB are looked at (no secret is that long).
pub fn scrubbed_excerpt(body: &[u8], limit: usize) -> String {
    let window = &body[..body.len().min(limit.saturating_add(4096))];
    let text = String::from_utf8_lossy(window);
    let scrubbed = scrub_secrets(&text);
    let mut end = scrubbed.len().min(limit);
    while !scrubbed.is_char_boundary(end) {
        end -= 1;
    }
    scrubbed[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_secret_is_scrubbed_in_every_form() {
        register_secret("VERY-SECRET-0123456789/+=");
        let echoed = "x-paymennt-api-secret: VERY-SECRET-0123456789/+=\n\
                      {\"secret\":\"VERY-SECRET-0123456789\\/+=\"}\n\
                      ?key=VERY-SECRET-0123456789%2F%2B%3D";
        let scrubbed = scrub_secrets(echoed);
        assert!(!scrubbed.contains("VERY-SECRET"), "{scrubbed}");
        assert_eq!(scrubbed.matches(REDACTED).count(), 3, "{scrubbed}");
        assert!(scrubbed.starts_with("x-paymennt-api-secret: [redacted]"));
    }

    #[test]
    fn text_without_secrets_is_borrowed_back() {
        register_secret("SCRUB-UNIT-never-in-text");
        assert!(matches!(
            scrub_secrets("an ordinary error"),
            Cow::Borrowed("an ordinary error")
        ));
    }

    #[test]
    fn short_values_are_not_scrubbed() {
        register_secret("abc");
        assert_eq!(scrub_secrets("abcdef"), "abcdef");
    }

    #[test]
    fn an_excerpt_is_scrubbed_before_it_is_cut() {
        register_secret("STRADDLE-SECRET-42");
        // The secret starts 10 bytes before the cut: cutting first would leave "STRADDLE-S".
        let body = format!("{}STRADDLE-SECRET-42 and more", "x".repeat(190));
        let excerpt = scrubbed_excerpt(body.as_bytes(), 200);
        assert!(!excerpt.contains("STRADDLE"), "{excerpt}");
        assert!(excerpt.len() <= 200);
        // Multi-byte text is cut on a character boundary.
        let excerpt = scrubbed_excerpt("é".repeat(150).as_bytes(), 201);
        assert_eq!(excerpt.len(), 200);
    }

    #[test]
    fn the_longest_secret_wins_and_rotating_ones_are_bounded() {
        register_secret("NESTED-OUTER-SECRET-INNER");
        register_secret("OUTER-SECRET");
        assert_eq!(
            scrub_secrets("a NESTED-OUTER-SECRET-INNER b"),
            format!("a {REDACTED} b")
        );
        for n in 0..ROTATING_KEPT * 2 {
            register_rotating_secret(&format!("rotating-token-{n:04}"));
        }
        assert_eq!(scrub_secrets("rotating-token-0000"), "rotating-token-0000");
        assert_eq!(
            scrub_secrets(&format!("rotating-token-{:04}", ROTATING_KEPT * 2 - 1)),
            REDACTED
        );
    }
}
