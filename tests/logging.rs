//! Log output fit for where it goes, end to end: the daemon's lines coloured on a terminal (a
//! pseudo-terminal made by util-linux `script`) unless `NO_COLOR` is set, `<N>`-prefixed under
//! journald (`JOURNAL_STREAM` naming stderr), plain in a file; and the demo's narration and
//! logs through pipes carry no ANSI escapes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::process::{self, Process, paywatch};
use crate::common::{self, DEADLINE, wait_for};

const ESCAPE: &str = "\x1b[";
const RUNNING: &str = "paywatch is running";

/// Starts `command`, waits until `output` shows the daemon's start line, stops it with SIGTERM,
/// checks that the daemon let go of `ledger`'s lock (no daemon left behind) and returns what it
/// wrote up to then.
async fn run_until_started(mut command: Command, output: &Path, ledger: &Path) -> String {
    command.stdin(Stdio::null());
    let mut process = Process::watching(command, output);
    process.expect_line(RUNNING).await;
    let text = process.log();
    process.stop().await;
    let lock = std::fs::File::open(ledger.with_extension("db.lock")).expect("the daemon's lock");
    wait_for(
        "the daemon to let go of the ledger's lock after its parent stopped",
        DEADLINE,
        || {
            let free = lock.try_lock().is_ok();
            async move { free.then_some(()) }
        },
    )
    .await;
    text
}

/// `paywatch run` on a pseudo-terminal: `script` copies what the terminal showed into a file.
/// The shell `script` starts execs the daemon, so the SIGTERM `script` forwards to its child
/// reaches the daemon itself (a shell that forked would die and leave the daemon behind,
/// holding the ledger).
async fn on_a_terminal(config: &Path, output: &Path, ledger: &Path, no_color: bool) -> String {
    let quote = |path: &Path| format!("'{}'", path.display().to_string().replace('\'', r"'\''"));
    let mut command = Command::new("script");
    command.args(["--quiet", "--flush", "--return", "--command"]);
    command.arg(format!(
        "exec {} --config {} run",
        quote(Path::new(process::binary())),
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
    run_until_started(command, output, ledger).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_log_lines_suit_a_terminal_the_journal_and_a_file() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, config) = common::settings(dir.path(), &sandbox, "multiplexed", "");
    let ledger = dir.path().join("paywatch.db");

    // A file (or a pipe): plain text.
    let file = dir.path().join("plain.log");
    let mut command = paywatch().config(&config).arg("run").command();
    command
        .stderr(std::fs::File::create(&file).expect("log file"))
        .stdout(Stdio::null());
    let plain = run_until_started(command, &file, &ledger).await;
    assert!(
        !plain.contains(ESCAPE),
        "ANSI escapes in a file:\n{plain:?}"
    );
    assert!(plain.contains(" INFO "), "{plain}");

    // journald: JOURNAL_STREAM names stderr's device and inode.
    let journal_file = dir.path().join("journal.log");
    let stderr = std::fs::File::create(&journal_file).expect("journal file");
    let meta = stderr.metadata().expect("metadata");
    let mut command = paywatch()
        .config(&config)
        .arg("run")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .command();
    command.stderr(stderr).stdout(Stdio::null());
    let journal = run_until_started(command, &journal_file, &ledger).await;
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
        let coloured = on_a_terminal(&config, &dir.path().join("tty.log"), &ledger, false).await;
        assert!(
            coloured.contains(ESCAPE),
            "no colours on a terminal:\n{coloured:?}"
        );
        let no_color = on_a_terminal(&config, &dir.path().join("tty-nc.log"), &ledger, true).await;
        assert!(
            !no_color.contains(ESCAPE),
            "colours despite NO_COLOR:\n{no_color:?}"
        );
    }
    sandbox.shutdown().await;
}

#[test]
fn the_demo_through_pipes_is_plain_readable_text() {
    let output = paywatch().arg("demo").output();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_follows_log_format_json_and_writes_no_escapes_into_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sandbox.log");
    let mut sandbox = paywatch()
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
        .log_to(&log)
        .start();
    sandbox.expect_line("sandbox: started").await;
    sandbox.stop().await;
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(ESCAPE), "ANSI escapes in a file: {text}");
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not a JSON record ({error}): {line}"));
        assert!(record["level"].is_string(), "{line}");
    }
}
