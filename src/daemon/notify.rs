//! sd_notify: telling systemd that the daemon is ready, alive, reloading or stopping.
//!
//! Owns: the notification socket named by `NOTIFY_SOCKET`, the watchdog period derived from
//! `WATCHDOG_USEC` and `WATCHDOG_PID`, and the wording of the `STATUS=` line
//! ([`StatusSummary`]).
//! Must never: fail, block or slow the daemon. Outside systemd (no `NOTIFY_SOCKET`) every call
//! is a no-op. A send that fails is logged (the first at warn, later ones at debug) and dropped:
//! a missed `WATCHDOG=1` is covered by the next one, and a missed `READY=1` shows up plainly as
//! a start timeout in `systemctl status`.
//!
//! # How the daemon uses it
//!
//! ```text
//! let notifier = Notifier::from_env();        // first thing in `run`, before any task starts
//! ... open the ledger, start the listener, reconciler and hook dispatcher ...
//! notifier.ready();                           // Type=notify: systemd now reports "active"
//! tracker.spawn(watchdog_loop(notifier.clone(), liveness, cancel.clone()));
//! every few seconds:  notifier.status(&StatusSummary { .. }.to_string());
//! on SIGHUP:          notifier.reloading(); reload settings; notifier.ready();
//! on SIGTERM:         notifier.stopping(); drain (at most [daemon] drain_timeout); exit 0
//! ```
//!
//! # Why the transport is ours
//!
//! The protocol lines come from the `sd-notify` crate ([`NotifyState`]'s `Display`), but
//! sending them is done here, for three reasons. `sd_notify::notify` reads `NOTIFY_SOCKET`
//! from the process environment on every call, so a test could not point one notifier at a
//! socket it owns without changing process-global state. It hands the value to `connect` as
//! a file path, so an abstract socket name (`@name`, allowed by sd_notify(3)) fails. And it
//! sends on a blocking socket, which could stall a runtime thread if the manager's queue were
//! full. Here each message is sent with `send_to` (not a connected socket, so a socket that
//! systemd re-creates on `daemon-reexec` keeps working) on a non-blocking socket.

use std::ffi::OsStr;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// A `NOTIFY_SOCKET`, `WATCHDOG_USEC` or `WATCHDOG_PID` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// Neither an absolute path nor an abstract socket name.
    #[error(
        "NOTIFY_SOCKET '{0}' is neither an absolute path nor an abstract socket name ('@name')"
    )]
    BadSocketName(String),
    /// The socket address could not be built or our sending socket could not be created.
    #[error("NOTIFY_SOCKET '{value}': {source}")]
    Socket {
        /// The variable's value, as given.
        value: String,
        /// What the OS said.
        source: io::Error,
    },
    /// Not a positive whole number of microseconds.
    #[error("WATCHDOG_USEC '{0}' is not a positive number of microseconds")]
    BadWatchdogUsec(String),
    /// Not a process id.
    #[error("WATCHDOG_PID '{0}' is not a process id")]
    BadWatchdogPid(String),
}

/// Sends sd_notify messages to the service manager; every method is a no-op outside systemd.
///
/// Cheap to clone (one `Arc`); clones share the socket.
#[derive(Clone, Default)]
pub struct Notifier {
    /// `None` when there is no service manager to tell (no `NOTIFY_SOCKET`).
    inner: Option<Arc<Inner>>,
}

/// The enabled half of a [`Notifier`].
struct Inner {
    /// Unbound, non-blocking; every message goes out with `send_to_addr`.
    socket: UnixDatagram,
    /// Where `NOTIFY_SOCKET` points (a path or an abstract name).
    address: SocketAddr,
    /// The whole `WATCHDOG_USEC`, when the watchdog applies to this process.
    watchdog: Option<Duration>,
    /// Set after the first failed send has been logged at warn.
    warned: AtomicBool,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Notifier(disabled)"),
            Some(inner) => f
                .debug_struct("Notifier")
                .field("address", &inner.address)
                .field("watchdog", &inner.watchdog)
                .finish(),
        }
    }
}

impl Notifier {
    /// A notifier that sends nothing (not under systemd, or in tests).
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    ///
    /// Never fails: an unusable value is logged at warn and that part is turned off (a bad
    /// socket disables every message; a bad watchdog value disables only the watchdog). The
    /// variables are left in place; hook commands never see them because hooks get a cleared
    /// environment (`hooks::runner`).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var_os("WATCHDOG_USEC");
        let pid = std::env::var_os("WATCHDOG_PID");
        let watchdog = watchdog_from_vars(usec.as_deref(), pid.as_deref(), std::process::id())
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "the systemd watchdog is not used");
                None
            });
        Notifier::with_watchdog(socket.as_deref(), watchdog).unwrap_or_else(|error| {
            tracing::warn!(%error, "systemd will not be notified of readiness or status");
            Notifier::disabled()
        })
    }

    /// Builds a notifier from explicit values, as systemd would set them in the environment.
    ///
    /// `own_pid` is compared with `watchdog_pid`: as in sd_watchdog_enabled(3), the watchdog
    /// applies when `WATCHDOG_USEC` is set and `WATCHDOG_PID` is either unset or this process.
    ///
    /// # Errors
    ///
    /// [`NotifyError`] for a socket name that is not an absolute path or `@name`, a path too
    /// long for a Unix socket address, or an unparsable or zero watchdog value.
    pub fn from_vars(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        own_pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let watchdog = watchdog_from_vars(watchdog_usec, watchdog_pid, own_pid)?;
        Notifier::with_watchdog(notify_socket, watchdog)
    }

    fn with_watchdog(
        notify_socket: Option<&OsStr>,
        watchdog: Option<Duration>,
    ) -> Result<Notifier, NotifyError> {
        let Some(value) = notify_socket else {
            return Ok(Notifier::disabled());
        };
        let shown = || value.to_string_lossy().into_owned();
        let bytes = value.as_bytes();
        let address = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(value),
            Some(b'@') if bytes.len() > 1 => SocketAddr::from_abstract_name(&bytes[1..]),
            _ => return Err(NotifyError::BadSocketName(shown())),
        }
        .map_err(|source| NotifyError::Socket {
            value: shown(),
            source,
        })?;
        let socket = UnixDatagram::unbound()
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .map_err(|source| NotifyError::Socket {
                value: shown(),
                source,
            })?;
        Ok(Notifier {
            inner: Some(Arc::new(Inner {
                socket,
                address,
                watchdog,
                warned: AtomicBool::new(false),
            })),
        })
    }

    /// Whether there is a service manager to tell.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
    /// recommends. `None` when there is no watchdog (or no service manager).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.inner.as_ref()?.watchdog.map(|usec| usec / 2)
    }

    /// `READY=1`: startup is finished (the ledger is open and the listener is running), and,
    /// after [`Notifier::reloading`], the reload is finished.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`: a SIGHUP reload has begun. Follow it with
    /// [`Notifier::ready`] whether the reload worked or not (a failed reload keeps the old
    /// settings, so the daemon is still ready).
    ///
    /// `MONOTONIC_USEC` is what `Type=notify-reload` (systemd 253 and later) requires with
    /// `RELOADING=1`; plain `Type=notify`, as shipped, ignores it.
    pub fn reloading(&self) {
        if !self.is_enabled() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// `STOPPING=1`: the drain has begun; systemd shows the unit as "deactivating".
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// `STATUS=`: a one-line summary shown by `systemctl status` (see [`StatusSummary`]).
    ///
    /// Line breaks are replaced by spaces, because sd_notify separates assignments with
    /// newlines: text after one would be read as a further assignment.
    pub fn status(&self, text: &str) {
        if !self.is_enabled() {
            return;
        }
        let line: String = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        self.send(&[NotifyState::Status(&line)]);
    }

    /// `WATCHDOG=1`: the daemon is alive. Send it from [`watchdog_loop`], not ad hoc.
    pub fn ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Sends one datagram holding `states`, one assignment per line.
    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(inner) = &self.inner else {
            return;
        };
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        let result = inner
            .socket
            .send_to_addr(message.as_bytes(), &inner.address)
            .and_then(|sent| {
                if sent == message.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "incomplete write"))
                }
            });
        if let Err(error) = result {
            let first = !inner.warned.swap(true, Ordering::Relaxed);
            let what = message.lines().next().unwrap_or_default();
            if first {
                tracing::warn!(%error, message = what, address = ?inner.address,
                    "cannot notify systemd (later failures are logged at debug)");
            } else {
                tracing::debug!(%error, message = what, "cannot notify systemd");
            }
        }
    }
}

/// The watchdog timeout, when it applies to the process `own_pid` (sd_watchdog_enabled(3)).
fn watchdog_from_vars(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    let shown = |value: &OsStr| value.to_string_lossy().into_owned();
    let micros = usec
        .to_str()
        .and_then(|text| text.parse::<u64>().ok())
        .filter(|&micros| micros > 0 && micros != u64::MAX)
        .ok_or_else(|| NotifyError::BadWatchdogUsec(shown(usec)))?;
    if let Some(pid) = pid {
        let pid = pid
            .to_str()
            .and_then(|text| text.parse::<u32>().ok())
            .filter(|&pid| pid > 0)
            .ok_or_else(|| NotifyError::BadWatchdogPid(shown(pid)))?;
        if pid != own_pid {
            // Meant for another process (we were exec'd by a wrapper that kept the variables).
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(micros)))
}

/// Sends `WATCHDOG=1` every [`Notifier::watchdog_interval`] while `alive` says so, until
/// `cancel` fires. Returns at once when there is no watchdog.
///
/// `alive` should prove the parts that can wedge are answering, such as a round trip to the
/// ledger thread; that this loop runs at all proves the runtime is not stuck. A check that
/// returns `false`, or takes longer than one interval, skips that ping (logged at warn), so
/// a daemon that stays wedged for `WatchdogSec` is killed with SIGABRT and restarted by
/// `Restart=on-failure`.
///
/// Cancel it last during the drain: systemd keeps enforcing the watchdog until the process
/// exits.
pub async fn watchdog_loop<F, Fut>(notifier: Notifier, mut alive: F, cancel: CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let Some(period) = notifier.watchdog_interval() else {
        return;
    };
    let mut ticks = tokio::time::interval(period);
    // After a stall, ping once at the next chance rather than in a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let verdict = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            verdict = tokio::time::timeout(period, alive()) => verdict,
        };
        match verdict {
            Ok(true) => notifier.ping(),
            Ok(false) => {
                tracing::warn!("liveness check failed; not pinging the systemd watchdog");
            }
            Err(_) => tracing::warn!(
                timeout_ms = period.as_millis() as u64,
                "liveness check did not answer in time; not pinging the systemd watchdog"
            ),
        }
    }
}

/// The `STATUS=` line: "watching 42 checkouts; last payment 3m ago; 0 hooks pending".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSummary {
    /// Open checkouts the listener is watching.
    pub watching: usize,
    /// How long ago the last verified PAID transition was recorded; `None` if there was none
    /// since the daemon started.
    pub last_payment: Option<Duration>,
    /// Hook deliveries queued or running (not dead).
    pub hooks_pending: usize,
}

impl fmt::Display for StatusSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "watching {} checkout{}; ",
            self.watching,
            plural(self.watching)
        )?;
        match self.last_payment {
            Some(age) => write!(f, "last payment {} ago; ", short_age(age))?,
            None => f.write_str("no payment yet; ")?,
        }
        write!(
            f,
            "{} hook{} pending",
            self.hooks_pending,
            plural(self.hooks_pending)
        )
    }
}

/// "42s", "3m", "5h", "12d": one unit, rounded down, for a line that changes every few seconds.
fn short_age(age: Duration) -> String {
    let seconds = age.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3_600 => format!("{}m", seconds / 60),
        3_600..172_800 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests;
