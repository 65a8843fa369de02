//! paywatch: tells a merchant, reliably and at once, that a paymennt payment link was paid.
//!
//! # Layout
//!
//! Data flows one way:
//!
//! ```text
//! sources (Firestore listener, reconciler, discovery, webhooks)
//!     --Nudge--> verifier --VerifiedCheckout--> ledger (transition + outbox) --wake--> hooks
//! ```
//!
//! Modules, lowest layer first. A module imports only from the layers above it in this list
//! (`.ci/check-imports.py` checks it, and that no two files import each other):
//!
//! - [`domain`]: checkout ids, statuses, money, Firestore coordinates, `Secret` scrubbing. No I/O.
//! - [`settings`]: the TOML config (one file per section), `PAYWATCH_*` overrides, secrets.
//!   Plain data: building what they describe belongs to the module that uses it.
//! - [`metrics`]: the registry and its handles; the figures `/metrics` shows.
//! - [`paymennt`]: the HTTP client for paymennt's Merchant API, its wire types and the intake
//!   of a create-link response; the only place a [`paymennt::VerifiedCheckout`] can be built.
//! - [`ledger`]: checkouts, verified transitions, the hook outbox, tickets, Listen state and
//!   discovery rounds, behind one async interface (`ledger::Backend`; SQLite, and the
//!   PostgreSQL foundation in `ledger::postgres`). It records only a `VerifiedCheckout`. All SQL
//!   lives here.
//! - [`sources`]: what nudges the verifier: the Firestore listener (its journal turns Listen
//!   events into notes, tickets and nudges; its watch set follows the ledger's), the
//!   reconciler, discovery and the webhook intake. A source sends nudges, nothing more.
//! - [`hooks`]: the outbox dispatcher, the runner of the merchant's commands and the poster of
//!   signed URL hooks.
//! - [`verifier`]: Get Checkout for each nudge, one call per checkout at a time; records the
//!   answer and wakes the hook dispatcher after a transition that queued deliveries.
//! - [`http`]: the optional HTTP listener: webhook intake, the track endpoint, health checks
//!   and `/metrics`.
//! - [`daemon`]: wiring and lifecycle only: startup, reload, drain, signals, supervision,
//!   systemd notifications.
//! - [`cli`]: the command line; the only module that prints to stdout.
//!
//! Beside the layers: [`logging`] (text, journald and JSON log output, used by `cli`) and
//! [`sandbox`] (a local stand-in for paymennt's API and Firestore's Listen; it uses only
//! `domain` and `paymennt::wire`).

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
