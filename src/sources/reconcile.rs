//! The reconciler: a Get Checkout sweep over open checkouts, at start and on an interval.
//!
//! Owns: deciding which checkouts to nudge and when, and ending the refund watch of PAID
//! checkouts. It catches whatever the Firestore stream missed (a change while the daemon was
//! down, a target Firestore dropped, a verification that kept failing).
//! Must never: call paymennt itself or decide a status: it only sends nudges.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::Source;
use crate::ledger::Ledger;
use crate::metrics::{Metrics, SweepKind};
use crate::sources::Nudge;

/// Runs the reconciler until `cancel`.
///
/// The first sweep, at start, nudges only checkouts that need it: never verified, or changed
/// without a verification recorded (the daemon stopped in between). Checkouts with a resume
/// token and nothing pending are left to Firestore, so a restart does not re-verify every
/// unchanged checkout. Later sweeps, every `interval`, nudge every watched checkout.
///
/// `watch_set_changed` is bumped when refund watches end, so the watch set is updated. Sweeps
/// are counted in `metrics`.
pub async fn run(
    ledger: Ledger,
    nudges: mpsc::Sender<Nudge>,
    mut interval: watch::Receiver<Duration>,
    watch_set_changed: watch::Sender<u64>,
    cancel: CancellationToken,
    metrics: Metrics,
) {
    sweep(&ledger, &nudges, true, &cancel, &metrics).await;
    loop {
        let period = *interval.borrow_and_update();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // IMPORTANT: skip missed ticks. After a suspend or a long stall, one sweep catches up;
        // a burst of back-to-back sweeps would only multiply Get Checkout calls.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = interval.changed() => {
                    if changed.is_err() { return; }
                    tracing::info!(interval = ?*interval.borrow(), "reconcile interval changed");
                    break;
                }
                _ = ticker.tick() => {
                    end_refund_watch(&ledger, &watch_set_changed).await;
                    sweep(&ledger, &nudges, false, &cancel, &metrics).await;
                }
            }
        }
    }
}

async fn end_refund_watch(ledger: &Ledger, watch_set_changed: &watch::Sender<u64>) {
    let ledger = ledger.clone();
    match tokio::task::spawn_blocking(move || ledger.expire_refund_watch(Utc::now())).await {
        Ok(Ok(ended)) if !ended.is_empty() => {
            for id in &ended {
                tracing::info!(checkout = %id, "refund watch ended; no longer watched");
            }
            watch_set_changed.send_modify(|generation| *generation += 1);
        }
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, "cannot end refund watches"),
        Err(error) => tracing::error!(%error, "refund watch task failed"),
    }
}

/// Nudges open checkouts (only those needing it, if `only_needed`). Sending waits when the
/// verifier is busy, which bounds the sweep's pace to the verifier's concurrency.
async fn sweep(
    ledger: &Ledger,
    nudges: &mpsc::Sender<Nudge>,
    only_needed: bool,
    cancel: &CancellationToken,
    metrics: &Metrics,
) {
    let reader = ledger.clone();
    let entries = match tokio::task::spawn_blocking(move || reader.watch_set()).await {
        Ok(Ok(entries)) => entries,
        Ok(Err(error)) => {
            tracing::error!(%error, "reconciler cannot read open checkouts");
            return;
        }
        Err(error) => {
            tracing::error!(%error, "reconciler task failed");
            return;
        }
    };
    let chosen: Vec<_> = entries
        .into_iter()
        .filter(|entry| !only_needed || entry.needs_verify)
        .collect();
    let kind = if only_needed {
        SweepKind::Startup
    } else {
        SweepKind::Periodic
    };
    metrics.reconcile_sweep(kind, chosen.len());
    tracing::info!(
        checkouts = chosen.len(),
        kind = if only_needed { "startup" } else { "periodic" },
        "reconciling open checkouts with Get Checkout"
    );
    for entry in chosen {
        let nudge = Nudge {
            checkout_id: entry.checkout_id,
            source: Source::Reconcile,
            seen_at: Instant::now(),
            changed_at: None,
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            sent = nudges.send(nudge) => if sent.is_err() { return },
        }
    }
}
