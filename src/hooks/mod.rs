//! Hooks: the merchant's own commands, run once per verified status change.
//!
//! Owns: the event a hook receives ([`event`]) and running one hook command to an exact outcome
//! ([`runner`]). Retries, ordering and the outbox belong to the dispatcher, which calls
//! [`runner::run`] and decides what an [`runner::HookOutcome`] means for the delivery.
//!
//! Must never: run a shell (a hook is an argv, spawned directly), pass the daemon's own
//! environment to a hook (it may hold secrets), or log a checkout above debug level.

pub mod event;
pub mod runner;

pub use event::HookEvent;
pub use runner::{HookCommand, HookOutcome};
