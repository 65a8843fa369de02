//! `paywatch run` (the daemon) and `paywatch demo` (sandbox + daemon + scripted payments).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use super::output;
use crate::daemon::{self, Control, DaemonStatus, RunOptions};
use crate::domain::{CheckoutId, CheckoutStatus, format_money, parse_decimal};
use crate::ledger::{Ledger, ListFilter};
use crate::logging::LogHandle;
use crate::paymennt::Client;
use crate::paymennt::wire::{JsonDecimal, LinkRequest};
use crate::sandbox::{Sandbox, SandboxOptions};
use crate::settings::Settings;

/// `paywatch run`: the daemon, until SIGTERM or SIGINT.
pub async fn run(settings: Settings, log: LogHandle) -> anyhow::Result<()> {
    let (controls, control_receiver) = mpsc::channel(8);
    let _signals = daemon::signals::forward(controls).context("cannot install signal handlers")?;
    let options = RunOptions {
        config_path: settings.origin.clone(),
        log,
        status: None,
        notifier: daemon::notify::Notifier::from_env(),
        http_addr: None,
        metrics: crate::metrics::Metrics::new(),
    };
    daemon::run(settings, control_receiver, options).await
}

/// Arguments of `paywatch demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the sandbox and daemon running after the script (Ctrl-C to stop).
    #[arg(long)]
    pub keep_running: bool,
    /// Firestore stream mode for the demo daemon.
    #[arg(long, default_value = "multiplexed", value_parser = ["multiplexed", "per-document"])]
    pub stream_mode: String,
}

/// How long a demo "minute" of `expiresIn` lasts, so a 15-minute link expires in 9 s.
const DEMO_MINUTE: Duration = Duration::from_millis(600);

/// The demo's pace between scripted actions, so a person can follow the log.
const STEP: Duration = Duration::from_millis(700);

/// `paywatch demo`.
pub async fn demo(args: &DemoArgs, format: crate::settings::LogFormat) -> anyhow::Result<()> {
    crate::logging::init("info,paywatch::sandbox=warn,paywatch::sources=warn", format);
    let sandbox = Sandbox::start(SandboxOptions {
        expiry_minute: DEMO_MINUTE,
        ..SandboxOptions::default()
    })
    .await
    .context("starting the sandbox")?;
    let workdir = tempfile::Builder::new()
        .prefix("paywatch-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let hook_log = workdir.path().join("hook.log");
    let config_path = write_demo_config(workdir.path(), &sandbox, &hook_log, &args.stream_mode)?;
    // The demo must not pick up the operator's PAYWATCH_* variables.
    let settings = Settings::load_with_env(Some(&config_path), Vec::new())?;
    output::write_out(&format!(
        "paywatch demo: sandbox API {} , Firestore {} , ledger {}\n",
        sandbox.api_base_url(),
        sandbox.firestore_endpoint(),
        settings.ledger.path.display()
    ))?;

    let (controls, control_receiver) = mpsc::channel(8);
    let (status_sender, mut status) = watch::channel(DaemonStatus::default());
    let options = RunOptions {
        config_path: Some(config_path),
        log: LogHandle::detached(),
        status: Some(status_sender),
        notifier: daemon::notify::Notifier::disabled(),
        http_addr: None,
        metrics: crate::metrics::Metrics::new(),
    };
    let daemon = tokio::spawn(daemon::run(settings.clone(), control_receiver, options));
    status
        .wait_for(|s| s.ready)
        .await
        .context("the daemon stopped during startup")?;

    let tail = tokio::spawn(tail_hook_log(hook_log.clone()));
    let outcome = script(&settings, &sandbox).await;
    tokio::time::sleep(STEP).await;

    if args.keep_running && outcome.is_ok() {
        output::write_out(
            "\nthe demo keeps running; drive it with `paywatch sandbox pay ID --sandbox URL` or Ctrl-C to stop",
        )?;
        output::write_out(&format!("sandbox admin: {}", sandbox.admin_url()))?;
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = controls.send(Control::Shutdown).await;
    daemon.await.context("daemon task")??;
    tail.abort();
    let summary = summary(&settings);
    sandbox.shutdown().await;
    outcome?;
    output::write_out(&summary.await?)?;
    Ok(())
}

fn write_demo_config(
    dir: &Path,
    sandbox: &Sandbox,
    hook_log: &Path,
    stream_mode: &str,
) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the paywatch binary for the demo hook")?;
    let quote = |text: &str| toml::Value::String(text.to_owned()).to_string();
    let config = format!(
        "# Written by `paywatch demo`.\n\
         [ledger]\npath = {ledger}\n\n\
         [paymennt]\nbase_url = {base}\napi_key = {key}\napi_secret = {secret}\nmax_retries = 6\n\n\
         [firestore]\nendpoint = {endpoint}\nstream_mode = {mode}\n\n\
         [reconcile]\ninterval = \"30s\"\n\n\
         [daemon]\ndrain_timeout = \"5s\"\n\n\
         [[hooks]]\nname = \"demo-print\"\ncommand = [{exe}, \"demo-hook\", \"--append-to\", {log}]\ntimeout = \"10s\"\nmax_attempts = 3\n",
        ledger = quote(&dir.join("paywatch.db").display().to_string()),
        base = quote(&sandbox.api_base_url()),
        key = quote(sandbox.api_key()),
        secret = quote(sandbox.api_secret()),
        endpoint = quote(&sandbox.firestore_endpoint()),
        mode = quote(stream_mode),
        exe = quote(&exe.display().to_string()),
        log = quote(&hook_log.display().to_string()),
    );
    let path = dir.join("paywatch.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The scripted merchant day: five links, then pay, fail, cancel, refund and expire.
async fn script(settings: &Settings, sandbox: &Sandbox) -> anyhow::Result<()> {
    let client = Client::from_settings(&settings.paymennt)?;
    let ledger = super::checkouts::open_ledger(settings).await?;
    let orders = [
        ("ORD-1001", "100.00"),
        ("ORD-1002", "49.90"),
        ("ORD-1003", "15.00"),
        ("ORD-1004", "250.00"),
        ("ORD-1005", "9.99"),
    ];
    let mut ids = Vec::new();
    for (index, (order, amount)) in orders.iter().enumerate() {
        let request = LinkRequest {
            request_id: format!("{order}-r1"),
            order_id: (*order).to_owned(),
            description: format!("Demo order {order}"),
            currency: "AED".into(),
            amount: JsonDecimal(parse_decimal(amount).context("demo amount")?),
            // The last link is left unpaid and expires (15 demo minutes = 9 s).
            expires_in: (index == orders.len() - 1).then_some(15),
            ..LinkRequest::default()
        };
        let ticket = ledger.issue_ticket().await?;
        let verified = client
            .create_link(&request, ticket)
            .await
            .context("creating a demo link")?;
        ledger
            .apply(
                &verified,
                crate::domain::Source::Manual,
                None,
                &settings.hooks,
                settings.firestore.refund_watch,
            )
            .await?;
        output::write_out(&format!(
            "created link for {order} ({amount} AED): {}",
            verified.facts().redirect_url.clone().unwrap_or_default()
        ))?;
        ids.push(verified.id().clone());
    }
    let [paid, failed, cancelled, refunded, expired] = <[CheckoutId; 5]>::try_from(ids)
        .map_err(|_| anyhow::anyhow!("expected five demo links"))?;
    let state = sandbox.state();
    tokio::time::sleep(STEP).await;

    output::write_out("\ncustomer pays ORD-1001")?;
    state.pay(&paid).await?;
    wait_for(&ledger, &paid, &CheckoutStatus::Paid).await?;

    output::write_out("customer's card fails on ORD-1002")?;
    state.fail(&failed).await?;
    wait_for(&ledger, &failed, &CheckoutStatus::Failed).await?;

    output::write_out("customer cancels ORD-1003")?;
    state.cancel(&cancelled).await?;
    wait_for(&ledger, &cancelled, &CheckoutStatus::Cancelled).await?;

    output::write_out("customer pays ORD-1004; the merchant refunds 50.00, then the rest")?;
    state.pay(&refunded).await?;
    wait_for(&ledger, &refunded, &CheckoutStatus::Paid).await?;
    state.refund(&refunded, parse_decimal("50.00")).await?;
    wait_for(&ledger, &refunded, &CheckoutStatus::PartiallyRefunded).await?;
    state.refund(&refunded, None).await?;
    wait_for(&ledger, &refunded, &CheckoutStatus::Refunded).await?;

    output::write_out("nobody pays ORD-1005; its link expires")?;
    wait_for(&ledger, &expired, &CheckoutStatus::Expired).await?;
    Ok(())
}

/// Waits until the ledger shows `status` for `id` (verified by the daemon), with a deadline.
async fn wait_for(ledger: &Ledger, id: &CheckoutId, status: &CheckoutStatus) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let current = ledger.checkout(id).await?.and_then(|record| record.status);
        if current.as_ref() == Some(status) {
            tokio::time::sleep(STEP).await;
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the daemon did not record {status} for checkout {id} within 15 s (ledger says {current:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Prints the demo hook's lines as they appear.
async fn tail_hook_log(path: PathBuf) {
    let mut printed = 0;
    loop {
        if let Ok(text) = tokio::fs::read_to_string(&path).await {
            // Only whole lines: a hook may be halfway through writing the last one.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            for line in complete.lines().skip(printed) {
                let _ = output::write_out(&format!("  hook> {line}"));
                printed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn summary(settings: &Settings) -> anyhow::Result<String> {
    let ledger = super::checkouts::open_ledger(settings).await?;
    let records = ledger.list(&ListFilter::default()).await?;
    let counts = ledger.counts().await?;
    let delivered = ledger
        .deliveries(&crate::ledger::DeliveryFilter {
            state: Some(crate::ledger::DeliveryState::Delivered),
            ..Default::default()
        })
        .await?;
    let mut text = String::from("\nledger summary\n");
    text.push_str(&output::checkout_table(&records));
    text.push_str(&format!(
        "\n\n{} checkouts, {} still watched; hook deliveries: {} delivered, {} pending, {} dead",
        counts.checkouts,
        counts.watched,
        delivered.len(),
        counts.hooks_pending,
        counts.hooks_dead
    ));
    Ok(text)
}

/// Arguments of the demo's hook (`paywatch demo-hook`).
#[derive(Debug, clap::Args)]
pub struct DemoHookArgs {
    /// Append one line per event to this file.
    #[arg(long)]
    pub append_to: PathBuf,
}

/// The demo's hook: reads the event JSON on stdin and appends a one-line summary to a file.
pub fn demo_hook(args: &DemoHookArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the event from stdin")?;
    let event: serde_json::Value =
        serde_json::from_str(&input).context("the event on stdin is not JSON")?;
    let field = |name: &str| {
        event
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_owned()
    };
    let amount = field("amount");
    let line = format!(
        "{} received {} {}: order {} {} {} (was {}; attempt {})",
        field("hook"),
        field("event_id"),
        field("status"),
        field("order_id"),
        parse_decimal(&amount).map(format_money).unwrap_or(amount),
        field("currency"),
        event
            .get("previous_status")
            .and_then(|v| v.as_str())
            .unwrap_or(crate::cli::output::NO_PREVIOUS_STATUS),
        event.get("attempt").and_then(|v| v.as_u64()).unwrap_or(0),
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.append_to)
        .with_context(|| format!("opening {}", args.append_to.display()))?;
    // One write of the whole line: hooks run concurrently and append to the same file, and a
    // single O_APPEND write of a short line is not interleaved with another's.
    file.write_all(format!("{line}\n").as_bytes())
        .with_context(|| format!("writing {}", args.append_to.display()))?;
    Ok(())
}
