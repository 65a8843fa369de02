//! `[daemon]`: process behaviour (drain on shutdown, waiting for the API).
//!
//! Owns: the section's plain data and defaults.
//! Must never: act on them (the daemon does).

use std::time::Duration;

use serde::Deserialize;

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
