//! A throwaway PostgreSQL cluster for the end-to-end tests: the same helper the ledger's unit
//! tests use (one cluster per test binary, one database per test; a skip message without
//! PostgreSQL, a failure under `CI=true`).

#[path = "../../src/ledger/postgres/cluster.rs"]
mod cluster;

#[allow(unused_imports)]
pub use cluster::{Cluster, Proxy, cluster, database};

use paywatch::ledger::Ledger;
use paywatch::ledger::postgres::{PgStore, Session};
use paywatch::settings::{LedgerSettings, Secret};

/// The PostgreSQL store at `url` as an operator's command opens it (no lease needed).
///
/// # Panics
///
/// When it cannot be opened.
#[allow(dead_code)]
pub async fn operator_store(url: &str) -> PgStore {
    let settings = LedgerSettings {
        url: Some(Secret::new(url)),
        ..LedgerSettings::default()
    };
    PgStore::open(&settings, Session::Operator)
        .await
        .expect("open the PostgreSQL ledger as an operator")
}

/// The ledger on [`operator_store`].
#[allow(dead_code)]
pub async fn operator_ledger(url: &str) -> Ledger {
    Ledger::postgres(operator_store(url).await)
}
