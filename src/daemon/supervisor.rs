//! Supervision of the daemon's long-lived tasks.
//!
//! Owns: noticing that a task which should run until shutdown (listener, verifier, hook
//! dispatcher, reconciler, watch-set sync, watchdog) returned or panicked, saying so at error
//! level with the task's name, and telling the daemon, which then drains and exits non-zero so
//! the service manager restarts it (nothing is lost: the ledger is durable and the next start
//! resumes from it). It also answers "are all tasks healthy?" for the watchdog, which stops
//! pinging as soon as one is not.
//! Must never: restart a task itself (a task that died once left its state unknown; a fresh
//! process is the clean restart), or treat an end during shutdown as a failure.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A supervised task that ended while the daemon was meant to be running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The task's name, as in the log line.
    pub task: &'static str,
    /// How it ended: `ended` or `panicked: <message>`.
    pub how: String,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} task {}", self.task, self.how)
    }
}

/// Watches the daemon's long-lived tasks. Wrap each with [`Supervisor::supervise`]; await
/// [`Supervisor::failed`] beside the daemon's other work; call [`Supervisor::stopping`] when
/// shutdown begins.
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
    failures: mpsc::UnboundedReceiver<TaskFailure>,
}

#[derive(Debug)]
struct Shared {
    /// Cancelled when shutdown begins: from then on a task returning is expected.
    stopping: CancellationToken,
    /// False from the first failure on.
    healthy: AtomicBool,
    failures: mpsc::UnboundedSender<TaskFailure>,
}

impl Shared {
    fn report(&self, task: &'static str, how: String) {
        self.healthy.store(false, Ordering::SeqCst);
        tracing::error!(
            task,
            "the {task} task {how}; paywatch stops (exit code 1) so that its service manager \
             restarts it; nothing is lost, the ledger holds every pending verification and hook"
        );
        let _ = self.failures.send(TaskFailure { task, how });
    }
}

/// Tells the supervisor from inside a task (or a component it watches) that something it is
/// responsible for died. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FailureReporter {
    shared: Arc<Shared>,
}

impl FailureReporter {
    /// Reports `task` as failed, `how` saying what happened.
    pub fn report(&self, task: &'static str, how: String) {
        self.shared.report(task, how);
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    /// A supervisor with nothing to watch yet.
    pub fn new() -> Supervisor {
        let (sender, failures) = mpsc::unbounded_channel();
        Supervisor {
            shared: Arc::new(Shared {
                stopping: CancellationToken::new(),
                healthy: AtomicBool::new(true),
                failures: sender,
            }),
            failures,
        }
    }

    /// Wraps a task that must run until shutdown: if it panics, or returns before
    /// [`Supervisor::stopping`], the failure is logged at error naming `task` and reported.
    pub fn supervise<F>(&self, task: &'static str, future: F) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()>,
    {
        let shared = self.shared.clone();
        async move {
            match AssertUnwindSafe(future).catch_unwind().await {
                Ok(()) if shared.stopping.is_cancelled() => {}
                Ok(()) => shared.report(task, "ended unexpectedly".to_owned()),
                Err(panic) => shared.report(task, format!("panicked: {}", panic_message(&*panic))),
            }
        }
    }

    /// A handle for reporting failures found by other means (a component's own health).
    pub fn reporter(&self) -> FailureReporter {
        FailureReporter {
            shared: self.shared.clone(),
        }
    }

    /// Shutdown has begun: tasks returning from now on are not failures (panics still are).
    pub fn stopping(&self) {
        self.shared.stopping.cancel();
    }

    /// Whether no supervised task has failed (the watchdog pings only while this holds).
    #[cfg(test)]
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// A cheap probe, for other tasks, of whether no supervised task has failed.
    pub fn health(&self) -> impl Fn() -> bool + Send + Sync + Clone + 'static {
        let shared = self.shared.clone();
        move || shared.healthy.load(Ordering::SeqCst)
    }

    /// Waits for the first failure.
    pub async fn failed(&mut self) -> TaskFailure {
        match self.failures.recv().await {
            Some(failure) => failure,
            // The supervisor holds a sender itself, so the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// The first failure reported so far, if any (after the drain).
    pub fn failure(&mut self) -> Option<TaskFailure> {
        self.failures.try_recv().ok()
    }
}

/// The text of a panic payload (`panic!` with a string or a formatted message).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_panicking_task_is_reported_by_name_and_health_goes_false() {
        let mut supervisor = Supervisor::new();
        let health = supervisor.health();
        assert!(health());
        tokio::spawn(supervisor.supervise("hook dispatcher", async {
            panic!("a semaphore may not have more than MAX_PERMITS permits");
        }));
        let failure = tokio::time::timeout(DEADLINE, supervisor.failed())
            .await
            .expect("reported in time");
        assert_eq!(failure.task, "hook dispatcher");
        assert!(failure.how.contains("panicked: a semaphore"), "{failure}");
        assert!(!health(), "the watchdog stops pinging");
        assert!(!supervisor.healthy());
    }

    #[tokio::test]
    async fn a_task_that_returns_while_running_is_reported_but_not_once_stopping() {
        let mut supervisor = Supervisor::new();
        tokio::spawn(supervisor.supervise("reconciler", async {}));
        let failure = tokio::time::timeout(DEADLINE, supervisor.failed())
            .await
            .expect("reported in time");
        assert_eq!(
            failure.to_string(),
            "the reconciler task ended unexpectedly"
        );

        let mut supervisor = Supervisor::new();
        supervisor.stopping();
        supervisor.supervise("reconciler", async {}).await;
        assert_eq!(supervisor.failure(), None);
        assert!(supervisor.healthy());
        // A panic during the drain is still a failure.
        supervisor
            .supervise("verifier", async { panic!("boom") })
            .await;
        assert_eq!(
            supervisor.failure().map(|f| f.to_string()).as_deref(),
            Some("the verifier task panicked: boom")
        );
    }
}
