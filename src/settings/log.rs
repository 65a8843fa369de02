//! `[log]`: the log filter and format.
//!
//! Owns: the section's plain data and defaults.
//! Must never: set up logging (the logging module does).

use serde::Deserialize;

use super::{SettingsError, err};

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

impl LogSettings {
    /// Checks the filter.
    pub(super) fn check(&self, origin: &str) -> Result<(), SettingsError> {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return Err(err(format!(
                "{origin}: 'log.level' value '{}' is not a valid filter\n\nuse a level such as info or debug",
                crate::domain::printable(&self.level)
            )));
        }
        Ok(())
    }
}
