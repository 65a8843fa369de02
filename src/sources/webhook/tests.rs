//! Unit tests of `webhook`.

use super::*;

#[test]
fn the_checkout_id_is_found_in_the_usual_places() {
    for body in [
        r#"{"checkoutId":"1234"}"#,
        r#"{"checkout":{"id":"1234","status":"PAID"}}"#,
        r#"{"event":"x","data":{"id":1234}}"#,
        r#"{"success":true,"result":{"id":"1234"}}"#,
        r#"{"id":"1234","status":"PAID"}"#,
    ] {
        assert_eq!(
            checkout_id_of(body.as_bytes()).expect(body),
            Some("1234".parse().expect("id")),
            "{body}"
        );
    }
    assert_eq!(checkout_id_of(br#"{"event":"test"}"#).expect("no id"), None);
}

#[test]
fn malformed_bodies_are_named() {
    assert!(
        checkout_id_of(b"{nope")
            .expect_err("not json")
            .contains("not JSON")
    );
    assert!(
        checkout_id_of(b"[1]")
            .expect_err("array")
            .contains("object")
    );
    let error = checkout_id_of(br#"{"checkout":{"id":"12; DROP"}}"#).expect_err("bad id");
    assert!(error.contains("checkout.id"), "{error}");
    let error = checkout_id_of(br#"{"checkoutId":[1]}"#).expect_err("array id");
    assert!(error.contains("checkoutId"), "{error}");
}

#[test]
fn ipv6_addresses_are_limited_per_64_and_mapped_ipv4_as_ipv4() {
    let key = |text: &str| address_key(text.parse().expect("address"));
    assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
    assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff:1:2:3"));
    assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2::"));
    assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
}

#[test]
fn the_window_is_a_minute_divided_by_the_rate() {
    assert_eq!(window_length(10), Duration::from_secs(6));
    assert_eq!(window_length(1), Duration::from_secs(60));
    assert_eq!(window_length(60), Duration::from_secs(1));
}

#[test]
fn a_window_folds_what_arrives_in_it_and_ends_in_one_nudge() {
    let windows = Windows {
        length: Duration::from_secs(1),
        open: Mutex::new(HashMap::new()),
    };
    let id: CheckoutId = "77".parse().expect("id");
    let t0 = Instant::now();
    assert_eq!(windows.note(&id, t0), Noted::Opened);
    let t1 = t0 + Duration::from_millis(10);
    for n in 0..100 {
        assert_eq!(
            windows.note(&id, t1 + Duration::from_millis(n)),
            Noted::Folded
        );
    }
    // The window ends with one nudge, seen when the first folded one arrived.
    assert_eq!(windows.end(&id), Some(t1));
    // The next window folded nothing: it closes, and the next notification opens one.
    assert_eq!(windows.end(&id), None);
    assert_eq!(windows.note(&id, t1), Noted::Opened);
    assert_eq!(windows.close(&id), None);
}

#[tokio::test(start_paused = true)]
async fn every_notification_is_followed_by_a_nudge_and_a_flood_costs_one_per_window() {
    let windows = Arc::new(Windows {
        length: Duration::from_secs(1),
        open: Mutex::new(HashMap::new()),
    });
    let (nudges, mut received) = mpsc::channel::<Nudge>(1024);
    let stop = CancellationToken::new();
    let id: CheckoutId = "42".parse().expect("id");
    let start = tokio::time::Instant::now();
    let collector = tokio::spawn(async move {
        let mut sent = Vec::new();
        while let Some(nudge) = received.recv().await {
            assert_eq!(nudge.source, Source::Webhook);
            sent.push(tokio::time::Instant::now() - start);
        }
        sent
    });
    let mut notified = Vec::new();
    // A notification every 10 ms for 3.5 s.
    while start.elapsed() < Duration::from_millis(3500) {
        let now = Instant::now();
        notified.push(tokio::time::Instant::now() - start);
        if windows.note(&id, now) == Noted::Opened {
            tokio::spawn(run_window(
                Arc::clone(&windows),
                id.clone(),
                now,
                nudges.clone(),
                stop.clone(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(nudges);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let sent = collector.await.expect("collector");
    // One at once, then one at the end of each of the windows the flood reached.
    assert_eq!(sent.len(), 5, "{sent:?}");
    for pair in sent.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_secs(1), "{sent:?}");
    }
    // The last notification was followed by a nudge sent after it arrived.
    let last = *notified.last().expect("notified");
    assert!(*sent.last().expect("sent") >= last, "{sent:?} {last:?}");
    assert!(windows.lock().is_empty(), "the last window closed");
}

#[tokio::test(start_paused = true)]
async fn a_window_stopped_early_sends_what_it_holds_at_once() {
    let windows = Arc::new(Windows {
        length: Duration::from_secs(60),
        open: Mutex::new(HashMap::new()),
    });
    let (nudges, mut received) = mpsc::channel(8);
    let stop = CancellationToken::new();
    let id: CheckoutId = "43".parse().expect("id");
    let t0 = Instant::now();
    assert_eq!(windows.note(&id, t0), Noted::Opened);
    let task = tokio::spawn(run_window(
        Arc::clone(&windows),
        id.clone(),
        t0,
        nudges,
        stop.clone(),
    ));
    received.recv().await.expect("the opening nudge");
    assert_eq!(windows.note(&id, Instant::now()), Noted::Folded);
    stop.cancel();
    task.await.expect("window task");
    received.recv().await.expect("the folded one, at once");
    assert!(received.recv().await.is_none(), "and nothing more");
}

#[test]
fn what_is_not_acted_on_is_logged_as_counts_a_line_a_minute_at_most() {
    let tally = Tally::new("X-Paymennt-Signature".into());
    let from: IpAddr = "192.0.2.1".parse().expect("address");
    let t0 = Instant::now();
    let mut lines = Vec::new();
    // 10,000 unknown ids over two minutes, with the summary task's tick each minute.
    for n in 0..10_000u64 {
        let now = t0 + Duration::from_millis(n * 12);
        if let Some(summary) = tally.note(NotActed::NotTracked, from, now) {
            lines.push(summary);
        }
        if n % 5_000 == 4_999
            && let Some(summary) = tally.take(now)
        {
            lines.push(summary);
        }
    }
    assert!(lines.len() <= 4, "{} lines", lines.len());
    let counted: u64 = lines.iter().map(|s| s.count(NotActed::NotTracked)).sum();
    assert_eq!(counted, 10_000, "every one counted");
    assert_eq!(
        lines[0].count(NotActed::NotTracked),
        1,
        "the first is seen at once"
    );
    // Refusals name what to check.
    tally.note(NotActed::Unsigned, from, t0);
    tally.note(NotActed::BadSignature, from, t0);
    let text = tally.take(t0).expect("counts").to_string();
    assert!(text.contains("webhook_require_signature = false"), "{text}");
    assert!(text.contains("--show-hmac-key"), "{text}");
    assert!(tally.take(t0).is_none(), "taken");
}

#[test]
fn signatures_are_hex_hmac_sha256_of_the_body() {
    let key = Secret::new("0123456789abcdef");
    let body = br#"{"checkoutId":"1"}"#;
    let signature = sign("0123456789abcdef", body);
    assert_eq!(signature.len(), 64);
    assert!(signature_matches(&key, signature.as_bytes(), body));
    assert!(signature_matches(
        &key,
        format!("sha256={signature}").as_bytes(),
        body
    ));
    assert!(!signature_matches(&key, signature.as_bytes(), b"{}"));
    assert!(!signature_matches(
        &Secret::new("other"),
        signature.as_bytes(),
        body
    ));
    assert!(!signature_matches(&key, b"not hex", body));
}
