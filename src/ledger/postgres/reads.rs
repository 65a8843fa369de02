//! What the CLI, status, the listener and the metrics read from a PostgreSQL ledger.
//!
//! Owns: the PostgreSQL SQL of `checkout`, `list`, `transitions`, `counts`, `data_version`,
//! `check_writable`, `probe_documents`, `watch_set` and `gauges`, mapped to the same row types
//! as SQLite's (times as RFC 3339 text to the millisecond, money as its exact decimal text).
//! Must never: write (the write check begins a fenced transaction and rolls it back).

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::apply::{TRANSITION_COLUMNS, transition_from_row};
use super::{PgError, PgStore};
use crate::domain::{CheckoutId, CheckoutStatus, FirestoreLocation};
use crate::ledger::{
    CheckoutRecord, FirebaseCoordinates, LedgerCounts, LedgerGauges, ListFilter, ListenRefusal,
    TransitionRecord, UndeliveredCount, WatchEntry, timestamp,
};

const CHECKOUT_COLUMNS: &str = "SELECT id, order_id, request_id, display_id, status, amount::TEXT,
        currency, total_refunded::TEXT, redirect_url, watched, watch_until, firebase_database,
        firebase_collection, firebase_document, tracked_via, created_at, updated_at, verified_at,
        refusal_code, refusal_message, refused_document, first_refused_at, last_refused_at,
        refusal_count, next_retry_at
     FROM checkouts LEFT JOIN listen_refusals ON listen_refusals.checkout_id = checkouts.id";

fn time_text(row: &Row, index: usize) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(row
        .try_get::<_, Option<DateTime<Utc>>>(index)?
        .map(timestamp))
}

fn checkout_from_row(row: &Row) -> Result<CheckoutRecord, tokio_postgres::Error> {
    Ok(CheckoutRecord {
        id: row.try_get(0)?,
        order_id: row.try_get(1)?,
        request_id: row.try_get(2)?,
        display_id: row.try_get(3)?,
        status: row
            .try_get::<_, Option<String>>(4)?
            .as_deref()
            .map(CheckoutStatus::parse),
        amount: row.try_get(5)?,
        currency: row.try_get(6)?,
        total_refunded: row.try_get(7)?,
        redirect_url: row.try_get(8)?,
        watched: row.try_get(9)?,
        watch_until: time_text(row, 10)?,
        firebase: FirebaseCoordinates {
            database: row.try_get(11)?,
            collection: row.try_get(12)?,
            document: row.try_get(13)?,
        },
        tracked_via: row.try_get(14)?,
        created_at: timestamp(row.try_get(15)?),
        updated_at: timestamp(row.try_get(16)?),
        verified_at: time_text(row, 17)?,
        listen_refused: match row.try_get::<_, Option<String>>(18)? {
            None => None,
            Some(code) => Some(ListenRefusal {
                code,
                message: row.try_get(19)?,
                document: row.try_get(20)?,
                first_refused_at: timestamp(row.try_get(21)?),
                last_refused_at: timestamp(row.try_get(22)?),
                count: i64::from(row.try_get::<_, i32>(23)?),
                next_retry_at: time_text(row, 24)?,
            }),
        },
    })
}

impl PgStore {
    /// One checkout.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn checkout(&self, id: &CheckoutId) -> Result<Option<CheckoutRecord>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("{CHECKOUT_COLUMNS} WHERE id = $1"),
                &[&id.as_str()],
            )
            .await
            .map_err(db)?;
        row.as_ref().map(checkout_from_row).transpose().map_err(db)
    }

    /// Checkouts matching `filter`, newest first.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<CheckoutRecord>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let (conditions, values) =
            crate::ledger::queries::list_conditions(filter, |n| format!("${n}"), "watched");
        let mut sql = format!("{CHECKOUT_COLUMNS} WHERE TRUE{conditions}");
        sql.push_str(" ORDER BY created_at DESC, id COLLATE \"C\" DESC");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        let parameters: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|value| value as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let client = self.client().await?;
        let rows = client.query(&sql, &parameters).await.map_err(db)?;
        rows.iter()
            .map(checkout_from_row)
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    /// A checkout's transitions, oldest first.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn transitions(&self, id: &CheckoutId) -> Result<Vec<TransitionRecord>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE checkout_id = $1 ORDER BY id"
            ))
            .await
            .map_err(db)?;
        let rows = client
            .query(&statement, &[&id.as_str()])
            .await
            .map_err(db)?;
        rows.iter()
            .map(transition_from_row)
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    /// Counts for status lines.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn counts(&self) -> Result<LedgerCounts, PgError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM checkouts),
                        (SELECT count(*) FROM checkouts WHERE watched),
                        (SELECT count(*) FROM hook_deliveries WHERE state IN ('pending', 'running')),
                        (SELECT count(*) FROM hook_deliveries WHERE state = 'dead')",
                &[],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(LedgerCounts {
            checkouts: row.get(0),
            watched: row.get(1),
            hooks_pending: row.get(2),
            hooks_dead: row.get(3),
        })
    }

    /// A number that changes when the checkouts change (a checkout tracked, located,
    /// unwatched, verified), SQLite's `data_version` for the daemon's watch-set poll: the count
    /// of checkouts and a sum over their update times. Unlike SQLite's, it also changes on this
    /// store's own writes (the poll then rereads the watch set once more; nothing is missed).
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn data_version(&self) -> Result<i64, PgError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) * 1000003
                        + coalesce(sum((extract(epoch FROM updated_at) * 1000)::BIGINT
                                       + CASE WHEN watched THEN 7 ELSE 0 END), 0)::BIGINT
                 FROM checkouts",
                &[],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(row.get(0))
    }

    /// Proof that a write would go through, for the health check: the server answers and
    /// accepts writes (not a read-only replica, not `default_transaction_read_only`). Not
    /// fenced: a standby daemon is healthy too (its role is `/readyz`'s business).
    ///
    /// # Errors
    ///
    /// The server unreachable or read-only; database failures.
    pub async fn check_writable(&self) -> Result<(), PgError> {
        let client = self.client().await?;
        let read_only: bool = client
            .query_one(
                "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::BOOLEAN",
                &[],
            )
            .await
            .map_err(|error| self.db(&error))?
            .get(0);
        if read_only {
            return Err(PgError::Database {
                target: self.target().describe().to_owned(),
                detail: "the server accepts no writes (a read-only replica, or \
                         default_transaction_read_only); check that 'ledger.url' names the \
                         primary"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// One checkout per Firebase project (a watched one first, else the newest), or just
    /// `only`, with its document.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn probe_documents(
        &self,
        only: Option<&CheckoutId>,
    ) -> Result<Vec<(CheckoutId, FirestoreLocation)>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, firebase_database, firebase_collection, firebase_document
                 FROM checkouts WHERE $1::TEXT IS NULL OR id = $1
                 ORDER BY watched DESC, created_at DESC, id COLLATE \"C\"",
                &[&only.map(CheckoutId::as_str)],
            )
            .await
            .map_err(|error| self.db(&error))?;
        let mut seen = std::collections::HashSet::new();
        let mut documents = Vec::new();
        for row in rows {
            let id: String = row.get(0);
            let project: String = row.get(1);
            let collection: String = row.get(2);
            let document: String = row.get(3);
            if !seen.insert(project.clone()) {
                continue;
            }
            if let (Ok(id), Ok(location)) = (
                id.parse::<CheckoutId>(),
                FirestoreLocation::new(&project, &collection, &document),
            ) {
                documents.push((id, location));
            }
        }
        Ok(documents)
    }

    /// Every watched checkout with its document and resume token.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn watch_set(&self) -> Result<Vec<WatchEntry>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT c.id, c.firebase_database, c.firebase_collection, c.firebase_document,
                        t.resume_token, c.needs_verify, c.status, t.read_time
                 FROM checkouts c LEFT JOIN listen_targets t ON t.checkout_id = c.id
                 WHERE c.watched AND c.firebase_database <> ''
                 ORDER BY c.created_at, c.id COLLATE \"C\"",
            )
            .await
            .map_err(db)?;
        let rows = client.query(&statement, &[]).await.map_err(db)?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(0);
            let database: String = row.get(1);
            let collection: String = row.get(2);
            let document: String = row.get(3);
            let (Ok(checkout_id), Ok(location)) = (
                id.parse::<CheckoutId>(),
                FirestoreLocation::new(&database, &collection, &document),
            ) else {
                tracing::warn!(checkout = %crate::domain::printable(&id), "skipping a ledger row with an invalid id or Firebase coordinates");
                continue;
            };
            let needs_verify: bool = row.get(5);
            let status: Option<String> = row.get(6);
            entries.push(WatchEntry {
                checkout_id,
                location,
                resume_token: row.get(4),
                resume_read_time: row.get(7),
                needs_verify: needs_verify || status.is_none(),
            });
        }
        Ok(entries)
    }

    /// The figures behind the ledger-derived gauges, from one snapshot (a repeatable-read,
    /// read-only transaction).
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn gauges(&self) -> Result<LedgerGauges, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let transaction = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let watched_by_status = transaction
            .query(
                "SELECT status, count(*) FROM checkouts WHERE watched GROUP BY status
                 ORDER BY status COLLATE \"C\" NULLS FIRST",
                &[],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let mut undelivered_by_hook = Vec::new();
        let mut oldest_undelivered: Option<DateTime<Utc>> = None;
        for row in transaction
            .query(
                "SELECT hook, state, count(*), min(created_at) FROM hook_deliveries
                 WHERE state IN ('pending', 'running', 'dead') GROUP BY hook, state
                 ORDER BY hook COLLATE \"C\", state",
                &[],
            )
            .await
            .map_err(db)?
        {
            let hook: String = row.get(0);
            let state: String = row.get(1);
            let oldest: DateTime<Utc> = row.get(3);
            // Dead deliveries wait for a person (`hooks retry`), not for the dispatcher.
            if state != "dead" && oldest_undelivered.is_none_or(|o| oldest < o) {
                oldest_undelivered = Some(oldest);
            }
            undelivered_by_hook.push(UndeliveredCount {
                hook,
                state,
                count: row.get(2),
            });
        }
        let paid_with_undelivered_hooks = transaction
            .query_one(
                "SELECT count(DISTINCT d.checkout_id) FROM hook_deliveries d
                 JOIN transitions t ON t.id = d.transition_id
                 WHERE d.state IN ('pending', 'running', 'dead') AND t.to_status = 'PAID'
                   AND t.from_status IS DISTINCT FROM 'PAID'",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        let oldest_pending = transaction
            .query_one(
                "SELECT min(created_at) FROM checkouts WHERE status = 'PENDING' AND watched",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        let oldest_resume_token = transaction
            .query_one(
                "SELECT min(t.updated_at) FROM listen_targets t
                 JOIN checkouts c ON c.id = t.checkout_id WHERE c.watched",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        transaction.commit().await.map_err(db)?;
        Ok(LedgerGauges {
            watched_by_status,
            undelivered_by_hook,
            oldest_undelivered,
            paid_with_undelivered_hooks,
            oldest_pending,
            oldest_resume_token,
        })
    }
}
