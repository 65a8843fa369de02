//! The payment page through the sandbox's router (no socket): the documented test card pays,
//! the declined card fails, Cancel cancels, bad input is explained, and nothing is unescaped.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;

use super::*;
use crate::paymennt::wire::{JsonDecimal, LinkRequest};
use crate::sandbox::api::tests::app;
use crate::sandbox::state::SandboxState;

/// Creates a link; returns its checkout id and key.
async fn link(
    state: &SandboxState,
    order_id: &str,
    return_url: Option<&str>,
) -> (CheckoutId, String) {
    let checkout = state
        .create_link(&LinkRequest {
            request_id: format!("{order_id}-r1"),
            order_id: order_id.to_owned(),
            description: "Two mugs".into(),
            currency: "AED".into(),
            amount: JsonDecimal("100.10".parse().expect("decimal")),
            return_url: return_url.map(str::to_owned),
            ..LinkRequest::default()
        })
        .await
        .expect("link created");
    let id = checkout.facts().expect("complete").id;
    let key = checkout.checkout_key.expect("a checkout key");
    (id, key)
}

struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: String,
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    Answer {
        status,
        location,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn get(app: &Router, path: &str) -> Answer {
    send(
        app,
        Request::get(path).body(Body::empty()).expect("request"),
    )
    .await
}

async fn post(app: &Router, path: &str, form: &str) -> Answer {
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .expect("request");
    send(app, request).await
}

const DOCUMENTED_CARD: &str =
    "card_number=4242+4242+4242+4242&expiry=12%2F25&cvv=100&name=TEST+USER&terms=accepted";

fn form(number: &str, expiry: &str, cvv: &str, name: &str, terms: bool) -> CardForm {
    CardForm {
        number: number.into(),
        expiry: expiry.into(),
        cvv: cvv.into(),
        name: name.into(),
        terms_accepted: terms,
    }
}

#[test]
fn the_documented_test_card_pays_and_the_declined_card_fails() {
    let paid = check_card(&form(
        "4242 4242 4242 4242",
        "12/25",
        "100",
        "TEST USER",
        true,
    ));
    assert_eq!(paid, Ok(CardOutcome::Pays));
    let declined = check_card(&form("4000-0000-0000-0002", "01/2030", "1234", "A B", true));
    assert_eq!(declined, Ok(CardOutcome::Declined));
}

#[test]
fn bad_cards_and_missing_fields_are_explained() {
    let problems = |f: CardForm| check_card(&f).expect_err("refused").join(" | ");
    let text = problems(form("4242 4242 4242 4241", "12/25", "100", "T", true));
    assert!(text.contains("card number is not valid"), "{text}");
    let text = problems(form("4242 4242 4242 4242", "12/25", "100", "T", false));
    assert!(text.contains("accept the Terms & Conditions"), "{text}");
    let text = problems(form("5555 5555 5555 4444", "12/25", "100", "T", true));
    assert!(text.contains("only its test cards"), "{text}");
    let text = problems(form("4242424242424242", "13/25", "10", " ", true));
    assert!(text.contains("MM/YY"), "{text}");
    assert!(text.contains("CVV"), "{text}");
    assert!(text.contains("name on the card"), "{text}");
    let text = problems(form("", "", "", "", false));
    assert!(text.contains("enter the card number"), "{text}");
    for bad in ["1225", "00/25", "12/2", "ab/cd", "12/25/1"] {
        assert!(!expiry_well_formed(bad), "{bad}");
    }
    assert!(expiry_well_formed("1/30") && expiry_well_formed("12 / 2025"));
}

#[tokio::test]
async fn the_page_shows_order_amount_status_and_the_card_form_escaped() {
    let (app, state) = app();
    let (_, key) = link(&state, "ORD-<script>alert(\"x\")</script>", None).await;
    let page = get(&app, &format!("/pay/{key}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("100.10 AED"), "{}", page.body);
    assert!(page.body.contains("PENDING"));
    for field in ["card_number", "expiry", "cvv", "name", "terms"] {
        assert!(
            page.body.contains(&format!("name=\"{field}\"")),
            "no {field} field"
        );
    }
    assert!(page.body.contains(">Cancel<"));
    assert!(!page.body.contains("<script>"), "unescaped order id");
    assert!(
        page.body
            .contains("ORD-&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;")
    );
    assert_eq!(get(&app, "/pay/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn paying_with_the_documented_card_confirms_on_the_page() {
    let (app, state) = app();
    let (id, key) = link(&state, "ORD-1", None).await;
    let answer = post(&app, &format!("/pay/{key}"), DOCUMENTED_CARD).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(
        answer.location.as_deref(),
        Some(format!("/pay/{key}").as_str())
    );
    assert_eq!(state.status(&id), Some(CheckoutStatus::Paid));
    let page = get(&app, &format!("/pay/{key}")).await;
    assert!(page.body.contains("Payment received"), "{}", page.body);
    assert!(
        !page.body.contains("name=\"card_number\""),
        "no form once paid"
    );
    // Paying twice is explained, not repeated.
    let again = post(&app, &format!("/pay/{key}"), DOCUMENTED_CARD).await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        again.body.contains("Cannot pay a checkout in status PAID"),
        "{}",
        again.body
    );
}

#[tokio::test]
async fn after_paying_the_customer_goes_to_the_return_url() {
    let (app, state) = app();
    let (id, key) = link(&state, "ORD-2", Some("https://shop.example.com/thanks?o=2")).await;
    let answer = post(&app, &format!("/pay/{key}"), DOCUMENTED_CARD).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(
        answer.location.as_deref(),
        Some("https://shop.example.com/thanks?o=2")
    );
    assert_eq!(state.status(&id), Some(CheckoutStatus::Paid));
}

#[tokio::test]
async fn the_declined_card_fails_the_checkout() {
    let (app, state) = app();
    let (id, key) = link(&state, "ORD-3", None).await;
    let form = "card_number=4000000000000002&expiry=12%2F25&cvv=100&name=T&terms=accepted";
    let answer = post(&app, &format!("/pay/{key}"), form).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(state.status(&id), Some(CheckoutStatus::Failed));
    let page = get(&app, &format!("/pay/{key}")).await;
    assert!(page.body.contains("declined"), "{}", page.body);
}

#[tokio::test]
async fn an_invalid_number_or_an_unticked_box_is_explained_and_changes_nothing() {
    let (app, state) = app();
    let (id, key) = link(&state, "ORD-4", None).await;
    let bad_number =
        "card_number=4242424242424241&expiry=12%2F25&cvv=100&name=%3Cb%3EEve&terms=accepted";
    let answer = post(&app, &format!("/pay/{key}"), bad_number).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        answer.body.contains("The card number is not valid"),
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("value=\"&lt;b&gt;Eve\""),
        "the name is kept, escaped"
    );
    assert!(
        !answer.body.contains("4242424242424241"),
        "the card number is not echoed"
    );
    let unticked = "card_number=4242424242424242&expiry=12%2F25&cvv=100&name=T";
    let answer = post(&app, &format!("/pay/{key}"), unticked).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        answer
            .body
            .contains("Please accept the Terms &amp; Conditions"),
        "{}",
        answer.body
    );
    assert_eq!(state.status(&id), Some(CheckoutStatus::Pending));
}

#[tokio::test]
async fn cancel_cancels_and_returns_to_the_merchant() {
    let (app, state) = app();
    let (id, key) = link(&state, "ORD-5", Some("http://127.0.0.1:9/back")).await;
    let answer = post(&app, &format!("/pay/{key}/cancel"), "").await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(answer.location.as_deref(), Some("http://127.0.0.1:9/back"));
    assert_eq!(state.status(&id), Some(CheckoutStatus::Cancelled));
}

#[tokio::test]
async fn a_return_url_must_be_http() {
    let (_, state) = app();
    let error = state
        .create_link(&LinkRequest {
            request_id: "r".into(),
            order_id: "o".into(),
            description: "d".into(),
            currency: "AED".into(),
            amount: JsonDecimal("1".parse().expect("decimal")),
            return_url: Some("javascript:alert(1)".into()),
            ..LinkRequest::default()
        })
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("returnUrl"), "{error}");
}
