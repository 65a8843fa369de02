//! The command line: argument parsing and one `run` per subcommand.
//!
//! Owns: everything the user types and everything printed to stdout.
//! Must never: choose the process exit code (main does, from [`exit_code`]).
#![allow(clippy::print_stdout)]

mod check_config;
pub mod checkouts;
mod daemon;
mod generate;
mod hooks;
mod ledger;
mod output;
mod sandbox;
mod waiting;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::settings::{LogFormat, Settings};

/// An error in what the user gave us (arguments, config, input files): exit code 2.
///
/// Everything else that fails is a runtime failure: exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A call that creates something at paymennt (a payment link, a webhook) may or may not have
/// done so, and looking for the result found nothing: exit code [`EXIT_OUTCOME_UNKNOWN`]. The
/// message names what to check at paymennt; the call is never sent a second time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OutcomeUnknown(pub String);

/// The exit code of [`OutcomeUnknown`]: check paymennt before doing it again.
pub const EXIT_OUTCOME_UNKNOWN: u8 = 3;

/// The exit codes, as `--help` shows them (the README's table says the same).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  runtime failure (paymennt unreachable or refusing a request, --timeout passed, ledger
     error, ...)
  2  usage or input error (bad arguments, bad config, malformed input, an id that names nothing
     paywatch holds); nothing was changed
  3  outcome unknown: `link create` or `webhooks register` may have created the link or webhook
     at paymennt, and looking for it found nothing; check paymennt for the order and requestId
     (or address) named in the message before trying again";

/// What `link create --help` adds about a lost answer.
const LINK_CREATE_HELP: &str = "\
The create is sent once (again only if no connection was made, or on paymennt's 429 with
Retry-After). If its answer is lost (a timeout, a reset, a 5xx), paywatch looks for the link
at paymennt by order id and requestId: found, it is printed and tracked (exit 0, logged as
recovered); not found, the outcome is unknown: exit 3, naming the order and requestId to check.";

/// Exit code for an error: 3 if the outcome of a create is unknown ([`OutcomeUnknown`]), 2 if
/// any cause in its chain is a usage or config error, else 1.
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    if error.chain().any(|cause| cause.is::<OutcomeUnknown>()) {
        return ExitCode::from(EXIT_OUTCOME_UNKNOWN);
    }
    let usage = error
        .chain()
        .any(|cause| cause.is::<UsageError>() || cause.is::<crate::settings::SettingsError>());
    if usage {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

/// paywatch: watch paymennt payment links and act on verified payments.
#[derive(Debug, Parser)]
#[command(name = "paywatch", version, about, long_about = None, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Config file (default /etc/paywatch/paywatch.toml, if it exists).
    #[arg(long, global = true, env = "PAYWATCH_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log format (overrides `format` in the config's `[log]` section).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    /// How long a command that calls paymennt (link create, track --checkout-id, check-config
    /// --online, webhooks) waits for it in all, retries included, from 1s to 1h. Past it the
    /// command ends with exit 1, naming paymennt's address (link create: exit 3, the link may
    /// exist). Each retry is told on stderr.
    #[arg(long, global = true, value_name = "DURATION", default_value = waiting::DEFAULT_TIMEOUT, value_parser = waiting::parse_timeout)]
    pub timeout: std::time::Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once per process: the size of the sandbox's many options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch checkouts, verify changes, record them, run hooks.
    Run,
    /// Show paywatch at work: a sandbox, a daemon and scripted payments (no config needed).
    Demo(daemon::DemoArgs),
    /// Create payment links.
    #[command(subcommand)]
    Link(LinkCommand),
    /// Start watching a checkout: from a create-link response, or by id.
    Track(checkouts::TrackArgs),
    /// Show one checkout.
    Status(checkouts::StatusArgs),
    /// List checkouts.
    List(checkouts::ListArgs),
    /// Show a checkout's verified status changes and hook deliveries.
    Events(checkouts::EventsArgs),
    /// Check the config, credentials and hook commands (and, with --online, paymennt and Firestore).
    CheckConfig(check_config::CheckConfigArgs),
    /// Run a local stand-in for paymennt's API and Firestore (or drive a running one).
    Sandbox(sandbox::SandboxArgs),
    /// Hook deliveries: list, retry, replay, and test a hook before going live.
    #[command(subcommand)]
    Hooks(hooks::HooksCommand),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(generate::CompletionsArgs),
    /// Write the man pages into a directory (used when packaging).
    #[command(hide = true)]
    Man(generate::ManArgs),
    /// The ledger itself: copy an SQLite ledger into an empty PostgreSQL one.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// paymennt webhooks: register paywatch's address, list, test, disable.
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCommand),
    /// The demo's hook (used by `paywatch demo`).
    #[command(hide = true)]
    DemoHook(daemon::DemoHookArgs),
}

/// `paywatch link ...`.
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Create a payment link, record it, print its payment page URL.
    #[command(after_help = LINK_CREATE_HELP)]
    Create(Box<checkouts::LinkCreateArgs>),
}

fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    Ok(Settings::load(cli.config.as_deref())?)
}

/// Logging for short commands: warnings only unless RUST_LOG says otherwise.
fn quiet_logging(cli: &Cli) {
    crate::logging::init("warn", cli.log_format.unwrap_or(LogFormat::Text));
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Sandbox(_)
        | Command::Run
        | Command::Demo(_)
        | Command::Completions(_)
        | Command::Man(_) => {}
        _ => quiet_logging(&cli),
    }
    match cli.command {
        Command::Run => {
            let settings = load_settings(&cli)?;
            let format = cli.log_format.unwrap_or(settings.log.format);
            let log = crate::logging::init(&settings.log.level, format);
            daemon::run(settings, log).await
        }
        Command::Demo(ref args) => {
            daemon::demo(args, cli.log_format.unwrap_or(LogFormat::Text)).await
        }
        Command::DemoHook(ref args) => daemon::demo_hook(args),
        Command::Completions(ref args) => generate::print_completions(args),
        Command::Man(ref args) => generate::man(args),
        Command::CheckConfig(ref args) => {
            let deadline = waiting::Deadline::after(cli.timeout);
            match deadline
                .run(check_config::run(cli.config.as_deref(), args))
                .await
            {
                Some(result) => result,
                None => {
                    let base_url = Settings::load(cli.config.as_deref())
                        .ok()
                        .map(|settings| settings.paymennt.base_url());
                    Err(deadline.passed(base_url.as_deref()))
                }
            }
        }
        Command::Link(LinkCommand::Create(ref args)) => {
            let deadline = waiting::Deadline::after(cli.timeout);
            checkouts::link_create(&load_settings(&cli)?, args, deadline).await
        }
        Command::Track(ref args) => {
            let deadline = waiting::Deadline::after(cli.timeout);
            let settings = load_settings(&cli)?;
            match deadline.run(checkouts::track(&settings, args)).await {
                Some(result) => result,
                None => Err(deadline.passed(Some(&settings.paymennt.base_url()))),
            }
        }
        Command::Status(ref args) => checkouts::status(&load_settings(&cli)?, args).await,
        Command::List(ref args) => checkouts::list(&load_settings(&cli)?, args).await,
        Command::Events(ref args) => checkouts::events(&load_settings(&cli)?, args).await,
        Command::Sandbox(args) => {
            sandbox::run(args, cli.log_format.unwrap_or(LogFormat::Text)).await
        }
        Command::Hooks(ref command) => hooks::run(&load_settings(&cli)?, command).await,
        Command::Ledger(ref command) => ledger::run(&load_settings(&cli)?, command).await,
        Command::Webhooks(ref command) => {
            let deadline = waiting::Deadline::after(cli.timeout);
            webhooks::run(&load_settings(&cli)?, command, deadline).await
        }
    }
}
