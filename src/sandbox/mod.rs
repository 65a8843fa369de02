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
//! - [`firestore`]: the built-in Firestore's gRPC service (Listen, GetDocument), optionally
//!   over TLS.
//! - [`auth`]: who may call it (`open`, `rules`, `iam`), and a stand-in for Firebase Auth.
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

mod api;
pub mod auth;
mod documents;
pub mod external;
pub mod faults;
mod firestore;
mod pay_page;
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

pub use crate::sandbox::auth::{
    AuthCounts, FirebaseAuth, FirestoreAuthCheck, IamKey, TestCertificates, TestServiceAccount,
};
pub use crate::sandbox::documents::DocumentStore;
pub use crate::sandbox::faults::{FaultSettings, FaultUpdate, Faults};
pub use crate::sandbox::firestore::SeenHeaders;
pub use crate::sandbox::sink::DocumentSink;
pub use crate::sandbox::state::{
    CheckoutAction, CheckoutIds, SandboxError, SandboxState, SearchBehaviour, SearchFilter,
    SearchOrder, StatusSpelling,
};

use crate::sandbox::api::{ApiContext, ApiCredentials};
use crate::sandbox::auth::CallerCheck;
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
    /// How the built-in Firestore checks callers.
    pub firestore_auth: FirestoreAuthCheck,
    /// The Firebase Web API key the sandbox's Firebase Auth accepts.
    pub web_api_key: String,
    /// How long the ID tokens of the sandbox's Firebase Auth last (whole seconds).
    pub firebase_token_lifetime: Duration,
    /// Serve the built-in Firestore over TLS with this certificate (its endpoint becomes
    /// `https://localhost:PORT`).
    pub firestore_tls: Option<ServerTls>,
    /// Serve the HTTP side over TLS with this certificate (its URLs become
    /// `https://localhost:PORT/...`).
    pub api_tls: Option<ServerTls>,
    /// How Search Checkouts orders its results, which ids it hands out, and how late a new
    /// checkout becomes visible to it.
    pub search: SearchBehaviour,
}

/// A server certificate and key (PEM), e.g. from [`TestCertificates`].
#[derive(Clone)]
pub struct ServerTls {
    /// The certificate chain.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

impl From<&TestCertificates> for ServerTls {
    fn from(certificates: &TestCertificates) -> ServerTls {
        ServerTls {
            cert_pem: certificates.server_cert_pem.clone(),
            key_pem: certificates.server_key_pem.clone(),
        }
    }
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
            firestore_auth: FirestoreAuthCheck::Open,
            web_api_key: auth::DEFAULT_WEB_API_KEY.into(),
            firebase_token_lifetime: Duration::from_secs(3600),
            firestore_tls: None,
            api_tls: None,
            search: SearchBehaviour::default(),
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
            .field("firestore_auth", &self.firestore_auth)
            .field("firebase_token_lifetime", &self.firebase_token_lifetime)
            .field("firestore_tls", &self.firestore_tls.is_some())
            .field("search", &self.search)
            .field("api_tls", &self.api_tls.is_some())
            .finish_non_exhaustive()
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
    firebase_auth: FirebaseAuth,
    caller: Arc<CallerCheck>,
    firestore_tls: bool,
    api_tls: bool,
    firestore_auth: FirestoreAuthCheck,
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
                search: options.search,
            },
            sink,
            faults.clone(),
            shutdown.clone(),
        );
        let headers = HeadersLog::default();
        let firebase_auth = FirebaseAuth::new(
            options.web_api_key.clone(),
            options.project_id.clone(),
            options.firebase_token_lifetime,
        );
        firebase_auth.set_token_lifetime(options.firebase_token_lifetime);
        let caller = Arc::new(CallerCheck::new(
            options.firestore_auth.clone(),
            firebase_auth.clone(),
        ));
        let firestore = FirestoreService::new(
            FirestoreConfig {
                project_id: options.project_id.clone(),
                heartbeat_interval: options.heartbeat_interval,
                collection: options.collection.clone(),
            },
            store.clone(),
            faults.clone(),
            headers.clone(),
            caller.clone(),
            shutdown.clone(),
        );
        let mut grpc_builder = tonic::transport::Server::builder();
        if let Some(tls) = &options.firestore_tls {
            grpc_builder = grpc_builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
                ))
                .context("the sandbox Firestore's TLS certificate or key is unusable")?;
        }

        let app = api::router(ApiContext {
            state: state.clone(),
            credentials: Arc::new(ApiCredentials {
                api_key: options.api_key.clone(),
                api_secret: options.api_secret.clone(),
            }),
        })
        .merge(firebase_auth.router());
        let api_stop = shutdown.clone();
        let api_tls = options.api_tls.as_ref().map(tls_acceptor).transpose()?;
        let api_server = tokio::spawn(async move {
            if let Some(acceptor) = api_tls {
                serve_tls(api_listener, acceptor, app, api_stop).await;
                return;
            }
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
            let result = grpc_builder
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
            firestore_auth = options.firestore_auth.as_str(),
            firestore_tls = options.firestore_tls.is_some(),
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
            firebase_auth,
            caller,
            firestore_tls: options.firestore_tls.is_some(),
            api_tls: options.api_tls.is_some(),
            firestore_auth: options.firestore_auth,
            shutdown,
            servers: vec![api_server, grpc_server],
        })
    }

    /// The Merchant API base URL, e.g. `http://127.0.0.1:8790/mer/v2.0/` (the daemon's
    /// `[paymennt] base_url`).
    pub fn api_base_url(&self) -> String {
        format!("{}{}/", self.http_origin(), api::API_BASE_PATH)
    }

    /// `http://127.0.0.1:PORT`, or with TLS `https://localhost:PORT`.
    fn http_origin(&self) -> String {
        if self.api_tls {
            format!("https://localhost:{}", self.api_addr.port())
        } else {
            format!("http://{}", self.api_addr)
        }
    }

    /// The admin base URL, e.g. `http://127.0.0.1:8790/_sandbox/`.
    pub fn admin_url(&self) -> String {
        format!("{}/_sandbox/", self.http_origin())
    }

    /// The HTTP side's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The built-in Firestore's address.
    pub fn firestore_addr(&self) -> SocketAddr {
        self.firestore_addr
    }

    /// The built-in Firestore's endpoint, e.g. `http://127.0.0.1:8791`, or with TLS
    /// `https://localhost:8791` (the daemon's `[firestore] endpoint`).
    pub fn firestore_endpoint(&self) -> String {
        if self.firestore_tls {
            format!("https://localhost:{}", self.firestore_addr.port())
        } else {
            format!("http://{}", self.firestore_addr)
        }
    }

    /// The sandbox's Firebase Auth (token lifetime, refusal switches, counters).
    pub fn firebase_auth(&self) -> &FirebaseAuth {
        &self.firebase_auth
    }

    /// Listen targets whose resume token was older than the `resume_token_max_age_ms` fault
    /// and got their full state again.
    pub fn listen_full_resends(&self) -> u64 {
        self.firestore.full_resends()
    }

    /// Counters of Firebase Auth and of the built-in Firestore's caller checks.
    pub fn auth_counts(&self) -> AuthCounts {
        self.caller.counts()
    }

    /// The daemon's `[firestore] identity_endpoint` for this sandbox.
    pub fn identity_endpoint(&self) -> String {
        format!("{}{}", self.http_origin(), auth::IDENTITY_PATH)
    }

    /// The daemon's `[firestore] token_endpoint` for this sandbox.
    pub fn token_endpoint(&self) -> String {
        format!("{}{}", self.http_origin(), auth::TOKEN_PATH)
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

    /// The `[paymennt]` and `[firestore]` TOML a daemon needs to use this sandbox (in `iam`
    /// mode the `credentials` line naming the test key file is left to the caller).
    pub fn daemon_config_toml(&self) -> String {
        let auth = match &self.firestore_auth {
            FirestoreAuthCheck::Open => String::new(),
            // No API key: Firestore needs none (the Firebase SDKs send none).
            FirestoreAuthCheck::Rules {
                require_sign_in: false,
            } => "auth = \"none\"\n".to_owned(),
            FirestoreAuthCheck::Rules {
                require_sign_in: true,
            } => format!(
                "auth = \"firebase-anonymous\"\napi_key = \"{}\"\nidentity_endpoint = \"{}\"\ntoken_endpoint = \"{}\"\n",
                toml_escape(self.firebase_auth.web_api_key()),
                self.identity_endpoint(),
                self.token_endpoint()
            ),
            FirestoreAuthCheck::Iam(_) => "auth = \"service-account\"\n".to_owned(),
        };
        format!(
            "[paymennt]\nbase_url = \"{}\"\napi_key = \"{}\"\napi_secret = \"{}\"\n\n[firestore]\nendpoint = \"{}\"\n{auth}",
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

/// A TLS acceptor for a certificate and key in PEM.
fn tls_acceptor(tls: &ServerTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the sandbox API's TLS certificate is not PEM")?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .context("the sandbox API's TLS key is not PEM")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the sandbox API's TLS certificate or key is unusable")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS until `stop` is cancelled (open connections end with their clients).
async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::select! {
                () = stop.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

fn toml_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}
