//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod interop;
mod service;
