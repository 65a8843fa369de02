//! The retry policy: when a failed delivery runs again, and when it is given up.
//!
//! Owns: the backoff schedule with its jitter ([`RetrySchedule`]) and the decision that turns one
//! attempt's [`HookOutcome`] into a ledger [`DeliveryUpdate`] ([`RetryPolicy::decide`]).
//! Must never: do I/O or read the clock (callers pass `now`), so every rule is tested exactly.
//!
//! # Rules
//!
//! - Exit 0, or a 2xx answer of a URL hook: delivered.
//! - An exit code in `permanent_exit_codes`: dead at once (the hook said "never retry this").
//! - A 4xx answer other than 408 and 429: dead at once (the endpoint refuses this event).
//! - A 429 or 503 with `Retry-After`: retried no sooner than it asks (at most
//!   [`crate::hooks::answer::MAX_RETRY_AFTER`]) and no sooner than the schedule says.
//! - Stopped by shutdown (a URL hook's request abandoned too), or not started because paywatch
//!   was stopping: pending again, due at once, never dead. It was paywatch that stopped, not
//!   the hook that failed.
//! - Not started because paywatch was out of descriptors or processes ([`Ending::NoResources`]):
//!   postponed by [`NO_RESOURCES_RETRY`] without counting the attempt, never dead (issue 21).
//! - Anything else (another exit code, a signal, a timeout, a spawn or wait failure, a 3xx,
//!   408, 429 or 5xx answer, no answer at all): dead if this was attempt `max_attempts`, or if
//!   the delivery was queued more than `max_age` ago; otherwise retried after the schedule's
//!   delay for this attempt, with jitter.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::hooks::runner::{Ending, HookOutcome};
use crate::ledger::DeliveryUpdate;

/// Attempts before a delivery is dead when a hook sets no `max_attempts`: with the standard
/// schedule, the last one runs about 20 hours after the first.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 25;

/// How soon a hook paywatch could not start for lack of descriptors or processes is tried
/// again (its attempt not counted).
pub const NO_RESOURCES_RETRY: Duration = Duration::from_secs(1);

/// The standard jitter: each delay is moved by up to ±20%, so hooks that failed together
/// (a merchant's server was down) do not all retry in the same second.
pub const DEFAULT_JITTER: f64 = 0.2;

/// The standard delays after attempt 1, 2, ...: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, then
/// hourly (the last step repeats).
pub const STANDARD_STEPS: [Duration; 6] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(2 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(60 * 60),
];

/// The delays between attempts: step `n - 1` after the `n`th failed attempt, the last step
/// repeating, each moved by a random factor within ±`jitter`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    /// Base delays; never empty.
    steps: Vec<Duration>,
    /// The relative jitter, 0.0 to 1.0.
    jitter: f64,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule::standard()
    }
}

impl RetrySchedule {
    /// [`STANDARD_STEPS`] with [`DEFAULT_JITTER`].
    pub fn standard() -> RetrySchedule {
        RetrySchedule::new(STANDARD_STEPS.to_vec(), DEFAULT_JITTER)
    }

    /// A schedule with these steps (the last repeats) and relative jitter (clamped to 0..=1).
    /// Tests use millisecond steps and no jitter. An empty `steps` means "retry at once".
    pub fn new(steps: Vec<Duration>, jitter: f64) -> RetrySchedule {
        let steps = if steps.is_empty() {
            vec![Duration::ZERO]
        } else {
            steps
        };
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        RetrySchedule { steps, jitter }
    }

    /// The delay after the `failed_attempts`th failure, without jitter (attempt 0 counts as 1).
    pub fn base_delay(&self, failed_attempts: u32) -> Duration {
        let index = (failed_attempts.max(1) as usize - 1).min(self.steps.len() - 1);
        self.steps[index]
    }

    /// The delay after the `failed_attempts`th failure with jitter, where `unit` (in `[0, 1)`,
    /// a uniform random number) picks the point within ±jitter: 0.5 gives the base delay.
    pub fn delay(&self, failed_attempts: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        self.base_delay(failed_attempts).mul_f64(factor.max(0.0))
    }
}

/// How one hook's failed deliveries are retried and when they are given up.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// After this many attempts, a failure makes the delivery dead (at least 1).
    pub max_attempts: u32,
    /// A failure of a delivery queued longer ago than this makes it dead.
    pub max_age: Option<Duration>,
    /// Exit codes that make a delivery dead at once.
    pub permanent_exit_codes: Vec<i32>,
    /// The delays between attempts.
    pub schedule: RetrySchedule,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_age: None,
            permanent_exit_codes: Vec::new(),
            schedule: RetrySchedule::standard(),
        }
    }
}

impl RetryPolicy {
    /// What attempt number `attempt` (from 1) of a delivery queued at `queued_at` ending with
    /// `outcome` means for the delivery, at time `now`. See the module doc for the rules.
    pub fn decide(
        &self,
        outcome: &HookOutcome,
        attempt: u32,
        queued_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> DeliveryUpdate {
        self.decide_with(outcome, attempt, queued_at, now, rand::random::<f64>())
    }

    /// [`RetryPolicy::decide`] with the jitter's random number given (see
    /// [`RetrySchedule::delay`]).
    pub fn decide_with(
        &self,
        outcome: &HookOutcome,
        attempt: u32,
        queued_at: DateTime<Utc>,
        now: DateTime<Utc>,
        unit: f64,
    ) -> DeliveryUpdate {
        if outcome.delivered() {
            return DeliveryUpdate::Delivered;
        }
        let exit_code = outcome.exit_code();
        let described = outcome.describe();
        if matches!(outcome.ending, Ending::NoResources(_)) {
            return DeliveryUpdate::Postponed {
                next_attempt_at: now
                    + chrono::Duration::from_std(NO_RESOURCES_RETRY)
                        .unwrap_or(chrono::Duration::seconds(1)),
                error: described,
            };
        }
        if matches!(outcome.ending, Ending::Stopped(_) | Ending::Interrupted(_)) {
            return DeliveryUpdate::Retry {
                next_attempt_at: now,
                exit_code,
                error: described,
            };
        }
        if let Some(code) = exit_code
            && self.permanent_exit_codes.contains(&code)
        {
            return DeliveryUpdate::Dead {
                exit_code,
                error: format!("{described}: a permanent exit code, not retried"),
            };
        }
        if let Ending::Answered(answer) = &outcome.ending
            && answer.is_permanent()
        {
            return DeliveryUpdate::Dead {
                exit_code,
                error: format!("{described}: a permanent answer (4xx), not retried"),
            };
        }
        if attempt >= self.max_attempts {
            return DeliveryUpdate::Dead {
                exit_code,
                error: format!("{described}: gave up after {attempt} attempts (max_attempts)"),
            };
        }
        if let Some(max_age) = self.max_age {
            let age = (now - queued_at).to_std().unwrap_or(Duration::ZERO);
            if age >= max_age {
                return DeliveryUpdate::Dead {
                    exit_code,
                    error: format!(
                        "{described}: gave up after {attempt} attempts, queued {} ago (max_age {})",
                        humantime::format_duration(whole_seconds(age)),
                        humantime::format_duration(max_age)
                    ),
                };
            }
        }
        let mut delay = self.schedule.delay(attempt, unit);
        if let Ending::Answered(answer) = &outcome.ending
            && let Some(asked) = answer.asked_wait()
        {
            // Retry-After is honoured (never sooner than asked), within its bound.
            delay = delay.max(asked);
        }
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
        DeliveryUpdate::Retry {
            next_attempt_at: now + delay,
            exit_code,
            error: described,
        }
    }
}

fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs())
}

#[cfg(test)]
mod tests;
