//! `paywatch check-config [--online]`: the operator's pre-flight before enabling the service.
//!
//! Offline it parses the config and checks that the files it names are readable, hook commands
//! exist and are executable, and the ledger directory is writable. With `--online` it also
//! makes one authenticated call to paymennt (naming an address that does not answer as
//! paymennt), asks paymennt about one watched checkout and reports when many look gone at once,
//! obtains one Firestore access token, and proves access to the checkout documents: for each
//! Firebase project among the tracked checkouts (or the one given with `--checkout-id`) it
//! opens a Listen on one document with the configured auth and reports CURRENT (in how many
//! ms) or the exact refusal with a next step for the auth mode. Nothing is written: the ledger
//! is opened read-only.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{UsageError, output};
use crate::daemon::listener_options;
use crate::domain::CheckoutId;
use crate::hooks::config::{HookSpec, HookTarget};
use crate::hooks::runner::DEFAULT_PATH;
use crate::ledger::Ledger;
use crate::paymennt::{Client, SearchQuery};
use crate::settings::Settings;
use crate::sources::firestore::{
    AccessFailure, FirestoreAuth, ListenerOptions, access_hint, prove_access,
};

/// Arguments of `paywatch check-config`.
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Also call paymennt once, obtain a Firestore access token, and open a Listen on one
    /// tracked checkout document per Firebase project.
    #[arg(long)]
    pub online: bool,
    /// With --online: prove Firestore access with this tracked checkout's document only.
    #[arg(long, value_name = "ID", requires = "online")]
    pub checkout_id: Option<String>,
}

/// How long the Listen of one access check may take.
const ACCESS_CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// One line of the report.
struct Check {
    ok: bool,
    what: String,
    /// Neither passed nor failed: nothing could be checked.
    skipped: bool,
    /// Passed, but worth the operator's attention (printed as `warn`).
    warning: bool,
}

/// A line of the report. Online checks quote what other hosts answered (a Firestore status
/// message, a Firebase Auth reason, a paymennt error), so every line is scrubbed of secrets
/// here, whatever built it.
fn check(ok: bool, what: impl Into<String>) -> Check {
    let what = what.into();
    Check {
        ok,
        what: crate::domain::scrub_secrets(&what).into_owned(),
        skipped: false,
        warning: false,
    }
}

fn warning(what: impl Into<String>) -> Check {
    Check {
        ok: true,
        what: what.into(),
        skipped: false,
        warning: true,
    }
}

/// The inline secrets a config file can hold, as `section.key`.
const INLINE_SECRETS: &[(&str, &str)] = &[
    ("paymennt", "api_key"),
    ("paymennt", "api_secret"),
    ("http", "token"),
    ("http", "webhook_hmac_key"),
];

/// Who besides the owner may read a file of this mode, if anyone.
fn readable_by_others(mode: u32) -> Option<&'static str> {
    match (mode & 0o040 != 0, mode & 0o004 != 0) {
        (true, true) => Some("group- and world-readable"),
        (false, true) => Some("world-readable"),
        (true, false) => Some("group-readable"),
        (false, false) => None,
    }
}

/// Warnings for files holding a secret that users other than the owner can read: the config
/// file when it holds an inline secret, and each secret file it names.
fn secret_file_warnings(settings: &Settings) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<(std::path::PathBuf, String)> = Vec::new();
    if let Some(origin) = &settings.origin {
        let inline: Vec<String> = std::fs::read_to_string(origin)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .map(|table| {
                INLINE_SECRETS
                    .iter()
                    .filter(|(section, key)| {
                        table
                            .get(*section)
                            .and_then(|value| value.get(*key))
                            .is_some()
                    })
                    .map(|(section, key)| format!("{section}.{key}"))
                    .collect()
            })
            .unwrap_or_default();
        if !inline.is_empty() {
            files.push((origin.clone(), format!("holds {}", inline.join(", "))));
        }
    }
    for (key, file) in [
        ("paymennt.api_key_file", &settings.paymennt.api_key_file),
        (
            "paymennt.api_secret_file",
            &settings.paymennt.api_secret_file,
        ),
        ("http.token_file", &settings.http.token_file),
        (
            "http.webhook_hmac_key_file",
            &settings.http.webhook_hmac_key_file,
        ),
        ("firestore.credentials", &settings.firestore.credentials),
    ] {
        if let Some(file) = file {
            files.push((file.clone(), format!("is {key}")));
        }
    }
    files
        .into_iter()
        .filter_map(|(file, what)| {
            let mode = std::fs::metadata(&file).ok()?.mode();
            let who = readable_by_others(mode)?;
            Some(format!(
                "'{}' {what} and is {who} (mode {:03o})\n\nmake it readable by its owner only \
                 (chmod 600), or move the secret to a systemd credential (LoadCredential=)",
                file.display(),
                mode & 0o777
            ))
        })
        .collect()
}

/// The `[firestore] auth` mode (its config spelling) that `auth` was built for.
fn auth_mode_name(auth: &FirestoreAuth) -> &'static str {
    match auth {
        FirestoreAuth::ServiceAccountFile(_) => "service-account",
        FirestoreAuth::ApplicationDefault => "application-default",
        FirestoreAuth::None { .. } => "none",
        FirestoreAuth::FirebaseAnonymous { .. } => "firebase-anonymous",
    }
}

/// Proves Firestore access for each project among the tracked checkouts (or for `only`):
/// returns the report lines and whether any access was refused or failed.
async fn access_checks(
    settings: &crate::settings::Settings,
    options: &ListenerOptions,
    only: Option<&CheckoutId>,
) -> Result<Vec<Check>, UsageError> {
    let path = &settings.ledger.path;
    if settings.ledger.url.is_none() && !path.exists() {
        if let Some(id) = only {
            return Err(UsageError(format!(
                "--checkout-id {id}: no ledger at '{}', so nothing is tracked; track it first \
                 (paywatch track --checkout-id {id})",
                path.display()
            )));
        }
        return Ok(vec![skipped(
            "firestore access not checked: no tracked checkout yet; track one, then run \
             check-config --online again",
        )]);
    }
    let documents = match read_ledger(settings).await {
        Ok(ledger) => ledger
            .probe_documents(only)
            .await
            .map_err(anyhow::Error::from),
        Err(error) => Err(error),
    }
    .map_err(|error| UsageError(format!("cannot read the tracked checkouts: {error:#}")))?;
    if documents.is_empty() {
        if let Some(id) = only {
            return Err(UsageError(format!(
                "--checkout-id {id}: not tracked in '{}'; track it first (paywatch track \
                 --checkout-id {id})",
                ledger_name(settings)
            )));
        }
        return Ok(vec![skipped(
            "firestore access not checked: no tracked checkout yet; track one, then run \
             check-config --online again",
        )]);
    }
    let mode = auth_mode_name(&options.auth);
    let mut checks = Vec::new();
    for (checkout_id, location) in documents {
        let location = match location.with_database(&settings.firestore.database) {
            Ok(location) => location,
            Err(error) => {
                checks.push(check(false, format!("firestore access: {error}")));
                continue;
            }
        };
        let document = location.document_name();
        let result = prove_access(
            &options.endpoint,
            &options.auth,
            options.ca_file.as_deref(),
            &location,
            ACCESS_CHECK_TIMEOUT,
        )
        .await;
        checks.push(match result {
            Ok(proof) => check(
                true,
                format!(
                    "firestore access with auth={mode}: Listen on checkout {checkout_id}'s \
                     document '{document}' was CURRENT in {} ms (document {})",
                    proof.elapsed.as_millis(),
                    if proof.exists { "exists" } else { "missing" }
                ),
            ),
            Err(AccessFailure::Refused { code, message }) => check(
                false,
                format!(
                    "firestore access refused for checkout {checkout_id}'s document \
                     '{document}': {code}: {message}\n{}",
                    access_hint(mode, code)
                ),
            ),
            Err(AccessFailure::Unreachable(error) | AccessFailure::NoAnswer(error)) => check(
                false,
                format!(
                    "firestore access not proven for checkout {checkout_id}'s document \
                     '{document}' at {}: {error}",
                    options.endpoint
                ),
            ),
        });
    }
    Ok(checks)
}

fn skipped(what: &str) -> Check {
    Check {
        ok: true,
        what: what.to_owned(),
        skipped: true,
        warning: false,
    }
}

/// Whether a new file can be created in `dir` (or the nearest existing ancestor, which the
/// ledger would create the rest under).
fn directory_writable(dir: &Path) -> Result<String, String> {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| format!("no existing parent of '{}'", dir.display()))?;
    }
    let probe = tempfile::Builder::new()
        .prefix(".paywatch-check-")
        .tempfile_in(existing)
        .map_err(|error| format!("'{}' is not writable: {error}", existing.display()))?;
    drop(probe);
    Ok(if existing == dir {
        format!("'{}' is writable", dir.display())
    } else {
        format!(
            "'{}' will be created under writable '{}'",
            dir.display(),
            existing.display()
        )
    })
}

/// Whether paymennt knows the checkouts the ledger watches: many that look gone at once (the
/// daemon's count), or one that paymennt says does not exist now, point at the configuration
/// (another environment or merchant), not at vanished checkouts.
async fn check_watched(client: &Client, settings: &crate::settings::Settings) -> Vec<Check> {
    let mut checks = Vec::new();
    let read = async {
        let ledger = read_ledger(settings).await?;
        Ok::<_, anyhow::Error>((ledger.looking_gone().await?, ledger.watch_set().await?))
    }
    .await;
    let (gone, watched) = match read {
        Ok(read) => read,
        Err(error) => return vec![check(false, format!("watched checkouts: {error:#}"))],
    };
    if gone.is_configuration_problem() {
        checks.push(check(
            false,
            format!(
                "{} of {} watched checkouts look gone: paymennt at {} said they do not exist\n\n\
                 that points at the configuration, not vanished checkouts: check [paymennt] base_url, environment and that the API key belongs to the merchant that created them",
                gone.checkouts,
                gone.watched,
                client.base_url()
            ),
        ));
    }
    let Some(sample) = watched.first() else {
        return checks;
    };
    // A ticket is only for ordering answers the ledger records; this one records nothing.
    let ticket = crate::domain::VerifyTicket::new(0);
    checks.push(match client.get_checkout(&sample.checkout_id, ticket).await {
        Ok(verified) => check(
            true,
            format!(
                "paymennt knows watched checkout {} ({})",
                verified.id(),
                crate::domain::printable(verified.status().as_str())
            ),
        ),
        Err(error) if error.is_not_found() => check(
            false,
            format!(
                "paymennt at {} says watched checkout {} does not exist: {error}\n\n\
                 check [paymennt] base_url, environment and that the API key belongs to the merchant that created it",
                client.base_url(),
                sample.checkout_id
            ),
        ),
        Err(error) => check(
            false,
            format!(
                "paymennt at {}: Get Checkout {}: {error}",
                client.base_url(),
                sample.checkout_id
            ),
        ),
    });
    checks
}

/// The SQLite ledger's checks: its directory is writable, its file (if any) readable.
fn sqlite_checks(ledger_path: &Path) -> Vec<Check> {
    let ledger_dir = ledger_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut checks = Vec::new();
    match directory_writable(ledger_dir) {
        Ok(text) => checks.push(check(true, format!("ledger directory {text}"))),
        Err(text) => checks.push(check(false, format!("ledger directory {text}\n      check [ledger] path, or the service's StateDirectory"))),
    }
    if ledger_path.exists() {
        let readable = std::fs::File::open(ledger_path);
        checks.push(check(
            readable.is_ok(),
            match readable {
                Ok(_) => format!("ledger '{}' exists and is readable", ledger_path.display()),
                Err(error) => format!(
                    "ledger '{}' cannot be opened: {error}",
                    ledger_path.display()
                ),
            },
        ));
    }

    checks
}

/// The PostgreSQL ledger's checks: it can be reached with the configured password and TLS,
/// its schema is one this paywatch knows (migrating it if older), and who holds the lease.
async fn postgres_checks(settings: &crate::settings::Settings) -> Vec<Check> {
    let store = match super::checkouts::open_postgres_store(settings).await {
        Ok(store) => store,
        Err(error) => return vec![check(false, format!("{error:#}"))],
    };
    let at = store.target().describe().to_owned();
    let mut checks = vec![check(
        true,
        format!(
            "ledger {at} (PostgreSQL) reached, schema version {}",
            crate::ledger::postgres::SCHEMA_VERSION
        ),
    )];
    checks.push(
        match crate::ledger::postgres::read_lease(store.pool(), store.target()).await {
            Ok(Some(lease)) if lease.live => check(
                true,
                format!(
                    "lease held by {} at epoch {}: that daemon is active",
                    lease.holder, lease.epoch
                ),
            ),
            Ok(Some(lease)) => warning(format!(
                "lease not held (last held by {} at epoch {}): no daemon is active on this ledger",
                lease.holder, lease.epoch
            )),
            Ok(None) => warning("lease never held: no daemon has been active on this ledger yet"),
            Err(error) => check(false, format!("lease: {error}")),
        },
    );
    checks
}

/// The ledger as messages name it: the SQLite file, or PostgreSQL's `host:port/database`.
fn ledger_name(settings: &crate::settings::Settings) -> String {
    match &settings.ledger.url {
        Some(url) => crate::ledger::postgres::Target::parse(url.expose(), None, None).map_or_else(
            |_| "the PostgreSQL ledger".to_owned(),
            |target| target.describe().to_owned(),
        ),
        None => settings.ledger.path.display().to_string(),
    }
}

/// Opens the ledger for the online checks: an SQLite file read-only (a daemon may be running
/// on it), PostgreSQL as an operator.
async fn read_ledger(settings: &crate::settings::Settings) -> anyhow::Result<Ledger> {
    if settings.ledger.url.is_some() {
        return super::checkouts::open_postgres_ledger(settings).await;
    }
    Ok(Ledger::open_read_only(&settings.ledger.path).await?)
}

/// `paywatch check-config`.
pub async fn run(config: Option<&Path>, args: &CheckConfigArgs) -> anyhow::Result<()> {
    let settings = Settings::load(config)?;
    let mut checks = vec![check(
        true,
        format!("config {} parsed", settings.origin_name()),
    )];

    let ledger_path = &settings.ledger.path;
    if settings.ledger.url.is_some() {
        checks.extend(postgres_checks(&settings).await);
    } else {
        checks.extend(sqlite_checks(ledger_path));
    }

    checks.extend(secret_file_warnings(&settings).into_iter().map(warning));

    let credentials = settings.paymennt.credentials();
    match &credentials {
        Ok(found) => checks.push(check(
            true,
            format!(
                "paymennt API key {} and secret {} found",
                found.key.hint(),
                found.secret.hint()
            ),
        )),
        Err(error) => checks.push(check(false, format!("paymennt credentials: {error}"))),
    }

    // Read-only: check-config may run as another user, and the daemon owns the identity file.
    let listener = listener_options(&settings).map(|mut options| {
        options.auth = options
            .auth
            .with_identity_file(settings.ledger.firebase_identity_path(), true);
        options
    });
    let firestore = match &listener {
        Ok(_) if !settings.firestore.enabled => {
            Ok("off ([firestore] enabled = false): no credentials needed".to_owned())
        }
        Ok(options) => {
            crate::sources::firestore::check_credentials(
                &options.endpoint,
                &options.auth,
                options.ca_file.as_deref(),
                false,
            )
            .await
        }
        Err(error) => Err(anyhow::anyhow!("{error:#}")),
    };
    checks.push(match &firestore {
        Ok(text) => check(true, format!("firestore {text}")),
        Err(error) => check(false, format!("firestore credentials: {error:#}")),
    });
    if let Some(key) = &settings.firestore.api_key {
        // Named by its end, so a paymennt key pasted here by mistake is seen at once.
        let same_as_paymennt = settings
            .paymennt
            .credentials()
            .is_ok_and(|found| found.key.expose() == key.expose());
        checks.push(if same_as_paymennt {
            check(
                false,
                format!(
                    "[firestore] api_key {} is paymennt's API key ([paymennt] api_key): the Firebase Web API key \
                     is another key, from paymennt's payment page or Firebase project",
                    key.hint()
                ),
            )
        } else {
            check(
                true,
                format!(
                    "Firebase Web API key {} loaded ([firestore] api_key, not paymennt's)",
                    key.hint()
                ),
            )
        });
    }

    if let Some(addr) = settings.http.listen {
        let loopback = addr.ip().is_loopback();
        checks.push(check(
            true,
            if loopback {
                format!("HTTP listener on {addr}")
            } else {
                format!("HTTP listener on {addr} (not loopback: put it behind TLS and a firewall)")
            },
        ));
        checks.push(match settings.http.token() {
            Ok(Some(token)) => check(
                true,
                format!("track endpoint on (bearer token {})", token.hint()),
            ),
            Ok(None) => check(
                true,
                "track endpoint off (no [http] token, token_file or credential paywatch-http-token)",
            ),
            Err(error) => check(false, format!("track endpoint: {error}")),
        });
        checks.push(match settings.http.webhook_hmac_key() {
            Ok(Some(_)) => check(
                true,
                format!(
                    "webhook signatures in {} are checked",
                    settings.http.webhook_signature_header
                ),
            ),
            Ok(None) => check(
                true,
                "webhook signatures are not checked (no [http] webhook_hmac_key); notifications are verified with Get Checkout anyway",
            ),
            Err(error) => check(false, format!("webhook key: {error}")),
        });
    } else if !settings.firestore.enabled {
        checks.push(check(
            false,
            "[firestore] enabled = false and no [http] listen: only the reconciler (and discovery) will notice changes\n      set [http] listen and register it with paywatch webhooks register",
        ));
    }

    // Resolved exactly as the daemon does: on the hook's own env.PATH when it sets one.
    let path_var = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    for hook in &settings.hooks {
        checks.push(match HookSpec::resolve(hook, Some(&path_var)) {
            Ok(spec) => check(
                true,
                match &spec.target {
                    HookTarget::Command(command) => {
                        format!("hook '{}' runs {}", hook.name, command.program.display())
                    }
                    // Never a secret, nor a hint of one: only how many sign.
                    HookTarget::Url(url) => format!(
                        "hook '{}' posts to {}, signed with {}",
                        hook.name,
                        crate::settings::shown_url(url.url.as_str()),
                        if url.key_count() > 1 {
                            "the secret and the previous one (a rotation)"
                        } else {
                            "its secret"
                        }
                    ),
                },
            ),
            Err(error) => check(false, error),
        });
    }

    checks.push(check(
        true,
        if settings.discovery.is_enabled(&settings.paymennt) {
            format!(
                "discovery is on: checkouts of type {} created anywhere are tracked, searched every {}",
                settings.discovery.types.join(", "),
                humantime::format_duration(settings.discovery.interval)
            )
        } else {
            "discovery is off: only checkouts given to paywatch (track, link create) are watched"
                .to_owned()
        },
    ));

    let offline_failures = checks.iter().filter(|c| !c.ok).count();
    let mut online_failures = 0;
    if args.online {
        match super::waiting::client(&settings.paymennt) {
            Ok(client) => {
                let started = Instant::now();
                let query = SearchQuery {
                    size: Some(1),
                    ..SearchQuery::default()
                };
                let result = client.search(&query).await;
                let ok = result.is_ok();
                online_failures += usize::from(!ok);
                checks.push(check(
                    ok,
                    match result {
                        Ok(_) => format!(
                            "paymennt answered an authenticated search at {} in {} ms",
                            client.base_url(),
                            started.elapsed().as_millis()
                        ),
                        Err(error) if error.is_configuration_problem() => format!(
                            "paymennt at {}: this address does not answer as paymennt's API: {error}",
                            client.base_url()
                        ),
                        Err(error) if error.refuses_credentials() => format!(
                            "paymennt at {} refuses the API credentials: {error}\n      \
                             check [paymennt] api_key and api_secret and [paymennt] environment \
                             (test keys work only against test, live keys only against live)",
                            client.base_url()
                        ),
                        // paymennt answered and refused the search itself: a key without that
                        // permission.
                        Err(error @ crate::paymennt::Error::Rejected { .. }) => format!(
                            "paymennt at {}: {error}\n      Search Checkouts is what discovery and reconcile sweeps use; \
                             without it discovery finds nothing and sweeps fall back to one Get Checkout per open checkout",
                            client.base_url()
                        ),
                        Err(error) => format!("paymennt at {}: {error}", client.base_url()),
                    },
                ));
                if ok && (settings.ledger.url.is_some() || ledger_path.exists()) {
                    let watched = check_watched(&client, &settings).await;
                    online_failures += watched.iter().filter(|c| !c.ok).count();
                    checks.extend(watched);
                }
            }
            Err(error) => {
                online_failures += 1;
                checks.push(check(false, format!("paymennt: not called: {error}")));
            }
        }
        if let Some(options) = listener
            .as_ref()
            .ok()
            .filter(|_| settings.firestore.enabled)
        {
            let result = crate::sources::firestore::check_credentials(
                &options.endpoint,
                &options.auth,
                options.ca_file.as_deref(),
                true,
            )
            .await;
            online_failures += usize::from(result.is_err());
            checks.push(match result {
                Ok(text) => check(true, format!("firestore {text}")),
                Err(error) => check(false, format!("firestore: {error:#}")),
            });
            let only = args
                .checkout_id
                .as_deref()
                .map(|id| {
                    id.parse::<CheckoutId>()
                        .map_err(|e| UsageError(format!("--checkout-id: {e}")))
                })
                .transpose()?;
            let access = access_checks(&settings, options, only.as_ref()).await?;
            online_failures += access.iter().filter(|c| !c.ok).count();
            checks.extend(access);
        }
    }

    let report: Vec<String> = checks
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                match (c.ok, c.skipped, c.warning) {
                    (_, true, _) => "skip",
                    (true, false, true) => "warn",
                    (true, false, false) => "ok  ",
                    (false, false, _) => "FAIL",
                },
                c.what.replace("\n\n", "; ").replace('\n', " ")
            )
        })
        .collect();
    output::write_out(&report.join("\n"))?;
    if offline_failures > 0 {
        return Err(UsageError(format!("{offline_failures} configuration check(s) failed")).into());
    }
    if online_failures > 0 {
        anyhow::bail!("{online_failures} online check(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Issue 21: a config file holding an inline secret is reported when others can read it.
    #[test]
    fn a_readable_file_holding_a_secret_is_warned_about() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("paywatch.toml");
        let secret_file = dir.path().join("hmac");
        std::fs::write(&secret_file, "k").expect("write");
        std::fs::write(
            &config,
            format!(
                "[ledger]\npath = \"{}\"\n[paymennt]\napi_key = \"pk_1\"\napi_secret = \"sk_1\"\n\
                 [http]\nwebhook_hmac_key_file = \"{}\"\n",
                dir.path().join("l.db").display(),
                secret_file.display()
            ),
        )
        .expect("write");
        let settings = Settings::load_with_env(Some(&config), Vec::new()).expect("loads");

        chmod(&config, 0o644);
        chmod(&secret_file, 0o600);
        let warnings = secret_file_warnings(&settings);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(&format!(
                "'{}' holds paymennt.api_key, paymennt.api_secret and is group- and world-readable (mode 644)",
                config.display()
            )),
            "{warnings:?}"
        );
        assert!(!warnings[0].contains("sk_1"), "never the secret itself");

        chmod(&config, 0o640);
        chmod(&secret_file, 0o604);
        let warnings = secret_file_warnings(&settings);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("is group-readable (mode 640)"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("is http.webhook_hmac_key_file and is world-readable (mode 604)"),
            "{warnings:?}"
        );

        chmod(&config, 0o600);
        chmod(&secret_file, 0o600);
        assert!(secret_file_warnings(&settings).is_empty());
    }

    #[test]
    fn a_readable_config_without_inline_secrets_is_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("paywatch.toml");
        std::fs::write(
            &config,
            format!(
                "[ledger]\npath = \"{}\"\n# api_secret = \"commented out\"\n",
                dir.path().join("l.db").display()
            ),
        )
        .expect("write");
        chmod(&config, 0o644);
        let settings = Settings::load_with_env(Some(&config), Vec::new()).expect("loads");
        assert!(secret_file_warnings(&settings).is_empty());
    }
}
