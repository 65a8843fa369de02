//! The verifier: turns "checkout X may have changed" into a verified status in the ledger.
//!
//! Owns: calling Get Checkout for each nudge, with at most one call in flight per checkout
//! (a burst of nudges costs at most one extra call), a global concurrency limit, and the
//! operator's payment log line.
//! Must never: record anything that Get Checkout did not say. Nudges carry no status; the only
//! status that reaches the ledger is the one in a [`VerifiedCheckout`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::{CheckoutId, Source, format_money, printable};
use crate::ledger::{ApplyOutcome, Ledger};
use crate::paymennt::{Client, VerifiedCheckout};
use crate::settings::HookSettings;
use crate::sources::Nudge;

/// What the verifier needs from the (reloadable) configuration.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Hooks, for queueing deliveries with each transition.
    pub hooks: Arc<Vec<HookSettings>>,
    /// How long a PAID checkout stays watched.
    pub refund_watch: Duration,
}

/// How often and how soon a checkout whose verification failed is tried again (on top of the
/// client's own retries). After the last, the reconciler's next sweep catches it.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

/// Running figures, for the status line and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifierStats {
    /// Get Checkout calls made.
    pub calls: u64,
    /// Transitions recorded.
    pub transitions: u64,
    /// Verifications that failed after retries.
    pub failures: u64,
    /// When the last PAID was recorded.
    pub last_payment: Option<DateTime<Utc>>,
}

/// A verification finished: what to do next for that checkout.
struct Finished {
    checkout_id: CheckoutId,
    /// The nudge to retry later (the call failed in a way that may pass), if any.
    retry: Option<Nudge>,
}

/// A checkout's place in the verifier: busy, with maybe one nudge waiting behind the call.
#[derive(Default)]
struct Slot {
    waiting: Option<Nudge>,
}

/// The verifier task. Build with [`Verifier::new`], then [`Verifier::run`].
pub struct Verifier {
    client: Client,
    ledger: Ledger,
    config: watch::Receiver<VerifierConfig>,
    concurrency: Arc<Semaphore>,
    ledger_changed: watch::Sender<u64>,
    watch_set_changed: watch::Sender<u64>,
    stats: watch::Sender<VerifierStats>,
}

/// Where the verifier says what it changed, so the stages after it can follow.
#[derive(Debug, Clone)]
pub struct VerifierSignals {
    /// Bumped after every transition (the hook dispatcher wakes on it).
    pub ledger_changed: watch::Sender<u64>,
    /// Bumped when a transition ended a checkout's watch (the listener drops its target).
    pub watch_set_changed: watch::Sender<u64>,
}

impl Verifier {
    /// A verifier calling `client`, recording into `ledger`, with at most `concurrency` calls in
    /// flight, telling the later stages through `signals`.
    pub fn new(
        client: Client,
        ledger: Ledger,
        config: watch::Receiver<VerifierConfig>,
        concurrency: usize,
        signals: VerifierSignals,
    ) -> Verifier {
        Verifier {
            client,
            ledger,
            config,
            concurrency: Arc::new(Semaphore::new(concurrency.max(1))),
            ledger_changed: signals.ledger_changed,
            watch_set_changed: signals.watch_set_changed,
            stats: watch::channel(VerifierStats::default()).0,
        }
    }

    /// Figures, updated as the verifier works.
    pub fn stats(&self) -> watch::Receiver<VerifierStats> {
        self.stats.subscribe()
    }

    /// Verifies nudges until `nudges` closes (all senders dropped), then finishes the calls in
    /// flight. `abort` cancels the calls in flight (the drain deadline passed).
    pub async fn run(self, mut nudges: mpsc::Receiver<Nudge>, abort: CancellationToken) {
        let this = Arc::new(self);
        let mut slots: HashMap<CheckoutId, Slot> = HashMap::new();
        let mut calls: JoinSet<Finished> = JoinSet::new();
        // Which checkout each call task serves, so a task that panicked still frees its slot.
        let mut call_owners: HashMap<tokio::task::Id, CheckoutId> = HashMap::new();
        let mut retries: JoinSet<Nudge> = JoinSet::new();
        // Consecutive failed verifications per checkout, for the retry schedule.
        let mut failures: HashMap<CheckoutId, usize> = HashMap::new();
        let mut open = true;
        loop {
            if !open && calls.is_empty() {
                return;
            }
            tokio::select! {
                nudge = nudges.recv(), if open => match nudge {
                    Some(nudge) => this.accept(nudge, &mut slots, &mut calls, &mut call_owners, &abort),
                    None => {
                        open = false;
                        // Pending retries are dropped: the checkout keeps needs_verify and the
                        // reconciler picks it up at the next start.
                        retries.abort_all();
                    }
                },
                Some(Ok(nudge)) = retries.join_next(), if open => {
                    this.accept(nudge, &mut slots, &mut calls, &mut call_owners, &abort);
                }
                Some(joined) = calls.join_next_with_id() => {
                    let finished = match joined {
                        Ok((id, finished)) => {
                            call_owners.remove(&id);
                            finished
                        }
                        Err(error) => {
                            let Some(checkout_id) = call_owners.remove(&error.id()) else { continue };
                            tracing::error!(checkout = %checkout_id, %error, "a verification task failed; the reconciler will retry it");
                            Finished { checkout_id, retry: None }
                        }
                    };
                    match finished.retry {
                        Some(nudge) => {
                            let count = failures.entry(finished.checkout_id.clone()).or_default();
                            *count += 1;
                            // A reconcile nudge is not retried here: the next sweep is its retry.
                            let delay = RETRY_DELAYS.get(*count - 1).filter(|_| nudge.source != Source::Reconcile);
                            if let (Some(delay), true) = (delay, open) {
                                let delay = *delay;
                                retries.spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    Nudge { seen_at: Instant::now(), ..nudge }
                                });
                            } else {
                                failures.remove(&finished.checkout_id);
                            }
                        }
                        None => { failures.remove(&finished.checkout_id); }
                    }
                    match slots.get_mut(&finished.checkout_id).and_then(|slot| slot.waiting.take()) {
                        Some(next) => this.start(next, &mut calls, &mut call_owners, &abort),
                        None => { slots.remove(&finished.checkout_id); }
                    }
                }
                () = abort.cancelled() => {
                    calls.abort_all();
                    return;
                }
                else => return,
            }
        }
    }

    fn accept(
        self: &Arc<Self>,
        nudge: Nudge,
        slots: &mut HashMap<CheckoutId, Slot>,
        calls: &mut JoinSet<Finished>,
        call_owners: &mut HashMap<tokio::task::Id, CheckoutId>,
        abort: &CancellationToken,
    ) {
        match slots.get_mut(&nudge.checkout_id) {
            Some(slot) => {
                // A call is in flight: keep one nudge to run after it (the change may have
                // landed after paymennt answered); later ones in the burst add nothing.
                if slot.waiting.is_none() {
                    tracing::debug!(checkout = %nudge.checkout_id, source = %nudge.source, "coalesced nudge behind the call in flight");
                    slot.waiting = Some(nudge);
                }
            }
            None => {
                slots.insert(nudge.checkout_id.clone(), Slot::default());
                self.start(nudge, calls, call_owners, abort);
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        nudge: Nudge,
        calls: &mut JoinSet<Finished>,
        call_owners: &mut HashMap<tokio::task::Id, CheckoutId>,
        abort: &CancellationToken,
    ) {
        let this = Arc::clone(self);
        let abort = abort.clone();
        let owner = nudge.checkout_id.clone();
        let handle = calls.spawn(async move {
            let checkout_id = nudge.checkout_id.clone();
            let retry = tokio::select! {
                retry = this.verify(nudge) => retry,
                () = abort.cancelled() => None,
            };
            Finished { checkout_id, retry }
        });
        call_owners.insert(handle.id(), owner);
    }

    /// Counts a "not found" answer; after a few in a row the checkout is no longer watched.
    async fn count_not_found(&self, id: &CheckoutId) {
        let ledger = self.ledger.clone();
        let for_ledger = id.clone();
        match tokio::task::spawn_blocking(move || ledger.note_not_found(&for_ledger)).await {
            Ok(Ok((count, true))) => {
                tracing::error!(
                    checkout = %id,
                    "paymennt said {count} times in a row that this checkout does not exist; it is no longer watched\n\n\
                     check that it belongs to this API key's merchant and [paymennt] environment, then run: paywatch track --checkout-id {id}"
                );
                self.watch_set_changed
                    .send_modify(|generation| *generation += 1);
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::error!(checkout = %id, %error, "cannot count a not-found answer")
            }
            Err(error) => tracing::error!(checkout = %id, %error, "ledger task failed"),
        }
    }

    /// One verification. Returns the nudge if it should be retried.
    async fn verify(&self, nudge: Nudge) -> Option<Nudge> {
        let Ok(_permit) = self.concurrency.acquire().await else {
            return None;
        };
        self.stats.send_modify(|stats| stats.calls += 1);
        let verified = match self.client.get_checkout(&nudge.checkout_id).await {
            Ok(verified) => verified,
            Err(error) => {
                self.stats.send_modify(|stats| stats.failures += 1);
                if error.is_retryable() {
                    tracing::warn!(checkout = %nudge.checkout_id, source = %nudge.source, %error, "Get Checkout failed; will try again");
                    return Some(nudge);
                }
                tracing::error!(checkout = %nudge.checkout_id, source = %nudge.source, %error, "Get Checkout refused; nothing recorded");
                if error.is_not_found() {
                    self.count_not_found(&nudge.checkout_id).await;
                }
                return None;
            }
        };
        let config = self.config.borrow().clone();
        let ledger = self.ledger.clone();
        let source = nudge.source;
        let changed_at = nudge.changed_at;
        let for_ledger = verified.clone();
        let applied = tokio::task::spawn_blocking(move || {
            ledger.apply(
                &for_ledger,
                source,
                changed_at,
                &config.hooks,
                config.refund_watch,
            )
        })
        .await;
        match applied {
            Ok(Ok(ApplyOutcome::Transition {
                transition,
                deliveries,
                watched,
            })) => {
                let elapsed = nudge.seen_at.elapsed();
                log_transition(
                    &verified,
                    transition.from.as_deref(),
                    source,
                    transition.latency_ms,
                    elapsed,
                    deliveries.len(),
                );
                self.stats.send_modify(|stats| {
                    stats.transitions += 1;
                    if verified.status() == &crate::domain::CheckoutStatus::Paid {
                        stats.last_payment = Some(Utc::now());
                    }
                });
                self.ledger_changed
                    .send_modify(|generation| *generation += 1);
                if !watched {
                    self.watch_set_changed
                        .send_modify(|generation| *generation += 1);
                }
            }
            Ok(Ok(ApplyOutcome::Unchanged)) => {
                tracing::debug!(checkout = %verified.id(), status = %verified.status(), %source, "verified; unchanged");
            }
            Ok(Ok(ApplyOutcome::Stale)) => {
                tracing::debug!(checkout = %verified.id(), %source, "answer older than one already recorded; ignored");
            }
            Ok(Err(error)) => {
                tracing::error!(checkout = %nudge.checkout_id, %error, "cannot record the verified status; will try again");
                return Some(nudge);
            }
            Err(join) => {
                tracing::error!(checkout = %nudge.checkout_id, error = %join, "ledger task failed");
            }
        }
        None
    }
}

/// The operator's line: `PAID checkout=… order=… 100.00 AED (was PENDING; verified 142 ms after the change)`.
fn log_transition(
    verified: &VerifiedCheckout,
    previous: Option<&str>,
    source: Source,
    latency_ms: Option<i64>,
    since_seen: Duration,
    hooks: usize,
) {
    let facts = verified.facts();
    let status = verified.status();
    let order = facts
        .order_id
        .as_deref()
        .map(printable)
        .unwrap_or_else(|| "-".into());
    let was = previous.unwrap_or("untracked");
    let timing = match (source, latency_ms) {
        (Source::Firestore, Some(ms)) => format!("verified {ms} ms after the change"),
        (Source::Firestore, None) => format!(
            "verified {} ms after the notification",
            since_seen.as_millis()
        ),
        (Source::Reconcile, _) => "found by the reconciler".to_owned(),
        (Source::Manual, _) => "recorded by hand".to_owned(),
    };
    let mut line = format!(
        "{status} checkout={} order={order} {} {} (was {was}; {timing})",
        facts.id,
        format_money(facts.amount),
        facts.currency
    );
    if let Some(refunded) = facts.total_refunded.filter(|r| !r.is_zero()) {
        line.push_str(&format!(
            " refunded={} {}",
            format_money(refunded),
            facts.currency
        ));
    }
    tracing::info!(target: "paywatch::payment", %source, hooks, "{line}");
}
