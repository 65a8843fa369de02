//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod chaos;
mod cli;
mod common;
mod daemon;
mod hooks;
mod interop;
mod metrics;
mod properties;
mod sandbox;
mod service;
