//! The lease that makes one daemon active, and the fence every daemon write passes.
//!
//! Owns: calling the schema's `paywatch_elect`, `paywatch_renew`, `paywatch_resign` and
//! `paywatch_fence` (their SQL is in `migrations/0002_lease.sql`), and reading the lease row
//! for `status`.
//! Must never: decide by the local clock whether a lease has expired (only the database's
//! clock decides; a daemon's own deadline only makes it stop acting sooner), or renew a lease
//! that has expired (a lost lease is won again, with a new epoch).

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};

use super::{PgError, Target};

/// The lease row as `paywatch status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The holder's instance name.
    pub holder: String,
    /// The epoch it was won at.
    pub epoch: i64,
    /// When it was won.
    pub elected_at: DateTime<Utc>,
    /// When it expires unless renewed (the far past once resigned).
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether it is held now, by the database's clock.
    pub live: bool,
    /// How long until it expires unless renewed, by the database's clock (zero once expired):
    /// a standby tries again then, whatever the offset between its clock and the database's.
    pub remaining: Duration,
}

/// One daemon's side of the lease: its instance name and lease length.
#[derive(Debug, Clone)]
pub struct Lease {
    pool: Pool,
    target: Target,
    holder: String,
    ttl: Duration,
}

impl Lease {
    /// The lease for this process (`holder` from [`Lease::instance_name`]) with `ttl`.
    pub fn new(pool: Pool, target: Target, holder: String, ttl: Duration) -> Lease {
        Lease {
            pool,
            target,
            holder,
            ttl,
        }
    }

    /// A name for this process that no other daemon has: host, process id and a random part
    /// (a restarted daemon with a reused process id is still another holder).
    pub fn instance_name() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "localhost".to_owned()
        } else {
            host
        };
        format!(
            "{host}:{}:{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    }

    /// This daemon's instance name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How long the lease lasts without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Tries to win the lease: `Some(epoch)` when won (a new epoch, one more than the last),
    /// `None` when someone holds it. Waits at most the lease length for writes under way (a
    /// paused writer's transaction is ended by the server before that; see [`super::Session`]).
    ///
    /// # Errors
    ///
    /// The database cannot be reached or fails.
    pub async fn elect(&self) -> Result<Option<i64>, PgError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|error| PgError::from_pool(&self.target, &error))?;
        let db = |error: tokio_postgres::Error| PgError::from_db(&self.target, &error);
        let transaction = client.transaction().await.map_err(db)?;
        transaction
            .batch_execute(&format!("SET LOCAL lock_timeout = {}", self.ttl_ms()))
            .await
            .map_err(db)?;
        let won = match transaction
            .query_one(
                "SELECT paywatch_elect($1, $2)",
                &[&self.holder, &self.ttl_ms()],
            )
            .await
        {
            Ok(row) => row.get::<_, Option<i64>>(0),
            // 55P03 lock_not_available: writes under way held the election lock too long.
            Err(error)
                if error
                    .as_db_error()
                    .is_some_and(|db| db.code().code() == "55P03") =>
            {
                return Ok(None);
            }
            Err(error) => return Err(db(error)),
        };
        transaction.commit().await.map_err(db)?;
        Ok(won)
    }

    /// Renews the lease won at `epoch`: false when it has expired or passed on (then stop
    /// acting at once).
    ///
    /// # Errors
    ///
    /// The database cannot be reached or fails (the lease may still be ours: keep acting only
    /// until the local deadline).
    pub async fn renew(&self, epoch: i64) -> Result<bool, PgError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| PgError::from_pool(&self.target, &error))?;
        let row = client
            .query_one(
                "SELECT paywatch_renew($1, $2, $3)",
                &[&self.holder, &epoch, &self.ttl_ms()],
            )
            .await
            .map_err(|error| PgError::from_db(&self.target, &error))?;
        Ok(row.get(0))
    }

    /// Gives up the lease won at `epoch` and wakes the standbys: false when it was not held.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or fails (the lease then expires by itself).
    pub async fn resign(&self, epoch: i64) -> Result<bool, PgError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| PgError::from_pool(&self.target, &error))?;
        let row = client
            .query_one("SELECT paywatch_resign($1, $2)", &[&self.holder, &epoch])
            .await
            .map_err(|error| PgError::from_db(&self.target, &error))?;
        Ok(row.get(0))
    }

    /// The lease row, `None` before the first election.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or fails.
    pub async fn current(&self) -> Result<Option<LeaseRow>, PgError> {
        read_lease(&self.pool, &self.target).await
    }
}

/// The lease row of the ledger at `pool`, `None` before the first election.
///
/// # Errors
///
/// The database cannot be reached or fails.
pub async fn read_lease(pool: &Pool, target: &Target) -> Result<Option<LeaseRow>, PgError> {
    let client = pool
        .get()
        .await
        .map_err(|error| PgError::from_pool(target, &error))?;
    let row = client
        .query_opt(
            "SELECT holder, epoch, elected_at,
                    CASE WHEN isfinite(expires_at) THEN expires_at END,
                    expires_at > clock_timestamp(),
                    CASE WHEN expires_at > clock_timestamp()
                         THEN (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::BIGINT
                         ELSE 0 END
               FROM lease WHERE id = 1",
            &[],
        )
        .await
        .map_err(|error| PgError::from_db(target, &error))?;
    Ok(row.map(|row| LeaseRow {
        holder: row.get(0),
        epoch: row.get(1),
        elected_at: row.get(2),
        expires_at: row.get(3),
        live: row.get(4),
        remaining: Duration::from_millis(u64::try_from(row.get::<_, i64>(5)).unwrap_or(0)),
    }))
}

/// The fence: the first statement of a daemon's write transaction. Refuses
/// ([`PgError::Fenced`], the transaction aborted) unless `epoch` is the current, unexpired
/// lease, and holds off any election until the transaction ends.
///
/// # Errors
///
/// [`PgError::Fenced`]; connection and SQL errors.
pub async fn fence(
    transaction: &Transaction<'_>,
    target: &Target,
    epoch: i64,
) -> Result<(), PgError> {
    transaction
        .execute("SELECT paywatch_fence($1)", &[&epoch])
        .await
        .map_err(|error| PgError::from_db(target, &error))?;
    Ok(())
}
