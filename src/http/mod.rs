//! The optional HTTP listener (`[http] listen`): webhook intake, the track endpoint for
//! backends, the health checks, and `/metrics`.
//!
//! Owns: binding the address, serving the routes of [`routes`] with the source address of each
//! connection, the limits that keep clients from starving the daemon, and stopping gracefully
//! (no new connections; requests in flight finish within the listener's own short drain).
//! Must never: decide a status or record one (webhooks only nudge; the track endpoint records a
//! claim exactly as `paywatch track` does), put a token or key in a log line or a response, or
//! hold more connections (and so descriptors) than `[http] max_connections` (issue 21).
//!
//! # Limits
//!
//! - **Connections**: at most [`ServeLimits::max_connections`] open at once. At the cap the
//!   accept loop waits for one to close instead of accepting: new connections queue in the
//!   kernel's listen backlog, which costs the daemon no descriptor, so hooks can still start.
//! - **Header timeout**: the request line and headers must arrive within
//!   [`ServeLimits::header_timeout`] (hyper's own timer, counted from the connection's opening
//!   or the end of the previous response), else the connection is closed.
//! - **Request timeout**: the whole request, body included, must be answered within
//!   [`ServeLimits::request_timeout`], else 408 (tower-http's `TimeoutLayer`).
//! - **Idle timeout**: a kept-alive connection with no request for
//!   [`ServeLimits::idle_timeout`] is closed (or sooner, by the header timeout).
//! - **Drain**: on stop, idle connections close at once and the others get
//!   [`ServeLimits::drain`] to finish; what is left then is closed, so a half-sent request never
//!   holds up the daemon's shutdown or eats the drain time of verifications and hooks.

pub mod health;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::settings::{HttpSettings, Secret, SettingsError, is_loopback_host};
use crate::sources::Nudge;
use crate::sources::webhook::WebhookIntake;
use health::Health;

pub use crate::sources::firestore::NewlyTracked;

/// What `POST /v1/checkouts` needs (absent: the endpoint is off).
pub struct TrackEndpoint {
    /// The bearer token.
    pub token: Secret,
    /// Where checkouts are recorded.
    pub ledger: Ledger,
    /// The Firestore source's watch set (see [`NewlyTracked`]).
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

/// The `/metrics` exposition of `metrics`, with the ledger-derived gauges read from `ledger`
/// now (one read-only ledger call, off the async threads).
///
/// # Errors
///
/// The ledger cannot be read (then nothing is served: stale-looking gauges would hide it).
pub async fn metrics_exposition(
    metrics: &crate::metrics::Metrics,
    ledger: &Ledger,
) -> Result<String, crate::metrics::MetricsError> {
    use crate::metrics::MetricsError;
    let figures = ledger
        .gauges()
        .await
        .map_err(|error| MetricsError::Ledger(error.to_string()))?;
    metrics.render(&figures)
}

/// Binds `addr`; a non-loopback address is allowed but logged.
///
/// # Errors
///
/// The address cannot be bound (in use, not local, no permission), named.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = listen(addr).with_context(|| {
        format!("cannot listen on {addr} for [http] listen; is another process using it?")
    })?;
    if !is_loopback_host(&addr.ip().to_string()) {
        tracing::warn!(%addr, "the HTTP listener is on a non-loopback address: webhook intake and health checks are reachable from the network (the track endpoint needs its token); put it behind TLS and a firewall");
    }
    Ok(listener)
}

/// The listen backlog: connections the kernel completes and queues while the listener is at
/// its cap (or busy), costing the daemon no descriptor. The kernel caps it at
/// `net.core.somaxconn`. Tokio's default (128) would make clients beyond it retry their
/// handshake for seconds.
const BACKLOG: u32 = 1024;

/// A listening socket on `addr` with [`BACKLOG`] (and `SO_REUSEADDR`, as tokio's `bind` sets).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The longest the listener's drain takes at shutdown (less if `[daemon] drain_timeout` is
/// shorter): requests still open then are closed, and the drain time left belongs to
/// verifications and hooks.
pub const HTTP_DRAIN: Duration = Duration::from_secs(2);

/// How long the accept loop waits after the system refused a connection for lack of
/// descriptors or memory, doubling up to [`MAX_ACCEPT_BACKOFF`].
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The longest wait between accept attempts while the system keeps refusing.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The limits one listener serves under (`[http]` settings; see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// The request line and headers must arrive within this.
    pub header_timeout: Duration,
    /// A request must be answered within this (408 otherwise).
    pub request_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; at the cap, accepting pauses.
    pub max_connections: usize,
    /// How long requests in flight may take to finish once the listener stops.
    pub drain: Duration,
}

impl ServeLimits {
    /// The limits of `settings`, draining within `drain`.
    pub fn new(settings: &HttpSettings, drain: Duration) -> ServeLimits {
        ServeLimits {
            header_timeout: settings.header_timeout,
            request_timeout: settings.request_timeout,
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections.max(1),
            drain,
        }
    }
}

/// Serves `context`'s routes on `listener` under `limits` until `stop`, then lets requests in
/// flight finish within `limits.drain` and closes the rest. Returning before `stop` is a
/// failure (the daemon's supervisor reports it).
pub async fn serve(
    listener: TcpListener,
    context: Arc<HttpContext>,
    limits: ServeLimits,
    stop: CancellationToken,
) {
    let app: Router =
        routes::router(context).layer(tower_http::timeout::TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ));
    let addr = listener.local_addr().ok();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut accepting = Accepting::default();
    loop {
        let (stream, peer, permit) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(&listener, &slots, &mut accepting, limits.max_connections) => accepted,
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            limits,
            stop.clone(),
            permit,
        ));
    }
    // No new connections from here on: closing the socket refuses them.
    drop(listener);
    let open = connections.len();
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?addr,
            open = connections.len(),
            "closing HTTP connections still open {} after the listener stopped (of {open})",
            humantime::format_duration(limits.drain)
        );
        connections.shutdown().await;
    }
    if stop.is_cancelled() {
        tracing::debug!(?addr, "HTTP listener stopped");
    } else {
        tracing::error!(?addr, "the HTTP listener stopped unexpectedly");
    }
}

/// What the accept loop remembers between connections, so a condition is logged once when it
/// starts and once when it ends, not at every connection.
#[derive(Debug, Default)]
struct Accepting {
    /// The connection cap was reached and accepting paused.
    at_cap: bool,
    /// The system refused connections (no descriptors or memory) since the last success.
    refused: u32,
}

/// Waits for a free connection slot, then for a connection. A refusal for lack of descriptors
/// or memory waits (with backoff) and tries again; it never ends the loop.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    state: &mut Accepting,
    cap: usize,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    if slots.available_permits() == 0 && !state.at_cap {
        state.at_cap = true;
        tracing::warn!(
            max_connections = cap,
            "the HTTP listener has {cap} connections open ([http] max_connections): new ones wait until one closes; \
             if this is not an attack, raise max_connections"
        );
    }
    let permit = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the listener never closes its semaphore");
    if state.at_cap {
        state.at_cap = false;
        tracing::info!("the HTTP listener is below its connection cap again");
    }
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if state.refused > 0 {
                    tracing::info!(
                        refused = state.refused,
                        "the HTTP listener accepts connections again"
                    );
                    state.refused = 0;
                }
                return (stream, peer, permit);
            }
            Err(error) if is_resource_shortage(&error) => {
                state.refused = state.refused.saturating_add(1);
                if state.refused == 1 {
                    tracing::error!(
                        %error,
                        "the HTTP listener cannot accept connections: the process is out of file descriptors or memory; \
                         check LimitNOFILE= and what else holds descriptors; retrying"
                    );
                }
                let backoff = ACCEPT_BACKOFF
                    .saturating_mul(1 << state.refused.min(5))
                    .min(MAX_ACCEPT_BACKOFF);
                tokio::time::sleep(backoff).await;
            }
            // A connection reset before it was accepted, and the like: that client's problem.
            Err(error) => tracing::debug!(%error, "accepting an HTTP connection failed"),
        }
    }
}

/// Whether an accept failed because the process or the system ran out of descriptors or
/// memory: the daemon's condition, not the peer's.
fn is_resource_shortage(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    error.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
        )
    })
}

/// Requests in flight on one connection and when the last one ended: the idle timeout's clock.
#[derive(Debug)]
struct Activity {
    /// Requests started and not yet answered.
    in_flight: AtomicUsize,
    /// When the last answer was produced (None: no request yet, the header timeout governs).
    last_answer: std::sync::Mutex<Option<Instant>>,
}

impl Activity {
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        *self
            .last_answer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Since when the connection has been idle between requests, if it is.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        *self
            .last_answer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Serves one connection until it ends, the idle timeout closes it, or `stop` asks it to
/// finish; holds its connection slot (`_permit`) until then.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ServeLimits,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_answer: std::sync::Mutex::new(None),
    });
    let (begun, ended) = (activity.clone(), activity.clone());
    let service = app
        .map_request(move |request: http::Request<Incoming>| {
            begun.begin();
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        })
        .map_response(move |response| {
            ended.end();
            response
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let mut idle_check = Instant::now() + limits.idle_timeout;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%peer, %error, "HTTP connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_check), if !closing => {
                match activity.idle_since() {
                    Some(since) if since + limits.idle_timeout <= Instant::now() => {
                        tracing::debug!(%peer, "closing an idle HTTP connection");
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    Some(since) => idle_check = since + limits.idle_timeout,
                    None => idle_check = Instant::now() + limits.idle_timeout,
                }
            }
        }
    }
}
