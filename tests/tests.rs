//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod bad_input;
mod browser;
mod chaos;
mod cli;
mod common;
mod daemon;
mod discovery;
mod firestore_auth;
mod hooks;
mod http;
mod interop;
mod logging;
mod metrics;
mod misconfigured;
mod properties;
mod sandbox;
mod secrets;
mod service;
mod url_hooks;
