//! The daemon's role on a shared PostgreSQL ledger: keeping the lease, and standing by while
//! another daemon holds it.
//!
//! Owns: [`stand_by`]: what a daemon without the lease does until it wins it (answers
//! `/healthz`, `/readyz` 503 "standby", `/metrics` with `paywatch_active 0`; refuses webhooks
//! and tracking; tells systemd it is up and standing by; keeps the watchdog fed; applies a
//! reload to the settings the next active term starts with).
//! Must never: listen, verify, reconcile, discover or run a hook (an SQLite ledger has no
//! standby: its daemon holds the file lock and acts from the start).

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::lease::LeaseKeeper;
use super::stages::{Wiring, serve_http, start_watchdog};
use super::{Control, DaemonStatus, RunOptions, supervisor};
use crate::http::HttpContext;
use crate::http::health::Health;
use crate::ledger::Ledger;
use crate::ledger::postgres::Role;
use crate::settings::Settings;
use crate::verifier::VerifierStats;

/// How a standby's wait ended.
pub(super) enum Waited {
    /// This daemon holds the lease now, at this epoch: start acting.
    Active(i64),
    /// Told to shut down while standing by.
    Told,
}

/// What the standby's health and status line say.
fn standby_text(role: &Role) -> String {
    match role {
        Role::Standby {
            holder: Some((holder, epoch)),
        } => format!(
            "standby: the ledger's lease is held by {holder} at epoch {epoch}; this daemon \
             takes over if it is not renewed"
        ),
        _ => "standby: this daemon does not hold the ledger's lease (yet); it takes it when \
              free"
            .to_owned(),
    }
}

/// Stands by until this daemon holds the lease or is told to stop.
///
/// # Errors
///
/// The HTTP listener cannot be bound, or the lease keeper stopped (a bug: the daemon exits so
/// that its service manager restarts it).
pub(super) async fn stand_by(
    settings: &mut Settings,
    keeper: &LeaseKeeper,
    ledger: &Ledger,
    control: &mut mpsc::Receiver<Control>,
    options: &RunOptions,
) -> anyhow::Result<Waited> {
    let mut role = keeper.role();
    if let Some(epoch) = role.borrow_and_update().epoch() {
        return Ok(Waited::Active(epoch));
    }
    let metrics = &options.metrics;
    metrics.set_active(false);
    let supervisor = supervisor::Supervisor::new();
    let (_, verifier) = watch::channel(VerifierStats::default());
    let health = Health::new(
        ledger.clone(),
        None,
        verifier,
        settings.http.verify_failing_after,
    );
    let mut why = standby_text(&role.borrow());
    health.set_standby(Some(why.clone()));
    tracing::info!("{why}");

    // Only the health routes and /metrics answer; webhooks and tracking get 503 (the handlers
    // look at the health's standby mark before using these never-read channels).
    let http_stop = CancellationToken::new();
    let http_task = match settings.http.listen {
        Some(addr) => {
            let (nudges, _) = mpsc::channel(1);
            let (watch, _) = mpsc::channel(1);
            let context = HttpContext::new(
                &settings.http,
                ledger.clone(),
                nudges,
                watch,
                health.clone(),
                metrics.clone(),
            )?;
            let sources = CancellationToken::new();
            let wiring = Wiring {
                settings,
                ledger,
                metrics,
                supervisor: &supervisor,
                sources: &sources,
            };
            let published = options.http_addr.as_ref();
            Some(serve_http(&wiring, addr, context, published, &http_stop).await?)
        }
        None => None,
    };
    if let Some(status) = &options.status {
        status.send_replace(DaemonStatus::default());
    }
    options.notifier.ready();
    options.notifier.status(&why);
    let (watchdog_stop, watchdog) = start_watchdog(ledger, &options.notifier, &supervisor, false);

    let mut supervisor = supervisor;
    let waited = loop {
        tokio::select! {
            failed = supervisor.failed() => {
                break Err(anyhow::anyhow!("{failed}; paywatch stopped so that its service manager restarts it"));
            }
            command = control.recv() => match command {
                Some(Control::Reload) => {
                    options.notifier.reloading();
                    reload_standing_by(settings, options);
                    options.notifier.ready();
                }
                Some(Control::Shutdown) | None => break Ok(Waited::Told),
            },
            changed = role.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!(
                        "the lease keeper stopped; paywatch stopped so that its service manager restarts it"
                    ));
                }
                let now = role.borrow_and_update().clone();
                if let Some(epoch) = now.epoch() {
                    break Ok(Waited::Active(epoch));
                }
                let text = standby_text(&now);
                if text != why {
                    tracing::info!("{text}");
                    why = text;
                    health.set_standby(Some(why.clone()));
                    options.notifier.status(&why);
                }
            }
        }
    };
    supervisor.stopping();
    http_stop.cancel();
    if let Some(task) = http_task {
        let _ = tokio::time::timeout(crate::http::HTTP_DRAIN + Duration::from_secs(1), task).await;
    }
    watchdog_stop.cancel();
    let _ = watchdog.await;
    waited
}

/// A reload while standing by: the settings are re-read now (errors logged, the running ones
/// kept) and take effect when this daemon becomes active; the log level at once. The ledger
/// and `[ha]` stay as they were started (they need a restart).
fn reload_standing_by(settings: &mut Settings, options: &RunOptions) {
    match Settings::load(options.config_path.as_deref()) {
        Ok(mut fresh) => {
            if let Err(error) = options.log.set_level(&fresh.log.level) {
                tracing::error!("config reload: {error}; keeping the log level");
            }
            if format!("{:?}{:?}", fresh.ledger, fresh.ha)
                != format!("{:?}{:?}", settings.ledger, settings.ha)
            {
                tracing::warn!(
                    "config reload: [ledger] and [ha] changes need a restart; keeping the running ones"
                );
            }
            fresh.ledger = settings.ledger.clone();
            fresh.ha = settings.ha.clone();
            *settings = fresh;
            tracing::info!("config reloaded; it applies when this daemon becomes active");
        }
        Err(error) => {
            tracing::error!("config reload failed; keeping the running config: {error}");
        }
    }
}
