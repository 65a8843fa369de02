//! Benchmarks that print figures: payment latency, throughput, startup, and the daemon's memory
//! per watched checkout.
//!
//! Run: `cargo bench --bench pipeline` (release build). Sizes and limits come from the
//! environment: `PAYWATCH_BENCH_LATENCY_PAYMENTS` (default 300), `PAYWATCH_BENCH_CHECKOUTS`
//! (default 10000, the memory run), `PAYWATCH_BENCH_MODE` (multiplexed | per-document).
//! Everything runs on loopback against the in-process sandbox; every loop is bounded in count
//! and time.

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use paywatch::daemon::notify::Notifier;
use paywatch::daemon::{self, Control, DaemonStatus, RunOptions};
use paywatch::domain::CheckoutId;
use paywatch::ledger::{Ledger, ListFilter, TrackedVia};
use paywatch::logging::LogHandle;
use paywatch::paymennt::wire::{JsonDecimal, LinkRequest};
use paywatch::sandbox::{Sandbox, SandboxOptions};
use paywatch::settings::Settings;
use tokio::sync::{mpsc, watch};

/// No single phase may take longer than this.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(dir: &Path, sandbox: &Sandbox, mode: &str) -> std::path::PathBuf {
    let path = dir.join("paywatch.toml");
    let text = format!(
        "[ledger]\npath = \"{}\"\n[paymennt]\nbase_url = \"{}\"\napi_key = \"{}\"\napi_secret = \"{}\"\nconcurrency = 16\n\
         [firestore]\nendpoint = \"{}\"\nstream_mode = \"{mode}\"\n[reconcile]\ninterval = \"1h\"\n[log]\nlevel = \"warn\"\n",
        dir.join("paywatch.db").display(),
        sandbox.api_base_url(),
        sandbox.api_key(),
        sandbox.api_secret(),
        sandbox.firestore_endpoint()
    );
    std::fs::write(&path, text).expect("config written");
    path
}

async fn create_tracked(sandbox: &Sandbox, ledger: &Ledger, count: usize) -> Vec<CheckoutId> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let request = LinkRequest {
            request_id: format!("BENCH-{n}-r1"),
            order_id: format!("BENCH-{n}"),
            description: "benchmark".into(),
            currency: "AED".into(),
            amount: JsonDecimal("100.00".parse().expect("decimal")),
            ..LinkRequest::default()
        };
        let checkout = sandbox.state().create_link(&request).await.expect("link");
        let facts = checkout.facts().expect("facts");
        ledger.track(&facts, TrackedVia::Track).expect("track");
        ids.push(facts.id);
    }
    ids
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < PHASE_LIMIT,
            "{what} took longer than {PHASE_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

fn count(ledger: &Ledger, status: &str) -> usize {
    ledger
        .list(&ListFilter {
            statuses: vec![status.into()],
            ..ListFilter::default()
        })
        .expect("list")
        .len()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Latency of single payments (one at a time) and throughput of a burst, in-process.
async fn latency_and_throughput(mode: &str, payments: usize) {
    let sandbox = Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path(), &sandbox, mode);
    let settings = Settings::load_with_env(Some(&path), Vec::new()).expect("settings");
    let ledger = Ledger::open(&settings.ledger.path).expect("ledger");
    let ids = create_tracked(&sandbox, &ledger, payments * 2).await;

    let (controls, receiver) = mpsc::channel(4);
    let (sender, mut status) = watch::channel(DaemonStatus::default());
    let options = RunOptions {
        config_path: Some(path),
        log: LogHandle::detached(),
        status: Some(sender),
        notifier: Notifier::disabled(),
        http_addr: None,
        metrics: paywatch::metrics::Metrics::new(),
    };
    let started = Instant::now();
    let task = tokio::spawn(daemon::run(settings, receiver, options));
    status.wait_for(|s| s.ready).await.expect("ready");
    let startup = started.elapsed();
    let verified_all =
        wait_until("initial verification", || count(&ledger, "UNVERIFIED") == 0).await;
    println!(
        "[{mode}] startup {:.1} ms; {} checkouts subscribed and verified PENDING in {:.0} ms",
        startup.as_secs_f64() * 1e3,
        ids.len(),
        (startup + verified_all).as_secs_f64() * 1e3
    );

    // One payment at a time: sandbox pay -> document change -> Listen -> Get Checkout -> ledger.
    let mut end_to_end = Vec::with_capacity(payments);
    for id in &ids[..payments] {
        let paid_at = Instant::now();
        sandbox.state().pay(id).await.expect("pay");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = ledger.checkout(id).expect("read").and_then(|c| c.status);
            if status.as_deref() == Some("PAID") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "payment {id} not recorded in 10 s"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        end_to_end.push(paid_at.elapsed().as_secs_f64() * 1e3);
    }
    end_to_end.sort_by(f64::total_cmp);
    let mut recorded: Vec<f64> = ids[..payments]
        .iter()
        .filter_map(|id| {
            ledger
                .transitions(id)
                .expect("transitions")
                .last()
                .and_then(|t| t.latency_ms)
        })
        .map(|ms| ms as f64)
        .collect();
    recorded.sort_by(f64::total_cmp);
    println!(
        "[{mode}] single payments (n={payments}): pay -> PAID in ledger p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&end_to_end, 0.5),
        percentile(&end_to_end, 0.9),
        percentile(&end_to_end, 0.99),
        end_to_end.last().copied().unwrap_or(0.0)
    );
    println!(
        "[{mode}] recorded latency (document update_time -> verified): p50 {:.0} ms, p99 {:.0} ms",
        percentile(&recorded, 0.5),
        percentile(&recorded, 0.99)
    );

    // A burst: every remaining checkout paid at once.
    let burst = &ids[payments..];
    let started = Instant::now();
    for id in burst {
        sandbox.state().pay(id).await.expect("pay");
    }
    let target = ids.len();
    wait_until("burst", || count(&ledger, "PAID") == target).await;
    let elapsed = started.elapsed();
    println!(
        "[{mode}] burst of {} payments recorded in {:.0} ms ({:.0} payments/s)",
        burst.len(),
        elapsed.as_secs_f64() * 1e3,
        burst.len() as f64 / elapsed.as_secs_f64()
    );
    let _ = controls.send(Control::Shutdown).await;
    let _ = task.await;
    sandbox.shutdown().await;
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `paywatch run` on `config`, waits until nothing in `ledger` is unverified and the
/// first-snapshot burst has settled, and returns its resident memory in KiB and the time taken.
async fn settled_daemon_rss(config: &Path, ledger: &Ledger) -> (u64, Duration) {
    let child = Command::new(env!("CARGO_BIN_EXE_paywatch"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("paywatch run");
    let running = Running(child);
    let started = Instant::now();
    wait_until("all checkouts verified", || {
        count(ledger, "UNVERIFIED") == 0
    })
    .await;
    let verified_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(running.0.id()).unwrap_or(0);
    drop(running);
    (rss, verified_in)
}

/// The daemon as its own process: resident memory with no checkout, then watching `checkouts`.
async fn memory(mode: &str, checkouts: usize) {
    let sandbox = Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox");
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty_config = config(empty_dir.path(), &sandbox, mode);
    let empty_ledger = Ledger::open(&empty_dir.path().join("paywatch.db")).expect("ledger");
    let (baseline, _) = settled_daemon_rss(&empty_config, &empty_ledger).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path(), &sandbox, mode);
    let ledger = Ledger::open(&dir.path().join("paywatch.db")).expect("ledger");
    let created = Instant::now();
    create_tracked(&sandbox, &ledger, checkouts).await;
    println!(
        "[{mode}] created and tracked {checkouts} links in {:.1} s",
        created.elapsed().as_secs_f64()
    );
    let (loaded, verified_in) = settled_daemon_rss(&path, &ledger).await;
    println!(
        "[{mode}] daemon watching {checkouts} checkouts: all subscribed and verified in {:.1} s; RSS {:.1} MiB (empty daemon {:.1} MiB; {:.2} KiB per watched checkout)",
        verified_in.as_secs_f64(),
        loaded as f64 / 1024.0,
        baseline as f64 / 1024.0,
        loaded.saturating_sub(baseline) as f64 / checkouts as f64
    );
    sandbox.shutdown().await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mode = std::env::var("PAYWATCH_BENCH_MODE").unwrap_or_else(|_| "multiplexed".into());
    let payments = env_usize("PAYWATCH_BENCH_LATENCY_PAYMENTS", 300);
    let checkouts = env_usize("PAYWATCH_BENCH_CHECKOUTS", 10_000);
    runtime.block_on(async {
        latency_and_throughput(&mode, payments).await;
        memory(&mode, checkouts).await;
    });
}
