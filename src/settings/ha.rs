//! `[ha]`: the highly available pair on a PostgreSQL ledger.
//!
//! Owns: the section's plain data and defaults (its bound is in `bounds.rs`).
//! Must never: act on them (the daemon holds and renews the lease).

use std::time::Duration;

use serde::Deserialize;

/// `[ha]`: the active daemon's lease on a PostgreSQL ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSettings {
    /// How long the active daemon's lease lasts without renewal; a standby takes over when it
    /// runs out. The active daemon renews it every third of this.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            lease: default_lease(),
        }
    }
}
