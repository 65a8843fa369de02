//! The listener's handle: which checkout is on which stream, which stream on which connection.
//!
//! Per database (`projects/{p}/databases/{d}`) a pool of connections and streams. A new
//! checkout goes to the first stream of its database with room (`targets_per_stream`, or 1 in per-document mode); if none
//! has room a stream task is started on the first connection with fewer than
//! `streams_per_connection` streams, or on a new connection. A stream whose last checkout is
//! unwatched is closed, so its slot on the connection frees up.
//!
//! Multiplexed mode with a server that ignores targets added to a live stream (the npm
//! emulator): a stream hands back the targets the server never acknowledged
//! ([`Shared::relocate`]); they go to fresh streams, where they are in the first request. After
//! [`UNACKED_ADDS_BEFORE_ONE_PER_STREAM`] such targets with no live add acknowledged in between,
//! the project is watched with one target per stream (warned once). A server that acknowledges
//! live adds (production) never triggers any of this.
//!
//! The bookkeeping sits behind a std `Mutex` held only for short, await-free sections, so
//! [`ListenerHandle::watch`] and [`ListenerHandle::unwatch`] are plain functions.
//!
//! Dependencies run one way: this module starts stream tasks (`stream.rs`), which know nothing
//! of it; a stream hands targets back through the [`Relocate`] callback it was given. The types
//! both use live in `shared.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connect::Connector;
use super::listen::{ListenEvent, ListenerOptions, WatchTarget};
use super::shared::{Connection, Context, DatabaseShared, OPENS_AT_ONCE};
use super::stream::{Relocate, StreamCommand, StreamTask, command_channel};
use crate::domain::{CheckoutId, CollectionPaths, WatchedDocument};
use crate::settings::StreamMode;

/// The Firestore listener. See the module documentation of [`crate::sources::firestore`].
pub struct Listener;

impl Listener {
    /// Validates the options, loads the credentials and returns a handle with nothing watched.
    /// Streams open as checkouts are watched. Must be called inside a Tokio runtime.
    ///
    /// Events go to `events`; when its receiver is dropped the streams stop. `cancel` stops
    /// everything; then await [`ListenerHandle::closed`].
    ///
    /// # Errors
    /// A bad endpoint (plaintext to a non-loopback host), an unreadable or invalid
    /// service-account file, unusable Application Default Credentials, or zero limits.
    pub fn start(
        options: ListenerOptions,
        events: mpsc::Sender<ListenEvent>,
        cancel: CancellationToken,
    ) -> anyhow::Result<ListenerHandle> {
        if options.targets_per_stream == 0 || options.streams_per_connection == 0 {
            anyhow::bail!("targets_per_stream and streams_per_connection must be at least 1");
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            anyhow::anyhow!("the Firestore listener must be started inside a Tokio runtime")
        })?;
        let connector =
            Connector::new(&options.endpoint, &options.auth, options.ca_file.as_deref())?;
        tracing::info!(endpoint = %connector.endpoint(), mode = ?options.mode, "firestore listener started");
        Ok(ListenerHandle {
            shared: Arc::new(Shared {
                context: Arc::new(Context {
                    options,
                    connector,
                    events,
                    cancel,
                    open_streams: AtomicUsize::new(0),
                    opening: Semaphore::new(OPENS_AT_ONCE),
                }),
                tracker: TaskTracker::new(),
                failure: tokio::sync::watch::Sender::new(None),
                runtime,
                registry: Mutex::new(Registry::default()),
            }),
        })
    }
}

/// Controls a running listener: watch and unwatch checkouts, read counters, wait for the end.
#[derive(Clone)]
pub struct ListenerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ListenerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerHandle")
            .field("endpoint", &self.shared.context.connector.endpoint())
            .field("watched", &self.watched())
            .field("open_streams", &self.open_streams())
            .finish()
    }
}

impl ListenerHandle {
    /// Starts watching a checkout's document. Watching a checkout again at the same location
    /// does nothing; at another location it moves. Ignored after cancellation.
    pub fn watch(&self, target: WatchTarget) {
        let shared = &self.shared;
        if shared.context.cancel.is_cancelled() {
            return;
        }
        let mut registry = shared.registry();
        if let Some(placement) = registry.checkouts.get(&target.checkout_id) {
            if placement.document.is_at(&target.location) {
                return;
            }
            registry.unwatch(&target.checkout_id);
        }
        shared.place(&mut registry, target, None);
    }

    /// Stops watching a checkout (e.g. it reached a final state). Unknown ids are ignored.
    pub fn unwatch(&self, checkout_id: &CheckoutId) {
        self.shared.registry().unwatch(checkout_id);
    }

    /// How many checkouts are watched.
    pub fn watched(&self) -> usize {
        self.shared.registry().checkouts.len()
    }

    /// How many Listen streams are open right now.
    pub fn open_streams(&self) -> usize {
        self.shared.context.open_streams.load(Ordering::SeqCst)
    }

    /// The stream tasks that exist now, as (project, stream number): open, opening or waiting
    /// to reconnect. A stream whose last checkout was unwatched is gone from this list.
    pub fn streams(&self) -> Vec<(String, u64)> {
        self.shared
            .registry()
            .projects
            .values()
            .flat_map(|pool| {
                let project = &pool.shared.project;
                pool.streams.keys().map(move |key| (project.clone(), *key))
            })
            .collect()
    }

    /// How many HTTP/2 connections the pools hold (for tests and the status line).
    pub fn connections(&self) -> usize {
        self.shared
            .registry()
            .projects
            .values()
            .map(|p| p.connections.len())
            .sum()
    }

    /// Waits until a stream task panics, and says how (its checkouts are then no longer
    /// watched, so the daemon must stop and be restarted). Pending for ever otherwise.
    pub async fn failed(&self) -> String {
        let mut failure = self.shared.failure.subscribe();
        let text = failure
            .wait_for(Option::is_some)
            .await
            .map(|text| text.clone().unwrap_or_default());
        match text {
            Ok(text) => text,
            // The sender lives as long as the listener: never, in practice.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until every stream task has ended. Call after cancelling the token given to
    /// [`Listener::start`]; without that this waits for ever.
    pub async fn closed(self) {
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

/// The pool's state: the stream tasks' context, and which checkout is on which stream.
struct Shared {
    /// What the stream tasks share.
    context: Arc<Context>,
    /// The stream tasks.
    tracker: TaskTracker,
    /// Set when a stream task panicked (see [`ListenerHandle::failed`]).
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// Where stream tasks are spawned (watch may be called outside a runtime context).
    runtime: tokio::runtime::Handle,
    /// Which checkout is where.
    registry: Mutex<Registry>,
}

impl Shared {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The sections under the lock cannot leave the registry half-updated in a way that
        // matters more than stopping the daemon would.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a checkout on a stream of its project with room, or on a new stream.
    ///
    /// `fresh`: only streams in this set may take it (new ones are added to it), so relocated
    /// targets never land on a stream that is already open.
    fn place(
        self: &Arc<Self>,
        registry: &mut Registry,
        target: WatchTarget,
        mut fresh: Option<&mut HashSet<u64>>,
    ) {
        let database = target.location.database_name();
        let next_key = registry.next_stream;
        let options = &self.context.options;
        let pool = registry
            .projects
            .entry(database.clone())
            .or_insert_with(|| DatabasePool::new(&target.location.project, &database));
        let capacity = match options.mode {
            StreamMode::Multiplexed if !pool.shared.one_per_stream.load(Ordering::SeqCst) => {
                options.targets_per_stream
            }
            StreamMode::Multiplexed | StreamMode::PerDocument => 1,
        };
        let existing = pool
            .streams
            .iter()
            .find(|(key, slot)| {
                slot.targets < capacity && fresh.as_ref().is_none_or(|set| set.contains(key))
            })
            .map(|(key, _)| *key);
        let key = match existing {
            Some(key) => key,
            None => {
                let connection = pool.connection(options.streams_per_connection);
                let (commands, receiver) = command_channel();
                let pool_shared = Arc::clone(self);
                let relocate: Relocate = Arc::new(move |database, from, targets| {
                    pool_shared.relocate(database, from, targets);
                });
                let task = StreamTask {
                    context: Arc::clone(&self.context),
                    database: Arc::clone(&pool.shared),
                    connection,
                    key: next_key,
                    commands: receiver,
                    relocate,
                };
                let shared = Arc::clone(self);
                let project = target.location.project.clone();
                self.tracker.spawn_on(
                    async move {
                        use futures::FutureExt;
                        let run = std::panic::AssertUnwindSafe(task.run()).catch_unwind();
                        if let Err(panic) = run.await {
                            let text = panic
                                .downcast_ref::<&str>()
                                .map(|text| (*text).to_owned())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a non-text panic".to_owned());
                            shared.failure.send_replace(Some(format!(
                                "a Listen stream task of project {project} panicked: {text}"
                            )));
                        }
                    },
                    &self.runtime,
                );
                pool.streams.insert(
                    next_key,
                    StreamSlot {
                        commands,
                        targets: 0,
                    },
                );
                registry.next_stream += 1;
                if let Some(set) = fresh.as_mut() {
                    set.insert(next_key);
                }
                next_key
            }
        };
        let Some(pool) = registry.projects.get_mut(&database) else {
            return;
        };
        let Some(slot) = pool.streams.get_mut(&key) else {
            return;
        };
        slot.targets += 1;
        let checkout_id = target.checkout_id.clone();
        let document = registry.paths.document(&target.location);
        // The task lives until Close or cancellation; a failed send means it is gone already.
        let _ = slot
            .commands
            .unbounded_send(StreamCommand::Add(Box::new((target, document.clone()))));
        registry.checkouts.insert(
            checkout_id,
            Placement {
                document,
                stream: key,
            },
        );
    }

    /// Stream `from` took these targets off because the server never acknowledged them: watch
    /// each on a fresh stream. Counts them against the project; from
    /// [`UNACKED_ADDS_BEFORE_ONE_PER_STREAM`] on (with no live add acknowledged in between) the
    /// project gets one target per stream for the rest of the run, since its server evidently
    /// ignores targets added to a live stream.
    ///
    /// A checkout unwatched (or moved) meanwhile is left alone. A checkout unwatched and watched
    /// again in the instant between the stream taking it off and this call may end up watched
    /// on two streams until `from` closes: extra nudges, never a missed change.
    fn relocate(self: &Arc<Self>, database: &str, from: u64, targets: Vec<WatchTarget>) {
        if self.context.cancel.is_cancelled() {
            return;
        }
        let mut registry = self.registry();
        let targets: Vec<WatchTarget> = targets
            .into_iter()
            .filter(|t| {
                registry
                    .checkouts
                    .get(&t.checkout_id)
                    .is_some_and(|p| p.stream == from && p.document.is_at(&t.location))
            })
            .collect();
        let Some(pool) = registry.projects.get_mut(database) else {
            return;
        };
        if targets.is_empty() {
            return;
        }
        let strikes = pool
            .shared
            .unacknowledged_adds
            .fetch_add(targets.len(), Ordering::SeqCst)
            + targets.len();
        if strikes >= UNACKED_ADDS_BEFORE_ONE_PER_STREAM
            && !pool.shared.one_per_stream.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(database = %database, unacknowledged = strikes,
                "the Firestore server ignores targets added to a live stream; falling back to one \
                 target per stream for {database} (an emulator that reads only the first \
                 request of a stream does this; stream_mode = \"per-document\" avoids the wait)");
        }
        for target in &targets {
            registry.checkouts.remove(&target.checkout_id);
        }
        if let Some(pool) = registry.projects.get_mut(database)
            && let Some(slot) = pool.streams.get_mut(&from)
        {
            slot.targets = slot.targets.saturating_sub(targets.len());
            if slot.targets == 0 {
                let _ = slot.commands.unbounded_send(StreamCommand::Close);
                pool.streams.remove(&from);
            }
        }
        let mut fresh = HashSet::new();
        for target in targets {
            self.place(&mut registry, target, Some(&mut fresh));
        }
    }
}

/// Unacknowledged live adds (in a row, per project) after which a multiplexed project falls back
/// to one target per stream.
pub(crate) const UNACKED_ADDS_BEFORE_ONE_PER_STREAM: usize = 3;

#[derive(Default)]
struct Registry {
    /// Pools by database (`projects/{p}/databases/{d}`).
    projects: HashMap<String, DatabasePool>,
    /// Where each watched checkout is.
    checkouts: HashMap<CheckoutId, Placement>,
    /// The collections of the watched documents, each held once.
    paths: CollectionPaths,
    /// The next stream number.
    next_stream: u64,
}

impl Registry {
    fn unwatch(&mut self, checkout_id: &CheckoutId) {
        let Some(placement) = self.checkouts.remove(checkout_id) else {
            return;
        };
        let Some(pool) = self.projects.get_mut(placement.document.database_name()) else {
            return;
        };
        let Some(slot) = pool.streams.get_mut(&placement.stream) else {
            return;
        };
        slot.targets = slot.targets.saturating_sub(1);
        if slot.targets == 0 {
            let _ = slot.commands.unbounded_send(StreamCommand::Close);
            pool.streams.remove(&placement.stream);
        } else {
            let _ = slot
                .commands
                .unbounded_send(StreamCommand::Remove(checkout_id.clone()));
        }
    }
}

struct Placement {
    /// The document watched.
    document: WatchedDocument,
    /// The stream carrying it.
    stream: u64,
}

struct DatabasePool {
    shared: Arc<DatabaseShared>,
    connections: Vec<Arc<Connection>>,
    /// Open stream tasks by number (ordered, so new targets fill the oldest streams first).
    streams: BTreeMap<u64, StreamSlot>,
}

impl DatabasePool {
    fn new(project: &str, database: &str) -> DatabasePool {
        DatabasePool {
            shared: Arc::new(DatabaseShared::new(project, database)),
            connections: Vec::new(),
            streams: BTreeMap::new(),
        }
    }

    /// A connection with room for one more stream, counted for it.
    fn connection(&mut self, limit: usize) -> Arc<Connection> {
        for connection in &self.connections {
            let taken = connection
                .streams
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < limit).then_some(n + 1)
                });
            if taken.is_ok() {
                return Arc::clone(connection);
            }
        }
        let connection = Arc::new(Connection::new(self.connections.len()));
        tracing::debug!(database = %self.shared.database, connection = connection.index, "new firestore connection");
        self.connections.push(Arc::clone(&connection));
        connection
    }
}

struct StreamSlot {
    /// Commands to the stream task.
    commands: futures::channel::mpsc::UnboundedSender<StreamCommand>,
    /// Checkouts assigned to it.
    targets: usize,
}
