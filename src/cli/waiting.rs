//! What a person sees while an interactive command waits for paymennt: a line on stderr per
//! retry, a spinner on a terminal, and the command's total deadline (`--timeout`).
//!
//! Owns: the CLI's [`CallObserver`] for the paymennt client and the [`Deadline`].
//! Must never: draw on stderr when it is not a terminal (the spinner hides itself there, so a
//! redirected stderr holds plain lines only), write to stdout (a command's output), or be used
//! by the daemon (its retries are debug logs).

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::domain::printable;
use crate::paymennt::Client;
use crate::paymennt::client::{CallEvent, CallObserver};
use crate::settings::{PaymenntSettings, SettingsError};

/// The default of `--timeout`.
pub const DEFAULT_TIMEOUT: &str = "60s";

/// The bounds of `--timeout`.
const TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// Parses `--timeout` (a humantime duration such as `90s` or `2m`, from 1s to 1h).
///
/// # Errors
///
/// A message naming the value and the bounds.
pub fn parse_timeout(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|error| {
        format!(
            "'{}' is not a duration ({error}); write it like 90s or 2m",
            printable(value)
        )
    })?;
    let (low, high) = TIMEOUT_BOUNDS;
    if duration < low || duration > high {
        return Err(format!(
            "'{}' is out of bounds: --timeout must be from 1s to 1h",
            printable(value)
        ));
    }
    Ok(duration)
}

/// When an interactive command gives up waiting for paymennt (`--timeout`, from its start).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: tokio::time::Instant,
    total: Duration,
}

impl Deadline {
    /// A deadline `total` from now.
    pub fn after(total: Duration) -> Deadline {
        Deadline {
            at: tokio::time::Instant::now() + total,
            total,
        }
    }

    /// The whole time allowed (`--timeout`).
    pub fn total(&self) -> Duration {
        self.total
    }

    /// `work`'s output, or `None` if the deadline passed first (`work` is then dropped).
    pub async fn run<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout_at(self.at, work).await.ok()
    }

    /// The error of a command the deadline cut short: exit 1, naming paymennt's address and
    /// what to check.
    pub fn passed(&self, base_url: Option<&str>) -> anyhow::Error {
        let whom = match base_url {
            Some(url) => format!("paymennt at {url}"),
            None => "paymennt".to_owned(),
        };
        anyhow::anyhow!(
            "{whom} did not answer within --timeout {total}; gave up\n\n\
             check that paymennt is reachable at that address ([paymennt] base_url, and any proxy or \
             firewall in between), or allow longer with --timeout",
            total = humantime::format_duration(self.total)
        )
    }
}

/// A paymennt client for an interactive command: its retries are printed on stderr, and a
/// spinner runs on a terminal while it waits.
///
/// # Errors
///
/// [`Client::from_settings`]'s.
pub fn client(settings: &PaymenntSettings) -> Result<Client, SettingsError> {
    let client = Client::from_settings(settings)?;
    let observer = observer(client.base_url());
    Ok(client.with_retry_notice(observer))
}

/// The observer [`client`] sets: a spinner per call (drawn on a terminal only), a line on
/// stderr per retry.
fn observer(base_url: &str) -> CallObserver {
    let base_url = base_url.to_owned();
    let spinner: Mutex<Option<ProgressBar>> = Mutex::new(None);
    Arc::new(move |event: &CallEvent<'_>| {
        let mut spinner = spinner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match event {
            CallEvent::Sending => {
                if let Some(old) = spinner.take() {
                    old.finish_and_clear();
                }
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                if !bar.is_hidden() {
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_message(format!("waiting for paymennt at {base_url}"));
                    bar.enable_steady_tick(Duration::from_millis(120));
                }
                *spinner = Some(bar);
            }
            CallEvent::Retrying {
                error,
                attempt,
                attempts,
                delay,
            } => {
                let line = retry_line(error, *attempt, *attempts, *delay);
                let print = || {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                };
                match spinner.as_ref() {
                    // The spinner's line is cleared, the line printed, the spinner redrawn.
                    Some(bar) => bar.suspend(print),
                    None => print(),
                }
            }
            CallEvent::Finished => {
                if let Some(bar) = spinner.take() {
                    bar.finish_and_clear();
                }
            }
        }
    })
}

/// `paymennt did not answer within 15s; retrying (2/5) in 2s`.
fn retry_line(
    error: &crate::paymennt::Error,
    attempt: u32,
    attempts: u32,
    delay: Duration,
) -> String {
    // Whole seconds from 1 s up; tenths below (the first pauses are a fraction of a second).
    let pause = if delay >= Duration::from_secs(1) {
        format!("{}s", delay.as_secs_f64().round())
    } else {
        format!("{:.1}s", delay.as_secs_f64())
    };
    format!("{error}; retrying ({attempt}/{attempts}) in {pause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_line_says_why_which_attempt_and_when() {
        let timeout = crate::paymennt::Error::Timeout(Duration::from_secs(15));
        assert_eq!(
            retry_line(&timeout, 2, 5, Duration::from_millis(1600)),
            "paymennt did not answer within 15s; retrying (2/5) in 2s"
        );
        assert_eq!(
            retry_line(&timeout, 3, 5, Duration::from_millis(240)),
            "paymennt did not answer within 15s; retrying (3/5) in 0.2s"
        );
    }

    #[test]
    fn timeout_is_bounded() {
        assert_eq!(parse_timeout("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_timeout("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_timeout("0s").is_err_and(|e| e.contains("from 1s to 1h")));
        assert!(parse_timeout("2h").is_err_and(|e| e.contains("from 1s to 1h")));
        assert!(parse_timeout("soon").is_err_and(|e| e.contains("not a duration")));
    }
}
