//! The listener's vocabulary: what it is told ([`ListenerOptions`], the [`WatchTarget`]s) and
//! what it reports ([`ListenEvent`]). Shared by every part of the listener, its journal and the daemon.
//!
//! Owns: these types and their defaults.
//! Must never: do I/O.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::connect::FirestoreAuth;
use crate::domain::{CheckoutId, FirestoreLocation};
use crate::settings::StreamMode;
use crate::sources::Nudge;

/// What the listener needs to know to run. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// Where Firestore is: `https://firestore.googleapis.com`, or `http://127.0.0.1:PORT` for an
    /// emulator or the sandbox (plaintext is refused for anything but a loopback address).
    pub endpoint: String,
    /// How to authenticate.
    pub auth: FirestoreAuth,
    /// Extra CA certificates (PEM) trusted for the endpoint's TLS (`[firestore] ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// How checkouts are spread over streams.
    pub mode: StreamMode,
    /// Multiplexed mode: the most targets one stream carries.
    pub targets_per_stream: usize,
    /// The most Listen streams one HTTP/2 connection carries (Google's front end allows ~100).
    pub streams_per_connection: usize,
    /// A stream with no message for this long is reopened (production heartbeats every ~30 s).
    pub idle_timeout: Duration,
    /// Multiplexed mode: a target added to a stream whose `ADD` has not come after this long
    /// (while the server acknowledged another target on that stream, and the stream has been
    /// quiet this long too) is moved to a fresh stream;
    /// after a few such targets the project falls back to one target per stream. Production
    /// acknowledges within moments; the npm emulator never acknowledges a live add. At most
    /// half of `idle_timeout` is used.
    pub add_ack_timeout: Duration,
    /// The first reconnect delay after the immediate retry.
    pub backoff_initial: Duration,
    /// The longest reconnect delay; also the retry period of a project that failed permanently.
    pub backoff_max: Duration,
    /// The first delay before a document Firestore refused (a target `REMOVE` with a cause) is
    /// asked for again; doubles with each refusal in a row up to `refused_retry_max`.
    pub refused_retry_initial: Duration,
    /// The longest delay between two requests for a refused document.
    pub refused_retry_max: Duration,
    /// A target whose only news is a heartbeat token is checkpointed at most this often
    /// (changes are checkpointed at the next snapshot whatever this says).
    pub checkpoint_interval: Duration,
    /// Where streams are counted (open streams, the age of each stream's last message).
    pub metrics: crate::metrics::Metrics,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            auth: FirestoreAuth::ApplicationDefault,
            ca_file: None,
            mode: StreamMode::Multiplexed,
            targets_per_stream: 500,
            streams_per_connection: 100,
            idle_timeout: Duration::from_secs(120),
            add_ack_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            refused_retry_initial: Duration::from_secs(5 * 60),
            refused_retry_max: Duration::from_secs(60 * 60),
            checkpoint_interval: Duration::from_secs(300),
            metrics: crate::metrics::Metrics::disabled(),
        }
    }
}

/// The production Firestore endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://firestore.googleapis.com";

impl ListenerOptions {
    /// Options for a loopback emulator or sandbox: no credentials, short timers.
    pub fn local(endpoint: &str, mode: StreamMode) -> ListenerOptions {
        ListenerOptions {
            endpoint: endpoint.to_owned(),
            auth: FirestoreAuth::none(),
            mode,
            add_ack_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            refused_retry_initial: Duration::from_secs(2),
            refused_retry_max: Duration::from_secs(10),
            ..ListenerOptions::default()
        }
    }
}

/// A checkout to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchTarget {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// Its document (its project and database pick the connection pool).
    pub location: FirestoreLocation,
    /// The token from its last [`ListenEvent::Checkpoint`], if any: only changes after it are
    /// reported. Without one, the first snapshot is reported as a change.
    pub resume_token: Option<Vec<u8>>,
    /// The read time that token came with (its [`ListenEvent::Checkpoint`]'s): a document
    /// Firestore sends again with an update time not after it (a full resend, when the token
    /// is too old to resume from) was already reported and is not reported again.
    pub resume_read_time: Option<DateTime<Utc>>,
}

/// What the listener tells the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenEvent {
    /// Verify this checkout: a document change, delete or remove; the first snapshot of a target
    /// added without a token (even if the document is missing); a RESET; an existence-filter
    /// mismatch.
    Changed(Nudge),
    /// A consistent snapshot: these tokens may be persisted, once the `Changed` events sent
    /// before this one are handled. Only targets that were CURRENT on their stream are listed.
    Checkpoint {
        /// The token to resume each checkout with.
        tokens: Vec<(CheckoutId, Vec<u8>)>,
        /// The snapshot's read time.
        read_time: Option<DateTime<Utc>>,
    },
    /// Discard this checkout's persisted token (RESET, filter mismatch, token refused).
    ForgetToken(CheckoutId),
    /// Firestore refused to watch this one document (a `REMOVE` with a cause such as
    /// PERMISSION_DENIED or NOT_FOUND for its target); the stream and its other checkouts carry
    /// on. The listener asks again after `retry_in` (a long backoff, growing with each refusal);
    /// meanwhile only the reconciler notices its changes. Sent at every refusal.
    TargetRefused {
        /// The checkout.
        checkout_id: CheckoutId,
        /// The document's full resource name.
        document: String,
        /// The gRPC code name of the cause, e.g. `PERMISSION_DENIED`.
        code: &'static str,
        /// Firestore's message (printable).
        message: String,
        /// Refusals in a row (1 for the first: log that one, and any change of `code`).
        refusals: u32,
        /// When the listener asks again.
        retry_in: Duration,
    },
    /// A document refused earlier is watched again (its target became CURRENT).
    TargetRecovered {
        /// The checkout.
        checkout_id: CheckoutId,
    },
    /// A database refuses us (UNAUTHENTICATED, PERMISSION_DENIED, no database). Sent
    /// once per failure; the listener keeps retrying every `backoff_max` and sends
    /// [`ListenEvent::Connected`] when it recovers.
    PermanentFailure {
        /// The project id.
        project: String,
        /// What failed and what to check, for the operator.
        message: String,
    },
    /// A Listen stream opened.
    Connected {
        /// The project id.
        project: String,
        /// The stream's number (unique within this listener, for logs).
        stream: u64,
        /// How many checkouts it carries.
        targets: usize,
    },
    /// A Listen stream closed and will be reopened.
    Disconnected {
        /// The project id.
        project: String,
        /// The stream's number.
        stream: u64,
        /// Why it closed.
        reason: String,
        /// When it is reopened.
        retry_in: Duration,
        /// A planned reopen (renewed credentials), not a failure.
        planned: bool,
    },
}
