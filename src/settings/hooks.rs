//! `[[hooks]]`: the merchant's hooks as configured.
//!
//! Owns: one entry's plain data, its defaults, its status filter, the checks of a command or
//! URL hook's keys, and reading a URL hook's signing secrets.
//! Must never: resolve or run a hook (the hooks module does), or show an `env` value, a
//! secret, a header value or a URL's query in Debug output or an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::domain::CheckoutStatus;

use super::{Secret, SettingsError, check_url, err, read_ca_file, secret};

/// One `[[hooks]]` entry. Its `Debug` shows the names of `env`, never the values (a hook's env
/// is where a merchant puts their own tokens).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSettings {
    /// A unique name, used in logs, the ledger and `PAYWATCH_HOOK`.
    pub name: String,
    /// The argv to run: an array, never a shell string. The first element is an absolute path
    /// or a program found on PATH. Empty for a URL hook (exactly one of `command` and `url`).
    #[serde(default)]
    pub command: Vec<String>,
    /// A URL hook: POST each event here, signed per Standard Webhooks. `https://`, or
    /// `http://` to a loopback host only.
    #[serde(default)]
    pub url: Option<String>,
    /// The URL hook's signing secret, `whsec_` + base64 (24 to 64 bytes). Prefer
    /// `secret_file` or the systemd credential `paywatch-hook-NAME-secret`.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A file holding `secret`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// During a rotation, the secret being replaced: each event is signed with both.
    #[serde(default)]
    pub previous_secret: Option<Secret>,
    /// A file holding `previous_secret`.
    #[serde(default)]
    pub previous_secret_file: Option<PathBuf>,
    /// Extra fixed headers of a URL hook's requests.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A PEM file of CA certificates a URL hook's endpoint may use, on top of the built-in roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Which verified statuses fire it; empty means all.
    #[serde(default)]
    pub statuses: Vec<String>,
    /// How long one run may take before its process group is terminated.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts before a delivery is dead.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Age after which a failing delivery is dead.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Extra fixed environment variables for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Exit codes that mean "do not retry".
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
    /// `user` or `user:group`: the hook runs under this identity (the daemon must be root to
    /// switch to it; refused otherwise).
    #[serde(default)]
    pub run_as: Option<String>,
}

impl std::fmt::Debug for HookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookSettings")
            .field("name", &self.name)
            .field("command", &self.command)
            .field("url", &self.url.as_deref().map(shown_url))
            .field("secret", &self.secret)
            .field("secret_file", &self.secret_file)
            .field("previous_secret", &self.previous_secret)
            .field("previous_secret_file", &self.previous_secret_file)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("ca_file", &self.ca_file)
            .field("statuses", &self.statuses)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("max_age", &self.max_age)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("permanent_exit_codes", &self.permanent_exit_codes)
            .field("run_as", &self.run_as)
            .finish()
    }
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(30)
}

impl HookSettings {
    /// A hook running `/bin/true` for `statuses` (empty: all), for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, statuses: &[&str]) -> HookSettings {
        HookSettings {
            name: name.into(),
            command: vec!["/bin/true".into()],
            url: None,
            secret: None,
            secret_file: None,
            previous_secret: None,
            previous_secret_file: None,
            headers: BTreeMap::new(),
            ca_file: None,
            statuses: statuses.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(5),
            max_attempts: None,
            max_age: None,
            env: BTreeMap::new(),
            permanent_exit_codes: vec![],
            run_as: None,
        }
    }

    /// The parsed status filter; empty means every status.
    pub fn status_filter(&self) -> Vec<CheckoutStatus> {
        self.statuses
            .iter()
            .map(|s| CheckoutStatus::parse(s))
            .collect()
    }

    /// Whether a verified status fires this hook.
    pub fn fires_on(&self, status: &CheckoutStatus) -> bool {
        self.statuses.is_empty() || self.status_filter().iter().any(|s| s == status)
    }

    /// The systemd credential holding a URL hook's secret: `paywatch-hook-NAME-secret`
    /// (`previous` = true: `paywatch-hook-NAME-previous-secret`).
    pub fn secret_credential(&self, previous: bool) -> String {
        let which = if previous {
            "previous-secret"
        } else {
            "secret"
        };
        format!("paywatch-hook-{}-{which}", self.name)
    }

    /// A URL hook's signing secrets, current first: `secret`, else `secret_file`, else its
    /// systemd credential; then the previous one, if any, the same way. Each is checked to be
    /// `whsec_` + base64 of 24 to 64 bytes.
    ///
    /// # Errors
    ///
    /// A lowercase message naming the key, file or credential (never the value), with the fix.
    pub fn signing_secrets(&self) -> Result<Vec<Secret>, String> {
        let mut secrets = Vec::with_capacity(2);
        for (key, value, file, previous) in [
            ("secret", &self.secret, &self.secret_file, false),
            (
                "previous_secret",
                &self.previous_secret,
                &self.previous_secret_file,
                true,
            ),
        ] {
            let credential = self.secret_credential(previous);
            let (found, from) = if let Some(value) = value {
                (value.clone(), format!("'{key}'"))
            } else if let Some(file) = file {
                let read = secret::read_secret_file(file)
                    .map_err(|problem| format!("'{key}_file': {problem}"))?;
                (read, format!("'{key}_file' ({})", file.display()))
            } else if let Some(path) = secret::systemd_credential(&credential) {
                let read = secret::read_secret_file(&path)
                    .map_err(|problem| format!("systemd credential '{credential}': {problem}"))?;
                (read, format!("the systemd credential '{credential}'"))
            } else if previous {
                continue;
            } else {
                return Err(format!(
                    "a url hook needs a signing secret, and none is set\n\n\
                     set 'secret' (\"whsec_\" + base64 of 24 to 64 random bytes), 'secret_file', \
                     or the systemd credential '{credential}'"
                ));
            };
            secret::signing_key(found.expose()).map_err(|problem| {
                format!(
                    "{from} is not a Standard Webhooks secret: {problem}\n\n\
                     use \"whsec_\" + base64 of 24 to 64 random bytes, such as: \
                     echo \"whsec_$(head -c 32 /dev/urandom | base64)\""
                )
            })?;
            secrets.push(found);
        }
        Ok(secrets)
    }
}

/// A URL as logs and `check-config` show it: scheme, host, port and path; a query (which may
/// carry a token) and user info become `…`.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let mut shown = format!("{}://", parsed.scheme());
            if !parsed.username().is_empty() || parsed.password().is_some() {
                shown.push_str("…@");
            }
            shown.push_str(parsed.host_str().unwrap_or(""));
            if let Some(port) = parsed.port() {
                shown.push_str(&format!(":{port}"));
            }
            shown.push_str(parsed.path());
            if parsed.query().is_some() {
                shown.push_str("?…");
            }
            shown
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// The header names a URL hook's `headers` cannot set: paywatch writes them (the signature
/// and what it covers), or the HTTP client does.
pub const RESERVED_HOOK_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "user-agent",
];

/// The settings-time checks of a `[[hooks]]` entry's kind (`at` is `hooks[N]`). A command hook
/// sets none of the url-only keys. A url hook has no `command`, none of the command-only keys,
/// an https URL (http only to loopback), a valid inline secret, valid extra headers and a
/// readable `ca_file`. Secrets in files and credentials are checked when the hook is resolved
/// ([`HookSettings::signing_secrets`]).
fn check_hook_kind(origin: &str, at: &str, hook: &HookSettings) -> Result<(), SettingsError> {
    let name = crate::domain::printable(&hook.name);
    let Some(url) = hook.url.as_deref() else {
        for (key, set) in [
            ("secret", hook.secret.is_some()),
            ("secret_file", hook.secret_file.is_some()),
            ("previous_secret", hook.previous_secret.is_some()),
            ("previous_secret_file", hook.previous_secret_file.is_some()),
            ("headers", !hook.headers.is_empty()),
            ("ca_file", hook.ca_file.is_some()),
        ] {
            if set {
                return Err(err(format!(
                    "{origin}: '{at}.{key}' of hook '{name}' applies only to a url hook, and this \
                     one runs a command\n\nremove it, or replace 'command' with a 'url'"
                )));
            }
        }
        return Ok(());
    };
    if !hook.command.is_empty() {
        return Err(err(format!(
            "{origin}: hook '{name}' has both 'command' and 'url'\n\ngive exactly one: \
             'command' runs a program, 'url' POSTs the event to an endpoint"
        )));
    }
    for (key, set) in [
        ("env", !hook.env.is_empty()),
        ("run_as", hook.run_as.is_some()),
        (
            "permanent_exit_codes",
            !hook.permanent_exit_codes.is_empty(),
        ),
    ] {
        if set {
            return Err(err(format!(
                "{origin}: '{at}.{key}' of hook '{name}' applies only to a command hook, and this \
                 one has a url\n\nremove it (a url hook's permanent failures are the 4xx answers)"
            )));
        }
    }
    check_url(origin, &format!("{at}.url"), url).map_err(|error| {
        // Never echo a query or user info (they may carry a token).
        SettingsError(error.0.replace(url, &shown_url(url)))
    })?;
    for (key, value) in [
        ("secret", &hook.secret),
        ("previous_secret", &hook.previous_secret),
    ] {
        if let Some(value) = value
            && let Err(problem) = secret::signing_key(value.expose())
        {
            return Err(err(format!(
                "{origin}: '{at}.{key}' of hook '{name}' is not a Standard Webhooks secret: \
                 {problem}\n\nuse \"whsec_\" + base64 of 24 to 64 random bytes, such as: \
                 echo \"whsec_$(head -c 32 /dev/urandom | base64)\""
            )));
        }
    }
    for (header, value) in &hook.headers {
        let shown = crate::domain::printable(header);
        let Ok(parsed) = http::HeaderName::from_bytes(header.as_bytes()) else {
            return Err(err(format!(
                "{origin}: '{at}.headers' of hook '{name}' has invalid header name '{shown}'"
            )));
        };
        if RESERVED_HOOK_HEADERS.contains(&parsed.as_str()) {
            return Err(err(format!(
                "{origin}: '{at}.headers' of hook '{name}' sets '{shown}', which paywatch writes \
                 itself\n\nreserved: {}",
                RESERVED_HOOK_HEADERS.join(", ")
            )));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(err(format!(
                "{origin}: '{at}.headers' of hook '{name}': the value of '{shown}' has characters \
                 an HTTP header cannot hold (control characters or line breaks)"
            )));
        }
    }
    if let Some(file) = &hook.ca_file {
        read_ca_file(file)
            .map_err(|problem| err(format!("{origin}: '{at}.ca_file': {problem}")))?;
    }
    Ok(())
}

/// Checks the hooks' names (present, unique), commands, statuses and env names.
pub(super) fn check(hooks: &[HookSettings], origin: &str) -> Result<(), SettingsError> {
    let mut names = BTreeSet::new();
    for (index, hook) in hooks.iter().enumerate() {
        let at = format!("hooks[{index}]");
        if hook.name.trim().is_empty() {
            return Err(err(format!("{origin}: '{at}.name' is empty")));
        }
        if !names.insert(hook.name.clone()) {
            return Err(err(format!(
                "{origin}: hook name '{}' is used twice",
                hook.name
            )));
        }
        check_hook_kind(origin, &at, hook)?;
        if hook.url.is_none()
            && hook
                .command
                .first()
                .is_none_or(|program| program.is_empty())
        {
            return Err(err(format!(
                "{origin}: '{at}.command' of hook '{}' is empty\n\ngive an argv array such as [\"/usr/local/bin/mark-paid\", \"--verbose\"], or a url to POST the event to",
                hook.name
            )));
        }
        for status in hook.status_filter() {
            if let CheckoutStatus::Unknown(text) = status {
                return Err(err(format!(
                    "{origin}: '{at}.statuses' of hook '{}' has unknown status '{}'\n\nknown statuses: {}",
                    hook.name,
                    crate::domain::printable(&text),
                    CheckoutStatus::KNOWN
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        for key in hook.env.keys() {
            if key.is_empty()
                || key.contains('=')
                || key.contains('\0')
                || key.starts_with("PAYWATCH_")
            {
                return Err(err(format!(
                    "{origin}: '{at}.env' has invalid variable name '{}' (PAYWATCH_* names are reserved)",
                    crate::domain::printable(key)
                )));
            }
        }
    }
    Ok(())
}
