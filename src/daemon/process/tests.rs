//! The daemon's lifecycle checks: running as root, the open-file limit.

use super::*;

/// Issue 21: running as root with a hook that would run as root is warned about, naming the
/// hook; not as another user, and not when every hook has its own `run_as`.
#[test]
fn root_with_hooks_running_as_root_is_warned_about() {
    let mut plain = crate::settings::HookSettings::for_tests("mark-paid", &[]);
    let mut switched = crate::settings::HookSettings::for_tests("notify", &[]);
    switched.run_as = Some("shop".into());
    let warning = root_warning(true, &[plain.clone(), switched.clone()]).expect("a warning");
    assert!(
        warning.contains("hook(s) 'mark-paid' run as root"),
        "{warning}"
    );
    assert!(!warning.contains("notify"), "{warning}");
    assert!(warning.contains("run_as"), "names the fix: {warning}");
    assert_eq!(root_warning(false, &[plain.clone()]), None, "not root");
    assert_eq!(root_warning(true, &[]), None, "no hooks");
    plain.run_as = Some("shop:shop".into());
    let mut posted = crate::settings::HookSettings::for_tests("shop", &[]);
    posted.command.clear();
    posted.url = Some("https://shop.example/paywatch".into());
    assert_eq!(
        root_warning(true, &[plain, switched, posted]),
        None,
        "every command hook switches user; a URL hook (issue 24) runs no process"
    );
}

/// Issue 21: the open-file limit must hold the connection cap plus the daemon's own share;
/// the refusal names both numbers.
#[test]
fn an_open_file_limit_too_low_for_the_connection_cap_is_refused_naming_both() {
    let mut settings = Settings::load_with_env(None, Vec::new()).expect("the defaults load");
    settings.http.listen = Some("127.0.0.1:0".parse().expect("addr"));
    settings.http.max_connections = 256;
    let needed = open_files_needed(&settings);
    assert_eq!(
        needed,
        256 + RESERVED_FDS
            + 4 * settings.hooks_concurrency as u64
            + settings.paymennt.concurrency as u64
    );
    assert!(check_open_file_limit(&settings, needed).is_ok());
    let error = check_open_file_limit(&settings, 300).expect_err("too low");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "the open-file limit is 300, but [http] max_connections = 256 needs at least {needed}"
        )),
        "{text}"
    );
    assert!(text.contains("LimitNOFILE="), "{text}");
    // Without a listener the cap costs nothing.
    settings.http.listen = None;
    assert!(check_open_file_limit(&settings, 300).is_ok());
}
