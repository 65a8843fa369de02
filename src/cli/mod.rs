//! The command line: argument parsing and one `run` per subcommand.
//!
//! Owns: everything the user types and everything printed to stdout.
//! Must never: choose the process exit code (main does, from [`exit_code`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// An error in what the user gave us (arguments, config, input files): exit code 2.
///
/// Everything else that fails is a runtime failure: exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error: 2 if any cause in its chain is a usage or config error, else 1.
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    let usage = error.chain().any(|cause| {
        cause.is::<UsageError>() || cause.is::<crate::settings::SettingsError>()
    });
    if usage { ExitCode::from(2) } else { ExitCode::from(1) }
}

/// paywatch: watch paymennt payment links and act on verified payments.
#[derive(Debug, Parser)]
#[command(name = "paywatch", version, about, long_about = None)]
pub struct Cli {
    /// Config file (default /etc/paywatch/paywatch.toml).
    #[arg(long, global = true, env = "PAYWATCH_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local stand-in for paymennt's API and Firestore (or drive a running one).
    Sandbox(sandbox::SandboxArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sandbox(args) => sandbox::run(args).await,
    }
}

pub mod sandbox;
