//! `paywatch ledger copy`: moving an SQLite ledger into an empty PostgreSQL ledger.
//!
//! Owns: the command's arguments (the target URL, its password file and CA file), its exit codes
//! (a target that is not empty, or a setting the operator must fix: 2; the database away: 1)
//! and what it prints.
//! Must never: print the target's URL or password (only `host:port/database`), or copy into a
//! ledger that holds records (the ledger refuses; nothing is written).

use std::path::PathBuf;

use clap::Subcommand;

use super::UsageError;
use crate::ledger::postgres::{PgStore, Session};
use crate::ledger::{CopyError, copy_to_postgres};
use crate::settings::{LedgerSettings, Secret, Settings};

/// `paywatch ledger ...`.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Copy this installation's SQLite ledger ([ledger] path) into an empty PostgreSQL ledger:
    /// checkouts, their history, the hook outbox (event ids and order kept), resume tokens,
    /// listen refusals, the ticket counter and discovery's epoch and rounds, in one transaction.
    /// Stop the daemon first. A target that holds any record is refused (exit 2).
    Copy(CopyArgs),
}

/// Arguments of `paywatch ledger copy`.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The PostgreSQL ledger, `postgresql://user@host:port/database[?sslmode=...]` (better
    /// without a password: see --password-file).
    #[arg(
        long,
        value_name = "URL",
        env = "PAYWATCH_LEDGER_COPY_TO",
        hide_env_values = true
    )]
    pub to: String,
    /// A file holding the PostgreSQL password.
    #[arg(long, value_name = "PATH")]
    pub password_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for the server's certificate.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

/// Runs `paywatch ledger ...`.
///
/// # Errors
///
/// [`UsageError`] (exit 2) for a target that is not empty or a setting to fix; other failures
/// exit 1.
pub async fn run(settings: &Settings, command: &LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Copy(args) => copy(settings, args).await,
    }
}

async fn copy(settings: &Settings, args: &CopyArgs) -> anyhow::Result<()> {
    if !crate::ledger::postgres::is_postgres_url(&args.to) {
        return Err(UsageError(
            "--to must be a postgresql:// URL (the value is not shown: it may hold a password)"
                .to_owned(),
        )
        .into());
    }
    for (flag, path) in [
        ("--password-file", &args.password_file),
        ("--ca-file", &args.ca_file),
    ] {
        if let Some(path) = path
            && !path.is_file()
        {
            return Err(UsageError(format!("{flag} '{}' is not a file", path.display())).into());
        }
    }
    let target_settings = LedgerSettings {
        url: Some(Secret::new(args.to.clone())),
        password_file: args.password_file.clone(),
        ca_file: args.ca_file.clone(),
        ..LedgerSettings::default()
    };
    let store = PgStore::open(&target_settings, Session::Operator)
        .await
        .map_err(crate::ledger::postgres::PgError::into_exit_error)?;
    let counts = match copy_to_postgres(&settings.ledger.path, &store).await {
        Ok(counts) => counts,
        Err(error @ CopyError::NotEmpty { .. }) => {
            return Err(UsageError(error.to_string()).into());
        }
        Err(error) => return Err(error.into()),
    };
    println!(
        "copied {} into {}:",
        settings.ledger.path.display(),
        store.target().describe()
    );
    for (table, rows) in &counts.tables {
        println!("  {table}: {rows}");
    }
    println!("  verification tickets issued: {}", counts.last_ticket);
    Ok(())
}
