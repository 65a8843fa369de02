//! Reading the config: the file, `PAYWATCH_<SECTION>__<KEY>` variables, unknown keys and the
//! words of a parse error.
//!
//! Owns: finding the file, listing every known key, and describing where a bad value came from
//! (the file and line, or the variable).
//! Must never: print a value that may be a secret in an error (only keys, and values of keys
//! that are never secret).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{SettingsError, err};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/paywatch/paywatch.toml";

/// The config file to read: `--config`, else the default path if it exists.
pub(super) fn choose_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, SettingsError> {
    match explicit {
        Some(path) => {
            if !path.exists() {
                return Err(err(format!(
                    "config file '{}' does not exist",
                    path.display()
                )));
            }
            Ok(Some(path.to_path_buf()))
        }
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            Ok(default.exists().then(|| default.to_path_buf()))
        }
    }
}

/// Environment variables that are not settings even though they start with `PAYWATCH_`:
/// the config path, and the variables paywatch gives to hooks (a hook may call paywatch).
fn is_setting_variable(rest: &str) -> bool {
    rest.contains("__") || rest == "HOOKS_CONCURRENCY"
}

/// The `PAYWATCH_<SECTION>__<KEY>` variables, as config keys (`paymennt.base_url`).
pub(super) fn environment_overrides(
    variables: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> BTreeMap<String, (String, String)> {
    let mut overrides = BTreeMap::new();
    for (name, value) in variables {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix("PAYWATCH_") else {
            continue;
        };
        if !is_setting_variable(rest) {
            continue;
        }
        let key = rest.to_lowercase().replace("__", ".");
        overrides.insert(key, (name.to_owned(), value.to_owned()));
    }
    overrides
}

/// Every key the file or the environment may set, for the unknown-key check.
pub const KNOWN_KEYS: &[&str] = &[
    "ledger.path",
    "ledger.url",
    "ledger.password_file",
    "ledger.ca_file",
    "ha.lease",
    "paymennt.environment",
    "paymennt.base_url",
    "paymennt.api_key",
    "paymennt.api_key_file",
    "paymennt.api_secret",
    "paymennt.api_secret_file",
    "paymennt.connect_timeout",
    "paymennt.request_timeout",
    "paymennt.max_retries",
    "paymennt.concurrency",
    "paymennt.ca_file",
    "firestore.credentials",
    "firestore.endpoint",
    "firestore.database",
    "firestore.stream_mode",
    "firestore.targets_per_stream",
    "firestore.streams_per_connection",
    "firestore.idle_timeout",
    "firestore.add_ack_timeout",
    "firestore.refund_watch",
    "firestore.auth",
    "firestore.api_key",
    "firestore.send_api_key_to_firestore",
    "firestore.identity_endpoint",
    "firestore.token_endpoint",
    "firestore.ca_file",
    "firestore.enabled",
    "reconcile.interval",
    "reconcile.page_size",
    "reconcile.startup_grace",
    "discovery.enabled",
    "discovery.types",
    "discovery.interval",
    "discovery.lookback",
    "discovery.overlap",
    "discovery.page_size",
    "daemon.drain_timeout",
    "daemon.wait_for_api",
    "log.level",
    "log.format",
    "http.listen",
    "http.token",
    "http.token_file",
    "http.webhook_hmac_key",
    "http.webhook_hmac_key_file",
    "http.webhook_signature_header",
    "http.webhook_require_signature",
    "http.max_body_bytes",
    "http.webhook_rate_per_address",
    "http.webhook_rate_per_checkout",
    "http.verify_failing_after",
    "http.header_timeout",
    "http.request_timeout",
    "http.idle_timeout",
    "http.max_connections",
    "hooks_concurrency",
];

const HOOK_KEYS: &[&str] = &[
    "name",
    "command",
    "statuses",
    "timeout",
    "max_attempts",
    "max_age",
    "env",
    "permanent_exit_codes",
    "run_as",
    "url",
    "secret",
    "secret_file",
    "previous_secret",
    "previous_secret_file",
    "headers",
    "ca_file",
];

/// Reports keys no setting has, with the closest known key as a suggestion.
/// The line of the key at `path` in TOML `text` (`["discovery", "lokback"]`, or
/// `["hooks", "0", "comand"]` for an entry of an array of tables), for error messages.
fn key_line(text: &str, path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let parsed = DeTable::parse(text).ok()?;
    let mut value: Option<&DeValue<'_>> = None;
    let mut table: &DeTable<'_> = parsed.get_ref();
    let mut span = None;
    for part in path {
        if let Some(DeValue::Array(entries)) = value {
            let entry = entries.get(part.parse::<usize>().ok()?)?;
            let DeValue::Table(inner) = entry.get_ref() else {
                return None;
            };
            table = inner;
            value = None;
            continue;
        }
        if let Some(DeValue::Table(inner)) = value {
            table = inner;
        }
        let (key, found) = table.iter().find(|(key, _)| key.get_ref() == part)?;
        span = Some(key.span());
        value = Some(found.get_ref());
    }
    span.map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
}

pub(super) fn check_keys(
    table: &toml::Table,
    origin: &str,
    text: &str,
) -> Result<(), SettingsError> {
    // The file's name and the key's line, where it can be found.
    let at = |path: &[&str]| match key_line(text, path) {
        Some(line) => format!("{origin} (line {line})"),
        None => origin.to_owned(),
    };
    for (section, value) in table {
        match (section.as_str(), value) {
            ("hooks", toml::Value::Array(hooks)) => {
                for (index, hook) in hooks.iter().enumerate() {
                    let toml::Value::Table(hook) = hook else {
                        return Err(err(format!(
                            "{origin}: 'hooks' entry {} must be a table ([[hooks]])",
                            index + 1
                        )));
                    };
                    for key in hook.keys() {
                        if !HOOK_KEYS.contains(&key.as_str()) {
                            return Err(unknown_key(
                                &at(&["hooks", &index.to_string(), key]),
                                &format!("hooks[{index}].{key}"),
                                key,
                                HOOK_KEYS,
                            ));
                        }
                    }
                }
            }
            (section, toml::Value::Table(keys)) => {
                for key in keys.keys() {
                    let full = format!("{section}.{key}");
                    if !KNOWN_KEYS.contains(&full.as_str()) {
                        return Err(unknown_key(&at(&[section, key]), &full, &full, KNOWN_KEYS));
                    }
                }
            }
            (key, _) => {
                if !KNOWN_KEYS.contains(&key) {
                    return Err(unknown_key(&at(&[key]), key, key, KNOWN_KEYS));
                }
            }
        }
    }
    Ok(())
}

pub(super) fn unknown_key(origin: &str, shown: &str, key: &str, known: &[&str]) -> SettingsError {
    let suggestion = known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), candidate))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, candidate)| format!("\n\ndid you mean '{candidate}'?"))
        .unwrap_or_default();
    err(format!("{origin}: unknown key '{shown}'{suggestion}"))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            current.push(
                (previous[j] + cost)
                    .min(previous[j + 1] + 1)
                    .min(current[j] + 1),
            );
        }
        previous = current;
    }
    previous[b.len()]
}

/// Turns a `config` error into one that names where the bad value came from.
pub(super) fn describe_config_error(
    error: config::ConfigError,
    origin: &str,
    overrides: &BTreeMap<String, (String, String)>,
) -> SettingsError {
    let mut text = error.to_string();
    // serde's wording for an unknown enum value is about Rust, not the config: say which
    // values the key accepts.
    const CHOICES: &[(&str, &str)] = &[
        ("firestore.stream_mode", "multiplexed, per-document"),
        (
            "firestore.auth",
            "service-account, application-default, none, firebase-anonymous",
        ),
        ("log.format", "text, json"),
        ("paymennt.environment", "test, live"),
    ];
    if let Some((_, rest)) = text.split_once("does not have variant constructor ")
        && let Some((value, key)) = rest.split_once(" for key `")
    {
        let key = key.trim_end_matches('`');
        let choices = CHOICES
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| *c)
            .unwrap_or("see config/paywatch.toml");
        text = format!(
            "'{key}' value '{}' is not one of: {choices}",
            crate::domain::printable(value)
        );
    }
    // `config` ends type errors with "for key `a.b`"; if an environment variable set that key,
    // name the variable rather than the file.
    let from = overrides
        .iter()
        .find(|(key, _)| text.contains(&format!("`{key}`")) || text.contains(&format!("'{key}'")))
        .map(|(_, (name, _))| format!("environment variable {name}"))
        .unwrap_or_else(|| origin.to_owned());
    err(format!("{from}: {text}"))
}

pub(super) fn line_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    format!(" (line {line})")
}
