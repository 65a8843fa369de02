//! Running under systemd, through the real binary: sd_notify messages, the journald log
//! format and secrets from `$CREDENTIALS_DIRECTORY` (issue 6).
//!
//! Every child gets a cleared environment plus exactly the variables a test sets, and talks
//! only to loopback: a tiny HTTP stand-in for paymennt that records request headers, and a
//! datagram socket standing in for systemd's notify socket.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::common::DEADLINE;
use crate::common::process::{Paywatch, Process, paywatch};

/// A checkout id of the shape paymennt uses.
const CHECKOUT: &str = "1653241101733169556";

const API_KEY: &str = "pk_test_from_credentials_dir_0001";
const API_SECRET: &str = "sk_test_from_credentials_dir_9f3c";

/// A loopback HTTP server answering every request with one fixed status and recording each
/// request's head (request line and headers, lower-cased names).
struct FakePaymennt {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<Vec<String>>>>,
}

impl FakePaymennt {
    fn start(status: &'static str) -> FakePaymennt {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let address = listener.local_addr().expect("local address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        // Serves until the test process ends; each test has its own port.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(DEADLINE));
                let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = line.trim_end().to_owned();
                    if line.is_empty() {
                        break;
                    }
                    head.push(match line.split_once(':') {
                        Some((name, value)) => {
                            format!("{}:{}", name.to_ascii_lowercase(), value)
                        }
                        None => line,
                    });
                }
                seen.lock().expect("lock").push(head);
                let body = r#"{"success":false,"elapsed":1,"error":"stand-in","result":null}"#;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakePaymennt { address, requests }
    }

    fn base_url(&self) -> String {
        format!("http://{}/mer/v2.0/", self.address)
    }

    fn requests(&self) -> Vec<Vec<String>> {
        self.requests.lock().expect("lock").clone()
    }
}

/// A temporary directory holding a config file, a ledger path and a credentials directory.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("paywatch.toml"), "").expect("write config");
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `$CREDENTIALS_DIRECTORY` as systemd's `LoadCredential=` lays it out (the secret with a
    /// trailing newline, as `echo` writes it).
    fn credentials(&self) -> PathBuf {
        let creds = self.path("credentials");
        std::fs::create_dir_all(&creds).expect("mkdir credentials");
        std::fs::write(creds.join("paymennt-api-key"), API_KEY).expect("write key");
        std::fs::write(creds.join("paymennt-api-secret"), format!("{API_SECRET}\n"))
            .expect("write secret");
        creds
    }

    /// `paywatch --config <file> ARGS` with a cleared environment and the settings every test
    /// needs; `extra` is added last.
    fn command(&self, args: &[&str], fake: &FakePaymennt, extra: &[(&str, OsString)]) -> Paywatch {
        let mut command = paywatch()
            .config(&self.path("paywatch.toml"))
            .args(args)
            .env_clear()
            .env("PAYWATCH_LEDGER__PATH", self.path("paywatch.db"))
            .env("PAYWATCH_PAYMENNT__BASE_URL", fake.base_url());
        for (name, value) in extra {
            command = command.env(name, value);
        }
        command
    }
}

/// Runs to completion with stderr in a file; returns the exit status and stderr.
///
/// A file (rather than a pipe) because `JOURNAL_STREAM` names stderr by device and inode,
/// which a test can know for a file before the child starts.
async fn run_with_stderr_file(
    mut command: Paywatch,
    stderr: &Path,
    journal_stream: JournalStream,
) -> (ExitStatus, String) {
    let file = std::fs::File::create(stderr).expect("create stderr file");
    let meta = file.metadata().expect("stderr metadata");
    match journal_stream {
        JournalStream::Unset => {}
        JournalStream::ThisStderr => {
            command = command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        JournalStream::Elsewhere => {
            // Inherited from a unit whose output a wrapper redirected: not our stderr.
            command = command.env(
                "JOURNAL_STREAM",
                format!("{}:{}", meta.dev(), meta.ino() + 1),
            );
        }
    }
    drop(file);
    // Appended to the file just created: the inode JOURNAL_STREAM names.
    let status = command.log_to(stderr).start().wait_exit().await;
    let text = std::fs::read_to_string(stderr).expect("read stderr");
    (status, text)
}

#[derive(Clone, Copy)]
enum JournalStream {
    Unset,
    ThisStderr,
    Elsewhere,
}

/// Removes ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_read_from_credentials_directory() {
    let fake = FakePaymennt::start("404 Not Found");
    let setup = Setup::new();
    let creds = setup.credentials();

    // Without $CREDENTIALS_DIRECTORY there is no secret: a config error (2), and no request.
    let command = setup.command(&["track", "--checkout-id", CHECKOUT], &fake, &[]);
    let (status, stderr) = run_with_stderr_file(
        command,
        &setup.path("stderr-none.txt"),
        JournalStream::Unset,
    )
    .await;
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("paymennt-api-"),
        "names the credential: {stderr}"
    );
    assert!(
        fake.requests().is_empty(),
        "nothing was sent without credentials"
    );

    // With it, both values reach paymennt's headers, the secret without its newline; the
    // stand-in's 404 makes this a runtime failure (1), not a config error.
    let command = setup.command(
        &["track", "--checkout-id", CHECKOUT],
        &fake,
        &[("CREDENTIALS_DIRECTORY", creds.into_os_string())],
    );
    let (status, stderr) =
        run_with_stderr_file(command, &setup.path("stderr.txt"), JournalStream::Unset).await;
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "one Get Checkout, a 404 is not retried");
    let head = &requests[0];
    assert_eq!(
        head[0],
        format!("GET /mer/v2.0/checkout/{CHECKOUT} HTTP/1.1")
    );
    assert!(
        head.contains(&format!("x-paymennt-api-key: {API_KEY}")),
        "{head:?}"
    );
    assert!(
        head.contains(&format!("x-paymennt-api-secret: {API_SECRET}")),
        "{head:?}"
    );
    assert!(!stderr.contains(API_SECRET), "the secret is never printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_stream_changes_the_log_format() {
    // A 503 is retried once, and the retry is logged at debug: one log line per run.
    let fake = FakePaymennt::start("503 Service Unavailable");
    let setup = Setup::new();
    let creds = setup.credentials();
    let run = async |journal: JournalStream, name: &str| {
        let command = setup.command(
            &["track", "--checkout-id", CHECKOUT],
            &fake,
            &[
                ("CREDENTIALS_DIRECTORY", creds.clone().into_os_string()),
                ("PAYWATCH_PAYMENNT__MAX_RETRIES", "1".into()),
                ("RUST_LOG", "paywatch=debug".into()),
            ],
        );
        let (status, stderr) = run_with_stderr_file(command, &setup.path(name), journal).await;
        assert_eq!(status.code(), Some(1), "stderr: {stderr}");
        let line = strip_ansi(&stderr)
            .lines()
            .find(|line| line.contains("retrying paymennt call"))
            .unwrap_or_else(|| panic!("no retry line in: {stderr}"))
            .to_owned();
        (stderr, line)
    };
    let starts_with_timestamp = |line: &str| {
        let first = line.split_whitespace().next().unwrap_or_default();
        chrono::DateTime::parse_from_rfc3339(first).is_ok()
    };

    // On a terminal or in a file: our own timestamp first, no priority prefix.
    let (_, plain) = run(JournalStream::Unset, "stderr-plain.txt").await;
    assert!(starts_with_timestamp(&plain), "{plain:?}");
    assert!(!plain.starts_with('<'), "{plain:?}");

    // Under journald: "<7>" (debug) first, and no timestamp (journald adds its own).
    let (raw, journal) = run(JournalStream::ThisStderr, "stderr-journal.txt").await;
    let rest = journal
        .strip_prefix("<7>")
        .unwrap_or_else(|| panic!("expected a <7> prefix: {journal:?}"));
    assert!(!starts_with_timestamp(rest.trim_start()), "{journal:?}");
    assert!(rest.contains("DEBUG"), "{journal:?}");
    assert!(
        !raw.contains('\u{1b}'),
        "no colour codes in the journal: {raw:?}"
    );

    // JOURNAL_STREAM naming some other stream (stderr was redirected): plain again.
    let (_, elsewhere) = run(JournalStream::Elsewhere, "stderr-elsewhere.txt").await;
    assert!(starts_with_timestamp(&elsewhere), "{elsewhere:?}");
}

/// The notify socket systemd would own, and every assignment received on it, in order.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every assignment ("READY=1", "STATUS=...") in arrival order, split from datagrams.
    seen: Vec<String>,
    /// [`NotifySocket::expect`] looks at `seen[cursor..]` only, so successive waits check
    /// the order of arrival.
    cursor: usize,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket {
            socket,
            path,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    /// Waits for the next assignment starting with `prefix` after the previous match;
    /// returns its index in `seen`. Panics after [`DEADLINE`], showing what did arrive.
    fn expect(&mut self, prefix: &str) -> usize {
        let start = Instant::now();
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(offset) = self.seen[self.cursor..]
                .iter()
                .position(|line| line.starts_with(prefix))
            {
                let index = self.cursor + offset;
                self.cursor = index + 1;
                return index;
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "no {prefix:?} after index {} within {DEADLINE:?}; received {:?}",
                self.cursor,
                self.seen
            );
            self.socket
                .set_read_timeout(Some(left))
                .expect("read timeout");
            if let Ok(len) = self.socket.recv(&mut buffer) {
                self.push(&buffer[..len]);
            }
        }
    }

    /// Reads whatever is already queued, without waiting.
    fn drain(&mut self) {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut buffer = [0u8; 4096];
        while let Ok(len) = self.socket.recv(&mut buffer) {
            self.push(&buffer[..len]);
        }
    }

    fn push(&mut self, datagram: &[u8]) {
        let text = String::from_utf8_lossy(datagram).into_owned();
        self.seen.extend(text.lines().map(str::to_owned));
    }
}

/// Starts `paywatch run` as systemd would with `Type=notify` and `WatchdogSec=1s`.
///
/// `WATCHDOG_PID` is left unset (as sd_watchdog_enabled(3) allows): the test cannot know the
/// child's pid before it starts.
fn start_daemon(setup: &Setup, fake: &FakePaymennt, notify: &NotifySocket) -> Process {
    setup
        .command(
            &["run"],
            fake,
            &[
                (
                    "CREDENTIALS_DIRECTORY",
                    setup.credentials().into_os_string(),
                ),
                ("NOTIFY_SOCKET", notify.path.clone().into_os_string()),
                ("WATCHDOG_USEC", "1000000".into()),
                // Nothing listens there: the daemon watches no checkouts, so it never needs to.
                ("PAYWATCH_FIRESTORE__ENDPOINT", "http://127.0.0.1:9".into()),
                ("PAYWATCH_DAEMON__DRAIN_TIMEOUT", "5s".into()),
            ],
        )
        .log_to(&setup.path("daemon-stderr.txt"))
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_notifies_ready_status_watchdog_then_stopping() {
    let fake = FakePaymennt::start("404 Not Found");
    let setup = Setup::new();
    let mut notify = NotifySocket::bind(setup.dir.path());
    let mut daemon = start_daemon(&setup, &fake, &notify);

    // In this order (each wait looks only after the previous match).
    let ready = notify.expect("READY=1");
    let status = notify.expect("STATUS=");
    assert!(
        notify.seen[status].contains("watching 0 checkouts"),
        "a live summary: {:?}",
        notify.seen[status]
    );
    notify.expect("WATCHDOG=1");
    // The watchdog keeps coming (every 0.5s, half of WATCHDOG_USEC), not just once.
    let watchdog = notify.expect("WATCHDOG=1");
    assert!(
        !notify.seen[..=watchdog].iter().any(|l| l == "STOPPING=1"),
        "no STOPPING=1 before SIGTERM: {:?}",
        notify.seen
    );

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let stopping = notify.expect("STOPPING=1");
    let exit = daemon.wait_exit().await;
    assert!(exit.success(), "a drained daemon exits 0, got {exit}");
    notify.drain();
    assert!(ready < status && status < watchdog && watchdog < stopping);
    assert!(
        !notify.seen[stopping..].iter().any(|l| l == "READY=1"),
        "nothing claims readiness after STOPPING=1: {:?}",
        notify.seen
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reports_reloading_then_ready() {
    let fake = FakePaymennt::start("404 Not Found");
    let setup = Setup::new();
    let mut notify = NotifySocket::bind(setup.dir.path());
    let mut daemon = start_daemon(&setup, &fake, &notify);
    notify.expect("READY=1");

    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = notify.expect("RELOADING=1");
    let monotonic = notify.expect("MONOTONIC_USEC=");
    assert_eq!(monotonic, reloading + 1, "sent with RELOADING=1");
    notify.expect("READY=1");

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    notify.expect("STOPPING=1");
    let exit = daemon.wait_exit().await;
    assert!(exit.success(), "exit {exit}");
}
