//! The accepted range of every numeric and duration setting.
//!
//! Owns: the bound tables and the lookup of a key's bounds.
//! Must never: accept a value outside them (an absurd value is refused when settings load,
//! naming the key, the value and the bound).

use std::time::Duration;

use super::{Settings, SettingsError, err};

/// The longest duration any setting accepts (ten years).
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// The accepted range of each duration setting (`hooks[N].x` as `hooks.x`), lowest first.
pub const DURATION_BOUNDS: &[(&str, Duration, Duration)] = &[
    ("ha.lease", Duration::from_secs(2), Duration::from_secs(300)),
    (
        "paymennt.connect_timeout",
        Duration::from_millis(100),
        Duration::from_secs(300),
    ),
    (
        "paymennt.request_timeout",
        Duration::from_millis(100),
        Duration::from_secs(600),
    ),
    (
        "firestore.idle_timeout",
        Duration::from_secs(1),
        Duration::from_secs(3600),
    ),
    (
        "firestore.add_ack_timeout",
        Duration::from_millis(100),
        Duration::from_secs(600),
    ),
    ("firestore.refund_watch", Duration::ZERO, MAX_DURATION),
    (
        "reconcile.interval",
        Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    ),
    (
        "reconcile.startup_grace",
        Duration::ZERO,
        Duration::from_secs(600),
    ),
    (
        "daemon.drain_timeout",
        Duration::ZERO,
        Duration::from_secs(3600),
    ),
    (
        "hooks.timeout",
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
    ),
    (
        "hooks.max_age",
        Duration::from_secs(1),
        Duration::from_secs(366 * 24 * 3600),
    ),
    (
        "http.verify_failing_after",
        Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    ),
    (
        "http.header_timeout",
        Duration::from_millis(100),
        Duration::from_secs(600),
    ),
    (
        "http.request_timeout",
        Duration::from_millis(100),
        Duration::from_secs(3600),
    ),
    (
        "http.idle_timeout",
        Duration::from_millis(100),
        Duration::from_secs(3600),
    ),
];

/// The accepted range of each numeric setting (`hooks[N].x` as `hooks.x`), lowest first.
pub const COUNT_BOUNDS: &[(&str, u64, u64)] = &[
    ("paymennt.max_retries", 0, 20),
    ("paymennt.concurrency", 1, 256),
    ("firestore.targets_per_stream", 1, 10_000),
    ("firestore.streams_per_connection", 1, 1000),
    ("hooks_concurrency", 1, 256),
    ("hooks.max_attempts", 1, 1000),
    ("http.max_body_bytes", 1024, 10 * 1024 * 1024),
    ("http.webhook_rate_per_address", 1, 1_000_000),
    ("http.webhook_rate_per_checkout", 1, 1_000_000),
    ("http.max_connections", 1, 16_384),
];

/// The key as the bound tables spell it: `hooks[3].timeout` is `hooks.timeout`.
fn bound_key(key: &str) -> String {
    match key.split_once("].") {
        Some((_, field)) if key.starts_with("hooks[") => format!("hooks.{field}"),
        _ => key.to_owned(),
    }
}

pub(super) fn duration_bounds(key: &str) -> (Duration, Duration) {
    let key = bound_key(key);
    DURATION_BOUNDS
        .iter()
        .find(|(name, _, _)| *name == key)
        .map(|(_, min, max)| (*min, *max))
        .unwrap_or((Duration::ZERO, MAX_DURATION))
}

pub(super) fn count_bounds(key: &str) -> (u64, u64) {
    let key = bound_key(key);
    COUNT_BOUNDS
        .iter()
        .find(|(name, _, _)| *name == key)
        .map(|(_, min, max)| (*min, *max))
        .unwrap_or((1, 1000))
}

/// Checks every number and duration against its bounds, naming the key (under the variable's
/// name when `from` says an environment variable set it), the value and the bound.
pub(super) fn check(
    settings: &Settings,
    origin: &str,
    from: &dyn Fn(&str) -> String,
) -> Result<(), SettingsError> {
    let mut durations = vec![
        ("ha.lease".to_owned(), settings.ha.lease),
        (
            "paymennt.connect_timeout".to_owned(),
            settings.paymennt.connect_timeout,
        ),
        (
            "paymennt.request_timeout".to_owned(),
            settings.paymennt.request_timeout,
        ),
        (
            "firestore.idle_timeout".to_owned(),
            settings.firestore.idle_timeout,
        ),
        (
            "firestore.add_ack_timeout".to_owned(),
            settings.firestore.add_ack_timeout,
        ),
        (
            "firestore.refund_watch".to_owned(),
            settings.firestore.refund_watch,
        ),
        ("reconcile.interval".to_owned(), settings.reconcile.interval),
        (
            "reconcile.startup_grace".to_owned(),
            settings.reconcile.startup_grace,
        ),
        (
            "daemon.drain_timeout".to_owned(),
            settings.daemon.drain_timeout,
        ),
        (
            "http.verify_failing_after".to_owned(),
            settings.http.verify_failing_after,
        ),
        (
            "http.header_timeout".to_owned(),
            settings.http.header_timeout,
        ),
        (
            "http.request_timeout".to_owned(),
            settings.http.request_timeout,
        ),
        ("http.idle_timeout".to_owned(), settings.http.idle_timeout),
    ];
    let mut counts = vec![
        (
            "paymennt.max_retries".to_owned(),
            u64::from(settings.paymennt.max_retries),
        ),
        (
            "paymennt.concurrency".to_owned(),
            settings.paymennt.concurrency as u64,
        ),
        (
            "firestore.targets_per_stream".to_owned(),
            settings.firestore.targets_per_stream as u64,
        ),
        (
            "firestore.streams_per_connection".to_owned(),
            settings.firestore.streams_per_connection as u64,
        ),
        (
            "hooks_concurrency".to_owned(),
            settings.hooks_concurrency as u64,
        ),
        (
            "http.max_body_bytes".to_owned(),
            settings.http.max_body_bytes as u64,
        ),
        (
            "http.webhook_rate_per_address".to_owned(),
            u64::from(settings.http.webhook_rate_per_address),
        ),
        (
            "http.webhook_rate_per_checkout".to_owned(),
            u64::from(settings.http.webhook_rate_per_checkout),
        ),
        (
            "http.max_connections".to_owned(),
            settings.http.max_connections as u64,
        ),
    ];
    for (index, hook) in settings.hooks.iter().enumerate() {
        durations.push((format!("hooks[{index}].timeout"), hook.timeout));
        if let Some(max_age) = hook.max_age {
            durations.push((format!("hooks[{index}].max_age"), max_age));
        }
        if let Some(max_attempts) = hook.max_attempts {
            counts.push((
                format!("hooks[{index}].max_attempts"),
                u64::from(max_attempts),
            ));
        }
        for code in &hook.permanent_exit_codes {
            if !(1..=255).contains(code) {
                return Err(err(format!(
                    "{origin}: 'hooks[{index}].permanent_exit_codes' value '{code}' is not an exit code a hook can end with (1 to 255)"
                )));
            }
        }
    }
    for (key, value) in durations {
        let (min, max) = duration_bounds(&key);
        let shown = humantime::format_duration(value);
        if value < min {
            return Err(err(format!(
                "{}: '{key}' value '{shown}' is too short (at least {})",
                from(&key),
                humantime::format_duration(min)
            )));
        }
        if value > max {
            return Err(err(format!(
                "{}: '{key}' value '{shown}' is too long (at most {})",
                from(&key),
                humantime::format_duration(max)
            )));
        }
    }
    for (key, value) in counts {
        let (min, max) = count_bounds(&key);
        if value < min {
            return Err(err(format!(
                "{}: '{key}' value '{value}' is too small (at least {min})",
                from(&key)
            )));
        }
        if value > max {
            return Err(err(format!(
                "{}: '{key}' value '{value}' is too large (at most {max})",
                from(&key)
            )));
        }
    }
    Ok(())
}
