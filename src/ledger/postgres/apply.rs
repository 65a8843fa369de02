//! The ledger's writes of the verification path on PostgreSQL: verified answers and their
//! history and outbox fan-out, tickets and change notes, "not found" counts, discovery's finds,
//! listen refusals and the refund watch.
//!
//! Owns: the PostgreSQL SQL of `apply`/`apply_all` (with baselines and the refund watch),
//! `issue_tickets`, `note_changes`, `note_not_found`, `record_discovered`, `open_checkouts`,
//! listen refusals and `expire_refund_watch`, with the semantics of their SQLite counterparts
//! (`transitions.rs`, `tickets.rs`, `discovery.rs`, `listen_state.rs`).
//! Must never: write outside a transaction begun with [`PgStore::begin_write`] (the fence), record
//! a status that did not come from Get Checkout, or apply an answer older than one applied.
//!
//! A checkout's row is locked (`FOR UPDATE`) before an answer is applied to it, so two answers
//! for one checkout are applied one after the other as SQLite's single writer would.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PgError, PgStore};
use crate::domain::{CheckoutId, CheckoutStatus, Source, TrackedVia, VerifyTicket};
use crate::ledger::{
    ApplyOutcome, ApplyRequest, Discovered, DiscoveredOutcome, LookingGone, NOT_FOUND_LIMIT,
    NotFoundOutcome, NotedChanges, OpenCheckout, TrackOutcome, TransitionRecord, timestamp,
};
use crate::paymennt::VerifiedCheckout;
use crate::paymennt::wire::CheckoutFacts;
use crate::settings::HookSettings;

/// A time as the SQLite ledger keeps it: to the millisecond (so both ledgers compare and show
/// times alike).
pub(super) fn millis(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(3)
}

/// The process's clock, to the millisecond (SQLite's `now()`: the daemon's own clock, the one
/// it compares due times with).
pub(super) fn now_ms() -> DateTime<Utc> {
    millis(Utc::now())
}

/// The columns of a transition, in the order [`transition_from_row`] reads them.
pub(super) const TRANSITION_COLUMNS: &str = "id, checkout_id, from_status, to_status, source, \
     changed_at, verified_at, latency_ms, verified_json, refunded_from::TEXT, refunded_to::TEXT";

/// A checkout's new watch: whether it is watched, and until when (a settled checkout).
type Watch = (bool, Option<DateTime<Utc>>);

/// Writes a verified answer's facts on its checkout ($1 the id, $2..$8 the facts, $9 the
/// verification time, $10 the request's ticket); a caller may add conditions.
const UPDATE_VERIFIED: &str = "UPDATE checkouts SET
        order_id = coalesce($2, order_id), request_id = coalesce($3, request_id),
        display_id = coalesce($4, display_id), amount = CAST($5::TEXT AS NUMERIC),
        currency = $6, total_refunded = CAST($7::TEXT AS NUMERIC),
        redirect_url = coalesce($8, redirect_url),
        verified_at = $9, verify_requested_ticket = $10, not_found_count = 0,
        needs_verify = CASE WHEN needs_verify_after IS NULL OR needs_verify_after < $10
                            THEN FALSE ELSE needs_verify END,
        needs_verify_after = CASE WHEN needs_verify_after < $10
                            THEN NULL ELSE needs_verify_after END,
        updated_at = $9
     WHERE id = $1";

pub(super) fn transition_from_row(row: &Row) -> Result<TransitionRecord, tokio_postgres::Error> {
    Ok(TransitionRecord {
        id: row.try_get(0)?,
        checkout_id: row.try_get(1)?,
        from: row
            .try_get::<_, Option<String>>(2)?
            .as_deref()
            .map(CheckoutStatus::parse),
        to: CheckoutStatus::parse(row.try_get(3)?),
        source: row.try_get(4)?,
        changed_at: row.try_get::<_, Option<DateTime<Utc>>>(5)?.map(timestamp),
        verified_at: timestamp(row.try_get(6)?),
        latency_ms: row.try_get(7)?,
        verified_json: row.try_get(8)?,
        refunded_from: row.try_get(9)?,
        refunded_to: row.try_get(10)?,
    })
}

impl PgStore {
    /// Inserts a checkout to watch in the caller's transaction. Without Firebase coordinates
    /// only `reconcile_only_allowed` (discovery) inserts it, with empty coordinates.
    pub(super) async fn track_in(
        &self,
        transaction: &Transaction<'_>,
        facts: &CheckoutFacts,
        via: TrackedVia,
        reconcile_only_allowed: bool,
    ) -> Result<TrackOutcome, PgError> {
        let (project, collection, document) = match &facts.location {
            Some(location) => (
                location.project.as_str(),
                location.collection.as_str(),
                location.document.as_str(),
            ),
            None if reconcile_only_allowed => ("", "", ""),
            None => {
                return Err(PgError::Database {
                    target: self.target().describe().to_owned(),
                    detail: format!(
                        "checkout {} is not tracked and paymennt's answer has no Firebase \
                         coordinates (firebaseDatabase, firebaseCollection, firebaseDocument); \
                         track its create-link response",
                        facts.id
                    ),
                });
            }
        };
        let statement = transaction
            .prepare_cached(
                "INSERT INTO checkouts (id, order_id, request_id, display_id, amount, currency,
                    status, total_refunded, redirect_url, firebase_database, firebase_collection,
                    firebase_document, watched, needs_verify, tracked_via, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, CAST($5::TEXT AS NUMERIC), $6, NULL,
                    CAST($7::TEXT AS NUMERIC), $8, $9, $10, $11, TRUE, TRUE, $12, $13, $13)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await
            .map_err(|error| self.db(&error))?;
        let inserted = transaction
            .execute(
                &statement,
                &[
                    &facts.id.as_str(),
                    &facts.order_id,
                    &facts.request_id,
                    &facts.display_id,
                    &facts.amount.to_string(),
                    &facts.currency.as_str(),
                    &facts.total_refunded.map(|total| total.to_string()),
                    &facts.redirect_url,
                    &project,
                    &collection,
                    &document,
                    &via.as_str(),
                    &now_ms(),
                ],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(if inserted == 1 {
            TrackOutcome::Added
        } else {
            TrackOutcome::AlreadyTracked
        })
    }

    /// Records a verified checkout (see [`crate::ledger::Backend::apply`]), in one fenced
    /// transaction.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; an untracked checkout without coordinates; database
    /// failures. Nothing is written then.
    pub async fn apply(
        &self,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome, PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let outcome = self
            .apply_in(
                &transaction,
                verified,
                source,
                changed_at,
                hooks,
                refund_watch,
            )
            .await?;
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(outcome)
    }

    /// Several verified answers in one transaction, in order; if any fails, none of the group
    /// is written and each is applied in a transaction of its own (see
    /// [`crate::ledger::Backend::apply_all`]).
    pub async fn apply_all(
        &self,
        requests: &[ApplyRequest],
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Vec<Result<ApplyOutcome, PgError>> {
        if requests.len() > 1 {
            match self.apply_together(requests, hooks, refund_watch).await {
                Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
                Err(error) => {
                    tracing::debug!(%error, answers = requests.len(), "a group of answers failed together; recording each on its own");
                }
            }
        }
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            outcomes.push(
                self.apply(
                    &request.verified,
                    request.source,
                    request.changed_at,
                    hooks,
                    refund_watch,
                )
                .await,
            );
        }
        outcomes
    }

    async fn apply_together(
        &self,
        requests: &[ApplyRequest],
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<Vec<ApplyOutcome>, PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        // Every checkout of the group locked first, in id order (the answers are then applied
        // in the caller's order): see `lock_in_order`.
        let mut ids: Vec<&str> = requests
            .iter()
            .map(|request| request.verified.facts().id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        lock_in_order(&transaction, &ids, "FOR UPDATE")
            .await
            .map_err(|error| self.db(&error))?;
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            outcomes.push(
                self.apply_in(
                    &transaction,
                    &request.verified,
                    request.source,
                    request.changed_at,
                    hooks,
                    refund_watch,
                )
                .await?,
            );
        }
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(outcomes)
    }

    async fn apply_in(
        &self,
        transaction: &Transaction<'_>,
        verified: &VerifiedCheckout,
        source: Source,
        changed_at: Option<DateTime<Utc>>,
        hooks: &[HookSettings],
        refund_watch: Duration,
    ) -> Result<ApplyOutcome, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let facts = verified.facts();
        let status = verified.status();
        let id = facts.id.as_str();
        let ticket = verified.ticket().number();
        let verified_at = millis(verified.verified_at());
        let amount = facts.amount.to_string();
        let refunded_text = facts.total_refunded.map(|total| total.to_string());
        let update: [&(dyn ToSql + Sync); 10] = [
            &id,
            &facts.order_id,
            &facts.request_id,
            &facts.display_id,
            &amount,
            &facts.currency.as_str(),
            &refunded_text,
            &facts.redirect_url,
            &verified_at,
            &ticket,
        ];
        // One round trip: the recorded row, locked (two answers for one checkout apply one
        // after the other), and the verified facts written unless this answer is stale. What
        // paymennt said about the order replaces what a tracked response claimed; the change
        // flag clears only if this request's ticket was issued after the earliest change not
        // yet verified was seen.
        let statement = transaction
            .prepare_cached(&format!(
                "WITH old AS (
                     SELECT status, verify_requested_ticket, total_refunded::TEXT, tracked_via
                     FROM checkouts WHERE id = $1 FOR UPDATE),
                 updated AS ({UPDATE_VERIFIED}
                     AND (verify_requested_ticket IS NULL OR verify_requested_ticket <= $10)
                     RETURNING 1)
                 SELECT * FROM old"
            ))
            .await
            .map_err(db)?;
        let mut existing = transaction
            .query_opt(&statement, &update)
            .await
            .map_err(db)?;
        if existing.is_none() {
            // New to the ledger: insert it (a concurrent answer for the same checkout waits on
            // the insert, or this one on its), then read it locked and write the facts as for
            // any tracked checkout, so of two first answers one follows the other.
            let via = match source {
                Source::Manual => TrackedVia::TrackFetch,
                _ => TrackedVia::Track,
            };
            self.track_in(transaction, facts, via, false).await?;
            existing = transaction
                .query_opt(&statement, &update)
                .await
                .map_err(db)?;
        }
        let Some(row) = existing else {
            return Err(PgError::Database {
                target: self.target().describe().to_owned(),
                detail: format!("checkout {id} vanished while its answer was recorded"),
            });
        };
        let applied: Option<i64> = row.try_get(1).map_err(db)?;
        // An answer to a request sent before the one already applied says nothing newer, and
        // could say something older: it was ignored (not written).
        if applied.is_some_and(|applied| applied > ticket) {
            return Ok(ApplyOutcome::Stale);
        }
        let previous: Option<String> = row.try_get(0).map_err(db)?;
        let previous_refunded: Option<String> = row.try_get(2).map_err(db)?;
        let tracked_via: String = row.try_get(3).map_err(db)?;
        let source = if previous.is_none()
            && tracked_via == TrackedVia::Discovery.as_str()
            && self.is_baseline_in(transaction, verified).await?
        {
            Source::DiscoveryImport
        } else {
            source
        };
        // A change of the refunded total counts only once a status was verified: before that,
        // the recorded total is a tracked claim, not history.
        let refunded_now = facts.total_refunded.unwrap_or(rust_decimal::Decimal::ZERO);
        let refunded_before = previous_refunded
            .as_deref()
            .and_then(crate::domain::parse_decimal)
            .unwrap_or(rust_decimal::Decimal::ZERO);
        let refund_changed = previous.is_some() && refunded_now != refunded_before;
        let previous_status = previous.as_deref().map(CheckoutStatus::parse);
        let status_changed = previous_status.as_ref() != Some(status);
        if !status_changed && !refund_changed {
            return Ok(ApplyOutcome::Unchanged);
        }
        let refunded = (
            refund_changed.then(|| refunded_before.to_string()),
            refunded_text,
        );
        if !status_changed {
            // A refund that left the status as it was: its own entry, for the hooks of
            // PARTIALLY_REFUNDED. The watch is unchanged.
            let hooks: Vec<&HookSettings> = hooks
                .iter()
                .filter(|hook| hook.fires_on(&CheckoutStatus::PartiallyRefunded))
                .collect();
            return self
                .record_entry(
                    transaction,
                    verified,
                    (source, changed_at),
                    previous.as_deref(),
                    refunded,
                    &hooks,
                    (true, None),
                )
                .await;
        }
        let watch = if status.is_final() {
            (false, None)
        } else if status.is_settled() {
            let until = chrono::Duration::from_std(refund_watch)
                .ok()
                .and_then(|period| verified_at.checked_add_signed(period))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            (true, Some(until))
        } else {
            (true, None)
        };
        // A baseline is history, not news: no hook is told of it.
        let told = source != Source::DiscoveryImport;
        let hooks: Vec<&HookSettings> = hooks
            .iter()
            .filter(|hook| told && hook.fires_on(status))
            .collect();
        self.record_entry(
            transaction,
            verified,
            (source, changed_at),
            previous.as_deref(),
            refunded,
            &hooks,
            (watch.0, Some(watch)),
        )
        .await
    }

    /// Whether a discovered checkout's first verified status is a baseline (as SQLite's
    /// `is_baseline_in`): not open, and created before discovery's epoch.
    async fn is_baseline_in(
        &self,
        transaction: &Transaction<'_>,
        verified: &VerifiedCheckout,
    ) -> Result<bool, PgError> {
        if verified.status().is_open() {
            return Ok(false);
        }
        let Some(created) = verified.created_at() else {
            return Ok(false);
        };
        let row = transaction
            .query_opt("SELECT epoch FROM discovery_epoch WHERE id = 1", &[])
            .await
            .map_err(|error| self.db(&error))?;
        let epoch: Option<DateTime<Utc>> = row.map(|row| row.get(0));
        Ok(epoch.is_some_and(|epoch| created < epoch))
    }

    /// Appends one history entry and queues a delivery for each of `hooks`. With a new watch
    /// (`Some((watched, watch_until))`: the status changed), the checkout's status and watch are
    /// written in the same statement, and its resume token dropped when it is no longer
    /// watched.
    #[allow(clippy::too_many_arguments)]
    async fn record_entry(
        &self,
        transaction: &Transaction<'_>,
        verified: &VerifiedCheckout,
        (source, changed_at): (Source, Option<DateTime<Utc>>),
        previous: Option<&str>,
        (refunded_from, refunded_to): (Option<String>, Option<String>),
        hooks: &[&HookSettings],
        (watched, new_watch): (bool, Option<Watch>),
    ) -> Result<ApplyOutcome, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let id = verified.id().as_str();
        let verified_at = millis(verified.verified_at());
        let changed_at = changed_at.map(millis);
        let latency_ms =
            changed_at.map(|changed| (verified_at - changed).num_milliseconds().max(0));
        let status = verified.status().as_str();
        let source = source.as_str();
        let raw = verified.raw_json();
        let mut parameters: Vec<&(dyn ToSql + Sync)> = vec![
            &id,
            &previous,
            &status,
            &source,
            &changed_at,
            &verified_at,
            &latency_ms,
            &raw,
            &refunded_from,
            &refunded_to,
        ];
        let insert = format!(
            "INSERT INTO transitions (checkout_id, from_status, to_status, source, changed_at,
                verified_at, latency_ms, verified_json, refunded_from, refunded_to)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CAST($9::TEXT AS NUMERIC),
                CAST($10::TEXT AS NUMERIC))
             RETURNING {TRANSITION_COLUMNS}"
        );
        let watch_until;
        let sql = match &new_watch {
            None => insert,
            Some((still_watched, until)) => {
                watch_until = *until;
                parameters.push(still_watched);
                parameters.push(&watch_until);
                format!(
                    "WITH moved AS (
                         UPDATE checkouts SET status = $3, watched = $11, watch_until = $12
                         WHERE id = $1),
                     dropped AS (
                         DELETE FROM listen_targets WHERE checkout_id = $1 AND NOT $11)
                     {insert}"
                )
            }
        };
        let statement = transaction.prepare_cached(&sql).await.map_err(db)?;
        let row = transaction
            .query_one(&statement, &parameters)
            .await
            .map_err(db)?;
        let transition = transition_from_row(&row).map_err(db)?;
        let names: Vec<&str> = hooks.iter().map(|hook| hook.name.as_str()).collect();
        let deliveries = self
            .queue_all_in(transaction, transition.id, id, &names, false)
            .await?;
        Ok(ApplyOutcome::Transition {
            transition: Box::new(transition),
            deliveries,
            watched,
        })
    }

    /// Tickets for several verifications in one transaction (see
    /// [`crate::ledger::Backend::issue_tickets`]).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn issue_tickets(
        &self,
        wanted: &[(CheckoutId, Option<VerifyTicket>)],
    ) -> Result<Vec<Option<VerifyTicket>>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let requested = transaction
            .prepare_cached("SELECT verify_requested_ticket FROM checkouts WHERE id = $1")
            .await
            .map_err(db)?;
        let next = transaction
            .prepare_cached("UPDATE verify_tickets SET last = last + 1 WHERE id = 1 RETURNING last")
            .await
            .map_err(db)?;
        let mut tickets = Vec::with_capacity(wanted.len());
        for (id, seen_after) in wanted {
            if let Some(seen_after) = seen_after {
                let row = transaction
                    .query_opt(&requested, &[&id.as_str()])
                    .await
                    .map_err(db)?;
                let applied: Option<i64> = row.and_then(|row| row.get(0));
                if applied.is_some_and(|applied| applied > seen_after.number()) {
                    tickets.push(None);
                    continue;
                }
            }
            let row = transaction.query_one(&next, &[]).await.map_err(db)?;
            tickets.push(Some(VerifyTicket::new(row.get(0))));
        }
        transaction.commit().await.map_err(db)?;
        Ok(tickets)
    }

    /// Notes changes on `ids` and issues one ticket per id (see
    /// [`crate::ledger::Backend::note_changes`]). The counter's row is locked by the increment
    /// for the rest of the transaction, so `seen_after` is the counter just before this call's
    /// tickets.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn note_changes(&self, ids: &[CheckoutId]) -> Result<NotedChanges, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let count = i64::try_from(ids.len()).unwrap_or(i64::MAX);
        let statement = transaction
            .prepare_cached(
                "UPDATE verify_tickets SET last = last + $1 WHERE id = 1 RETURNING last",
            )
            .await
            .map_err(db)?;
        let last: i64 = transaction
            .query_one(&statement, &[&count])
            .await
            .map_err(db)?
            .get(0);
        let seen_after = VerifyTicket::new(last - count);
        self.mark_in(&transaction, ids, seen_after).await?;
        transaction.commit().await.map_err(db)?;
        Ok(NotedChanges {
            seen_after,
            tickets: (last - count + 1..=last).map(VerifyTicket::new).collect(),
        })
    }

    /// Marks `ids` as changed since `seen_after`, in a fenced transaction of its own (the
    /// SQLite store's test-only `mark_needs_verify`).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    #[cfg(test)]
    pub(crate) async fn mark_needs_verify(
        &self,
        ids: &[CheckoutId],
        seen_after: VerifyTicket,
    ) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        self.mark_in(&transaction, ids, seen_after).await?;
        transaction.commit().await.map_err(|error| self.db(&error))
    }

    /// Marks `ids` as changed since `seen_after` (SQLite's `mark_in`).
    pub(super) async fn mark_in(
        &self,
        transaction: &Transaction<'_>,
        ids: &[CheckoutId],
        seen_after: VerifyTicket,
    ) -> Result<(), PgError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = ids.iter().map(CheckoutId::as_str).collect();
        let statement = transaction
            .prepare_cached(
                "UPDATE checkouts SET needs_verify = TRUE,
                        needs_verify_after = coalesce(needs_verify_after, $2)
                 WHERE id = ANY($1)
                   AND (verify_requested_ticket IS NULL OR verify_requested_ticket <= $2)",
            )
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .execute(&statement, &[&ids, &seen_after.number()])
            .await
            .map_err(|error| self.db(&error))?;
        Ok(())
    }

    /// Counts a "does not exist" answer (see [`crate::ledger::Backend::note_not_found`]).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn note_not_found(&self, id: &CheckoutId) -> Result<NotFoundOutcome, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let count: i32 = transaction
            .query_opt(
                "UPDATE checkouts SET not_found_count = not_found_count + 1 WHERE id = $1
                 RETURNING not_found_count",
                &[&id.as_str()],
            )
            .await
            .map_err(db)?
            .map_or(0, |row| row.get(0));
        let count = u32::try_from(count).unwrap_or(0);
        let looking_gone = looking_gone_in(&transaction).await.map_err(db)?;
        if looking_gone.is_configuration_problem() {
            transaction.commit().await.map_err(db)?;
            return Ok(NotFoundOutcome::ManyLookGone(looking_gone));
        }
        let unwatch = count >= NOT_FOUND_LIMIT;
        if unwatch {
            transaction
                .execute(
                    "UPDATE checkouts SET watched = FALSE, updated_at = $2 WHERE id = $1",
                    &[&id.as_str(), &now_ms()],
                )
                .await
                .map_err(db)?;
            transaction
                .execute(
                    "DELETE FROM listen_targets WHERE checkout_id = $1",
                    &[&id.as_str()],
                )
                .await
                .map_err(db)?;
        }
        transaction.commit().await.map_err(db)?;
        Ok(if unwatch {
            NotFoundOutcome::Unwatched { count }
        } else {
            NotFoundOutcome::Counted { count }
        })
    }

    /// How many watched checkouts paymennt last said do not exist.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn looking_gone(&self) -> Result<LookingGone, PgError> {
        let client = self.client().await?;
        looking_gone_in(&client)
            .await
            .map_err(|error| self.db(&error))
    }

    /// Notes that Firestore refused to watch a checkout's document; a checkout not in the
    /// ledger is ignored.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn note_listen_refusal(
        &self,
        id: &CheckoutId,
        code: &str,
        message: &str,
        document: &str,
        next_retry_at: Option<DateTime<Utc>>,
    ) -> Result<(), PgError> {
        self.write_one(
            "INSERT INTO listen_refusals (checkout_id, refusal_code, refusal_message,
                refused_document, first_refused_at, last_refused_at, refusal_count, next_retry_at)
             SELECT id, $2, $3, $4, $5, $5, 1, $6 FROM checkouts WHERE id = $1
             ON CONFLICT (checkout_id) DO UPDATE SET
                refusal_code = excluded.refusal_code,
                refusal_message = excluded.refusal_message,
                refused_document = excluded.refused_document,
                last_refused_at = excluded.last_refused_at,
                refusal_count = listen_refusals.refusal_count + 1,
                next_retry_at = excluded.next_retry_at",
            &[
                &id.as_str(),
                &code,
                &message,
                &document,
                &now_ms(),
                &next_retry_at.map(millis),
            ],
        )
        .await
        .map(drop)
    }

    /// Forgets a checkout's listen refusal.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn clear_listen_refusal(&self, id: &CheckoutId) -> Result<(), PgError> {
        self.write_one(
            "DELETE FROM listen_refusals WHERE checkout_id = $1",
            &[&id.as_str()],
        )
        .await
        .map(drop)
    }

    /// Stops watching PAID checkouts whose refund watch has ended and that have no change
    /// waiting; returns their ids.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn expire_refund_watch(
        &self,
        now_time: DateTime<Utc>,
    ) -> Result<Vec<CheckoutId>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let rows = transaction
            .query(
                "UPDATE checkouts SET watched = FALSE, updated_at = $2
                 WHERE watched AND NOT needs_verify AND watch_until IS NOT NULL
                   AND watch_until <= $1
                 RETURNING id",
                &[&now_time, &now_ms()],
            )
            .await
            .map_err(db)?;
        let ids: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        transaction
            .execute(
                "DELETE FROM listen_targets WHERE checkout_id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(db)?;
        transaction.commit().await.map_err(db)?;
        let mut ids: Vec<CheckoutId> = ids.into_iter().filter_map(|id| id.parse().ok()).collect();
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(ids)
    }

    /// Tracks what discovery found that the ledger lacks and locates checkouts tracked without
    /// coordinates (see [`crate::ledger::Backend::record_discovered`]).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; database failures.
    pub async fn record_discovered(
        &self,
        found: &[CheckoutFacts],
    ) -> Result<Vec<Discovered>, PgError> {
        let db = |error: tokio_postgres::Error| self.db(&error);
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = found.iter().map(|facts| facts.id.as_str()).collect();
        let known: std::collections::HashMap<String, bool> = {
            let client = self.client().await?;
            client
                .query(
                    "SELECT id, firebase_database <> '' FROM checkouts WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
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
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let mut recorded = Vec::with_capacity(changes.len());
        for (facts, outcome) in changes {
            let changed = match outcome {
                DiscoveredOutcome::Added => {
                    self.track_in(&transaction, facts, TrackedVia::Discovery, true)
                        .await?
                        == TrackOutcome::Added
                }
                DiscoveredOutcome::Located => self.locate_in(&transaction, facts).await?,
            };
            if changed {
                recorded.push(Discovered {
                    checkout_id: facts.id.clone(),
                    outcome,
                    listened: facts.location.is_some(),
                });
            }
        }
        transaction.commit().await.map_err(db)?;
        Ok(recorded)
    }

    async fn locate_in(
        &self,
        transaction: &Transaction<'_>,
        facts: &CheckoutFacts,
    ) -> Result<bool, PgError> {
        let Some(location) = &facts.location else {
            return Ok(false);
        };
        let changed = transaction
            .execute(
                "UPDATE checkouts SET firebase_database = $2, firebase_collection = $3,
                    firebase_document = $4, updated_at = $5
                 WHERE id = $1 AND firebase_database = ''",
                &[
                    &facts.id.as_str(),
                    &location.project.as_str(),
                    &location.collection.as_str(),
                    &location.document.as_str(),
                    &now_ms(),
                ],
            )
            .await
            .map_err(|error| self.db(&error))?;
        Ok(changed == 1)
    }

    /// Every watched checkout with what the reconciler compares, by id.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub async fn open_checkouts(&self) -> Result<Vec<OpenCheckout>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, status, total_refunded::TEXT, needs_verify, firebase_database <> '',
                        EXISTS (SELECT 1 FROM listen_targets t WHERE t.checkout_id = checkouts.id),
                        EXISTS (SELECT 1 FROM listen_refusals r WHERE r.checkout_id = checkouts.id),
                        verify_requested_ticket
                 FROM checkouts WHERE watched ORDER BY id COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(|error| self.db(&error))?;
        let mut open = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(0);
            let Ok(checkout_id) = id.parse::<CheckoutId>() else {
                tracing::warn!(checkout = %crate::domain::printable(&id), "skipping a ledger row with an invalid id");
                continue;
            };
            let status: Option<String> = row.get(1);
            let refunded: Option<String> = row.get(2);
            let needs_verify: bool = row.get(3);
            open.push(OpenCheckout {
                checkout_id,
                needs_verify: needs_verify || status.is_none(),
                status: status.as_deref().map(CheckoutStatus::parse),
                total_refunded: refunded
                    .as_deref()
                    .and_then(crate::domain::parse_decimal)
                    .unwrap_or(rust_decimal::Decimal::ZERO),
                listened: row.get(4),
                resumable: row.get(5),
                refused: row.get(6),
                verified_with: row.get::<_, Option<i64>>(7).map(VerifyTicket::new),
            });
        }
        Ok(open)
    }
}

async fn looking_gone_in(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<LookingGone, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE not_found_count > 0), count(*)
             FROM checkouts WHERE watched",
            &[],
        )
        .await?;
    Ok(LookingGone {
        checkouts: row.get(0),
        watched: row.get(1),
    })
}

/// Locks the rows of `ids` (sorted ascending) in `checkouts` with `mode` (`FOR UPDATE`, `FOR
/// KEY SHARE`), in that order. Every write that locks several checkouts takes them this way
/// first, so two such writes wait for each other rather than deadlock: a group of answers
/// (each answer's row `FOR UPDATE`) and a save of resume tokens (each token's checkout shared
/// by its foreign key) did, before, when their orders crossed, and PostgreSQL aborted one of
/// them after a second's wait. Rows are locked in the `ORDER BY`'s order (the locking step runs
/// above the sort). New checkouts, not yet in the table, are not locked here.
///
/// # Errors
///
/// Database failures.
pub(super) async fn lock_in_order(
    transaction: &Transaction<'_>,
    ids: &[&str],
    mode: &'static str,
) -> Result<(), tokio_postgres::Error> {
    if ids.len() < 2 {
        return Ok(());
    }
    transaction
        .execute(
            &format!("SELECT 1 FROM checkouts WHERE id = ANY($1) ORDER BY id {mode}"),
            &[&ids],
        )
        .await
        .map(drop)
}
