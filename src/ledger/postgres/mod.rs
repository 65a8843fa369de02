//! The PostgreSQL ledger: the same records as the SQLite file, shared by several daemons of
//! which one, the lease holder, acts.
//!
//! Owns: connecting ([`Target`]), the PostgreSQL schema and its migrations ([`migrate()`]), the
//! lease and the epoch fence ([`Lease`]), every SQL statement sent to PostgreSQL, and
//! [`PgStore`]'s implementation of the ledger's `Backend` (`backend.rs`; the operations in
//! `ops.rs`, `apply.rs`, `outbox.rs` and `reads.rs`, with the semantics of their SQLite
//! counterparts).
//! Must never: write from a daemon without the fence (the schema refuses it: a daemon's
//! connections carry `paywatch.role = 'daemon'`, and a trigger on every table refuses a write
//! whose transaction did not pass `paywatch_fence(epoch)`), or show a password.
//!
//! How the lease works (see `migrations/0002_lease.sql`): one row, elected with INSERT ... ON
//! CONFLICT DO UPDATE WHERE expired (riverqueue/river's election, with an epoch that grows at
//! every election), renewed only by its holder at its epoch, expiring by the database's clock,
//! resigned with pg_notify so a standby listening on `paywatch_lease` takes over at once. An
//! election takes an advisory lock exclusively; each fenced write shares it until its
//! transaction ends and then checks its epoch against the row, so every write of epoch `n`
//! commits before epoch `n + 1` is elected, or is refused.

mod apply;
mod backend;
mod connect;
pub mod keeper;
mod lease;
mod migrate;
mod ops;
mod outbox;
mod reads;
mod store;

#[cfg(test)]
pub(crate) mod cluster;
#[cfg(test)]
mod tests;

pub use connect::{Session, Target, TlsMode, is_postgres_url};
pub use keeper::Role;
pub use lease::{Lease, LeaseRow, fence, read_lease};
pub use migrate::{SCHEMA_VERSION, migrate};
pub use store::PgStore;

/// The SQLSTATE the fence raises: the write's epoch is not the current lease.
pub const FENCED_SQLSTATE: &str = "PW001";

/// A PostgreSQL ledger failure. Messages name `host:port/database`, never the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A setting is wrong (the message names the key): exit 2.
    #[error("{0}")]
    Settings(String),
    /// The server refused us for a reason a setting must fix (password, TLS): exit 2.
    #[error("ledger {target}: {detail}\n\ncheck '{key}'")]
    Refused {
        /// `host:port/database`.
        target: String,
        /// The setting to check.
        key: &'static str,
        /// What the server or TLS said.
        detail: String,
    },
    /// The server cannot be reached (down, wrong host or port, network): exit 1.
    #[error(
        "ledger {target}: cannot connect: {detail}\n\ncheck that PostgreSQL runs there and that \
         this host may reach it (firewall, pg_hba.conf)"
    )]
    Unreachable {
        /// `host:port/database`.
        target: String,
        /// What failed.
        detail: String,
    },
    /// The schema was written by a newer paywatch: exit 2.
    #[error(
        "ledger {target}: the ledger has schema version {found}, but this paywatch knows only up \
         to {known}\n\nit was written by a newer paywatch; upgrade paywatch rather than downgrade"
    )]
    NewerSchema {
        /// `host:port/database`.
        target: String,
        /// The database's version.
        found: i64,
        /// This build's version.
        known: i64,
    },
    /// The write's lease epoch is no longer current: the write was rolled back.
    #[error("ledger {target}: write refused: {detail}")]
    Fenced {
        /// `host:port/database`.
        target: String,
        /// The fence's message.
        detail: String,
    },
    /// Any other database failure.
    #[error("ledger {target}: {detail}")]
    Database {
        /// `host:port/database`.
        target: String,
        /// What failed.
        detail: String,
    },
}

impl PgError {
    /// Classifies a failure to connect: authentication and TLS problems name their key.
    pub fn from_connect(target: &Target, error: &tokio_postgres::Error) -> PgError {
        let detail = error_text(error);
        if let Some(db) = error.as_db_error() {
            let code = db.code().code();
            // 28P01 invalid_password, 28000 invalid_authorization_specification (pg_hba).
            if code == "28P01" {
                return PgError::Refused {
                    target: target.describe().to_owned(),
                    key: "ledger.password_file",
                    detail,
                };
            }
            if code == "28000" {
                return PgError::Refused {
                    target: target.describe().to_owned(),
                    key: "ledger.url",
                    detail,
                };
            }
            return PgError::from_db(target, error);
        }
        if is_tls_error(error) {
            return PgError::Refused {
                target: target.describe().to_owned(),
                key: "ledger.ca_file",
                detail,
            };
        }
        if detail.contains("password missing") {
            return PgError::Refused {
                target: target.describe().to_owned(),
                key: "ledger.password_file",
                detail,
            };
        }
        if detail.contains("server does not support TLS") {
            return PgError::Refused {
                target: target.describe().to_owned(),
                key: "ledger.url",
                detail: format!("{detail} (the URL's sslmode requires it)"),
            };
        }
        PgError::Unreachable {
            target: target.describe().to_owned(),
            detail,
        }
    }

    /// Classifies a failure of a statement: the fence's refusal is [`PgError::Fenced`].
    pub fn from_db(target: &Target, error: &tokio_postgres::Error) -> PgError {
        if let Some(db) = error.as_db_error()
            && db.code().code() == FENCED_SQLSTATE
        {
            return PgError::Fenced {
                target: target.describe().to_owned(),
                detail: crate::domain::scrub_secrets(db.message()).into_owned(),
            };
        }
        if error.is_closed() || error.as_db_error().is_none() && is_io(error) {
            return PgError::Unreachable {
                target: target.describe().to_owned(),
                detail: error_text(error),
            };
        }
        PgError::Database {
            target: target.describe().to_owned(),
            detail: error_text(error),
        }
    }

    /// Classifies a failure to get a pooled connection.
    pub fn from_pool(target: &Target, error: &deadpool_postgres::PoolError) -> PgError {
        match error {
            deadpool_postgres::PoolError::Backend(error) => PgError::from_connect(target, error),
            other => PgError::Unreachable {
                target: target.describe().to_owned(),
                detail: crate::domain::scrub_secrets(&other.to_string()).into_owned(),
            },
        }
    }

    /// Whether the write was refused by the fence.
    pub fn is_fenced(&self) -> bool {
        matches!(self, PgError::Fenced { .. })
    }

    /// Whether the database could not be reached (retry later).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PgError::Unreachable { .. })
    }
}

/// The error with its causes on one line, secrets scrubbed.
fn error_text(error: &tokio_postgres::Error) -> String {
    let mut text = match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error.to_string(),
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if error.as_db_error().is_none() {
            text.push_str(": ");
            text.push_str(&cause.to_string());
        }
        source = cause.source();
    }
    crate::domain::scrub_secrets(&text).into_owned()
}

fn is_tls_error(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<tokio_rustls::rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>())
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn is_io(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}
