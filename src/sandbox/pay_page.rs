//! The sandbox's payment page under `/pay/{checkoutKey}` (where a link's `redirectUrl` points):
//! the order, amount and status, and a card form that pays with the sandbox's test cards, the
//! way paymennt's "Test the Integration" steps describe their own page.
//!
//! Owns: the page's HTML, the card form's checks and the sandbox's test cards.
//! Must never: change a checkout except through [`SandboxState`](crate::sandbox::state::SandboxState), put any text into the page
//! without escaping it, or echo a card number or CVV back.
//!
//! Plain HTML forms, no JavaScript: a browser and a test with an HTTP client see the same page.
//!
//! | card | outcome |
//! | --- | --- |
//! | `4242 4242 4242 4242` (paymennt's documented test card) | PAID |
//! | `4000 0000 0000 0002` | declined: FAILED |
//!
//! Any well-formed expiry (`MM/YY`, e.g. paymennt's documented `12/25`), a 3 or 4 digit CVV
//! (paymennt documents `100`) and any name are accepted; the Terms & Conditions box must be
//! ticked. After a payment (paid or declined) or a cancel the customer goes to the link's
//! `returnUrl` when it has one, else back to this page, which then shows the outcome.

use std::collections::HashMap;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};

use crate::domain::{CheckoutId, CheckoutStatus, format_money};
use crate::sandbox::state::{CheckoutAction, SandboxState};

/// paymennt's documented test card: it pays.
pub const PAYING_CARD: &str = "4242424242424242";
/// The sandbox's declined card: the payment fails (FAILED).
pub const DECLINED_CARD: &str = "4000000000000002";

/// What a card does in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardOutcome {
    /// The payment goes through (PAID).
    Pays,
    /// The card is declined (FAILED).
    Declined,
}

/// The card form as submitted (every field optional: a missing one is a message, not a 4xx).
#[derive(Debug, Default)]
pub struct CardForm {
    /// Card number, spaces and dashes allowed.
    pub number: String,
    /// `MM/YY` or `MM/YYYY`.
    pub expiry: String,
    /// 3 or 4 digits.
    pub cvv: String,
    /// Name on the card.
    pub name: String,
    /// The Terms & Conditions box was ticked.
    pub terms_accepted: bool,
}

impl CardForm {
    fn from_fields(fields: &HashMap<String, String>) -> CardForm {
        let text = |name: &str| fields.get(name).cloned().unwrap_or_default();
        CardForm {
            number: text("card_number"),
            expiry: text("expiry"),
            cvv: text("cvv"),
            name: text("name"),
            terms_accepted: fields.contains_key("terms"),
        }
    }
}

/// Checks the form; every problem is one message for the customer.
///
/// # Errors
///
/// The messages, in the order of the form's fields.
pub fn check_card(form: &CardForm) -> Result<CardOutcome, Vec<String>> {
    let mut problems = Vec::new();
    let digits: String = form
        .number
        .chars()
        .filter(|c| *c != ' ' && *c != '-')
        .collect();
    let outcome = if digits.is_empty() {
        problems.push("Please enter the card number.".to_owned());
        None
    } else if !(12..=19).contains(&digits.len())
        || !digits.chars().all(|c| c.is_ascii_digit())
        || !luhn_valid(&digits)
    {
        problems.push(
            "The card number is not valid: check its digits \
             (the sandbox's test card is 4242 4242 4242 4242)."
                .to_owned(),
        );
        None
    } else if digits == PAYING_CARD {
        Some(CardOutcome::Pays)
    } else if digits == DECLINED_CARD {
        Some(CardOutcome::Declined)
    } else {
        problems.push(
            "This sandbox takes only its test cards: 4242 4242 4242 4242 pays, \
             4000 0000 0000 0002 is declined."
                .to_owned(),
        );
        None
    };
    if !expiry_well_formed(form.expiry.trim()) {
        problems.push("The expiry date must be written MM/YY, for example 12/25.".to_owned());
    }
    let cvv = form.cvv.trim();
    if !(3..=4).contains(&cvv.len()) || !cvv.chars().all(|c| c.is_ascii_digit()) {
        problems.push("The CVV must be the 3 or 4 digits on the back of the card.".to_owned());
    }
    if form.name.trim().is_empty() {
        problems.push("Please enter the name on the card.".to_owned());
    }
    if !form.terms_accepted {
        problems.push("Please accept the Terms & Conditions to pay.".to_owned());
    }
    match outcome {
        Some(outcome) if problems.is_empty() => Ok(outcome),
        _ => Err(problems),
    }
}

/// The Luhn checksum every card number carries.
fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (index, c) in digits.chars().rev().enumerate() {
        let Some(mut digit) = c.to_digit(10) else {
            return false;
        };
        if index % 2 == 1 {
            digit *= 2;
            if digit > 9 {
                digit -= 9;
            }
        }
        sum += digit;
    }
    sum % 10 == 0
}

/// `MM/YY` or `MM/YYYY` with a month 01..=12. The sandbox does not compare it with today:
/// paymennt's documented test expiry (12/25) must keep working.
fn expiry_well_formed(text: &str) -> bool {
    let Some((month, year)) = text.split_once('/') else {
        return false;
    };
    let (month, year) = (month.trim(), year.trim());
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    numeric(month)
        && numeric(year)
        && month.len() <= 2
        && (year.len() == 2 || year.len() == 4)
        && month.parse::<u8>().is_ok_and(|m| (1..=12).contains(&m))
}

/// `GET /pay/{key}`: the page.
pub async fn show(State(state): State<SandboxState>, Path(key): Path<String>) -> Response {
    match page_for(&state, &key, &[], "") {
        Some(page) => Html(page).into_response(),
        None => not_found(),
    }
}

/// `POST /pay/{key}`: the card form.
pub async fn pay(
    State(state): State<SandboxState>,
    Path(key): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let Some(id) = state.id_for_key(&key) else {
        return not_found();
    };
    let fields = form.map(|Form(fields)| fields).unwrap_or_default();
    let card = CardForm::from_fields(&fields);
    let outcome = match check_card(&card) {
        Ok(outcome) => outcome,
        Err(problems) => return refused(&state, &key, &problems, &card.name),
    };
    let action = match outcome {
        CardOutcome::Pays => CheckoutAction::Pay,
        CardOutcome::Declined => CheckoutAction::Fail,
    };
    finish(&state, &key, &id, action, &card.name).await
}

/// `POST /pay/{key}/cancel`: the customer cancels and goes back to the merchant.
pub async fn cancel(State(state): State<SandboxState>, Path(key): Path<String>) -> Response {
    let Some(id) = state.id_for_key(&key) else {
        return not_found();
    };
    finish(&state, &key, &id, CheckoutAction::Cancel, "").await
}

/// Applies `action`, then sends the customer to the `returnUrl` or back to the page.
async fn finish(
    state: &SandboxState,
    key: &str,
    id: &CheckoutId,
    action: CheckoutAction,
    name: &str,
) -> Response {
    if let Err(error) = state.apply(id, action).await {
        return refused(state, key, &[error.to_string()], name);
    }
    match state.return_url(id) {
        Some(url) => Redirect::to(&url).into_response(),
        None => Redirect::to(&format!("/pay/{}", url_path_segment(key))).into_response(),
    }
}

fn refused(state: &SandboxState, key: &str, problems: &[String], name: &str) -> Response {
    match page_for(state, key, problems, name) {
        Some(page) => (StatusCode::UNPROCESSABLE_ENTITY, Html(page)).into_response(),
        None => not_found(),
    }
}

fn not_found() -> Response {
    let page = document(
        "No such payment link",
        "<h1>No such payment link</h1><p>Check the link you were sent.</p>",
    );
    (StatusCode::NOT_FOUND, Html(page)).into_response()
}

/// The page for the checkout behind `key`, with `problems` above the form.
fn page_for(state: &SandboxState, key: &str, problems: &[String], name: &str) -> Option<String> {
    let id = state.id_for_key(key)?;
    let checkout = state.checkout(&id)?;
    let status = state.status(&id)?;
    let amount = checkout
        .amount
        .map(|a| format_money(a.0))
        .unwrap_or_default();
    let currency = checkout.currency.clone().unwrap_or_default();
    let order = checkout.order_id.clone().unwrap_or_default();
    let mut body = format!(
        "<h1>paymennt sandbox</h1>\
         <p>Order <b id=\"order\">{order}</b> <small>(checkout {id})</small></p>\
         <p id=\"amount\" style=\"font-size:1.5em\">{amount} {currency}</p>\
         <p>Status: <b id=\"status\">{status}</b></p>",
        order = html_escape(&order),
        id = html_escape(id.as_str()),
        amount = html_escape(&amount),
        currency = html_escape(&currency),
        status = html_escape(status.as_str()),
    );
    if !problems.is_empty() {
        body.push_str("<div id=\"problems\" role=\"alert\" style=\"color:#a00\"><ul>");
        for problem in problems {
            body.push_str(&format!("<li>{}</li>", html_escape(problem)));
        }
        body.push_str("</ul></div>");
    }
    match status {
        CheckoutStatus::Pending | CheckoutStatus::Authorized => {
            body.push_str(&card_form(key, name));
        }
        other => body.push_str(&format!(
            "<p id=\"outcome\">{}</p>",
            html_escape(&outcome_text(&other, &order))
        )),
    }
    body.push_str("<p><small>Nothing here moves real money.</small></p>");
    Some(document("paymennt sandbox", &body))
}

/// What the page says once the checkout is no longer payable.
fn outcome_text(status: &CheckoutStatus, order: &str) -> String {
    match status {
        CheckoutStatus::Paid => format!("Payment received: thank you. Order {order} is paid."),
        CheckoutStatus::Failed => {
            "The payment failed: the card was declined. Nothing was charged.".to_owned()
        }
        CheckoutStatus::Cancelled => "You cancelled this payment. Nothing was charged.".to_owned(),
        CheckoutStatus::Expired => "This payment link has expired.".to_owned(),
        CheckoutStatus::Refunded | CheckoutStatus::PartiallyRefunded => {
            format!("Order {order} was paid and has been refunded.")
        }
        other => format!("This checkout is {other}; there is nothing to pay."),
    }
}

fn card_form(key: &str, name: &str) -> String {
    let key = html_escape(&url_path_segment(key));
    format!(
        "<form method=\"post\" action=\"/pay/{key}\">\
         <p><label>Card number<br><input name=\"card_number\" id=\"card_number\" \
         inputmode=\"numeric\" autocomplete=\"cc-number\" placeholder=\"4242 4242 4242 4242\"></label></p>\
         <p><label>Expiry (MM/YY)<br><input name=\"expiry\" id=\"expiry\" \
         autocomplete=\"cc-exp\" placeholder=\"12/25\" size=\"6\"></label> \
         <label>CVV<br><input name=\"cvv\" id=\"cvv\" inputmode=\"numeric\" \
         autocomplete=\"cc-csc\" placeholder=\"100\" size=\"4\"></label></p>\
         <p><label>Name on the card<br><input name=\"name\" id=\"name\" autocomplete=\"cc-name\" \
         value=\"{name}\"></label></p>\
         <p><label><input type=\"checkbox\" name=\"terms\" id=\"terms\" value=\"accepted\"> \
         I accept the Terms &amp; Conditions</label></p>\
         <p><button type=\"submit\" id=\"pay\">Pay</button> \
         <button type=\"submit\" id=\"cancel\" formaction=\"/pay/{key}/cancel\" formnovalidate \
         style=\"background:none;border:none;color:#06c;text-decoration:underline;cursor:pointer\">\
         Cancel</button></p>\
         </form>\
         <p><small>Test cards: 4242 4242 4242 4242 pays, 4000 0000 0000 0002 is declined; \
         any MM/YY expiry (e.g. 12/25), CVV 100, any name.</small></p>",
        name = html_escape(name),
    )
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head>\
         <body style=\"font-family:sans-serif;max-width:30em;margin:2em auto\">{body}</body></html>",
        title = html_escape(title),
    )
}

/// A checkout key as one URL path segment (keys are URL-safe, but the page must not trust it).
fn url_path_segment(key: &str) -> String {
    key.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
        .collect()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
