//! Configuration: the TOML file, `PAYWATCH_<SECTION>__<KEY>` overrides, and secrets.
//!
//! Owns: loading and validating settings.
//! Must never: let a secret reach Debug output, a log line or an error message.

/// A config problem: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);
