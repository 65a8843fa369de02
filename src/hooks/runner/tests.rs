//! Unit tests of `runner`.

use super::*;
use crate::domain::CheckoutStatus;
use std::collections::BTreeSet;
use std::time::Instant as StdInstant;

/// Writes a shell script into `dir` and returns the argv `/bin/sh SCRIPT ARGS..`.
///
/// The hook's program is `/bin/sh` rather than the script itself: exec'ing a file this test
/// process has just written can fail with ETXTBSY when another test thread forks meanwhile.
fn script(dir: &Path, name: &str, body: &str) -> HookCommand {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write the script");
    let mut command = HookCommand::new("test-hook", "/bin/sh");
    command.args = vec![path.display().to_string(), dir.display().to_string()];
    command.working_dir = dir.to_path_buf();
    command.timeout = Duration::from_secs(20);
    command.kill_grace = Duration::from_millis(200);
    command
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

fn event() -> HookEvent {
    HookEvent::synthetic("test-hook", CheckoutStatus::Paid)
}

fn never() -> CancellationToken {
    CancellationToken::new()
}

/// Awaits a run, failing the test instead of hanging if the runner never returns.
async fn bounded(run: impl Future<Output = HookOutcome>) -> HookOutcome {
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the runner returned within 30 s")
}

/// Waits for `condition` with a deadline, polling.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(StdInstant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Processes of process group `pgid` that are still running (zombies do not count: this
/// container's init may be slow to reap orphans, and a zombie runs nothing).
fn live_members(pgid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return members;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("");
        let pgrp = fields.get(2).and_then(|s| s.parse::<u32>().ok());
        if pgrp == Some(pgid) && state != "Z" && state != "X" {
            members.push(pid);
        }
    }
    members
}

/// Whether `pid` is alive (zombies count as dead), for tests here and in the dispatcher.
pub(crate) fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .expect("the hook wrote its child's pid")
        .trim()
        .parse()
        .expect("a pid")
}

#[test]
fn a_run_can_be_spawned_on_the_runtime() {
    fn assert_send<T: Send>(_: &T) {}
    let (command, event, stop) = (HookCommand::new("x", "/bin/true"), event(), never());
    assert_send(&run(&command, &event, &stop));
}

#[tokio::test]
async fn exit_zero_is_delivered() {
    let dir = tempdir();
    let command = script(dir.path(), "ok.sh", "echo done\necho warn >&2\nexit 0\n");
    let outcome = bounded(run(&command, &event(), &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0), "{}", outcome.describe());
    assert!(outcome.delivered());
    assert_eq!(outcome.exit_code(), Some(0));
    assert_eq!(outcome.stdout_tail, "done\n");
    assert_eq!(outcome.stderr_tail, "warn\n");
    assert_eq!(outcome.describe(), "exit 0");
    assert!(outcome.pid.is_some());
}

#[tokio::test]
async fn nonzero_exit_is_reported_exactly() {
    let dir = tempdir();
    let command = script(dir.path(), "three.sh", "exit 3\n");
    let outcome = bounded(run(&command, &event(), &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(3));
    assert!(!outcome.delivered());
    assert_eq!(outcome.exit_code(), Some(3));
    assert_eq!(outcome.describe(), "exit 3");
}

#[tokio::test]
async fn a_crash_is_reported_as_a_signal() {
    let dir = tempdir();
    let command = script(dir.path(), "crash.sh", "kill -SEGV $$\n");
    let outcome = bounded(run(&command, &event(), &never())).await;
    assert_eq!(outcome.ending, Ending::Signalled(11));
    assert_eq!(outcome.exit_code(), None);
    assert_eq!(outcome.describe(), "killed by SIGSEGV");
}

#[tokio::test]
async fn a_noisy_hook_neither_deadlocks_nor_grows_the_tails() {
    let dir = tempdir();
    // stderr first: a runner that read stdout to the end before stderr would deadlock here.
    let command = script(
        dir.path(),
        "noisy.sh",
        "yes fedcba9876543210 | head -c 1048576 >&2\n\
         printf 'STDERR-END\\n' >&2\n\
         yes 0123456789abcdef | head -c 1048576\n\
         printf 'STDOUT-END\\n'\n\
         exit 3\n",
    );
    let outcome = bounded(run(&command, &event(), &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(3), "{}", outcome.describe());
    for (tail, end, line) in [
        (&outcome.stdout_tail, "STDOUT-END\n", "0123456789abcdef\n"),
        (&outcome.stderr_tail, "STDERR-END\n", "fedcba9876543210\n"),
    ] {
        assert!(tail.starts_with(TRUNCATED), "marked as cut");
        assert!(tail.ends_with(end), "the end is kept");
        assert_eq!(
            tail.len(),
            TRUNCATED.len() + TAIL_BYTES,
            "exactly the last 8 KiB"
        );
        assert!(tail.contains(line));
    }
}

#[tokio::test]
async fn the_environment_is_exactly_the_documented_one() {
    let dir = tempdir();
    let mut command = HookCommand::new(
        "env-dump",
        resolve_program("env", None).expect("env is installed"),
    );
    command.args = vec!["-0".into()];
    command.working_dir = dir.path().to_path_buf();
    command.env = BTreeMap::from([
        (
            "SHOP_URL".to_owned(),
            "https://shop.example/api?x=1&y=$HOME".to_owned(),
        ),
        ("WITH_NUL".to_owned(), "a\0b".to_owned()),
    ]);
    let event = event();
    let outcome = bounded(run(&command, &event, &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0), "{}", outcome.stderr_tail);

    let vars: BTreeMap<&str, &str> = outcome
        .stdout_tail
        .split_terminator('\0')
        .map(|line| line.split_once('=').expect("NAME=value"))
        .collect();
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    expected.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
    );
    expected.insert(
        "LANG".into(),
        std::env::var("LANG").unwrap_or_else(|_| DEFAULT_LANG.into()),
    );
    expected.insert(
        "SHOP_URL".into(),
        "https://shop.example/api?x=1&y=$HOME".into(),
    );
    expected.insert("WITH_NUL".into(), "a\u{FFFD}b".into());
    expected.extend(event.env_vars());
    let expected: BTreeMap<&str, &str> = expected
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(vars, expected);

    // And the test process does have variables (cargo sets several) that did not leak.
    let ours: BTreeSet<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| !expected.contains_key(k.as_str()))
        .collect();
    assert!(
        ours.contains("CARGO_MANIFEST_DIR") || ours.contains("HOME"),
        "the test process has a variable to leak: {ours:?}"
    );
    for name in &ours {
        assert!(
            !vars.contains_key(name.as_str()),
            "{name} leaked to the hook"
        );
    }
}

#[tokio::test]
async fn the_event_arrives_on_stdin() {
    let dir = tempdir();
    let copy = dir.path().join("stdin.json");
    let mut command = HookCommand::new(
        "tee",
        resolve_program("tee", None).expect("tee is installed"),
    );
    command.args = vec![copy.display().to_string()];
    let mut event = event();
    event.attempt = 4;
    let outcome = bounded(run(&command, &event, &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0), "{}", outcome.stderr_tail);

    let written = std::fs::read(&copy).expect("the hook copied stdin");
    assert_eq!(written, event.to_json(), "one JSON document, byte for byte");
    assert_eq!(outcome.stdout_tail.as_bytes(), written, "tee echoed it");
    let value: serde_json::Value = serde_json::from_slice(&written).expect("valid JSON");
    assert_eq!(value["event_id"], event.event_id.as_str());
    assert_eq!(value["hook"], "test-hook");
    assert_eq!(value["status"], "PAID");
    assert_eq!(value["previous_status"], "PENDING");
    assert_eq!(value["attempt"], 4);
    assert_eq!(value["test"], true);
    let checkout = serde_json::to_string(&value["checkout"]).expect("serializes");
    let original: serde_json::Value =
        serde_json::from_str(event.checkout.get()).expect("valid JSON");
    assert_eq!(
        checkout,
        serde_json::to_string(&original).expect("serializes")
    );
}

#[tokio::test]
async fn a_hook_that_ignores_stdin_is_fine() {
    let dir = tempdir();
    let command = script(dir.path(), "ignore.sh", "exec 0<&-\nexit 0\n");
    let mut event = event();
    // Larger than a pipe buffer, so the write really meets a closed pipe.
    let big = format!("{{\"padding\":\"{}\"}}", "x".repeat(1 << 20));
    event.checkout = serde_json::value::RawValue::from_string(big).expect("valid JSON");
    let outcome = bounded(run(&command, &event, &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0), "{}", outcome.describe());
}

#[tokio::test]
async fn hostile_text_is_inert_and_unchanged() {
    let dir = tempdir();
    let hostile = "$(touch pwned) `touch pwned2`; touch pwned3 'single' \"double\"\nline2 \\x41 %s \u{202e}\u{FFFD}é";
    let mut event = event();
    event.order_id = Some(hostile.to_owned());
    event.request_id = Some("; touch pwned4 #".to_owned());

    let mut env_dump = HookCommand::new(
        "env-dump",
        resolve_program("env", None).expect("env is installed"),
    );
    env_dump.args = vec!["-0".into()];
    env_dump.working_dir = dir.path().to_path_buf();
    let outcome = bounded(run(&env_dump, &event, &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0));
    let order_id = outcome
        .stdout_tail
        .split_terminator('\0')
        .find_map(|var| var.strip_prefix("PAYWATCH_ORDER_ID="))
        .expect("the order id is set");
    assert_eq!(order_id, hostile);

    let copy = dir.path().join("stdin.json");
    let mut tee = HookCommand::new("tee", resolve_program("tee", None).expect("tee"));
    tee.args = vec![copy.display().to_string()];
    tee.working_dir = dir.path().to_path_buf();
    let outcome = bounded(run(&tee, &event, &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0));
    let value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&copy).expect("copied")).expect("valid JSON");
    assert_eq!(value["order_id"], hostile);
    assert_eq!(value["request_id"], "; touch pwned4 #");

    let created: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(created, vec![std::ffi::OsString::from("stdin.json")]);
}

#[tokio::test]
async fn a_nul_in_the_order_id_is_replaced_in_env_only() {
    let mut event = event();
    event.order_id = Some("A\0B".to_owned());
    let mut env_dump = HookCommand::new("env-dump", resolve_program("env", None).expect("env"));
    env_dump.args = vec!["-0".into()];
    let outcome = bounded(run(&env_dump, &event, &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0), "{}", outcome.describe());
    assert!(
        outcome
            .stdout_tail
            .split_terminator('\0')
            .any(|var| var == "PAYWATCH_ORDER_ID=A\u{FFFD}B")
    );
    assert!(String::from_utf8_lossy(&event.to_json()).contains(r#""order_id":"A\u0000B""#));
}

#[tokio::test]
async fn a_timeout_terminates_the_whole_group() {
    let dir = tempdir();
    let mut command = script(
        dir.path(),
        "slow.sh",
        "sleep 1000 &\necho $! > \"$1/child.pid\"\necho started\nsleep 1000\n",
    );
    command.timeout = Duration::from_millis(300);
    let outcome = bounded(run(&command, &event(), &never())).await;
    let Ending::TimedOut(termination) = outcome.ending else {
        panic!("expected a timeout, got {}", outcome.describe());
    };
    assert!(!termination.killed, "sh and sleep die on SIGTERM");
    assert!(termination.after >= Duration::from_millis(300));
    assert!(
        outcome.duration < Duration::from_secs(5),
        "{:?}",
        outcome.duration
    );
    assert_eq!(outcome.stdout_tail, "started\n");
    assert!(!outcome.delivered());
    let description = outcome.describe();
    assert!(description.starts_with("timed out after "), "{description}");
    assert!(description.ends_with("; ended by SIGTERM"), "{description}");

    let child = read_pid(&dir.path().join("child.pid"));
    let pgid = outcome.pid.expect("started");
    eventually("the background child to die", || !is_running(child)).await;
    eventually("the group to be empty", || live_members(pgid).is_empty()).await;
}

#[tokio::test]
async fn a_hook_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempdir();
    let mut command = script(
        dir.path(),
        "stubborn.sh",
        "trap '' TERM\nsleep 1000 &\necho $! > \"$1/child.pid\"\nsleep 1000\n",
    );
    command.timeout = Duration::from_millis(500);
    command.kill_grace = Duration::from_millis(200);
    let started = StdInstant::now();
    let outcome = bounded(run(&command, &event(), &never())).await;
    let Ending::TimedOut(termination) = outcome.ending else {
        panic!("expected a timeout, got {}", outcome.describe());
    };
    assert!(termination.killed, "{}", outcome.describe());
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "SIGKILL only after the grace period: {:?}",
        started.elapsed()
    );
    // ... and at once then: well before the 5 s reap bound that a missed SIGKILL would hit.
    assert!(
        outcome.duration < Duration::from_secs(3),
        "reaped soon after SIGKILL: {:?}",
        outcome.duration
    );
    assert!(
        outcome
            .describe()
            .ends_with("killed by SIGKILL after ignoring SIGTERM for 200ms"),
        "{}",
        outcome.describe()
    );
    let child = read_pid(&dir.path().join("child.pid"));
    eventually("the background child to die", || !is_running(child)).await;
    let pgid = outcome.pid.expect("started");
    eventually("the group to be empty", || live_members(pgid).is_empty()).await;
}

#[tokio::test]
async fn leftovers_of_a_finished_hook_are_cleaned_up() {
    let dir = tempdir();
    // The background child keeps stdout open and ignores SIGTERM: the runner must neither
    // wait for it forever nor leave it running. The hook exits only once the child has
    // installed its trap, or the SIGTERM alone could end it.
    let mut command = script(
        dir.path(),
        "leaves.sh",
        "(trap '' TERM; touch \"$1/armed\"; exec sleep 1000) &\n\
         echo $! > \"$1/child.pid\"\n\
         while [ ! -e \"$1/armed\" ]; do sleep 0.01; done\n\
         exit 0\n",
    );
    command.kill_grace = Duration::from_millis(200);
    let started = StdInstant::now();
    let outcome = bounded(run(&command, &event(), &never())).await;
    assert_eq!(outcome.ending, Ending::Exited(0), "{}", outcome.describe());
    assert!(started.elapsed() < Duration::from_secs(5));
    let child = read_pid(&dir.path().join("child.pid"));
    eventually("the leftover to die", || !is_running(child)).await;
    let pgid = outcome.pid.expect("started");
    eventually("the group to be empty", || live_members(pgid).is_empty()).await;
}

#[tokio::test]
async fn cancelling_the_stop_token_terminates_the_hook() {
    let dir = tempdir();
    let command = script(
        dir.path(),
        "wait.sh",
        "sleep 1000 &\necho $! > \"$1/child.pid\"\ntouch \"$1/ready\"\nsleep 1000\n",
    );
    let stop = CancellationToken::new();
    let ready = dir.path().join("ready");
    let event = event();
    let (outcome, ()) = tokio::join!(bounded(run(&command, &event, &stop)), async {
        eventually("the hook to start", || ready.exists()).await;
        stop.cancel();
    });
    let Ending::Stopped(Some(termination)) = outcome.ending else {
        panic!("expected a stop, got {}", outcome.describe());
    };
    assert!(!termination.killed);
    assert!(
        outcome.duration < Duration::from_secs(10),
        "not the 20s timeout"
    );
    assert!(outcome.describe().starts_with("stopped by shutdown after "));
    let child = read_pid(&dir.path().join("child.pid"));
    eventually("the background child to die", || !is_running(child)).await;
    let pgid = outcome.pid.expect("started");
    eventually("the group to be empty", || live_members(pgid).is_empty()).await;
}

#[tokio::test]
async fn an_already_cancelled_token_starts_nothing() {
    let dir = tempdir();
    let command = script(dir.path(), "touch.sh", "touch \"$1/ran\"\n");
    let stop = CancellationToken::new();
    stop.cancel();
    let outcome = bounded(run(&command, &event(), &stop)).await;
    assert_eq!(outcome.ending, Ending::Stopped(None));
    assert_eq!(outcome.pid, None);
    assert!(!dir.path().join("ran").exists());
    assert_eq!(outcome.describe(), "not started: shutting down");
}

#[tokio::test]
async fn dropping_the_run_kills_the_group() {
    let dir = tempdir();
    let command = script(
        dir.path(),
        "wait.sh",
        "sleep 1000 &\necho $! > \"$1/child.pid\"\ntouch \"$1/ready\"\nsleep 1000\n",
    );
    let ready = dir.path().join("ready");
    let event = event();
    let stop = never();
    tokio::select! {
        _ = run(&command, &event, &stop) => panic!("the hook sleeps for 1000s"),
        () = eventually("the hook to start", || ready.exists()) => {}
    }
    let child = read_pid(&dir.path().join("child.pid"));
    eventually("the background child to die", || !is_running(child)).await;
}

#[tokio::test]
async fn a_non_executable_program_fails_to_spawn_naming_it() {
    let dir = tempdir();
    let path = dir.path().join("not-executable");
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").expect("write");
    let command = HookCommand::new("broken", &path);
    let outcome = bounded(run(&command, &event(), &never())).await;
    let Ending::SpawnFailed(message) = &outcome.ending else {
        panic!("expected a spawn failure, got {}", outcome.describe());
    };
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        outcome
            .describe()
            .starts_with("spawn failed: could not start '")
    );
    assert!(!outcome.delivered());
    assert_eq!(outcome.pid, None);
}

#[tokio::test]
async fn configured_env_is_checked_and_its_values_never_shown() {
    let mut command = HookCommand::new("bad-env", "/bin/true");
    command.env.insert("A=B".into(), "x".into());
    let outcome = bounded(run(&command, &event(), &never())).await;
    let Ending::SpawnFailed(message) = &outcome.ending else {
        panic!("expected a spawn failure, got {}", outcome.describe());
    };
    assert!(message.contains("'A=B'"), "{message}");
    command.env.insert("SHOP_TOKEN".into(), "tok-s3cret".into());
    let shown = format!("{command:?}");
    assert!(
        shown.contains("SHOP_TOKEN") && !shown.contains("tok-s3cret"),
        "{shown}"
    );
    assert!(validate_env_name("SHOP_URL").is_ok());
    assert!(validate_env_name("").is_err());
}

#[test]
fn resolve_finds_absolute_and_bare_names() {
    assert_eq!(
        resolve_program("/bin/sh", None).expect("found"),
        PathBuf::from("/bin/sh")
    );
    let dir = tempdir();
    let program = dir.path().join("notify-shop");
    std::fs::write(&program, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = std::env::join_paths([Path::new("relative/dir"), dir.path()]).expect("a PATH");
    assert_eq!(
        resolve_program("notify-shop", Some(&path)).expect("found on PATH"),
        program
    );
}

#[test]
fn resolve_errors_name_the_program() {
    let dir = tempdir();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "data").expect("write");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let path = dir.path().as_os_str();

    let error = resolve_program("nope-not-here", Some(path)).expect_err("not on PATH");
    assert!(matches!(error, ResolveError::NotOnPath { .. }), "{error}");
    assert!(error.to_string().contains("'nope-not-here'"), "{error}");

    let error = resolve_program("bin/hook", Some(path)).expect_err("relative");
    assert!(matches!(error, ResolveError::Relative(_)), "{error}");
    assert!(error.to_string().contains("'bin/hook'"), "{error}");

    let missing = dir.path().join("missing");
    let error = resolve_program(&missing.display().to_string(), None).expect_err("missing");
    assert!(matches!(error, ResolveError::Missing(_)), "{error}");
    assert!(error.to_string().contains(&missing.display().to_string()));

    let error = resolve_program(&plain.display().to_string(), None).expect_err("not exec");
    assert!(matches!(error, ResolveError::NotExecutable(_)), "{error}");
    assert!(error.to_string().contains(&plain.display().to_string()));

    let error = resolve_program("plain", Some(path)).expect_err("on PATH, not exec");
    assert!(matches!(error, ResolveError::NotExecutable(_)), "{error}");

    let error = resolve_program(&dir.path().display().to_string(), None).expect_err("a directory");
    assert!(matches!(error, ResolveError::NotAFile(_)), "{error}");

    assert!(matches!(
        resolve_program("", None),
        Err(ResolveError::Empty)
    ));
}

#[test]
fn tail_keeps_the_end_and_marks_the_cut() {
    let mut tail = Tail::new(4);
    tail.push(b"ab");
    tail.push(b"c");
    assert_eq!(tail.into_string(), "abc");

    let mut tail = Tail::new(4);
    for chunk in [&b"ab"[..], b"cd", b"ef", b"g", b"h", b"ij"] {
        tail.push(chunk);
    }
    assert_eq!(tail.into_string(), "…ghij");

    // Memory stays bounded however much is written in small pieces.
    let mut tail = Tail::new(4);
    for _ in 0..1000 {
        tail.push(b"abc");
        assert!(tail.bytes.len() <= 8, "{}", tail.bytes.len());
    }
    assert_eq!(tail.into_string(), "…cabc");

    let mut tail = Tail::new(4);
    tail.push(b"0123456789");
    assert_eq!(tail.into_string(), "…6789");

    // "é" is two bytes: a cut through it leaves no replacement character behind.
    let mut tail = Tail::new(4);
    tail.push("xxé".as_bytes());
    tail.push("abc".as_bytes());
    assert_eq!(tail.into_string(), "…abc");
    let mut tail = Tail::new(4);
    tail.push("xéé".as_bytes());
    assert_eq!(tail.into_string(), "…éé");
}
