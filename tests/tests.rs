//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod cli;
mod common;
mod daemon;
mod hooks;
mod interop;
mod metrics;
mod sandbox;
mod service;
