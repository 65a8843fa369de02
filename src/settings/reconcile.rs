//! `[reconcile]`: the periodic Get Checkout sweep over open checkouts.
//!
//! Owns: the section's plain data and defaults (the page size shared with `[discovery]`).
//! Must never: run a sweep (the reconciler source does).

use std::time::Duration;

use serde::Deserialize;

use super::{SettingsError, err};

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

pub(super) fn default_page_size() -> u32 {
    100
}

/// The largest page size paywatch asks paymennt for.
pub const MAX_PAGE_SIZE: u32 = 1000;

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

impl ReconcileSettings {
    /// Checks the page size.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        if !(1..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(err(format!(
                "{origin}: 'reconcile.page_size' value '{}' is out of range (1 to {MAX_PAGE_SIZE})",
                self.page_size
            )));
        }
        Ok(())
    }
}
