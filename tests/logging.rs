//! Log output fit for where it goes, end to end: the daemon's lines coloured on a terminal (a
//! pseudo-terminal made by util-linux `script`) unless `NO_COLOR` is set, `<N>`-prefixed under
//! journald (`JOURNAL_STREAM` naming stderr), plain in a file; and the demo's narration and
//! logs through pipes carry no ANSI escapes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common;

const ESCAPE: &str = "\x1b[";
const RUNNING: &str = "paywatch is running";

/// `paywatch` with none of the variables that change its output.
fn paywatch() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_paywatch"));
    command
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PAYWATCH_") {
            command.env_remove(name);
        }
    }
    command
}

/// Starts `command`, waits until `output` shows the daemon's start line, stops it with SIGTERM,
/// checks that the daemon let go of `ledger`'s lock (no daemon left behind) and returns what it
/// wrote.
fn run_until_started(mut command: Command, output: &Path, ledger: &Path) -> String {
    let mut child: Child = command.stdin(Stdio::null()).spawn().expect("starts");
    let deadline = Instant::now() + common::DEADLINE;
    let text = loop {
        let text = std::fs::read_to_string(output).unwrap_or_default();
        if text.contains(RUNNING) {
            break text;
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("no '{RUNNING}' line in time; output so far:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM sent");
    let deadline = Instant::now() + common::DEADLINE;
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lock = std::fs::File::open(ledger.with_extension("db.lock")).expect("the daemon's lock");
    while let Err(error) = lock.try_lock() {
        assert!(
            Instant::now() < deadline,
            "a daemon still holds the ledger's lock after its parent stopped: {error:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    text
}

/// `paywatch run` on a pseudo-terminal: `script` copies what the terminal showed into a file.
/// The shell `script` starts execs the daemon, so the SIGTERM `script` forwards to its child
/// reaches the daemon itself (a shell that forked would die and leave the daemon behind,
/// holding the ledger).
fn on_a_terminal(config: &Path, output: &Path, ledger: &Path, no_color: bool) -> String {
    let quote = |path: &Path| format!("'{}'", path.display().to_string().replace('\'', r"'\''"));
    let mut command = Command::new("script");
    command.args(["--quiet", "--flush", "--return", "--command"]);
    command.arg(format!(
        "exec {} --config {} run",
        quote(Path::new(env!("CARGO_BIN_EXE_paywatch"))),
        quote(config)
    ));
    command
        .arg(output)
        .env("SHELL", "/bin/sh")
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM");
    if no_color {
        command.env("NO_COLOR", "1");
    } else {
        command.env_remove("NO_COLOR");
    }
    command.stdout(Stdio::null()).stderr(Stdio::null());
    run_until_started(command, output, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_log_lines_suit_a_terminal_the_journal_and_a_file() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, config) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    let ledger = dir.path().join("paywatch.db");

    // A file (or a pipe): plain text.
    let file = dir.path().join("plain.log");
    let mut command = paywatch();
    command.args(["--config"]).arg(&config).arg("run");
    command
        .stderr(std::fs::File::create(&file).expect("log file"))
        .stdout(Stdio::null());
    let plain = run_until_started(command, &file, &ledger);
    assert!(
        !plain.contains(ESCAPE),
        "ANSI escapes in a file:\n{plain:?}"
    );
    assert!(plain.contains(" INFO "), "{plain}");

    // journald: JOURNAL_STREAM names stderr's device and inode.
    let journal_file = dir.path().join("journal.log");
    let stderr = std::fs::File::create(&journal_file).expect("journal file");
    let meta = stderr.metadata().expect("metadata");
    let mut command = paywatch();
    command.args(["--config"]).arg(&config).arg("run");
    command
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr)
        .stdout(Stdio::null());
    let journal = run_until_started(command, &journal_file, &ledger);
    assert!(
        !journal.contains(ESCAPE),
        "ANSI escapes in the journal:\n{journal:?}"
    );
    let started = journal
        .lines()
        .find(|line| line.contains(RUNNING))
        .expect("start line");
    assert!(
        started.starts_with("<6>"),
        "not priority-prefixed: {started}"
    );

    // A terminal: colours, unless NO_COLOR is set.
    if Command::new("script").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but util-linux `script` is missing"
        );
        eprintln!("terminal case skipped: util-linux `script` is not installed");
    } else {
        let coloured = on_a_terminal(&config, &dir.path().join("tty.log"), &ledger, false);
        assert!(
            coloured.contains(ESCAPE),
            "no colours on a terminal:\n{coloured:?}"
        );
        let no_color = on_a_terminal(&config, &dir.path().join("tty-nc.log"), &ledger, true);
        assert!(
            !no_color.contains(ESCAPE),
            "colours despite NO_COLOR:\n{no_color:?}"
        );
    }
    sandbox.shutdown().await;
}

#[test]
fn the_demo_through_pipes_is_plain_readable_text() {
    let output = paywatch()
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        !stdout.contains(ESCAPE),
        "ANSI escapes in the narration:\n{stdout:?}"
    );
    assert!(
        !stderr.contains(ESCAPE),
        "ANSI escapes in the log:\n{stderr:?}"
    );
    assert!(stdout.contains("customer pays ORD-1001"), "{stdout}");
    assert!(stdout.contains("ledger summary"), "{stdout}");
    assert!(stderr.contains("PAID checkout="), "{stderr}");
}

#[test]
fn the_sandbox_follows_log_format_json_and_writes_no_escapes_into_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sandbox.log");
    let mut command = paywatch();
    command
        .args([
            "--log-format",
            "json",
            "sandbox",
            "--api-listen",
            "127.0.0.1:0",
            "--firestore-listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut child: Child = command.stdin(Stdio::null()).spawn().expect("starts");
    let deadline = Instant::now() + common::DEADLINE;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("sandbox: started")
    {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!(
                "the sandbox did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM sent");
    child.wait().expect("stopped");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(ESCAPE), "ANSI escapes in a file: {text}");
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not a JSON record ({error}): {line}"));
        assert!(record["level"].is_string(), "{line}");
    }
}
