//! Firebase Auth for `[firestore] auth = "firebase-anonymous"`: an anonymous user whose ID
//! token is the bearer of every Firestore call.
//!
//! Owns: the Identity Toolkit `accounts:signUp` call, the Secure Token refresh, the current
//! ID token, the identity file (the refresh token, kept next to the ledger with mode 0600 and
//! reused after a restart: Firebase allows about 100 sign-ups per hour per IP address, so a
//! restart loop or a fleet behind one NAT must not sign up a user each time), and a background
//! task that renews the token before it expires (at a quarter of its
//! lifetime before expiry, at most five minutes before). Each renewal bumps a counter the
//! listener watches: Firestore checks a stream's token when the stream opens and ends a stream
//! that outlives it (UNAUTHENTICATED "Missing or invalid authentication"; the Firebase web SDK
//! re-establishes its streams when its token is renewed), so open streams are reopened, with
//! their resume tokens, on the fresh token.
//! A new anonymous user is signed up only when there is no stored identity or Firebase Auth
//! refuses it (`TOKEN_EXPIRED`, `USER_DISABLED`, `INVALID_REFRESH_TOKEN`, ...: logged at warn);
//! a refresh that fails for any other reason (network, 5xx, a redirect) is retried with the same
//! identity. Failed sign-ups back off (5 s doubling to 15 min). The HTTP client follows no
//! redirects: a 3xx must not carry the refresh token or the API key to another address.
//! Must never: log or return the API key, an ID token or a refresh token (each is registered
//! for scrubbing, and every excerpt of Firebase Auth's answers goes through the scrub), or
//! write the identity file with any mode but 0600.
//!
//! Wire format (Firebase Auth REST API): `POST {identity}/accounts:signUp?key=KEY` with
//! `{"returnSecureToken":true}` answers `{idToken, refreshToken, expiresIn, localId}`;
//! `POST {token}?key=KEY` with the form `grant_type=refresh_token&refresh_token=...` answers
//! `{id_token, refresh_token, expires_in, user_id}`. `expiresIn` is a string of seconds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use gcloud_sdk::google_cloud_auth::credentials::{
    CacheableResource, Credentials, CredentialsProvider, EntityTag,
};
use gcloud_sdk::google_cloud_auth::errors::CredentialsError;
use http::{Extensions, HeaderMap, HeaderValue};
use serde::Deserialize;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::settings::Secret;

/// The longest a token is renewed ahead of its expiry.
const MAX_RENEW_AHEAD: Duration = Duration::from_secs(300);
/// The longest wait between two attempts when renewing fails.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Timeout of one Firebase Auth call.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// The wait after the first failed sign-up; it doubles with each failure in a row.
const SIGN_UP_BACKOFF_INITIAL: Duration = Duration::from_secs(5);
/// The longest wait between two sign-up attempts (also the wait after Firebase said too many).
const SIGN_UP_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);
/// What the per-IP sign-up limit is, for messages.
pub(crate) const SIGN_UP_LIMIT_TEXT: &str = "Firebase allows about 100 anonymous sign-ups per hour per IP address (a restart \
     loop or many daemons behind one NAT use them up)";
/// Secure Token refusals that mean the stored identity itself is no good (a new sign-up is
/// the only way on). Any other failure is retried with the same identity.
const IDENTITY_REFUSED: [&str; 6] = [
    "TOKEN_EXPIRED",
    "USER_DISABLED",
    "USER_NOT_FOUND",
    "INVALID_REFRESH_TOKEN",
    "MISSING_REFRESH_TOKEN",
    "PROJECT_NUMBER_MISMATCH",
];

/// Where a `firebase-anonymous` identity is kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFile {
    /// The file (mode 0600; next to the ledger).
    pub path: PathBuf,
    /// Read it but never write it (`check-config`: the daemon owns the file).
    pub read_only: bool,
}

/// An anonymous Firebase Auth session; clones share it. Dropping the last clone stops the
/// renewal task.
#[derive(Clone)]
pub(crate) struct FirebaseAnonymous {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    api_key: Secret,
    sign_up_url: String,
    token_url: String,
    identity_endpoint: String,
    token_endpoint: String,
    /// The current ID token, if signed in.
    token: Mutex<Option<IdToken>>,
    /// When the next renewal is due (None until the first sign-in).
    due: watch::Sender<Option<Instant>>,
    /// Bumped after each renewal ahead of expiry.
    renewed: watch::Sender<u64>,
    /// Where the identity is kept, if anywhere.
    identity_file: Option<IdentityFile>,
    /// The refresh token of the identity read from `identity_file` at start, until it is used.
    stored: Mutex<Option<String>>,
    /// Key fingerprint and token endpoint an identity file must name to be used.
    owner: IdentityOwner,
    /// Failed sign-ups in a row, and when the next may be tried.
    sign_up_backoff: std::sync::Mutex<(u32, Option<Instant>)>,
    /// The refresh token to write to `identity_file` next (the latest wins), written by
    /// [`Inner::flush_identity`] once the new ID token is in use: a slow disk never delays it.
    to_save: std::sync::Mutex<Option<String>>,
    /// Held while the identity file is written, so writes never interleave.
    writing: Mutex<()>,
}

/// What a stored identity belongs to: a refresh token is sent only to the token endpoint and
/// with the API key it was issued for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
struct IdentityOwner {
    /// The first 16 hex digits of the SHA-256 of the Web API key (never the key).
    api_key_sha256: String,
    /// The token endpoint.
    token_endpoint: String,
}

/// The identity file's contents.
#[derive(serde::Serialize, Deserialize)]
struct StoredIdentity {
    #[serde(flatten)]
    owner: IdentityOwner,
    refresh_token: String,
}

struct IdToken {
    refresh_token: String,
    expires_at: Instant,
    lifetime: Duration,
    headers: HeaderMap,
    tag: EntityTag,
}

impl std::fmt::Debug for IdToken {
    /// Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdToken")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl IdToken {
    /// Still usable for a call that starts now (a small margin for clock and transit).
    fn usable(&self) -> bool {
        let margin = (self.lifetime / 10).min(Duration::from_secs(30));
        Instant::now() + margin < self.expires_at
    }

    /// When to renew it.
    fn renew_at(&self) -> Instant {
        let ahead = (self.lifetime / 4).min(MAX_RENEW_AHEAD);
        self.expires_at
            .checked_sub(ahead)
            .unwrap_or(self.expires_at)
    }
}

impl std::fmt::Debug for FirebaseAnonymous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirebaseAnonymous")
            .field("identity_endpoint", &self.inner.identity_endpoint)
            .field("token_endpoint", &self.inner.token_endpoint)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignUpAnswer {
    id_token: String,
    refresh_token: String,
    expires_in: String,
}

#[derive(Deserialize)]
struct RefreshAnswer {
    id_token: String,
    refresh_token: String,
    expires_in: String,
}

impl FirebaseAnonymous {
    /// A session that signs in on first use, with the identity stored in `identity_file` if
    /// there is a usable one. Must run inside a Tokio runtime (it spawns the renewal task).
    ///
    /// # Errors
    /// An endpoint that is not `https://` (or `http://` to loopback), or a bad CA file.
    pub(crate) fn new(
        api_key: Secret,
        identity_endpoint: &str,
        token_endpoint: &str,
        ca_pem: Option<&[u8]>,
        identity_file: Option<IdentityFile>,
    ) -> anyhow::Result<FirebaseAnonymous> {
        for (key, url) in [
            ("firestore.identity_endpoint", identity_endpoint),
            ("firestore.token_endpoint", token_endpoint),
        ] {
            check_endpoint(key, url)?;
        }
        // No redirects: a 3xx from an endpoint must not make paywatch post the refresh token
        // or the API key to another address (which `check_endpoint` never saw).
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("paywatch/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .context("'firestore.ca_file' is not valid PEM")?;
            builder = builder.tls_certs_merge(certificates);
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        let identity_endpoint = identity_endpoint.trim_end_matches('/').to_owned();
        let (due, _) = watch::channel(None);
        let (renewed, _) = watch::channel(0);
        let owner = IdentityOwner {
            api_key_sha256: key_fingerprint(&api_key),
            token_endpoint: token_endpoint.to_owned(),
        };
        let stored = identity_file
            .as_ref()
            .and_then(|file| load_identity(&file.path, &owner));
        let inner = Arc::new(Inner {
            http,
            api_key,
            sign_up_url: format!("{identity_endpoint}/accounts:signUp"),
            token_url: token_endpoint.to_owned(),
            identity_endpoint,
            token_endpoint: token_endpoint.to_owned(),
            token: Mutex::new(None),
            due,
            renewed,
            identity_file,
            stored: Mutex::new(stored),
            owner,
            sign_up_backoff: std::sync::Mutex::new((0, None)),
            to_save: std::sync::Mutex::new(None),
            writing: Mutex::new(()),
        });
        tokio::spawn(renew_ahead(Arc::downgrade(&inner), inner.due.subscribe()));
        Ok(FirebaseAnonymous { inner })
    }

    /// Changes after each renewal ahead of expiry.
    pub(crate) fn renewed(&self) -> watch::Receiver<u64> {
        self.inner.renewed.subscribe()
    }

    /// The credentials to give gcloud-sdk's middleware.
    pub(crate) fn credentials(&self) -> Credentials {
        Credentials::from(AnonymousCredentials {
            inner: Arc::clone(&self.inner),
        })
    }

    /// Signs in once (for `check-config --online`): with the stored identity if there is one,
    /// else as a new anonymous user. Says how long the token lasts and whether the stored
    /// identity was used.
    ///
    /// # Errors
    /// What Firebase Auth answered, naming the endpoint.
    pub(crate) async fn sign_in_once(&self) -> anyhow::Result<(Duration, bool)> {
        let stored = self.inner.stored.lock().await.clone();
        if let Some(refresh_token) = stored {
            let token = self.inner.refresh(&refresh_token).await?;
            return Ok((token.lifetime, true));
        }
        let token = self.inner.sign_up().await?;
        Ok((token.lifetime, false))
    }
}

/// The [`CredentialsProvider`] face of the session.
struct AnonymousCredentials {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AnonymousCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnonymousCredentials")
            .finish_non_exhaustive()
    }
}

impl CredentialsProvider for AnonymousCredentials {
    async fn headers(
        &self,
        extensions: Extensions,
    ) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
        let mut token = self.inner.token.lock().await;
        let mut renewed = false;
        if !token.as_ref().is_some_and(IdToken::usable) {
            let fresh = self
                .inner
                .renew(token.as_ref())
                .await
                .map_err(|error| CredentialsError::from_msg(true, format!("{error:#}")))?;
            self.inner.due.send_replace(Some(fresh.renew_at()));
            *token = Some(fresh);
            renewed = true;
        }
        let answer = match token.as_ref() {
            None => Err(CredentialsError::from_msg(true, "no Firebase ID token")),
            Some(token) if extensions.get::<EntityTag>() == Some(&token.tag) => {
                Ok(CacheableResource::NotModified)
            }
            Some(token) => Ok(CacheableResource::New {
                entity_tag: token.tag.clone(),
                data: token.headers.clone(),
            }),
        };
        drop(token);
        if renewed {
            // Before the first call on the new identity goes out: kept before it is used.
            self.inner.flush_identity().await;
        }
        answer
    }

    async fn universe_domain(&self) -> Option<String> {
        Some("googleapis.com".to_owned())
    }
}

impl Inner {
    /// A fresh token: refreshes the current identity (or the stored one) if there is one, else
    /// (or if Firebase Auth refuses that identity) signs up a new anonymous user.
    async fn renew(&self, current: Option<&IdToken>) -> anyhow::Result<IdToken> {
        let known = match current {
            Some(current) => Some(current.refresh_token.clone()),
            None => self.stored.lock().await.clone(),
        };
        if let Some(refresh_token) = known {
            match self.refresh(&refresh_token).await {
                Ok(token) => {
                    self.stored.lock().await.take();
                    if token.refresh_token != refresh_token || current.is_none() {
                        self.keep(&token.refresh_token);
                    }
                    return Ok(token);
                }
                Err(error) => {
                    let refused = error
                        .downcast_ref::<AuthRefusal>()
                        .is_some_and(|refusal| IDENTITY_REFUSED.contains(&refusal.code()));
                    if !refused {
                        // Not about the identity (network, 5xx, a redirect, the API key): a
                        // new user would not help, and would use up the sign-up quota.
                        return Err(error);
                    }
                    self.stored.lock().await.take();
                    tracing::warn!(
                        endpoint = %self.token_endpoint,
                        "Firebase Auth refused the stored anonymous identity ({error:#}); signing \
                         up a new anonymous user. {SIGN_UP_LIMIT_TEXT}: if this repeats, check \
                         that the project still allows anonymous users and that nothing deletes \
                         them"
                    );
                }
            }
        }
        let token = self.sign_up_with_backoff().await?;
        self.keep(&token.refresh_token);
        Ok(token)
    }

    /// Signs up, unless a failed sign-up was too recent (the backoff).
    async fn sign_up_with_backoff(&self) -> anyhow::Result<IdToken> {
        let now = Instant::now();
        {
            let backoff = lock(&self.sign_up_backoff);
            if let (failures, Some(not_before)) = *backoff
                && now < not_before
            {
                anyhow::bail!(
                    "not signing up to Firebase Auth again for {} s after {failures} failed \
                     sign-up(s) in a row ({SIGN_UP_LIMIT_TEXT})",
                    (not_before - now).as_secs().max(1)
                );
            }
        }
        let result = self.sign_up().await;
        let mut backoff = lock(&self.sign_up_backoff);
        match &result {
            Ok(_) => *backoff = (0, None),
            Err(error) => {
                let failures = backoff.0.saturating_add(1);
                let mut wait = SIGN_UP_BACKOFF_INITIAL
                    .saturating_mul(1 << failures.saturating_sub(1).min(16))
                    .min(SIGN_UP_BACKOFF_MAX);
                if error
                    .downcast_ref::<AuthRefusal>()
                    .is_some_and(AuthRefusal::too_many)
                {
                    wait = SIGN_UP_BACKOFF_MAX;
                }
                *backoff = (failures, Some(Instant::now() + wait));
            }
        }
        result
    }

    /// Notes `refresh_token` as the identity to keep; [`Inner::flush_identity`] writes it.
    fn keep(&self, refresh_token: &str) {
        if self
            .identity_file
            .as_ref()
            .is_some_and(|file| !file.read_only)
        {
            *lock(&self.to_save) = Some(refresh_token.to_owned());
        }
    }

    /// Writes the identity noted by [`Inner::keep`], if any, to the identity file. A failure
    /// is logged: the daemon carries on, but its next start signs up again.
    async fn flush_identity(&self) {
        let Some(file) = self.identity_file.as_ref().filter(|file| !file.read_only) else {
            return;
        };
        let _writing = self.writing.lock().await;
        // Taken under the write lock: of two flushes, the later writes the latest identity.
        let Some(refresh_token) = lock(&self.to_save).take() else {
            return;
        };
        let path = file.path.clone();
        let identity = StoredIdentity {
            owner: self.owner.clone(),
            refresh_token,
        };
        let written = tokio::task::spawn_blocking(move || write_identity(&path, &identity)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                path = %file.path.display(),
                "cannot keep the Firebase identity ({error}); the next start will sign up a new \
                 anonymous user ({SIGN_UP_LIMIT_TEXT}): check that paywatch may write the \
                 ledger's directory"
            ),
            Err(error) => tracing::warn!("cannot keep the Firebase identity: {error}"),
        }
    }

    async fn sign_up(&self) -> anyhow::Result<IdToken> {
        let response = self
            .http
            .post(&self.sign_up_url)
            .query(&[("key", self.api_key.expose())])
            .json(&serde_json::json!({ "returnSecureToken": true }))
            .send()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "anonymous sign-in at {} failed: {}",
                    self.identity_endpoint,
                    without_url(error)
                )
            })?;
        let answer: SignUpAnswer =
            read_answer(response, "anonymous sign-in", &self.identity_endpoint).await?;
        let token = id_token(answer.id_token, answer.refresh_token, &answer.expires_in)?;
        tracing::info!(
            endpoint = %self.identity_endpoint,
            lifetime = %humantime::format_duration(token.lifetime),
            kept_in = ?self.identity_file.as_ref().filter(|f| !f.read_only).map(|f| f.path.display().to_string()),
            "signed up a new anonymous Firebase user"
        );
        Ok(token)
    }

    async fn refresh(&self, refresh_token: &str) -> anyhow::Result<IdToken> {
        let response = self
            .http
            .post(&self.token_url)
            .query(&[("key", self.api_key.expose())])
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "refreshing the Firebase ID token at {} failed: {}",
                    self.token_endpoint,
                    without_url(error)
                )
            })?;
        let answer: RefreshAnswer = read_answer(
            response,
            "refreshing the Firebase ID token",
            &self.token_endpoint,
        )
        .await?;
        id_token(answer.id_token, answer.refresh_token, &answer.expires_in)
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The first 16 hex digits of the key's SHA-256: enough to tell keys apart, useless to recover
/// one.
fn key_fingerprint(api_key: &Secret) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(api_key.expose().trim().as_bytes());
    hex::encode(&digest[..8])
}

/// Reads the identity file: the refresh token, if the file exists, is readable, and belongs to
/// `owner`. Problems are logged (never the file's contents) and mean "no stored identity".
fn load_identity(path: &Path, owner: &IdentityOwner) -> Option<String> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), "cannot read the stored Firebase identity ({error}); signing up a new anonymous user instead");
            return None;
        }
    };
    tighten_mode(path);
    // The parse error's position only: its message could quote the token.
    let stored: StoredIdentity = match serde_json::from_slice(&text) {
        Ok(stored) => stored,
        Err(error) => {
            tracing::warn!(path = %path.display(), line = error.line(), column = error.column(), "the stored Firebase identity is not valid; signing up a new anonymous user instead");
            return None;
        }
    };
    if stored.owner != *owner || stored.refresh_token.is_empty() {
        tracing::info!(path = %path.display(), "the stored Firebase identity belongs to another Web API key or token endpoint; it is not sent, and a new anonymous user is signed up");
        return None;
    }
    // Scrubbed from excerpts like a freshly issued one.
    crate::domain::register_rotating_secret(&stored.refresh_token);
    Some(stored.refresh_token)
}

/// Makes a group- or world-readable identity file private again (warning about it).
#[cfg(unix)]
fn tighten_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the Firebase identity file was readable by others; setting its mode to 0600");
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

#[cfg(not(unix))]
fn tighten_mode(_path: &Path) {}

/// Writes the identity file atomically (a 0600 temporary file renamed over it).
///
/// # Errors
/// The I/O error (it names no secret).
fn write_identity(path: &Path, identity: &StoredIdentity) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_vec(identity).map_err(std::io::Error::other)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary)?;
    tighten_mode(&temporary);
    file.write_all(&text)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)
}

/// Firebase Auth answered with an error status.
#[derive(Debug)]
struct AuthRefusal {
    /// The full message (what, where, status, reason, hint).
    text: String,
    /// The HTTP status.
    status: reqwest::StatusCode,
    /// Firebase's `error.message` (printable), or "no reason given".
    reason: String,
}

impl AuthRefusal {
    /// The reason's code: `TOKEN_EXPIRED` of `TOKEN_EXPIRED : ...`.
    fn code(&self) -> &str {
        self.reason.split([' ', ':']).next().unwrap_or_default()
    }

    /// Firebase said: too many requests (the per-IP sign-up quota, or throttling).
    fn too_many(&self) -> bool {
        self.status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || [
                "TOO_MANY_ATTEMPTS_TRY_LATER",
                "QUOTA_EXCEEDED",
                "RESOURCE_EXHAUSTED",
            ]
            .contains(&self.code())
    }
}

impl std::fmt::Display for AuthRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for AuthRefusal {}

/// A reqwest error with its causes, without its URL (the URL carries the API key).
fn without_url(error: reqwest::Error) -> String {
    format!("{:#}", anyhow::Error::from(error.without_url()))
}

/// Decodes a Firebase Auth answer, or says what it refused (its `error.message`, e.g.
/// `API_KEY_INVALID`, `OPERATION_NOT_ALLOWED`, `TOKEN_EXPIRED`).
async fn read_answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    what: &str,
    endpoint: &str,
) -> anyhow::Result<T> {
    let status = response.status();
    if status.is_redirection() {
        let refusal = AuthRefusal {
            text: format!(
                "{what} at {endpoint} was redirected (HTTP {status}); redirects are not followed, \
                 so nothing was sent elsewhere: check the endpoint setting"
            ),
            status,
            reason: "redirect".to_owned(),
        };
        return Err(refusal.into());
    }
    let body = response.bytes().await.unwrap_or_default();
    if !status.is_success() {
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|json| {
                json.pointer("/error/message")
                    .and_then(|m| m.as_str())
                    .map(crate::domain::printable)
            })
            .unwrap_or_else(|| "no reason given".to_owned());
        let hint = match reason.as_str() {
            r if r.starts_with("API_KEY") || r.contains("API key") => {
                "; check [firestore] api_key (the Firebase Web API key of the project holding the checkout documents)"
            }
            r if r.starts_with("OPERATION_NOT_ALLOWED")
                || r.starts_with("ADMIN_ONLY_OPERATION") =>
            {
                "; the project does not allow anonymous sign-in: try auth = \"none\""
            }
            _ if what == "anonymous sign-in" => {
                // Whatever the reason, the per-IP quota is the likeliest cause of a sudden
                // refusal, and the one the operator cannot see anywhere else.
                "; note: Firebase allows about 100 anonymous sign-ups per hour per IP address \
                 (a restart loop or many daemons behind one NAT use them up); paywatch keeps \
                 its identity next to the ledger so restarts do not sign up again"
            }
            _ => "",
        };
        let refusal = AuthRefusal {
            text: format!("{what} at {endpoint} was refused: HTTP {status}: {reason}{hint}"),
            status,
            reason,
        };
        return Err(refusal.into());
    }
    // serde's message can quote the answer: scrubbed like any excerpt (`printable` does it for
    // the refusal's reason above).
    serde_json::from_slice(&body).map_err(|error| {
        anyhow::anyhow!(
            "{what} at {endpoint} gave an unexpected answer: {}",
            crate::domain::scrub_secrets(&error.to_string())
        )
    })
}

fn id_token(id_token: String, refresh_token: String, expires_in: &str) -> anyhow::Result<IdToken> {
    // From now on an upstream that echoes a request carrying them sees them scrubbed.
    crate::domain::register_rotating_secret(&id_token);
    crate::domain::register_rotating_secret(&refresh_token);
    let seconds: u64 = expires_in
        .trim()
        .parse()
        .ok()
        .filter(|seconds| (1..=7 * 24 * 3600).contains(seconds))
        .with_context(|| {
            format!(
                "Firebase Auth gave an ID token with an unusable lifetime '{}'",
                crate::domain::printable(expires_in)
            )
        })?;
    let lifetime = Duration::from_secs(seconds);
    let mut value = HeaderValue::from_str(&format!("Bearer {id_token}"))
        .context("Firebase Auth gave an ID token that is not a valid header value")?;
    value.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    Ok(IdToken {
        refresh_token,
        expires_at: Instant::now() + lifetime,
        lifetime,
        headers,
        tag: EntityTag::new(),
    })
}

/// `https://`, or `http://` to a loopback host.
fn check_endpoint(key: &str, url: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        crate::settings::SettingsError(format!("'{key}' value '{url}' is not a URL: {error}"))
    })?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http"
            if parsed
                .host_str()
                .is_some_and(crate::settings::is_loopback_host) =>
        {
            Ok(())
        }
        _ => Err(crate::settings::SettingsError(format!(
            "'{key}' value '{url}' must be https:// (plaintext http only to a loopback host)"
        ))
        .into()),
    }
}

/// Renews the token ahead of its expiry until the session is dropped.
async fn renew_ahead(session: Weak<Inner>, mut due: watch::Receiver<Option<Instant>>) {
    let mut retry = Duration::from_secs(1);
    loop {
        let at = *due.borrow_and_update();
        let Some(at) = at else {
            if due.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = due.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            () = tokio::time::sleep_until(at) => {}
        }
        let Some(inner) = session.upgrade() else {
            return;
        };
        let mut token = inner.token.lock().await;
        match inner.renew(token.as_ref()).await {
            Ok(fresh) => {
                retry = Duration::from_secs(1);
                tracing::debug!(
                    lifetime = %humantime::format_duration(fresh.lifetime),
                    "renewed the Firebase ID token ahead of its expiry"
                );
                inner.due.send_replace(Some(fresh.renew_at()));
                *token = Some(fresh);
                drop(token);
                inner.renewed.send_modify(|count| *count += 1);
                inner.flush_identity().await;
            }
            Err(error) => {
                let expired = !token.as_ref().is_some_and(IdToken::usable);
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                if expired {
                    tracing::error!(
                        retry_in = ?wait,
                        "the Firebase ID token expired and could not be renewed: {error:#}; \
                         Firestore will refuse the streams until it is. Check [firestore] \
                         api_key, identity_endpoint and token_endpoint"
                    );
                } else {
                    tracing::warn!(retry_in = ?wait, "could not renew the Firebase ID token yet: {error:#}");
                }
                inner.due.send_replace(Some(Instant::now() + wait));
            }
        }
    }
}

#[cfg(test)]
mod tests;
