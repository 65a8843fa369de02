//! `paywatch webhooks register | list | test | disable`: paymennt's webhooks API.
//!
//! A webhook's `hmacKey` is printed only with `--show-hmac-key`: it is the key paywatch checks
//! signatures with (`[http] webhook_hmac_key`), so it is handled like a password.
//!
//! `register` is sent once: when its answer is lost in a way that may have registered the
//! address (a timeout, a reset, a 5xx), the webhooks are listed and a new one for the address
//! is taken as the answer (recovered); if there is none the outcome is unknown (exit 3). It is
//! never sent a second time.

use serde::Serialize;

use super::waiting::Deadline;
use super::{OutcomeUnknown, UsageError, output};
use crate::paymennt::Client;
use crate::paymennt::client::Reached;
use crate::paymennt::wire::{Webhook, WebhookId, WireId};
use crate::settings::{Settings, is_loopback_host};

/// `paywatch webhooks ...`.
#[derive(Debug, clap::Subcommand)]
pub enum WebhooksCommand {
    /// Register URL with paymennt: checkout changes are sent there (paywatch's
    /// `POST /webhooks/paymennt` behind your HTTPS front end).
    Register(RegisterArgs),
    /// List the webhooks registered for this API key.
    List(ListArgs),
    /// Ask paymennt to make a test call to a webhook's address.
    Test(IdArgs),
    /// Stop paymennt calling a webhook.
    Disable(IdArgs),
}

/// Arguments of `webhooks register`.
#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The address paymennt calls (https; http only on a loopback address, for testing).
    pub url: String,
    /// Print the webhook's hmacKey (for `[http] webhook_hmac_key`).
    #[arg(long)]
    pub show_hmac_key: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `webhooks list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print each webhook's hmacKey.
    #[arg(long)]
    pub show_hmac_key: bool,
    /// Print JSON (an array).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `webhooks test` and `webhooks disable`.
#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The webhook id (from `paywatch webhooks list`).
    pub id: String,
    /// Print the webhook's hmacKey.
    #[arg(long)]
    pub show_hmac_key: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A webhook as printed: the key only when asked for.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookOut<'a> {
    id: Option<&'a str>,
    address: Option<&'a str>,
    enabled: Option<bool>,
    failed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hmac_key: Option<&'a str>,
}

fn shown(webhook: &Webhook, show_key: bool) -> WebhookOut<'_> {
    WebhookOut {
        id: webhook.id.as_ref().map(|id| id.0.as_str()),
        address: webhook.address.as_deref(),
        enabled: webhook.enabled,
        failed: webhook.failed,
        hmac_key: webhook
            .hmac_key
            .as_ref()
            .filter(|_| show_key)
            .map(|key| key.expose()),
    }
}

fn line(webhook: &Webhook, show_key: bool) -> String {
    let out = shown(webhook, show_key);
    let flag = |value: Option<bool>, yes: &str, no: &str| match value {
        Some(true) => yes.to_owned(),
        Some(false) => no.to_owned(),
        None => "?".to_owned(),
    };
    let mut text = format!(
        "{}  {}  {}  {}",
        out.id.unwrap_or("-"),
        flag(out.enabled, "enabled", "disabled"),
        flag(out.failed, "failing", "ok"),
        out.address
            .map(crate::domain::printable)
            .unwrap_or_default()
    );
    match (out.hmac_key, webhook.hmac_key.is_some()) {
        (Some(key), _) => text.push_str(&format!("  hmacKey={key}")),
        (None, true) => text.push_str("  hmacKey=[hidden: --show-hmac-key]"),
        (None, false) => {}
    }
    text
}

fn print(webhook: &Webhook, show_key: bool, json: bool) -> anyhow::Result<()> {
    if json {
        output::json(&shown(webhook, show_key))
    } else {
        output::write_out(&line(webhook, show_key))
    }
}

/// Checks the address paymennt will call: https, or http on a loopback host.
fn check_address(url: &str) -> Result<(), UsageError> {
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        UsageError(format!(
            "'{}' is not a URL: {error}",
            crate::domain::printable(url)
        ))
    })?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if parsed.host_str().is_some_and(is_loopback_host) => Ok(()),
        _ => Err(UsageError(format!(
            "'{}' must be an https:// address (paymennt calls it over the internet; http is allowed only on a loopback address, for testing)",
            crate::domain::printable(url)
        ))),
    }
}

/// Registers `address` with one Create new webhook. If the answer is lost in a way that may
/// have registered it, the webhooks are listed and one for `address` that was not there before
/// is taken as the answer.
///
/// # Errors
///
/// paymennt's error when it refused; [`OutcomeUnknown`] naming the address when the answer was
/// lost and no new webhook for it is listed (or listing failed).
///
/// The deadline cutting the create or the look short leaves the outcome unknown too.
async fn register_once(
    client: &Client,
    address: &str,
    deadline: Deadline,
) -> anyhow::Result<Webhook> {
    let shown = crate::domain::printable(address);
    let cut_short = |what: &str| -> anyhow::Error {
        OutcomeUnknown(format!(
            "the outcome of registering webhook address '{shown}' is unknown: {what} within --timeout {} (paymennt at {})\n\n\
             it was not sent again: check with `paywatch webhooks list` (or paymennt's dashboard) whether \
             '{shown}' is registered before registering it again",
            humantime::format_duration(deadline.total()),
            client.base_url()
        ))
        .into()
    };
    // The ids already registered for this address, so a lost answer is not mistaken for an
    // old webhook. Not knowing them (listing failed) only makes that check looser.
    let Some(listed) = deadline.run(client.list_webhooks()).await else {
        // Nothing was sent that creates anything yet.
        return Err(deadline.passed(Some(client.base_url())));
    };
    let before: Option<Vec<WireId>> = listed.ok().map(|webhooks| {
        webhooks
            .into_iter()
            .filter(|w| w.address.as_deref() == Some(address))
            .filter_map(|w| w.id)
            .collect()
    });
    let Some(created) = deadline.run(client.create_webhook(address)).await else {
        return Err(cut_short("paymennt did not answer Create new webhook"));
    };
    let lost = match created {
        Ok(webhook) => return Ok(webhook),
        Err(error) if error.reached() == Reached::Maybe => error,
        Err(error) => return Err(error.into()),
    };
    tracing::warn!(address = %shown, error = %lost, "the answer to Create new webhook was lost and the webhook may exist; looking for it at paymennt (it is not sent again)");
    let Some(listed) = deadline.run(client.list_webhooks()).await else {
        return Err(cut_short(&format!("{lost}; looking for it was not done")));
    };
    let looked = match listed {
        Ok(webhooks) => {
            let found = webhooks.into_iter().rev().find(|w| {
                w.address.as_deref() == Some(address)
                    && match (&before, &w.id) {
                        (Some(before), Some(id)) => !before.contains(id),
                        _ => true,
                    }
            });
            if let Some(webhook) = found {
                tracing::warn!(webhook = ?webhook.id, address = %shown, "webhook recovered: paymennt registered it, its answer was lost ({lost}); found in the list, nothing was sent twice");
                return Ok(webhook);
            }
            "no new webhook for this address is listed at paymennt".to_owned()
        }
        Err(error) => format!("listing the webhooks failed: {error}"),
    };
    Err(OutcomeUnknown(format!(
        "the outcome of registering webhook address '{shown}' is unknown: {lost}; {looked}\n\n\
         it was not sent again: check with `paywatch webhooks list` (or paymennt's dashboard) whether \
         '{shown}' is registered before registering it again"
    ))
    .into())
}

/// Runs a `webhooks` command, within `deadline` (`--timeout`): past it, exit 1 naming
/// paymennt's address (`register`: exit 3 once the create may have been sent).
pub async fn run(
    settings: &Settings,
    command: &WebhooksCommand,
    deadline: Deadline,
) -> anyhow::Result<()> {
    let client = super::waiting::client(&settings.paymennt)?;
    let parse_id = |id: &str| -> Result<WebhookId, UsageError> {
        id.parse().map_err(|error| UsageError(format!("{error}")))
    };
    match command {
        WebhooksCommand::Register(args) => register(&client, args, deadline).await,
        WebhooksCommand::List(args) => {
            let webhooks = within(deadline, &client, client.list_webhooks()).await?;
            if args.json {
                let out: Vec<_> = webhooks
                    .iter()
                    .map(|w| shown(w, args.show_hmac_key))
                    .collect();
                output::json(&out)
            } else if webhooks.is_empty() {
                output::write_out("no webhooks registered")
            } else {
                let lines: Vec<String> = webhooks
                    .iter()
                    .map(|w| line(w, args.show_hmac_key))
                    .collect();
                output::write_out(&lines.join("\n"))
            }
        }
        WebhooksCommand::Test(args) => {
            let id = parse_id(&args.id)?;
            let webhook = within(deadline, &client, client.webhook_action(&id, "test")).await?;
            print(&webhook, args.show_hmac_key, args.json)
        }
        WebhooksCommand::Disable(args) => {
            let id = parse_id(&args.id)?;
            let webhook = within(deadline, &client, client.webhook_action(&id, "disable")).await?;
            print(&webhook, args.show_hmac_key, args.json)
        }
    }
}

/// `call`'s answer, or the deadline's error (exit 1) if it passes first. Each call is bounded
/// on its own, so a create the deadline cuts short is an unknown outcome (exit 3), never this.
async fn within<T>(
    deadline: Deadline,
    client: &Client,
    call: impl Future<Output = Result<T, crate::paymennt::Error>>,
) -> anyhow::Result<T> {
    match deadline.run(call).await {
        Some(result) => Ok(result?),
        None => Err(deadline.passed(Some(client.base_url()))),
    }
}

/// `webhooks register`.
async fn register(client: &Client, args: &RegisterArgs, deadline: Deadline) -> anyhow::Result<()> {
    check_address(&args.url)?;
    let webhook = register_once(client, &args.url, deadline).await?;
    tracing::info!(webhook = ?webhook.id, "webhook registered");
    print(&webhook, args.show_hmac_key, args.json)?;
    if !args.json && !args.show_hmac_key && webhook.hmac_key.is_some() {
        output::write_out(
            "to check notification signatures, run `paywatch webhooks list --show-hmac-key` and set [http] webhook_hmac_key (or its file or credential)",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_addresses_are_registered() {
        assert!(check_address("https://shop.example/webhooks/paymennt").is_ok());
        assert!(check_address("http://127.0.0.1:8788/webhooks/paymennt").is_ok());
        assert!(check_address("http://shop.example/webhooks/paymennt").is_err());
        assert!(check_address("not a url").is_err());
    }

    #[test]
    fn the_key_is_hidden_unless_asked_for() {
        let webhook: Webhook = serde_json::from_str(
            r#"{"id":"7","hmacKey":"s3cr3t-key-value","address":"https://a.example/","enabled":true,"failed":false}"#,
        )
        .expect("webhook");
        let hidden = line(&webhook, false);
        assert!(!hidden.contains("s3cr3t"), "{hidden}");
        assert!(hidden.contains("--show-hmac-key"), "{hidden}");
        assert!(
            !serde_json::to_string(&shown(&webhook, false))
                .expect("json")
                .contains("s3cr3t")
        );
        assert!(!format!("{webhook:?}").contains("s3cr3t"));
        assert!(line(&webhook, true).contains("hmacKey=s3cr3t-key-value"));
    }
}
