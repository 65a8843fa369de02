//! The Listen state machine, fed scripted server messages.

use super::*;
use crate::domain::FirestoreLocation;
use gcloud_sdk::google::firestore::v1::{
    Document, DocumentChange, DocumentDelete, ExistenceFilter,
};

const DB: &str = "projects/p/databases/(default)";

fn id(n: &str) -> CheckoutId {
    n.parse().expect("valid checkout id")
}

fn doc(n: &str) -> String {
    format!("{DB}/documents/checkouts/{n}")
}

fn watch(n: &str, token: Option<&[u8]>) -> WatchTarget {
    WatchTarget {
        checkout_id: id(n),
        location: FirestoreLocation::new("p", "checkouts", n).expect("valid location"),
        resume_token: token.map(<[u8]>::to_vec),
        resume_read_time: None,
    }
}

/// A `TargetChange` response; `read` is the read time in seconds. Shared with `fake.rs`.
pub(in crate::sources::firestore) fn tc(
    kind: TargetChangeType,
    ids: &[i32],
    token: &[u8],
    read: Option<i64>,
) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::TargetChange(TargetChange {
            target_change_type: kind as i32,
            target_ids: ids.to_vec(),
            cause: None,
            resume_token: token.to_vec(),
            read_time: read.map(|s| prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            }),
        })),
    }
}

fn change(n: &str, ids: &[i32], updated: i64) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::DocumentChange(
            DocumentChange {
                document: Some(Document {
                    name: doc(n),
                    fields: Default::default(),
                    create_time: None,
                    update_time: Some(prost_types::Timestamp {
                        seconds: updated,
                        nanos: 0,
                    }),
                }),
                target_ids: ids.to_vec(),
                removed_target_ids: vec![],
            },
        )),
    }
}

fn delete(n: &str, ids: &[i32]) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::DocumentDelete(
            DocumentDelete {
                document: doc(n),
                removed_target_ids: ids.to_vec(),
                read_time: None,
            },
        )),
    }
}

fn filter(target: i32, count: i32) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::Filter(ExistenceFilter {
            target_id: target,
            count,
            unchanged_names: None,
        })),
    }
}

fn remove_with(ids: &[i32], code: Code, message: &str) -> ListenResponse {
    ListenResponse {
        response_type: Some(listen_response::ResponseType::TargetChange(TargetChange {
            target_change_type: TargetChangeType::Remove as i32,
            target_ids: ids.to_vec(),
            cause: Some(gcloud_sdk::google::rpc::Status {
                code: code as i32,
                message: message.into(),
                details: vec![],
            }),
            resume_token: vec![],
            read_time: None,
        })),
    }
}

/// A compact view of the emitted actions, for assertions.
#[derive(Debug, PartialEq)]
enum Seen {
    Changed(String, Option<i64>),
    Checkpoint(Vec<(String, Vec<u8>)>),
    Forget(String),
    Refused(String, &'static str, u32, u64),
    Recovered(String),
    Add(i32, Option<Vec<u8>>),
    Remove(i32),
}

fn seen(actions: &[Action]) -> Vec<Seen> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(ListenEvent::Changed(n)) => Some(Seen::Changed(
                n.checkout_id.to_string(),
                n.changed_at.map(|t| t.timestamp()),
            )),
            Action::Emit(ListenEvent::Checkpoint { tokens, .. }) => Some(Seen::Checkpoint(
                tokens
                    .iter()
                    .map(|(c, t)| (c.to_string(), t.clone()))
                    .collect(),
            )),
            Action::Emit(ListenEvent::ForgetToken(c)) => Some(Seen::Forget(c.to_string())),
            Action::Emit(ListenEvent::TargetRefused {
                checkout_id,
                code,
                refusals,
                retry_in,
                ..
            }) => Some(Seen::Refused(
                checkout_id.to_string(),
                code,
                *refusals,
                retry_in.as_secs(),
            )),
            Action::Emit(ListenEvent::TargetRecovered { checkout_id }) => {
                Some(Seen::Recovered(checkout_id.to_string()))
            }
            Action::Send(request) => match &request.target_change {
                Some(listen_request::TargetChange::AddTarget(t)) => Some(Seen::Add(
                    t.target_id,
                    match &t.resume_type {
                        Some(target::ResumeType::ResumeToken(tok)) => Some(tok.clone()),
                        _ => None,
                    },
                )),
                Some(listen_request::TargetChange::RemoveTarget(id)) => Some(Seen::Remove(*id)),
                None => None,
            },
            _ => None,
        })
        .collect()
}

/// A per-document stream's one target takes room for one entry, not Vec's first four;
/// a multiplexed stream's grow as usual.
#[test]
fn a_single_target_takes_room_for_one() {
    let mut state = Harness::new().state;
    state.add(watch("1", None));
    assert_eq!(state.targets.0.capacity(), 1);
    state.add(watch("2", None));
    state.add(watch("3", None));
    assert_eq!(state.targets.0.len(), 3);
}

struct Harness {
    state: StreamState,
    now: Instant,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            state: StreamState::new(
                DB.into(),
                Duration::from_secs(300),
                (Duration::from_secs(60), Duration::from_secs(200)),
            ),
            now: Instant::now(),
        }
    }

    fn feed(&mut self, responses: Vec<ListenResponse>) -> Vec<Seen> {
        let mut out = Vec::new();
        for response in responses {
            self.state
                .on_response(response, self.now, &mut out)
                .expect("no fault");
        }
        seen(&out)
    }

    fn connect(&mut self) -> Vec<Seen> {
        let requests = self.state.connect();
        seen(
            &requests
                .into_iter()
                .map(|r| Action::Send(Box::new(r)))
                .collect::<Vec<_>>(),
        )
    }
}

use TargetChangeType::{Add, Current, NoChange, Reset};

#[test]
fn fresh_existing_document_is_changed_then_checkpointed() {
    let mut h = Harness::new();
    assert_eq!(h.state.add(watch("a", None)), None, "not connected yet");
    assert_eq!(h.connect(), vec![Seen::Add(1, None)]);
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        change("a", &[1], 100),
        tc(Current, &[1], b"t1", Some(100)),
    ]);
    assert_eq!(seen, vec![Seen::Changed("a".into(), Some(100))]);
    let seen = h.feed(vec![tc(NoChange, &[], b"t2", Some(101))]);
    assert_eq!(
        seen,
        vec![Seen::Checkpoint(vec![("a".into(), b"t2".to_vec())])]
    );
}

#[test]
fn fresh_missing_document_is_verified_at_current() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(Current, &[1], b"t1", Some(100)),
        tc(NoChange, &[], b"t1", Some(100)),
    ]);
    assert_eq!(
        seen,
        vec![
            Seen::Changed("a".into(), None),
            Seen::Checkpoint(vec![("a".into(), b"t1".to_vec())])
        ]
    );
}

#[test]
fn resumed_unchanged_document_is_not_verified() {
    let mut h = Harness::new();
    h.state.add(watch("a", Some(b"old")));
    assert_eq!(h.connect(), vec![Seen::Add(1, Some(b"old".to_vec()))]);
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(Current, &[1], b"t5", Some(200)),
        tc(NoChange, &[], b"t6", Some(200)),
    ]);
    assert_eq!(
        seen,
        vec![Seen::Checkpoint(vec![("a".into(), b"t6".to_vec())])]
    );
}

#[test]
fn resumed_changed_document_is_verified() {
    let mut h = Harness::new();
    h.state.add(watch("a", Some(b"old")));
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        change("a", &[1], 150),
        tc(Current, &[1], b"t5", Some(200)),
    ]);
    assert_eq!(seen, vec![Seen::Changed("a".into(), Some(150))]);
}

/// Issue 21: a token too old to resume from gets the whole state again; a document not
/// updated after the read time of the token's snapshot was reported already and costs no
/// Get Checkout, one updated after it does. The same holds after a reconnect in-process
/// (the snapshot's read time is remembered).
#[test]
fn a_full_resend_reports_only_documents_updated_since_the_last_snapshot() {
    let mut h = Harness::new();
    let mut old = watch("a", Some(b"old"));
    old.resume_read_time = chrono::DateTime::from_timestamp(200, 0);
    h.state.add(old);
    let mut fresh = watch("b", Some(b"old"));
    fresh.resume_read_time = chrono::DateTime::from_timestamp(200, 0);
    h.state.add(fresh);
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1, 2], b"", None),
        change("a", &[1], 150),
        change("b", &[2], 250),
        tc(Current, &[1, 2], b"t5", Some(300)),
        tc(NoChange, &[], b"t6", Some(300)),
    ]);
    assert_eq!(
        seen[0],
        Seen::Changed("b".into(), Some(250)),
        "only b changed: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Disconnected long enough for the token to expire: everything again, nothing new.
    h.state.disconnect();
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1, 2], b"", None),
        change("a", &[1], 150),
        change("b", &[2], 250),
        tc(Current, &[1, 2], b"t7", Some(400)),
    ]);
    assert_eq!(seen, vec![], "nothing changed since the snapshot at 300");
}

#[test]
fn token_before_current_is_never_checkpointed() {
    // Note 1.5 item 5 / 1.6 caveat: a global marker between ADD and CURRENT of a fresh target.
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(NoChange, &[], b"early", Some(50)),
    ]);
    assert_eq!(seen, vec![], "no checkpoint before CURRENT");
    // A reconnect now must not resume from the early token.
    h.state.disconnect();
    assert_eq!(h.connect(), vec![Seen::Add(1, None)]);
}

#[test]
fn heartbeat_checkpoints_are_rate_limited_but_changes_are_not() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(Current, &[1], b"t1", Some(100)),
        tc(NoChange, &[], b"t1", Some(100)),
    ]);
    // A heartbeat 30 s later: token adopted in memory, not offered.
    h.now += Duration::from_secs(30);
    assert_eq!(h.feed(vec![tc(NoChange, &[], b"t2", Some(130))]), vec![]);
    // A change: offered at the next snapshot whatever the interval.
    let seen = h.feed(vec![
        change("a", &[1], 140),
        tc(NoChange, &[], b"t3", Some(140)),
    ]);
    assert_eq!(
        seen,
        vec![
            Seen::Changed("a".into(), Some(140)),
            Seen::Checkpoint(vec![("a".into(), b"t3".to_vec())])
        ]
    );
    // Five minutes of heartbeats later the token is offered again.
    h.now += Duration::from_secs(301);
    assert_eq!(
        h.feed(vec![tc(NoChange, &[], b"t9", Some(500))]),
        vec![Seen::Checkpoint(vec![("a".into(), b"t9".to_vec())])]
    );
    // And the in-memory token follows heartbeats for reconnects.
    h.state.disconnect();
    assert_eq!(h.connect(), vec![Seen::Add(1, Some(b"t9".to_vec()))]);
}

#[test]
fn delete_is_a_change() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    h.feed(vec![
        tc(Add, &[1], b"", None),
        change("a", &[1], 100),
        tc(Current, &[1], b"t1", Some(100)),
        tc(NoChange, &[], b"t1", Some(100)),
    ]);
    let seen = h.feed(vec![delete("a", &[1]), tc(NoChange, &[], b"t2", Some(110))]);
    assert_eq!(
        seen,
        vec![
            Seen::Changed("a".into(), None),
            Seen::Checkpoint(vec![("a".into(), b"t2".to_vec())])
        ]
    );
}

#[test]
fn delete_of_missing_document_in_initial_state_is_one_change() {
    // skunkteam's emulator sends DocumentDelete for a missing document (note 1.5 item 2).
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        delete("a", &[1]),
        tc(Current, &[1], b"t1", Some(100)),
        tc(NoChange, &[], b"t1", Some(100)),
    ]);
    assert_eq!(
        seen,
        vec![
            Seen::Changed("a".into(), None),
            Seen::Checkpoint(vec![("a".into(), b"t1".to_vec())])
        ]
    );
}

#[test]
fn reset_forgets_token_and_verifies_once() {
    let mut h = Harness::new();
    h.state.add(watch("a", Some(b"old")));
    h.connect();
    h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(Current, &[1], b"", None),
        tc(NoChange, &[], b"t1", Some(100)),
    ]);
    // The npm emulator's way to report a change: RESET, full state, CURRENT, marker.
    let seen = h.feed(vec![
        tc(Reset, &[1], b"", Some(110)),
        change("a", &[1], 110),
        tc(Current, &[1], b"", Some(110)),
        tc(NoChange, &[], b"t2", Some(110)),
    ]);
    assert_eq!(
        seen,
        vec![
            Seen::Forget("a".into()),
            Seen::Changed("a".into(), Some(110)),
            Seen::Checkpoint(vec![("a".into(), b"t2".to_vec())])
        ]
    );
    // RESET then no document (deleted): verified at CURRENT.
    let seen = h.feed(vec![
        tc(Reset, &[1], b"", Some(120)),
        tc(Current, &[1], b"", Some(120)),
        tc(NoChange, &[], b"", Some(120)),
    ]);
    assert_eq!(
        seen,
        vec![Seen::Forget("a".into()), Seen::Changed("a".into(), None)]
    );
}

#[test]
fn emulator_without_tokens_still_verifies_and_never_checkpoints() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        change("a", &[1], 100),
        tc(Current, &[1], b"", Some(100)),
        tc(NoChange, &[], b"", Some(100)),
    ]);
    assert_eq!(seen, vec![Seen::Changed("a".into(), Some(100))]);
}

#[test]
fn existence_filter_mismatch_forgets_and_verifies() {
    let mut h = Harness::new();
    h.state.add(watch("a", Some(b"old")));
    h.state.add(watch("b", Some(b"old")));
    h.connect();
    // count 1 with an unknown local state: consistent, nothing to do.
    // count 0 with an unknown local state: may hide a delete made while we were away.
    let seen = h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(Add, &[2], b"", None),
        filter(1, 1),
        filter(2, 0),
        tc(Current, &[1, 2], b"t", Some(100)),
        tc(NoChange, &[], b"t", Some(100)),
    ]);
    assert_eq!(
        seen,
        vec![
            Seen::Forget("b".into()),
            Seen::Changed("b".into(), None),
            Seen::Checkpoint(vec![
                ("a".into(), b"t".to_vec()),
                ("b".into(), b"t".to_vec())
            ])
        ]
    );
    // Known state: a count that agrees is nothing, one that disagrees is a change.
    let seen = h.feed(vec![filter(2, 0), filter(1, 0)]);
    assert_eq!(
        seen,
        vec![Seen::Forget("a".into()), Seen::Changed("a".into(), None)]
    );
}

#[test]
fn multiplexed_add_and_remove_on_a_live_stream() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    h.feed(vec![
        tc(Add, &[1], b"", None),
        tc(Current, &[1], b"t1", Some(100)),
    ]);
    let add = h.state.add(watch("b", None));
    assert_eq!(
        seen(&[Action::Send(Box::new(add.expect("connected: AddTarget")))]),
        vec![Seen::Add(2, None)]
    );
    // The global marker right after b's ADD must not checkpoint b (not CURRENT yet).
    let got = h.feed(vec![
        tc(Add, &[2], b"", None),
        tc(NoChange, &[], b"t2", Some(101)),
    ]);
    assert_eq!(
        got,
        vec![Seen::Checkpoint(vec![("a".into(), b"t2".to_vec())])]
    );
    let remove = h.state.remove(&id("a"));
    assert_eq!(
        seen(&[Action::Send(Box::new(
            remove.expect("connected: RemoveTarget")
        ))]),
        vec![Seen::Remove(1)]
    );
    assert_eq!(h.state.len(), 1);
    // In-flight events for the removed target are ignored; its id stays taken until REMOVE.
    let got = h.feed(vec![change("a", &[1], 102)]);
    assert_eq!(got, vec![]);
    let add = h.state.add(watch("c", None));
    assert_eq!(
        seen(&[Action::Send(Box::new(add.expect("connected")))]),
        vec![Seen::Add(3, None)],
        "id 1 is not reused before its REMOVE"
    );
    h.feed(vec![tc(TargetChangeType::Remove, &[1], b"", None)]);
    assert!(!h.state.targets.contains_key(&1));
}

#[test]
fn unacknowledged_live_add_is_taken_off_the_stream_with_its_token() {
    let mut h = Harness::new();
    let timeout = Duration::from_secs(2);
    h.state.add(watch("a", None));
    h.connect();
    h.state.note_sent(h.now);
    assert_eq!(
        h.state.next_ack_deadline(timeout),
        None,
        "no evidence before the server acknowledged anything"
    );
    let (moved, _) = h.state.take_unacknowledged(h.now + timeout * 10, timeout);
    assert!(
        moved.is_empty(),
        "a silent server is the idle watchdog's business"
    );
    h.feed(vec![tc(Add, &[1], b"", None), tc(Current, &[1], b"", None)]);
    assert_eq!(h.state.next_ack_deadline(timeout), None, "all acknowledged");

    let add = h.state.add(watch("b", Some(b"tb"))).expect("connected");
    assert_eq!(
        seen(&[Action::Send(Box::new(add))]),
        vec![Seen::Add(2, Some(b"tb".to_vec()))]
    );
    let sent = h.now + Duration::from_secs(1);
    h.state.note_sent(sent);
    assert_eq!(h.state.next_ack_deadline(timeout), Some(sent + timeout));
    let (moved, removals) = h.state.take_unacknowledged(sent + timeout / 2, timeout);
    assert!(moved.is_empty() && removals.is_empty(), "not overdue yet");

    let (moved, removals) = h.state.take_unacknowledged(sent + timeout, timeout);
    assert_eq!(
        moved,
        vec![watch("b", Some(b"tb"))],
        "handed back with its token"
    );
    assert_eq!(
        seen(
            &removals
                .into_iter()
                .map(|r| Action::Send(Box::new(r)))
                .collect::<Vec<_>>()
        ),
        vec![Seen::Remove(2)]
    );
    assert_eq!(h.state.len(), 1);
    assert_eq!(h.state.next_ack_deadline(timeout), None);
    // A late ADD and events for it are ignored; its id is not reused before REMOVE.
    assert_eq!(
        h.feed(vec![tc(Add, &[2], b"", None), change("b", &[2], 5)]),
        vec![]
    );
    let add = h.state.add(watch("c", None)).expect("connected");
    assert_eq!(
        seen(&[Action::Send(Box::new(add))]),
        vec![Seen::Add(3, None)]
    );
    // The next session forgets the reserved id: only a and c are re-added.
    h.state.disconnect();
    assert_eq!(h.connect(), vec![Seen::Add(1, None), Seen::Add(3, None)]);
}

#[test]
fn acknowledged_live_add_is_reported_once_per_session_and_never_moved() {
    let mut h = Harness::new();
    let timeout = Duration::from_secs(2);
    h.state.add(watch("a", None));
    h.state.add(watch("b", None));
    h.connect();
    h.state.note_sent(h.now);
    let mut out = Vec::new();
    for response in [
        tc(Add, &[1], b"", None),
        tc(Add, &[2], b"", None),
        tc(Current, &[1, 2], b"", None),
    ] {
        h.state
            .on_response(response, h.now, &mut out)
            .expect("no fault");
    }
    let reported = out
        .iter()
        .filter(|a| **a == Action::LiveAddAcknowledged)
        .count();
    assert_eq!(reported, 1, "b was the session's second request: {out:?}");
    h.state.add(watch("c", None));
    h.state.note_sent(h.now);
    let mut out = Vec::new();
    h.state
        .on_response(tc(Add, &[3], b"", None), h.now, &mut out)
        .expect("no fault");
    assert!(
        !out.contains(&Action::LiveAddAcknowledged),
        "once per session"
    );
    let (moved, _) = h.state.take_unacknowledged(h.now + timeout * 10, timeout);
    assert!(moved.is_empty());
    assert_eq!(h.state.next_ack_deadline(timeout), None);
}

#[test]
fn removal_cause_decides_per_code() {
    let mut h = Harness::new();
    h.state.add(watch("a", Some(b"stale")));
    h.state.add(watch("b", None));
    h.state.add(watch("c", None));
    h.connect();
    let mut out = Vec::new();
    let now = h.now;
    h.state
        .on_response(tc(Add, &[1, 2, 3], b"", None), now, &mut out)
        .expect("ok");
    // INVALID_ARGUMENT on a resumed target: forget the token and re-add it without one.
    h.state
        .on_response(
            remove_with(&[1], Code::InvalidArgument, "bad token"),
            now,
            &mut out,
        )
        .expect("handled");
    // NOT_FOUND and PERMISSION_DENIED: that target is refused, the stream goes on.
    h.state
        .on_response(remove_with(&[2], Code::NotFound, "gone"), now, &mut out)
        .expect("handled");
    h.state
        .on_response(
            remove_with(&[3], Code::PermissionDenied, "rules say no"),
            now,
            &mut out,
        )
        .expect("a per-target refusal never fails the stream");
    assert_eq!(
        seen(&out),
        vec![
            Seen::Forget("a".into()),
            Seen::Add(4, None),
            Seen::Refused("b".into(), "NOT_FOUND", 1, 60),
            Seen::Refused("c".into(), "PERMISSION_DENIED", 1, 60),
        ]
    );
    assert_eq!(
        h.state.len(),
        3,
        "refused checkouts still belong to the stream"
    );
    assert_eq!(h.state.refused(), 2);
    // UNAVAILABLE as a cause: reopen the stream.
    let fault = h
        .state
        .on_response(remove_with(&[4], Code::Unavailable, "busy"), now, &mut out)
        .expect_err("transient fault");
    assert!(matches!(fault, Fault::Transient(_)), "{fault:?}");
}

#[test]
fn a_refused_target_is_retried_with_a_growing_delay_and_recovers() {
    let mut h = Harness::new();
    h.state.add(watch("ok", None));
    h.state.add(watch("denied", Some(b"t0")));
    h.connect();
    let t0 = h.now;
    h.feed(vec![tc(Add, &[1, 2], b"", None)]);
    let mut out = Vec::new();
    h.state
        .on_response(
            remove_with(&[2], Code::PermissionDenied, "no"),
            t0,
            &mut out,
        )
        .expect("per target");
    assert_eq!(
        seen(&out),
        vec![Seen::Refused("denied".into(), "PERMISSION_DENIED", 1, 60)]
    );
    // The other target carries on: its document and snapshot are reported as usual.
    let later = h.feed(vec![
        change("ok", &[1], 100),
        tc(Current, &[1], b"", None),
        tc(NoChange, &[], b"g1", Some(100)),
    ]);
    assert_eq!(
        later,
        vec![
            Seen::Changed("ok".into(), Some(100)),
            Seen::Checkpoint(vec![("ok".into(), b"g1".to_vec())])
        ]
    );
    // Not due yet: nothing to send. Then due: re-added with a fresh id and its own token.
    assert_eq!(
        h.state.next_refused_retry(),
        Some(t0 + Duration::from_secs(60))
    );
    assert!(
        h.state
            .retry_refused(t0 + Duration::from_secs(59))
            .is_empty()
    );
    let t1 = t0 + Duration::from_secs(60);
    let retried: Vec<Action> = h
        .state
        .retry_refused(t1)
        .into_iter()
        .map(|r| Action::Send(Box::new(r)))
        .collect();
    assert_eq!(seen(&retried), vec![Seen::Add(3, Some(b"t0".to_vec()))]);
    assert_eq!(h.state.refused(), 0);
    // Refused again: the delay doubles (capped at the maximum).
    let mut out = Vec::new();
    h.state
        .on_response(
            remove_with(&[3], Code::PermissionDenied, "no"),
            t1,
            &mut out,
        )
        .expect("per target");
    assert_eq!(
        seen(&out),
        vec![Seen::Refused("denied".into(), "PERMISSION_DENIED", 2, 120)]
    );
    let t2 = t1 + Duration::from_secs(120);
    let retried = h.state.retry_refused(t2);
    assert_eq!(retried.len(), 1);
    let mut out = Vec::new();
    h.state
        .on_response(
            remove_with(&[4], Code::PermissionDenied, "no"),
            t2,
            &mut out,
        )
        .expect("per target");
    assert_eq!(
        seen(&out),
        vec![Seen::Refused("denied".into(), "PERMISSION_DENIED", 3, 200)]
    );
    // While disconnected the retry waits for the stream; a reconnect leaves it parked.
    h.state.disconnect();
    assert_eq!(h.connect(), vec![Seen::Add(1, Some(b"g1".to_vec()))]);
    let t3 = t2 + Duration::from_secs(200);
    assert_eq!(h.state.retry_refused(t3).len(), 1);
    // Accepted at last: recovered, once.
    let recovered = h.feed(vec![tc(Add, &[5], b"", None), tc(Current, &[5], b"", None)]);
    assert_eq!(recovered, vec![Seen::Recovered("denied".into())]);
    let again = h.feed(vec![tc(Current, &[5], b"", None)]);
    assert_eq!(again, vec![]);
}

#[test]
fn a_refused_target_can_be_unwatched_and_watched_again() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    let mut out = Vec::new();
    h.state
        .on_response(remove_with(&[1], Code::NotFound, "x"), h.now, &mut out)
        .expect("per target");
    assert_eq!(h.state.len(), 1);
    assert!(
        h.state.add(watch("a", None)).is_none(),
        "already watched (refused)"
    );
    assert!(
        h.state.remove(&id("a")).is_none(),
        "nothing to send for a parked target"
    );
    assert_eq!(h.state.len(), 0);
    assert_eq!(h.state.next_refused_retry(), None);
    assert!(h.state.add(watch("a", None)).is_some(), "watched afresh");
}

#[test]
fn reconnect_resumes_each_target_with_its_own_token() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.state.add(watch("b", Some(b"b0")));
    h.connect();
    h.feed(vec![
        tc(Add, &[1, 2], b"", None),
        change("a", &[1], 100),
        tc(Current, &[1], b"", None),
        tc(NoChange, &[], b"g1", Some(100)),
    ]);
    h.state.disconnect();
    assert_eq!(
        h.connect(),
        vec![
            Seen::Add(1, Some(b"g1".to_vec())),
            Seen::Add(2, Some(b"b0".to_vec()))
        ],
        "b was never CURRENT: it keeps the token it came with"
    );
}

#[test]
fn forget_all_tokens_for_invalid_argument_retry() {
    let mut h = Harness::new();
    h.state.add(watch("a", Some(b"x")));
    h.state.add(watch("b", None));
    h.connect();
    assert!(h.state.resumed());
    h.state.disconnect();
    let mut out = Vec::new();
    h.state.forget_all_tokens(&mut out);
    assert_eq!(seen(&out), vec![Seen::Forget("a".into())]);
    assert!(h.state.retried_without_tokens());
    assert_eq!(h.connect(), vec![Seen::Add(1, None), Seen::Add(2, None)]);
    assert!(!h.state.resumed());
}

#[test]
fn unknown_and_odd_messages_are_tolerated() {
    let mut h = Harness::new();
    h.state.add(watch("a", None));
    h.connect();
    let seen = h.feed(vec![
        ListenResponse {
            response_type: None,
        },
        tc(Add, &[99], b"", None),
        change("zzz", &[42], 1),
        filter(42, 3),
        ListenResponse {
            response_type: Some(listen_response::ResponseType::TargetChange(TargetChange {
                target_change_type: 17,
                ..Default::default()
            })),
        },
        // CURRENT with no ids and no token (applies to every target), before any ADD.
        tc(Current, &[], b"", None),
    ]);
    assert_eq!(
        seen,
        vec![],
        "nothing acked yet, so an empty CURRENT applies to none"
    );
    let seen = h.feed(vec![tc(Add, &[1], b"", None), tc(Current, &[], b"", None)]);
    assert_eq!(seen, vec![Seen::Changed("a".into(), None)]);
}

#[test]
fn targets_stay_in_id_order_whatever_the_order_of_changes() {
    let entry = |n: &str| TargetEntry {
        checkout_id: id(n),
        document: CollectionPaths::default()
            .document(&FirestoreLocation::new("p", "checkouts", n).expect("valid location")),
        resume_token: None,
        exists: None,
        seen_through: None,
        last_checkpoint: None,
        session: None,
        removing: false,
        refusals: 0,
    };
    let mut targets = Targets::default();
    for key in [5, 1, 9, 3, 7] {
        assert!(targets.insert(key, entry(&format!("c{key}"))).is_none());
    }
    assert_eq!(targets.keys().copied().collect::<Vec<_>>(), [1, 3, 5, 7, 9]);
    let replaced = targets.insert(3, entry("other"));
    assert_eq!(replaced.map(|e| e.checkout_id), Some(id("c3")));
    assert_eq!(
        targets.get(&3).map(|e| e.checkout_id.clone()),
        Some(id("other"))
    );
    assert!(targets.get(&4).is_none() && !targets.contains_key(&4));
    assert_eq!(targets.remove(&5).map(|e| e.checkout_id), Some(id("c5")));
    assert!(targets.remove(&5).is_none());
    if let Some(entry) = targets.get_mut(&9) {
        entry.removing = true;
    }
    targets.retain(|_, t| !t.removing);
    assert_eq!(
        targets
            .iter()
            .map(|(k, e)| (*k, e.checkout_id.clone()))
            .collect::<Vec<_>>(),
        [(1, id("c1")), (3, id("other")), (7, id("c7"))]
    );
    // A stream that lost most of its targets gives the room back.
    for key in 10..1000 {
        targets.insert(key, entry("bulk"));
    }
    let full = targets.0.capacity();
    targets.retain(|key, _| *key < 20);
    assert!(
        targets.0.capacity() < full / 4,
        "{} of {full}",
        targets.0.capacity()
    );
    assert_eq!(targets.values().count(), 13);
}

#[test]
fn a_global_snapshot_token_is_shared_by_the_targets_it_applies_to() {
    let mut h = Harness::new();
    for n in ["a", "b", "c"] {
        h.state.add(watch(n, None));
    }
    h.connect();
    h.feed(vec![
        tc(Add, &[1, 2, 3], b"", None),
        tc(Current, &[], b"", None),
    ]);
    let seen = h.feed(vec![tc(NoChange, &[], b"shared", Some(100))]);
    assert!(matches!(&seen[..], [Seen::Checkpoint(tokens)] if tokens.len() == 3));
    let tokens: Vec<&Token> = h
        .state
        .targets
        .values()
        .filter_map(|t| t.resume_token.as_ref())
        .collect();
    assert_eq!(tokens.len(), 3, "every CURRENT target adopted the token");
    assert!(
        tokens
            .iter()
            .all(|t| Arc::ptr_eq(t, tokens[0]) && &***t == b"shared")
    );
}

#[test]
fn status_classification() {
    use Disposition::*;
    let fresh = StreamHistory::default();
    let healthy = StreamHistory {
        heard_from_server: true,
        ..StreamHistory::default()
    };
    let after = |auth_retries| StreamHistory {
        auth_retries,
        ..StreamHistory::default()
    };
    // Credentials refused on a stream that never worked: permanent.
    assert_eq!(classify(Code::Unauthenticated, "", &fresh), Permanent);
    assert_eq!(classify(Code::PermissionDenied, "", &fresh), Permanent);
    // On a healthy stream (a token expired?): retried, AUTH_RETRIES times in a row.
    assert_eq!(classify(Code::Unauthenticated, "", &healthy), AuthRetry);
    assert_eq!(classify(Code::PermissionDenied, "", &healthy), AuthRetry);
    assert_eq!(classify(Code::Unauthenticated, "", &after(1)), AuthRetry);
    assert_eq!(
        classify(Code::PermissionDenied, "", &after(AUTH_RETRIES - 1)),
        AuthRetry
    );
    assert_eq!(
        classify(Code::PermissionDenied, "", &after(AUTH_RETRIES)),
        Permanent
    );
    // NOT_FOUND by code and history, whatever the text says.
    let text = "The database (default) does not exist for project p";
    assert_eq!(classify(Code::NotFound, text, &fresh), Permanent);
    assert_eq!(classify(Code::NotFound, "target 3", &fresh), Permanent);
    assert_eq!(classify(Code::NotFound, text, &healthy), Transient);
    let removing = StreamHistory {
        removal_in_flight: true,
        ..StreamHistory::default()
    };
    assert_eq!(
        classify(Code::NotFound, "database project", &removing),
        Transient
    );
    let resumed = StreamHistory {
        resumed: true,
        heard_from_server: true,
        ..StreamHistory::default()
    };
    assert_eq!(
        classify(Code::InvalidArgument, "", &resumed),
        RetryWithoutTokens
    );
    let retried = StreamHistory {
        retried_without_tokens: true,
        ..resumed
    };
    assert_eq!(classify(Code::InvalidArgument, "", &retried), Permanent);
    assert_eq!(classify(Code::ResourceExhausted, "", &healthy), Exhausted);
    assert_eq!(classify(Code::Unavailable, "", &healthy), Transient);
    assert_eq!(classify(Code::Internal, "", &fresh), Transient);
    let message = permanent_message(DB, "https://x", Code::PermissionDenied, "denied");
    assert!(
        message.contains("'projects/p/databases/(default)'")
            && message.contains("PERMISSION_DENIED")
            && message.contains("roles/datastore.viewer"),
        "{message}"
    );
    assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
}
