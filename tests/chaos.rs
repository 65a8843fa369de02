//! The chaos run: PRODUCT.md's promises under kills, API faults, dropped streams and flaky hooks
//! (a command, and a URL hook signed per Standard Webhooks whose endpoint fails a share of first
//! attempts with a 500: every retry must carry its first attempt's webhook-id).
//!
//! A seeded schedule (the seed is printed; set `PAYWATCH_CHAOS_SEED` to replay one) authorizes,
//! pays, fails, cancels, expires and refunds (in full and in part) several hundred sandbox
//! checkouts while a real `paywatch run` process is killed with SIGKILL dozens of times, the
//! sandbox answers a share of API calls with 500s, 429s and late answers past the request timeout,
//! every Listen stream is dropped now and then, and the hook fails a share of first attempts.
//! Then it checks, against the sandbox's own record of each checkout:
//!
//! - the ledger's status and refunded total equal the sandbox's, for every checkout;
//! - each checkout's history is one unbroken chain of verified transitions (no gaps, no
//!   repeats), holding only statuses the sandbox really gave that checkout;
//! - every transition has its delivery, every delivery reached `delivered`, and the hook itself
//!   recorded a successful run of each (duplicates are allowed by at-least-once, and counted);
//! - `PRAGMA integrity_check` is ok.
//!
//! It runs twice: one daemon on an SQLite ledger, and a pair on one PostgreSQL ledger (the
//! throwaway cluster) where every kill hits the active daemon, the standby takes over when the
//! 2 s lease runs out, and the killed one comes back standing by.
//!
//! `PAYWATCH_CHAOS=long` runs ten times the size. Figures are printed to stderr: run with
//! `cargo test --test integration chaos -- --nocapture` to see them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use paywatch::domain::{CheckoutId, CheckoutStatus};
use paywatch::ledger::postgres::{PgStore, read_lease};
use paywatch::ledger::{DeliveryFilter, DeliveryState, Ledger};
use paywatch::sandbox::faults::FaultUpdate;
use paywatch::sandbox::{Sandbox, SandboxOptions};

use crate::common;
use crate::common::process::{Process, paywatch};

/// How big one run is.
#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    checkouts: usize,
    actions: usize,
    /// Mean pause between two actions.
    pace: Duration,
    /// Chance, per action, that the daemon is killed right after it.
    kill_chance: f64,
    /// How long the ledger may take to agree with the sandbox once the changes stop.
    settle_deadline: Duration,
}

impl Profile {
    fn from_env() -> Profile {
        let short = Profile {
            name: "short",
            checkouts: 300,
            actions: 900,
            pace: Duration::from_millis(25),
            kill_chance: 0.045,
            settle_deadline: Duration::from_secs(120),
        };
        match std::env::var("PAYWATCH_CHAOS").as_deref() {
            Ok("long") => Profile {
                name: "long",
                checkouts: short.checkouts * 10,
                actions: short.actions * 10,
                kill_chance: short.kill_chance / 2.0,
                settle_deadline: Duration::from_secs(600),
                ..short
            },
            _ => short,
        }
    }

    /// The pair's run (two daemons on PostgreSQL): each kill of the active daemon costs a
    /// lease (2 s) before the standby acts, so fewer actions and kills.
    fn pair() -> Profile {
        let base = Profile::from_env();
        Profile {
            name: if base.name == "long" {
                "pair-long"
            } else {
                "pair"
            },
            checkouts: base.checkouts / 2,
            actions: base.actions / 2,
            // Slower, and likelier to kill once a daemon holds the lease again, so that the
            // run holds several takeovers.
            pace: base.pace * 2,
            kill_chance: 0.06,
            ..base
        }
    }
}

/// Where the ledger of a run is.
enum Backend {
    /// One daemon on an SQLite file.
    Sqlite,
    /// Two daemons on this PostgreSQL database, one active; kills hit the active one.
    PostgresPair(String),
}

/// Figures of one run, printed at the end.
#[derive(Debug, Default)]
struct Figures {
    actions_applied: usize,
    kills: usize,
    kills_with_committed_unstarted_hooks: usize,
    kills_while_hooks_ran: usize,
    api_error_bursts: usize,
    throttle_bursts: usize,
    slow_api_windows: usize,
    stream_drops: usize,
}

/// `paywatch run` as a child process, appending its log to `log` (one file across restarts).
fn start_daemon(config: &Path, log: &Path) -> Process {
    paywatch().config(config).log_to(log).run()
}

/// SIGTERM, then a clean exit.
async fn stop_daemon(process: Process) {
    let status = process.stop().await;
    assert!(status.success(), "paywatch exited with {status} on SIGTERM");
}

/// The hook: records each run as `EVENT CHECKOUT STATUS ATTEMPT ok|fail`, sometimes lingers
/// (so kills land while hooks run), and fails about one first attempt in seven; its
/// `[[hooks]]` table, named `record`, for every status.
fn write_hook(dir: &Path, runs: &Path) -> String {
    common::shell_hook(
        dir,
        "record",
        &[],
        &format!(
            "r=$(od -An -N1 -tu1 /dev/urandom | tr -d ' ')\n\
             outcome=ok\n\
             if [ \"$PAYWATCH_ATTEMPT\" = 1 ] && [ \"$r\" -lt 36 ]; then outcome=fail; fi\n\
             if [ \"$r\" -gt 200 ]; then sleep 0.05; fi\n\
             echo \"$PAYWATCH_EVENT_ID $PAYWATCH_CHECKOUT_ID $PAYWATCH_STATUS $PAYWATCH_ATTEMPT $outcome\" >> '{runs}'\n\
             [ \"$outcome\" = ok ]\n",
            runs = runs.display()
        ),
    )
}

/// The URL hook's secret (issue 24).
const URL_HOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the URL hook's endpoint saw.
#[derive(Debug, Default, Clone)]
struct UrlFigures {
    requests: usize,
    bad_signatures: usize,
    id_mismatches: usize,
    /// Event ids that arrived more than once, each time under the same webhook-id.
    retried_ids: usize,
}

/// The URL hook's endpoint, in this process (it outlives every kill of the daemon): it checks
/// each request's signature and that its webhook-id is its event's id, fails about one first
/// attempt in seven with a 500, and appends each request to the runs file in the command
/// hook's format (`EVENT CHECKOUT STATUS ATTEMPT ok|fail`).
struct UrlEndpoint {
    url: String,
    state: std::sync::Arc<std::sync::Mutex<(UrlFigures, HashMap<String, usize>)>>,
}

impl UrlEndpoint {
    async fn start(runs: &Path) -> UrlEndpoint {
        use axum::extract::State;
        type Shared = (
            std::sync::Arc<std::sync::Mutex<(UrlFigures, HashMap<String, usize>)>>,
            PathBuf,
        );
        async fn receive(
            State((state, runs)): State<Shared>,
            headers: axum::http::HeaderMap,
            body: axum::body::Bytes,
        ) -> axum::http::StatusCode {
            use std::io::Write;
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
            let key = paywatch::hooks::post::SigningKey::from_secret(URL_HOOK_SECRET).expect("key");
            let expected = paywatch::hooks::post::sign(
                &[key],
                &id,
                timestamp.parse().unwrap_or_default(),
                &body,
            );
            let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut guard = state.lock().expect("lock");
            let (figures, seen) = &mut *guard;
            figures.requests += 1;
            if header("webhook-signature") != expected {
                figures.bad_signatures += 1;
                return axum::http::StatusCode::BAD_REQUEST;
            }
            if event["event_id"] != id.as_str() {
                figures.id_mismatches += 1;
            }
            let times = seen.entry(id.clone()).or_default();
            *times += 1;
            if *times == 2 {
                figures.retried_ids += 1;
            }
            let attempt = event["attempt"].as_u64().unwrap_or_default();
            let fail = attempt == 1 && rand::random::<u8>() < 36;
            let line = format!(
                "{id} {} {} {attempt} {}\n",
                event["checkout_id"].as_str().unwrap_or("-"),
                event["status"].as_str().unwrap_or("-"),
                if fail { "fail" } else { "ok" }
            );
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&runs)
                .and_then(|mut file| file.write_all(line.as_bytes()))
                .expect("append to the runs file");
            if fail {
                axum::http::StatusCode::INTERNAL_SERVER_ERROR
            } else {
                axum::http::StatusCode::NO_CONTENT
            }
        }
        let state = std::sync::Arc::default();
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state((std::sync::Arc::clone(&state), runs.to_path_buf()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        UrlEndpoint {
            url: format!("http://{addr}/paywatch"),
            state,
        }
    }

    fn figures(&self) -> UrlFigures {
        self.state.lock().expect("lock").0.clone()
    }
}

/// One line of the hook's record.
struct HookRun {
    event_id: String,
    ok: bool,
}

fn hook_runs(runs: &Path) -> Vec<HookRun> {
    std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() == 5).then(|| HookRun {
                event_id: fields[0].to_owned(),
                ok: fields[4] == "ok",
            })
        })
        .collect()
}

/// A random action that the checkout's current status allows.
fn pick_action(rng: &mut StdRng, status: &CheckoutStatus, left: Decimal) -> Option<&'static str> {
    use CheckoutStatus as S;
    let choices: &[&str] = match status {
        S::Pending => &["authorize", "pay", "pay", "pay", "fail", "cancel", "expire"],
        S::Authorized => &["pay", "pay", "fail", "cancel", "expire"],
        S::Paid | S::PartiallyRefunded if left > Decimal::ONE => {
            &["partial-refund", "partial-refund", "refund"]
        }
        S::Paid | S::PartiallyRefunded => &["refund"],
        _ => return None,
    };
    Some(choices[rng.random_range(0..choices.len())])
}

fn decimal(text: Option<&str>) -> Decimal {
    text.and_then(|t| t.parse().ok()).unwrap_or(Decimal::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_faults_and_drops_lose_nothing() {
    chaos(Profile::from_env(), Backend::Sqlite).await;
}

/// The same promises with two daemons on one PostgreSQL ledger: every kill hits the active one,
/// the standby takes over when its lease runs out, and the killed one comes back as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_a_pair_on_postgresql_loses_nothing_when_the_active_one_is_killed() {
    let Some(url) = common::postgres::database() else {
        return;
    };
    chaos(Profile::pair(), Backend::PostgresPair(url)).await;
}

/// Which of `daemons` holds the lease now (by the holder's pid), if any does.
async fn active_daemon(store: &PgStore, daemons: &[Option<Process>]) -> Option<usize> {
    let lease = read_lease(store.pool(), store.target())
        .await
        .ok()
        .flatten()
        .filter(|lease| lease.live)?;
    let pid = lease.holder.split(':').nth(1)?.to_owned();
    daemons.iter().position(|daemon| {
        daemon
            .as_ref()
            .is_some_and(|process| process.pid().to_string() == pid)
    })
}

async fn chaos(profile: Profile, backend: Backend) {
    let seed: u64 = std::env::var("PAYWATCH_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "chaos: profile {} seed {seed} (replay with PAYWATCH_CHAOS_SEED={seed})",
        profile.name
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let sandbox = Sandbox::start(SandboxOptions {
        heartbeat_interval: Duration::from_secs(2),
        expiry_minute: Duration::from_millis(10),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = dir.path().join("runs");
    let logs = [
        dir.path().join("daemon.log"),
        dir.path().join("daemon-b.log"),
    ];
    let hook = write_hook(dir.path(), &runs);
    let endpoint = UrlEndpoint::start(&runs).await;
    let extra = format!(
        "{hook}timeout = \"30s\"\n\n\
         [[hooks]]\nname = \"post\"\nurl = \"{}\"\nsecret = \"{URL_HOOK_SECRET}\"\ntimeout = \"30s\"\n",
        endpoint.url,
    );
    let config = dir.path().join("paywatch.toml");
    let mut text = common::sandbox_config_text(dir.path(), &sandbox, "multiplexed", &extra)
        .replace("interval = \"1h\"", "interval = \"5s\"")
        .replace(
            "max_retries = 5",
            "max_retries = 5\nrequest_timeout = \"1s\"\nconnect_timeout = \"1s\"",
        );
    let ledger_path = dir.path().join("paywatch.db");
    let store = match &backend {
        Backend::Sqlite => None,
        Backend::PostgresPair(url) => {
            text = text.replace(
                &format!("path = \"{}\"", ledger_path.display()),
                &format!("url = \"{url}\""),
            ) + "\n[ha]\nlease = \"2s\"\n";
            Some(common::postgres::operator_store(url).await)
        }
    };
    std::fs::write(&config, text).expect("config");
    let ledger = match &store {
        None => Ledger::open(&ledger_path).await.expect("ledger"),
        Some(store) => Ledger::postgres(store.clone()),
    };

    // The checkouts, tracked as `paywatch track` would, and what the sandbox gave each.
    let mut ids: Vec<CheckoutId> = Vec::with_capacity(profile.checkouts);
    let mut given: HashMap<CheckoutId, BTreeSet<String>> = HashMap::new();
    let mut partial_refunds: HashMap<CheckoutId, usize> = HashMap::new();
    for n in 0..profile.checkouts {
        let id = common::create_and_track(&sandbox, &ledger, &format!("ORD-CHAOS-{n}")).await;
        given
            .entry(id.clone())
            .or_default()
            .insert("PENDING".into());
        ids.push(id);
    }

    let mut figures = Figures::default();
    let started = Instant::now();
    let mut daemons: Vec<Option<Process>> = Vec::new();
    daemons.push(Some(start_daemon(&config, &logs[0])));
    if store.is_some() {
        daemons.push(Some(start_daemon(&config, &logs[1])));
    }

    for _ in 0..profile.actions {
        // One action on a random checkout that still has a move left.
        let id = &ids[rng.random_range(0..ids.len())];
        let checkout = sandbox.state().checkout(id).expect("sandbox knows it");
        let status = checkout.status.clone().unwrap_or(CheckoutStatus::Pending);
        let left = checkout.amount.map(|a| a.0).unwrap_or_default()
            - checkout.total_refunded.map(|a| a.0).unwrap_or_default();
        if let Some(action) = pick_action(&mut rng, &status, left) {
            let state = sandbox.state();
            let outcome = match action {
                "authorize" => state.authorize(id).await,
                "pay" => state.pay(id).await,
                "fail" => state.fail(id).await,
                "cancel" => state.cancel(id).await,
                "expire" => state.expire(id).await,
                "partial-refund" => {
                    // Strictly less than what is left, so the status stays partially refunded.
                    let cents_left = (left * Decimal::ONE_HUNDRED).trunc().to_i64().unwrap_or(2);
                    let amount = Decimal::new(rng.random_range(1..cents_left.max(2)), 2);
                    *partial_refunds.entry(id.clone()).or_default() += 1;
                    state.refund(id, Some(amount)).await
                }
                _ => state.refund(id, None).await,
            };
            let after = outcome.expect("the schedule only picks allowed moves");
            if let Some(status) = after.status {
                given
                    .entry(id.clone())
                    .or_default()
                    .insert(status.as_str().to_owned());
            }
            figures.actions_applied += 1;
        }

        // Faults, each with its own small chance per action.
        let faults = sandbox.faults();
        let roll: f64 = rng.random();
        if roll < 0.02 {
            faults.fail_next_api_requests(rng.random_range(1..=6));
            figures.api_error_bursts += 1;
        } else if roll < 0.03 {
            faults.throttle_next_api_requests(rng.random_range(1..=3), 1);
            figures.throttle_bursts += 1;
        } else if roll < 0.035 {
            // Later than the daemon's 1 s request timeout: the call times out and is retried.
            faults.set_api_latency(Duration::from_millis(1_200));
            figures.slow_api_windows += 1;
        } else if roll < 0.06 {
            faults.set_api_latency(Duration::ZERO);
        } else if roll < 0.075 {
            faults
                .update(FaultUpdate {
                    close_listen_streams: true,
                    ..FaultUpdate::default()
                })
                .expect("fault update");
            figures.stream_drops += 1;
        }
        faults.set_api_error_rate(if rng.random::<f64>() < 0.5 { 0.05 } else { 0.0 });

        // A kill right after a change: sometimes at once (between the ledger commit and the
        // hook start), sometimes a little later (while hooks run).
        let victim = match &store {
            None => Some(0),
            Some(store) => active_daemon(store, &daemons).await,
        };
        if let Some(victim) = victim
            && rng.random::<f64>() < profile.kill_chance
        {
            let wait = Duration::from_millis(rng.random_range(0..40));
            tokio::time::sleep(wait).await;
            if let Some(process) = daemons[victim].take() {
                tokio::task::block_in_place(|| process.kill_9());
            }
            figures.kills += 1;
            let running = ledger
                .deliveries(&DeliveryFilter {
                    state: Some(DeliveryState::Running),
                    ..DeliveryFilter::default()
                })
                .await
                .expect("read deliveries");
            let pending = ledger
                .deliveries(&DeliveryFilter {
                    state: Some(DeliveryState::Pending),
                    ..DeliveryFilter::default()
                })
                .await
                .expect("read deliveries");
            if !running.is_empty() {
                figures.kills_while_hooks_ran += 1;
            }
            if pending.iter().any(|d| d.attempts == 0) {
                figures.kills_with_committed_unstarted_hooks += 1;
            }
            // Down for a moment: changes made meanwhile must be caught on restart (or, in a
            // pair, by the standby once it takes over; the killed one comes back standing by).
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            daemons[victim] = Some(start_daemon(&config, &logs[victim]));
        }

        let pause = rng.random_range(0..=2 * profile.pace.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }

    // Calm: no more faults; the daemon must now converge on its own.
    let last_change = Instant::now();
    let faults = sandbox.faults();
    faults.set_api_error_rate(0.0);
    faults.set_api_latency(Duration::ZERO);
    faults.fail_next_api_requests(0);
    faults.throttle_next_api_requests(0, 1);

    let consistent = common::poll_until(
        profile.settle_deadline,
        Duration::from_millis(200),
        || async {
            let mismatch = first_mismatch(&sandbox, &ledger, &ids, &runs).await;
            match mismatch {
                None => Some(()),
                Some(_) => None,
            }
        },
    )
    .await;
    if consistent.is_none() {
        let why = first_mismatch(&sandbox, &ledger, &ids, &runs)
            .await
            .unwrap_or_default();
        let log: String = logs
            .iter()
            .map(|log| std::fs::read_to_string(log).unwrap_or_default())
            .collect();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!(
            "seed {seed}: the ledger did not agree with the sandbox within {:?}: {why}\n\
             daemon log (last lines, newest first):\n{}",
            profile.settle_deadline,
            tail.join("\n")
        );
    }
    let settle_time = last_change.elapsed();
    for process in daemons.iter_mut().filter_map(Option::take) {
        stop_daemon(process).await;
    }

    // The history: one unbroken chain per checkout, only statuses the sandbox gave it.
    let mut transitions = 0usize;
    let mut refund_entries = 0usize;
    for id in &ids {
        let history = ledger.transitions(id).await.expect("transitions");
        let mut previous: Option<CheckoutStatus> = None;
        for (n, transition) in history.iter().enumerate() {
            assert_eq!(
                transition.from, previous,
                "seed {seed}: checkout {id}: transition {n} does not follow the one before: {history:?}"
            );
            assert!(
                given[id].contains(transition.to.as_str()),
                "seed {seed}: checkout {id}: {} was never the sandbox's status (it gave {:?})",
                transition.to,
                given[id]
            );
            if transition.from.as_ref() == Some(&transition.to) {
                assert_eq!(
                    transition.to.as_str(),
                    "PARTIALLY_REFUNDED",
                    "seed {seed}: checkout {id}: a repeated status: {history:?}"
                );
                refund_entries += 1;
            }
            previous = Some(transition.to.clone());
        }
        let repeats = history
            .iter()
            .filter(|t| t.from.as_ref() == Some(&t.to))
            .count();
        assert!(
            repeats <= partial_refunds.get(id).copied().unwrap_or(0),
            "seed {seed}: checkout {id}: more refund entries than refunds: {history:?}"
        );
        transitions += history.len();
    }

    // Deliveries: one per transition, all delivered, each seen by the hook itself.
    let runs_seen = hook_runs(&runs);
    let mut ok_runs: BTreeMap<&str, usize> = BTreeMap::new();
    for run in runs_seen.iter().filter(|run| run.ok) {
        *ok_runs.entry(run.event_id.as_str()).or_default() += 1;
    }
    let mut deliveries = 0usize;
    for id in &ids {
        let history = ledger.transitions(id).await.expect("transitions");
        let of_checkout = ledger.deliveries_of(id).await.expect("deliveries");
        for transition in &history {
            // One delivery per hook: the command and the URL hook.
            for hook in ["record", "post"] {
                let matching: Vec<_> = of_checkout
                    .iter()
                    .filter(|d| d.transition_id == transition.id && !d.replay && d.hook == hook)
                    .collect();
                assert_eq!(
                    matching.len(),
                    1,
                    "seed {seed}: checkout {id}: transition {} has {} deliveries to {hook}",
                    transition.id,
                    matching.len()
                );
                let delivery = matching[0];
                assert_eq!(delivery.state, DeliveryState::Delivered, "seed {seed}");
                assert!(
                    ok_runs.contains_key(delivery.event_id.as_str()),
                    "seed {seed}: the hook {hook} never completed {} ({id} {})",
                    delivery.event_id,
                    transition.to
                );
            }
        }
        assert_eq!(
            of_checkout.len(),
            2 * history.len(),
            "seed {seed}: checkout {id}: a delivery without its transition"
        );
        deliveries += of_checkout.len();
    }
    let duplicates: usize = ok_runs.values().map(|n| n - 1).sum();
    let hook_failures = runs_seen.iter().filter(|run| !run.ok).count();

    let integrity: String = match &store {
        None => rusqlite::Connection::open(&ledger_path)
            .expect("open the ledger file")
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity_check"),
        Some(_) => "ok".to_owned(),
    };
    assert_eq!(integrity, "ok", "seed {seed}");
    let url = endpoint.figures();
    assert_eq!(
        url.bad_signatures, 0,
        "seed {seed}: a URL delivery did not verify"
    );
    assert_eq!(
        url.id_mismatches, 0,
        "seed {seed}: a webhook-id differed from its event's id"
    );
    assert!(
        url.retried_ids > 0,
        "seed {seed}: no URL delivery was retried"
    );

    let paid = ids.iter().filter(|id| given[*id].contains("PAID")).count();
    eprintln!(
        "chaos figures (seed {seed}, profile {}):\n\
         \x20 checkouts {} ({paid} paid at some point), actions applied {}, in {:.1} s\n\
         \x20 verified transitions {transitions} (of which refund-only entries {refund_entries}), deliveries {deliveries}\n\
         \x20 daemon kills (SIGKILL) {}: with a committed transition whose hook had not started {}, while a hook ran {}\n\
         \x20 API faults: 500 bursts {}, 429 bursts {}, timeout windows {}, plus a 5% random 500 rate half the time\n\
         \x20 Listen stream drops {}\n\
         \x20 hook runs {} (both hooks): failed first attempts {hook_failures}, duplicate successful deliveries {duplicates}\n\
         \x20 URL hook: {} requests, {} event ids retried (each retry with its first attempt's webhook-id), bad signatures {}\n\
         \x20 last change to a fully consistent ledger: {} ms\n\
         \x20 integrity_check: {integrity}",
        profile.name,
        ids.len(),
        figures.actions_applied,
        last_change.duration_since(started).as_secs_f64(),
        figures.kills,
        figures.kills_with_committed_unstarted_hooks,
        figures.kills_while_hooks_ran,
        figures.api_error_bursts,
        figures.throttle_bursts,
        figures.slow_api_windows,
        figures.stream_drops,
        runs_seen.len(),
        url.requests,
        url.retried_ids,
        url.bad_signatures,
        settle_time.as_millis(),
    );
    // A pair kills only while a daemon holds the lease, and waits a lease after each kill.
    let fewest_kills = if store.is_some() { 5 } else { 10 };
    assert!(
        figures.kills >= fewest_kills,
        "seed {seed}: only {} kills",
        figures.kills
    );
    sandbox.shutdown().await;
}

/// The first way the ledger (or the hook's record) disagrees with the sandbox, if any.
async fn first_mismatch(
    sandbox: &Sandbox,
    ledger: &Ledger,
    ids: &[CheckoutId],
    runs: &Path,
) -> Option<String> {
    for id in ids {
        let truth = sandbox.state().checkout(id)?;
        let record = match ledger.checkout(id).await {
            Ok(Some(record)) => record,
            other => return Some(format!("checkout {id}: ledger read gave {other:?}")),
        };
        let want_status = truth.status.as_ref().map(|s| s.as_str().to_owned());
        if record.status.as_ref().map(|s| s.as_str().to_owned()) != want_status {
            return Some(format!(
                "checkout {id}: ledger {:?}, sandbox {want_status:?}",
                record.status
            ));
        }
        let want_refunded = truth.total_refunded.map(|a| a.0).unwrap_or_default();
        if decimal(record.total_refunded.as_deref()) != want_refunded {
            return Some(format!(
                "checkout {id}: ledger refunded {:?}, sandbox {want_refunded}",
                record.total_refunded
            ));
        }
    }
    let undelivered = ledger
        .deliveries(&DeliveryFilter::default())
        .await
        .ok()?
        .into_iter()
        .find(|d| d.state != DeliveryState::Delivered);
    if let Some(delivery) = undelivered {
        return Some(format!(
            "delivery {} ({} {}) is {:?} after {} attempts",
            delivery.event_id,
            delivery.checkout_id,
            delivery.status,
            delivery.state,
            delivery.attempts
        ));
    }
    let completed: BTreeSet<String> = hook_runs(runs)
        .into_iter()
        .filter(|run| run.ok)
        .map(|run| run.event_id)
        .collect();
    let delivered = ledger.deliveries(&DeliveryFilter::default()).await.ok()?;
    delivered
        .iter()
        .find(|d| !completed.contains(&d.event_id))
        .map(|d| format!("the hook has no record of completing {}", d.event_id))
}

/// Counts, straight from the ledger file, transitions without their delivery and deliveries
/// without their transition (with one hook on every status, each transition has exactly one).
fn orphans(path: &Path) -> (i64, i64, i64) {
    let connection = rusqlite::Connection::open(path).expect("open the ledger file");
    let count = |sql: &str| -> i64 {
        connection
            .query_row(sql, [], |row| row.get(0))
            .expect("count")
    };
    (
        count("SELECT count(*) FROM transitions"),
        count(
            "SELECT count(*) FROM transitions t
             WHERE NOT EXISTS (SELECT 1 FROM hook_deliveries d WHERE d.transition_id = t.id)",
        ),
        count(
            "SELECT count(*) FROM hook_deliveries d
             WHERE NOT EXISTS (SELECT 1 FROM transitions t WHERE t.id = d.transition_id)",
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_burst_never_splits_a_transition_from_its_deliveries() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = dir.path().join("runs");
    let hook = write_hook(dir.path(), &runs);
    let (settings, config) = common::settings(dir.path(), &sandbox, "multiplexed", &hook);
    let ledger = Ledger::open(&settings.ledger.path).await.expect("ledger");
    let mut ids = Vec::new();
    for n in 0..240 {
        ids.push(common::create_and_track(&sandbox, &ledger, &format!("ORD-BURST-{n}")).await);
    }
    let daemon_log = dir.path().join("daemon.log");
    let mut process = start_daemon(&config, &daemon_log);
    for id in &ids {
        common::wait_status(&ledger, id, "PENDING").await;
    }
    // Three bursts of 80 payments, each cut short by a SIGKILL as soon as it starts being
    // recorded, then a restart before the next.
    let mut cut_mid_burst = 0;
    for burst in ids.chunks(80) {
        let before = orphans(&settings.ledger.path).0;
        let payments = {
            let state = sandbox.state().clone();
            let burst = burst.to_vec();
            tokio::spawn(async move {
                for id in &burst {
                    state.pay(id).await.expect("pay");
                }
            })
        };
        common::wait_for(
            "the burst to start being recorded",
            common::DEADLINE,
            || {
                let recorded = orphans(&settings.ledger.path).0;
                async move { (recorded > before).then_some(()) }
            },
        )
        .await;
        tokio::task::block_in_place(|| process.kill_9());
        let (transitions, without_delivery, without_transition) = orphans(&settings.ledger.path);
        assert_eq!(
            (without_delivery, without_transition),
            (0, 0),
            "a transition and its deliveries are one transaction"
        );
        if transitions - before < 80 {
            cut_mid_burst += 1;
        }
        payments.await.expect("payments made");
        process = start_daemon(&config, &daemon_log);
    }
    eprintln!("durability: {cut_mid_burst} of 3 kills landed mid-burst");
    // The last restart finishes the job: every payment recorded once, every delivery delivered.
    for id in &ids {
        common::wait_status(&ledger, id, "PAID").await;
    }
    common::wait_for(
        "every delivery to be delivered",
        common::DEADLINE,
        || async {
            let undelivered = ledger
                .deliveries(&DeliveryFilter::default())
                .await
                .expect("deliveries")
                .into_iter()
                .filter(|d| d.state != DeliveryState::Delivered)
                .count();
            (undelivered == 0).then_some(())
        },
    )
    .await;
    stop_daemon(process).await;
    for id in &ids {
        assert_eq!(
            common::history(&ledger, id).await,
            ["PENDING", "PAID"],
            "{id}"
        );
    }
    let (transitions, without_delivery, without_transition) = orphans(&settings.ledger.path);
    assert_eq!(transitions, 480);
    assert_eq!((without_delivery, without_transition), (0, 0));
    sandbox.shutdown().await;
}
