//! The daemon: startup in order, the running pipeline, reload, and the drain on shutdown.
//!
//! Owns: wiring sources -> verifier -> ledger -> hooks, the watch set kept in step with the
//! ledger, the listener's events (nudges, resume tokens), and the process lifecycle.
//! Must never: decide a status (the verifier does, through Get Checkout), or exit without
//! letting in-flight verifications and hooks finish within the drain timeout.
//!
//! [`run`] reads top to bottom as the startup order, and its end is the shutdown order.

pub mod notify;
mod process;
mod reload;
pub mod signals;
pub mod supervisor;

pub use process::{RESERVED_FDS, check_open_file_limit, open_files_needed, root_warning};
pub use reload::listener_options;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::hooks::config::HookSet;
use crate::hooks::dispatcher::Dispatcher;
use crate::http::health::Health;
use crate::http::{HttpContext, NewlyTracked};
use crate::ledger::Ledger;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::paymennt::Client;
use crate::settings::Settings;
use crate::sources::Nudge;
use crate::sources::discovery::DiscoveryConfig;
use crate::sources::firestore::{
    ListenEvent, Listener, ListenerHandle, ListenerOptions, Listening, consume_listen_events,
    sync_watch_set, watch_at_start,
};
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

async fn blocking<T: Send + 'static>(
    task: impl FnOnce() -> crate::ledger::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(task)
        .await
        .context("ledger task panicked")??)
}

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
    let started = Instant::now();
    let mut settings = settings;
    process::keep_memory_private();
    // Descriptors for the daemon's own work (ledger, streams, hooks) whatever HTTP clients do.
    if let Some(limit) = process::raise_open_file_limit() {
        check_open_file_limit(&settings, limit)?;
    }
    // Every long-lived task runs under it: one that ends or panics stops the daemon (exit 1).
    let mut supervisor = supervisor::Supervisor::new();

    // 1. The ledger, held by this daemon alone (two would run each other's hooks twice). The
    // lock comes first: a second daemon must not migrate a ledger another one is using.
    let _daemon_lock = process::lock_ledger(&settings.ledger.path)?;
    let path = settings.ledger.path.clone();
    let ledger = blocking(move || Ledger::open(&path)).await?;
    // Where the ticket counter stands before any source runs: every request sent from now on
    // covers whatever happened while the daemon was stopped (the start-up sweep's concern).
    let reader = ledger.clone();
    let counter_at_start = blocking(move || reader.last_ticket()).await?;

    // 2. paymennt, and the hook commands (resolved now, so a missing program stops startup).
    let metrics = options.metrics.clone();
    let client = Client::from_settings(&settings.paymennt)?.with_metrics(metrics.clone());
    let hooks = HookSet::from_settings(&settings)?;
    if let Some(warning) = root_warning(nix::unistd::geteuid().is_root(), &settings.hooks) {
        tracing::warn!("{warning}");
    }

    // 3. Firestore (unless turned off): start the listener and subscribe to every watched
    //    checkout.
    let sources = CancellationToken::new();
    let (listen_events, listen_receiver) = mpsc::channel::<ListenEvent>(4096);
    // With Firestore off its options are not even built: no Firestore credentials are needed.
    let firestore_options = if settings.firestore.enabled {
        Some(ListenerOptions {
            metrics: metrics.clone(),
            ..listener_options(&settings)?
        })
    } else {
        None
    };
    let firestore_endpoint = firestore_options
        .as_ref()
        .map_or_else(|| "off".to_owned(), |found| found.endpoint.clone());
    let mut idle_listen_events = None;
    let listener = if let Some(found) = firestore_options {
        Some(
            Listener::start(found, listen_events, sources.child_token())
                .context("starting the Firestore listener")?,
        )
    } else {
        // Kept open (never sent on) so the supervised event task runs until shutdown.
        idle_listen_events = Some(listen_events);
        tracing::warn!(
            "[firestore] enabled = false: changes arrive only through webhooks ([http]) and the reconciler every {:?}",
            settings.reconcile.interval
        );
        None
    };
    let database = settings.firestore.database.clone();
    let (watched, needing) = watch_at_start(&ledger, listener.as_ref(), &database).await?;

    // 4. The verifier, fed by the listener's events and the reconciler; it wakes the hook
    //    dispatcher (built here, started in step 6) after each transition that queued deliveries.
    let dispatcher = Dispatcher::new(ledger.clone(), hooks, settings.hooks_concurrency)
        .with_metrics(metrics.clone());
    let dispatcher_handle = dispatcher.handle();
    let (config_sender, config_receiver) =
        watch::channel(reload::verifier_config(&settings, client.clone()));
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
        listener.clone(),
        verifier_stats.clone(),
        settings.http.verify_failing_after,
    )
    .with_paymennt_credentials(credential_status.clone());
    let auth_mode = settings.firestore.auth_mode().as_str();
    health.set_firestore_auth(auth_mode);

    let mut tasks = JoinSet::new();
    tasks.spawn(supervisor.supervise(
        "listener events",
        consume_listen_events(
            listen_receiver,
            ledger.clone(),
            nudge_sender.clone(),
            health.clone(),
            sources.clone(),
            metrics.clone(),
            auth_mode,
        ),
    ));
    if let Some(listener) = &listener {
        tasks.spawn(watch_listener(
            listener.clone(),
            supervisor.reporter(),
            sources.clone(),
        ));
    }
    let watched_count = Arc::new(std::sync::atomic::AtomicUsize::new(watched.count()));
    let (newly_tracked, newly_tracked_receiver) = mpsc::channel::<NewlyTracked>(256);
    tasks.spawn(supervisor.supervise(
        "watch-set sync",
        sync_watch_set(
            ledger.clone(),
            Listening {
                listener: listener.clone(),
                database,
                health: health.clone(),
            },
            watched,
            watch_set_changed.subscribe(),
            newly_tracked_receiver,
            watched_count.clone(),
            sources.clone(),
        ),
    ));

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
            let bound = crate::http::bind(addr).await?;
            let local = bound.local_addr().context("the HTTP listener's address")?;
            tracing::info!(
                listen = %local,
                track_endpoint = context.track.is_some(),
                webhook_signatures = context.intake.checks_signatures(),
                "HTTP listener on {local}"
            );
            if let Some(sender) = &options.http_addr {
                sender.send_replace(Some(local));
            }
            let limits = crate::http::ServeLimits::new(
                &settings.http,
                crate::http::HTTP_DRAIN.min(settings.daemon.drain_timeout),
            );
            Some(tokio::spawn(supervisor.supervise(
                "HTTP listener",
                crate::http::serve(bound, Arc::new(context), limits, http_stop.clone()),
            )))
        }
        None => None,
    };
    drop(newly_tracked);

    // 5. The reconciler: at start for checkouts that need it, then every interval; and
    //    discovery, which tracks checkouts created anywhere.
    let (interval_sender, interval_receiver) = watch::channel(settings.reconcile.interval);
    let (client_sender, client_receiver) = watch::channel(client.clone());
    tasks.spawn(supervisor.supervise(
        "reconciler",
        crate::sources::reconcile::run(
            ledger.clone(),
            client_receiver.clone(),
            sweep_sender.clone(),
            interval_receiver,
            settings.reconcile.page_size,
            watch_set_changed.clone(),
            crate::sources::reconcile::StartupSweep {
                counter_at_start,
                snapshot_grace: if settings.firestore.enabled {
                    settings.reconcile.startup_grace
                } else {
                    Duration::ZERO
                },
            },
            sources.clone(),
            metrics.clone(),
        ),
    ));
    if discovery_enabled {
        tasks.spawn(supervisor.supervise(
            "discovery",
            crate::sources::discovery::run(
                ledger.clone(),
                client_receiver,
                DiscoveryConfig {
                    types: settings.discovery.types.clone(),
                    interval: settings.discovery.interval,
                    lookback: settings.discovery.lookback,
                    overlap: settings.discovery.overlap,
                    page_size: settings.discovery.page_size,
                },
                sweep_sender,
                watch_set_changed.clone(),
                discovery_wake,
                sources.clone(),
            ),
        ));
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
        firestore = %firestore_endpoint,
        paymennt = %client.base_url(),
        ledger = %ledger.path().display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "paywatch is running: watching {} checkouts over Firestore ({}), verifying with {}",
        watched_count.load(std::sync::atomic::Ordering::Relaxed),
        settings.firestore.stream_mode.as_str(),
        client.base_url()
    );
    let publish = |ready: bool| {
        if let Some(status) = &options.status {
            status.send_replace(DaemonStatus {
                watched: watched_count.load(std::sync::atomic::Ordering::Relaxed),
                ready,
                verifier: verifier_stats.borrow().clone(),
            });
        }
    };
    publish(true);
    let notifier = options.notifier.clone();
    notifier.ready();
    let watchdog_cancel = CancellationToken::new();
    let liveness_ledger = ledger.clone();
    let healthy = supervisor.health();
    let watchdog_loop = notify::watchdog_loop(
        notifier.clone(),
        move || {
            // Every supervised task alive, and the ledger thread answering (it is what can
            // wedge): one failed task and systemd hears no more pings.
            let ledger = liveness_ledger.clone();
            let healthy = healthy.clone();
            async move {
                healthy()
                    && matches!(
                        tokio::task::spawn_blocking(move || ledger.data_version()).await,
                        Ok(Ok(_))
                    )
            }
        },
        watchdog_cancel.clone(),
    );
    // Without a systemd watchdog the loop returns at once, which is no failure.
    let watchdog = if notifier.watchdog_interval().is_some() {
        tokio::spawn(supervisor.supervise("watchdog", watchdog_loop))
    } else {
        tokio::spawn(watchdog_loop)
    };

    let reload_targets = reload::ReloadTargets {
        config_path: options.config_path.clone(),
        log: options.log.clone(),
        metrics: metrics.clone(),
        verifier: config_sender,
        interval: interval_sender,
        client: client_sender,
        dispatcher: dispatcher_handle,
    };

    // 7. Run until told to stop.
    let mut status_tick = tokio::time::interval(Duration::from_millis(200));
    let mut status_line_tick = tokio::time::interval(STATUS_LINE_EVERY);
    let mut failure = None;
    let mut refused_at_start = None;
    loop {
        tokio::select! {
            failed = supervisor.failed() => {
                failure = Some(failed);
                break;
            }
            command = control.recv() => match command {
                Some(Control::Reload) => {
                    notifier.reloading();
                    reload::reload(&mut settings, &reload_targets);
                    notifier.ready();
                }
                Some(Control::Shutdown) | None => break,
            },
            _ = status_tick.tick() => {
                publish(true);
                // A key paymennt refused before it ever accepted one is a configuration
                // problem, not an outage: say so with exit 2 rather than run blind.
                if !settings.daemon.wait_for_api
                    && !credential_status.ever_accepted()
                    && let Some(refusal) = credential_status.refused()
                {
                    refused_at_start = Some(refusal);
                    break;
                }
            }
            _ = status_line_tick.tick(), if notifier.is_enabled() => {
                let counts = ledger.clone();
                let hooks_pending = blocking(move || counts.counts()).await.map(|c| c.hooks_pending).unwrap_or(0);
                let last_payment = verifier_stats
                    .borrow()
                    .last_payment
                    .and_then(|at| (chrono::Utc::now() - at).to_std().ok());
                notifier.status(&notify::StatusSummary {
                    watching: watched_count.load(std::sync::atomic::Ordering::Relaxed),
                    last_payment,
                    hooks_pending: usize::try_from(hooks_pending).unwrap_or(0),
                }.to_string());
            }
        }
    }

    // 8. Drain: stop taking new work, let verifications and running hooks finish, then stop.
    notifier.stopping();
    supervisor.stopping();
    let drain = settings.daemon.drain_timeout;
    tracing::info!(drain_timeout = ?drain, "shutting down: finishing in-flight verifications and running hooks");
    let deadline = tokio::time::Instant::now() + drain;
    health.set_started(false);
    // The HTTP listener first: no new webhooks or tracks; requests in flight finish within the
    // listener's own short drain (crate::http::HTTP_DRAIN), which closes what is left, so a
    // half-sent request cannot spend the drain time verifications and hooks need.
    http_stop.cancel();
    if let Some(mut http_task) = http_task
        && tokio::time::timeout_at(deadline, &mut http_task)
            .await
            .is_err()
    {
        tracing::warn!("drain timeout reached; closing HTTP requests still open");
        http_task.abort();
    }
    sources.cancel();
    while tasks.join_next().await.is_some() {}
    let mut verifier_task = verifier_task;
    if tokio::time::timeout_at(deadline, &mut verifier_task)
        .await
        .is_err()
    {
        tracing::warn!(
            "drain timeout reached; abandoning verifications still in flight (the reconciler redoes them at next start)"
        );
        verifier_abort.cancel();
        let _ = verifier_task.await;
    }
    // Only now does the dispatcher stop claiming: while verifications drain, the deliveries
    // they queue can still start (on its poll tick) and finish within the same deadline.
    dispatcher_stop.cancel();
    let mut dispatcher_task = dispatcher_task;
    if tokio::time::timeout_at(deadline, &mut dispatcher_task)
        .await
        .is_err()
    {
        tracing::warn!(
            "drain timeout reached; stopping running hooks (they run again at next start)"
        );
        dispatcher_kill.cancel();
        let _ = dispatcher_task.await;
    }
    if let Some(listener) = listener {
        listener.closed().await;
    }
    drop(idle_listen_events);
    // Last: systemd enforces the watchdog until the process exits.
    watchdog_cancel.cancel();
    let _ = watchdog.await;
    publish(false);
    if let Some(refusal) = refused_at_start {
        tracing::error!("paywatch stopped: paymennt refused the API credentials at start");
        return Err(crate::settings::SettingsError(format!(
            "paymennt refused the API credentials at start: {refusal}\n\n\
             check [paymennt] api_key and api_secret (or their files or systemd credentials) and \
             [paymennt] environment; to keep running until they are accepted instead, set \
             [daemon] wait_for_api = true"
        ))
        .into());
    }
    if let Some(failure) = failure.or_else(|| supervisor.failure()) {
        tracing::error!("paywatch stopped because {failure}");
        anyhow::bail!("{failure}; paywatch stopped so that its service manager restarts it");
    }
    tracing::info!("paywatch stopped");
    Ok(())
}

/// Reports the listener as failed when one of its stream tasks panics (the checkouts on that
/// stream would never be watched again).
async fn watch_listener(
    listener: ListenerHandle,
    reporter: supervisor::FailureReporter,
    cancel: CancellationToken,
) {
    tokio::select! {
        () = cancel.cancelled() => {}
        how = listener.failed() => reporter.report("listener", how),
    }
}
