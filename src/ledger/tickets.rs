//! Verification tickets, changes noted but not yet verified, and "checkout not found" counts.
//!
//! Owns: the ticket counter (`verify_tickets`), the change notes on checkouts (`needs_verify`,
//! `needs_verify_after`), and the not-found bookkeeping that stops watching a checkout
//! paymennt keeps saying does not exist.
//! Must never: hand out a ticket twice or lower the counter, or unwatch checkouts when many
//! look gone at once (that is a configuration problem, not vanished checkouts).

use rusqlite::{Connection, OptionalExtension, params};

use super::Result;
use super::sqlite::{Sqlite, now};
use crate::domain::{CheckoutId, VerifyTicket};

/// What [`Ledger::note_not_found`] did with paymennt's "checkout not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFoundOutcome {
    /// Counted; the checkout is still watched.
    Counted {
        /// Not-found answers in a row for this checkout.
        count: u32,
    },
    /// [`NOT_FOUND_LIMIT`] answers in a row: the checkout is no longer watched (a pending
    /// verification stays noted).
    Unwatched {
        /// Not-found answers in a row for this checkout.
        count: u32,
    },
    /// Many watched checkouts look gone at once: that is a configuration problem (another
    /// environment, merchant or address), not checkouts vanishing. Nothing is unwatched.
    ManyLookGone(LookingGone),
}
/// Watched checkouts whose latest answer from paymennt was "checkout not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LookingGone {
    /// Watched checkouts paymennt last said do not exist.
    pub checkouts: i64,
    /// All watched checkouts.
    pub watched: i64,
}

impl LookingGone {
    /// Five or more at once, or (two or more and) a tenth of the watched set: then paymennt is
    /// not saying that checkouts vanished, the configuration points at the wrong place.
    pub fn is_configuration_problem(&self) -> bool {
        self.checkouts >= 5 || (self.checkouts >= 2 && self.checkouts * 10 >= self.watched)
    }
}

/// How many "checkout not found" answers in a row stop a checkout being watched.
pub const NOT_FOUND_LIMIT: u32 = 3;

/// What [`Ledger::note_changes`] wrote: where the ticket counter stood when the changes were
/// seen, and a ticket for each change's verification, in the order of the ids given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotedChanges {
    /// The counter before this batch's tickets: every later ticket clears the notes.
    pub seen_after: VerifyTicket,
    /// One ticket per id, each later than `seen_after` and than the one before it.
    pub tickets: Vec<VerifyTicket>,
}
impl Sqlite {
    /// Hands out the next verification ticket: take one before sending Get Checkout (or
    /// Create payment link) and the answer is ordered by it. The counter lives in the ledger, so
    /// it only grows, across restarts and across processes sharing the file.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn issue_ticket(&self) -> Result<VerifyTicket> {
        self.write_without_fsync("ticket", next_ticket_in)
    }

    /// Tickets for several verifications in one transaction (the verifier's group of waiting
    /// requests): for each `(checkout, seen_after)`, in order, the next ticket, unless
    /// `seen_after` is given and the checkout was already verified by a request with a ticket
    /// issued after it (the counter read after its change was seen): that answer reflects the
    /// change, so no new request is needed and `None` comes back. Every ticket is distinct and
    /// greater than any issued before.
    ///
    /// # Errors
    ///
    /// SQL failures (then no ticket of the group was issued).
    pub(super) fn issue_tickets(
        &self,
        wanted: &[(CheckoutId, Option<VerifyTicket>)],
    ) -> Result<Vec<Option<VerifyTicket>>> {
        self.write_without_fsync("ticket", |transaction| {
            wanted
                .iter()
                .map(|(id, seen_after)| ticket_unless_covered_in(transaction, id, *seen_after))
                .collect()
        })
    }

    /// The last ticket handed out: every ticket issued after this call is greater. Read when a
    /// change is seen, before its nudge goes out, and give it to [`Ledger::mark_needs_verify`].
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn last_ticket(&self) -> Result<VerifyTicket> {
        last_ticket_in(&self.lock()).map_err(|e| self.error("ticket", e))
    }

    /// Notes that a change was seen on these checkouts, when the ticket counter stood at
    /// `seen_after` ([`Ledger::last_ticket`]), and is not yet verified, so a crash before
    /// verification is caught by the reconciler at the next start.
    ///
    /// Only a verification requested with a later ticket clears the note ([`Ledger::apply`]);
    /// one already applied with such a ticket means this note is not needed. Tickets are exact,
    /// so the order of the two writes does not matter.
    ///
    /// # Errors
    ///
    /// SQL failures.
    #[cfg(test)]
    pub(super) fn mark_needs_verify(
        &self,
        ids: &[CheckoutId],
        seen_after: VerifyTicket,
    ) -> Result<()> {
        // No fsync of its own: the note matters only once the resume token that would let a
        // restart skip the change is durable, and in WAL mode that token cannot be durable
        // without this earlier commit. Until then a restart hears of the change from Firestore
        // again.
        self.write_without_fsync("mark", |transaction| mark_in(transaction, ids, seen_after))
    }

    /// What the listener does with each batch of changes, in one transaction without fsync (as
    /// [`Ledger::mark_needs_verify`]): reads the ticket counter (`seen_after`), notes the
    /// change on each of `ids` with it, and issues one ticket per id, in order, for the
    /// verification the change asks for ([`crate::sources::Nudge::ticket`]). Each ticket is
    /// later than `seen_after`, so its answer clears the note.
    ///
    /// # Errors
    ///
    /// SQL failures (then nothing is noted and no ticket issued).
    pub(super) fn note_changes(&self, ids: &[CheckoutId]) -> Result<NotedChanges> {
        self.write_without_fsync("note changes", |transaction| {
            let seen_after = last_ticket_in(transaction)?;
            mark_in(transaction, ids, seen_after)?;
            // The batch's tickets in one statement: the counter moves past all of them.
            let count = i64::try_from(ids.len()).unwrap_or(i64::MAX);
            let last: i64 = transaction
                .prepare_cached(
                    "UPDATE verify_tickets SET last = last + ?1 WHERE id = 1 RETURNING last",
                )?
                .query_row([count], |row| row.get(0))?;
            let tickets = (last - count + 1..=last).map(VerifyTicket::new).collect();
            Ok(NotedChanges {
                seen_after,
                tickets,
            })
        })
    }

    /// Counts paymennt's answer that the checkout does not exist. After [`NOT_FOUND_LIMIT`] in a
    /// row the checkout stops being watched (a mistyped or foreign id would otherwise be asked
    /// about forever) -- unless many watched checkouts look gone at once
    /// ([`LookingGone::is_configuration_problem`]): then nothing is unwatched. Unwatching never
    /// clears a pending verification.
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn note_not_found(&self, id: &CheckoutId) -> Result<NotFoundOutcome> {
        let mut connection = self.lock();
        let transaction = self.write(&mut connection, "not found")?;
        let count: Option<u32> = transaction
            .query_row(
                "UPDATE checkouts SET not_found_count = not_found_count + 1 WHERE id = ?1
                 RETURNING not_found_count",
                [id.as_str()],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.error("not found", e))?;
        let count = count.unwrap_or(0);
        let looking_gone = looking_gone_in(&transaction).map_err(|e| self.error("not found", e))?;
        if looking_gone.is_configuration_problem() {
            transaction
                .commit()
                .map_err(|e| self.error("not found", e))?;
            return Ok(NotFoundOutcome::ManyLookGone(looking_gone));
        }
        let unwatch = count >= NOT_FOUND_LIMIT;
        if unwatch {
            transaction
                .execute(
                    "UPDATE checkouts SET watched = 0, updated_at = ?2 WHERE id = ?1",
                    params![id.as_str(), now()],
                )
                .map_err(|e| self.error("not found", e))?;
            transaction
                .execute(
                    "DELETE FROM listen_targets WHERE checkout_id = ?1",
                    [id.as_str()],
                )
                .map_err(|e| self.error("not found", e))?;
        }
        transaction
            .commit()
            .map_err(|e| self.error("not found", e))?;
        Ok(if unwatch {
            NotFoundOutcome::Unwatched { count }
        } else {
            NotFoundOutcome::Counted { count }
        })
    }

    /// How many watched checkouts paymennt last said do not exist (`check-config` reports it).
    ///
    /// # Errors
    ///
    /// SQL failures.
    pub(super) fn looking_gone(&self) -> Result<LookingGone> {
        looking_gone_in(&self.lock()).map_err(|e| self.error("looking gone", e))
    }
}

pub(super) fn looking_gone_in(connection: &Connection) -> rusqlite::Result<LookingGone> {
    connection.query_row(
        "SELECT count(*) FILTER (WHERE not_found_count > 0), count(*)
         FROM checkouts WHERE watched = 1",
        [],
        |row| {
            Ok(LookingGone {
                checkouts: row.get(0)?,
                watched: row.get(1)?,
            })
        },
    )
}

/// Takes the next verification ticket from the counter.
pub(super) fn last_ticket_in(connection: &Connection) -> rusqlite::Result<VerifyTicket> {
    connection
        .prepare_cached("SELECT last FROM verify_tickets WHERE id = 1")?
        .query_row([], |row| row.get(0))
        .map(VerifyTicket::new)
}

/// Notes a change on each of `ids`, seen when the ticket counter stood at `seen_after`
/// (see [`Ledger::mark_needs_verify`]).
pub(super) fn mark_in(
    transaction: &rusqlite::Transaction<'_>,
    ids: &[CheckoutId],
    seen_after: VerifyTicket,
) -> rusqlite::Result<()> {
    let mut statement = transaction.prepare_cached(
        "UPDATE checkouts SET needs_verify = 1,
                needs_verify_after = coalesce(needs_verify_after, ?2)
         WHERE id = ?1
           AND (verify_requested_ticket IS NULL OR verify_requested_ticket <= ?2)",
    )?;
    for id in ids {
        statement.execute(params![id.as_str(), seen_after.number()])?;
    }
    Ok(())
}

/// The next ticket, unless `seen_after` is given and checkout `id` was already verified by a
/// request with a later ticket.
pub(super) fn ticket_unless_covered_in(
    transaction: &rusqlite::Transaction<'_>,
    id: &CheckoutId,
    seen_after: Option<VerifyTicket>,
) -> rusqlite::Result<Option<VerifyTicket>> {
    if let Some(seen_after) = seen_after {
        let requested: Option<i64> = transaction
            .prepare_cached("SELECT verify_requested_ticket FROM checkouts WHERE id = ?1")?
            .query_row([id.as_str()], |row| row.get(0))
            .optional()?
            .flatten();
        if requested.is_some_and(|requested| requested > seen_after.number()) {
            return Ok(None);
        }
    }
    next_ticket_in(transaction).map(Some)
}

pub(super) fn next_ticket_in(
    transaction: &rusqlite::Transaction<'_>,
) -> rusqlite::Result<VerifyTicket> {
    transaction
        .prepare_cached("UPDATE verify_tickets SET last = last + 1 WHERE id = 1 RETURNING last")?
        .query_row([], |row| row.get(0))
        .map(VerifyTicket::new)
}
