//! What the pool and its stream tasks share: the listener's context, a database's shared
//! flags, and the HTTP/2 connections.
//!
//! Owns: these types only. `pool.rs` creates them and starts stream tasks; `stream.rs` uses them.
//! Must never: import `pool.rs` or `stream.rs` (the dependency runs pool -> stream -> shared).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::connect::{Client, Connector};
use super::listen::{ListenEvent, ListenerOptions};

/// What every stream task of a listener needs.
pub(crate) struct Context {
    /// The listener's options.
    pub(crate) options: ListenerOptions,
    /// Opens connections with the credentials.
    pub(crate) connector: Connector,
    /// Where events go.
    pub(crate) events: mpsc::Sender<ListenEvent>,
    /// Stops everything.
    pub(crate) cancel: CancellationToken,
    /// Open Listen streams.
    pub(crate) open_streams: AtomicUsize,
    /// Permits to open a Listen call, [`OPENS_AT_ONCE`] of them.
    pub(crate) opening: Semaphore,
}

/// How many Listen calls a listener opens at once (connecting, and waiting for the call's
/// response headers).
///
/// Opening a call allocates much that lives only until it is answered. Opened all at once (a
/// per-document start-up: one call per checkout, 5,000 at once), those short-lived blocks sit
/// between the long-lived ones of every stream, and the allocator cannot give their room back:
/// 2 KiB per checkout stayed resident after such a start-up. A few at a time, each call's blocks
/// are reused by the next. A call is answered within a round trip, so 5,000 streams open in
/// 5,000 / 32 round trips; multiplexed mode opens one stream per `targets_per_stream` checkouts.
/// A change made while a stream waits for its turn is not lost: its first snapshot has it.
pub(crate) const OPENS_AT_ONCE: usize = 32;

/// Per-database state the stream tasks share.
pub(crate) struct DatabaseShared {
    /// The project id (for logs and events).
    pub(crate) project: String,
    /// `projects/{project}/databases/{database}`.
    pub(crate) database: String,
    /// A permanent failure was reported and not yet recovered from (report it once).
    pub(crate) failed: AtomicBool,
    /// Targets the server did not acknowledge since it last acknowledged a live add.
    pub(crate) unacknowledged_adds: AtomicUsize,
    /// The server ignores targets added to a live stream: one target per stream from now on.
    pub(crate) one_per_stream: AtomicBool,
}

impl DatabaseShared {
    /// Fresh state for the database `database` of `project`.
    pub(crate) fn new(project: &str, database: &str) -> DatabaseShared {
        DatabaseShared {
            project: project.to_owned(),
            database: database.to_owned(),
            failed: AtomicBool::new(false),
            unacknowledged_adds: AtomicUsize::new(0),
            one_per_stream: AtomicBool::new(false),
        }
    }

    /// The server acknowledged a target added to a live stream: it multiplexes.
    pub(crate) fn live_add_acknowledged(&self) {
        self.unacknowledged_adds.store(0, Ordering::SeqCst);
    }
}

/// One HTTP/2 connection of a database's pool.
pub(crate) struct Connection {
    /// Its number within the pool, for logs.
    pub(crate) index: usize,
    /// Stream tasks using it (counted when assigned, released when the task ends).
    pub(crate) streams: AtomicUsize,
    /// The client, connected on first use and then shared by its streams.
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Connection {
    /// A connection not yet connected, already counting one stream.
    pub(crate) fn new(index: usize) -> Connection {
        Connection {
            index,
            streams: AtomicUsize::new(1),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection's client for `database`, connecting first if needed.
    pub(crate) async fn client(
        &self,
        connector: &Connector,
        database: &str,
    ) -> anyhow::Result<Client> {
        let mut client = self.client.lock().await;
        if let Some(client) = client.as_ref() {
            return Ok(client.clone());
        }
        let fresh = connector.client(database).await?;
        *client = Some(fresh.clone());
        Ok(fresh)
    }
}
