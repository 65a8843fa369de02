//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod browser;
mod cli;
mod common;
mod daemon;
mod hooks;
mod interop;
mod logging;
mod sandbox;
mod service;
