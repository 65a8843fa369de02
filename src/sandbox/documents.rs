//! The built-in Firestore's documents: a versioned in-memory store that Listen streams follow.
//!
//! Owns: every document the built-in Listen server serves, the commit sequence (one number per
//! write, the basis of resume tokens), commit times, the recent-commit log, and which Listen
//! streams watch each document (a commit wakes only those).
//! Must never: know about checkouts or statuses (it stores whatever fields the state writes), or
//! hold its lock across an await.
//!
//! # Resume tokens
//!
//! A token is 25 opaque bytes: `b"PWSB"`, a format version (2), this store's random epoch
//! (u32, big-endian), a commit sequence number (u64, big-endian) and when the token was issued
//! (µs since the Unix epoch, i64, big-endian; the Listen server can make old tokens expire).
//! The sequence means "every
//! commit up to and including this one has been delivered". A token is valid on any stream of the
//! same sandbox; a token from another sandbox run (another epoch), from the future, or of another
//! shape is refused (the Listen server answers INVALID_ARGUMENT, as the `firestore` crate expects
//! for a stale token).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use gcloud_sdk::google::firestore::v1::{Document, Value};
use prost_types::Timestamp;
use tokio::sync::Notify;

use crate::domain::FirestoreLocation;
use crate::sandbox::sink::DocumentSink;

/// How many recent commits are remembered by sequence; a stream further behind rescans its
/// documents instead (still correct, only slower).
const COMMIT_LOG_CAPACITY: usize = 65_536;

/// The magic prefix of a resume token.
const TOKEN_MAGIC: &[u8; 4] = b"PWSB";
/// The resume token format version.
const TOKEN_VERSION: u8 = 2;
/// The length of a resume token in bytes.
const TOKEN_LEN: usize = 4 + 1 + 4 + 8 + 8;

/// The documents of the built-in Firestore, shared by the state (which writes) and the Listen
/// server (which reads).
pub struct DocumentStore {
    /// Random per store, so tokens from another sandbox run are recognised and refused.
    epoch: u32,
    /// Documents, tombstones and the commit log. A std mutex: every critical section is a few map
    /// operations with no await, and the Listen streams take it only to copy out what changed.
    inner: Mutex<StoreInner>,
}

struct StoreInner {
    /// The sequence of the last commit (0 = nothing committed yet).
    seq: u64,
    /// The latest time handed out, as a commit time or a read time, in µs since the epoch.
    /// Commit times are strictly after it, so a read time once given stays valid.
    last_micros: i64,
    /// Every document ever written, by full name; deleted ones are kept as tombstones.
    docs: HashMap<String, DocEntry>,
    /// `(seq, name)` of recent commits, oldest first.
    log: VecDeque<(u64, String)>,
    /// Document name → the Listen streams watching it, each woken by a commit of it (as a
    /// server wakes only the listeners of what changed, not every stream).
    interest: HashMap<String, Vec<(u64, Arc<Notify>)>>,
}

/// One document name's latest state.
#[derive(Debug, Clone)]
pub(crate) struct DocEntry {
    /// The document, or `None` once deleted.
    pub(crate) document: Option<Document>,
    /// The commit that last changed it.
    pub(crate) changed_seq: u64,
    /// That commit's time, µs since the Unix epoch.
    pub(crate) changed_micros: i64,
}

/// A point from which a resumed target wants changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResumePoint {
    /// After this commit sequence (from a resume token).
    Seq(u64),
    /// After this time, µs since the Unix epoch (from a `read_time`).
    Micros(i64),
}

impl DocEntry {
    /// Whether this entry changed after `point`.
    pub(crate) fn changed_after(&self, point: ResumePoint) -> bool {
        match point {
            ResumePoint::Seq(seq) => self.changed_seq > seq,
            ResumePoint::Micros(micros) => self.changed_micros > micros,
        }
    }
}

/// Why a resume token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    /// Not a token this sandbox writes.
    #[error("the resume token is not one this sandbox issued (wrong length or format)")]
    Malformed,
    /// Issued by another sandbox run.
    #[error("the resume token was issued by another sandbox run")]
    OtherEpoch,
    /// Names a commit that has not happened.
    #[error("the resume token names commit {0}, which has not happened yet")]
    Future(u64),
}

impl Default for DocumentStore {
    fn default() -> Self {
        DocumentStore::new()
    }
}

impl DocumentStore {
    /// An empty store with a fresh epoch.
    pub fn new() -> DocumentStore {
        DocumentStore {
            epoch: rand::random(),
            inner: Mutex::new(StoreInner {
                seq: 0,
                last_micros: 0,
                docs: HashMap::new(),
                log: VecDeque::new(),
                interest: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StoreInner> {
        // Poisoning means a panic mid-update elsewhere; the maps are still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The document named `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Document> {
        self.lock()
            .docs
            .get(name)
            .and_then(|entry| entry.document.clone())
    }

    /// Number of documents that exist now.
    pub fn len(&self) -> usize {
        self.lock()
            .docs
            .values()
            .filter(|entry| entry.document.is_some())
            .count()
    }

    /// Whether no document exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Creates or replaces `name` with `fields`; returns the commit sequence.
    pub fn put_document(&self, name: &str, fields: &BTreeMap<String, Value>) -> u64 {
        let seq = {
            let mut inner = self.lock();
            let (seq, micros) = inner.next_commit();
            let commit_time = timestamp_from_micros(micros);
            let create_time = inner
                .docs
                .get(name)
                .and_then(|entry| entry.document.as_ref())
                .and_then(|doc| doc.create_time)
                .unwrap_or(commit_time);
            let document = Document {
                name: name.to_owned(),
                fields: fields
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
                create_time: Some(create_time),
                update_time: Some(commit_time),
            };
            inner.record(name, Some(document), seq, micros);
            (seq, inner.watching(name))
        };
        wake(seq)
    }

    /// Deletes `name`; returns the commit sequence, or `None` if it did not exist (no commit).
    pub fn delete_document(&self, name: &str) -> Option<u64> {
        let seq = {
            let mut inner = self.lock();
            let exists = inner
                .docs
                .get(name)
                .is_some_and(|entry| entry.document.is_some());
            if !exists {
                return None;
            }
            let (seq, micros) = inner.next_commit();
            inner.record(name, None, seq, micros);
            (seq, inner.watching(name))
        };
        Some(wake(seq))
    }

    /// Stream `stream` no longer watches `name` (its `wake` stops hearing of its commits).
    pub(crate) fn unwatch(&self, name: &str, stream: u64) {
        let mut inner = self.lock();
        if let Some(streams) = inner.interest.get_mut(name) {
            streams.retain(|(watching, _)| *watching != stream);
            if streams.is_empty() {
                inner.interest.remove(name);
            }
        }
    }

    /// Runs `read` on a consistent view of the store.
    pub(crate) fn read<R>(&self, read: impl FnOnce(&mut StoreView<'_>) -> R) -> R {
        let mut inner = self.lock();
        let mut view = StoreView { inner: &mut inner };
        read(&mut view)
    }

    /// Encodes a resume token for "delivered up to commit `seq`".
    pub(crate) fn token(&self, seq: u64) -> Vec<u8> {
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.extend_from_slice(TOKEN_MAGIC);
        token.push(TOKEN_VERSION);
        token.extend_from_slice(&self.epoch.to_be_bytes());
        token.extend_from_slice(&seq.to_be_bytes());
        token.extend_from_slice(&now_micros().to_be_bytes());
        token
    }

    /// Decodes a token written by [`DocumentStore::token`] of this store.
    #[cfg(test)]
    pub(crate) fn decode_token(&self, token: &[u8]) -> Result<u64, TokenError> {
        self.decode_token_with_age(token).map(|(seq, _)| seq)
    }

    /// Decodes a token written by [`DocumentStore::token`] of this store: its sequence, and how
    /// long ago it was issued.
    pub(crate) fn decode_token_with_age(
        &self,
        token: &[u8],
    ) -> Result<(u64, std::time::Duration), TokenError> {
        if token.len() != TOKEN_LEN || &token[..4] != TOKEN_MAGIC || token[4] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let mut epoch = [0u8; 4];
        epoch.copy_from_slice(&token[5..9]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&token[9..17]);
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&token[17..25]);
        let age_micros = now_micros()
            .saturating_sub(i64::from_be_bytes(issued))
            .max(0);
        let age = std::time::Duration::from_micros(u64::try_from(age_micros).unwrap_or(0));
        if u32::from_be_bytes(epoch) != self.epoch {
            return Err(TokenError::OtherEpoch);
        }
        let seq = u64::from_be_bytes(seq);
        let current = self.lock().seq;
        if seq > current {
            return Err(TokenError::Future(seq));
        }
        Ok((seq, age))
    }
}

impl StoreInner {
    /// Allocates the next commit: its sequence and a time strictly after every time handed out.
    fn next_commit(&mut self) -> (u64, i64) {
        self.seq += 1;
        let micros = now_micros().max(self.last_micros + 1);
        self.last_micros = micros;
        (self.seq, micros)
    }

    /// The wake-ups of the streams watching `name`.
    fn watching(&self, name: &str) -> Vec<Arc<Notify>> {
        self.interest
            .get(name)
            .map(|streams| streams.iter().map(|(_, wake)| Arc::clone(wake)).collect())
            .unwrap_or_default()
    }

    fn record(&mut self, name: &str, document: Option<Document>, seq: u64, micros: i64) {
        self.docs.insert(
            name.to_owned(),
            DocEntry {
                document,
                changed_seq: seq,
                changed_micros: micros,
            },
        );
        if self.log.len() == COMMIT_LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back((seq, name.to_owned()));
    }
}

/// Wakes the streams watching a committed document; returns the commit's sequence.
fn wake((seq, watching): (u64, Vec<Arc<Notify>>)) -> u64 {
    for stream in watching {
        stream.notify_one();
    }
    seq
}

/// A locked view of the store, for a Listen stream to work out what to send.
pub(crate) struct StoreView<'a> {
    inner: &'a mut StoreInner,
}

impl StoreView<'_> {
    /// Stream `stream` watches `name` from now on: every later commit of it wakes `wake` (a
    /// permit is kept if the stream is busy, so none is missed). Register before reading a
    /// target's state in the same view, so no commit falls between the two.
    pub(crate) fn watch(&mut self, name: &str, stream: u64, wake: &Arc<Notify>) {
        let streams = self.inner.interest.entry(name.to_owned()).or_default();
        if !streams.iter().any(|(watching, _)| *watching == stream) {
            streams.push((stream, Arc::clone(wake)));
        }
    }

    /// The latest commit sequence and a read time for it (≥ every commit time so far, and every
    /// later commit gets a later time).
    pub(crate) fn snapshot(&mut self) -> (u64, i64) {
        let micros = now_micros().max(self.inner.last_micros);
        self.inner.last_micros = micros;
        (self.inner.seq, micros)
    }

    /// Names changed by commits after `after`, or `None` if the log no longer reaches back that
    /// far (the caller must then check every name it watches).
    pub(crate) fn changed_since(&self, after: u64) -> Option<Vec<&str>> {
        if after >= self.inner.seq {
            return Some(Vec::new());
        }
        let oldest = self.inner.log.front().map_or(u64::MAX, |(seq, _)| *seq);
        if oldest > after + 1 {
            return None;
        }
        let start = self.inner.log.partition_point(|(seq, _)| *seq <= after);
        Some(
            self.inner
                .log
                .range(start..)
                .map(|(_, name)| name.as_str())
                .collect(),
        )
    }

    /// The entry for `name` (a document or a tombstone), if it was ever written.
    pub(crate) fn entry(&self, name: &str) -> Option<&DocEntry> {
        self.inner.docs.get(name)
    }
}

#[async_trait::async_trait]
impl DocumentSink for DocumentStore {
    async fn put(
        &self,
        location: &FirestoreLocation,
        fields: &BTreeMap<String, Value>,
    ) -> anyhow::Result<()> {
        self.put_document(&location.document_name(), fields);
        Ok(())
    }

    async fn delete(&self, location: &FirestoreLocation) -> anyhow::Result<()> {
        self.delete_document(&location.document_name());
        Ok(())
    }
}

/// Now, in µs since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A protobuf timestamp for µs since the Unix epoch.
pub(crate) fn timestamp_from_micros(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        // The remainder is below 1_000_000, so the nanoseconds fit an i32.
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// µs since the Unix epoch for a protobuf timestamp (sub-µs precision is dropped).
pub(crate) fn micros_from_timestamp(timestamp: &Timestamp) -> i64 {
    timestamp
        .seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(timestamp.nanos) / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gcloud_sdk::google::firestore::v1::value::ValueType;

    fn fields(status: &str) -> BTreeMap<String, Value> {
        BTreeMap::from([(
            "status".to_owned(),
            Value {
                value_type: Some(ValueType::StringValue(status.to_owned())),
            },
        )])
    }

    #[test]
    fn commits_are_sequenced_and_times_increase() {
        let store = DocumentStore::new();
        let first = store.put_document("a", &fields("PENDING"));
        let second = store.put_document("a", &fields("PAID"));
        assert_eq!((first, second), (1, 2));
        let doc = store.get("a").expect("written");
        let created = doc.create_time.expect("create time");
        let updated = doc.update_time.expect("update time");
        assert!(micros_from_timestamp(&updated) > micros_from_timestamp(&created));
        assert_eq!(store.delete_document("a"), Some(3));
        assert_eq!(
            store.delete_document("a"),
            None,
            "deleting twice is not a commit"
        );
        assert!(store.get("a").is_none());
        assert!(store.is_empty());
    }

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        let store = DocumentStore::new();
        store.put_document("a", &fields("PENDING"));
        let token = store.token(1);
        assert_eq!(store.decode_token(&token), Ok(1));
        assert_eq!(store.decode_token(b"garbage"), Err(TokenError::Malformed));
        assert_eq!(
            store.decode_token(&store.token(9)),
            Err(TokenError::Future(9))
        );
        let other = DocumentStore {
            epoch: store.epoch.wrapping_add(1),
            ..DocumentStore::new()
        };
        assert_eq!(other.decode_token(&token), Err(TokenError::OtherEpoch));
    }

    #[test]
    fn changed_since_lists_later_commits_only() {
        let store = DocumentStore::new();
        store.put_document("a", &fields("PENDING"));
        store.put_document("b", &fields("PENDING"));
        store.put_document("a", &fields("PAID"));
        store.read(|view| {
            assert_eq!(view.changed_since(1), Some(vec!["b", "a"]));
            assert_eq!(view.changed_since(3), Some(vec![]));
            let entry = view.entry("a").expect("written");
            assert!(entry.changed_after(ResumePoint::Seq(2)));
            assert!(!entry.changed_after(ResumePoint::Seq(3)));
            let changed_micros = entry.changed_micros;
            let (seq, read_micros) = view.snapshot();
            assert_eq!(seq, 3);
            assert!(read_micros >= changed_micros);
        });
    }

    #[test]
    fn a_commit_wakes_only_the_streams_watching_its_document() {
        use futures::FutureExt;
        let store = DocumentStore::new();
        let (first, second) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        store.read(|view| {
            view.watch("a", 1, &first);
            view.watch("b", 2, &second);
            view.watch("b", 2, &second);
        });
        let woken = |wake: &Arc<Notify>| wake.notified().now_or_never().is_some();
        store.put_document("a", &fields("PAID"));
        assert!(woken(&first), "the stream watching 'a' is woken");
        assert!(!woken(&second), "the stream watching only 'b' is not");
        assert!(
            store.delete_document("b").is_none(),
            "'b' never existed: no commit"
        );
        store.put_document("b", &fields("PENDING"));
        assert!(woken(&second) && !woken(&first));
        store.unwatch("b", 2);
        store.put_document("b", &fields("PAID"));
        assert!(
            !woken(&second),
            "a stream that let go of 'b' is not woken by it"
        );
    }

    #[test]
    fn timestamps_convert_both_ways() {
        let micros = 1_700_000_000_123_456;
        let timestamp = timestamp_from_micros(micros);
        assert_eq!(timestamp.nanos, 123_456_000);
        assert_eq!(micros_from_timestamp(&timestamp), micros);
        assert_eq!(micros_from_timestamp(&timestamp_from_micros(-1)), -1);
    }
}
