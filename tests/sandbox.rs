//! The sandbox end to end: its Merchant API against paymennt's spec, its Listen server driven by
//! raw gRPC and by the `firestore` crate, the shared state between them, and injected faults.
//!
//! Every test starts its own sandbox on `127.0.0.1:0` and waits on conditions with deadlines.

use std::time::Duration;

use gcloud_sdk::google::firestore::v1::firestore_client::FirestoreClient;
use gcloud_sdk::google::firestore::v1::listen_request::TargetChange as RequestedChange;
use gcloud_sdk::google::firestore::v1::listen_response::ResponseType;
use gcloud_sdk::google::firestore::v1::target::{DocumentsTarget, ResumeType, TargetType};
use gcloud_sdk::google::firestore::v1::target_change::TargetChangeType;
use gcloud_sdk::google::firestore::v1::value::ValueType;
use gcloud_sdk::google::firestore::v1::{
    Document, GetDocumentRequest, ListenRequest, ListenResponse, Target, TargetChange,
};
use paywatch::domain::{CheckoutId, CheckoutStatus};
use paywatch::paymennt::wire::{JsonDecimal, LinkRequest};
use paywatch::sandbox::{Sandbox, SandboxOptions, StatusSpelling};
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// How long any single expected event may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);

/// Options for tests: a heartbeat too slow to interleave with asserted sequences.
fn options() -> SandboxOptions {
    SandboxOptions {
        heartbeat_interval: Duration::from_secs(3600),
        ..SandboxOptions::default()
    }
}

async fn start() -> Sandbox {
    Sandbox::start(options()).await.expect("sandbox starts")
}

fn link_request(order_id: &str, amount: &str) -> LinkRequest {
    LinkRequest {
        request_id: format!("{order_id}-r1"),
        order_id: order_id.to_owned(),
        description: "Sandbox test order".into(),
        currency: "AED".into(),
        amount: JsonDecimal(amount.parse().expect("decimal")),
        ..LinkRequest::default()
    }
}

/// Creates a link through the state; returns its id and its document's full name.
async fn create(sandbox: &Sandbox, order_id: &str) -> (CheckoutId, String) {
    let checkout = sandbox
        .state()
        .create_link(&link_request(order_id, "100.00"))
        .await
        .expect("link created");
    let id: CheckoutId = checkout.id.expect("id").0.parse().expect("valid id");
    let name = sandbox
        .state()
        .location(&id)
        .expect("known checkout")
        .document_name();
    (id, name)
}

// ---------------------------------------------------------------------------------------------
// REST

struct Rest {
    client: reqwest::Client,
    base: String,
    key: String,
    secret: String,
}

impl Rest {
    fn new(sandbox: &Sandbox) -> Rest {
        Rest {
            client: reqwest::Client::new(),
            base: sandbox.api_base_url(),
            key: sandbox.api_key().to_owned(),
            secret: sandbox.api_secret().to_owned(),
        }
    }

    fn authed(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        builder
            .header("X-Paymennt-Api-Key", &self.key)
            .header("X-Paymennt-Api-Secret", &self.secret)
    }

    /// Sends and returns the status, the raw body and the body as JSON.
    async fn send(&self, builder: reqwest::RequestBuilder) -> (u16, String, Json) {
        let response = builder.send().await.expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body read");
        let json = serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!("body is not JSON ({error}): {text}");
        });
        (status, text, json)
    }

    async fn create_link_raw(&self, body: &str) -> (u16, String, Json) {
        let request = self
            .client
            .post(format!("{}checkout/link", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        self.send(self.authed(request)).await
    }

    async fn get_checkout(&self, id: &str) -> (u16, String, Json) {
        let request = self.client.get(format!("{}checkout/{id}", self.base));
        self.send(self.authed(request)).await
    }

    async fn search(&self, query: &[(&str, &str)]) -> Json {
        let request = self
            .client
            .get(format!("{}checkout", self.base))
            .query(query);
        let (status, text, json) = self.send(self.authed(request)).await;
        assert_eq!(status, 200, "{text}");
        json
    }
}

/// Asserts paymennt's error wrapper: `success: false`, a numeric `elapsed`, the message.
fn assert_error_wrapper(json: &Json, message_part: &str) {
    assert_eq!(json["success"], json!(false), "{json}");
    assert!(
        json["elapsed"].is_i64(),
        "elapsed must be an integer: {json}"
    );
    let message = json["error"].as_str().expect("error is a string");
    assert!(
        message.contains(message_part),
        "error {message:?} should mention {message_part:?}"
    );
    assert!(json.get("result").is_none(), "no result on failure: {json}");
}

/// Asserts a checkout object's names and JSON types, field by field.
fn assert_checkout_shape(result: &Json, sandbox: &Sandbox) {
    let text = |name: &str| {
        result[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} must be a string: {result}"))
            .to_owned()
    };
    let id = text("id");
    assert_eq!(id.len(), 19, "19-digit id: {id}");
    assert!(id.bytes().all(|b| b.is_ascii_digit()), "decimal id: {id}");
    let display_id = text("displayId");
    assert_eq!(display_id.len(), 6);
    assert!(
        display_id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    );
    let key = text("checkoutKey");
    assert_eq!(key.len(), 48);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(text("requestId"), "ORD-7-r1");
    assert_eq!(text("orderId"), "ORD-7");
    assert_eq!(text("currency"), "AED");
    assert!(result["amount"].is_number(), "amount is a JSON number");
    assert!(
        result["totalRefunded"].is_number(),
        "totalRefunded is a JSON number"
    );
    assert!(
        result["cashAmount"].is_number(),
        "cashAmount is a JSON number"
    );
    assert_eq!(text("status"), "PENDING");
    let timestamp = text("timestamp");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&timestamp).is_ok(),
        "ISO 8601 timestamp: {timestamp}"
    );
    assert_eq!(text("firebaseDatabase"), sandbox.project_id());
    assert_eq!(text("firebaseCollection"), "checkouts");
    let document = text("firebaseDocument");
    assert!(!document.is_empty() && !document.contains('/'));
    assert_ne!(document, id, "the document id is not the checkout id");
    assert_eq!(
        text("redirectUrl"),
        format!("http://{}/pay/{key}", sandbox.api_addr())
    );
}

#[tokio::test]
async fn sandbox_rest_create_link_and_get_checkout_match_the_spec() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let body = r#"{"requestId":"ORD-7-r1","orderId":"ORD-7","description":"Two mugs",
        "currency":"AED","amount":100.10,"expiresIn":1440}"#;
    let (status, text, created) = rest.create_link_raw(body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(created["success"], json!(true));
    assert!(created["elapsed"].is_i64());
    assert!(created.get("error").is_none());
    let result = &created["result"];
    assert_checkout_shape(result, &sandbox);
    // Exact digits on the wire, as JSON numbers.
    assert!(text.contains(r#""amount":100.10"#), "{text}");
    assert!(text.contains(r#""totalRefunded":0.00"#), "{text}");

    let id = result["id"].as_str().expect("id");
    let (status, text, fetched) = rest.get_checkout(id).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(fetched["success"], json!(true));
    assert_checkout_shape(&fetched["result"], &sandbox);
    assert!(text.contains(r#""amount":100.10"#), "{text}");
    for name in [
        "id",
        "checkoutKey",
        "displayId",
        "firebaseDocument",
        "timestamp",
    ] {
        assert_eq!(fetched["result"][name], result[name], "{name} is stable");
    }
    // The redirect URL serves a payment page.
    let page = reqwest::get(result["redirectUrl"].as_str().expect("url"))
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(page.contains("ORD-7") && page.contains("100.10"), "{page}");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_rest_refuses_missing_or_wrong_credentials() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let url = format!("{}checkout/123", rest.base);
    let (status, _, json) = rest.send(rest.client.get(&url)).await;
    assert_eq!(status, 401);
    assert_error_wrapper(&json, "X-Paymennt-Api-Key");
    let (status, _, json) = rest
        .send(
            rest.client
                .get(&url)
                .header("X-Paymennt-Api-Key", &rest.key),
        )
        .await;
    assert_eq!(status, 401, "missing secret");
    assert_error_wrapper(&json, "Unauthorized");
    let wrong = rest
        .client
        .get(&url)
        .header("X-Paymennt-Api-Key", &rest.key)
        .header("X-Paymennt-Api-Secret", "not-the-secret");
    let (status, text, json) = rest.send(wrong).await;
    assert_eq!(status, 401);
    assert_error_wrapper(&json, "Unauthorized");
    assert!(!text.contains("not-the-secret"), "the secret is not echoed");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_rest_validation_errors_use_the_wrapper() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let base = json!({"requestId":"R","orderId":"O","description":"D","currency":"AED","amount":5});
    let cases: Vec<(Json, &str)> = vec![
        (without(&base, "orderId"), "orderId is required"),
        (without(&base, "requestId"), "requestId is required"),
        (
            with(&base, "amount", json!(0)),
            "amount must be greater than 0",
        ),
        (
            with(&base, "amount", json!(-5.5)),
            "amount must be greater than 0",
        ),
        (with(&base, "expiresIn", json!(14)), "expiresIn"),
        (with(&base, "expiresIn", json!(10081)), "expiresIn"),
        (with(&base, "currency", json!("DIRHAM")), "currency"),
    ];
    for (body, message) in cases {
        let (status, text, json) = rest.create_link_raw(&body.to_string()).await;
        assert_eq!(status, 400, "{body} -> {text}");
        assert_error_wrapper(&json, message);
    }
    let (status, _, json) = rest.create_link_raw("{\"orderId\": ").await;
    assert_eq!(status, 400, "malformed JSON");
    assert_error_wrapper(&json, "Malformed JSON");

    let (status, _, json) = rest.get_checkout("1653241101733169556").await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "Checkout not found for API merchant");
    let cancel = rest
        .client
        .post(format!("{}checkout/1653241101733169556/cancel", rest.base));
    let (status, _, json) = rest.send(rest.authed(cancel)).await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "Checkout not found for API merchant");
    let refund = rest
        .client
        .post(format!("{}checkout/1653241101733169556/refund", rest.base))
        .query(&[("amount", "1"), ("currency", "AED"), ("note", "n")]);
    let (status, _, json) = rest.send(rest.authed(refund)).await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "Checkout not found for API merchant");
    sandbox.shutdown().await;
}

fn without(body: &Json, name: &str) -> Json {
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        object.remove(name);
    }
    body
}

fn with(body: &Json, name: &str, value: Json) -> Json {
    let mut body = body.clone();
    body[name] = value;
    body
}

#[tokio::test]
async fn sandbox_rest_cancel_refund_and_search() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let (a, _) = create(&sandbox, "ORD-A").await;
    let (b, _) = create(&sandbox, "ORD-B").await;
    let (c, _) = create(&sandbox, "ORD-C").await;

    let cancel = rest
        .client
        .post(format!("{}checkout/{a}/cancel", rest.base));
    let (status, text, json) = rest.send(rest.authed(cancel)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json["result"]["status"], "CANCELLED");
    let again = rest
        .client
        .post(format!("{}checkout/{a}/cancel", rest.base));
    let (status, _, json) = rest.send(rest.authed(again)).await;
    assert_eq!(status, 400, "a cancelled checkout cannot be cancelled");
    assert_error_wrapper(&json, "CANCELLED");

    sandbox.state().pay(&b).await.expect("paid");
    let refund = |amount: &'static str, currency: &'static str| {
        rest.authed(
            rest.client
                .post(format!("{}checkout/{b}/refund", rest.base))
                .query(&[
                    ("amount", amount),
                    ("currency", currency),
                    ("note", "Out of stock"),
                ]),
        )
    };
    let (status, _, json) = rest.send(refund("10", "USD")).await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "currency");
    let (status, text, json) = rest.send(refund("25.25", "AED")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json["result"]["status"], "PARTIALLY_REFUNDED");
    assert!(text.contains(r#""totalRefunded":25.25"#), "{text}");
    let (status, _, json) = rest.send(refund("0", "AED")).await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "amount");

    let by_order = rest.search(&[("orderId", "ORD-C")]).await;
    let content = by_order["result"]["content"].as_array().expect("content");
    assert_eq!(content.len(), 1);
    assert_eq!(content[0]["id"], json!(c.as_str()));
    assert_eq!(by_order["result"]["totalElements"], 1);

    let by_request = rest.search(&[("requestId", "ORD-B-r1")]).await;
    assert_eq!(by_request["result"]["content"][0]["id"], json!(b.as_str()));

    let by_status = rest
        .search(&[("status", "CANCELLED,PARTIALLY_REFUNDED")])
        .await;
    let mut ids: Vec<&str> = by_status["result"]["content"]
        .as_array()
        .expect("content")
        .iter()
        .filter_map(|checkout| checkout["id"].as_str())
        .collect();
    ids.sort_unstable();
    let mut expected = vec![a.as_str(), b.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);

    let paged = rest.search(&[("size", "2"), ("page", "1")]).await;
    assert_eq!(paged["result"]["totalElements"], 3);
    assert_eq!(paged["result"]["totalPages"], 2);
    assert_eq!(paged["result"]["content"].as_array().map(Vec::len), Some(1));
    let request = rest
        .client
        .get(format!("{}checkout", rest.base))
        .query(&[("status", "SHIPPED")]);
    let (status, _, json) = rest.send(rest.authed(request)).await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "SHIPPED");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_rest_spec_spelling_option() {
    let sandbox = Sandbox::start(SandboxOptions {
        status_spelling: StatusSpelling::Spec,
        ..options()
    })
    .await
    .expect("sandbox starts");
    let rest = Rest::new(&sandbox);
    let (id, name) = create(&sandbox, "ORD-S").await;
    sandbox.state().pay(&id).await.expect("paid");
    sandbox
        .state()
        .refund(&id, Some("1.00".parse().expect("decimal")))
        .await
        .expect("partial refund");
    let (_, _, json) = rest.get_checkout(id.as_str()).await;
    assert_eq!(json["result"]["status"], "Partially refunded");
    assert_eq!(
        CheckoutStatus::parse(json["result"]["status"].as_str().expect("status")),
        CheckoutStatus::PartiallyRefunded
    );
    let by_status = rest.search(&[("status", "PARTIALLY_REFUNDED")]).await;
    assert_eq!(by_status["result"]["totalElements"], 1);
    let document = sandbox.documents().get(&name).expect("document");
    assert_eq!(status_field(&document), "Partially refunded");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_rest_webhooks_are_registered_and_listed() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let create = rest
        .client
        .post(format!("{}webhooks", rest.base))
        .json(&json!({"address": "https://shop.example/hook"}));
    let (status, text, json) = rest.send(rest.authed(create)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json["result"]["address"], "https://shop.example/hook");
    assert!(json["result"]["id"].is_string() && json["result"]["hmacKey"].is_string());
    let list = rest.client.get(format!("{}webhooks", rest.base));
    let (status, _, json) = rest.send(rest.authed(list)).await;
    assert_eq!(status, 200);
    // paymennt's spec: `GET /webhooks` answers an array of `WebhookResponseWrapper`.
    let listed = json.as_array().expect("an array of wrappers");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["success"], true);
    assert_eq!(listed[0]["result"]["address"], "https://shop.example/hook");
    let missing = rest
        .client
        .post(format!("{}webhooks", rest.base))
        .json(&json!({}));
    let (status, _, json) = rest.send(rest.authed(missing)).await;
    assert_eq!(status, 400);
    assert_error_wrapper(&json, "address is required");
    sandbox.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Listen, raw

/// One raw Listen stream through gcloud-sdk's generated client.
struct Stream {
    requests: mpsc::Sender<ListenRequest>,
    responses: Streaming<ListenResponse>,
    database: String,
}

impl Stream {
    async fn open(sandbox: &Sandbox) -> Stream {
        Stream::open_with(sandbox, tonic::metadata::MetadataMap::new()).await
    }

    async fn open_with(sandbox: &Sandbox, metadata: tonic::metadata::MetadataMap) -> Stream {
        let mut client = FirestoreClient::connect(sandbox.firestore_endpoint())
            .await
            .expect("connects");
        tokio::time::timeout(DEADLINE, Stream::open_on(&mut client, sandbox, metadata))
            .await
            .expect("Listen answers in time")
    }

    /// Opens a stream on an existing client (and so on its connection).
    async fn open_on(
        client: &mut FirestoreClient<tonic::transport::Channel>,
        sandbox: &Sandbox,
        metadata: tonic::metadata::MetadataMap,
    ) -> Stream {
        let (requests, receiver) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        *request.metadata_mut() = metadata;
        let responses = client
            .listen(request)
            .await
            .expect("Listen accepted")
            .into_inner();
        Stream {
            requests,
            responses,
            database: sandbox.database_name(),
        }
    }

    async fn send(&self, change: RequestedChange) {
        self.send_to(&self.database.clone(), change).await;
    }

    async fn send_to(&self, database: &str, change: RequestedChange) {
        self.requests
            .send(ListenRequest {
                database: database.to_owned(),
                target_change: Some(change),
                ..ListenRequest::default()
            })
            .await
            .expect("stream open");
    }

    async fn add(&self, target_id: i32, documents: &[&str], resume_token: Option<Vec<u8>>) {
        self.send(RequestedChange::AddTarget(documents_target(
            target_id,
            documents,
            resume_token,
        )))
        .await;
    }

    async fn remove(&self, target_id: i32) {
        self.send(RequestedChange::RemoveTarget(target_id)).await;
    }

    /// The next response, or the stream's error; `None` when it ended cleanly.
    async fn next_result(&mut self) -> Result<Option<ResponseType>, Status> {
        let message = tokio::time::timeout(DEADLINE, self.responses.message())
            .await
            .expect("a Listen response in time")?;
        Ok(message.map(|response| response.response_type.expect("a response type")))
    }

    async fn next(&mut self) -> ResponseType {
        self.next_result()
            .await
            .expect("no stream error")
            .expect("stream still open")
    }

    async fn next_target_change(&mut self) -> TargetChange {
        match self.next().await {
            ResponseType::TargetChange(change) => change,
            other => panic!("expected a TargetChange, got {other:?}"),
        }
    }

    async fn next_document(&mut self) -> (Document, Vec<i32>) {
        match self.next().await {
            ResponseType::DocumentChange(change) => {
                (change.document.expect("a document"), change.target_ids)
            }
            other => panic!("expected a DocumentChange, got {other:?}"),
        }
    }

    /// Waits for the stream to fail; returns the status.
    async fn error(&mut self) -> Status {
        for _ in 0..100 {
            match self.next_result().await {
                Err(status) => return status,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
            }
        }
        panic!("no error after 100 responses");
    }

    /// Reads the initial sequence of a freshly added target: ADD, documents, CURRENT, global
    /// NO_CHANGE. Returns the documents and the marker's token.
    async fn initial(&mut self, target_id: i32) -> (Vec<Document>, Vec<u8>) {
        let add = self.next_target_change().await;
        assert_eq!(kind(&add), TargetChangeType::Add);
        assert_eq!(add.target_ids, vec![target_id]);
        assert!(add.cause.is_none());
        let mut documents = Vec::new();
        let current = loop {
            match self.next().await {
                ResponseType::DocumentChange(change) => {
                    assert_eq!(change.target_ids, vec![target_id]);
                    documents.push(change.document.expect("a document"));
                }
                ResponseType::TargetChange(change) => break change,
                other => panic!("unexpected in initial state: {other:?}"),
            }
        };
        assert_eq!(kind(&current), TargetChangeType::Current);
        assert_eq!(current.target_ids, vec![target_id]);
        assert!(!current.resume_token.is_empty(), "CURRENT carries a token");
        assert!(current.read_time.is_some(), "CURRENT carries a read time");
        let marker = self.next_target_change().await;
        assert_global_marker(&marker);
        (documents, marker.resume_token)
    }
}

fn documents_target(target_id: i32, documents: &[&str], resume_token: Option<Vec<u8>>) -> Target {
    Target {
        target_id,
        target_type: Some(TargetType::Documents(DocumentsTarget {
            documents: documents.iter().map(|name| (*name).to_owned()).collect(),
        })),
        resume_type: resume_token.map(ResumeType::ResumeToken),
        ..Target::default()
    }
}

fn kind(change: &TargetChange) -> TargetChangeType {
    TargetChangeType::try_from(change.target_change_type).expect("a known change type")
}

fn assert_global_marker(change: &TargetChange) {
    assert_eq!(kind(change), TargetChangeType::NoChange, "{change:?}");
    assert!(change.target_ids.is_empty(), "global: no target ids");
    assert!(
        !change.resume_token.is_empty(),
        "the marker carries a token"
    );
    assert!(change.read_time.is_some(), "the marker carries a read time");
}

fn status_field(document: &Document) -> String {
    match document
        .fields
        .get("status")
        .and_then(|v| v.value_type.clone())
    {
        Some(ValueType::StringValue(status)) => status,
        other => panic!("status field missing or not a string: {other:?}"),
    }
}

fn read_micros(change: &TargetChange) -> i64 {
    let time = change.read_time.expect("read time");
    time.seconds * 1_000_000 + i64::from(time.nanos) / 1_000
}

#[tokio::test]
async fn sandbox_listen_initial_state_then_a_payment() {
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-L1").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(7, &[&name], None).await;
    let (documents, _) = stream.initial(7).await;
    assert_eq!(documents.len(), 1);
    assert_eq!(documents[0].name, name);
    assert_eq!(status_field(&documents[0]), "PENDING");
    assert!(documents[0].update_time.is_some() && documents[0].create_time.is_some());

    // Shared state: pay -> change on the stream -> Get Checkout says PAID.
    sandbox.state().pay(&id).await.expect("paid");
    let (document, target_ids) = stream.next_document().await;
    assert_eq!(target_ids, vec![7]);
    assert_eq!(status_field(&document), "PAID");
    let marker = stream.next_target_change().await;
    assert_global_marker(&marker);
    let (status, text, json) = Rest::new(&sandbox).get_checkout(id.as_str()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json["result"]["status"], "PAID");
    assert_eq!(sandbox.state().get_checkout_calls(&id), 1);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_missing_document_gives_no_document_change() {
    let sandbox = start().await;
    let missing = format!("{}/documents/checkouts/nope", sandbox.database_name());
    let mut stream = Stream::open(&sandbox).await;
    stream.add(3, &[&missing], None).await;
    let (documents, _) = stream.initial(3).await;
    assert!(documents.is_empty(), "no DocumentChange for a missing doc");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_resume_token_skips_old_changes() {
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-R").await;
    let mut first = Stream::open(&sandbox).await;
    first.add(1, &[&name], None).await;
    let (_, pending_token) = first.initial(1).await;
    drop(first);
    let pending_read_time = sandbox
        .documents()
        .get(&name)
        .and_then(|document| document.update_time)
        .expect("the PENDING document's update time");

    sandbox.state().pay(&id).await.expect("paid");

    // Resuming from before the payment: only the payment arrives.
    let mut second = Stream::open(&sandbox).await;
    second.add(1, &[&name], Some(pending_token)).await;
    let (documents, paid_token) = second.initial(1).await;
    assert_eq!(documents.len(), 1);
    assert_eq!(status_field(&documents[0]), "PAID");
    drop(second);

    // Resuming from after the payment: nothing old is re-sent, later changes are.
    let mut third = Stream::open(&sandbox).await;
    third.add(1, &[&name], Some(paid_token)).await;
    let (documents, _) = third.initial(1).await;
    assert!(documents.is_empty(), "unchanged document not re-sent");
    sandbox.state().refund(&id, None).await.expect("refunded");
    let (document, _) = third.next_document().await;
    assert_eq!(status_field(&document), "REFUNDED");
    assert_global_marker(&third.next_target_change().await);

    // A read time works like a token: the payment happened after the first CURRENT's time.
    let mut by_time = Stream::open(&sandbox).await;
    by_time
        .send(RequestedChange::AddTarget(Target {
            resume_type: Some(ResumeType::ReadTime(pending_read_time)),
            ..documents_target(1, &[&name], None)
        }))
        .await;
    let (documents, _) = by_time.initial(1).await;
    assert_eq!(
        documents.len(),
        1,
        "the refund and payment came after that time"
    );
    assert_eq!(status_field(&documents[0]), "REFUNDED");

    // An undecodable token fails the stream.
    let mut fourth = Stream::open(&sandbox).await;
    fourth.add(1, &[&name], Some(b"not a token".to_vec())).await;
    assert_eq!(fourth.error().await.code(), Code::InvalidArgument);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_remove_target_and_unknown_ids() {
    let sandbox = start().await;
    let (_, name) = create(&sandbox, "ORD-RM").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(4, &[&name], None).await;
    stream.initial(4).await;
    stream.remove(4).await;
    let removed = stream.next_target_change().await;
    assert_eq!(kind(&removed), TargetChangeType::Remove);
    assert_eq!(removed.target_ids, vec![4]);
    assert!(removed.cause.is_none(), "a client removal has no cause");
    stream.remove(4).await;
    assert_eq!(stream.error().await.code(), Code::NotFound);

    let mut duplicate = Stream::open(&sandbox).await;
    duplicate.add(2, &[&name], None).await;
    duplicate.initial(2).await;
    duplicate.add(2, &[&name], None).await;
    assert_eq!(duplicate.error().await.code(), Code::InvalidArgument);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_delete_and_lying_document() {
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-D").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(9, &[&name], None).await;
    stream.initial(9).await;

    sandbox
        .state()
        .lie_document(&id, "PAID")
        .await
        .expect("lied");
    let (document, _) = stream.next_document().await;
    assert_eq!(status_field(&document), "PAID", "the document lies");
    assert_global_marker(&stream.next_target_change().await);
    assert_eq!(
        sandbox.state().status(&id),
        Some(CheckoutStatus::Pending),
        "the checkout does not"
    );

    sandbox.state().delete_document(&id).await.expect("deleted");
    match stream.next().await {
        ResponseType::DocumentDelete(delete) => {
            assert_eq!(delete.document, name);
            assert_eq!(delete.removed_target_ids, vec![9]);
            assert!(delete.read_time.is_some());
        }
        other => panic!("expected a DocumentDelete, got {other:?}"),
    }
    assert_global_marker(&stream.next_target_change().await);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_two_targets_on_one_stream() {
    let sandbox = start().await;
    let (a, name_a) = create(&sandbox, "ORD-2A").await;
    let (_, name_b) = create(&sandbox, "ORD-2B").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(10, &[&name_a], None).await;
    let (documents, _) = stream.initial(10).await;
    assert_eq!(documents.len(), 1);
    stream.add(11, &[&name_b], None).await;
    let (documents, _) = stream.initial(11).await;
    assert_eq!(documents[0].name, name_b);
    sandbox.state().pay(&a).await.expect("paid");
    let (document, target_ids) = stream.next_document().await;
    assert_eq!(document.name, name_a);
    assert_eq!(target_ids, vec![10], "only the target watching it");
    let marker = stream.next_target_change().await;
    assert_global_marker(&marker);

    // A third target watching both documents gets both in its initial state; a change to one
    // is addressed to every target watching it.
    stream.add(12, &[&name_a, &name_b, &name_a], None).await;
    let (documents, _) = stream.initial(12).await;
    assert_eq!(documents.len(), 2, "duplicates are dropped");
    sandbox.state().refund(&a, None).await.expect("refunded");
    let (_, target_ids) = stream.next_document().await;
    assert_eq!(target_ids, vec![10, 12]);
    let later = stream.next_target_change().await;
    assert_global_marker(&later);
    assert!(
        read_micros(&later) >= read_micros(&marker),
        "read time monotonic"
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_per_document_streams_use_target_one() {
    let sandbox = start().await;
    let (a, name_a) = create(&sandbox, "ORD-PA").await;
    let (b, name_b) = create(&sandbox, "ORD-PB").await;
    let mut stream_a = Stream::open(&sandbox).await;
    let mut stream_b = Stream::open(&sandbox).await;
    stream_a.add(1, &[&name_a], None).await;
    stream_b.add(1, &[&name_b], None).await;
    stream_a.initial(1).await;
    stream_b.initial(1).await;
    sandbox.state().fail(&b).await.expect("failed");
    let (document, target_ids) = stream_b.next_document().await;
    assert_eq!(
        (document.name.as_str(), target_ids),
        (name_b.as_str(), vec![1])
    );
    assert_eq!(status_field(&document), "FAILED");
    sandbox.state().pay(&a).await.expect("paid");
    // Stream A saw nothing about B: its next document is A's payment.
    let (document, _) = stream_a.next_document().await;
    assert_eq!(document.name, name_a);
    assert_eq!(status_field(&document), "PAID");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_rejects_wrong_databases_and_names() {
    let sandbox = start().await;
    let (_, name) = create(&sandbox, "ORD-W").await;

    let mut wrong_project = Stream::open(&sandbox).await;
    wrong_project
        .send_to(
            "projects/someone-else/databases/(default)",
            RequestedChange::AddTarget(documents_target(1, &[&name], None)),
        )
        .await;
    assert_eq!(wrong_project.error().await.code(), Code::NotFound);

    let mut malformed_database = Stream::open(&sandbox).await;
    malformed_database
        .send_to(
            "projects/x",
            RequestedChange::AddTarget(documents_target(1, &[&name], None)),
        )
        .await;
    assert_eq!(
        malformed_database.error().await.code(),
        Code::InvalidArgument
    );

    for bad in [
        "checkouts/abc".to_owned(),
        format!("{}/documents/checkouts", sandbox.database_name()),
        "projects/other/databases/(default)/documents/checkouts/abc".to_owned(),
    ] {
        let mut stream = Stream::open(&sandbox).await;
        stream.add(1, &[&bad], None).await;
        assert_eq!(stream.error().await.code(), Code::InvalidArgument, "{bad}");
    }
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_server_assigned_ids_and_heartbeats() {
    let sandbox = Sandbox::start(SandboxOptions {
        heartbeat_interval: Duration::from_millis(30),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox starts");
    let (_, name) = create(&sandbox, "ORD-H").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(0, &[&name], None).await;
    let add = stream.next_target_change().await;
    assert_eq!(kind(&add), TargetChangeType::Add);
    let assigned = add.target_ids[0];
    assert!(assigned > 0, "the server assigns a positive id");
    // Skip to the heartbeats: two markers in a row with nothing else between them.
    let mut markers = Vec::new();
    for _ in 0..20 {
        if let ResponseType::TargetChange(change) = stream.next().await
            && kind(&change) == TargetChangeType::NoChange
        {
            assert_global_marker(&change);
            markers.push(change);
            if markers.len() == 3 {
                break;
            }
        }
    }
    assert_eq!(markers.len(), 3, "heartbeat markers arrive");
    assert!(read_micros(&markers[2]) >= read_micros(&markers[1]));
    // A heartbeat token resumes like any other.
    let token = markers[2].resume_token.clone();
    let mut resumed = Stream::open(&sandbox).await;
    resumed.add(1, &[&name], Some(token)).await;
    let (documents, _) = resumed.initial(1).await;
    assert!(documents.is_empty());
    // After a 0 id, an explicit id is answered with REMOVE and a cause.
    stream.add(5, &[&name], None).await;
    for _ in 0..20 {
        if let ResponseType::TargetChange(change) = stream.next().await
            && kind(&change) == TargetChangeType::Remove
        {
            assert_eq!(change.target_ids, vec![5]);
            let cause = change.cause.expect("a cause");
            assert_eq!(cause.code, Code::InvalidArgument as i32);
            sandbox.shutdown().await;
            return;
        }
    }
    panic!("no REMOVE for an explicit id after a server-assigned one");
}

#[tokio::test]
async fn sandbox_listen_records_headers_and_serves_get_document() {
    let sandbox = start().await;
    let (_, name) = create(&sandbox, "ORD-G").await;
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        "authorization",
        "Bearer owner".parse().expect("ascii header"),
    );
    metadata.insert(
        "google-cloud-resource-prefix",
        sandbox.database_name().parse().expect("ascii header"),
    );
    let mut stream = Stream::open_with(&sandbox, metadata).await;
    stream.add(1, &[&name], None).await;
    stream.initial(1).await;
    let seen = sandbox.listen_headers_seen();
    let listen = seen
        .iter()
        .find(|headers| headers.method == "Listen")
        .expect("Listen headers recorded");
    assert_eq!(listen.authorization.as_deref(), Some("Bearer owner"));
    assert_eq!(
        listen.resource_prefix.as_deref(),
        Some(sandbox.database_name().as_str())
    );

    let mut client = FirestoreClient::connect(sandbox.firestore_endpoint())
        .await
        .expect("connects");
    let document = client
        .get_document(GetDocumentRequest {
            name: name.clone(),
            ..GetDocumentRequest::default()
        })
        .await
        .expect("the document exists")
        .into_inner();
    assert_eq!(status_field(&document), "PENDING");
    let missing = client
        .get_document(GetDocumentRequest {
            name: format!("{}/documents/checkouts/nope", sandbox.database_name()),
            ..GetDocumentRequest::default()
        })
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);
    let unimplemented = client
        .list_collection_ids(gcloud_sdk::google::firestore::v1::ListCollectionIdsRequest::default())
        .await
        .expect_err("not served");
    assert_eq!(unimplemented.code(), Code::Unimplemented);
    assert!(
        sandbox
            .listen_headers_seen()
            .iter()
            .any(|headers| headers.method == "GetDocument" && headers.authorization.is_none()),
        "calls without authorization are accepted and recorded"
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_via_the_firestore_crate() {
    use firestore::{
        FirestoreDb, FirestoreDbOptions, FirestoreListenerTarget, FirestoreMemListenStateStorage,
    };
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-F").await;
    let location = sandbox.state().location(&id).expect("known");
    let db = FirestoreDb::with_options_auth(
        FirestoreDbOptions::new(sandbox.project_id().to_owned())
            .with_firebase_api_url(sandbox.firestore_endpoint()),
        gcloud_sdk::google_cloud_auth::credentials::anonymous::Builder::new().build(),
    )
    .await
    .expect("client");
    let mut listener = db
        .create_listener(FirestoreMemListenStateStorage::new())
        .await
        .expect("listener");
    db.fluent()
        .select()
        .by_id_in(location.collection.as_str())
        .batch_listen([location.document.as_str()])
        .add_target(FirestoreListenerTarget::new(42), &mut listener)
        .expect("target");
    let (events, mut received) = mpsc::unbounded_channel();
    listener
        .start(move |event| {
            let events = events.clone();
            async move {
                let _ = events.send(event);
                Ok(())
            }
        })
        .await
        .expect("started");

    let mut wait_for_status = async |wanted: &str| {
        loop {
            let event = tokio::time::timeout(DEADLINE, received.recv())
                .await
                .expect("an event in time")
                .expect("listener alive");
            if let ResponseType::DocumentChange(change) = event
                && let Some(document) = change.document
                && document.name == name
                && status_field(&document) == wanted
            {
                return change.target_ids;
            }
        }
    };
    assert_eq!(wait_for_status("PENDING").await, vec![42]);
    sandbox.state().pay(&id).await.expect("paid");
    assert_eq!(wait_for_status("PAID").await, vec![42]);
    listener.shutdown().await.expect("listener stops");
    sandbox.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Shared state, expiry, admin and faults

#[tokio::test]
async fn sandbox_expiry_changes_the_checkout_and_its_document() {
    let sandbox = Sandbox::start(SandboxOptions {
        expiry_minute: Duration::from_millis(2),
        ..options()
    })
    .await
    .expect("sandbox starts");
    let rest = Rest::new(&sandbox);
    let body = json!({"requestId":"E-r1","orderId":"E","description":"D","currency":"AED",
        "amount":5,"expiresIn":15});
    let (status, text, json) = rest.create_link_raw(&body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let id: CheckoutId = json["result"]["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("valid id");
    let name = sandbox
        .state()
        .location(&id)
        .expect("known")
        .document_name();
    let mut stream = Stream::open(&sandbox).await;
    stream.add(1, &[&name], None).await;
    let (documents, _) = stream.initial(1).await;
    // The expiry (30 ms) may already have happened; either way the document ends EXPIRED.
    let mut status = documents.first().map(status_field);
    while status.as_deref() != Some("EXPIRED") {
        let (document, _) = stream.next_document().await;
        status = Some(status_field(&document));
        assert_global_marker(&stream.next_target_change().await);
    }
    let (_, _, json) = rest.get_checkout(id.as_str()).await;
    assert_eq!(json["result"]["status"], "EXPIRED");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_admin_endpoints_drive_the_state() {
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-ADM").await;
    let client = reqwest::Client::new();
    let admin = sandbox.admin_url();
    let post = |path: String| client.post(format!("{admin}{path}")).send();
    let response = post(format!("checkouts/{id}/pay")).await.expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    let json: Json = response.json().await.expect("json");
    assert_eq!(json["result"]["status"], "PAID");
    let response = post(format!("checkouts/{id}/refund?amount=10.5"))
        .await
        .expect("sent");
    let json: Json = response.json().await.expect("json");
    assert_eq!(json["result"]["status"], "PARTIALLY_REFUNDED");
    assert_eq!(json["result"]["totalRefunded"], json!(10.5));
    let response = post(format!("checkouts/{id}/pay")).await.expect("sent");
    assert_eq!(response.status().as_u16(), 400, "cannot pay twice");
    let response = post("checkouts/1653241101733169556/pay".into())
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 404);

    let response = client
        .post(format!("{admin}documents/{id}"))
        .json(&json!({"status": "CANCELLED"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    let document = sandbox.documents().get(&name).expect("exists");
    assert_eq!(status_field(&document), "CANCELLED");
    assert_eq!(
        sandbox.state().status(&id),
        Some(CheckoutStatus::PartiallyRefunded)
    );
    let response = client
        .delete(format!("{admin}documents/{id}"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    assert!(sandbox.documents().get(&name).is_none());

    let response = client
        .post(format!("{admin}faults"))
        .json(&json!({"fail_next_api_requests": 2, "api_latency_ms": 1}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(sandbox.faults().settings().fail_next_api_requests, 2);
    let faults: Json = client
        .get(format!("{admin}faults"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(faults["result"]["settings"]["api_latency_ms"], 1);
    let response = client
        .post(format!("{admin}faults"))
        .json(&json!({"no_such_fault": 1}))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        response.status().as_u16(),
        400,
        "unknown fault names are refused"
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_faults_server_errors_then_success_and_counts() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let (id, _) = create(&sandbox, "ORD-500").await;
    sandbox.faults().fail_next_api_requests(3);
    for attempt in 1..=3 {
        let (status, _, json) = rest.get_checkout(id.as_str()).await;
        assert_eq!(status, 500, "attempt {attempt}");
        assert_error_wrapper(&json, "Internal server error");
    }
    let (status, _, json) = rest.get_checkout(id.as_str()).await;
    assert_eq!(status, 200);
    assert_eq!(json["result"]["status"], "PENDING");
    assert_eq!(sandbox.state().get_checkout_calls(&id), 4);
    assert_eq!(sandbox.faults().total_get_checkout_calls(), 4);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_faults_throttle_with_retry_after() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let (id, _) = create(&sandbox, "ORD-429").await;
    sandbox.faults().throttle_next_api_requests(1, 7);
    let request = rest.client.get(format!("{}checkout/{id}", rest.base));
    let response = rest.authed(request).send().await.expect("sent");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );
    let json: Json = response.json().await.expect("json");
    assert_error_wrapper(&json, "Too many requests");
    let (status, _, _) = rest.get_checkout(id.as_str()).await;
    assert_eq!(status, 200, "only the next request was throttled");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_faults_close_streams_with_unavailable() {
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-503").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(1, &[&name], None).await;
    let (_, token) = stream.initial(1).await;
    sandbox.faults().close_listen_streams();
    assert_eq!(stream.error().await.code(), Code::Unavailable);
    // A new stream works, and resumes where the old one stopped.
    sandbox.state().pay(&id).await.expect("paid");
    let mut reopened = Stream::open(&sandbox).await;
    reopened.add(1, &[&name], Some(token)).await;
    let (documents, _) = reopened.initial(1).await;
    assert_eq!(documents.len(), 1);
    assert_eq!(status_field(&documents[0]), "PAID");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_faults_delayed_document_writes() {
    let sandbox = start().await;
    let (id, name) = create(&sandbox, "ORD-SLOW").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(1, &[&name], None).await;
    stream.initial(1).await;
    sandbox
        .faults()
        .set_document_write_delay(Duration::from_millis(50));
    let paid_at = std::time::Instant::now();
    sandbox.state().pay(&id).await.expect("paid");
    // The checkout is PAID before its document says so.
    assert_eq!(sandbox.state().status(&id), Some(CheckoutStatus::Paid));
    assert_eq!(
        status_field(&sandbox.documents().get(&name).expect("exists")),
        "PENDING"
    );
    let (document, _) = stream.next_document().await;
    assert_eq!(status_field(&document), "PAID");
    assert!(paid_at.elapsed() >= Duration::from_millis(50));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_shutdown_ends_streams_with_unavailable() {
    let sandbox = start().await;
    let (_, name) = create(&sandbox, "ORD-BYE").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(1, &[&name], None).await;
    stream.initial(1).await;
    let stopping = tokio::spawn(sandbox.shutdown());
    let status = stream.error().await;
    assert_eq!(status.code(), Code::Unavailable);
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("shutdown finishes")
        .expect("no panic");
}

#[tokio::test]
async fn sandbox_listen_once_targets_end_after_current() {
    let sandbox = start().await;
    let (_, name) = create(&sandbox, "ORD-ONCE").await;
    let mut stream = Stream::open(&sandbox).await;
    stream
        .send(RequestedChange::AddTarget(Target {
            once: true,
            ..documents_target(6, &[&name], None)
        }))
        .await;
    assert_eq!(
        kind(&stream.next_target_change().await),
        TargetChangeType::Add
    );
    let (document, _) = stream.next_document().await;
    assert_eq!(document.name, name);
    assert_eq!(
        kind(&stream.next_target_change().await),
        TargetChangeType::Current
    );
    let removed = stream.next_target_change().await;
    assert_eq!(kind(&removed), TargetChangeType::Remove);
    assert_eq!(removed.target_ids, vec![6]);
    assert!(removed.cause.is_none());
    assert_global_marker(&stream.next_target_change().await);
    // The id is free again.
    stream.add(6, &[&name], None).await;
    stream.initial(6).await;
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_listen_caps_streams_per_connection_at_100() {
    let sandbox = start().await;
    let (_, name) = create(&sandbox, "ORD-CAP").await;
    let channel = tonic::transport::Endpoint::from_shared(sandbox.firestore_endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let mut client = FirestoreClient::new(channel);
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut stream = tokio::time::timeout(
            DEADLINE,
            Stream::open_on(&mut client, &sandbox, tonic::metadata::MetadataMap::new()),
        )
        .await
        .expect("one of the first 100 streams");
        stream.add(1, &[&name], None).await;
        stream.initial(1).await;
        streams.push(stream);
    }
    // The 101st waits for a free slot, as on Google's front end. (A negative: bounded wait.)
    let blocked = tokio::time::timeout(
        Duration::from_millis(200),
        Stream::open_on(&mut client, &sandbox, tonic::metadata::MetadataMap::new()),
    )
    .await;
    assert!(blocked.is_err(), "the 101st stream must wait");
    drop(streams.pop());
    let mut stream = tokio::time::timeout(
        DEADLINE,
        Stream::open_on(&mut client, &sandbox, tonic::metadata::MetadataMap::new()),
    )
    .await
    .expect("a slot freed up");
    stream.add(1, &[&name], None).await;
    stream.initial(1).await;
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_rest_search_filters_pages_and_counts_as_the_spec_says() {
    let sandbox = start().await;
    let rest = Rest::new(&sandbox);
    let mut ids = Vec::new();
    for order in ["ORD-1", "ORD-2", "ORD-3"] {
        ids.push(create(&sandbox, order).await.0);
    }
    sandbox.state().pay(&ids[1]).await.expect("paid");
    sandbox
        .state()
        .refund(&ids[1], Some("1.00".parse().expect("decimal")))
        .await
        .expect("partial refund");
    let found = |json: &Json| -> Vec<String> {
        json["result"]["content"]
            .as_array()
            .expect("content")
            .iter()
            .filter_map(|checkout| checkout["id"].as_str().map(str::to_owned))
            .collect()
    };
    let all: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(found(&rest.search(&[]).await), all, "ordered by id");
    assert_eq!(
        found(&rest.search(&[("afterId", ids[0].as_str())]).await),
        all[1..]
    );
    assert_eq!(found(&rest.search(&[("type", "LINK")]).await), all);
    assert!(found(&rest.search(&[("type", "WEB")]).await).is_empty());
    for spelling in ["PARTIALLY_REFUNDED", "Partially refunded"] {
        assert_eq!(
            found(&rest.search(&[("status", spelling)]).await),
            all[1..2]
        );
    }
    assert_eq!(
        found(
            &rest
                .search(&[("afterTimestamp", "2000-01-01 00:00:00")])
                .await
        ),
        all
    );
    assert!(
        found(
            &rest
                .search(&[("afterTimestamp", "2999-01-01 00:00:00")])
                .await
        )
        .is_empty()
    );
    let paged = rest.search(&[("size", "1"), ("page", "2")]).await;
    assert_eq!(found(&paged), all[2..]);
    assert_eq!(paged["result"]["totalPages"], 3);
    for (name, value) in [
        ("afterTimestamp", "2026-11-30T10:00:00Z"),
        ("afterId", "abc"),
        ("type", "BOGUS"),
        ("page", "-1"),
        ("size", "0"),
    ] {
        let request = rest
            .client
            .get(format!("{}checkout", rest.base))
            .query(&[(name, value)]);
        let (status, text, json) = rest.send(rest.authed(request)).await;
        assert_eq!(status, 400, "{name}={value}: {text}");
        assert_error_wrapper(&json, name);
    }
    // 9 searches that answered 200 above, 5 refused: every one is counted, on the handle and
    // on the admin endpoint.
    assert_eq!(sandbox.faults().search_calls(), 14);
    rest.get_checkout(ids[0].as_str()).await;
    let admin = reqwest::get(format!("{}faults", sandbox.admin_url()))
        .await
        .expect("admin answers")
        .json::<Json>()
        .await
        .expect("json");
    assert_eq!(admin["result"]["search_calls"], 14, "{admin}");
    assert_eq!(admin["result"]["get_checkout_calls_total"], 1, "{admin}");

    sandbox.faults().refuse_search(true);
    let request = rest.client.get(format!("{}checkout", rest.base));
    let (status, _, json) = rest.send(rest.authed(request)).await;
    assert_eq!(status, 403);
    assert_error_wrapper(&json, "search");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn sandbox_rules_serve_checkout_documents_by_exact_name_and_deny_the_rest() {
    let sandbox = Sandbox::start(SandboxOptions {
        firestore_auth: paywatch::sandbox::FirestoreAuthCheck::Rules {
            require_sign_in: false,
        },
        ..options()
    })
    .await
    .expect("sandbox starts");
    let (_, name) = create(&sandbox, "ORD-RULES").await;
    let mut stream = Stream::open(&sandbox).await;
    stream.add(1, &[&name], None).await;
    let (documents, _) = stream.initial(1).await;
    assert_eq!(documents.len(), 1, "a checkout document by its exact name");

    // Another collection, and a sub-collection under the checkout: denied, the stream carries on.
    let elsewhere = format!("{}/documents/orders/x", sandbox.database_name());
    let nested = format!("{name}/private/secret");
    for (target_id, document) in [(2, elsewhere.as_str()), (3, nested.as_str())] {
        stream.add(target_id, &[document], None).await;
        let change = stream.next_target_change().await;
        assert_eq!(kind(&change), TargetChangeType::Remove);
        assert_eq!(change.target_ids, vec![target_id]);
        let cause = change.cause.expect("a cause");
        assert_eq!(cause.code, Code::PermissionDenied as i32);
    }
    assert_eq!(sandbox.auth_counts().denied_targets, 2);

    // A token not issued by the sandbox's Firebase Auth is refused before the stream starts.
    let mut client = FirestoreClient::connect(sandbox.firestore_endpoint())
        .await
        .expect("connects");
    let (_requests, receiver) = mpsc::channel::<ListenRequest>(1);
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request.metadata_mut().insert(
        "authorization",
        "Bearer forged".parse().expect("ascii header"),
    );
    let status = client.listen(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .get_document(GetDocumentRequest {
            name: elsewhere,
            ..GetDocumentRequest::default()
        })
        .await
        .expect_err("denied by the rules");
    assert_eq!(status.code(), Code::PermissionDenied);
    sandbox.shutdown().await;
}
