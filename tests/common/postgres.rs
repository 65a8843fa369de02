//! A throwaway PostgreSQL cluster for the end-to-end tests: the same helper the ledger's unit
//! tests use (one cluster per test binary, one database per test; a skip message without
//! PostgreSQL, a failure under `CI=true`).

#[path = "../../src/ledger/postgres/cluster.rs"]
mod cluster;

#[allow(unused_imports)]
pub use cluster::{Cluster, Proxy, cluster, database};
