//! Discovery: tracks checkouts created anywhere (the merchant's backend, paymennt's dashboard, a
//! plugin), so no one has to hand each create-link response to `paywatch track`.
//!
//! Owns: rounds of Search Checkouts per checkout type, driven by creation time and never by id
//! or result order, which paymennt's spec does not promise (`afterId` only "filters checkouts
//! after the provided id"; nothing says results are sorted or that ids grow with time). A round
//! asks for every checkout created since the last complete round's start minus
//! `overlap` (`afterTimestamp`), reads every page, tracks the ids the ledger does not have
//! (`tracked_via = "discovery"`), and only once every page was read records its own start as
//! where the next round begins. If the pages did not add up to what paymennt said matched
//! (results reordered between pages), the round reads them again, a bounded number of times. A
//! first round looks back `lookback`; it also fixes discovery's epoch in the ledger, the line
//! between what paymennt did before paywatch could see it (imported as baselines, no hooks) and
//! new business.
//! Must never: record a status. A search result's status is a claim; the listener (or a nudge to
//! the verifier, for a checkout without Firebase coordinates) leads to the Get Checkout that
//! records one.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::domain::CheckoutId;
use crate::ledger::{DiscoveredOutcome, Ledger};
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
    /// How far back a first round (none complete yet) looks.
    pub lookback: Duration,
    /// How far before the last complete round's start the next one searches again.
    pub overlap: Duration,
    /// Checkouts per page.
    pub page_size: u32,
}

/// Pages one pass of a round may fetch per checkout type. A round that needs more is not
/// complete: the next one starts from the same time again (nothing is lost), and says so.
pub const MAX_PAGES_PER_ROUND: u32 = 1000;

/// Passes over the pages one round may make when they did not add up to the number of
/// matching checkouts paymennt gave (its results reordered between pages).
pub const MAX_PASSES_PER_ROUND: u32 = 3;

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Search Checkouts calls made.
    pub searches: u32,
    /// Distinct checkouts the searches returned.
    pub found: usize,
    /// Checkouts newly tracked.
    pub added: Vec<CheckoutId>,
    /// Of those, the ones without Firebase coordinates (checked by the reconciler only).
    pub reconcile_only: Vec<CheckoutId>,
    /// Checkouts tracked without Firebase coordinates that now have them: moved onto the
    /// listener.
    pub located: Vec<CheckoutId>,
}

/// What discovery remembers between rounds in one process: where a first round starts while
/// no round is complete (the same `afterTimestamp` until one is, so rounds that fail do not
/// slide the window past a checkout), and whether the ledger's epoch is set.
#[derive(Debug, Clone, Default)]
pub struct Lookback {
    since: Option<DateTime<Utc>>,
    epoch: Option<DateTime<Utc>>,
}

/// Runs discovery until `cancel`: a round at start, then every `interval`, and sooner when
/// `wake` is notified (a webhook named a checkout the ledger does not know), at most once a
/// second.
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
    wake: std::sync::Arc<tokio::sync::Notify>,
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
    let mut last_round: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
            () = wake.notified() => {
                // A burst of unknown ids wakes one round, not one each.
                if let Some(last) = last_round {
                    let next = last + WAKE_SPACING;
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep_until(next) => {}
                    }
                }
                tracing::debug!("discovery: a round woken by a notification for an unknown checkout");
            }
        }
        last_round = Some(tokio::time::Instant::now());
        let current = client.borrow().clone();
        let (report, failure) = round(&ledger, &current, &config, &mut lookback).await;
        match failure {
            Some(error) if !failing => {
                failing = true;
                tracing::warn!(
                    "discovery cannot complete a round: {error}; \
                     checkouts created outside paywatch may not be tracked until this works (it is tried every {})",
                    humantime::format_duration(config.interval)
                );
            }
            Some(error) => tracing::debug!(%error, "discovery still cannot complete a round"),
            None if failing => {
                failing = false;
                tracing::info!("discovery completes its rounds again");
            }
            None => {}
        }
        tracing::debug!(
            searches = report.searches,
            found = report.found,
            added = report.added.len(),
            "discovery round"
        );
        if report.added.len() > report.reconcile_only.len() || !report.located.is_empty() {
            watch_set_changed.send_modify(|generation| *generation += 1);
        }
        if !crate::sources::send_reconcile_nudges(&nudges, report.reconcile_only, None, &cancel)
            .await
        {
            return;
        }
    }
}

/// The least time between two rounds woken by notifications.
const WAKE_SPACING: Duration = Duration::from_secs(1);

/// One round over every configured type. Returns what it did, and the first failure (what was
/// found before it is kept; the type that failed starts from the same time next round).
pub async fn round(
    ledger: &Ledger,
    client: &Client,
    config: &DiscoveryConfig,
    lookback: &mut Lookback,
) -> (RoundReport, Option<String>) {
    let mut report = RoundReport::default();
    if lookback.epoch.is_none() {
        // Before the first search: a checkout created while this round runs is new business.
        match ledger.begin_discovery_epoch(Utc::now()).await {
            Ok(epoch) => lookback.epoch = Some(epoch),
            Err(error) => return (report, Some(error.to_string())),
        }
    }
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
    if !report.added.is_empty() || !report.located.is_empty() {
        tracing::info!(
            searches = report.searches,
            found = report.found,
            added = report.added.len(),
            reconcile_only = report.reconcile_only.len(),
            located = report.located.len(),
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
    let started = Utc::now();
    let last = ledger
        .last_discovery_round(kind)
        .await
        .map_err(|error| error.to_string())?;
    let since = match last {
        Some(last) => chrono::Duration::from_std(config.overlap)
            .ok()
            .and_then(|overlap| last.checked_sub_signed(overlap))
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
        // No complete round yet: look back `lookback`, the same time until a round completes.
        None => *lookback.since.get_or_insert_with(|| {
            chrono::Duration::from_std(config.lookback)
                .ok()
                .and_then(|back| started.checked_sub_signed(back))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        }),
    };
    let mut seen: HashSet<u128> = HashSet::new();
    let mut matching = 0;
    let outcome = async {
        for pass in 1..=MAX_PASSES_PER_ROUND {
            matching = matching
                .max(read_pages(ledger, client, config, kind, since, &mut seen, report).await?);
            if seen.len() >= matching {
                return Ok(());
            }
            tracing::debug!(
                kind,
                pass,
                seen = seen.len(),
                matching,
                "discovery: the pages did not add up to what Search Checkouts said matched; reading them again"
            );
        }
        Err(format!(
            "Search Checkouts said {matching} checkouts of type {kind} matched, but {MAX_PASSES_PER_ROUND} passes over its pages returned only {} distinct ones \
             (its results change order between pages); the next round searches from the same time again",
            seen.len()
        ))
    }
    .await;
    report.found += seen.len();
    outcome?;
    ledger
        .finish_discovery_round(kind, started)
        .await
        .map_err(|error| error.to_string())
}

/// Reads every page of one search and tracks what is new. Returns how many checkouts paymennt
/// said matched (`totalElements`; 0 when it did not say), or an error when a search failed or
/// the pages did not end within [`MAX_PAGES_PER_ROUND`].
async fn read_pages(
    ledger: &Ledger,
    client: &Client,
    config: &DiscoveryConfig,
    kind: &str,
    since: DateTime<Utc>,
    seen: &mut HashSet<u128>,
    report: &mut RoundReport,
) -> Result<usize, String> {
    let mut matching = 0;
    for page_number in 0..MAX_PAGES_PER_ROUND {
        let query = SearchQuery {
            kind: Some(kind.to_owned()),
            after_timestamp: Some(since),
            page: Some(page_number),
            size: Some(config.page_size),
            ..SearchQuery::default()
        };
        report.searches += 1;
        let page = client
            .search(&query)
            .await
            .map_err(|error| error.to_string())?;
        matching = matching.max(usize::try_from(page.total_elements).unwrap_or(0));
        let mut found = Vec::with_capacity(page.content.len());
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
            if !seen.insert(number) {
                continue;
            }
            match trackable(checkout) {
                Ok(facts) => found.push(facts),
                Err(error) => tracing::warn!(
                    checkout = number.to_string(),
                    %error,
                    "discovery: a checkout search returned cannot be tracked; track it by hand if it matters: paywatch track --checkout-id {number}"
                ),
            }
        }
        record(ledger, found, report).await?;
        if page.content.len() < config.page_size as usize {
            return Ok(matching);
        }
    }
    Err(format!(
        "more than {MAX_PAGES_PER_ROUND} pages of {} checkouts of type {kind} were created since {since}; \
         raise discovery.page_size, or shorten discovery.interval",
        config.page_size
    ))
}

/// Tracks what one page found that the ledger does not have, and notes it in `report`.
async fn record(
    ledger: &Ledger,
    found: Vec<CheckoutFacts>,
    report: &mut RoundReport,
) -> Result<(), String> {
    if found.is_empty() {
        return Ok(());
    }
    let recorded = ledger
        .record_discovered(&found)
        .await
        .map_err(|error| error.to_string())?;
    for discovered in recorded {
        match discovered.outcome {
            DiscoveredOutcome::Located => {
                tracing::info!(
                    checkout = %discovered.checkout_id,
                    "discovery: checkout {} now has Firebase coordinates; it is watched live from now on",
                    discovered.checkout_id
                );
                report.located.push(discovered.checkout_id);
            }
            DiscoveredOutcome::Added => {
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
        }
    }
    Ok(())
}

/// The facts to track a search result with: Firebase coordinates if it has them, else none
/// (the reconciler checks it). A result without an id, amount or currency cannot be tracked.
fn trackable(
    checkout: &crate::paymennt::wire::Checkout,
) -> Result<CheckoutFacts, crate::paymennt::wire::CheckoutShapeError> {
    checkout.facts().or_else(|_| checkout.answer_facts())
}
