//! End-to-end tests: one binary for every surface (the ripgrep shape).

mod hooks;
mod interop;
