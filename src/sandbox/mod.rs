//! A local stand-in for paymennt's Merchant API and Firestore's Listen, sharing one state.
//!
//! Owns: the fake services used by `paywatch demo`, `paywatch sandbox`, the tests and benchmarks.
//! Must never: depend on the daemon's pipeline (sources, verifier, ledger, hooks).

pub mod external;
pub mod sink;
