//! paymennt's intake: what `paywatch track FILE` and `POST /v1/checkouts` take, a create-link
//! or Get Checkout response someone else received, read and checked by one set of rules.
//!
//! Owns: parsing such a response (the `{success, result}` wrapper or the bare result) into the
//! facts a checkout is tracked with, naming the field at fault.
//! Must never: treat the status in it as verified (only Get Checkout's answer is), or touch the
//! ledger.

use crate::domain::{Amount, printable};
use crate::paymennt::wire::{Checkout, CheckoutFacts, CheckoutShapeError, Envelope};

/// Reads a create-link or Get Checkout response (the wrapper or the bare result) and returns
/// the checkout inside it, naming what is wrong and, where there is one, the field at fault.
///
/// # Errors
///
/// A [`RejectedInput`] starting with `origin`.
pub fn read_response(text: &str, origin: &str) -> Result<Checkout, RejectedInput> {
    let usage = |message: String| RejectedInput {
        message: format!("{origin}: {message}"),
        field: None,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| usage(format!("not valid JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| usage("expected a JSON object (a paymennt response)".into()))?;
    let result_text = if object.contains_key("success") || object.contains_key("result") {
        let envelope: Envelope = serde_json::from_str(text)
            .map_err(|e| usage(format!("not a paymennt response: {e}")))?;
        if !envelope.success {
            let message = envelope.error.unwrap_or_else(|| "no error message".into());
            return Err(usage(format!(
                "the response is a paymennt error (success: false): {}",
                printable(&message)
            )));
        }
        envelope
            .result
            .map(|raw| raw.get().to_owned())
            .ok_or_else(|| usage("the response has no 'result'".into()))?
    } else {
        text.to_owned()
    };
    // The path names the field at fault ("amount: expected a number, got abc").
    let mut deserializer = serde_json::Deserializer::from_str(&result_text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field == "." {
            usage(format!("the checkout cannot be read: {inner}"))
        } else {
            RejectedInput {
                field: Some(field.clone()),
                ..usage(format!(
                    "the checkout cannot be read: field '{field}': {inner}"
                ))
            }
        }
    })
}

/// Why a create-link or Get Checkout response cannot be tracked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedInput {
    /// What is wrong, starting with where the input came from.
    pub message: String,
    /// The field at fault, when one is (`firebaseDocument`, `amount`, ...).
    pub field: Option<String>,
}

/// Reads what `paywatch track FILE` and `POST /v1/checkouts` take (a create-link or Get Checkout
/// response, the wrapper or the bare result) and checks it: the same rules and messages for both.
///
/// # Errors
///
/// A [`RejectedInput`] naming the origin, the problem and, where there is one, the field.
pub fn track_input(text: &str, origin: &str) -> Result<CheckoutFacts, RejectedInput> {
    let checkout = read_response(text, origin)?;
    let facts = checkout.facts().map_err(|error| RejectedInput {
        message: format!("{origin}: {error}"),
        field: Some(match &error {
            CheckoutShapeError::Missing(name) => (*name).to_owned(),
            CheckoutShapeError::Invalid(invalid) => invalid.what.to_owned(),
        }),
    })?;
    Amount::new(facts.amount).map_err(|error| RejectedInput {
        message: format!("{origin}: {error}"),
        field: Some("amount".into()),
    })?;
    Ok(facts)
}
