//! The optional HTTP listener (`[http] listen`): webhook intake, the track endpoint for
//! backends, the health checks, and `/metrics`.
//!
//! Owns: binding the address, serving the routes of [`routes`] with the source address of each
//! connection, and stopping gracefully (no new connections; requests in flight finish).
//! Must never: decide a status or record one (webhooks only nudge; the track endpoint records a
//! claim exactly as `paywatch track` does), or put a token or key in a log line or a response.

pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::daemon::health::Health;
use crate::domain::{CheckoutId, FirestoreLocation};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::settings::{HttpSettings, Secret, SettingsError, is_loopback_host};
use crate::sources::Nudge;
use crate::sources::webhook::WebhookIntake;

/// A checkout the track endpoint just recorded: the daemon watches it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewlyTracked {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// Its document.
    pub location: FirestoreLocation,
}

/// What `POST /v1/checkouts` needs (absent: the endpoint is off).
pub struct TrackEndpoint {
    /// The bearer token.
    pub token: Secret,
    /// Where checkouts are recorded.
    pub ledger: Ledger,
    /// The daemon's watch set.
    pub watch: mpsc::Sender<NewlyTracked>,
    /// The verifier (a newly tracked checkout is verified at once).
    pub nudges: mpsc::Sender<Nudge>,
}

/// Everything the handlers share.
pub struct HttpContext {
    /// Webhook notifications become nudges here.
    pub intake: WebhookIntake,
    /// The track endpoint, if a token is configured.
    pub track: Option<TrackEndpoint>,
    /// Liveness and readiness.
    pub health: Health,
    /// The largest body accepted.
    pub max_body_bytes: usize,
    /// The webhook signature header.
    pub signature_header: http::HeaderName,
    /// The daemon's figures, served at `/metrics`.
    pub metrics: Metrics,
    /// The ledger the scrape-time gauges are read from.
    pub ledger: Ledger,
}

impl HttpContext {
    /// The context for `settings`, nudging through `nudges` and watching through `watch`.
    ///
    /// # Errors
    ///
    /// A token or key is configured but cannot be read; a bad header name.
    pub fn new(
        settings: &HttpSettings,
        ledger: Ledger,
        nudges: mpsc::Sender<Nudge>,
        watch: mpsc::Sender<NewlyTracked>,
        health: Health,
        metrics: Metrics,
    ) -> Result<HttpContext, SettingsError> {
        let intake = WebhookIntake::new(settings, ledger.clone(), nudges.clone())?;
        let track = settings.token()?.map(|token| TrackEndpoint {
            token,
            ledger: ledger.clone(),
            watch,
            nudges,
        });
        let signature_header = http::HeaderName::from_bytes(
            settings.webhook_signature_header.as_bytes(),
        )
        .map_err(|_| {
            SettingsError("'http.webhook_signature_header' is not a valid HTTP header name".into())
        })?;
        Ok(HttpContext {
            intake,
            track,
            health,
            max_body_bytes: settings.max_body_bytes,
            signature_header,
            metrics,
            ledger,
        })
    }
}

/// Binds `addr`; a non-loopback address is allowed but logged.
///
/// # Errors
///
/// The address cannot be bound (in use, not local, no permission), named.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for [http] listen; is another process using it?")
    })?;
    if !is_loopback_host(&addr.ip().to_string()) {
        tracing::warn!(%addr, "the HTTP listener is on a non-loopback address: webhook intake and health checks are reachable from the network (the track endpoint needs its token); put it behind TLS and a firewall");
    }
    Ok(listener)
}

/// Serves `context`'s routes on `listener` until `stop`, then lets requests in flight finish.
/// Returning before `stop` is a failure (the daemon's supervisor reports it).
pub async fn serve(listener: TcpListener, context: Arc<HttpContext>, stop: CancellationToken) {
    let app: Router = routes::router(context);
    let addr = listener.local_addr().ok();
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop.clone().cancelled_owned())
    .await;
    match served {
        Ok(()) if stop.is_cancelled() => tracing::debug!(?addr, "HTTP listener stopped"),
        Ok(()) => tracing::error!(?addr, "the HTTP listener stopped unexpectedly"),
        Err(error) => tracing::error!(?addr, %error, "the HTTP listener failed"),
    }
}
