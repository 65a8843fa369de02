//! Running one hook command once, to an exact outcome.
//!
//! Owns: spawning the hook's argv, its environment, feeding the event to stdin, keeping the
//! tails of stdout and stderr, the timeout, shutdown, and making sure nothing the hook started
//! outlives it. The dispatcher owns retries and what an outcome means for a delivery.
//!
//! Must never: run a shell (the argv is executed directly, so an order id like `$(touch x)` is
//! only text), pass on the daemon's environment (it may hold the paymennt secret), or log the
//! event's checkout (this module logs at debug only, and never the stdin document).
//!
//! # How a hook runs
//!
//! - **Program**: [`HookCommand::program`] is an absolute path, found once by
//!   [`resolve_program`] when the settings are loaded.
//! - **Environment**: cleared, then `PATH` (the daemon's, else [`DEFAULT_PATH`]), `LANG` (the
//!   daemon's, else [`DEFAULT_LANG`]), the hook's configured `env` (which may override those
//!   two), then the event's `PAYWATCH_*` variables ([`HookEvent::env_vars`]), which always win.
//!   An environment cannot hold a NUL byte, so each NUL in a value becomes U+FFFD.
//! - **Working directory**: [`HookCommand::working_dir`], `/` unless configured, so a hook never
//!   depends on where the daemon was started. Hooks should use absolute paths.
//! - **Identity**: the daemon's, unless the hook has a `run_as` ([`RunAs`]): then the child
//!   switches to that group and user before `exec` (supplementary groups cleared), which only a
//!   daemon running as root can do ([`resolve_run_as`] refuses it otherwise).
//! - **stdin**: the event JSON ([`HookEvent::to_json`]), then end of file. A hook that does not
//!   read it is fine: a broken pipe is ignored.
//! - **stdout, stderr**: read concurrently to end of file, so a noisy hook never blocks on a full
//!   pipe (ripgrep's `crates/cli/src/process.rs` idea); only the last [`TAIL_BYTES`] of each are
//!   kept, as lossy UTF-8 with a leading `…` when earlier output was dropped. The tails are the
//!   hook's text: log them with `?` (escaped), not `%`.
//! - **Process group**: the hook leads a new process group, and the group is the hook. At the
//!   timeout, or when the stop token is cancelled, the group gets SIGTERM, and SIGKILL once the
//!   grace period has passed; anything of the group still alive after the main process ended
//!   (a `sleep &` left behind) gets SIGTERM, then SIGKILL when the output pipes close or the grace
//!   period ends. A hook that must start long-lived work should hand it to a service manager
//!   (`systemd-run`), not background it. If the [`run`] future is dropped, the group is SIGKILLed.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::hooks::answer::HttpAnswer;
use crate::hooks::event::HookEvent;

/// How much of each of stdout and stderr is kept: the last 8 KiB.
pub const TAIL_BYTES: usize = 8 * 1024;

/// A hook's `PATH` when the daemon has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A hook's `LANG` when the daemon has none.
pub const DEFAULT_LANG: &str = "C.UTF-8";

/// The timeout of [`HookCommand::new`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The grace period between SIGTERM and SIGKILL of [`HookCommand::new`].
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for the kernel to reap a SIGKILLed hook before giving up on its status
/// (a process stuck in uninterruptible sleep); the drop guard still kills it.
const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// The marker in front of a tail whose beginning was dropped.
const TRUNCATED: &str = "…";

/// One configured hook, ready to run.
///
/// Its `Debug` shows the names of the configured `env`, never the values (a hook's env is where
/// a merchant puts their own tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct HookCommand {
    /// The hook's configured name (also `PAYWATCH_HOOK`).
    pub name: String,
    /// The program, an absolute path from [`resolve_program`].
    pub program: PathBuf,
    /// The arguments after the program, passed as they are (no shell, no expansion).
    pub args: Vec<String>,
    /// Extra environment variables from the hook's configuration.
    pub env: BTreeMap<String, String>,
    /// The directory the hook runs in; `/` by default.
    pub working_dir: PathBuf,
    /// How long the hook may run before it is terminated.
    pub timeout: Duration,
    /// How long after SIGTERM the hook may take to exit before SIGKILL.
    pub kill_grace: Duration,
    /// The identity the hook runs under (`run_as`); `None`: the daemon's.
    pub run_as: Option<RunAs>,
}

/// A hook's `run_as`, resolved to numbers when the settings are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As configured: `user` or `user:group`.
    pub spec: String,
    /// The user id the child switches to.
    pub uid: u32,
    /// The group id the child switches to (the user's primary group unless one is given).
    pub gid: u32,
}

/// Resolves a `run_as` value (`user` or `user:group`, names or numeric ids) for a daemon that
/// is (`running_as_root`) or is not root.
///
/// # Errors
///
/// A lowercase message with a next step: the value is malformed, the daemon is not root (only
/// root can switch a child to another user), or the user or group does not exist.
pub fn resolve_run_as(spec: &str, running_as_root: bool) -> Result<RunAs, String> {
    let shown = crate::domain::printable(spec);
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(format!(
            "'run_as' value '{shown}' is not \"user\" or \"user:group\"\n\ngive a user name (or uid), optionally with a group: run_as = \"shop\" or \"shop:www-data\""
        ));
    }
    if !running_as_root {
        return Err(format!(
            "'run_as' value '{shown}' needs paywatch to run as root to switch the hook to that user, \
             and it does not\n\nremove run_as (the hook then runs as paywatch's own user), or run paywatch as root"
        ));
    }
    let found_user = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|found| (uid, Some(found.gid.as_raw())))
            .or(Some((uid, None))),
        Err(_) => nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|found| (found.uid.as_raw(), Some(found.gid.as_raw()))),
    };
    let Some((uid, primary_gid)) = found_user else {
        return Err(format!(
            "'run_as' user '{}' does not exist\n\ncreate it (adduser --system {}) or name an existing user",
            crate::domain::printable(user),
            crate::domain::printable(user)
        ));
    };
    let gid = match group {
        Some(group) => {
            let gid = match group.parse::<u32>() {
                Ok(gid) => Some(gid),
                Err(_) => nix::unistd::Group::from_name(group)
                    .ok()
                    .flatten()
                    .map(|found| found.gid.as_raw()),
            };
            gid.ok_or_else(|| {
                format!(
                    "'run_as' group '{}' does not exist\n\nname an existing group, or give only the user",
                    crate::domain::printable(group)
                )
            })?
        }
        None => primary_gid.ok_or_else(|| {
            format!(
                "'run_as' uid {uid} has no account, so it has no primary group\n\ngive the group too: run_as = \"{uid}:GROUP\""
            )
        })?,
    };
    Ok(RunAs {
        spec: spec.to_owned(),
        uid,
        gid,
    })
}

impl HookCommand {
    /// A hook with no arguments, no extra environment, working directory `/`,
    /// [`DEFAULT_TIMEOUT`] and [`DEFAULT_KILL_GRACE`].
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> HookCommand {
        HookCommand {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            working_dir: PathBuf::from("/"),
            timeout: DEFAULT_TIMEOUT,
            kill_grace: DEFAULT_KILL_GRACE,
            run_as: None,
        }
    }
}

impl fmt::Debug for HookCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookCommand")
            .field("name", &self.name)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("working_dir", &self.working_dir)
            .field("timeout", &self.timeout)
            .field("kill_grace", &self.kill_grace)
            .field("run_as", &self.run_as)
            .finish()
    }
}

/// Why a hook's program could not be found. Each message names the program.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The command's argv is empty or its first element is "".
    #[error("hook command has no program: its first element must name one")]
    Empty,
    /// A relative path with a `/`, which would depend on the daemon's working directory.
    #[error(
        "hook program '{0}' is a relative path: give an absolute path, or a bare name to look up on PATH"
    )]
    Relative(String),
    /// A bare name that no absolute `PATH` directory holds.
    #[error("hook program '{program}' was not found on PATH ({path})")]
    NotOnPath {
        /// The name looked up.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// The absolute path does not exist.
    #[error("hook program '{}' does not exist", .0.display())]
    Missing(PathBuf),
    /// The path is a directory or another non-file.
    #[error("hook program '{}' is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// The file has no execute permission bit.
    #[error("hook program '{}' is not executable: try chmod +x '{}'", .0.display(), .0.display())]
    NotExecutable(PathBuf),
    /// The file could not be inspected (permission denied on a directory, I/O error).
    #[error("could not check hook program '{}': {source}", path.display())]
    Unreadable {
        /// The path checked.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
}

/// Finds the program of a hook's argv: `argv0` if absolute, else the first executable file
/// named `argv0` in an absolute directory of `path_var` ([`DEFAULT_PATH`] if unset or empty).
///
/// Pass the `PATH` the hook will get, so the hook runs what was checked. Empty and relative
/// `PATH` entries are skipped (they would mean the working directory). Symlinks are kept, not
/// canonicalized, so multi-call binaries still see their name.
///
/// # Errors
///
/// A [`ResolveError`] naming the program: empty, relative with a `/`, missing, not a regular
/// file, not executable, or not found on PATH.
pub fn resolve_program(argv0: &str, path_var: Option<&OsStr>) -> Result<PathBuf, ResolveError> {
    if argv0.is_empty() {
        return Err(ResolveError::Empty);
    }
    let program = Path::new(argv0);
    if program.is_absolute() {
        check_executable(program)?;
        return Ok(program.to_path_buf());
    }
    if argv0.contains('/') {
        return Err(ResolveError::Relative(argv0.to_owned()));
    }
    let path_var = path_var
        .filter(|path| !path.is_empty())
        .unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut not_executable = None;
    for dir in std::env::split_paths(path_var) {
        if !dir.is_absolute() {
            continue;
        }
        let candidate = dir.join(argv0);
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(ResolveError::NotExecutable(path)) => {
                not_executable.get_or_insert(path);
            }
            Err(_) => {}
        }
    }
    Err(match not_executable {
        Some(path) => ResolveError::NotExecutable(path),
        None => ResolveError::NotOnPath {
            program: argv0.to_owned(),
            path: path_var.to_string_lossy().into_owned(),
        },
    })
}

fn check_executable(path: &Path) -> Result<(), ResolveError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(ResolveError::Missing(path.to_path_buf()));
        }
        Err(source) => {
            return Err(ResolveError::Unreadable {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !metadata.is_file() {
        return Err(ResolveError::NotAFile(path.to_path_buf()));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(ResolveError::NotExecutable(path.to_path_buf()));
    }
    Ok(())
}

/// Checks a configured environment variable name: not empty, no `=`, no NUL.
///
/// # Errors
///
/// A lowercase message naming the variable.
pub fn validate_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['=', '\0']) {
        Err(format!(
            "environment variable name '{}' is invalid: it must be non-empty, without '=' or NUL",
            crate::domain::printable(name)
        ))
    } else {
        Ok(())
    }
}

/// How a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The hook exited by itself with this code (0 = delivered).
    Exited(i32),
    /// The hook was killed by a signal paywatch did not send (a crash, the OOM killer).
    Signalled(i32),
    /// The hook ran past its timeout and was terminated.
    TimedOut(Termination),
    /// The stop token was cancelled (shutdown): the hook was terminated, or, if `None`, never
    /// started because the token was already cancelled.
    Stopped(Option<Termination>),
    /// The program could not be started; the message names it.
    SpawnFailed(String),
    /// paywatch could not start the program for lack of file descriptors, processes or memory
    /// (EMFILE, ENFILE, EAGAIN, ENOMEM): the daemon's condition, not the hook's failure.
    NoResources(String),
    /// Waiting for the hook failed; its result is unknown (treat as not delivered).
    WaitFailed(String),
    /// A URL hook's endpoint answered (2xx = delivered).
    Answered(HttpAnswer),
    /// A URL hook's request got no answer: a timeout, a refused connection, a TLS failure.
    RequestFailed(String),
    /// A URL hook's request was abandoned at shutdown after this long (like `Stopped`: the
    /// delivery runs again, its outcome unknown).
    Interrupted(Duration),
}

/// How paywatch ended a hook it had to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination {
    /// How long the hook had run when it got SIGTERM.
    pub after: Duration,
    /// Whether it needed SIGKILL (it outlived the grace period after SIGTERM).
    pub killed: bool,
    /// The grace period between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl Termination {
    fn describe(&self) -> String {
        if self.killed {
            format!(
                "killed by SIGKILL after ignoring SIGTERM for {}",
                humantime::format_duration(self.grace)
            )
        } else {
            "ended by SIGTERM".to_owned()
        }
    }
}

/// What happened when a hook ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// How it ended.
    pub ending: Ending,
    /// From spawn until the main process was reaped (zero if it never started).
    pub duration: Duration,
    /// The last [`TAIL_BYTES`] of stdout, lossy UTF-8, starting with `…` if cut.
    pub stdout_tail: String,
    /// The last [`TAIL_BYTES`] of stderr, lossy UTF-8, starting with `…` if cut.
    pub stderr_tail: String,
    /// The hook's process id (and process group id), if it started.
    pub pid: Option<u32>,
}

impl HookOutcome {
    fn not_started(ending: Ending) -> HookOutcome {
        HookOutcome {
            ending,
            duration: Duration::ZERO,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            pid: None,
        }
    }

    /// Exit 0: the hook took the event. Anything else is for the dispatcher to retry or bury.
    pub fn delivered(&self) -> bool {
        match &self.ending {
            Ending::Exited(code) => *code == 0,
            Ending::Answered(answer) => answer.is_success(),
            _ => false,
        }
    }

    /// The exit code if the hook exited by itself (to match `permanent_exit_codes`).
    pub fn exit_code(&self) -> Option<i32> {
        match self.ending {
            Ending::Exited(code) => Some(code),
            _ => None,
        }
    }

    /// One line for logs and the ledger: `exit 3`, `killed by SIGSEGV`,
    /// `timed out after 30s; killed by SIGKILL after ignoring SIGTERM for 5s`,
    /// `spawn failed: could not start '/x': ...`.
    pub fn describe(&self) -> String {
        match &self.ending {
            Ending::Exited(code) => format!("exit {code}"),
            Ending::Signalled(signal) => format!("killed by {}", signal_name(*signal)),
            Ending::TimedOut(termination) => format!(
                "timed out after {}; {}",
                humantime::format_duration(termination.after),
                termination.describe()
            ),
            Ending::Stopped(Some(termination)) => format!(
                "stopped by shutdown after {}; {}",
                humantime::format_duration(termination.after),
                termination.describe()
            ),
            Ending::Stopped(None) => "not started: shutting down".to_owned(),
            Ending::SpawnFailed(message) => format!("spawn failed: {message}"),
            Ending::NoResources(message) => format!("not started: {message}"),
            Ending::WaitFailed(message) => format!("wait failed: {message}"),
            Ending::Answered(answer) => answer.describe(),
            Ending::RequestFailed(message) => message.clone(),
            Ending::Interrupted(after) => format!(
                "stopped by shutdown after {}; the request was abandoned",
                humantime::format_duration(Duration::from_millis(after.as_millis() as u64))
            ),
        }
    }
}

fn signal_name(signal: i32) -> String {
    match Signal::try_from(signal) {
        Ok(known) => known.as_str().to_owned(),
        Err(_) => format!("signal {signal}"),
    }
}

/// Runs `command` once for `event` and reports exactly how it ended. Never panics on the hook's
/// behaviour and always returns within about `timeout + 2 × kill_grace` (plus a bounded reap
/// wait for a process the kernel cannot kill at once).
///
/// If `stop` is cancelled while the hook runs, the hook is terminated as at a timeout and the
/// ending is [`Ending::Stopped`]; if it is already cancelled, the hook is not started.
pub async fn run(
    command: &HookCommand,
    event: &HookEvent,
    stop: &CancellationToken,
) -> HookOutcome {
    if stop.is_cancelled() {
        return HookOutcome::not_started(Ending::Stopped(None));
    }
    let mut process = match build_command(command, event) {
        Ok(process) => process,
        Err(message) => return HookOutcome::not_started(Ending::SpawnFailed(message)),
    };
    let spawned_at = Instant::now();
    let mut child = match process.spawn() {
        Ok(child) => child,
        Err(error) => return HookOutcome::not_started(spawn_failure(command, &error)),
    };
    let Some(pid) = child.id() else {
        // Only a reaped child has no id, and nothing has waited for this one yet.
        return HookOutcome::not_started(Ending::WaitFailed(
            "the hook had no process id right after spawning".to_owned(),
        ));
    };
    let mut group = GroupGuard::new(pid);
    tracing::debug!(
        event_id = %event.event_id,
        hook = %command.name,
        pid,
        program = %command.program.display(),
        attempt = event.attempt,
        "hook started"
    );

    let json = event.to_json();
    let mut stdout_tail = Tail::new(TAIL_BYTES);
    let mut stderr_tail = Tail::new(TAIL_BYTES);
    let (ending, reaped_at) = {
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (json, event_id) = (&json, event.event_id.as_str());
        let (out, err) = (&mut stdout_tail, &mut stderr_tail);
        let mut pipes = Pipes {
            future: Box::pin(async move {
                tokio::join!(
                    feed(stdin, json, event_id),
                    pump(stdout, out),
                    pump(stderr, err)
                );
            }),
            done: false,
        };

        let deadline = spawned_at + command.timeout;
        let first = pipes
            .drive(async {
                tokio::select! {
                    biased;
                    status = child.wait() => First::Exited(status),
                    () = stop.cancelled() => First::Stop,
                    () = sleep_until(deadline) => First::Timeout,
                }
            })
            .await;

        let stopping = matches!(first, First::Stop);
        let (ending, reaped_at, leftovers, linger_end) = match first {
            First::Exited(status) => {
                let reaped_at = Instant::now();
                // The group outlives its leader only if the hook left something behind.
                let leftovers = group.signal(Signal::SIGTERM);
                (
                    ending_of(status),
                    reaped_at,
                    leftovers,
                    reaped_at + command.kill_grace,
                )
            }
            First::Stop | First::Timeout => {
                let after = spawned_at.elapsed();
                group.signal(Signal::SIGTERM);
                let grace_end = Instant::now() + command.kill_grace;
                // Its exit status no longer matters: the ending is the timeout or the stop.
                let killed = reap_by(&mut child, &mut pipes, grace_end).await.is_none();
                if killed {
                    group.signal(Signal::SIGKILL);
                    let reap_end = Instant::now() + REAP_AFTER_KILL;
                    if reap_by(&mut child, &mut pipes, reap_end).await.is_none() {
                        tracing::debug!(event_id, pid, "a SIGKILLed hook was not reaped in time");
                    }
                }
                let termination = Termination {
                    after,
                    killed,
                    grace: command.kill_grace,
                };
                let ending = if stopping {
                    Ending::Stopped(Some(termination))
                } else {
                    Ending::TimedOut(termination)
                };
                // After SIGKILL, give the dying group a moment to close the pipes, so what is
                // already buffered in them is not lost.
                let linger_end = if killed {
                    Instant::now() + command.kill_grace
                } else {
                    grace_end
                };
                (ending, Instant::now(), true, linger_end)
            }
        };

        // Collect what the group still writes until the pipes close (every writer gone) or the
        // grace period ends, then make sure nothing of the group survives.
        pipes.finish(linger_end).await;
        if leftovers {
            group.signal(Signal::SIGKILL);
        }
        (ending, reaped_at)
    };
    group.disarm();

    let outcome = HookOutcome {
        ending,
        duration: reaped_at.saturating_duration_since(spawned_at),
        stdout_tail: stdout_tail.into_string(),
        stderr_tail: stderr_tail.into_string(),
        pid: Some(pid),
    };
    tracing::debug!(
        event_id = %event.event_id,
        hook = %command.name,
        pid,
        ending = %outcome.describe(),
        duration_ms = outcome.duration.as_millis() as u64,
        "hook ended"
    );
    outcome
}

/// How a failed spawn ends: [`Ending::NoResources`] when paywatch itself is out of descriptors,
/// processes or memory (the hook is not to blame and is tried again without counting an
/// attempt), else [`Ending::SpawnFailed`].
pub fn spawn_failure(command: &HookCommand, error: &io::Error) -> Ending {
    let shortage = error
        .raw_os_error()
        .map(Errno::from_raw)
        .is_some_and(|errno| {
            matches!(
                errno,
                Errno::EMFILE | Errno::ENFILE | Errno::EAGAIN | Errno::ENOMEM
            )
        });
    if shortage {
        Ending::NoResources(format!(
            "paywatch could not start '{}': {error} (paywatch is out of file descriptors or processes; \
             check LimitNOFILE=, TasksMax= and what holds them)",
            command.program.display()
        ))
    } else {
        Ending::SpawnFailed(format!(
            "could not start '{}' in '{}': {error}",
            command.program.display(),
            command.working_dir.display()
        ))
    }
}

/// Waits for the hook's main process until `deadline`, keeping the pipes moving; `None` if it
/// is still running then.
async fn reap_by(
    child: &mut Child,
    pipes: &mut Pipes<'_>,
    deadline: Instant,
) -> Option<io::Result<ExitStatus>> {
    pipes
        .drive(async {
            tokio::select! {
                biased;
                status = child.wait() => Some(status),
                () = sleep_until(deadline) => None,
            }
        })
        .await
}

/// What ended the first wait.
enum First {
    Exited(io::Result<ExitStatus>),
    Stop,
    Timeout,
}

fn ending_of(status: io::Result<ExitStatus>) -> Ending {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(signal)) => Ending::Signalled(signal),
            (None, None) => Ending::WaitFailed(format!("unexpected wait status {status}")),
        },
        Err(error) => Ending::WaitFailed(error.to_string()),
    }
}

fn build_command(command: &HookCommand, event: &HookEvent) -> Result<Command, String> {
    let mut process = Command::new(&command.program);
    process
        .args(&command.args)
        .env_clear()
        .current_dir(&command.working_dir)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(run_as) = &command.run_as {
        // Applied in the child before exec: setgid, then (std clears the supplementary groups
        // when root switches the user) setuid.
        process.gid(run_as.gid).uid(run_as.uid);
    }
    for (key, value) in environment(command, event)? {
        process.env(key, value);
    }
    Ok(process)
}

/// The hook's whole environment, in the order it is applied (later entries win).
fn environment(
    command: &HookCommand,
    event: &HookEvent,
) -> Result<Vec<(OsString, OsString)>, String> {
    let inherited = |name: &str, default: &str| {
        std::env::var_os(name)
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| default.into())
    };
    let mut vars = vec![
        ("PATH".into(), inherited("PATH", DEFAULT_PATH)),
        ("LANG".into(), inherited("LANG", DEFAULT_LANG)),
    ];
    for (key, value) in &command.env {
        validate_env_name(key)?;
        vars.push((key.into(), without_nul(value).into()));
    }
    for (key, value) in event.env_vars() {
        vars.push((key.into(), without_nul(&value).into()));
    }
    Ok(vars)
}

/// An environment value cannot hold NUL: each one becomes U+FFFD (the JSON keeps it exactly).
fn without_nul(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

/// Writes the event to the hook's stdin, then closes it (by dropping it).
async fn feed(stdin: Option<ChildStdin>, json: &[u8], event_id: &str) {
    let Some(mut stdin) = stdin else { return };
    match stdin.write_all(json).await {
        Ok(()) => {}
        // The hook exited or closed stdin without reading it all: its choice.
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {
            tracing::debug!(%event_id, "hook did not read all of stdin");
        }
        Err(error) => tracing::debug!(%event_id, %error, "writing the hook's stdin failed"),
    }
}

/// Reads a pipe to end of file, keeping its tail.
async fn pump(reader: Option<impl AsyncRead + Unpin>, tail: &mut Tail) {
    let Some(mut reader) = reader else { return };
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => tail.push(&chunk[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::debug!(%error, "reading a hook's output failed");
                break;
            }
        }
    }
}

/// The stdin feeder and both output pumps, driven while the runner waits for something else.
struct Pipes<'a> {
    future: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    done: bool,
}

impl Pipes<'_> {
    /// Keeps the pipes moving until they are all done or `deadline` passes.
    async fn finish(&mut self, deadline: Instant) {
        if self.done {
            return;
        }
        tokio::select! {
            biased;
            () = &mut self.future => self.done = true,
            () = sleep_until(deadline) => {}
        }
    }

    /// Awaits `until` while keeping the pipes moving.
    async fn drive<T>(&mut self, until: impl Future<Output = T>) -> T {
        let mut until = std::pin::pin!(until);
        loop {
            tokio::select! {
                biased;
                value = &mut until => return value,
                () = &mut self.future, if !self.done => self.done = true,
            }
        }
    }
}

/// The hook's process group, SIGKILLed on drop unless disarmed (so a dropped [`run`] future
/// leaves nothing behind; `kill_on_drop` alone would reach only the main process).
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn new(pid: u32) -> GroupGuard {
        GroupGuard {
            pgid: i32::try_from(pid).ok().map(Pid::from_raw),
        }
    }

    /// Sends `signal` to the group; true if the group still had a member to receive it.
    fn signal(&self, signal: Signal) -> bool {
        let Some(pgid) = self.pgid else { return false };
        match killpg(pgid, signal) {
            Ok(()) => true,
            Err(Errno::ESRCH) => false,
            Err(error) => {
                tracing::debug!(pgid = pgid.as_raw(), signal = signal.as_str(), %error, "signalling a hook's process group failed");
                false
            }
        }
    }

    /// The runner is done with the group; its id may be reused from now on.
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// The last `cap` bytes of a stream.
#[derive(Debug)]
struct Tail {
    bytes: Vec<u8>,
    cap: usize,
    total: u64,
}

impl Tail {
    fn new(cap: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            cap,
            total: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if chunk.len() >= self.cap {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&chunk[chunk.len() - self.cap..]);
            return;
        }
        self.bytes.extend_from_slice(chunk);
        // Trim only when twice the cap, so the copy is amortized over many small chunks.
        if self.bytes.len() > 2 * self.cap {
            let excess = self.bytes.len() - self.cap;
            self.bytes.drain(..excess);
        }
    }

    /// Lossy UTF-8 of the kept bytes, with [`TRUNCATED`] in front if earlier bytes were dropped
    /// (and no half character after it).
    fn into_string(self) -> String {
        let mut kept = &self.bytes[self.bytes.len().saturating_sub(self.cap)..];
        if self.total == kept.len() as u64 {
            return String::from_utf8_lossy(kept).into_owned();
        }
        // Skip the continuation bytes (at most 3) of a character cut at the start.
        for _ in 0..3 {
            match kept.split_first() {
                Some((byte, rest)) if byte & 0b1100_0000 == 0b1000_0000 => kept = rest,
                _ => break,
            }
        }
        format!("{TRUNCATED}{}", String::from_utf8_lossy(kept))
    }
}

#[cfg(test)]
pub(crate) mod tests;
