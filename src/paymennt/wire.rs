//! paymennt's JSON on the wire: the response wrapper, checkouts, the create-link request.
//!
//! Owns: serde shapes matching `shared/paymennt/openapi.yaml`, shared by the client (which reads
//! them) and the sandbox (which writes them), plus the parse from a wire checkout to trusted
//! [`CheckoutFacts`].
//! Must never: hold money in a float, or fail on a status it does not know.

use std::fmt;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::domain::{
    CheckoutId, CheckoutStatus, Currency, FirestoreLocation, InvalidValue, parse_decimal, printable,
};

/// paymennt's response wrapper: `{success, elapsed, error, result}`.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    /// Whether the operation succeeded.
    #[serde(default)]
    pub success: bool,
    /// Server-side milliseconds.
    #[serde(default)]
    pub elapsed: Option<i64>,
    /// The error message when `success` is false.
    #[serde(default)]
    pub error: Option<String>,
    /// The result object, kept as raw JSON so amounts keep their exact digits.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
}

/// The wrapper as the sandbox writes it: `result` on success, `error` on failure.
#[derive(Debug, Serialize)]
pub struct EnvelopeOut<T: Serialize> {
    /// Whether the operation succeeded.
    pub success: bool,
    /// Server-side milliseconds.
    pub elapsed: i64,
    /// The error message when `success` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
}

/// A decimal carried as a JSON number with its exact digits (`19.99` stays `19.99`).
///
/// Reading goes through the number's source text rather than an `f64`; writing emits the
/// decimal's own text as a JSON number. Strings holding a number are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JsonDecimal(pub Decimal);

impl Serialize for JsonDecimal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match RawValue::from_string(self.0.to_string()) {
            Ok(raw) => raw.serialize(serializer),
            Err(_) => serializer.serialize_str(&self.0.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for JsonDecimal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <&RawValue>::deserialize(deserializer)?;
        let text = raw.get().trim();
        let text = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        parse_decimal(text).map(JsonDecimal).ok_or_else(|| {
            let shown = printable(text);
            if serde_json::from_str::<serde_json::Number>(text).is_ok() {
                de::Error::custom(format_args!(
                    "the number {shown} cannot be held exactly (at most 28 significant digits, \
                     below 7.9e28 in size)"
                ))
            } else {
                de::Error::custom(format_args!("expected a number, got {shown}"))
            }
        })
    }
}

/// An id that paymennt sends as a string; a bare JSON number is accepted as well.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct WireId(pub String);

impl<'de> Deserialize<'de> for WireId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = WireId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id as a string or an integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WireId, E> {
                Ok(WireId(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WireId, E> {
                Ok(WireId(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WireId, E> {
                Ok(WireId(v.to_string()))
            }
        }
        deserializer.deserialize_any(IdVisitor)
    }
}

/// A checkout as Create payment link, Get Checkout, cancel and refund return it
/// (`CheckoutLinkResponse` / `CheckoutResponse`). Every field is optional on the wire; what we
/// need is checked in [`Checkout::facts`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkout {
    /// Checkout id (a long decimal number as a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<WireId>,
    /// Short human-readable key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_id: Option<String>,
    /// 48 hex characters; used in the redirect URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_key: Option<String>,
    /// The merchant's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The merchant's order id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// ISO 4217 code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The amount the customer must pay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<JsonDecimal>,
    /// Cash amount to be collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cash_amount: Option<JsonDecimal>,
    /// Current status, in either documented spelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CheckoutStatus>,
    /// Total refunded so far, in the checkout currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_refunded: Option<JsonDecimal>,
    /// The payment page for the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_url: Option<String>,
    /// Payment method used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_payment_method: Option<String>,
    /// The customer (kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<serde_json::Value>,
    /// Subscription the checkout was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// Billing address (kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_address: Option<serde_json::Value>,
    /// Delivery address (kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_address: Option<serde_json::Value>,
    /// Firebase project id holding the checkout's document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firebase_database: Option<String>,
    /// Firestore collection of the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firebase_collection: Option<String>,
    /// Firestore document id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firebase_document: Option<String>,
    /// Creation time, ISO 8601.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Branch id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_id: Option<WireId>,
    /// Branch name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_name: Option<String>,
}

/// Why a checkout from the wire cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckoutShapeError {
    /// A field paywatch needs is absent or null.
    #[error("the checkout has no '{0}' field")]
    Missing(&'static str),
    /// A field is present but not usable.
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
}

/// The parts of a checkout paywatch relies on, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutFacts {
    /// paymennt's checkout id.
    pub id: CheckoutId,
    /// The merchant's order id (any text; never interpreted).
    pub order_id: Option<String>,
    /// The merchant's request id.
    pub request_id: Option<String>,
    /// The short display id.
    pub display_id: Option<String>,
    /// The amount to pay, exact.
    pub amount: Decimal,
    /// Its currency.
    pub currency: Currency,
    /// The status as the wire said it (trusted only if it came from Get Checkout).
    pub status: Option<CheckoutStatus>,
    /// Refunded so far.
    pub total_refunded: Option<Decimal>,
    /// The payment page URL.
    pub redirect_url: Option<String>,
    /// Where its Firestore document lives. Always present from [`Checkout::facts`]; may be
    /// absent from [`Checkout::answer_facts`] (a Get Checkout answer need not repeat it).
    pub location: Option<FirestoreLocation>,
}

impl Checkout {
    /// When paymennt created the checkout (`timestamp`), if the answer says so in a form that
    /// can be read: ISO 8601 with an offset, `+04:00` or `+0400` (the spec's
    /// `yyyy-MM-ddTHH:mm:ss.SSSZZ`), or `Z`.
    pub fn created_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let text = self.timestamp.as_deref()?.trim();
        chrono::DateTime::parse_from_rfc3339(text)
            .or_else(|_| chrono::DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
            .ok()
            .map(|time| time.with_timezone(&chrono::Utc))
    }

    /// Checks the fields paywatch needs to track a checkout, the Firebase coordinates included,
    /// naming the first one that is missing or invalid.
    pub fn facts(&self) -> Result<CheckoutFacts, CheckoutShapeError> {
        use CheckoutShapeError::Missing;
        let facts = self.answer_facts()?;
        if facts.location.is_none() {
            let missing = [
                ("firebaseDatabase", &self.firebase_database),
                ("firebaseCollection", &self.firebase_collection),
                ("firebaseDocument", &self.firebase_document),
            ]
            .into_iter()
            .find(|(_, value)| value.is_none())
            .map_or("firebaseDatabase", |(name, _)| name);
            return Err(Missing(missing));
        }
        Ok(facts)
    }

    /// Checks the fields of an answer about a checkout paywatch already tracks: like
    /// [`Checkout::facts`], but the Firebase coordinates may be absent (not partial or invalid).
    pub fn answer_facts(&self) -> Result<CheckoutFacts, CheckoutShapeError> {
        use CheckoutShapeError::Missing;
        let id: CheckoutId = self.id.as_ref().ok_or(Missing("id"))?.0.parse()?;
        let amount = self.amount.ok_or(Missing("amount"))?.0;
        let currency: Currency = self
            .currency
            .as_deref()
            .ok_or(Missing("currency"))?
            .parse()?;
        let location = match (
            self.firebase_database.as_deref(),
            self.firebase_collection.as_deref(),
            self.firebase_document.as_deref(),
        ) {
            (None, None, None) => None,
            (Some(project), Some(collection), Some(document)) => {
                Some(FirestoreLocation::new(project, collection, document)?)
            }
            (None, _, _) => return Err(Missing("firebaseDatabase")),
            (_, None, _) => return Err(Missing("firebaseCollection")),
            (_, _, None) => return Err(Missing("firebaseDocument")),
        };
        Ok(CheckoutFacts {
            id,
            order_id: self.order_id.clone(),
            request_id: self.request_id.clone(),
            display_id: self.display_id.clone(),
            amount,
            currency,
            status: self.status.clone(),
            total_refunded: self.total_refunded.map(|d| d.0),
            redirect_url: self.redirect_url.clone(),
            location,
        })
    }
}

pub use crate::domain::CHECKOUT_TYPES;

/// A page of checkouts (`PageResponseCheckoutResponse`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutPage {
    /// Page number, from 0.
    #[serde(default)]
    pub page: i64,
    /// Page size.
    #[serde(default)]
    pub size: i64,
    /// Number of pages.
    #[serde(default)]
    pub total_pages: i64,
    /// Number of matching checkouts.
    #[serde(default)]
    pub total_elements: i64,
    /// The checkouts on this page.
    #[serde(default)]
    pub content: Vec<Checkout>,
}

/// Create payment link request (`CheckoutPaymentLinkRequest`), every field of the spec.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkRequest {
    /// Unique id of this request (required).
    pub request_id: String,
    /// The merchant's order id (required).
    pub order_id: String,
    /// Description of the order (required).
    pub description: String,
    /// ISO 4217 currency (required).
    pub currency: String,
    /// Amount, greater than zero (required).
    pub amount: JsonDecimal,
    /// Order totals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
    /// Items of the order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Item>,
    /// Let paymennt send the link by SMS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_sms: bool,
    /// Let paymennt send the link by email.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_email: bool,
    /// The customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<Customer>,
    /// Billing address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_address: Option<Address>,
    /// Delivery address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_address: Option<Address>,
    /// paymennt branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_id: Option<i64>,
    /// Payment methods shown, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_payment_methods: Vec<String>,
    /// Payment method active at first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_payment_method: Option<String>,
    /// Minutes until the link expires (15..=10080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    /// ISO 639-1 language of the payment page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Where the payment page sends the customer after a successful or failed payment.
    /// paymennt's spec lists it on web checkouts; the sandbox also takes it on links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_url: Option<String>,
}

/// Order totals (`CheckoutRequestTotals`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Sum of line items.
    pub subtotal: JsonDecimal,
    /// Tax.
    pub tax: JsonDecimal,
    /// Shipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping: Option<JsonDecimal>,
    /// Handling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handling: Option<JsonDecimal>,
    /// Discount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<JsonDecimal>,
    /// Skip paymennt's totals validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_totals_validation: Option<bool>,
}

impl Default for JsonDecimal {
    fn default() -> Self {
        JsonDecimal(Decimal::ZERO)
    }
}

/// An order item (`CheckoutRequestItem`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    /// Item name.
    pub name: String,
    /// Merchant SKU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// Unit price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unitprice: Option<JsonDecimal>,
    /// Quantity.
    pub quantity: JsonDecimal,
    /// Line total.
    pub linetotal: JsonDecimal,
}

/// The customer (`CheckoutCustomer`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    /// The merchant's customer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Email.
    pub email: String,
    /// Phone with country code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// An address (`CheckoutAddress`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    /// Person's name.
    pub name: String,
    /// Line 1.
    pub address1: String,
    /// Line 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address2: Option<String>,
    /// City.
    pub city: String,
    /// State.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Zip code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zip: Option<String>,
    /// ISO 3166-1 alpha-2 or alpha-3 country.
    pub country: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_keep_their_digits() {
        let checkout: Checkout = serde_json::from_str(
            r#"{"id":"1","amount":19.99,"totalRefunded":0.10,"cashAmount":"5"}"#,
        )
        .expect("parses");
        assert_eq!(
            checkout.amount.map(|a| a.0.to_string()),
            Some("19.99".into())
        );
        assert_eq!(
            checkout.total_refunded.map(|a| a.0.to_string()),
            Some("0.10".into())
        );
        assert_eq!(
            checkout.cash_amount.map(|a| a.0.to_string()),
            Some("5".into())
        );
        let written = serde_json::to_string(&JsonDecimal(Decimal::new(1999, 2))).expect("writes");
        assert_eq!(written, "19.99");
    }

    #[test]
    fn creation_times_in_every_documented_offset_form() {
        let created = |timestamp: &str| {
            let checkout: Checkout =
                serde_json::from_value(serde_json::json!({ "timestamp": timestamp }))
                    .expect("parses");
            checkout.created_at().map(|time| time.to_rfc3339())
        };
        let expected = Some("2024-05-01T06:00:00+00:00".to_owned());
        assert_eq!(created("2024-05-01T10:00:00.000+04:00"), expected);
        assert_eq!(created("2024-05-01T10:00:00.000+0400"), expected);
        assert_eq!(created("2024-05-01T06:00:00Z"), expected);
        assert_eq!(created("yesterday"), None);
        let without: Checkout = serde_json::from_str("{}").expect("parses");
        assert_eq!(without.created_at(), None);
    }

    #[test]
    fn numeric_ids_are_accepted() {
        let checkout: Checkout =
            serde_json::from_str(r#"{"id":1653241101733169556}"#).expect("parses");
        assert_eq!(checkout.id, Some(WireId("1653241101733169556".into())));
    }

    #[test]
    fn facts_name_the_missing_field() {
        let checkout: Checkout = serde_json::from_str(
            r#"{"id":"1","amount":1,"currency":"AED","firebaseDatabase":"p","firebaseCollection":"c"}"#,
        )
        .expect("parses");
        assert_eq!(
            checkout.facts(),
            Err(CheckoutShapeError::Missing("firebaseDocument"))
        );
    }

    #[test]
    fn status_in_spec_spelling_parses() {
        let checkout: Checkout =
            serde_json::from_str(r#"{"status":"Partially refunded"}"#).expect("parses");
        assert_eq!(checkout.status, Some(CheckoutStatus::PartiallyRefunded));
    }
}

/// A webhook as paymennt describes it (`WebhookResponse`). The `hmacKey` is a [`Secret`]: it
/// never shows in Debug output or logs.
///
/// [`Secret`]: crate::settings::Secret
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Its id.
    #[serde(default)]
    pub id: Option<WireId>,
    /// The key paymennt signs notifications with.
    #[serde(default)]
    pub hmac_key: Option<crate::settings::Secret>,
    /// The endpoint notifications go to.
    #[serde(default)]
    pub address: Option<String>,
    /// Whether the last notification failed.
    #[serde(default)]
    pub failed: Option<bool>,
    /// Whether notifications are sent.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A webhook id as typed by a user: letters, digits, `-` and `_` only (it goes into a URL path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookId(String);

impl WebhookId {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for WebhookId {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<WebhookId, InvalidValue> {
        let valid = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(WebhookId(text.to_owned()))
        } else {
            Err(InvalidValue {
                what: "webhook id",
                value: crate::domain::printable(text),
                reason: "expected the id paymennt gave the webhook (letters, digits, - and _)",
            })
        }
    }
}
