//! End-to-end tests: one binary for every surface (the ripgrep shape).
//!
//! What the files share is in `common`: `common::process` runs the built binary (one-shot
//! commands, `paywatch run` as a child, config files), `common::Daemon` runs the daemon in this
//! process, `common::setup` is the usual sandbox, config and ledger, and `common::wait_for` is
//! the one way to wait (with a deadline).

mod bad_input;
mod browser;
mod chaos;
mod cli;
mod common;
mod daemon;
mod discovery;
mod failover;
mod firestore_auth;
mod hooks;
mod http;
mod interop;
mod ledger_copy;
mod logging;
mod metrics;
mod misconfigured;
mod properties;
mod sandbox;
mod secrets;
mod service;
mod url_hooks;
