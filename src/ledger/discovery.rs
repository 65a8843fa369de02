//! What discovery and the reconciler keep in the ledger: the epoch, rounds, found checkouts.
//!
//! Owns: `discovery_epoch` and `discovery_rounds`, recording the checkouts discovery found
//! (new ones, and Firebase coordinates for ones tracked without), and the open checkouts the
//! reconciler compares with paymennt's search.
//! Must never: record a status (discovered checkouts are tracked unverified), or write when a
//! round found nothing new.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::sqlite::{Sqlite, now, parse_time, refunded_total};
use super::transitions::{TrackOutcome, track_in};
use super::{Result, TrackedVia, timestamp};
use crate::domain::{CheckoutId, CheckoutStatus, VerifyTicket};
use crate::paymennt::wire::CheckoutFacts;

/// An open (watched) checkout as the reconciler compares it with a search result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenCheckout {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// The last verified status; `None` until verified.
    pub status: Option<CheckoutStatus>,
    /// The last verified refunded total (zero when paymennt gave none).
    pub total_refunded: rust_decimal::Decimal,
    /// Whether it must be verified with Get Checkout whatever a search says: a change was seen
    /// but not verified, or no status is recorded yet.
    pub needs_verify: bool,
    /// Whether it has a Firestore document to listen to (discovered checkouts may not).
    pub listened: bool,
    /// Whether a resume token is saved for it: Firestore then reports only changes after the
    /// token, not its current state.
    pub resumable: bool,
    /// Whether Firestore refused to watch its document at the last try.
    pub refused: bool,
    /// The ticket of the request whose answer was recorded last, if any.
    pub verified_with: Option<VerifyTicket>,
}

/// What [`Ledger::record_discovered`] did with one checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// What discovery changed.
    pub outcome: DiscoveredOutcome,
    /// Whether it has Firebase coordinates (else it is checked by the reconciler only).
    pub listened: bool,
}

/// What [`Ledger::record_discovered`] changed for one checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveredOutcome {
    /// The checkout is new to the ledger.
    Added,
    /// The checkout was tracked without Firebase coordinates (checked by the reconciler only)
    /// and now has them: it is moved onto the listener.
    Located,
}
impl Sqlite {
    /// When discovery first ran on this ledger (its epoch), setting it to `now` if it never
    /// ran. A checkout created before the epoch and first verified in a status that is not
    /// open is recorded as a baseline (see [`Source::DiscoveryImport`]).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn begin_discovery_epoch(&self, now_time: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "discovery epoch")?;
        let epoch: String = (|| {
            transaction.execute(
                "INSERT INTO discovery_epoch (id, epoch) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
                [timestamp(now_time)],
            )?;
            transaction.query_row("SELECT epoch FROM discovery_epoch WHERE id = 1", [], |row| {
                row.get(0)
            })
        })()
        .map_err(|e| self.error("discovery epoch", e))?;
        transaction
            .commit()
            .map_err(|e| self.error("discovery epoch", e))?;
        Ok(parse_time(&epoch).unwrap_or(now_time))
    }

    /// When the last complete discovery round for checkout type `kind` started, if one did.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn last_discovery_round(&self, kind: &str) -> Result<Option<DateTime<Utc>>> {
        let started: Option<String> = self
            .lock()
            .query_row(
                "SELECT started_at FROM discovery_rounds WHERE kind = ?1",
                [kind],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error("discovery round", e))?;
        Ok(started.as_deref().and_then(parse_time))
    }

    /// Records that a discovery round for checkout type `kind`, started at `started_at`, saw
    /// every page of its search: the next round searches from there (minus the overlap).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn finish_discovery_round(
        &self,
        kind: &str,
        started_at: DateTime<Utc>,
    ) -> Result<()> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "discovery round")?;
        transaction
            .execute(
                "INSERT INTO discovery_rounds (kind, started_at, finished_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind) DO UPDATE SET started_at = excluded.started_at,
                    finished_at = excluded.finished_at",
                params![kind, timestamp(started_at), now()],
            )
            .map_err(|e| self.error("discovery round", e))?;
        transaction
            .commit()
            .map_err(|e| self.error("discovery round", e))
    }

    /// Tracks the checkouts discovery found that the ledger does not have yet
    /// (`tracked_via = "discovery"`), and gives Firebase coordinates to tracked checkouts that
    /// had none (discovered earlier without them), which moves them onto the listener.
    ///
    /// One read finds which of `found` are new; only when something is new is anything
    /// written (one transaction), so a round over checkouts already tracked costs no write. A
    /// checkout without Firebase coordinates is tracked with empty ones: the reconciler checks
    /// it, the listener cannot. The result lists only what changed.
    ///
    /// # Errors
    ///
    /// SQL failures; nothing is written then.
    pub(super) fn record_discovered(&self, found: &[CheckoutFacts]) -> Result<Vec<Discovered>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::Value::from(
            found
                .iter()
                .map(|facts| facts.id.as_str())
                .collect::<Vec<_>>(),
        )
        .to_string();
        let known: std::collections::HashMap<String, bool> = {
            let connection = self.lock();
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, firebase_database <> '' FROM checkouts
                     WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(|e| self.error("discovery", e))?;
            let rows = statement
                .query_map([&ids], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(|e| self.error("discovery", e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| self.error("discovery", e))?
        };
        let mut seen = std::collections::HashSet::new();
        let changes: Vec<(&CheckoutFacts, DiscoveredOutcome)> = found
            .iter()
            .filter(|facts| seen.insert(facts.id.as_str()))
            .filter_map(|facts| match known.get(facts.id.as_str()) {
                None => Some((facts, DiscoveredOutcome::Added)),
                Some(false) if facts.location.is_some() => {
                    Some((facts, DiscoveredOutcome::Located))
                }
                Some(_) => None,
            })
            .collect();
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "discovery")?;
        let mut recorded = Vec::with_capacity(changes.len());
        for (facts, outcome) in changes {
            let changed = match outcome {
                DiscoveredOutcome::Added => {
                    track_in(&transaction, facts, TrackedVia::Discovery, true)
                        .map(|tracked| tracked == TrackOutcome::Added)
                }
                DiscoveredOutcome::Located => locate_in(&transaction, facts),
            }
            .map_err(|e| self.error("discovery", e))?;
            if !changed {
                continue;
            }
            recorded.push(Discovered {
                checkout_id: facts.id.clone(),
                outcome,
                listened: facts.location.is_some(),
            });
        }
        transaction
            .commit()
            .map_err(|e| self.error("discovery", e))?;
        Ok(recorded)
    }

    /// Every watched checkout with what the reconciler compares (listened to or not), by id.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn open_checkouts(&self) -> Result<Vec<OpenCheckout>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, status, total_refunded, needs_verify, firebase_database <> '',
                        EXISTS (SELECT 1 FROM listen_targets t WHERE t.checkout_id = checkouts.id),
                        EXISTS (SELECT 1 FROM listen_refusals r WHERE r.checkout_id = checkouts.id),
                        verify_requested_ticket
                 FROM checkouts WHERE watched = 1 ORDER BY id",
            )
            .map_err(|e| self.error("open checkouts", e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, bool>(3)?,
                    row.get::<_, bool>(4)?,
                    row.get::<_, bool>(5)?,
                    row.get::<_, bool>(6)?,
                    row.get::<_, Option<i64>>(7)?,
                ))
            })
            .map_err(|e| self.error("open checkouts", e))?;
        let mut open = Vec::new();
        for row in rows {
            let (id, status, refunded, needs_verify, listened, resumable, refused, verified_with) =
                row.map_err(|e| self.error("open checkouts", e))?;
            let Ok(checkout_id) = id.parse::<CheckoutId>() else {
                tracing::warn!(checkout = %crate::domain::printable(&id), "skipping a ledger row with an invalid id");
                continue;
            };
            open.push(OpenCheckout {
                checkout_id,
                needs_verify: needs_verify || status.is_none(),
                status: status.as_deref().map(CheckoutStatus::parse),
                total_refunded: refunded_total(refunded.as_deref()),
                listened,
                resumable,
                refused,
                verified_with: verified_with.map(VerifyTicket::new),
            });
        }
        Ok(open)
    }
}

/// Gives a checkout tracked without Firebase coordinates the ones in `facts`.
pub(super) fn locate_in(
    transaction: &rusqlite::Transaction<'_>,
    facts: &CheckoutFacts,
) -> rusqlite::Result<bool> {
    let Some(location) = &facts.location else {
        return Ok(false);
    };
    let changed = transaction
        .prepare_cached(
            "UPDATE checkouts SET firebase_database = ?2, firebase_collection = ?3,
                firebase_document = ?4, updated_at = ?5
             WHERE id = ?1 AND firebase_database = ''",
        )?
        .execute(params![
            facts.id.as_str(),
            location.project,
            location.collection,
            location.document,
            now(),
        ])?;
    Ok(changed == 1)
}
