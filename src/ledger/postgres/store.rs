//! Opening a PostgreSQL ledger from `[ledger]`: the target, the pool, the migrations.
//!
//! Owns: [`PgStore`], the handle the ledger's operations will run on (a pool and the target for
//! messages), and how opening fails (which failures are the operator's settings, exit 2, and
//! which are the database being away, exit 1).
//! Must never: show the URL or the password (errors name `host:port/database` and the key).

use deadpool_postgres::Pool;

use super::{Lease, PgError, Role, Session, Target, migrate};
use crate::settings::{HaSettings, LedgerSettings};

/// Pooled connections beyond this are not needed: the daemon's writes are short transactions.
const POOL_SIZE: usize = 16;

/// An open, migrated PostgreSQL ledger.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: Pool,
    target: Target,
    /// A daemon's role, from its lease keeper: its writes are fenced at the role's epoch and
    /// refused while standing by. `None` for an operator's command.
    role: Option<tokio::sync::watch::Receiver<Role>>,
}

impl PgStore {
    /// Opens the ledger `[ledger] url` names for `session`: parses the URL with the password
    /// (`password_file` or the credential) and `ca_file`, connects and migrates.
    ///
    /// # Errors
    ///
    /// [`PgError::Settings`] (a bad URL, password file or CA file, naming the key),
    /// [`PgError::Refused`] (password or TLS refused), [`PgError::NewerSchema`],
    /// [`PgError::Unreachable`]; see [`PgError::exit_code`].
    pub async fn open(ledger: &LedgerSettings, session: Session) -> Result<PgStore, PgError> {
        let Some(url) = &ledger.url else {
            return Err(PgError::Settings(
                "'ledger.url' is not set: this ledger is an SQLite file".to_owned(),
            ));
        };
        let password = ledger
            .password()
            .map_err(|error| PgError::Settings(error.to_string()))?;
        let target = Target::parse(url.expose(), password.as_ref(), ledger.ca_file.as_deref())
            .map_err(|problem| PgError::Settings(format!("'ledger.url' {problem}")))?;
        let pool = target.pool(session, POOL_SIZE)?;
        migrate(&pool, &target).await?;
        Ok(PgStore {
            pool,
            target,
            role: None,
        })
    }

    /// This store for a daemon whose lease keeper publishes `role`: every write from now on is
    /// fenced at the role's epoch.
    pub fn with_role(mut self, role: tokio::sync::watch::Receiver<Role>) -> PgStore {
        self.role = Some(role);
        self
    }

    /// The daemon's role, if this is a daemon's store.
    pub fn role(&self) -> Option<&tokio::sync::watch::Receiver<Role>> {
        self.role.as_ref()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Where the ledger is, for messages.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// This process's side of the lease, with `[ha] lease`.
    pub fn lease(&self, ha: &HaSettings) -> Lease {
        Lease::new(
            self.pool.clone(),
            self.target.clone(),
            Lease::instance_name(),
            ha.lease,
        )
    }
}

impl PgError {
    /// The process's exit code for this failure at start: 2 for what the operator's settings
    /// must fix (the key is named), 1 for the database being away or failing.
    pub fn exit_code(&self) -> u8 {
        match self {
            PgError::Settings(_) | PgError::Refused { .. } | PgError::NewerSchema { .. } => 2,
            PgError::Unreachable { .. } | PgError::Fenced { .. } | PgError::Database { .. } => 1,
        }
    }

    /// This failure as a command or the daemon reports it at start: a
    /// [`SettingsError`](crate::settings::SettingsError) (exit 2) for what the operator's
    /// settings must fix, itself (exit 1) for the database being away or failing.
    pub fn into_exit_error(self) -> anyhow::Error {
        if self.exit_code() == 2 {
            crate::settings::SettingsError(self.to_string()).into()
        } else {
            self.into()
        }
    }
}
