//! Sources of nudges: things that say "this checkout may have changed, go and verify it".
//!
//! Owns: the Firestore listener, the reconciler, discovery and the webhook intake.
//! Must never: decide a checkout's status. A nudge carries no status; only the verifier,
//! through Get Checkout, learns one.

pub mod discovery;
pub mod firestore;
pub mod reconcile;

pub mod webhook;

use std::time::Instant;

use chrono::{DateTime, Utc};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::{CheckoutId, Source, VerifyTicket};

/// "Checkout X may have changed": the only thing a source sends to the verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nudge {
    /// The checkout to verify.
    pub checkout_id: CheckoutId,
    /// What noticed the change.
    pub source: Source,
    /// When paywatch noticed it (for latency figures).
    pub seen_at: Instant,
    /// When the change happened upstream, if known (a Firestore document's update_time).
    pub changed_at: Option<DateTime<Utc>>,
    /// The ledger's verification ticket counter, read after the change was seen. A
    /// verification requested with a later ticket already reflects the change, so the
    /// verifier skips this nudge if one was recorded meanwhile (a sweep behind a Firestore
    /// change), unless it carries a [`Nudge::ticket`]. `None`: always verify.
    pub seen_after: Option<VerifyTicket>,
    /// A ticket already issued for this verification, in the same ledger transaction that
    /// noted the change ([`crate::ledger::Ledger::note_changes`]): the verifier sends its
    /// request with it instead of asking for one (and does not look for a later answer
    /// covering the change: one issued after the change was seen and answered before this
    /// nudge is verified is rare). A retried nudge never reuses it.
    pub ticket: Option<VerifyTicket>,
}

/// Sends a reconcile nudge for each checkout, with `seen_after` (the ticket counter read after
/// the sweep looked at the ledger and the search, see [`Nudge::seen_after`]). Sending waits
/// while the verifier is busy, which paces a sweep to the verifier's concurrency. Returns
/// false if `cancel` fired or the verifier is gone (the caller stops).
pub(crate) async fn send_reconcile_nudges(
    nudges: &mpsc::Sender<Nudge>,
    checkouts: impl IntoIterator<Item = CheckoutId>,
    seen_after: Option<VerifyTicket>,
    cancel: &CancellationToken,
) -> bool {
    for checkout_id in checkouts {
        let nudge = Nudge {
            checkout_id,
            source: Source::Reconcile,
            seen_at: Instant::now(),
            changed_at: None,
            seen_after,
            ticket: None,
        };
        tokio::select! {
            () = cancel.cancelled() => return false,
            sent = nudges.send(nudge) => if sent.is_err() { return false },
        }
    }
    true
}
