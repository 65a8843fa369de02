//! The lease, the fence and the migrations against a throwaway cluster (see `cluster.rs`;
//! skipped without PostgreSQL, failing under `CI=true`).

use std::time::Duration;

use deadpool_postgres::Pool;

use super::cluster::{self, Proxy};
use super::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// A fresh migrated database: its target, an operator pool and the database's name.
async fn ledger_database() -> Option<(Target, Pool, String)> {
    let url = cluster::database()?;
    let name = url
        .rsplit('/')
        .next()
        .and_then(|last| last.split('?').next())
        .unwrap_or_default()
        .to_owned();
    let target = Target::parse(&url, None, None).expect("test URL parses");
    let pool = target.pool(Session::Operator, 4).expect("pool");
    migrate(&pool, &target).await.expect("migrate");
    Some((target, pool, name))
}

fn daemon_pool(target: &Target, idle_limit: Duration) -> Pool {
    target
        .pool(Session::Daemon { idle_limit }, 4)
        .expect("daemon pool")
}

fn lease(target: &Target, pool: &Pool, name: &str, ttl: Duration) -> Lease {
    Lease::new(pool.clone(), target.clone(), name.to_owned(), ttl)
}

/// Waits until `check` holds, failing after [`DEADLINE`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ends the lease now by the database's clock (an operator's UPDATE: the local clock of no
/// daemon is involved).
fn expire_now(name: &str) {
    let cluster = cluster::cluster().expect("cluster runs");
    cluster.psql(
        name,
        "UPDATE lease SET expires_at = clock_timestamp() - INTERVAL '1 millisecond'",
    );
}

/// A fenced write at `epoch`: notes a discovery round.
async fn fenced_write(pool: &Pool, target: &Target, epoch: i64) -> Result<(), PgError> {
    let mut client = pool.get().await.expect("connection");
    let transaction = client.transaction().await.expect("begin");
    fence(&transaction, target, epoch).await?;
    transaction
        .execute(
            "INSERT INTO discovery_rounds (kind, started_at, finished_at)
             VALUES ('test', now(), now())
             ON CONFLICT (kind) DO UPDATE SET finished_at = now()",
            &[],
        )
        .await
        .map_err(|error| PgError::from_db(target, &error))?;
    transaction
        .commit()
        .await
        .map_err(|error| PgError::from_db(target, &error))
}

#[tokio::test]
async fn the_first_candidate_wins_epoch_one_and_the_next_waits() {
    let Some((target, pool, _)) = ledger_database().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let first = lease(&target, &pool, "first", ttl);
    let second = lease(&target, &pool, "second", ttl);
    assert_eq!(first.current().await.expect("read"), None);
    assert_eq!(first.elect().await.expect("elect"), Some(1));
    assert_eq!(second.elect().await.expect("elect"), None);
    // Winning again while held is not possible either, even for the holder.
    assert_eq!(first.elect().await.expect("elect"), None);
    let row = second.current().await.expect("read").expect("a lease row");
    assert_eq!(
        (row.holder.as_str(), row.epoch, row.live),
        ("first", 1, true)
    );
}

#[tokio::test]
async fn only_the_holder_renews_and_renewal_moves_the_expiry() {
    let Some((target, pool, _)) = ledger_database().await else {
        return;
    };
    let ttl = Duration::from_secs(30);
    let holder = lease(&target, &pool, "holder", ttl);
    let other = lease(&target, &pool, "other", ttl);
    let epoch = holder.elect().await.expect("elect").expect("won");
    let before = holder.current().await.expect("read").expect("row");
    wait_until("the database's clock to move", || async {
        holder.renew(epoch).await.expect("renew");
        holder
            .current()
            .await
            .expect("read")
            .expect("row")
            .expires_at
            > before.expires_at
    })
    .await;
    assert!(
        !other.renew(epoch).await.expect("renew"),
        "a non-holder renewed"
    );
    assert!(
        !holder.renew(epoch + 1).await.expect("renew"),
        "renewed an epoch that was never won"
    );
}

#[tokio::test]
async fn the_lease_expires_by_the_database_clock_and_is_never_renewed_after() {
    let Some((target, pool, name)) = ledger_database().await else {
        return;
    };
    // A long lease by the local clock: only the database's clock can end it here.
    let ttl = Duration::from_secs(300);
    let holder = lease(&target, &pool, "holder", ttl);
    let epoch = holder.elect().await.expect("elect").expect("won");
    expire_now(&name);
    let row = holder.current().await.expect("read").expect("row");
    assert!(
        !row.live,
        "the lease is still live after its expiry: {row:?}"
    );
    assert!(
        !holder.renew(epoch).await.expect("renew"),
        "an expired lease was renewed"
    );
    // A lease also runs out by itself.
    let short = lease(&target, &pool, "short", Duration::from_millis(300));
    let short_epoch = short.elect().await.expect("elect").expect("won");
    assert_eq!(short_epoch, epoch + 1);
    wait_until("the short lease to expire", || async {
        !short.current().await.expect("read").expect("row").live
    })
    .await;
    assert!(!short.renew(short_epoch).await.expect("renew"));
}

#[tokio::test]
async fn a_takeover_gets_the_next_epoch_and_the_old_holder_cannot_renew() {
    let Some((target, pool, name)) = ledger_database().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let old = lease(&target, &pool, "old", ttl);
    let new = lease(&target, &pool, "new", ttl);
    let old_epoch = old.elect().await.expect("elect").expect("won");
    expire_now(&name);
    let new_epoch = new.elect().await.expect("elect").expect("won");
    assert_eq!(new_epoch, old_epoch + 1);
    assert!(!old.renew(old_epoch).await.expect("renew"));
    assert!(!old.resign(old_epoch).await.expect("resign"));
    // The old holder wins again only with yet another epoch.
    expire_now(&name);
    assert_eq!(old.elect().await.expect("elect"), Some(new_epoch + 1));
}

#[tokio::test]
async fn a_stale_epoch_cannot_write_and_a_daemon_cannot_write_unfenced() {
    let Some((target, pool, name)) = ledger_database().await else {
        return;
    };
    let daemon = daemon_pool(&target, Duration::from_secs(10));
    let ttl = Duration::from_secs(60);
    let old = lease(&target, &pool, "old", ttl);
    let new = lease(&target, &pool, "new", ttl);
    let old_epoch = old.elect().await.expect("elect").expect("won");
    fenced_write(&daemon, &target, old_epoch)
        .await
        .expect("the holder writes");

    expire_now(&name);
    let refused = fenced_write(&daemon, &target, old_epoch)
        .await
        .expect_err("an expired epoch wrote");
    assert!(refused.is_fenced(), "{refused}");
    let new_epoch = new.elect().await.expect("elect").expect("won");
    let refused = fenced_write(&daemon, &target, old_epoch)
        .await
        .expect_err("a superseded epoch wrote");
    assert!(refused.is_fenced(), "{refused}");
    assert!(refused.to_string().contains("not current"), "{refused}");
    fenced_write(&daemon, &target, new_epoch)
        .await
        .expect("the new holder writes");

    // A daemon's connection cannot write without the fence; an operator's can.
    let client = daemon.get().await.expect("connection");
    let error = client
        .execute("DELETE FROM discovery_rounds", &[])
        .await
        .expect_err("an unfenced daemon write");
    assert!(PgError::from_db(&target, &error).is_fenced(), "{error}");
    let client = pool.get().await.expect("connection");
    client
        .execute("DELETE FROM discovery_rounds", &[])
        .await
        .expect("an operator writes without the lease");
}

#[tokio::test]
async fn an_election_waits_for_the_fenced_writes_under_way() {
    let Some((target, pool, name)) = ledger_database().await else {
        return;
    };
    let daemon = daemon_pool(&target, Duration::from_secs(60));
    let ttl = Duration::from_secs(60);
    let old = lease(&target, &pool, "old", ttl);
    let old_epoch = old.elect().await.expect("elect").expect("won");

    let mut client = daemon.get().await.expect("connection");
    let transaction = client.transaction().await.expect("begin");
    fence(&transaction, &target, old_epoch)
        .await
        .expect("fenced");
    expire_now(&name);
    let new = lease(&target, &pool, "new", ttl);
    let election = tokio::spawn(async move { new.elect().await });
    let cluster = cluster::cluster().expect("cluster runs");
    wait_until("the election to wait for the write's lock", || async {
        cluster.psql(
            &name,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        ) == "1"
    })
    .await;
    assert!(!election.is_finished());
    // The write begun under the old epoch commits before the new epoch exists.
    transaction
        .execute(
            "INSERT INTO discovery_rounds (kind, started_at, finished_at) VALUES ('w', now(), now())",
            &[],
        )
        .await
        .expect("write");
    transaction.commit().await.expect("commit");
    let won = election.await.expect("join").expect("elect");
    assert_eq!(won, Some(old_epoch + 1));
}

#[tokio::test]
async fn a_paused_writer_cannot_hold_off_an_election_past_its_idle_limit() {
    let Some((target, pool, name)) = ledger_database().await else {
        return;
    };
    let daemon = daemon_pool(&target, Duration::from_millis(500));
    let ttl = Duration::from_secs(60);
    let old = lease(&target, &pool, "old", ttl);
    let old_epoch = old.elect().await.expect("elect").expect("won");
    let mut client = daemon.get().await.expect("connection");
    let transaction = client.transaction().await.expect("begin");
    fence(&transaction, &target, old_epoch)
        .await
        .expect("fenced");
    // The "paused" writer does nothing more; the server ends its transaction.
    expire_now(&name);
    let new = lease(&target, &pool, "new", ttl);
    let won = tokio::time::timeout(DEADLINE, new.elect())
        .await
        .expect("the election finishes")
        .expect("elect");
    assert_eq!(won, Some(old_epoch + 1));
    let late = transaction
        .execute(
            "INSERT INTO discovery_rounds (kind, started_at, finished_at) VALUES ('w', now(), now())",
            &[],
        )
        .await;
    assert!(late.is_err(), "the paused writer's transaction survived");
}

#[tokio::test]
async fn resigning_wakes_a_standby_which_takes_over_at_once() {
    let Some((target, pool, _)) = ledger_database().await else {
        return;
    };
    let ttl = Duration::from_secs(300);
    let active = lease(&target, &pool, "active", ttl);
    let standby = lease(&target, &pool, "standby", ttl);
    let (_listening, mut notifications) = target.listener(Session::Operator).await.expect("listen");
    let epoch = active.elect().await.expect("elect").expect("won");
    assert_eq!(
        tokio::time::timeout(DEADLINE, notifications.recv())
            .await
            .expect("notified"),
        Some(format!("elected {epoch}"))
    );
    assert_eq!(standby.elect().await.expect("elect"), None);
    assert!(active.resign(epoch).await.expect("resign"));
    assert_eq!(
        tokio::time::timeout(DEADLINE, notifications.recv())
            .await
            .expect("woken well before the 300 s lease ends"),
        Some(format!("resigned {epoch}"))
    );
    assert_eq!(standby.elect().await.expect("elect"), Some(epoch + 1));
}

#[tokio::test]
async fn two_daemons_starting_at_once_migrate_once() {
    let Some(url) = cluster::database() else {
        return;
    };
    let target = Target::parse(&url, None, None).expect("parse");
    let pool = target.pool(Session::Operator, 4).expect("pool");
    let (first, second) = tokio::join!(migrate(&pool, &target), migrate(&pool, &target));
    assert_eq!(first.expect("first"), SCHEMA_VERSION);
    assert_eq!(second.expect("second"), SCHEMA_VERSION);
    assert_eq!(
        migrate(&pool, &target).await.expect("again"),
        SCHEMA_VERSION
    );
}

#[tokio::test]
async fn a_schema_from_a_newer_paywatch_is_refused_naming_both_versions() {
    let Some((target, pool, name)) = ledger_database().await else {
        return;
    };
    let cluster = cluster::cluster().expect("cluster runs");
    let newer = SCHEMA_VERSION + 5;
    cluster.psql(
        &name,
        &format!("UPDATE paywatch_schema SET version = {newer}"),
    );
    let error = migrate(&pool, &target).await.expect_err("a newer schema");
    assert!(matches!(error, PgError::NewerSchema { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains(&format!("schema version {newer}"))
            && text.contains(&format!("only up to {SCHEMA_VERSION}")),
        "{text}"
    );
}

#[test]
fn urls_keep_their_password_out_of_messages_and_honour_sslmode() {
    let password = "s3cret-in-url";
    let target = Target::parse(
        &format!("postgresql://paywatch:{password}@db.example:6432/ledger?sslmode=verify-full"),
        None,
        None,
    )
    .expect("parse");
    assert_eq!(target.tls_mode(), TlsMode::Require);
    assert_eq!(target.describe(), "db.example:6432/ledger");
    assert!(!format!("{target:?}").contains(password));
    assert_eq!(
        Target::parse("postgresql://u@h/d?sslmode=disable", None, None)
            .expect("parse")
            .tls_mode(),
        TlsMode::Disable
    );
    assert_eq!(
        Target::parse("postgres://u@h/d", None, None)
            .expect("parse")
            .tls_mode(),
        TlsMode::Prefer
    );
    let bad = Target::parse(
        &format!("postgresql://u:{password}@h/d?sslmode=maybe"),
        None,
        None,
    )
    .expect_err("bad sslmode");
    assert!(
        bad.contains("sslmode 'maybe'") && !bad.contains(password),
        "{bad}"
    );
    let both = Target::parse(
        &format!("postgresql://u:{password}@h/d"),
        Some(&crate::settings::Secret::new("from-a-file")),
        None,
    )
    .expect_err("two passwords");
    assert!(!both.contains(password), "{both}");
    assert!(
        crate::domain::scrub_secrets(&format!("echo {password}")).contains("[redacted]"),
        "the URL's password is not registered with the scrubber"
    );
}

#[tokio::test]
async fn a_refused_password_names_the_password_key_and_not_the_password() {
    let Some((_, _, name)) = ledger_database().await else {
        return;
    };
    let cluster = cluster::cluster().expect("cluster runs");
    let user = format!("checked_{name}");
    cluster.psql(
        &name,
        &format!("CREATE ROLE {user} LOGIN PASSWORD 'right-password-123'"),
    );
    cluster.require_password_for(&user);
    let url = format!(
        "postgresql://{user}@127.0.0.1:{}/{name}?sslmode=disable",
        cluster.port()
    );
    let connect = |password: &str| {
        let target = Target::parse(&url, Some(&crate::settings::Secret::new(password)), None)
            .expect("parse");
        async move {
            let pool = target.pool(Session::Operator, 1).expect("pool");
            pool.get()
                .await
                .map(drop)
                .map_err(|error| PgError::from_pool(&target, &error))
        }
    };
    let wrong = "wrong-password-xyz";
    let error = connect(wrong).await.expect_err("a wrong password");
    let text = error.to_string();
    assert!(
        matches!(
            error,
            PgError::Refused {
                key: "ledger.password_file",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!text.contains(wrong), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}/{name}", cluster.port())),
        "{text}"
    );
    connect("right-password-123")
        .await
        .expect("the right password");
}

/// Waits until the role satisfies `wanted`, failing after [`DEADLINE`].
async fn wait_for_role(
    roles: &mut tokio::sync::watch::Receiver<Role>,
    what: &str,
    wanted: impl FnMut(&Role) -> bool,
) -> Role {
    tokio::time::timeout(DEADLINE, roles.wait_for(wanted))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the keeper runs")
        .clone()
}

#[tokio::test]
async fn a_standby_keeper_takes_over_at_once_when_the_active_one_shuts_down() {
    let Some((target, pool, _)) = ledger_database().await else {
        return;
    };
    // A lease far longer than the deadline: only the resignation's notification can do it.
    let ttl = Duration::from_secs(120);
    let one = tokio_util::sync::CancellationToken::new();
    let (mut first, first_task) = keeper::spawn(
        lease(&target, &pool, "one", ttl),
        target.clone(),
        one.clone(),
    );
    wait_for_role(&mut first, "the first keeper to be active", |role| {
        *role == Role::Active { epoch: 1 }
    })
    .await;
    let two = tokio_util::sync::CancellationToken::new();
    let (mut second, second_task) = keeper::spawn(
        lease(&target, &pool, "two", ttl),
        target.clone(),
        two.clone(),
    );
    wait_for_role(&mut second, "the second keeper to see the holder", |role| {
        *role
            == Role::Standby {
                holder: Some(("one".to_owned(), 1)),
            }
    })
    .await;
    one.cancel();
    first_task.await.expect("the first keeper stops");
    assert_eq!(first.borrow().epoch(), None);
    wait_for_role(&mut second, "the standby to take over", |role| {
        *role == Role::Active { epoch: 2 }
    })
    .await;
    two.cancel();
    second_task.await.expect("the second keeper stops");
}

#[tokio::test]
async fn a_killed_active_keeper_is_replaced_when_its_lease_runs_out() {
    let Some((target, pool, _)) = ledger_database().await else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let (mut first, first_task) = keeper::spawn(
        lease(&target, &pool, "one", ttl),
        target.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    wait_for_role(&mut first, "the first keeper to be active", |role| {
        role.epoch().is_some()
    })
    .await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let (mut second, _second_task) = keeper::spawn(
        lease(&target, &pool, "two", ttl),
        target.clone(),
        cancel.clone(),
    );
    wait_for_role(&mut second, "the second keeper to stand by", |role| {
        matches!(role, Role::Standby { holder: Some(_) })
    })
    .await;
    // As SIGKILL: no resignation, no more renewals.
    let killed = tokio::time::Instant::now();
    first_task.abort();
    wait_for_role(&mut second, "the standby to take over", |role| {
        *role == Role::Active { epoch: 2 }
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took >= ttl / 3,
        "took over after {took:?}, before the {ttl:?} lease could have run out"
    );
    eprintln!("takeover after a killed keeper with a {ttl:?} lease: {took:?}");
    cancel.cancel();
}

#[tokio::test]
async fn losing_the_database_stops_the_active_keeper_which_retakes_the_lease_later() {
    let Some((_, _, name)) = ledger_database().await else {
        return;
    };
    let cluster = cluster::cluster().expect("cluster runs");
    let proxy = Proxy::start(cluster.port()).await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{name}?sslmode=disable",
        proxy.port
    );
    let target = Target::parse(&url, None, None).expect("parse");
    let pool = target.pool(Session::Operator, 2).expect("pool");
    let ttl = Duration::from_secs(2);
    let cancel = tokio_util::sync::CancellationToken::new();
    let (mut roles, _task) = keeper::spawn(
        lease(&target, &pool, "one", ttl),
        target.clone(),
        cancel.clone(),
    );
    wait_for_role(&mut roles, "the keeper to be active", |role| {
        *role == Role::Active { epoch: 1 }
    })
    .await;
    proxy.cut();
    let cut = tokio::time::Instant::now();
    wait_for_role(&mut roles, "the keeper to stop acting", |role| {
        role.epoch().is_none()
    })
    .await;
    assert!(
        cut.elapsed() <= ttl + Duration::from_secs(1),
        "still active {:?} after the database was lost, with a {ttl:?} lease",
        cut.elapsed()
    );
    proxy.restore();
    wait_for_role(&mut roles, "the keeper to take the lease again", |role| {
        *role == Role::Active { epoch: 2 }
    })
    .await;
    cancel.cancel();
}

#[tokio::test]
async fn tls_checks_the_server_against_ca_file_and_a_failure_names_the_key() {
    let Some((_, _, name)) = ledger_database().await else {
        return;
    };
    let cluster = cluster::cluster().expect("cluster runs");
    let certificates = crate::sandbox::TestCertificates::generate().expect("certificates");
    cluster.enable_tls(&certificates.server_cert_pem, &certificates.server_key_pem);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, &certificates.ca_pem).expect("write CA");
    let url = |mode: &str| {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{name}?sslmode={mode}",
            cluster.port()
        )
    };
    // The server's certificate checked against ca_file, and its name (127.0.0.1).
    let target = Target::parse(&url("verify-full"), None, Some(&ca_file)).expect("parse");
    let pool = target.pool(Session::Operator, 1).expect("pool");
    let client = pool.get().await.expect("a TLS connection");
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(encrypted, "the connection is not encrypted");
    // Without ca_file the test CA is unknown: refused, naming the key to check.
    for mode in ["require", "prefer"] {
        let target = Target::parse(&url(mode), None, None).expect("parse");
        let error = target
            .pool(Session::Operator, 1)
            .expect("pool")
            .get()
            .await
            .map(drop)
            .map_err(|error| PgError::from_pool(&target, &error))
            .expect_err("an unknown CA");
        assert!(
            matches!(
                error,
                PgError::Refused {
                    key: "ledger.ca_file",
                    ..
                }
            ),
            "{mode}: {error:?}"
        );
    }
}

fn ledger_settings(url: &str) -> crate::settings::LedgerSettings {
    crate::settings::LedgerSettings {
        url: Some(crate::settings::Secret::new(url)),
        ..crate::settings::LedgerSettings::default()
    }
}

#[tokio::test]
async fn opening_migrates_and_failures_name_the_key_or_the_host() {
    let Some(url) = cluster::database() else {
        return;
    };
    let store = PgStore::open(&ledger_settings(&url), Session::Operator)
        .await
        .expect("open");
    let lease = store.lease(&crate::settings::HaSettings::default());
    assert_eq!(lease.ttl(), Duration::from_secs(10));
    assert_eq!(lease.elect().await.expect("elect"), Some(1));

    let bad = PgStore::open(
        &ledger_settings("postgresql://u:pw-not-shown@h/d?sslmode=sometimes"),
        Session::Operator,
    )
    .await
    .expect_err("a bad sslmode");
    assert_eq!(bad.exit_code(), 2);
    let text = bad.to_string();
    assert!(
        text.contains("'ledger.url'") && !text.contains("pw-not-shown"),
        "{text}"
    );

    // Nothing listens on port 9 of the loopback.
    let away = PgStore::open(
        &ledger_settings("postgresql://u:pw-not-shown@127.0.0.1:9/d?sslmode=disable"),
        Session::Operator,
    )
    .await
    .expect_err("no server");
    assert_eq!(away.exit_code(), 1, "{away:?}");
    let text = away.to_string();
    assert!(
        text.contains("127.0.0.1:9/d") && !text.contains("pw-not-shown"),
        "{text}"
    );
}

fn facts(id: &str) -> crate::paymennt::wire::CheckoutFacts {
    crate::paymennt::wire::CheckoutFacts {
        id: id.parse::<crate::domain::CheckoutId>().expect("id"),
        order_id: Some(format!("order-{id}")),
        request_id: None,
        display_id: None,
        amount: "12.50".parse().expect("amount"),
        currency: "AED".parse().expect("currency"),
        status: None,
        total_refunded: None,
        redirect_url: None,
        location: Some(crate::domain::FirestoreLocation {
            project: "pc-test".into(),
            database: "(default)".into(),
            collection: "checkouts".into(),
            document: format!("doc-{id}"),
        }),
    }
}

#[tokio::test]
async fn a_daemon_store_writes_only_while_active_and_only_at_the_current_epoch() {
    let Some(url) = cluster::database() else {
        return;
    };
    let session = Session::Daemon {
        idle_limit: Duration::from_secs(10),
    };
    let operator = PgStore::open(&ledger_settings(&url), Session::Operator)
        .await
        .expect("open");
    let lease = lease(
        operator.target(),
        operator.pool(),
        "daemon",
        Duration::from_secs(60),
    );
    let (role, roles) = tokio::sync::watch::channel(Role::Standby { holder: None });
    let daemon = PgStore::open(&ledger_settings(&url), session)
        .await
        .expect("open")
        .with_role(roles);
    let point = |id: &str, token: &[u8]| crate::ledger::ResumePoint {
        checkout_id: id.parse::<crate::domain::CheckoutId>().expect("id"),
        token: token.to_vec(),
        read_time: None,
    };

    // Standing by: nothing is written.
    let refused = daemon
        .track(&facts("1001"), crate::domain::TrackedVia::Track)
        .await
        .expect_err("a standby tracked");
    assert!(refused.is_fenced(), "{refused}");

    // Active: tracking and moving a cursor work.
    let epoch = lease.elect().await.expect("elect").expect("won");
    role.send_replace(Role::Active { epoch });
    assert_eq!(
        daemon
            .track(&facts("1001"), crate::domain::TrackedVia::Track)
            .await
            .expect("track"),
        crate::ledger::TrackOutcome::Added
    );
    assert_eq!(
        daemon
            .track(&facts("1001"), crate::domain::TrackedVia::Track)
            .await
            .expect("track"),
        crate::ledger::TrackOutcome::AlreadyTracked
    );
    daemon
        .save_resume_points(&[point("1001", b"first")])
        .await
        .expect("save");

    // Paused past the lease: the role still says active (the keeper did not run), but the
    // database refuses the epoch, and the cursor stays where it was.
    let cluster = cluster::cluster().expect("cluster runs");
    let name = url
        .rsplit('/')
        .next()
        .and_then(|last| last.split('?').next())
        .unwrap_or_default()
        .to_owned();
    expire_now(&name);
    let refused = daemon
        .save_resume_points(&[point("1001", b"stale")])
        .await
        .expect_err("a stale cursor moved");
    assert!(refused.is_fenced(), "{refused}");
    let refused = daemon
        .track(&facts("1002"), crate::domain::TrackedVia::Track)
        .await
        .expect_err("a stale epoch tracked");
    assert!(refused.is_fenced(), "{refused}");
    assert_eq!(
        cluster.psql(
            &name,
            "SELECT encode(resume_token, 'escape') FROM listen_targets"
        ),
        "first"
    );
    assert_eq!(cluster.psql(&name, "SELECT count(*) FROM checkouts"), "1");
    assert_eq!(
        cluster.psql(&name, "SELECT amount::TEXT FROM checkouts"),
        "12.50"
    );
    // An operator's command needs no lease.
    assert_eq!(
        operator
            .track(&facts("1003"), crate::domain::TrackedVia::Track)
            .await
            .expect("track"),
        crate::ledger::TrackOutcome::Added
    );
}

#[tokio::test]
async fn an_active_keeper_whose_database_stops_answering_stops_acting_by_its_deadline() {
    let Some((_, _, name)) = ledger_database().await else {
        return;
    };
    let cluster = cluster::cluster().expect("cluster runs");
    let proxy = Proxy::start(cluster.port()).await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{name}?sslmode=disable",
        proxy.port
    );
    let target = Target::parse(&url, None, None).expect("parse");
    let pool = target.pool(Session::Operator, 2).expect("pool");
    let ttl = Duration::from_secs(2);
    let cancel = tokio_util::sync::CancellationToken::new();
    let (mut roles, _task) = keeper::spawn(
        lease(&target, &pool, "one", ttl),
        target.clone(),
        cancel.clone(),
    );
    wait_for_role(&mut roles, "the keeper to be active", |role| {
        role.epoch().is_some()
    })
    .await;
    // A partition: the renewal is sent and never answered, and no error comes back either.
    proxy.freeze();
    let frozen = tokio::time::Instant::now();
    wait_for_role(&mut roles, "the keeper to stop acting", |role| {
        role.epoch().is_none()
    })
    .await;
    assert!(
        frozen.elapsed() <= ttl + Duration::from_secs(1),
        "still active {:?} into a partition, with a {ttl:?} lease",
        frozen.elapsed()
    );
    proxy.cut();
    cancel.cancel();
}

#[tokio::test]
async fn tickets_discovery_rounds_and_tokens_behave_as_on_sqlite() {
    let Some(url) = cluster::database() else {
        return;
    };
    let store = PgStore::open(&ledger_settings(&url), Session::Operator)
        .await
        .expect("open");
    let last = store.last_ticket().await.expect("last");
    let first = store.issue_ticket().await.expect("issue");
    let second = store.issue_ticket().await.expect("issue");
    assert!(last.number() < first.number() && first.number() < second.number());
    assert_eq!(store.last_ticket().await.expect("last"), second);

    let start = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
        .expect("time")
        .with_timezone(&chrono::Utc);
    let epoch = store.begin_discovery_epoch(start).await.expect("epoch");
    assert_eq!(epoch, start);
    let later = start + chrono::Duration::hours(1);
    assert_eq!(
        store.begin_discovery_epoch(later).await.expect("epoch"),
        start,
        "the epoch is set once"
    );
    assert_eq!(
        store.last_discovery_round("LINK").await.expect("round"),
        None
    );
    store
        .finish_discovery_round("LINK", later)
        .await
        .expect("finish");
    assert_eq!(
        store.last_discovery_round("LINK").await.expect("round"),
        Some(later)
    );

    store
        .track(&facts("2001"), crate::domain::TrackedVia::Track)
        .await
        .expect("track");
    let id: crate::domain::CheckoutId = "2001".parse().expect("id");
    store
        .save_resume_points(&[crate::ledger::ResumePoint {
            checkout_id: id.clone(),
            token: b"t".to_vec(),
            read_time: Some(later),
        }])
        .await
        .expect("save");
    store.forget_resume_token(&id).await.expect("forget");
    store.clear_listen_refusals().await.expect("clear");
    assert_eq!(saved_tokens(&url), "0");
}

/// How many resume tokens the ledger at `url` holds (`psql`'s text).
fn saved_tokens(url: &str) -> String {
    let name = url
        .rsplit('/')
        .next()
        .and_then(|last| last.split('?').next())
        .unwrap_or_default();
    cluster::cluster()
        .expect("cluster runs")
        .psql(name, "SELECT count(*) FROM listen_targets")
}

/// A writer that does not take its checkouts in id order (the store's own do: see
/// `lock_in_order`) can still deadlock with a save of resume tokens. PostgreSQL aborts one; when
/// it is the save, it is made again, and no token is lost (a lost one makes a daemon taking over
/// verify that checkout again).
#[tokio::test]
async fn a_save_of_resume_tokens_aborted_by_a_deadlock_is_made_again() {
    let Some(url) = cluster::database() else {
        return;
    };
    let store = PgStore::open(&ledger_settings(&url), Session::Operator)
        .await
        .expect("open");
    for id in ["3001", "3002"] {
        store
            .track(&facts(id), crate::domain::TrackedVia::Track)
            .await
            .expect("track");
    }
    let point = |id: &str| crate::ledger::ResumePoint {
        checkout_id: id.parse().expect("id"),
        token: id.as_bytes().to_vec(),
        read_time: None,
    };
    let points = [point("3001"), point("3002")];

    // The "group": holds 3002, then (once the save holds 3001 and waits for 3002) asks for 3001.
    let mut group = store.pool().get().await.expect("connection");
    let transaction = group.transaction().await.expect("begin");
    let lock = "SELECT id FROM checkouts WHERE id = $1 FOR UPDATE";
    transaction
        .query(lock, &[&"3002"])
        .await
        .expect("lock 3002");
    let saver = store.clone();
    let save = tokio::spawn(async move { saver.save_resume_points(&points).await });
    // The save's first row shares 3001; its second waits for 3002. PostgreSQL looks for a
    // cycle a second (deadlock_timeout) after each wait began, so the save, waiting first,
    // finds it and is aborted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    transaction
        .query(lock, &[&"3001"])
        .await
        .expect("lock 3001");
    transaction.commit().await.expect("the group commits");

    tokio::time::timeout(Duration::from_secs(20), save)
        .await
        .expect("the save ends")
        .expect("the save's task")
        .expect("the save is made again and succeeds");
    assert_eq!(saved_tokens(&url), "2");
}

/// Two checkouts tracked in a fresh ledger, and a connection of the test's own in a
/// transaction that PostgreSQL makes the victim of any deadlock it joins (its
/// `deadlock_timeout` is shorter than the store's), holding `first_lock` on checkout 4001.
async fn crossing_writers(first_lock: &str) -> Option<(PgStore, deadpool_postgres::Object)> {
    let url = cluster::database()?;
    let store = PgStore::open(&ledger_settings(&url), Session::Operator)
        .await
        .expect("open");
    for id in ["4001", "4002"] {
        store
            .track(&facts(id), crate::domain::TrackedVia::Track)
            .await
            .expect("track");
    }
    let other = store.pool().get().await.expect("connection");
    other
        .batch_execute("BEGIN; SET LOCAL deadlock_timeout = '100ms'")
        .await
        .expect("begin");
    other
        .execute(
            &format!("SELECT 1 FROM checkouts WHERE id = '4001' {first_lock}"),
            &[],
        )
        .await
        .expect("lock 4001");
    Some((store, other))
}

/// The test's writer, holding 4001 and waiting long enough for the store's write to wait too,
/// then takes 4002 with `second_lock`: a deadlock aborts it (a store writing out of order would
/// hold 4002 while it waits for 4001).
async fn take_the_second(other: &deadpool_postgres::Object, second_lock: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    other
        .execute(
            &format!("SELECT 1 FROM checkouts WHERE id = '4002' {second_lock}"),
            &[],
        )
        .await
        .expect("4002 is free: the store waits for 4001 before it locks 4002 (no deadlock)");
    other.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test]
async fn a_save_of_resume_tokens_locks_its_checkouts_in_id_order() {
    let Some((store, other)) = crossing_writers("FOR UPDATE").await else {
        return;
    };
    let point = |id: &str| crate::ledger::ResumePoint {
        checkout_id: id.parse().expect("id"),
        token: id.as_bytes().to_vec(),
        read_time: None,
    };
    // Given in the other order: 4002's token first.
    let points = [point("4002"), point("4001")];
    let saver = store.clone();
    let save = tokio::spawn(async move { saver.save_resume_points(&points).await });
    take_the_second(&other, "FOR UPDATE").await;
    tokio::time::timeout(Duration::from_secs(20), save)
        .await
        .expect("the save ends")
        .expect("the save's task")
        .expect("the save succeeds");
}

#[tokio::test]
async fn a_group_of_answers_locks_its_checkouts_in_id_order() {
    let Some((store, other)) = crossing_writers("FOR KEY SHARE").await else {
        return;
    };
    // Given in the other order: 4002's answer first.
    let requests = ["4002", "4001"]
        .map(|id| crate::ledger::ApplyRequest {
            verified: verified(id, "PAID"),
            source: crate::domain::Source::Firestore,
            changed_at: None,
        })
        .to_vec();
    let applier = store.clone();
    let group = tokio::spawn(async move {
        applier
            .apply_all(&requests, &[], Duration::from_secs(60))
            .await
    });
    take_the_second(&other, "FOR KEY SHARE").await;
    let outcomes = tokio::time::timeout(Duration::from_secs(20), group)
        .await
        .expect("the group ends")
        .expect("the group's task");
    assert!(
        outcomes.iter().all(Result::is_ok),
        "every answer recorded: {outcomes:?}"
    );
}

/// A verified answer for checkout `id` in `status` (with Firebase coordinates).
fn verified(id: &str, status: &str) -> crate::paymennt::VerifiedCheckout {
    crate::paymennt::VerifiedCheckout::for_tests(&format!(
        r#"{{"id":"{id}","orderId":"ORD-{id}","currency":"AED","amount":100.00,"status":"{status}","totalRefunded":0,"firebaseDatabase":"pc-test-734bc","firebaseCollection":"checkouts","firebaseDocument":"doc-{id}"}}"#
    ))
}

#[tokio::test]
async fn a_daemon_that_lost_the_lease_cannot_record_claim_or_note_and_its_claims_are_reclaimed() {
    use crate::domain::Source;
    use crate::ledger::{ApplyOutcome, DeliveryState, Ledger};

    let Some(url) = cluster::database() else {
        return;
    };
    let session = Session::Daemon {
        idle_limit: Duration::from_secs(10),
    };
    let open = || async {
        PgStore::open(&ledger_settings(&url), session)
            .await
            .expect("open")
    };
    let first_store = open().await;
    let name = first_store.target().describe().to_owned();
    let ttl = Duration::from_secs(60);
    let first_lease = lease(first_store.target(), first_store.pool(), "first", ttl);
    let second_lease = lease(first_store.target(), first_store.pool(), "second", ttl);
    let first_epoch = first_lease.elect().await.expect("elect").expect("won");
    let (_first_role, roles) = tokio::sync::watch::channel(Role::Active { epoch: first_epoch });
    let first = Ledger::postgres(first_store.with_role(roles));
    let hooks = [crate::settings::HookSettings::for_tests("h", &[])];
    let watch = Duration::from_secs(3600);

    // The holder records a payment and claims its delivery.
    let ApplyOutcome::Transition { deliveries, .. } = first
        .apply(
            &verified("1", "PAID"),
            Source::Firestore,
            None,
            &hooks,
            watch,
        )
        .await
        .expect("the holder records")
    else {
        panic!("no transition");
    };
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let claimed = first
        .record_and_claim(&[], later, 10)
        .await
        .expect("claim")
        .claimed;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event_id, deliveries[0]);

    // Paused past its lease; another daemon takes over.
    let database = url.rsplit('/').next().unwrap_or_default();
    let database = database.split('?').next().unwrap_or_default();
    expire_now(database);
    let second_epoch = second_lease.elect().await.expect("elect").expect("won");
    assert!(second_epoch > first_epoch);
    let (_second_role, roles) = tokio::sync::watch::channel(Role::Active {
        epoch: second_epoch,
    });
    let second = Ledger::postgres(open().await.with_role(roles));

    // The old holder wakes up believing it is active: every write is refused in its
    // transaction, nothing is written.
    let refused = first
        .apply(
            &verified("2", "PAID"),
            Source::Firestore,
            None,
            &hooks,
            watch,
        )
        .await
        .expect_err("a stale epoch recorded a payment");
    assert!(refused.message.contains("not current"), "{refused}");
    assert_eq!(refused.path, name, "the error names host:port/database");
    let outcome = [(
        claimed[0].event_id.clone(),
        crate::ledger::DeliveryUpdate::Delivered,
    )];
    assert!(
        first.record_and_claim(&outcome, later, 10).await.is_err(),
        "a stale epoch wrote a delivery's outcome"
    );
    assert!(
        first
            .note_changes(&["1".parse().expect("id")])
            .await
            .is_err()
    );
    assert!(
        first
            .issue_tickets(&[("1".parse().expect("id"), None)])
            .await
            .is_err()
    );
    assert!(first.recover_running_deliveries().await.is_err());
    let grouped = first
        .apply_all(
            vec![crate::ledger::ApplyRequest {
                verified: verified("3", "PAID"),
                source: Source::Firestore,
                changed_at: None,
            }],
            &hooks,
            watch,
        )
        .await;
    assert!(grouped[0].is_err());
    assert!(
        second
            .checkout(&"2".parse().expect("id"))
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        second
            .checkout(&"3".parse().expect("id"))
            .await
            .expect("read")
            .is_none()
    );
    let delivery = second
        .delivery(&claimed[0].event_id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        delivery.state,
        DeliveryState::Running,
        "the outcome was not written"
    );

    // The new holder reclaims the old holder's claim: the same event id runs again.
    assert_eq!(
        second.recover_running_deliveries().await.expect("recover"),
        1
    );
    let again = second
        .record_and_claim(&[], later, 10)
        .await
        .expect("claim")
        .claimed;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event_id, claimed[0].event_id);
    assert_eq!(again[0].attempts, 2);
}

#[tokio::test]
async fn the_write_check_passes_on_a_standby_daemon_and_fails_on_a_read_only_server() {
    use crate::ledger::Ledger;

    let Some(url) = cluster::database() else {
        return;
    };
    let session = Session::Daemon {
        idle_limit: Duration::from_secs(10),
    };
    let (_role, roles) = tokio::sync::watch::channel(Role::Standby { holder: None });
    let standby = Ledger::postgres(
        PgStore::open(&ledger_settings(&url), session)
            .await
            .expect("open")
            .with_role(roles),
    );
    standby
        .check_writable()
        .await
        .expect("a standby daemon's database is healthy");

    // Opened (and migrated) first: a read-only database cannot be migrated.
    let read_only = Ledger::postgres(
        PgStore::open(&ledger_settings(&url), Session::Operator)
            .await
            .expect("open"),
    );
    let database = url.rsplit('/').next().unwrap_or_default();
    let database = database.split('?').next().unwrap_or_default();
    // New connections start read-only; the pooled ones are ended, so the pool opens new ones.
    cluster::cluster().expect("cluster runs").psql(
        database,
        &format!(
            "ALTER DATABASE {database} SET default_transaction_read_only = on;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        ),
    );
    wait_until(
        "the write check to fail on the read-only server",
        || async {
            read_only
                .check_writable()
                .await
                .is_err_and(|refused| refused.message.contains("accepts no writes"))
        },
    )
    .await;
}
