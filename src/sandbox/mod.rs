//! A local stand-in for paymennt's Merchant API and Firestore's Listen, sharing one state.
//!
//! Owns: the fake services used by `paywatch demo`, `paywatch sandbox`, the tests and benchmarks.
//! Must never: depend on the daemon's pipeline (sources, verifier, ledger, hooks).
//!
//! # Layout
//!
//! - [`state`]: checkouts and their lifecycle; writes each checkout's document through a
//!   [`DocumentSink`] after every change.
//! - [`api`]: the Merchant API (`/mer/v2.0/`), admin endpoints (`/_sandbox/`), routes.
//! - [`pay_page`]: the payment page (`/pay/{key}`) with its card form and test cards.
//! - [`documents`]: the built-in Firestore's document store (the default [`DocumentSink`]).
//! - [`firestore`]: the built-in Firestore's gRPC service (Listen, GetDocument).
//! - [`faults`]: injected API errors, throttling, latency, dropped streams, slow writes.
//! - [`sink`]: the [`DocumentSink`] trait, so an external Firestore can take the documents.
//! - [`external`]: a [`DocumentSink`] writing into an external Firestore (an emulator).
//!
//! # Use
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use paywatch::sandbox::{Sandbox, SandboxOptions};
//! let sandbox = Sandbox::start(SandboxOptions::default()).await?;
//! // point a daemon at sandbox.api_base_url() and sandbox.firestore_endpoint() ...
//! sandbox.shutdown().await;
//! # Ok(()) }
//! ```

pub mod api;
pub mod documents;
pub mod external;
pub mod faults;
pub mod firestore;
pub mod pay_page;
pub mod sink;
pub mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use crate::sandbox::documents::DocumentStore;
pub use crate::sandbox::faults::{FaultSettings, FaultUpdate, Faults};
pub use crate::sandbox::firestore::SeenHeaders;
pub use crate::sandbox::sink::DocumentSink;
pub use crate::sandbox::state::{CheckoutAction, SandboxError, SandboxState, StatusSpelling};

use crate::sandbox::api::{ApiContext, ApiCredentials};
use crate::sandbox::firestore::{FirestoreConfig, FirestoreService, HeadersLog};
use crate::sandbox::state::StateConfig;

/// The project id the sandbox answers as `firebaseDatabase` unless told otherwise.
pub const DEFAULT_PROJECT_ID: &str = "paywatch-sandbox";
/// The API key the sandbox accepts unless told otherwise.
pub const DEFAULT_API_KEY: &str = "sandbox-key";
/// The API secret the sandbox accepts unless told otherwise.
pub const DEFAULT_API_SECRET: &str = "sandbox-secret";

/// How long shutdown waits for each part to stop before giving up on it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How to start a [`Sandbox`]. `Default` binds both servers to `127.0.0.1:0`.
#[derive(Clone)]
pub struct SandboxOptions {
    /// Address of the HTTP side (Merchant API, admin, payment page).
    pub api_listen: SocketAddr,
    /// Address of the built-in Firestore (gRPC, plaintext).
    pub firestore_listen: SocketAddr,
    /// The accepted `X-Paymennt-Api-Key`.
    pub api_key: String,
    /// The accepted `X-Paymennt-Api-Secret`.
    pub api_secret: String,
    /// The Firebase project id (`firebaseDatabase`); documents live in its `(default)` database.
    pub project_id: String,
    /// The collection of checkout documents (`firebaseCollection`).
    pub collection: String,
    /// How statuses are spelled in API answers and documents.
    pub status_spelling: StatusSpelling,
    /// How often idle Listen streams get a heartbeat marker (production: about 30 s).
    pub heartbeat_interval: Duration,
    /// How long one `expiresIn` minute lasts: 60 s for real; tests set e.g. 1 ms so that
    /// `expiresIn: 15` expires after 15 ms.
    pub expiry_minute: Duration,
    /// Faults in force from the start.
    pub faults: FaultSettings,
    /// Where checkout documents go. `None`: the built-in Firestore. `Some`: an external one (an
    /// emulator); the built-in Firestore is still served but stays empty.
    pub document_sink: Option<Arc<dyn DocumentSink>>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        SandboxOptions {
            api_listen: loopback,
            firestore_listen: loopback,
            api_key: DEFAULT_API_KEY.into(),
            api_secret: DEFAULT_API_SECRET.into(),
            project_id: DEFAULT_PROJECT_ID.into(),
            collection: "checkouts".into(),
            status_spelling: StatusSpelling::Upper,
            heartbeat_interval: Duration::from_secs(30),
            expiry_minute: Duration::from_secs(60),
            faults: FaultSettings::default(),
            document_sink: None,
        }
    }
}

impl std::fmt::Debug for SandboxOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxOptions")
            .field("api_listen", &self.api_listen)
            .field("firestore_listen", &self.firestore_listen)
            .field("api_key", &self.api_key)
            .field("api_secret", &"<redacted>")
            .field("project_id", &self.project_id)
            .field("collection", &self.collection)
            .field("status_spelling", &self.status_spelling)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("expiry_minute", &self.expiry_minute)
            .field("faults", &self.faults)
            .field("external_document_sink", &self.document_sink.is_some())
            .finish()
    }
}

/// A running sandbox. Stop it with [`Sandbox::shutdown`]; dropping it stops it too, without
/// waiting.
pub struct Sandbox {
    api_addr: SocketAddr,
    firestore_addr: SocketAddr,
    project_id: String,
    api_key: String,
    api_secret: String,
    state: SandboxState,
    faults: Faults,
    store: Arc<DocumentStore>,
    headers: HeadersLog,
    firestore: FirestoreService,
    /// Cancelled to stop servers, streams, timers and delayed writes.
    shutdown: CancellationToken,
    /// The two server tasks.
    servers: Vec<JoinHandle<()>>,
}

impl Sandbox {
    /// Binds both servers and starts serving.
    ///
    /// # Errors
    ///
    /// If an address cannot be bound (in use, not local), naming the address.
    pub async fn start(options: SandboxOptions) -> anyhow::Result<Sandbox> {
        let api_listener = TcpListener::bind(options.api_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for the sandbox API",
                    options.api_listen
                )
            })?;
        let firestore_listener = TcpListener::bind(options.firestore_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for the sandbox Firestore",
                    options.firestore_listen
                )
            })?;
        let api_addr = api_listener.local_addr().context("sandbox API address")?;
        let firestore_addr = firestore_listener
            .local_addr()
            .context("sandbox Firestore address")?;

        let shutdown = CancellationToken::new();
        let faults = Faults::new(options.faults.clone());
        let store = Arc::new(DocumentStore::new());
        let sink: Arc<dyn DocumentSink> = match &options.document_sink {
            Some(external) => external.clone(),
            None => store.clone(),
        };
        let state = SandboxState::new(
            StateConfig {
                project_id: options.project_id.clone(),
                collection: options.collection.clone(),
                status_spelling: options.status_spelling,
                expiry_minute: options.expiry_minute,
                public_base_url: format!("http://{api_addr}"),
            },
            sink,
            faults.clone(),
            shutdown.clone(),
        );
        let headers = HeadersLog::default();
        let firestore = FirestoreService::new(
            FirestoreConfig {
                project_id: options.project_id.clone(),
                heartbeat_interval: options.heartbeat_interval,
            },
            store.clone(),
            faults.clone(),
            headers.clone(),
            shutdown.clone(),
        );

        let app = api::router(ApiContext {
            state: state.clone(),
            credentials: Arc::new(ApiCredentials {
                api_key: options.api_key.clone(),
                api_secret: options.api_secret.clone(),
            }),
        });
        let api_stop = shutdown.clone();
        let api_server = tokio::spawn(async move {
            // Small responses must not wait for Nagle's algorithm.
            let listener = axum::serve::ListenerExt::tap_io(api_listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(api_stop.cancelled_owned())
                .await
            {
                tracing::error!(%error, "sandbox: the API server stopped");
            }
        });
        let grpc_stop = shutdown.clone();
        let grpc_service = firestore.clone();
        let grpc_server = tokio::spawn(async move {
            let incoming = TcpListenerStream::new(firestore_listener).map(|accepted| {
                accepted.inspect(|tcp| {
                    let _ = tcp.set_nodelay(true);
                })
            });
            // Google's front end allows about 100 concurrent streams per connection; tonic has no
            // limit by default, which would hide a client's 101st-stream hang.
            let result = tonic::transport::Server::builder()
                .max_concurrent_streams(100)
                .add_service(grpc_service)
                .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "sandbox: the Firestore server stopped");
            }
        });
        tracing::info!(
            api = %api_addr,
            firestore = %firestore_addr,
            project = %options.project_id,
            external_documents = options.document_sink.is_some(),
            "sandbox: started"
        );
        Ok(Sandbox {
            api_addr,
            firestore_addr,
            project_id: options.project_id,
            api_key: options.api_key,
            api_secret: options.api_secret,
            state,
            faults,
            store,
            headers,
            firestore,
            shutdown,
            servers: vec![api_server, grpc_server],
        })
    }

    /// The Merchant API base URL, e.g. `http://127.0.0.1:8790/mer/v2.0/` (the daemon's
    /// `[paymennt] base_url`).
    pub fn api_base_url(&self) -> String {
        format!("http://{}{}/", self.api_addr, api::API_BASE_PATH)
    }

    /// The admin base URL, e.g. `http://127.0.0.1:8790/_sandbox/`.
    pub fn admin_url(&self) -> String {
        format!("http://{}/_sandbox/", self.api_addr)
    }

    /// The HTTP side's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The built-in Firestore's address.
    pub fn firestore_addr(&self) -> SocketAddr {
        self.firestore_addr
    }

    /// The built-in Firestore's endpoint, e.g. `http://127.0.0.1:8791` (the daemon's
    /// `[firestore] endpoint`).
    pub fn firestore_endpoint(&self) -> String {
        format!("http://{}", self.firestore_addr)
    }

    /// The project id (`firebaseDatabase`).
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// `projects/<project>/databases/(default)`: the `database` of every ListenRequest.
    pub fn database_name(&self) -> String {
        format!("projects/{}/databases/(default)", self.project_id)
    }

    /// The accepted `X-Paymennt-Api-Key`.
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// The accepted `X-Paymennt-Api-Secret`.
    pub fn api_secret(&self) -> &str {
        &self.api_secret
    }

    /// The shared state: create links, pay, fail, refund, lie, delete documents, count calls.
    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The built-in Firestore's documents (empty when an external sink is used).
    pub fn documents(&self) -> &Arc<DocumentStore> {
        &self.store
    }

    /// Headers of every call to the built-in Firestore (the latest 1024), oldest first.
    pub fn listen_headers_seen(&self) -> Vec<SeenHeaders> {
        self.headers.all()
    }

    /// The `[paymennt]` and `[firestore]` TOML a daemon needs to use this sandbox.
    pub fn daemon_config_toml(&self) -> String {
        format!(
            "[paymennt]\nbase_url = \"{}\"\napi_key = \"{}\"\napi_secret = \"{}\"\n\n[firestore]\nendpoint = \"{}\"\n",
            self.api_base_url(),
            toml_escape(&self.api_key),
            toml_escape(&self.api_secret),
            self.firestore_endpoint()
        )
    }

    /// Stops everything and waits (at most a few seconds per part): servers stop accepting,
    /// Listen streams end with UNAVAILABLE, expiry timers and delayed writes are dropped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for server in std::mem::take(&mut self.servers) {
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                tracing::warn!("sandbox: a server did not stop in time");
            }
        }
        let background = async {
            self.firestore.wait_streams().await;
            self.state.wait_background().await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, background)
            .await
            .is_err()
        {
            tracing::warn!("sandbox: background tasks did not stop in time");
        }
        tracing::info!("sandbox: stopped");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Best effort: the tasks see the token and stop on their own.
        self.shutdown.cancel();
    }
}

fn toml_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}
