//! `[[hooks]]`: the merchant's hooks as configured.
//!
//! Owns: one entry's plain data, its defaults and its status filter.
//! Must never: resolve or run a hook (the hooks module does), or show an `env` value in Debug
//! output.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::CheckoutStatus;

use super::{SettingsError, err};

/// One `[[hooks]]` entry. Its `Debug` shows the names of `env`, never the values (a hook's env
/// is where a merchant puts their own tokens).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSettings {
    /// A unique name, used in logs, the ledger and `PAYWATCH_HOOK`.
    pub name: String,
    /// The argv to run: an array, never a shell string. The first element is an absolute path
    /// or a program found on PATH.
    pub command: Vec<String>,
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
}

/// Checks the hooks' names (present, unique), commands, statuses and env names.
pub(super) fn check(hooks: &[HookSettings], origin: &str) -> Result<(), SettingsError> {
    let mut names = BTreeSet::new();
    for (index, hook) in hooks.iter().enumerate() {
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
        if hook
            .command
            .first()
            .is_none_or(|program| program.is_empty())
        {
            return Err(err(format!(
                "{origin}: '{at}.command' of hook '{}' is empty\n\ngive an argv array such as [\"/usr/local/bin/mark-paid\", \"--verbose\"]",
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
