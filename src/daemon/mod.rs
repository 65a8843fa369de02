//! The daemon: `paywatch run`, its startup order, signals, drain and service-manager protocol.

pub mod notify;
