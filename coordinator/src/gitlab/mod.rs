//! The coordinator's GitLab side: the runner API client ([`GitLabClient`]),
//! the per-job reporter that keeps a held job alive and streams its masked
//! log ([`JobReporter`]), the streaming secret masker ([`Masker`]), the
//! failure-reason mapping and the runner manager's `system_id`.
//!
//! It speaks the GitLab runner HTTP API as gitlab-runner does (paths,
//! headers, status codes, retry rules) and classifies every answer into
//! [`GitLabError`] so callers can decide whether to retry. It is not
//! responsible for choosing which jobs to take, running them, or holding
//! leases: the coordinator core does that and drives this module.

mod client;
mod failure;
pub mod mask;
mod reporter;
mod system_id;
mod window;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

#[cfg(fuzzing)]
pub use client::fuzzing;
pub use client::{
    runner_features, GitLabClient, GitLabSettings, JobState, JobUpdate, PatchOutcome,
    PatchResponse, ReceivedJob, RemoteJobStatus, RequestedJob, TraceOutput, UnusableJob, UpdateAck,
    UpdateResponse, VerifiedRunner, DEFAULT_OUTPUT_LIMIT, DEFAULT_POLL_INTERVAL,
    DEFAULT_REQUEST_TIMEOUT, JOB_REQUEST_TIMEOUT, MAX_JOB_PAYLOAD_BYTES, RUNNER_NAME, USER_AGENT,
};
pub use failure::{failure_reason, map_reason, ALWAYS_ACCEPTED_REASONS};
pub use mask::Masker;
pub use reporter::{
    AbortReason, FinalReport, FinalState, JobReporter, JobReporterHandle, RemoteEvent, Resume,
    KEEPALIVE_MAX, MAX_PATCH_BYTES, TRACE_BURST, TRACE_COALESCE, WINDOW_BYTES,
};
pub use system_id::{
    is_valid_system_id, load_or_create_runner_system_id, load_or_create_system_id, SYSTEM_ID_FILE,
};

/// Everything that can go wrong talking to GitLab.
#[derive(Debug, thiserror::Error)]
pub enum GitLabError {
    #[error("gitlab url {url:?} is not usable ({reason}); set gitlab.url to the http(s) address of the GitLab instance, e.g. https://gitlab.example.com")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot build the http client for gitlab: {0}")]
    Client(#[source] reqwest::Error),
    #[error("gitlab refused the runner token (403): the token is invalid or the runner was deleted; create a runner in GitLab and put its glrt- token in the token file")]
    Forbidden,
    #[error("gitlab says the runner is orphaned (422): its owning project or group is gone; create a new runner and use its token")]
    Orphaned,
    #[error(
        "gitlab answered 409 conflict (another runner raced for the job or its queue is busy)"
    )]
    Conflict,
    #[error("gitlab is rate limiting this runner (429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("gitlab answered {status}")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach gitlab: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("gitlab no longer lets this runner work on job {job_id} (403{}); it was canceled, finished, erased or its token expired", status_suffix(.job_status.as_ref()))]
    JobForbidden {
        job_id: i64,
        job_status: Option<RemoteJobStatus>,
    },
    #[error("gitlab does not know job {job_id} (404)")]
    JobNotFound { job_id: i64 },
    #[error("gitlab answered {status} to {what}: {message}")]
    Unexpected {
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error("gitlab's answer to {what} is larger than the {limit} bytes read of it; a proxy in front of GitLab or GitLab itself is broken")]
    AnswerTooLarge { what: &'static str, limit: usize },
    #[error("gitlab sent an unusable answer to {what}: {reason}")]
    BadResponse { what: &'static str, reason: String },
    #[error("job {job_id} was aborted by gitlab ({reason}); no final update is sent")]
    JobAborted { job_id: i64, reason: AbortReason },
    #[error("gitlab did not accept the final update of job {job_id} within {waited:?}")]
    FinalUpdateNotAccepted { job_id: i64, waited: Duration },
    #[error("the reporter of job {job_id} has already finished")]
    ReporterClosed { job_id: i64 },
    #[error("stopped because the coordinator is shutting down")]
    Cancelled,
    #[error("system id file {path} cannot be used ({source}); make the state directory writable by the service user")]
    SystemIdIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("system id file {path} does not hold a system id like s_0123456789ab; delete it and a new one is created")]
    SystemIdInvalid { path: PathBuf },
}

fn status_suffix(status: Option<&RemoteJobStatus>) -> String {
    status.map_or_else(String::new, |s| format!(", job status {}", s.as_str()))
}

impl GitLabError {
    /// Whether the same call is worth making again later (after a backoff).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Conflict
                | Self::RateLimited { .. }
                | Self::Server { .. }
                | Self::Transport(_)
                | Self::AnswerTooLarge { .. }
        )
    }

    /// The delay GitLab asked for (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } | Self::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status behind this error, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Forbidden | Self::JobForbidden { .. } => Some(403),
            Self::Orphaned => Some(422),
            Self::Conflict => Some(409),
            Self::RateLimited { .. } => Some(429),
            Self::JobNotFound { .. } => Some(404),
            Self::Server { status, .. } | Self::Unexpected { status, .. } => Some(*status),
            _ => None,
        }
    }
}
