//! A wrong address, environment or account (issue 10): nothing is unwatched, the operator is
//! told at error level and by `check-config --online`, and credentials never leave for a
//! plaintext or foreign host. After the fix, payments arrive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::signal::Signal;
use paywatch::domain::CheckoutId;
use paywatch::ledger::Ledger;
use paywatch::sandbox::Sandbox;

use crate::common::process::{self, Process, paywatch};
use crate::common::{self, DEADLINE, create_and_track, wait_for, wait_status};

/// Checkouts tracked in each test: more than the "many at once" threshold of five.
const CHECKOUTS: usize = 6;

/// A config whose paymennt is `base_url` (no client retries, a sweep every second) and whose
/// Firestore is `sandbox`'s.
fn write_config(dir: &Path, sandbox: &Sandbox, base_url: &str) -> PathBuf {
    let text = format!(
        "[ledger]\npath = \"{ledger}\"\n\n\
         [paymennt]\nbase_url = \"{base_url}\"\napi_key = \"{key}\"\napi_secret = \"{secret}\"\nmax_retries = 0\n\n\
         [firestore]\nendpoint = \"{endpoint}\"\nidle_timeout = \"10s\"\n\n\
         [reconcile]\ninterval = \"1s\"\n\n\
         [daemon]\ndrain_timeout = \"5s\"\n\n\
         [log]\nlevel = \"info\"\n",
        ledger = dir.join("paywatch.db").display(),
        key = sandbox.api_key(),
        secret = sandbox.api_secret(),
        endpoint = sandbox.firestore_endpoint(),
    );
    process::write_config(dir, &text)
}

/// A loopback server answering every request with a proxy's HTML 404 page, counting them.
async fn html_404_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::response::Html(
                    "<html><body><h1>404 Not Found</h1>Checkout not found</body></html>",
                ),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/mer/v2.0/"), hits)
}

async fn track_several(sandbox: &Sandbox, ledger: &Ledger) -> Vec<CheckoutId> {
    let mut ids = Vec::new();
    for n in 0..CHECKOUTS {
        ids.push(create_and_track(sandbox, ledger, &format!("ORD-MIS-{n}")).await);
    }
    ids
}

fn watched(ledger: &Ledger) -> usize {
    ledger.watch_set().expect("watch set").len()
}

/// Points the config back at the right paymennt and reloads.
async fn fix_and_reload(process: &mut Process, config: &Path, wrong: &str, right: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    std::fs::write(config, text.replace(wrong, right)).expect("fix config");
    process.signal(Signal::SIGHUP);
    process.expect_line("config reloaded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_404_base_url_unwatches_nothing_and_a_payment_after_the_fix_is_recorded() {
    let sandbox = common::sandbox().await;
    let (wrong, hits) = html_404_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &sandbox, &wrong);
    let ledger = Ledger::open(&dir.path().join("paywatch.db")).expect("ledger");
    let ids = track_several(&sandbox, &ledger).await;
    let mut process = paywatch().config(&config).run();
    process.expect_line("paywatch is running").await;
    process.expect_line("is not paymennt's API").await;
    // Several sweeps' worth of HTML 404s (the old code unwatched everything after three).
    wait_for("four sweeps of HTML 404s", DEADLINE, || async {
        (hits.load(Ordering::SeqCst) >= 4 * CHECKOUTS).then_some(())
    })
    .await;
    assert_eq!(
        watched(&ledger),
        CHECKOUTS,
        "every checkout is still watched"
    );
    assert!(
        ledger
            .watch_set()
            .expect("set")
            .iter()
            .all(|e| e.needs_verify),
        "nothing was verified, so every checkout still needs it"
    );
    fix_and_reload(&mut process, &config, &wrong, &sandbox.api_base_url()).await;
    sandbox.state().pay(&ids[0]).await.expect("pay");
    wait_status(&ledger, &ids[0], "PAID").await;
    assert_eq!(watched(&ledger), CHECKOUTS);
    drop(process);
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_checkouts_paymennt_says_do_not_exist_stay_watched_and_check_config_says_why() {
    // The checkouts live in one sandbox; the config points at another (as a test key pointed at
    // live would): paymennt's own JSON says each checkout does not exist.
    let sandbox = common::sandbox().await;
    let elsewhere = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = elsewhere.api_base_url();
    let config = write_config(dir.path(), &sandbox, &wrong);
    let ledger = Ledger::open(&dir.path().join("paywatch.db")).expect("ledger");
    let ids = track_several(&sandbox, &ledger).await;
    let mut process = paywatch().config(&config).run();
    process.expect_line("paywatch is running").await;
    process.expect_line("look gone at once").await;
    wait_for("four sweeps of not-found answers", DEADLINE, || async {
        let asked: u64 = ids
            .iter()
            .map(|id| elsewhere.state().get_checkout_calls(id))
            .sum();
        (asked >= (4 * CHECKOUTS) as u64).then_some(())
    })
    .await;
    assert_eq!(
        watched(&ledger),
        CHECKOUTS,
        "every checkout is still watched"
    );

    let check =
        tokio::task::block_in_place(|| process::run(&config, &["check-config", "--online"]));
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(out.contains("look gone"), "{out}");
    assert!(out.contains(&wrong), "names the base URL: {out}");
    assert!(out.contains("does not exist"), "{out}");

    fix_and_reload(&mut process, &config, &wrong, &sandbox.api_base_url()).await;
    sandbox.state().pay(&ids[0]).await.expect("pay");
    wait_status(&ledger, &ids[0], "PAID").await;
    assert_eq!(watched(&ledger), CHECKOUTS);
    drop(process);
    sandbox.shutdown().await;
    elsewhere.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_an_address_that_is_not_paymennt() {
    let sandbox = common::sandbox().await;
    let (wrong, _hits) = html_404_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &sandbox, &wrong);
    let check =
        tokio::task::block_in_place(|| process::run(&config, &["check-config", "--online"]));
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(out.contains("does not answer as paymennt's API"), "{out}");
    assert!(out.contains(&wrong), "{out}");
    assert!(out.contains("text/html"), "{out}");
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_base_url_off_loopback_is_refused_at_start_and_on_reload() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plaintext = "http://api.paymennt.com/mer/v2.0/";
    let config = write_config(dir.path(), &sandbox, plaintext);
    let run = tokio::task::block_in_place(|| process::run(&config, &["run"]));
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("paymennt.base_url") && err.contains("plaintext"),
        "{err}"
    );

    // Started right, then reloaded with the plaintext URL: refused, the old config kept.
    let right = sandbox.api_base_url();
    write_config(dir.path(), &sandbox, &right);
    let ledger = Ledger::open(&dir.path().join("paywatch.db")).expect("ledger");
    let id = create_and_track(&sandbox, &ledger, "ORD-PLAIN").await;
    let mut process = paywatch().config(&config).run();
    process.expect_line("paywatch is running").await;
    wait_status(&ledger, &id, "PENDING").await;
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace(&right, plaintext)).expect("break config");
    process.signal(Signal::SIGHUP);
    process.expect_line("config reload failed").await;
    sandbox.state().pay(&id).await.expect("pay");
    wait_status(&ledger, &id, "PAID").await;
    drop(process);
    sandbox.shutdown().await;
}
