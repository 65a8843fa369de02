//! Shared test helpers: a sandbox, a daemon on a temporary ledger, and waiting with deadlines.
//!
//! The built binary as a child process (one-shot commands, `paywatch run`, config files) is
//! [`process`]; the daemon in this process is [`Daemon`]; every wait is [`wait_for`] (or
//! [`poll_until`], for a test that says itself what went wrong).

#![allow(dead_code)]

pub mod exposition;
pub mod postgres;
pub mod process;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use paywatch::daemon::{self, Control, DaemonStatus, RunOptions};
use paywatch::domain::CheckoutId;
use paywatch::ledger::{Ledger, TrackedVia};
use paywatch::logging::LogHandle;
use paywatch::metrics::Metrics;
use paywatch::paymennt::wire::{JsonDecimal, LinkRequest};
use paywatch::sandbox::{Sandbox, SandboxOptions};
use paywatch::settings::Settings;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long a condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, failing the test with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(deadline, Duration::from_millis(10), check)
        .await
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// Polls `check` every `every` until it returns `Some`; `None` once `deadline` has passed (the
/// caller panics with what it knows). [`wait_for`] for a test that explains a timeout itself.
pub async fn poll_until<T, F, Fut>(deadline: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// A sandbox with quick timers for tests.
pub async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions {
        heartbeat_interval: Duration::from_secs(2),
        expiry_minute: Duration::from_millis(10),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox starts")
}

/// Writes a config for a daemon pointed at `sandbox`, with `extra` TOML appended (whole
/// sections only, after the ones written here), and loads it without the process environment.
pub fn settings(
    dir: &Path,
    sandbox: &Sandbox,
    stream_mode: &str,
    extra: &str,
) -> (Settings, PathBuf) {
    load_config(dir, &sandbox_config_text(dir, sandbox, stream_mode, extra))
}

/// Writes `text` as `dir/paywatch.toml` and loads it without the process environment.
pub fn load_config(dir: &Path, text: &str) -> (Settings, PathBuf) {
    let path = process::write_config(dir, text);
    let settings = Settings::load_with_env(Some(&path), Vec::new()).expect("test config is valid");
    (settings, path)
}

/// The config text of [`settings`], for a test that changes it before writing it.
pub fn sandbox_config_text(
    dir: &Path,
    sandbox: &Sandbox,
    stream_mode: &str,
    extra: &str,
) -> String {
    config_text(
        dir,
        &sandbox.api_base_url(),
        &sandbox.firestore_endpoint(),
        sandbox.api_key(),
        sandbox.api_secret(),
        stream_mode,
        extra,
    )
}

/// The config text used by [`settings`], for any paymennt and Firestore.
pub fn config_text(
    dir: &Path,
    base_url: &str,
    endpoint: &str,
    key: &str,
    secret: &str,
    stream_mode: &str,
    extra: &str,
) -> String {
    format!(
        "[ledger]\npath = \"{ledger}\"\n\n\
         [paymennt]\nbase_url = \"{base_url}\"\napi_key = \"{key}\"\napi_secret = \"{secret}\"\nmax_retries = 5\nconcurrency = 16\n\n\
         [firestore]\nendpoint = \"{endpoint}\"\nstream_mode = \"{stream_mode}\"\nidle_timeout = \"10s\"\n\n\
         [reconcile]\ninterval = \"1h\"\n\n\
         [daemon]\ndrain_timeout = \"5s\"\n\n\
         [log]\nlevel = \"info\"\n\n{discovery}{extra}",
        ledger = dir.join("paywatch.db").display(),
        discovery = discovery_default(extra),
    )
}

/// Discovery is off in tests unless `extra` has a `[discovery]` section: a test that does not
/// exercise it must not see every sandbox checkout tracked behind its back.
fn discovery_default(extra: &str) -> &'static str {
    if extra.contains("[discovery]") {
        ""
    } else {
        "[discovery]\nenabled = false\n\n"
    }
}

/// Writes `body` as the shell script `dir/NAME.sh` and returns the `[[hooks]]` table that runs
/// it (`/bin/sh SCRIPT`) for `statuses` (every status when empty). Further keys of the table
/// (`timeout = "30s"`) may follow it; it goes last in `extra` of [`settings`].
pub fn shell_hook(dir: &Path, name: &str, statuses: &[&str], body: &str) -> String {
    let script = dir.join(format!("{name}.sh"));
    std::fs::write(&script, body).expect("hook script");
    let mut table = format!(
        "[[hooks]]\nname = \"{name}\"\ncommand = [\"/bin/sh\", \"{}\"]\n",
        script.display()
    );
    if !statuses.is_empty() {
        let quoted: Vec<String> = statuses.iter().map(|s| format!("\"{s}\"")).collect();
        table.push_str(&format!("statuses = [{}]\n", quoted.join(", ")));
    }
    table
}

/// The start of most end-to-end tests: a [`sandbox`], a temporary directory, a config for a
/// daemon pointed at the sandbox (in `stream_mode`, `extra` appended: see [`settings`]) and its
/// ledger. Keep the directory bound (`_dir`, not `_`): dropping it deletes config and ledger.
///
/// ```ignore
/// let (sandbox, _dir, settings, config, ledger) = common::setup("multiplexed", "").await;
/// let id = create_and_track(&sandbox, &ledger, "ORD-1").await;
/// let daemon = Daemon::start(&settings, &config).await; // or process::paywatch()...run()
/// ```
pub async fn setup(
    stream_mode: &str,
    extra: &str,
) -> (Sandbox, tempfile::TempDir, Settings, PathBuf, Ledger) {
    setup_with(sandbox().await, |dir, sandbox| {
        settings(dir, sandbox, stream_mode, extra)
    })
    .await
}

/// [`setup`] with a sandbox of the test's own and a config written and loaded by `config`
/// (given the directory and the sandbox).
pub async fn setup_with(
    sandbox: Sandbox,
    config: impl FnOnce(&Path, &Sandbox) -> (Settings, PathBuf),
) -> (Sandbox, tempfile::TempDir, Settings, PathBuf, Ledger) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (settings, config) = config(dir.path(), &sandbox);
    let ledger = Ledger::open(&settings.ledger.path).await.expect("ledger");
    (sandbox, dir, settings, config, ledger)
}

/// A daemon running in this process.
pub struct Daemon {
    controls: mpsc::Sender<Control>,
    /// The daemon's published status.
    pub status: watch::Receiver<DaemonStatus>,
    /// The HTTP listener's address, once bound (`[http] listen`).
    pub http: watch::Receiver<Option<std::net::SocketAddr>>,
    /// The daemon's metrics (what `/metrics` serves).
    pub metrics: Metrics,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Starts the daemon and waits until it is ready.
    pub async fn start(settings: &Settings, config_path: &Path) -> Daemon {
        let (controls, receiver) = mpsc::channel(8);
        let (sender, mut status) = watch::channel(DaemonStatus::default());
        let (http_sender, http) = watch::channel(None);
        let metrics = Metrics::new();
        let options = RunOptions {
            config_path: Some(config_path.to_path_buf()),
            log: LogHandle::detached(),
            status: Some(sender),
            notifier: paywatch::daemon::notify::Notifier::disabled(),
            http_addr: Some(http_sender),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(daemon::run(settings.clone(), receiver, options));
        tokio::time::timeout(DEADLINE, status.wait_for(|s| s.ready))
            .await
            .expect("daemon ready in time")
            .expect("daemon running");
        Daemon {
            controls,
            status,
            http,
            metrics,
            task,
        }
    }

    /// The base URL of the daemon's HTTP listener (`http://127.0.0.1:PORT`).
    pub fn http_url(&self) -> String {
        let addr = (*self.http.borrow()).expect("the daemon has an HTTP listener ([http] listen)");
        format!("http://{addr}")
    }

    /// Sends a control.
    pub async fn control(&self, control: Control) {
        self.controls.send(control).await.expect("daemon listening");
    }

    /// Drains and waits for the daemon to stop.
    pub async fn stop(self) {
        let _ = self.controls.send(Control::Shutdown).await;
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("daemon stops in time")
            .expect("task")
            .expect("daemon ok");
    }
}

/// A link request for tests.
pub fn link_request(order_id: &str, amount: &str) -> LinkRequest {
    LinkRequest {
        request_id: format!("{order_id}-r1"),
        order_id: order_id.to_owned(),
        description: "Test order".into(),
        currency: "AED".into(),
        amount: JsonDecimal(amount.parse().expect("decimal")),
        ..LinkRequest::default()
    }
}

/// Creates a link in the sandbox and tracks its response in the ledger (as `paywatch track`).
pub async fn create_and_track(sandbox: &Sandbox, ledger: &Ledger, order_id: &str) -> CheckoutId {
    let checkout = sandbox
        .state()
        .create_link(&link_request(order_id, "100.00"))
        .await
        .expect("link created");
    let facts = checkout.facts().expect("sandbox checkouts are complete");
    ledger
        .track(&facts, TrackedVia::Track)
        .await
        .expect("tracked");
    facts.id
}

/// The ledger's status for a checkout.
pub async fn status_of(ledger: &Ledger, id: &CheckoutId) -> Option<String> {
    ledger
        .checkout(id)
        .await
        .expect("ledger read")
        .and_then(|record| record.status)
        .map(|status| status.as_str().to_owned())
}

/// Waits until the ledger shows `status` for `id`.
pub async fn wait_status(ledger: &Ledger, id: &CheckoutId, status: &str) {
    wait_for(
        &format!("checkout {id} to be {status}"),
        DEADLINE,
        || async { (status_of(ledger, id).await.as_deref() == Some(status)).then_some(()) },
    )
    .await;
}

/// The statuses in a checkout's verified history.
pub async fn history(ledger: &Ledger, id: &CheckoutId) -> Vec<String> {
    ledger
        .transitions(id)
        .await
        .expect("ledger read")
        .into_iter()
        .map(|t| t.to.as_str().to_owned())
        .collect()
}
