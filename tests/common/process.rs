//! The built `paywatch` binary as a child process: the one way end-to-end tests run it.
//!
//! Owns: the clean environment a child starts with, one-shot commands (exit code, stdout,
//! stderr), daemons and other long-running children (log lines, signals, stop, kill on drop),
//! and config files written for them. It must never leave a child running after its test
//! (dropping a [`Process`] kills and reaps it), never sleep without a deadline (every wait goes
//! through [`super::poll_until`]), and never let the test's own environment (`PAYWATCH_*`,
//! `RUST_LOG`, systemd's variables, Google credentials) reach a child unless the test sets it.
//!
//! ```ignore
//! use crate::common::process::{self, paywatch};
//!
//! // A one-shot command: std's `Output` (exit code, stdout, stderr).
//! let output = process::run(&config, &["status", "42", "--json"]);
//! assert_eq!(output.status.code(), Some(0), "{}", process::stderr(&output));
//! let output = process::run_with_stdin(&config, &["track", "-"], RESPONSE);
//!
//! // The daemon: `paywatch --config CONFIG run`, stderr collected line by line.
//! let mut daemon = paywatch().config(&config).run();
//! daemon.expect_line("paywatch is running").await;
//! daemon.signal(Signal::SIGHUP);
//! daemon.expect_line("config reloaded").await; // the next match after the previous one
//! let status = daemon.stop().await; // SIGTERM, then the exit within DEADLINE
//! assert!(status.success());
//!
//! // Variations: global args, environment, a log file (e.g. for JOURNAL_STREAM), a launcher.
//! let daemon = paywatch()
//!     .args(["--log-format", "json"])
//!     .config(&config)
//!     .env("PAYWATCH_PAYMENNT__API_SECRET", secret)
//!     .log_to(&dir.join("daemon.log"))
//!     .run();
//! ```
//!
//! One-shot commands block ([`Paywatch::output`]): a tokio test whose own tasks must run
//! meanwhile (a sandbox it drives) calls them in `spawn_blocking` or `block_in_place`. A started
//! [`Process`]'s waits are async. A wrapper that writes the log itself (util-linux `script`)
//! goes through [`Paywatch::command`] and [`Process::watching`].
//!
//! Waiting for something else (a ledger row, a file) is [`super::wait_for`]; a test that wants
//! the in-process daemon (status, metrics, controls) uses [`super::Daemon`] instead.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{DEADLINE, poll_until};

/// Variables of the test's environment that change what paywatch does; a child never inherits
/// them (nor any `PAYWATCH_*`). A test that wants one sets it with [`Paywatch::env`].
const UNINHERITED: [&str; 8] = [
    "RUST_LOG",
    "NO_COLOR",
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CREDENTIALS_DIRECTORY",
];

/// How often a wait on a child looks again.
const POLL: Duration = Duration::from_millis(20);

/// The built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_paywatch")
}

/// `paywatch` with a clean environment, to add arguments to and then run.
pub fn paywatch() -> Paywatch {
    Paywatch {
        program: binary().into(),
        launcher: Vec::new(),
        args: Vec::new(),
        env: Vec::new(),
        clear_env: false,
        dir: None,
        stdin: None,
        log: Log::Collect,
    }
}

/// Runs `paywatch --config CONFIG ARGS...` to completion (stdin empty).
pub fn run(config: &Path, args: &[&str]) -> Output {
    paywatch().config(config).args(args).output()
}

/// Runs `paywatch --config CONFIG ARGS...` to completion with `stdin`.
pub fn run_with_stdin(config: &Path, args: &[&str], stdin: impl AsRef<[u8]>) -> Output {
    paywatch()
        .config(config)
        .args(args)
        .stdin(stdin.as_ref())
        .output()
}

/// A one-shot command's stdout, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A one-shot command's stderr, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes `text` as `dir/paywatch.toml` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    write_config_named(dir, "paywatch.toml", text)
}

/// Writes `text` as `dir/name` and returns its path.
pub fn write_config_named(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Where a started child's stderr goes.
enum Log {
    /// Piped and collected line by line.
    Collect,
    /// Appended to a file (which a test can name in `JOURNAL_STREAM`, or keep across restarts).
    File(PathBuf),
    /// The test's own stderr (shown with `--nocapture`).
    Inherit,
    /// Nowhere.
    Null,
}

/// A paywatch command being put together; see the module's doc.
#[must_use]
pub struct Paywatch {
    program: OsString,
    launcher: Vec<OsString>,
    args: Vec<OsString>,
    /// In order: `Some` sets a variable, `None` removes it.
    env: Vec<(OsString, Option<OsString>)>,
    clear_env: bool,
    dir: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    log: Log,
}

impl Paywatch {
    /// `--config PATH`.
    pub fn config(self, path: &Path) -> Paywatch {
        self.arg("--config").arg(path)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Paywatch {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Paywatch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Sets a variable in the child's environment.
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Paywatch {
        self.env
            .push((name.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes a variable from the child's environment.
    pub fn env_remove(mut self, name: impl AsRef<OsStr>) -> Paywatch {
        self.env.push((name.as_ref().to_owned(), None));
        self
    }

    /// Starts from an empty environment (no `PATH`, `HOME`...), plus what [`Paywatch::env`]
    /// sets.
    pub fn env_clear(mut self) -> Paywatch {
        self.clear_env = true;
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Paywatch {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Runs another program instead of the built binary (a build to compare with).
    pub fn program(mut self, program: impl AsRef<OsStr>) -> Paywatch {
        self.program = program.as_ref().to_owned();
        self
    }

    /// Runs `LAUNCHER... paywatch ...` (for example `setpriv --reuid=...  --`).
    pub fn launcher(mut self, argv: &[&str]) -> Paywatch {
        self.launcher = argv.iter().map(OsString::from).collect();
        self
    }

    /// What [`Paywatch::output`] writes to the child's stdin (otherwise it reads nothing).
    pub fn stdin(mut self, bytes: &[u8]) -> Paywatch {
        self.stdin = Some(bytes.to_vec());
        self
    }

    /// A started child appends its stderr to `file` (created if missing) instead of a pipe;
    /// [`Process::expect_line`] reads what this child added to it.
    pub fn log_to(mut self, file: &Path) -> Paywatch {
        self.log = Log::File(file.to_owned());
        self
    }

    /// A started child writes its stderr to the test's own.
    pub fn log_inherited(mut self) -> Paywatch {
        self.log = Log::Inherit;
        self
    }

    /// A started child's stderr is discarded.
    pub fn log_discarded(mut self) -> Paywatch {
        self.log = Log::Null;
        self
    }

    /// The command as std's, for a test that drives the pipes itself.
    pub fn command(&self) -> Command {
        let mut command = match self.launcher.split_first() {
            Some((launcher, rest)) => {
                let mut command = Command::new(launcher);
                command.args(rest).arg(&self.program);
                command
            }
            None => Command::new(&self.program),
        };
        command.args(&self.args);
        if self.clear_env {
            command.env_clear();
        } else {
            for (name, _) in std::env::vars_os() {
                let text = name.to_string_lossy();
                if text.starts_with("PAYWATCH_") || UNINHERITED.contains(&&*text) {
                    command.env_remove(&name);
                }
            }
        }
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        command
    }

    /// Runs to completion and returns its exit status, stdout and stderr. Blocking: an async
    /// test calls it in `block_in_place` or `spawn_blocking` when the test's own tasks must run
    /// meanwhile.
    pub fn output(self) -> Output {
        let mut command = self.command();
        command
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("paywatch starts");
        if let (Some(bytes), Some(mut pipe)) = (&self.stdin, child.stdin.take()) {
            // A command that exits without reading closes the pipe: not this helper's failure.
            let _ = pipe.write_all(bytes);
        }
        child.wait_with_output().expect("paywatch finishes")
    }

    /// `... run`: starts the daemon.
    pub fn run(self) -> Process {
        self.arg("run").start()
    }

    /// Starts the command as it is (`paywatch sandbox ...`, a link create to watch...).
    pub fn start(self) -> Process {
        let mut command = self.command();
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let (log, offset) = match &self.log {
            Log::Collect => {
                command.stderr(Stdio::piped());
                (LogSource::Pipe(Arc::default()), 0)
            }
            Log::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("log file");
                let offset = file.metadata().expect("log file metadata").len();
                command.stderr(file);
                (LogSource::File(path.clone()), offset)
            }
            Log::Inherit => {
                command.stderr(Stdio::inherit());
                (LogSource::None, 0)
            }
            Log::Null => {
                command.stderr(Stdio::null());
                (LogSource::None, 0)
            }
        };
        Process::spawn(command, log, offset)
    }
}

/// Where a [`Process`]'s log lines are read from.
enum LogSource {
    /// Collected from the child's piped stderr.
    Pipe(Arc<PipeLines>),
    /// A file the child (or a wrapper such as `script`) writes.
    File(PathBuf),
    /// Not kept.
    None,
}

/// The lines read from a child's stderr so far.
#[derive(Default)]
struct PipeLines {
    lines: Mutex<Vec<String>>,
    /// The pipe reached its end: every line is in `lines`.
    closed: AtomicBool,
}

/// A running child; killed (SIGKILL) and reaped on drop, its log shown if the test failed.
pub struct Process {
    child: Child,
    log: LogSource,
    /// Where in the log file this child's lines begin.
    offset: u64,
    /// Lines before this index are behind the last [`Process::expect_line`] match.
    cursor: usize,
}

impl Process {
    /// Spawns `command` (stdio set by the caller), whose log is what it (or a wrapper such as
    /// util-linux `script`) writes to `log` from now on.
    pub fn watching(command: Command, log: &Path) -> Process {
        let offset = std::fs::metadata(log).map(|meta| meta.len()).unwrap_or(0);
        Process::spawn(command, LogSource::File(log.to_owned()), offset)
    }

    fn spawn(mut command: Command, log: LogSource, offset: u64) -> Process {
        let mut child = command.spawn().expect("paywatch starts");
        if let LogSource::Pipe(pipe) = &log {
            let stderr = child.stderr.take().expect("stderr piped");
            let pipe = Arc::clone(pipe);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line).into_owned();
                    pipe.lines.lock().expect("log lines").push(line);
                }
                pipe.closed.store(true, Ordering::SeqCst);
            });
        }
        Process {
            child,
            log,
            offset,
            cursor: 0,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"))
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal sent");
    }

    /// The log lines written so far.
    pub fn lines(&self) -> Vec<String> {
        match &self.log {
            LogSource::Pipe(pipe) => pipe.lines.lock().expect("log lines").clone(),
            LogSource::File(path) => {
                let bytes = std::fs::read(path).unwrap_or_default();
                let start = usize::try_from(self.offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                String::from_utf8_lossy(&bytes[start..])
                    .lines()
                    .map(str::to_owned)
                    .collect()
            }
            LogSource::None => Vec::new(),
        }
    }

    /// The log written so far, one line each.
    pub fn log(&self) -> String {
        let mut text = self.lines().join("\n");
        text.push('\n');
        text
    }

    /// Waits (up to [`DEADLINE`]) for a log line containing `text` after the line the previous
    /// call matched, and returns it. Panics with the log if none comes, or if the child exits
    /// first and no such line was written.
    pub async fn expect_line(&mut self, text: &str) -> String {
        let cursor = self.cursor;
        let found = poll_until(DEADLINE, POLL, || {
            // Whether every line is written, asked before the lines are read.
            let ended = self.log_ended();
            let lines = self.lines();
            let hit = lines
                .iter()
                .enumerate()
                .skip(cursor)
                .find(|(_, line)| line.contains(text))
                .map(|(index, line)| (index, line.clone()));
            let result = match hit {
                Some(hit) => Some(Some(hit)),
                None if ended => Some(None),
                None => None,
            };
            async move { result }
        })
        .await;
        match found {
            Some(Some((index, line))) => {
                self.cursor = index + 1;
                line
            }
            Some(None) => panic!(
                "paywatch exited without a log line containing {text:?}; its log:\n{}",
                self.log()
            ),
            None => panic!(
                "no log line containing {text:?} within {DEADLINE:?}; its log:\n{}",
                self.log()
            ),
        }
    }

    /// Whether the log is complete: the pipe closed, or the child that writes the file exited.
    fn log_ended(&mut self) -> bool {
        match &self.log {
            LogSource::Pipe(pipe) => pipe.closed.load(Ordering::SeqCst),
            LogSource::File(_) | LogSource::None => self.child.try_wait().ok().flatten().is_some(),
        }
    }

    /// The exit status, if the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Waits (up to [`DEADLINE`]) for the child to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        self.wait_exit_within(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("paywatch did not exit within {DEADLINE:?}"))
    }

    /// Waits up to `limit` for the child to exit; `None` if it is still running.
    pub async fn wait_exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        poll_until(limit, POLL, || {
            let status = child.try_wait().expect("wait");
            async move { status }
        })
        .await
    }

    /// SIGTERM, then the exit status (within [`DEADLINE`]).
    pub async fn stop(mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit().await
    }

    /// SIGKILL, then reaps the child.
    pub fn kill_9(mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let lines = self.lines();
            let tail = &lines[lines.len().saturating_sub(100)..];
            eprintln!("--- paywatch's log (last lines) ---\n{}", tail.join("\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{paywatch, write_config};

    /// A config `run` refuses (exit 2), naming the misspelt key on stderr.
    fn refused_config(dir: &std::path::Path) -> std::path::PathBuf {
        write_config(dir, "[ledger]\npaht = \"x.db\"\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_that_exits_leaves_its_whole_log_and_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut process = paywatch().config(&refused_config(dir.path())).run();
        let line = process.expect_line("ledger.paht").await;
        assert!(line.contains("unknown key"), "{line}");
        // The next match comes after the previous one.
        process.expect_line("did you mean 'ledger.path'").await;
        let status = process.wait_exit().await;
        assert_eq!(status.code(), Some(2), "{}", process.log());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[should_panic(expected = "paywatch exited without a log line containing")]
    async fn waiting_for_a_line_a_finished_child_never_wrote_fails_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut process = paywatch().config(&refused_config(dir.path())).run();
        process.expect_line("paywatch is running").await;
    }
}
