//! A [`DocumentSink`] that writes checkout documents into an external Firestore (an emulator,
//! or a real project) with ordinary gRPC writes, so the listener can be tested against it.
//!
//! Owns: one Firestore client per project, opened on first use. Writes are `Commit` calls with
//! a single `update` (create or replace, no precondition) or `delete` write: the one write RPC
//! that every emulator implements (the npm `@firestore-emulator/server` leaves CreateDocument,
//! UpdateDocument and DeleteDocument unimplemented).
//! Must never: depend on the daemon's pipeline, so it has its own small connection code rather
//! than the listener's connector.
//!
//! Authentication: none, with `authorization: Bearer owner` (what the official SDKs send to an
//! emulator; the gcloud emulator then skips security rules). That suits emulators and the
//! sandbox, not a real project.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context, bail};
use gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use gcloud_sdk::google::firestore::v1::{CommitRequest, Document, Value, Write, write};
use gcloud_sdk::google_cloud_auth::credentials::anonymous;
use gcloud_sdk::{GoogleApi, GoogleAuthHeaders, GoogleAuthMiddleware, GoogleAuthMiddlewareLayer};
use http::HeaderValue;

use super::sink::DocumentSink;
use crate::domain::{FirestoreLocation, printable};

/// Writes documents to the Firestore at one endpoint, in each location's own project.
pub struct ExternalFirestore {
    /// `http://127.0.0.1:PORT` (loopback only) or an `https://` URL.
    endpoint: String,
    /// No credentials; shared by the per-project clients.
    auth: Arc<GoogleAuthHeaders>,
    /// Clients by project (each sends that project's `google-cloud-resource-prefix`).
    clients: tokio::sync::Mutex<HashMap<String, FirestoreClient<GoogleAuthMiddleware>>>,
}

impl std::fmt::Debug for ExternalFirestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalFirestore")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ExternalFirestore {
    /// A sink writing to `endpoint`, e.g. `http://127.0.0.1:8080` for an emulator. Connections
    /// open on the first write. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// The endpoint is not `https://…`, nor `http://` to 127.0.0.0/8, ::1 or localhost.
    pub fn new(endpoint: &str) -> anyhow::Result<ExternalFirestore> {
        let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
        let uri: http::Uri = endpoint.parse().with_context(|| {
            format!(
                "the Firestore endpoint '{}' is not a URL",
                printable(&endpoint)
            )
        })?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => bail!(
                "refusing the Firestore endpoint '{}'\n\nuse https://, or http:// to a loopback \
                 address (127.0.0.1, ::1, localhost)",
                printable(&endpoint)
            ),
        }
        Ok(ExternalFirestore {
            endpoint,
            auth: Arc::new(GoogleAuthHeaders::from(anonymous::Builder::new().build())),
            clients: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    async fn client(&self, project: &str) -> anyhow::Result<FirestoreClient<GoogleAuthMiddleware>> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(project) {
            return Ok(client.clone());
        }
        let prefix = format!("projects/{project}/databases/(default)");
        let mut layer = GoogleAuthMiddlewareLayer::new(Arc::clone(&self.auth), Some(prefix))
            .with_context(|| format!("invalid project id '{}'", printable(project)))?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer owner"),
        );
        layer.set_additional_headers(headers);
        let api =
            GoogleApi::from_function_with_middleware(FirestoreClient::new, &self.endpoint, layer)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("could not connect to Firestore at {}: {e}", self.endpoint)
                })?;
        let client = api.get();
        clients.insert(project.to_owned(), client.clone());
        Ok(client)
    }

    async fn commit(&self, location: &FirestoreLocation, write: Write) -> anyhow::Result<()> {
        let mut client = self.client(&location.project).await?;
        client
            .commit(CommitRequest {
                database: location.database_name(),
                writes: vec![write],
                transaction: Vec::new(),
                request_options: None,
            })
            .await
            .map_err(|status| {
                anyhow::anyhow!("{:?}: {}", status.code(), printable(status.message()))
            })
            .with_context(|| {
                format!(
                    "could not write '{}' at {}",
                    location.document_name(),
                    self.endpoint
                )
            })?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl DocumentSink for ExternalFirestore {
    async fn put(
        &self,
        location: &FirestoreLocation,
        fields: &BTreeMap<String, Value>,
    ) -> anyhow::Result<()> {
        let document = Document {
            name: location.document_name(),
            fields: fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            create_time: None,
            update_time: None,
        };
        let write = Write {
            update_mask: None,
            update_transforms: Vec::new(),
            current_document: None,
            operation: Some(write::Operation::Update(document)),
        };
        self.commit(location, write).await
    }

    async fn delete(&self, location: &FirestoreLocation) -> anyhow::Result<()> {
        let write = Write {
            update_mask: None,
            update_transforms: Vec::new(),
            current_document: None,
            operation: Some(write::Operation::Delete(location.document_name())),
        };
        self.commit(location, write).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plaintext_only_to_loopback() {
        assert!(ExternalFirestore::new("http://127.0.0.1:8080").is_ok());
        assert!(ExternalFirestore::new("http://[::1]:8080").is_ok());
        assert!(ExternalFirestore::new("https://firestore.googleapis.com").is_ok());
        let error = ExternalFirestore::new("http://192.168.1.2:8080").expect_err("not loopback");
        assert!(error.to_string().contains("refusing"), "{error}");
    }

    #[tokio::test]
    async fn a_failed_write_names_document_and_endpoint() {
        // A loopback port with nothing listening: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let sink = ExternalFirestore::new(&format!("http://127.0.0.1:{port}")).expect("sink");
        let location = FirestoreLocation::new("p", "checkouts", "x").expect("location");
        let error = sink.delete(&location).await.expect_err("nothing listens");
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error:#}"
        );
    }
}
