//! The PostgreSQL schema's migrations, run under an advisory lock.
//!
//! Owns: the ordered, append-only list of PostgreSQL migrations (never edit one that has
//! shipped; add a file), the `paywatch_schema` version row, and applying the missing ones.
//! Must never: run two migrations at once (two daemons starting together: the second waits for
//! the lock, then finds nothing to do), or touch a schema newer than this build.

use deadpool_postgres::Pool;

use super::{PgError, Target};

/// The migrations, in order; migration `n` (1-based) brings the schema to version `n`.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_lease.sql"),
];

/// The PostgreSQL schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The migration lock (an advisory lock; "paywmigr" in ASCII).
const MIGRATION_LOCK: i64 = 8_097_887_158_832_555_890;

/// Applies every migration newer than the database's version, all in one transaction holding
/// the migration lock. Returns the version the database is now at.
///
/// # Errors
///
/// [`PgError::NewerSchema`] when a newer paywatch wrote the schema; connection and SQL errors
/// (a failed migration leaves the schema as it was: PostgreSQL's DDL is transactional).
pub async fn migrate(pool: &Pool, target: &Target) -> Result<i64, PgError> {
    let mut client = pool
        .get()
        .await
        .map_err(|error| PgError::from_pool(target, &error))?;
    let db = |error: tokio_postgres::Error| PgError::from_db(target, &error);
    let transaction = client.transaction().await.map_err(db)?;
    // Migrations write rows; they are not a daemon's fenced writes.
    transaction
        .batch_execute(&format!(
            "SET LOCAL paywatch.role = 'migrate';
             SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS paywatch_schema (
                 id      INTEGER PRIMARY KEY CHECK (id = 1),
                 version BIGINT NOT NULL
             );
             INSERT INTO paywatch_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;"
        ))
        .await
        .map_err(db)?;
    let current: i64 = transaction
        .query_one("SELECT version FROM paywatch_schema WHERE id = 1", &[])
        .await
        .map_err(db)?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(PgError::NewerSchema {
            target: target.describe().to_owned(),
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        transaction.batch_execute(sql).await.map_err(|error| {
            let error = PgError::from_db(target, &error);
            PgError::Database {
                target: target.describe().to_owned(),
                detail: format!("migration {version} failed: {error}"),
            }
        })?;
        transaction
            .execute(
                "UPDATE paywatch_schema SET version = $1 WHERE id = 1",
                &[&version],
            )
            .await
            .map_err(db)?;
    }
    transaction.commit().await.map_err(db)?;
    Ok(SCHEMA_VERSION)
}
