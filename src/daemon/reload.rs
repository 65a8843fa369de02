//! Settings to stages: what the listener and the verifier are built from, and a re-read
//! config (SIGHUP) applied to the running daemon.
//!
//! Owns: [`listener_options`], the verifier's config, and [`reload`]: which changes take
//! effect at once (hooks, log level, reconcile interval, paymennt credentials) and which need
//! a restart (said in the log).
//! Must never: stop the daemon over a config that fails to load (the running one is kept and
//! the error logged), or print a section it compares (they may hold secrets).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hooks::config::HookSet;
use crate::hooks::dispatcher::DispatcherHandle;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::paymennt::Client;
use crate::settings::Settings;
use crate::sources::firestore::ListenerOptions;
use crate::verifier::VerifierConfig;

/// What a reload changes in the running daemon, and where it reads the config from.
pub(super) struct ReloadTargets {
    /// The config file (None: no file, reload re-applies the environment).
    pub config_path: Option<PathBuf>,
    /// The log filter, for the level.
    pub log: LogHandle,
    /// Where the rebuilt paymennt client counts its calls.
    pub metrics: Metrics,
    /// The verifier's client and hooks.
    pub verifier: watch::Sender<VerifierConfig>,
    /// The reconciler's interval.
    pub interval: watch::Sender<Duration>,
    /// The paymennt client of the reconciler and discovery.
    pub client: watch::Sender<Client>,
    /// The hook dispatcher's hooks.
    pub dispatcher: DispatcherHandle,
}

/// Builds the listener's options from settings.
///
/// # Errors
///
/// The auth mode's credentials are missing or unreadable (a [`crate::settings::SettingsError`],
/// exit code 2).
pub fn listener_options(settings: &Settings) -> anyhow::Result<ListenerOptions> {
    // firebase-anonymous keeps its identity next to the ledger, so a restart reuses it.
    let auth = crate::sources::firestore::FirestoreAuth::from_settings(&settings.firestore)?
        .with_identity_file(settings.ledger.firebase_identity_path(), false);
    Ok(ListenerOptions {
        endpoint: settings.firestore.endpoint(),
        auth,
        ca_file: settings.firestore.ca_file.clone(),
        mode: settings.firestore.stream_mode,
        targets_per_stream: settings.firestore.targets_per_stream,
        streams_per_connection: settings.firestore.streams_per_connection,
        idle_timeout: settings.firestore.idle_timeout,
        add_ack_timeout: settings.firestore.add_ack_timeout,
        ..ListenerOptions::default()
    })
}

/// The verifier's config from settings, calling paymennt with `client`.
pub(super) fn verifier_config(settings: &Settings, client: Client) -> VerifierConfig {
    VerifierConfig {
        client,
        hooks: Arc::new(settings.hooks.clone()),
        refund_watch: settings.firestore.refund_watch,
    }
}

/// Applies a re-read config: hooks, log level and reconcile interval change at once; other
/// sections need a restart, which is said in the log.
pub(super) fn reload(settings: &mut Settings, to: &ReloadTargets) {
    let ReloadTargets {
        config_path,
        log,
        metrics,
        verifier: config,
        interval,
        client: client_sender,
        dispatcher,
    } = to;
    let loaded = Settings::load(config_path.as_deref()).and_then(|fresh| {
        let hooks = HookSet::from_settings(&fresh)?;
        // Rebuilt, so rotated API credentials (a new secret file) take effect now.
        let client = Client::from_settings(&fresh.paymennt)?
            .with_metrics(metrics.clone())
            .with_credential_status(client_sender.borrow().credential_status().clone());
        Ok((fresh, hooks, client))
    });
    let (fresh, hooks, client) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::error!("config reload failed; keeping the running config: {error}");
            return;
        }
    };
    // The verifier's hook list (which deliveries are queued) and the dispatcher's (how they
    // run) change together.
    dispatcher.reload(hooks);
    if let Err(error) = log.set_level(&fresh.log.level) {
        tracing::error!("config reload: {error}; keeping the log level");
    }
    client_sender.send_replace(client.clone());
    config.send_replace(verifier_config(&fresh, client));
    // Only what changed is applied and named, so an unchanged reload is quiet.
    interval.send_if_modified(|current| {
        let changed = *current != fresh.reconcile.interval;
        *current = fresh.reconcile.interval;
        changed
    });
    let mut applied = Vec::new();
    if format!("{:?}", fresh.hooks) != format!("{:?}", settings.hooks) {
        applied.push("[[hooks]]");
    }
    if fresh.log.level != settings.log.level {
        applied.push("log.level");
    }
    if fresh.reconcile.interval != settings.reconcile.interval {
        applied.push("reconcile.interval");
    }
    if format!("{:?}", fresh.paymennt) != format!("{:?}", settings.paymennt) {
        applied.push("[paymennt]");
    }
    let mut restart_needed = Vec::new();
    if fresh.ledger.path != settings.ledger.path {
        restart_needed.push("[ledger]");
    }
    if fresh.paymennt.concurrency != settings.paymennt.concurrency {
        restart_needed.push("paymennt.concurrency");
    }
    if fresh.hooks_concurrency != settings.hooks_concurrency {
        restart_needed.push("hooks_concurrency");
    }
    if fresh.reconcile.page_size != settings.reconcile.page_size {
        restart_needed.push("reconcile.page_size");
    }
    if format!("{:?}", fresh.discovery) != format!("{:?}", settings.discovery) {
        restart_needed.push("[discovery]");
    }
    // The listener keeps its connections and credentials; compare what it was built from.
    if listener_options_key(settings) != listener_options_key(&fresh)
        || settings.firestore.enabled != fresh.firestore.enabled
    {
        restart_needed.push("[firestore]");
    }
    if format!("{:?}", settings.http) != format!("{:?}", fresh.http) {
        restart_needed.push("[http]");
    }
    if !restart_needed.is_empty() {
        tracing::warn!(
            "config reload: changes to {} take effect only after a restart",
            restart_needed.join(", ")
        );
    }
    if applied.is_empty() && restart_needed.is_empty() {
        tracing::info!("config reloaded: nothing changed (secret and credential files re-read)");
    } else if !applied.is_empty() {
        tracing::info!(
            hooks = fresh.hooks.len(),
            reconcile_interval = ?fresh.reconcile.interval,
            level = %fresh.log.level,
            "config reloaded: {} changed",
            applied.join(", ")
        );
    }
    *settings = fresh;
}

/// What the listener was built from, comparable across reloads (credentials by file path).
fn listener_options_key(settings: &Settings) -> String {
    format!("{:?}", listener_options(settings).ok())
}
