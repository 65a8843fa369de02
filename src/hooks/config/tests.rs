//! Unit tests of `config`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;

fn hook(name: &str, command: &[&str]) -> HookSettings {
    HookSettings {
        name: name.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        statuses: vec![],
        timeout: Duration::from_secs(7),
        max_attempts: None,
        max_age: None,
        env: Default::default(),
        permanent_exit_codes: vec![],
        run_as: None,
        ..HookSettings::for_tests(name, &[])
    }
}

fn command_of(set: &HookSet, name: &str) -> HookCommand {
    match &set.get(name).expect("hook").target {
        HookTarget::Command(command) => command.clone(),
        HookTarget::Url(_) => panic!("a command hook"),
    }
}

#[test]
fn a_bare_name_is_resolved_on_path_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = dir.path().join("mark-paid");
    std::fs::write(&program, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut settings = hook("mark", &["mark-paid", "--db", "shop $(x)"]);
    settings.max_attempts = Some(3);
    settings.max_age = Some(Duration::from_secs(60));
    settings.permanent_exit_codes = vec![64];
    settings.env.insert("SHOP".into(), "prod".into());
    let set =
        HookSet::resolve(&[settings], Some(dir.path().as_os_str()), "test.toml").expect("resolves");
    let spec = set.get("mark").expect("by name");
    let HookTarget::Command(command) = &spec.target else {
        panic!("a command hook");
    };
    assert_eq!(command.program, program);
    assert_eq!(command.args, ["--db", "shop $(x)"]);
    assert_eq!(command.timeout, Duration::from_secs(7));
    assert_eq!(command.env.get("SHOP").map(String::as_str), Some("prod"));
    assert_eq!(spec.policy.max_attempts, 3);
    assert_eq!(spec.policy.max_age, Some(Duration::from_secs(60)));
    assert_eq!(spec.policy.permanent_exit_codes, [64]);
    assert_eq!(set.names().collect::<Vec<_>>(), ["mark"]);
}

#[test]
fn defaults_apply_and_the_hooks_own_path_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = dir.path().join("notify");
    std::fs::write(&program, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut settings = hook("n", &["notify"]);
    settings
        .env
        .insert("PATH".into(), dir.path().display().to_string());
    let set = HookSet::resolve(&[settings], Some(OsStr::new("/nonexistent")), "t")
        .expect("found on the hook's PATH");
    let spec = set.get("n").expect("by name");
    assert!(matches!(&spec.target, HookTarget::Command(c) if c.program == program));
    assert_eq!(spec.policy.max_attempts, DEFAULT_MAX_ATTEMPTS);
    assert_eq!(spec.policy.schedule, RetrySchedule::standard());
}

#[test]
fn errors_name_the_config_the_hook_and_the_fix() {
    let error = HookSet::resolve(
        &[hook("ok", &["/bin/sh"]), hook("typo", &["mark-piad", "x"])],
        Some(OsStr::new("/usr/bin:/bin")),
        "/etc/paywatch/paywatch.toml",
    )
    .expect_err("not on PATH");
    assert_eq!(
        error.to_string(),
        "/etc/paywatch/paywatch.toml: hook 'typo': hook program 'mark-piad' was not found on PATH (/usr/bin:/bin)\n\nfix 'hooks[1].command' (an absolute path, or a program on PATH)"
    );

    let mut zero = hook("z", &["/bin/sh"]);
    zero.timeout = Duration::ZERO;
    let error = HookSet::resolve(&[zero], None, "t").expect_err("zero timeout");
    assert!(
        error
            .to_string()
            .contains("'timeout' must be greater than 0"),
        "{error}"
    );

    let mut env = hook("e", &["/bin/sh"]);
    env.env.insert("A=B".into(), "x".into());
    let error = HookSet::resolve(&[env], None, "t").expect_err("bad env name");
    assert!(error.to_string().contains("'A=B' is invalid"), "{error}");

    let error = HookSet::resolve(&[hook("r", &["bin/x"])], None, "t").expect_err("relative");
    assert!(error.to_string().contains("relative path"), "{error}");
}

/// Issue 21: `run_as` is honoured only by a daemon running as root; otherwise it is
/// refused at validation, naming the hook and the fix.
#[test]
fn run_as_is_refused_unless_root_and_resolved_to_ids_when_root() {
    let mut switched = hook("mark-paid", &["/bin/sh"]);
    switched.run_as = Some("root".into());
    let error = HookSet::resolve_with(
        &[switched.clone()],
        None,
        "/etc/paywatch/paywatch.toml",
        false,
    )
    .expect_err("not root");
    let text = error.to_string();
    assert!(
        text.starts_with(
            "/etc/paywatch/paywatch.toml: hook 'mark-paid': 'run_as' value 'root' needs paywatch to run as root"
        ),
        "{text}"
    );
    assert!(text.contains("remove run_as"), "{text}");
    assert!(
        !text.contains("hooks[0].command"),
        "not the command's hint: {text}"
    );

    let set = HookSet::resolve_with(&[switched.clone()], None, "t", true).expect("root");
    let run_as = command_of(&set, "mark-paid").run_as;
    assert_eq!(
        run_as,
        Some(crate::hooks::runner::RunAs {
            spec: "root".into(),
            uid: 0,
            gid: 0
        })
    );
    switched.run_as = Some("12345:54321".into());
    let set = HookSet::resolve_with(&[switched.clone()], None, "t", true).expect("ids");
    let run_as = command_of(&set, "mark-paid").run_as;
    assert_eq!(run_as.map(|r| (r.uid, r.gid)), Some((12345, 54321)));

    for (value, problem) in [
        ("", "is not \"user\" or \"user:group\""),
        (":wheel", "is not \"user\" or \"user:group\""),
        ("shop:", "is not \"user\" or \"user:group\""),
        ("a:b:c", "is not \"user\" or \"user:group\""),
        (
            "no-such-user-paywatch",
            "user 'no-such-user-paywatch' does not exist",
        ),
        (
            "root:no-such-group-paywatch",
            "group 'no-such-group-paywatch' does not exist",
        ),
        ("12345", "uid 12345 has no account"),
    ] {
        switched.run_as = Some(value.into());
        let error = HookSet::resolve_with(&[switched.clone()], None, "t", true)
            .expect_err(value)
            .to_string();
        assert!(error.contains("hook 'mark-paid'"), "{value}: {error}");
        assert!(error.contains(problem), "{value}: {error}");
    }
}

#[test]
fn a_schedule_can_be_injected() {
    let schedule = RetrySchedule::new(vec![Duration::from_millis(1)], 0.0);
    let set = HookSet::resolve(
        &[hook("a", &["/bin/sh"]), hook("b", &["/bin/sh"])],
        None,
        "t",
    )
    .expect("resolves")
    .with_schedule(schedule.clone());
    assert_eq!(set.len(), 2);
    for name in ["a", "b"] {
        assert_eq!(set.get(name).expect("hook").policy.schedule, schedule);
    }
    assert!(set.get("c").is_none());
    assert!(HookSet::default().is_empty());
}
