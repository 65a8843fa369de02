//! paywatch: tells a merchant, reliably and at once, that a paymennt payment link was paid.
//!
//! # Layout
//!
//! Data flows one way:
//!
//! ```text
//! sources (firestore listener, reconciler, webhooks) --Nudge--> verifier --Verified--> ledger --outbox--> hooks
//! ```
//!
//! - [`domain`]: checkout ids, statuses, money, Firestore coordinates. No I/O.
//! - [`settings`]: the TOML config, `PAYWATCH_*` overrides, secrets.
//! - [`paymennt`]: the HTTP client for paymennt's Merchant API and its wire types; the only
//!   place a [`paymennt::VerifiedCheckout`] can be built.
//! - [`sources`]: what nudges the verifier: the Firestore listener (with its journal, which
//!   turns Listen events into notes, tickets and nudges, and its watch set, kept equal to the
//!   ledger's), the reconciler, discovery and the webhook intake.
//! - [`verifier`]: Get Checkout for each nudge, one call per checkout at a time; it wakes the
//!   hook dispatcher after each transition that queued deliveries.
//! - [`ledger`]: the ledger: checkouts, verified transitions, the hook outbox, resume tokens,
//!   behind one async interface (`ledger::Backend`; SQLite today). All SQL lives here.
//! - [`hooks`]: the outbox dispatcher and the runner of the merchant's commands.
//! - [`http`]: the optional HTTP listener: webhook intake, the track endpoint, health checks.
//! - [`daemon`]: wiring and lifecycle only: startup, reload, drain, signals, supervision,
//!   systemd notifications.
//! - [`sandbox`]: a local stand-in for paymennt's API and Firestore's Listen.
//! - [`cli`]: the command line; the only module that prints to stdout.
//! - [`logging`]: text, journald and JSON log output.
//! - [`metrics`]: the daemon's figures in the Prometheus text format, for `/metrics`.

pub mod cli;
pub mod daemon;
pub mod domain;
pub mod hooks;
pub mod http;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod paymennt;
pub mod sandbox;
pub mod settings;
pub mod sources;
pub mod verifier;
