//! The daemon process's own guards, taken before anything runs.
//!
//! Owns: keeping the process's memory and environment private (non-dumpable), the open-file
//! limit (raised, then checked against `[http] max_connections`), the warning for hooks that
//! would run as root, and the exclusive lock on the ledger that keeps a second daemon away.
//! Must never: start a task or touch the ledger's contents (the lock is a file of its own).

use std::path::PathBuf;

use anyhow::Context;

use crate::settings::Settings;

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): processes of the same user, hooks
/// included, can then no longer read `/proc/<pid>/environ`, `/proc/<pid>/mem` or attach a
/// debugger, so the API secret in our environment or memory stays ours. It also turns off core
/// dumps, which would hold the same secrets. Hooks themselves are dumpable again after `exec`.
pub(super) fn keep_memory_private() {
    match nix::sys::prctl::set_dumpable(false) {
        Ok(()) => tracing::debug!("process memory and environment are private (non-dumpable)"),
        Err(error) => tracing::warn!(
            "cannot make paywatch non-dumpable ({error}): hooks running as this user could read \
             its environment and memory; run hooks under another user (docs/running-as-a-service.md)"
        ),
    }
}

/// Descriptors the daemon keeps for itself besides HTTP connections: the ledger and its lock,
/// Firestore and paymennt connections, logging, signals and the runtime.
pub const RESERVED_FDS: u64 = 128;

/// Raises this process's soft limit on open files to its hard limit (the soft limit is often
/// 1024 while the hard one is far higher) and returns the limit now in force; `None` if it
/// cannot be read. A refusal (a seccomp filter without `@resources`, as in the packaged unit,
/// which sets `LimitNOFILE=` instead) is logged and the soft limit kept.
pub(super) fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            Some(hard)
        }
        Err(error) => {
            tracing::warn!(%error, soft, hard, "cannot raise the open-file limit to its hard limit; keeping {soft}");
            Some(soft)
        }
    }
}

/// Descriptors the daemon may need with `settings`: every HTTP connection the cap allows, and
/// room to spare for its own work ([`RESERVED_FDS`], up to four per running hook for its pipes,
/// one per paymennt request in flight).
pub fn open_files_needed(settings: &Settings) -> u64 {
    let connections = if settings.http.listen.is_some() {
        settings.http.max_connections as u64
    } else {
        0
    };
    // Saturating: settings built in code (tests, embedding) skip validation's bounds.
    connections
        .saturating_add(RESERVED_FDS)
        .saturating_add((settings.hooks_concurrency as u64).saturating_mul(4))
        .saturating_add(settings.paymennt.concurrency as u64)
}

/// Refuses to start when the open-file `limit` leaves no room for the HTTP listener's
/// connection cap plus the daemon's own work: clients would otherwise take the descriptors
/// hooks need. Without a listener there is nothing to check.
///
/// # Errors
///
/// A [`SettingsError`](crate::settings::SettingsError) (exit code 2) naming both numbers.
pub fn check_open_file_limit(
    settings: &Settings,
    limit: u64,
) -> Result<(), crate::settings::SettingsError> {
    // Without a listener there is no cap to fit; the daemon's own share is small.
    if settings.http.listen.is_none() {
        return Ok(());
    }
    let needed = open_files_needed(settings);
    if limit >= needed {
        return Ok(());
    }
    Err(crate::settings::SettingsError(format!(
        "the open-file limit is {limit}, but [http] max_connections = {} needs at least {needed} \
         (the connections plus {} for the ledger, Firestore, paymennt and hooks)\n\n\
         raise the limit (LimitNOFILE= in the unit, ulimit -n), or lower http.max_connections",
        settings.http.max_connections,
        needed.saturating_sub(settings.http.max_connections as u64),
    )))
}

/// The warning for a daemon running as root with hooks that would run as root too: such a
/// hook can read the daemon's environment and memory (root keeps CAP_SYS_PTRACE, so being
/// non-dumpable does not stop it). `None` when not root, or every command hook has a `run_as`.
pub fn root_warning(
    running_as_root: bool,
    hooks: &[crate::settings::HookSettings],
) -> Option<String> {
    if !running_as_root {
        return None;
    }
    let as_root: Vec<&str> = hooks
        .iter()
        // A URL hook runs no process (and cannot have a run_as).
        .filter(|hook| hook.run_as.is_none() && hook.url.is_none())
        .map(|hook| hook.name.as_str())
        .collect();
    if as_root.is_empty() {
        return None;
    }
    Some(format!(
        "paywatch is running as root, so hook(s) {} run as root and can read its environment and \
         memory (the paymennt API secret); set run_as = \"user\" on each hook, or run paywatch as \
         its own user (the packaged unit does: docs/running-as-a-service.md)",
        as_root
            .iter()
            .map(|name| format!("'{}'", crate::domain::printable(name)))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Takes an exclusive lock on `<ledger>.lock` for the daemon's lifetime (released when the
/// returned file is dropped or the process dies). CLI commands do not take it: they may run
/// beside the daemon.
pub(super) fn lock_ledger(ledger: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut name = ledger.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(parent) = ledger.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory '{}'", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the daemon lock '{}'", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another paywatch daemon is already running on the ledger '{}' (it holds '{}')\n\nstop it first, or give this one its own [ledger] path",
            ledger.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock '{}'", path.display()))
        }
    }
}

#[cfg(test)]
mod tests;
