//! The sandbox's payment page in a real browser, as paymennt's "Test the Integration" steps have
//! a merchant use it: headless Chromium (Debian's `chromium` and `chromium-driver`) driven over
//! WebDriver opens the link, enters the test card, accepts the terms and pays; the daemon
//! records PAID and runs the hook. A declined card fails (and goes to the `returnUrl`), Cancel
//! cancels.
//!
//! Without a browser the test says it skipped; under `CI=true` a missing browser is a failure.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use paywatch::ledger::{Ledger, TrackedVia};
use paywatch::paymennt::wire::LinkRequest;
use paywatch::sandbox::Sandbox;
use serde_json::json;

use crate::common;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process on a loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromedriver, or says why the test is skipped (a failure under `CI=true`).
fn driver() -> Option<Driver> {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !Path::new(path).exists())
        .collect();
    if !missing.is_empty() {
        let message = format!(
            "browser test skipped: {} not installed (apt-get install chromium chromium-driver)",
            missing.join(" and ")
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the {message}"
        );
        eprintln!("{message}");
        return None;
    }
    let port = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free port");
        listener.local_addr().expect("address").port()
    };
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        profile: tempfile::tempdir().expect("profile dir"),
    };
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + common::DEADLINE;
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on {port} in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(driver)
}

/// A headless Chromium session. The flags keep it off the network (this machine's is closed)
/// and let it run as root in a container.
async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                format!("--user-data-dir={}", driver.profile.path().display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// Creates a link, tracks it in the ledger, returns its id and payment page URL.
async fn link(
    sandbox: &Sandbox,
    ledger: &Ledger,
    order_id: &str,
    return_url: Option<String>,
) -> (paywatch::domain::CheckoutId, String) {
    let checkout = sandbox
        .state()
        .create_link(&LinkRequest {
            return_url,
            ..common::link_request(order_id, "100.00")
        })
        .await
        .expect("link created");
    let facts = checkout.facts().expect("complete");
    ledger.track(&facts, TrackedVia::Track).expect("tracked");
    let url = facts.redirect_url.clone().expect("a redirect URL");
    (facts.id, url)
}

/// Fills the card form; ticks the terms box when `accept`.
async fn fill(client: &Client, number: &str, accept: bool) {
    for (field, value) in [
        ("card_number", number),
        ("expiry", "12/25"),
        ("cvv", "100"),
        ("name", "TEST USER"),
    ] {
        let input = client.find(Locator::Id(field)).await.expect("field");
        input.clear().await.expect("cleared");
        input.send_keys(value).await.expect("typed");
    }
    let terms = client.find(Locator::Id("terms")).await.expect("terms box");
    if terms.is_selected().await.expect("checkbox state") != accept {
        terms.click().await.expect("ticked");
    }
}

/// Clicks a button and waits until the page's `element` says `expected` (the page before the
/// click may have an element of the same id, so the text is what tells the pages apart).
async fn submit(client: &Client, button: &str, element: &str, expected: &str) {
    client
        .find(Locator::Id(button))
        .await
        .expect("button")
        .click()
        .await
        .expect("clicked");
    let what = format!("#{element} to say '{expected}' after clicking #{button}");
    common::wait_for(&what, common::DEADLINE, || async {
        let text = client
            .find(Locator::Id(element))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(expected).then_some(())
    })
    .await;
}

fn hook_lines(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_card_pays_in_chromium_and_the_daemon_records_paid_and_runs_the_hook() {
    let Some(driver) = driver() else { return };
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hook_log = dir.path().join("hook.log");
    let hooks = format!(
        "[[hooks]]\nname = \"record\"\ncommand = [{exe}, \"demo-hook\", \"--append-to\", {log}]\ntimeout = \"30s\"\n",
        exe = toml::Value::String(common::process::binary().into()),
        log = toml::Value::String(hook_log.display().to_string()),
    );
    let (settings, path) = common::settings(dir.path(), &sandbox, "multiplexed", &hooks);
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let daemon = common::Daemon::start(&settings, &path).await;
    let client = browser(&driver).await;

    // 1. The documented test card, first without ticking the terms box, then paid.
    let (paid, page) = link(&sandbox, &ledger, "ORD-BROWSER-1", None).await;
    client.goto(&page).await.expect("page opens");
    let amount = client.find(Locator::Id("amount")).await.expect("amount");
    assert_eq!(amount.text().await.expect("text"), "100.00 AED");
    fill(&client, "4242 4242 4242 4242", false).await;
    submit(&client, "pay", "problems", "accept the Terms & Conditions").await;
    fill(&client, "4242 4242 4242 4241", true).await;
    submit(&client, "pay", "problems", "card number is not valid").await;
    assert_eq!(
        common::status_of(&ledger, &paid).as_deref(),
        Some("PENDING")
    );
    fill(&client, "4242 4242 4242 4242", true).await;
    submit(&client, "pay", "outcome", "Payment received").await;
    common::wait_status(&ledger, &paid, "PAID").await;
    common::wait_for("the hook to record PAID", common::DEADLINE, || async {
        hook_lines(&hook_log)
            .lines()
            .any(|line| line.contains("PAID: order ORD-BROWSER-1"))
            .then_some(())
    })
    .await;

    // 2. The declined card fails the checkout and goes to the link's returnUrl.
    let return_url = format!("{}/checkouts", sandbox.admin_url().trim_end_matches('/'));
    let (failed, page) = link(&sandbox, &ledger, "ORD-BROWSER-2", Some(return_url.clone())).await;
    client.goto(&page).await.expect("page opens");
    fill(&client, "4000 0000 0000 0002", true).await;
    client
        .find(Locator::Id("pay"))
        .await
        .expect("pay")
        .click()
        .await
        .expect("clicked");
    common::wait_for(
        "the browser to reach the returnUrl",
        common::DEADLINE,
        || async {
            let url = client.current_url().await.ok()?;
            (url.as_str() == return_url).then_some(())
        },
    )
    .await;
    common::wait_status(&ledger, &failed, "FAILED").await;

    // 3. Cancel cancels.
    let (cancelled, page) = link(&sandbox, &ledger, "ORD-BROWSER-3", None).await;
    client.goto(&page).await.expect("page opens");
    submit(&client, "cancel", "outcome", "You cancelled this payment").await;
    common::wait_status(&ledger, &cancelled, "CANCELLED").await;

    client.close().await.expect("browser closed");
    daemon.stop().await;
    sandbox.shutdown().await;
}
