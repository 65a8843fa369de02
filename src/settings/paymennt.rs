//! `[paymennt]`: the Merchant API's address, credentials, timeouts and retries.
//!
//! Owns: the section's plain data and resolving the API key and secret from their sources.
//! Must never: put a credential's value in a message (errors name the key, never the value).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::{Secret, resolve_secret};
use super::{SettingsError, check_url, err, read_ca_file};

/// The systemd credential name of the paymennt API secret (`LoadCredential=paymennt-api-secret:…`).
pub const CREDENTIAL_API_SECRET: &str = "paymennt-api-secret";
/// The systemd credential name of the paymennt API key.
pub const CREDENTIAL_API_KEY: &str = "paymennt-api-key";

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

impl PaymenntSettings {
    /// Checks the base URL and the CA file.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        if let Some(url) = &self.base_url {
            check_url(origin, "paymennt.base_url", url)?;
        }
        if let Some(file) = &self.ca_file {
            read_ca_file(file)
                .map_err(|problem| err(format!("{origin}: 'paymennt.ca_file': {problem}")))?;
        }
        Ok(())
    }
}
