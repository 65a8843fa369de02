//! The benchmark an operator reads before choosing paywatch: latency, throughput, memory and
//! start-up, each against the machine's own floor, measured in one run.
//!
//! Run: `cargo bench --bench pipeline` (release build). `PAYWATCH_BENCH_SMOKE=1` uses tiny sizes
//! (well under a minute). Sizes come from the environment (defaults in brackets):
//!
//! - `PAYWATCH_BENCH_AT_100` [1000]: changes paced at 100/s (change-to-ledger);
//! - `PAYWATCH_BENCH_AT_1000` [5000]: changes paced at 1,000/s;
//! - `PAYWATCH_BENCH_HOOK_CHANGES` [500]: changes paced at 100/s with a time-stamping hook, and
//!   as many with a URL hook (its receiver stamps arrivals);
//! - `PAYWATCH_BENCH_THROUGHPUT` [5000]: payments in the hooks-off burst;
//! - `PAYWATCH_BENCH_HOOK_DELIVERIES` [2000]: payments in the burst with a trivial hook, and
//!   in the burst with a URL hook to a loopback keep-alive receiver;
//! - `PAYWATCH_BENCH_MULTIPLEXED` [1000,10000,50000]: watched checkouts, memory runs;
//! - `PAYWATCH_BENCH_PER_DOCUMENT` [1000,5000]: the same in per-document mode;
//! - `PAYWATCH_BENCH_STARTUP` [10000]: checkouts for start-up and the reconcile sweep;
//! - `PAYWATCH_BENCH_FLOOR_SAMPLES` [300]: samples per floor;
//! - `PAYWATCH_BENCH_FAILOVER` [10000]: watched checkouts in the PostgreSQL failover run;
//! - `PAYWATCH_BENCH_LEASE` [10s; smoke: 2s]: the failover pair's `[ha] lease`;
//! - `PAYWATCH_BENCH_PHASES` [all]: which of latency, throughput, startup, memory, postgres to
//!   run;
//! - `PAYWATCH_BENCH_BIN` [this build's]: the `paywatch` executable the child phases run;
//! - `PAYWATCH_BENCH_DIR` [the temp dir]: where ledgers whose commits are timed live (a real
//!   disk: commit latency is part of the figures); `PAYWATCH_BENCH_SCRATCH` [/dev/shm if present]:
//!   where ledgers are built and where the memory runs keep theirs;
//! - `PAYWATCH_BENCH_HEAPTRACK` [unset]: a directory; the memory runs' daemons record their heap
//!   there with heaptrack (`<label>.raw`, see [`measure_daemon`]); their RSS is then heaptrack's too.
//!
//! Everything runs on loopback against the in-process sandbox; every loop is bounded in count
//! and time. Latency runs use a daemon in this process (a tracing layer observes each PAID
//! line, logged right after its ledger commit returns); throughput, memory and start-up run
//! `paywatch run` as a child, so its CPU time and memory are its own.
//!
//! The postgres phase runs on a throwaway PostgreSQL cluster (`src/ledger/postgres/cluster.rs`:
//! loopback, fsync off; a skip line when PostgreSQL is not installed), a fresh database per
//! run: change-to-ledger at 100/s (`PAYWATCH_BENCH_AT_100` changes) and the hooks-off burst
//! (`PAYWATCH_BENCH_THROUGHPUT` payments) as above, printed beside the SQLite figures of the
//! same run, then a failover: an active and a standby `paywatch run` on one database, the active
//! one SIGKILLed once quiet, timed until the standby is active, running and quiet again, with
//! the Get Checkout calls that cost and a payment made at the kill.

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use gcloud_sdk::google::firestore::v1::listen_request::TargetChange as RequestedChange;
use gcloud_sdk::google::firestore::v1::listen_response::ResponseType;
use gcloud_sdk::google::firestore::v1::target::{DocumentsTarget, TargetType};
use gcloud_sdk::google::firestore::v1::value::ValueType;
use gcloud_sdk::google::firestore::v1::{ListenRequest, Target, Value};
use paywatch::daemon::notify::Notifier;
use paywatch::daemon::{self, Control, DaemonStatus, RunOptions};
use paywatch::domain::{CheckoutId, VerifyTicket};
use paywatch::ledger::postgres::{PgStore, Session};
use paywatch::ledger::{Ledger, TrackedVia};
use paywatch::logging::LogHandle;
use paywatch::paymennt::Client;
use paywatch::paymennt::wire::{JsonDecimal, LinkRequest};
use paywatch::sandbox::{Sandbox, SandboxOptions};
use paywatch::settings::{LedgerSettings, Secret, Settings};
use tokio::net::UnixDatagram;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

// The end-to-end tests' helpers (the child daemon is `common::process`). Their unit tests do not
// run in a bench without the test harness, so what only they use looks unused here.
#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::process::{self, Process, paywatch};

/// No single phase may take longer than this.
const PHASE_LIMIT: Duration = Duration::from_secs(300);
/// How long after the last paced change its observations may still arrive.
const STRAGGLER_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Sizes

struct Sizes {
    at_100: usize,
    at_1000: usize,
    hook_changes: usize,
    throughput: usize,
    hook_deliveries: usize,
    multiplexed: Vec<usize>,
    per_document: Vec<usize>,
    startup: usize,
    floor_samples: usize,
    failover: usize,
    /// `[ha] lease` of the failover's pair (humantime).
    lease: String,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: '{text}' is not a whole number")),
        Err(_) => default,
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(text) => text
            .split(',')
            .map(|part| {
                part.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: '{part}' is not a whole number"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

impl Sizes {
    fn from_env() -> (Sizes, bool) {
        let smoke = std::env::var("PAYWATCH_BENCH_SMOKE").is_ok_and(|v| v == "1");
        let d = |full: usize, tiny: usize| if smoke { tiny } else { full };
        let sizes = Sizes {
            at_100: env_usize("PAYWATCH_BENCH_AT_100", d(1000, 50)),
            at_1000: env_usize("PAYWATCH_BENCH_AT_1000", d(5000, 200)),
            hook_changes: env_usize("PAYWATCH_BENCH_HOOK_CHANGES", d(500, 30)),
            throughput: env_usize("PAYWATCH_BENCH_THROUGHPUT", d(5000, 200)),
            hook_deliveries: env_usize("PAYWATCH_BENCH_HOOK_DELIVERIES", d(2000, 50)),
            multiplexed: env_list(
                "PAYWATCH_BENCH_MULTIPLEXED",
                if smoke {
                    &[100, 300]
                } else {
                    &[1000, 10_000, 50_000]
                },
            ),
            per_document: env_list(
                "PAYWATCH_BENCH_PER_DOCUMENT",
                if smoke { &[50, 100] } else { &[1000, 5000] },
            ),
            startup: env_usize("PAYWATCH_BENCH_STARTUP", d(10_000, 200)),
            floor_samples: env_usize("PAYWATCH_BENCH_FLOOR_SAMPLES", d(300, 30)).max(2),
            failover: env_usize("PAYWATCH_BENCH_FAILOVER", d(10_000, 50)),
            lease: std::env::var("PAYWATCH_BENCH_LEASE")
                .unwrap_or_else(|_| if smoke { "2s" } else { "10s" }.to_owned()),
        };
        (sizes, smoke)
    }
}

/// The phases `PAYWATCH_BENCH_PHASES` asks for (all when unset): for studying one figure
/// without waiting for the others. The floors are always measured.
struct Phases(Option<Vec<String>>);

impl Phases {
    const ALL: [&'static str; 5] = ["latency", "throughput", "startup", "memory", "postgres"];

    fn from_env() -> Phases {
        let Ok(text) = std::env::var("PAYWATCH_BENCH_PHASES") else {
            return Phases(None);
        };
        let names: Vec<String> = text
            .split(',')
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        for name in &names {
            assert!(
                Phases::ALL.contains(&name.as_str()),
                "PAYWATCH_BENCH_PHASES: '{name}' is not one of {}",
                Phases::ALL.join(", ")
            );
        }
        Phases(Some(names))
    }

    fn runs(&self, phase: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == phase))
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

#[derive(Clone, Copy, Default)]
struct Spread {
    p50: f64,
    p99: f64,
    max: f64,
    count: usize,
}

/// p50/p99/max in milliseconds.
fn spread(samples: &[Duration]) -> Spread {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let index = ((ms.len() - 1) as f64 * p).round() as usize;
        ms[index.min(ms.len() - 1)]
    };
    Spread {
        p50: at(0.5),
        p99: at(0.99),
        max: ms.last().copied().unwrap_or(f64::NAN),
        count: ms.len(),
    }
}

/// Whether smaller or larger is better (and so how the multiple of the floor is taken).
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

struct Row {
    figure: String,
    value: f64,
    unit: &'static str,
    better: Better,
    floor: Option<f64>,
    target: Option<f64>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(
        &mut self,
        figure: impl Into<String>,
        value: f64,
        unit: &'static str,
        better: Better,
        floor: Option<f64>,
        target: Option<f64>,
    ) {
        let row = Row {
            figure: figure.into(),
            value,
            unit,
            better,
            floor,
            target,
        };
        println!("  {}", row.line());
        self.rows.push(row);
    }

    fn latency(&mut self, what: &str, spread: Spread, floor: f64, targets: [Option<f64>; 3]) {
        let n = spread.count;
        let [p50, p99, max] = targets;
        self.add(
            format!("{what} p50 (n={n})"),
            spread.p50,
            "ms",
            Better::Lower,
            Some(floor),
            p50,
        );
        self.add(
            format!("{what} p99"),
            spread.p99,
            "ms",
            Better::Lower,
            Some(floor),
            p99,
        );
        self.add(
            format!("{what} max"),
            spread.max,
            "ms",
            Better::Lower,
            Some(floor),
            max,
        );
    }

    fn print_table(&self) {
        println!();
        println!("| figure | value | floor | × floor | target | met |");
        println!("|---|---:|---:|---:|---:|:---:|");
        for row in &self.rows {
            println!("{}", row.line());
        }
    }
}

fn number(value: f64) -> String {
    if !value.is_finite() {
        "—".into()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

impl Row {
    fn line(&self) -> String {
        let floor = self
            .floor
            .map_or_else(|| "—".into(), |f| format!("{} {}", number(f), self.unit));
        // The multiple says how many times worse than the floor: value ÷ floor for times and
        // sizes, floor ÷ value for rates.
        let multiple = self.floor.map_or_else(
            || "—".into(),
            |f| match self.better {
                Better::Lower => format!("×{}", number(self.value / f)),
                Better::Higher => format!("×{}", number(f / self.value)),
            },
        );
        let (target, met) = match self.target {
            None => ("—".into(), "—"),
            Some(t) => {
                let met = match self.better {
                    Better::Lower => self.value <= t,
                    Better::Higher => self.value >= t,
                };
                let sign = if self.better == Better::Lower {
                    "≤"
                } else {
                    "≥"
                };
                (
                    format!("{sign} {} {}", number(t), self.unit),
                    if met { "yes" } else { "**no**" },
                )
            }
        };
        format!(
            "| {} | {} {} | {floor} | {multiple} | {target} | {met} |",
            self.figure,
            number(self.value),
            self.unit
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Observing "transition committed" in this process

/// When each checkout's PAID transition was committed, as seen by [`PaidObserver`].
fn paid_seen() -> &'static Mutex<HashMap<String, Instant>> {
    static SEEN: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A tracing layer that listens only to the verifier's operator line (`paywatch::payment`),
/// which is logged right after the ledger commit of a transition returns, and notes when each
/// `PAID checkout=…` line arrived. Its filter (in `main`) lets only that target through.
struct PaidObserver;

const PAYMENT_TARGET: &str = "paywatch::payment";

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PaidObserver {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let at = Instant::now();
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if let Some(rest) = message.0.strip_prefix("PAID checkout=")
            && let Some(id) = rest.split(' ').next()
            && let Ok(mut seen) = paid_seen().lock()
        {
            seen.entry(id.to_owned()).or_insert(at);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The time-stamping hook: this same executable, run as `<bench> --hook-stamp <file>`

/// If run as the hook, appends "<checkout id> <realtime ns at start>" to the file and exits.
fn hook_stamp_mode() {
    let started = SystemTime::now();
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new("--hook-stamp")) {
        return;
    }
    let nanos = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let checkout = std::env::var("PAYWATCH_CHECKOUT_ID").unwrap_or_default();
    let code = match args.next() {
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut file| file.write_all(format!("{checkout} {nanos}\n").as_bytes()));
            // The event arrives on stdin; read it so the dispatcher's write never meets a
            // closed pipe.
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            i32::from(written.is_err())
        }
        None => 2,
    };
    std::process::exit(code);
}

fn realtime_nanos(at: SystemTime) -> i128 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Set-up helpers

struct Hook {
    command: Vec<String>,
    /// A URL hook instead (issue 24): POST to this loopback receiver, signed.
    url: Option<String>,
}

/// The URL hooks' signing secret (any valid one: the receiver does not check it).
const BENCH_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A URL hook's receiver on loopback, in this process: HTTP/1.1 keep-alive (axum), answers
/// 204, and notes when each checkout's event arrived (realtime, like the command hook's stamp).
struct Receiver {
    url: String,
    /// checkout id -> realtime nanos of the first request for it.
    arrived: std::sync::Arc<Mutex<HashMap<String, i128>>>,
    /// Requests received.
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    async fn start() -> Receiver {
        type Shared = (
            std::sync::Arc<Mutex<HashMap<String, i128>>>,
            std::sync::Arc<std::sync::atomic::AtomicUsize>,
        );
        async fn receive(
            axum::extract::State((arrived, count)): axum::extract::State<Shared>,
            body: axum::body::Bytes,
        ) -> axum::http::StatusCode {
            let at = realtime_nanos(SystemTime::now());
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(id) = event["checkout_id"].as_str()
            {
                arrived
                    .lock()
                    .expect("receiver lock")
                    .entry(id.to_owned())
                    .or_insert(at);
            }
            axum::http::StatusCode::NO_CONTENT
        }
        let arrived = std::sync::Arc::new(Mutex::new(HashMap::new()));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state((arrived.clone(), count.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{addr}/paywatch"),
            arrived,
            count,
        }
    }

    fn hook(&self) -> Hook {
        Hook {
            command: Vec::new(),
            url: Some(self.url.clone()),
        }
    }

    /// Waits until every id's event arrived; returns change-to-arrival latencies.
    async fn latencies(&self, ids: &[CheckoutId], paced: &Paced) -> Vec<Duration> {
        let started = Instant::now();
        loop {
            let arrived = self.arrived.lock().expect("receiver lock").clone();
            if ids.iter().all(|id| arrived.contains_key(id.as_str())) {
                return ids
                    .iter()
                    .zip(&paced.changed)
                    .map(|(id, (_, at))| {
                        let nanos = (arrived[id.as_str()] - realtime_nanos(*at)).max(0);
                        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
                    })
                    .collect();
            }
            assert!(
                started.elapsed() < STRAGGLER_LIMIT,
                "{} of {} URL hook events arrived after {STRAGGLER_LIMIT:?}",
                arrived.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The daemon's config for one phase, its ledger the SQLite file `ledger`, logging warnings.
fn write_config(
    dir: &Path,
    ledger: &Path,
    sandbox: &Sandbox,
    mode: &str,
    hook: Option<&Hook>,
) -> PathBuf {
    let ledger_section = format!("[ledger]\npath = \"{}\"\n", ledger.display());
    process::write_config(
        dir,
        &config_text(&ledger_section, sandbox, mode, hook, "warn"),
    )
}

/// The config of a daemon whose ledger is the PostgreSQL database at `url`, holding the
/// ledger's lease for `lease` per renewal, multiplexed, no hook, logging at `level`; written
/// as `dir/name`.
fn write_pg_config(
    dir: &Path,
    name: &str,
    url: &str,
    lease: &str,
    sandbox: &Sandbox,
    level: &str,
) -> PathBuf {
    let ledger_section = format!("[ledger]\nurl = \"{url}\"\n[ha]\nlease = \"{lease}\"\n");
    process::write_config_named(
        dir,
        name,
        &config_text(&ledger_section, sandbox, "multiplexed", None, level),
    )
}

/// A phase's config text after `ledger_section` (`[ledger]`, and `[ha]` on PostgreSQL).
/// Discovery is off: every phase shares one sandbox, and a daemon discovering would track (and
/// watch) the other phases' checkouts too, measuring something else than the phase's own set.
/// Its cost is one search per interval.
fn config_text(
    ledger_section: &str,
    sandbox: &Sandbox,
    mode: &str,
    hook: Option<&Hook>,
    level: &str,
) -> String {
    let mut text = format!(
        "{ledger_section}[paymennt]\nbase_url = \"{}\"\napi_key = \"{}\"\napi_secret = \"{}\"\nconcurrency = 16\n\
         [firestore]\nendpoint = \"{}\"\nstream_mode = \"{mode}\"\n[reconcile]\ninterval = \"1h\"\n[log]\nlevel = \"{level}\"\n\
         [discovery]\nenabled = false\n",
        sandbox.api_base_url(),
        sandbox.api_key(),
        sandbox.api_secret(),
        sandbox.firestore_endpoint()
    );
    if let Some(Hook { url: Some(url), .. }) = hook {
        text.push_str(&format!(
            "[[hooks]]\nname = \"bench\"\nurl = \"{url}\"\nsecret = \"{BENCH_SECRET}\"\nstatuses = [\"PAID\"]\n"
        ));
    } else if let Some(hook) = hook {
        let argv: Vec<String> = hook.command.iter().map(|a| format!("{a:?}")).collect();
        text.push_str(&format!(
            "[[hooks]]\nname = \"bench\"\ncommand = [{}]\nstatuses = [\"PAID\"]\n",
            argv.join(", ")
        ));
    }
    text
}

/// Creates `count` new payment links in the sandbox and tracks them in `ledger`.
async fn create_tracked(
    sandbox: &Sandbox,
    ledger: &Ledger,
    first: usize,
    count: usize,
) -> Vec<CheckoutId> {
    let mut ids = Vec::with_capacity(count);
    for n in first..first + count {
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
        ledger
            .track(&facts, TrackedVia::Track)
            .await
            .expect("track");
        ids.push(facts.id);
    }
    ids
}

/// Tracks checkouts the sandbox already has in `ledger`.
async fn track_existing(sandbox: &Sandbox, ledger: &Ledger, ids: &[CheckoutId]) {
    for id in ids {
        let facts = sandbox
            .state()
            .checkout(id)
            .expect("sandbox checkout")
            .facts()
            .expect("facts");
        ledger
            .track(&facts, TrackedVia::Track)
            .await
            .expect("track");
    }
}

/// A ledger of `count` new checkouts, built in `scratch` (tmpfs: no fsync per track) and then
/// copied to `dest`, where the daemon under test will commit to it.
async fn ledger_on_disk(
    sandbox: &Sandbox,
    scratch: &Path,
    dest: &Path,
    first: usize,
    count: usize,
) -> Vec<CheckoutId> {
    let build = tempfile::tempdir_in(scratch).expect("scratch dir");
    let built = build.path().join("paywatch.db");
    let ids = {
        let ledger = Ledger::open(&built).await.expect("scratch ledger");
        create_tracked(sandbox, &ledger, first, count).await
    };
    // The last connection closed: SQLite has checkpointed the WAL into the file.
    std::fs::copy(&built, dest).expect("ledger copied");
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", built.display()));
        if side.exists() {
            std::fs::copy(&side, format!("{}{suffix}", dest.display())).expect("copied");
        }
    }
    ids
}

/// Waits until the sandbox has answered no Get Checkout for any of `ids` for 500 ms: the start-up
/// sweep and the re-verifications the first Listen snapshots cause are over. Returns the time.
async fn settle(sandbox: &Sandbox, ids: &[CheckoutId]) -> Duration {
    settle_ledger(sandbox, ids, None).await
}

/// [`settle`], and also no commit to `ledger` for 500 ms: a daemon restarted with resume
/// tokens makes no Get Checkout, but its streams are still catching up (each stream's targets
/// CURRENT, their tokens saved) for a while, and a change made meanwhile measures that.
async fn settle_ledger(sandbox: &Sandbox, ids: &[CheckoutId], ledger: Option<&Ledger>) -> Duration {
    settle_with(sandbox, ids, async || match ledger {
        Some(ledger) => ledger.data_version().await.expect("data_version"),
        None => 0,
    })
    .await
}

/// [`settle`], and also `version` (a number that changes with the ledger's writes) unchanged
/// for 500 ms. Returns the time taken.
async fn settle_with(
    sandbox: &Sandbox,
    ids: &[CheckoutId],
    mut version: impl AsyncFnMut() -> i64,
) -> Duration {
    let started = Instant::now();
    let calls = || {
        ids.iter()
            .map(|id| sandbox.state().get_checkout_calls(id))
            .sum::<u64>()
    };
    let mut last = (calls(), version().await);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = (calls(), version().await);
        if now == last {
            return started.elapsed();
        }
        last = now;
        assert!(
            started.elapsed() < PHASE_LIMIT,
            "Get Checkout calls still going on after {PHASE_LIMIT:?}"
        );
    }
}

/// Waits until `done` holds for every id, checking each in turn (cheap: one read per id plus
/// one per poll). Returns the time taken.
async fn wait_each(
    what: &str,
    ids: &[CheckoutId],
    limit: Duration,
    mut done: impl AsyncFnMut(&CheckoutId) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut next = 0;
    while next < ids.len() {
        if done(&ids[next]).await {
            next += 1;
            continue;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: {} of {} done after {limit:?}",
            next,
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

async fn status_of(ledger: &Ledger, id: &CheckoutId) -> Option<String> {
    ledger
        .checkout(id)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.status)
        .map(|status| status.as_str().to_owned())
}

fn find_program(name: &str) -> String {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path.display().to_string();
        }
    }
    panic!("'{name}' not found in /usr/bin, /bin or /usr/local/bin");
}

// ---------------------------------------------------------------------------------------------
// The machine

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|rest| rest.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("machine: {cores} cores ({model}), memory {total}");
    println!("loadavg at start: {}", loadavg());
}

// ---------------------------------------------------------------------------------------------
// 6. The floor

struct Floors {
    commit: Spread,
    commit_paced: Spread,
    spawn: Spread,
    http: Spread,
    listen: Spread,
}

impl Floors {
    /// The least a change can take to reach the ledger: the Listen message, one Get Checkout,
    /// one commit.
    fn change_to_ledger(&self) -> f64 {
        self.listen.p50 + self.http.p50 + self.commit_paced.p50
    }
}

async fn floors(sandbox: &Sandbox, disk: &Path, samples: usize) -> Floors {
    println!("\n## floor (n={samples} each)");
    // One SQLite commit with the ledger's settings: WAL, synchronous=FULL, one row per commit.
    let file = tempfile::tempdir_in(disk).expect("dir");
    let connection = rusqlite::Connection::open(file.path().join("floor.db")).expect("sqlite");
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
        )
        .expect("schema");
    // Steady state, as in a running ledger: the WAL file already has its size and is rewritten
    // from the start after a checkpoint, so a commit does not grow the file (growing it costs
    // a metadata flush on top of the data flush).
    connection
        .execute_batch(
            "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000)
             INSERT INTO rows (body) SELECT hex(randomblob(256)) FROM n; COMMIT;",
        )
        .expect("warm-up");
    let checkpoint: (i64, i64, i64) = connection
        .query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .expect("checkpoint");
    assert_eq!(checkpoint.0, 0, "the floor's WAL checkpoint was blocked");
    // Back to back (what bounds throughput), then one every 10 ms (what a change at 100/s
    // meets: on ext4 a commit right after another also pays for a journal commit).
    let commit_once = |n: usize| {
        let started = Instant::now();
        connection
            .execute(
                "INSERT INTO rows (body) VALUES (?1)",
                [format!("row {n} of the floor")],
            )
            .expect("insert");
        started.elapsed()
    };
    let mut commits = Vec::with_capacity(samples);
    for n in 0..samples + 5 {
        let took = commit_once(n);
        if n >= 5 {
            commits.push(took);
        }
    }
    let mut paced_commits = Vec::with_capacity(samples);
    for n in 0..samples {
        tokio::time::sleep(Duration::from_millis(10)).await;
        paced_commits.push(commit_once(n));
    }
    drop(connection);
    let commit = spread(&commits);
    print_floor(
        "SQLite commit (WAL, synchronous=FULL), back to back",
        commit,
    );
    let commit_paced = spread(&paced_commits);
    print_floor("SQLite commit, one every 10 ms", commit_paced);
    // For comparison, not a floor: the ledger's own commit of one tracked checkout.
    let ledger = Ledger::open(&file.path().join("ledger.db"))
        .await
        .expect("ledger");
    let mut tracks = Vec::with_capacity(samples);
    for n in 0..samples {
        let request = LinkRequest {
            request_id: format!("FLOOR-{n}-r1"),
            order_id: format!("FLOOR-{n}"),
            description: "floor".into(),
            currency: "AED".into(),
            amount: JsonDecimal("1.00".parse().expect("decimal")),
            ..LinkRequest::default()
        };
        let checkout = sandbox.state().create_link(&request).await.expect("link");
        let facts = checkout.facts().expect("facts");
        let started = Instant::now();
        ledger
            .track(&facts, TrackedVia::Track)
            .await
            .expect("track");
        tracks.push(started.elapsed());
    }
    print_floor("(not a floor) Ledger::track, one commit", spread(&tracks));

    // One spawn and wait of a trivial process.
    let true_program = find_program("true");
    let mut spawns = Vec::with_capacity(samples);
    for n in 0..samples + 3 {
        let started = Instant::now();
        let status = tokio::process::Command::new(&true_program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("spawn true");
        assert!(status.success(), "true failed");
        if n >= 3 {
            spawns.push(started.elapsed());
        }
    }
    let spawn = spread(&spawns);
    print_floor("spawn + wait of `true`", spawn);

    // One loopback HTTP round trip to the sandbox API: Get Checkout, kept-alive connection.
    let setup = tempfile::tempdir().expect("dir");
    let config = write_config(
        setup.path(),
        &setup.path().join("unused.db"),
        sandbox,
        "multiplexed",
        None,
    );
    let settings = Settings::load_with_env(Some(&config), Vec::new()).expect("settings");
    let client = Client::from_settings(&settings.paymennt).expect("client");
    let scratch_ledger = Ledger::open_in_memory().expect("ledger");
    let id = create_tracked(sandbox, &scratch_ledger, 900_000_000, 1)
        .await
        .pop()
        .expect("one checkout");
    let mut trips = Vec::with_capacity(samples);
    for n in 0..samples + 10 {
        let started = Instant::now();
        client
            .get_checkout(&id, VerifyTicket::new(n as i64 + 1))
            .await
            .expect("get checkout");
        if n >= 10 {
            trips.push(started.elapsed());
        }
    }
    let http = spread(&trips);
    print_floor("HTTP round trip (Get Checkout)", http);

    // One gRPC message on a Listen stream: document committed -> DocumentChange received.
    let document = sandbox
        .state()
        .location(&id)
        .expect("location")
        .document_name();
    let floor_document = match document.rsplit_once('/') {
        Some((collection, _)) => format!("{collection}/bench-floor"),
        None => panic!("document name '{document}' has no collection"),
    };
    let mut grpc = FirestoreClient::connect(sandbox.firestore_endpoint())
        .await
        .expect("grpc connects");
    let (requests, receiver) = mpsc::channel(4);
    let mut responses = grpc
        .listen(ReceiverStream::new(receiver))
        .await
        .expect("listen")
        .into_inner();
    let put = |n: i64| {
        let fields = BTreeMap::from([(
            "n".to_owned(),
            Value {
                value_type: Some(ValueType::IntegerValue(n)),
            },
        )]);
        sandbox.documents().put_document(&floor_document, &fields);
    };
    put(0);
    requests
        .send(ListenRequest {
            database: sandbox.database_name(),
            target_change: Some(RequestedChange::AddTarget(Target {
                target_id: 1,
                target_type: Some(TargetType::Documents(DocumentsTarget {
                    documents: vec![floor_document.clone()],
                })),
                ..Target::default()
            })),
            ..ListenRequest::default()
        })
        .await
        .expect("add target");
    // The initial state: wait for the first document, then let the markers pass.
    next_document(&mut responses).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut messages = Vec::with_capacity(samples);
    for n in 1..=samples as i64 + 5 {
        let started = Instant::now();
        put(n);
        next_document(&mut responses).await;
        if n > 5 {
            messages.push(started.elapsed());
        }
    }
    drop(requests);
    let listen = spread(&messages);
    print_floor("Listen message (commit -> DocumentChange)", listen);
    Floors {
        commit,
        commit_paced,
        spawn,
        http,
        listen,
    }
}

async fn next_document(
    responses: &mut tonic::Streaming<gcloud_sdk::google::firestore::v1::ListenResponse>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, responses.message())
            .await
            .expect("a Listen message within 10 s")
            .expect("no stream error")
            .expect("stream open");
        if let Some(ResponseType::DocumentChange(_)) = message.response_type {
            return;
        }
    }
}

fn print_floor(what: &str, s: Spread) {
    println!(
        "  {what}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        s.p50, s.p99, s.max
    );
}

// ---------------------------------------------------------------------------------------------
// 1-2. Latency, open loop, in this process

struct InProcess {
    controls: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_in_process(config: &Path) -> InProcess {
    let settings = Settings::load_with_env(Some(config), Vec::new()).expect("settings");
    let (controls, receiver) = mpsc::channel(4);
    let (sender, mut status) = watch::channel(DaemonStatus::default());
    let options = RunOptions {
        config_path: Some(config.to_path_buf()),
        log: LogHandle::detached(),
        status: Some(sender),
        notifier: Notifier::disabled(),
        http_addr: None,
        metrics: paywatch::metrics::Metrics::new(),
    };
    let task = tokio::spawn(daemon::run(settings, receiver, options));
    tokio::time::timeout(PHASE_LIMIT, status.wait_for(|s| s.ready))
        .await
        .expect("daemon ready in time")
        .expect("daemon running");
    InProcess { controls, task }
}

impl InProcess {
    async fn stop(self) {
        let _ = self.controls.send(Control::Shutdown).await;
        let _ = tokio::time::timeout(PHASE_LIMIT, self.task).await;
    }
}

/// When each change was made: monotonic (for the ledger) and realtime (for the hook).
struct Paced {
    changed: Vec<(Instant, SystemTime)>,
    /// The most a change started behind its schedule.
    max_lag: Duration,
}

/// Pays `ids` open-loop: change i is due at start + i / rate, whatever happened to the ones
/// before (a late change does not delay the schedule; it is counted in `max_lag`).
async fn paced(sandbox: &Sandbox, ids: &[CheckoutId], rate: f64) -> Paced {
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut changed = Vec::with_capacity(ids.len());
    let mut max_lag = Duration::ZERO;
    for (i, id) in ids.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        let at = (Instant::now(), SystemTime::now());
        sandbox.state().pay(id).await.expect("pay");
        changed.push(at);
    }
    Paced { changed, max_lag }
}

/// Waits for every id's PAID commit to be observed; returns change-to-ledger latencies.
async fn ledger_latencies(ids: &[CheckoutId], paced: &Paced) -> Vec<Duration> {
    let started = Instant::now();
    loop {
        let seen = paid_seen().lock().expect("observer lock").clone();
        if ids.iter().all(|id| seen.contains_key(id.as_str())) {
            return ids
                .iter()
                .zip(&paced.changed)
                .map(|(id, (at, _))| seen[id.as_str()].saturating_duration_since(*at))
                .collect();
        }
        let missing = ids
            .iter()
            .filter(|id| !seen.contains_key(id.as_str()))
            .count();
        assert!(
            started.elapsed() < STRAGGLER_LIMIT,
            "{missing} of {} PAID transitions not seen after {STRAGGLER_LIMIT:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for every id's hook to have stamped its start; returns change-to-hook latencies.
async fn hook_latencies(stamps: &Path, ids: &[CheckoutId], paced: &Paced) -> Vec<Duration> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(stamps).unwrap_or_default();
        let mut by_id: HashMap<&str, i128> = HashMap::new();
        for line in text.lines() {
            if let Some((id, nanos)) = line.split_once(' ')
                && let Ok(nanos) = nanos.parse::<i128>()
            {
                by_id.entry(id).or_insert(nanos);
            }
        }
        if ids.iter().all(|id| by_id.contains_key(id.as_str())) {
            return ids
                .iter()
                .zip(&paced.changed)
                .map(|(id, (_, at))| {
                    let nanos = (by_id[id.as_str()] - realtime_nanos(*at)).max(0);
                    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
                })
                .collect();
        }
        assert!(
            started.elapsed() < STRAGGLER_LIMIT,
            "{} of {} hooks stamped after {STRAGGLER_LIMIT:?}",
            by_id.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn latency(
    sandbox: &Sandbox,
    sizes: &Sizes,
    disk: &Path,
    scratch: &Path,
    floors: &Floors,
    report: &mut Report,
) {
    let total = sizes.at_100 + sizes.at_1000 + 2 * sizes.hook_changes;
    println!(
        "\n## change-to-ledger and change-to-hook (daemon in this process, ledger on disk, {total} checkouts watched, multiplexed)"
    );
    let dir = tempfile::tempdir_in(disk).expect("dir");
    let db = dir.path().join("paywatch.db");
    let ids = ledger_on_disk(sandbox, scratch, &db, 0, total).await;
    let ledger = Ledger::open(&db).await.expect("ledger");
    let (at_100, rest) = ids.split_at(sizes.at_100);
    let (at_1000, rest) = rest.split_at(sizes.at_1000);
    let (with_hook, with_url) = rest.split_at(sizes.hook_changes);

    let config = write_config(dir.path(), &db, sandbox, "multiplexed", None);
    let running = start_in_process(&config).await;
    wait_each("initial verification", &ids, PHASE_LIMIT, async |id| {
        status_of(&ledger, id).await.is_some()
    })
    .await;
    let quiet = settle_ledger(sandbox, &ids, Some(&ledger)).await;
    println!(
        "  no Get Checkout and no ledger commit for 500 ms after {:.1} s: start-up work done",
        quiet.as_secs_f64()
    );
    let floor = floors.change_to_ledger();
    for (rate, chunk, targets) in [
        (100.0, at_100, [Some(1.5), Some(4.0), None]),
        (1000.0, at_1000, [None, Some(10.0), None]),
    ] {
        let paced = paced(sandbox, chunk, rate).await;
        let latencies = ledger_latencies(chunk, &paced).await;
        println!(
            "  at {rate}/s: schedule lag max {:.2} ms",
            paced.max_lag.as_secs_f64() * 1e3
        );
        report.latency(
            &format!("change→ledger @{rate}/s"),
            spread(&latencies),
            floor,
            targets,
        );
        settle_ledger(sandbox, &ids, Some(&ledger)).await;
    }
    running.stop().await;

    // The same ledger, now with a hook that stamps its own start.
    let stamps = dir.path().join("hook-stamps");
    let exe = std::env::current_exe().expect("own executable");
    let hook = Hook {
        command: vec![
            exe.display().to_string(),
            "--hook-stamp".into(),
            stamps.display().to_string(),
        ],
        url: None,
    };
    let config = write_config(dir.path(), &db, sandbox, "multiplexed", Some(&hook));
    let running = start_in_process(&config).await;
    let quiet = settle_ledger(sandbox, &ids, Some(&ledger)).await;
    println!(
        "  restarted with a hook: no Get Checkout and no ledger commit for 500 ms after {:.1} s",
        quiet.as_secs_f64()
    );
    let paced = paced(sandbox, with_hook, 100.0).await;
    let to_ledger = ledger_latencies(with_hook, &paced).await;
    let to_hook = hook_latencies(&stamps, with_hook, &paced).await;
    report.latency(
        "change→ledger @100/s, hook on",
        spread(&to_ledger),
        floor,
        [None, None, None],
    );
    report.latency(
        "change→hook start @100/s",
        spread(&to_hook),
        floor + floors.spawn.p50,
        [None, Some(6.0), None],
    );
    running.stop().await;

    // Again with a URL hook (issue 24): change to the signed POST's arrival at a loopback
    // keep-alive receiver. Checkouts of their own, paid at 100/s.
    let receiver = Receiver::start().await;
    let config = write_config(
        dir.path(),
        &db,
        sandbox,
        "multiplexed",
        Some(&receiver.hook()),
    );
    let running = start_in_process(&config).await;
    let quiet = settle_ledger(sandbox, &ids, Some(&ledger)).await;
    println!(
        "  restarted with a URL hook: no Get Checkout and no ledger commit for 500 ms after {:.1} s",
        quiet.as_secs_f64()
    );
    let url_paced = self::paced(sandbox, with_url, 100.0).await;
    let to_url = receiver.latencies(with_url, &url_paced).await;
    report.latency(
        "change→URL hook arrival @100/s",
        spread(&to_url),
        floor + floors.http.p50,
        [None, Some(5.0), None],
    );
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Child daemons: throughput, memory, start-up

struct ChildDaemon {
    process: Process,
    notify: UnixDatagram,
    spawned: Instant,
    _socket_dir: tempfile::TempDir,
}

fn spawn_daemon(config: &Path) -> ChildDaemon {
    spawn_child(config, None, false)
}

/// [`spawn_daemon`], its log (stderr) kept for [`Process::lines`].
fn spawn_daemon_logged(config: &Path) -> ChildDaemon {
    spawn_child(config, None, true)
}

/// Where `PAYWATCH_BENCH_HEAPTRACK` asks the memory runs' heap to be recorded, if it does.
fn heaptrack_dir() -> Option<PathBuf> {
    std::env::var_os("PAYWATCH_BENCH_HEAPTRACK").map(PathBuf::from)
}

/// `heaptrack`'s preload library: it records every allocation of the child into `output` (raw;
/// `heaptrack_interpret < output | gzip > x.gz`, then `heaptrack_print --print-leaks`).
const HEAPTRACK_PRELOAD: &str = "/usr/lib/heaptrack/libheaptrack_preload.so";

fn spawn_daemon_profiled(config: &Path, heaptrack_output: Option<&Path>) -> ChildDaemon {
    spawn_child(config, heaptrack_output, false)
}

/// Starts `paywatch run` on `config` with a notify socket of its own; under heaptrack when
/// `heaptrack_output` is given; its log kept when `keep_log` (else shown with
/// `PAYWATCH_BENCH_LOG`, or discarded).
fn spawn_child(config: &Path, heaptrack_output: Option<&Path>, keep_log: bool) -> ChildDaemon {
    let socket_dir = tempfile::tempdir().expect("dir");
    let socket_path = socket_dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).expect("notify socket");
    let spawned = Instant::now();
    // `PAYWATCH_BENCH_BIN` runs another build of paywatch as the child (comparing two builds
    // in one sitting, on the same machine state).
    let mut command = paywatch();
    if let Some(program) = std::env::var_os("PAYWATCH_BENCH_BIN") {
        command = command.program(program);
    }
    if let Some(output) = heaptrack_output {
        command = command
            .env("LD_PRELOAD", HEAPTRACK_PRELOAD)
            .env("DUMP_HEAPTRACK_OUTPUT", output);
    }
    // `PAYWATCH_BENCH_LOG` shows the child daemons' logs too (their timestamps give a phase's
    // timeline), except those whose log the bench reads.
    command = match std::env::var("PAYWATCH_BENCH_LOG") {
        _ if keep_log => command,
        Ok(directives) => command.env("RUST_LOG", directives).log_inherited(),
        Err(_) => command.log_discarded(),
    };
    let process = command
        .config(config)
        .env("NOTIFY_SOCKET", &socket_path)
        .run();
    ChildDaemon {
        process,
        notify,
        spawned,
        _socket_dir: socket_dir,
    }
}

impl ChildDaemon {
    fn pid(&self) -> nix::unistd::Pid {
        self.process.pid()
    }

    /// Waits for READY=1 on the notify socket; returns the time since spawn.
    async fn ready(&mut self) -> Duration {
        let mut buffer = vec![0u8; 4096];
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let size = tokio::time::timeout(left, self.notify.recv(&mut buffer))
                .await
                .expect("READY within the phase limit")
                .expect("notify socket");
            let text = String::from_utf8_lossy(&buffer[..size]);
            if text.lines().any(|line| line == "READY=1") {
                return self.spawned.elapsed();
            }
            if let Some(status) = self.process.try_wait() {
                panic!("paywatch run exited before READY: {status}");
            }
        }
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// A `kB` field of /proc/<pid>/status (`VmRSS`, `RssAnon`, `RssFile`).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("process status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }

    /// User + system CPU time so far (from /proc/<pid>/stat, in USER_HZ = 100 ticks per s).
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("process stat");
        let after_name = stat.rsplit_once(") ").map(|(_, rest)| rest).expect("stat");
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| fields[index].parse::<u64>().expect("ticks");
        // Fields 14 and 15 (utime, stime); the slice starts at field 3.
        Duration::from_millis((ticks(11) + ticks(12)) * 10)
    }

    /// SIGTERM, then waits for it to drain and exit (SIGKILL after the phase limit).
    async fn stop(mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        // Still running after the limit: killed as the process is dropped.
        let _ = self.process.wait_exit_within(PHASE_LIMIT).await;
    }
}

/// 3. Sustained throughput: a burst of payments, hooks off, then with a trivial hook.
async fn throughput(
    sandbox: &Sandbox,
    sizes: &Sizes,
    disk: &Path,
    scratch: &Path,
    floors: &Floors,
    report: &mut Report,
) {
    println!("\n## sustained throughput (paywatch run as a child process, ledger on disk)");
    let true_program = find_program("true");
    let receiver = Receiver::start().await;
    let mut first = 1_000_000;
    for (count, hook) in [
        (sizes.throughput, None),
        (
            sizes.hook_deliveries,
            Some(Hook {
                command: vec![true_program.clone()],
                url: None,
            }),
        ),
        (sizes.hook_deliveries, Some(receiver.hook())),
    ] {
        let url_hook = hook.as_ref().is_some_and(|h| h.url.is_some());
        let received_before = receiver.count.load(std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::tempdir_in(disk).expect("dir");
        let db = dir.path().join("paywatch.db");
        let ids = ledger_on_disk(sandbox, scratch, &db, first, count).await;
        first += count;
        let ledger = Ledger::open(&db).await.expect("ledger");
        let config = write_config(dir.path(), &db, sandbox, "multiplexed", hook.as_ref());
        let mut daemon = spawn_daemon(&config);
        daemon.ready().await;
        wait_each("initial verification", &ids, PHASE_LIMIT, async |id| {
            status_of(&ledger, id).await.is_some()
        })
        .await;
        settle(sandbox, &ids).await;
        let cpu_before = daemon.cpu();
        let started = Instant::now();
        for id in &ids {
            sandbox.state().pay(id).await.expect("pay");
        }
        let paid_in = started.elapsed();
        wait_each("burst recorded", &ids, PHASE_LIMIT, async |id| {
            status_of(&ledger, id).await.as_deref() == Some("PAID")
        })
        .await;
        let mut elapsed = started.elapsed();
        if hook.is_some() {
            let limit = Instant::now() + PHASE_LIMIT;
            loop {
                let counts = ledger.counts().await.expect("counts");
                if counts.hooks_pending == 0 {
                    assert_eq!(counts.hooks_dead, 0, "hook deliveries died");
                    break;
                }
                assert!(Instant::now() < limit, "hooks still pending");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            elapsed = started.elapsed();
        }
        let cpu = daemon.cpu().saturating_sub(cpu_before);
        let rate = count as f64 / elapsed.as_secs_f64();
        println!(
            "  {count} payments made in {:.0} ms; all done in {:.0} ms; daemon CPU {:.0} ms",
            paid_in.as_secs_f64() * 1e3,
            elapsed.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e3
        );
        if hook.is_none() {
            report.add(
                format!("verified transitions/s, hooks off (n={count})"),
                rate,
                "/s",
                Better::Higher,
                Some(1e3 / floors.http.p50),
                Some(5000.0),
            );
            report.add(
                "CPU per 1,000 transitions, hooks off",
                cpu.as_secs_f64() * 1e3 * 1000.0 / count as f64,
                "ms",
                Better::Lower,
                None,
                None,
            );
        } else if url_hook {
            let received =
                receiver.count.load(std::sync::atomic::Ordering::Relaxed) - received_before;
            assert!(
                received >= count,
                "{received} of {count} URL deliveries arrived"
            );
            report.add(
                format!("URL hook deliveries/s, loopback keep-alive receiver (n={count})"),
                rate,
                "/s",
                Better::Higher,
                Some(1e3 / floors.http.p50),
                Some(3000.0),
            );
            report.add(
                "CPU per 1,000 transitions + URL deliveries",
                cpu.as_secs_f64() * 1e3 * 1000.0 / count as f64,
                "ms",
                Better::Lower,
                None,
                None,
            );
        } else {
            report.add(
                format!("hook deliveries/s, trivial hook (n={count})"),
                rate,
                "/s",
                Better::Higher,
                Some(1e3 / floors.spawn.p50),
                Some(1000.0),
            );
            report.add(
                "CPU per 1,000 transitions + deliveries",
                cpu.as_secs_f64() * 1e3 * 1000.0 / count as f64,
                "ms",
                Better::Lower,
                None,
                None,
            );
        }
        daemon.stop().await;
    }
}

struct MemoryPoint {
    mode: &'static str,
    checkouts: usize,
    rss_kib: u64,
    ready: Duration,
    verified: Duration,
}

/// Runs `paywatch run` on `config` until READY and every id verified, lets the first-snapshot
/// burst settle, and reads its resident memory.
/// With `PAYWATCH_BENCH_HEAPTRACK=<dir>` the child runs under heaptrack's preload library, its
/// record written to `<dir>/<label>.raw`, and is killed (not drained) once its RSS is read, so
/// the record ends with the heap as it was then: `heaptrack_print --print-leaks` shows it.
async fn measure_daemon(
    sandbox: &Sandbox,
    config: &Path,
    ledger: &Ledger,
    ids: &[CheckoutId],
    label: &str,
) -> (u64, Duration, Duration) {
    let heaptrack_output = heaptrack_dir().map(|dir| dir.join(format!("{label}.raw")));
    let mut daemon = spawn_daemon_profiled(config, heaptrack_output.as_deref());
    let ready = daemon.ready().await;
    wait_each("all checkouts verified", ids, PHASE_LIMIT, async |id| {
        status_of(ledger, id).await.is_some()
    })
    .await;
    let verified = daemon.spawned.elapsed();
    settle(sandbox, ids).await;
    let rss = daemon.rss_kib();
    if ids.is_empty() {
        // The file-backed part is the binary's and libraries' pages the kernel mapped in, which
        // varies with what the page cache holds (fault-around maps cached neighbours too).
        println!(
            "  {label}: RSS {:.1} MiB = anonymous {:.1} MiB + file-backed {:.1} MiB",
            rss as f64 / 1024.0,
            daemon.status_kib("RssAnon") as f64 / 1024.0,
            daemon.status_kib("RssFile") as f64 / 1024.0
        );
    }
    if heaptrack_output.is_some() {
        // heaptrack flushes its record every few milliseconds; let the last of it out.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(daemon);
    } else {
        daemon.stop().await;
    }
    (rss, ready, verified)
}

/// One memory run's ledger and stream mode.
struct MemoryRun<'a> {
    dir: &'a Path,
    db: &'a Path,
    ledger: &'a Ledger,
    mode: &'static str,
}

impl MemoryRun<'_> {
    /// Runs the daemon over `ids`, prints its RSS and bytes per checkout over `idle` (KiB), and
    /// adds the bytes per checkout to `report` with `target` (KiB) when one is given.
    async fn measure(
        &self,
        sandbox: &Sandbox,
        ids: &[CheckoutId],
        idle: u64,
        target: Option<f64>,
        report: &mut Report,
    ) -> MemoryPoint {
        let size = ids.len();
        let config = write_config(self.dir, self.db, sandbox, self.mode, None);
        let label = format!("{}-{size}", self.mode);
        let (rss, ready, verified) =
            measure_daemon(sandbox, &config, self.ledger, ids, &label).await;
        let per = (rss.saturating_sub(idle) * 1024) as f64 / size as f64;
        println!(
            "  {} {size}: RSS {:.1} MiB, {per:.0} bytes per checkout",
            self.mode,
            rss as f64 / 1024.0
        );
        if target.is_some() {
            report.add(
                format!("bytes per watched checkout, {} ({size})", self.mode),
                per / 1024.0,
                "KiB",
                Better::Lower,
                None,
                target,
            );
        }
        MemoryPoint {
            mode: self.mode,
            checkouts: size,
            rss_kib: rss,
            ready,
            verified,
        }
    }
}

/// 4. Memory: idle, then growing numbers of watched checkouts in both stream modes.
async fn memory(sandbox: &Sandbox, sizes: &Sizes, scratch: &Path, report: &mut Report) {
    println!(
        "\n## memory (paywatch run as a child process; ledgers on {})",
        scratch.display()
    );
    let mut points = Vec::new();
    let idle_dir = tempfile::tempdir_in(scratch).expect("dir");
    let idle_db = idle_dir.path().join("paywatch.db");
    let idle_ledger = Ledger::open(&idle_db).await.expect("ledger");
    let idle_config = write_config(idle_dir.path(), &idle_db, sandbox, "multiplexed", None);
    let (idle, ready, verified) =
        measure_daemon(sandbox, &idle_config, &idle_ledger, &[], "idle").await;
    report.add(
        "RSS idle (no checkout)",
        idle as f64 / 1024.0,
        "MiB",
        Better::Lower,
        None,
        Some(15.0),
    );
    points.push(MemoryPoint {
        mode: "—",
        checkouts: 0,
        rss_kib: idle,
        ready,
        verified,
    });

    let mut all: Vec<CheckoutId> = Vec::new();
    let multiplexed_dir = tempfile::tempdir_in(scratch).expect("dir");
    let multiplexed_db = multiplexed_dir.path().join("paywatch.db");
    let multiplexed_ledger = Ledger::open(&multiplexed_db).await.expect("ledger");
    let largest_multiplexed = sizes.multiplexed.iter().copied().max().unwrap_or(0);
    for &size in &sizes.multiplexed {
        if size > all.len() {
            let more = create_tracked(
                sandbox,
                &multiplexed_ledger,
                2_000_000 + all.len(),
                size - all.len(),
            )
            .await;
            all.extend(more);
        }
        let target = (size == largest_multiplexed).then_some(2.0);
        let point = MemoryRun {
            dir: multiplexed_dir.path(),
            db: &multiplexed_db,
            ledger: &multiplexed_ledger,
            mode: "multiplexed",
        };
        let measured = point
            .measure(sandbox, &all[..size], idle, target, report)
            .await;
        points.push(measured);
    }

    let per_document_dir = tempfile::tempdir_in(scratch).expect("dir");
    let per_document_db = per_document_dir.path().join("paywatch.db");
    let per_document_ledger = Ledger::open(&per_document_db).await.expect("ledger");
    let mut tracked = 0;
    let largest_per_document = sizes.per_document.iter().copied().max().unwrap_or(0);
    for &size in &sizes.per_document {
        if size > all.len() {
            let more = create_tracked(
                sandbox,
                &multiplexed_ledger,
                2_000_000 + all.len(),
                size - all.len(),
            )
            .await;
            all.extend(more);
        }
        if size > tracked {
            track_existing(sandbox, &per_document_ledger, &all[tracked..size]).await;
            tracked = size;
        }
        let target = (size == largest_per_document).then_some(8.0);
        let point = MemoryRun {
            dir: per_document_dir.path(),
            db: &per_document_db,
            ledger: &per_document_ledger,
            mode: "per-document",
        };
        let measured = point
            .measure(sandbox, &all[..size], idle, target, report)
            .await;
        points.push(measured);
    }

    println!(
        "\nscaling (RSS read once every checkout was verified and no Get Checkout came for 500 ms):\n"
    );
    println!(
        "| mode | checkouts | RSS | bytes per checkout over idle | READY after | all verified after |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for point in &points {
        let per = if point.checkouts == 0 {
            "—".to_owned()
        } else {
            format!(
                "{:.0}",
                (point.rss_kib.saturating_sub(idle) * 1024) as f64 / point.checkouts as f64
            )
        };
        println!(
            "| {} | {} | {:.1} MiB | {per} | {:.0} ms | {:.0} ms |",
            point.mode,
            point.checkouts,
            point.rss_kib as f64 / 1024.0,
            point.ready.as_secs_f64() * 1e3,
            point.verified.as_secs_f64() * 1e3
        );
    }
}

/// 5. Start-up to every checkout subscribed and verified, then one reconcile sweep over all.
async fn startup(
    sandbox: &Sandbox,
    sizes: &Sizes,
    disk: &Path,
    scratch: &Path,
    floors: &Floors,
    report: &mut Report,
) {
    let count = sizes.startup;
    println!(
        "\n## start-up and reconcile sweep ({count} open checkouts, paywatch run as a child, ledger on disk)"
    );
    let dir = tempfile::tempdir_in(disk).expect("dir");
    let db = dir.path().join("paywatch.db");
    let ids = ledger_on_disk(sandbox, scratch, &db, 3_000_000, count).await;
    let ledger = Ledger::open(&db).await.expect("ledger");
    let config = write_config(dir.path(), &db, sandbox, "multiplexed", None);

    let mut daemon = spawn_daemon(&config);
    let ready = daemon.ready().await;
    wait_each("all checkouts verified", &ids, PHASE_LIMIT, async |id| {
        status_of(&ledger, id).await.is_some()
    })
    .await;
    let verified = daemon.spawned.elapsed();
    let cpu = daemon.cpu();
    println!(
        "  READY after {:.0} ms; all {count} subscribed and verified after {:.0} ms; daemon CPU {:.0} ms",
        ready.as_secs_f64() * 1e3,
        verified.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3
    );
    report.add(
        format!("process start → {count} subscribed and verified"),
        verified.as_secs_f64(),
        "s",
        Better::Lower,
        Some(count as f64 * floors.http.p50 / 1e3),
        Some(2.0),
    );
    let quiet = settle(sandbox, &ids).await;
    let startup_calls: u64 = ids
        .iter()
        .map(|id| sandbox.state().get_checkout_calls(id))
        .sum();
    println!(
        "  start-up made {startup_calls} Get Checkout calls for {count} checkouts; quiet {:.1} s after READY + verified",
        quiet.as_secs_f64()
    );
    daemon.stop().await;

    // Every checkout marked as needing verification: the next start sweeps them all.
    let calls_before: Vec<u64> = ids
        .iter()
        .map(|id| sandbox.state().get_checkout_calls(id))
        .collect();
    ledger.note_changes(&ids).await.expect("marked");
    let mut daemon = spawn_daemon(&config);
    daemon.ready().await;
    let swept_from = Instant::now();
    let mut index = 0;
    wait_each("reconcile sweep", &ids, PHASE_LIMIT, async |id| {
        let done = sandbox.state().get_checkout_calls(id) > calls_before[index];
        if done {
            index += 1;
        }
        done
    })
    .await;
    let swept = swept_from.elapsed();
    settle(sandbox, &ids).await;
    let calls: u64 = ids
        .iter()
        .zip(&calls_before)
        .map(|(id, before)| sandbox.state().get_checkout_calls(id) - before)
        .sum();
    println!(
        "  reconcile sweep over {count}: {calls} Get Checkout calls, every checkout asked within {:.0} ms of READY",
        swept.as_secs_f64() * 1e3
    );
    report.add(
        format!("reconcile sweep over {count} ({calls} calls)"),
        swept.as_secs_f64(),
        "s",
        Better::Lower,
        Some(count as f64 * floors.http.p50 / 1e3),
        None,
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. PostgreSQL: change-to-ledger and throughput beside SQLite's, and what a failover costs

/// A fresh database on this process's throwaway PostgreSQL cluster, opened as an operator's
/// command opens it (no lease needed): the bench tracks checkouts and reads statuses through
/// [`PgLedger::ledger`], and reads what the daemon wrote through [`PgLedger::store`].
struct PgLedger {
    /// The database's URL, for the daemons' configs.
    url: String,
    /// The same store as `ledger`'s, for queries of its own.
    store: PgStore,
    ledger: Ledger,
}

impl PgLedger {
    /// A new, empty database (migrated), or `None` after a skip line when PostgreSQL is not
    /// installed (`CI=true` fails instead: see `cluster.rs`).
    async fn create() -> Option<PgLedger> {
        let url = tokio::task::block_in_place(common::postgres::database)?;
        let settings = LedgerSettings {
            url: Some(Secret::new(url.clone())),
            ..LedgerSettings::default()
        };
        let store = PgStore::open(&settings, Session::Operator)
            .await
            .expect("the bench's database opens");
        Some(PgLedger {
            url,
            ledger: Ledger::postgres(store.clone()),
            store,
        })
    }

    /// A number that changes with every write a daemon makes while settling: the checkouts'
    /// (the ledger's `data_version`) and the saved resume tokens' (which that leaves out).
    async fn version(&self) -> i64 {
        let checkouts = self.ledger.data_version().await.expect("data_version");
        let client = self.store.pool().get().await.expect("a connection");
        let row = client
            .query_one(
                "SELECT count(*) * 1000003
                        + coalesce(sum((extract(epoch FROM updated_at) * 1000)::BIGINT), 0)::BIGINT
                 FROM listen_targets",
                &[],
            )
            .await
            .expect("listen_targets read");
        checkouts.wrapping_add(row.get::<_, i64>(0))
    }

    /// Waits until every one of `ids` is `status` in the ledger and returns how long that took
    /// from `started`. It asks about the first 200 still pending, in the order given (the order
    /// the payments were made in), once every 10 ms, or at once when all of those were done: a
    /// few index lookups a time, not a read per checkout nor a scan of all (the bench must not
    /// load the server it measures).
    async fn wait_all(&self, ids: &[CheckoutId], status: &str, started: Instant) -> Duration {
        const WINDOW: usize = 200;
        let mut pending: Vec<&str> = ids.iter().map(CheckoutId::as_str).collect();
        let client = self.store.pool().get().await.expect("a connection");
        let statement = client
            .prepare("SELECT id FROM checkouts WHERE status = $1 AND id = ANY($2)")
            .await
            .expect("prepare the check");
        while !pending.is_empty() {
            let window: Vec<&str> = pending.iter().take(WINDOW).copied().collect();
            let done: std::collections::HashSet<String> = client
                .query(&statement, &[&status, &window])
                .await
                .expect("check")
                .iter()
                .map(|row| row.get(0))
                .collect();
            pending.retain(|id| !done.contains(*id));
            assert!(
                started.elapsed() < PHASE_LIMIT,
                "{} of {} not {status} after {PHASE_LIMIT:?}",
                pending.len(),
                ids.len()
            );
            if done.len() < window.len() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        started.elapsed()
    }

    /// The order ids of the watched checkouts that have no resume token saved (a daemon taking
    /// over adds their targets afresh, and Firestore's first snapshot of each is verified).
    async fn without_token(&self) -> Vec<String> {
        let client = self.store.pool().get().await.expect("a connection");
        client
            .query(
                "SELECT c.order_id FROM checkouts c
                 LEFT JOIN listen_targets t ON t.checkout_id = c.id
                 WHERE c.watched AND t.checkout_id IS NULL ORDER BY c.order_id",
                &[],
            )
            .await
            .expect("listen_targets read")
            .iter()
            .map(|row| row.get::<_, Option<String>>(0).unwrap_or_default())
            .collect()
    }
}

/// The least a one-row commit to PostgreSQL costs here: a round trip on loopback and the
/// server's commit (this cluster runs with fsync off: no flush), one every 10 ms as a change at
/// 100/s meets it.
async fn pg_commit_floor(pg: &PgLedger, samples: usize) -> Spread {
    let client = pg.store.pool().get().await.expect("a connection");
    client
        .batch_execute("CREATE TABLE bench_floor (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
        .await
        .expect("floor table");
    let insert = client
        .prepare("INSERT INTO bench_floor (body) VALUES ($1)")
        .await
        .expect("prepared insert");
    let mut commits = Vec::with_capacity(samples);
    for n in 0..samples + 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let body = format!("row {n} of the floor");
        let started = Instant::now();
        client.execute(&insert, &[&body]).await.expect("insert");
        if n >= 5 {
            commits.push(started.elapsed());
        }
    }
    spread(&commits)
}

/// User + system CPU time so far of every PostgreSQL server process on this machine (the
/// throwaway cluster's postmaster and backends: `comm` is `postgres`), from /proc.
fn postgres_server_cpu() -> Duration {
    let mut ticks = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime); the slice starts at field 3.
        for index in [11, 12] {
            ticks += fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_millis(ticks * 10)
}

/// The SQLite and PostgreSQL figures of one run side by side (the SQLite ones from the
/// latency and throughput phases, when they ran).
fn print_side_by_side(report: &Report, rows: &[(&str, &str, &str)]) {
    println!("\nSQLite and PostgreSQL in this run:\n");
    println!("| figure | SQLite | PostgreSQL |");
    println!("|---|---:|---:|");
    for (label, sqlite, postgres) in rows {
        let value = |prefix: &str| {
            report
                .rows
                .iter()
                .find(|row| row.figure.starts_with(prefix))
                .map_or_else(
                    || "— (phase not run)".to_owned(),
                    |row| format!("{} {}", number(row.value), row.unit),
                )
        };
        println!("| {label} | {} | {} |", value(sqlite), value(postgres));
    }
}

/// PostgreSQL (phase 7): change-to-ledger at 100/s (daemon in this process) and the hooks-off burst
/// (`paywatch run` as a child), each on a fresh database of the throwaway cluster, then a
/// failover of an active/standby pair. Skipped, with a line saying so, without PostgreSQL.
async fn postgres(sandbox: &Sandbox, sizes: &Sizes, floors: &Floors, report: &mut Report) {
    println!(
        "\n## PostgreSQL ledger (a throwaway cluster on loopback, fsync=off, full_page_writes=off)"
    );
    let Some(pg) = PgLedger::create().await else {
        println!("  skipped: PostgreSQL is not installed (no initdb found)");
        return;
    };
    let commit = pg_commit_floor(&pg, sizes.floor_samples).await;
    print_floor(
        "PostgreSQL commit of one row, one every 10 ms (loopback, fsync=off)",
        commit,
    );
    drop(pg);
    pg_latency(sandbox, sizes, floors, commit, report).await;
    pg_throughput(sandbox, sizes, floors, report).await;
    print_side_by_side(
        report,
        &[
            (
                "change→ledger @100/s p50",
                "change→ledger @100/s p50",
                "change→ledger @100/s on PostgreSQL p50",
            ),
            (
                "change→ledger @100/s p99",
                "change→ledger @100/s p99",
                "change→ledger @100/s on PostgreSQL p99",
            ),
            (
                "verified transitions/s, hooks off",
                "verified transitions/s, hooks off",
                "verified transitions/s on PostgreSQL",
            ),
            (
                "CPU per 1,000 transitions (daemon)",
                "CPU per 1,000 transitions, hooks off",
                "CPU per 1,000 transitions on PostgreSQL",
            ),
        ],
    );
    failover(sandbox, sizes, report).await;
}

/// Change-to-ledger at 100/s with the daemon in this process on a fresh PostgreSQL database:
/// the latency phase's method (the PAID observer) on `sizes.at_100` checkouts of its own.
async fn pg_latency(
    sandbox: &Sandbox,
    sizes: &Sizes,
    floors: &Floors,
    commit: Spread,
    report: &mut Report,
) {
    let Some(pg) = PgLedger::create().await else {
        return;
    };
    let count = sizes.at_100;
    println!(
        "\n  change→ledger at 100/s (daemon in this process, {count} checkouts watched, multiplexed)"
    );
    let ids = create_tracked(sandbox, &pg.ledger, 6_000_000, count).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write_pg_config(dir.path(), "paywatch.toml", &pg.url, "10s", sandbox, "warn");
    let running = start_in_process(&config).await;
    wait_each("initial verification", &ids, PHASE_LIMIT, async |id| {
        status_of(&pg.ledger, id).await.is_some()
    })
    .await;
    let quiet = settle_with(sandbox, &ids, async || pg.version().await).await;
    println!(
        "  no Get Checkout and no ledger write for 500 ms after {:.1} s: start-up work done",
        quiet.as_secs_f64()
    );
    let paced = paced(sandbox, &ids, 100.0).await;
    let latencies = ledger_latencies(&ids, &paced).await;
    println!(
        "  at 100/s: schedule lag max {:.2} ms",
        paced.max_lag.as_secs_f64() * 1e3
    );
    report.latency(
        "change→ledger @100/s on PostgreSQL",
        spread(&latencies),
        floors.listen.p50 + floors.http.p50 + commit.p50,
        [None, Some(10.0), None],
    );
    running.stop().await;
}

/// The hooks-off burst with `paywatch run` as a child on a fresh PostgreSQL database: the
/// throughput phase's method on `sizes.throughput` checkouts of its own.
async fn pg_throughput(sandbox: &Sandbox, sizes: &Sizes, floors: &Floors, report: &mut Report) {
    let Some(pg) = PgLedger::create().await else {
        return;
    };
    let count = sizes.throughput;
    println!("\n  burst of {count} payments, hooks off (paywatch run as a child)");
    let ids = create_tracked(sandbox, &pg.ledger, 7_000_000, count).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write_pg_config(dir.path(), "paywatch.toml", &pg.url, "10s", sandbox, "warn");
    let mut daemon = spawn_daemon(&config);
    daemon.ready().await;
    wait_each("initial verification", &ids, PHASE_LIMIT, async |id| {
        status_of(&pg.ledger, id).await.is_some()
    })
    .await;
    settle_with(sandbox, &ids, async || pg.version().await).await;
    let cpu_before = daemon.cpu();
    let server_before = postgres_server_cpu();
    let started = Instant::now();
    for id in &ids {
        sandbox.state().pay(id).await.expect("pay");
    }
    let paid_in = started.elapsed();
    let elapsed = pg.wait_all(&ids, "PAID", started).await;
    let cpu = daemon.cpu().saturating_sub(cpu_before);
    // The bench's own checks (a few index lookups every 10 ms) are in it too.
    let server = postgres_server_cpu().saturating_sub(server_before);
    println!(
        "  {count} payments made in {:.0} ms; all PAID in the ledger in {:.0} ms; daemon CPU {:.0} ms; \
         PostgreSQL server CPU {:.0} ms (with the bench's checks every 10 ms)",
        paid_in.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3,
        server.as_secs_f64() * 1e3
    );
    report.add(
        format!("verified transitions/s on PostgreSQL, hooks off (n={count})"),
        count as f64 / elapsed.as_secs_f64(),
        "/s",
        Better::Higher,
        Some(1e3 / floors.http.p50),
        Some(2000.0),
    );
    report.add(
        "CPU per 1,000 transitions on PostgreSQL, hooks off",
        cpu.as_secs_f64() * 1e3 * 1000.0 / count as f64,
        "ms",
        Better::Lower,
        None,
        None,
    );
    daemon.stop().await;
}

/// When each thing a failover is made of was first seen, counted from the SIGKILL.
#[derive(Default)]
struct Takeover {
    /// The standby logged `role: active`.
    active: Option<Duration>,
    /// It logged `paywatch is running`.
    running: Option<Duration>,
    /// The payment made right after the kill was PAID in the ledger.
    paid: Option<Duration>,
    /// The last Get Checkout the sandbox answered before the quiet.
    last_call: Option<Duration>,
}

/// The first log line of `daemon` containing `text`, if it has been written.
fn logged(daemon: &ChildDaemon, text: &str) -> Option<String> {
    daemon
        .process
        .lines()
        .into_iter()
        .find(|line| line.contains(text))
}

/// Prints the lines `daemon` logged that mention an ERROR (its errors, and warnings quoting a
/// database error, such as a deadlock it retried), and for a deadlock PostgreSQL detected, the
/// server log's report of it (which statements waited on which).
fn print_errors(who: &str, daemon: &ChildDaemon) {
    let errors: Vec<String> = daemon
        .process
        .lines()
        .into_iter()
        .filter(|line| line.contains("ERROR"))
        .collect();
    for line in &errors {
        println!("  {who} logged: {line}");
    }
    if !errors.iter().any(|line| line.contains("deadlock detected")) {
        return;
    }
    let Some(cluster) = common::postgres::cluster() else {
        return;
    };
    // The server log is `log` in the cluster's data directory (see cluster.rs).
    let log =
        tokio::task::block_in_place(|| cluster.psql("postgres", "SELECT pg_read_file('log')"));
    let lines: Vec<&str> = log.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        if line.contains("ERROR:  deadlock detected") {
            for context in &lines[index..(index + 24).min(lines.len())] {
                println!("  server log: {context}");
            }
        }
    }
}

/// Waits until `daemon` has logged a line containing `text`, within [`PHASE_LIMIT`].
async fn wait_logged(daemon: &mut ChildDaemon, text: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(line) = logged(daemon, text) {
            return line;
        }
        if let Some(status) = daemon.process.try_wait() {
            panic!(
                "paywatch exited ({status}) before logging {text:?}; its log:\n{}",
                daemon.process.log()
            );
        }
        assert!(
            started.elapsed() < PHASE_LIMIT,
            "no log line containing {text:?} after {PHASE_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Failover cost: `sizes.failover` watched checkouts verified by an active `paywatch run`
/// child with a standby child on one PostgreSQL database, both at `sizes.lease`; once quiet
/// the active one is SIGKILLed and one checkout paid at once. Measures, from the kill, when
/// the standby logs `role: active` and `paywatch is running`, when that payment is PAID, and
/// the Get Checkout calls made until quiet again (none for 500 ms).
async fn failover(sandbox: &Sandbox, sizes: &Sizes, report: &mut Report) {
    let Some(pg) = PgLedger::create().await else {
        return;
    };
    let count = sizes.failover.max(1);
    let lease = sizes.lease.as_str();
    println!(
        "\n  failover: {count} watched checkouts, an active and a standby paywatch run, lease {lease}"
    );
    let ids = create_tracked(sandbox, &pg.ledger, 8_000_000, count).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write_pg_config(dir.path(), "paywatch.toml", &pg.url, lease, sandbox, "info");
    let mut active = spawn_daemon_logged(&config);
    wait_logged(&mut active, "role: active").await;
    wait_logged(&mut active, "paywatch is running").await;
    let calls_at_start = sandbox.faults().total_get_checkout_calls();
    let verified = wait_each("initial verification", &ids, PHASE_LIMIT, async |id| {
        status_of(&pg.ledger, id).await.is_some()
    })
    .await;
    let mut standby = spawn_daemon_logged(&config);
    wait_logged(&mut standby, "standby: the ledger's lease is held by").await;
    let quiet = settle_with(sandbox, &ids, async || pg.version().await).await;
    let first_calls = sandbox.faults().total_get_checkout_calls() - calls_at_start;
    let without_token = pg.without_token().await;
    println!(
        "  the active daemon verified all {count} in {:.1} s ({first_calls} Get Checkout calls); \
         quiet {:.1} s later; {} of {count} have a resume token saved",
        verified.as_secs_f64(),
        quiet.as_secs_f64(),
        count - without_token.len()
    );
    if !without_token.is_empty() {
        println!(
            "  without a token at the kill: {}{}",
            without_token[..without_token.len().min(10)].join(", "),
            if without_token.len() > 10 {
                ", ..."
            } else {
                ""
            }
        );
    }

    print_errors("the active daemon", &active);
    let paid_id = &ids[0];
    let calls_before = sandbox.faults().total_get_checkout_calls();
    let killed = Instant::now();
    let ChildDaemon { process, .. } = active;
    tokio::task::block_in_place(|| process.kill_9());
    sandbox.state().pay(paid_id).await.expect("pay");
    let mut seen = Takeover::default();
    let mut last_calls = calls_before;
    let mut last_change = killed;
    loop {
        if seen.active.is_none() && logged(&standby, "role: active").is_some() {
            seen.active = Some(killed.elapsed());
        }
        if seen.running.is_none() && logged(&standby, "paywatch is running").is_some() {
            seen.running = Some(killed.elapsed());
        }
        if seen.paid.is_none() && status_of(&pg.ledger, paid_id).await.as_deref() == Some("PAID") {
            seen.paid = Some(killed.elapsed());
        }
        let calls = sandbox.faults().total_get_checkout_calls();
        if calls != last_calls {
            last_calls = calls;
            last_change = Instant::now();
            seen.last_call = Some(killed.elapsed());
        }
        let quiet_since = last_change.elapsed().min(
            seen.running
                .map_or(Duration::ZERO, |running| killed.elapsed() - running),
        );
        if seen.running.is_some()
            && seen.paid.is_some()
            && quiet_since >= Duration::from_millis(500)
        {
            break;
        }
        if let Some(status) = standby.process.try_wait() {
            panic!(
                "the standby exited ({status}) during the takeover; its log:\n{}",
                standby.process.log()
            );
        }
        assert!(
            killed.elapsed() < PHASE_LIMIT,
            "the takeover was not over after {PHASE_LIMIT:?}; the standby's log:\n{}",
            standby.process.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    print_errors("the new active daemon", &standby);
    let calls = last_calls - calls_before;
    let at = |when: Option<Duration>| when.unwrap_or_default().as_secs_f64();
    if let Some(line) = logged(&standby, "reconciling open checkouts") {
        println!("  the new active daemon's start-up sweep: {line}");
    }
    println!(
        "  after the SIGKILL: role: active at {:.2} s, paywatch is running at {:.2} s, \
         the payment made right after the kill PAID at {:.2} s, last Get Checkout at {:.2} s; \
         {calls} Get Checkout calls for {count} watched checkouts (one is the payment's)",
        at(seen.active),
        at(seen.running),
        at(seen.paid),
        at(seen.last_call)
    );
    report.add(
        format!("failover ({count} watched, lease {lease}): SIGKILL → standby role: active"),
        at(seen.active),
        "s",
        Better::Lower,
        None,
        None,
    );
    report.add(
        format!("failover: SIGKILL → paywatch is running (lease {lease})"),
        at(seen.running),
        "s",
        Better::Lower,
        None,
        None,
    );
    report.add(
        "failover: payment made at the SIGKILL → PAID",
        at(seen.paid),
        "s",
        Better::Lower,
        None,
        None,
    );
    report.add(
        "failover: SIGKILL → last Get Checkout before 500 ms quiet",
        at(seen.last_call.or(seen.running)),
        "s",
        Better::Lower,
        None,
        None,
    );
    report.add(
        format!("failover: Get Checkout calls, kill to quiet ({count} watched)"),
        calls as f64,
        "calls",
        Better::Lower,
        None,
        None,
    );
    standby.stop().await;
}

fn main() {
    hook_stamp_mode();
    // The observer sees only the payment line (a per-layer filter, so the optional log layer
    // can see more); `PAYWATCH_BENCH_LOG` (e.g. `paywatch=info`) prints the in-process daemons'
    // logs on stderr, for finding where a tail comes from.
    let paid = PaidObserver.with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.target() == PAYMENT_TARGET
    }));
    let log = std::env::var("PAYWATCH_BENCH_LOG").ok().map(|directives| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::new(directives))
    });
    tracing_subscriber::registry().with(paid).with(log).init();
    let (sizes, smoke) = Sizes::from_env();
    let phases = Phases::from_env();
    let disk = std::env::var_os("PAYWATCH_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = std::env::var_os("PAYWATCH_BENCH_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() { shm } else { disk.clone() }
        });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "# paywatch pipeline benchmark{}",
        if smoke { " (smoke sizes)" } else { "" }
    );
    print_machine();
    println!(
        "ledgers under test in {}; built in {}",
        disk.display(),
        scratch.display()
    );
    let started = Instant::now();
    runtime.block_on(async {
        let sandbox = Sandbox::start(SandboxOptions::default())
            .await
            .expect("sandbox");
        let mut report = Report::default();
        let floors = floors(&sandbox, &disk, sizes.floor_samples).await;
        if phases.runs("latency") {
            latency(&sandbox, &sizes, &disk, &scratch, &floors, &mut report).await;
        }
        if phases.runs("throughput") {
            throughput(&sandbox, &sizes, &disk, &scratch, &floors, &mut report).await;
        }
        if phases.runs("startup") {
            startup(&sandbox, &sizes, &disk, &scratch, &floors, &mut report).await;
        }
        if phases.runs("memory") {
            memory(&sandbox, &sizes, &scratch, &mut report).await;
        }
        if phases.runs("postgres") {
            postgres(&sandbox, &sizes, &floors, &mut report).await;
        }
        report.print_table();
        println!(
            "\nfloors: change→ledger = Listen message + HTTP round trip + commit one every 10 ms (p50s) = {:.3} ms; \
             change→hook adds one spawn ({:.3} ms); transitions/s ≤ 1 / HTTP round trip (commits left out: see BENCHMARKS.md); deliveries/s ≤ 1 / spawn; \
             start-up and sweep ≥ one HTTP round trip per checkout, serial.",
            floors.change_to_ledger(),
            floors.spawn.p50
        );
        println!(
            "a commit back to back costs {:.3} ms here (p50); the rates and start-up beat that, so it \
             is not their floor.",
            floors.commit.p50
        );
        sandbox.shutdown().await;
    });
    println!("loadavg at end: {}", loadavg());
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
}
