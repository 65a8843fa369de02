//! `paywatch ledger copy --to postgresql://...` as an operator runs it: a daemon records
//! payments and queues hook deliveries in its SQLite ledger and stops; the built binary copies
//! the ledger into an empty PostgreSQL ledger (the throwaway cluster; skipped without
//! PostgreSQL, failing under `CI=true`), which then reads back the same records through the
//! ledger's interface; a second copy into it is refused (exit 2) and changes nothing.

use std::collections::BTreeMap;

use paywatch::domain::CheckoutId;
use paywatch::ledger::{DeliveryFilter, Ledger, ListFilter};

use crate::common::process::{paywatch, stderr, stdout};
use crate::common::{self, Daemon, create_and_track, postgres, wait_status};

/// Everything the ledger's interface shows of `ids`, for comparing two ledgers.
async fn everything(ledger: &Ledger, ids: &[CheckoutId]) -> String {
    let mut seen = BTreeMap::new();
    for id in ids {
        let checkout = ledger.checkout(id).await.expect("checkout");
        let transitions = ledger.transitions(id).await.expect("transitions");
        let deliveries = ledger.deliveries_of(id).await.expect("deliveries");
        seen.insert(
            id.to_string(),
            format!("{checkout:?}\n{transitions:?}\n{deliveries:?}"),
        );
    }
    let list = ledger
        .list(&ListFilter::default())
        .await
        .expect("list")
        .into_iter()
        .map(|record| record.id)
        .collect::<Vec<_>>();
    let watch = ledger.watch_set().await.expect("watch set");
    let dead = ledger
        .deliveries(&DeliveryFilter::default())
        .await
        .expect("deliveries");
    format!(
        "{seen:#?}\nlist {list:?}\nwatch {watch:?}\noutbox {dead:?}\ncounts {:?}\nticket {:?}\nopen {:?}",
        ledger.counts().await.expect("counts"),
        ledger.last_ticket().await.expect("ticket"),
        ledger.open_checkouts().await.expect("open"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_ledger_reads_back_the_same_and_a_second_copy_is_refused() {
    let Some(url) = postgres::database() else {
        return;
    };
    let hook_dir = tempfile::tempdir().expect("tempdir");
    let hook = common::shell_hook(hook_dir.path(), "notify", &["PAID"], "exit 0\n");
    let (sandbox, _dir, settings, config, ledger) = common::setup("multiplexed", &hook).await;
    let paid = create_and_track(&sandbox, &ledger, "ORD-COPY-1").await;
    let open = create_and_track(&sandbox, &ledger, "ORD-COPY-2").await;
    let daemon = Daemon::start(&settings, &config).await;
    wait_status(&ledger, &paid, "PENDING").await;
    wait_status(&ledger, &open, "PENDING").await;
    sandbox.state().pay(&paid).await.expect("pay");
    wait_status(&ledger, &paid, "PAID").await;
    common::wait_for(
        "the PAID hook delivered",
        std::time::Duration::from_secs(20),
        || async {
            let delivered = ledger
                .deliveries_of(&paid)
                .await
                .expect("deliveries")
                .iter()
                .any(|d| d.state == paywatch::ledger::DeliveryState::Delivered);
            delivered.then_some(())
        },
    )
    .await;
    daemon.stop().await;
    let ids = [paid.clone(), open.clone()];
    let before = everything(&ledger, &ids).await;

    let output = paywatch()
        .config(&config)
        .args(["ledger", "copy", "--to", &url])
        .output();
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&output),
        stderr(&output)
    );
    let printed = stdout(&output);
    assert!(printed.contains("checkouts: 2"), "{printed}");
    assert!(printed.contains("transitions: 3"), "{printed}");
    assert!(printed.contains("hook_deliveries: 1"), "{printed}");

    let copied = postgres::operator_ledger(&url).await;
    let after = everything(&copied, &ids).await;
    assert_eq!(before, after, "the copy reads back differently");
    assert!(
        copied
            .watch_set()
            .await
            .expect("watch set")
            .iter()
            .any(|entry| entry.resume_token.is_some()),
        "resume tokens are copied, so a daemon on the copy resumes its Listen streams"
    );
    // The copy continues where the file stopped: new tickets and ids follow the copied ones.
    let ticket = copied.issue_ticket().await.expect("ticket");
    assert!(ticket > ledger.last_ticket().await.expect("ticket"));

    // A second copy into the now non-empty ledger is refused and writes nothing.
    let again = paywatch()
        .config(&config)
        .args(["ledger", "copy", "--to", &url])
        .output();
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("not empty"), "{}", stderr(&again));
    assert_eq!(
        copied.counts().await.expect("counts"),
        ledger.counts().await.expect("counts")
    );

    // Not a PostgreSQL URL: exit 2, the value not shown.
    let wrong = paywatch()
        .config(&config)
        .args(["ledger", "copy", "--to", "mysql://root:hunter2@localhost/x"])
        .output();
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert!(!stderr(&wrong).contains("hunter2"), "{}", stderr(&wrong));
    // Nothing listens there: exit 1, naming the host and port.
    let away = paywatch()
        .config(&config)
        .args([
            "ledger",
            "copy",
            "--to",
            "postgresql://postgres@127.0.0.1:1/paywatch",
        ])
        .output();
    assert_eq!(away.status.code(), Some(1), "{}", stderr(&away));
    assert!(stderr(&away).contains("127.0.0.1:1"), "{}", stderr(&away));
    // A password file that is not there: exit 2, naming the flag.
    let missing = paywatch()
        .config(&config)
        .args([
            "ledger",
            "copy",
            "--to",
            &url,
            "--password-file",
            "/nonexistent/pw",
        ])
        .output();
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("--password-file"),
        "{}",
        stderr(&missing)
    );
    sandbox.shutdown().await;
}
