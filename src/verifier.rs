//! The verifier: turns "checkout X may have changed" into a verified status in the ledger.
//!
//! Owns: calling Get Checkout for each nudge, with at most one call in flight per checkout
//! (a burst of nudges costs at most one extra call), a global concurrency limit, the order in
//! which waiting checkouts are verified, and the operator's payment log line.
//! Must never: record anything that Get Checkout did not say. Nudges carry no status; the only
//! status that reaches the ledger is the one in a [`VerifiedCheckout`].
//!
//! # Scheduling
//!
//! Nudges arrive on two channels. *Urgent* ones (a Firestore change, a person) are always
//! taken at once and verified before any *sweep* nudge (the reconciler), so a payment never
//! waits behind a sweep of thousands of open checkouts. Sweep nudges are taken only while few
//! are queued, which makes the reconciler wait: its pace is the verifier's. At most
//! `concurrency` Get Checkout calls run at once (a verification waiting for its ticket or for
//! its answer to be recorded holds no call, so a slow disk does not idle the API connection;
//! up to `IN_FLIGHT_PER_CALL` times as many verifications are under way, sweep ones only
//! within the first `concurrency`); a checkout waiting in a queue is queued once however many
//! nudges name it. A nudge whose checkout was verified by a request sent after the nudge's
//! change was seen ([`Nudge::seen_after`]) makes no call at all.
//!
//! # Tickets and recording
//!
//! The ledger is written by two threads of the verifier's, each taking everything waiting for
//! it in one transaction: a ticketer hands out the tickets of nudges that carry none (the
//! listener's come with one, issued when their change was noted; a burst of sweep nudges costs
//! a few transactions instead of one each), and a recorder writes the answers (group commit:
//! one fsync covers a burst of transitions, and an answer never waits for more than the commit
//! in progress plus its own).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::{CheckoutId, Source, VerifyTicket, format_money, printable};
use crate::hooks::DispatcherWake;
use crate::ledger::{ApplyOutcome, ApplyRequest, Ledger, LedgerError, NotFoundOutcome};
use crate::metrics::Metrics;
use crate::paymennt::{Client, VerifiedCheckout};
use crate::settings::HookSettings;
use crate::sources::Nudge;

/// What the verifier needs from the (reloadable) configuration.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The paymennt client (rebuilt on reload, so rotated credentials take effect).
    pub client: Client,
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

/// Verifications under way at once, per Get Checkout call allowed at once: the others wait for
/// a ticket or for their answer to be recorded, both behind the ledger's fsync.
const IN_FLIGHT_PER_CALL: usize = 4;

/// At most this many answers are recorded in one transaction.
const MAX_GROUP: usize = 256;

/// A verification's request for its ticket, and where the ticket goes: `None` when a request
/// sent after `seen_after` has answered already.
struct TicketRequest {
    checkout_id: CheckoutId,
    seen_after: Option<VerifyTicket>,
    ticket: oneshot::Sender<Result<Option<VerifyTicket>, LedgerError>>,
}

/// The verification tasks' way to the ticketer and the recorder.
struct LedgerQueues {
    tickets: mpsc::Sender<TicketRequest>,
    recordings: mpsc::Sender<Recording>,
}

impl LedgerQueues {
    /// Starts the ticketer and the recorder threads writing into `ledger`, each queue holding
    /// up to `capacity`; both end once every clone of the queues is dropped. Must be called
    /// within the runtime: the threads wait on the ledger's calls through it.
    ///
    /// # Errors
    ///
    /// A thread could not be started.
    fn start(
        ledger: &Ledger,
        config: &watch::Receiver<VerifierConfig>,
        capacity: usize,
    ) -> std::io::Result<(LedgerQueues, [GroupWriter; 2])> {
        let (tickets, ticket_requests) = mpsc::channel(capacity);
        let runtime = tokio::runtime::Handle::current();
        let (issuer, issuing) = (ledger.clone(), runtime.clone());
        let ticketer = GroupWriter::spawn("paywatch-tickets", ticket_requests, move |group| {
            issuing.block_on(issue_tickets(&issuer, group));
        })?;
        let (recordings, waiting) = mpsc::channel(capacity);
        let (writer, config) = (ledger.clone(), config.clone());
        let recorder = GroupWriter::spawn("paywatch-recorder", waiting, move |group| {
            runtime.block_on(record_answers(&writer, &config, group));
        })?;
        let queues = LedgerQueues {
            tickets,
            recordings,
        };
        Ok((queues, [ticketer, recorder]))
    }
}

/// A verified answer on its way to the recorder, and where its outcome goes.
struct Recording {
    request: ApplyRequest,
    outcome: oneshot::Sender<Result<ApplyOutcome, LedgerError>>,
}

/// Running figures, for the status line and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifierStats {
    /// Get Checkout calls made.
    pub calls: u64,
    /// Nudges that needed no call: the checkout was verified by a request sent after the
    /// nudge's change was seen.
    pub covered: u64,
    /// Transitions recorded.
    pub transitions: u64,
    /// Verifications that failed after retries.
    pub failures: u64,
    /// When the last PAID was recorded.
    pub last_payment: Option<DateTime<Utc>>,
    /// Since when Get Checkout has been failing (network, 5xx, 429, refused credentials) with
    /// no success in between; `None` while it works. "Not found" answers are not failures.
    pub failing_since: Option<DateTime<Utc>>,
}

/// Where the verifier says what it changed, so the stages after it can follow.
#[derive(Debug, Clone)]
pub struct VerifierSignals {
    /// Woken after every transition that queued hook deliveries (a transition with none has
    /// nothing for the dispatcher to do).
    pub dispatcher: DispatcherWake,
    /// Bumped when a transition ended a checkout's watch (the listener drops its target).
    pub watch_set_changed: watch::Sender<u64>,
}

/// A verification finished: what to do next for that checkout.
struct Finished {
    checkout_id: CheckoutId,
    /// The nudge to retry later (the call failed in a way that may pass), if any.
    retry: Option<Nudge>,
}

/// Whether a nudge jumps the sweep queue.
fn is_urgent(nudge: &Nudge) -> bool {
    nudge.source != Source::Reconcile
}

/// A checkout's place in the verifier.
enum Slot {
    /// In a queue, waiting for a free call.
    Queued(Nudge),
    /// A call is in flight; at most one nudge waits behind it (the change may have landed after
    /// paymennt answered).
    Running(Option<Nudge>),
}

/// The scheduler's state: slots, the two queues, retries and the calls in flight.
struct Schedule {
    slots: HashMap<CheckoutId, Slot>,
    urgent: VecDeque<CheckoutId>,
    sweep: VecDeque<CheckoutId>,
    /// Consecutive failed verifications per checkout, for the retry schedule.
    failures: HashMap<CheckoutId, usize>,
}

impl Schedule {
    fn enqueue(&mut self, id: CheckoutId, urgent: bool) {
        if urgent {
            self.urgent.push_back(id);
        } else {
            self.sweep.push_back(id);
        }
    }

    /// Takes a nudge: queues its checkout, or coalesces it with what is already there.
    fn accept(&mut self, nudge: Nudge) {
        let urgent = is_urgent(&nudge);
        match self.slots.get_mut(&nudge.checkout_id) {
            None => {
                let id = nudge.checkout_id.clone();
                self.slots.insert(id.clone(), Slot::Queued(nudge));
                self.enqueue(id, urgent);
            }
            Some(Slot::Queued(queued)) => {
                // Already waiting. An urgent nudge promotes a sweep one (and carries the change
                // time); the stale sweep queue entry is skipped when reached.
                if urgent && !is_urgent(queued) {
                    let id = nudge.checkout_id.clone();
                    *queued = nudge;
                    self.urgent.push_back(id);
                }
            }
            Some(Slot::Running(waiting)) => {
                let replace = match waiting {
                    None => true,
                    Some(behind) => urgent && !is_urgent(behind),
                };
                if replace {
                    tracing::debug!(checkout = %nudge.checkout_id, source = %nudge.source, "nudge waits behind the call in flight");
                    *waiting = Some(nudge);
                }
            }
        }
    }

    /// The next queued nudge to verify, urgent ones first; marks its checkout running.
    fn next(&mut self, sweeps_allowed: bool) -> Option<Nudge> {
        loop {
            let id = match self.urgent.pop_front() {
                Some(id) => id,
                None if sweeps_allowed => self.sweep.pop_front()?,
                None => return None,
            };
            if let Some(slot) = self.slots.get_mut(&id)
                && matches!(slot, Slot::Queued(_))
                && let Slot::Queued(nudge) = std::mem::replace(slot, Slot::Running(None))
            {
                return Some(nudge);
            }
            // A duplicate entry for a checkout already started: skip it.
        }
    }

    /// A call ended: queue the nudge that waited behind it, or free the slot.
    fn finish(&mut self, id: &CheckoutId) {
        match self.slots.remove(id) {
            Some(Slot::Running(Some(next))) => {
                let urgent = is_urgent(&next);
                self.slots.insert(id.clone(), Slot::Queued(next));
                self.enqueue(id.clone(), urgent);
            }
            Some(Slot::Queued(nudge)) => {
                // Cannot happen (only running checkouts finish); keep the nudge rather than lose it.
                let urgent = is_urgent(&nudge);
                self.slots.insert(id.clone(), Slot::Queued(nudge));
                self.enqueue(id.clone(), urgent);
            }
            Some(Slot::Running(None)) | None => {}
        }
    }

    /// Drops queued sweep work (the drain: the next start's reconciler redoes it).
    fn drop_sweeps(&mut self) {
        for id in self.sweep.drain(..) {
            if matches!(self.slots.get(&id), Some(Slot::Queued(nudge)) if !is_urgent(nudge)) {
                self.slots.remove(&id);
            }
        }
    }
}

/// The verifier task. Build with [`Verifier::new`], then [`Verifier::run`].
pub struct Verifier {
    ledger: Ledger,
    config: watch::Receiver<VerifierConfig>,
    concurrency: usize,
    /// One permit per Get Checkout call allowed at once.
    calls_allowed: tokio::sync::Semaphore,
    /// The hook dispatcher, woken when a transition queued deliveries.
    dispatcher: DispatcherWake,
    watch_set_changed: watch::Sender<u64>,
    stats: watch::Sender<VerifierStats>,
    metrics: Metrics,
}

impl Verifier {
    /// A verifier recording into `ledger` with the client and hooks of `config`, at most
    /// `concurrency` calls in flight, telling the later stages through `signals`.
    pub fn new(
        ledger: Ledger,
        config: watch::Receiver<VerifierConfig>,
        concurrency: usize,
        signals: VerifierSignals,
    ) -> Verifier {
        Verifier {
            ledger,
            config,
            concurrency: concurrency.max(1),
            calls_allowed: tokio::sync::Semaphore::new(concurrency.max(1)),
            dispatcher: signals.dispatcher,
            watch_set_changed: signals.watch_set_changed,
            stats: watch::channel(VerifierStats::default()).0,
            metrics: Metrics::disabled(),
        }
    }

    /// The same verifier, counting verifications and transitions in `metrics`.
    pub fn with_metrics(self, metrics: Metrics) -> Verifier {
        Verifier { metrics, ..self }
    }

    /// Figures, updated as the verifier works.
    pub fn stats(&self) -> watch::Receiver<VerifierStats> {
        self.stats.subscribe()
    }

    /// Verifies nudges until both channels close (all senders dropped), then finishes the
    /// calls in flight and the urgent nudges already queued; queued sweep nudges are dropped.
    /// `abort` cancels everything at once (the drain deadline passed).
    pub async fn run(
        self,
        mut urgent: mpsc::Receiver<Nudge>,
        mut sweep: mpsc::Receiver<Nudge>,
        abort: CancellationToken,
    ) {
        let this = Arc::new(self);
        let (queues, writers) = match LedgerQueues::start(
            &this.ledger,
            &this.config,
            this.concurrency * IN_FLIGHT_PER_CALL,
        ) {
            Ok(started) => started,
            Err(error) => {
                // The verifier ends: its supervisor stops the daemon, naming it.
                tracing::error!(%error, "cannot start the verifier's ledger threads; nothing can be verified");
                return;
            }
        };
        let queues = Arc::new(queues);
        let mut schedule = Schedule {
            slots: HashMap::new(),
            urgent: VecDeque::new(),
            sweep: VecDeque::new(),
            failures: HashMap::new(),
        };
        let mut calls: JoinSet<Finished> = JoinSet::new();
        // Which checkout each call task serves, so a task that panicked still frees its slot.
        let mut call_owners: HashMap<tokio::task::Id, CheckoutId> = HashMap::new();
        let mut retries: JoinSet<Nudge> = JoinSet::new();
        let (mut urgent_open, mut sweep_open) = (true, true);
        let concurrency = this.concurrency;
        loop {
            let draining = !urgent_open && !sweep_open;
            if draining {
                retries.abort_all();
                schedule.drop_sweeps();
            }
            while calls.len() < concurrency * IN_FLIGHT_PER_CALL {
                // Sweep work never takes more than `concurrency` places, so an urgent nudge
                // waits for a call behind at most that many sweep verifications.
                let Some(nudge) = schedule.next(!draining && calls.len() < concurrency) else {
                    break;
                };
                let owner = nudge.checkout_id.clone();
                let task = Arc::clone(&this);
                let abort = abort.clone();
                let queues = Arc::clone(&queues);
                let handle = calls.spawn(async move {
                    let checkout_id = nudge.checkout_id.clone();
                    let retry = tokio::select! {
                        retry = task.verify(nudge, &queues) => retry,
                        () = abort.cancelled() => None,
                    };
                    Finished { checkout_id, retry }
                });
                call_owners.insert(handle.id(), owner);
            }
            if draining && calls.is_empty() {
                // Every answer is recorded before the verifier says it is done.
                drop(queues);
                for writer in writers {
                    writer.ended().await;
                }
                return;
            }
            tokio::select! {
                nudge = urgent.recv(), if urgent_open => match nudge {
                    Some(nudge) => schedule.accept(nudge),
                    None => urgent_open = false,
                },
                // Sweep nudges are taken only while few wait: the reconciler blocks until then.
                nudge = sweep.recv(), if sweep_open && schedule.sweep.len() < concurrency => match nudge {
                    Some(nudge) => schedule.accept(nudge),
                    None => sweep_open = false,
                },
                Some(Ok(nudge)) = retries.join_next(), if !draining => schedule.accept(nudge),
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
                            let count = schedule.failures.entry(finished.checkout_id.clone()).or_default();
                            *count += 1;
                            // A sweep nudge is not retried here: the next sweep is its retry.
                            let delay = RETRY_DELAYS.get(*count - 1).filter(|_| is_urgent(&nudge));
                            match delay {
                                Some(delay) if !draining => {
                                    let delay = *delay;
                                    retries.spawn(async move {
                                        tokio::time::sleep(delay).await;
                                        Nudge { seen_at: Instant::now(), ..nudge }
                                    });
                                }
                                _ => { schedule.failures.remove(&finished.checkout_id); }
                            }
                        }
                        None => { schedule.failures.remove(&finished.checkout_id); }
                    }
                    schedule.finish(&finished.checkout_id);
                }
                () = abort.cancelled() => {
                    // The writer threads end once the aborted calls have dropped their queues.
                    calls.abort_all();
                    return;
                }
            }
        }
    }

    /// Counts a "not found" answer; after a few in a row the checkout is no longer watched,
    /// unless many checkouts look gone at once (a configuration problem: all stay watched).
    async fn count_not_found(
        &self,
        id: &CheckoutId,
        client: &Client,
        error: &crate::paymennt::Error,
    ) {
        match self.ledger.note_not_found(id).await {
            Ok(NotFoundOutcome::Unwatched { count }) => {
                tracing::error!(
                    checkout = %id,
                    "paymennt said {count} times in a row that this checkout does not exist; it is no longer watched\n\n\
                     check that it belongs to this API key's merchant and [paymennt] environment, then run: paywatch track --checkout-id {id}"
                );
                self.watch_set_changed
                    .send_modify(|generation| *generation += 1);
            }
            Ok(NotFoundOutcome::ManyLookGone(gone)) => {
                tracing::error!(
                    checkout = %id,
                    base_url = %client.base_url(),
                    "{} of {} watched checkouts look gone at once (the latest answer from {}: {error}); \
                     that is a configuration problem, not vanished checkouts, so all stay watched\n\n\
                     check [paymennt] base_url, environment and that the API key belongs to the merchant that created them; run: paywatch check-config --online",
                    gone.checkouts,
                    gone.watched,
                    client.base_url(),
                );
            }
            Ok(NotFoundOutcome::Counted { .. }) => {}
            Err(error) => {
                tracing::error!(checkout = %id, %error, "cannot count a not-found answer")
            }
        }
    }

    /// A ticket from the ticketer for `nudge`: `None` when a request sent after its change
    /// was seen has answered already (counted as covered), `Err` when none could be had (the
    /// nudge is retried).
    async fn take_ticket(
        &self,
        nudge: &Nudge,
        queues: &LedgerQueues,
    ) -> Result<Option<VerifyTicket>, ()> {
        let (ticket, issued) = oneshot::channel();
        let request = TicketRequest {
            checkout_id: nudge.checkout_id.clone(),
            seen_after: nudge.seen_after,
            ticket,
        };
        if queues.tickets.send(request).await.is_err() {
            tracing::error!(checkout = %nudge.checkout_id, "the ticketer is gone; will try again");
            return Err(());
        }
        match issued.await {
            Ok(Ok(Some(ticket))) => Ok(Some(ticket)),
            Ok(Ok(None)) => {
                tracing::debug!(checkout = %nudge.checkout_id, source = %nudge.source, "verified after this change was seen; no call needed");
                self.stats.send_modify(|stats| stats.covered += 1);
                self.metrics.verification_skipped(nudge.source);
                Ok(None)
            }
            Ok(Err(error)) => {
                tracing::error!(checkout = %nudge.checkout_id, %error, "cannot take a verification ticket; will try again");
                Err(())
            }
            Err(_) => {
                tracing::error!(checkout = %nudge.checkout_id, "the ticketer failed before issuing this ticket; will try again");
                Err(())
            }
        }
    }

    /// One verification. Returns the nudge if it should be retried.
    async fn verify(&self, mut nudge: Nudge, queues: &LedgerQueues) -> Option<Nudge> {
        let client = self.config.borrow().client.clone();
        // The ticket orders this answer against every other (never a clock): the one issued
        // when the change was noted, or one from the ticketer, which says None when a request
        // sent after this nudge's change was seen has answered already. Taken out of the
        // nudge, so a retry asks for a new one.
        let ticket = match nudge.ticket.take() {
            Some(ticket) => ticket,
            None => match self.take_ticket(&nudge, queues).await {
                Ok(Some(ticket)) => ticket,
                Ok(None) => return None,
                Err(()) => return Some(nudge),
            },
        };
        self.stats.send_modify(|stats| stats.calls += 1);
        self.metrics.verification(nudge.source);
        let answer = {
            let Ok(_call) = self.calls_allowed.acquire().await else {
                return Some(nudge);
            };
            client.get_checkout(&nudge.checkout_id, ticket).await
        };
        let verified = match answer {
            Ok(verified) => {
                self.stats
                    .send_if_modified(|stats| stats.failing_since.take().is_some());
                verified
            }
            Err(error) => {
                let answered = error.is_not_found();
                self.stats.send_modify(|stats| {
                    stats.failures += 1;
                    if answered {
                        stats.failing_since = None;
                    } else if stats.failing_since.is_none() {
                        stats.failing_since = Some(Utc::now());
                    }
                });
                if error.is_retryable() && error.is_configuration_problem() {
                    tracing::error!(checkout = %nudge.checkout_id, source = %nudge.source, base_url = %client.base_url(), %error, "Get Checkout failed; will try again");
                    return Some(nudge);
                }
                if error.is_retryable() {
                    tracing::warn!(checkout = %nudge.checkout_id, source = %nudge.source, %error, "Get Checkout failed; will try again");
                    return Some(nudge);
                }
                tracing::error!(checkout = %nudge.checkout_id, source = %nudge.source, base_url = %client.base_url(), %error, "Get Checkout refused; nothing recorded");
                if error.is_not_found() {
                    self.count_not_found(&nudge.checkout_id, &client, &error)
                        .await;
                }
                return None;
            }
        };
        let source = nudge.source;
        let (outcome, recorded) = oneshot::channel();
        let recording = Recording {
            request: ApplyRequest {
                verified: verified.clone(),
                source,
                changed_at: nudge.changed_at,
            },
            outcome,
        };
        if queues.recordings.send(recording).await.is_err() {
            tracing::error!(checkout = %nudge.checkout_id, "the recorder is gone; will try again");
            return Some(nudge);
        }
        match recorded.await {
            Ok(Ok(ApplyOutcome::Transition {
                transition,
                deliveries,
                watched,
            })) => {
                let elapsed = nudge.seen_at.elapsed();
                // The ledger may record another source than the nudge's: a baseline is an import.
                let recorded_source = transition.source.parse().unwrap_or(source);
                log_transition(
                    &verified,
                    transition
                        .from
                        .as_ref()
                        .map(crate::domain::CheckoutStatus::as_str),
                    recorded_source,
                    transition.latency_ms,
                    elapsed,
                    deliveries.len(),
                );
                self.metrics.transition(verified.status(), recorded_source);
                self.stats.send_modify(|stats| {
                    stats.transitions += 1;
                    if verified.status() == &crate::domain::CheckoutStatus::Paid {
                        stats.last_payment = Some(Utc::now());
                    }
                });
                if !deliveries.is_empty() {
                    self.dispatcher.wake();
                }
                if !watched {
                    self.watch_set_changed
                        .send_modify(|generation| *generation += 1);
                }
            }
            Ok(Ok(ApplyOutcome::Unchanged)) => {
                tracing::debug!(checkout = %verified.id(), status = %printable(verified.status().as_str()), %source, "verified; unchanged");
            }
            Ok(Ok(ApplyOutcome::Stale)) => {
                // Cannot happen with one ledger handing out tickets, unless another process
                // verified this checkout meanwhile; whatever the cause, ask again.
                tracing::warn!(checkout = %verified.id(), %source, ticket = %verified.ticket(), "answer to a request older than one already recorded; ignored, the checkout stays marked and is verified again");
                return Some(nudge);
            }
            Ok(Err(error)) => {
                tracing::error!(checkout = %nudge.checkout_id, %error, "cannot record the verified status; will try again");
                return Some(nudge);
            }
            Err(_) => {
                tracing::error!(checkout = %nudge.checkout_id, "the recorder failed before recording this answer; will try again");
                return Some(nudge);
            }
        }
        None
    }
}

/// A thread that writes groups of queued items to the ledger (the ticketer, the recorder).
/// Blocking on its queue, and on the ledger's call for each group (SQLite runs it on the
/// blocking pool), it answers a lone item in three thread wake-ups (the queue's, the ledger's,
/// the reply's), where a task doing the same took four.
struct GroupWriter {
    /// Closed (the sender dropped) when the thread ends, however it ends.
    ended: oneshot::Receiver<()>,
}

impl GroupWriter {
    /// Starts thread `name`: it takes every item waiting on `queue` (at least one, at most
    /// [`MAX_GROUP`]) and hands them to `write` as one group; items that arrive meanwhile form
    /// the next group. It ends when every sender of `queue` is gone. A `write` that panics
    /// drops its group (each waiting verification sees its reply dropped and retries) and is
    /// logged; the thread goes on with the next group.
    fn spawn<T: Send + 'static>(
        name: &str,
        mut queue: mpsc::Receiver<T>,
        mut write: impl FnMut(Vec<T>) + Send + 'static,
    ) -> std::io::Result<GroupWriter> {
        let (alive, ended) = oneshot::channel::<()>();
        let thread = name.to_owned();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _alive = alive;
                while let Some(first) = queue.blocking_recv() {
                    let mut group = Vec::with_capacity(MAX_GROUP.min(queue.len() + 1));
                    group.push(first);
                    while group.len() < MAX_GROUP {
                        match queue.try_recv() {
                            Ok(item) => group.push(item),
                            Err(_) => break,
                        }
                    }
                    let written =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(group)));
                    if written.is_err() {
                        tracing::error!(thread = %thread, "writing a group to the ledger panicked; its verifications are retried");
                    }
                }
            })?;
        Ok(GroupWriter { ended })
    }

    /// Waits for the thread to end (its queue's senders must be gone by then).
    async fn ended(self) {
        let _ = self.ended.await;
    }
}

/// The ticketer's work for one group: their tickets in one ledger transaction, each sent to
/// the verification that asked.
async fn issue_tickets(ledger: &Ledger, group: Vec<TicketRequest>) {
    let (wanted, replies): (Vec<_>, Vec<_>) = group
        .into_iter()
        .map(|request| ((request.checkout_id, request.seen_after), request.ticket))
        .unzip();
    match ledger.issue_tickets(&wanted).await {
        Ok(tickets) => {
            for (reply, ticket) in replies.into_iter().zip(tickets) {
                // The verification may have been cancelled meanwhile: nothing waits.
                let _ = reply.send(Ok(ticket));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(LedgerError {
                    path: error.path.clone(),
                    message: error.message.clone(),
                }));
            }
        }
    }
}

/// The recorder's work for one group: the answers in one ledger transaction, with the hooks and
/// refund watch configured at that moment, each outcome sent to the verification that waits.
async fn record_answers(
    ledger: &Ledger,
    config: &watch::Receiver<VerifierConfig>,
    group: Vec<Recording>,
) {
    let (requests, outcomes): (Vec<ApplyRequest>, Vec<_>) = group
        .into_iter()
        .map(|recording| (recording.request, recording.outcome))
        .unzip();
    let current = config.borrow().clone();
    let results = ledger
        .apply_all(requests, &current.hooks, current.refund_watch)
        .await;
    for (outcome, result) in outcomes.into_iter().zip(results) {
        // The verification may have been cancelled meanwhile: nothing waits.
        let _ = outcome.send(result);
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
    let line = payment_line(verified, previous, source, latency_ms, since_seen);
    tracing::info!(target: "paywatch::payment", %source, hooks, "{line}");
}

/// The text of the operator's line; always one line, whatever paymennt sent.
fn payment_line(
    verified: &VerifiedCheckout,
    previous: Option<&str>,
    source: Source,
    latency_ms: Option<i64>,
    since_seen: Duration,
) -> String {
    let facts = verified.facts();
    // paymennt's text is escaped: a newline in a status must not start a forged line.
    let status = printable(verified.status().as_str());
    let order = facts
        .order_id
        .as_deref()
        .map(printable)
        .unwrap_or_else(|| "-".into());
    // The same spelling as the CLI's `events` and `status` ("untracked").
    let was = previous.map_or_else(|| "untracked".to_owned(), printable);
    let timing = match (source, latency_ms) {
        (Source::Firestore, Some(ms)) => format!("verified {ms} ms after the change"),
        (Source::Firestore, None) => format!(
            "verified {} ms after the notification",
            since_seen.as_millis()
        ),
        (Source::Reconcile, _) => "found by the reconciler".to_owned(),
        (Source::Manual, _) => "recorded by hand".to_owned(),
        (Source::Webhook, _) => format!("verified {} ms after the webhook", since_seen.as_millis()),
        (Source::DiscoveryImport, _) => {
            "imported by discovery: reached before paywatch watched it; no hook run".to_owned()
        }
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
    line
}

#[cfg(test)]
mod tests;
