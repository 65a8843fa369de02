//! Where the sandbox writes checkout documents: its own Listen server, or an external Firestore.

use std::collections::BTreeMap;

use gcloud_sdk::google::firestore::v1::Value;

use crate::domain::FirestoreLocation;

/// A place that stores checkout documents, as paymennt writes them to Firestore.
///
/// The sandbox's state calls this after every change to a checkout. Implementations: the
/// built-in Listen server's document store, and an external Firestore (an emulator) reached with
/// ordinary gRPC writes.
#[async_trait::async_trait]
pub trait DocumentSink: Send + Sync + 'static {
    /// Creates or replaces the document at `location` with `fields`.
    async fn put(
        &self,
        location: &FirestoreLocation,
        fields: &BTreeMap<String, Value>,
    ) -> anyhow::Result<()>;

    /// Deletes the document at `location` (no error if it does not exist).
    async fn delete(&self, location: &FirestoreLocation) -> anyhow::Result<()>;
}
