//! The daemon: wiring and lifecycle only. Startup in order, the running loop, reload, and the
//! drain on shutdown.
//!
//! Owns: wiring sources -> verifier -> ledger -> hooks (each stage gets its channels and
//! handles here: the verifier the hook dispatcher's wake handle, the Firestore source the
//! health record), and the process lifecycle: its guards (`process.rs`), starting and
//! draining the stages (`stages.rs`), reload (`reload.rs`), signals, supervision and systemd
//! notifications.
//! Must never: do a stage's work (a Listen event's meaning and the watch set are the Firestore
//! source's, in [`crate::sources::firestore`]; waking the hooks is the verifier's), decide a
//! status (the verifier does, through Get Checkout), or exit without letting in-flight
//! verifications and hooks finish within the drain timeout.
//!
//! On a PostgreSQL ledger the daemon alternates between standing by (`standby.rs`, while
//! another daemon holds the lease; `lease.rs` keeps this one's side of it) and acting: one term
//! of the whole pipeline per lease won (`act`), ended by a shutdown or by the lease being
//! lost. On SQLite there is one term.
//!
//! `act` reads top to bottom as the startup order, and its end is the shutdown order.

mod lease;
pub mod notify;
mod process;
mod reload;
pub mod signals;
mod stages;
mod standby;
mod supervisor;

pub use process::{RESERVED_FDS, check_open_file_limit, open_files_needed, root_warning};
pub use reload::listener_options;
use stages::{
    Listened, Running, Wiring, open_ledger, serve_http, spawn_discovery, spawn_firestore_tasks,
    spawn_reconciler, start_firestore, start_watchdog,
};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::hooks::config::HookSet;
use crate::hooks::dispatcher::Dispatcher;
use crate::http::HttpContext;
use crate::http::health::Health;
use crate::ledger::Ledger;
use crate::ledger::postgres::Role;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::paymennt::Client;
use crate::settings::Settings;
use crate::sources::Nudge;
use crate::sources::firestore::watch_at_start;
use crate::verifier::{Verifier, VerifierSignals, VerifierStats};

/// What the outside world asks of a running daemon (signals, tests, the demo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Drain and exit (SIGTERM, SIGINT).
    Shutdown,
    /// Re-read the config file (SIGHUP).
    Reload,
}

/// Figures the daemon publishes while it runs (status line, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonStatus {
    /// Checkouts currently watched.
    pub watched: usize,
    /// Whether startup finished.
    pub ready: bool,
    /// Verifier figures.
    pub verifier: VerifierStats,
}

/// Options that are not in the config file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The config file, re-read on reload (None: no file, reload re-applies the environment).
    pub config_path: Option<PathBuf>,
    /// The log filter handle, for reloading the level.
    pub log: LogHandle,
    /// Where to publish [`DaemonStatus`] (tests and the demo watch it).
    pub status: Option<watch::Sender<DaemonStatus>>,
    /// systemd notifications (READY, STATUS, WATCHDOG, RELOADING, STOPPING).
    pub notifier: notify::Notifier,
    /// Where to publish the HTTP listener's bound address (`[http] listen` may give port 0).
    pub http_addr: Option<watch::Sender<Option<std::net::SocketAddr>>>,
    /// Where this daemon's figures are counted (served at `/metrics`; see [`crate::metrics`]).
    pub metrics: Metrics,
}

/// How often the systemd STATUS= line is refreshed.
const STATUS_LINE_EVERY: Duration = Duration::from_secs(5);

/// Runs the daemon until [`Control::Shutdown`] (or the control channel closes), then drains.
///
/// # Errors
///
/// Startup failures (ledger, credentials, listener); once running, failures are logged and
/// retried, never returned.
pub async fn run(
    settings: Settings,
    mut control: mpsc::Receiver<Control>,
    options: RunOptions,
) -> anyhow::Result<()> {
    let mut settings = settings;
    process::keep_memory_private();
    // Descriptors for the daemon's own work (ledger, streams, hooks) whatever HTTP clients do.
    if let Some(limit) = process::raise_open_file_limit() {
        check_open_file_limit(&settings, limit)?;
    }

    // What every term builds from the settings is checked now, so a standby whose config it
    // could never act on (a missing hook program, unreadable credentials) fails at its start
    // (exit 2), not at its takeover.
    Client::from_settings(&settings.paymennt)?;
    HookSet::from_settings(&settings)?;
    if settings.firestore.enabled {
        listener_options(&settings)?;
    }

    // 1. The ledger: an SQLite file this daemon holds alone, or a PostgreSQL ledger shared with
    //    standbys, on which it acts only while it holds the lease.
    let opened = open_ledger(&settings).await?;
    let outcome = loop {
        let epoch = match &opened.lease {
            None => None,
            Some(lease) => {
                match standby::stand_by(
                    &mut settings,
                    lease,
                    &opened.ledger,
                    &mut control,
                    &options,
                )
                .await
                {
                    Ok(standby::Waited::Active(epoch)) => Some(epoch),
                    Ok(standby::Waited::Told) => break Ok(()),
                    Err(error) => break Err(error),
                }
            }
        };
        match act(&mut settings, &opened, epoch, &mut control, &options).await {
            Ok(Term::LostLease) => {}
            Ok(Term::Stopped) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    // A standby takes over at once rather than when the lease runs out.
    if let Some(lease) = opened.lease {
        lease.resign().await;
    }
    if outcome.is_ok() {
        tracing::info!("paywatch stopped");
    }
    outcome
}

/// How an active term ended.
enum Term {
    /// Told to stop (or the control channel closed): the daemon exits.
    Stopped,
    /// The lease was lost (not renewed in time, or taken over): stand by again.
    LostLease,
}

/// One active term: steps 2 to 8, from starting the stages to draining them. On an SQLite
/// ledger there is one term, the daemon's whole run; on PostgreSQL one per lease won (`epoch`).
///
/// # Errors
///
/// Startup failures (credentials, listener); a supervised task that failed; paymennt refusing
/// the API credentials at start.
async fn act(
    settings: &mut Settings,
    opened: &stages::OpenedLedger,
    epoch: Option<i64>,
    control: &mut mpsc::Receiver<Control>,
    options: &RunOptions,
) -> anyhow::Result<Term> {
    let started = Instant::now();
    // Every long-lived task runs under it: one that ends or panics stops the daemon (exit 1).
    let mut supervisor = supervisor::Supervisor::new();
    let ledger = opened.ledger.clone();
    // Where the ticket counter stands before any source runs: every request sent from now on
    // covers whatever happened while no daemon acted (the start-up sweep's concern).
    let counter_at_start = ledger.last_ticket().await?;
    options.metrics.set_active(true);

    // 2. paymennt, and the hook commands (resolved now, so a missing program stops startup).
    let metrics = options.metrics.clone();
    let client = Client::from_settings(&settings.paymennt)?.with_metrics(metrics.clone());
    let hooks = HookSet::from_settings(settings)?;
    if let Some(warning) = root_warning(nix::unistd::geteuid().is_root(), &settings.hooks) {
        tracing::warn!("{warning}");
    }

    // 3. Firestore (unless turned off): start the listener and subscribe to every watched
    //    checkout.
    let sources = CancellationToken::new();
    let (firestore, listen_receiver) = start_firestore(settings, &metrics, &sources)?;
    let database = settings.firestore.database.clone();
    let (watched, needing) =
        watch_at_start(&ledger, firestore.listener.as_ref(), &database).await?;

    // 4. The verifier, fed by the listener's events and the reconciler; it wakes the hook
    //    dispatcher (built here, started in step 6) after each transition that queued deliveries.
    let dispatcher = Dispatcher::new(ledger.clone(), hooks, settings.hooks_concurrency)
        .with_metrics(metrics.clone());
    let dispatcher_handle = dispatcher.handle();
    let (config_sender, config_receiver) =
        watch::channel(reload::verifier_config(settings, client.clone()));
    let (watch_set_changed, _) = watch::channel(0u64);
    // Urgent nudges (Firestore changes) and sweep nudges (the reconciler) travel apart, so a
    // payment never queues behind a sweep.
    let (nudge_sender, nudge_receiver) = mpsc::channel::<Nudge>(1024);
    let (sweep_sender, sweep_receiver) = mpsc::channel::<Nudge>(64);
    let verifier = Verifier::new(
        ledger.clone(),
        config_receiver,
        settings.paymennt.concurrency,
        VerifierSignals {
            dispatcher: dispatcher.wake_handle(),
            watch_set_changed: watch_set_changed.clone(),
        },
    )
    .with_metrics(metrics.clone());
    let verifier_stats = verifier.stats();
    let verifier_abort = CancellationToken::new();
    let verifier_task = tokio::spawn(supervisor.supervise(
        "verifier",
        verifier.run(nudge_receiver, sweep_receiver, verifier_abort.clone()),
    ));
    let credential_status = client.credential_status().clone();
    let health = Health::new(
        ledger.clone(),
        firestore.listener.clone(),
        verifier_stats.clone(),
        settings.http.verify_failing_after,
    )
    .with_paymennt_credentials(credential_status.clone());
    health.set_firestore_auth(settings.firestore.auth_mode().as_str());

    // The Firestore source's tasks: its events become notes, tickets and nudges; its watch set
    // follows the ledger's.
    let wiring = Wiring {
        settings,
        ledger: &ledger,
        metrics: &metrics,
        supervisor: &supervisor,
        sources: &sources,
    };
    let mut tasks = JoinSet::new();
    let (watched_count, newly_tracked) = spawn_firestore_tasks(
        &wiring,
        &mut tasks,
        &firestore,
        listen_receiver,
        &health,
        &nudge_sender,
        Listened {
            database,
            watched,
            watch_set_changed: watch_set_changed.subscribe(),
        },
    );

    // The HTTP listener, if configured: webhooks nudge the verifier like Firestore changes do.
    let http_stop = CancellationToken::new();
    let discovery_enabled = settings.discovery.is_enabled(&settings.paymennt);
    let discovery_wake = Arc::new(tokio::sync::Notify::new());
    let http_task = match settings.http.listen {
        Some(addr) => {
            let mut context = HttpContext::new(
                &settings.http,
                ledger.clone(),
                nudge_sender.clone(),
                newly_tracked.clone(),
                health.clone(),
                metrics.clone(),
            )?;
            if discovery_enabled {
                context.intake.set_discovery_wake(discovery_wake.clone());
            }
            let published = options.http_addr.as_ref();
            Some(serve_http(&wiring, addr, context, published, &http_stop).await?)
        }
        None => None,
    };
    drop(newly_tracked);

    // 5. The reconciler: at start for checkouts that need it, then every interval; and
    //    discovery, which tracks checkouts created anywhere.
    let (interval_sender, interval_receiver) = watch::channel(settings.reconcile.interval);
    let (client_sender, client_receiver) = watch::channel(client.clone());
    spawn_reconciler(
        &wiring,
        &mut tasks,
        client_receiver.clone(),
        sweep_sender.clone(),
        interval_receiver,
        watch_set_changed.clone(),
        counter_at_start,
    );
    if discovery_enabled {
        spawn_discovery(
            &wiring,
            &mut tasks,
            client_receiver,
            sweep_sender,
            watch_set_changed.clone(),
            discovery_wake,
        );
    } else {
        drop(sweep_sender);
        tracing::info!(
            "discovery is off: only checkouts given to paywatch (track, link create) are watched"
        );
    }
    drop(nudge_sender);

    // 6. The hook dispatcher: delivers the outbox, woken by the verifier after each transition.
    let dispatcher_stop = CancellationToken::new();
    let dispatcher_kill = CancellationToken::new();
    let dispatcher_task = tokio::spawn(supervisor.supervise(
        "hook dispatcher",
        dispatcher.run(dispatcher_stop.clone(), dispatcher_kill.clone()),
    ));

    health.set_started(true);
    tracing::info!(
        checkouts = watched_count.load(std::sync::atomic::Ordering::Relaxed),
        need_verification = needing,
        stream_mode = settings.firestore.stream_mode.as_str(),
        firestore = %firestore.endpoint,
        paymennt = %client.base_url(),
        ledger = %ledger.path().display(),
        lease_epoch = epoch,
        startup_ms = started.elapsed().as_millis() as u64,
        "paywatch is running: watching {} checkouts over Firestore ({}), verifying with {}",
        watched_count.load(std::sync::atomic::Ordering::Relaxed),
        settings.firestore.stream_mode.as_str(),
        client.base_url()
    );
    let outside = Outside {
        status: options.status.clone(),
        notifier: options.notifier.clone(),
        watched: watched_count,
        verifier: verifier_stats,
        ledger: ledger.clone(),
    };
    outside.publish(true);
    outside.notifier.ready();
    let (watchdog_cancel, watchdog) =
        start_watchdog(&ledger, &outside.notifier, &supervisor, epoch.is_none());

    // 7. Run until told to stop (or, on PostgreSQL, until the lease is lost).
    let reload_targets = reload::ReloadTargets {
        config_path: options.config_path.clone(),
        log: options.log.clone(),
        metrics: metrics.clone(),
        verifier: config_sender,
        interval: interval_sender,
        client: client_sender,
        dispatcher: dispatcher_handle,
    };
    let lease = opened.lease.as_ref().map(|lease| lease.role()).zip(epoch);
    let stopped = run_until_stopped(
        &mut supervisor,
        control,
        settings,
        &reload_targets,
        &outside,
        &credential_status,
        lease,
    )
    .await;

    // 8. Drain: stop taking new work, let verifications and running hooks finish, then stop.
    // After a lost lease the fence already refuses this daemon's writes: what is in flight
    // fails to record and the new holder redoes it (a hook may run twice, with one event id).
    supervisor.stopping();
    let drain = settings.daemon.drain_timeout;
    if matches!(stopped, Stopped::LostLease) {
        tracing::warn!(drain_timeout = ?drain, "stopped acting: the lease was lost; standing by once in-flight work has ended");
    } else {
        outside.notifier.stopping();
        tracing::info!(drain_timeout = ?drain, "shutting down: finishing in-flight verifications and running hooks");
    }
    let deadline = tokio::time::Instant::now() + drain;
    health.set_started(false);
    Running {
        http_stop,
        http_task,
        sources,
        tasks,
        verifier_task,
        verifier_abort,
        dispatcher_stop,
        dispatcher_kill,
        dispatcher_task,
        firestore,
        watchdog_cancel,
        watchdog,
    }
    .drain(deadline)
    .await;
    outside.publish(false);
    options.metrics.set_active(false);
    let failure = match stopped {
        Stopped::LostLease => return Ok(Term::LostLease),
        Stopped::Told => None,
        Stopped::Failed(failure) => Some(failure),
        Stopped::RefusedAtStart(refusal) => {
            tracing::error!("paywatch stopped: paymennt refused the API credentials at start");
            return Err(crate::settings::SettingsError(format!(
                "paymennt refused the API credentials at start: {refusal}\n\n\
                 check [paymennt] api_key and api_secret (or their files or systemd credentials) and \
                 [paymennt] environment; to keep running until they are accepted instead, set \
                 [daemon] wait_for_api = true"
            ))
            .into());
        }
    };
    if let Some(failure) = failure.or_else(|| supervisor.failure()) {
        tracing::error!("paywatch stopped because {failure}");
        anyhow::bail!("{failure}; paywatch stopped so that its service manager restarts it");
    }
    Ok(Term::Stopped)
}

/// What the daemon tells the outside world while it runs: [`DaemonStatus`] (tests, the demo)
/// and systemd's notifications.
struct Outside {
    /// Where [`DaemonStatus`] is published, if anywhere.
    status: Option<watch::Sender<DaemonStatus>>,
    /// systemd notifications.
    notifier: notify::Notifier,
    /// Checkouts watched now (kept by the watch-set sync).
    watched: Arc<AtomicUsize>,
    /// The verifier's figures.
    verifier: watch::Receiver<VerifierStats>,
    /// For the hooks pending in the STATUS= line.
    ledger: Ledger,
}

impl Outside {
    fn watched(&self) -> usize {
        self.watched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes the figures, `ready` or not.
    fn publish(&self, ready: bool) {
        if let Some(status) = &self.status {
            status.send_replace(DaemonStatus {
                watched: self.watched(),
                ready,
                verifier: self.verifier.borrow().clone(),
            });
        }
    }

    /// Refreshes systemd's STATUS= line.
    async fn status_line(&self) {
        let counts = self.ledger.clone();
        let hooks_pending = counts.counts().await.map(|c| c.hooks_pending).unwrap_or(0);
        let last_payment = self
            .verifier
            .borrow()
            .last_payment
            .and_then(|at| (chrono::Utc::now() - at).to_std().ok());
        self.notifier.status(
            &notify::StatusSummary {
                watching: self.watched(),
                last_payment,
                hooks_pending: usize::try_from(hooks_pending).unwrap_or(0),
            }
            .to_string(),
        );
    }
}

/// Why the daemon stopped running.
enum Stopped {
    /// [`Control::Shutdown`], or the control channel closed.
    Told,
    /// A supervised task ended or panicked.
    Failed(supervisor::TaskFailure),
    /// paymennt refused the API credentials before it ever accepted them (and `[daemon]
    /// wait_for_api` is off): what it said.
    RefusedAtStart(String),
    /// The lease this term was started with is no longer held (PostgreSQL).
    LostLease,
}

/// The running daemon: reloads on [`Control::Reload`], publishes its figures, and returns
/// when told to stop, when a task fails, or when paymennt refuses the credentials at start.
async fn run_until_stopped(
    supervisor: &mut supervisor::Supervisor,
    control: &mut mpsc::Receiver<Control>,
    settings: &mut Settings,
    reload_targets: &reload::ReloadTargets,
    outside: &Outside,
    credential_status: &crate::paymennt::CredentialStatus,
    lease: Option<(watch::Receiver<Role>, i64)>,
) -> Stopped {
    let (mut role, epoch) = match lease {
        Some((role, epoch)) => (Some(role), Some(epoch)),
        None => (None, None),
    };
    let notifier = &outside.notifier;
    let mut status_tick = tokio::time::interval(Duration::from_millis(200));
    let mut status_line_tick = tokio::time::interval(STATUS_LINE_EVERY);
    loop {
        tokio::select! {
            failed = supervisor.failed() => return Stopped::Failed(failed),
            () = lease_lost(role.as_mut(), epoch) => return Stopped::LostLease,
            command = control.recv() => match command {
                Some(Control::Reload) => {
                    notifier.reloading();
                    reload::reload(settings, reload_targets);
                    notifier.ready();
                }
                Some(Control::Shutdown) | None => return Stopped::Told,
            },
            _ = status_tick.tick() => {
                outside.publish(true);
                // A key paymennt refused before it ever accepted one is a configuration
                // problem, not an outage: say so with exit 2 rather than run blind.
                if !settings.daemon.wait_for_api
                    && !credential_status.ever_accepted()
                    && let Some(refusal) = credential_status.refused()
                {
                    return Stopped::RefusedAtStart(refusal);
                }
            }
            _ = status_line_tick.tick(), if notifier.is_enabled() => outside.status_line().await,
        }
    }
}

/// Returns once `role` no longer holds the lease at `epoch` (another epoch counts as lost: a
/// term never spans two leases), or the keeper is gone; never without a role (SQLite).
async fn lease_lost(role: Option<&mut watch::Receiver<Role>>, epoch: Option<i64>) {
    let Some(role) = role else {
        return std::future::pending().await;
    };
    loop {
        if role.borrow_and_update().epoch() != epoch {
            return;
        }
        if role.changed().await.is_err() {
            return;
        }
    }
}
