//! Hooks: the merchant's own commands or endpoints, told once per verified status change.
//!
//! Owns: the event a hook receives ([`event`]), running one hook command to an exact outcome
//! ([`runner`]), POSTing one event to a URL hook, signed per Standard Webhooks ([`post`], what
//! the endpoint answered in [`answer`]), hooks resolved from the settings ([`config`]), the
//! retry policy ([`retry`]), and the outbox's delivery loop ([`dispatcher`]), which calls
//! [`runner::run`] or [`post::deliver`] and decides what an [`runner::HookOutcome`] means for
//! the delivery.
//!
//! Must never: run a shell (a hook is an argv, spawned directly), pass the daemon's own
//! environment to a hook (it may hold secrets), run anything but a delivery the ledger queued
//! for a verified transition (or `paywatch hooks test`'s synthetic event), follow a redirect of
//! a URL hook, or log a checkout above debug level.

mod answer;
pub mod config;
pub mod dispatcher;
mod event;
pub mod post;
mod retry;
pub mod runner;

pub use config::{HookSet, HookSpec, HookTarget};
pub use dispatcher::{Dispatcher, DispatcherHandle, DispatcherWake};
pub use event::HookEvent;
pub use post::UrlHook;
pub use retry::{RetryPolicy, RetrySchedule};
pub use runner::{HookCommand, HookOutcome};
