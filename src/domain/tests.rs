//! Unit tests of `domain`.

use super::*;

#[test]
fn status_accepts_both_documented_spellings() {
    assert_eq!(
        CheckoutStatus::parse("PARTIALLY_REFUNDED"),
        CheckoutStatus::PartiallyRefunded
    );
    assert_eq!(
        CheckoutStatus::parse("Partially refunded"),
        CheckoutStatus::PartiallyRefunded
    );
    assert_eq!(
        CheckoutStatus::parse("Pending confirmation"),
        CheckoutStatus::PendingConfirmation
    );
    assert_eq!(CheckoutStatus::parse("Paid"), CheckoutStatus::Paid);
    for status in CheckoutStatus::KNOWN {
        assert_eq!(CheckoutStatus::parse(status.as_str()), status);
        assert_eq!(CheckoutStatus::parse(status.spec_spelling()), status);
    }
}

#[test]
fn unknown_status_is_kept_verbatim() {
    let status = CheckoutStatus::parse("On hold (manual review)");
    assert_eq!(
        status,
        CheckoutStatus::Unknown("On hold (manual review)".into())
    );
    assert_eq!(status.as_str(), "On hold (manual review)");
    assert!(!status.is_final());
}

#[test]
fn decimals_are_exact() {
    assert_eq!(
        parse_decimal("19.99").map(|d| d.to_string()),
        Some("19.99".into())
    );
    assert_eq!(
        parse_decimal("100.00").map(|d| d.to_string()),
        Some("100.00".into())
    );
    assert_eq!(
        parse_decimal("1.5e2").map(|d| d.to_string()),
        Some("150".into())
    );
    assert_eq!(
        parse_decimal("0.1").and_then(|a| parse_decimal("0.2").map(|b| a + b)),
        parse_decimal("0.3")
    );
    assert_eq!(parse_decimal("abc"), None);
    assert_eq!(parse_decimal(""), None);
    assert_eq!(format_money(Decimal::new(100, 0)), "100.00");
    assert_eq!(format_money(Decimal::new(12345, 3)), "12.345");
}

#[test]
fn amount_must_be_positive() {
    assert!("-1".parse::<Amount>().is_err());
    assert!("0".parse::<Amount>().is_err());
    let error = "12,5".parse::<Amount>().expect_err("invalid");
    assert!(error.to_string().contains("'12,5'"), "{error}");
    assert_eq!(
        "0.01".parse::<Amount>().map(|a| a.to_string()),
        Ok("0.01".into())
    );
}

#[test]
fn watched_documents_share_their_collection_and_name_the_same_place() {
    let mut paths = CollectionPaths::default();
    let a = FirestoreLocation::new("pc-test-734bc", "checkouts", "Ab3dEf6hIj9kLm2nOp5q")
        .expect("valid")
        .with_database("payments")
        .expect("valid database");
    let b = FirestoreLocation::new("pc-test-734bc", "checkouts", "other")
        .expect("valid")
        .with_database("payments")
        .expect("valid database");
    let (watched_a, watched_b) = (paths.document(&a), paths.document(&b));
    assert_eq!(paths.len(), 1, "one path for one collection");
    assert!(Arc::ptr_eq(&watched_a.collection, &watched_b.collection));
    assert_eq!(watched_a.location(), a);
    assert_eq!(watched_a.document_name(), a.document_name());
    assert_eq!(watched_a.database_name(), a.database_name());
    assert_eq!(watched_a.project(), "pc-test-734bc");
    assert!(watched_a.is_at(&a) && !watched_a.is_at(&b));
    assert!(watched_a.is_named(&a.document_name()));
    assert!(!watched_a.is_named(&b.document_name()));
    assert!(!watched_a.is_named(&format!("{}x", a.document_name())));
    assert!(!watched_a.is_named("Ab3dEf6hIj9kLm2nOp5q"));
    assert_ne!(watched_a, watched_b);
    assert_eq!(watched_a, paths.document(&a));
    // The same document in another database or collection is another place.
    let elsewhere = a.clone().with_database("(default)").expect("valid");
    assert!(!watched_a.is_at(&elsewhere));
    assert_ne!(paths.document(&elsewhere), watched_a);
    let other_collection = FirestoreLocation::new("pc-test-734bc", "links", "Ab3dEf6hIj9kLm2nOp5q")
        .expect("valid")
        .with_database("payments")
        .expect("valid database");
    assert!(!watched_a.is_at(&other_collection));
    assert!(!watched_a.is_named(&other_collection.document_name()));
}

#[test]
fn collection_paths_no_document_uses_are_dropped() {
    let mut paths = CollectionPaths::default();
    let held = paths.document(&FirestoreLocation::new("kept", "c", "d").expect("valid"));
    for n in 0..1000 {
        let location = FirestoreLocation::new(&format!("p{n}"), "c", "d").expect("valid");
        drop(paths.document(&location));
        assert!(paths.len() <= 40, "{} paths held after {n}", paths.len());
    }
    // The one still in use was kept and is shared again.
    let again = paths.document(&FirestoreLocation::new("kept", "c", "e").expect("valid"));
    assert!(Arc::ptr_eq(&held.collection, &again.collection));
}

#[test]
fn checkout_id_round_trips_through_string() {
    let long = "a".repeat(64);
    for text in ["1653241101733169556", long.as_str()] {
        let id: CheckoutId = text.parse().expect("valid");
        assert_eq!(id.as_str(), text);
        assert_eq!(String::from(id.clone()), text);
        assert_eq!(id.to_string(), text);
        let json = serde_json::to_string(&id).expect("serialises");
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<CheckoutId>(&json).expect("parses"),
            id
        );
    }
}

#[test]
fn checkout_id_rejects_path_tricks() {
    assert!("1653241101733169556".parse::<CheckoutId>().is_ok());
    assert!("../admin".parse::<CheckoutId>().is_err());
    assert!("".parse::<CheckoutId>().is_err());
    assert!("a b".parse::<CheckoutId>().is_err());
}

#[test]
fn currency_is_three_letters() {
    assert_eq!(
        "aed".parse::<Currency>().map(|c| c.to_string()),
        Ok("AED".into())
    );
    assert!("AEDX".parse::<Currency>().is_err());
    assert!("A1D".parse::<Currency>().is_err());
}

#[test]
fn firestore_location_names_the_document() {
    let location =
        FirestoreLocation::new("pc-test-734bc", "checkouts", "abc123").expect("valid coordinates");
    assert_eq!(
        location.document_name(),
        "projects/pc-test-734bc/databases/(default)/documents/checkouts/abc123"
    );
    let error = FirestoreLocation::new("p", "a/b", "d").expect_err("invalid");
    assert_eq!(error.what, "firebaseCollection");
    let error = FirestoreLocation::new("p", "c", "").expect_err("invalid");
    assert_eq!(error.what, "firebaseDocument");
}

#[test]
fn impossible_document_names_are_refused_naming_field_and_value() {
    let refused = [
        ("c", "__reserved__", "firebaseDocument", "reserved"),
        ("__name__", "d", "firebaseCollection", "reserved"),
        ("c", "", "firebaseDocument", "empty"),
        ("c", "a/b", "firebaseDocument", "'/'"),
        ("c", "..", "firebaseDocument", "'..'"),
        ("c", "tab\there", "firebaseDocument", "control"),
    ];
    for (collection, document, field, reason) in refused {
        let error = FirestoreLocation::new("p", collection, document).expect_err(document);
        assert_eq!(error.what, field, "{error}");
        assert!(error.to_string().contains(reason), "{error}");
    }
    let long = "x".repeat(1501);
    let error = FirestoreLocation::new("p", "c", &long).expect_err("overlong");
    assert!(error.to_string().contains("1500-byte"), "{error}");
    // Not reserved: underscores only at one end, or too short to be __x__.
    for fine in ["__x", "x__", "__", "___", "a__b__"] {
        assert!(FirestoreLocation::new("p", "c", fine).is_ok(), "{fine}");
    }
    assert!(FirestoreLocation::new("p", "c", &"y".repeat(1500)).is_ok());
}

#[test]
fn database_id_is_carried_in_every_name() {
    let location = FirestoreLocation::new("p", "checkouts", "d").expect("valid");
    assert_eq!(location.database, "(default)");
    let named = location
        .with_database("payments-eu")
        .expect("valid database");
    assert_eq!(named.database_name(), "projects/p/databases/payments-eu");
    assert_eq!(
        named.document_name(),
        "projects/p/databases/payments-eu/documents/checkouts/d"
    );
    for bad in ["", "Bad", "ab", "1abc", "abc-", "a/bc", "(other)"] {
        let error = check_database_id("[firestore] database", bad).expect_err(bad);
        assert_eq!(error.what, "[firestore] database");
    }
    assert!(check_database_id("[firestore] database", "(default)").is_ok());
}
