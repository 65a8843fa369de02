//! The Firestore listener: watches checkout documents over Firestore's gRPC `Listen` API.
//!
//! Owns: the Listen streams and their HTTP/2 connections (one pool per Firebase project, so
//! checkouts of several projects are watched at once), credentials (per `[firestore] auth`: a
//! service-account file or the Application Default Credentials, refreshed by google-cloud-auth;
//! none; or an anonymous Firebase Auth user, renewed by `firebase_auth.rs`, whose renewal
//! reopens the streams on the new token),
//! resume tokens in memory, reconnects with exponential backoff and jitter, and an idle watchdog
//! that reopens streams that went silent.
//!
//! Must never: decide a checkout's status, read a document's fields as a status, or (the
//! listener's streams) touch the ledger: only the journal and the watch set do, and never to
//! record a status. The listener only emits [`ListenEvent`]s on a channel: "verify this checkout"
//! ([`ListenEvent::Changed`]), "these resume tokens are safe to persist"
//! ([`ListenEvent::Checkpoint`]), "discard this token" ([`ListenEvent::ForgetToken`]),
//! "Firestore refuses this one document" ([`ListenEvent::TargetRefused`], retried with a long
//! backoff while the stream's other checkouts carry on; [`ListenEvent::TargetRecovered`]) and
//! health reports. Its journal (`journal.rs`) turns those events into notes, tickets, nudges
//! and persisted tokens; its watch set (`watch_set.rs`) keeps the listener's targets equal to
//! the ledger's watched checkouts and passes the tokens back in [`WatchTarget`].
//!
//! # Ordering
//! Events of one checkout come from one stream task and keep their order on the channel. A
//! [`ListenEvent::Checkpoint`] is sent only after every `Changed` it covers: persist its tokens
//! only once the earlier `Changed` nudges of those checkouts are safe (verified, or queued
//! durably). Tokens are offered only for targets that were CURRENT at a consistent snapshot
//! (the global `NO_CHANGE` with a read time), so a resumed stream can never skip a document's
//! initial state.
//!
//! # Stream modes
//! - [`StreamMode::Multiplexed`]: per project, streams of up to `targets_per_stream` targets
//!   (one `DocumentsTarget` per checkout, ids chosen here, never 0, reused only after REMOVE),
//!   added and removed on the live stream. A server that never acknowledges targets added to
//!   a live stream (the npm emulator reads only a stream's first request) is detected after
//!   `add_ack_timeout`: those targets move to fresh streams, and the project falls back to one
//!   target per stream (see `pool.rs`).
//! - [`StreamMode::PerDocument`]: one stream per checkout with target id 1, as the official
//!   server SDKs do; with emulators that read only the first request of a stream it avoids the
//!   `add_ack_timeout` wait of the multiplexed fallback.
//!
//! In both modes no HTTP/2 connection carries more than `streams_per_connection` streams:
//! Google's front end allows about 100 and tonic queues the next stream silently.
//!
//! The protocol is Google's `google.firestore.v1.Firestore/Listen` (its protos, and the official
//! server SDKs' watch code); `docs/firestore-interop.md`
//! for what the emulators do differently.

mod backoff;
mod connect;
#[cfg(test)]
mod fake;
mod firebase_auth;
mod journal;
mod listen;
mod pool;
mod probe;
mod shared;
mod state;
mod stream;
mod watch_set;

pub use connect::{FirestoreAuth, check_credentials};
pub use journal::{ListenObserver, consume_listen_events};
pub use listen::{DEFAULT_ENDPOINT, ListenEvent, ListenerOptions, WatchTarget};
pub use pool::{Listener, ListenerHandle};
pub use probe::{AccessFailure, AccessProof, access_hint, prove_access};
pub use watch_set::{Listening, NewlyTracked, Watched, sync_watch_set, watch_at_start};

pub use crate::settings::StreamMode;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_mode_config_spelling() {
        let modes: Vec<StreamMode> =
            serde_json::from_str(r#"["multiplexed", "per-document"]"#).expect("both spellings");
        assert_eq!(modes, [StreamMode::Multiplexed, StreamMode::PerDocument]);
        assert!(serde_json::from_str::<StreamMode>(r#""per_document""#).is_err());
    }
}
