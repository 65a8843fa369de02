//! Hooks ready to run: `[[hooks]]` settings turned into resolved commands or URL hooks, and
//! retry policies.
//!
//! Owns: the settings-time checks a hook needs before it can run (its program exists and is
//! executable, found once now rather than at every run; its environment names are valid; its
//! timeout is positive; a URL hook's secrets are read and checked and its client built) and
//! the [`HookSet`] the dispatcher looks hooks up in.
//! Must never: run anything, or resolve a program or read a secret again later (a hook runs
//! what was checked when the settings were loaded; SIGHUP reloads resolve again).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use crate::hooks::post::UrlHook;
use crate::hooks::retry::{DEFAULT_MAX_ATTEMPTS, RetryPolicy, RetrySchedule};
use crate::hooks::runner::{HookCommand, resolve_program, resolve_run_as, validate_env_name};
use crate::settings::{HookSettings, Settings, SettingsError};

/// One hook: what to run and how to retry it.
#[derive(Debug, Clone, PartialEq)]
pub struct HookSpec {
    /// The command to run or the URL to POST to.
    pub target: HookTarget,
    /// How failed deliveries are retried and given up.
    pub policy: RetryPolicy,
}

/// What a hook is: a command or a URL (exactly one of the settings' `command` and `url`).
#[derive(Debug, Clone, PartialEq)]
pub enum HookTarget {
    /// A command, its program an absolute path.
    Command(HookCommand),
    /// An endpoint POSTed to, signed per Standard Webhooks.
    Url(UrlHook),
}

impl HookSpec {
    /// The hook's configured name.
    pub fn name(&self) -> &str {
        match &self.target {
            HookTarget::Command(command) => &command.name,
            HookTarget::Url(url) => &url.name,
        }
    }
}

impl HookSpec {
    /// Resolves one `[[hooks]]` entry. The program is looked up on the `PATH` the hook will
    /// get: its own `env.PATH` if configured, else `path_var` (the daemon's).
    ///
    /// # Errors
    ///
    /// A lowercase message naming the hook and what is wrong with it (without the config origin).
    pub fn resolve(settings: &HookSettings, path_var: Option<&OsStr>) -> Result<HookSpec, String> {
        HookSpec::resolve_with(settings, path_var, nix::unistd::geteuid().is_root())
    }

    /// [`HookSpec::resolve`] for a daemon that is (`running_as_root`) or is not root, which
    /// decides whether a `run_as` can be honoured.
    ///
    /// # Errors
    ///
    /// As [`HookSpec::resolve`]; a `run_as` error carries its own next step.
    pub fn resolve_with(
        settings: &HookSettings,
        path_var: Option<&OsStr>,
        running_as_root: bool,
    ) -> Result<HookSpec, String> {
        let name = &settings.name;
        let policy = RetryPolicy {
            max_attempts: settings.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            max_age: settings.max_age,
            permanent_exit_codes: settings.permanent_exit_codes.clone(),
            schedule: RetrySchedule::standard(),
        };
        if settings.url.is_some() {
            if settings.timeout.is_zero() {
                return Err(format!("hook '{name}': 'timeout' must be greater than 0"));
            }
            let hook =
                UrlHook::resolve(settings).map_err(|error| format!("hook '{name}': {error}"))?;
            return Ok(HookSpec {
                target: HookTarget::Url(hook),
                policy,
            });
        }
        let argv0 = settings.command.first().map(String::as_str).unwrap_or("");
        let hook_path = settings.env.get("PATH").map(OsString::from);
        let path_var = hook_path.as_deref().or(path_var);
        let program =
            resolve_program(argv0, path_var).map_err(|error| format!("hook '{name}': {error}"))?;
        if settings.timeout.is_zero() {
            return Err(format!("hook '{name}': 'timeout' must be greater than 0"));
        }
        if settings.max_attempts == Some(0) {
            return Err(format!("hook '{name}': 'max_attempts' must be at least 1"));
        }
        for key in settings.env.keys() {
            validate_env_name(key).map_err(|error| format!("hook '{name}': {error}"))?;
        }
        let mut command = HookCommand::new(name.clone(), program);
        command.args = settings.command.iter().skip(1).cloned().collect();
        command.env = settings.env.clone();
        command.timeout = settings.timeout;
        command.run_as = settings
            .run_as
            .as_deref()
            .map(|spec| resolve_run_as(spec, running_as_root))
            .transpose()
            .map_err(|error| format!("hook '{name}': {error}"))?;
        Ok(HookSpec {
            target: HookTarget::Command(command),
            policy,
        })
    }
}

/// The configured hooks by name, as the dispatcher sees them. Cheap to share: each hook is an
/// `Arc`, and a reload builds a new set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HookSet {
    hooks: BTreeMap<String, Arc<HookSpec>>,
}

impl HookSet {
    /// The hooks of `settings`, resolved against this process's `PATH`.
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] (exit code 2) naming the config file, the hook and the problem.
    pub fn from_settings(settings: &Settings) -> Result<HookSet, SettingsError> {
        HookSet::resolve(
            &settings.hooks,
            std::env::var_os("PATH").as_deref(),
            &settings.origin_name(),
        )
    }

    /// Resolves every hook against `path_var`; `origin` names the config in errors.
    ///
    /// # Errors
    ///
    /// As [`HookSet::from_settings`], for the first hook that cannot run.
    pub fn resolve(
        hooks: &[HookSettings],
        path_var: Option<&OsStr>,
        origin: &str,
    ) -> Result<HookSet, SettingsError> {
        HookSet::resolve_with(hooks, path_var, origin, nix::unistd::geteuid().is_root())
    }

    /// [`HookSet::resolve`] for a daemon that is (`running_as_root`) or is not root.
    ///
    /// # Errors
    ///
    /// As [`HookSet::from_settings`].
    pub fn resolve_with(
        hooks: &[HookSettings],
        path_var: Option<&OsStr>,
        origin: &str,
        running_as_root: bool,
    ) -> Result<HookSet, SettingsError> {
        let mut set = HookSet::default();
        for (index, hook) in hooks.iter().enumerate() {
            let spec = HookSpec::resolve_with(hook, path_var, running_as_root).map_err(|message| {
                if message.contains("\n\n") || hook.url.is_some() {
                    // It names its own next step (a run_as or secret problem), or it is a URL
                    // hook's (its message names the key).
                    SettingsError(format!("{origin}: {message}"))
                } else {
                    SettingsError(format!(
                        "{origin}: {message}\n\nfix 'hooks[{index}].command' (an absolute path, or a program on PATH)"
                    ))
                }
            })?;
            set.hooks.insert(hook.name.clone(), Arc::new(spec));
        }
        Ok(set)
    }

    /// A set of already-built hooks (tests, embedding). A later hook with a name already used
    /// replaces the earlier one.
    pub fn new(specs: impl IntoIterator<Item = HookSpec>) -> HookSet {
        HookSet {
            hooks: specs
                .into_iter()
                .map(|spec| (spec.name().to_owned(), Arc::new(spec)))
                .collect(),
        }
    }

    /// The same hooks with every retry schedule replaced (tests use millisecond steps).
    pub fn with_schedule(self, schedule: RetrySchedule) -> HookSet {
        HookSet::new(self.hooks.into_values().map(|spec| {
            let mut spec = Arc::unwrap_or_clone(spec);
            spec.policy.schedule = schedule.clone();
            spec
        }))
    }

    /// The hook with this name.
    pub fn get(&self, name: &str) -> Option<Arc<HookSpec>> {
        self.hooks.get(name).cloned()
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.hooks.keys().map(String::as_str)
    }

    /// How many hooks there are.
    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    /// Whether no hook is configured.
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }
}

#[cfg(test)]
mod tests;
