//! Unit tests of `firebase_auth`.

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

/// A tiny Firebase Auth on loopback: sign-ups issue `refresh-N`, refreshes accept only
/// tokens it issued; every other path answers 307 to `elsewhere` (when set).
struct FakeAuth {
    base: String,
    sign_ups: Arc<std::sync::atomic::AtomicU64>,
    refreshes: Arc<std::sync::atomic::AtomicU64>,
    valid: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

async fn fake_auth() -> FakeAuth {
    use std::sync::atomic::Ordering;
    let sign_ups = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refreshes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let valid = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (s, r, v1, v2) = (
        sign_ups.clone(),
        refreshes.clone(),
        valid.clone(),
        valid.clone(),
    );
    let router = axum::Router::new()
        .route(
            "/v1/accounts:signUp",
            axum::routing::post(move || {
                let n = s.fetch_add(1, Ordering::SeqCst) + 1;
                let token = format!("refresh-{n}");
                lock(&v1).push(token.clone());
                async move {
                    axum::Json(serde_json::json!({
                        "idToken": format!("id-{n}"), "refreshToken": token, "expiresIn": "3600"
                    }))
                }
            }),
        )
        .route(
            "/v1/token",
            axum::routing::post(
                move |axum::Form(form): axum::Form<std::collections::HashMap<String, String>>| {
                    let token = form.get("refresh_token").cloned().unwrap_or_default();
                    let known = lock(&v2).contains(&token);
                    if known {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    async move {
                        if known {
                            (
                                http::StatusCode::OK,
                                axum::Json(serde_json::json!({
                                    "id_token": "id-r", "refresh_token": token, "expires_in": "3600"
                                })),
                            )
                        } else {
                            (
                                http::StatusCode::BAD_REQUEST,
                                axum::Json(serde_json::json!({
                                    "error": {"code": 400, "message": "INVALID_REFRESH_TOKEN"}
                                })),
                            )
                        }
                    }
                },
            ),
        );
    FakeAuth {
        base: serve(router).await,
        sign_ups,
        refreshes,
        valid,
    }
}

fn session(auth: &FakeAuth, file: &Path) -> FirebaseAnonymous {
    FirebaseAnonymous::new(
        Secret::new("web-key"),
        &format!("{}/v1", auth.base),
        &format!("{}/v1/token", auth.base),
        None,
        Some(IdentityFile {
            path: file.to_owned(),
            read_only: false,
        }),
    )
    .expect("session")
}

/// Issue 21: the identity survives a restart (one sign-up for any number of sessions), is
/// kept 0600, and a refused one is replaced by exactly one new sign-up.
#[tokio::test]
async fn the_identity_is_kept_and_a_refused_one_is_replaced_once() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::Ordering;
    let auth = fake_auth().await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("paywatch.db.firebase-identity");
    for _ in 0..10 {
        let restarted = session(&auth, &file);
        restarted.inner.renew(None).await.expect("signed in");
        restarted.inner.flush_identity().await;
    }
    assert_eq!(auth.sign_ups.load(Ordering::SeqCst), 1);
    assert_eq!(auth.refreshes.load(Ordering::SeqCst), 9);
    let mode = std::fs::metadata(&file).expect("kept").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Firebase Auth forgets the user: one new sign-up, then that one is reused.
    lock(&auth.valid).clear();
    let replaced = session(&auth, &file);
    replaced.inner.renew(None).await.expect("signed up again");
    replaced.inner.flush_identity().await;
    assert_eq!(auth.sign_ups.load(Ordering::SeqCst), 2);
    session(&auth, &file)
        .inner
        .renew(None)
        .await
        .expect("reused");
    assert_eq!(auth.sign_ups.load(Ordering::SeqCst), 2);

    // Another API key's identity is not sent (and not used).
    let other = FirebaseAnonymous::new(
        Secret::new("another-key"),
        &format!("{}/v1", auth.base),
        &format!("{}/v1/token", auth.base),
        None,
        Some(IdentityFile {
            path: file.clone(),
            read_only: false,
        }),
    )
    .expect("session");
    assert!(other.inner.stored.lock().await.is_none());
}

/// Issue 21: a refresh that fails for a reason other than the identity (here: nothing
/// listening) signs nobody up; failed sign-ups back off; a refused sign-up names the
/// per-IP limit.
#[tokio::test]
async fn only_a_refused_identity_signs_up_and_failed_sign_ups_back_off() {
    use std::sync::atomic::Ordering;
    let auth = fake_auth().await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("identity");
    // The token endpoint fails (503): the stored identity is kept, nobody is signed up.
    let sign_up_hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hits = sign_up_hits.clone();
    let failing = serve(
        axum::Router::new()
            .route(
                "/v1/accounts:signUp",
                axum::routing::post(move || {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async { http::StatusCode::INTERNAL_SERVER_ERROR }
                }),
            )
            .route(
                "/v1/token",
                axum::routing::post(|| async { http::StatusCode::SERVICE_UNAVAILABLE }),
            ),
    )
    .await;
    write_identity(
        &file,
        &StoredIdentity {
            owner: IdentityOwner {
                api_key_sha256: key_fingerprint(&Secret::new("web-key")),
                token_endpoint: format!("{failing}/v1/token"),
            },
            refresh_token: "kept".into(),
        },
    )
    .expect("write");
    let down = FirebaseAnonymous::new(
        Secret::new("web-key"),
        &format!("{failing}/v1"),
        &format!("{failing}/v1/token"),
        None,
        Some(IdentityFile {
            path: file.clone(),
            read_only: false,
        }),
    )
    .expect("session");
    let error = down.inner.renew(None).await.expect_err("503");
    assert!(format!("{error:#}").contains("503"), "{error:#}");
    assert_eq!(sign_up_hits.load(Ordering::SeqCst), 0);
    assert!(
        down.inner.stored.lock().await.is_some(),
        "kept for the next try"
    );

    // Sign-ups refused: the error names the limit, and the next try waits.
    let refusing = serve(axum::Router::new().route(
        "/v1/accounts:signUp",
        axum::routing::post(|| async {
            (
                http::StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({
                    "error": {"code": 400, "message": "TOO_MANY_ATTEMPTS_TRY_LATER"}
                })),
            )
        }),
    ))
    .await;
    let limited = FirebaseAnonymous::new(
        Secret::new("web-key"),
        &format!("{refusing}/v1"),
        &format!("{refusing}/v1/token"),
        None,
        None,
    )
    .expect("session");
    let first = limited.inner.renew(None).await.expect_err("refused");
    let text = format!("{first:#}");
    assert!(
        text.contains("TOO_MANY_ATTEMPTS_TRY_LATER")
            && text.contains("100 anonymous sign-ups per hour per IP"),
        "{text}"
    );
    let second = limited.inner.renew(None).await.expect_err("backing off");
    assert!(
        format!("{second:#}").contains("not signing up"),
        "{second:#}"
    );
    assert_eq!(auth.sign_ups.load(Ordering::SeqCst), 0);
}

/// Issue 21: a 307 from the token endpoint (or the sign-up endpoint) is not followed: the
/// refresh token and the API key reach nothing but the configured endpoint, and a
/// redirected refresh does not sign a new user up.
#[tokio::test]
async fn redirects_are_not_followed() {
    use std::sync::atomic::Ordering;
    let elsewhere_hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hits = elsewhere_hits.clone();
    let elsewhere = serve(axum::Router::new().fallback(move || {
        hits.fetch_add(1, Ordering::SeqCst);
        async { "stolen" }
    }))
    .await;
    let target = format!("{elsewhere}/collect");
    let redirecting = serve(axum::Router::new().fallback(move || {
        let target = target.clone();
        async move {
            (
                http::StatusCode::TEMPORARY_REDIRECT,
                [(http::header::LOCATION, target)],
            )
        }
    }))
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("identity");
    let owner = IdentityOwner {
        api_key_sha256: key_fingerprint(&Secret::new("web-key")),
        token_endpoint: format!("{redirecting}/v1/token"),
    };
    write_identity(
        &file,
        &StoredIdentity {
            owner,
            refresh_token: "kept-refresh-token".into(),
        },
    )
    .expect("write");
    let redirected = FirebaseAnonymous::new(
        Secret::new("web-key"),
        &format!("{redirecting}/v1"),
        &format!("{redirecting}/v1/token"),
        None,
        Some(IdentityFile {
            path: file.clone(),
            read_only: false,
        }),
    )
    .expect("session");
    let error = redirected.inner.renew(None).await.expect_err("redirected");
    let text = format!("{error:#}");
    assert!(text.contains("redirect"), "{text}");
    assert!(
        !text.contains("kept-refresh-token") && !text.contains("web-key"),
        "{text}"
    );
    let error = redirected.inner.sign_up().await.expect_err("redirected");
    assert!(format!("{error:#}").contains("redirect"), "{error:#}");
    assert_eq!(elsewhere_hits.load(Ordering::SeqCst), 0);
    // The identity was not refused, so it is still there to use.
    assert!(
        std::fs::read_to_string(&file)
            .expect("kept")
            .contains("kept-refresh-token")
    );
}

#[test]
fn endpoints_are_https_or_loopback() {
    assert!(check_endpoint("k", "https://securetoken.googleapis.com/v1/token").is_ok());
    assert!(check_endpoint("k", "http://127.0.0.1:9/v1/token").is_ok());
    assert!(check_endpoint("k", "http://example.com/v1/token").is_err());
}
