//! Injected faults: API errors and latency, throttling, dropped Listen streams, Listen targets
//! refused per document, slow document writes, a refused Search Checkouts, a Create payment link
//! or Create new webhook answered late (after the link or webhook exists), and the Get Checkout
//! and Search call counters tests assert on.
//!
//! Owns: the fault settings (set at start through [`FaultSettings`], changed at run time through
//! [`Faults`] or `POST /_sandbox/faults`) and the per-checkout Get Checkout counters.
//! Must never: act on its own; the API layer, the Listen server and the state ask it what to do.
//!
//! Deterministic counters ("the next N requests fail") come first: a test that says "three 500s,
//! then success" must not depend on luck. The random error rate exists for soak runs and
//! benchmarks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Fault settings, as given at start or read back from a running sandbox.
///
/// Durations are whole milliseconds so the same struct is the JSON body of
/// `GET/POST /_sandbox/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultSettings {
    /// Fraction (0.0 to 1.0) of Merchant API requests answered with HTTP 500, at random.
    pub api_error_rate: f64,
    /// The next this many Merchant API requests are answered with HTTP 500.
    pub fail_next_api_requests: u32,
    /// The next this many Merchant API requests are answered with HTTP 429.
    pub throttle_next_api_requests: u32,
    /// The `Retry-After` seconds sent with an injected 429.
    pub retry_after_seconds: u32,
    /// Added to every Merchant API request before it is answered.
    pub api_latency_ms: u64,
    /// How long after a checkout changes its Firestore document is written.
    pub document_write_delay_ms: u64,
    /// New Listen calls are refused with UNAVAILABLE while set (with `close_listen_streams`:
    /// Firestore is down until this is cleared).
    pub refuse_listen: bool,
    /// Search Checkouts is answered with HTTP 403 (an API key without that permission).
    pub refuse_search: bool,
    /// Create payment link (and Create new webhook) makes the link (webhook), then waits this
    /// long before answering: a paymennt slower than the client's timeout, whose link exists
    /// although the client saw no answer.
    pub create_answer_delay_ms: u64,
    /// Listen refuses targets naming these documents (full names, or the last path segment,
    /// i.e. the document id) with a `REMOVE` carrying PERMISSION_DENIED, as a project whose
    /// security rules deny that one document would; the stream and its other targets go on.
    pub refuse_listen_documents: Vec<String>,
    /// A resume token older than this (ms since the sandbox issued it) no longer resumes: the
    /// target gets its full state again, as Firestore sends after a long disconnect. `None`:
    /// tokens never expire.
    pub resume_token_max_age_ms: Option<u64>,
}

/// A partial update of [`FaultSettings`]: the body of `POST /_sandbox/faults`.
///
/// Absent fields keep their value. `close_listen_streams: true` drops every open Listen stream
/// with UNAVAILABLE, once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultUpdate {
    /// See [`FaultSettings::api_error_rate`].
    pub api_error_rate: Option<f64>,
    /// See [`FaultSettings::fail_next_api_requests`].
    pub fail_next_api_requests: Option<u32>,
    /// See [`FaultSettings::throttle_next_api_requests`].
    pub throttle_next_api_requests: Option<u32>,
    /// See [`FaultSettings::retry_after_seconds`].
    pub retry_after_seconds: Option<u32>,
    /// See [`FaultSettings::api_latency_ms`].
    pub api_latency_ms: Option<u64>,
    /// See [`FaultSettings::document_write_delay_ms`].
    pub document_write_delay_ms: Option<u64>,
    /// See [`FaultSettings::refuse_listen`].
    pub refuse_listen: Option<bool>,
    /// See [`FaultSettings::refuse_search`].
    pub refuse_search: Option<bool>,
    /// See [`FaultSettings::create_answer_delay_ms`].
    pub create_answer_delay_ms: Option<u64>,
    /// See [`FaultSettings::refuse_listen_documents`] (replaces the list).
    pub refuse_listen_documents: Option<Vec<String>>,
    /// See [`FaultSettings::resume_token_max_age_ms`]; `0` means "never expire".
    pub resume_token_max_age_ms: Option<u64>,
    /// Drop every open Listen stream with UNAVAILABLE now.
    pub close_listen_streams: bool,
}

/// What the API layer must do with one Merchant API request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFault {
    /// Answer normally.
    None,
    /// Answer HTTP 500.
    ServerError,
    /// Answer HTTP 429 with `Retry-After: seconds`.
    Throttled {
        /// The `Retry-After` value.
        retry_after_seconds: u32,
    },
}

/// The live fault switches of one sandbox. Cheap to clone; every clone controls the same sandbox.
#[derive(Clone)]
pub struct Faults {
    inner: Arc<FaultsInner>,
}

struct FaultsInner {
    /// The settings; a std mutex because every access is a few field reads with no await.
    settings: Mutex<FaultSettings>,
    /// Get Checkout requests received, per checkout id as written in the URL.
    get_checkout_calls: Mutex<HashMap<String, u64>>,
    /// Search Checkouts requests received.
    search_calls: AtomicU64,
    /// Bumped to make every open Listen stream fail with UNAVAILABLE.
    close_streams: watch::Sender<u64>,
}

impl Faults {
    /// Faults starting from `settings`.
    pub fn new(settings: FaultSettings) -> Faults {
        let (close_streams, _) = watch::channel(0);
        Faults {
            inner: Arc::new(FaultsInner {
                settings: Mutex::new(settings),
                get_checkout_calls: Mutex::new(HashMap::new()),
                search_calls: AtomicU64::new(0),
                close_streams,
            }),
        }
    }

    fn settings_lock(&self) -> MutexGuard<'_, FaultSettings> {
        // A poisoned lock only means another thread panicked mid-update of plain numbers.
        self.inner
            .settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current settings (counters show what is left).
    pub fn settings(&self) -> FaultSettings {
        self.settings_lock().clone()
    }

    /// Replaces every setting.
    pub fn set(&self, settings: FaultSettings) {
        *self.settings_lock() = settings;
    }

    /// Applies a partial update, then closes the Listen streams if asked.
    ///
    /// # Errors
    ///
    /// A message naming the field if `api_error_rate` is outside 0.0..=1.0.
    pub fn update(&self, update: FaultUpdate) -> Result<FaultSettings, String> {
        if let Some(rate) = update.api_error_rate
            && !(0.0..=1.0).contains(&rate)
        {
            return Err(format!("api_error_rate {rate} is outside 0.0..=1.0"));
        }
        let settings = {
            let mut settings = self.settings_lock();
            let FaultUpdate {
                api_error_rate,
                fail_next_api_requests,
                throttle_next_api_requests,
                retry_after_seconds,
                api_latency_ms,
                document_write_delay_ms,
                refuse_listen,
                refuse_search,
                create_answer_delay_ms,
                refuse_listen_documents,
                resume_token_max_age_ms,
                close_listen_streams: _,
            } = update;
            if let Some(v) = resume_token_max_age_ms {
                settings.resume_token_max_age_ms = (v > 0).then_some(v);
            }
            if let Some(v) = create_answer_delay_ms {
                settings.create_answer_delay_ms = v;
            }
            if let Some(v) = refuse_listen {
                settings.refuse_listen = v;
            }
            if let Some(v) = refuse_search {
                settings.refuse_search = v;
            }
            if let Some(v) = api_error_rate {
                settings.api_error_rate = v;
            }
            if let Some(v) = fail_next_api_requests {
                settings.fail_next_api_requests = v;
            }
            if let Some(v) = throttle_next_api_requests {
                settings.throttle_next_api_requests = v;
            }
            if let Some(v) = retry_after_seconds {
                settings.retry_after_seconds = v;
            }
            if let Some(v) = api_latency_ms {
                settings.api_latency_ms = v;
            }
            if let Some(v) = document_write_delay_ms {
                settings.document_write_delay_ms = v;
            }
            if let Some(v) = refuse_listen_documents {
                settings.refuse_listen_documents = v;
            }
            settings.clone()
        };
        if update.close_listen_streams {
            self.close_listen_streams();
        }
        Ok(settings)
    }

    /// Search Checkouts is answered with HTTP 403 while `refused`.
    pub fn refuse_search(&self, refused: bool) {
        self.settings_lock().refuse_search = refused;
    }

    /// Whether Search Checkouts is refused.
    pub fn search_refused(&self) -> bool {
        self.settings_lock().refuse_search
    }

    /// The next `count` Merchant API requests get HTTP 500.
    pub fn fail_next_api_requests(&self, count: u32) {
        self.settings_lock().fail_next_api_requests = count;
    }

    /// The next `count` Merchant API requests get HTTP 429 with `Retry-After: retry_after_seconds`.
    pub fn throttle_next_api_requests(&self, count: u32, retry_after_seconds: u32) {
        let mut settings = self.settings_lock();
        settings.throttle_next_api_requests = count;
        settings.retry_after_seconds = retry_after_seconds;
    }

    /// A fraction (clamped to 0.0..=1.0) of Merchant API requests get HTTP 500, at random.
    pub fn set_api_error_rate(&self, rate: f64) {
        self.settings_lock().api_error_rate = rate.clamp(0.0, 1.0);
    }

    /// Every Merchant API request waits `latency` before it is handled.
    pub fn set_api_latency(&self, latency: Duration) {
        self.settings_lock().api_latency_ms = millis(latency);
    }

    /// Checkout documents are written `delay` after the checkout changes.
    pub fn set_document_write_delay(&self, delay: Duration) {
        self.settings_lock().document_write_delay_ms = millis(delay);
    }

    /// Refuses new Listen calls (UNAVAILABLE) while `refuse` is true.
    pub fn set_refuse_listen(&self, refuse: bool) {
        self.settings_lock().refuse_listen = refuse;
    }

    /// Whether new Listen calls are refused.
    pub fn refuse_listen(&self) -> bool {
        self.settings_lock().refuse_listen
    }

    /// Resume tokens older than `age` get a full resend instead of the changes (`None`: they
    /// never expire).
    pub fn set_resume_token_max_age(&self, age: Option<Duration>) {
        self.settings_lock().resume_token_max_age_ms =
            age.map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    }

    /// How old a resume token may be and still resume.
    pub(crate) fn resume_token_max_age(&self) -> Option<Duration> {
        self.settings_lock()
            .resume_token_max_age_ms
            .map(Duration::from_millis)
    }

    /// The added API latency.
    pub fn api_latency(&self) -> Duration {
        Duration::from_millis(self.settings_lock().api_latency_ms)
    }

    /// Create payment link answers `delay` after the link is made.
    pub fn set_create_answer_delay(&self, delay: Duration) {
        self.settings_lock().create_answer_delay_ms = millis(delay);
    }

    /// How long Create payment link (and Create new webhook) waits, after making the link
    /// (webhook), before answering.
    pub fn create_answer_delay(&self) -> Duration {
        Duration::from_millis(self.settings_lock().create_answer_delay_ms)
    }

    /// The document write delay.
    pub fn document_write_delay(&self) -> Duration {
        Duration::from_millis(self.settings_lock().document_write_delay_ms)
    }

    /// Decides the fate of one Merchant API request, consuming a counter if one applies.
    ///
    /// Throttling is checked before errors, so "2 throttled, then 1 error" is expressible.
    pub fn next_api_fault(&self) -> ApiFault {
        let mut settings = self.settings_lock();
        if settings.throttle_next_api_requests > 0 {
            settings.throttle_next_api_requests -= 1;
            return ApiFault::Throttled {
                retry_after_seconds: settings.retry_after_seconds,
            };
        }
        if settings.fail_next_api_requests > 0 {
            settings.fail_next_api_requests -= 1;
            return ApiFault::ServerError;
        }
        if settings.api_error_rate > 0.0 && rand::random::<f64>() < settings.api_error_rate {
            return ApiFault::ServerError;
        }
        ApiFault::None
    }

    /// Listen refuses targets naming this document (its id, or its full name) from now on.
    pub fn refuse_listen_document(&self, document: &str) {
        let mut settings = self.settings_lock();
        if !settings
            .refuse_listen_documents
            .iter()
            .any(|d| d == document)
        {
            settings.refuse_listen_documents.push(document.to_owned());
        }
    }

    /// Listen accepts every document again.
    pub fn accept_all_listen_documents(&self) {
        self.settings_lock().refuse_listen_documents.clear();
    }

    /// Whether Listen must refuse a target naming `name` (a full document name).
    pub(crate) fn listen_refuses(&self, name: &str) -> bool {
        let id = name.rsplit('/').next().unwrap_or(name);
        self.settings_lock()
            .refuse_listen_documents
            .iter()
            .any(|refused| refused == name || refused == id)
    }

    /// Drops every open Listen stream with UNAVAILABLE. Streams opened afterwards are unaffected.
    pub fn close_listen_streams(&self) {
        self.inner
            .close_streams
            .send_modify(|generation| *generation += 1);
    }

    /// A receiver that changes whenever [`Faults::close_listen_streams`] is called.
    pub(crate) fn close_streams_signal(&self) -> watch::Receiver<u64> {
        self.inner.close_streams.subscribe()
    }

    /// Counts one Get Checkout request for `checkout_id` (as written in the URL).
    pub(crate) fn count_get_checkout(&self, checkout_id: &str) {
        let mut calls = self
            .inner
            .get_checkout_calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *calls.entry(checkout_id.to_owned()).or_default() += 1;
    }

    /// Counts one Search Checkouts request.
    pub(crate) fn count_search(&self) {
        self.inner.search_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Search Checkouts requests received since the sandbox started (refused ones included).
    pub fn search_calls(&self) -> u64 {
        self.inner.search_calls.load(Ordering::Relaxed)
    }

    /// How many Get Checkout requests arrived for `checkout_id`.
    ///
    /// Every request that reached the sandbox counts, including ones answered with an injected
    /// fault or an authentication error: the number is "how many times did the daemon ask".
    pub fn get_checkout_calls(&self, checkout_id: &str) -> u64 {
        self.inner
            .get_checkout_calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(checkout_id)
            .copied()
            .unwrap_or(0)
    }

    /// Get Checkout requests for every checkout id, in total.
    pub fn total_get_checkout_calls(&self) -> u64 {
        self.inner
            .get_checkout_calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .sum()
    }

    /// Every checkout id's Get Checkout count.
    pub fn get_checkout_call_counts(&self) -> HashMap<String, u64> {
        self.inner
            .get_checkout_calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("settings", &self.settings())
            .finish_non_exhaustive()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_consumed_in_order() {
        let faults = Faults::new(FaultSettings::default());
        faults.throttle_next_api_requests(1, 7);
        faults.fail_next_api_requests(2);
        assert_eq!(
            faults.next_api_fault(),
            ApiFault::Throttled {
                retry_after_seconds: 7
            }
        );
        assert_eq!(faults.next_api_fault(), ApiFault::ServerError);
        assert_eq!(faults.next_api_fault(), ApiFault::ServerError);
        assert_eq!(faults.next_api_fault(), ApiFault::None);
    }

    #[test]
    fn error_rate_one_always_fails_and_zero_never() {
        let faults = Faults::new(FaultSettings {
            api_error_rate: 1.0,
            ..FaultSettings::default()
        });
        assert!((0..20).all(|_| faults.next_api_fault() == ApiFault::ServerError));
        faults.set_api_error_rate(0.0);
        assert!((0..20).all(|_| faults.next_api_fault() == ApiFault::None));
    }

    #[test]
    fn update_keeps_absent_fields_and_rejects_bad_rates() {
        let faults = Faults::new(FaultSettings {
            api_latency_ms: 5,
            ..FaultSettings::default()
        });
        let settings = faults
            .update(FaultUpdate {
                fail_next_api_requests: Some(3),
                ..FaultUpdate::default()
            })
            .expect("valid update");
        assert_eq!(settings.api_latency_ms, 5);
        assert_eq!(settings.fail_next_api_requests, 3);
        let settings = faults
            .update(FaultUpdate {
                create_answer_delay_ms: Some(700),
                ..FaultUpdate::default()
            })
            .expect("valid update");
        assert_eq!(settings.create_answer_delay_ms, 700);
        assert_eq!(faults.create_answer_delay(), Duration::from_millis(700));
        assert_eq!(settings.fail_next_api_requests, 3);
        let error = faults
            .update(FaultUpdate {
                api_error_rate: Some(1.5),
                ..FaultUpdate::default()
            })
            .expect_err("rate above 1");
        assert!(error.contains("api_error_rate"), "{error}");
    }

    #[test]
    fn listen_refusals_match_the_id_or_the_full_name() {
        let faults = Faults::new(FaultSettings::default());
        let name = "projects/p/databases/(default)/documents/checkouts/doc-1";
        assert!(!faults.listen_refuses(name));
        faults.refuse_listen_document("doc-1");
        assert!(faults.listen_refuses(name));
        assert!(
            !faults.listen_refuses("projects/p/databases/(default)/documents/checkouts/doc-10")
        );
        faults.accept_all_listen_documents();
        let settings = faults
            .update(FaultUpdate {
                refuse_listen_documents: Some(vec![name.to_owned()]),
                ..FaultUpdate::default()
            })
            .expect("valid update");
        assert_eq!(settings.refuse_listen_documents, [name]);
        assert!(faults.listen_refuses(name));
    }

    #[test]
    fn closing_streams_bumps_the_signal() {
        let faults = Faults::new(FaultSettings::default());
        let signal = faults.close_streams_signal();
        faults.close_listen_streams();
        assert!(signal.has_changed().expect("sender alive"));
    }

    #[test]
    fn get_checkout_calls_are_counted_per_id() {
        let faults = Faults::new(FaultSettings::default());
        faults.count_get_checkout("1");
        faults.count_get_checkout("1");
        faults.count_get_checkout("2");
        assert_eq!(faults.get_checkout_calls("1"), 2);
        assert_eq!(faults.get_checkout_calls("3"), 0);
        assert_eq!(faults.total_get_checkout_calls(), 3);
    }
}
