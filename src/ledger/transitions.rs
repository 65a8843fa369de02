//! Recording checkouts and their verified transitions, with the hook outbox's fan-out.
//!
//! Owns: `track` (a checkout to watch), `apply` and `apply_all` (a verified answer becomes a
//! history entry and one queued delivery per matching hook, in one transaction; the refund
//! watch of settled checkouts; baselines of discovered checkouts).
//! Must never: record a status that did not come from Get Checkout (only a
//! [`VerifiedCheckout`] is applied), or apply an answer older than one already applied.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::queries::{TRANSITION_COLUMNS, TransitionRecord, transition_from_row};
use super::sqlite::{Sqlite, now, parse_time, refunded_total};
use super::{LedgerError, Result, TrackedVia, outbox, timestamp};
use crate::domain::{CheckoutId, CheckoutStatus, Source};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::CheckoutFacts;
use crate::settings::HookSettings;

/// Whether `track` added a checkout or already had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackOutcome {
    /// The checkout is new to the ledger.
    Added,
    /// The checkout was already tracked; nothing changed.
    AlreadyTracked,
}
/// What [`Ledger::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The status or the refunded total changed: a history entry and its hook deliveries were
    /// written (a refund that left the status unchanged goes to hooks of PARTIALLY_REFUNDED).
    Transition {
        /// The new transition.
        transition: Box<TransitionRecord>,
        /// Event ids of the deliveries queued for it.
        deliveries: Vec<String>,
        /// Whether the checkout is still watched.
        watched: bool,
    },
    /// The verified status equals the recorded one; only the verification time was updated.
    Unchanged,
    /// The answer is older than one already applied (its request has an earlier ticket); it
    /// was ignored and changed nothing: a pending verification stays pending.
    Stale,
}
/// A verified answer to record with [`Ledger::apply_all`].
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    /// What Get Checkout said.
    pub verified: VerifiedCheckout,
    /// What noticed the change.
    pub source: Source,
    /// When the change happened upstream, if known.
    pub changed_at: Option<DateTime<Utc>>,
}
impl Sqlite {
    /// Records a checkout to watch. Tracking the same checkout again changes nothing.
    ///
    /// The status in `facts` is not recorded: only a verified status is. It stays empty until
    /// the daemon (or `track --checkout-id`) verifies it.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn track(&self, facts: &CheckoutFacts, via: TrackedVia) -> Result<TrackOutcome> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "track")?;
        let outcome =
            track_in(&transaction, facts, via, false).map_err(|e| self.error("track", e))?;
        transaction.commit().map_err(|e| self.error("track", e))?;
        Ok(outcome)
    }

    /// Records a verified checkout: tracks it if new, and if its status differs from the
    /// recorded one, appends a transition and queues one delivery per matching hook, all in
    /// one transaction.
    ///
    /// `refund_watch` is how long a PAID checkout stays watched.
    ///
    /// # Errors
    ///
    /// SQL failures; nothing is written then.
    pub(super) fn apply(
        &self,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "apply")?;
        let outcome = apply_in(
            &transaction,
            verified,
            source,
            changed_at,
            hooks,
            refund_watch,
        )
        .map_err(|e| self.error("apply", e))?;
        transaction.commit().map_err(|e| self.error("apply", e))?;
        Ok(outcome)
    }

    /// Records several verified answers in one transaction, so one fsync covers them all
    /// (group commit): each is applied exactly as [`Ledger::apply`] would, in order, and the
    /// outcomes come back in the same order. If any of them fails, none of the group is
    /// written and each is applied again in a transaction of its own, so one failing answer
    /// fails alone.
    pub(super) fn apply_all(
        &self,
        requests: &[ApplyRequest],
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Vec<Result<ApplyOutcome>> {
        let apply_one = |request: &ApplyRequest| {
            self.apply(
                &request.verified,
                request.source,
                request.changed_at,
                hooks,
                refund_watch,
            )
        };
        if requests.len() <= 1 {
            return requests.iter().map(apply_one).collect();
        }
        let together = {
            let mut connection = self.lock();
            (|| {
                let transaction = self.write(&mut connection, "apply")?;
                let mut outcomes = Vec::with_capacity(requests.len());
                for request in requests {
                    let outcome = apply_in(
                        &transaction,
                        &request.verified,
                        request.source,
                        request.changed_at,
                        hooks,
                        refund_watch,
                    )
                    .map_err(|e| self.error("apply", e))?;
                    outcomes.push(outcome);
                }
                transaction.commit().map_err(|e| self.error("apply", e))?;
                Ok::<_, LedgerError>(outcomes)
            })()
        };
        match together {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(error) => {
                tracing::debug!(%error, answers = requests.len(), "a group of answers failed together; recording each on its own");
                requests.iter().map(apply_one).collect()
            }
        }
    }
}

/// Why a checkout cannot be inserted: it has nowhere to be watched.
#[derive(Debug)]
struct NoLocation(CheckoutId);

impl std::fmt::Display for NoLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkout {} is not tracked and paymennt's answer has no Firebase coordinates \
             (firebaseDatabase, firebaseCollection, firebaseDocument); track its create-link response",
            self.0
        )
    }
}

impl std::error::Error for NoLocation {}

pub(super) fn track_in(
    transaction: &rusqlite::Transaction<'_>,
    facts: &CheckoutFacts,
    via: TrackedVia,
    reconcile_only_allowed: bool,
) -> rusqlite::Result<TrackOutcome> {
    let (project, collection, document) = match &facts.location {
        Some(location) => (
            location.project.as_str(),
            location.collection.as_str(),
            location.document.as_str(),
        ),
        None if reconcile_only_allowed => ("", "", ""),
        None => {
            return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
                NoLocation(facts.id.clone()),
            )));
        }
    };
    let time = now();
    let inserted = transaction
        .prepare_cached(
            "INSERT INTO checkouts (id, order_id, request_id, display_id, amount, currency, status,
                total_refunded, redirect_url, firebase_database, firebase_collection,
                firebase_document, watched, needs_verify, tracked_via, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?8, ?9, ?10, ?11, 1, 1, ?12, ?13, ?13)
         ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            facts.id.as_str(),
            facts.order_id,
            facts.request_id,
            facts.display_id,
            facts.amount.to_string(),
            facts.currency.as_str(),
            facts.total_refunded.map(|d| d.to_string()),
            facts.redirect_url,
            project,
            collection,
            document,
            via.as_str(),
            time,
        ])?;
    Ok(if inserted == 1 {
        TrackOutcome::Added
    } else {
        TrackOutcome::AlreadyTracked
    })
}

pub(super) fn apply_in(
    transaction: &rusqlite::Transaction<'_>,
    verified: &VerifiedCheckout,
    source: Source,
    changed_at: Option<DateTime<Utc>>,
    hooks: &[HookSettings],
    refund_watch: Duration,
) -> rusqlite::Result<ApplyOutcome> {
    let facts = verified.facts();
    let status = verified.status();
    let id = facts.id.as_str();
    let ticket = verified.ticket().number();
    type Existing = (Option<String>, Option<i64>, Option<String>, String);
    let existing: Option<Existing> = transaction
        .prepare_cached(
            "SELECT status, verify_requested_ticket, total_refunded, tracked_via
             FROM checkouts WHERE id = ?1",
        )?
        .query_row([id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let (previous, previous_refunded, tracked_via) = match existing {
        None => {
            let via = match source {
                Source::Manual => TrackedVia::TrackFetch,
                _ => TrackedVia::Track,
            };
            track_in(transaction, facts, via, false)?;
            (None, None, via.as_str().to_owned())
        }
        // An answer to a request sent before the one already applied says nothing newer, and
        // could say something older: it is ignored.
        Some((_, Some(applied), _, _)) if applied > ticket => return Ok(ApplyOutcome::Stale),
        Some((status, _, refunded, via)) => (status, refunded, via),
    };
    let source = if previous.is_none()
        && tracked_via == TrackedVia::Discovery.as_str()
        && is_baseline_in(transaction, verified)?
    {
        Source::DiscoveryImport
    } else {
        source
    };
    // A change of the refunded total counts only once a status was verified: before that, the
    // recorded total is a tracked claim, not history.
    let refunded_now = facts.total_refunded.unwrap_or(rust_decimal::Decimal::ZERO);
    let refunded_before = refunded_total(previous_refunded.as_deref());
    let refund_changed = previous.is_some() && refunded_now != refunded_before;
    let verified_at = verified.verified_at();
    let verified_text = timestamp(verified_at);
    // What paymennt said about the order replaces what a tracked response claimed; the change
    // flag clears only if this request's ticket was issued after the earliest change not yet
    // verified was seen.
    transaction
        .prepare_cached(
            "UPDATE checkouts SET
                order_id = coalesce(?2, order_id), request_id = coalesce(?3, request_id),
                display_id = coalesce(?4, display_id), amount = ?5, currency = ?6,
                total_refunded = ?7, redirect_url = coalesce(?8, redirect_url),
                verified_at = ?9, verify_requested_ticket = ?10, not_found_count = 0,
                needs_verify = CASE WHEN needs_verify_after IS NULL OR needs_verify_after < ?10
                                    THEN 0 ELSE needs_verify END,
                needs_verify_after = CASE WHEN needs_verify_after < ?10
                                    THEN NULL ELSE needs_verify_after END,
                updated_at = ?9
         WHERE id = ?1",
        )?
        .execute(params![
            id,
            facts.order_id,
            facts.request_id,
            facts.display_id,
            facts.amount.to_string(),
            facts.currency.as_str(),
            facts.total_refunded.map(|d| d.to_string()),
            facts.redirect_url,
            verified_text,
            ticket,
        ])?;
    let previous_status = previous.as_deref().map(CheckoutStatus::parse);
    let status_changed = previous_status.as_ref() != Some(status);
    if !status_changed && !refund_changed {
        return Ok(ApplyOutcome::Unchanged);
    }
    let refunded_from = refund_changed.then(|| refunded_before.to_string());
    let refunded_to = facts.total_refunded.map(|d| d.to_string());
    if !status_changed {
        // A refund that left the status as it was (a second partial refund): its own entry,
        // for the hooks of PARTIALLY_REFUNDED. The watch is unchanged.
        return record_entry(
            transaction,
            verified,
            source,
            changed_at,
            previous.as_deref(),
            (refunded_from, refunded_to),
            hooks
                .iter()
                .filter(|hook| hook.fires_on(&CheckoutStatus::PartiallyRefunded)),
            true,
        );
    }
    let (watched, watch_until) = if status.is_final() {
        (false, None)
    } else if status.is_settled() {
        let until = chrono::Duration::from_std(refund_watch)
            .ok()
            .and_then(|d| verified_at.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        (true, Some(timestamp(until)))
    } else {
        (true, None)
    };
    transaction
        .prepare_cached(
            "UPDATE checkouts SET status = ?2, watched = ?3, watch_until = ?4 WHERE id = ?1",
        )?
        .execute(params![id, status.as_str(), watched, watch_until])?;
    if !watched {
        transaction
            .prepare_cached("DELETE FROM listen_targets WHERE checkout_id = ?1")?
            .execute([id])?;
    }
    // A baseline is history, not news: no hook is told of it.
    let told = source != Source::DiscoveryImport;
    record_entry(
        transaction,
        verified,
        source,
        changed_at,
        previous.as_deref(),
        (refunded_from, refunded_to),
        hooks.iter().filter(|hook| told && hook.fires_on(status)),
        watched,
    )
}

/// Whether the first verified status of a checkout discovery found is a baseline: a status it
/// reached before paywatch could have seen it. That is a status that is not open, of a checkout
/// paymennt created before discovery's epoch (when discovery first ran on this ledger). A
/// checkout created after the epoch is new business, whatever status it is first seen in; one
/// whose answer carries no readable creation time is treated as new business too (a hook told
/// twice can deduplicate on the order; a hook never told cannot act).
pub(super) fn is_baseline_in(
    transaction: &rusqlite::Transaction<'_>,
    verified: &VerifiedCheckout,
) -> rusqlite::Result<bool> {
    if verified.status().is_open() {
        return Ok(false);
    }
    let Some(created) = verified.created_at() else {
        return Ok(false);
    };
    let epoch: Option<String> = transaction
        .prepare_cached("SELECT epoch FROM discovery_epoch WHERE id = 1")?
        .query_row([], |row| row.get(0))
        .optional()?;
    Ok(epoch
        .as_deref()
        .and_then(parse_time)
        .is_some_and(|epoch| created < epoch))
}

/// Appends one history entry and queues a delivery for each of `hooks`.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_entry<'h>(
    transaction: &rusqlite::Transaction<'_>,
    verified: &VerifiedCheckout,
    source: Source,
    changed_at: Option<DateTime<Utc>>,
    previous: Option<&str>,
    (refunded_from, refunded_to): (Option<String>, Option<String>),
    hooks: impl Iterator<Item = &'h HookSettings>,
    watched: bool,
) -> rusqlite::Result<ApplyOutcome> {
    let id = verified.id().as_str();
    let verified_at = verified.verified_at();
    let latency_ms = changed_at.map(|changed| (verified_at - changed).num_milliseconds().max(0));
    transaction
        .prepare_cached(
            "INSERT INTO transitions (checkout_id, from_status, to_status, source, changed_at,
                verified_at, latency_ms, verified_json, refunded_from, refunded_to)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            id,
            previous,
            verified.status().as_str(),
            source.as_str(),
            changed_at.map(timestamp),
            timestamp(verified_at),
            latency_ms,
            verified.raw_json(),
            refunded_from,
            refunded_to,
        ])?;
    let transition_id = transaction.last_insert_rowid();
    let mut deliveries = Vec::new();
    for hook in hooks {
        deliveries.push(outbox::queue_in(
            transaction,
            transition_id,
            id,
            &hook.name,
            false,
        )?);
    }
    let transition = transaction
        .prepare_cached(&format!("{TRANSITION_COLUMNS} WHERE id = ?1"))?
        .query_row([transition_id], transition_from_row)?;
    Ok(ApplyOutcome::Transition {
        transition: Box::new(transition),
        deliveries,
        watched,
    })
}
