//! `paywatch check-config [--online]`: the operator's pre-flight before enabling the service.
//!
//! Offline it parses the config and checks that the files it names are readable, hook commands
//! exist and are executable, and the ledger directory is writable. With `--online` it also
//! makes one authenticated call to paymennt (naming an address that does not answer as
//! paymennt), asks paymennt about one watched checkout and reports when many look gone at once,
//! and obtains one Firestore access token.

use std::path::Path;
use std::time::Instant;

use super::{UsageError, output};
use crate::daemon::listener_options;
use crate::hooks::config::HookSpec;
use crate::hooks::runner::DEFAULT_PATH;
use crate::ledger::Ledger;
use crate::paymennt::{Client, SearchQuery};
use crate::settings::Settings;

/// Arguments of `paywatch check-config`.
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Also call paymennt once and obtain a Firestore access token.
    #[arg(long)]
    pub online: bool,
}

/// One line of the report.
struct Check {
    ok: bool,
    what: String,
}

fn check(ok: bool, what: impl Into<String>) -> Check {
    Check {
        ok,
        what: what.into(),
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
async fn check_watched(client: &Client, ledger_path: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let path = ledger_path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let ledger = Ledger::open_read_only(&path)?;
        Ok::<_, crate::ledger::LedgerError>((ledger.looking_gone()?, ledger.watch_set()?))
    })
    .await;
    let (gone, watched) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => return vec![check(false, format!("watched checkouts: {error}"))],
        Err(error) => return vec![check(false, format!("watched checkouts: {error}"))],
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

/// `paywatch check-config`.
pub async fn run(config: Option<&Path>, args: &CheckConfigArgs) -> anyhow::Result<()> {
    let settings = Settings::load(config)?;
    let mut checks = vec![check(
        true,
        format!("config {} parsed", settings.origin_name()),
    )];

    let ledger_path = &settings.ledger.path;
    let ledger_dir = ledger_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
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

    let listener = listener_options(&settings);
    let firestore = match &listener {
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

    // Resolved exactly as the daemon does: on the hook's own env.PATH when it sets one.
    let path_var = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    for hook in &settings.hooks {
        checks.push(match HookSpec::resolve(hook, Some(&path_var)) {
            Ok(spec) => check(
                true,
                format!(
                    "hook '{}' runs {}",
                    hook.name,
                    spec.command.program.display()
                ),
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
        match Client::from_settings(&settings.paymennt) {
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
                        Err(error) => format!(
                            "paymennt at {}: {error}\n\nSearch Checkouts is what discovery and reconcile sweeps use; \
                             without it discovery finds nothing and sweeps fall back to one Get Checkout per open checkout",
                            client.base_url()
                        ),
                    },
                ));
                if ok && ledger_path.exists() {
                    let watched = check_watched(&client, ledger_path).await;
                    online_failures += watched.iter().filter(|c| !c.ok).count();
                    checks.extend(watched);
                }
            }
            Err(error) => {
                online_failures += 1;
                checks.push(check(false, format!("paymennt: not called: {error}")));
            }
        }
        if let Ok(options) = &listener {
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
        }
    }

    let report: Vec<String> = checks
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                if c.ok { "ok  " } else { "FAIL" },
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
