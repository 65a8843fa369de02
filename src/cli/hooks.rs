//! `hooks list`, `hooks retry`, `hooks replay`, `hooks test`: the hook outbox from the command
//! line.
//!
//! Owns: reading and reviving deliveries in the ledger, queueing replays, and rehearsing a hook
//! with a synthetic event. The ledger is the only channel to a running daemon: its dispatcher
//! looks for due deliveries every second, so a retry or replay starts within about a second
//! (or at the next start if no daemon runs).
//! Must never: run a hook for a real delivery (only the daemon's dispatcher does, so a delivery
//! is never run twice at once), or mark anything delivered.

use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{UsageError, checkouts, output};
use crate::domain::{CheckoutStatus, printable};
use crate::hooks::runner::{self, Ending};
use crate::hooks::{HookEvent, HookSpec, HookTarget, post};
use crate::ledger::{DeliveryFilter, DeliveryState, Ledger};
use crate::settings::{Settings, SettingsError};

/// `paywatch hooks ...`.
#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// List hook deliveries, newest first.
    List(ListArgs),
    /// Deliver a dead (or pending) delivery again now, with the same event id; its attempt
    /// count starts again.
    Retry(RetryArgs),
    /// Queue new deliveries (new event ids) of status changes verified since a time, for a
    /// merchant whose system lost data.
    Replay(ReplayArgs),
    /// Run a hook once with a realistic synthetic event marked as a test (`"test": true`,
    /// PAYWATCH_TEST=1), to check a script before going live; a URL hook gets the signed
    /// POST, and the answer's status and time are printed. The ledger is not touched.
    Test(TestArgs),
}

/// Arguments of `paywatch hooks list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only deliveries in this state.
    #[arg(long, value_name = "STATE", value_parser = ["pending", "running", "delivered", "dead"])]
    pub state: Option<String>,
    /// Only this checkout's deliveries.
    #[arg(long, value_name = "ID")]
    pub checkout: Option<String>,
    /// At most this many (the newest); 0 for all.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Print JSON (an array of deliveries).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `paywatch hooks retry`.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct RetryArgs {
    /// The delivery's event id (`evt_...`, from `hooks list` or the log).
    #[arg(value_name = "EVENT_ID")]
    pub event_id: Option<String>,
    /// Every dead delivery.
    #[arg(long)]
    pub all_dead: bool,
}

/// Arguments of `paywatch hooks replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Status changes verified at or after this time: RFC 3339 (2024-05-01T10:00:00Z), a date
    /// (2024-05-01, UTC midnight) or a duration back from now (2h, 3days).
    #[arg(long, value_name = "TIME")]
    pub since: String,
    /// Only changes to this status (PAID, REFUNDED, ...).
    #[arg(long, value_name = "S")]
    pub status: Option<String>,
    /// Only this hook (repeatable); default every configured hook. Each hook still gets only
    /// the statuses it is configured for.
    #[arg(long = "hook", value_name = "NAME")]
    pub hooks: Vec<String>,
    /// Also the statuses discovery imported as baselines (reached before paywatch could see
    /// them; recorded with source `discovery-import` and never delivered): for a merchant who
    /// does want hooks told of payments made before paywatch was installed.
    #[arg(long)]
    pub include_imported: bool,
    /// Print the queued event ids as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `paywatch hooks test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The hook's configured name.
    pub name: String,
    /// The status of the synthetic event.
    #[arg(long, value_name = "S", default_value = "PAID")]
    pub status: String,
}

/// Runs `paywatch hooks ...`.
///
/// # Errors
///
/// Usage errors (unknown hook, bad time or status, an unknown event id) exit 2; a failed test
/// run or a ledger failure exits 1.
pub async fn run(settings: &Settings, command: &HooksCommand) -> anyhow::Result<()> {
    match command {
        HooksCommand::List(args) => list(settings, args).await,
        HooksCommand::Retry(args) => {
            let ledger = checkouts::open_existing_ledger(settings).await?;
            output::write_out(&retry(&ledger, args).await?)
        }
        HooksCommand::Replay(args) => {
            let ledger = checkouts::open_existing_ledger(settings).await?;
            let report = replay(&ledger, settings, args, Utc::now()).await?;
            if args.json {
                output::json(&report)
            } else {
                output::write_out(&report.describe())
            }
        }
        HooksCommand::Test(args) => test(settings, args).await,
    }
}

async fn list(settings: &Settings, args: &ListArgs) -> anyhow::Result<()> {
    let ledger = checkouts::open_existing_ledger(settings).await?;
    let deliveries = ledger
        .deliveries(&DeliveryFilter {
            state: args.state.as_deref().and_then(DeliveryState::parse),
            checkout_id: args.checkout.clone(),
            limit: (args.limit > 0).then_some(args.limit),
        })
        .await?;
    if args.json {
        output::json(&deliveries)
    } else {
        output::write_out(&output::delivery_table(&deliveries))
    }
}

/// `hooks retry`: revives and returns what to print.
async fn retry(ledger: &Ledger, args: &RetryArgs) -> anyhow::Result<String> {
    let Some(event_id) = &args.event_id else {
        let count = ledger.retry_dead_deliveries().await?;
        return Ok(if count == 0 {
            "no dead deliveries".to_owned()
        } else {
            format!(
                "queued {count} dead deliver{} again; a running paywatch starts them within a second",
                if count == 1 { "y" } else { "ies" }
            )
        });
    };
    let event = printable(event_id);
    let Some(delivery) = ledger.delivery(event_id).await? else {
        // An id the ledger does not have is an input error, as everywhere (exit 2).
        return Err(UsageError(format!(
            "no hook delivery with event id '{event}'\n\nlist them with: paywatch hooks list"
        ))
        .into());
    };
    match delivery.state {
        DeliveryState::Delivered => anyhow::bail!(
            "event '{event}' was already delivered{}\n\nto send past status changes again, use: paywatch hooks replay --since TIME --hook {}",
            delivery
                .delivered_at
                .as_deref()
                .map(|at| format!(" at {at}"))
                .unwrap_or_default(),
            delivery.hook
        ),
        DeliveryState::Running => anyhow::bail!(
            "event '{event}' is running now; if it fails it is retried by itself\n\nsee its outcome with: paywatch hooks list --checkout {}",
            delivery.checkout_id
        ),
        DeliveryState::Pending | DeliveryState::Dead => {}
    }
    if !ledger.retry_delivery(event_id).await? {
        anyhow::bail!(
            "event '{event}' changed while being retried (a daemon just ran it)\n\nsee it with: paywatch hooks list --checkout {}",
            delivery.checkout_id
        );
    }
    Ok(format!(
        "queued {} again (hook {}, checkout {}, {}); a running paywatch starts it within a second",
        delivery.event_id, delivery.hook, delivery.checkout_id, delivery.status
    ))
}

/// What `hooks replay` queued.
#[derive(Debug, Serialize)]
struct ReplayReport {
    /// The time the replay started from, RFC 3339.
    since: String,
    /// The new deliveries' event ids.
    queued: Vec<String>,
    /// The hooks replayed to.
    hooks: Vec<String>,
}

impl ReplayReport {
    fn describe(&self) -> String {
        if self.queued.is_empty() {
            format!(
                "no verified status change since {} matches; nothing queued",
                self.since
            )
        } else {
            format!(
                "queued {} deliver{} of status changes since {} (hooks: {}); a running paywatch starts them within a second",
                self.queued.len(),
                if self.queued.len() == 1 { "y" } else { "ies" },
                self.since,
                self.hooks.join(", ")
            )
        }
    }
}

/// `hooks replay`: queues new deliveries.
async fn replay(
    ledger: &Ledger,
    settings: &Settings,
    args: &ReplayArgs,
    now: DateTime<Utc>,
) -> anyhow::Result<ReplayReport> {
    let since = parse_since(&args.since, now)?;
    let status = args.status.as_deref().map(parse_status).transpose()?;
    if settings.hooks.is_empty() {
        return Err(UsageError(format!(
            "no hooks are configured in {}\n\nadd a [[hooks]] table, then replay",
            settings.origin_name()
        ))
        .into());
    }
    for name in &args.hooks {
        if settings.hook(name).is_none() {
            return Err(unknown_hook(settings, name).into());
        }
    }
    let hooks: Vec<(String, Vec<String>)> = settings
        .hooks
        .iter()
        .filter(|hook| args.hooks.is_empty() || args.hooks.contains(&hook.name))
        .map(|hook| {
            let statuses = hook
                .status_filter()
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect();
            (hook.name.clone(), statuses)
        })
        .collect();
    let queued = ledger
        .replay_deliveries(
            since,
            status.as_ref().map(CheckoutStatus::as_str),
            &hooks,
            args.include_imported,
        )
        .await?;
    Ok(ReplayReport {
        since: crate::ledger::timestamp(since),
        queued,
        hooks: hooks.into_iter().map(|(name, _)| name).collect(),
    })
}

/// `--since`: RFC 3339, a date (UTC midnight), or a duration back from `now`.
fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, UsageError> {
    let trimmed = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(trimmed) {
        return Ok(time.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(trimmed, "%Y-%m-%d")
        && let Some(midnight) = date.and_hms_opt(0, 0, 0)
    {
        return Ok(midnight.and_utc());
    }
    let relative = trimmed.strip_suffix(" ago").unwrap_or(trimmed);
    if let Ok(duration) = humantime::parse_duration(relative)
        && let Ok(duration) = chrono::Duration::from_std(duration)
        && let Some(time) = now.checked_sub_signed(duration)
    {
        return Ok(time);
    }
    Err(UsageError(format!(
        "--since '{}' is not a time\n\ngive an RFC 3339 time (2024-05-01T10:00:00Z), a date (2024-05-01, UTC) or a duration back from now (2h, 3days)",
        printable(text)
    )))
}

fn parse_status(text: &str) -> Result<CheckoutStatus, UsageError> {
    match CheckoutStatus::parse(text) {
        CheckoutStatus::Unknown(_) => Err(UsageError(format!(
            "--status '{}' is not a checkout status\n\nknown statuses: {}",
            printable(text),
            known_statuses()
        ))),
        status => Ok(status),
    }
}

fn known_statuses() -> String {
    CheckoutStatus::KNOWN
        .iter()
        .map(CheckoutStatus::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn unknown_hook(settings: &Settings, name: &str) -> UsageError {
    let names: Vec<&str> = settings.hooks.iter().map(|h| h.name.as_str()).collect();
    let known = if names.is_empty() {
        format!("no hooks are configured in {}", settings.origin_name())
    } else {
        format!(
            "hooks configured in {}: {}",
            settings.origin_name(),
            names.join(", ")
        )
    };
    UsageError(format!("no hook named '{}'\n\n{known}", printable(name)))
}

/// `hooks test`: runs the hook once with a synthetic event (or POSTs it to a URL hook); fails
/// unless it exits 0 (or the endpoint answers 2xx).
async fn test(settings: &Settings, args: &TestArgs) -> anyhow::Result<()> {
    let status = parse_status(&args.status)?;
    let hook = settings
        .hook(&args.name)
        .ok_or_else(|| unknown_hook(settings, &args.name))?;
    let spec = HookSpec::resolve(hook, std::env::var_os("PATH").as_deref())
        .map_err(|message| SettingsError(format!("{}: {message}", settings.origin_name())))?;
    if !hook.statuses.is_empty() && !hook.fires_on(&status) {
        tracing::warn!(
            hook = %hook.name,
            status = %status,
            "this hook is not configured for this status; real deliveries of it would not happen"
        );
    }
    let event = HookEvent::synthetic(&hook.name, status);
    let stop = CancellationToken::new();
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.cancel();
            }
        })
    };
    let outcome = match &spec.target {
        HookTarget::Command(command) => runner::run(command, &event, &stop).await,
        HookTarget::Url(url) => post::deliver(url, &event, &stop).await,
    };
    ctrl_c.abort();
    output::write_out(&test_report(&spec, &event, &outcome))?;
    if outcome.delivered() {
        return Ok(());
    }
    let consequence = match (&outcome.ending, outcome.exit_code()) {
        (Ending::Stopped(_) | Ending::Interrupted(_), _) => "",
        (_, Some(code)) if spec.policy.permanent_exit_codes.contains(&code) => {
            " (a permanent exit code: a real delivery would be dead at once)"
        }
        (Ending::Answered(answer), _) if answer.is_permanent() => {
            " (a permanent answer: a real delivery would be dead at once)"
        }
        _ => " (a real delivery would be retried)",
    };
    anyhow::bail!(
        "hook '{}' did not take the test event: {}{consequence}",
        hook.name,
        outcome.describe()
    )
}

fn test_report(spec: &HookSpec, event: &HookEvent, outcome: &runner::HookOutcome) -> String {
    let what = match &spec.target {
        HookTarget::Command(command) => {
            let mut argv = vec![command.program.display().to_string()];
            argv.extend(command.args.iter().map(|arg| printable(arg)));
            format!("command  {}", argv.join(" "))
        }
        HookTarget::Url(url) => format!(
            "url      POST {}",
            crate::settings::shown_url(url.url.as_str())
        ),
    };
    let verdict = if outcome.delivered() {
        "delivered"
    } else {
        "NOT delivered"
    };
    let mut lines = vec![
        format!("hook     {}", spec.name()),
        what,
        format!(
            "event    {} (test) {} -> {}, order {}",
            event.event_id,
            event
                .previous_status
                .as_ref()
                .map(CheckoutStatus::as_str)
                .unwrap_or("-"),
            event.status,
            event.order_id.as_deref().unwrap_or("-")
        ),
        format!(
            "result   {verdict}: {} after {} ms",
            outcome.describe(),
            outcome.duration.as_millis()
        ),
    ];
    if let Ending::Answered(answer) = &outcome.ending {
        // A URL hook has no output; its answer's start is what the endpoint said.
        lines.push(format!("status   {}", answer.status));
        if answer.excerpt.is_empty() {
            lines.push("answer   (empty)".to_owned());
        } else {
            lines.push(format!("answer   {}", answer.excerpt));
        }
        return lines.join("\n");
    }
    if matches!(spec.target, HookTarget::Url(_)) {
        return lines.join("\n");
    }
    for (name, tail) in [
        ("stdout", &outcome.stdout_tail),
        ("stderr", &outcome.stderr_tail),
    ] {
        if tail.is_empty() {
            lines.push(format!("{name}   (empty)"));
        } else {
            lines.push(format!("{name}:"));
            lines.extend(tail.trim_end().lines().map(|line| format!("  {line}")));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests;
