//! The reconciler: catches whatever the Firestore stream missed (a change while the daemon was
//! down, a target Firestore dropped, a verification that kept failing), at start and on an
//! interval.
//!
//! Owns: deciding which checkouts to nudge and when, and ending the refund watch of PAID
//! checkouts. A periodic sweep asks Search Checkouts for the open checkouts a page at a time
//! and nudges only those whose searched status or refunded total differs from the ledger's,
//! those the search did not return, and those with a change not yet verified. If search fails
//! or is refused, every open checkout is nudged, as before search was used.
//! Must never: decide a status: a search result is a hint; only the verifier's Get Checkout is
//! recorded.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::{CheckoutId, CheckoutStatus, VerifyTicket};
use crate::ledger::{Ledger, OpenCheckout};
use crate::metrics::{Metrics, SweepKind};
use crate::paymennt::{Client, SearchQuery};
use crate::sources::Nudge;

/// How the first sweep runs (see `startup_sweep`).
#[derive(Debug, Clone, Copy)]
pub struct StartupSweep {
    /// The ticket counter when the daemon started, before any source ran: a checkout answered
    /// by a later request needs nothing from this sweep.
    pub counter_at_start: VerifyTicket,
    /// How long checkouts the listener's first snapshot reports are left to it (zero when
    /// Firestore is off).
    pub snapshot_grace: Duration,
}

/// Runs the reconciler until `cancel`.
///
/// The first sweep, at start, nudges only checkouts that need it: never verified, or changed
/// without a verification recorded (the daemon stopped in between). Checkouts with a resume
/// token and nothing pending are left to Firestore, so a restart does not re-verify every
/// unchanged checkout; those the listener's first snapshot reports wait for it (`startup`; see
/// `startup_sweep`). Later sweeps, every `interval`, compare
/// every open checkout with Search Checkouts ([`sweep`]), `page_size` per page.
///
/// `watch_set_changed` is bumped when refund watches end, so the watch set is updated. Sweeps
/// and the checkouts they nudge are counted in `metrics`.
// Each argument is a distinct handle or channel of the daemon's wiring.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ledger: Ledger,
    client: watch::Receiver<Client>,
    nudges: mpsc::Sender<Nudge>,
    mut interval: watch::Receiver<Duration>,
    page_size: u32,
    watch_set_changed: watch::Sender<u64>,
    startup: StartupSweep,
    cancel: CancellationToken,
    metrics: Metrics,
) {
    startup_sweep(&ledger, &nudges, startup, &cancel, &metrics).await;
    let mut health = SearchHealth::default();
    loop {
        let period = *interval.borrow_and_update();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // IMPORTANT: skip missed ticks. After a suspend or a long stall, one sweep catches up;
        // a burst of back-to-back sweeps would only multiply API calls.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = interval.changed() => {
                    if changed.is_err() { return; }
                    // The reload names what changed; this is only its effect.
                    tracing::debug!(interval = ?*interval.borrow(), "reconcile interval changed");
                    break;
                }
                _ = ticker.tick() => {
                    end_refund_watch(&ledger, &watch_set_changed).await;
                    let current = client.borrow().clone();
                    let report = sweep(&ledger, &current, &nudges, page_size, &mut health, &cancel).await;
                    metrics.reconcile_sweep(SweepKind::Periodic, report.nudged());
                }
            }
        }
    }
}

async fn end_refund_watch(ledger: &Ledger, watch_set_changed: &watch::Sender<u64>) {
    match ledger.expire_refund_watch(Utc::now()).await {
        Ok(ended) if !ended.is_empty() => {
            for id in &ended {
                tracing::info!(checkout = %id, "refund watch ended; no longer watched");
            }
            watch_set_changed.send_modify(|generation| *generation += 1);
        }
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "cannot end refund watches"),
    }
}

/// Whether Search Checkouts worked at the last sweep, so a failure is said once (warn) and a
/// recovery once (info), not at every sweep.
#[derive(Debug, Clone, Default)]
pub struct SearchHealth {
    failing: bool,
}

/// What one sweep did: the calls it made and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Open checkouts.
    pub open: usize,
    /// Search Checkouts calls.
    pub searches: u32,
    /// Open checkouts the searches returned.
    pub returned: usize,
    /// Nudged because the searched status or refunded total differed from the ledger's.
    pub differing: usize,
    /// Nudged because the search did not return them (closed since, or search failed).
    pub not_returned: usize,
    /// Nudged because a change was seen but not verified, or no status is recorded yet.
    pub unverified: usize,
    /// Whether search failed or was refused, so every open checkout was nudged.
    pub fallback: bool,
    /// Whether this sweep said so at warn: only the first of a run of failing sweeps does.
    pub fallback_warned: bool,
}

impl SweepReport {
    /// Nudges sent: at most this many Get Checkout calls follow.
    pub fn nudged(&self) -> usize {
        self.differing + self.not_returned + self.unverified
    }
}

/// The statuses a search asks for: every known status that keeps a checkout watched.
fn open_statuses() -> Vec<CheckoutStatus> {
    CheckoutStatus::KNOWN
        .iter()
        .filter(|status| !status.is_final())
        .cloned()
        .collect()
}

/// Whether a search result says something the ledger does not know.
fn differs(ledger: &OpenCheckout, searched: &crate::paymennt::wire::Checkout) -> bool {
    let status_differs = searched.status.as_ref() != ledger.status.as_ref();
    let refunded = searched
        .total_refunded
        .map(|total| total.0)
        .unwrap_or(Decimal::ZERO);
    status_differs || refunded != ledger.total_refunded
}

/// One periodic sweep: Search Checkouts page by page (ids ascending, `afterId` keyset), then a
/// nudge for each open checkout that differs, was not returned, or has a change not verified.
/// Returns the calls it made; logs them (info) as one line.
pub async fn sweep(
    ledger: &Ledger,
    client: &Client,
    nudges: &mpsc::Sender<Nudge>,
    page_size: u32,
    health: &mut SearchHealth,
    cancel: &CancellationToken,
) -> SweepReport {
    let Some(open) = open_checkouts(ledger).await else {
        return SweepReport::default();
    };
    let mut report = SweepReport {
        open: open.len(),
        ..SweepReport::default()
    };
    let mut chosen: Vec<CheckoutId> = Vec::new();
    let mut compared: HashMap<CheckoutId, OpenCheckout> = HashMap::new();
    for checkout in open {
        if checkout.needs_verify {
            report.unverified += 1;
            chosen.push(checkout.checkout_id);
        } else {
            compared.insert(checkout.checkout_id.clone(), checkout);
        }
    }
    if !compared.is_empty() {
        search_pages(
            client,
            page_size,
            &mut compared,
            &mut chosen,
            &mut report,
            health,
        )
        .await;
    }
    report.not_returned = compared.len();
    chosen.extend(compared.into_keys());
    tracing::info!(
        open = report.open,
        searches = report.searches,
        returned = report.returned,
        differing = report.differing,
        not_returned = report.not_returned,
        unverified = report.unverified,
        get_checkout = report.nudged(),
        fallback = report.fallback,
        "reconcile sweep: {} searches and {} Get Checkout calls for {} open checkouts",
        report.searches,
        report.nudged(),
        report.open
    );
    let seen_after = last_ticket(ledger).await;
    crate::sources::send_reconcile_nudges(nudges, chosen, seen_after, cancel).await;
    report
}

/// Pages through Search Checkouts; checkouts it returns leave `compared`, into `chosen` if they
/// differ. Stops at the last open checkout's id, at a short page, or once searching would cost
/// more than verifying the rest one by one.
async fn search_pages(
    client: &Client,
    page_size: u32,
    compared: &mut HashMap<CheckoutId, OpenCheckout>,
    chosen: &mut Vec<CheckoutId>,
    report: &mut SweepReport,
    health: &mut SearchHealth,
) {
    let numeric = |id: &CheckoutId| id.as_str().parse::<u128>().ok();
    let lowest = compared.keys().filter_map(numeric).min();
    let highest = compared.keys().filter_map(numeric).max();
    let mut after_id = lowest.map(|low| low.saturating_sub(1));
    let mut page_number = 0u32;
    let statuses = open_statuses();
    loop {
        // A search costs as much as a Get Checkout: when fewer checkouts are left to compare
        // than searches made, verifying them one by one is no dearer.
        if compared.is_empty() || report.searches as usize >= compared.len() {
            break;
        }
        let query = SearchQuery {
            statuses: statuses.clone(),
            after_id,
            page: Some(page_number),
            size: Some(page_size),
            ..SearchQuery::default()
        };
        report.searches += 1;
        let page = match client.search(&query).await {
            Ok(page) => page,
            Err(error) => {
                report.fallback = true;
                if !health.failing {
                    health.failing = true;
                    report.fallback_warned = true;
                    tracing::warn!(
                        "Search Checkouts failed: {error}\n\n\
                         the reconciler verifies every open checkout with Get Checkout instead (one call each per sweep) until search works; \
                         check that the API key may search checkouts"
                    );
                } else {
                    tracing::debug!(%error, "Search Checkouts still failing; verifying one by one");
                }
                return;
            }
        };
        if health.failing {
            health.failing = false;
            tracing::info!("Search Checkouts works again; sweeps verify only what changed");
        }
        let mut page_highest = None;
        for checkout in &page.content {
            let Some(id) = checkout
                .id
                .as_ref()
                .and_then(|id| id.0.parse::<CheckoutId>().ok())
            else {
                continue;
            };
            page_highest = page_highest.max(numeric(&id));
            if let Some(known) = compared.remove(&id) {
                report.returned += 1;
                if differs(&known, checkout) {
                    report.differing += 1;
                    chosen.push(id);
                }
            }
        }
        let short = page.content.len() < page_size as usize;
        let past_last = matches!((page_highest, highest), (Some(seen), Some(last)) if seen >= last);
        if short || past_last {
            break;
        }
        match page_highest {
            // Keyset paging: stable while checkouts change status between pages.
            Some(seen) if after_id.is_none_or(|after| seen > after) => {
                after_id = Some(seen);
                page_number = 0;
            }
            _ => page_number = page_number.saturating_add(1),
        }
    }
}

async fn open_checkouts(ledger: &Ledger) -> Option<Vec<OpenCheckout>> {
    read_ledger("open checkouts", ledger.open_checkouts().await)
}

/// What the ledger gave for `what`; a failure is logged (naming `what`) and gives `None`.
fn read_ledger<T>(what: &str, read: crate::ledger::Result<T>) -> Option<T> {
    match read {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(%error, "reconciler cannot read {what}");
            None
        }
    }
}

/// The first sweep: nudges checkouts never verified or changed without a verification.
///
/// Those the listener reports anyway (listened to, no resume token, not refused: Firestore
/// sends their current state as the first snapshot) wait `snapshot_grace` first; then only
/// those not answered by a request sent since the daemon started are nudged, and a start
/// verifies each checkout once. Every nudge carries the counter at start, so the verifier
/// skips any checkout answered since. If the listener cannot deliver (Firestore refuses, is unreachable or
/// off), they are verified after the grace.
async fn startup_sweep(
    ledger: &Ledger,
    nudges: &mpsc::Sender<Nudge>,
    startup: StartupSweep,
    cancel: &CancellationToken,
    metrics: &Metrics,
) {
    let StartupSweep {
        counter_at_start,
        snapshot_grace,
    } = startup;
    let seen_after = Some(counter_at_start);
    let Some(open) = open_checkouts(ledger).await else {
        return;
    };
    let (now, after_grace): (Vec<OpenCheckout>, Vec<OpenCheckout>) = open
        .into_iter()
        .filter(|checkout| checkout.needs_verify)
        .partition(|checkout| {
            snapshot_grace.is_zero() || !checkout.listened || checkout.resumable || checkout.refused
        });
    metrics.reconcile_sweep(SweepKind::Startup, now.len());
    tracing::info!(
        checkouts = now.len() + after_grace.len(),
        after_first_snapshot = after_grace.len(),
        kind = "startup",
        "reconciling open checkouts with Get Checkout ({} now; {} once the listener's first snapshot had {} to report them)",
        now.len(),
        after_grace.len(),
        humantime::format_duration(snapshot_grace),
    );
    let ids = |checkouts: Vec<OpenCheckout>| checkouts.into_iter().map(|c| c.checkout_id);
    if !crate::sources::send_reconcile_nudges(nudges, ids(now), seen_after, cancel).await
        || after_grace.is_empty()
    {
        return;
    }
    tokio::select! {
        () = cancel.cancelled() => return,
        () = tokio::time::sleep(snapshot_grace) => {}
    }
    // Only those still unanswered since the daemon started (the snapshot's nudges answered
    // the others), so the verifier is not handed thousands of nudges to skip.
    let Some(open) = open_checkouts(ledger).await else {
        return;
    };
    let deferred: HashSet<CheckoutId> = ids(after_grace).collect();
    let answered_since = |checkout: &OpenCheckout| match (checkout.verified_with, seen_after) {
        (Some(verified_with), Some(seen_after)) => verified_with > seen_after,
        _ => false,
    };
    let unanswered: Vec<CheckoutId> = open
        .into_iter()
        .filter(|checkout| deferred.contains(&checkout.checkout_id) && !answered_since(checkout))
        .map(|checkout| checkout.checkout_id)
        .collect();
    metrics.reconcile_sweep(SweepKind::AfterSnapshot, unanswered.len());
    tracing::info!(
        checkouts = unanswered.len(),
        answered = deferred.len().saturating_sub(unanswered.len()),
        kind = "startup",
        "reconciling the open checkouts the listener's first snapshot did not answer"
    );
    crate::sources::send_reconcile_nudges(nudges, unanswered, seen_after, cancel).await;
}

/// The ticket counter, read once the sweep has looked at the ledger (and the search): a
/// checkout verified with a later ticket before its nudge is reached needs no second call.
/// `None` if it cannot be read (every nudge of the sweep is then verified).
async fn last_ticket(ledger: &Ledger) -> Option<VerifyTicket> {
    read_ledger("the ticket counter", ledger.last_ticket().await)
}

#[cfg(test)]
mod tests;
