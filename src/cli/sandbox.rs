//! `paywatch sandbox`: run the sandbox in the foreground, or drive a running one.
//!
//! Owns: the sandbox's command-line arguments, the foreground run (until Ctrl-C or SIGTERM) with
//! the config snippet a daemon needs, and the `pay|fail|cancel|expire|authorize|refund ID`
//! subcommands, which call a running sandbox's admin endpoints.
//! Must never: reach into a running sandbox other than through its HTTP admin endpoints.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};

use crate::cli::UsageError;
use crate::domain::{Amount, CheckoutId, format_money};
use crate::paymennt::wire::{Checkout, Envelope};
use crate::sandbox::{
    CheckoutIds, DEFAULT_API_KEY, DEFAULT_API_SECRET, DEFAULT_PROJECT_ID, FirestoreAuthCheck,
    Sandbox, SandboxOptions, SearchBehaviour, SearchOrder, StatusSpelling, TestServiceAccount,
};

/// The address `paywatch sandbox` serves its HTTP side on, and the subcommands' default target.
const DEFAULT_API_LISTEN: &str = "127.0.0.1:8790";
/// The address `paywatch sandbox` serves its Firestore on.
const DEFAULT_FIRESTORE_LISTEN: &str = "127.0.0.1:8791";
/// The running sandbox the subcommands talk to by default.
const DEFAULT_SANDBOX_URL: &str = "http://127.0.0.1:8790";

/// Arguments of `paywatch sandbox`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SandboxArgs {
    /// Drive a running sandbox instead of starting one.
    #[command(subcommand)]
    pub action: Option<SandboxCommand>,

    /// How to run the sandbox (without a subcommand).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Options of the foreground sandbox.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the Merchant API (and admin endpoints, and payment page).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_API_LISTEN)]
    pub api_listen: SocketAddr,

    /// Address of the Firestore Listen server (gRPC, plaintext).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_FIRESTORE_LISTEN)]
    pub firestore_listen: SocketAddr,

    /// The X-Paymennt-Api-Key the sandbox accepts.
    #[arg(long, value_name = "KEY", default_value = DEFAULT_API_KEY)]
    pub api_key: String,

    /// The X-Paymennt-Api-Secret the sandbox accepts.
    #[arg(long, value_name = "SECRET", default_value = DEFAULT_API_SECRET, hide_default_value = true)]
    pub api_secret: String,

    /// The Firebase project id answered as firebaseDatabase.
    #[arg(long, value_name = "PROJECT", default_value = DEFAULT_PROJECT_ID)]
    pub project: String,

    /// How statuses are spelled: upper (PARTIALLY_REFUNDED) or spec (Partially refunded).
    #[arg(long, value_enum, default_value_t = SpellingArg::Upper)]
    pub status_spelling: SpellingArg,

    /// How often idle Listen streams get a heartbeat (e.g. 30s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// How the Firestore checks callers: open (anyone), rules (checkout documents by exact
    /// name, unauthenticated or with a Firebase ID token), iam (a test service account's JWT).
    #[arg(long, value_enum, default_value_t = FirestoreAuthArg::Open)]
    pub firestore_auth: FirestoreAuthArg,

    /// With --firestore-auth rules: also require a Firebase ID token (request.auth != null).
    #[arg(long)]
    pub require_sign_in: bool,

    /// The Firebase Web API key the sandbox's Firebase Auth accepts.
    #[arg(long, value_name = "KEY", default_value = crate::sandbox::auth::DEFAULT_WEB_API_KEY)]
    pub web_api_key: String,

    /// How long the sandbox's Firebase ID tokens last (e.g. 1h, 30s).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,

    /// The order Search Checkouts answers in (paymennt's spec promises none): asc, desc, or
    /// random (a shuffle that stays the same while the sandbox runs).
    #[arg(long, value_enum, default_value_t = SearchOrder::Asc)]
    pub search_order: SearchOrder,

    /// How checkout ids are handed out: growing with creation, or random (paymennt's spec
    /// promises no growth).
    #[arg(long, value_enum, default_value_t = CheckoutIds::Growing)]
    pub checkout_ids: CheckoutIds,

    /// How long after its creation a checkout becomes visible to Search Checkouts (e.g. 2s):
    /// a search index that lags behind.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub search_visibility_delay: Duration,

    /// With --firestore-auth iam: where to write the generated test service-account key.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "paywatch-sandbox-service-account.json"
    )]
    pub service_account_file: std::path::PathBuf,
}

/// `--firestore-auth` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FirestoreAuthArg {
    /// Anyone, any or no credentials (an emulator).
    Open,
    /// Security rules: checkout documents by exact name only.
    Rules,
    /// IAM: only a test service account's self-signed JWT.
    Iam,
}

/// `--status-spelling` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpellingArg {
    /// PARTIALLY_REFUNDED, as paymennt's guides write it.
    Upper,
    /// Partially refunded, as the OpenAPI enum writes it.
    Spec,
}

/// The subcommands that drive a running sandbox.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Mark a checkout paid (PENDING or AUTHORIZED to PAID).
    Pay(ActionArgs),
    /// Make a checkout's payment fail (PENDING or AUTHORIZED to FAILED).
    Fail(ActionArgs),
    /// Cancel a checkout (PENDING or AUTHORIZED to CANCELLED).
    Cancel(ActionArgs),
    /// Expire a checkout now (PENDING or AUTHORIZED to EXPIRED).
    Expire(ActionArgs),
    /// Authorize a checkout (PENDING to AUTHORIZED).
    Authorize(ActionArgs),
    /// Refund a paid checkout: all that is left, or --amount.
    Refund(RefundArgs),
}

/// A checkout and the sandbox that holds it.
#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    /// The checkout id.
    pub id: String,

    /// The running sandbox's HTTP address.
    #[arg(long, value_name = "URL", default_value = DEFAULT_SANDBOX_URL)]
    pub sandbox: String,
}

/// A refund: the checkout, and how much (default: everything left).
#[derive(Debug, clap::Args)]
pub struct RefundArgs {
    /// The checkout and the sandbox.
    #[command(flatten)]
    pub target: ActionArgs,

    /// Refund only this much (a decimal such as 10.50).
    #[arg(long, value_name = "AMOUNT")]
    pub amount: Option<String>,
}

/// Runs `paywatch sandbox`.
///
/// # Errors
///
/// A [`UsageError`] for a bad id, amount or URL, or an action the checkout's status does not
/// allow; a runtime error if the sandbox cannot bind its addresses or cannot be reached.
pub async fn run(args: SandboxArgs, format: crate::settings::LogFormat) -> anyhow::Result<()> {
    match args.action {
        None => serve(args.serve, format).await,
        Some(command) => {
            let line = drive(&command).await?;
            writeln!(std::io::stdout().lock(), "{line}").context("cannot write to stdout")?;
            Ok(())
        }
    }
}

/// Runs the sandbox until Ctrl-C or SIGTERM.
async fn serve(args: ServeArgs, format: crate::settings::LogFormat) -> anyhow::Result<()> {
    // The sandbox's own logs are its user interface, under the same rules as the daemon's
    // (`--log-format`, no ANSI escapes but on a terminal, one record per line). Logs go to
    // stderr: stdout carries only the config snippet, so it can be redirected.
    crate::logging::init("info", format);
    if args.token_lifetime < Duration::from_secs(1)
        || args.token_lifetime > Duration::from_secs(24 * 3600)
    {
        return Err(UsageError("--token-lifetime must be between 1s and 24h".into()).into());
    }
    let mut credentials_line = String::new();
    let firestore_auth = match args.firestore_auth {
        FirestoreAuthArg::Open => FirestoreAuthCheck::Open,
        FirestoreAuthArg::Rules => FirestoreAuthCheck::Rules {
            require_sign_in: args.require_sign_in,
        },
        FirestoreAuthArg::Iam => {
            let account = TestServiceAccount::generate(&args.project)?;
            write_private_file(&args.service_account_file, &account.key_json)?;
            credentials_line = format!(
                "credentials = \"{}\"\n",
                args.service_account_file.display()
            );
            FirestoreAuthCheck::Iam(account.iam)
        }
    };
    let options = SandboxOptions {
        firestore_auth,
        web_api_key: args.web_api_key,
        firebase_token_lifetime: args.token_lifetime,
        api_listen: args.api_listen,
        firestore_listen: args.firestore_listen,
        api_key: args.api_key,
        api_secret: args.api_secret,
        project_id: args.project,
        status_spelling: match args.status_spelling {
            SpellingArg::Upper => StatusSpelling::Upper,
            SpellingArg::Spec => StatusSpelling::Spec,
        },
        heartbeat_interval: args.heartbeat,
        search: SearchBehaviour {
            order: args.search_order,
            ids: args.checkout_ids,
            visibility_delay: args.search_visibility_delay,
        },
        ..SandboxOptions::default()
    };
    if !options.api_listen.ip().is_loopback() {
        tracing::warn!(
            address = %options.api_listen,
            "sandbox: the admin endpoints (/_sandbox/) have no authentication; \
             anyone who can reach this address can pay or refund checkouts"
        );
    }
    let sandbox = Sandbox::start(options).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "paywatch sandbox: Merchant API at {}, Firestore at {}\n\n\
             # Add to the daemon's config:\n{}\n\
             # Drive it: paywatch sandbox pay|fail|cancel|expire|authorize|refund ID --sandbox http://{}\n\
             # Payment pages: the redirectUrl of each link; test card 4242 4242 4242 4242, 12/25, \
             CVV 100 (4000 0000 0000 0002 is declined). Stop with Ctrl-C.",
            sandbox.api_base_url(),
            sandbox.firestore_endpoint(),
            sandbox.daemon_config_toml() + &credentials_line,
            sandbox.api_addr(),
        )
        .context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
    }
    shutdown_signal().await?;
    tracing::info!("sandbox: stopping");
    sandbox.shutdown().await;
    Ok(())
}

/// Writes the test service-account key readable by its owner only.
fn write_private_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot write the test service-account key '{}'",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes()).with_context(|| {
        format!(
            "cannot write the test service-account key '{}'",
            path.display()
        )
    })
}

/// Waits for Ctrl-C or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Calls the admin endpoint for `command`; returns the line to print.
async fn drive(command: &SandboxCommand) -> anyhow::Result<String> {
    let (verb, target, amount) = match command {
        SandboxCommand::Pay(target) => ("pay", target, None),
        SandboxCommand::Fail(target) => ("fail", target, None),
        SandboxCommand::Cancel(target) => ("cancel", target, None),
        SandboxCommand::Expire(target) => ("expire", target, None),
        SandboxCommand::Authorize(target) => ("authorize", target, None),
        SandboxCommand::Refund(refund) => ("refund", &refund.target, refund.amount.as_deref()),
    };
    let id: CheckoutId = target
        .id
        .parse()
        .map_err(|error| UsageError(format!("{error}")))?;
    let amount: Option<Amount> = amount
        .map(str::parse)
        .transpose()
        .map_err(|error| UsageError(format!("--amount: {error}")))?;
    let base = reqwest::Url::parse(&target.sandbox)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
        .ok_or_else(|| {
            UsageError(format!(
                "--sandbox '{}' is not an http URL such as {DEFAULT_SANDBOX_URL}",
                crate::domain::printable(&target.sandbox)
            ))
        })?;
    let mut url = base
        .join(&format!("_sandbox/checkouts/{id}/{verb}"))
        .map_err(|error| UsageError(format!("--sandbox: {error}")))?;
    if let Some(amount) = amount {
        url.query_pairs_mut()
            .append_pair("amount", &amount.value().to_string());
    }

    let response = reqwest::Client::new()
        .post(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the sandbox at {base} (is `paywatch sandbox` running there?)")
        })?;
    let status = response.status();
    let body = response
        .text()
        .await
        .with_context(|| format!("cannot read the sandbox's answer from {base}"))?;
    let envelope: Envelope = serde_json::from_str(&body).with_context(|| {
        format!(
            "{base} answered HTTP {status} with something that is not a sandbox answer\n\n\
             is it a paywatch sandbox?"
        )
    })?;
    if !envelope.success {
        let message = envelope
            .error
            .unwrap_or_else(|| format!("HTTP {status} without a message"));
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(UsageError(format!(
                "no checkout '{id}' in the sandbox at {base}\n\n\
                 list them with: curl {base}_sandbox/checkouts"
            ))
            .into());
        }
        if status.is_client_error() {
            return Err(UsageError(format!("checkout {id}: {message}")).into());
        }
        anyhow::bail!("the sandbox failed to {verb} checkout {id}: {message}");
    }
    let checkout: Checkout = envelope
        .result
        .as_deref()
        .map(|raw| serde_json::from_str(raw.get()))
        .transpose()
        .context("the sandbox's answer has no readable checkout")?
        .unwrap_or_default();
    let status = checkout
        .status
        .as_ref()
        .map_or("?".to_owned(), |status| status.as_str().to_owned());
    let currency = checkout.currency.unwrap_or_default();
    let mut line = format!("checkout {id}: {status}");
    if let Some(amount) = checkout.amount {
        line.push_str(&format!(" ({} {currency}", format_money(amount.0)));
        if let Some(refunded) = checkout.total_refunded.filter(|r| !r.0.is_zero()) {
            line.push_str(&format!(", {} refunded", format_money(refunded.0)));
        }
        line.push(')');
    }
    Ok(line)
}

#[cfg(test)]
mod tests;
