//! The hook event: what a hook is told about one verified status change, on stdin and in its
//! environment, or as the body of a URL hook's POST (the same document: one schema for both).
//!
//! Owns: the JSON document written to a hook's stdin ([`HookEvent::to_json`]), the `PAYWATCH_*`
//! variables ([`HookEvent::env_vars`]) and the synthetic event of `paywatch hooks test`
//! ([`HookEvent::synthetic`]).
//! Must never: interpret the merchant's text (order id, request id and the checkout are passed
//! through unchanged), log the checkout, or do I/O.
//!
//! # Format
//!
//! One JSON object followed by a newline (so `read -r line` works in a shell script). Every key is
//! always present; absent values are `null`. The keys, in order:
//!
//! | key               | value                                                                  |
//! | ----------------- | ---------------------------------------------------------------------- |
//! | `version`         | `1`: the format version; bumped only for incompatible changes          |
//! | `event_id`        | stable across retries of the same delivery: use it to deduplicate      |
//! | `hook`            | the hook's configured name                                             |
//! | `test`            | `true` only for `paywatch hooks test` events: do not ship an order     |
//! | `checkout_id`     | paymennt's checkout id                                                 |
//! | `order_id`        | the merchant's order id, verbatim, or `null`                           |
//! | `request_id`      | the merchant's request id, verbatim, or `null`                         |
//! | `status`          | the verified status, upper case (`PAID`, `PARTIALLY_REFUNDED`, ...)    |
//! | `previous_status` | the status paywatch knew before, or `null` for the first one seen      |
//! | `amount`          | a string holding the exact decimal amount (`"100.00"`), never a float  |
//! | `currency`        | ISO 4217 code (`"AED"`)                                                |
//! | `total_refunded`  | the refunded total Get Checkout gave (`"25.00"`), or `null`            |
//! | `refund_amount`   | what this entry added to the refunded total (`"10.00"`), or `null`     |
//! | `source`          | what led to the verification: `firestore`, `reconcile`, `webhook` or   |
//! |                   | `manual` (`discovery-import` only in a replay of an imported baseline) |
//! | `tracked_via`     | how paywatch came to watch the checkout: `link-create`, `track`,       |
//! |                   | `track-fetch` or `discovery`                                           |
//! | `verified_at`     | when Get Checkout returned this status, RFC 3339 UTC with milliseconds |
//! | `attempt`         | 1 for the first delivery, 2 for the first retry, ...                   |
//! | `checkout`        | the Get Checkout `result` object exactly as paymennt returned it       |

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::domain::{CheckoutId, CheckoutStatus, Currency, Source, TrackedVia, format_money};
use crate::paymennt::wire::{Checkout, JsonDecimal, WireId};

/// The version written in the `version` key of every event.
pub const EVENT_FORMAT_VERSION: u32 = 1;

/// One delivery of one verified status change (or refund) to one hook.
///
/// A refund that leaves the status unchanged (a second partial refund) is an event of its own:
/// `status` and `previous_status` are equal, `refund_amount` says how much more was refunded.
///
/// The dispatcher builds it from an outbox row; [`HookEvent::synthetic`] builds a test one.
#[derive(Debug, Clone)]
pub struct HookEvent {
    /// Stable id of the delivery (the same on every attempt), so a hook can deduplicate.
    pub event_id: String,
    /// The hook's configured name.
    pub hook: String,
    /// paymennt's checkout id.
    pub checkout_id: CheckoutId,
    /// The merchant's order id, any text, never interpreted.
    pub order_id: Option<String>,
    /// The merchant's request id, any text, never interpreted.
    pub request_id: Option<String>,
    /// The verified status.
    pub status: CheckoutStatus,
    /// The status the ledger held before this change; `None` for the first one recorded.
    pub previous_status: Option<CheckoutStatus>,
    /// The checkout amount, exact.
    pub amount: Decimal,
    /// The checkout currency.
    pub currency: Currency,
    /// The refunded total Get Checkout gave with this entry.
    pub total_refunded: Option<Decimal>,
    /// How much this entry added to the refunded total (set only when it changed).
    pub refund_amount: Option<Decimal>,
    /// What led to the verification.
    pub source: Source,
    /// How paywatch came to watch the checkout.
    pub tracked_via: TrackedVia,
    /// When Get Checkout returned the status.
    pub verified_at: DateTime<Utc>,
    /// Which delivery attempt this is, from 1.
    pub attempt: u32,
    /// A rehearsal from `paywatch hooks test`, not a real payment.
    pub test: bool,
    /// The verified Get Checkout `result`, verbatim. May hold customer details: never log it
    /// above debug.
    pub checkout: Box<RawValue>,
}

/// The stdin document, borrowing from the event (field order is the documented key order).
#[derive(Serialize)]
struct Document<'a> {
    version: u32,
    event_id: &'a str,
    hook: &'a str,
    test: bool,
    checkout_id: &'a str,
    order_id: Option<&'a str>,
    request_id: Option<&'a str>,
    status: &'a str,
    previous_status: Option<&'a str>,
    amount: String,
    currency: &'a str,
    total_refunded: Option<String>,
    refund_amount: Option<String>,
    source: &'a str,
    tracked_via: &'a str,
    verified_at: String,
    attempt: u32,
    checkout: &'a RawValue,
}

impl HookEvent {
    /// The JSON document for the hook's stdin, newline-terminated. See the module doc for keys.
    pub fn to_json(&self) -> Vec<u8> {
        let document = Document {
            version: EVENT_FORMAT_VERSION,
            event_id: &self.event_id,
            hook: &self.hook,
            test: self.test,
            checkout_id: self.checkout_id.as_str(),
            order_id: self.order_id.as_deref(),
            request_id: self.request_id.as_deref(),
            status: self.status.as_str(),
            previous_status: self.previous_status.as_ref().map(CheckoutStatus::as_str),
            amount: format_money(self.amount),
            currency: self.currency.as_str(),
            total_refunded: self.total_refunded.map(format_money),
            refund_amount: self.refund_amount.map(format_money),
            source: self.source.as_str(),
            tracked_via: self.tracked_via.as_str(),
            verified_at: self
                .verified_at
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            attempt: self.attempt,
            checkout: &self.checkout,
        };
        // Strings, integers, a bool and already-valid raw JSON: serde_json cannot fail on these
        // (it fails only on non-string map keys or a failing Serialize impl).
        let mut json = serde_json::to_vec(&document).expect("a hook event always serializes");
        json.push(b'\n');
        json
    }

    /// The `PAYWATCH_*` variables, in a fixed order, every key always present.
    ///
    /// `PAYWATCH_EVENT_ID`, `PAYWATCH_HOOK`, `PAYWATCH_CHECKOUT_ID`, `PAYWATCH_ORDER_ID`,
    /// `PAYWATCH_REQUEST_ID`, `PAYWATCH_STATUS`, `PAYWATCH_PREVIOUS_STATUS`, `PAYWATCH_AMOUNT`
    /// (exact decimal text, as in the JSON), `PAYWATCH_CURRENCY`, `PAYWATCH_TOTAL_REFUNDED`,
    /// `PAYWATCH_REFUND_AMOUNT` (as the JSON's `total_refunded`, `refund_amount`),
    /// `PAYWATCH_SOURCE`, `PAYWATCH_TRACKED_VIA` (as the JSON's `source`, `tracked_via`),
    /// `PAYWATCH_ATTEMPT` and
    /// `PAYWATCH_TEST` (`1` for a `hooks test` event, else `0`). An absent value is the empty
    /// string. Values are the merchant's text unchanged; the runner replaces a NUL byte (which an
    /// environment cannot hold) with U+FFFD, and the JSON on stdin keeps it exactly.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let money = |value: Option<Decimal>| value.map(format_money).unwrap_or_default();
        let vars: [(&str, String); 15] = [
            ("PAYWATCH_EVENT_ID", self.event_id.clone()),
            ("PAYWATCH_HOOK", self.hook.clone()),
            ("PAYWATCH_CHECKOUT_ID", self.checkout_id.to_string()),
            (
                "PAYWATCH_ORDER_ID",
                self.order_id.clone().unwrap_or_default(),
            ),
            (
                "PAYWATCH_REQUEST_ID",
                self.request_id.clone().unwrap_or_default(),
            ),
            ("PAYWATCH_STATUS", self.status.to_string()),
            (
                "PAYWATCH_PREVIOUS_STATUS",
                self.previous_status
                    .as_ref()
                    .map(CheckoutStatus::to_string)
                    .unwrap_or_default(),
            ),
            ("PAYWATCH_AMOUNT", format_money(self.amount)),
            ("PAYWATCH_CURRENCY", self.currency.to_string()),
            ("PAYWATCH_TOTAL_REFUNDED", money(self.total_refunded)),
            ("PAYWATCH_REFUND_AMOUNT", money(self.refund_amount)),
            ("PAYWATCH_SOURCE", self.source.as_str().to_owned()),
            ("PAYWATCH_TRACKED_VIA", self.tracked_via.as_str().to_owned()),
            ("PAYWATCH_ATTEMPT", self.attempt.to_string()),
            (
                "PAYWATCH_TEST",
                if self.test { "1" } else { "0" }.to_owned(),
            ),
        ];
        vars.into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect()
    }

    /// A realistic event for `paywatch hooks test NAME --status S`, marked `test: true`.
    ///
    /// The checkout has every field Get Checkout returns, with paymennt's documented example
    /// values, a fresh event id and an order id starting `PAYWATCH-TEST-` so a merchant's system
    /// cannot mistake it for a real order. The previous status is the one that usually precedes
    /// `status` (PENDING before PAID, PAID before a refund); PENDING has none.
    pub fn synthetic(hook: &str, status: CheckoutStatus) -> HookEvent {
        let event_id = uuid::Uuid::now_v7();
        let short = event_id.simple().to_string();
        let short = &short[short.len() - 8..];
        let order_id = format!("PAYWATCH-TEST-{short}");
        let request_id = format!("{order_id}.1");
        let checkout_id: CheckoutId = "1653241101733169556"
            .parse()
            .expect("a literal valid checkout id");
        let currency: Currency = "AED".parse().expect("a literal valid currency");
        let amount = Decimal::new(10000, 2);
        let verified_at = Utc::now();
        let previous_status = match status {
            CheckoutStatus::Pending => None,
            CheckoutStatus::Refunded
            | CheckoutStatus::PartiallyRefunded
            | CheckoutStatus::Chargeback => Some(CheckoutStatus::Paid),
            _ => Some(CheckoutStatus::Pending),
        };
        let refunded = match status {
            CheckoutStatus::Refunded => amount,
            CheckoutStatus::PartiallyRefunded => Decimal::new(2500, 2),
            _ => Decimal::ZERO,
        };
        let paid = matches!(
            status,
            CheckoutStatus::Paid
                | CheckoutStatus::Refunded
                | CheckoutStatus::PartiallyRefunded
                | CheckoutStatus::Chargeback
        );
        let refund = matches!(
            status,
            CheckoutStatus::Refunded | CheckoutStatus::PartiallyRefunded
        );
        let checkout_key = "7a3ce540effe3c9a568a577d1f717e5267e73dc503663d4f";
        let checkout = Checkout {
            id: Some(WireId(checkout_id.to_string())),
            display_id: Some("QS3IM5".into()),
            checkout_key: Some(checkout_key.into()),
            request_id: Some(request_id.clone()),
            order_id: Some(order_id.clone()),
            currency: Some(currency.to_string()),
            amount: Some(JsonDecimal(amount)),
            cash_amount: Some(JsonDecimal(Decimal::ZERO)),
            status: Some(status.clone()),
            total_refunded: Some(JsonDecimal(refunded)),
            redirect_url: Some(format!(
                "https://pay.test.paymennt.com/checkout/{checkout_key}"
            )),
            used_payment_method: paid.then(|| "CARD".into()),
            customer: Some(serde_json::json!({
                "firstName": "TEST",
                "lastName": "USER",
                "email": "test.user@example.com",
                "phone": "+971500000000",
            })),
            subscription_id: None,
            billing_address: Some(serde_json::json!({
                "name": "TEST USER",
                "address1": "1 Example Street",
                "city": "Dubai",
                "country": "AE",
            })),
            delivery_address: None,
            firebase_database: Some("pc-test-734bc".into()),
            firebase_collection: Some("checkouts".into()),
            firebase_document: Some(checkout_key.into()),
            timestamp: Some(
                (verified_at - chrono::Duration::minutes(5))
                    .to_rfc3339_opts(SecondsFormat::Millis, true),
            ),
            branch_id: Some(WireId("1601731695315563241".into())),
            branch_name: Some("Test store".into()),
        };
        let checkout =
            serde_json::value::to_raw_value(&checkout).expect("a wire checkout always serializes");
        HookEvent {
            event_id: format!("evt_test_{}", event_id.simple()),
            hook: hook.to_owned(),
            checkout_id,
            order_id: Some(order_id),
            request_id: Some(request_id),
            status,
            previous_status,
            amount,
            currency,
            total_refunded: Some(refunded),
            refund_amount: refund.then_some(refunded),
            source: Source::Manual,
            tracked_via: TrackedVia::LinkCreate,
            verified_at,
            attempt: 1,
            test: true,
            checkout,
        }
    }
}

#[cfg(test)]
mod tests;
