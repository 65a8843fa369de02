//! paymennt's Merchant API: the wire format and the client.
//!
//! Owns: everything that speaks HTTP to paymennt.
//! Must never: touch the ledger, or log a credential.

pub mod client;
pub mod intake;
pub mod wire;

pub use client::{Client, CredentialStatus, Error, RetryPolicy, SearchQuery, VerifiedCheckout};
