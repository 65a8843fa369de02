//! `[ledger]`: where the ledger lives: an SQLite file (`path`) or a PostgreSQL database (`url`).
//!
//! Owns: the section's plain data, the paths derived from it, the PostgreSQL password's
//! sources, and the check that only one of `path` and `url` is set.
//! Must never: open the ledger (the ledger module does, and parses the URL), or show the URL
//! (it may hold a password: it is a [`Secret`]).

use std::path::PathBuf;

use serde::Deserialize;

use super::secret::{Secret, read_secret_file, systemd_credential};
use super::{SettingsError, err};

/// The systemd credential name of the PostgreSQL ledger's password.
pub const CREDENTIAL_LEDGER_PASSWORD: &str = "paywatch-ledger-password";

/// `[ledger]`: the SQLite file, or a PostgreSQL database shared by a highly available pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// The SQLite database file. Created, with its directory, if missing.
    #[serde(default = "default_ledger_path")]
    pub path: PathBuf,
    /// Whether `path` was set in the file or the environment (not just the default).
    #[serde(skip)]
    pub path_set: bool,
    /// A PostgreSQL ledger, `postgresql://user@host:port/database[?sslmode=...]`, instead of
    /// `path`. A secret: it may hold a password (better in `password_file`).
    #[serde(default)]
    pub url: Option<Secret>,
    /// A file holding the PostgreSQL password (else the systemd credential
    /// `paywatch-ledger-password`, else the URL's, else none).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for the PostgreSQL server's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl LedgerSettings {
    /// Refuses `path` and `url` both set, a URL that is not PostgreSQL's, and a missing
    /// `password_file` or `ca_file`.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        let Some(url) = &self.url else {
            for (key, value) in [
                ("password_file", &self.password_file),
                ("ca_file", &self.ca_file),
            ] {
                if value.is_some() {
                    return Err(err(format!(
                        "{origin}: 'ledger.{key}' is set but 'ledger.url' is not\n\n\
                         it is for a PostgreSQL ledger; set 'ledger.url' or remove it"
                    )));
                }
            }
            return Ok(());
        };
        if self.path_set {
            return Err(err(format!(
                "{origin}: both 'ledger.path' and 'ledger.url' are set\n\n\
                 a ledger is either an SQLite file (path) or a PostgreSQL database (url); keep one"
            )));
        }
        let url = url.expose();
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            return Err(err(format!(
                "{origin}: 'ledger.url' must start with postgresql:// (the value is not shown: \
                 it may hold a password)"
            )));
        }
        for (key, value) in [
            ("password_file", &self.password_file),
            ("ca_file", &self.ca_file),
        ] {
            if let Some(path) = value
                && !path.is_file()
            {
                return Err(err(format!(
                    "{origin}: 'ledger.{key}' value '{}' is not a readable file",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// The PostgreSQL password: `password_file`, else the systemd credential
    /// `paywatch-ledger-password`, else none (the URL's, or none at all).
    ///
    /// # Errors
    ///
    /// The file or credential cannot be read or is empty; the message names the key.
    pub fn password(&self) -> Result<Option<Secret>, SettingsError> {
        if let Some(path) = &self.password_file {
            return read_secret_file(path)
                .map(Some)
                .map_err(|problem| err(format!("'ledger.password_file': {problem}")));
        }
        if let Some(path) = systemd_credential(CREDENTIAL_LEDGER_PASSWORD) {
            return read_secret_file(&path).map(Some).map_err(|problem| {
                err(format!(
                    "systemd credential '{CREDENTIAL_LEDGER_PASSWORD}': {problem}"
                ))
            });
        }
        Ok(None)
    }

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
            path_set: false,
            url: None,
            password_file: None,
            ca_file: None,
        }
    }
}
