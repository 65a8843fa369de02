//! paywatch integration tests: all in one binary (see `[[test]]` in Cargo.toml).

mod interop;
