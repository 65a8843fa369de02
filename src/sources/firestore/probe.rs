//! Proving access for `paywatch check-config --online`: one Listen on one checkout document,
//! with the configured endpoint and credentials, until the target is CURRENT or refused.
//!
//! Owns: that one-off Listen and the operator's next step for each refusal and auth mode.
//! Must never: write anything (no ledger, no tokens), or retry: a refusal is the answer.

use std::time::{Duration, Instant};

use gcloud_sdk::google::firestore::v1::{
    ListenRequest, Target, listen_request, listen_response, target, target_change::TargetChangeType,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::connect::Connector;
use super::connect::FirestoreAuth;
use super::state::code_name;
use crate::domain::{FirestoreLocation, printable};

/// Firestore let us watch the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessProof {
    /// From opening the connection to the target being CURRENT.
    pub elapsed: Duration,
    /// Whether the document exists (a document came before CURRENT).
    pub exists: bool,
}

/// Why access could not be proven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessFailure {
    /// Firestore refused: the stream's status, or the target's `REMOVE` cause.
    Refused {
        /// The gRPC code name, e.g. `PERMISSION_DENIED`.
        code: &'static str,
        /// Firestore's message (printable).
        message: String,
    },
    /// The endpoint, the credentials or the connection failed before Firestore could answer.
    Unreachable(String),
    /// No CURRENT within the time allowed (or the stream ended first).
    NoAnswer(String),
}

/// Opens a Listen on `location`'s document with `auth` and waits (at most `within`) for the
/// target to be CURRENT. Nothing is written anywhere.
///
/// # Errors
/// [`AccessFailure`]: refused (with the exact code and message), unreachable, or no answer.
pub async fn prove_access(
    endpoint: &str,
    auth: &FirestoreAuth,
    ca_file: Option<&std::path::Path>,
    location: &FirestoreLocation,
    within: Duration,
) -> Result<AccessProof, AccessFailure> {
    let started = Instant::now();
    let unreachable = |error: anyhow::Error| AccessFailure::Unreachable(format!("{error:#}"));
    let connector = Connector::new(endpoint, auth, ca_file).map_err(unreachable)?;
    let database = location.database_name();
    let attempt = async {
        let mut client = connector.client(&database).await.map_err(unreachable)?;
        let (requests, outgoing) = tokio::sync::mpsc::channel(1);
        let add = ListenRequest {
            database: database.clone(),
            labels: Default::default(),
            request_options: None,
            target_change: Some(listen_request::TargetChange::AddTarget(Target {
                target_id: 1,
                once: false,
                expected_count: None,
                target_type: Some(target::TargetType::Documents(target::DocumentsTarget {
                    documents: vec![location.document_name()],
                })),
                resume_type: None,
            })),
        };
        requests
            .send(add)
            .await
            .map_err(|_| AccessFailure::NoAnswer("the request could not be queued".into()))?;
        let refused = |status: tonic::Status| AccessFailure::Refused {
            code: code_name(status.code()),
            message: printable(status.message()),
        };
        let mut responses = client
            .listen(ReceiverStream::new(outgoing))
            .await
            .map_err(refused)?
            .into_inner();
        let mut exists = false;
        loop {
            let Some(response) = responses.message().await.map_err(refused)? else {
                return Err(AccessFailure::NoAnswer(
                    "the server ended the stream before the document was CURRENT".into(),
                ));
            };
            match response.response_type {
                Some(listen_response::ResponseType::DocumentChange(_)) => exists = true,
                Some(listen_response::ResponseType::TargetChange(change)) => {
                    match TargetChangeType::try_from(change.target_change_type) {
                        Ok(TargetChangeType::Current) => {
                            // Keep the request stream open until here: a half-close is not a
                            // question the server should have to answer.
                            drop(requests);
                            return Ok(exists);
                        }
                        Ok(TargetChangeType::Remove) => {
                            let cause = change.cause.unwrap_or_default();
                            return Err(AccessFailure::Refused {
                                code: code_name(Code::from_i32(cause.code)),
                                message: printable(&cause.message),
                            });
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(exists)) => Ok(AccessProof {
            elapsed: started.elapsed(),
            exists,
        }),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(AccessFailure::NoAnswer(format!(
            "no CURRENT for the document within {within:?}"
        ))),
    }
}

/// The operator's next step after Firestore answered `code` to a caller authenticated with
/// `auth_mode` (`[firestore] auth`: `service-account`, `application-default`, `none` or
/// `firebase-anonymous`), as one line: "`CODE` with auth=`mode`: what it means; what to try".
pub fn access_hint(auth_mode: &str, code: &str) -> String {
    let advice = match (code, auth_mode) {
        ("PERMISSION_DENIED", "service-account") => {
            "paymennt's project does not grant your service account; try auth = \"none\" or \
             \"firebase-anonymous\" (paymennt's payment page reads these documents as a Firebase \
             client, under the project's security rules)"
        }
        ("PERMISSION_DENIED", "application-default") => {
            "paymennt's project does not grant the account of your Application Default \
             Credentials; try auth = \"none\" or \"firebase-anonymous\""
        }
        ("PERMISSION_DENIED", "none") => {
            "the project's security rules refuse an unauthenticated reader this document; try \
             auth = \"firebase-anonymous\" (with api_key, for rules that require a signed-in \
             user), and check the checkout's document path"
        }
        ("PERMISSION_DENIED", "firebase-anonymous") => {
            "the project's security rules refuse this document even to a signed-in Firebase \
             user; check the checkout's document path (firebaseDatabase, firebaseCollection, \
             firebaseDocument) and ask paymennt which access their rules allow"
        }
        ("UNAUTHENTICATED", "service-account") => {
            "the service-account key was rejected; check that [firestore] credentials names a \
             key that still exists and is enabled, or try auth = \"none\""
        }
        ("UNAUTHENTICATED", "application-default") => {
            "the Application Default Credentials were rejected; renew them (gcloud auth \
             application-default login) or use auth = \"service-account\" with a key file"
        }
        ("UNAUTHENTICATED", "none") => {
            "the endpoint requires credentials; try auth = \"firebase-anonymous\" with api_key"
        }
        ("UNAUTHENTICATED", "firebase-anonymous") => {
            "the Firebase ID token was rejected; check that api_key is the Web API key of the \
             checkout's Firebase project and that anonymous sign-in is enabled there"
        }
        ("NOT_FOUND", _) => {
            "the database does not exist; check the checkout's firebaseDatabase and [firestore] \
             database (paymennt uses \"(default)\")"
        }
        ("UNAVAILABLE" | "DEADLINE_EXCEEDED", _) => {
            "Firestore could not be reached; check [firestore] endpoint and the network, then \
             run check-config --online again"
        }
        (_, "service-account" | "application-default" | "none" | "firebase-anonymous") => {
            "check [firestore] endpoint and the checkout's document path, then run \
             check-config --online again"
        }
        _ => {
            "unknown auth mode; use service-account, application-default, none or firebase-anonymous"
        }
    };
    format!("{code} with auth={auth_mode}: {advice}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_gets_its_own_next_step_for_a_refusal() {
        let modes = [
            "service-account",
            "application-default",
            "none",
            "firebase-anonymous",
        ];
        let mut seen = std::collections::HashSet::new();
        for mode in modes {
            for code in ["PERMISSION_DENIED", "UNAUTHENTICATED"] {
                let hint = access_hint(mode, code);
                assert!(
                    hint.starts_with(&format!("{code} with auth={mode}: ")),
                    "{hint}"
                );
                assert!(seen.insert(hint.clone()), "a distinct hint: {hint}");
            }
        }
        assert_eq!(
            access_hint("service-account", "PERMISSION_DENIED"),
            "PERMISSION_DENIED with auth=service-account: paymennt's project does not grant \
             your service account; try auth = \"none\" or \"firebase-anonymous\" (paymennt's \
             payment page reads these documents as a Firebase client, under the project's \
             security rules)"
        );
        assert!(access_hint("none", "PERMISSION_DENIED").contains("firebase-anonymous"));
        assert!(access_hint("none", "NOT_FOUND").contains("[firestore] database"));
        assert!(access_hint("bogus", "INTERNAL").contains("unknown auth mode"));
    }
}
