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
mod tests {
    use super::*;
    use crate::hooks::runner::Termination;

    fn outcome(ending: Ending) -> HookOutcome {
        HookOutcome {
            ending,
            duration: Duration::from_millis(12),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            pid: Some(1),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_age: None,
            permanent_exit_codes: vec![64],
            schedule: RetrySchedule::new(
                vec![Duration::from_secs(5), Duration::from_secs(30)],
                0.0,
            ),
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).expect("a valid time")
    }

    #[test]
    fn the_standard_schedule_is_the_documented_one_then_hourly() {
        let schedule = RetrySchedule::standard();
        let minutes: Vec<u64> = (1..=9)
            .map(|attempt| schedule.base_delay(attempt).as_secs())
            .collect();
        assert_eq!(
            minutes,
            [5, 30, 120, 600, 1800, 3600, 3600, 3600, 3600],
            "5s, 30s, 2m, 10m, 30m, 1h, then hourly"
        );
        assert_eq!(schedule.base_delay(0), Duration::from_secs(5));
        assert_eq!(schedule.base_delay(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.delay(2, 0.5), Duration::from_secs(30));
        assert_eq!(schedule.delay(2, 0.0), Duration::from_secs(24));
        assert!(schedule.delay(2, 0.999_999) <= Duration::from_secs(36));
        for _ in 0..1000 {
            let delay = schedule.delay(1, rand::random::<f64>());
            assert!(
                (Duration::from_secs(4)..=Duration::from_secs(6)).contains(&delay),
                "{delay:?}"
            );
        }
        assert_eq!(schedule.delay(1, f64::NAN), Duration::from_secs(5));
        assert_eq!(
            RetrySchedule::new(vec![], 0.2).delay(3, 0.9),
            Duration::ZERO,
            "an empty schedule retries at once"
        );
    }

    #[test]
    fn exit_zero_is_delivered_even_on_the_last_attempt() {
        let update = policy().decide(&outcome(Ending::Exited(0)), 5, at(0), at(10));
        assert_eq!(update, DeliveryUpdate::Delivered);
    }

    #[test]
    fn a_failure_is_retried_after_the_step_of_its_attempt() {
        let update = policy().decide(&outcome(Ending::Exited(1)), 1, at(0), at(10));
        assert_eq!(
            update,
            DeliveryUpdate::Retry {
                next_attempt_at: at(15),
                exit_code: Some(1),
                error: "exit 1".into()
            }
        );
        let update = policy().decide(&outcome(Ending::Exited(1)), 3, at(0), at(100));
        let DeliveryUpdate::Retry {
            next_attempt_at, ..
        } = update
        else {
            panic!("expected a retry, got {update:?}");
        };
        assert_eq!(next_attempt_at, at(130), "the last step repeats");
    }

    #[test]
    fn timeouts_signals_and_spawn_failures_are_retried_without_an_exit_code() {
        let termination = Termination {
            after: Duration::from_secs(30),
            killed: true,
            grace: Duration::from_secs(5),
        };
        for ending in [
            Ending::TimedOut(termination),
            Ending::Signalled(9),
            Ending::SpawnFailed("could not start '/x': No such file".into()),
            Ending::WaitFailed("boom".into()),
        ] {
            let update = policy().decide(&outcome(ending.clone()), 1, at(0), at(0));
            let DeliveryUpdate::Retry {
                exit_code, error, ..
            } = update
            else {
                panic!("{ending:?} should be retried, got {update:?}");
            };
            assert_eq!(exit_code, None);
            assert!(!error.is_empty());
        }
    }

    #[test]
    fn a_permanent_exit_code_is_dead_at_once() {
        let update = policy().decide(&outcome(Ending::Exited(64)), 1, at(0), at(0));
        assert_eq!(
            update,
            DeliveryUpdate::Dead {
                exit_code: Some(64),
                error: "exit 64: a permanent exit code, not retried".into()
            }
        );
    }

    #[test]
    fn the_last_attempt_makes_it_dead() {
        let update = policy().decide(&outcome(Ending::Exited(3)), 4, at(0), at(0));
        assert!(matches!(update, DeliveryUpdate::Retry { .. }), "{update:?}");
        let update = policy().decide(&outcome(Ending::Exited(3)), 5, at(0), at(0));
        assert_eq!(
            update,
            DeliveryUpdate::Dead {
                exit_code: Some(3),
                error: "exit 3: gave up after 5 attempts (max_attempts)".into()
            }
        );
    }

    #[test]
    fn an_old_delivery_is_dead_after_max_age() {
        let policy = RetryPolicy {
            max_age: Some(Duration::from_secs(3600)),
            ..policy()
        };
        let young = policy.decide(&outcome(Ending::Exited(1)), 2, at(0), at(3599));
        assert!(matches!(young, DeliveryUpdate::Retry { .. }), "{young:?}");
        let old = policy.decide(&outcome(Ending::Exited(1)), 2, at(0), at(3600));
        assert_eq!(
            old,
            DeliveryUpdate::Dead {
                exit_code: Some(1),
                error: "exit 1: gave up after 2 attempts, queued 1h ago (max_age 1h)".into()
            }
        );
    }

    #[test]
    fn a_shutdown_is_never_a_failure() {
        let termination = Termination {
            after: Duration::from_secs(1),
            killed: false,
            grace: Duration::from_secs(5),
        };
        let policy = RetryPolicy {
            max_age: Some(Duration::from_secs(1)),
            ..policy()
        };
        for ending in [Ending::Stopped(Some(termination)), Ending::Stopped(None)] {
            let update = policy.decide(&outcome(ending), 5, at(0), at(100));
            let DeliveryUpdate::Retry {
                next_attempt_at, ..
            } = update
            else {
                panic!("a stopped hook runs again, got {update:?}");
            };
            assert_eq!(next_attempt_at, at(100), "due at once (at the next start)");
        }
    }

    fn answered(status: u16, retry_after: Option<u64>) -> HookOutcome {
        outcome(Ending::Answered(crate::hooks::answer::HttpAnswer {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            location: None,
            excerpt: "no".into(),
        }))
    }

    /// Issue 24: a URL hook's 2xx is delivered; 408, 429, 5xx and 3xx are retried on the
    /// schedule; another 4xx is dead at once, even with attempts left.
    #[test]
    fn http_answers_are_delivered_retried_or_dead_by_status() {
        for status in [200, 201, 204, 299] {
            let update = policy().decide(&answered(status, None), 1, at(0), at(0));
            assert_eq!(update, DeliveryUpdate::Delivered, "{status}");
        }
        for status in [301, 302, 307, 408, 429, 500, 502, 503, 599] {
            let update = policy().decide(&answered(status, None), 1, at(0), at(10));
            let DeliveryUpdate::Retry {
                next_attempt_at,
                exit_code,
                ..
            } = update
            else {
                panic!("{status} is retried, got {update:?}");
            };
            assert_eq!(next_attempt_at, at(15), "{status}: the schedule's step");
            assert_eq!(exit_code, None);
        }
        for status in [400, 401, 403, 404, 410, 422] {
            let update = policy().decide(&answered(status, None), 1, at(0), at(0));
            let DeliveryUpdate::Dead { error, .. } = &update else {
                panic!("{status} is permanent, got {update:?}");
            };
            assert!(error.contains("a permanent answer"), "{error}");
            assert!(error.contains(&format!("HTTP {status}")), "{error}");
        }
        let update = policy().decide(&answered(500, None), 5, at(0), at(0));
        assert!(
            matches!(update, DeliveryUpdate::Dead { .. }),
            "max_attempts: {update:?}"
        );
        let failed = outcome(Ending::RequestFailed("cannot connect".into()));
        let update = policy().decide(&failed, 1, at(0), at(0));
        assert!(matches!(update, DeliveryUpdate::Retry { .. }), "{update:?}");
        let interrupted = outcome(Ending::Interrupted(Duration::from_secs(1)));
        let update = policy().decide(&interrupted, 5, at(0), at(100));
        assert!(
            matches!(update, DeliveryUpdate::Retry { next_attempt_at, .. } if next_attempt_at == at(100)),
            "shutdown is never a failure: {update:?}"
        );
    }

    /// Issue 24: Retry-After (429, 503) is honoured: never sooner than asked, at most an hour;
    /// a shorter one than the schedule's step does not hurry the retry.
    #[test]
    fn retry_after_is_honoured_within_its_bound() {
        let update = policy().decide(&answered(429, Some(120)), 1, at(0), at(0));
        assert!(
            matches!(update, DeliveryUpdate::Retry { next_attempt_at, .. } if next_attempt_at == at(120)),
            "{update:?}"
        );
        let update = policy().decide(&answered(503, Some(1)), 1, at(0), at(0));
        assert!(
            matches!(update, DeliveryUpdate::Retry { next_attempt_at, .. } if next_attempt_at == at(5)),
            "{update:?}"
        );
        let update = policy().decide(&answered(429, Some(999_999)), 1, at(0), at(0));
        assert!(
            matches!(update, DeliveryUpdate::Retry { next_attempt_at, .. } if next_attempt_at == at(3600)),
            "{update:?}"
        );
        let update = policy().decide(&answered(500, Some(120)), 1, at(0), at(0));
        assert!(
            matches!(update, DeliveryUpdate::Retry { next_attempt_at, .. } if next_attempt_at == at(5)),
            "only 429 and 503 ask for a wait: {update:?}"
        );
    }

    /// Issue 21: a hook paywatch could not start for lack of descriptors is the daemon's
    /// problem: tried again soon, its attempt not counted, never dead (not even on the last
    /// attempt or past max_age).
    #[test]
    fn a_spawn_without_descriptors_is_postponed_not_counted() {
        let policy = RetryPolicy {
            max_age: Some(Duration::from_secs(1)),
            ..policy()
        };
        let ending = Ending::NoResources("could not start '/x': Too many open files".into());
        let update = policy.decide(&outcome(ending), 5, at(0), at(100));
        assert_eq!(
            update,
            DeliveryUpdate::Postponed {
                next_attempt_at: at(100) + chrono::Duration::seconds(1),
                error: "not started: could not start '/x': Too many open files".into()
            }
        );
    }
}
