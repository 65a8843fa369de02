//! Reconnect delays: exponential with jitter, as the official Node SDK does (note 2.1).
//!
//! The first retry is immediate, then `initial` growing ×1.5 up to `max`, each delay scaled by a
//! random factor in [0.5, 1.5) and capped at `max`. RESOURCE_EXHAUSTED jumps to `max`. The
//! stream resets it when the server shows health (a resume token, or CURRENT).

use std::time::Duration;

use rand::Rng;

/// The reconnect delay of one stream.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The first non-zero delay.
    initial: Duration,
    /// The cap.
    max: Duration,
    /// The delay before jitter for the next failure; None = retry at once.
    next: Option<Duration>,
}

impl Backoff {
    /// A fresh backoff: the next failure retries at once.
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial: initial.min(max),
            max,
            next: None,
        }
    }

    /// The delay before the next attempt, and grows the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let Some(base) = self.next else {
            self.next = Some(self.initial);
            return Duration::ZERO;
        };
        self.next = Some(base.mul_f64(1.5).min(self.max));
        let factor = rand::rng().random_range(0.5..1.5);
        base.mul_f64(factor).min(self.max)
    }

    /// The delay after RESOURCE_EXHAUSTED or a permanent failure: the maximum (with jitter down).
    pub(crate) fn max_delay(&mut self) -> Duration {
        self.next = Some(self.max);
        let factor = rand::rng().random_range(0.75..1.0);
        self.max.mul_f64(factor)
    }

    /// The server is healthy again.
    pub(crate) fn reset(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_the_cap_and_resets() {
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(10);
        let mut backoff = Backoff::new(initial, max);
        assert_eq!(
            backoff.next_delay(),
            Duration::ZERO,
            "first retry is immediate"
        );
        let mut base = initial;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(
                delay >= base.mul_f64(0.5) && delay <= max,
                "{delay:?} vs base {base:?}"
            );
            base = base.mul_f64(1.5).min(max);
        }
        assert_eq!(base, max, "reached the cap");
        let delay = backoff.max_delay();
        assert!(delay >= max.mul_f64(0.75) && delay <= max);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::ZERO);
        let delay = backoff.next_delay();
        assert!(delay >= initial.mul_f64(0.5) && delay < initial.mul_f64(1.5));
    }
}
