//! Unit tests of `notify`.

use super::*;
use std::ffi::OsString;
use std::path::PathBuf;

/// How long a test waits for a datagram that should arrive.
const DEADLINE: Duration = Duration::from_secs(5);

/// A datagram socket the test owns, standing in for systemd's.
struct Manager {
    socket: UnixDatagram,
    name: OsString,
    _dir: Option<tempfile::TempDir>,
}

impl Manager {
    fn at_path() -> Manager {
        let dir = tempfile::tempdir().expect("tempdir");
        let path: PathBuf = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
        Manager {
            socket,
            name: path.into_os_string(),
            _dir: Some(dir),
        }
    }

    fn abstract_name() -> Manager {
        let name = format!("paywatch-notify-test-{}", uuid::Uuid::now_v7());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("address");
        let socket = UnixDatagram::bind_addr(&address).expect("bind abstract");
        socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
        Manager {
            socket,
            name: format!("@{name}").into(),
            _dir: None,
        }
    }

    fn notifier(&self, watchdog_usec: Option<&str>) -> Notifier {
        Notifier::from_vars(
            Some(&self.name),
            watchdog_usec.map(OsStr::new),
            None,
            std::process::id(),
        )
        .expect("notifier")
    }

    /// The next datagram, waiting at most [`DEADLINE`].
    fn recv(&self) -> String {
        let mut buffer = [0u8; 4096];
        let len = self.socket.recv(&mut buffer).expect("a datagram in time");
        String::from_utf8(buffer[..len].to_vec()).expect("UTF-8")
    }

    /// Every datagram already queued, without waiting.
    fn drain(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut out = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(len) = self.socket.recv(&mut buffer) {
            out.push(String::from_utf8(buffer[..len].to_vec()).expect("UTF-8"));
        }
        self.socket.set_nonblocking(false).expect("blocking");
        out
    }
}

#[test]
fn without_notify_socket_everything_is_a_no_op() {
    let notifier = Notifier::from_vars(None, Some(OsStr::new("30000000")), None, 1)
        .expect("no socket is fine");
    assert!(!notifier.is_enabled());
    assert_eq!(notifier.watchdog_interval(), None);
    notifier.ready();
    notifier.status("x");
    notifier.reloading();
    notifier.ping();
    notifier.stopping();
    assert_eq!(format!("{notifier:?}"), "Notifier(disabled)");
}

#[test]
fn sends_each_state_as_systemd_expects() {
    let manager = Manager::at_path();
    let notifier = manager.notifier(None);
    assert!(notifier.is_enabled());

    notifier.ready();
    assert_eq!(manager.recv(), "READY=1\n");

    notifier.status("watching 2 checkouts; no payment yet; 0 hooks pending");
    assert_eq!(
        manager.recv(),
        "STATUS=watching 2 checkouts; no payment yet; 0 hooks pending\n"
    );

    notifier.reloading();
    let reloading = manager.recv();
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.len(), 2, "{reloading:?}");
    assert_eq!(lines[0], "RELOADING=1");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|value| value.parse().ok())
        .expect("MONOTONIC_USEC=<number>");
    assert!(usec > 0);

    notifier.ping();
    assert_eq!(manager.recv(), "WATCHDOG=1\n");

    notifier.clone().stopping();
    assert_eq!(manager.recv(), "STOPPING=1\n");
}

#[test]
fn abstract_socket_names_work() {
    let manager = Manager::abstract_name();
    manager.notifier(None).ready();
    assert_eq!(manager.recv(), "READY=1\n");
}

#[test]
fn status_cannot_smuggle_another_assignment() {
    let manager = Manager::at_path();
    manager
        .notifier(None)
        .status("order ORD-1\nREADY=1\r\nWATCHDOG=trigger");
    assert_eq!(
        manager.recv(),
        "STATUS=order ORD-1 READY=1  WATCHDOG=trigger\n"
    );
}

#[test]
fn a_vanished_socket_is_not_an_error_for_the_daemon() {
    let manager = Manager::at_path();
    let notifier = manager.notifier(None);
    let path = PathBuf::from(&manager.name);
    drop(manager);
    assert!(!path.exists());
    // Logged, not panicking, not blocking; twice to take the "already warned" path.
    notifier.ready();
    notifier.ping();
    let inner = notifier.inner.as_ref().expect("enabled");
    assert!(
        inner.warned.load(Ordering::Relaxed),
        "the failure was noticed"
    );
}

#[test]
fn bad_socket_names_are_rejected() {
    for name in ["relative/notify", "", "@", "vsock:2:1234"] {
        let error =
            Notifier::from_vars(Some(OsStr::new(name)), None, None, 1).expect_err("bad name");
        assert!(
            matches!(error, NotifyError::BadSocketName(_)),
            "{name:?}: {error}"
        );
        assert!(error.to_string().contains(name), "{error}");
    }
    let long = format!("/{}", "x".repeat(200));
    let error = Notifier::from_vars(Some(OsStr::new(&long)), None, None, 1).expect_err("too long");
    assert!(matches!(error, NotifyError::Socket { .. }), "{error}");
}

#[test]
fn watchdog_interval_is_half_of_watchdog_usec_for_this_process() {
    let manager = Manager::at_path();
    let own = std::process::id();
    let interval = |usec: &str, pid: Option<&str>| {
        Notifier::from_vars(
            Some(&manager.name),
            Some(OsStr::new(usec)),
            pid.map(OsStr::new),
            own,
        )
        .map(|notifier| notifier.watchdog_interval())
    };
    let own_text = own.to_string();
    assert_eq!(
        interval("30000000", None).expect("valid"),
        Some(Duration::from_secs(15))
    );
    assert_eq!(
        interval("3000", Some(&own_text)).expect("valid"),
        Some(Duration::from_micros(1_500))
    );
    let other = (own + 1).to_string();
    assert_eq!(interval("30000000", Some(&other)).expect("valid"), None);
    for bad in ["0", "-5", "30s", ""] {
        assert!(
            matches!(interval(bad, None), Err(NotifyError::BadWatchdogUsec(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        interval("30000000", Some("init")),
        Err(NotifyError::BadWatchdogPid(_))
    ));
    assert_eq!(manager.notifier(None).watchdog_interval(), None);
}

#[tokio::test(start_paused = true)]
async fn watchdog_loop_pings_only_while_alive_and_stops_on_cancel() {
    let manager = Manager::at_path();
    // WATCHDOG_USEC = 2s, so a ping every second.
    let notifier = manager.notifier(Some("2000000"));

    let cancel = CancellationToken::new();
    let task = tokio::spawn(watchdog_loop(
        notifier.clone(),
        || async { true },
        cancel.clone(),
    ));
    // Ticks at 0s, 1s, 2s and 3s.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    cancel.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the loop stops when cancelled")
        .expect("no panic");
    let pings = manager.drain();
    assert_eq!(pings, vec!["WATCHDOG=1\n"; 4]);

    let cancel = CancellationToken::new();
    let task = tokio::spawn(watchdog_loop(
        notifier.clone(),
        || async { false },
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    cancel.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("no panic");
    assert_eq!(manager.drain(), Vec::<String>::new(), "not alive: no pings");

    // A check that hangs is a wedge: no ping, and cancel still ends the loop.
    let cancel = CancellationToken::new();
    let task = tokio::spawn(watchdog_loop(
        notifier,
        std::future::pending::<bool>,
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    cancel.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("no panic");
    assert_eq!(
        manager.drain(),
        Vec::<String>::new(),
        "hung check: no pings"
    );
}

#[tokio::test]
async fn watchdog_loop_returns_at_once_without_a_watchdog() {
    let manager = Manager::at_path();
    let never = CancellationToken::new();
    tokio::time::timeout(
        DEADLINE,
        watchdog_loop(manager.notifier(None), || async { true }, never),
    )
    .await
    .expect("returns without being cancelled");
    assert_eq!(manager.drain(), Vec::<String>::new());
}

#[test]
fn status_summary_reads_like_the_issue() {
    let summary = StatusSummary {
        watching: 42,
        last_payment: Some(Duration::from_secs(200)),
        hooks_pending: 0,
    };
    assert_eq!(
        summary.to_string(),
        "watching 42 checkouts; last payment 3m ago; 0 hooks pending"
    );
    let summary = StatusSummary {
        watching: 1,
        last_payment: None,
        hooks_pending: 1,
    };
    assert_eq!(
        summary.to_string(),
        "watching 1 checkout; no payment yet; 1 hook pending"
    );
    assert_eq!(short_age(Duration::from_secs(59)), "59s");
    assert_eq!(short_age(Duration::from_secs(7_200)), "2h");
    assert_eq!(short_age(Duration::from_secs(3 * 86_400)), "3d");
}
