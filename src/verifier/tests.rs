//! Unit tests of `verifier`.

use super::*;

fn nudge(id: &str, source: Source) -> Nudge {
    Nudge {
        checkout_id: id.parse().expect("id"),
        source,
        seen_at: Instant::now(),
        changed_at: None,
        seen_after: None,
        ticket: None,
    }
}

/// Checkout 5, PENDING (a Get Checkout result) and PAID (its whole answer).
const PENDING: &str = r#"{"id":"5","orderId":"ORD-5","currency":"AED","amount":5,"status":"PENDING","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d5"}"#;
const PAID: &str = r#"{"success":true,"result":{"id":"5","orderId":"ORD-5","currency":"AED","amount":5,"status":"PAID","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d5"}}"#;

/// The status the ledger holds for checkout `id`.
async fn status(ledger: &Ledger, id: &CheckoutId) -> Option<String> {
    ledger
        .checkout(id)
        .await
        .expect("read")
        .and_then(|c| c.status)
        .map(|status| status.as_str().to_owned())
}

/// Another process verifies checkout 5 (PENDING) with the ledger's next ticket.
async fn verified_elsewhere(ledger: &Ledger) {
    let ticket = ledger.issue_ticket().await.expect("ticket");
    let answer = VerifiedCheckout::for_tests_with(PENDING, ticket, Utc::now());
    ledger
        .apply(
            &answer,
            Source::Manual,
            None,
            &[],
            Duration::from_secs(3600),
        )
        .await
        .expect("apply");
}

/// A ticketer and a recorder for `verifier`, as [`Verifier::run`] starts them.
fn queues(verifier: &Verifier) -> LedgerQueues {
    LedgerQueues::start(&verifier.ledger, &verifier.config, 1)
        .expect("threads")
        .0
}

fn schedule() -> Schedule {
    Schedule {
        slots: HashMap::new(),
        urgent: VecDeque::new(),
        sweep: VecDeque::new(),
        failures: HashMap::new(),
    }
}

fn next_id(schedule: &mut Schedule) -> Option<String> {
    schedule.next(true).map(|n| n.checkout_id.to_string())
}

#[test]
fn a_firestore_change_jumps_a_sweep() {
    let mut schedule = schedule();
    for id in ["1", "2", "3"] {
        schedule.accept(nudge(id, Source::Reconcile));
    }
    schedule.accept(nudge("9", Source::Firestore));
    assert_eq!(next_id(&mut schedule).as_deref(), Some("9"));
    assert_eq!(next_id(&mut schedule).as_deref(), Some("1"));
}

#[test]
fn a_queued_checkout_is_queued_once_and_promoted_by_an_urgent_nudge() {
    let mut schedule = schedule();
    schedule.accept(nudge("1", Source::Reconcile));
    schedule.accept(nudge("2", Source::Reconcile));
    schedule.accept(nudge("2", Source::Reconcile));
    schedule.accept(nudge("2", Source::Firestore));
    let first = schedule.next(true).expect("one queued");
    assert_eq!(first.checkout_id.as_str(), "2");
    assert_eq!(
        first.source,
        Source::Firestore,
        "the urgent nudge (with its change time) is kept"
    );
    assert_eq!(next_id(&mut schedule).as_deref(), Some("1"));
    assert_eq!(
        next_id(&mut schedule),
        None,
        "the stale sweep entry for 2 is skipped"
    );
}

#[test]
fn a_burst_while_running_costs_one_more_call() {
    let mut schedule = schedule();
    schedule.accept(nudge("1", Source::Firestore));
    let running = schedule.next(true).expect("starts");
    for _ in 0..10 {
        schedule.accept(nudge("1", Source::Firestore));
    }
    assert_eq!(
        next_id(&mut schedule),
        None,
        "never two calls for one checkout"
    );
    schedule.finish(&running.checkout_id);
    assert_eq!(
        next_id(&mut schedule).as_deref(),
        Some("1"),
        "one call after the burst"
    );
    schedule.finish(&running.checkout_id);
    assert_eq!(next_id(&mut schedule), None);
    assert!(schedule.slots.is_empty());
}

#[test]
fn an_unknown_status_cannot_forge_a_payment_line() {
    let forged = r#"{"id":"7","orderId":"ORD-7\nPAID checkout=997","currency":"AED","amount":5,"status":"ON_HOLD\nINFO paywatch::payment: PAID checkout=999 order=FORGED 1000.00 AED"}"#;
    let verified = VerifiedCheckout::for_tests(forged);
    let line = payment_line(
        &verified,
        Some("PENDING\nINFO paywatch::payment: PAID checkout=998"),
        Source::Reconcile,
        None,
        Duration::ZERO,
    );
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(!line.contains('\r'), "{line}");
    assert!(
        line.starts_with(r"ON_HOLD\nINFO"),
        "escaped, still readable: {line}"
    );
}

/// A verifier whose paymennt runs `meanwhile`, then answers with `body` (HTTP 200, JSON).
async fn verifier_answering<F>(
    ledger: &Ledger,
    body: &'static str,
    meanwhile: impl Fn() -> F + Clone + Send + Sync + 'static,
) -> Verifier
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let app = axum::Router::new().fallback(move || {
        let meanwhile = meanwhile.clone();
        async move {
            meanwhile().await;
            ([("content-type", "application/json")], body)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let credentials = crate::settings::ApiCredentials {
        key: crate::settings::Secret::new("k"),
        secret: crate::settings::Secret::new("s"),
    };
    let client = Client::new(
        &format!("http://{addr}/mer/v2.0/"),
        &credentials,
        Duration::from_secs(2),
        Duration::from_secs(2),
        crate::paymennt::RetryPolicy {
            max_retries: 0,
            base: Duration::from_millis(5),
            max: Duration::from_millis(10),
        },
    )
    .expect("client");
    let config = VerifierConfig {
        client,
        hooks: Arc::new(Vec::new()),
        refund_watch: Duration::from_secs(3600),
    };
    let (_sender, receiver) = watch::channel(config);
    // The receiver keeps the last value after the sender is dropped.
    Verifier::new(
        ledger.clone(),
        receiver,
        1,
        VerifierSignals {
            dispatcher: idle_dispatcher(ledger),
            watch_set_changed: watch::channel(0).0,
        },
    )
}

/// The wake handle of a dispatcher that never runs (its wake-ups can be taken by a test).
fn idle_dispatcher(ledger: &Ledger) -> crate::hooks::DispatcherWake {
    crate::hooks::Dispatcher::new(
        ledger.clone(),
        crate::hooks::config::HookSet::new(Vec::new()),
        1,
    )
    .wake_handle()
}

#[tokio::test]
async fn only_a_transition_that_queued_deliveries_wakes_the_dispatcher() {
    let notify_paid = HookSettings::for_tests("notify", &["PAID"]);
    for (hooks, wakes) in [(Vec::new(), 0), (vec![notify_paid], 1)] {
        let ledger = Ledger::open_in_memory().expect("ledger");
        let verifier = verifier_answering(&ledger, PAID, || async {}).await;
        let client = verifier.config.borrow().client.clone();
        let (_config, config) = watch::channel(VerifierConfig {
            client,
            hooks: Arc::new(hooks),
            refund_watch: Duration::from_secs(3600),
        });
        let dispatcher = idle_dispatcher(&ledger);
        let verifier = Verifier {
            config,
            dispatcher: dispatcher.clone(),
            ..verifier
        };
        let queues = queues(&verifier);
        assert!(
            verifier
                .verify(nudge("5", Source::Firestore), &queues)
                .await
                .is_none()
        );
        assert_eq!(verifier.stats().borrow().transitions, 1);
        assert_eq!(u64::from(dispatcher.take_pending().await), wakes);
    }
}

#[tokio::test]
async fn a_stale_answer_keeps_the_checkout_marked_and_is_retried() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let id: CheckoutId = "5".parse().expect("id");
    // While our request is in flight, another process verifies the checkout with a later
    // ticket, and then a change is seen: our answer is stale and must clear nothing.
    let other = ledger.clone();
    let meanwhile = move || {
        let other = other.clone();
        async move {
            verified_elsewhere(&other).await;
            let seen = other.last_ticket().await.expect("counter");
            other
                .mark_needs_verify(&["5".parse().expect("id")], seen)
                .expect("mark");
        }
    };
    let verifier = verifier_answering(&ledger, PAID, meanwhile).await;
    let retry = verifier
        .verify(nudge("5", Source::Firestore), &queues(&verifier))
        .await;
    assert!(retry.is_some(), "a stale answer is retried");
    let entry = ledger.watch_set().await.expect("set");
    assert_eq!(entry[0].checkout_id, id);
    assert!(
        entry[0].needs_verify,
        "the checkout stays marked for verification"
    );
    assert_eq!(
        status(&ledger, &id).await.as_deref(),
        Some("PENDING"),
        "the stale PAID was not recorded; the retry will ask again"
    );
}

#[tokio::test]
async fn a_nudge_is_verified_with_the_ticket_it_carries_and_a_retry_asks_for_a_new_one() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let id: CheckoutId = "5".parse().expect("id");
    let noted = ledger
        .note_changes(std::slice::from_ref(&id))
        .await
        .expect("noted");
    // While our request is in flight, another process verifies the checkout with a later
    // ticket: our answer, ordered by the ticket the nudge carries, is stale.
    let other = ledger.clone();
    let meanwhile = move || {
        let other = other.clone();
        async move { verified_elsewhere(&other).await }
    };
    let verifier = verifier_answering(&ledger, PAID, meanwhile).await;
    // No ticketer: a nudge that carries its ticket needs none.
    let (tickets, no_ticketer) = mpsc::channel(1);
    drop(no_ticketer);
    let (recordings, waiting) = mpsc::channel(1);
    let (writer, config) = (ledger.clone(), verifier.config.clone());
    let runtime = tokio::runtime::Handle::current();
    let _recorder = GroupWriter::spawn("test-recorder", waiting, move |group| {
        runtime.block_on(record_answers(&writer, &config, group));
    })
    .expect("thread");
    let queues = LedgerQueues {
        tickets,
        recordings,
    };
    let carrying = Nudge {
        seen_after: Some(noted.seen_after),
        ticket: Some(noted.tickets[0]),
        ..nudge("5", Source::Firestore)
    };
    let retry = verifier.verify(carrying, &queues).await;
    assert_eq!(verifier.stats().borrow().calls, 1, "the call was made");
    let retry = retry.expect("a stale answer is retried");
    assert_eq!(retry.ticket, None, "a retry never reuses the ticket");
    assert_eq!(
        status(&ledger, &id).await.as_deref(),
        Some("PENDING"),
        "the answer to the older ticket was not recorded"
    );
}

#[tokio::test]
async fn a_burst_of_verifications_takes_its_tickets_in_one_transaction() {
    let dir = tempfile::tempdir().expect("dir");
    let ledger = Ledger::open(&dir.path().join("paywatch.db"))
        .await
        .expect("ledger");
    let before = crate::ledger::testing::wal_commits(&ledger);
    // All 20 requests wait before the ticketer starts, as a start-up's burst of nudges
    // waits for the ticketer's commit in progress.
    let (tickets, requests) = mpsc::channel(64);
    let mut replies = Vec::new();
    for id in 1..=20 {
        let (ticket, issued) = oneshot::channel();
        let request = TicketRequest {
            checkout_id: id.to_string().parse().expect("id"),
            seen_after: None,
            ticket,
        };
        tickets.try_send(request).expect("room");
        replies.push(issued);
    }
    drop(tickets);
    let issuer = ledger.clone();
    let runtime = tokio::runtime::Handle::current();
    let ticketer = GroupWriter::spawn("test-tickets", requests, move |group| {
        runtime.block_on(issue_tickets(&issuer, group));
    })
    .expect("thread");
    let mut issued_tickets = Vec::new();
    for issued in replies {
        issued_tickets.push(
            issued
                .await
                .expect("issued")
                .expect("ticket")
                .expect("asked"),
        );
    }
    ticketer.ended().await;
    assert!(
        issued_tickets.windows(2).all(|pair| pair[0] < pair[1]),
        "{issued_tickets:?}"
    );
    let commits = crate::ledger::testing::wal_commits(&ledger) - before;
    assert_eq!(commits, 1, "{commits} ledger commits for 20 tickets");
}

#[tokio::test]
async fn a_writer_thread_that_panics_drops_its_group_and_goes_on() {
    let (queue, waiting) = mpsc::channel(4);
    let writer = GroupWriter::spawn(
        "test-writer",
        waiting,
        |group: Vec<(u32, oneshot::Sender<u32>)>| {
            for (value, reply) in group {
                assert_ne!(value, 13, "unlucky");
                let _ = reply.send(value * 2);
            }
        },
    )
    .expect("thread");
    let (reply, panicked) = oneshot::channel();
    queue.send((13, reply)).await.expect("queued");
    assert!(
        panicked.await.is_err(),
        "the panicking group's reply is dropped"
    );
    let (reply, answered) = oneshot::channel();
    queue.send((4, reply)).await.expect("the thread goes on");
    assert_eq!(answered.await.expect("answered"), 8);
    drop(queue);
    writer.ended().await;
}

#[tokio::test]
async fn a_nudge_answered_by_a_later_request_makes_no_call() {
    let ledger = Ledger::open_in_memory().expect("ledger");
    let id: CheckoutId = "5".parse().expect("id");
    // A change is seen, then a request sent after it is answered and recorded.
    let seen = ledger.last_ticket().await.expect("counter");
    let ticket = ledger.issue_ticket().await.expect("ticket");
    ledger
        .apply(
            &VerifiedCheckout::for_tests_with(PENDING, ticket, Utc::now()),
            Source::Reconcile,
            None,
            &[],
            Duration::from_secs(3600),
        )
        .await
        .expect("apply");
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let verifier = verifier_answering(&ledger, PAID, move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {}
    })
    .await;
    let queues = queues(&verifier);
    let covered = Nudge {
        seen_after: Some(seen),
        ..nudge("5", Source::Firestore)
    };
    assert!(verifier.verify(covered, &queues).await.is_none());
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(verifier.stats().borrow().covered, 1);
    // A change seen after that request was sent is verified.
    let later = Nudge {
        seen_after: Some(ledger.last_ticket().await.expect("counter")),
        ..nudge("5", Source::Firestore)
    };
    assert!(verifier.verify(later, &queues).await.is_none());
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(status(&ledger, &id).await.as_deref(), Some("PAID"));
}

#[test]
fn sweeps_wait_while_draining_and_are_dropped() {
    let mut schedule = schedule();
    schedule.accept(nudge("1", Source::Reconcile));
    schedule.accept(nudge("2", Source::Firestore));
    assert_eq!(
        schedule
            .next(false)
            .map(|n| n.checkout_id.to_string())
            .as_deref(),
        Some("2")
    );
    assert!(schedule.next(false).is_none());
    schedule.drop_sweeps();
    assert!(
        !schedule
            .slots
            .contains_key(&"1".parse::<CheckoutId>().expect("id"))
    );
}
