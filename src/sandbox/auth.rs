//! Who may call the sandbox's Firestore, checked as production checks it, and the sandbox's
//! stand-in for Firebase Auth; plus test-only key material (a service-account key, a CA).
//!
//! Owns: the [`FirestoreAuthCheck`] of the built-in Firestore (`open`, `rules`, `iam`), the
//! verification of a caller's `authorization` header, the Firebase Auth endpoints
//! (`accounts:signUp`, the Secure Token refresh) with a settable token lifetime, and generating
//! a [`TestServiceAccount`] and [`TestCertificates`].
//! Must never: accept a real Google credential (it verifies only against keys it was given),
//! or be reachable from anything but loopback.
//!
//! # What production does, and what the sandbox copies
//!
//! - `rules`: an unauthenticated caller, or one with a valid Firebase ID token, is judged by
//!   the project's security rules. The sandbox's rules allow reading one checkout document
//!   by its exact name (`<database>/documents/<collection>/<id>`) and nothing else: a query
//!   target or any other document is removed with a PERMISSION_DENIED cause (GetDocument
//!   answers PERMISSION_DENIED). An `authorization` header that is not a valid, unexpired ID
//!   token issued here is UNAUTHENTICATED "Missing or invalid authentication.". With
//!   `require_sign_in` and no token, the Listen call opens and every target is removed with
//!   PERMISSION_DENIED (GetDocument is PERMISSION_DENIED). `Bearer owner` (what paywatch sends to
//!   a plaintext loopback endpoint in `none` mode, the emulators' admin convention) counts as
//!   no token: the rules still apply.
//! - `iam`: only a bearer that verifies as a self-signed service-account JWT (what
//!   google-cloud-auth 1.18 makes from a key file: RS256, `kid` = `private_key_id`, `iss` =
//!   `client_email`, a `scope` naming cloud-platform or datastore, or `aud`
//!   `https://firestore.googleapis.com/`; unexpired) against the [`IamKey`]; anything else is
//!   UNAUTHENTICATED. Rules do not apply to an IAM caller.
//! - A stream that outlives its caller's token is ended with UNAUTHENTICATED (as Firestore
//!   does when an ID token expires under a live listener).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use serde::Deserialize;
use tokio::time::Instant;
use tonic::Status;

/// The Firebase Web API key the sandbox's Firebase Auth accepts unless told otherwise.
pub const DEFAULT_WEB_API_KEY: &str = "sandbox-web-api-key";
/// Where the sandbox serves Identity Toolkit (`[firestore] identity_endpoint` = HTTP base +
/// this).
pub const IDENTITY_PATH: &str = "/_firebase/identitytoolkit/v1";
/// Where the sandbox serves the Secure Token endpoint (`[firestore] token_endpoint`).
pub const TOKEN_PATH: &str = "/_firebase/securetoken/v1/token";

/// Production's words for a refused credential.
const UNAUTHENTICATED_MESSAGE: &str = "Missing or invalid authentication.";
/// Production's words for a rules refusal.
pub(crate) const PERMISSION_DENIED_MESSAGE: &str = "Missing or insufficient permissions.";

/// How the built-in Firestore checks callers (`paywatch sandbox --firestore-auth`).
#[derive(Debug, Clone, Default)]
pub enum FirestoreAuthCheck {
    /// Anyone, any header (an emulator without rules). The default.
    #[default]
    Open,
    /// Security rules: checkout documents by exact name only.
    Rules {
        /// Also require a valid Firebase ID token (`request.auth != null`).
        require_sign_in: bool,
    },
    /// IAM: a self-signed JWT of this service account only.
    Iam(IamKey),
}

impl FirestoreAuthCheck {
    /// The `--firestore-auth` spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            FirestoreAuthCheck::Open => "open",
            FirestoreAuthCheck::Rules { .. } => "rules",
            FirestoreAuthCheck::Iam(_) => "iam",
        }
    }
}

/// The public half of the one service account `iam` mode trusts.
#[derive(Clone)]
pub struct IamKey {
    /// `client_email`: the JWT's `iss`.
    pub client_email: String,
    /// `private_key_id`: the JWT header's `kid`.
    pub key_id: String,
    /// The RSA public key (PEM).
    pub public_key_pem: String,
}

impl std::fmt::Debug for IamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamKey")
            .field("client_email", &self.client_email)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A service-account key made for tests: never a real credential.
pub struct TestServiceAccount {
    /// The key file's text (`"type": "service_account"`), for `[firestore] credentials`.
    pub key_json: String,
    /// What the sandbox verifies its JWTs with.
    pub iam: IamKey,
}

impl TestServiceAccount {
    /// Generates a fresh 2048-bit RSA key for `paywatch-test@<project>.iam.gserviceaccount.com`.
    ///
    /// # Errors
    /// Key generation failed.
    pub fn generate(project_id: &str) -> anyhow::Result<TestServiceAccount> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
        let key_id = hex::encode(rand::random::<[u8; 20]>());
        let client_email = format!("paywatch-test@{project_id}.iam.gserviceaccount.com");
        let key_json = serde_json::json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": key_id,
            "private_key": key.serialize_pem(),
            "client_email": client_email,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string();
        Ok(TestServiceAccount {
            key_json,
            iam: IamKey {
                client_email,
                key_id,
                public_key_pem: key.public_key_pem(),
            },
        })
    }
}

/// A CA and a `localhost` / `127.0.0.1` server certificate it signed, made for tests.
pub struct TestCertificates {
    /// The CA certificate (PEM): what a client's `ca_file` holds.
    pub ca_pem: String,
    /// The server's certificate (PEM).
    pub server_cert_pem: String,
    /// The server's private key (PEM).
    pub server_key_pem: String,
}

impl TestCertificates {
    /// Generates a CA and a server certificate for `localhost` and `127.0.0.1`.
    ///
    /// # Errors
    /// Key or certificate generation failed.
    pub fn generate() -> anyhow::Result<TestCertificates> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "paywatch test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate()?;
        let mut server_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let server_cert = server_params.signed_by(&server_key, &issuer)?;
        Ok(TestCertificates {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        })
    }
}

/// The sandbox's Firebase Auth: issues anonymous users' ID tokens and refreshes them.
#[derive(Clone)]
pub struct FirebaseAuth {
    inner: Arc<FirebaseInner>,
}

struct FirebaseInner {
    web_api_key: String,
    project_id: String,
    lifetime: Mutex<Duration>,
    /// ID token → when it expires.
    id_tokens: Mutex<HashMap<String, Instant>>,
    /// Refresh token → the user it belongs to.
    refresh_tokens: Mutex<HashMap<String, String>>,
    refuse_refresh: AtomicBool,
    refuse_sign_up: AtomicBool,
    sign_ups: AtomicU64,
    refreshes: AtomicU64,
    /// Sign-ups refused (for any reason).
    refused_sign_ups: AtomicU64,
    /// The most sign-ups allowed in any hour (Firebase: about 100 per IP address).
    sign_up_limit: Mutex<u32>,
    /// When the sign-ups of the last hour were made.
    recent_sign_ups: Mutex<std::collections::VecDeque<Instant>>,
}

/// Firebase's per-IP limit on new accounts: about 100 an hour.
pub const DEFAULT_SIGN_UP_LIMIT_PER_HOUR: u32 = 100;

/// Counters of the sandbox's Firebase Auth and of refused Firestore callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthCounts {
    /// Successful `accounts:signUp` calls.
    pub sign_ups: u64,
    /// Successful token refreshes.
    pub refreshes: u64,
    /// Refused `accounts:signUp` calls (switched off, wrong key, over the hourly limit).
    pub refused_sign_ups: u64,
    /// Firestore calls refused UNAUTHENTICATED or PERMISSION_DENIED before they started.
    pub refused_calls: u64,
    /// Listen targets removed with PERMISSION_DENIED by the rules.
    pub denied_targets: u64,
    /// Listen streams ended because they outlived the caller's token.
    pub expired_streams: u64,
}

impl FirebaseAuth {
    pub(crate) fn new(web_api_key: String, project_id: String, lifetime: Duration) -> FirebaseAuth {
        FirebaseAuth {
            inner: Arc::new(FirebaseInner {
                web_api_key,
                project_id,
                lifetime: Mutex::new(lifetime),
                id_tokens: Mutex::new(HashMap::new()),
                refresh_tokens: Mutex::new(HashMap::new()),
                refuse_refresh: AtomicBool::new(false),
                refuse_sign_up: AtomicBool::new(false),
                sign_ups: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
                refused_sign_ups: AtomicU64::new(0),
                sign_up_limit: Mutex::new(DEFAULT_SIGN_UP_LIMIT_PER_HOUR),
                recent_sign_ups: Mutex::new(std::collections::VecDeque::new()),
            }),
        }
    }

    /// Sets the most sign-ups allowed in any hour (Firebase's per-IP limit is about 100).
    pub fn set_sign_up_limit_per_hour(&self, limit: u32) {
        *lock(&self.inner.sign_up_limit) = limit;
    }

    /// Forgets every refresh token issued so far: refreshing one answers
    /// `INVALID_REFRESH_TOKEN`, as for a deleted anonymous user (a new sign-up works).
    pub fn revoke_refresh_tokens(&self) {
        lock(&self.inner.refresh_tokens).clear();
    }

    /// Refused sign-ups so far.
    pub fn refused_sign_ups(&self) -> u64 {
        self.inner.refused_sign_ups.load(Ordering::SeqCst)
    }

    /// Whether one more sign-up fits in the hourly limit (and counts it if so).
    fn take_sign_up_slot(&self) -> bool {
        let limit = *lock(&self.inner.sign_up_limit);
        let mut recent = lock(&self.inner.recent_sign_ups);
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(3600))
        {
            recent.pop_front();
        }
        if recent.len() >= limit as usize {
            return false;
        }
        recent.push_back(now);
        true
    }

    /// The Web API key accepted.
    pub fn web_api_key(&self) -> &str {
        &self.inner.web_api_key
    }

    /// Sets the lifetime of ID tokens issued from now on (whole seconds, at least one).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *lock(&self.inner.lifetime) = lifetime.max(Duration::from_secs(1));
    }

    /// Makes refreshes fail (HTTP 400 `TOKEN_EXPIRED`), or work again.
    pub fn refuse_refresh(&self, refuse: bool) {
        self.inner.refuse_refresh.store(refuse, Ordering::SeqCst);
    }

    /// Makes anonymous sign-ups fail (HTTP 400 `OPERATION_NOT_ALLOWED`), or work again.
    pub fn refuse_sign_up(&self, refuse: bool) {
        self.inner.refuse_sign_up.store(refuse, Ordering::SeqCst);
    }

    /// Successful sign-ups and refreshes so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.sign_ups.load(Ordering::SeqCst),
            self.inner.refreshes.load(Ordering::SeqCst),
        )
    }

    /// When this ID token expires, if it was issued here and has not yet.
    fn id_token_expiry(&self, token: &str) -> Option<Instant> {
        lock(&self.inner.id_tokens)
            .get(token)
            .copied()
            .filter(|expires| *expires > Instant::now())
    }

    fn issue(&self, user: &str) -> (String, String, u64) {
        let lifetime = *lock(&self.inner.lifetime);
        let id_token = format!(
            "sandbox-id-token-{}",
            hex::encode(rand::random::<[u8; 16]>())
        );
        let refresh_token = format!(
            "sandbox-refresh-{}",
            hex::encode(rand::random::<[u8; 16]>())
        );
        let mut id_tokens = lock(&self.inner.id_tokens);
        let now = Instant::now();
        id_tokens.retain(|_, expires| *expires > now);
        id_tokens.insert(id_token.clone(), now + lifetime);
        lock(&self.inner.refresh_tokens).insert(refresh_token.clone(), user.to_owned());
        (id_token, refresh_token, lifetime.as_secs().max(1))
    }

    /// The two Firebase Auth routes, and `GET /_sandbox/firebase-auth` (the counters), for the
    /// sandbox's HTTP side.
    pub(crate) fn router(&self) -> Router {
        Router::new()
            .route(&format!("{IDENTITY_PATH}/accounts:signUp"), post(sign_up))
            .route(TOKEN_PATH, post(refresh))
            .route("/_sandbox/firebase-auth", axum::routing::get(counters))
            .with_state(self.clone())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

/// Firebase Auth's error body: `{"error": {"code": 400, "message": "..."}}`.
fn auth_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({
            "error": { "code": status.as_u16(), "message": message, "errors": [] }
        })),
    )
        .into_response()
}

fn key_refused(auth: &FirebaseAuth, query: &KeyQuery) -> Option<Response> {
    (query.key.as_deref() != Some(auth.web_api_key())).then(|| {
        auth_error(
            StatusCode::BAD_REQUEST,
            "API key not valid. Please pass a valid API key.",
        )
    })
}

/// `GET /_sandbox/firebase-auth`: sign-ups, refreshes and refused sign-ups so far.
async fn counters(State(auth): State<FirebaseAuth>) -> Response {
    let (sign_ups, refreshes) = auth.counts();
    Json(serde_json::json!({
        "sign_ups": sign_ups,
        "refreshes": refreshes,
        "refused_sign_ups": auth.refused_sign_ups(),
        "sign_up_limit_per_hour": *lock(&auth.inner.sign_up_limit),
    }))
    .into_response()
}

async fn sign_up(State(auth): State<FirebaseAuth>, Query(query): Query<KeyQuery>) -> Response {
    let refused = |response: Response| {
        auth.inner.refused_sign_ups.fetch_add(1, Ordering::SeqCst);
        response
    };
    if let Some(response) = key_refused(&auth, &query) {
        return refused(response);
    }
    if auth.inner.refuse_sign_up.load(Ordering::SeqCst) {
        return refused(auth_error(StatusCode::BAD_REQUEST, "OPERATION_NOT_ALLOWED"));
    }
    if !auth.take_sign_up_slot() {
        // What Identity Toolkit answers beyond its per-IP account-creation quota.
        return refused(auth_error(
            StatusCode::BAD_REQUEST,
            "TOO_MANY_ATTEMPTS_TRY_LATER",
        ));
    }
    let user = hex::encode(rand::random::<[u8; 14]>());
    let (id_token, refresh_token, seconds) = auth.issue(&user);
    auth.inner.sign_ups.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({
        "kind": "identitytoolkit#SignupNewUserResponse",
        "idToken": id_token,
        "refreshToken": refresh_token,
        "expiresIn": seconds.to_string(),
        "localId": user,
    }))
    .into_response()
}

async fn refresh(
    State(auth): State<FirebaseAuth>,
    Query(query): Query<KeyQuery>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = key_refused(&auth, &query) {
        return refused;
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return auth_error(StatusCode::BAD_REQUEST, "INVALID_GRANT_TYPE");
    }
    if auth.inner.refuse_refresh.load(Ordering::SeqCst) {
        return auth_error(StatusCode::BAD_REQUEST, "TOKEN_EXPIRED");
    }
    let user = form
        .get("refresh_token")
        .and_then(|token| lock(&auth.inner.refresh_tokens).get(token).cloned());
    let Some(user) = user else {
        return auth_error(StatusCode::BAD_REQUEST, "INVALID_REFRESH_TOKEN");
    };
    let (id_token, refresh_token, seconds) = auth.issue(&user);
    auth.inner.refreshes.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({
        "expires_in": seconds.to_string(),
        "token_type": "Bearer",
        "refresh_token": refresh_token,
        "id_token": id_token,
        "user_id": user,
        "project_id": auth.inner.project_id,
    }))
    .into_response()
}

/// A caller the built-in Firestore let in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admitted {
    /// The security rules apply (documents by exact name only).
    pub(crate) rules: bool,
    /// The rules see a signed-in user (or the rules do not require one): with `rules` and
    /// not signed in, every Listen target is removed with PERMISSION_DENIED.
    pub(crate) signed_in: bool,
    /// When the caller's token expires: a stream lasting longer is ended UNAUTHENTICATED.
    pub(crate) expires_at: Option<Instant>,
}

/// The built-in Firestore's caller check and its counters (made by [`crate::sandbox::Sandbox`]).
pub struct CallerCheck {
    check: FirestoreAuthCheck,
    firebase: FirebaseAuth,
    refused_calls: AtomicU64,
    pub(crate) denied_targets: AtomicU64,
    pub(crate) expired_streams: AtomicU64,
}

/// The claims of a self-signed service-account JWT that matter here.
#[derive(Debug, Deserialize)]
struct ServiceAccountClaims {
    iss: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    aud: Option<String>,
    exp: u64,
}

impl CallerCheck {
    pub(crate) fn new(check: FirestoreAuthCheck, firebase: FirebaseAuth) -> CallerCheck {
        CallerCheck {
            check,
            firebase,
            refused_calls: AtomicU64::new(0),
            denied_targets: AtomicU64::new(0),
            expired_streams: AtomicU64::new(0),
        }
    }

    /// The counters, with Firebase Auth's.
    pub(crate) fn counts(&self) -> AuthCounts {
        let (sign_ups, refreshes) = self.firebase.counts();
        AuthCounts {
            sign_ups,
            refreshes,
            refused_sign_ups: self.firebase.refused_sign_ups(),
            refused_calls: self.refused_calls.load(Ordering::SeqCst),
            denied_targets: self.denied_targets.load(Ordering::SeqCst),
            expired_streams: self.expired_streams.load(Ordering::SeqCst),
        }
    }

    /// Checks a call's `authorization` header.
    pub(crate) fn admit(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Admitted, Status> {
        let result = self.judge(metadata);
        if result.is_err() {
            self.refused_calls.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn judge(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Admitted, Status> {
        let authorization = match metadata.get("authorization") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| Status::unauthenticated(UNAUTHENTICATED_MESSAGE))?,
            ),
        };
        let bearer = authorization.map(|value| value.strip_prefix("Bearer ").unwrap_or(""));
        match &self.check {
            FirestoreAuthCheck::Open => Ok(Admitted {
                rules: false,
                signed_in: true,
                expires_at: None,
            }),
            // `Bearer owner` (the emulators' admin convention, which paywatch sends only to a
            // plaintext loopback endpoint in `none` mode) counts as no credential here: the
            // rules still apply, as they would to that caller in production.
            FirestoreAuthCheck::Rules { require_sign_in } => match bearer.filter(|t| *t != "owner")
            {
                // The call goes through; the rules then refuse what it asks for (each Listen
                // target is removed with PERMISSION_DENIED, GetDocument is refused).
                None => Ok(Admitted {
                    rules: true,
                    signed_in: !*require_sign_in,
                    expires_at: None,
                }),
                Some(token) => match self.firebase.id_token_expiry(token) {
                    Some(expires_at) => Ok(Admitted {
                        rules: true,
                        signed_in: true,
                        expires_at: Some(expires_at),
                    }),
                    None => Err(Status::unauthenticated(UNAUTHENTICATED_MESSAGE)),
                },
            },
            FirestoreAuthCheck::Iam(key) => {
                let token = bearer.filter(|token| !token.is_empty()).ok_or_else(|| {
                    Status::unauthenticated(
                        "Request is missing required authentication credential. Expected OAuth 2 \
                         access token, login cookie or other valid authentication credential.",
                    )
                })?;
                let expires_at = verify_service_account_jwt(key, token).map_err(|reason| {
                    Status::unauthenticated(format!(
                        "Request had invalid authentication credentials ({reason}). Expected \
                         OAuth 2 access token, login cookie or other valid authentication \
                         credential."
                    ))
                })?;
                Ok(Admitted {
                    rules: false,
                    signed_in: true,
                    expires_at: Some(expires_at),
                })
            }
        }
    }
}

/// Verifies a self-signed service-account JWT; returns when it expires.
fn verify_service_account_jwt(key: &IamKey, token: &str) -> Result<Instant, String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
    let header = decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
    if header.alg != Algorithm::RS256 {
        return Err(format!("algorithm {:?} is not RS256", header.alg));
    }
    if header.kid.as_deref() != Some(key.key_id.as_str()) {
        return Err("unknown key id".into());
    }
    let decoding = DecodingKey::from_rsa_pem(key.public_key_pem.as_bytes())
        .map_err(|e| format!("the sandbox's public key is unusable: {e}"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = 0;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "iss"]);
    validation.set_issuer(&[key.client_email.as_str()]);
    let claims = decode::<ServiceAccountClaims>(token, &decoding, &validation)
        .map_err(|e| format!("{e}"))?
        .claims;
    let scoped = claims.scope.as_deref().is_some_and(|scope| {
        scope.split(' ').any(|s| {
            s == "https://www.googleapis.com/auth/cloud-platform"
                || s == "https://www.googleapis.com/auth/datastore"
        })
    });
    let for_firestore = claims
        .aud
        .as_deref()
        .is_some_and(|aud| aud.trim_end_matches('/') == "https://firestore.googleapis.com");
    if !scoped && !for_firestore {
        return Err("neither a Firestore scope nor the Firestore audience".into());
    }
    debug_assert_eq!(claims.iss, key.client_email);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "clock before 1970".to_owned())?
        .as_secs();
    let left = Duration::from_secs(claims.exp.saturating_sub(now));
    Ok(Instant::now() + left)
}

#[cfg(test)]
mod tests;
