//! Firebase Auth for `[firestore] auth = "firebase-anonymous"`: an anonymous user whose ID
//! token is the bearer of every Firestore call.
//!
//! Owns: the Identity Toolkit `accounts:signUp` call, the Secure Token refresh, the current
//! ID token, and a background task that renews it before it expires (at a quarter of its
//! lifetime before expiry, at most five minutes before). Each renewal bumps a counter the
//! listener watches: Firestore checks a stream's token when the stream opens and ends a stream
//! that outlives it (UNAUTHENTICATED "Missing or invalid authentication"; the Firebase web SDK
//! re-establishes its streams when its token is renewed), so open streams are reopened, with
//! their resume tokens, on the fresh token.
//! Must never: log or return the API key, an ID token or a refresh token (each is registered
//! for scrubbing, and every excerpt of Firebase Auth's answers goes through the scrub).
//!
//! Wire format (Firebase Auth REST API): `POST {identity}/accounts:signUp?key=KEY` with
//! `{"returnSecureToken":true}` answers `{idToken, refreshToken, expiresIn, localId}`;
//! `POST {token}?key=KEY` with the form `grant_type=refresh_token&refresh_token=...` answers
//! `{id_token, refresh_token, expires_in, user_id}`. `expiresIn` is a string of seconds.

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
}

struct IdToken {
    refresh_token: String,
    expires_at: Instant,
    lifetime: Duration,
    headers: HeaderMap,
    tag: EntityTag,
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
    /// A session that signs in on first use. Must run inside a Tokio runtime (it spawns the
    /// renewal task).
    ///
    /// # Errors
    /// An endpoint that is not `https://` (or `http://` to loopback), or a bad CA file.
    pub(crate) fn new(
        api_key: Secret,
        identity_endpoint: &str,
        token_endpoint: &str,
        ca_pem: Option<&[u8]>,
    ) -> anyhow::Result<FirebaseAnonymous> {
        for (key, url) in [
            ("firestore.identity_endpoint", identity_endpoint),
            ("firestore.token_endpoint", token_endpoint),
        ] {
            check_endpoint(key, url)?;
        }
        let mut builder = reqwest::Client::builder()
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

    /// Signs in once (for `check-config --online`) and says how long the token lasts.
    ///
    /// # Errors
    /// What Firebase Auth answered, naming the endpoint.
    pub(crate) async fn sign_in_once(&self) -> anyhow::Result<Duration> {
        let token = self.inner.sign_up().await?;
        Ok(token.lifetime)
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
        if !token.as_ref().is_some_and(IdToken::usable) {
            let fresh = self
                .inner
                .renew(token.as_ref())
                .await
                .map_err(|error| CredentialsError::from_msg(true, format!("{error:#}")))?;
            self.inner.due.send_replace(Some(fresh.renew_at()));
            *token = Some(fresh);
        }
        let Some(token) = token.as_ref() else {
            return Err(CredentialsError::from_msg(true, "no Firebase ID token"));
        };
        if extensions.get::<EntityTag>() == Some(&token.tag) {
            return Ok(CacheableResource::NotModified);
        }
        Ok(CacheableResource::New {
            entity_tag: token.tag.clone(),
            data: token.headers.clone(),
        })
    }

    async fn universe_domain(&self) -> Option<String> {
        Some("googleapis.com".to_owned())
    }
}

impl Inner {
    /// A fresh token: refreshes `current` if there is one, else (or if the refresh is
    /// refused) signs up a new anonymous user.
    async fn renew(&self, current: Option<&IdToken>) -> anyhow::Result<IdToken> {
        if let Some(current) = current {
            match self.refresh(&current.refresh_token).await {
                Ok(token) => return Ok(token),
                Err(error) => {
                    tracing::warn!(
                        endpoint = %self.token_endpoint,
                        "could not refresh the Firebase ID token ({error:#}); signing in \
                         anonymously again"
                    );
                }
            }
        }
        self.sign_up().await
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
            "signed in to Firebase Auth anonymously"
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
            _ => "",
        };
        anyhow::bail!("{what} at {endpoint} was refused: HTTP {status}: {reason}{hint}");
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
        "http" if parsed.host_str().is_some_and(super::connect::is_loopback) => Ok(()),
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
mod tests {
    use super::*;

    #[test]
    fn renewal_is_a_quarter_of_the_lifetime_ahead_at_most_five_minutes() {
        let token = id_token("t".into(), "r".into(), "3600").expect("token");
        let ahead = token.expires_at - token.renew_at();
        assert_eq!(ahead, MAX_RENEW_AHEAD);
        let short = id_token("t".into(), "r".into(), "8").expect("token");
        assert_eq!(short.expires_at - short.renew_at(), Duration::from_secs(2));
        assert!(short.usable());
    }

    #[test]
    fn unusable_lifetimes_are_refused() {
        for bad in ["0", "-5", "abc", "99999999"] {
            assert!(id_token("t".into(), "r".into(), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_are_https_or_loopback() {
        assert!(check_endpoint("k", "https://securetoken.googleapis.com/v1/token").is_ok());
        assert!(check_endpoint("k", "http://127.0.0.1:9/v1/token").is_ok());
        assert!(check_endpoint("k", "http://example.com/v1/token").is_err());
    }
}
