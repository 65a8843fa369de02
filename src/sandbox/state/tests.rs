//! Unit tests of `state`.

use super::*;
use crate::sandbox::documents::DocumentStore;
use crate::sandbox::faults::FaultSettings;

fn state_with(spelling: StatusSpelling) -> (SandboxState, Arc<DocumentStore>) {
    state_searching(spelling, SearchBehaviour::default())
}

fn state_searching(
    spelling: StatusSpelling,
    search: SearchBehaviour,
) -> (SandboxState, Arc<DocumentStore>) {
    let store = Arc::new(DocumentStore::new());
    let state = SandboxState::new(
        StateConfig {
            project_id: "paywatch-sandbox".into(),
            collection: "checkouts".into(),
            status_spelling: spelling,
            expiry_minute: Duration::from_millis(1),
            public_base_url: "http://127.0.0.1:1".into(),
            search,
        },
        store.clone(),
        Faults::new(FaultSettings::default()),
        CancellationToken::new(),
    );
    (state, store)
}

fn link(amount: &str) -> LinkRequest {
    LinkRequest {
        request_id: "REQ-1".into(),
        order_id: "ORD-1".into(),
        description: "Test order".into(),
        currency: "AED".into(),
        amount: JsonDecimal(amount.parse().expect("decimal")),
        ..LinkRequest::default()
    }
}

fn id_of(checkout: &Checkout) -> CheckoutId {
    checkout
        .id
        .as_ref()
        .expect("id")
        .0
        .parse()
        .expect("valid id")
}

/// The ids a search returns, in its order.
fn searched(state: &SandboxState) -> Vec<u128> {
    state
        .search(&SearchFilter::default())
        .iter()
        .filter_map(|checkout| checkout.id.as_ref()?.0.parse().ok())
        .collect()
}

#[tokio::test]
async fn searches_answer_in_the_configured_order_with_the_configured_ids() {
    for (order, ids) in [
        (SearchOrder::Asc, CheckoutIds::Growing),
        (SearchOrder::Desc, CheckoutIds::Growing),
        (SearchOrder::Random, CheckoutIds::Random),
    ] {
        let behaviour = SearchBehaviour {
            order,
            ids,
            visibility_delay: Duration::ZERO,
        };
        let (state, _) = state_searching(StatusSpelling::Upper, behaviour);
        let mut created = Vec::new();
        for index in 0..20 {
            let checkout = state
                .create_link(&LinkRequest {
                    order_id: format!("ORD-{index}"),
                    ..link("1.00")
                })
                .await
                .expect("created");
            let id: u128 = checkout.id.expect("id").0.parse().expect("numeric");
            created.push(id);
        }
        let found = searched(&state);
        assert_eq!(
            found,
            searched(&state),
            "{order:?}: the same order every time"
        );
        let mut ascending = created.clone();
        ascending.sort_unstable();
        match order {
            SearchOrder::Asc => assert_eq!(found, ascending),
            SearchOrder::Desc => {
                ascending.reverse();
                assert_eq!(found, ascending);
            }
            SearchOrder::Random => {
                assert_ne!(found, ascending, "shuffled");
                let mut sorted = found.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, ascending, "every checkout once");
            }
        }
        if ids == CheckoutIds::Random {
            assert_ne!(created, ascending, "random ids do not grow with creation");
        } else {
            assert!(created.windows(2).all(|pair| pair[0] < pair[1]));
        }
    }
}

#[tokio::test]
async fn a_new_checkout_is_searchable_only_after_the_visibility_delay() {
    let behaviour = SearchBehaviour {
        visibility_delay: Duration::from_secs(3600),
        ..SearchBehaviour::default()
    };
    let (state, _) = state_searching(StatusSpelling::Upper, behaviour);
    let checkout = state.create_link(&link("1.00")).await.expect("created");
    assert!(searched(&state).is_empty(), "not visible yet");
    let id = id_of(&checkout);
    assert!(
        state.checkout(&id).is_some(),
        "Get Checkout sees it at once"
    );
}

#[tokio::test]
async fn create_link_writes_a_pending_document() {
    let (state, store) = state_with(StatusSpelling::Upper);
    let checkout = state.create_link(&link("100.00")).await.expect("created");
    let id = id_of(&checkout);
    assert_eq!(id.as_str().len(), 19);
    assert_eq!(checkout.checkout_key.as_deref().map(str::len), Some(48));
    assert_eq!(checkout.status, Some(CheckoutStatus::Pending));
    assert_eq!(
        checkout.total_refunded.map(|d| d.0.to_string()),
        Some("0.00".into())
    );
    let location = state.location(&id).expect("known");
    let doc = store
        .get(&location.document_name())
        .expect("document written");
    assert_eq!(
        doc.fields.get("status").and_then(|v| v.value_type.clone()),
        Some(ValueType::StringValue("PENDING".into()))
    );
}

#[tokio::test]
async fn impossible_transitions_are_refused() {
    let (state, _) = state_with(StatusSpelling::Upper);
    let id = id_of(&state.create_link(&link("10")).await.expect("created"));
    let error = state
        .refund(&id, None)
        .await
        .expect_err("pending cannot be refunded");
    assert!(
        matches!(error, SandboxError::BadRequest(ref m) if m.contains("PENDING")),
        "{error}"
    );
    state.pay(&id).await.expect("paid");
    assert!(state.cancel(&id).await.is_err(), "paid cannot be cancelled");
    assert!(state.pay(&id).await.is_err(), "paid twice");
    let unknown: CheckoutId = "1".parse().expect("id");
    assert_eq!(
        state.pay(&unknown).await.expect_err("unknown"),
        SandboxError::NotFound
    );
}

#[tokio::test]
async fn refunds_keep_totals_consistent() {
    let (state, _) = state_with(StatusSpelling::Spec);
    let id = id_of(&state.create_link(&link("100.00")).await.expect("created"));
    state.pay(&id).await.expect("paid");
    let partial = state
        .refund(&id, Some("30.50".parse().expect("decimal")))
        .await
        .expect("partial refund");
    assert_eq!(
        partial.status,
        Some(CheckoutStatus::Unknown("Partially refunded".into()))
    );
    assert_eq!(
        partial.total_refunded.map(|d| d.0.to_string()),
        Some("30.50".into())
    );
    let too_much = state
        .refund(&id, Some("70.00".parse().expect("decimal")))
        .await
        .expect_err("more than left");
    assert!(too_much.to_string().contains("69.50"), "{too_much}");
    let full = state.refund(&id, None).await.expect("rest refunded");
    assert_eq!(
        full.status,
        Some(CheckoutStatus::Unknown("Refunded".into()))
    );
    assert_eq!(
        full.total_refunded.map(|d| d.0.to_string()),
        Some("100.00".into())
    );
}

#[tokio::test]
async fn a_lying_document_leaves_the_checkout_alone() {
    let (state, store) = state_with(StatusSpelling::Upper);
    let id = id_of(&state.create_link(&link("5")).await.expect("created"));
    state.lie_document(&id, "PAID").await.expect("lied");
    assert_eq!(state.status(&id), Some(CheckoutStatus::Pending));
    let name = state.location(&id).expect("known").document_name();
    let doc = store.get(&name).expect("exists");
    assert_eq!(
        doc.fields.get("status").and_then(|v| v.value_type.clone()),
        Some(ValueType::StringValue("PAID".into()))
    );
    state.delete_document(&id).await.expect("deleted");
    assert!(store.get(&name).is_none());
    assert_eq!(state.status(&id), Some(CheckoutStatus::Pending));
}

#[tokio::test]
async fn validation_names_the_field() {
    let (state, _) = state_with(StatusSpelling::Upper);
    let mut request = link("1");
    request.order_id = String::new();
    let error = state.create_link(&request).await.expect_err("no order id");
    assert_eq!(
        error,
        SandboxError::BadRequest("orderId is required".into())
    );
    for amount in ["0", "-1"] {
        let error = state
            .create_link(&link(amount))
            .await
            .expect_err("bad amount");
        assert!(error.to_string().contains("amount"), "{error}");
    }
    for minutes in [14, 10081] {
        let mut request = link("1");
        request.expires_in = Some(minutes);
        let error = state.create_link(&request).await.expect_err("bad expiry");
        assert!(error.to_string().contains("expiresIn"), "{error}");
    }
    let mut request = link("1");
    request.currency = "AEDX".into();
    let error = state.create_link(&request).await.expect_err("bad currency");
    assert!(error.to_string().contains("currency"), "{error}");
}

#[tokio::test]
async fn delayed_writes_land_later_and_in_order() {
    let (state, store) = state_with(StatusSpelling::Upper);
    let id = id_of(&state.create_link(&link("5")).await.expect("created"));
    let name = state.location(&id).expect("known").document_name();
    state
        .faults()
        .set_document_write_delay(Duration::from_millis(20));
    state.pay(&id).await.expect("paid");
    state.refund(&id, None).await.expect("refunded");
    assert_eq!(state.status(&id), Some(CheckoutStatus::Refunded));
    let status_now = || {
        store
            .get(&name)
            .and_then(|doc| doc.fields.get("status").cloned())
            .and_then(|v| v.value_type)
    };
    assert_eq!(status_now(), Some(ValueType::StringValue("PENDING".into())));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while status_now() != Some(ValueType::StringValue("REFUNDED".into())) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "document never caught up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn expiry_fires_for_pending_checkouts_only() {
    let (state, _) = state_with(StatusSpelling::Upper);
    let mut request = link("5");
    request.expires_in = Some(15);
    let pending = id_of(&state.create_link(&request).await.expect("created"));
    let paid = id_of(&state.create_link(&request).await.expect("created"));
    state.pay(&paid).await.expect("paid");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.status(&pending) != Some(CheckoutStatus::Expired) {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(state.status(&paid), Some(CheckoutStatus::Paid));
}

#[test]
fn timestamps_are_iso_8601() {
    let text = iso_timestamp(Utc::now());
    assert!(DateTime::parse_from_rfc3339(&text).is_ok(), "{text}");
    assert!(text.ends_with("+00:00"), "{text}");
}
