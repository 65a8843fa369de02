//! Discovery: tracks checkouts created anywhere (the merchant's backend, paymennt's dashboard, a
//! plugin), so no one has to hand each create-link response to `paywatch track`.
//!
//! Owns: paging through Search Checkouts with `afterId` = the highest checkout id seen per
//! checkout type (a cursor kept in the ledger, so a restart neither misses nor repeats one), and
//! tracking what it finds (`tracked_via = "discovery"`). A first start with no cursor looks back
//! `lookback` (paymennt's `afterTimestamp`) rather than importing the whole history.
//! Must never: record a status. A search result's status is a claim; the listener (or a nudge to
//! the verifier, for a checkout without Firebase coordinates) leads to the Get Checkout that
//! records one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::CheckoutId;
use crate::ledger::{Ledger, TrackOutcome};
use crate::paymennt::wire::CheckoutFacts;
use crate::paymennt::{Client, SearchQuery};
use crate::sources::Nudge;

/// What discovery needs from the configuration.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Checkout types to track (one search each).
    pub types: Vec<String>,
    /// Time between rounds.
    pub interval: Duration,
    /// How far back a round with no stored cursor looks.
    pub lookback: Duration,
    /// Checkouts per page.
    pub page_size: u32,
}

/// Pages one round may fetch per checkout type; the rest waits for the next round (the cursor
/// is saved page by page, so nothing is lost).
pub const MAX_PAGES_PER_ROUND: u32 = 1000;

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Search Checkouts calls made.
    pub searches: u32,
    /// Checkouts the searches returned.
    pub found: usize,
    /// Checkouts newly tracked.
    pub added: Vec<CheckoutId>,
    /// Of those, the ones without Firebase coordinates (checked by the reconciler only).
    pub reconcile_only: Vec<CheckoutId>,
}

/// Where a round starts when a type has no cursor yet: the same `afterTimestamp` until one is
/// stored, so rounds that find nothing do not slide the window past a checkout.
#[derive(Debug, Clone, Default)]
pub struct Lookback {
    since: Option<DateTime<Utc>>,
}

/// Runs discovery until `cancel`: a round at start, then every `interval`.
///
/// Newly tracked checkouts with Firebase coordinates are handed to the listener (through
/// `watch_set_changed`), whose first snapshot leads to their verification; ones without are
/// nudged to the verifier at once and then left to the reconciler.
pub async fn run(
    ledger: Ledger,
    client: watch::Receiver<Client>,
    config: DiscoveryConfig,
    nudges: mpsc::Sender<Nudge>,
    watch_set_changed: watch::Sender<u64>,
    cancel: CancellationToken,
) {
    tracing::info!(
        types = %config.types.join(","),
        interval = ?config.interval,
        "discovery: tracking checkouts created anywhere, found with Search Checkouts"
    );
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut lookback = Lookback::default();
    let mut failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let current = client.borrow().clone();
        let (report, failure) = round(&ledger, &current, &config, &mut lookback).await;
        match failure {
            Some(error) if !failing => {
                failing = true;
                tracing::warn!(
                    "discovery cannot search checkouts: {error}\n\n\
                     checkouts created outside paywatch are not tracked until this works (it is tried every {}); \
                     check that the API key may search checkouts, or set discovery.enabled = false",
                    humantime::format_duration(config.interval)
                );
            }
            Some(error) => tracing::debug!(%error, "discovery still cannot search checkouts"),
            None if failing => {
                failing = false;
                tracing::info!("discovery can search checkouts again");
            }
            None => {}
        }
        tracing::debug!(
            searches = report.searches,
            found = report.found,
            added = report.added.len(),
            "discovery round"
        );
        if report.added.len() > report.reconcile_only.len() {
            watch_set_changed.send_modify(|generation| *generation += 1);
        }
        if !crate::sources::send_reconcile_nudges(&nudges, report.reconcile_only, None, &cancel)
            .await
        {
            return;
        }
    }
}

/// One round over every configured type. Returns what it did, and the first search failure
/// (what was found before it is kept).
pub async fn round(
    ledger: &Ledger,
    client: &Client,
    config: &DiscoveryConfig,
    lookback: &mut Lookback,
) -> (RoundReport, Option<String>) {
    let mut report = RoundReport::default();
    let mut failure = None;
    let mut types = config.types.clone();
    types.sort_unstable();
    types.dedup();
    for kind in &types {
        if let Err(error) = discover_type(ledger, client, config, kind, lookback, &mut report).await
        {
            failure.get_or_insert(error);
        }
    }
    if !report.added.is_empty() {
        tracing::info!(
            added = report.added.len(),
            reconcile_only = report.reconcile_only.len(),
            searches = report.searches,
            "discovery: tracking {} new checkouts",
            report.added.len()
        );
    }
    (report, failure)
}

async fn discover_type(
    ledger: &Ledger,
    client: &Client,
    config: &DiscoveryConfig,
    kind: &str,
    lookback: &mut Lookback,
    report: &mut RoundReport,
) -> Result<(), String> {
    let reader = ledger.clone();
    let owned_kind = kind.to_owned();
    let stored = blocking(move || reader.discovery_cursor(&owned_kind)).await?;
    let mut after_id = match stored.as_deref().map(str::parse::<u128>) {
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return Err(format!(
                "the stored discovery cursor for type '{kind}' is not a checkout id"
            ));
        }
        None => None,
    };
    // Only without a cursor: a first start looks back `lookback`, not at the whole history.
    let since = match after_id {
        Some(_) => None,
        None => Some(*lookback.since.get_or_insert_with(|| {
            chrono::Duration::from_std(config.lookback)
                .ok()
                .and_then(|back| Utc::now().checked_sub_signed(back))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        })),
    };
    for _ in 0..MAX_PAGES_PER_ROUND {
        let query = SearchQuery {
            kind: Some(kind.to_owned()),
            after_id,
            after_timestamp: since,
            page: Some(0),
            size: Some(config.page_size),
            ..SearchQuery::default()
        };
        report.searches += 1;
        let page = client
            .search(&query)
            .await
            .map_err(|error| error.to_string())?;
        report.found += page.content.len();
        let mut found = Vec::with_capacity(page.content.len());
        let mut highest = after_id;
        for checkout in &page.content {
            let Some(number) = checkout
                .id
                .as_ref()
                .and_then(|id| id.0.trim().parse::<u128>().ok())
            else {
                tracing::warn!(
                    id = ?checkout.id.as_ref().map(|id| crate::domain::printable(&id.0)),
                    "discovery: Search Checkouts returned a checkout without a numeric id; skipped"
                );
                continue;
            };
            highest = highest.max(Some(number));
            match trackable(checkout) {
                Ok(facts) => found.push(facts),
                Err(error) => tracing::warn!(
                    checkout = number.to_string(),
                    %error,
                    "discovery: a checkout search returned cannot be tracked; track it by hand if it matters: paywatch track --checkout-id {number}"
                ),
            }
        }
        let Some(cursor) = highest.filter(|high| Some(*high) != after_id) else {
            // Nothing past the cursor: this type is done for this round.
            return Ok(());
        };
        let recorder = ledger.clone();
        let owned_kind = kind.to_owned();
        let recorded =
            blocking(move || recorder.record_discovered(&found, &owned_kind, &cursor.to_string()))
                .await?;
        for discovered in recorded {
            if discovered.outcome != TrackOutcome::Added {
                continue;
            }
            if !discovered.listened {
                tracing::warn!(
                    checkout = %discovered.checkout_id,
                    "discovery: checkout {} has no Firebase coordinates in Search Checkouts; it is tracked, but checked only by the reconciler (every reconcile.interval), not watched live",
                    discovered.checkout_id
                );
                report.reconcile_only.push(discovered.checkout_id.clone());
            }
            report.added.push(discovered.checkout_id);
        }
        after_id = Some(cursor);
        if page.content.len() < config.page_size as usize {
            return Ok(());
        }
    }
    tracing::info!(
        kind,
        pages = MAX_PAGES_PER_ROUND,
        "discovery: more checkouts than one round pages through; the next round continues"
    );
    Ok(())
}

/// The facts to track a search result with: Firebase coordinates if it has them, else none
/// (the reconciler checks it). A result without an id, amount or currency cannot be tracked.
fn trackable(
    checkout: &crate::paymennt::wire::Checkout,
) -> Result<CheckoutFacts, crate::paymennt::wire::CheckoutShapeError> {
    checkout.facts().or_else(|_| checkout.answer_facts())
}

async fn blocking<T: Send + 'static>(
    task: impl FnOnce() -> crate::ledger::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(task).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(format!("ledger task failed: {error}")),
    }
}
