//! The domain vocabulary: checkout ids, statuses, money, Firestore coordinates.
//!
//! Owns: small validated types that every other module speaks. Values are parsed here, at the
//! edge, so the rest of the crate can trust them.
//! Must never: do I/O, or import another module of this crate.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use compact_str::CompactString;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

mod scrub;
pub use scrub::{
    REDACTED, register_rotating_secret, register_secret, scrub_secrets, scrubbed_excerpt,
};

/// Why a value could not become a domain type. The message names the value and what was wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} '{value}' is invalid: {reason}")]
pub struct InvalidValue {
    /// Which kind of value it was ("checkout id", "currency", ...).
    pub what: &'static str,
    /// The offending value, shortened if long, with control characters escaped.
    pub value: String,
    /// What a valid value looks like.
    pub reason: &'static str,
}

impl InvalidValue {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        InvalidValue {
            what,
            value: printable(value),
            reason,
        }
    }
}

/// Renders untrusted text for a message: every registered secret replaced by `[redacted]`
/// ([`scrub_secrets`], before shortening, so no part of one survives the cut), then at most 80
/// characters, control characters escaped.
pub fn printable(value: &str) -> String {
    let value = scrub_secrets(value);
    let mut out: String = value
        .chars()
        .take(80)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// A paymennt checkout id, such as `1653241101733169556`.
///
/// paymennt's ids are long decimal numbers sent as strings. We accept ASCII letters, digits, `-`
/// and `_` (1 to 64 of them) so the id is always safe in a URL path and a log line. Ids of up to
/// 24 bytes (paymennt's are 19) are held inline, with no allocation: the daemon keeps one per
/// watched checkout in each of its maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CheckoutId(CompactString);

impl CheckoutId {
    /// The id as paymennt wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CheckoutId {
    type Err = InvalidValue;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(CheckoutId(CompactString::from(value)))
        } else {
            Err(InvalidValue::new(
                "checkout id",
                value,
                "expected 1 to 64 ASCII letters, digits, '-' or '_'",
            ))
        }
    }
}

impl TryFrom<String> for CheckoutId {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<CheckoutId> for String {
    fn from(id: CheckoutId) -> String {
        id.0.into_string()
    }
}

impl fmt::Display for CheckoutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The status of a checkout, as paymennt reports it.
///
/// paymennt documents two spellings: `PARTIALLY_REFUNDED` in its guides and examples, and
/// `Partially refunded` in the OpenAPI enum. Both parse to the same variant. A status we do not
/// know is kept verbatim in [`CheckoutStatus::Unknown`] rather than rejected, so a new status on
/// paymennt's side never stops the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckoutStatus {
    /// New checkout; the customer has not paid.
    Pending,
    /// Authorized; a capture or cancel is expected before it expires.
    Authorized,
    /// Waiting for confirmation from the payment method.
    PendingConfirmation,
    /// The customer completed the payment.
    Paid,
    /// The payment failed and paymennt could not recover it.
    Failed,
    /// The customer cancelled the checkout.
    Cancelled,
    /// The checkout expired without being processed.
    Expired,
    /// Fully refunded.
    Refunded,
    /// Partially refunded.
    PartiallyRefunded,
    /// The payment was charged back.
    Chargeback,
    /// A status paywatch does not know, kept as paymennt sent it.
    Unknown(String),
}

impl CheckoutStatus {
    /// Every status paywatch knows, in the order paymennt documents them.
    pub const KNOWN: [CheckoutStatus; 10] = [
        CheckoutStatus::Pending,
        CheckoutStatus::Authorized,
        CheckoutStatus::PendingConfirmation,
        CheckoutStatus::Paid,
        CheckoutStatus::Failed,
        CheckoutStatus::Cancelled,
        CheckoutStatus::Expired,
        CheckoutStatus::Refunded,
        CheckoutStatus::PartiallyRefunded,
        CheckoutStatus::Chargeback,
    ];

    /// Parses either documented spelling; anything else becomes `Unknown` (never an error).
    pub fn parse(text: &str) -> CheckoutStatus {
        let canonical: String = text
            .trim()
            .chars()
            .map(|c| match c {
                ' ' | '-' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        match canonical.as_str() {
            "PENDING" => CheckoutStatus::Pending,
            "AUTHORIZED" => CheckoutStatus::Authorized,
            "PENDING_CONFIRMATION" => CheckoutStatus::PendingConfirmation,
            "PAID" => CheckoutStatus::Paid,
            "FAILED" => CheckoutStatus::Failed,
            "CANCELLED" | "CANCELED" => CheckoutStatus::Cancelled,
            "EXPIRED" => CheckoutStatus::Expired,
            "REFUNDED" => CheckoutStatus::Refunded,
            "PARTIALLY_REFUNDED" => CheckoutStatus::PartiallyRefunded,
            "CHARGEBACK" => CheckoutStatus::Chargeback,
            _ => CheckoutStatus::Unknown(text.to_owned()),
        }
    }

    /// The upper-case spelling paymennt's guides use (`PARTIALLY_REFUNDED`).
    pub fn as_str(&self) -> &str {
        match self {
            CheckoutStatus::Pending => "PENDING",
            CheckoutStatus::Authorized => "AUTHORIZED",
            CheckoutStatus::PendingConfirmation => "PENDING_CONFIRMATION",
            CheckoutStatus::Paid => "PAID",
            CheckoutStatus::Failed => "FAILED",
            CheckoutStatus::Cancelled => "CANCELLED",
            CheckoutStatus::Expired => "EXPIRED",
            CheckoutStatus::Refunded => "REFUNDED",
            CheckoutStatus::PartiallyRefunded => "PARTIALLY_REFUNDED",
            CheckoutStatus::Chargeback => "CHARGEBACK",
            CheckoutStatus::Unknown(text) => text,
        }
    }

    /// The spelling of the OpenAPI enum (`Partially refunded`).
    pub fn spec_spelling(&self) -> &str {
        match self {
            CheckoutStatus::Pending => "Pending",
            CheckoutStatus::Authorized => "Authorized",
            CheckoutStatus::PendingConfirmation => "Pending confirmation",
            CheckoutStatus::Paid => "Paid",
            CheckoutStatus::Failed => "Failed",
            CheckoutStatus::Cancelled => "Cancelled",
            CheckoutStatus::Expired => "Expired",
            CheckoutStatus::Refunded => "Refunded",
            CheckoutStatus::PartiallyRefunded => "Partially refunded",
            CheckoutStatus::Chargeback => "Chargeback",
            CheckoutStatus::Unknown(text) => text,
        }
    }

    /// A status after which nothing more will happen to the checkout, so it stops being watched.
    ///
    /// PAID and PARTIALLY_REFUNDED are not final: refunds may follow, and the daemon keeps
    /// watching them for the configured refund-watch period.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            CheckoutStatus::Failed
                | CheckoutStatus::Cancelled
                | CheckoutStatus::Expired
                | CheckoutStatus::Refunded
                | CheckoutStatus::Chargeback
        )
    }

    /// A status in which nothing has happened yet that a merchant acts on: a new or an
    /// authorized checkout. Discovery records a checkout first seen in any other status, created
    /// before discovery began, as a baseline rather than news.
    pub fn is_open(&self) -> bool {
        matches!(self, CheckoutStatus::Pending | CheckoutStatus::Authorized)
    }

    /// A status that is watched only for the refund-watch period (money has moved).
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            CheckoutStatus::Paid | CheckoutStatus::PartiallyRefunded
        )
    }
}

impl fmt::Display for CheckoutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CheckoutStatus {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(CheckoutStatus::parse(text))
    }
}

impl Serialize for CheckoutStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CheckoutStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(CheckoutStatus::parse(&text))
    }
}

/// An ISO 4217 currency code: three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// The code, e.g. `AED`.
    pub fn as_str(&self) -> &str {
        // The bytes are checked ASCII letters in `from_str`.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl FromStr for Currency {
    type Err = InvalidValue;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let bytes = value.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(u8::is_ascii_alphabetic) {
            let mut code = [0u8; 3];
            for (slot, byte) in code.iter_mut().zip(bytes) {
                *slot = byte.to_ascii_uppercase();
            }
            Ok(Currency(code))
        } else {
            Err(InvalidValue::new(
                "currency",
                value,
                "expected a 3-letter ISO 4217 code such as AED",
            ))
        }
    }
}

impl TryFrom<String> for Currency {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Currency> for String {
    fn from(code: Currency) -> String {
        code.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A positive amount of money: an exact decimal, never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Amount(Decimal);

impl Amount {
    /// Accepts any decimal greater than zero.
    pub fn new(value: Decimal) -> Result<Amount, InvalidValue> {
        if value > Decimal::ZERO {
            Ok(Amount(value))
        } else {
            Err(InvalidValue::new(
                "amount",
                &value.to_string(),
                "expected a number greater than 0",
            ))
        }
    }

    /// The exact value.
    pub fn value(&self) -> Decimal {
        self.0
    }
}

impl FromStr for Amount {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let value = parse_decimal(text).ok_or_else(|| {
            InvalidValue::new("amount", text, "expected a decimal number such as 100.00")
        })?;
        Amount::new(value)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses a decimal written as JSON or by a person: `19.99`, `100`, `1.5e2`. Exact, no float.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    let text = text.trim();
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text).ok()
    }
}

/// Formats money for a person: at least two decimals (`100.00`), more if the value has them.
pub fn format_money(value: Decimal) -> String {
    let mut shown = value.normalize();
    if shown.scale() < 2 {
        shown.rescale(2);
    }
    shown.to_string()
}

/// A verification request's place in the order of all requests, handed out by the ledger
/// before the request is sent ([`crate::ledger::Ledger::issue_ticket`]).
///
/// Answers are ordered by ticket, never by a clock: a wall clock can step backwards (NTP, a VM
/// restore); the ledger's counter cannot, across restarts too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerifyTicket(i64);

impl VerifyTicket {
    /// A ticket with this number (the ledger's counter value).
    pub fn new(number: i64) -> VerifyTicket {
        VerifyTicket(number)
    }

    /// The number.
    pub fn number(self) -> i64 {
        self.0
    }
}

impl fmt::Display for VerifyTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where the nudge that led to a verification came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A change on the checkout's Firestore document.
    Firestore,
    /// The periodic (or startup) reconciler.
    Reconcile,
    /// A person: `paywatch link create`, `paywatch track`.
    Manual,
    /// A webhook notification from paymennt (`POST /webhooks/paymennt`): a nudge only.
    Webhook,
    /// A status discovery found a checkout already in, reached before paywatch could have seen
    /// it (a baseline): recorded, but no hook is told. Never the source of a nudge.
    #[serde(rename = "discovery-import")]
    DiscoveryImport,
}

impl Source {
    /// The lower-case name stored in the ledger.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Firestore => "firestore",
            Source::Reconcile => "reconcile",
            Source::Manual => "manual",
            Source::Webhook => "webhook",
            Source::DiscoveryImport => "discovery-import",
        }
    }
}

impl FromStr for Source {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "firestore" => Ok(Source::Firestore),
            "reconcile" => Ok(Source::Reconcile),
            "manual" => Ok(Source::Manual),
            "webhook" => Ok(Source::Webhook),
            "discovery-import" => Ok(Source::DiscoveryImport),
            other => Err(InvalidValue::new(
                "source",
                other,
                "expected firestore, reconcile, manual, webhook or discovery-import",
            )),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The checkout types of paymennt's spec (`type` of Search Checkouts).
pub const CHECKOUT_TYPES: [&str; 5] = ["QR", "WEB", "MOBILE", "LINK", "TERMINAL"];

/// How a checkout came to be tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackedVia {
    /// `paywatch link create`.
    LinkCreate,
    /// `paywatch track FILE` (or `POST /v1/checkouts` with a create-link response).
    Track,
    /// `paywatch track --checkout-id` (or a verified answer for an unknown checkout).
    TrackFetch,
    /// Found by discovery (Search Checkouts).
    Discovery,
}

impl TrackedVia {
    /// The name stored in the ledger and given to hooks.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackedVia::LinkCreate => "link-create",
            TrackedVia::Track => "track",
            TrackedVia::TrackFetch => "track-fetch",
            TrackedVia::Discovery => "discovery",
        }
    }
}

impl FromStr for TrackedVia {
    type Err = InvalidValue;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "link-create" => Ok(TrackedVia::LinkCreate),
            "track" => Ok(TrackedVia::Track),
            "track-fetch" => Ok(TrackedVia::TrackFetch),
            "discovery" => Ok(TrackedVia::Discovery),
            other => Err(InvalidValue::new(
                "tracked_via",
                other,
                "expected link-create, track, track-fetch or discovery",
            )),
        }
    }
}

impl fmt::Display for TrackedVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The database every checkout document is in unless `[firestore] database` says otherwise.
pub const DEFAULT_DATABASE: &str = "(default)";

/// The longest Firestore document or collection id, in bytes (Firestore's documented limit).
const MAX_SEGMENT_BYTES: usize = 1500;

/// Checks a Firestore database id: `(default)`, or 4 to 63 lowercase ASCII letters, digits and
/// '-', starting with a letter and not ending with '-' (Firestore's naming rules).
///
/// # Errors
/// The id, named as `what` (e.g. "[firestore] database"), with what a valid one looks like.
pub fn check_database_id(what: &'static str, id: &str) -> Result<(), InvalidValue> {
    let bytes = id.as_bytes();
    let ok = id == DEFAULT_DATABASE
        || ((4..=63).contains(&bytes.len())
            && bytes.first().is_some_and(u8::is_ascii_lowercase)
            && bytes.last().is_some_and(|b| *b != b'-')
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidValue::new(
            what,
            id,
            "expected (default), or 4 to 63 lowercase letters, digits and '-', starting with a \
             letter",
        ))
    }
}

/// Checks one Firestore path segment (a collection or document id) against Firestore's rules:
/// 1 to 1500 bytes, no '/', not `.` or `..`, not reserved (`__.*__`), no control characters.
fn check_segment(what: &'static str, value: &str) -> Result<(), InvalidValue> {
    let reason = if value.is_empty() {
        Some("it is empty; expected a single Firestore path segment")
    } else if value.len() > MAX_SEGMENT_BYTES {
        Some("it is longer than Firestore's 1500-byte limit for an id")
    } else if value.contains('/') {
        Some("it contains '/'; expected a single Firestore path segment")
    } else if value == "." || value == ".." {
        Some("Firestore does not allow '.' or '..' as an id")
    } else if value.len() >= 4 && value.starts_with("__") && value.ends_with("__") {
        Some("ids of the form __...__ are reserved by Firestore")
    } else if value.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidValue::new(what, value, reason)),
        None => Ok(()),
    }
}

/// Where a checkout's Firestore document lives, as paymennt names it in a create-link response,
/// plus the database id.
///
/// `firebaseDatabase` is the Google Cloud project id (paymennt's test value is `pc-test-734bc`).
/// paymennt does not name a database: the document is in `(default)` unless `[firestore]
/// database` says otherwise ([`FirestoreLocation::with_database`]). Every name is checked here,
/// so an impossible one is refused before anything is sent to Firestore.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FirestoreLocation {
    /// The project id (`firebaseDatabase`).
    pub project: String,
    /// The database id: `(default)` unless configured.
    #[serde(default = "default_database")]
    pub database: String,
    /// The collection (`firebaseCollection`).
    pub collection: String,
    /// The document id (`firebaseDocument`).
    pub document: String,
}

fn default_database() -> String {
    DEFAULT_DATABASE.to_owned()
}

impl FirestoreLocation {
    /// Validates the three coordinates, naming the field at fault. The database is `(default)`.
    pub fn new(
        project: &str,
        collection: &str,
        document: &str,
    ) -> Result<FirestoreLocation, InvalidValue> {
        let project_ok = (1..=100).contains(&project.len())
            && project.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b':'
            });
        if !project_ok {
            return Err(InvalidValue::new(
                "firebaseDatabase",
                project,
                "expected a Google Cloud project id such as pc-test-734bc",
            ));
        }
        check_segment("firebaseCollection", collection)?;
        check_segment("firebaseDocument", document)?;
        // With ids of at most 1500 bytes the full name stays under Firestore's 6 KiB limit.
        Ok(FirestoreLocation {
            project: project.to_owned(),
            database: default_database(),
            collection: collection.to_owned(),
            document: document.to_owned(),
        })
    }

    /// The same document in database `database` (`[firestore] database`).
    ///
    /// # Errors
    /// An invalid database id.
    pub fn with_database(mut self, database: &str) -> Result<FirestoreLocation, InvalidValue> {
        check_database_id("database", database)?;
        database.clone_into(&mut self.database);
        Ok(self)
    }

    /// `projects/{project}/databases/{database}`: the `database` of a ListenRequest and the
    /// `google-cloud-resource-prefix` header.
    pub fn database_name(&self) -> String {
        format!("projects/{}/databases/{}", self.project, self.database)
    }

    /// The document's full resource name, as a Listen `DocumentsTarget` wants it.
    pub fn document_name(&self) -> String {
        format!(
            "{}/documents/{}/{}",
            self.database_name(),
            self.collection,
            self.document
        )
    }
}

/// What the documents of one collection share: the project, database and collection, and the
/// prefix of their names. Held once per collection ([`CollectionPaths`]) and pointed at by every
/// [`WatchedDocument`] in it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CollectionPath {
    /// `projects/{project}/databases/{database}/documents/{collection}`: says everything else.
    prefix: String,
    project: String,
    database: String,
    collection: String,
    /// The length of `projects/{project}/databases/{database}` in `prefix`.
    database_name_len: usize,
}

/// A watched checkout's document, as the daemon and the Firestore listener keep it for as long
/// as the checkout is watched: its [`CollectionPath`] shared with the other checkouts of the
/// collection, and its own document id (inline up to 24 bytes; Firestore's generated ids have 20).
/// [`FirestoreLocation`] is the same place with every part its own string, as it is parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchedDocument {
    collection: Arc<CollectionPath>,
    document: CompactString,
}

impl WatchedDocument {
    /// The project id.
    #[cfg(test)]
    pub fn project(&self) -> &str {
        &self.collection.project
    }

    /// `projects/{project}/databases/{database}`, as [`FirestoreLocation::database_name`].
    pub fn database_name(&self) -> &str {
        &self.collection.prefix[..self.collection.database_name_len]
    }

    /// The document's full resource name, as [`FirestoreLocation::document_name`].
    pub fn document_name(&self) -> String {
        let mut name =
            String::with_capacity(self.collection.prefix.len() + 1 + self.document.len());
        name.push_str(&self.collection.prefix);
        name.push('/');
        name.push_str(&self.document);
        name
    }

    /// Whether `name` is this document's full resource name (without building it).
    pub fn is_named(&self, name: &str) -> bool {
        name.strip_prefix(self.collection.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|document| document == self.document)
    }

    /// Whether `location` is this document.
    pub fn is_at(&self, location: &FirestoreLocation) -> bool {
        self.document == location.document
            && self.collection.collection == location.collection
            && self.collection.project == location.project
            && self.collection.database == location.database
    }

    /// The same place with every part its own string.
    pub fn location(&self) -> FirestoreLocation {
        FirestoreLocation {
            project: self.collection.project.clone(),
            database: self.collection.database.clone(),
            collection: self.collection.collection.clone(),
            document: self.document.as_str().to_owned(),
        }
    }
}

/// Hands out [`WatchedDocument`]s, one shared [`CollectionPath`] per collection. Paths no
/// document points at any more are dropped as new ones come, so it holds about as many as are
/// in use.
#[derive(Debug, Default)]
pub struct CollectionPaths {
    /// By prefix.
    known: HashMap<String, Arc<CollectionPath>>,
    /// How many were known after the last clean-up.
    kept: usize,
}

impl CollectionPaths {
    /// `location`, with its collection's shared path.
    pub fn document(&mut self, location: &FirestoreLocation) -> WatchedDocument {
        let database_name = location.database_name();
        let prefix = format!("{database_name}/documents/{}", location.collection);
        let collection = match self.known.get(&prefix) {
            Some(known) => Arc::clone(known),
            None => {
                if self.known.len() >= 2 * self.kept + 16 {
                    // Only the map points at it: no document of that collection is held.
                    self.known.retain(|_, path| Arc::strong_count(path) > 1);
                    self.kept = self.known.len();
                }
                let path = Arc::new(CollectionPath {
                    prefix: prefix.clone(),
                    project: location.project.clone(),
                    database: location.database.clone(),
                    collection: location.collection.clone(),
                    database_name_len: database_name.len(),
                });
                self.known.insert(prefix, Arc::clone(&path));
                path
            }
        };
        WatchedDocument {
            collection,
            document: CompactString::from(location.document.as_str()),
        }
    }

    /// How many paths are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether none is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests;
