//! Configuration: the TOML file, `PAYWATCH_<SECTION>__<KEY>` overrides, and secrets.
//!
//! Owns: loading, checking and describing settings, one file per section. Layers, later wins:
//! built-in defaults, the TOML file, then environment variables. Unknown keys are errors: a typo
//! in a payment daemon's config must not be silently ignored.
//! Must never: let a secret reach Debug output, a log line or an error message; build what the
//! settings describe (connections, authorizers, hooks: their own modules do, from these).

mod bounds;
mod daemon;
mod discovery;
mod firestore;
mod ha;
mod hooks;
mod http;
mod ledger;
mod load;
mod log;
mod paymennt;
mod reconcile;
pub mod secret;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use bounds::{COUNT_BOUNDS, DURATION_BOUNDS, MAX_DURATION};
pub use daemon::DaemonSettings;
pub use discovery::DiscoverySettings;
pub use firestore::{
    CREDENTIAL_FIRESTORE, DEFAULT_IDENTITY_ENDPOINT, DEFAULT_TOKEN_ENDPOINT, FirestoreAuthMode,
    FirestoreSettings, StreamMode,
};
pub use ha::HaSettings;
pub use hooks::{HookSettings, RESERVED_HOOK_HEADERS, shown_url};
pub use http::{CREDENTIAL_HTTP_TOKEN, CREDENTIAL_WEBHOOK_HMAC_KEY, HttpSettings};
pub use ledger::{CREDENTIAL_LEDGER_PASSWORD, LedgerSettings};
pub use load::{DEFAULT_CONFIG_PATH, KNOWN_KEYS};
use load::{
    check_keys, choose_file, describe_config_error, environment_overrides, line_hint, unknown_key,
};
pub use log::{LogFormat, LogSettings};
pub use paymennt::{
    ApiCredentials, CREDENTIAL_API_KEY, CREDENTIAL_API_SECRET, PaymenntEnvironment,
    PaymenntSettings,
};
pub use reconcile::{MAX_PAGE_SIZE, ReconcileSettings};
pub use secret::Secret;

fn default_true() -> bool {
    true
}

/// A config problem: it names the file or variable, the key and the bad value. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

fn err(message: impl Into<String>) -> SettingsError {
    SettingsError(message.into())
}

/// All settings, checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The file these settings came from, if any.
    #[serde(skip)]
    pub origin: Option<PathBuf>,
    /// `[ledger]`.
    #[serde(default)]
    pub ledger: LedgerSettings,
    /// `[paymennt]`.
    #[serde(default)]
    pub paymennt: PaymenntSettings,
    /// `[firestore]`.
    #[serde(default)]
    pub firestore: FirestoreSettings,
    /// `[reconcile]`.
    #[serde(default)]
    pub reconcile: ReconcileSettings,
    /// `[discovery]`.
    #[serde(default)]
    pub discovery: DiscoverySettings,
    /// `[daemon]`.
    #[serde(default)]
    pub daemon: DaemonSettings,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSettings,
    /// `[http]`.
    #[serde(default)]
    pub http: HttpSettings,
    /// `[ha]`.
    #[serde(default)]
    pub ha: HaSettings,
    /// How many hook commands may run at once, over all hooks.
    #[serde(default = "default_hooks_concurrency")]
    pub hooks_concurrency: usize,
    /// `[[hooks]]`.
    #[serde(default)]
    pub hooks: Vec<HookSettings>,
}

fn default_hooks_concurrency() -> usize {
    4
}

impl Settings {
    /// Loads settings: defaults, then the file, then `PAYWATCH_*` variables; then checks them.
    ///
    /// With `explicit` unset, `/etc/paywatch/paywatch.toml` is read if it exists.
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] naming the file or variable, the key and the bad value.
    pub fn load(explicit: Option<&Path>) -> Result<Settings, SettingsError> {
        Settings::load_with_env(explicit, std::env::vars_os())
    }

    /// [`Settings::load`] with the environment given rather than read from the process.
    ///
    /// # Errors
    ///
    /// As [`Settings::load`].
    pub fn load_with_env(
        explicit: Option<&Path>,
        variables: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Settings, SettingsError> {
        let file = choose_file(explicit)?;
        let mut path_in_file = false;
        let mut builder = config::Config::builder();
        let origin = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    err(format!(
                        "cannot read config file '{}': {error}",
                        path.display()
                    ))
                })?;
                let origin = path.display().to_string();
                let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
                    err(
                        format!("{origin}: invalid TOML: {}", error.message().trim())
                            + &line_hint(&text, error.span()),
                    )
                })?;
                check_keys(&table, &origin, &text)?;
                path_in_file = table
                    .get("ledger")
                    .and_then(|ledger| ledger.get("path"))
                    .is_some();
                builder =
                    builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
                origin
            }
            None => "built-in defaults".to_owned(),
        };
        let overrides = environment_overrides(variables);
        for (key, (name, _)) in &overrides {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                return Err(unknown_key(
                    &format!("environment variable {name}"),
                    key,
                    key,
                    KNOWN_KEYS,
                ));
            }
        }
        let env_map: std::collections::HashMap<String, String> = overrides
            .iter()
            .map(|(_, (name, value))| (name.clone(), value.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("PAYWATCH")
                .prefix_separator("_")
                .separator("__")
                // No type guessing: a secret such as "00123" must stay a string. The config crate
                // still converts strings for numeric and boolean settings.
                .try_parsing(false)
                .source(Some(env_map)),
        );
        let merged = builder
            .build()
            .map_err(|error| describe_config_error(error, &origin, &overrides))?;
        let mut settings: Settings = merged
            .try_deserialize()
            .map_err(|error| describe_config_error(error, &origin, &overrides))?;
        settings.origin = file;
        settings.ledger.path_set = path_in_file || overrides.contains_key("ledger.path");
        settings.validate(&origin, &overrides)?;
        Ok(settings)
    }

    /// Checks what types cannot: ranges, URLs, hook names and commands.
    ///
    /// Every number and duration has a lower and an upper bound ([`DURATION_BOUNDS`],
    /// [`COUNT_BOUNDS`]): an absurd value is refused here, naming the key, the value and the
    /// bound, rather than overflow a timer or panic a task deep inside a running daemon.
    fn validate(
        &self,
        origin: &str,
        overrides: &BTreeMap<String, (String, String)>,
    ) -> Result<(), SettingsError> {
        // A value set by an environment variable is reported under the variable's name.
        let from = |key: &str| match overrides.get(key) {
            Some((name, _)) => format!("environment variable {name}"),
            None => origin.to_owned(),
        };
        bounds::check(self, origin, &from)?;
        self.ledger.check(&from("ledger.url"))?;
        self.reconcile.check(origin)?;
        self.discovery.check(origin)?;
        self.http.check(origin)?;
        self.paymennt.check(origin)?;
        self.firestore.check(origin)?;
        self.log.check(origin)?;
        hooks::check(&self.hooks, origin)?;
        Ok(())
    }

    /// The hook with this name.
    pub fn hook(&self, name: &str) -> Option<&HookSettings> {
        self.hooks.iter().find(|hook| hook.name == name)
    }

    /// Where these settings came from, for messages.
    pub fn origin_name(&self) -> String {
        self.origin
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|| "built-in defaults".into())
    }
}

/// Reads a PEM file of CA certificates (`ca_file`), checking it holds at least one.
///
/// # Errors
///
/// The file cannot be read, or holds no PEM certificate; the message names the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path)
        .map_err(|error| format!("cannot read the CA file '{}': {error}", path.display()))?;
    if reqwest::Certificate::from_pem_bundle(&pem).map_or(true, |certs| certs.is_empty()) {
        return Err(format!(
            "the CA file '{}' holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(pem)
}

/// Whether `host` is a loopback name or address.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Accepts `https://…`, or `http://…` only on a loopback host (no plaintext over a network).
fn check_url(origin: &str, key: &str, url: &str) -> Result<(), SettingsError> {
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        err(format!(
            "{origin}: '{key}' value '{}' is not a URL: {error}",
            crate::domain::printable(url)
        ))
    })?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if parsed.host_str().is_some_and(is_loopback_host) => Ok(()),
        "http" => Err(err(format!(
            "{origin}: '{key}' value '{url}' uses plaintext http to a non-loopback host\n\nuse https, or a 127.0.0.1 / localhost address"
        ))),
        other => Err(err(format!(
            "{origin}: '{key}' value '{url}' has unsupported scheme '{other}'"
        ))),
    }
}

#[cfg(test)]
mod tests;
