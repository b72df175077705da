//! What both Servitor binaries share at run time: the one [`backoff`] type,
//! [`secret`]s read from files, [`telemetry`] setup, the [`signals`] that
//! mean "stop", the exit codes systemd acts on ([`exit`]), and the QUIC
//! transport settings of the agent link ([`link`]).
//!
//! Not responsible for anything either binary decides: no GitLab, lease,
//! fleet or job logic lives here, and nothing here knows which end of the
//! link it runs at. Constants both ends of the link must agree on live in
//! `servitor_proto::link`, which has no I/O.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod exit;
pub mod link;
pub mod secret;
pub mod signals;
pub mod telemetry;
