//! `[firestore]`: how paywatch reaches Firestore's Listen (endpoint, database, stream layout,
//! timeouts) and who it is there (the auth mode, the Firebase Web API key).
//!
//! Owns: the section's plain data, its defaults and the spelling of its choices.
//! Must never: build a connection or an authorizer (the Firestore source does, from these).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::secret::{self, Secret};
use super::{SettingsError, check_url, default_true, err, read_ca_file};

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

/// The systemd credential name of the Google service-account file.
pub const CREDENTIAL_FIRESTORE: &str = "firestore-service-account";

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

impl FirestoreSettings {
    /// Checks the endpoints, the CA file and the database id.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        if let Some(url) = &self.endpoint {
            check_url(origin, "firestore.endpoint", url)?;
        }
        if let Some(url) = &self.identity_endpoint {
            check_url(origin, "firestore.identity_endpoint", url)?;
        }
        if let Some(url) = &self.token_endpoint {
            check_url(origin, "firestore.token_endpoint", url)?;
        }
        if let Some(file) = &self.ca_file {
            read_ca_file(file)
                .map_err(|problem| err(format!("{origin}: 'firestore.ca_file': {problem}")))?;
        }
        if let Err(error) = crate::domain::check_database_id("firestore.database", &self.database) {
            return Err(err(format!(
                "{origin}: '{}' value '{}' is invalid: {}",
                error.what, error.value, error.reason
            )));
        }
        Ok(())
    }
}
