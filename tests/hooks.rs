//! `paywatch hooks ...` as a merchant runs it: the built binary, a temporary config and ledger,
//! shell scripts as hooks. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.
//!
//! The dispatcher's delivery rules (retries, order, timeouts, recovery, drain) are tested
//! inside the crate (`src/hooks/dispatcher/tests.rs`), where transitions can be recorded.

use std::path::{Path, PathBuf};
use std::process::Output;

use paywatch::ledger::Ledger;

use crate::common::process::{self, paywatch, stderr, stdout};

/// A secret the daemon's environment may hold; no hook may see it.
const SECRET: &str = "sk_live_do_not_leak_0123456789";

struct Merchant {
    dir: tempfile::TempDir,
}

impl Merchant {
    /// A config with one hook, `mark-paid`, running `script` (`/bin/sh SCRIPT DIR`), and
    /// `extra` appended to its `[[hooks]]` table.
    fn new(script: &str, extra: &str) -> Merchant {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hook.sh"), script).expect("write the hook");
        let path = dir.path().display();
        let config = format!(
            r#"[ledger]
path = "{path}/ledger/paywatch.db"

[[hooks]]
name = "mark-paid"
command = ["/bin/sh", "{path}/hook.sh", "{path}"]
statuses = ["PAID", "REFUNDED"]
permanent_exit_codes = [64]
env = {{ SHOP_ENV = "staging" }}
{extra}
"#
        );
        process::write_config(dir.path(), &config);
        Merchant { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates the (empty) ledger, as a first `track` would.
    fn create_ledger(&self) {
        Ledger::open(&self.file("ledger/paywatch.db")).expect("create the ledger");
    }

    /// Runs `paywatch --config CONFIG ARGS`, with a daemon secret in its environment.
    fn run(&self, args: &[&str]) -> Output {
        paywatch()
            .config(&self.file("paywatch.toml"))
            .args(args)
            .env("PAYWATCH_PAYMENNT__API_SECRET", SECRET)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .current_dir(self.path())
            .output()
    }
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
}

#[test]
fn hooks_test_runs_the_real_hook_with_a_test_event_and_without_the_daemons_secrets() {
    let merchant = Merchant::new(
        r#"cat /proc/$$/environ > "$1/environ"
cat > "$1/event.json"
echo "order $PAYWATCH_ORDER_ID marked"
echo "a note" >&2
"#,
        "",
    );
    let output = merchant.run(&["hooks", "test", "mark-paid", "--status", "paid"]);
    assert_exit(&output, 0);
    let shown = stdout(&output);
    assert!(shown.contains("hook     mark-paid\n"), "{shown}");
    assert!(
        shown.contains("result   delivered: exit 0 after "),
        "{shown}"
    );
    assert!(
        shown.contains("(test) PENDING -> PAID, order PAYWATCH-TEST-"),
        "{shown}"
    );
    assert!(shown.contains("stdout:\n  order PAYWATCH-TEST-"), "{shown}");
    assert!(shown.contains("stderr:\n  a note"), "{shown}");

    let event: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merchant.file("event.json")).expect("stdin"))
            .expect("JSON");
    assert_eq!(event["test"], true);
    assert_eq!(event["status"], "PAID");
    assert_eq!(event["hook"], "mark-paid");
    assert!(
        event["event_id"]
            .as_str()
            .is_some_and(|id| shown.contains(id))
    );

    let environ = std::fs::read(merchant.file("environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    let vars: Vec<&str> = environ.split('\0').filter(|v| !v.is_empty()).collect();
    assert!(
        !environ.contains(SECRET),
        "a daemon secret leaked: {vars:?}"
    );
    assert!(vars.contains(&"PAYWATCH_TEST=1"), "{vars:?}");
    assert!(vars.contains(&"PAYWATCH_STATUS=PAID"), "{vars:?}");
    assert!(vars.contains(&"SHOP_ENV=staging"), "{vars:?}");
    for var in &vars {
        let name = var.split('=').next().unwrap_or_default();
        assert!(
            ["PATH", "LANG", "SHOP_ENV"].contains(&name) || name.starts_with("PAYWATCH_"),
            "unexpected variable {var}"
        );
    }
}

#[test]
fn hooks_test_fails_with_exit_1_showing_what_the_hook_said() {
    let merchant = Merchant::new("echo 'no such order' >&2\nexit 64\n", "");
    let output = merchant.run(&["hooks", "test", "mark-paid"]);
    assert_exit(&output, 1);
    assert!(stdout(&output).contains("result   NOT delivered: exit 64"));
    assert!(stdout(&output).contains("stderr:\n  no such order"));
    assert_eq!(
        stderr(&output),
        "paywatch: hook 'mark-paid' did not take the test event: exit 64 (a permanent exit code: a real delivery would be dead at once)\n"
    );

    let merchant = Merchant::new("exit 1\n", "");
    let output = merchant.run(&["hooks", "test", "mark-paid"]);
    assert_exit(&output, 1);
    assert!(stderr(&output).ends_with(": exit 1 (a real delivery would be retried)\n"));
}

#[test]
fn hooks_test_names_what_is_wrong_with_exit_2() {
    let merchant = Merchant::new("exit 0\n", "");
    let output = merchant.run(&["hooks", "test", "mark-payed"]);
    assert_exit(&output, 2);
    let config = merchant.file("paywatch.toml");
    assert_eq!(
        stderr(&output),
        format!(
            "paywatch: no hook named 'mark-payed'\n\nhooks configured in {}: mark-paid\n",
            config.display()
        )
    );

    let output = merchant.run(&["hooks", "test", "mark-paid", "--status", "SHIPPED"]);
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("--status 'SHIPPED' is not a checkout status"));

    let merchant = Merchant::new(
        "exit 0\n",
        "\n[[hooks]]\nname = \"crm\"\ncommand = [\"crm-notify-missing\", \"--x\"]\n",
    );
    let output = merchant.run(&["hooks", "test", "crm"]);
    assert_exit(&output, 2);
    let message = stderr(&output);
    assert!(
        message.contains("hook 'crm': hook program 'crm-notify-missing' was not found on PATH"),
        "{message}"
    );
}

#[test]
fn hooks_list_retry_and_replay_on_an_empty_ledger() {
    let merchant = Merchant::new("exit 0\n", "");
    let output = merchant.run(&["hooks", "list"]);
    assert_exit(&output, 1);
    assert!(stderr(&output).starts_with("paywatch: no ledger at "));

    merchant.create_ledger();
    let output = merchant.run(&["hooks", "list"]);
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "no deliveries\n");
    let output = merchant.run(&["hooks", "list", "--state", "dead", "--json"]);
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "[]\n");

    let output = merchant.run(&["hooks", "retry", "evt_0000"]);
    // An id that names nothing the ledger holds is an input error.
    assert_exit(&output, 2);
    assert_eq!(
        stderr(&output),
        "paywatch: no hook delivery with event id 'evt_0000'\n\nlist them with: paywatch hooks list\n"
    );
    let output = merchant.run(&["hooks", "retry", "--all-dead"]);
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "no dead deliveries\n");

    let output = merchant.run(&["hooks", "replay", "--since", "2h", "--hook", "mark-paid"]);
    assert_exit(&output, 0);
    assert!(
        stdout(&output).contains("nothing queued"),
        "{}",
        stdout(&output)
    );
    let output = merchant.run(&["hooks", "replay", "--since", "2h", "--json"]);
    assert_exit(&output, 0);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["queued"], serde_json::json!([]));
    assert_eq!(report["hooks"], serde_json::json!(["mark-paid"]));
}

#[test]
fn bad_hooks_arguments_are_usage_errors() {
    let merchant = Merchant::new("exit 0\n", "");
    merchant.create_ledger();
    for args in [
        &["hooks", "list", "--state", "stuck"][..],
        &["hooks", "retry"],
        &["hooks", "retry", "evt_1", "--all-dead"],
        &["hooks", "replay"],
        &["hooks", "replay", "--since", "last tuesday"],
        &["hooks", "replay", "--since", "1h", "--hook", "nope"],
    ] {
        let output = merchant.run(args);
        assert_exit(&output, 2);
        assert!(!stderr(&output).is_empty(), "{args:?} explains itself");
    }
}

/// Issue 21: a hook with `run_as` runs as that user and group, supplementary groups cleared,
/// when paywatch is root (CI runs the tests as root); otherwise `run_as` is refused with exit 2
/// naming the hook.
#[test]
fn a_hook_with_run_as_runs_as_that_user_or_is_refused_when_not_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let merchant = Merchant::new(
        "id -u > \"$1/ids\"\nid -g >> \"$1/ids\"\nid -G >> \"$1/ids\"\n",
        "run_as = \"nobody\"",
    );
    // The hook, as nobody, writes into the test's directory.
    std::fs::set_permissions(merchant.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let output = merchant.run(&["hooks", "test", "mark-paid", "--status", "paid"]);
    let root = std::fs::metadata("/proc/self").expect("proc").uid() == 0;
    if !root {
        assert_exit(&output, 2);
        let shown = stderr(&output);
        assert!(
            shown.contains(
                "hook 'mark-paid': 'run_as' value 'nobody' needs paywatch to run as root"
            ),
            "{shown}"
        );
        return;
    }
    assert_exit(&output, 0);
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("passwd")
        .expect("a nobody user");
    let ids = std::fs::read_to_string(merchant.file("ids")).expect("the hook ran");
    let expected = format!(
        "{uid}\n{gid}\n{gid}\n",
        uid = nobody.uid.as_raw(),
        gid = nobody.gid.as_raw()
    );
    assert_eq!(
        ids, expected,
        "uid, gid, and no supplementary group of root's"
    );
}
