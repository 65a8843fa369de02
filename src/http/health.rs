//! Liveness and readiness: what `/healthz` and `/readyz` answer.
//!
//! Owns: the record of startup, of each Listen stream's last reported state and of the
//! documents Firestore refuses to watch (fed from the listener's events by the Firestore
//! source's journal, through [`ListenObserver`]) and the checks that turn them, the verifier's
//! figures and the ledger into a verdict with reasons.
//! Must never: change anything it inspects (the ledger check takes the write lock and rolls
//! back), or name a checkout or a secret in a reason.
//!
//! A Listen stream silent for `idle_timeout` is reopened by the listener itself, which reports it
//! disconnected: that is how "silent past `idle_timeout`" reaches readiness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::ledger::Ledger;
use crate::sources::firestore::{ListenEvent, ListenObserver, ListenerHandle};
use crate::verifier::VerifierStats;

/// How long `/healthz` waits for the ledger's write lock.
pub const LEDGER_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A stream's last reported state.
#[derive(Debug, Clone)]
enum StreamState {
    Connected,
    Disconnected { reason: String, since: Instant },
}

#[derive(Debug, Default)]
struct Seen {
    started: bool,
    /// By (project, stream number).
    streams: HashMap<(String, u64), StreamState>,
    /// Projects whose database refuses us, with what it said.
    refused: HashMap<String, String>,
    /// Checkouts whose document Firestore refuses to watch (a target REMOVE with a cause):
    /// the project, the code and Firestore's message.
    refused_documents: HashMap<crate::domain::CheckoutId, (String, &'static str, String)>,
    /// `[firestore] auth`, for the next step in a refusal's reason.
    auth_mode: Option<&'static str>,
    /// On a shared PostgreSQL ledger while another daemon holds the lease: why this one stands
    /// by (who holds it).
    standby: Option<String>,
}

/// The daemon's health, shared by the daemon and the Firestore source (which feed it) and the
/// HTTP handlers.
#[derive(Clone)]
pub struct Health {
    seen: Arc<Mutex<Seen>>,
    ledger: Ledger,
    listener: Option<ListenerHandle>,
    verifier: watch::Receiver<VerifierStats>,
    verify_failing_after: Duration,
    paymennt: crate::paymennt::CredentialStatus,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

/// `/readyz`'s answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Readiness {
    /// Whether paywatch is ready: the HTTP status is 200 if so, else 503.
    pub ready: bool,
    /// What is wrong, one sentence each (empty when ready).
    pub problems: Vec<String>,
    /// Listen streams that exist and are connected, of all that exist (`null` with Firestore
    /// off).
    pub streams_connected: Option<usize>,
    /// Listen streams that exist.
    pub streams: Option<usize>,
}

/// `/healthz`'s answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Liveness {
    /// Whether the process is healthy (200) or not (503).
    pub ok: bool,
    /// What is wrong, if anything.
    pub problems: Vec<String>,
}

impl Health {
    /// Health of a daemon recording into `ledger`, with `listener` (None: Firestore off).
    pub fn new(
        ledger: Ledger,
        listener: Option<ListenerHandle>,
        verifier: watch::Receiver<VerifierStats>,
        verify_failing_after: Duration,
    ) -> Health {
        Health {
            seen: Arc::new(Mutex::new(Seen::default())),
            ledger,
            listener,
            verifier,
            verify_failing_after,
            paymennt: crate::paymennt::CredentialStatus::default(),
        }
    }

    /// Readiness also fails while paymennt refuses the API credentials, as `credentials` says.
    pub fn with_paymennt_credentials(
        self,
        credentials: crate::paymennt::CredentialStatus,
    ) -> Health {
        Health {
            paymennt: credentials,
            ..self
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The Firestore auth mode in force (`[firestore] auth`), named in refusals' next steps.
    pub fn set_firestore_auth(&self, mode: &'static str) {
        self.seen().auth_mode = Some(mode);
    }

    /// A checkout is no longer watched: Firestore's refusal of its document is no longer a
    /// problem.
    pub fn forget_refusal(&self, checkout_id: &crate::domain::CheckoutId) {
        self.seen().refused_documents.remove(checkout_id);
    }

    /// Startup finished (the pipeline runs).
    pub fn set_started(&self, started: bool) {
        self.seen().started = started;
    }

    /// Marks this daemon as standing by (`Some(why)`) or acting (`None`): a standby is alive
    /// but never ready, and refuses webhooks and tracking (the active daemon takes them).
    pub fn set_standby(&self, why: Option<String>) {
        self.seen().standby = why;
    }

    /// Why this daemon stands by, if it does.
    pub fn standby(&self) -> Option<String> {
        self.seen().standby.clone()
    }

    /// Notes a listener event (stream and project states; other events are ignored).
    pub fn note(&self, event: &ListenEvent) {
        let mut seen = self.seen();
        match event {
            ListenEvent::Connected {
                project, stream, ..
            } => {
                seen.streams
                    .insert((project.clone(), *stream), StreamState::Connected);
                seen.refused.remove(project);
            }
            ListenEvent::Disconnected {
                project,
                stream,
                reason,
                ..
            } => {
                let key = (project.clone(), *stream);
                let since = match seen.streams.get(&key) {
                    Some(StreamState::Disconnected { since, .. }) => *since,
                    _ => Instant::now(),
                };
                seen.streams.insert(
                    key,
                    StreamState::Disconnected {
                        reason: reason.clone(),
                        since,
                    },
                );
            }
            ListenEvent::PermanentFailure { project, message } => {
                seen.refused.insert(project.clone(), message.clone());
            }
            ListenEvent::TargetRefused {
                checkout_id,
                document,
                code,
                message,
                ..
            } => {
                let project = document
                    .strip_prefix("projects/")
                    .and_then(|rest| rest.split('/').next())
                    .unwrap_or("?")
                    .to_owned();
                seen.refused_documents
                    .insert(checkout_id.clone(), (project, code, message.clone()));
            }
            ListenEvent::TargetRecovered { checkout_id } => {
                seen.refused_documents.remove(checkout_id);
            }
            _ => {}
        }
    }

    /// Whether the daemon is ready, and if not why.
    pub fn readiness(&self) -> Readiness {
        let mut problems = Vec::new();
        let (mut streams, mut connected) = (None, None);
        {
            let mut seen = self.seen();
            if let Some(why) = &seen.standby {
                problems.push(why.clone());
            } else if !seen.started {
                problems.push("startup has not finished".to_owned());
            }
            if let Some(listener) = &self.listener {
                let existing = listener.streams();
                // Forget streams that no longer exist (their last checkout was unwatched).
                seen.streams.retain(|key, _| existing.contains(key));
                let mut up = 0;
                for key in &existing {
                    match seen.streams.get(key) {
                        Some(StreamState::Connected) => up += 1,
                        Some(StreamState::Disconnected { reason, since }) => problems.push(format!(
                            "Firestore stream {} of project '{}' is disconnected (for {} s): {reason}",
                            key.1,
                            key.0,
                            since.elapsed().as_secs()
                        )),
                        None => problems.push(format!(
                            "Firestore stream {} of project '{}' has not connected yet",
                            key.1, key.0
                        )),
                    }
                }
                for (project, message) in &seen.refused {
                    problems.push(format!(
                        "Firestore project '{project}' refuses paywatch: {message}"
                    ));
                }
                streams = Some(existing.len());
                connected = Some(up);
            }
            // Per project and cause: how many documents, what Firestore said, what to try.
            let mut documents: std::collections::BTreeMap<(&str, &str, &str), usize> =
                std::collections::BTreeMap::new();
            for (project, code, message) in seen.refused_documents.values() {
                *documents
                    .entry((project.as_str(), *code, message.as_str()))
                    .or_default() += 1;
            }
            let mode = seen.auth_mode.unwrap_or("?");
            for ((project, code, message), count) in documents {
                problems.push(format!(
                    "Firestore refuses to watch {count} checkout document(s) of project \
                     '{project}' ({code}: {message}); the reconciler still checks them. {}",
                    crate::sources::firestore::access_hint(mode, code)
                ));
            }
        }
        if let Some(refusal) = self.paymennt.refused() {
            problems.push(format!(
                "paymennt refuses the API credentials ({refusal}): check [paymennt] api_key, api_secret and environment"
            ));
        }
        if let Some(since) = self.verifier.borrow().failing_since {
            let failing = (chrono::Utc::now() - since).to_std().unwrap_or_default();
            if failing > self.verify_failing_after {
                problems.push(format!(
                    "Get Checkout has been failing for {} s (more than [http] verify_failing_after); check paymennt's status, the network and the API credentials",
                    failing.as_secs()
                ));
            }
        }
        Readiness {
            ready: problems.is_empty(),
            problems,
            streams_connected: connected,
            streams,
        }
    }

    /// Whether the process is healthy: the ledger takes a write lock within
    /// [`LEDGER_CHECK_TIMEOUT`].
    pub async fn liveness(&self) -> Liveness {
        let check = self.ledger.check_writable();
        let problems = match tokio::time::timeout(LEDGER_CHECK_TIMEOUT, check).await {
            Ok(Ok(())) => Vec::new(),
            Ok(Err(error)) => vec![format!("the ledger is not writable: {error}")],
            Err(_) => vec![format!(
                "the ledger did not take a write lock within {} s",
                LEDGER_CHECK_TIMEOUT.as_secs()
            )],
        };
        Liveness {
            ok: problems.is_empty(),
            problems,
        }
    }
}

/// The Firestore source's journal and watch-set sync tell the health record what they hear.
impl ListenObserver for Health {
    fn note(&self, event: &ListenEvent) {
        Health::note(self, event);
    }

    fn forget_refusal(&self, checkout_id: &crate::domain::CheckoutId) {
        Health::forget_refusal(self, checkout_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_names_startup_and_a_verifier_failing_past_the_threshold() {
        let ledger = Ledger::open_in_memory().expect("ledger");
        let (stats, receiver) = watch::channel(VerifierStats::default());
        let health = Health::new(ledger, None, receiver, Duration::from_secs(60));
        let before = health.readiness();
        assert!(!before.ready);
        assert_eq!(before.problems, ["startup has not finished"]);
        assert_eq!(before.streams, None, "Firestore off: no streams to count");
        health.set_started(true);
        assert!(health.readiness().ready);
        // Failing for less than the threshold is not yet a problem; longer is.
        stats.send_modify(|s| s.failing_since = Some(chrono::Utc::now()));
        assert!(health.readiness().ready);
        stats.send_modify(|s| {
            s.failing_since = Some(chrono::Utc::now() - chrono::Duration::seconds(61))
        });
        let failing = health.readiness();
        assert!(!failing.ready);
        assert!(failing.problems[0].contains("Get Checkout has been failing"));
        stats.send_modify(|s| s.failing_since = None);
        assert!(health.readiness().ready);
        assert!(health.liveness().await.ok);
    }

    /// Issue 21: documents Firestore refuses to watch are a readiness problem, counted per
    /// project and cause with the next step for the auth mode, until they are watched again or
    /// no longer watched.
    #[tokio::test]
    async fn refused_documents_are_counted_with_what_to_try_until_recovered_or_unwatched() {
        let ledger = Ledger::open_in_memory().expect("ledger");
        let (_stats, receiver) = watch::channel(VerifierStats::default());
        let health = Health::new(ledger, None, receiver, Duration::from_secs(60));
        health.set_started(true);
        health.set_firestore_auth("none");
        let refused = |n: &str| ListenEvent::TargetRefused {
            checkout_id: n.parse().expect("id"),
            document: format!("projects/p/databases/(default)/documents/checkouts/{n}"),
            code: "PERMISSION_DENIED",
            message: "Missing or insufficient permissions.".into(),
            refusals: 1,
            retry_in: Duration::from_secs(300),
        };
        health.note(&refused("1"));
        health.note(&refused("2"));
        let readiness = health.readiness();
        assert!(!readiness.ready);
        assert_eq!(readiness.problems.len(), 1, "{:?}", readiness.problems);
        let problem = &readiness.problems[0];
        assert!(
            problem.contains("2 checkout document(s) of project 'p'")
                && problem.contains("PERMISSION_DENIED with auth=none")
                && problem.contains("firebase-anonymous"),
            "{problem}"
        );
        health.note(&ListenEvent::TargetRecovered {
            checkout_id: "1".parse().expect("id"),
        });
        assert!(health.readiness().problems[0].contains("1 checkout document(s)"));
        health.forget_refusal(&"2".parse().expect("id"));
        assert!(health.readiness().ready);
    }
}
