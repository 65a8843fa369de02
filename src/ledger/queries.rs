//! What the CLI, the status line and the HTTP listener read: checkouts, history, counts.
//!
//! Owns: the row types of checkouts and transitions and their mapping from rows, `checkout`,
//! `list`, `transitions`, `counts`, `data_version` and the health check's `check_writable`.
//! Must never: write (the write check takes the lock and rolls back).

use rusqlite::{OptionalExtension, Row};
use serde::Serialize;

use super::Result;
use super::sqlite::Sqlite;
use crate::domain::{CheckoutId, CheckoutStatus, FirestoreLocation};

/// A checkout as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckoutRecord {
    /// paymennt's checkout id.
    pub id: String,
    /// The merchant's order id.
    pub order_id: Option<String>,
    /// The merchant's request id.
    pub request_id: Option<String>,
    /// paymennt's short display id.
    pub display_id: Option<String>,
    /// The last verified status; `None` until verified.
    pub status: Option<CheckoutStatus>,
    /// The amount, exact decimal text.
    pub amount: String,
    /// ISO 4217 currency.
    pub currency: String,
    /// Total refunded, exact decimal text.
    pub total_refunded: Option<String>,
    /// The payment page.
    pub redirect_url: Option<String>,
    /// Whether the daemon listens to its document.
    pub watched: bool,
    /// For PAID checkouts: when watching for refunds ends.
    pub watch_until: Option<String>,
    /// Where its Firestore document lives.
    pub firebase: FirebaseCoordinates,
    /// How it was tracked.
    pub tracked_via: String,
    /// When it was tracked.
    pub created_at: String,
    /// When the row last changed.
    pub updated_at: String,
    /// When its status was last verified.
    pub verified_at: Option<String>,
    /// Firestore refuses to watch its document (the reconciler still checks it), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_refused: Option<ListenRefusal>,
}

/// Firestore's refusal to watch one checkout's document, as last reported by the listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenRefusal {
    /// The gRPC code name, e.g. `PERMISSION_DENIED`.
    pub code: String,
    /// Firestore's message.
    pub message: String,
    /// The document's full resource name.
    pub document: String,
    /// When it was first refused (in this run of refusals).
    pub first_refused_at: String,
    /// When it was last refused.
    pub last_refused_at: String,
    /// Refusals in a row.
    pub count: i64,
    /// When the listener asks again.
    pub next_retry_at: Option<String>,
}

/// The three Firebase coordinates, as paymennt names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirebaseCoordinates {
    /// `firebaseDatabase` (the Google Cloud project id).
    pub database: String,
    /// `firebaseCollection`.
    pub collection: String,
    /// `firebaseDocument`.
    pub document: String,
}

impl CheckoutRecord {
    /// The document location (validated when the checkout was tracked).
    pub fn location(&self) -> Option<FirestoreLocation> {
        FirestoreLocation::new(
            &self.firebase.database,
            &self.firebase.collection,
            &self.firebase.document,
        )
        .ok()
    }
}

/// One verified status change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransitionRecord {
    /// Sequence number (increasing over the whole ledger).
    pub id: i64,
    /// The checkout.
    pub checkout_id: String,
    /// Status before; `None` for the first verified status.
    pub from: Option<CheckoutStatus>,
    /// Status after.
    pub to: CheckoutStatus,
    /// What led to the verification.
    pub source: String,
    /// When the change happened upstream, if known.
    pub changed_at: Option<String>,
    /// When Get Checkout confirmed it.
    pub verified_at: String,
    /// Milliseconds from change to verification, if known.
    pub latency_ms: Option<i64>,
    /// The refunded total recorded before, when this entry changed it (exact decimal text).
    pub refunded_from: Option<String>,
    /// The refunded total Get Checkout gave with this entry (exact decimal text).
    pub refunded_to: Option<String>,
    /// The Get Checkout result, verbatim.
    #[serde(skip)]
    pub verified_json: String,
}

impl TransitionRecord {
    /// Whether this entry is a refund that left the status unchanged.
    pub fn is_refund_only(&self) -> bool {
        self.from.as_ref() == Some(&self.to) && self.refunded_from.is_some()
    }
}

/// Filters for [`Ledger::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only these statuses (any of them); empty means all. `UNVERIFIED` matches no status yet.
    pub statuses: Vec<String>,
    /// Only this order id.
    pub order_id: Option<String>,
    /// Only watched (open) checkouts.
    pub watched_only: bool,
    /// At most this many rows (newest first).
    pub limit: Option<usize>,
}

/// Counts for the status line and `check-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerCounts {
    /// All checkouts.
    pub checkouts: i64,
    /// Watched checkouts.
    pub watched: i64,
    /// Deliveries pending or running.
    pub hooks_pending: i64,
    /// Dead deliveries.
    pub hooks_dead: i64,
}
impl Sqlite {
    /// One checkout.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn checkout(&self, id: &CheckoutId) -> Result<Option<CheckoutRecord>> {
        let connection = self.lock();
        connection
            .query_row(
                &format!("{CHECKOUT_COLUMNS} WHERE id = ?1"),
                [id.as_str()],
                checkout_from_row,
            )
            .optional()
            .map_err(|e| self.error("read checkout", e))
    }

    /// Checkouts matching `filter`, newest first.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn list(&self, filter: &ListFilter) -> Result<Vec<CheckoutRecord>> {
        let (conditions, values) = list_conditions(filter, |n| format!("?{n}"), "watched = 1");
        let mut sql = format!("{CHECKOUT_COLUMNS} WHERE 1 = 1{conditions}");
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        let connection = self.lock();
        let mut statement = connection
            .prepare(&sql)
            .map_err(|e| self.error("list", e))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values.iter()), checkout_from_row)
            .map_err(|e| self.error("list", e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.error("list", e))
    }

    /// A checkout's transitions, oldest first.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn transitions(&self, id: &CheckoutId) -> Result<Vec<TransitionRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(&format!(
                "{TRANSITION_COLUMNS} WHERE checkout_id = ?1 ORDER BY id"
            ))
            .map_err(|e| self.error("transitions", e))?;
        let rows = statement
            .query_map([id.as_str()], transition_from_row)
            .map_err(|e| self.error("transitions", e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.error("transitions", e))
    }

    /// Counts for status lines.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn counts(&self) -> Result<LedgerCounts> {
        let connection = self.lock();
        connection
            .query_row(
                "SELECT (SELECT count(*) FROM checkouts),
                        (SELECT count(*) FROM checkouts WHERE watched = 1),
                        (SELECT count(*) FROM hook_deliveries WHERE state IN ('pending', 'running')),
                        (SELECT count(*) FROM hook_deliveries WHERE state = 'dead')",
                [],
                |row| {
                    Ok(LedgerCounts {
                        checkouts: row.get(0)?,
                        watched: row.get(1)?,
                        hooks_pending: row.get(2)?,
                        hooks_dead: row.get(3)?,
                    })
                },
            )
            .map_err(|e| self.error("counts", e))
    }

    /// SQLite's `data_version`: changes when another connection (a CLI `track`) commits.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn data_version(&self) -> Result<i64> {
        self.lock()
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(|e| self.error("data_version", e))
    }

    /// Takes the write lock and releases it without writing: proof that a write would go
    /// through (the health check).
    ///
    /// # Errors
    ///
    /// The file is read-only, locked by another writer past the busy timeout, or gone bad.
    pub(super) fn check_writable(&self) -> Result<()> {
        self.lock()
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .map_err(|e| self.error("write check", e))
    }
}

/// The conditions of a [`ListFilter`] (each ` AND …`, to follow a `WHERE`) and the values of
/// their placeholders, numbered from 1 and written by `placeholder` (`?1` for SQLite, `$1` for
/// PostgreSQL); `watched` is the backend's spelling of "is watched".
pub(super) fn list_conditions(
    filter: &ListFilter,
    placeholder: impl Fn(usize) -> String,
    watched: &str,
) -> (String, Vec<String>) {
    let mut conditions = String::new();
    let mut values: Vec<String> = Vec::new();
    if !filter.statuses.is_empty() {
        let mut parts = Vec::new();
        for status in &filter.statuses {
            if status.eq_ignore_ascii_case("UNVERIFIED") {
                parts.push("status IS NULL".to_owned());
            } else {
                values.push(CheckoutStatus::parse(status).as_str().to_owned());
                parts.push(format!("status = {}", placeholder(values.len())));
            }
        }
        conditions.push_str(&format!(" AND ({})", parts.join(" OR ")));
    }
    if let Some(order_id) = &filter.order_id {
        values.push(order_id.clone());
        conditions.push_str(&format!(" AND order_id = {}", placeholder(values.len())));
    }
    if filter.watched_only {
        conditions.push_str(&format!(" AND {watched}"));
    }
    (conditions, values)
}

// The refusal columns have names of their own, so the filters of `list` stay unambiguous.
pub(super) const CHECKOUT_COLUMNS: &str =
    "SELECT id, order_id, request_id, display_id, status, amount, currency,
        total_refunded, redirect_url, watched, watch_until, firebase_database, firebase_collection,
        firebase_document, tracked_via, created_at, updated_at, verified_at,
        refusal_code, refusal_message, refused_document, first_refused_at, last_refused_at,
        refusal_count, next_retry_at
     FROM checkouts LEFT JOIN listen_refusals ON listen_refusals.checkout_id = checkouts.id";

pub(super) fn checkout_from_row(row: &Row<'_>) -> rusqlite::Result<CheckoutRecord> {
    Ok(CheckoutRecord {
        id: row.get(0)?,
        order_id: row.get(1)?,
        request_id: row.get(2)?,
        display_id: row.get(3)?,
        status: row
            .get::<_, Option<String>>(4)?
            .map(|text| CheckoutStatus::parse(&text)),
        amount: row.get(5)?,
        currency: row.get(6)?,
        total_refunded: row.get(7)?,
        redirect_url: row.get(8)?,
        watched: row.get(9)?,
        watch_until: row.get(10)?,
        firebase: FirebaseCoordinates {
            database: row.get(11)?,
            collection: row.get(12)?,
            document: row.get(13)?,
        },
        tracked_via: row.get(14)?,
        created_at: row.get(15)?,
        updated_at: row.get(16)?,
        verified_at: row.get(17)?,
        listen_refused: match row.get::<_, Option<String>>(18)? {
            None => None,
            Some(code) => Some(ListenRefusal {
                code,
                message: row.get(19)?,
                document: row.get(20)?,
                first_refused_at: row.get(21)?,
                last_refused_at: row.get(22)?,
                count: row.get(23)?,
                next_retry_at: row.get(24)?,
            }),
        },
    })
}

pub(super) const TRANSITION_COLUMNS: &str =
    "SELECT id, checkout_id, from_status, to_status, source, changed_at,
        verified_at, latency_ms, verified_json, refunded_from, refunded_to FROM transitions";

pub(super) fn transition_from_row(row: &Row<'_>) -> rusqlite::Result<TransitionRecord> {
    Ok(TransitionRecord {
        id: row.get(0)?,
        checkout_id: row.get(1)?,
        from: row
            .get::<_, Option<String>>(2)?
            .map(|text| CheckoutStatus::parse(&text)),
        to: CheckoutStatus::parse(&row.get::<_, String>(3)?),
        source: row.get(4)?,
        changed_at: row.get(5)?,
        verified_at: row.get(6)?,
        latency_ms: row.get(7)?,
        verified_json: row.get(8)?,
        refunded_from: row.get(9)?,
        refunded_to: row.get(10)?,
    })
}
