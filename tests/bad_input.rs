//! Bad input, one row per case: what the user gives, what they see, the exit code, and that
//! nothing already recorded changed. The README's "Bad input" table lists the same cases with
//! the same exit codes; [`the_readme_table_matches_these_cases`] keeps the two in step.

use std::path::{Path, PathBuf};
use std::process::Command;

use paywatch::ledger::Ledger;

use crate::common::process::{self, run_with_stdin};

/// A response paymennt could have sent, with `{amount}`, `{status}` and `{order}` to fill.
const TEMPLATE: &str = r#"{"success":true,"elapsed":3,"result":{"id":"{id}","orderId":"{order}","requestId":"r1","currency":"AED","amount":{amount},"status":"{status}","firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-{id}"}}"#;

fn response(id: &str, amount: &str, status: &str, order: &str) -> Vec<u8> {
    TEMPLATE
        .replace("{id}", id)
        .replace("{amount}", amount)
        .replace("{status}", status)
        .replace("{order}", order)
        .into_bytes()
}

/// A config with a ledger in `dir`, an unreachable paymennt, and `extra` appended.
fn config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    process::write_config_named(
        dir,
        name,
        &format!(
            "[ledger]\npath = \"{}\"\n\n[paymennt]\nbase_url = \"http://127.0.0.1:9/\"\n\
             api_key = \"key\"\napi_secret = \"secret\"\n\n{extra}",
            dir.join("paywatch.db").display()
        ),
    )
}

/// One bad input: its name (as in the README table), the command, and what must come of it.
struct Case {
    name: &'static str,
    args: Vec<&'static str>,
    stdin: Vec<u8>,
    /// Extra config text (whole sections).
    config: String,
    exit: i32,
    /// Text the user must see (stderr, or stdout for a successful command).
    shows: &'static str,
}

fn cases(dir: &Path) -> Vec<Case> {
    let track = || vec!["track", "-"];
    let sa = |name: &str, content: Option<&[u8]>| {
        let path = dir.join(name);
        if let Some(content) = content {
            std::fs::write(&path, content).expect("write");
        }
        format!("[firestore]\ncredentials = \"{}\"\n", path.display())
    };
    let unreadable = dir.join("a-directory.json");
    std::fs::create_dir_all(&unreadable).expect("mkdir");
    vec![
        Case {
            name: "malformed create-link response",
            args: track(),
            stdin: b"{\"success\":true,\"result\":{\"id\":\"1\",,}}".to_vec(),
            config: String::new(),
            exit: 2,
            shows: "not valid JSON",
        },
        Case {
            name: "truncated create-link response",
            args: track(),
            stdin: response("2001", "100.00", "PENDING", "ORD-1")[..60].to_vec(),
            config: String::new(),
            exit: 2,
            shows: "not valid JSON",
        },
        Case {
            name: "response without an id",
            args: track(),
            stdin: br#"{"amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d"}"#.to_vec(),
            config: String::new(),
            exit: 2,
            shows: "'id'",
        },
        Case {
            name: "response without Firebase coordinates",
            args: track(),
            stdin: br#"{"id":"2002","amount":1,"currency":"AED","firebaseDatabase":"p"}"#.to_vec(),
            config: String::new(),
            exit: 2,
            shows: "firebaseCollection",
        },
        Case {
            name: "reserved Firestore document id",
            args: track(),
            stdin: br#"{"id":"2010","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"__x__"}"#.to_vec(),
            config: String::new(),
            exit: 2,
            shows: "firebaseDocument '__x__' is invalid: ids of the form __...__ are reserved by Firestore",
        },
        Case {
            name: "non-numeric amount",
            args: track(),
            stdin: response("2003", "\"ten\"", "PENDING", "ORD-3"),
            config: String::new(),
            exit: 2,
            shows: "field 'amount': expected a number, got ten",
        },
        Case {
            name: "negative amount",
            args: track(),
            stdin: response("2004", "-5", "PENDING", "ORD-4"),
            config: String::new(),
            exit: 2,
            shows: "amount '-5' is invalid",
        },
        Case {
            name: "huge amount",
            args: track(),
            stdin: response("2005", "1e40", "PENDING", "ORD-5"),
            config: String::new(),
            exit: 2,
            shows: "the number 1e40 cannot be held exactly",
        },
        Case {
            name: "amount with too many decimals",
            args: track(),
            stdin: response("2006", "1.000000000000000000000000000001", "PENDING", "ORD-6"),
            config: String::new(),
            exit: 2,
            shows: "cannot be held exactly",
        },
        Case {
            name: "invalid UTF-8",
            args: track(),
            stdin: b"{\"id\":\"20\xff7\"}".to_vec(),
            config: String::new(),
            exit: 2,
            shows: "UTF-8",
        },
        Case {
            name: "unknown status",
            args: track(),
            stdin: response("2008", "100.00", "SETTLED_LATER", "ORD-8"),
            config: String::new(),
            exit: 0,
            shows: "its status will be verified with Get Checkout",
        },
        Case {
            name: "hostile order id",
            args: track(),
            stdin: response("2009", "100.00", "PENDING", r"ORD\n$(rm -rf ~)\u001b[31m"),
            config: String::new(),
            exit: 0,
            shows: "now watched",
        },
        Case {
            name: "config key typo",
            args: vec!["list"],
            stdin: Vec::new(),
            config: "[reconcile]\nintervall = \"5m\"\n".into(),
            exit: 2,
            shows: "did you mean 'reconcile.interval'",
        },
        Case {
            name: "bad duration",
            args: vec!["list"],
            stdin: Vec::new(),
            config: "[reconcile]\ninterval = \"five minutes\"\n".into(),
            exit: 2,
            shows: "reconcile.interval",
        },
        Case {
            name: "missing service-account file",
            args: vec!["check-config"],
            stdin: Vec::new(),
            config: sa("absent.json", None),
            exit: 2,
            shows: "absent.json",
        },
        Case {
            name: "unreadable service-account file",
            args: vec!["check-config"],
            stdin: Vec::new(),
            config: format!("[firestore]\ncredentials = \"{}\"\n", unreadable.display()),
            exit: 2,
            shows: "a-directory.json",
        },
        Case {
            name: "malformed service-account file",
            args: vec!["check-config"],
            stdin: Vec::new(),
            config: sa("malformed.json", Some(b"{\"type\": \"service_account\",")),
            exit: 2,
            shows: "malformed.json",
        },
        Case {
            name: "hook command that does not exist",
            args: vec!["check-config"],
            stdin: Vec::new(),
            config: "[[hooks]]\nname = \"mark-paid\"\ncommand = [\"/nonexistent/mark-paid\"]\n"
                .into(),
            exit: 2,
            shows: "hook 'mark-paid'",
        },
    ]
}

#[test]
fn each_bad_input_gets_a_clear_error_and_its_exit_code_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Something already recorded, which no bad input may change.
    let base = config(dir.path(), "base.toml", "");
    let tracked = run_with_stdin(
        &base,
        &["track", "-"],
        response("1000", "100.00", "PENDING", "ORD-0"),
    );
    assert!(tracked.status.success(), "{tracked:?}");
    let ledger_path = dir.path().join("paywatch.db");
    let before = Ledger::open(&ledger_path)
        .expect("ledger")
        .checkout(&"1000".parse().expect("id"))
        .expect("read");

    for (n, case) in cases(dir.path()).into_iter().enumerate() {
        let config = config(dir.path(), &format!("case-{n}.toml"), &case.config);
        let output = run_with_stdin(&config, &case.args, &case.stdin);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(case.exit),
            "{}: exit code; stderr: {stderr}",
            case.name
        );
        assert!(
            stderr.contains(case.shows) || stdout.contains(case.shows),
            "{}: the user should see {:?}; stderr: {stderr}; stdout: {stdout}",
            case.name,
            case.shows
        );
        assert!(
            !stderr.contains("panicked"),
            "{}: a panic: {stderr}",
            case.name
        );
        assert!(
            !stderr.contains("secret\"") && !stderr.contains("= \"secret"),
            "{}: the secret in a message: {stderr}",
            case.name
        );
    }

    let ledger = Ledger::open(&ledger_path).expect("ledger");
    let after = ledger.checkout(&"1000".parse().expect("id")).expect("read");
    assert_eq!(before, after, "what was recorded before is unchanged");
    // The hostile order id is data: stored as given, and shown escaped in a list.
    let hostile = ledger
        .checkout(&"2009".parse().expect("id"))
        .expect("read")
        .expect("tracked");
    assert_eq!(
        hostile.order_id.as_deref(),
        Some("ORD\n$(rm -rf ~)\u{1b}[31m")
    );
    let list = process::run(&base, &["list"]);
    let shown = String::from_utf8_lossy(&list.stdout);
    assert!(
        !shown.contains('\u{1b}') && shown.contains(r"ORD\n$(rm -rf ~)"),
        "the list escapes control characters: {shown}"
    );
}

#[test]
fn a_ledger_that_is_not_a_database_is_named_and_left_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), "paywatch.toml", "");
    let ledger_path = dir.path().join("paywatch.db");
    let garbage: Vec<u8> = (0..4096u32).map(|n| (n * 7919 % 251) as u8).collect();
    std::fs::write(&ledger_path, &garbage).expect("write");
    for args in [vec!["list"], vec!["track", "-"]] {
        let output = run_with_stdin(&config, &args, response("3000", "1.00", "PENDING", "ORD-L"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("paywatch.db") && stderr.contains("not a paywatch ledger"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(
        std::fs::read(&ledger_path).expect("read"),
        garbage,
        "never overwritten"
    );
}

#[test]
fn a_ledger_locked_by_another_process_is_a_clear_runtime_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), "paywatch.toml", "");
    let ledger_path = dir.path().join("paywatch.db");
    drop(Ledger::open(&ledger_path).expect("ledger"));
    // Another process (here: this test) holds the write lock, as a backup tool might.
    let holder = rusqlite::Connection::open(&ledger_path).expect("open");
    holder
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    let output = run_with_stdin(
        &config,
        &["track", "-"],
        response("3001", "1.00", "PENDING", "ORD-B"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("write lock"), "{stderr}");
    holder.execute_batch("ROLLBACK").expect("release");
    let retried = run_with_stdin(
        &config,
        &["track", "-"],
        response("3001", "1.00", "PENDING", "ORD-B"),
    );
    assert!(retried.status.success(), "works once the lock is gone");
}

#[test]
fn a_read_only_ledger_is_a_clear_runtime_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), "paywatch.toml", "");
    let ledger_path = dir.path().join("paywatch.db");
    drop(Ledger::open(&ledger_path).expect("ledger"));
    // Root ignores file modes, so as root the file is made immutable instead.
    // A file this process just created is owned by its effective user.
    let as_root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&ledger_path).is_ok_and(|meta| meta.uid() == 0)
    };
    let made_read_only = if as_root {
        Command::new("chattr")
            .arg("+i")
            .arg(&ledger_path)
            .status()
            .is_ok_and(|status| status.success())
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ledger_path, std::fs::Permissions::from_mode(0o400)).is_ok()
    };
    if !made_read_only {
        eprintln!("skipped: cannot make the ledger read-only here (chattr +i failed as root)");
        return;
    }
    let output = run_with_stdin(
        &config,
        &["track", "-"],
        response("3002", "1.00", "PENDING", "ORD-R"),
    );
    if as_root {
        let _ = Command::new("chattr").arg("-i").arg(&ledger_path).status();
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("read-only"), "{stderr}");
}

#[test]
fn the_readme_table_matches_these_cases() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let dir = tempfile::tempdir().expect("tempdir");
    for case in cases(dir.path()) {
        let row = readme
            .lines()
            .find(|line| line.starts_with(&format!("| {} |", case.name)))
            .unwrap_or_else(|| panic!("README's bad-input table has no row '{}'", case.name));
        assert!(
            row.trim_end().ends_with(&format!("| {} |", case.exit)),
            "README row for '{}' should end with exit code {}: {row}",
            case.name,
            case.exit
        );
    }
}
