//! The ledger's figures for the metrics exposition, read at scrape time.
//!
//! Owns: the read-only queries behind the gauges that describe what is stored (checkouts watched
//! by status, undelivered hook deliveries, the oldest PENDING checkout, resume-token age).
//! Must never: write, or return a checkout id (the figures become metric labels and values).
//!
//! Every query is served by an index of the first schema (`checkouts_watched`,
//! `checkouts_status`, `hook_deliveries_due`) or reads only the rows it counts (undelivered
//! deliveries, one resume token per watched checkout), so a scrape costs little even with a long
//! history of delivered hooks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};

use super::Result;
use super::sqlite::Sqlite;

pub use crate::metrics::{LedgerGauges, UndeliveredCount};

impl Sqlite {
    /// The figures behind the ledger-derived gauges, read in one read transaction.
    ///
    /// A file ledger is read on a connection of its own, opened for this call with
    /// `query_only` on: in WAL mode it reads a snapshot while the daemon goes on writing, so a
    /// scrape never holds up a payment (over 20,000 watched checkouts the queries take tens of
    /// milliseconds). An in-memory ledger (tests) is read on its one connection.
    ///
    /// # Errors
    ///
    /// SQL failures, or a stored time that is not RFC 3339 (only a hand-edited ledger has one).
    pub(super) fn gauges(&self) -> Result<LedgerGauges> {
        if &*self.path == ":memory:" {
            return self.read_gauges(&mut self.lock());
        }
        let fail = |e: rusqlite::Error| self.error("metrics", e);
        let mut reader = Connection::open_with_flags(
            &*self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(fail)?;
        reader.busy_timeout(Duration::from_secs(10)).map_err(fail)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(fail)?;
        self.read_gauges(&mut reader)
    }

    fn read_gauges(&self, connection: &mut Connection) -> Result<LedgerGauges> {
        let fail = |e: rusqlite::Error| self.error("metrics", e);
        // Deferred: a read transaction, so every figure comes from the same snapshot.
        let transaction = connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)
            .map_err(fail)?;
        let watched_by_status = {
            let mut statement = transaction
                .prepare_cached(
                    "SELECT status, count(*) FROM checkouts WHERE watched = 1 GROUP BY status",
                )
                .map_err(fail)?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(fail)?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(fail)?
        };
        let mut undelivered_by_hook = Vec::new();
        let mut oldest_undelivered: Option<String> = None;
        {
            let mut statement = transaction
                .prepare_cached(
                    "SELECT hook, state, count(*), min(created_at) FROM hook_deliveries
                     WHERE state IN ('pending', 'running', 'dead') GROUP BY hook, state",
                )
                .map_err(fail)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, String>(3)?,
                    ))
                })
                .map_err(fail)?;
            for row in rows {
                let (hook, state, count, oldest) = row.map_err(fail)?;
                // Dead deliveries wait for a person (`hooks retry`), not for the dispatcher.
                if state != "dead" && oldest_undelivered.as_ref().is_none_or(|o| oldest < *o) {
                    oldest_undelivered = Some(oldest);
                }
                undelivered_by_hook.push(UndeliveredCount { hook, state, count });
            }
        }
        let paid_with_undelivered_hooks = transaction
            .query_row(
                "SELECT count(DISTINCT d.checkout_id) FROM hook_deliveries d
                 JOIN transitions t ON t.id = d.transition_id
                 WHERE d.state IN ('pending', 'running', 'dead') AND t.to_status = 'PAID'
                   AND t.from_status IS NOT 'PAID'",
                [],
                |row| row.get(0),
            )
            .map_err(fail)?;
        let oldest_pending: Option<String> = transaction
            .query_row(
                "SELECT min(created_at) FROM checkouts WHERE status = 'PENDING' AND watched = 1",
                [],
                |row| row.get(0),
            )
            .map_err(fail)?;
        let oldest_resume_token: Option<String> = transaction
            .query_row(
                "SELECT min(t.updated_at) FROM listen_targets t
                 JOIN checkouts c ON c.id = t.checkout_id WHERE c.watched = 1",
                [],
                |row| row.get(0),
            )
            .map_err(fail)?;
        drop(transaction);
        let time = |what: &str, text: Option<String>| -> Result<Option<DateTime<Utc>>> {
            text.map(|text| {
                DateTime::parse_from_rfc3339(&text)
                    .map(|time| time.with_timezone(&Utc))
                    .map_err(|error| {
                        self.error(
                            "metrics",
                            format!(
                                "{what} '{}' is not an RFC 3339 time: {error}",
                                crate::domain::printable(&text)
                            ),
                        )
                    })
            })
            .transpose()
        };
        Ok(LedgerGauges {
            watched_by_status,
            undelivered_by_hook,
            oldest_undelivered: time("hook_deliveries.created_at", oldest_undelivered)?,
            paid_with_undelivered_hooks,
            oldest_pending: time("checkouts.created_at", oldest_pending)?,
            oldest_resume_token: time("listen_targets.updated_at", oldest_resume_token)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_ledger_is_read_without_waiting_for_the_daemons_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = crate::ledger::Ledger::open(&dir.path().join("paywatch.db"))
            .await
            .expect("ledger");
        // The daemon's connection is busy (a long write, a slow disk): a scrape still answers.
        let busy = ledger.lock();
        let reader = ledger.store().clone();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(reader.gauges());
        });
        let gauges = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("the scrape did not wait for the shared connection")
            .expect("gauges");
        drop(busy);
        assert_eq!(gauges, LedgerGauges::default());
    }
}
