//! Unit tests of `retry`.

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
        schedule: RetrySchedule::new(vec![Duration::from_secs(5), Duration::from_secs(30)], 0.0),
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
