//! Endpoints, credentials and gRPC clients for Firestore.
//!
//! One [`Connector`] per listener (or per [`crate::sandbox::external::ExternalFirestore`]): it
//! validates the endpoint once (TLS anywhere, plaintext only on loopback), loads the credentials
//! once (their access token is cached and refreshed before expiry by google-cloud-auth and
//! shared by every connection), and opens one HTTP/2 connection per [`Connector::client`] call,
//! with the `google-cloud-resource-prefix` header of the project's database on every call.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use gcloud_sdk::google_cloud_auth::credentials::{
    self, anonymous, service_account::AccessSpecifier,
};
use gcloud_sdk::{GoogleApi, GoogleAuthHeaders, GoogleAuthMiddleware, GoogleAuthMiddlewareLayer};
use http::{HeaderMap, HeaderValue, Uri};

/// The OAuth scopes Firestore accepts (the Node SDK asks for both).
const SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/datastore",
];

/// A Firestore client over one HTTP/2 connection, with authentication and routing headers.
pub(crate) type Client = FirestoreClient<GoogleAuthMiddleware>;

/// How the listener authenticates to Firestore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirestoreAuth {
    /// A service-account key file (`[firestore] credentials`).
    ServiceAccountFile(PathBuf),
    /// The Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's
    /// well-known file, then the metadata server.
    ApplicationDefault,
    /// No credentials, for a loopback emulator or the sandbox: sends `authorization: Bearer owner`
    /// (what the official SDKs send to emulators).
    None,
}

/// Opens authenticated Firestore clients to one endpoint.
#[derive(Clone)]
pub(crate) struct Connector {
    /// The validated endpoint URL.
    endpoint: String,
    /// Shared by every connection, so the token is fetched and refreshed once.
    auth: Arc<GoogleAuthHeaders>,
    /// Fixed headers (the emulator's `Bearer owner`).
    extra_headers: HeaderMap,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        f.debug_struct("Connector")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Validates `endpoint` and loads the credentials.
    ///
    /// Must run inside a Tokio runtime (the credentials spawn their refresh task).
    ///
    /// # Errors
    /// A malformed endpoint, plaintext to a non-loopback host, an unreadable or invalid
    /// service-account file, or unusable Application Default Credentials.
    pub(crate) fn new(endpoint: &str, auth: &FirestoreAuth) -> anyhow::Result<Connector> {
        let endpoint = validate_endpoint(endpoint)?;
        let mut extra_headers = HeaderMap::new();
        let credentials = match auth {
            FirestoreAuth::ServiceAccountFile(path) => service_account_file(path)?,
            FirestoreAuth::ApplicationDefault => credentials::Builder::default()
                .with_scopes(SCOPES)
                .build()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "could not load the Google Application Default Credentials: {e}\n\n\
                         set [firestore] credentials to a service-account key file, or \
                         GOOGLE_APPLICATION_CREDENTIALS"
                    )
                })?,
            FirestoreAuth::None => {
                extra_headers.insert(
                    http::header::AUTHORIZATION,
                    HeaderValue::from_static("Bearer owner"),
                );
                anonymous::Builder::new().build()
            }
        };
        Ok(Connector {
            endpoint,
            auth: Arc::new(GoogleAuthHeaders::from(credentials)),
            extra_headers,
        })
    }

    /// The endpoint URL.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
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
        let api =
            GoogleApi::from_function_with_middleware(FirestoreClient::new, &self.endpoint, layer)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("could not connect to Firestore at {}: {e}", self.endpoint)
                })?;
        Ok(api.get())
    }
}

/// Checks Firestore credentials for `paywatch check-config`: loads them (offline) and, with
/// `online`, obtains one access token. Returns what was checked, for the report.
///
/// # Errors
/// The credentials cannot be loaded, or no token could be obtained.
pub async fn check_credentials(
    endpoint: &str,
    auth: &FirestoreAuth,
    online: bool,
) -> anyhow::Result<String> {
    validate_endpoint(endpoint)?;
    let (credentials, described) = match auth {
        FirestoreAuth::None => {
            return Ok(format!(
                "needs no credentials for the loopback endpoint {endpoint}"
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
                format!("uses service account {email} from '{}'", path.display()),
            )
        }
        FirestoreAuth::ApplicationDefault => {
            let credentials = credentials::Builder::default()
                .with_scopes(SCOPES)
                .build()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "could not load the Google Application Default Credentials: {e}"
                    )
                })?;
            (credentials, "has no service-account file; Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, or the metadata server)".to_owned())
        }
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
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "could not read the service-account file '{}'\n\ncheck [firestore] credentials and \
             the file's permissions",
            path.display()
        )
    })?;
    // Never include the file's text in an error: it holds a private key.
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "the service-account file '{}' is not JSON (line {}, column {})\n\ndownload a key \
             with `gcloud iam service-accounts keys create`",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    if json.get("type").and_then(|t| t.as_str()) != Some("service_account") {
        bail!(
            "the file '{}' is not a service-account key (its \"type\" is not \"service_account\")\
             \n\nuse a key file of a service account that may read the Firestore databases",
            path.display()
        );
    }
    credentials::service_account::Builder::new(json)
        .with_access_specifier(AccessSpecifier::from_scopes(SCOPES))
        .build()
        .map_err(|e| {
            anyhow::anyhow!(
                "the service-account file '{}' is not a usable key: {e}",
                path.display()
            )
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
        Some("http") if is_loopback(host) => Ok(endpoint.to_owned()),
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

/// `localhost`, 127.0.0.0/8 or ::1.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn bad_service_account_files_are_named_and_keys_never_shown() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.json");
        let error = Connector::new(
            "https://firestore.googleapis.com",
            &FirestoreAuth::ServiceAccountFile(missing.clone()),
        )
        .expect_err("missing file");
        assert!(format!("{error:#}").contains("missing.json"), "{error:#}");

        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "-----BEGIN PRIVATE KEY----- secret").expect("write");
        let error = Connector::new(
            "https://firestore.googleapis.com",
            &FirestoreAuth::ServiceAccountFile(garbage),
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
        )
        .expect_err("wrong type");
        let text = format!("{error:#}");
        assert!(
            text.contains("not a service-account key") && !text.contains("secret"),
            "{text}"
        );
    }
}
