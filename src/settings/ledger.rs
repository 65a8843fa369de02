//! `[ledger]`: where the ledger lives.
//!
//! Owns: the section's plain data and the paths derived from it.
//! Must never: open the ledger (the ledger module does).

use std::path::PathBuf;

use serde::Deserialize;

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
