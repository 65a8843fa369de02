//! The daemon: startup in order, the running pipeline, reload, and the drain on shutdown.
//!
//! Owns: wiring sources -> verifier -> ledger -> hooks, the watch set kept in step with the
//! ledger, the listener's events (nudges, resume tokens), and the process lifecycle.
//! Must never: decide a status (the verifier does, through Get Checkout), or exit without
//! letting in-flight verifications and hooks finish within the drain timeout.
//!
//! [`run`] reads top to bottom as the startup order, and its end is the shutdown order.

pub mod notify;
pub mod signals;
pub mod supervisor;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::{CheckoutId, CollectionPaths, FirestoreLocation, WatchedDocument};
use crate::hooks::config::HookSet;
use crate::hooks::dispatcher::{Dispatcher, DispatcherHandle};
use crate::http::health::Health;
use crate::http::{HttpContext, NewlyTracked};
use crate::ledger::{Ledger, ResumePoint};
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::paymennt::Client;
use crate::settings::Settings;
use crate::sources::Nudge;
use crate::sources::discovery::DiscoveryConfig;
use crate::sources::firestore::{
    ListenEvent, Listener, ListenerHandle, ListenerOptions, WatchTarget,
};
use crate::verifier::{Verifier, VerifierConfig, VerifierSignals, VerifierStats};

/// What the outside world asks of a running daemon (signals, tests, the demo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Drain and exit (SIGTERM, SIGINT).
    Shutdown,
    /// Re-read the config file (SIGHUP).
    Reload,
}

/// How often the watch set is compared with the ledger when nothing told us it changed
/// (a `paywatch track` in another process commits to the ledger file).
const WATCH_SYNC_POLL: Duration = Duration::from_millis(250);

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

/// Builds the listener's options from settings.
///
/// # Errors
///
/// The auth mode's credentials are missing or unreadable (a [`crate::settings::SettingsError`],
/// exit code 2).
pub fn listener_options(settings: &Settings) -> anyhow::Result<ListenerOptions> {
    // firebase-anonymous keeps its identity next to the ledger, so a restart reuses it.
    let auth = crate::sources::firestore::FirestoreAuth::from_settings(&settings.firestore)?
        .with_identity_file(settings.ledger.firebase_identity_path(), false);
    Ok(ListenerOptions {
        endpoint: settings.firestore.endpoint(),
        auth,
        ca_file: settings.firestore.ca_file.clone(),
        mode: settings.firestore.stream_mode,
        targets_per_stream: settings.firestore.targets_per_stream,
        streams_per_connection: settings.firestore.streams_per_connection,
        idle_timeout: settings.firestore.idle_timeout,
        add_ack_timeout: settings.firestore.add_ack_timeout,
        ..ListenerOptions::default()
    })
}

fn verifier_config(settings: &Settings, client: Client) -> VerifierConfig {
    VerifierConfig {
        client,
        hooks: Arc::new(settings.hooks.clone()),
        refund_watch: settings.firestore.refund_watch,
    }
}

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
    keep_memory_private();
    // Descriptors for the daemon's own work (ledger, streams, hooks) whatever HTTP clients do.
    if let Some(limit) = raise_open_file_limit() {
        check_open_file_limit(&settings, limit)?;
    }
    // Every long-lived task runs under it: one that ends or panics stops the daemon (exit 1).
    let mut supervisor = supervisor::Supervisor::new();

    // 1. The ledger, held by this daemon alone (two would run each other's hooks twice). The
    // lock comes first: a second daemon must not migrate a ledger another one is using.
    let _daemon_lock = lock_ledger(&settings.ledger.path)?;
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
    // Refusals noted by an earlier run are asked about afresh (and noted again if refused).
    let clearer = ledger.clone();
    blocking(move || clearer.clear_listen_refusals()).await?;
    let database = settings.firestore.database.clone();
    let reader = ledger.clone();
    let initial = blocking(move || reader.watch_set()).await?;
    let mut watched = Watched::default();
    let needing = initial.iter().filter(|entry| entry.needs_verify).count();
    for entry in initial {
        let location = in_database(entry.location, &database);
        watched.insert(entry.checkout_id.clone(), &location);
        if let Some(listener) = &listener {
            listener.watch(WatchTarget {
                checkout_id: entry.checkout_id,
                location,
                resume_token: entry.resume_token,
                resume_read_time: entry.resume_read_time,
            });
        }
    }

    // 4. The verifier, fed by the listener's events and the reconciler.
    let (config_sender, config_receiver) =
        watch::channel(verifier_config(&settings, client.clone()));
    let (deliveries_queued, _) = watch::channel(0u64);
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
            deliveries_queued: deliveries_queued.clone(),
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
    let watched_count = Arc::new(std::sync::atomic::AtomicUsize::new(watched.len()));
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

    // 6. The hook dispatcher: delivers the outbox, woken after each transition.
    let dispatcher = Dispatcher::new(ledger.clone(), hooks, settings.hooks_concurrency)
        .with_metrics(metrics.clone());
    let dispatcher_handle = dispatcher.handle();
    let dispatcher_stop = CancellationToken::new();
    let dispatcher_kill = CancellationToken::new();
    let dispatcher_task = tokio::spawn(supervisor.supervise(
        "hook dispatcher",
        dispatcher.run(dispatcher_stop.clone(), dispatcher_kill.clone()),
    ));
    tasks.spawn(supervisor.supervise(
        "hook dispatcher wake-up",
        wake_dispatcher(
            deliveries_queued.subscribe(),
            dispatcher_handle.clone(),
            sources.clone(),
        ),
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
                    reload(&mut settings, &options, &config_sender, &interval_sender, &client_sender, &dispatcher_handle);
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

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): processes of the same user, hooks
/// included, can then no longer read `/proc/<pid>/environ`, `/proc/<pid>/mem` or attach a
/// debugger, so the API secret in our environment or memory stays ours. It also turns off core
/// dumps, which would hold the same secrets. Hooks themselves are dumpable again after `exec`.
fn keep_memory_private() {
    match nix::sys::prctl::set_dumpable(false) {
        Ok(()) => tracing::debug!("process memory and environment are private (non-dumpable)"),
        Err(error) => tracing::warn!(
            "cannot make paywatch non-dumpable ({error}): hooks running as this user could read \
             its environment and memory; run hooks under another user (docs/running-as-a-service.md)"
        ),
    }
}

/// Descriptors the daemon keeps for itself besides HTTP connections: the ledger and its lock,
/// Firestore and paymennt connections, logging, signals and the runtime.
pub const RESERVED_FDS: u64 = 128;

/// Raises this process's soft limit on open files to its hard limit (the soft limit is often
/// 1024 while the hard one is far higher) and returns the limit now in force; `None` if it
/// cannot be read. A refusal (a seccomp filter without `@resources`, as in the packaged unit,
/// which sets `LimitNOFILE=` instead) is logged and the soft limit kept.
fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            Some(hard)
        }
        Err(error) => {
            tracing::warn!(%error, soft, hard, "cannot raise the open-file limit to its hard limit; keeping {soft}");
            Some(soft)
        }
    }
}

/// Descriptors the daemon may need with `settings`: every HTTP connection the cap allows, and
/// room to spare for its own work ([`RESERVED_FDS`], up to four per running hook for its pipes,
/// one per paymennt request in flight).
pub fn open_files_needed(settings: &Settings) -> u64 {
    let connections = if settings.http.listen.is_some() {
        settings.http.max_connections as u64
    } else {
        0
    };
    // Saturating: settings built in code (tests, embedding) skip validation's bounds.
    connections
        .saturating_add(RESERVED_FDS)
        .saturating_add((settings.hooks_concurrency as u64).saturating_mul(4))
        .saturating_add(settings.paymennt.concurrency as u64)
}

/// Refuses to start when the open-file `limit` leaves no room for the HTTP listener's
/// connection cap plus the daemon's own work: clients would otherwise take the descriptors
/// hooks need. Without a listener there is nothing to check.
///
/// # Errors
///
/// A [`SettingsError`](crate::settings::SettingsError) (exit code 2) naming both numbers.
pub fn check_open_file_limit(
    settings: &Settings,
    limit: u64,
) -> Result<(), crate::settings::SettingsError> {
    // Without a listener there is no cap to fit; the daemon's own share is small.
    if settings.http.listen.is_none() {
        return Ok(());
    }
    let needed = open_files_needed(settings);
    if limit >= needed {
        return Ok(());
    }
    Err(crate::settings::SettingsError(format!(
        "the open-file limit is {limit}, but [http] max_connections = {} needs at least {needed} \
         (the connections plus {} for the ledger, Firestore, paymennt and hooks)\n\n\
         raise the limit (LimitNOFILE= in the unit, ulimit -n), or lower http.max_connections",
        settings.http.max_connections,
        needed.saturating_sub(settings.http.max_connections as u64),
    )))
}

/// The warning for a daemon running as root with hooks that would run as root too: such a
/// hook can read the daemon's environment and memory (root keeps CAP_SYS_PTRACE, so being
/// non-dumpable does not stop it). `None` when not root, or every command hook has a `run_as`.
pub fn root_warning(
    running_as_root: bool,
    hooks: &[crate::settings::HookSettings],
) -> Option<String> {
    if !running_as_root {
        return None;
    }
    let as_root: Vec<&str> = hooks
        .iter()
        // A URL hook runs no process (and cannot have a run_as).
        .filter(|hook| hook.run_as.is_none() && hook.url.is_none())
        .map(|hook| hook.name.as_str())
        .collect();
    if as_root.is_empty() {
        return None;
    }
    Some(format!(
        "paywatch is running as root, so hook(s) {} run as root and can read its environment and \
         memory (the paymennt API secret); set run_as = \"user\" on each hook, or run paywatch as \
         its own user (the packaged unit does: docs/running-as-a-service.md)",
        as_root
            .iter()
            .map(|name| format!("'{}'", crate::domain::printable(name)))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Applies a re-read config: hooks, log level and reconcile interval change at once; other
/// sections need a restart, which is said in the log.
fn reload(
    settings: &mut Settings,
    options: &RunOptions,
    config: &watch::Sender<VerifierConfig>,
    interval: &watch::Sender<Duration>,
    client_sender: &watch::Sender<Client>,
    dispatcher: &DispatcherHandle,
) {
    let loaded = Settings::load(options.config_path.as_deref()).and_then(|fresh| {
        let hooks = HookSet::from_settings(&fresh)?;
        // Rebuilt, so rotated API credentials (a new secret file) take effect now.
        let client = Client::from_settings(&fresh.paymennt)?
            .with_metrics(options.metrics.clone())
            .with_credential_status(client_sender.borrow().credential_status().clone());
        Ok((fresh, hooks, client))
    });
    let (fresh, hooks, client) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::error!("config reload failed; keeping the running config: {error}");
            return;
        }
    };
    // The verifier's hook list (which deliveries are queued) and the dispatcher's (how they
    // run) change together.
    dispatcher.reload(hooks);
    if let Err(error) = options.log.set_level(&fresh.log.level) {
        tracing::error!("config reload: {error}; keeping the log level");
    }
    client_sender.send_replace(client.clone());
    config.send_replace(verifier_config(&fresh, client));
    // Only what changed is applied and named, so an unchanged reload is quiet.
    interval.send_if_modified(|current| {
        let changed = *current != fresh.reconcile.interval;
        *current = fresh.reconcile.interval;
        changed
    });
    let mut applied = Vec::new();
    if format!("{:?}", fresh.hooks) != format!("{:?}", settings.hooks) {
        applied.push("[[hooks]]");
    }
    if fresh.log.level != settings.log.level {
        applied.push("log.level");
    }
    if fresh.reconcile.interval != settings.reconcile.interval {
        applied.push("reconcile.interval");
    }
    if format!("{:?}", fresh.paymennt) != format!("{:?}", settings.paymennt) {
        applied.push("[paymennt]");
    }
    let mut restart_needed = Vec::new();
    if fresh.ledger.path != settings.ledger.path {
        restart_needed.push("[ledger]");
    }
    if fresh.paymennt.concurrency != settings.paymennt.concurrency {
        restart_needed.push("paymennt.concurrency");
    }
    if fresh.hooks_concurrency != settings.hooks_concurrency {
        restart_needed.push("hooks_concurrency");
    }
    if fresh.reconcile.page_size != settings.reconcile.page_size {
        restart_needed.push("reconcile.page_size");
    }
    if format!("{:?}", fresh.discovery) != format!("{:?}", settings.discovery) {
        restart_needed.push("[discovery]");
    }
    // The listener keeps its connections and credentials; compare what it was built from.
    if listener_options_key(settings) != listener_options_key(&fresh)
        || settings.firestore.enabled != fresh.firestore.enabled
    {
        restart_needed.push("[firestore]");
    }
    if format!("{:?}", settings.http) != format!("{:?}", fresh.http) {
        restart_needed.push("[http]");
    }
    if !restart_needed.is_empty() {
        tracing::warn!(
            "config reload: changes to {} take effect only after a restart",
            restart_needed.join(", ")
        );
    }
    if applied.is_empty() && restart_needed.is_empty() {
        tracing::info!("config reloaded: nothing changed (secret and credential files re-read)");
    } else if !applied.is_empty() {
        tracing::info!(
            hooks = fresh.hooks.len(),
            reconcile_interval = ?fresh.reconcile.interval,
            level = %fresh.log.level,
            "config reloaded: {} changed",
            applied.join(", ")
        );
    }
    *settings = fresh;
}

/// What the listener was built from, comparable across reloads (credentials by file path).
fn listener_options_key(settings: &Settings) -> String {
    format!("{:?}", listener_options(settings).ok())
}

/// Takes an exclusive lock on `<ledger>.lock` for the daemon's lifetime (released when the
/// returned file is dropped or the process dies). CLI commands do not take it: they may run
/// beside the daemon.
fn lock_ledger(ledger: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut name = ledger.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(parent) = ledger.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory '{}'", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the daemon lock '{}'", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another paywatch daemon is already running on the ledger '{}' (it holds '{}')\n\nstop it first, or give this one its own [ledger] path",
            ledger.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock '{}'", path.display()))
        }
    }
}

/// Wakes the dispatcher whenever the verifier records a transition that queued hook deliveries.
async fn wake_dispatcher(
    mut deliveries_queued: watch::Receiver<u64>,
    dispatcher: DispatcherHandle,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = deliveries_queued.changed() => match changed {
                Ok(()) => dispatcher.wake(),
                Err(_) => return,
            },
        }
    }
}

/// How often changes that could not be noted (the ledger was busy) are noted again when no
/// new event comes.
const NOTE_RETRY: Duration = Duration::from_secs(1);

/// Turns the listener's events into nudges and persisted resume state, in order.
///
/// Each batch of changed checkouts is marked `needs_verify` in the ledger, in the write that
/// also issues their verifications' tickets, then nudged, all before any checkpoint of the
/// batch is saved: if the daemon dies after a token is saved but before the verification, the
/// reconciler's startup sweep still verifies them. (A verification that finished before the
/// mark is not undone by it: the mark applies only to checkouts last verified before the
/// change was seen.)
///
/// A checkout whose change could not be noted (the ledger busy or failing) keeps its own
/// retry: it is noted again with every later batch and every [`NOTE_RETRY`] until that works,
/// and until then no resume token of that checkout is saved (the token would let a restart
/// skip the change). Other checkouts' tokens are saved as usual.
async fn consume_listen_events(
    mut events: mpsc::Receiver<ListenEvent>,
    ledger: Ledger,
    nudges: mpsc::Sender<Nudge>,
    health: Health,
    cancel: CancellationToken,
    metrics: Metrics,
    auth_mode: &'static str,
) {
    let mut batch = Vec::with_capacity(512);
    let mut unnoted: HashSet<CheckoutId> = HashSet::new();
    let mut retry = tokio::time::interval(NOTE_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        batch.clear();
        tokio::select! {
            () = cancel.cancelled() => return,
            received = events.recv_many(&mut batch, 512) => if received == 0 { return },
            _ = retry.tick(), if !unnoted.is_empty() => {}
        }
        // Before any nudge of this batch goes out, one ledger write (no fsync) notes the
        // changes, with those that earlier notes failed to record, and issues the tickets of
        // the verifications they ask for: every checkpoint of this batch is saved after it.
        let changes: Vec<&Nudge> = batch
            .iter()
            .filter_map(|event| match event {
                ListenEvent::Changed(nudge) => Some(nudge),
                _ => None,
            })
            .collect();
        let mut noting: Vec<CheckoutId> = changes
            .iter()
            .map(|nudge| nudge.checkout_id.clone())
            .collect();
        noting.extend(unnoted.iter().cloned());
        let noted = if noting.is_empty() {
            None
        } else {
            let marker = ledger.clone();
            match blocking(move || marker.note_changes(&noting)).await {
                Ok(noted) => {
                    if !unnoted.is_empty() {
                        tracing::info!(
                            checkouts = unnoted.len(),
                            "pending verifications noted after an earlier failure"
                        );
                    }
                    unnoted.clear();
                    Some(noted)
                }
                Err(error) => {
                    unnoted.extend(changes.iter().map(|nudge| nudge.checkout_id.clone()));
                    tracing::error!(
                        checkouts = unnoted.len(),
                        "cannot note pending verifications; retrying every {}s, and their resume tokens are not saved until it works: {error:#}",
                        NOTE_RETRY.as_secs()
                    );
                    None
                }
            }
        };
        // Then the nudges, each with its ticket (without one, when the note failed, the
        // verifier takes one itself).
        for (index, nudge) in changes.into_iter().enumerate() {
            tracing::debug!(checkout = %nudge.checkout_id, changed_at = ?nudge.changed_at, "document changed");
            let nudge = Nudge {
                seen_after: noted.as_ref().map(|noted| noted.seen_after),
                ticket: noted
                    .as_ref()
                    .and_then(|noted| noted.tickets.get(index).copied()),
                ..nudge.clone()
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                sent = nudges.send(nudge) => if sent.is_err() { return },
            }
        }
        // The batch's checkpoints are saved together (a start-up's thousands of first
        // snapshots in a few writes, not one each), in order: before a token is forgotten,
        // and at the end of the batch.
        let mut checkpoints: Vec<ResumePoint> = Vec::new();
        for event in batch.drain(..) {
            health.note(&event);
            match event {
                ListenEvent::Changed(_) => {}
                ListenEvent::Checkpoint { tokens, read_time } => {
                    checkpoints.extend(
                        tokens
                            .into_iter()
                            .filter(|(id, _)| !unnoted.contains(id))
                            .map(|(checkout_id, token)| ResumePoint {
                                checkout_id,
                                token,
                                read_time,
                            }),
                    );
                }
                ListenEvent::ForgetToken(id) => {
                    save_checkpoints(&ledger, &mut checkpoints).await;
                    let forgetter = ledger.clone();
                    if let Err(error) = blocking(move || forgetter.forget_resume_token(&id)).await {
                        tracing::error!("cannot forget a resume token: {error:#}");
                    }
                }
                ListenEvent::TargetRefused {
                    checkout_id,
                    document,
                    code,
                    message,
                    refusals,
                    retry_in,
                } => {
                    let retry_text =
                        humantime::format_duration(Duration::from_secs(retry_in.as_secs()));
                    if refusals == 1 {
                        metrics.listen_target_refused();
                        let hint = crate::sources::firestore::access_hint(auth_mode, code);
                        tracing::warn!(checkout = %checkout_id, document = %document, code,
                            "Firestore refuses to watch this checkout's document: {code}: {message}; \
                             the other checkouts are unaffected, the reconciler still checks this one \
                             every interval, and paywatch asks Firestore again in {retry_text}. \
                             What to check: {hint}");
                    } else {
                        tracing::debug!(checkout = %checkout_id, code, refusals, "Firestore still refuses this checkout's document: {message}");
                    }
                    let next_retry_at = chrono::Duration::from_std(retry_in)
                        .ok()
                        .and_then(|delay| chrono::Utc::now().checked_add_signed(delay));
                    let noter = ledger.clone();
                    if let Err(error) = blocking(move || {
                        noter.note_listen_refusal(
                            &checkout_id,
                            code,
                            &message,
                            &document,
                            next_retry_at,
                        )
                    })
                    .await
                    {
                        tracing::error!("cannot note a Firestore refusal in the ledger: {error:#}");
                    }
                }
                ListenEvent::TargetRecovered { checkout_id } => {
                    tracing::info!(checkout = %checkout_id, "Firestore watches this checkout's document again");
                    let clearer = ledger.clone();
                    if let Err(error) =
                        blocking(move || clearer.clear_listen_refusal(&checkout_id)).await
                    {
                        tracing::error!(
                            "cannot clear a Firestore refusal in the ledger: {error:#}"
                        );
                    }
                }
                ListenEvent::PermanentFailure { project, message } => {
                    metrics.listen_project_refused(&project);
                    tracing::error!(project = %project, "Firestore refuses us: {message}");
                }
                ListenEvent::Connected {
                    project,
                    stream,
                    targets,
                } => {
                    tracing::info!(project = %project, stream, targets, "Firestore stream connected");
                }
                ListenEvent::Disconnected {
                    project,
                    stream,
                    reason,
                    retry_in,
                    planned,
                } => {
                    if planned {
                        // Normal operation (hourly with firebase-anonymous): not a warning.
                        tracing::info!(project = %project, stream, "Firestore stream reopened as planned: {reason}");
                    } else {
                        metrics.listen_reconnect(&project);
                        tracing::warn!(project = %project, stream, retry_in_ms = retry_in.as_millis() as u64, "Firestore stream disconnected: {reason}");
                    }
                }
            }
        }
        save_checkpoints(&ledger, &mut checkpoints).await;
    }
}

/// Saves (and empties) the resume tokens gathered from a batch's checkpoints, in one ledger
/// write. A failure is logged; the tokens are dropped (the next checkpoints carry newer ones,
/// and a restart without them only hears of changes again).
async fn save_checkpoints(ledger: &Ledger, checkpoints: &mut Vec<ResumePoint>) {
    if checkpoints.is_empty() {
        return;
    }
    let (saver, points) = (ledger.clone(), std::mem::take(checkpoints));
    if let Err(error) = blocking(move || saver.save_resume_points(&points)).await {
        tracing::error!("cannot save resume tokens: {error:#}");
    }
}

/// A checkout's location in the configured database (`[firestore] database`, validated when
/// the settings were loaded; paymennt's responses name no database).
fn in_database(location: FirestoreLocation, database: &str) -> FirestoreLocation {
    match location.clone().with_database(database) {
        Ok(located) => located,
        Err(error) => {
            tracing::error!("{error}; watching the (default) database instead");
            location
        }
    }
}

/// Where watched checkouts are listened to: the listener (none with `[firestore] enabled =
/// false`) and the database every checkout's location is put in (`[firestore] database`).
struct Listening {
    listener: Option<ListenerHandle>,
    database: String,
    /// Told when a checkout stops being watched (its refusal is no longer a problem).
    health: Health,
}

/// The checkouts the daemon watches, and where: compact, since there may be tens of thousands
/// (each document's collection is held once, see [`CollectionPaths`]).
#[derive(Default)]
struct Watched {
    documents: HashMap<CheckoutId, WatchedDocument>,
    paths: CollectionPaths,
}

impl Watched {
    /// Whether `id` is watched at `location`.
    fn is_watched_at(&self, id: &CheckoutId, location: &FirestoreLocation) -> bool {
        self.documents
            .get(id)
            .is_some_and(|document| document.is_at(location))
    }

    fn insert(&mut self, id: CheckoutId, location: &FirestoreLocation) {
        let document = self.paths.document(location);
        self.documents.insert(id, document);
    }

    fn len(&self) -> usize {
        self.documents.len()
    }
}

/// Keeps the listener's targets equal to the ledger's watched checkouts: new ones (tracked by
/// `paywatch track` in another process, or first seen by a verification) are added, finished
/// ones removed. Checkouts tracked through the HTTP track endpoint arrive on `newly_tracked`
/// and are watched at once, without waiting for the ledger poll. With Firestore off
/// (`listener` None) only the count is kept.
async fn sync_watch_set(
    ledger: Ledger,
    listening: Listening,
    mut watched: Watched,
    mut watch_set_changed: watch::Receiver<u64>,
    mut newly_tracked: mpsc::Receiver<NewlyTracked>,
    watched_count: Arc<std::sync::atomic::AtomicUsize>,
    cancel: CancellationToken,
) {
    let reader = ledger.clone();
    let mut last_version = blocking(move || reader.data_version()).await.unwrap_or(0);
    let mut poll = tokio::time::interval(WATCH_SYNC_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut newly_open = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = watch_set_changed.changed() => if changed.is_err() { return },
            tracked = newly_tracked.recv(), if newly_open => {
                let tracked = tracked.map(|tracked| NewlyTracked {
                    checkout_id: tracked.checkout_id,
                    location: in_database(tracked.location, &listening.database),
                });
                match tracked {
                    Some(tracked) if !watched.is_watched_at(&tracked.checkout_id, &tracked.location) => {
                        tracing::info!(checkout = %tracked.checkout_id, document = %tracked.location.document_name(), "now watching");
                        watched.insert(tracked.checkout_id.clone(), &tracked.location);
                        if let Some(listener) = &listening.listener {
                            listener.watch(WatchTarget {
                                checkout_id: tracked.checkout_id,
                                location: tracked.location,
                                resume_token: None,
                                resume_read_time: None,
                            });
                        }
                        watched_count.store(watched.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => newly_open = false,
                }
                continue;
            }
            _ = poll.tick() => {
                let reader = ledger.clone();
                match blocking(move || reader.data_version()).await {
                    Ok(version) if version != last_version => last_version = version,
                    Ok(_) => continue,
                    Err(error) => {
                        tracing::error!("cannot check the ledger for new checkouts: {error:#}");
                        continue;
                    }
                }
            }
        }
        let reader = ledger.clone();
        let entries = match blocking(move || reader.watch_set()).await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!("cannot read the watch set: {error:#}");
                continue;
            }
        };
        let mut desired: HashMap<CheckoutId, _> = entries
            .into_iter()
            .map(|entry| (entry.checkout_id.clone(), entry))
            .collect();
        let gone: Vec<CheckoutId> = watched
            .documents
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!(checkout = %id, "no longer watched");
            if let Some(listener) = &listening.listener {
                listener.unwatch(&id);
            }
            watched.documents.remove(&id);
            listening.health.forget_refusal(&id);
            // A refusal of a document no longer watched is no longer news for `status`.
            let clearer = ledger.clone();
            if let Err(error) = blocking(move || clearer.clear_listen_refusal(&id)).await {
                tracing::error!("cannot clear a Firestore refusal in the ledger: {error:#}");
            }
        }
        for (id, entry) in desired.drain() {
            let location = in_database(entry.location, &listening.database);
            if !watched.is_watched_at(&id, &location) {
                tracing::info!(checkout = %id, document = %location.document_name(), "now watching");
                watched.insert(id.clone(), &location);
                if let Some(listener) = &listening.listener {
                    listener.watch(WatchTarget {
                        checkout_id: id,
                        location,
                        resume_token: entry.resume_token,
                        resume_read_time: entry.resume_read_time,
                    });
                }
            }
        }
        watched_count.store(watched.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
