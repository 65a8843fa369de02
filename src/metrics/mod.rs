//! Metrics: the daemon's figures in the Prometheus text format, for `/metrics`.
//!
//! Owns: the metric registry, the name, help text, labels and histogram buckets of every
//! metric, the instrumentation calls the pipeline makes (one line at each place that moves a
//! figure), the process figures, and the exposition ([`Metrics::render`]), given the
//! ledger-derived figures ([`LedgerGauges`]) that whoever serves `/metrics` reads at scrape time.
//! Must never: put a checkout id (or anything else that grows with the number of checkouts) in
//! a label, block a pipeline stage (every call is an atomic add or a short std lock), or change
//! what the pipeline does.
//!
//! # Ownership
//!
//! A [`Metrics`] belongs to one daemon: the caller makes one with [`Metrics::new`], passes it in
//! [`crate::daemon::RunOptions`], and the daemon hands clones to each stage; the HTTP listener
//! serves [`Metrics::render`] of the same handle. There is no process-wide registry: the
//! tests run several daemons in one process, and each must count only its own work (a global
//! would mix them, and a test could only ever assert "at least"). Code built outside a daemon
//! (the CLI's paymennt client, unit tests) uses [`Metrics::disabled`], the `Default`, whose calls
//! do nothing.
//!
//! # What is measured where
//!
//! - Counted as it happens: verifications by source (and nudges that needed none), transitions by status and source (the
//!   verifier); Get Checkout and Search calls with their latency by outcome (the paymennt
//!   client; one observation per call, retries included); Listen streams open, reconnects,
//!   refusals, and the last message of each stream (the listener and the daemon's event loop);
//!   hook attempts by hook and outcome with their latency (the dispatcher); sweeps and the
//!   checkouts they nudge (the reconciler).
//! - Read from the ledger at scrape time (on a connection of its own, so a scrape never holds
//!   up the pipeline's writes): watched checkouts by status, undelivered deliveries by
//!   hook and state, the age of the oldest delivery still to be tried, PAID checkouts whose hooks
//!   have not all been delivered, the age of the oldest watched PENDING checkout, and the age of
//!   the oldest resume token. They describe what is stored, so they are right after a restart
//!   and include work queued by other processes (`paywatch hooks retry`, `paywatch track`).
//!
//! Ages are seconds as of the scrape; an age with nothing to measure is 0. If the ledger cannot
//! be read the scrape fails (the HTTP answer is a 503 naming the error) rather than serving
//! gauges that look healthy.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::domain::{CheckoutStatus, Source};

/// The `Content-Type` of [`Metrics::render`]: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Bucket bounds (seconds) of `paywatch_paymennt_request_duration_seconds`. A call includes the
/// client's retries and their backoff, hence the long tail.
pub const PAYMENNT_BUCKETS: [f64; 11] =
    [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Bucket bounds (seconds) of `paywatch_hook_attempt_duration_seconds`, up to the longest hook
/// timeout worth distinguishing (the default timeout is 30 s).
pub const HOOK_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Label for a checkout that has no verified status yet.
const UNVERIFIED: &str = "UNVERIFIED";

/// Label for a status paymennt sent that paywatch does not know (keeps labels a closed set).
const UNKNOWN_STATUS: &str = "UNKNOWN";

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The ledger-derived gauges could not be read (or the task reading them did not finish).
    #[error("cannot read the ledger for /metrics: {0}")]
    Ledger(String),
    /// The registry could not be written as text (only a bug in the encoder could).
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// What the ledger holds right now, as counts and oldest times (one consistent snapshot): the
/// figures behind the ledger-derived gauges. The ledger fills it (`Ledger::gauges`); whoever
/// serves `/metrics` hands it to [`Metrics::render`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerGauges {
    /// Watched checkouts per verified status (`None`: not verified yet).
    pub watched_by_status: Vec<(Option<String>, i64)>,
    /// Deliveries not delivered (`pending`, `running`, `dead`) per hook and state.
    pub undelivered_by_hook: Vec<UndeliveredCount>,
    /// When the oldest delivery still to be tried (`pending` or `running`) was queued.
    pub oldest_undelivered: Option<DateTime<Utc>>,
    /// Checkouts whose transition to PAID has hook deliveries not all delivered.
    pub paid_with_undelivered_hooks: i64,
    /// When the oldest watched checkout whose verified status is PENDING was tracked.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// When the least recently saved resume token of a watched checkout was saved.
    pub oldest_resume_token: Option<DateTime<Utc>>,
}

/// Undelivered deliveries of one hook in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndeliveredCount {
    /// The hook's name.
    pub hook: String,
    /// `pending`, `running` or `dead`.
    pub state: String,
    /// How many.
    pub count: i64,
}

/// Which paymennt call a latency belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymenntCall {
    /// `GET /checkout/{id}`.
    GetCheckout,
    /// `GET /checkout`.
    Search,
}

impl PaymenntCall {
    fn as_str(self) -> &'static str {
        match self {
            PaymenntCall::GetCheckout => "get_checkout",
            PaymenntCall::Search => "search",
        }
    }
}

/// Which reconciler sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepKind {
    /// The sweep at start, over checkouts that need it.
    Startup,
    /// The start-up sweep's second part, a grace after the first: over checkouts the
    /// listener's first snapshot was expected to answer and did not.
    AfterSnapshot,
    /// The sweep every interval, over every watched checkout.
    Periodic,
}

impl SweepKind {
    fn as_str(self) -> &'static str {
        match self {
            SweepKind::Startup => "startup",
            SweepKind::AfterSnapshot => "startup_after_snapshot",
            SweepKind::Periodic => "periodic",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    status: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PaymenntLabels {
    call: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabel {
    project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    project: String,
    stream: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookOutcomeLabels {
    hook: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookStateLabels {
    hook: String,
    state: &'static str,
}

/// A gauge holding seconds.
type Seconds = Gauge<f64, AtomicU64>;

fn paymennt_histogram() -> Histogram {
    Histogram::new(PAYMENNT_BUCKETS)
}

fn hook_histogram() -> Histogram {
    Histogram::new(HOOK_BUCKETS)
}

/// Every metric of one daemon, registered in its registry.
struct Inner {
    registry: Registry,
    /// The process's own figures, under the names every Prometheus exporter uses
    /// (`process_*`, no prefix), set at scrape time from `/proc/self`.
    process: ProcessGauges,
    /// Held while the scrape-time gauges are set and the registry encoded, so two scrapes at
    /// once never interleave a clear with an encode.
    scrape: Mutex<()>,
    /// The last message of each open Listen stream task, by stream number.
    stream_clocks: Mutex<HashMap<u64, StreamClock>>,

    checkouts_watched: Family<StatusLabel, Gauge>,
    verifications: Family<SourceLabel, Counter>,
    verifications_skipped: Family<SourceLabel, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    paymennt_duration: Family<PaymenntLabels, Histogram, fn() -> Histogram>,
    reconcile_sweeps: Family<KindLabel, Counter>,
    reconcile_nudges: Family<KindLabel, Counter>,
    listen_streams_open: Family<ProjectLabel, Gauge>,
    listen_reconnects: Family<ProjectLabel, Counter>,
    listen_project_refusals: Family<ProjectLabel, Counter>,
    listen_targets_refused: Counter,
    listen_message_age: Family<StreamLabels, Seconds>,
    resume_token_age: Seconds,
    hook_attempts: Family<HookOutcomeLabels, Counter>,
    hook_duration: Family<HookLabel, Histogram, fn() -> Histogram>,
    hook_deliveries: Family<HookStateLabels, Gauge>,
    hook_oldest_undelivered_age: Seconds,
    paid_hooks_undelivered: Gauge,
    pending_oldest_age: Seconds,
    active: Gauge,
}

struct StreamClock {
    project: String,
    last_message: Instant,
}

/// One daemon's metrics. Cheap to clone; clones share the registry. See the module doc.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (and the usual label values at zero).
    pub fn new() -> Metrics {
        let mut inner = Inner {
            registry: Registry::with_prefix("paywatch"),
            process: ProcessGauges::default(),
            scrape: Mutex::new(()),
            stream_clocks: Mutex::new(HashMap::new()),
            checkouts_watched: Family::default(),
            verifications: Family::default(),
            verifications_skipped: Family::default(),
            transitions: Family::default(),
            paymennt_duration: Family::new_with_constructor(paymennt_histogram),
            reconcile_sweeps: Family::default(),
            reconcile_nudges: Family::default(),
            listen_streams_open: Family::default(),
            listen_reconnects: Family::default(),
            listen_project_refusals: Family::default(),
            listen_targets_refused: Counter::default(),
            listen_message_age: Family::default(),
            resume_token_age: Seconds::default(),
            hook_attempts: Family::default(),
            hook_duration: Family::new_with_constructor(hook_histogram),
            hook_deliveries: Family::default(),
            hook_oldest_undelivered_age: Seconds::default(),
            paid_hooks_undelivered: Gauge::default(),
            pending_oldest_age: Seconds::default(),
            active: Gauge::default(),
        };
        inner.registry.register(
            "active",
            "1 while this daemon acts (listens, verifies, runs hooks): always on an SQLite ledger, \
             while it holds the lease on a PostgreSQL one; 0 while it stands by",
            inner.active.clone(),
        );
        inner.registry.register(
            "checkouts_watched",
            "Checkouts watched now, by verified status (UNVERIFIED: none yet)",
            inner.checkouts_watched.clone(),
        );
        inner.registry.register(
            "checkout_pending_oldest_age_seconds",
            "Age of the oldest watched checkout whose verified status is PENDING, since it was tracked (0: none)",
            inner.pending_oldest_age.clone(),
        );
        inner.registry.register(
            "verifications",
            "Verifications started (one Get Checkout call each), by what nudged them",
            inner.verifications.clone(),
        );
        inner.registry.register(
            "verifications_skipped",
            "Nudges that needed no Get Checkout call (a request sent after their change was seen had answered), by what nudged them",
            inner.verifications_skipped.clone(),
        );
        inner.registry.register(
            "transitions",
            "Verified status changes recorded, by new status and source",
            inner.transitions.clone(),
        );
        inner.registry.register(
            "paymennt_request_duration_seconds",
            "paymennt API calls (retries included) and their latency, by call and outcome",
            inner.paymennt_duration.clone(),
        );
        inner.registry.register(
            "reconcile_sweeps",
            "Reconciler sweeps started, by kind",
            inner.reconcile_sweeps.clone(),
        );
        inner.registry.register(
            "reconcile_nudges",
            "Checkouts the reconciler's sweeps nudged (each costs at most one Get Checkout call), by kind",
            inner.reconcile_nudges.clone(),
        );
        inner.registry.register(
            "listen_streams_open",
            "Firestore Listen streams open now, by project",
            inner.listen_streams_open.clone(),
        );
        inner.registry.register(
            "listen_reconnects",
            "Firestore Listen streams that closed and are reopened, by project",
            inner.listen_reconnects.clone(),
        );
        inner.registry.register(
            "listen_project_refusals",
            "Times Firestore refused a project's database (credentials, permissions, no database), by project",
            inner.listen_project_refusals.clone(),
        );
        inner.registry.register(
            "listen_targets_refused",
            "Checkout documents Firestore stopped watching (the reconciler still checks them)",
            inner.listen_targets_refused.clone(),
        );
        inner.registry.register(
            "listen_last_message_age_seconds",
            "Seconds since each Listen stream's last message (or since it started), by project and stream number",
            inner.listen_message_age.clone(),
        );
        inner.registry.register(
            "resume_token_oldest_age_seconds",
            "Age of the least recently saved resume token of a watched checkout (0: none saved)",
            inner.resume_token_age.clone(),
        );
        inner.registry.register(
            "hook_attempts",
            "Hook delivery attempts, by hook and outcome (delivered, retry, dead)",
            inner.hook_attempts.clone(),
        );
        inner.registry.register(
            "hook_attempt_duration_seconds",
            "Latency of hook delivery attempts, by hook",
            inner.hook_duration.clone(),
        );
        inner.registry.register(
            "hook_deliveries",
            "Hook deliveries not delivered, by hook and state (pending, running, dead)",
            inner.hook_deliveries.clone(),
        );
        inner.registry.register(
            "hook_oldest_undelivered_age_seconds",
            "Age of the oldest hook delivery still to be tried (pending or running), since it was queued (0: none)",
            inner.hook_oldest_undelivered_age.clone(),
        );
        inner.registry.register(
            "paid_checkouts_hooks_undelivered",
            "Checkouts verified PAID whose hook deliveries for it are not all delivered",
            inner.paid_hooks_undelivered.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        inner.registry.register(
            "build_info",
            "Always 1, labelled with the version of paywatch that is running",
            build_info,
        );
        // Series that exist before their first event, so rate() and absent() work from the start.
        for source in [Source::Firestore, Source::Reconcile, Source::Manual] {
            let label = SourceLabel {
                source: source.as_str(),
            };
            let _ = inner.verifications.get_or_create(&label);
            let _ = inner.verifications_skipped.get_or_create(&label);
        }
        for kind in [
            SweepKind::Startup,
            SweepKind::AfterSnapshot,
            SweepKind::Periodic,
        ] {
            let label = KindLabel {
                kind: kind.as_str(),
            };
            let _ = inner.reconcile_sweeps.get_or_create(&label);
            let _ = inner.reconcile_nudges.get_or_create(&label);
        }
        Metrics {
            inner: Some(Arc::new(inner)),
        }
    }

    /// Whether this daemon acts now (`paywatch_active`): see [`crate::daemon`]'s roles.
    pub fn set_active(&self, active: bool) {
        if let Some(inner) = &self.inner {
            inner.active.set(i64::from(active));
        }
    }

    /// Metrics that count nothing (the CLI, tests that do not look).
    pub fn disabled() -> Metrics {
        Metrics { inner: None }
    }

    /// Whether this handle has a registry.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The verifier starts a verification (a Get Checkout call) for a nudge from `source`.
    pub fn verification(&self, source: Source) {
        if let Some(inner) = &self.inner {
            inner
                .verifications
                .get_or_create(&SourceLabel {
                    source: source.as_str(),
                })
                .inc();
        }
    }

    /// The verifier skipped a nudge from `source`: a request sent after its change was seen had
    /// answered already.
    pub fn verification_skipped(&self, source: Source) {
        if let Some(inner) = &self.inner {
            inner
                .verifications_skipped
                .get_or_create(&SourceLabel {
                    source: source.as_str(),
                })
                .inc();
        }
    }

    /// The verifier recorded a transition to `status`, nudged by `source`.
    pub fn transition(&self, status: &CheckoutStatus, source: Source) {
        if let Some(inner) = &self.inner {
            inner
                .transitions
                .get_or_create(&TransitionLabels {
                    status: status_label(status),
                    source: source.as_str(),
                })
                .inc();
        }
    }

    /// A paymennt call ended after `elapsed` (retries included); `outcome` is its label as the
    /// paymennt client names it (`ok`, `not_found`, `timeout`, ...).
    pub fn paymennt_call(&self, call: PaymenntCall, outcome: &'static str, elapsed: Duration) {
        if let Some(inner) = &self.inner {
            inner
                .paymennt_duration
                .get_or_create(&PaymenntLabels {
                    call: call.as_str(),
                    outcome,
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// The reconciler starts a sweep that nudges `checkouts` checkouts.
    pub fn reconcile_sweep(&self, kind: SweepKind, checkouts: usize) {
        if let Some(inner) = &self.inner {
            let label = KindLabel {
                kind: kind.as_str(),
            };
            inner.reconcile_sweeps.get_or_create(&label).inc();
            inner
                .reconcile_nudges
                .get_or_create(&label)
                .inc_by(u64::try_from(checkouts).unwrap_or(u64::MAX));
        }
    }

    /// A Listen stream of `project` closed and will be reopened.
    pub fn listen_reconnect(&self, project: &str) {
        if let Some(inner) = &self.inner {
            inner
                .listen_reconnects
                .get_or_create(&ProjectLabel {
                    project: project.to_owned(),
                })
                .inc();
        }
    }

    /// Firestore refused a project's database.
    pub fn listen_project_refused(&self, project: &str) {
        if let Some(inner) = &self.inner {
            inner
                .listen_project_refusals
                .get_or_create(&ProjectLabel {
                    project: project.to_owned(),
                })
                .inc();
        }
    }

    /// Firestore stopped watching one checkout's document.
    pub fn listen_target_refused(&self) {
        if let Some(inner) = &self.inner {
            inner.listen_targets_refused.inc();
        }
    }

    /// A Listen stream task of `project` numbered `stream` started: its last-message age is
    /// reported (from now) until the returned guard is dropped.
    pub fn listen_stream(&self, project: &str, stream: u64) -> ListenStreamGuard {
        if let Some(inner) = &self.inner {
            // The project's counters exist (at 0) from its first stream on.
            let label = ProjectLabel {
                project: project.to_owned(),
            };
            let _ = inner.listen_reconnects.get_or_create(&label);
            let _ = inner.listen_project_refusals.get_or_create(&label);
            inner.clocks().insert(
                stream,
                StreamClock {
                    project: project.to_owned(),
                    last_message: Instant::now(),
                },
            );
        }
        ListenStreamGuard {
            metrics: self.clone(),
            stream,
        }
    }

    /// Listen stream `stream` received a message.
    pub fn listen_message(&self, stream: u64) {
        if let Some(inner) = &self.inner
            && let Some(clock) = inner.clocks().get_mut(&stream)
        {
            clock.last_message = Instant::now();
        }
    }

    /// A Listen stream of `project` is open until the returned guard is dropped.
    pub fn listen_stream_open(&self, project: &str) -> OpenStreamGuard {
        let gauge = self.inner.as_ref().map(|inner| {
            let gauge = inner
                .listen_streams_open
                .get_or_create_owned(&ProjectLabel {
                    project: project.to_owned(),
                });
            gauge.inc();
            gauge
        });
        OpenStreamGuard { gauge }
    }

    /// A hook attempt ended as `outcome` says (`delivered`, `retry`, `postponed`, `dead`), after
    /// `duration` (None: it could not start).
    pub fn hook_attempt(&self, hook: &str, outcome: &'static str, duration: Option<Duration>) {
        if let Some(inner) = &self.inner {
            inner
                .hook_attempts
                .get_or_create(&HookOutcomeLabels {
                    hook: hook.to_owned(),
                    outcome,
                })
                .inc();
            if let Some(duration) = duration {
                inner
                    .hook_duration
                    .get_or_create(&HookLabel {
                        hook: hook.to_owned(),
                    })
                    .observe(duration.as_secs_f64());
            }
        }
    }

    /// The exposition in the Prometheus text format ([`CONTENT_TYPE`]), with the ledger-derived
    /// gauges set from `figures` (read by the caller at scrape time). A disabled handle gives an
    /// empty exposition.
    ///
    /// # Errors
    ///
    /// The registry cannot be encoded (only a bug in the encoder could do that).
    pub fn render(&self, figures: &LedgerGauges) -> Result<String, MetricsError> {
        let Some(inner) = &self.inner else {
            return Ok(String::new());
        };
        inner.render(figures, Utc::now(), Instant::now())
    }
}

impl Inner {
    fn clocks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, StreamClock>> {
        // Only plain inserts and reads happen under the lock: a poisoned map is still whole.
        self.stream_clocks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the scrape-time gauges and encodes the registry.
    fn render(
        &self,
        gauges: &LedgerGauges,
        now: DateTime<Utc>,
        instant: Instant,
    ) -> Result<String, MetricsError> {
        let _scrape = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        let age = |time: Option<DateTime<Utc>>| {
            time.and_then(|time| (now - time).to_std().ok())
                .map_or(0.0, |age| age.as_secs_f64())
        };

        self.checkouts_watched.clear();
        for status in CheckoutStatus::KNOWN
            .iter()
            .map(status_label)
            .chain([UNVERIFIED.to_owned()])
        {
            let _ = self
                .checkouts_watched
                .get_or_create(&StatusLabel { status });
        }
        for (status, count) in &gauges.watched_by_status {
            let status = status.as_deref().map_or_else(
                || UNVERIFIED.to_owned(),
                |text| status_label(&CheckoutStatus::parse(text)),
            );
            self.checkouts_watched
                .get_or_create(&StatusLabel { status })
                .inc_by(*count);
        }
        self.pending_oldest_age.set(age(gauges.oldest_pending));
        self.resume_token_age.set(age(gauges.oldest_resume_token));

        self.hook_deliveries.clear();
        for undelivered in &gauges.undelivered_by_hook {
            let state = match undelivered.state.as_str() {
                "pending" => "pending",
                "running" => "running",
                _ => "dead",
            };
            self.hook_deliveries
                .get_or_create(&HookStateLabels {
                    hook: undelivered.hook.clone(),
                    state,
                })
                .inc_by(undelivered.count);
        }
        self.hook_oldest_undelivered_age
            .set(age(gauges.oldest_undelivered));
        self.paid_hooks_undelivered
            .set(gauges.paid_with_undelivered_hooks);

        self.listen_message_age.clear();
        for (stream, clock) in self.clocks().iter() {
            self.listen_message_age
                .get_or_create(&StreamLabels {
                    project: clock.project.clone(),
                    stream: *stream,
                })
                .set(
                    instant
                        .saturating_duration_since(clock.last_message)
                        .as_secs_f64(),
                );
        }

        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        self.process.read();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.process.registry)?;
        Ok(text)
    }
}

/// The `process_*` figures of the Prometheus client libraries, and `paywatch_build_info`'s
/// sibling registry. Read from `/proc/self` (the `procfs` crate) at each scrape; a figure that
/// cannot be read keeps its last value.
struct ProcessGauges {
    registry: Registry,
    cpu_seconds: Gauge<f64, AtomicU64>,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

impl Default for ProcessGauges {
    fn default() -> Self {
        let mut gauges = ProcessGauges {
            registry: Registry::default(),
            cpu_seconds: Gauge::default(),
            resident_memory: Gauge::default(),
            virtual_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time: Gauge::default(),
        };
        // Counters by meaning; gauges here because they are set from /proc, not counted.
        gauges.registry.register(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds",
            gauges.cpu_seconds.clone(),
        );
        gauges.registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            gauges.resident_memory.clone(),
        );
        gauges.registry.register(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            gauges.virtual_memory.clone(),
        );
        gauges.registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            gauges.open_fds.clone(),
        );
        gauges.registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors (the soft limit)",
            gauges.max_fds.clone(),
        );
        gauges.registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            gauges.start_time.clone(),
        );
        gauges
    }
}

impl ProcessGauges {
    fn read(&self) {
        let Ok(process) = procfs::process::Process::myself() else {
            return;
        };
        let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        if let Ok(stat) = process.stat() {
            let ticks = procfs::ticks_per_second().max(1) as f64;
            self.cpu_seconds
                .set((stat.utime + stat.stime) as f64 / ticks);
            self.resident_memory
                .set(as_i64(stat.rss.saturating_mul(procfs::page_size())));
            self.virtual_memory.set(as_i64(stat.vsize));
            if let Ok(boot) = procfs::boot_time_secs() {
                self.start_time
                    .set(boot as f64 + stat.starttime as f64 / ticks);
            }
        }
        if let Ok(count) = process.fd_count() {
            self.open_fds.set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        if let Ok(limits) = process.limits()
            && let procfs::process::LimitValue::Value(soft) = limits.max_open_files.soft_limit
        {
            self.max_fds.set(as_i64(soft));
        }
    }
}

/// Keeps a Listen stream's last-message age reported; see [`Metrics::listen_stream`].
#[derive(Debug)]
pub struct ListenStreamGuard {
    metrics: Metrics,
    stream: u64,
}

impl Drop for ListenStreamGuard {
    fn drop(&mut self) {
        if let Some(inner) = &self.metrics.inner {
            inner.clocks().remove(&self.stream);
        }
    }
}

/// Counts a Listen stream as open; see [`Metrics::listen_stream_open`].
#[derive(Debug)]
pub struct OpenStreamGuard {
    gauge: Option<Gauge>,
}

impl Drop for OpenStreamGuard {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec();
        }
    }
}

/// A status as a label: one of paymennt's documented statuses, or `UNKNOWN`.
fn status_label(status: &CheckoutStatus) -> String {
    match status {
        CheckoutStatus::Unknown(_) => UNKNOWN_STATUS.to_owned(),
        known => known.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests;
