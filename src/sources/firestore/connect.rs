//! Endpoints, credentials, TLS and gRPC clients for Firestore.
//!
//! One [`Connector`] per listener (or per [`crate::sandbox::external::ExternalFirestore`]): it
//! validates the endpoint once (TLS anywhere, plaintext only on loopback), loads the credentials
//! of the auth mode once (their token is cached and refreshed before expiry and shared by every
//! connection), reads the extra CA certificates once (`ca_file`), and opens one HTTP/2
//! connection per [`Connector::client`] call, with the `google-cloud-resource-prefix` header of
//! the project's database on every call.
//!
//! The Listen call is made here ([`Client::listen`]) rather than through gcloud-sdk's generated
//! client: the same method path, headers and auth middleware, but a codec whose buffers fit
//! Listen's small messages (the generated client's start at 8 KiB each way, per stream).
//!
//! Must never: send `authorization: Bearer owner` anywhere but to a plaintext loopback
//! endpoint in `none` mode, or put a key, token or API key in a log line or error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use gcloud_sdk::google::firestore::v1::{ListenRequest, ListenResponse};
use gcloud_sdk::google_cloud_auth::credentials::{
    self, anonymous, service_account::AccessSpecifier,
};
use gcloud_sdk::{GoogleAuthHeaders, GoogleAuthMiddleware, GoogleAuthMiddlewareLayer};
use http::{HeaderMap, HeaderValue, Uri};
use tokio::sync::watch;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tower_layer::Layer as _;

use super::firebase_auth::FirebaseAnonymous;
pub use super::firebase_auth::IdentityFile;
use crate::settings::{FirestoreAuthMode, FirestoreSettings, Secret, SettingsError};

/// The OAuth scopes Firestore accepts (the Node SDK asks for both).
const SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/datastore",
];

/// The header Google APIs take an API key in. The Firebase SDKs send the Web API key to
/// Firebase Auth, not to Firestore: paywatch sends it to Firestore only with
/// `[firestore] send_api_key_to_firestore = true`.
pub(crate) const API_KEY_HEADER: &str = "x-goog-api-key";

/// The gRPC method of a Listen call, as Firestore's API defines it.
const LISTEN_PATH: &str = "/google.firestore.v1.Firestore/Listen";

/// Initial size of a Listen call's encode buffer. A request is one AddTarget or RemoveTarget
/// (a document name and a resume token: one to two hundred bytes); the buffer grows when a
/// larger one or a batch is encoded (a multiplexed stream's first requests), up to the yield
/// threshold. It lives as long as the call: in per-document mode, one per watched checkout.
const LISTEN_ENCODE_BUFFER: usize = 256;

/// Initial size of a Listen call's decode buffer. Responses are target changes (tens of bytes)
/// and checkout documents (under a kilobyte); the buffer grows to the largest message seen.
const LISTEN_DECODE_BUFFER: usize = 1024;

/// Encoded bytes are handed to HTTP/2 once this many are ready (tonic's default).
const LISTEN_YIELD_THRESHOLD: usize = 32 * 1024;

/// The protobuf codec of the Listen call, with buffers sized for its messages.
///
/// gcloud-sdk's generated client uses tonic's default (8 KiB each way, allocated per call):
/// about 16 KiB per open stream, most of what a per-document stream cost.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ListenCodec;

impl ListenCodec {
    /// The encode buffer's settings.
    fn encode_settings() -> BufferSettings {
        BufferSettings::new(LISTEN_ENCODE_BUFFER, LISTEN_YIELD_THRESHOLD)
    }

    /// The decode buffer's settings.
    fn decode_settings() -> BufferSettings {
        BufferSettings::new(LISTEN_DECODE_BUFFER, LISTEN_YIELD_THRESHOLD)
    }
}

impl Codec for ListenCodec {
    type Encode = ListenRequest;
    type Decode = ListenResponse;
    type Encoder = ProstEncoder<ListenRequest>;
    type Decoder = ProstDecoder<ListenResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(Self::encode_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(Self::decode_settings())
    }
}

/// A Firestore client over one HTTP/2 connection, with authentication and routing headers.
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub(crate) struct Client {
    grpc: tonic::client::Grpc<GoogleAuthMiddleware>,
}

impl Client {
    /// A client over `service` (a channel wrapped in the auth middleware).
    fn new(service: GoogleAuthMiddleware) -> Client {
        Client {
            grpc: tonic::client::Grpc::new(service),
        }
    }

    /// Opens a Listen stream sending `requests`: `google.firestore.v1.Firestore/Listen`, as
    /// gcloud-sdk's generated `FirestoreClient::listen` makes it, with [`ListenCodec`].
    ///
    /// # Errors
    /// The status Firestore (or the connection) answered the call with.
    pub(crate) async fn listen<S>(
        &mut self,
        requests: S,
    ) -> Result<tonic::Response<Streaming<ListenResponse>>, tonic::Status>
    where
        S: tokio_stream::Stream<Item = ListenRequest> + Send + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
        let mut request = tonic::Request::new(requests);
        request.extensions_mut().insert(tonic::GrpcMethod::new(
            "google.firestore.v1.Firestore",
            "Listen",
        ));
        self.grpc
            .streaming(
                request,
                http::uri::PathAndQuery::from_static(LISTEN_PATH),
                ListenCodec,
            )
            .await
    }
}

/// How the listener authenticates to Firestore (`[firestore] auth`, resolved by
/// [`FirestoreAuth::from_settings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirestoreAuth {
    /// A service-account key file: a self-signed JWT per hour, checked by IAM.
    ServiceAccountFile(PathBuf),
    /// The Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's
    /// well-known file, then the metadata server.
    ApplicationDefault,
    /// No `authorization` header: the project's security rules see an unauthenticated caller.
    /// The Firebase SDKs send Firestore no API key; `api_key` goes in `x-goog-api-key` only
    /// with `send_api_key`. To a plaintext loopback endpoint (an emulator)
    /// `authorization: Bearer owner` is sent, the emulators' convention.
    None {
        /// The Firebase Web API key.
        api_key: Option<Secret>,
        /// Send `api_key` to Firestore (`[firestore] send_api_key_to_firestore`).
        send_api_key: bool,
    },
    /// An anonymous Firebase Auth user: `accounts:signUp` once, then the ID token as the
    /// bearer, refreshed before it expires; the refresh token is kept in `identity_file` and
    /// reused after a restart.
    FirebaseAnonymous {
        /// The Firebase Web API key (for Firebase Auth).
        api_key: Secret,
        /// Identity Toolkit base URL (`.../v1`).
        identity_endpoint: String,
        /// Secure Token endpoint (`.../v1/token`).
        token_endpoint: String,
        /// Also send `api_key` to Firestore (`[firestore] send_api_key_to_firestore`).
        send_api_key: bool,
        /// Where the anonymous identity is kept across restarts (mode 0600, next to the
        /// ledger); `None`: in memory only (a new user at every start).
        identity_file: Option<IdentityFile>,
    },
}

impl FirestoreAuth {
    /// Resolves `[firestore] auth` into what the listener needs, checking that the mode's credentials
    /// exist and can be read (their contents are checked when the listener starts).
    ///
    /// # Errors
    ///
    /// Names the mode, what was looked for and where; never a secret's value.
    pub fn from_settings(settings: &FirestoreSettings) -> Result<FirestoreAuth, SettingsError> {
        let err = |message: &str| SettingsError(message.to_owned());
        let mode = settings.auth_mode();
        let api_key = match &settings.api_key {
            Some(key) if key.expose().trim().is_empty() => {
                return Err(err(
                    "'firestore.api_key' is empty\n\nset the Firebase Web API key of the project holding the checkout documents, or remove the key",
                ));
            }
            other => other.clone(),
        };
        let send_api_key = settings.send_api_key_to_firestore;
        if send_api_key && api_key.is_none() {
            return Err(err(
                "'firestore.send_api_key_to_firestore' is true but 'firestore.api_key' is not \
                 set\n\nset the Firebase Web API key, or remove send_api_key_to_firestore (the \
                 Firebase SDKs send no API key to Firestore)",
            ));
        }
        match mode {
            FirestoreAuthMode::ServiceAccount => {
                let Some(path) = settings.credentials_file() else {
                    return Err(err(
                        "firestore auth 'service-account' needs a key file, and none was found: \
                         looked for 'firestore.credentials', the systemd credential \
                         'firestore-service-account' and GOOGLE_APPLICATION_CREDENTIALS\n\n\
                         set one of them, or choose another 'firestore.auth' (see \
                         docs/running-as-a-service.md, \"Which Firestore auth mode do I need?\")",
                    ));
                };
                if let Err(error) = std::fs::metadata(&path).and_then(|meta| {
                    if meta.is_file() {
                        std::fs::File::open(&path).map(drop)
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                }) {
                    return Err(SettingsError(format!(
                        "firestore auth 'service-account': cannot read the key file '{}' ({}): \
                         {error}\n\ncheck the path and that the paywatch user may read it",
                        path.display(),
                        settings.credentials_source(&path)
                    )));
                }
                Ok(FirestoreAuth::ServiceAccountFile(path))
            }
            FirestoreAuthMode::ApplicationDefault => {
                if let Some(path) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
                    let path = PathBuf::from(path);
                    if let Err(error) = std::fs::File::open(&path) {
                        return Err(SettingsError(format!(
                            "firestore auth 'application-default': cannot read '{}' named by \
                             GOOGLE_APPLICATION_CREDENTIALS: {error}\n\nfix or unset the variable",
                            path.display()
                        )));
                    }
                }
                Ok(FirestoreAuth::ApplicationDefault)
            }
            FirestoreAuthMode::None => Ok(FirestoreAuth::None {
                api_key,
                send_api_key,
            }),
            FirestoreAuthMode::FirebaseAnonymous => {
                let Some(api_key) = api_key else {
                    return Err(err(
                        "firestore auth 'firebase-anonymous' needs 'firestore.api_key' (the \
                         Firebase Web API key of the project holding the checkout documents), \
                         and it is not set\n\nset it in the config file or in \
                         PAYWATCH_FIRESTORE__API_KEY; paymennt's payment page carries it in its \
                         Firebase configuration",
                    ));
                };
                Ok(FirestoreAuth::FirebaseAnonymous {
                    api_key,
                    identity_endpoint: settings.identity_endpoint(),
                    token_endpoint: settings.token_endpoint(),
                    send_api_key,
                    identity_file: None,
                })
            }
        }
    }

    /// The config spelling of this mode.
    pub fn mode(&self) -> FirestoreAuthMode {
        match self {
            FirestoreAuth::ServiceAccountFile(_) => FirestoreAuthMode::ServiceAccount,
            FirestoreAuth::ApplicationDefault => FirestoreAuthMode::ApplicationDefault,
            FirestoreAuth::None { .. } => FirestoreAuthMode::None,
            FirestoreAuth::FirebaseAnonymous { .. } => FirestoreAuthMode::FirebaseAnonymous,
        }
    }

    /// No credentials and no API key (the sandbox, emulators).
    pub fn none() -> FirestoreAuth {
        FirestoreAuth::None {
            api_key: None,
            send_api_key: false,
        }
    }

    /// Keeps a `firebase-anonymous` identity in `path`, or with `read_only` only reads it
    /// (other modes are returned unchanged).
    #[must_use]
    pub fn with_identity_file(self, path: PathBuf, read_only: bool) -> FirestoreAuth {
        match self {
            FirestoreAuth::FirebaseAnonymous {
                api_key,
                identity_endpoint,
                token_endpoint,
                send_api_key,
                identity_file: _,
            } => FirestoreAuth::FirebaseAnonymous {
                api_key,
                identity_endpoint,
                token_endpoint,
                send_api_key,
                identity_file: Some(IdentityFile { path, read_only }),
            },
            other => other,
        }
    }
}

/// Opens authenticated Firestore clients to one endpoint.
#[derive(Clone)]
pub(crate) struct Connector {
    /// The validated endpoint URL.
    endpoint: String,
    /// TLS settings for an `https://` endpoint (built-in roots plus `ca_file`).
    tls: Option<ClientTlsConfig>,
    /// Shared by every connection, so the token is fetched and refreshed once.
    auth: Arc<GoogleAuthHeaders>,
    /// Fixed headers (`x-goog-api-key`, the emulator's `Bearer owner`).
    extra_headers: HeaderMap,
    /// Changes each time the credentials were renewed ahead of expiry (firebase-anonymous):
    /// open streams are reopened with the new token.
    renewed: watch::Receiver<u64>,
    /// Keeps the firebase-anonymous refresher alive as long as a connector is.
    _anonymous: Option<FirebaseAnonymous>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        f.debug_struct("Connector")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Validates `endpoint`, reads `ca_file` and loads the credentials.
    ///
    /// Must run inside a Tokio runtime (the credentials spawn their refresh task).
    ///
    /// # Errors
    /// A malformed endpoint, plaintext to a non-loopback host, an unreadable CA file, an
    /// unreadable or invalid service-account file, or unusable Application Default
    /// Credentials.
    pub(crate) fn new(
        endpoint: &str,
        auth: &FirestoreAuth,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<Connector> {
        let endpoint = validate_endpoint(endpoint)?;
        let ca_pem = read_ca(ca_file)?;
        let tls = tls_config(&endpoint, ca_pem.as_deref())?;
        let mut extra_headers = HeaderMap::new();
        let (_, never_renewed) = watch::channel(0u64);
        let mut renewed = never_renewed;
        let mut anonymous_session = None;
        let credentials = match auth {
            FirestoreAuth::ServiceAccountFile(path) => service_account_file(path)?,
            FirestoreAuth::ApplicationDefault => application_default()?,
            FirestoreAuth::None {
                api_key,
                send_api_key,
            } => {
                if let Some(key) = api_key.as_ref().filter(|_| *send_api_key) {
                    extra_headers.insert(API_KEY_HEADER, api_key_header(key)?);
                }
                if endpoint.starts_with("http://") {
                    // `validate_endpoint` admits plaintext only to loopback: an emulator.
                    extra_headers.insert(
                        http::header::AUTHORIZATION,
                        HeaderValue::from_static("Bearer owner"),
                    );
                }
                anonymous::Builder::new().build()
            }
            FirestoreAuth::FirebaseAnonymous {
                api_key,
                identity_endpoint,
                token_endpoint,
                send_api_key,
                identity_file,
            } => {
                if *send_api_key {
                    extra_headers.insert(API_KEY_HEADER, api_key_header(api_key)?);
                }
                let session = FirebaseAnonymous::new(
                    api_key.clone(),
                    identity_endpoint,
                    token_endpoint,
                    ca_pem.as_deref(),
                    identity_file.clone(),
                )?;
                renewed = session.renewed();
                let credentials = session.credentials();
                anonymous_session = Some(session);
                credentials
            }
        };
        Ok(Connector {
            endpoint,
            tls,
            auth: Arc::new(GoogleAuthHeaders::from(credentials)),
            extra_headers,
            renewed,
            _anonymous: anonymous_session,
        })
    }

    /// The endpoint URL.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A receiver that changes each time the credentials were renewed ahead of their expiry.
    pub(crate) fn renewed(&self) -> watch::Receiver<u64> {
        self.renewed.clone()
    }

    /// Opens a new HTTP/2 connection to the endpoint for `database`
    /// (`projects/{project}/databases/{database}`, also the `google-cloud-resource-prefix`).
    ///
    /// # Errors
    /// The connection could not be made (network, TLS, refused); worth retrying.
    pub(crate) async fn client(&self, database: &str) -> anyhow::Result<Client> {
        let prefix = database.to_owned();
        let mut layer = GoogleAuthMiddlewareLayer::new(Arc::clone(&self.auth), Some(prefix))
            .with_context(|| format!("invalid database name '{database}' for a request header"))?;
        layer.set_additional_headers(self.extra_headers.clone());
        // The channel settings of gcloud-sdk's own channel, plus our TLS roots.
        let mut channel = Channel::from_shared(self.endpoint.clone())
            .with_context(|| format!("the Firestore endpoint '{}' is not a URL", self.endpoint))?
            .connect_timeout(Duration::from_secs(30))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(60))
            .http2_keep_alive_interval(Duration::from_secs(60))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            channel = channel.tls_config(tls.clone()).map_err(|e| {
                anyhow::anyhow!("bad TLS settings for Firestore at {}: {e}", self.endpoint)
            })?;
        }
        let channel = channel.connect().await.map_err(|e| {
            let source = std::error::Error::source(&e)
                .map(|source| format!(": {source}"))
                .unwrap_or_default();
            anyhow::anyhow!(
                "could not connect to Firestore at {}: {e}{source}",
                self.endpoint
            )
        })?;
        Ok(Client::new(layer.layer(channel)))
    }
}

/// Reads `[firestore] ca_file`.
fn read_ca(ca_file: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    ca_file
        .map(|path| {
            crate::settings::read_ca_file(path).map_err(|problem| {
                crate::settings::SettingsError(format!("'firestore.ca_file': {problem}")).into()
            })
        })
        .transpose()
}

/// TLS for an `https://` endpoint: the built-in web PKI roots, plus the extra CA certificates.
fn tls_config(endpoint: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<Option<ClientTlsConfig>> {
    let uri: Uri = endpoint.parse().context("endpoint")?;
    if uri.scheme_str() != Some("https") {
        return Ok(None);
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut tls = ClientTlsConfig::new()
        .with_webpki_roots()
        .domain_name(host.to_owned());
    if let Some(pem) = ca_pem {
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    Ok(Some(tls))
}

fn api_key_header(key: &Secret) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(key.expose().trim()).map_err(|_| {
        crate::settings::SettingsError(
            "'firestore.api_key' contains characters not allowed in an HTTP header".into(),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

fn application_default() -> anyhow::Result<credentials::Credentials> {
    credentials::Builder::default()
        .with_scopes(SCOPES)
        .build()
        .map_err(|e| {
            crate::settings::SettingsError(format!(
                "firestore auth 'application-default': could not load the Google Application \
                 Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's \
                 application_default_credentials.json, then the metadata server): {e}\n\n\
                 set GOOGLE_APPLICATION_CREDENTIALS, or choose another 'firestore.auth'"
            ))
            .into()
        })
}

/// Checks Firestore credentials for `paywatch check-config`: loads them (offline) and, with
/// `online`, obtains one token (or signs in anonymously). Returns what was checked, for the
/// report, naming the auth mode.
///
/// # Errors
/// The credentials cannot be loaded, or no token could be obtained.
pub async fn check_credentials(
    endpoint: &str,
    auth: &FirestoreAuth,
    ca_file: Option<&Path>,
    online: bool,
) -> anyhow::Result<String> {
    validate_endpoint(endpoint)?;
    let ca_pem = read_ca(ca_file)?;
    let mode = auth.mode();
    let (credentials, described) = match auth {
        FirestoreAuth::None {
            api_key,
            send_api_key,
        } => {
            let key = match api_key {
                Some(key) if *send_api_key => format!(", with the Web API key {}", key.hint()),
                _ => String::new(),
            };
            let owner = if endpoint.starts_with("http://") {
                " (Bearer owner to this loopback emulator)"
            } else {
                ""
            };
            return Ok(format!(
                "auth {mode}: sends no credentials to {endpoint}{key}{owner}; the project's \
                 security rules decide"
            ));
        }
        FirestoreAuth::FirebaseAnonymous {
            api_key,
            identity_endpoint,
            token_endpoint,
            identity_file,
            ..
        } => {
            if !online {
                return Ok(format!(
                    "auth {mode}: signs in anonymously at {identity_endpoint} with the Web API \
                     key {}; check it with --online",
                    api_key.hint()
                ));
            }
            // Read-only: the daemon owns the identity file.
            let identity_file = identity_file.clone().map(|file| IdentityFile {
                read_only: true,
                ..file
            });
            let session = FirebaseAnonymous::new(
                api_key.clone(),
                identity_endpoint,
                token_endpoint,
                ca_pem.as_deref(),
                identity_file,
            )?;
            let (lifetime, stored) = session.sign_in_once().await?;
            let how = if stored {
                "refreshed the daemon's stored anonymous identity"
            } else {
                "signed up a new anonymous user (there is no stored identity yet)"
            };
            return Ok(format!(
                "auth {mode}: {how} at {identity_endpoint}; the ID token lasts {}",
                humantime::format_duration(lifetime)
            ));
        }
        FirestoreAuth::ServiceAccountFile(path) => {
            let credentials = service_account_file(path)?;
            let email = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|json| {
                    json.get("client_email")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "unknown account".into());
            (
                credentials,
                format!(
                    "auth {mode}: uses service account {email} from '{}'",
                    path.display()
                ),
            )
        }
        FirestoreAuth::ApplicationDefault => (
            application_default()?,
            format!(
                "auth {mode}: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, \
                 gcloud, or the metadata server)"
            ),
        ),
    };
    if online {
        let headers = credentials
            .headers(http::Extensions::new())
            .await
            .map_err(|e| {
                anyhow::anyhow!("could not obtain an access token for {described}: {e}")
            })?;
        if let gcloud_sdk::google_cloud_auth::credentials::CacheableResource::New { data, .. } =
            headers
            && !data.contains_key(http::header::AUTHORIZATION)
        {
            bail!("{described} produced no authorization header");
        }
        return Ok(format!("{described}: access token obtained"));
    }
    Ok(match auth {
        FirestoreAuth::ApplicationDefault => format!("{described}; check them with --online"),
        _ => format!("{described}: key loaded"),
    })
}

fn service_account_file(path: &std::path::Path) -> anyhow::Result<credentials::Credentials> {
    let config_error = |text: String| -> anyhow::Error {
        crate::settings::SettingsError(format!("firestore auth 'service-account': {text}")).into()
    };
    let text = std::fs::read_to_string(path).map_err(|error| {
        config_error(format!(
            "could not read the service-account file '{}': {error}\n\ncheck [firestore] \
             credentials and the file's permissions",
            path.display()
        ))
    })?;
    // Never include the file's text in an error: it holds a private key.
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        config_error(format!(
            "the service-account file '{}' is not JSON (line {}, column {})\n\ndownload a key \
             with `gcloud iam service-accounts keys create`",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    // The key's id and body are secrets: scrubbed from any excerpt of an answer that echoes them.
    if let Some(key_id) = json.get("private_key_id").and_then(|id| id.as_str()) {
        crate::domain::register_secret(key_id);
    }
    if let Some(key) = json.get("private_key").and_then(|key| key.as_str()) {
        key.lines()
            .filter(|line| !line.starts_with("-----"))
            .for_each(|line| crate::domain::register_secret(line.trim()));
    }
    if json.get("type").and_then(|t| t.as_str()) != Some("service_account") {
        return Err(config_error(format!(
            "the file '{}' is not a service-account key (its \"type\" is not \"service_account\")\
             \n\nuse a key file of a service account that may read the Firestore databases",
            path.display()
        )));
    }
    credentials::service_account::Builder::new(json)
        .with_access_specifier(AccessSpecifier::from_scopes(SCOPES))
        .build()
        .map_err(|e| {
            config_error(format!(
                "the service-account file '{}' is not a usable key: {e}",
                path.display()
            ))
        })
}

/// Accepts `https://host[:port]` anywhere and `http://` only to a loopback host.
fn validate_endpoint(endpoint: &str) -> anyhow::Result<String> {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let uri: Uri = endpoint.parse().with_context(|| {
        format!("the Firestore endpoint '{endpoint}' is not a URL\n\nuse https://firestore.googleapis.com or http://127.0.0.1:PORT")
    })?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        bail!("the Firestore endpoint '{endpoint}' has no host");
    }
    match uri.scheme_str() {
        Some("https") => Ok(endpoint.to_owned()),
        Some("http") if crate::settings::is_loopback_host(host) => Ok(endpoint.to_owned()),
        Some("http") => bail!(
            "refusing plaintext http to the non-loopback Firestore endpoint '{endpoint}'\n\n\
             use https://, or an emulator or sandbox on 127.0.0.1, ::1 or localhost"
        ),
        _ => bail!(
            "the Firestore endpoint '{endpoint}' must start with https:// (or http:// for a \
             loopback emulator)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Listen call's codec starts with buffers sized for Listen's messages, not tonic's
    /// 8 KiB each way (per stream, for as long as it is open).
    #[test]
    fn the_listen_codec_has_small_buffers() {
        use tonic::codec::{Decoder as _, Encoder as _};
        let mut codec = ListenCodec;
        let encode = format!("{:?}", codec.encoder().buffer_settings());
        let decode = format!("{:?}", codec.decoder().buffer_settings());
        assert!(encode.contains("buffer_size: 256,"), "{encode}");
        assert!(decode.contains("buffer_size: 1024,"), "{decode}");
    }

    #[test]
    fn plaintext_only_on_loopback() {
        assert!(validate_endpoint("https://firestore.googleapis.com").is_ok());
        assert!(validate_endpoint("http://127.0.0.1:8080").is_ok());
        assert!(validate_endpoint("http://[::1]:8080/").is_ok());
        assert!(validate_endpoint("http://localhost:8080").is_ok());
        let error = validate_endpoint("http://10.0.0.5:8080").expect_err("non-loopback");
        assert!(error.to_string().contains("refusing plaintext"), "{error}");
        assert!(validate_endpoint("ftp://127.0.0.1").is_err());
        assert!(validate_endpoint("127.0.0.1:8080").is_err());
        assert!(validate_endpoint("not a url").is_err());
    }

    /// Issue 21: the Firebase SDKs send no API key to Firestore; paywatch sends it only when
    /// asked to (`send_api_key_to_firestore`), in `none` and `firebase-anonymous` mode alike.
    #[tokio::test]
    async fn the_api_key_goes_to_firestore_only_when_asked() {
        let key = Some(Secret::new("web-key"));
        for (send_api_key, expected) in [(false, false), (true, true)] {
            let none = Connector::new(
                "https://firestore.googleapis.com",
                &FirestoreAuth::None {
                    api_key: key.clone(),
                    send_api_key,
                },
                None,
            )
            .expect("connector");
            assert_eq!(none.extra_headers.contains_key(API_KEY_HEADER), expected);
            let anonymous = Connector::new(
                "https://firestore.googleapis.com",
                &FirestoreAuth::FirebaseAnonymous {
                    api_key: Secret::new("web-key"),
                    identity_endpoint: "http://127.0.0.1:9/v1".into(),
                    token_endpoint: "http://127.0.0.1:9/v1/token".into(),
                    send_api_key,
                    identity_file: None,
                },
                None,
            )
            .expect("connector");
            assert_eq!(
                anonymous.extra_headers.contains_key(API_KEY_HEADER),
                expected
            );
        }
    }

    #[tokio::test]
    async fn bad_service_account_files_are_named_and_keys_never_shown() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.json");
        let error = Connector::new(
            "https://firestore.googleapis.com",
            &FirestoreAuth::ServiceAccountFile(missing.clone()),
            None,
        )
        .expect_err("missing file");
        assert!(format!("{error:#}").contains("missing.json"), "{error:#}");

        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "-----BEGIN PRIVATE KEY----- secret").expect("write");
        let error = Connector::new(
            "https://firestore.googleapis.com",
            &FirestoreAuth::ServiceAccountFile(garbage),
            None,
        )
        .expect_err("not json");
        let text = format!("{error:#}");
        assert!(
            text.contains("not JSON") && !text.contains("secret"),
            "{text}"
        );

        let user = dir.path().join("user.json");
        std::fs::write(
            &user,
            r#"{"type":"authorized_user","refresh_token":"secret"}"#,
        )
        .expect("write");
        let error = Connector::new(
            "https://firestore.googleapis.com",
            &FirestoreAuth::ServiceAccountFile(user),
            None,
        )
        .expect_err("wrong type");
        let text = format!("{error:#}");
        assert!(
            text.contains("not a service-account key") && !text.contains("secret"),
            "{text}"
        );
    }
}
