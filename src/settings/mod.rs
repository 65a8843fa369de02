//! Configuration: the TOML file, `PAYWATCH_<SECTION>__<KEY>` overrides, and secrets.
//!
//! Owns: loading, checking and describing settings. Layers, later wins: built-in defaults, the
//! TOML file, then environment variables. Unknown keys are errors: a typo in a payment daemon's
//! config must not be silently ignored.
//! Must never: let a secret reach Debug output, a log line or an error message.

pub mod secret;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::CheckoutStatus;
pub use secret::Secret;

/// How checkouts are spread over Listen streams (`[firestore] stream_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    /// Many targets per stream, added and removed on the live stream (for thousands of checkouts).
    #[default]
    Multiplexed,
    /// One stream per checkout, target id 1 (for emulators that support only that).
    PerDocument,
}

impl StreamMode {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamMode::Multiplexed => "multiplexed",
            StreamMode::PerDocument => "per-document",
        }
    }
}

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/paywatch/paywatch.toml";

/// The systemd credential name of the paymennt API secret (`LoadCredential=paymennt-api-secret:…`).
pub const CREDENTIAL_API_SECRET: &str = "paymennt-api-secret";
/// The systemd credential name of the paymennt API key.
pub const CREDENTIAL_API_KEY: &str = "paymennt-api-key";
/// The systemd credential name of the Google service-account file.
pub const CREDENTIAL_FIRESTORE: &str = "firestore-service-account";

/// The systemd credential name of the HTTP listener's bearer token (`POST /v1/checkouts`).
pub const CREDENTIAL_HTTP_TOKEN: &str = "paywatch-http-token";
/// The systemd credential name of the webhook HMAC key (the `hmacKey` paymennt returned).
pub const CREDENTIAL_WEBHOOK_HMAC_KEY: &str = "paywatch-webhook-hmac-key";

/// The longest duration any setting accepts (ten years).
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// The accepted range of each duration setting (`hooks[N].x` as `hooks.x`), lowest first.
pub const DURATION_BOUNDS: &[(&str, Duration, Duration)] = &[
    (
        "paymennt.connect_timeout",
        Duration::from_millis(100),
        Duration::from_secs(300),
    ),
    (
        "paymennt.request_timeout",
        Duration::from_millis(100),
        Duration::from_secs(600),
    ),
    (
        "firestore.idle_timeout",
        Duration::from_secs(1),
        Duration::from_secs(3600),
    ),
    (
        "firestore.add_ack_timeout",
        Duration::from_millis(100),
        Duration::from_secs(600),
    ),
    ("firestore.refund_watch", Duration::ZERO, MAX_DURATION),
    (
        "reconcile.interval",
        Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    ),
    (
        "reconcile.startup_grace",
        Duration::ZERO,
        Duration::from_secs(600),
    ),
    (
        "daemon.drain_timeout",
        Duration::ZERO,
        Duration::from_secs(3600),
    ),
    (
        "hooks.timeout",
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
    ),
    (
        "hooks.max_age",
        Duration::from_secs(1),
        Duration::from_secs(366 * 24 * 3600),
    ),
    (
        "http.verify_failing_after",
        Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    ),
    (
        "http.header_timeout",
        Duration::from_millis(100),
        Duration::from_secs(600),
    ),
    (
        "http.request_timeout",
        Duration::from_millis(100),
        Duration::from_secs(3600),
    ),
    (
        "http.idle_timeout",
        Duration::from_millis(100),
        Duration::from_secs(3600),
    ),
];

/// The accepted range of each numeric setting (`hooks[N].x` as `hooks.x`), lowest first.
pub const COUNT_BOUNDS: &[(&str, u64, u64)] = &[
    ("paymennt.max_retries", 0, 20),
    ("paymennt.concurrency", 1, 256),
    ("firestore.targets_per_stream", 1, 10_000),
    ("firestore.streams_per_connection", 1, 1000),
    ("hooks_concurrency", 1, 256),
    ("hooks.max_attempts", 1, 1000),
    ("http.max_body_bytes", 1024, 10 * 1024 * 1024),
    ("http.webhook_rate_per_address", 1, 1_000_000),
    ("http.webhook_rate_per_checkout", 1, 1_000_000),
    ("http.max_connections", 1, 16_384),
];

/// The key as the bound tables spell it: `hooks[3].timeout` is `hooks.timeout`.
fn bound_key(key: &str) -> String {
    match key.split_once("].") {
        Some((_, field)) if key.starts_with("hooks[") => format!("hooks.{field}"),
        _ => key.to_owned(),
    }
}

fn duration_bounds(key: &str) -> (Duration, Duration) {
    let key = bound_key(key);
    DURATION_BOUNDS
        .iter()
        .find(|(name, _, _)| *name == key)
        .map(|(_, min, max)| (*min, *max))
        .unwrap_or((Duration::ZERO, MAX_DURATION))
}

fn count_bounds(key: &str) -> (u64, u64) {
    let key = bound_key(key);
    COUNT_BOUNDS
        .iter()
        .find(|(name, _, _)| *name == key)
        .map(|(_, min, max)| (*min, *max))
        .unwrap_or((1, 1000))
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

/// `[ledger]`: the SQLite ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// The database file. Created, with its directory, if missing.
    #[serde(default = "default_ledger_path")]
    pub path: PathBuf,
}

impl LedgerSettings {
    /// The file next to the ledger where `firebase-anonymous` keeps its Firebase identity (the
    /// refresh token, mode 0600), so a restart does not sign up a new anonymous user:
    /// `<ledger file name>.firebase-identity`.
    pub fn firebase_identity_path(&self) -> PathBuf {
        let mut name = self
            .path
            .file_name()
            .map(std::ffi::OsStr::to_os_string)
            .unwrap_or_else(|| "paywatch.db".into());
        name.push(".firebase-identity");
        self.path.with_file_name(name)
    }
}

fn default_ledger_path() -> PathBuf {
    PathBuf::from("/var/lib/paywatch/paywatch.db")
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            path: default_ledger_path(),
        }
    }
}

/// paymennt's two environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymenntEnvironment {
    /// `https://api.test.paymennt.com/mer/v2.0/`
    Test,
    /// `https://api.paymennt.com/mer/v2.0/`
    Live,
}

/// `[paymennt]`: the Merchant API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymenntSettings {
    /// `test` or `live`; chooses the base URL unless `base_url` is set.
    #[serde(default = "default_environment")]
    pub environment: PaymenntEnvironment,
    /// Overrides the base URL (the sandbox: `http://127.0.0.1:8790/mer/v2.0/`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The API key (`X-Paymennt-Api-Key`).
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// A file holding the API key.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The API secret (`X-Paymennt-Api-Secret`). Prefer `api_secret_file` or a credential.
    #[serde(default)]
    pub api_secret: Option<Secret>,
    /// A file holding the API secret.
    #[serde(default)]
    pub api_secret_file: Option<PathBuf>,
    /// TCP and TLS connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout of one whole request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries after the first attempt, for network errors, 5xx and 429.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Get Checkout calls in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A PEM file of CA certificates trusted for the API's TLS, in addition to the built-in
    /// roots (a TLS-inspecting proxy, or a test CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_environment() -> PaymenntEnvironment {
    PaymenntEnvironment::Test
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_max_retries() -> u32 {
    4
}
fn default_concurrency() -> usize {
    8
}

impl Default for PaymenntSettings {
    fn default() -> Self {
        PaymenntSettings {
            environment: default_environment(),
            base_url: None,
            api_key: None,
            api_key_file: None,
            api_secret: None,
            api_secret_file: None,
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            max_retries: default_max_retries(),
            concurrency: default_concurrency(),
            ca_file: None,
        }
    }
}

/// The API key and secret, resolved from their sources.
#[derive(Debug, Clone)]
pub struct ApiCredentials {
    /// `X-Paymennt-Api-Key`.
    pub key: Secret,
    /// `X-Paymennt-Api-Secret`.
    pub secret: Secret,
}

impl PaymenntSettings {
    /// The base URL in use, always ending in `/`.
    pub fn base_url(&self) -> String {
        let url = match (&self.base_url, self.environment) {
            (Some(url), _) => url.clone(),
            (None, PaymenntEnvironment::Test) => "https://api.test.paymennt.com/mer/v2.0/".into(),
            (None, PaymenntEnvironment::Live) => "https://api.paymennt.com/mer/v2.0/".into(),
        };
        if url.ends_with('/') {
            url
        } else {
            format!("{url}/")
        }
    }

    /// Resolves the key and secret: the value in the config or environment, else the file named
    /// by `*_file`, else the systemd credential.
    ///
    /// # Errors
    ///
    /// Names the key that is missing or the file that cannot be read; never the value.
    pub fn credentials(&self) -> Result<ApiCredentials, SettingsError> {
        let key = resolve_secret(
            "paymennt.api_key",
            self.api_key.as_ref(),
            self.api_key_file.as_deref(),
            CREDENTIAL_API_KEY,
        )?;
        let secret = resolve_secret(
            "paymennt.api_secret",
            self.api_secret.as_ref(),
            self.api_secret_file.as_deref(),
            CREDENTIAL_API_SECRET,
        )?;
        Ok(ApiCredentials { key, secret })
    }
}

fn resolve_secret(
    key: &str,
    value: Option<&Secret>,
    file: Option<&Path>,
    credential: &str,
) -> Result<Secret, SettingsError> {
    if let Some(value) = value {
        if value.expose().is_empty() {
            return Err(err(format!("'{key}' is empty")));
        }
        return Ok(value.clone());
    }
    if let Some(file) = file {
        return secret::read_secret_file(file)
            .map_err(|problem| err(format!("{key}_file: {problem}")));
    }
    if let Some(path) = secret::systemd_credential(credential) {
        return secret::read_secret_file(&path)
            .map_err(|problem| err(format!("systemd credential '{credential}': {problem}")));
    }
    let env = format!("PAYWATCH_{}", key.to_uppercase().replace('.', "__"));
    Err(err(format!(
        "'{key}' is not set\n\nset it in the config file, as '{key}_file', in {env}, \
         or as the systemd credential '{credential}'"
    )))
}

/// `[firestore]`: the Listen connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirestoreSettings {
    /// Service-account JSON file. Else the systemd credential `firestore-service-account`, else
    /// `GOOGLE_APPLICATION_CREDENTIALS`. Not needed for a loopback endpoint.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Overrides `https://firestore.googleapis.com` (an emulator or the sandbox). Plaintext
    /// `http://` only on loopback.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The Firestore database id the checkout documents are in (`(default)`; paymennt's
    /// create-link response names the project, never a database).
    #[serde(default = "default_database")]
    pub database: String,
    /// `multiplexed` or `per-document`.
    #[serde(default = "default_stream_mode")]
    pub stream_mode: StreamMode,
    /// Most targets on one multiplexed stream.
    #[serde(default = "default_targets_per_stream")]
    pub targets_per_stream: usize,
    /// Most streams on one HTTP/2 connection (Google's front end allows 100).
    #[serde(default = "default_streams_per_connection")]
    pub streams_per_connection: usize,
    /// A stream with no message for this long is reopened (the server heartbeats every ~30s).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Multiplexed mode: a target the server has not acknowledged after this long moves to a
    /// fresh stream (some emulators read only a stream's first request). At most half of
    /// `idle_timeout` is used.
    #[serde(default = "default_add_ack_timeout", with = "humantime_serde")]
    pub add_ack_timeout: Duration,
    /// How long a PAID checkout stays watched for refunds.
    #[serde(default = "default_refund_watch", with = "humantime_serde")]
    pub refund_watch: Duration,
    /// How paywatch authenticates to Firestore; see [`FirestoreSettings::auth_mode`] for the
    /// default.
    #[serde(default)]
    pub auth: Option<FirestoreAuthMode>,
    /// The Firebase Web API key of the project holding the checkout documents: used to sign in
    /// for `firebase-anonymous` (Firebase Auth). Sent to Firestore only with
    /// `send_api_key_to_firestore`.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Also send `api_key` to Firestore itself (`x-goog-api-key`). The Firebase SDKs do not:
    /// Firestore does not need it, and a key restricted to other APIs is refused there.
    #[serde(default)]
    pub send_api_key_to_firestore: bool,
    /// Firebase Auth's Identity Toolkit base URL (`accounts:signUp`), for `firebase-anonymous`.
    #[serde(default)]
    pub identity_endpoint: Option<String>,
    /// Firebase Auth's token endpoint (refreshes ID tokens), for `firebase-anonymous`.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// A PEM file of CA certificates trusted for Firestore's TLS (and the two Firebase Auth
    /// endpoints), in addition to the built-in roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether to listen to Firestore at all. `false`: changes arrive only through webhooks
    /// (`[http]`), the reconciler and discovery.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

/// `[firestore] auth`: who paywatch is to Firestore.
///
/// The spellings ([`FirestoreAuthMode::as_str`]) are part of the config format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirestoreAuthMode {
    /// A Google service-account key file: an OAuth identity, checked by IAM.
    ServiceAccount,
    /// Google's Application Default Credentials, metadata server included; only when asked for.
    ApplicationDefault,
    /// No credentials: the project's security rules decide (optionally with the Web API key).
    None,
    /// An anonymous Firebase Auth user: rules that need `request.auth != null`.
    FirebaseAnonymous,
}

impl FirestoreAuthMode {
    /// Every mode, in the order the docs list them.
    pub const ALL: [FirestoreAuthMode; 4] = [
        FirestoreAuthMode::ServiceAccount,
        FirestoreAuthMode::ApplicationDefault,
        FirestoreAuthMode::None,
        FirestoreAuthMode::FirebaseAnonymous,
    ];

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            FirestoreAuthMode::ServiceAccount => "service-account",
            FirestoreAuthMode::ApplicationDefault => "application-default",
            FirestoreAuthMode::None => "none",
            FirestoreAuthMode::FirebaseAnonymous => "firebase-anonymous",
        }
    }
}

impl std::fmt::Display for FirestoreAuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Firebase Auth's production Identity Toolkit base URL.
pub const DEFAULT_IDENTITY_ENDPOINT: &str = "https://identitytoolkit.googleapis.com/v1";
/// Firebase Auth's production token endpoint.
pub const DEFAULT_TOKEN_ENDPOINT: &str = "https://securetoken.googleapis.com/v1/token";

fn default_database() -> String {
    crate::domain::DEFAULT_DATABASE.to_owned()
}
fn default_stream_mode() -> StreamMode {
    StreamMode::Multiplexed
}
fn default_targets_per_stream() -> usize {
    500
}
fn default_streams_per_connection() -> usize {
    100
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_add_ack_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_refund_watch() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

impl Default for FirestoreSettings {
    fn default() -> Self {
        FirestoreSettings {
            credentials: None,
            endpoint: None,
            database: default_database(),
            stream_mode: default_stream_mode(),
            targets_per_stream: default_targets_per_stream(),
            streams_per_connection: default_streams_per_connection(),
            idle_timeout: default_idle_timeout(),
            add_ack_timeout: default_add_ack_timeout(),
            refund_watch: default_refund_watch(),
            auth: None,
            api_key: None,
            send_api_key_to_firestore: false,
            identity_endpoint: None,
            token_endpoint: None,
            ca_file: None,
            enabled: true,
        }
    }
}

impl FirestoreSettings {
    /// The endpoint in use.
    pub fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| "https://firestore.googleapis.com".into())
    }

    /// The service-account file to use, if any: `credentials`, the systemd credential, or
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    pub fn credentials_file(&self) -> Option<PathBuf> {
        self.credentials
            .clone()
            .or_else(|| secret::systemd_credential(CREDENTIAL_FIRESTORE))
            .or_else(|| std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from))
    }

    /// The auth mode in force: `auth` when set; else `service-account` when a key file is
    /// configured (`credentials`), found as the systemd credential `firestore-service-account`,
    /// or named by `GOOGLE_APPLICATION_CREDENTIALS`; else `none`.
    pub fn auth_mode(&self) -> FirestoreAuthMode {
        match self.auth {
            Some(mode) => mode,
            None if self.credentials_file().is_some() => FirestoreAuthMode::ServiceAccount,
            None => FirestoreAuthMode::None,
        }
    }

    /// The Identity Toolkit base URL in use, without a trailing `/`.
    pub fn identity_endpoint(&self) -> String {
        self.identity_endpoint
            .as_deref()
            .unwrap_or(DEFAULT_IDENTITY_ENDPOINT)
            .trim_end_matches('/')
            .to_owned()
    }

    /// The token endpoint in use.
    pub fn token_endpoint(&self) -> String {
        self.token_endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_TOKEN_ENDPOINT.to_owned())
    }

    /// Where a key file path came from, for messages.
    pub fn credentials_source(&self, path: &Path) -> &'static str {
        if self.credentials.as_deref() == Some(path) {
            "from 'firestore.credentials'"
        } else if secret::systemd_credential(CREDENTIAL_FIRESTORE).as_deref() == Some(path) {
            "the systemd credential 'firestore-service-account'"
        } else {
            "from GOOGLE_APPLICATION_CREDENTIALS"
        }
    }
}

/// `[reconcile]`: the periodic Get Checkout sweep over open checkouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// Time between sweeps.
    #[serde(default = "default_reconcile_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Checkouts per Search Checkouts page in a sweep.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// How long the start-up sweep leaves the checkouts the listener's first snapshot reports
    /// to that snapshot, before verifying those it did not answer itself.
    #[serde(default = "default_startup_grace", with = "humantime_serde")]
    pub startup_grace: Duration,
}

fn default_startup_grace() -> Duration {
    Duration::from_secs(5)
}

fn default_page_size() -> u32 {
    100
}

/// The largest page size paywatch asks paymennt for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// `[discovery]`: tracking checkouts created anywhere, found with Search Checkouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySettings {
    /// On or off; unset means on when paymennt credentials are configured.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Checkout types to track (paymennt's `type`: QR, WEB, MOBILE, LINK, TERMINAL): a TOML
    /// array, or comma-separated text (as an environment variable gives it).
    #[serde(
        default = "default_discovery_types",
        deserialize_with = "list_or_comma_separated"
    )]
    pub types: Vec<String>,
    /// Time between searches.
    #[serde(default = "default_discovery_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How far back a first round (no complete round stored) looks.
    #[serde(default = "default_discovery_lookback", with = "humantime_serde")]
    pub lookback: Duration,
    /// How far before the last complete round's start the next round searches again, for
    /// checkouts that became visible late and for clocks that disagree.
    #[serde(default = "default_discovery_overlap", with = "humantime_serde")]
    pub overlap: Duration,
    /// Checkouts per Search Checkouts page.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

fn default_discovery_types() -> Vec<String> {
    vec!["LINK".to_owned()]
}

fn default_discovery_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_discovery_lookback() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_discovery_overlap() -> Duration {
    Duration::from_secs(10 * 60)
}

/// A list of strings given as an array, or as one comma-separated string (the form an
/// environment variable has); blanks around items and empty items are dropped.
fn list_or_comma_separated<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrText::deserialize(deserializer)? {
        ListOrText::List(items) => items,
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        DiscoverySettings {
            enabled: None,
            types: default_discovery_types(),
            interval: default_discovery_interval(),
            lookback: default_discovery_lookback(),
            overlap: default_discovery_overlap(),
            page_size: default_page_size(),
        }
    }
}

impl DiscoverySettings {
    /// Whether discovery runs: as configured, else when paymennt credentials are set.
    pub fn is_enabled(&self, paymennt: &PaymenntSettings) -> bool {
        self.enabled
            .unwrap_or_else(|| paymennt.credentials().is_ok())
    }
}

fn default_reconcile_interval() -> Duration {
    Duration::from_secs(300)
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            interval: default_reconcile_interval(),
            page_size: default_page_size(),
            startup_grace: default_startup_grace(),
        }
    }
}

/// `[daemon]`: process behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// On SIGTERM, how long in-flight verifications and hooks may take before exit.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// When paymennt refuses the API credentials before it ever accepted them: `false` stops
    /// the daemon with exit 2 (a configuration problem); `true` keeps it running, not ready,
    /// until they are accepted.
    #[serde(default)]
    pub wait_for_api: bool,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            drain_timeout: default_drain_timeout(),
            wait_for_api: false,
        }
    }
}

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

fn resolve_optional_secret(
    key: &str,
    value: Option<&Secret>,
    file: Option<&Path>,
    credential: &str,
) -> Result<Option<Secret>, SettingsError> {
    if value.is_none() && file.is_none() && secret::systemd_credential(credential).is_none() {
        return Ok(None);
    }
    resolve_secret(key, value, file, credential).map(Some)
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter: `info`, `debug`, `paywatch=debug,info`. `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
}

fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

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
        let which = if previous { "previous-secret" } else { "secret" };
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
        ("permanent_exit_codes", !hook.permanent_exit_codes.is_empty()),
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
        read_ca_file(file).map_err(|problem| err(format!("{origin}: '{at}.ca_file': {problem}")))?;
    }
    Ok(())
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

/// The config file to read: `--config`, else the default path if it exists.
fn choose_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, SettingsError> {
    match explicit {
        Some(path) => {
            if !path.exists() {
                return Err(err(format!(
                    "config file '{}' does not exist",
                    path.display()
                )));
            }
            Ok(Some(path.to_path_buf()))
        }
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            Ok(default.exists().then(|| default.to_path_buf()))
        }
    }
}

/// Environment variables that are not settings even though they start with `PAYWATCH_`:
/// the config path, and the variables paywatch gives to hooks (a hook may call paywatch).
fn is_setting_variable(rest: &str) -> bool {
    rest.contains("__") || rest == "HOOKS_CONCURRENCY"
}

/// The `PAYWATCH_<SECTION>__<KEY>` variables, as config keys (`paymennt.base_url`).
fn environment_overrides(
    variables: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> BTreeMap<String, (String, String)> {
    let mut overrides = BTreeMap::new();
    for (name, value) in variables {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix("PAYWATCH_") else {
            continue;
        };
        if !is_setting_variable(rest) {
            continue;
        }
        let key = rest.to_lowercase().replace("__", ".");
        overrides.insert(key, (name.to_owned(), value.to_owned()));
    }
    overrides
}

/// Every key the file or the environment may set, for the unknown-key check.
pub const KNOWN_KEYS: &[&str] = &[
    "ledger.path",
    "paymennt.environment",
    "paymennt.base_url",
    "paymennt.api_key",
    "paymennt.api_key_file",
    "paymennt.api_secret",
    "paymennt.api_secret_file",
    "paymennt.connect_timeout",
    "paymennt.request_timeout",
    "paymennt.max_retries",
    "paymennt.concurrency",
    "paymennt.ca_file",
    "firestore.credentials",
    "firestore.endpoint",
    "firestore.database",
    "firestore.stream_mode",
    "firestore.targets_per_stream",
    "firestore.streams_per_connection",
    "firestore.idle_timeout",
    "firestore.add_ack_timeout",
    "firestore.refund_watch",
    "firestore.auth",
    "firestore.api_key",
    "firestore.send_api_key_to_firestore",
    "firestore.identity_endpoint",
    "firestore.token_endpoint",
    "firestore.ca_file",
    "firestore.enabled",
    "reconcile.interval",
    "reconcile.page_size",
    "reconcile.startup_grace",
    "discovery.enabled",
    "discovery.types",
    "discovery.interval",
    "discovery.lookback",
    "discovery.overlap",
    "discovery.page_size",
    "daemon.drain_timeout",
    "daemon.wait_for_api",
    "log.level",
    "log.format",
    "http.listen",
    "http.token",
    "http.token_file",
    "http.webhook_hmac_key",
    "http.webhook_hmac_key_file",
    "http.webhook_signature_header",
    "http.webhook_require_signature",
    "http.max_body_bytes",
    "http.webhook_rate_per_address",
    "http.webhook_rate_per_checkout",
    "http.verify_failing_after",
    "http.header_timeout",
    "http.request_timeout",
    "http.idle_timeout",
    "http.max_connections",
    "hooks_concurrency",
];

const HOOK_KEYS: &[&str] = &[
    "name",
    "command",
    "statuses",
    "timeout",
    "max_attempts",
    "max_age",
    "env",
    "permanent_exit_codes",
    "run_as",
    "url",
    "secret",
    "secret_file",
    "previous_secret",
    "previous_secret_file",
    "headers",
    "ca_file",
];

/// Reports keys no setting has, with the closest known key as a suggestion.
/// The line of the key at `path` in TOML `text` (`["discovery", "lokback"]`, or
/// `["hooks", "0", "comand"]` for an entry of an array of tables), for error messages.
fn key_line(text: &str, path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let parsed = DeTable::parse(text).ok()?;
    let mut value: Option<&DeValue<'_>> = None;
    let mut table: &DeTable<'_> = parsed.get_ref();
    let mut span = None;
    for part in path {
        if let Some(DeValue::Array(entries)) = value {
            let entry = entries.get(part.parse::<usize>().ok()?)?;
            let DeValue::Table(inner) = entry.get_ref() else {
                return None;
            };
            table = inner;
            value = None;
            continue;
        }
        if let Some(DeValue::Table(inner)) = value {
            table = inner;
        }
        let (key, found) = table.iter().find(|(key, _)| key.get_ref() == part)?;
        span = Some(key.span());
        value = Some(found.get_ref());
    }
    span.map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
}

fn check_keys(table: &toml::Table, origin: &str, text: &str) -> Result<(), SettingsError> {
    // The file's name and the key's line, where it can be found.
    let at = |path: &[&str]| match key_line(text, path) {
        Some(line) => format!("{origin} (line {line})"),
        None => origin.to_owned(),
    };
    for (section, value) in table {
        match (section.as_str(), value) {
            ("hooks", toml::Value::Array(hooks)) => {
                for (index, hook) in hooks.iter().enumerate() {
                    let toml::Value::Table(hook) = hook else {
                        return Err(err(format!(
                            "{origin}: 'hooks' entry {} must be a table ([[hooks]])",
                            index + 1
                        )));
                    };
                    for key in hook.keys() {
                        if !HOOK_KEYS.contains(&key.as_str()) {
                            return Err(unknown_key(
                                &at(&["hooks", &index.to_string(), key]),
                                &format!("hooks[{index}].{key}"),
                                key,
                                HOOK_KEYS,
                            ));
                        }
                    }
                }
            }
            (section, toml::Value::Table(keys)) => {
                for key in keys.keys() {
                    let full = format!("{section}.{key}");
                    if !KNOWN_KEYS.contains(&full.as_str()) {
                        return Err(unknown_key(&at(&[section, key]), &full, &full, KNOWN_KEYS));
                    }
                }
            }
            (key, _) => {
                if !KNOWN_KEYS.contains(&key) {
                    return Err(unknown_key(&at(&[key]), key, key, KNOWN_KEYS));
                }
            }
        }
    }
    Ok(())
}

fn unknown_key(origin: &str, shown: &str, key: &str, known: &[&str]) -> SettingsError {
    let suggestion = known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), candidate))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, candidate)| format!("\n\ndid you mean '{candidate}'?"))
        .unwrap_or_default();
    err(format!("{origin}: unknown key '{shown}'{suggestion}"))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            current.push(
                (previous[j] + cost)
                    .min(previous[j + 1] + 1)
                    .min(current[j] + 1),
            );
        }
        previous = current;
    }
    previous[b.len()]
}

/// Turns a `config` error into one that names where the bad value came from.
fn describe_config_error(
    error: config::ConfigError,
    origin: &str,
    overrides: &BTreeMap<String, (String, String)>,
) -> SettingsError {
    let mut text = error.to_string();
    // serde's wording for an unknown enum value is about Rust, not the config: say which
    // values the key accepts.
    const CHOICES: &[(&str, &str)] = &[
        ("firestore.stream_mode", "multiplexed, per-document"),
        (
            "firestore.auth",
            "service-account, application-default, none, firebase-anonymous",
        ),
        ("log.format", "text, json"),
        ("paymennt.environment", "test, live"),
    ];
    if let Some((_, rest)) = text.split_once("does not have variant constructor ")
        && let Some((value, key)) = rest.split_once(" for key `")
    {
        let key = key.trim_end_matches('`');
        let choices = CHOICES
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| *c)
            .unwrap_or("see config/paywatch.toml");
        text = format!(
            "'{key}' value '{}' is not one of: {choices}",
            crate::domain::printable(value)
        );
    }
    // `config` ends type errors with "for key `a.b`"; if an environment variable set that key,
    // name the variable rather than the file.
    let from = overrides
        .iter()
        .find(|(key, _)| text.contains(&format!("`{key}`")) || text.contains(&format!("'{key}'")))
        .map(|(_, (name, _))| format!("environment variable {name}"))
        .unwrap_or_else(|| origin.to_owned());
    err(format!("{from}: {text}"))
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
        let mut durations = vec![
            (
                "paymennt.connect_timeout".to_owned(),
                self.paymennt.connect_timeout,
            ),
            (
                "paymennt.request_timeout".to_owned(),
                self.paymennt.request_timeout,
            ),
            (
                "firestore.idle_timeout".to_owned(),
                self.firestore.idle_timeout,
            ),
            (
                "firestore.add_ack_timeout".to_owned(),
                self.firestore.add_ack_timeout,
            ),
            (
                "firestore.refund_watch".to_owned(),
                self.firestore.refund_watch,
            ),
            ("reconcile.interval".to_owned(), self.reconcile.interval),
            (
                "reconcile.startup_grace".to_owned(),
                self.reconcile.startup_grace,
            ),
            ("daemon.drain_timeout".to_owned(), self.daemon.drain_timeout),
            (
                "http.verify_failing_after".to_owned(),
                self.http.verify_failing_after,
            ),
            ("http.header_timeout".to_owned(), self.http.header_timeout),
            ("http.request_timeout".to_owned(), self.http.request_timeout),
            ("http.idle_timeout".to_owned(), self.http.idle_timeout),
        ];
        let mut counts = vec![
            (
                "paymennt.max_retries".to_owned(),
                u64::from(self.paymennt.max_retries),
            ),
            (
                "paymennt.concurrency".to_owned(),
                self.paymennt.concurrency as u64,
            ),
            (
                "firestore.targets_per_stream".to_owned(),
                self.firestore.targets_per_stream as u64,
            ),
            (
                "firestore.streams_per_connection".to_owned(),
                self.firestore.streams_per_connection as u64,
            ),
            (
                "hooks_concurrency".to_owned(),
                self.hooks_concurrency as u64,
            ),
            (
                "http.max_body_bytes".to_owned(),
                self.http.max_body_bytes as u64,
            ),
            (
                "http.webhook_rate_per_address".to_owned(),
                u64::from(self.http.webhook_rate_per_address),
            ),
            (
                "http.webhook_rate_per_checkout".to_owned(),
                u64::from(self.http.webhook_rate_per_checkout),
            ),
            (
                "http.max_connections".to_owned(),
                self.http.max_connections as u64,
            ),
        ];
        for (index, hook) in self.hooks.iter().enumerate() {
            durations.push((format!("hooks[{index}].timeout"), hook.timeout));
            if let Some(max_age) = hook.max_age {
                durations.push((format!("hooks[{index}].max_age"), max_age));
            }
            if let Some(max_attempts) = hook.max_attempts {
                counts.push((
                    format!("hooks[{index}].max_attempts"),
                    u64::from(max_attempts),
                ));
            }
            for code in &hook.permanent_exit_codes {
                if !(1..=255).contains(code) {
                    return Err(err(format!(
                        "{origin}: 'hooks[{index}].permanent_exit_codes' value '{code}' is not an exit code a hook can end with (1 to 255)"
                    )));
                }
            }
        }
        for (key, value) in durations {
            let (min, max) = duration_bounds(&key);
            let shown = humantime::format_duration(value);
            if value < min {
                return Err(err(format!(
                    "{}: '{key}' value '{shown}' is too short (at least {})",
                    from(&key),
                    humantime::format_duration(min)
                )));
            }
            if value > max {
                return Err(err(format!(
                    "{}: '{key}' value '{shown}' is too long (at most {})",
                    from(&key),
                    humantime::format_duration(max)
                )));
            }
        }
        for (key, value) in counts {
            let (min, max) = count_bounds(&key);
            if value < min {
                return Err(err(format!(
                    "{}: '{key}' value '{value}' is too small (at least {min})",
                    from(&key)
                )));
            }
            if value > max {
                return Err(err(format!(
                    "{}: '{key}' value '{value}' is too large (at most {max})",
                    from(&key)
                )));
            }
        }
        let ranges = [
            (
                "discovery.interval",
                self.discovery.interval,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            ),
            (
                "discovery.lookback",
                self.discovery.lookback,
                Duration::ZERO,
                Duration::from_secs(366 * 24 * 3600),
            ),
            (
                "discovery.overlap",
                self.discovery.overlap,
                Duration::ZERO,
                Duration::from_secs(24 * 3600),
            ),
        ];
        for (key, value, low, high) in ranges {
            if value < low || value > high {
                return Err(err(format!(
                    "{origin}: '{key}' value '{}' is out of range ({} to {})",
                    humantime::format_duration(value),
                    humantime::format_duration(low),
                    humantime::format_duration(high)
                )));
            }
        }
        for (key, value) in [
            ("reconcile.page_size", self.reconcile.page_size),
            ("discovery.page_size", self.discovery.page_size),
        ] {
            if !(1..=MAX_PAGE_SIZE).contains(&value) {
                return Err(err(format!(
                    "{origin}: '{key}' value '{value}' is out of range (1 to {MAX_PAGE_SIZE})"
                )));
            }
        }
        if self.discovery.types.is_empty() {
            return Err(err(format!(
                "{origin}: 'discovery.types' is empty\n\nlist at least one of {}, or set discovery.enabled = false",
                crate::domain::CHECKOUT_TYPES.join(", ")
            )));
        }
        for kind in &self.discovery.types {
            if !crate::domain::CHECKOUT_TYPES.contains(&kind.as_str()) {
                return Err(err(format!(
                    "{origin}: 'discovery.types' has unknown type '{}'\n\nknown types: {}",
                    crate::domain::printable(kind),
                    crate::domain::CHECKOUT_TYPES.join(", ")
                )));
            }
        }
        if http::HeaderName::from_bytes(self.http.webhook_signature_header.as_bytes()).is_err() {
            return Err(err(format!(
                "{origin}: 'http.webhook_signature_header' value '{}' is not a valid HTTP header name",
                crate::domain::printable(&self.http.webhook_signature_header)
            )));
        }
        if let Some(url) = &self.paymennt.base_url {
            check_url(origin, "paymennt.base_url", url)?;
        }
        if let Some(url) = &self.firestore.endpoint {
            check_url(origin, "firestore.endpoint", url)?;
        }
        if let Some(url) = &self.firestore.identity_endpoint {
            check_url(origin, "firestore.identity_endpoint", url)?;
        }
        if let Some(url) = &self.firestore.token_endpoint {
            check_url(origin, "firestore.token_endpoint", url)?;
        }
        for (key, file) in [
            ("firestore.ca_file", &self.firestore.ca_file),
            ("paymennt.ca_file", &self.paymennt.ca_file),
        ] {
            if let Some(file) = file {
                read_ca_file(file)
                    .map_err(|problem| err(format!("{origin}: '{key}': {problem}")))?;
            }
        }
        if let Err(error) =
            crate::domain::check_database_id("firestore.database", &self.firestore.database)
        {
            return Err(err(format!(
                "{origin}: '{}' value '{}' is invalid: {}",
                error.what, error.value, error.reason
            )));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(err(format!(
                "{origin}: 'log.level' value '{}' is not a valid filter\n\nuse a level such as info or debug",
                crate::domain::printable(&self.log.level)
            )));
        }
        let mut names = BTreeSet::new();
        for (index, hook) in self.hooks.iter().enumerate() {
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

fn line_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    format!(" (line {line})")
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
