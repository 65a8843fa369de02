//! Rendering for people (tables, lines) and for machines (`--json`).
//!
//! Owns: the text and JSON shapes printed by `status`, `list`, `events` and `hooks list`. The
//! JSON shapes are documented in the README and kept stable.

use std::io::Write;

use serde::Serialize;

use crate::domain::{CheckoutStatus, format_money, parse_decimal, printable};
use crate::ledger::{CheckoutRecord, Delivery, TransitionRecord};

/// Prints a value as pretty JSON followed by a newline.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_out(&text)
}

/// Writes a block of text to stdout. A closed pipe (`| head`) is not an error.
pub fn write_out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn money(amount: &str) -> String {
    parse_decimal(amount)
        .map(format_money)
        .unwrap_or_else(|| amount.to_owned())
}

/// The spelling of "no previous status", everywhere (the payment log line, `events`, `status`,
/// the demo's hook).
pub const NO_PREVIOUS_STATUS: &str = "untracked";

/// A transition's `from` side: its status, or [`NO_PREVIOUS_STATUS`] for the first one.
fn previous_text(status: Option<&CheckoutStatus>) -> String {
    status
        .map(CheckoutStatus::to_string)
        .unwrap_or_else(|| NO_PREVIOUS_STATUS.into())
}

fn status_text(status: Option<&CheckoutStatus>) -> String {
    status
        .map(CheckoutStatus::to_string)
        .unwrap_or_else(|| "UNVERIFIED".into())
}

/// `paywatch status ID`, for people.
pub fn checkout_detail(
    record: &CheckoutRecord,
    transitions: &[TransitionRecord],
    database: &str,
) -> String {
    let mut lines = vec![
        format!("checkout     {}", record.id),
        format!("status       {}", status_text(record.status.as_ref())),
        format!(
            "order        {}",
            record
                .order_id
                .as_deref()
                .map(printable)
                .unwrap_or_default()
        ),
        format!(
            "request      {}",
            record
                .request_id
                .as_deref()
                .map(printable)
                .unwrap_or_default()
        ),
        format!("amount       {} {}", money(&record.amount), record.currency),
    ];
    if let Some(refunded) = record
        .total_refunded
        .as_deref()
        .filter(|r| parse_decimal(r).is_some_and(|d| !d.is_zero()))
    {
        lines.push(format!(
            "refunded     {} {}",
            money(refunded),
            record.currency
        ));
    }
    if let Some(url) = &record.redirect_url {
        lines.push(format!("payment page {}", printable(url)));
    }
    lines.push(format!(
        "watched      {}",
        match (record.watched, &record.watch_until) {
            (false, _) => "no".to_owned(),
            (true, Some(until)) => format!("yes, for refunds until {until}"),
            (true, None) => "yes".to_owned(),
        }
    ));
    lines.push(format!(
        "document     projects/{}/databases/{database}/documents/{}/{}",
        record.firebase.database, record.firebase.collection, record.firebase.document
    ));
    if let Some(refused) = &record.listen_refused {
        lines.push(format!(
            "listen       REFUSED by Firestore: {}: {} (since {}, {} time(s); next try {}); \
             the reconciler still checks this checkout",
            printable(&refused.code),
            printable(&refused.message),
            refused.first_refused_at,
            refused.count,
            refused.next_retry_at.as_deref().unwrap_or("unknown")
        ));
    }
    lines.push(format!(
        "tracked      {} ({})",
        record.created_at, record.tracked_via
    ));
    lines.push(format!(
        "verified     {}",
        record.verified_at.as_deref().unwrap_or("never")
    ));
    if let Some(last) = transitions.last() {
        lines.push(format!(
            "last change  {} -> {} at {} ({})",
            previous_text(last.from.as_ref()),
            last.to,
            last.verified_at,
            last.source
        ));
    }
    lines.join("\n")
}

/// `paywatch list`, for people: one line per checkout.
pub fn checkout_table(records: &[CheckoutRecord]) -> String {
    if records.is_empty() {
        return "no checkouts".into();
    }
    let mut lines = vec![format!(
        "{:<20} {:<18} {:>14} {:<4} {:<24} {}",
        "CHECKOUT", "STATUS", "AMOUNT", "CUR", "UPDATED", "ORDER"
    )];
    for record in records {
        lines.push(format!(
            "{:<20} {:<18} {:>14} {:<4} {:<24} {}",
            record.id,
            status_text(record.status.as_ref()),
            money(&record.amount),
            record.currency,
            record.updated_at,
            record
                .order_id
                .as_deref()
                .map(printable)
                .unwrap_or_default()
        ));
    }
    lines.join("\n")
}

/// `paywatch events ID`, for people.
pub fn transition_lines(transitions: &[TransitionRecord], deliveries: &[Delivery]) -> String {
    if transitions.is_empty() {
        return "no verified status yet".into();
    }
    let mut lines = Vec::new();
    for transition in transitions {
        let latency = transition
            .latency_ms
            .map(|ms| format!(", {ms} ms after the change"))
            .unwrap_or_default();
        let refunded = match (&transition.refunded_from, &transition.refunded_to) {
            (Some(from), Some(to)) => format!("  refunded {} -> {}", money(from), money(to)),
            _ => String::new(),
        };
        lines.push(format!(
            "#{:<6} {}  {} -> {}{refunded}  (source {}{latency})",
            transition.id,
            transition.verified_at,
            previous_text(transition.from.as_ref()),
            transition.to,
            transition.source
        ));
        for delivery in deliveries
            .iter()
            .filter(|d| d.transition_id == transition.id)
        {
            let detail = delivery
                .last_error
                .as_deref()
                .map(|e| format!(": {}", printable(e)))
                .unwrap_or_default();
            lines.push(format!(
                "         hook {} {} {} after {} attempt(s){detail}",
                delivery.hook,
                delivery.event_id,
                delivery.state.as_str(),
                delivery.attempts
            ));
        }
    }
    lines.join("\n")
}

/// `paywatch hooks list`, for people.
pub fn delivery_table(deliveries: &[Delivery]) -> String {
    if deliveries.is_empty() {
        return "no deliveries".into();
    }
    let mut lines = vec![format!(
        "{:<36} {:<16} {:<20} {:<18} {:<9} {:>3}  {}",
        "EVENT", "HOOK", "CHECKOUT", "STATUS", "STATE", "TRY", "LAST ERROR"
    )];
    for delivery in deliveries {
        lines.push(format!(
            "{:<36} {:<16} {:<20} {:<18} {:<9} {:>3}  {}",
            delivery.event_id,
            delivery.hook,
            delivery.checkout_id,
            delivery.status,
            delivery.state.as_str(),
            delivery.attempts,
            delivery
                .last_error
                .as_deref()
                .map(printable)
                .unwrap_or_default()
        ));
    }
    lines.join("\n")
}

/// A transition in `events --json`: the record plus the verified checkout as a JSON object.
#[derive(Debug, Serialize)]
pub struct TransitionJson<'a> {
    /// The record.
    #[serde(flatten)]
    pub record: &'a TransitionRecord,
    /// The Get Checkout result, verbatim.
    pub checkout: &'a serde_json::value::RawValue,
}
