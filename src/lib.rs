//! paywatch: tells a merchant, reliably and at once, that a paymennt payment link was paid.
//!
//! # Layout
//!
//! Data flows one way:
//!
//! ```text
//! sources (firestore listener, reconciler) --Nudge--> verifier --Verified--> ledger --outbox--> hooks
//! ```
//!
//! - [`domain`]: checkout ids, statuses, money, Firestore coordinates. No I/O.
//! - [`paymennt`]: the HTTP client for paymennt's Merchant API and its wire types.
//! - [`sandbox`]: a local stand-in for paymennt's API and Firestore's Listen.
//! - [`hooks`]: running the merchant's commands.

pub mod cli;
pub mod daemon;
pub mod domain;
pub mod hooks;
pub mod ledger;
pub mod logging;
pub mod paymennt;
pub mod sandbox;
pub mod settings;
pub mod sources;
pub mod verifier;
