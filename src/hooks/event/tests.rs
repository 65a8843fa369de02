//! Unit tests of `event`.

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
