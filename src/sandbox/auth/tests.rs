//! Unit tests of `auth`.

use super::*;

fn metadata(authorization: Option<&str>) -> tonic::metadata::MetadataMap {
    let mut map = tonic::metadata::MetadataMap::new();
    if let Some(value) = authorization {
        map.insert("authorization", value.parse().expect("ascii"));
    }
    map
}

fn sign(account: &TestServiceAccount, claims: serde_json::Value, kid: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(&account.key_json).expect("key json");
    let pem = json["private_key"].as_str().expect("pem");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).expect("key"),
    )
    .expect("sign")
}

#[tokio::test]
async fn iam_accepts_only_unexpired_scoped_jwts_of_its_service_account() {
    let account = TestServiceAccount::generate("p").expect("key");
    let other = TestServiceAccount::generate("p").expect("key");
    let check = CallerCheck::new(
        FirestoreAuthCheck::Iam(account.iam.clone()),
        FirebaseAuth::new("k".into(), "p".into(), Duration::from_secs(60)),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let email = account.iam.client_email.clone();
    let good = serde_json::json!({"iss": email, "sub": email, "scope": "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/datastore", "iat": now, "exp": now + 3600});
    let kid = account.iam.key_id.clone();
    let token = sign(&account, good.clone(), &kid);
    assert!(
        check
            .admit(&metadata(Some(&format!("Bearer {token}"))))
            .is_ok()
    );

    let refused = |header: Option<String>| {
        let status = check
            .admit(&metadata(header.as_deref()))
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    };
    refused(None);
    refused(Some("Bearer owner".into()));
    // Signed by another key (with this key's id).
    refused(Some(format!("Bearer {}", sign(&other, good.clone(), &kid))));
    // Expired.
    let mut expired = good.clone();
    expired["exp"] = serde_json::json!(now - 10);
    refused(Some(format!("Bearer {}", sign(&account, expired, &kid))));
    // No Firestore scope.
    let mut unscoped = good.clone();
    unscoped["scope"] = serde_json::json!("https://www.googleapis.com/auth/pubsub");
    refused(Some(format!("Bearer {}", sign(&account, unscoped, &kid))));
    // Another issuer.
    let mut stranger = good;
    stranger["iss"] = serde_json::json!("someone@else.iam.gserviceaccount.com");
    refused(Some(format!("Bearer {}", sign(&account, stranger, &kid))));
    assert_eq!(check.counts().refused_calls, 6);
}

/// Issue 21: the sandbox's Firebase Auth is no kinder than Firebase: beyond the hourly
/// sign-up limit it answers `TOO_MANY_ATTEMPTS_TRY_LATER`, and it counts sign-ups (also at
/// `GET /_sandbox/firebase-auth`); a revoked refresh token is `INVALID_REFRESH_TOKEN`.
#[tokio::test]
async fn sign_ups_are_limited_per_hour_counted_and_revocable() {
    use tower::ServiceExt as _;
    let auth = FirebaseAuth::new("k".into(), "p".into(), Duration::from_secs(60));
    auth.set_sign_up_limit_per_hour(2);
    let post = |uri: String, body: String| {
        axum::http::Request::post(uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(axum::body::Body::from(body))
            .expect("request")
    };
    let sign_up = format!("{IDENTITY_PATH}/accounts:signUp?key=k");
    let mut statuses = Vec::new();
    let mut refresh_token = String::new();
    for _ in 0..3 {
        let response = auth
            .router()
            .oneshot(post(sign_up.clone(), String::new()))
            .await
            .expect("answer");
        statuses.push(response.status().as_u16());
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        if let Some(token) = json["refreshToken"].as_str() {
            refresh_token = token.to_owned();
        } else {
            assert_eq!(json["error"]["message"], "TOO_MANY_ATTEMPTS_TRY_LATER");
        }
    }
    assert_eq!(statuses, [200, 200, 400]);
    assert_eq!(auth.counts().0, 2);
    assert_eq!(auth.refused_sign_ups(), 1);
    let counters = auth
        .router()
        .oneshot(
            axum::http::Request::get("/_sandbox/firebase-auth")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("answer");
    let body = axum::body::to_bytes(counters.into_body(), 4096)
        .await
        .expect("body");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["sign_ups"], 2);
    assert_eq!(json["refused_sign_ups"], 1);

    auth.revoke_refresh_tokens();
    let form = format!("grant_type=refresh_token&refresh_token={refresh_token}");
    let response = auth
        .router()
        .oneshot(post(format!("{TOKEN_PATH}?key=k"), form))
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test]
async fn rules_admit_no_header_or_a_live_id_token_only() {
    let firebase = FirebaseAuth::new("k".into(), "p".into(), Duration::from_secs(60));
    let open = CallerCheck::new(
        FirestoreAuthCheck::Rules {
            require_sign_in: false,
        },
        firebase.clone(),
    );
    assert!(open.admit(&metadata(None)).is_ok_and(|a| a.rules));
    // The emulator convention bypasses nothing: the rules still apply.
    assert!(
        open.admit(&metadata(Some("Bearer owner")))
            .is_ok_and(|a| a.rules)
    );
    let forged = open
        .admit(&metadata(Some("Bearer sandbox-id-token-forged")))
        .expect_err("not a token issued here");
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);

    let signed = CallerCheck::new(
        FirestoreAuthCheck::Rules {
            require_sign_in: true,
        },
        firebase.clone(),
    );
    // Firestore lets the call in and refuses its targets: the rules say who is signed in.
    let none = signed
        .admit(&metadata(None))
        .expect("the call itself is let in");
    assert!(none.rules && !none.signed_in);
    let (id_token, _, _) = firebase.issue("u");
    let admitted = signed
        .admit(&metadata(Some(&format!("Bearer {id_token}"))))
        .expect("live token");
    assert!(admitted.rules && admitted.expires_at.is_some());
}
