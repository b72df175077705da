//! Every type that crosses a wire in Servitor, and nothing that does I/O
//! beyond reading and writing frames on a stream it is handed.
//!
//! - [`agent`]: the agent link messages (`proto/agent.proto`).
//! - [`admin`]: the operator gRPC service (`proto/admin.proto`).
//! - [`job`]: the GitLab job payload, as serde types that tolerate what GitLab
//!   leaves out.
//! - [`frame`]: length-delimited prost frames on async streams.
//! - [`imds`]: the instance metadata service's paths and headers.
//! - [`link`]: the constants both ends of the agent link agree on.

#![forbid(unsafe_code)]

pub mod frame;
pub mod imds;
pub mod job;
pub mod link;

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
