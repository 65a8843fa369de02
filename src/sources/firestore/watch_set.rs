//! The watch set: which checkouts' documents the listener watches, kept equal to the ledger's.
//!
//! Owns: subscribing the listener to every watched checkout at start, then adding the ones
//! tracked since (by `paywatch track` in another process, the HTTP track endpoint, discovery,
//! or a first verification) and removing the finished ones, each in the configured database;
//! and the count of watched checkouts the daemon publishes.
//! Must never: decide a status or write one (it reads the ledger's watch set; it only clears
//! the noted refusal of a document no longer watched), or miss a change of the ledger for
//! longer than [`WATCH_SYNC_POLL`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::journal::ListenObserver;
use super::listen::WatchTarget;
use super::pool::ListenerHandle;
use crate::domain::{CheckoutId, CollectionPaths, FirestoreLocation, WatchedDocument};
use crate::ledger::Ledger;

/// How often the watch set is compared with the ledger when nothing told us it changed
/// (a `paywatch track` in another process commits to the ledger file).
pub const WATCH_SYNC_POLL: Duration = Duration::from_millis(250);

/// A checkout the track endpoint just recorded: the daemon watches it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewlyTracked {
    /// The checkout.
    pub checkout_id: CheckoutId,
    /// Its document.
    pub location: FirestoreLocation,
}

/// Subscribes the listener (none with `[firestore] enabled = false`) to every checkout the
/// ledger watches, each in `database`, after clearing the refusals an earlier run noted (they
/// are asked about afresh, and noted again if refused). Returns the checkouts now watched and
/// how many of them wait for a verification.
///
/// # Errors
///
/// The ledger cannot be read or written.
pub async fn watch_at_start(
    ledger: &Ledger,
    listener: Option<&ListenerHandle>,
    database: &str,
) -> anyhow::Result<(Watched, usize)> {
    let clearer = ledger.clone();
    clearer.clear_listen_refusals().await?;
    let reader = ledger.clone();
    let initial = reader.watch_set().await?;
    let mut watched = Watched::default();
    let needing = initial.iter().filter(|entry| entry.needs_verify).count();
    for entry in initial {
        let location = in_database(entry.location, database);
        watched.insert(entry.checkout_id.clone(), &location);
        if let Some(listener) = listener {
            listener.watch(WatchTarget {
                checkout_id: entry.checkout_id,
                location,
                resume_token: entry.resume_token,
                resume_read_time: entry.resume_read_time,
            });
        }
    }
    Ok((watched, needing))
}

/// A checkout's location in the configured database (`[firestore] database`, validated when
/// the settings were loaded; paymennt's responses name no database).
fn in_database(location: FirestoreLocation, database: &str) -> FirestoreLocation {
    match location.clone().with_database(database) {
        Ok(located) => located,
        Err(error) => {
            tracing::error!("{error}; watching the (default) database instead");
            location
        }
    }
}

/// Where watched checkouts are listened to: the listener (none with `[firestore] enabled =
/// false`) and the database every checkout's location is put in (`[firestore] database`).
pub struct Listening<O> {
    /// The listener (None: Firestore is off, only the count is kept).
    pub listener: Option<ListenerHandle>,
    /// `[firestore] database`.
    pub database: String,
    /// Told when a checkout stops being watched (its refusal is no longer a problem).
    pub health: O,
}

/// The checkouts the daemon watches, and where: compact, since there may be tens of thousands
/// (each document's collection is held once, see [`CollectionPaths`]).
#[derive(Default)]
pub struct Watched {
    documents: HashMap<CheckoutId, WatchedDocument>,
    paths: CollectionPaths,
}

impl Watched {
    /// Whether `id` is watched at `location`.
    fn is_watched_at(&self, id: &CheckoutId, location: &FirestoreLocation) -> bool {
        self.documents
            .get(id)
            .is_some_and(|document| document.is_at(location))
    }

    fn insert(&mut self, id: CheckoutId, location: &FirestoreLocation) {
        let document = self.paths.document(location);
        self.documents.insert(id, document);
    }

    /// How many checkouts are watched.
    pub fn count(&self) -> usize {
        self.documents.len()
    }
}

/// Keeps the listener's targets equal to the ledger's watched checkouts: new ones (tracked by
/// `paywatch track` in another process, or first seen by a verification) are added, finished
/// ones removed. Checkouts tracked through the HTTP track endpoint arrive on `newly_tracked`
/// and are watched at once, without waiting for the ledger poll. With Firestore off
/// (`listener` None) only the count is kept.
pub async fn sync_watch_set(
    ledger: Ledger,
    listening: Listening<impl ListenObserver>,
    mut watched: Watched,
    mut watch_set_changed: watch::Receiver<u64>,
    mut newly_tracked: mpsc::Receiver<NewlyTracked>,
    watched_count: Arc<std::sync::atomic::AtomicUsize>,
    cancel: CancellationToken,
) {
    let mut unreadable = Outage::default();
    let reader = ledger.clone();
    let mut last_version = reader.data_version().await.unwrap_or(0);
    let mut poll = tokio::time::interval(WATCH_SYNC_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut newly_open = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = watch_set_changed.changed() => if changed.is_err() { return },
            tracked = newly_tracked.recv(), if newly_open => {
                let tracked = tracked.map(|tracked| NewlyTracked {
                    checkout_id: tracked.checkout_id,
                    location: in_database(tracked.location, &listening.database),
                });
                match tracked {
                    Some(tracked) if !watched.is_watched_at(&tracked.checkout_id, &tracked.location) => {
                        tracing::info!(checkout = %tracked.checkout_id, document = %tracked.location.document_name(), "now watching");
                        watched.insert(tracked.checkout_id.clone(), &tracked.location);
                        if let Some(listener) = &listening.listener {
                            listener.watch(WatchTarget {
                                checkout_id: tracked.checkout_id,
                                location: tracked.location,
                                resume_token: None,
                                resume_read_time: None,
                            });
                        }
                        watched_count.store(watched.count(), std::sync::atomic::Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => newly_open = false,
                }
                continue;
            }
            _ = poll.tick() => {
                let reader = ledger.clone();
                let version = reader.data_version().await;
                if version.is_ok() && unreadable.recovered() {
                    tracing::info!("the ledger answers again; watching its checkouts");
                }
                match version {
                    Ok(version) if version != last_version => last_version = version,
                    Ok(_) => continue,
                    Err(error) => {
                        if unreadable.failed() {
                            tracing::error!(
                                failing_for_s = unreadable.failing_for().as_secs(),
                                "cannot check the ledger for new checkouts (said again each minute while it lasts): {error:#}"
                            );
                        }
                        continue;
                    }
                }
            }
        }
        let reader = ledger.clone();
        let entries = match reader.watch_set().await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!("cannot read the watch set: {error:#}");
                continue;
            }
        };
        let mut desired: HashMap<CheckoutId, _> = entries
            .into_iter()
            .map(|entry| (entry.checkout_id.clone(), entry))
            .collect();
        let gone: Vec<CheckoutId> = watched
            .documents
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!(checkout = %id, "no longer watched");
            if let Some(listener) = &listening.listener {
                listener.unwatch(&id);
            }
            watched.documents.remove(&id);
            listening.health.forget_refusal(&id);
            // A refusal of a document no longer watched is no longer news for `status`.
            let clearer = ledger.clone();
            if let Err(error) = clearer.clear_listen_refusal(&id).await {
                tracing::error!("cannot clear a Firestore refusal in the ledger: {error:#}");
            }
        }
        for (id, entry) in desired.drain() {
            let location = in_database(entry.location, &listening.database);
            if !watched.is_watched_at(&id, &location) {
                tracing::info!(checkout = %id, document = %location.document_name(), "now watching");
                watched.insert(id.clone(), &location);
                if let Some(listener) = &listening.listener {
                    listener.watch(WatchTarget {
                        checkout_id: id,
                        location,
                        resume_token: entry.resume_token,
                        resume_read_time: entry.resume_read_time,
                    });
                }
            }
        }
        watched_count.store(watched.count(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// A ledger that cannot be read, polled every 250 ms: said at the first failure and then once a
/// minute while it lasts (a database away would otherwise fill the log), and its end once.
#[derive(Debug, Default)]
struct Outage {
    /// When the failures began, and when one was last said.
    failing: Option<(std::time::Instant, std::time::Instant)>,
}

impl Outage {
    /// How often a lasting outage is said again.
    const REPEAT: std::time::Duration = std::time::Duration::from_secs(60);

    /// Notes a failure: whether to say it now.
    fn failed(&mut self) -> bool {
        let now = std::time::Instant::now();
        match &mut self.failing {
            None => {
                self.failing = Some((now, now));
                true
            }
            Some((_, said)) if now.duration_since(*said) >= Outage::REPEAT => {
                *said = now;
                true
            }
            Some(_) => false,
        }
    }

    /// How long the failures have lasted.
    fn failing_for(&self) -> std::time::Duration {
        self.failing
            .map(|(since, _)| since.elapsed())
            .unwrap_or_default()
    }

    /// Notes a success: whether it ends an outage.
    fn recovered(&mut self) -> bool {
        self.failing.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::Outage;

    #[test]
    fn an_outage_is_said_once_then_again_only_after_a_minute_and_its_end_once() {
        let mut outage = Outage::default();
        assert!(!outage.recovered(), "no outage yet");
        assert!(outage.failed(), "the first failure is said");
        for _ in 0..100 {
            assert!(!outage.failed(), "the next ones within a minute are not");
        }
        let earlier = std::time::Instant::now()
            .checked_sub(Outage::REPEAT)
            .expect("the clock has run for a minute");
        if let Some((since, said)) = &mut outage.failing {
            *since = earlier;
            *said = earlier;
        }
        assert!(outage.failed(), "said again a minute later");
        assert!(outage.failing_for() >= Outage::REPEAT);
        assert!(outage.recovered(), "its end is said");
        assert!(!outage.recovered(), "once");
        assert!(outage.failed(), "a new outage is said at once");
    }
}
