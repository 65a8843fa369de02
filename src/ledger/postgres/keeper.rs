//! Keeping the lease: the task that makes this daemon active or standby.
//!
//! Owns: the role ([`Role`]) published on a watch channel, winning the lease, renewing it every
//! third of its length, the local deadline past which an active daemon stops acting when it
//! cannot renew (the database lost), waking a standby on the lease channel's notifications, and
//! resigning at shutdown. Every role change is logged at warn; losing the database while active
//! at error.
//! Must never: report `Active` past the local deadline (the time the last successful renewal
//! was *sent* plus the lease: the database's expiry is never earlier), or keep a lost epoch:
//! a lease lost once is only ever won again with a new epoch.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Lease, Session, Target};

/// This daemon's role on a shared ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not (or no longer) holding the lease: listen, verify, reconcile, discover and run hooks
    /// only when this changes to `Active`.
    Standby {
        /// The holder seen last, with its epoch, if any daemon holds the lease.
        holder: Option<(String, i64)>,
    },
    /// Holding the lease at this epoch: every write carries it.
    Active {
        /// The epoch won.
        epoch: i64,
    },
}

impl Role {
    /// The epoch to write with, while active.
    pub fn epoch(&self) -> Option<i64> {
        match self {
            Role::Active { epoch } => Some(*epoch),
            Role::Standby { .. } => None,
        }
    }
}

/// Starts keeping `lease` until `cancel`: returns the role channel (standby at first) and the
/// task, which resigns the lease (waking the standbys) when cancelled while active.
pub fn spawn(
    lease: Lease,
    target: Target,
    cancel: CancellationToken,
) -> (watch::Receiver<Role>, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = watch::channel(Role::Standby { holder: None });
    let task = tokio::spawn(keep(lease, target, sender, cancel));
    (receiver, task)
}

async fn keep(lease: Lease, target: Target, role: watch::Sender<Role>, cancel: CancellationToken) {
    let ttl = lease.ttl();
    let renew_every = ttl / 3;
    // A standby also tries every half lease, in case a notification was missed.
    let standby_poll = ttl / 2;
    let mut wake = Wake::new(target.clone());
    let mut active: Option<(i64, Instant)> = None;
    let mut unreachable_logged = false;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        match active {
            None => {
                let mut wait = standby_poll;
                // Listen before trying, so a resignation right after a lost election wakes us.
                wake.listen(standby_poll).await;
                let sent = Instant::now();
                match lease.elect().await {
                    Ok(Some(epoch)) => {
                        tracing::warn!(
                            holder = lease.holder(),
                            epoch,
                            ledger = target.describe(),
                            "role: active (won the ledger's lease)"
                        );
                        unreachable_logged = false;
                        active = Some((epoch, sent + ttl));
                        role.send_replace(Role::Active { epoch });
                        continue;
                    }
                    Ok(None) => {
                        unreachable_logged = false;
                        let row = lease.current().await.ok().flatten().filter(|row| row.live);
                        // Try again just after the lease would run out, by the database's clock.
                        wait = row.as_ref().map_or(standby_poll, |row| {
                            standby_poll.min(row.remaining + Duration::from_millis(50))
                        });
                        let holder = row.map(|row| (row.holder, row.epoch));
                        role.send_if_modified(|current| {
                            let next = Role::Standby { holder };
                            if *current == next {
                                return false;
                            }
                            if matches!(current, Role::Active { .. }) {
                                tracing::warn!(?next, "role: standby");
                            }
                            *current = next;
                            true
                        });
                    }
                    Err(error) => {
                        if !unreachable_logged {
                            tracing::error!(
                                %error,
                                "standby cannot reach the ledger to take the lease; retrying"
                            );
                            unreachable_logged = true;
                        }
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = wake.next(wait) => {}
                }
            }
            Some((epoch, deadline)) => {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(renew_every) => {}
                }
                let sent = Instant::now();
                let renewed = tokio::select! {
                    result = lease.renew(epoch) => Some(result),
                    () = tokio::time::sleep_until(deadline) => None,
                };
                match renewed {
                    Some(Ok(true)) => {
                        if unreachable_logged {
                            tracing::warn!(epoch, "the ledger answers again; still active");
                            unreachable_logged = false;
                        }
                        active = Some((epoch, sent + ttl));
                    }
                    Some(Ok(false)) => {
                        tracing::warn!(
                            epoch,
                            "role: standby (the lease expired or passed to another daemon \
                             before it was renewed; was this process paused?)"
                        );
                        active = None;
                        role.send_replace(Role::Standby { holder: None });
                    }
                    Some(Err(error)) if Instant::now() < deadline => {
                        tracing::error!(
                            %error,
                            epoch,
                            "cannot renew the ledger's lease; still active until it runs out"
                        );
                        unreachable_logged = true;
                    }
                    Some(Err(_)) | None => {
                        tracing::error!(
                            epoch,
                            ledger = target.describe(),
                            "role: standby: the ledger was unreachable for the whole lease, so \
                             this daemon stopped acting (no verifications, no hooks); it takes \
                             the lease again when the database answers. Check the database and \
                             the network to it"
                        );
                        active = None;
                        unreachable_logged = true;
                        role.send_replace(Role::Standby { holder: None });
                    }
                }
            }
        }
    }
    if let Some((epoch, _)) = active {
        role.send_replace(Role::Standby { holder: None });
        match tokio::time::timeout(Duration::from_secs(2), lease.resign(epoch)).await {
            Ok(Ok(true)) => tracing::warn!(epoch, "role: standby (resigned the lease at shutdown)"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, epoch, "could not resign the lease; it runs out by itself")
            }
            Err(_) => tracing::warn!(
                epoch,
                "resigning the lease timed out; it runs out by itself"
            ),
        }
    }
}

/// A standby's wake-ups: a notification on `paywatch_lease` (a resignation), or the poll
/// interval. The LISTEN connection is opened lazily and again after it fails.
struct Wake {
    target: Target,
    listening: Option<(
        tokio_postgres::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    )>,
}

impl Wake {
    fn new(target: Target) -> Wake {
        Wake {
            target,
            listening: None,
        }
    }

    /// Opens the LISTEN connection if it is not open (waiting at most `poll`).
    async fn listen(&mut self, poll: Duration) {
        if self.listening.is_none() {
            self.listening =
                match tokio::time::timeout(poll, self.target.listener(Session::Operator)).await {
                    Ok(Ok(listening)) => Some(listening),
                    Ok(Err(_)) | Err(_) => None,
                };
        }
    }

    /// Waits for a notification or `poll`, whichever comes first (opening the LISTEN
    /// connection again if it was lost).
    async fn next(&mut self, poll: Duration) {
        self.listen(poll).await;
        let Some((_, notifications)) = &mut self.listening else {
            tokio::time::sleep(poll).await;
            return;
        };
        match tokio::time::timeout(poll, notifications.recv()).await {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => self.listening = None,
        }
    }
}
