//! `link create`, `track`, `status`, `list`, `events`: creating, tracking and reading checkouts.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::waiting::Deadline;
use super::{OutcomeUnknown, UsageError, output};
use crate::domain::{Amount, CheckoutId, Currency, Source, printable};
use crate::ledger::{ApplyOutcome, Ledger, ListFilter, TrackOutcome, TrackedVia};
use crate::paymennt::client::Reached;
use crate::paymennt::intake::track_input;
use crate::paymennt::wire::{Address, Checkout, Customer, JsonDecimal, LinkRequest};
use crate::paymennt::{Client, VerifiedCheckout};
use crate::settings::Settings;

/// Arguments of `paywatch link create`.
#[derive(Debug, Clone, clap::Args)]
pub struct LinkCreateArgs {
    /// The merchant's order id.
    #[arg(long = "order", value_name = "ID")]
    pub order_id: String,
    /// The amount, e.g. 100.00 (greater than 0).
    #[arg(long)]
    pub amount: String,
    /// ISO 4217 currency, e.g. AED.
    #[arg(long)]
    pub currency: String,
    /// Unique id of this request (default: the order id plus a unique suffix).
    #[arg(long)]
    pub request_id: Option<String>,
    /// Description of the order (default: "Order ID").
    #[arg(long)]
    pub description: Option<String>,
    /// Customer first name.
    #[arg(long)]
    pub first_name: Option<String>,
    /// Customer last name.
    #[arg(long)]
    pub last_name: Option<String>,
    /// Customer email.
    #[arg(long)]
    pub email: Option<String>,
    /// Customer phone with international code, e.g. 971500000000.
    #[arg(long)]
    pub phone: Option<String>,
    /// Billing address: name.
    #[arg(long)]
    pub billing_name: Option<String>,
    /// Billing address: line 1.
    #[arg(long)]
    pub billing_address1: Option<String>,
    /// Billing address: line 2.
    #[arg(long)]
    pub billing_address2: Option<String>,
    /// Billing address: city.
    #[arg(long)]
    pub billing_city: Option<String>,
    /// Billing address: state.
    #[arg(long)]
    pub billing_state: Option<String>,
    /// Billing address: zip code.
    #[arg(long)]
    pub billing_zip: Option<String>,
    /// Billing address: country (ISO 3166-1 alpha-2 or alpha-3).
    #[arg(long)]
    pub billing_country: Option<String>,
    /// Let paymennt send the link by SMS (needs --phone).
    #[arg(long)]
    pub send_sms: bool,
    /// Let paymennt send the link by email (needs --email).
    #[arg(long)]
    pub send_email: bool,
    /// Minutes until the link expires (15 to 10080).
    #[arg(long, value_name = "MINUTES")]
    pub expires_in: Option<i64>,
    /// Payment page language (ISO 639-1, e.g. EN, AR).
    #[arg(long)]
    pub language: Option<String>,
    /// Print paymennt's full response as JSON.
    #[arg(long)]
    pub json: bool,
}

impl LinkCreateArgs {
    /// Checks locally what the spec requires, before any call.
    fn to_request(&self) -> Result<LinkRequest, UsageError> {
        let usage = |message: String| UsageError(message);
        if self.order_id.trim().is_empty() {
            return Err(usage("--order must not be empty".into()));
        }
        let amount: Amount = self
            .amount
            .parse()
            .map_err(|e| usage(format!("--amount: {e}")))?;
        let currency: Currency = self
            .currency
            .parse()
            .map_err(|e| usage(format!("--currency: {e}")))?;
        if let Some(minutes) = self.expires_in
            && !(15..=10080).contains(&minutes)
        {
            return Err(usage(format!(
                "--expires-in {minutes} is out of range: paymennt accepts 15 to 10080 minutes"
            )));
        }
        if let Some(language) = &self.language
            && !(2..=3).contains(&language.len())
        {
            return Err(usage(format!(
                "--language '{}' must be a 2-letter ISO 639-1 code",
                printable(language)
            )));
        }
        let customer = match (&self.first_name, &self.last_name, &self.email) {
            (None, None, None) if self.phone.is_none() => None,
            (Some(first), Some(last), Some(email)) => Some(Customer {
                id: None,
                first_name: first.clone(),
                last_name: last.clone(),
                email: email.clone(),
                phone: self.phone.clone(),
            }),
            _ => {
                return Err(usage(
                    "a customer needs --first-name, --last-name and --email together (paymennt requires all three)".into(),
                ));
            }
        };
        if self.send_sms && self.phone.is_none() {
            return Err(usage("--send-sms needs --phone".into()));
        }
        if self.send_email && self.email.is_none() {
            return Err(usage("--send-email needs --email".into()));
        }
        let billing_given = [
            &self.billing_name,
            &self.billing_address1,
            &self.billing_city,
            &self.billing_country,
        ]
        .iter()
        .any(|v| v.is_some())
            || self.billing_address2.is_some()
            || self.billing_state.is_some()
            || self.billing_zip.is_some();
        let billing_address = if billing_given {
            match (
                &self.billing_name,
                &self.billing_address1,
                &self.billing_city,
                &self.billing_country,
            ) {
                (Some(name), Some(line1), Some(city), Some(country)) => Some(Address {
                    name: name.clone(),
                    address1: line1.clone(),
                    address2: self.billing_address2.clone(),
                    city: city.clone(),
                    state: self.billing_state.clone(),
                    zip: self.billing_zip.clone(),
                    country: country.clone(),
                }),
                _ => {
                    return Err(usage(
                        "a billing address needs --billing-name, --billing-address1, --billing-city and --billing-country".into(),
                    ));
                }
            }
        } else {
            None
        };
        let request_id = self.request_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                self.order_id,
                &uuid::Uuid::now_v7().simple().to_string()[20..]
            )
        });
        Ok(LinkRequest {
            request_id,
            order_id: self.order_id.clone(),
            description: self
                .description
                .clone()
                .unwrap_or_else(|| format!("Order {}", self.order_id)),
            currency: currency.to_string(),
            amount: JsonDecimal(amount.value()),
            send_sms: self.send_sms,
            send_email: self.send_email,
            customer,
            billing_address,
            expires_in: self.expires_in,
            language: self.language.clone(),
            ..LinkRequest::default()
        })
    }
}

/// Opens the ledger named by the settings (`[ledger] path`, or `url` for PostgreSQL), with
/// the path or `host:port/database` in any error.
pub async fn open_ledger(settings: &Settings) -> anyhow::Result<Ledger> {
    if settings.ledger.url.is_some() {
        return open_postgres_ledger(settings).await;
    }
    Ok(Ledger::open(&settings.ledger.path).await?)
}

/// Opens the PostgreSQL ledger `[ledger] url` names, as an operator's command (no lease
/// needed): a setting to fix (password, TLS, a newer schema) is exit 2 naming the key, a
/// database that cannot be reached exit 1 naming where it is.
pub(crate) async fn open_postgres_ledger(settings: &Settings) -> anyhow::Result<Ledger> {
    Ok(Ledger::postgres(open_postgres_store(settings).await?))
}

/// The store behind [`open_postgres_ledger`], for what only PostgreSQL has (the lease).
pub(crate) async fn open_postgres_store(
    settings: &Settings,
) -> anyhow::Result<crate::ledger::postgres::PgStore> {
    use crate::ledger::postgres::{PgStore, Session};
    PgStore::open(&settings.ledger, Session::Operator)
        .await
        .map_err(crate::ledger::postgres::PgError::into_exit_error)
}

/// Opens the ledger for reading; a missing SQLite file is explained rather than created.
pub(super) async fn open_existing_ledger(settings: &Settings) -> anyhow::Result<Ledger> {
    if settings.ledger.url.is_some() {
        return open_postgres_ledger(settings).await;
    }
    let path = &settings.ledger.path;
    if !path.exists() {
        anyhow::bail!(
            "no ledger at '{}'\n\nnothing has been tracked yet with this config ({}); check [ledger] path",
            path.display(),
            settings.origin_name()
        );
    }
    open_ledger(settings).await
}

/// Records a verified checkout in the ledger, as a person's action.
async fn record_verified(
    settings: &Settings,
    ledger: &Ledger,
    verified: &VerifiedCheckout,
) -> anyhow::Result<ApplyOutcome> {
    Ok(ledger
        .apply(
            verified,
            Source::Manual,
            None,
            &settings.hooks,
            settings.firestore.refund_watch,
        )
        .await?)
}

/// A paymennt answer naming a Firestore document that cannot exist (a reserved `__...__` id, a
/// '/' in an id, ...) is a usage error (exit 2): paywatch cannot watch it, and it is never sent
/// to Firestore. Other errors pass through.
fn impossible_name(error: crate::paymennt::Error, origin: &str) -> anyhow::Error {
    use crate::paymennt::wire::CheckoutShapeError;
    match error {
        crate::paymennt::Error::Shape(CheckoutShapeError::Invalid(invalid))
            if invalid.what.starts_with("firebase") =>
        {
            UsageError(format!(
                "{origin}: {invalid}\n\npaywatch cannot watch this checkout's Firestore document; \
             check the value with paymennt"
            ))
            .into()
        }
        other => other.into(),
    }
}

/// The pauses before each search for a link whose create answer was lost: paymennt may still be
/// making it when the first search arrives. About 3 s in all.
const FIND_LINK_PAUSES: [std::time::Duration; 3] = [
    std::time::Duration::ZERO,
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
];

/// `paywatch link create`.
///
/// The create is sent once ([`Client::create_link`]). When its answer is lost in a way that
/// may have left a link at paymennt (a timeout or reset after sending, a 5xx, an unreadable
/// 2xx), the link is looked for ([`find_lost_link`]) before anything else: found, it is
/// recorded and printed as if the answer had arrived; not found, the outcome is unknown
/// ([`OutcomeUnknown`], exit 3). Never a second create.
///
/// `deadline` (`--timeout`) bounds the create and the look: once the create may have been
/// sent, the deadline passing leaves the outcome unknown (exit 3), as a lost answer does.
pub async fn link_create(
    settings: &Settings,
    args: &LinkCreateArgs,
    deadline: Deadline,
) -> anyhow::Result<()> {
    let request = args.to_request()?;
    let client = super::waiting::client(&settings.paymennt)?;
    // Open the ledger first: a ledger we cannot write must stop us before a link exists.
    let ledger = open_ledger(settings).await?;
    let ticket = ledger.issue_ticket().await?;
    let sent_at = chrono::Utc::now();
    let cut_short = |what: String| -> anyhow::Error {
        unknown_outcome(
            &request,
            &format!(
                "{what} within --timeout {} (paymennt at {})",
                humantime::format_duration(deadline.total()),
                client.base_url()
            ),
        )
    };
    let Some(created) = deadline.run(client.create_link(&request, ticket)).await else {
        return Err(cut_short(
            "paymennt did not answer Create payment link".to_owned(),
        ));
    };
    let verified = match created {
        Ok(verified) => verified,
        Err(error) if error.reached() == Reached::Maybe => {
            let looked = deadline.run(find_lost_link(&client, &ledger, &request, sent_at, &error));
            match looked.await {
                Some(found) => found?,
                None => {
                    return Err(cut_short(format!(
                        "{error}; looking for the link at paymennt did not finish"
                    )));
                }
            }
        }
        Err(error) => {
            return Err(impossible_name(
                error,
                "paymennt created the link, but its response",
            ))
            .context("creating the payment link");
        }
    };
    // Tracked first, so the ledger says how it came (`link-create`); the answer is then
    // recorded as a person's verification, as `track` does.
    let recorded = match ledger.track(verified.facts(), TrackedVia::LinkCreate).await {
        Ok(_) => record_verified(settings, &ledger, &verified).await,
        Err(error) => Err(error.into()),
    };
    if let Err(error) = recorded {
        anyhow::bail!(
            "payment link {} was created but could not be recorded: {error:#}\n\nrecord it with: paywatch track --checkout-id {}",
            verified.id(),
            verified.id()
        );
    }
    if args.json {
        let value: &serde_json::value::RawValue = serde_json::from_str(verified.raw_json())?;
        output::json(&value)
    } else {
        let url = verified.facts().redirect_url.clone().unwrap_or_default();
        // stdout stays the URL alone (`url=$(paywatch link create ...)`); the id the next
        // commands take goes to stderr, for the person at the terminal.
        output::write_out(&url)?;
        {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr().lock(),
                "checkout {id} (order {order}) created and tracked; see it with: paywatch status {id}",
                id = verified.id(),
                order = printable(&request.order_id)
            );
        }
        tracing::info!(checkout = %verified.id(), order = %printable(&request.order_id), "payment link created and tracked");
        Ok(())
    }
}

/// After a create whose answer was lost (`lost`), looks for the link at paymennt by order id
/// and `requestId`, a few times over about 3 s ([`FIND_LINK_PAUSES`]).
///
/// # Errors
///
/// [`OutcomeUnknown`] naming the order and `requestId` when no link is found (or looking
/// failed); the ledger's error if a ticket cannot be issued.
async fn find_lost_link(
    client: &Client,
    ledger: &Ledger,
    request: &LinkRequest,
    sent_at: chrono::DateTime<chrono::Utc>,
    lost: &crate::paymennt::Error,
) -> anyhow::Result<VerifiedCheckout> {
    let order = printable(&request.order_id);
    let request_id = printable(&request.request_id);
    tracing::warn!(
        %order,
        request_id = %request_id,
        error = %lost,
        "the answer to Create payment link was lost and the link may exist; looking for it at paymennt (it is not sent again)"
    );
    let mut search_error = None;
    let mut searches = 0;
    for pause in FIND_LINK_PAUSES {
        tokio::time::sleep(pause).await;
        searches += 1;
        // A ticket per look: the answer reflects what paymennt had committed before it.
        let ticket = ledger.issue_ticket().await?;
        match client.find_link(request, sent_at, ticket).await {
            Ok(Some(verified)) => {
                tracing::warn!(
                    checkout = %verified.id(),
                    %order,
                    request_id = %request_id,
                    "payment link recovered: paymennt made it, its answer was lost ({lost}); found by its requestId and recorded, nothing was sent twice"
                );
                return Ok(verified);
            }
            Ok(None) => search_error = None,
            Err(error) if error.is_retryable() => search_error = Some(error),
            Err(error) => {
                search_error = Some(error);
                break;
            }
        }
    }
    let looked = match &search_error {
        None => format!(
            "no link with this requestId was found at paymennt ({searches} searches over {} s)",
            FIND_LINK_PAUSES.iter().map(|p| p.as_secs()).sum::<u64>()
        ),
        Some(error) => format!("looking for the link at paymennt failed: {error}"),
    };
    Err(unknown_outcome(request, &format!("{lost}; {looked}")))
}

/// [`OutcomeUnknown`] for the link `request` asks for: `why` says what happened; the message
/// names the order and `requestId` to check at paymennt.
fn unknown_outcome(request: &LinkRequest, why: &str) -> anyhow::Error {
    let order = printable(&request.order_id);
    let request_id = printable(&request.request_id);
    OutcomeUnknown(format!(
        "the outcome of creating the payment link for order '{order}' (requestId '{request_id}') is unknown: {why}\n\n\
         the link may exist at paymennt, and it was not sent again: check paymennt for order '{order}' and requestId '{request_id}' \
         (the dashboard, or Search Checkouts with orderId and requestId); if a link is there, record it with \
         `paywatch track --checkout-id ID`; create a link again only once you know there is none"
    ))
    .into()
}

/// Arguments of `paywatch track`.
#[derive(Debug, clap::Args)]
pub struct TrackArgs {
    /// A create-link or Get Checkout response (the wrapper or the bare result); `-` for stdin.
    #[arg(value_name = "FILE|-", conflicts_with = "checkout_id")]
    pub file: Option<PathBuf>,
    /// Fetch the checkout with Get Checkout and record it (verified).
    #[arg(long, value_name = "ID")]
    pub checkout_id: Option<String>,
    /// Print the tracked checkout as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reads a response and returns the checkout inside it, naming what is wrong if anything is.
pub fn parse_response(text: &str, origin: &str) -> Result<Checkout, UsageError> {
    crate::paymennt::intake::read_response(text, origin)
        .map_err(|rejected| UsageError(rejected.message))
}

/// `paywatch track`.
pub async fn track(settings: &Settings, args: &TrackArgs) -> anyhow::Result<()> {
    if let Some(id) = &args.checkout_id {
        let id: CheckoutId = id
            .parse()
            .map_err(|e| UsageError(format!("--checkout-id: {e}")))?;
        let client = super::waiting::client(&settings.paymennt)?;
        let ledger = open_ledger(settings).await?;
        let ticket = ledger.issue_ticket().await?;
        let verified = client
            .get_checkout(&id, ticket)
            .await
            .map_err(|error| impossible_name(error, &format!("Get Checkout {id}")))
            .with_context(|| format!("fetching checkout {id}"))?;
        let outcome = record_verified(settings, &ledger, &verified).await?;
        let note = match outcome {
            ApplyOutcome::Transition { .. } => "recorded",
            ApplyOutcome::Unchanged => "unchanged",
            ApplyOutcome::Stale => "a newer answer was already recorded",
        };
        return finish_track(
            &ledger,
            &id,
            args.json,
            &format!("tracking checkout {id}: {} ({note})", verified.status()),
        )
        .await;
    }
    let (text, origin) = match args.file.as_deref() {
        None => {
            return Err(UsageError(
                "give a response FILE, '-' for stdin, or --checkout-id ID".into(),
            )
            .into());
        }
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| UsageError(format!("cannot read stdin: {e}")))?;
            (text, "stdin".to_owned())
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot read '{}': {e}", path.display())))?;
            (text, path.display().to_string())
        }
    };
    let facts = track_input(&text, &origin).map_err(|rejected| UsageError(rejected.message))?;
    let ledger = open_ledger(settings).await?;
    let outcome = ledger.track(&facts, TrackedVia::Track).await?;
    let note = match outcome {
        TrackOutcome::Added => "now watched; its status will be verified with Get Checkout",
        TrackOutcome::AlreadyTracked => "already tracked",
    };
    finish_track(
        &ledger,
        &facts.id,
        args.json,
        &format!("tracking checkout {}: {note}", facts.id),
    )
    .await
}

async fn finish_track(
    ledger: &Ledger,
    id: &CheckoutId,
    json: bool,
    message: &str,
) -> anyhow::Result<()> {
    if json {
        let record = ledger
            .checkout(id)
            .await?
            .with_context(|| format!("checkout {id} vanished from the ledger"))?;
        output::json(&record)
    } else {
        output::write_out(message)
    }
}

/// Arguments of `paywatch status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The checkout id; without it, the ledger's summary: where it is, its counts and, on
    /// PostgreSQL, which daemon holds the lease (the active one) and at which epoch.
    pub checkout_id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_id(text: &str) -> Result<CheckoutId, UsageError> {
    text.parse().map_err(|e| UsageError(format!("{e}")))
}

/// An id the ledger does not have is an input error (exit 2), as everywhere: see the README's
/// exit codes.
fn not_tracked(id: &CheckoutId) -> anyhow::Error {
    UsageError(format!(
        "checkout {id} is not tracked\n\ntrack it with: paywatch track --checkout-id {id}"
    ))
    .into()
}

/// `paywatch status`.
pub async fn status(settings: &Settings, args: &StatusArgs) -> anyhow::Result<()> {
    let Some(id) = &args.checkout_id else {
        return ledger_status(settings, args.json).await;
    };
    let id = parse_id(id)?;
    let ledger = open_existing_ledger(settings).await?;
    let record = ledger
        .checkout(&id)
        .await?
        .ok_or_else(|| not_tracked(&id))?;
    if args.json {
        output::json(&record)
    } else {
        let transitions = ledger.transitions(&id).await?;
        output::write_out(&output::checkout_detail(
            &record,
            &transitions,
            &settings.firestore.database,
        ))
    }
}

/// What `paywatch status` without a checkout id prints.
#[derive(Serialize)]
struct LedgerStatus {
    /// `sqlite` or `postgresql`.
    backend: &'static str,
    /// The file, or `host:port/database`.
    at: String,
    /// On PostgreSQL: the lease (None before any daemon was ever active).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseStatus>,
    checkouts: i64,
    watched: i64,
    hooks_pending: i64,
    hooks_dead: i64,
}

/// The lease as `paywatch status` shows it.
#[derive(Serialize)]
struct LeaseStatus {
    /// The daemon that holds (or last held) it: `host:pid`.
    holder: String,
    /// Its epoch.
    epoch: i64,
    /// Whether it is held now, by the database's clock: the holder is the active daemon.
    live: bool,
    /// Until it runs out unless renewed.
    expires_in_ms: u64,
}

/// `paywatch status` without a checkout id: where the ledger is, its counts, and on
/// PostgreSQL which daemon is active.
async fn ledger_status(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let (ledger, backend, at, lease) = if settings.ledger.url.is_some() {
        let store = open_postgres_store(settings).await?;
        let row = crate::ledger::postgres::read_lease(store.pool(), store.target()).await?;
        let at = store.target().describe().to_owned();
        let lease = row.map(|row| LeaseStatus {
            holder: row.holder,
            epoch: row.epoch,
            live: row.live,
            expires_in_ms: u64::try_from(row.remaining.as_millis()).unwrap_or(u64::MAX),
        });
        (Ledger::postgres(store), "postgresql", at, lease)
    } else {
        let ledger = open_existing_ledger(settings).await?;
        let at = settings.ledger.path.display().to_string();
        (ledger, "sqlite", at, None)
    };
    let counts = ledger.counts().await?;
    let summary = LedgerStatus {
        backend,
        at,
        lease,
        checkouts: counts.checkouts,
        watched: counts.watched,
        hooks_pending: counts.hooks_pending,
        hooks_dead: counts.hooks_dead,
    };
    if json {
        return output::json(&summary);
    }
    let mut text = format!("ledger:    {} ({})\n", summary.at, summary.backend);
    text.push_str(&match (&summary.lease, summary.backend) {
        (_, "sqlite") => "role:      one daemon (an SQLite ledger has no lease)\n".to_owned(),
        (None, _) => "lease:     never held: no daemon has been active on this ledger\n".to_owned(),
        (Some(lease), _) if lease.live => format!(
            "lease:     held by {} at epoch {} (the active daemon), {:.1?} left unless renewed\n",
            lease.holder,
            lease.epoch,
            Duration::from_millis(lease.expires_in_ms)
        ),
        (Some(lease), _) => format!(
            "lease:     not held: last held by {} at epoch {}; no daemon is active (a standby \
             takes it within its poll)\n",
            lease.holder, lease.epoch
        ),
    });
    text.push_str(&format!(
        "checkouts: {} ({} watched)\nhooks:     {} pending, {} dead\n",
        summary.checkouts, summary.watched, summary.hooks_pending, summary.hooks_dead
    ));
    output::write_out(text.trim_end())
}

/// Arguments of `paywatch list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only this status (repeatable; UNVERIFIED for checkouts not yet verified).
    #[arg(long = "status", value_name = "S")]
    pub statuses: Vec<String>,
    /// Only this order id.
    #[arg(long = "order", value_name = "ID")]
    pub order_id: Option<String>,
    /// Only checkouts still watched.
    #[arg(long)]
    pub open: bool,
    /// At most this many (newest first).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print JSON (an array).
    #[arg(long)]
    pub json: bool,
}

/// `paywatch list`.
pub async fn list(settings: &Settings, args: &ListArgs) -> anyhow::Result<()> {
    for status in &args.statuses {
        if !status.eq_ignore_ascii_case("UNVERIFIED")
            && matches!(
                crate::domain::CheckoutStatus::parse(status),
                crate::domain::CheckoutStatus::Unknown(_)
            )
        {
            return Err(UsageError(format!(
                "--status '{}' is not a known status\n\nknown: {}, UNVERIFIED",
                printable(status),
                crate::domain::CheckoutStatus::KNOWN
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into());
        }
    }
    let ledger = open_existing_ledger(settings).await?;
    let filter = ListFilter {
        statuses: args.statuses.clone(),
        order_id: args.order_id.clone(),
        watched_only: args.open,
        limit: args.limit,
    };
    let records = ledger.list(&filter).await?;
    if args.json {
        output::json(&records)
    } else {
        output::write_out(&output::checkout_table(&records))
    }
}

/// Arguments of `paywatch events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// The checkout id.
    pub checkout_id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct EventsJson<'a> {
    checkout_id: &'a str,
    transitions: Vec<output::TransitionJson<'a>>,
    deliveries: &'a [crate::ledger::Delivery],
}

/// `paywatch events`.
pub async fn events(settings: &Settings, args: &EventsArgs) -> anyhow::Result<()> {
    let id = parse_id(&args.checkout_id)?;
    let ledger = open_existing_ledger(settings).await?;
    if ledger.checkout(&id).await?.is_none() {
        return Err(not_tracked(&id));
    }
    let transitions = ledger.transitions(&id).await?;
    let deliveries = ledger.deliveries_of(&id).await?;
    if args.json {
        let mut items = Vec::new();
        for record in &transitions {
            let checkout: &serde_json::value::RawValue =
                serde_json::from_str(&record.verified_json)
                    .with_context(|| format!("transition {} holds invalid JSON", record.id))?;
            items.push(output::TransitionJson { record, checkout });
        }
        output::json(&EventsJson {
            checkout_id: id.as_str(),
            transitions: items,
            deliveries: &deliveries,
        })
    } else {
        output::write_out(&output::transition_lines(&transitions, &deliveries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_and_bare_result_both_parse() {
        let bare = r#"{"id":"1","amount":5,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c","firebaseDocument":"d"}"#;
        let wrapped = format!(r#"{{"success":true,"elapsed":3,"result":{bare}}}"#);
        assert!(parse_response(bare, "f").expect("bare").facts().is_ok());
        assert!(
            parse_response(&wrapped, "f")
                .expect("wrapped")
                .facts()
                .is_ok()
        );
    }

    #[test]
    fn an_error_response_is_rejected_with_its_message() {
        let error = parse_response(r#"{"success":false,"error":"Invalid amount"}"#, "resp.json")
            .expect_err("error");
        assert!(error.to_string().contains("Invalid amount"), "{error}");
        assert!(error.to_string().contains("resp.json"), "{error}");
    }

    #[test]
    fn malformed_json_is_named() {
        let error = parse_response("{\"id\": ", "resp.json").expect_err("malformed");
        assert!(error.to_string().contains("not valid JSON"), "{error}");
    }

    #[test]
    fn link_arguments_are_checked_before_any_call() {
        let base = LinkCreateArgs {
            order_id: "ORD-1".into(),
            amount: "100.00".into(),
            currency: "AED".into(),
            request_id: None,
            description: None,
            first_name: None,
            last_name: None,
            email: None,
            phone: None,
            billing_name: None,
            billing_address1: None,
            billing_address2: None,
            billing_city: None,
            billing_state: None,
            billing_zip: None,
            billing_country: None,
            send_sms: false,
            send_email: false,
            expires_in: None,
            language: None,
            json: false,
        };
        let request = base.to_request().expect("valid");
        assert_eq!(request.amount.0.to_string(), "100.00");
        assert!(request.request_id.starts_with("ORD-1-"));
        let negative = LinkCreateArgs {
            amount: "-5".into(),
            ..base.clone()
        };
        assert!(
            negative
                .to_request()
                .expect_err("negative")
                .to_string()
                .contains("--amount")
        );
        let currency = LinkCreateArgs {
            currency: "DIRHAM".into(),
            ..base.clone()
        };
        assert!(
            currency
                .to_request()
                .expect_err("currency")
                .to_string()
                .contains("--currency")
        );
        let expiry = LinkCreateArgs {
            expires_in: Some(10),
            ..base.clone()
        };
        assert!(
            expiry
                .to_request()
                .expect_err("expiry")
                .to_string()
                .contains("15 to 10080")
        );
        let sms = LinkCreateArgs {
            send_sms: true,
            ..base.clone()
        };
        assert!(sms.to_request().is_err());
    }
}
