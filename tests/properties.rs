//! Property tests over everything paywatch parses from outside: paymennt responses, statuses,
//! amounts, ids, Firestore coordinates, durations and config values.
//!
//! What they pin: no input panics; a parsed amount formats back to the same decimal; every
//! documented status parses in both of paymennt's spellings; a config value out of range is an
//! error that names its key, never a panic or a silent default.

use std::str::FromStr;

use proptest::prelude::*;
use rust_decimal::Decimal;

use paywatch::cli::checkouts::parse_response;
use paywatch::domain::{
    Amount, CheckoutId, CheckoutStatus, Currency, FirestoreLocation, format_money, parse_decimal,
};
use paywatch::paymennt::wire::{Checkout, JsonDecimal};
use paywatch::settings::{COUNT_BOUNDS, Settings};

/// A decimal with up to 28 significant digits and up to 10 decimals, positive or negative.
fn any_decimal() -> impl Strategy<Value = Decimal> {
    (any::<i64>(), 0u32..=10).prop_map(|(mantissa, scale)| Decimal::new(mantissa, scale))
}

/// A create-link response as paymennt documents it, with the given fields substituted.
fn create_link_response(id: &str, amount: &str, status: &str, document: &str) -> String {
    format!(
        r#"{{"success":true,"elapsed":12,"result":{{"id":"{id}","displayId":"QS3IM5",
        "requestId":"ORD-1-r1","orderId":"ORD-1","currency":"AED","amount":{amount},
        "status":"{status}","totalRefunded":0,
        "redirectUrl":"https://pay.test.paymennt.com/checkout/7a3c",
        "firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts",
        "firebaseDocument":"{document}"}}}}"#
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_as_a_response_never_panics(text in ".{0,400}") {
        let _ = parse_response(&text, "stdin");
    }

    #[test]
    fn any_bytes_as_a_response_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        // The CLI reads files as bytes; invalid UTF-8 is refused before parsing, lossy text is
        // what a careless caller might pass on.
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_response(&text, "stdin");
    }

    #[test]
    fn truncated_responses_are_errors_not_panics(cut in 0usize..400) {
        let full = create_link_response("1653241101733169556", "100.00", "PENDING", "doc-1");
        let cut = cut.min(full.len());
        if let Some(prefix) = full.get(..cut) {
            let parsed = parse_response(prefix, "stdin");
            // Only the whole text (or nothing missing but trailing whitespace) parses.
            if prefix.trim_end().len() < full.trim_end().len() {
                prop_assert!(parsed.is_err(), "a truncated response parsed: {prefix}");
            }
        }
    }

    #[test]
    fn response_fields_of_any_content_never_panic(
        id in ".{0,80}",
        amount in "[-+0-9.eE]{0,40}",
        status in ".{0,40}",
        document in ".{0,80}",
    ) {
        let escape = |text: &str| serde_json::to_string(text)
            .map(|quoted| quoted.trim_matches('"').to_owned())
            .unwrap_or_default();
        let text = create_link_response(&escape(&id), &amount, &escape(&status), &escape(&document));
        if let Ok(checkout) = parse_response(&text, "stdin") {
            let _ = checkout.facts();
            let _ = checkout.answer_facts();
        }
    }

    #[test]
    fn a_response_amount_is_read_exactly(value in any_decimal()) {
        let text = create_link_response("1653241101733169556", &value.to_string(), "PENDING", "doc-1");
        let checkout = parse_response(&text, "stdin").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let amount = checkout.amount.map(|JsonDecimal(amount)| amount);
        prop_assert_eq!(amount, Some(value));
    }

    #[test]
    fn an_amount_formats_back_to_the_same_decimal(value in any_decimal()) {
        let shown = format_money(value);
        prop_assert_eq!(parse_decimal(&shown), Some(value));
        prop_assert_eq!(parse_decimal(&value.to_string()), Some(value));
        if value > Decimal::ZERO {
            let amount = Amount::from_str(&shown).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(amount.value(), value);
        } else {
            prop_assert!(Amount::from_str(&shown).is_err(), "{shown} accepted as an amount");
        }
    }

    #[test]
    fn any_amount_text_never_panics(text in ".{0,100}") {
        let _ = Amount::from_str(&text);
        let _ = parse_decimal(&text);
        let _ = serde_json::from_str::<JsonDecimal>(&text);
    }

    #[test]
    fn json_numbers_keep_their_digits(value in any_decimal()) {
        let decoded: JsonDecimal = serde_json::from_str(&value.to_string())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded.0, value);
        let encoded = serde_json::to_string(&decoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(encoded, value.to_string());
    }

    #[test]
    fn any_status_text_parses_without_error(text in ".{0,60}") {
        let status = CheckoutStatus::parse(&text);
        if let CheckoutStatus::Unknown(kept) = &status {
            // Unknown statuses are kept verbatim, never rewritten.
            prop_assert_eq!(kept, &text);
        }
        let _ = CheckoutStatus::from_str(&text);
    }

    #[test]
    fn any_checkout_id_text_never_panics_and_valid_ids_round_trip(text in ".{0,80}") {
        if let Ok(id) = CheckoutId::from_str(&text) {
            prop_assert_eq!(id.as_str(), text.as_str());
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }

    #[test]
    fn any_currency_text_never_panics(text in ".{0,10}") {
        if let Ok(currency) = Currency::from_str(&text) {
            prop_assert_eq!(currency.as_str().len(), 3);
        }
    }

    #[test]
    fn firestore_coordinates_never_panic_and_accepted_ones_stay_one_segment(
        project in ".{0,40}",
        collection in ".{0,40}",
        document in ".{0,80}",
    ) {
        if let Ok(location) = FirestoreLocation::new(&project, &collection, &document) {
            let name = location.document_name();
            prop_assert!(name.ends_with(&format!("/{collection}/{document}")), "{name}");
            prop_assert!(!document.contains('/'));
        }
    }

    #[test]
    fn wire_checkouts_of_any_json_never_panic(text in r#"\{("[a-zA-Z]{1,16}":("[^"\\]{0,20}"|-?[0-9]{1,30}(\.[0-9]{0,12})?|null|true|\[\]|\{\}),?){0,8}\}"#) {
        if let Ok(checkout) = serde_json::from_str::<Checkout>(&text) {
            let _ = checkout.facts();
            let _ = checkout.answer_facts();
        }
    }

    #[test]
    fn config_durations_and_numbers_never_panic(
        key in prop::sample::select(vec![
            ("reconcile", "interval"),
            ("firestore", "idle_timeout"),
            ("firestore", "refund_watch"),
            ("paymennt", "request_timeout"),
            ("paymennt", "connect_timeout"),
            ("daemon", "drain_timeout"),
            ("discovery", "interval"),
            ("discovery", "lookback"),
        ]),
        value in prop_oneof![
            "[0-9]{1,25}(ns|us|ms|s|m|h|d|days|w|y|years)?",
            "-[0-9]{1,5}s",
            ".{0,20}",
        ],
    ) {
        let (section, name) = key;
        let quoted = toml::Value::String(value.clone()).to_string();
        let outcome = load_config(&format!("[{section}]\n{name} = {quoted}\n"));
        if let Err(message) = outcome {
            prop_assert!(
                message.contains(name),
                "the error for {section}.{name} = {quoted} does not name the key: {message}"
            );
        }
    }

    #[test]
    fn numeric_settings_are_accepted_exactly_within_their_bounds(value in prop_oneof![
        Just(i64::MIN), Just(-1i64), Just(0i64), Just(1i64), Just(20i64), Just(21i64),
        Just(256i64), Just(257i64), Just(i64::from(u32::MAX) + 1), Just(i64::MAX),
        -10i64..2000,
        any::<i64>(),
    ]) {
        for (bound_key, section, name) in [
            ("hooks_concurrency", "", "hooks_concurrency"),
            ("paymennt.concurrency", "[paymennt]", "concurrency"),
            ("paymennt.max_retries", "[paymennt]", "max_retries"),
            ("firestore.targets_per_stream", "[firestore]", "targets_per_stream"),
        ] {
            let (_, min, max) = COUNT_BOUNDS
                .iter()
                .find(|(key, _, _)| *key == bound_key)
                .copied()
                .ok_or_else(|| TestCaseError::fail(format!("no bound for {bound_key}")))?;
            let within = u64::try_from(value).is_ok_and(|v| (min..=max).contains(&v));
            let outcome = load_config(&format!("{section}\n{name} = {value}\n"));
            match outcome {
                Ok(_) => prop_assert!(within, "{bound_key} = {value} accepted outside {min}..={max}"),
                Err(message) => {
                    prop_assert!(!within, "{bound_key} = {value} refused within bounds: {message}");
                    prop_assert!(message.contains(name), "{bound_key} = {value}: {message}");
                }
            }
        }
    }
}

/// Loads `toml` as a config file with an empty environment; the error's text on failure.
fn load_config(toml: &str) -> Result<Settings, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("paywatch.toml");
    std::fs::write(&path, toml).map_err(|e| e.to_string())?;
    let outcome =
        Settings::load_with_env(Some(&path), std::iter::empty()).map_err(|e| e.to_string());
    drop(dir);
    outcome
}

#[test]
fn every_documented_status_parses_in_both_spellings() {
    for status in CheckoutStatus::KNOWN {
        for spelling in [status.as_str(), status.spec_spelling()] {
            assert_eq!(CheckoutStatus::parse(spelling), status, "{spelling}");
            assert_eq!(
                CheckoutStatus::parse(&spelling.to_lowercase()),
                status,
                "{spelling} in lower case"
            );
        }
    }
}
