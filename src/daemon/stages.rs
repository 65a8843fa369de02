//! Starting the pipeline's stages and stopping them again: what [`super::run`] calls, step
//! by step.
//!
//! Owns: opening the ledger, starting the Firestore listener and the Firestore source's tasks
//! (its journal, its watch set), the HTTP listener, the reconciler and discovery under the
//! supervisor, the systemd watchdog, and the drain that stops them in order within its deadline.
//! Must never: decide what runs when (the order is [`super::run`]'s), or let the drain outlast
//! its deadline (what is left then is stopped, and redone at the next start).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::lease::LeaseKeeper;
use super::notify;
use super::reload::listener_options;
use super::supervisor;
use crate::domain::VerifyTicket;
use crate::http::health::Health;
use crate::http::{HttpContext, NewlyTracked};
use crate::ledger::Ledger;
use crate::ledger::postgres::{PgStore, Session};
use crate::metrics::Metrics;
use crate::paymennt::Client;
use crate::settings::Settings;
use crate::sources::Nudge;
use crate::sources::discovery::DiscoveryConfig;
use crate::sources::firestore::{
    ListenEvent, Listener, ListenerHandle, ListenerOptions, Listening, Watched,
    consume_listen_events, sync_watch_set,
};

/// The ledger as the daemon opened it.
pub(super) struct OpenedLedger {
    /// The ledger every stage records into.
    pub(super) ledger: Ledger,
    /// An SQLite ledger's daemon lock (held for the daemon's lifetime).
    pub(super) _lock: Option<std::fs::File>,
    /// A PostgreSQL ledger's lease keeper: the daemon acts only while it holds the lease.
    pub(super) lease: Option<LeaseKeeper>,
}

/// Opens the ledger: an SQLite file held by this daemon alone (two would run each other's
/// hooks twice; the lock comes first, so a second daemon never migrates a ledger another one
/// is using), or a PostgreSQL ledger shared with standbys, whose writes are fenced by the
/// lease this daemon's keeper holds (see [`super::standby`]).
///
/// # Errors
///
/// The ledger cannot be opened: a setting to fix is a [`crate::settings::SettingsError`] (exit
/// 2, naming the key); a database that cannot be reached exit 1, naming where it is.
pub(super) async fn open_ledger(settings: &Settings) -> anyhow::Result<OpenedLedger> {
    if settings.ledger.url.is_none() {
        let lock = super::process::lock_ledger(&settings.ledger.path)?;
        return Ok(OpenedLedger {
            ledger: Ledger::open(&settings.ledger.path).await?,
            _lock: Some(lock),
            lease: None,
        });
    }
    // A daemon's transaction left idle this long is ended by the server, so a paused daemon
    // cannot hold off the next election past half a lease.
    let session = Session::Daemon {
        idle_limit: (settings.ha.lease / 2).max(Duration::from_secs(1)),
    };
    let store = PgStore::open(&settings.ledger, session)
        .await
        .map_err(crate::ledger::postgres::PgError::into_exit_error)?;
    let lease = LeaseKeeper::start(&store, settings);
    let ledger = Ledger::postgres(store.with_role(lease.role()));
    Ok(OpenedLedger {
        ledger,
        _lock: None,
        lease: Some(lease),
    })
}

/// What the stages are started with: the settings, the ledger, the figures, the supervisor
/// their tasks run under, and the token that stops the sources in the drain.
pub(super) struct Wiring<'a> {
    pub(super) settings: &'a Settings,
    pub(super) ledger: &'a Ledger,
    pub(super) metrics: &'a Metrics,
    pub(super) supervisor: &'a supervisor::Supervisor,
    pub(super) sources: &'a CancellationToken,
}

/// The Firestore listener as started.
pub(super) struct Firestore {
    /// The listener (None with `[firestore] enabled = false`).
    pub(super) listener: Option<ListenerHandle>,
    /// With Firestore off, the events' sender: kept open (never sent on) so the supervised
    /// event task runs until shutdown.
    pub(super) idle_events: Option<mpsc::Sender<ListenEvent>>,
    /// Where Firestore is, for the start-up line (`off` when turned off).
    pub(super) endpoint: String,
}

/// Starts the Firestore listener (unless turned off), sending its events on the returned
/// receiver.
pub(super) fn start_firestore(
    settings: &Settings,
    metrics: &Metrics,
    sources: &CancellationToken,
) -> anyhow::Result<(Firestore, mpsc::Receiver<ListenEvent>)> {
    let (listen_events, listen_receiver) = mpsc::channel::<ListenEvent>(4096);
    // With Firestore off its options are not even built: no Firestore credentials are needed.
    let firestore_options = if settings.firestore.enabled {
        Some(ListenerOptions {
            metrics: metrics.clone(),
            ..listener_options(settings)?
        })
    } else {
        None
    };
    let endpoint = firestore_options
        .as_ref()
        .map_or_else(|| "off".to_owned(), |found| found.endpoint.clone());
    let mut idle_events = None;
    let listener = if let Some(found) = firestore_options {
        Some(
            Listener::start(found, listen_events, sources.child_token())
                .context("starting the Firestore listener")?,
        )
    } else {
        idle_events = Some(listen_events);
        tracing::warn!(
            "[firestore] enabled = false: changes arrive only through webhooks ([http]) and the reconciler every {:?}",
            settings.reconcile.interval
        );
        None
    };
    let firestore = Firestore {
        listener,
        idle_events,
        endpoint,
    };
    Ok((firestore, listen_receiver))
}

/// What the watch-set sync starts from.
pub(super) struct Listened {
    /// `[firestore] database`.
    pub(super) database: String,
    /// The checkouts watched at start.
    pub(super) watched: Watched,
    /// Bumped when the verifier, the reconciler or discovery changed the watch set.
    pub(super) watch_set_changed: watch::Receiver<u64>,
}

/// Spawns the Firestore source's tasks: its journal (events into notes, tickets and nudges),
/// the listener's failure watch, and the watch-set sync. Returns the count of watched
/// checkouts and where the HTTP track endpoint sends the checkouts it tracks.
pub(super) fn spawn_firestore_tasks(
    wiring: &Wiring<'_>,
    tasks: &mut JoinSet<()>,
    firestore: &Firestore,
    listen_receiver: mpsc::Receiver<ListenEvent>,
    health: &Health,
    nudges: &mpsc::Sender<Nudge>,
    listened: Listened,
) -> (Arc<AtomicUsize>, mpsc::Sender<NewlyTracked>) {
    let Wiring {
        settings,
        ledger,
        metrics,
        supervisor,
        sources,
    } = wiring;
    tasks.spawn(supervisor.supervise(
        "listener events",
        consume_listen_events(
            listen_receiver,
            (*ledger).clone(),
            nudges.clone(),
            health.clone(),
            (*sources).clone(),
            (*metrics).clone(),
            settings.firestore.auth_mode().as_str(),
        ),
    ));
    if let Some(listener) = &firestore.listener {
        tasks.spawn(watch_listener(
            listener.clone(),
            supervisor.reporter(),
            (*sources).clone(),
        ));
    }
    let watched_count = Arc::new(AtomicUsize::new(listened.watched.count()));
    let (newly_tracked, newly_tracked_receiver) = mpsc::channel::<NewlyTracked>(256);
    tasks.spawn(supervisor.supervise(
        "watch-set sync",
        sync_watch_set(
            (*ledger).clone(),
            Listening {
                listener: firestore.listener.clone(),
                database: listened.database,
                health: health.clone(),
            },
            listened.watched,
            listened.watch_set_changed,
            newly_tracked_receiver,
            watched_count.clone(),
            (*sources).clone(),
        ),
    ));
    (watched_count, newly_tracked)
}

/// Binds the HTTP listener at `addr`, publishes its address, and serves `context` until `stop`.
pub(super) async fn serve_http(
    wiring: &Wiring<'_>,
    addr: std::net::SocketAddr,
    context: HttpContext,
    publish: Option<&watch::Sender<Option<std::net::SocketAddr>>>,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let settings = wiring.settings;
    let bound = crate::http::bind(addr).await?;
    let local = bound.local_addr().context("the HTTP listener's address")?;
    tracing::info!(
        listen = %local,
        track_endpoint = context.track.is_some(),
        webhook_signatures = context.intake.checks_signatures(),
        "HTTP listener on {local}"
    );
    if let Some(sender) = publish {
        sender.send_replace(Some(local));
    }
    let limits = crate::http::ServeLimits::new(
        &settings.http,
        crate::http::HTTP_DRAIN.min(settings.daemon.drain_timeout),
    );
    Ok(tokio::spawn(wiring.supervisor.supervise(
        "HTTP listener",
        crate::http::serve(bound, Arc::new(context), limits, stop.clone()),
    )))
}

/// Spawns the reconciler: at start for checkouts that need it, then every interval.
pub(super) fn spawn_reconciler(
    wiring: &Wiring<'_>,
    tasks: &mut JoinSet<()>,
    client: watch::Receiver<Client>,
    sweeps: mpsc::Sender<Nudge>,
    interval: watch::Receiver<Duration>,
    watch_set_changed: watch::Sender<u64>,
    counter_at_start: VerifyTicket,
) {
    let settings = wiring.settings;
    tasks.spawn(wiring.supervisor.supervise(
        "reconciler",
        crate::sources::reconcile::run(
            wiring.ledger.clone(),
            client,
            sweeps,
            interval,
            settings.reconcile.page_size,
            watch_set_changed,
            crate::sources::reconcile::StartupSweep {
                counter_at_start,
                snapshot_grace: if settings.firestore.enabled {
                    settings.reconcile.startup_grace
                } else {
                    Duration::ZERO
                },
            },
            wiring.sources.clone(),
            wiring.metrics.clone(),
        ),
    ));
}

/// Spawns discovery, which tracks checkouts created anywhere.
pub(super) fn spawn_discovery(
    wiring: &Wiring<'_>,
    tasks: &mut JoinSet<()>,
    client: watch::Receiver<Client>,
    sweeps: mpsc::Sender<Nudge>,
    watch_set_changed: watch::Sender<u64>,
    wake: Arc<tokio::sync::Notify>,
) {
    let settings = wiring.settings;
    tasks.spawn(wiring.supervisor.supervise(
        "discovery",
        crate::sources::discovery::run(
            wiring.ledger.clone(),
            client,
            DiscoveryConfig {
                types: settings.discovery.types.clone(),
                interval: settings.discovery.interval,
                lookback: settings.discovery.lookback,
                overlap: settings.discovery.overlap,
                page_size: settings.discovery.page_size,
            },
            sweeps,
            watch_set_changed,
            wake,
            wiring.sources.clone(),
        ),
    ));
}

/// Starts the systemd watchdog's pings; returns the token that stops them and their task.
///
/// With `check_ledger`, a ping also needs the ledger to answer (an SQLite ledger's thread is
/// what can wedge the process). Not on PostgreSQL: a database away is an outage the lease
/// keeper handles (the daemon stands by and takes the lease again when it answers), not a
/// wedged process for systemd to kill.
pub(super) fn start_watchdog(
    ledger: &Ledger,
    notifier: &notify::Notifier,
    supervisor: &supervisor::Supervisor,
    check_ledger: bool,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
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
            async move { healthy() && (!check_ledger || ledger.data_version().await.is_ok()) }
        },
        watchdog_cancel.clone(),
    );
    // Without a systemd watchdog the loop returns at once, which is no failure.
    let watchdog = if notifier.watchdog_interval().is_some() {
        tokio::spawn(supervisor.supervise("watchdog", watchdog_loop))
    } else {
        tokio::spawn(watchdog_loop)
    };
    (watchdog_cancel, watchdog)
}

/// The running pipeline's tasks and the tokens that stop them, in the order the drain does.
pub(super) struct Running {
    pub(super) http_stop: CancellationToken,
    pub(super) http_task: Option<tokio::task::JoinHandle<()>>,
    pub(super) sources: CancellationToken,
    pub(super) tasks: JoinSet<()>,
    pub(super) verifier_task: tokio::task::JoinHandle<()>,
    pub(super) verifier_abort: CancellationToken,
    pub(super) dispatcher_stop: CancellationToken,
    pub(super) dispatcher_kill: CancellationToken,
    pub(super) dispatcher_task: tokio::task::JoinHandle<()>,
    pub(super) firestore: Firestore,
    pub(super) watchdog_cancel: CancellationToken,
    pub(super) watchdog: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops taking new work, lets verifications and running hooks finish until `deadline`,
    /// then stops what is left.
    pub(super) async fn drain(self, deadline: tokio::time::Instant) {
        let Running {
            http_stop,
            http_task,
            sources,
            mut tasks,
            mut verifier_task,
            verifier_abort,
            dispatcher_stop,
            dispatcher_kill,
            mut dispatcher_task,
            firestore,
            watchdog_cancel,
            watchdog,
        } = self;
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
        if let Some(listener) = firestore.listener {
            listener.closed().await;
        }
        drop(firestore.idle_events);
        // Last: systemd enforces the watchdog until the process exits.
        watchdog_cancel.cancel();
        let _ = watchdog.await;
    }
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
