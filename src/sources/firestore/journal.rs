//! The Listen journal: what a Listen event means for the ledger and the verifier.
//!
//! Owns: turning the listener's [`ListenEvent`]s, in order, into notes ("this checkout changed,
//! verify it", with the verification's ticket) and resume tokens in the ledger, nudges to the
//! verifier, the log lines and figures of stream and target events, and telling the daemon's
//! health record ([`ListenObserver`]) what it heard.
//! Must never: decide a checkout's status (a note only asks for a verification), save a resume
//! token before the changes it covers are noted (a restart would skip them), or stop on a
//! ledger failure (it is logged and retried).

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::listen::ListenEvent;
use crate::domain::CheckoutId;
use crate::ledger::{Ledger, ResumePoint};
use crate::metrics::Metrics;
use crate::sources::Nudge;

/// Who else hears of the listener's events: the daemon's health record (`/readyz`), which lives
/// with the HTTP listener above the sources and is handed in at wiring.
pub trait ListenObserver: Send + Sync + 'static {
    /// Notes a listener event (streams' and projects' states, refused documents).
    fn note(&self, event: &ListenEvent);
    /// A checkout is no longer watched: Firestore's refusal of its document is no longer news.
    fn forget_refusal(&self, checkout_id: &CheckoutId);
}

/// How often changes that could not be noted (the ledger was busy) are noted again when no
/// new event comes.
const NOTE_RETRY: Duration = Duration::from_secs(1);

/// Turns the listener's events into nudges and persisted resume state, in order.
///
/// Each batch of changed checkouts is marked `needs_verify` in the ledger, in the write that
/// also issues their verifications' tickets, then nudged, all before any checkpoint of the
/// batch is saved: if the daemon dies after a token is saved but before the verification, the
/// reconciler's startup sweep still verifies them. (A verification that finished before the
/// mark is not undone by it: the mark applies only to checkouts last verified before the
/// change was seen.)
///
/// A checkout whose change could not be noted (the ledger busy or failing) keeps its own
/// retry: it is noted again with every later batch and every [`NOTE_RETRY`] until that works,
/// and until then no resume token of that checkout is saved (the token would let a restart
/// skip the change). Other checkouts' tokens are saved as usual.
pub async fn consume_listen_events(
    mut events: mpsc::Receiver<ListenEvent>,
    ledger: Ledger,
    nudges: mpsc::Sender<Nudge>,
    health: impl ListenObserver,
    cancel: CancellationToken,
    metrics: Metrics,
    auth_mode: &'static str,
) {
    let mut batch = Vec::with_capacity(512);
    let mut unnoted: HashSet<CheckoutId> = HashSet::new();
    let mut retry = tokio::time::interval(NOTE_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        batch.clear();
        tokio::select! {
            () = cancel.cancelled() => return,
            received = events.recv_many(&mut batch, 512) => if received == 0 { return },
            _ = retry.tick(), if !unnoted.is_empty() => {}
        }
        // Before any nudge of this batch goes out, one ledger write (no fsync) notes the
        // changes, with those that earlier notes failed to record, and issues the tickets of
        // the verifications they ask for: every checkpoint of this batch is saved after it.
        let changes: Vec<&Nudge> = batch
            .iter()
            .filter_map(|event| match event {
                ListenEvent::Changed(nudge) => Some(nudge),
                _ => None,
            })
            .collect();
        let mut noting: Vec<CheckoutId> = changes
            .iter()
            .map(|nudge| nudge.checkout_id.clone())
            .collect();
        noting.extend(unnoted.iter().cloned());
        let noted = if noting.is_empty() {
            None
        } else {
            let marker = ledger.clone();
            match marker.note_changes(&noting).await {
                Ok(noted) => {
                    if !unnoted.is_empty() {
                        tracing::info!(
                            checkouts = unnoted.len(),
                            "pending verifications noted after an earlier failure"
                        );
                    }
                    unnoted.clear();
                    Some(noted)
                }
                Err(error) => {
                    unnoted.extend(changes.iter().map(|nudge| nudge.checkout_id.clone()));
                    tracing::error!(
                        checkouts = unnoted.len(),
                        "cannot note pending verifications; retrying every {}s, and their resume tokens are not saved until it works: {error:#}",
                        NOTE_RETRY.as_secs()
                    );
                    None
                }
            }
        };
        // Then the nudges, each with its ticket (without one, when the note failed, the
        // verifier takes one itself).
        for (index, nudge) in changes.into_iter().enumerate() {
            tracing::debug!(checkout = %nudge.checkout_id, changed_at = ?nudge.changed_at, "document changed");
            let nudge = Nudge {
                seen_after: noted.as_ref().map(|noted| noted.seen_after),
                ticket: noted
                    .as_ref()
                    .and_then(|noted| noted.tickets.get(index).copied()),
                ..nudge.clone()
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                sent = nudges.send(nudge) => if sent.is_err() { return },
            }
        }
        // The batch's checkpoints are saved together (a start-up's thousands of first
        // snapshots in a few writes, not one each), in order: before a token is forgotten,
        // and at the end of the batch.
        let mut checkpoints: Vec<ResumePoint> = Vec::new();
        for event in batch.drain(..) {
            health.note(&event);
            match event {
                ListenEvent::Changed(_) => {}
                ListenEvent::Checkpoint { tokens, read_time } => {
                    checkpoints.extend(
                        tokens
                            .into_iter()
                            .filter(|(id, _)| !unnoted.contains(id))
                            .map(|(checkout_id, token)| ResumePoint {
                                checkout_id,
                                token,
                                read_time,
                            }),
                    );
                }
                ListenEvent::ForgetToken(id) => {
                    save_checkpoints(&ledger, &mut checkpoints).await;
                    let forgetter = ledger.clone();
                    if let Err(error) = forgetter.forget_resume_token(&id).await {
                        tracing::error!("cannot forget a resume token: {error:#}");
                    }
                }
                ListenEvent::TargetRefused {
                    checkout_id,
                    document,
                    code,
                    message,
                    refusals,
                    retry_in,
                } => {
                    let retry_text =
                        humantime::format_duration(Duration::from_secs(retry_in.as_secs()));
                    if refusals == 1 {
                        metrics.listen_target_refused();
                        let hint = super::probe::access_hint(auth_mode, code);
                        tracing::warn!(checkout = %checkout_id, document = %document, code,
                            "Firestore refuses to watch this checkout's document: {code}: {message}; \
                             the other checkouts are unaffected, the reconciler still checks this one \
                             every interval, and paywatch asks Firestore again in {retry_text}. \
                             What to check: {hint}");
                    } else {
                        tracing::debug!(checkout = %checkout_id, code, refusals, "Firestore still refuses this checkout's document: {message}");
                    }
                    let next_retry_at = chrono::Duration::from_std(retry_in)
                        .ok()
                        .and_then(|delay| chrono::Utc::now().checked_add_signed(delay));
                    let noter = ledger.clone();
                    if let Err(error) = {
                        noter.note_listen_refusal(
                            &checkout_id,
                            code,
                            &message,
                            &document,
                            next_retry_at,
                        )
                    }
                    .await
                    {
                        tracing::error!("cannot note a Firestore refusal in the ledger: {error:#}");
                    }
                }
                ListenEvent::TargetRecovered { checkout_id } => {
                    tracing::info!(checkout = %checkout_id, "Firestore watches this checkout's document again");
                    let clearer = ledger.clone();
                    if let Err(error) = clearer.clear_listen_refusal(&checkout_id).await {
                        tracing::error!(
                            "cannot clear a Firestore refusal in the ledger: {error:#}"
                        );
                    }
                }
                ListenEvent::PermanentFailure { project, message } => {
                    metrics.listen_project_refused(&project);
                    tracing::error!(project = %project, "Firestore refuses us: {message}");
                }
                ListenEvent::Connected {
                    project,
                    stream,
                    targets,
                } => {
                    tracing::info!(project = %project, stream, targets, "Firestore stream connected");
                }
                ListenEvent::Disconnected {
                    project,
                    stream,
                    reason,
                    retry_in,
                    planned,
                } => {
                    if planned {
                        // Normal operation (hourly with firebase-anonymous): not a warning.
                        tracing::info!(project = %project, stream, "Firestore stream reopened as planned: {reason}");
                    } else {
                        metrics.listen_reconnect(&project);
                        tracing::warn!(project = %project, stream, retry_in_ms = retry_in.as_millis() as u64, "Firestore stream disconnected: {reason}");
                    }
                }
            }
        }
        save_checkpoints(&ledger, &mut checkpoints).await;
    }
}

/// Saves (and empties) the resume tokens gathered from a batch's checkpoints, in one ledger
/// write. A failure is logged; the tokens are dropped (the next checkpoints carry newer ones,
/// and a restart without them only hears of changes again).
async fn save_checkpoints(ledger: &Ledger, checkpoints: &mut Vec<ResumePoint>) {
    if checkpoints.is_empty() {
        return;
    }
    let (saver, points) = (ledger.clone(), std::mem::take(checkpoints));
    if let Err(error) = saver.save_resume_points(&points).await {
        tracing::error!("cannot save resume tokens: {error:#}");
    }
}

#[cfg(test)]
mod tests;
