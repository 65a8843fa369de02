//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod cli;
mod common;
mod daemon;
mod firestore_auth;
mod hooks;
mod interop;
mod sandbox;
mod service;
