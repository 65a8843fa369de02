//! Schema migrations, keyed on `PRAGMA user_version`.
//!
//! Owns: the ordered list of migrations and applying the missing ones, each in its own
//! transaction. Migrations are append-only: never edit one that has shipped, add a new file.

use rusqlite::Connection;

/// The migrations, in order; migration `n` (1-based) brings the schema to `user_version = n`.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_verification_times.sql"),
    include_str!("migrations/0003_verify_tickets.sql"),
    include_str!("migrations/0004_discovery.sql"),
    include_str!("migrations/0005_listen_refusals.sql"),
    include_str!("migrations/0006_webhook_source.sql"),
    include_str!("migrations/0007_discovery_baselines.sql"),
];

/// Migration `version` (1-based), to build a ledger as an older paywatch left it.
#[cfg(test)]
pub(crate) fn migration_for_tests(version: usize) -> &'static str {
    MIGRATIONS[version - 1]
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies every migration newer than the database's `user_version`.
///
/// # Errors
///
/// A database newer than this build (downgrade) is refused; an SQL error rolls its migration
/// back and leaves the earlier ones in place.
pub fn migrate(connection: &mut Connection) -> Result<i64, String> {
    let current: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|error| format!("cannot read the schema version: {error}"))?;
    if current > SCHEMA_VERSION {
        return Err(format!(
            "the ledger has schema version {current}, but this paywatch knows only up to {SCHEMA_VERSION}\n\n\
             it was written by a newer paywatch; upgrade paywatch rather than downgrade"
        ));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        let transaction = connection
            .transaction()
            .map_err(|error| format!("cannot start migration {version}: {error}"))?;
        transaction
            .execute_batch(sql)
            .map_err(|error| format!("migration {version} failed: {error}"))?;
        // A migration that edits the schema text must make every connection re-read it.
        if sql.contains("writable_schema") {
            let schema: i64 = transaction
                .query_row("PRAGMA schema_version", [], |row| row.get(0))
                .map_err(|error| {
                    format!("migration {version}: cannot read schema_version: {error}")
                })?;
            transaction
                .pragma_update(None, "schema_version", schema + 1)
                .map_err(|error| {
                    format!("migration {version}: cannot bump schema_version: {error}")
                })?;
            let check: String = transaction
                .query_row("PRAGMA integrity_check", [], |row| row.get(0))
                .map_err(|error| format!("migration {version}: integrity check failed: {error}"))?;
            if check != "ok" {
                return Err(format!(
                    "migration {version}: integrity check says: {check}"
                ));
            }
        }
        transaction
            .pragma_update(None, "user_version", version)
            .map_err(|error| format!("migration {version}: cannot set user_version: {error}"))?;
        transaction
            .commit()
            .map_err(|error| format!("migration {version}: cannot commit: {error}"))?;
    }
    Ok(SCHEMA_VERSION)
}
