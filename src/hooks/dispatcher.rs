//! The hook dispatcher: the delivery loop of the ledger's transactional outbox.
//!
//! Owns: claiming due deliveries from the ledger, running each with [`runner::run`] under a
//! concurrency limit, recording each attempt's outcome as the hook's [`RetryPolicy`] decides,
//! logging one line per attempt, recovering deliveries a dead daemon left `running`, and the
//! drain on shutdown.
//! Must never: run anything that is not a delivery row of the ledger (so never an unverified
//! status: only [`Ledger::apply`], which takes a verified checkout, queues deliveries), run a
//! shell, run two deliveries of one checkout and hook at once or out of order, or log the
//! checkout JSON (it may hold customer details).
//!
//! # Delivery
//!
//! At-least-once. A delivery is marked `running` (and its attempt counted) in the same ledger
//! transaction that claims it, committed before its process starts, and its outcome is written
//! before (or in the same transaction as) the claim of the next event of the same checkout and
//! hook, so one checkout's events reach a hook one at a time, in
//! transition order ([`Ledger::claim_due_deliveries`] enforces it); different checkouts run in
//! parallel up to the concurrency limit. A delivery that was `running` when the daemon died is
//! put back to `pending` by [`Dispatcher::run`] before its first claim, and runs again with
//! the same event id: a hook de-duplicates on `PAYWATCH_EVENT_ID`.
//!
//! # The loop
//!
//! Each round is one ledger transaction ([`Ledger::record_and_claim`]): write the outcomes of
//! the attempts that ended since the last round, and claim as many due deliveries as there
//! are free slots; then start each claimed one. A finished attempt only queues its outcome,
//! frees its slot and wakes the loop, so the outcomes of several attempts and the next claims
//! share one commit. Then the loop sleeps until the first of: a [`DispatcherHandle::wake`] (the
//! verifier recorded a transition, a hook finished, a reload), the next delivery's due time,
//! the poll interval ([`POLL_INTERVAL`], so deliveries queued by another process, such as
//! `paywatch hooks retry` or `track --checkout-id`, start within a second), or shutdown. It
//! does not sleep while a delivery is due and a slot is free. A ledger failure is logged and
//! the loop backs off (up to 30 s); it never ends the dispatcher. An outcome the ledger refuses
//! stays queued, its row `running` (which holds back only its own checkout and hook's later
//! events), and is written again with backoff.
//!
//! # Hooks removed from the configuration
//!
//! A delivery whose hook is no longer configured (renamed or removed, then SIGHUP) is marked
//! dead with an error naming the hook, and logged at error level with the command that revives
//! it once the hook is back. Dead rather than pending: a pending row nobody can run would be
//! claimed and skipped forever, and it would hide in `hooks list --state pending`.
//!
//! # Shutdown
//!
//! ```no_run
//! # async fn daemon(dispatcher: paywatch::hooks::Dispatcher, drain: std::time::Duration) {
//! use tokio_util::sync::CancellationToken;
//! let (shutdown, kill) = (CancellationToken::new(), CancellationToken::new());
//! let handle = dispatcher.handle();
//! let wake = dispatcher.wake_handle(); // give to the verifier: wake.wake() after each transition
//! let mut task = tokio::spawn(dispatcher.run(shutdown.clone(), kill.clone()));
//! // ... SIGHUP: handle.reload(HookSet::from_settings(&new_settings)?)
//! // SIGTERM: stop claiming; running hooks may finish until the drain timeout, then are stopped
//! // (SIGTERM, then SIGKILL after their grace period) and recorded as pending, due at the next start.
//! shutdown.cancel();
//! if tokio::time::timeout(drain, &mut task).await.is_err() {
//!     kill.cancel();
//!     let _ = task.await;
//! }
//! # }
//! ```

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::parse_decimal;
use crate::hooks::config::{HookSet, HookSpec, HookTarget};
use crate::hooks::event::HookEvent;
use crate::hooks::post;
use crate::hooks::retry::RetryPolicy;
use crate::hooks::runner::{self, HookOutcome};
use crate::ledger::{Delivery, DeliveryUpdate, Ledger};
use crate::metrics::Metrics;

/// How often the dispatcher looks for due deliveries when nothing wakes it.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait after a ledger failure before trying again.
const MAX_LEDGER_BACKOFF: Duration = Duration::from_secs(30);

/// The shortest wait when the ledger says a delivery is due but the claim found none (a row
/// queued between the two queries, or a clock step): never spin.
const MIN_WAIT: Duration = Duration::from_millis(20);

/// How much of a hook's stderr goes into a log line.
const LOG_TAIL_BYTES: usize = 1024;

/// What the dispatcher and its handles share.
struct Shared {
    /// Wakes the loop: a transition was recorded, a hook finished, the hooks were reloaded.
    /// `Notify` keeps one wake-up for a loop that is not waiting yet, so none is lost.
    wake: Notify,
    /// The hooks deliveries are looked up in. Read once per claim; replaced by a reload.
    /// A std lock: held only to clone or swap the `Arc`, never across an await.
    hooks: RwLock<Arc<HookSet>>,
    /// Outcomes of ended attempts not written yet: the loop writes them in its next round
    /// (with its claims, one commit), and again with backoff while the ledger refuses them, so
    /// no delivery stays `running` until the next start. A std lock, never held across an await.
    unrecorded: Mutex<Vec<Unrecorded>>,
    /// paywatch could not start a hook for lack of descriptors or processes, and no hook has
    /// started since: the condition is logged at error once when it begins, not per attempt.
    starved: std::sync::atomic::AtomicBool,
}

/// An attempt's outcome still to be written.
#[derive(Debug, Clone)]
struct Unrecorded {
    delivery: Delivery,
    update: DeliveryUpdate,
    /// How many times the ledger refused it.
    refusals: u32,
    /// After a refusal: not written again before this (backoff, as for other ledger failures).
    retry_at: Option<tokio::time::Instant>,
}

impl Shared {
    fn unrecorded(&self) -> std::sync::MutexGuard<'_, Vec<Unrecorded>> {
        self.unrecorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hooks(&self) -> Arc<HookSet> {
        self.hooks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The delivery loop. Build it with [`Dispatcher::new`], hand out [`Dispatcher::handle`]s, then
/// start it with [`Dispatcher::run`].
pub struct Dispatcher {
    /// Where deliveries are claimed and recorded.
    ledger: Ledger,
    /// Shared with the handles.
    shared: Arc<Shared>,
    /// How many hooks may run at once, over all hooks.
    concurrency: usize,
    /// The idle poll interval.
    poll: Duration,
    /// Where attempts are counted and timed.
    metrics: Metrics,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("ledger", &self.ledger)
            .field("concurrency", &self.concurrency)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

/// A cheap, cloneable handle that can only wake a dispatcher: what the verifier is given at
/// wiring, to say "a transition queued deliveries" (it cannot reload hooks).
#[derive(Clone)]
pub struct DispatcherWake {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DispatcherWake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherWake").finish_non_exhaustive()
    }
}

impl DispatcherWake {
    /// Asks the dispatcher to look for due deliveries now; see [`DispatcherHandle::wake`].
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Whether a wake-up is pending (and takes it): for tests of what wakes the dispatcher.
    #[cfg(test)]
    pub(crate) async fn take_pending(&self) -> bool {
        tokio::time::timeout(Duration::ZERO, self.shared.wake.notified())
            .await
            .is_ok()
    }
}

/// A cheap, cloneable handle on a dispatcher: wake it, or give it new hooks.
#[derive(Clone)]
pub struct DispatcherHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DispatcherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherHandle").finish_non_exhaustive()
    }
}

impl DispatcherHandle {
    /// Asks the dispatcher to look for due deliveries now. Call it after recording a
    /// transition. Cheap; wakes coalesce.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Replaces the hooks (SIGHUP). Deliveries claimed from now on use the new definitions;
    /// running ones finish with the old. A delivery whose hook is gone becomes dead (see the
    /// module doc).
    pub fn reload(&self, hooks: HookSet) {
        *self
            .shared
            .hooks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(hooks);
        self.wake();
    }

    /// The hooks in use now.
    #[cfg(test)]
    pub fn hooks(&self) -> Arc<HookSet> {
        self.shared.hooks()
    }
}

impl Dispatcher {
    /// A dispatcher over `ledger` running `hooks`, at most `concurrency` at once (at least 1).
    pub fn new(ledger: Ledger, hooks: HookSet, concurrency: usize) -> Dispatcher {
        Dispatcher {
            ledger,
            shared: Arc::new(Shared {
                wake: Notify::new(),
                hooks: RwLock::new(Arc::new(hooks)),
                unrecorded: Mutex::new(Vec::new()),
                starved: std::sync::atomic::AtomicBool::new(false),
            }),
            concurrency: concurrency.max(1),
            poll: POLL_INTERVAL,
            metrics: Metrics::disabled(),
        }
    }

    /// The same dispatcher, counting and timing attempts in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Dispatcher {
        self.metrics = metrics;
        self
    }

    /// The same dispatcher with another idle poll interval (tests; at least 1 ms).
    #[cfg(test)]
    pub fn with_poll_interval(mut self, poll: Duration) -> Dispatcher {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// A handle to wake the dispatcher and reload its hooks, usable while it runs.
    pub fn handle(&self) -> DispatcherHandle {
        DispatcherHandle {
            shared: self.shared.clone(),
        }
    }

    /// A handle that only wakes the dispatcher (the verifier's, given at wiring).
    pub fn wake_handle(&self) -> DispatcherWake {
        DispatcherWake {
            shared: self.shared.clone(),
        }
    }

    /// Replaces the hooks; see [`DispatcherHandle::reload`].
    #[cfg(test)]
    pub fn reload(&self, hooks: HookSet) {
        self.handle().reload(hooks);
    }

    /// Runs the loop until `shutdown` (or `kill`) is cancelled, then waits for running hooks.
    ///
    /// First puts deliveries left `running` by a previous process back to `pending` (retrying
    /// until the ledger answers), and only then claims: run one dispatcher per ledger.
    ///
    /// After `shutdown`, nothing new is claimed and running hooks go on; cancelling `kill`
    /// (the drain timeout passed) stops them (SIGTERM to each hook's process group, SIGKILL
    /// after its grace period) and they are recorded as pending, due at once, so the next start
    /// runs them again. Returns when every started hook's outcome has been recorded (or the
    /// ledger refused it to the end, which leaves the row `running` for the next start to
    /// recover). While running, an outcome the ledger refused is written again by this loop,
    /// with backoff, as soon as the ledger takes it.
    pub async fn run(self, shutdown: CancellationToken, kill: CancellationToken) {
        let Dispatcher {
            ledger,
            shared,
            concurrency,
            poll,
            metrics,
        } = self;
        let slots = Arc::new(Semaphore::new(concurrency));
        let tasks = TaskTracker::new();
        let mut recovered = false;
        let mut backoff = Backoff::default();
        tracing::debug!(concurrency, "hook dispatcher started");
        loop {
            if shutdown.is_cancelled() || kill.is_cancelled() {
                break;
            }
            let mut wait = poll;
            if !recovered {
                match ledger.recover_running_deliveries().await {
                    Ok(count) => {
                        recovered = true;
                        backoff.reset();
                        if count > 0 {
                            tracing::info!(
                                deliveries = count,
                                "hook deliveries interrupted by the last stop will run again"
                            );
                        }
                    }
                    Err(error) => {
                        wait = backoff.next();
                        tracing::error!(%error, retry_in_ms = wait.as_millis() as u64,
                            "cannot recover interrupted hook deliveries; no hook runs until this works");
                    }
                }
            }
            // Outcomes first, then the free slots: an attempt frees its slot before it queues
            // its outcome, so each outcome taken here comes with its slot, and the next event of
            // its checkout and hook can be claimed in the same round.
            let outcomes = take_unrecorded(&shared);
            let free = if recovered {
                slots.available_permits()
            } else {
                0
            };
            if free > 0 || !outcomes.is_empty() {
                let now = Utc::now();
                let written: Vec<(String, DeliveryUpdate)> = outcomes
                    .iter()
                    .map(|o| (o.delivery.event_id.clone(), o.update.clone()))
                    .collect();
                match ledger.record_and_claim(&written, now, free).await {
                    Ok(round) => {
                        backoff.reset();
                        requeue_refused(&shared, outcomes, &round.refused);
                        let count = round.claimed.len();
                        let hooks = shared.hooks();
                        for delivery in round.claimed {
                            // Only this loop takes permits, so `free` of them are there.
                            let permit = slots
                                .clone()
                                .acquire_owned()
                                .await
                                .expect("the dispatcher never closes its semaphore");
                            let spec = hooks.get(&delivery.hook);
                            tasks.spawn(attempt(
                                shared.clone(),
                                spec,
                                delivery,
                                kill.clone(),
                                permit,
                                metrics.clone(),
                            ));
                        }
                        if count < free {
                            wait = wait.min(due_wait(round.next_due, poll, count == 0));
                        }
                    }
                    Err(error) => {
                        wait = backoff.next();
                        tracing::error!(%error, retry_in_ms = wait.as_millis() as u64,
                            outcomes = outcomes.len(),
                            "cannot record hook outcomes or claim hook deliveries (check the ledger's disk, or its database); trying again");
                        put_back(&shared, outcomes);
                    }
                }
            }
            if let Some(outcome_wait) = unrecorded_wait(&shared) {
                wait = wait.min(outcome_wait);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = kill.cancelled() => break,
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tasks.close();
        if !tasks.is_empty() {
            tracing::info!(running = tasks.len(), "waiting for running hooks to finish");
        }
        tasks.wait().await;
        if !write_unrecorded(&ledger, &shared).await {
            for stranded in shared.unrecorded().iter() {
                tracing::error!(
                    event_id = %stranded.delivery.event_id,
                    hook = %stranded.delivery.hook,
                    checkout = %stranded.delivery.checkout_id,
                    "cannot record a hook outcome before stopping; the delivery stays running and runs again at the next start"
                );
            }
        }
        tracing::debug!("hook dispatcher stopped");
    }
}

/// How long to sleep until the next delivery is due (`next_due`), at most `poll`; at least
/// [`MIN_WAIT`] when the claim found none though one looked due (never spin).
fn due_wait(next_due: Option<DateTime<Utc>>, poll: Duration, claimed_none: bool) -> Duration {
    match next_due {
        Some(due) => {
            let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            let wait = if claimed_none {
                wait.max(MIN_WAIT)
            } else {
                wait
            };
            wait.min(poll)
        }
        None => poll,
    }
}

/// Exponential backoff for ledger failures: 100 ms doubling to [`MAX_LEDGER_BACKOFF`].
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = Duration::from_millis(100).saturating_mul(1 << self.failures.min(10));
        delay.min(MAX_LEDGER_BACKOFF)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// How long after paywatch itself failed during an attempt (a panic) the delivery runs again.
const PANIC_RETRY: Duration = Duration::from_secs(30);

/// One attempt of one claimed delivery: run, decide, log, queue the outcome for the loop to
/// write, then free the slot and wake the loop. The row stays `running` until the loop has
/// written the outcome, so the next event of this checkout and hook is not claimed before.
async fn attempt(
    shared: Arc<Shared>,
    spec: Option<Arc<HookSpec>>,
    delivery: Delivery,
    kill: CancellationToken,
    permit: OwnedSemaphorePermit,
    metrics: Metrics,
) {
    let update = match prepare(&delivery, spec) {
        Ok((spec, event)) => {
            // A panic here (a bug in paywatch, not the hook's failure) must not leave the row
            // `running` until the next start: it is caught and the delivery retried.
            let run = async {
                #[cfg(test)]
                if delivery.hook == tests::PANICKING_HOOK {
                    panic!("a test asked this attempt to panic");
                }
                #[cfg(test)]
                let outcome = match (tests::injected_spawn_error(&delivery.hook), &spec.target) {
                    (Some(error), HookTarget::Command(command)) => HookOutcome {
                        ending: runner::spawn_failure(command, &error),
                        duration: Duration::ZERO,
                        stdout_tail: String::new(),
                        stderr_tail: String::new(),
                        pid: None,
                    },
                    _ => run_hook(&spec.target, &event, &kill).await,
                };
                #[cfg(not(test))]
                let outcome = run_hook(&spec.target, &event, &kill).await;
                let update = decide(&spec.policy, &delivery, &outcome);
                metrics.hook_attempt(&delivery.hook, update.label(), Some(outcome.duration));
                note_starvation(&shared, &delivery, &update);
                log_outcome(&delivery, &outcome, &update);
                update
            };
            match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run)).await {
                Ok(update) => update,
                Err(panic) => {
                    let reason = panic
                        .downcast_ref::<&str>()
                        .map(|text| (*text).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-text panic".to_owned());
                    tracing::error!(
                        event_id = %delivery.event_id,
                        hook = %delivery.hook,
                        checkout = %delivery.checkout_id,
                        attempt = delivery.attempts,
                        "paywatch failed while running this hook (a bug; please report it): \
                         {reason}; the delivery runs again in {}s",
                        PANIC_RETRY.as_secs()
                    );
                    DeliveryUpdate::Retry {
                        next_attempt_at: Utc::now()
                            + chrono::Duration::from_std(PANIC_RETRY)
                                .unwrap_or_else(|_| chrono::Duration::seconds(30)),
                        exit_code: None,
                        error: format!("paywatch failed while running the hook: {reason}"),
                    }
                }
            }
        }
        Err(error) => {
            tracing::error!(
                event_id = %delivery.event_id,
                hook = %delivery.hook,
                checkout = %delivery.checkout_id,
                status = %delivery.status,
                attempt = delivery.attempts,
                error = %error,
                "hook delivery dead; once fixed, run: paywatch hooks retry {}",
                delivery.event_id
            );
            let update = DeliveryUpdate::Dead {
                exit_code: None,
                error,
            };
            metrics.hook_attempt(&delivery.hook, update.label(), None);
            update
        }
    };
    // The process has ended: free the slot, then queue the outcome (in that order, see the
    // loop) for the loop to write in its next round, with other outcomes and its next claims.
    drop(permit);
    shared.unrecorded().push(Unrecorded {
        delivery,
        update,
        refusals: 0,
        retry_at: None,
    });
    shared.wake.notify_one();
}

/// Runs a command hook, or POSTs to a URL hook: one attempt, to an exact outcome.
async fn run_hook(target: &HookTarget, event: &HookEvent, kill: &CancellationToken) -> HookOutcome {
    match target {
        HookTarget::Command(command) => runner::run(command, event, kill).await,
        HookTarget::Url(hook) => post::deliver(hook, event, kill).await,
    }
}

/// Logs, once per episode, that paywatch cannot start hooks for lack of descriptors or
/// processes (the postponed attempts themselves log at debug), and when hooks start again.
fn note_starvation(shared: &Shared, delivery: &Delivery, update: &DeliveryUpdate) {
    use std::sync::atomic::Ordering;
    match update {
        DeliveryUpdate::Postponed { error, .. } => {
            if !shared.starved.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    event_id = %delivery.event_id,
                    hook = %delivery.hook,
                    checkout = %delivery.checkout_id,
                    %error,
                    "paywatch cannot start hooks: it is out of file descriptors or processes; \
                     deliveries are postponed (no attempt counted) and tried again every {}s; \
                     check LimitNOFILE=, TasksMax= and [http] max_connections",
                    crate::hooks::retry::NO_RESOURCES_RETRY.as_secs()
                );
            }
        }
        _ => {
            if shared.starved.swap(false, Ordering::AcqRel) {
                tracing::info!(hook = %delivery.hook, "paywatch can start hooks again");
            }
        }
    }
}

/// The hook and the event of a claimed delivery, or why it cannot run at all.
fn prepare(
    delivery: &Delivery,
    spec: Option<Arc<HookSpec>>,
) -> Result<(Arc<HookSpec>, HookEvent), String> {
    let spec = spec.ok_or_else(|| {
        format!(
            "hook '{}' is not configured (removed or renamed?)",
            crate::domain::printable(&delivery.hook)
        )
    })?;
    let event = event_for(delivery)
        .map_err(|error| format!("the ledger row cannot become a hook event: {error}"))?;
    Ok((spec, event))
}

/// The event a hook receives for a delivery row.
///
/// # Errors
///
/// Names the column that does not parse (only a ledger written by something else could).
pub fn event_for(delivery: &Delivery) -> Result<HookEvent, String> {
    let time = |what: &str, text: &str| {
        DateTime::parse_from_rfc3339(text)
            .map(|time| time.with_timezone(&Utc))
            .map_err(|error| format!("{what} '{}': {error}", crate::domain::printable(text)))
    };
    let money = |what: &str, text: Option<&str>| match text {
        None => Ok(None),
        Some(text) => parse_decimal(text).map(Some).ok_or_else(|| {
            format!(
                "{what} '{}' is not a decimal",
                crate::domain::printable(text)
            )
        }),
    };
    Ok(HookEvent {
        event_id: delivery.event_id.clone(),
        hook: delivery.hook.clone(),
        checkout_id: delivery
            .checkout_id
            .parse()
            .map_err(|error| format!("{error}"))?,
        order_id: delivery.order_id.clone(),
        request_id: delivery.request_id.clone(),
        status: delivery.status.clone(),
        previous_status: delivery.previous_status.clone(),
        amount: parse_decimal(&delivery.amount).ok_or_else(|| {
            format!(
                "amount '{}' is not a decimal",
                crate::domain::printable(&delivery.amount)
            )
        })?,
        currency: delivery
            .currency
            .parse()
            .map_err(|error| format!("{error}"))?,
        total_refunded: money("refunded_to", delivery.refunded_to.as_deref())?,
        refund_amount: match (
            money("refunded_from", delivery.refunded_from.as_deref())?,
            money("refunded_to", delivery.refunded_to.as_deref())?,
        ) {
            (Some(from), Some(to)) => Some(to - from),
            _ => None,
        },
        source: delivery
            .source
            .parse()
            .map_err(|error| format!("{error}"))?,
        tracked_via: delivery
            .tracked_via
            .parse()
            .map_err(|error| format!("{error}"))?,
        verified_at: time("verified_at", &delivery.verified_at)?,
        attempt: delivery.attempts,
        test: false,
        checkout: RawValue::from_string(delivery.verified_json.clone())
            .map_err(|error| format!("the verified checkout is not JSON: {error}"))?,
    })
}

fn decide(policy: &RetryPolicy, delivery: &Delivery, outcome: &HookOutcome) -> DeliveryUpdate {
    let now = Utc::now();
    let queued_at = DateTime::parse_from_rfc3339(&delivery.created_at)
        .map(|time| time.with_timezone(&Utc))
        .unwrap_or(now);
    policy.decide(outcome, delivery.attempts, queued_at, now)
}

/// One line per attempt: info when delivered, warn when retried, error when dead.
fn log_outcome(delivery: &Delivery, outcome: &HookOutcome, update: &DeliveryUpdate) {
    let duration_ms = outcome.duration.as_millis() as u64;
    let exit_code = outcome.exit_code();
    let (event_id, hook, checkout, status, attempt) = (
        delivery.event_id.as_str(),
        delivery.hook.as_str(),
        delivery.checkout_id.as_str(),
        delivery.status.as_str(),
        delivery.attempts,
    );
    match update {
        DeliveryUpdate::Delivered => tracing::info!(
            %event_id,
            %hook,
            %checkout,
            %status,
            attempt,
            exit_code = 0,
            duration_ms,
            replay = delivery.replay,
            "hook delivered"
        ),
        DeliveryUpdate::Retry {
            next_attempt_at,
            error,
            ..
        } => {
            let retry_in = (*next_attempt_at - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            let retry_in = humantime::format_duration(Duration::from_secs(retry_in.as_secs()));
            if matches!(
                outcome.ending,
                runner::Ending::Stopped(_) | runner::Ending::Interrupted(_)
            ) {
                tracing::warn!(
                    %event_id, %hook, %checkout, %status, attempt, duration_ms,
                    outcome = %error,
                    "hook interrupted by shutdown; it runs again at the next start"
                );
            } else {
                tracing::warn!(
                    %event_id, %hook, %checkout, %status, attempt, exit_code, duration_ms,
                    outcome = %error,
                    retry_in = %retry_in,
                    stderr = ?log_tail(&outcome.stderr_tail),
                    "hook failed; will retry"
                );
            }
        }
        // Logged at error once per episode by `note_starvation`.
        DeliveryUpdate::Postponed { error, .. } => tracing::debug!(
            %event_id, %hook, %checkout, %status, attempt,
            outcome = %error,
            "hook not started (paywatch is out of descriptors or processes); postponed"
        ),
        DeliveryUpdate::Dead { error, .. } => tracing::error!(
            %event_id, %hook, %checkout, %status, attempt, exit_code, duration_ms,
            outcome = %error,
            stderr = ?log_tail(&outcome.stderr_tail),
            "hook delivery dead; once fixed, run: paywatch hooks retry {event_id}"
        ),
    }
}

/// The end of a hook's output, at most [`LOG_TAIL_BYTES`], cut at a character boundary.
fn log_tail(text: &str) -> &str {
    let text = text.trim_end();
    let mut start = text.len().saturating_sub(LOG_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// How often the loop tries to write the outcomes left at shutdown.
const RECORD_TRIES: u32 = 3;

/// The queued outcomes to write this round: all but those refused lately and still in their
/// backoff.
fn take_unrecorded(shared: &Shared) -> Vec<Unrecorded> {
    let now = tokio::time::Instant::now();
    let mut queue = shared.unrecorded();
    let (due, later): (Vec<Unrecorded>, Vec<Unrecorded>) = std::mem::take(&mut *queue)
        .into_iter()
        .partition(|o| o.retry_at.is_none_or(|at| at <= now));
    *queue = later;
    due
}

/// How long until the first outcome in backoff may be written again, if any waits.
fn unrecorded_wait(shared: &Shared) -> Option<Duration> {
    let now = tokio::time::Instant::now();
    shared
        .unrecorded()
        .iter()
        .filter_map(|o| o.retry_at)
        .min()
        .map(|at| at.saturating_duration_since(now))
}

/// Puts outcomes that were not written back in the queue.
fn put_back(shared: &Shared, outcomes: Vec<Unrecorded>) {
    if outcomes.is_empty() {
        return;
    }
    let mut queue = shared.unrecorded();
    let later = std::mem::replace(&mut *queue, outcomes);
    queue.extend(later);
}

/// After a round: logs and queues again the outcomes the ledger refused (by index in
/// `outcomes`); the others are written.
fn requeue_refused(shared: &Shared, outcomes: Vec<Unrecorded>, refused: &[(usize, String)]) {
    let mut again = Vec::new();
    for (index, mut outcome) in outcomes.into_iter().enumerate() {
        let Some((_, error)) = refused.iter().find(|(i, _)| *i == index) else {
            if outcome.refusals > 0 {
                tracing::info!(
                    event_id = %outcome.delivery.event_id,
                    hook = %outcome.delivery.hook,
                    checkout = %outcome.delivery.checkout_id,
                    "hook outcome recorded after the ledger recovered"
                );
            }
            continue;
        };
        outcome.refusals = outcome.refusals.saturating_add(1);
        let delay = Backoff {
            failures: outcome.refusals - 1,
        }
        .next();
        outcome.retry_at = Some(tokio::time::Instant::now() + delay);
        if outcome.refusals == 1 {
            tracing::error!(
                event_id = %outcome.delivery.event_id,
                hook = %outcome.delivery.hook,
                checkout = %outcome.delivery.checkout_id,
                %error,
                "cannot record a hook outcome; the dispatcher keeps trying (check the ledger's disk, or its database); \
                 until then this checkout's later events for this hook wait"
            );
        } else {
            tracing::warn!(event_id = %outcome.delivery.event_id, %error, "still cannot record a hook outcome");
        }
        again.push(outcome);
    }
    put_back(shared, again);
}

/// Writes the queued outcomes at shutdown, trying a few times with backoff. Returns whether
/// none is left.
async fn write_unrecorded(ledger: &Ledger, shared: &Shared) -> bool {
    let mut backoff = Backoff::default();
    for tried in 1..=RECORD_TRIES {
        let outcomes = std::mem::take(&mut *shared.unrecorded());
        if outcomes.is_empty() {
            return true;
        }
        let written: Vec<(String, DeliveryUpdate)> = outcomes
            .iter()
            .map(|o| (o.delivery.event_id.clone(), o.update.clone()))
            .collect();
        match ledger.record_and_claim(&written, Utc::now(), 0).await {
            Ok(round) => requeue_refused(shared, outcomes, &round.refused),
            Err(error) => {
                tracing::warn!(%error, outcomes = outcomes.len(), "cannot record hook outcomes before stopping; trying again");
                put_back(shared, outcomes);
            }
        }
        if tried < RECORD_TRIES && !shared.unrecorded().is_empty() {
            tokio::time::sleep(backoff.next()).await;
        }
    }
    shared.unrecorded().is_empty()
}

#[cfg(test)]
mod tests;
