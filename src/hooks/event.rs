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
mod tests {
    use super::*;
    use serde_json::Value;

    fn event() -> HookEvent {
        let checkout = RawValue::from_string(
            r#"{"id": "42", "amount": 19.990, "status": "Paid", "extra": [1, {"b": null}]}"#.into(),
        )
        .expect("valid raw json");
        HookEvent {
            event_id: "0190d3c2-7a1b-7cc0-9a4e-1f2e3d4c5b6a".into(),
            hook: "mark-paid".into(),
            checkout_id: "42".parse().expect("valid id"),
            order_id: Some("O-1 \"quoted\" $(touch pwned)\nnext".into()),
            request_id: None,
            status: CheckoutStatus::Paid,
            previous_status: Some(CheckoutStatus::Pending),
            amount: Decimal::new(19990, 3),
            currency: "AED".parse().expect("valid currency"),
            total_refunded: Some(Decimal::new(500, 2)),
            refund_amount: Some(Decimal::new(5, 0)),
            source: Source::Firestore,
            tracked_via: TrackedVia::Discovery,
            verified_at: DateTime::parse_from_rfc3339("2025-01-02T03:04:05.678Z")
                .expect("valid time")
                .with_timezone(&Utc),
            attempt: 2,
            test: false,
            checkout,
        }
    }

    #[test]
    fn json_has_every_documented_key_in_order() {
        let json = event().to_json();
        assert_eq!(json.last(), Some(&b'\n'), "newline-terminated");
        let text = std::str::from_utf8(&json).expect("utf-8");
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        let value: Value = serde_json::from_slice(&json).expect("valid json");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        // Compare as sets (serde_json may or may not preserve order), then check the written
        // order on the text itself.
        let documented = [
            "version",
            "event_id",
            "hook",
            "test",
            "checkout_id",
            "order_id",
            "request_id",
            "status",
            "previous_status",
            "amount",
            "currency",
            "total_refunded",
            "refund_amount",
            "source",
            "tracked_via",
            "verified_at",
            "attempt",
            "checkout",
        ];
        let mut sorted = documented.to_vec();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        let positions: Vec<usize> = documented
            .iter()
            .map(|key| text.find(&format!("\"{key}\":")).expect("key written"))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");

        assert_eq!(value["version"], 1);
        assert_eq!(value["event_id"], "0190d3c2-7a1b-7cc0-9a4e-1f2e3d4c5b6a");
        assert_eq!(value["hook"], "mark-paid");
        assert_eq!(value["test"], false);
        assert_eq!(value["checkout_id"], "42");
        assert_eq!(value["order_id"], "O-1 \"quoted\" $(touch pwned)\nnext");
        assert_eq!(value["request_id"], Value::Null);
        assert_eq!(value["status"], "PAID");
        assert_eq!(value["previous_status"], "PENDING");
        assert_eq!(value["amount"], "19.99");
        assert_eq!(value["currency"], "AED");
        assert_eq!(value["total_refunded"], "5.00");
        assert_eq!(value["refund_amount"], "5.00");
        assert_eq!(value["source"], "firestore");
        assert_eq!(value["tracked_via"], "discovery");
        assert_eq!(value["verified_at"], "2025-01-02T03:04:05.678Z");
        assert_eq!(value["attempt"], 2);
    }

    #[test]
    fn checkout_is_passed_verbatim() {
        let json = String::from_utf8(event().to_json()).expect("utf-8");
        // Byte for byte: whitespace, the trailing zero of 19.990 and the spec spelling survive.
        assert!(
            json.contains(
                r#""checkout":{"id": "42", "amount": 19.990, "status": "Paid", "extra": [1, {"b": null}]}}"#
            ),
            "{json}"
        );
    }

    #[test]
    fn env_vars_are_the_documented_list() {
        let vars = event().env_vars();
        let expected = [
            ("PAYWATCH_EVENT_ID", "0190d3c2-7a1b-7cc0-9a4e-1f2e3d4c5b6a"),
            ("PAYWATCH_HOOK", "mark-paid"),
            ("PAYWATCH_CHECKOUT_ID", "42"),
            ("PAYWATCH_ORDER_ID", "O-1 \"quoted\" $(touch pwned)\nnext"),
            ("PAYWATCH_REQUEST_ID", ""),
            ("PAYWATCH_STATUS", "PAID"),
            ("PAYWATCH_PREVIOUS_STATUS", "PENDING"),
            ("PAYWATCH_AMOUNT", "19.99"),
            ("PAYWATCH_CURRENCY", "AED"),
            ("PAYWATCH_TOTAL_REFUNDED", "5.00"),
            ("PAYWATCH_REFUND_AMOUNT", "5.00"),
            ("PAYWATCH_SOURCE", "firestore"),
            ("PAYWATCH_TRACKED_VIA", "discovery"),
            ("PAYWATCH_ATTEMPT", "2"),
            ("PAYWATCH_TEST", "0"),
        ];
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(vars, expected);
    }

    #[test]
    fn amounts_keep_at_least_two_decimals() {
        let mut e = event();
        e.amount = Decimal::new(100, 0);
        let value: Value = serde_json::from_slice(&e.to_json()).expect("valid json");
        assert_eq!(value["amount"], "100.00");
        e.amount = Decimal::new(12345, 3);
        assert!(
            e.env_vars()
                .contains(&("PAYWATCH_AMOUNT".into(), "12.345".into()))
        );
    }

    #[test]
    fn synthetic_event_is_marked_and_consistent() {
        let e = HookEvent::synthetic("ship", CheckoutStatus::Paid);
        assert!(e.test);
        assert_eq!(e.hook, "ship");
        assert_eq!(e.previous_status, Some(CheckoutStatus::Pending));
        let value: Value = serde_json::from_slice(&e.to_json()).expect("valid json");
        assert_eq!(value["test"], true);
        assert_eq!(value["status"], "PAID");
        let order_id = value["order_id"].as_str().expect("an order id");
        assert!(order_id.starts_with("PAYWATCH-TEST-"), "{order_id}");
        // The checkout parses as a Get Checkout result and agrees with the event.
        let checkout: Checkout = serde_json::from_str(e.checkout.get()).expect("a wire checkout");
        let facts = checkout.facts().expect("every needed field present");
        assert_eq!(facts.id, e.checkout_id);
        assert_eq!(facts.order_id.as_deref(), Some(order_id));
        assert_eq!(facts.amount, e.amount);
        assert_eq!(facts.status, Some(CheckoutStatus::Paid));
        assert!(e.env_vars().contains(&("PAYWATCH_TEST".into(), "1".into())));

        let first = HookEvent::synthetic("ship", CheckoutStatus::Pending);
        assert_eq!(first.previous_status, None);
        assert_ne!(first.event_id, e.event_id, "a fresh event id each time");
        let refund = HookEvent::synthetic("ship", CheckoutStatus::Refunded);
        assert_eq!(refund.previous_status, Some(CheckoutStatus::Paid));
        let partial = HookEvent::synthetic("ship", CheckoutStatus::PartiallyRefunded);
        assert_eq!(partial.total_refunded, Some(Decimal::new(2500, 2)));
        assert_eq!(partial.refund_amount, partial.total_refunded);
        assert_eq!(e.refund_amount, None, "a payment refunds nothing");
    }
}
