//! OS signals to daemon controls: SIGTERM and SIGINT drain, SIGHUP reloads.
//!
//! Owns: the signal-hook registration for the process.
//! Must never: act on a signal itself; it only forwards a [`Control`].

use futures::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;

use super::Control;

/// Registers the handlers and forwards signals as controls until the receiver is dropped.
/// A second SIGTERM or SIGINT while draining is forwarded too (it changes nothing: the drain
/// has its own deadline).
///
/// # Errors
///
/// The handlers cannot be registered.
pub fn forward(controls: mpsc::Sender<Control>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    Ok(tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            let control = match signal {
                SIGHUP => Control::Reload,
                _ => Control::Shutdown,
            };
            tracing::info!(signal = signal_name(signal), "signal received");
            if controls.send(control).await.is_err() {
                return;
            }
        }
    }))
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGHUP => "SIGHUP",
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "other",
    }
}
