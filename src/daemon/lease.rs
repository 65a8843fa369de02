//! This daemon's side of a PostgreSQL ledger's lease.
//!
//! Owns: [`LeaseKeeper`]: starting the lease keeper's task, handing out the role it publishes
//! (the store fences its writes with it; the daemon follows it), and resigning at shutdown.
//! Must never: decide what the daemon does in a role (`standby.rs` and `mod.rs` do).

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ledger::postgres::{PgStore, Role, keeper};
use crate::settings::Settings;

/// This daemon's side of the lease: the keeper's task and the role it publishes.
pub(super) struct LeaseKeeper {
    role: watch::Receiver<Role>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts keeping the lease of `store` for `[ha] lease`: standby at first, active once won.
    pub(super) fn start(store: &PgStore, settings: &Settings) -> LeaseKeeper {
        let stop = CancellationToken::new();
        let (role, task) = keeper::spawn(
            store.lease(&settings.ha),
            store.target().clone(),
            stop.clone(),
        );
        LeaseKeeper { role, stop, task }
    }

    /// The role channel (what the store fences its writes with, and what the daemon follows).
    pub(super) fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Stops keeping the lease, resigning it if held (a standby takes over at once).
    pub(super) async fn resign(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
