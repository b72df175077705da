//! Every type that crosses a wire in Servitor, and nothing that does I/O
//! beyond reading and writing frames on a stream it is handed.
//!
//! - [`agent`]: the agent link messages (`proto/agent.proto`).
//! - [`admin`]: the operator gRPC service (`proto/admin.proto`).
//! - [`job`]: the GitLab job payload, as serde types that tolerate what GitLab
//!   leaves out.
//! - [`frame`]: length-delimited prost frames on async streams.

#![forbid(unsafe_code)]

pub mod frame;
pub mod job;

/// Agent link messages, generated from `proto/agent.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/servitor.agent.v1.rs"));
}

/// The operator API, generated from `proto/admin.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/servitor.admin.v1.rs"));
}

/// Version of the agent link protocol, sent in `Hello` and `EnrollRequest`.
/// Bump it when a change is not wire-compatible with the previous release.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol id of the agent link, so a stray TLS client is refused early.
pub const ALPN: &[u8] = b"servitor/1";

impl agent::AttemptRef {
    /// Builds an attempt reference.
    pub fn new(job_id: i64, attempt: u32) -> Self {
        Self { job_id, attempt }
    }
}

impl std::fmt::Display for agent::AttemptRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} attempt {}", self.job_id, self.attempt)
    }
}
