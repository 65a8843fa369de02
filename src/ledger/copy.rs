//! Copying an SQLite ledger into an empty PostgreSQL ledger (`paywatch ledger copy`).
//!
//! Owns: reading every record of an SQLite ledger in one read transaction (checkouts, their
//! history, the hook outbox with its queue order, resume points, listen refusals, the ticket
//! counter, discovery's epoch and rounds) and writing them into a PostgreSQL ledger in one
//! transaction, after checking, with the tables locked, that it holds nothing yet.
//! Must never: write into a PostgreSQL ledger that holds any record (it refuses, and nothing is
//! written), change the SQLite ledger beyond migrating it, or write half a copy (one
//! transaction: all or nothing).
//!
//! Ids are kept: transition ids (which event ids' deliveries point at) and the outbox's queue
//! order (SQLite's rowid becomes `seq`), so each checkout's hook deliveries keep their order and
//! their event ids; the identity sequences continue after the highest copied value.

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use tokio_postgres::types::ToSql;

use super::postgres::{PgError, PgStore};
use super::sqlite::{Sqlite, blocking, parse_time};
use super::{LedgerError, timestamp};

/// What a column holds, and how it crosses from SQLite's storage to PostgreSQL's types.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    /// Exact decimal text, cast to NUMERIC on the way in.
    Numeric,
    Int32,
    Int64,
    Bool,
    /// RFC 3339 text in SQLite, TIMESTAMPTZ in PostgreSQL.
    Time,
    Blob,
}

/// One copied value.
#[derive(Debug)]
enum Cell {
    Text(Option<String>),
    Int32(Option<i32>),
    Int64(Option<i64>),
    Bool(Option<bool>),
    Time(Option<DateTime<Utc>>),
    Blob(Option<Vec<u8>>),
}

impl Cell {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Text(value) => value,
            Cell::Int32(value) => value,
            Cell::Int64(value) => value,
            Cell::Bool(value) => value,
            Cell::Time(value) => value,
            Cell::Blob(value) => value,
        }
    }
}

/// A table as copied: its name, the SQLite expression and PostgreSQL column of each value, and
/// the order rows are read in.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, &'static str, Kind)],
    order: &'static str,
    /// `OVERRIDING SYSTEM VALUE`: the table has an always-generated column that is copied.
    overriding: bool,
}

const TABLES: &[Table] = &[
    Table {
        name: "checkouts",
        columns: &[
            ("id", "id", Kind::Text),
            ("order_id", "order_id", Kind::Text),
            ("request_id", "request_id", Kind::Text),
            ("display_id", "display_id", Kind::Text),
            ("amount", "amount", Kind::Numeric),
            ("currency", "currency", Kind::Text),
            ("status", "status", Kind::Text),
            ("total_refunded", "total_refunded", Kind::Numeric),
            ("redirect_url", "redirect_url", Kind::Text),
            ("firebase_database", "firebase_database", Kind::Text),
            ("firebase_collection", "firebase_collection", Kind::Text),
            ("firebase_document", "firebase_document", Kind::Text),
            ("watched", "watched", Kind::Bool),
            ("watch_until", "watch_until", Kind::Time),
            ("needs_verify", "needs_verify", Kind::Bool),
            ("tracked_via", "tracked_via", Kind::Text),
            ("created_at", "created_at", Kind::Time),
            ("updated_at", "updated_at", Kind::Time),
            ("verified_at", "verified_at", Kind::Time),
            ("not_found_count", "not_found_count", Kind::Int32),
            (
                "verify_requested_ticket",
                "verify_requested_ticket",
                Kind::Int64,
            ),
            ("needs_verify_after", "needs_verify_after", Kind::Int64),
        ],
        order: "rowid",
        overriding: false,
    },
    Table {
        name: "transitions",
        columns: &[
            ("id", "id", Kind::Int64),
            ("checkout_id", "checkout_id", Kind::Text),
            ("from_status", "from_status", Kind::Text),
            ("to_status", "to_status", Kind::Text),
            ("source", "source", Kind::Text),
            ("changed_at", "changed_at", Kind::Time),
            ("verified_at", "verified_at", Kind::Time),
            ("latency_ms", "latency_ms", Kind::Int64),
            ("verified_json", "verified_json", Kind::Text),
            ("refunded_from", "refunded_from", Kind::Numeric),
            ("refunded_to", "refunded_to", Kind::Numeric),
        ],
        order: "id",
        overriding: false,
    },
    Table {
        name: "hook_deliveries",
        columns: &[
            ("event_id", "event_id", Kind::Text),
            ("rowid", "seq", Kind::Int64),
            ("transition_id", "transition_id", Kind::Int64),
            ("checkout_id", "checkout_id", Kind::Text),
            ("hook", "hook", Kind::Text),
            ("state", "state", Kind::Text),
            ("attempts", "attempts", Kind::Int32),
            ("next_attempt_at", "next_attempt_at", Kind::Time),
            ("last_exit_code", "last_exit_code", Kind::Int32),
            ("last_error", "last_error", Kind::Text),
            ("replay", "replay", Kind::Bool),
            ("created_at", "created_at", Kind::Time),
            ("updated_at", "updated_at", Kind::Time),
            ("delivered_at", "delivered_at", Kind::Time),
        ],
        order: "rowid",
        overriding: true,
    },
    Table {
        name: "listen_targets",
        columns: &[
            ("checkout_id", "checkout_id", Kind::Text),
            ("resume_token", "resume_token", Kind::Blob),
            ("read_time", "read_time", Kind::Time),
            ("updated_at", "updated_at", Kind::Time),
        ],
        order: "rowid",
        overriding: false,
    },
    Table {
        name: "listen_refusals",
        columns: &[
            ("checkout_id", "checkout_id", Kind::Text),
            ("refusal_code", "refusal_code", Kind::Text),
            ("refusal_message", "refusal_message", Kind::Text),
            ("refused_document", "refused_document", Kind::Text),
            ("first_refused_at", "first_refused_at", Kind::Time),
            ("last_refused_at", "last_refused_at", Kind::Time),
            ("refusal_count", "refusal_count", Kind::Int32),
            ("next_retry_at", "next_retry_at", Kind::Time),
        ],
        order: "rowid",
        overriding: false,
    },
    Table {
        name: "discovery_epoch",
        columns: &[("id", "id", Kind::Int32), ("epoch", "epoch", Kind::Time)],
        order: "id",
        overriding: false,
    },
    Table {
        name: "discovery_rounds",
        columns: &[
            ("kind", "kind", Kind::Text),
            ("started_at", "started_at", Kind::Time),
            ("finished_at", "finished_at", Kind::Time),
        ],
        order: "kind",
        overriding: false,
    },
];

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyCounts {
    /// Rows copied per table, in copy order.
    pub tables: Vec<(&'static str, usize)>,
    /// The verification ticket counter, carried over.
    pub last_ticket: i64,
}

/// Why a copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The target already holds records: nothing was written (exit 2).
    #[error(
        "ledger {target}: the PostgreSQL ledger is not empty ({what}); nothing was copied\n\n\
         copy only into a new, empty database"
    )]
    NotEmpty {
        /// `host:port/database`.
        target: String,
        /// What it holds.
        what: String,
    },
    /// Reading the SQLite ledger failed, or a stored value cannot be copied.
    #[error(transparent)]
    Source(#[from] LedgerError),
    /// Writing the PostgreSQL ledger failed (nothing was written).
    #[error(transparent)]
    Target(#[from] PgError),
}

/// Everything read from the SQLite ledger.
struct Snapshot {
    tables: Vec<Vec<Vec<Cell>>>,
    last_ticket: i64,
}

/// Copies the SQLite ledger at `source` (opened and migrated as every command does) into the
/// PostgreSQL ledger `target`, which must hold no record. Stop the daemon first: what it writes
/// meanwhile is not copied.
///
/// # Errors
///
/// [`CopyError::NotEmpty`] (nothing written); reading or converting the SQLite ledger; the
/// PostgreSQL transaction (nothing written).
pub async fn copy_to_postgres(source: &Path, target: &PgStore) -> Result<CopyCounts, CopyError> {
    let path = source.to_owned();
    let shown = path.display().to_string();
    let snapshot = blocking(&shown, move || {
        let store = Sqlite::open(&path)?;
        read_snapshot(&store)
    })
    .await?;
    write_snapshot(target, snapshot).await
}

fn read_snapshot(store: &Sqlite) -> Result<Snapshot, LedgerError> {
    let mut connection = store.lock();
    let fail = |what: &str, error: &dyn std::fmt::Display| store.error(what, error.to_string());
    // One read transaction: every table from the same moment.
    let transaction = connection
        .transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)
        .map_err(|error| fail("copy", &error))?;
    let mut tables = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let expressions: Vec<&str> = table.columns.iter().map(|(from, _, _)| *from).collect();
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {}",
            expressions.join(", "),
            table.name,
            table.order
        );
        let mut statement = transaction
            .prepare(&sql)
            .map_err(|error| fail(table.name, &error))?;
        let mut rows = statement
            .query([])
            .map_err(|error| fail(table.name, &error))?;
        let mut copied = Vec::new();
        while let Some(row) = rows.next().map_err(|error| fail(table.name, &error))? {
            let mut cells = Vec::with_capacity(table.columns.len());
            for (index, (column, _, kind)) in table.columns.iter().enumerate() {
                let value: Value = row.get(index).map_err(|error| fail(table.name, &error))?;
                let cell = convert(value, *kind).map_err(|why| {
                    let key: Value = row.get(0).unwrap_or(Value::Null);
                    store.error(
                        "copy",
                        format!(
                            "{}.{column} of the row {} cannot be copied: {why}",
                            table.name,
                            printable_value(&key)
                        ),
                    )
                })?;
                cells.push(cell);
            }
            copied.push(cells);
        }
        tables.push(copied);
    }
    let last_ticket: i64 = transaction
        .query_row("SELECT last FROM verify_tickets WHERE id = 1", [], |row| {
            row.get(0)
        })
        .map_err(|error| fail("verify_tickets", &error))?;
    Ok(Snapshot {
        tables,
        last_ticket,
    })
}

fn printable_value(value: &Value) -> String {
    match value {
        Value::Text(text) => format!("'{}'", crate::domain::printable(text)),
        Value::Integer(number) => number.to_string(),
        other => format!("{other:?}"),
    }
}

/// One SQLite value as `kind`; an error says why it does not fit.
fn convert(value: Value, kind: Kind) -> Result<Cell, String> {
    let text = |value: Value| match value {
        Value::Null => Ok(None),
        Value::Text(text) => Ok(Some(text)),
        Value::Integer(number) => Ok(Some(number.to_string())),
        Value::Real(number) => Ok(Some(number.to_string())),
        Value::Blob(_) => Err("a blob where text was expected".to_owned()),
    };
    let integer = |value: Value| match value {
        Value::Null => Ok(None),
        Value::Integer(number) => Ok(Some(number)),
        Value::Text(text) => text
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("'{}' is not an integer", crate::domain::printable(&text))),
        other => Err(format!("{other:?} is not an integer")),
    };
    Ok(match kind {
        Kind::Text => Cell::Text(text(value)?),
        Kind::Numeric => {
            let value = text(value)?;
            if let Some(number) = &value
                && crate::domain::parse_decimal(number).is_none()
            {
                return Err(format!(
                    "'{}' is not a decimal amount",
                    crate::domain::printable(number)
                ));
            }
            Cell::Text(value)
        }
        Kind::Int32 => Cell::Int32(
            integer(value)?
                .map(|number| {
                    i32::try_from(number).map_err(|_| format!("{number} is out of range"))
                })
                .transpose()?,
        ),
        Kind::Int64 => Cell::Int64(integer(value)?),
        Kind::Bool => Cell::Bool(integer(value)?.map(|number| number != 0)),
        Kind::Time => Cell::Time(
            text(value)?
                .map(|text| {
                    parse_time(&text).ok_or_else(|| {
                        format!(
                            "'{}' is not an RFC 3339 time",
                            crate::domain::printable(&text)
                        )
                    })
                })
                .transpose()?,
        ),
        Kind::Blob => Cell::Blob(match value {
            Value::Null => None,
            Value::Blob(bytes) => Some(bytes),
            Value::Text(text) => Some(text.into_bytes()),
            other => return Err(format!("{other:?} is not a resume token")),
        }),
    })
}

async fn write_snapshot(target: &PgStore, snapshot: Snapshot) -> Result<CopyCounts, CopyError> {
    let db = |error: tokio_postgres::Error| PgError::from_db(target.target(), &error);
    let mut client = target
        .pool()
        .get()
        .await
        .map_err(|error| PgError::from_pool(target.target(), &error))?;
    let transaction = target.begin_write(&mut client).await?;
    // No daemon or command may write while the copy checks and fills the tables.
    let names: Vec<&str> = TABLES.iter().map(|table| table.name).collect();
    transaction
        .batch_execute(&format!(
            "LOCK TABLE {}, verify_tickets IN EXCLUSIVE MODE",
            names.join(", ")
        ))
        .await
        .map_err(db)?;
    let mut held = Vec::new();
    for table in TABLES {
        let rows: i64 = transaction
            .query_one(&format!("SELECT count(*) FROM {}", table.name), &[])
            .await
            .map_err(db)?
            .get(0);
        if rows > 0 {
            held.push(format!("{rows} rows in {}", table.name));
        }
    }
    let last: i64 = transaction
        .query_one("SELECT last FROM verify_tickets WHERE id = 1", &[])
        .await
        .map_err(db)?
        .get(0);
    if last > 0 {
        held.push(format!("verification tickets issued up to {last}"));
    }
    if !held.is_empty() {
        return Err(CopyError::NotEmpty {
            target: target.target().describe().to_owned(),
            what: held.join(", "),
        });
    }
    let mut counts = CopyCounts {
        tables: Vec::with_capacity(TABLES.len()),
        last_ticket: snapshot.last_ticket,
    };
    for (table, rows) in TABLES.iter().zip(&snapshot.tables) {
        let columns: Vec<&str> = table.columns.iter().map(|(_, to, _)| *to).collect();
        let values: Vec<String> = table
            .columns
            .iter()
            .enumerate()
            .map(|(index, (_, _, kind))| match kind {
                Kind::Numeric => format!("CAST(${}::TEXT AS NUMERIC)", index + 1),
                _ => format!("${}", index + 1),
            })
            .collect();
        let statement = transaction
            .prepare(&format!(
                "INSERT INTO {} ({}) {} VALUES ({})",
                table.name,
                columns.join(", "),
                if table.overriding {
                    "OVERRIDING SYSTEM VALUE"
                } else {
                    ""
                },
                values.join(", ")
            ))
            .await
            .map_err(db)?;
        for row in rows {
            let parameters: Vec<&(dyn ToSql + Sync)> = row.iter().map(Cell::as_sql).collect();
            transaction
                .execute(&statement, &parameters)
                .await
                .map_err(db)?;
        }
        counts.tables.push((table.name, rows.len()));
    }
    transaction
        .batch_execute(
            "SELECT setval(pg_get_serial_sequence('transitions', 'id'),
                           coalesce((SELECT max(id) FROM transitions), 0) + 1, false);
             SELECT setval(pg_get_serial_sequence('hook_deliveries', 'seq'),
                           coalesce((SELECT max(seq) FROM hook_deliveries), 0) + 1, false);",
        )
        .await
        .map_err(db)?;
    transaction
        .execute(
            "UPDATE verify_tickets SET last = $1 WHERE id = 1",
            &[&snapshot.last_ticket],
        )
        .await
        .map_err(db)?;
    transaction.commit().await.map_err(db)?;
    tracing::info!(
        target_ledger = %target.target().describe(),
        copied = ?counts.tables,
        "copied the SQLite ledger into PostgreSQL (as of {})",
        timestamp(Utc::now())
    );
    Ok(counts)
}
