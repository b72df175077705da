//! Executors run one job attempt: fetch its sources, run its script steps
//! through a shell, stream output, and say how it ended.
//!
//! The seam is [`Executor`]; [`docker::DockerExecutor`] runs steps in a
//! container through bollard, [`shell::ShellExecutor`] runs them on the host
//! for machines without Docker; [`AnyExecutor`] holds either. Both run the
//! same stages in gitlab-runner's order and words: prepare the executor,
//! fetch sources on the host with git, the script steps, then
//! `after_script`, within the job timeout. Not responsible for the agent
//! link, for masking secrets (the coordinator masks before bytes reach
//! GitLab), for deciding when to cancel, or for removing the work directory.

use std::path::PathBuf;

use bytes::Bytes;
use servitor_proto::agent::FailureKind;
use servitor_proto::job::JobPayload;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod archive;
mod artifacts;
mod attempt;
pub mod auth;
pub mod cache;
pub mod docker;
pub mod metadata_probe;
pub mod output;
mod process;
pub mod script;
mod services;
pub mod shell;
pub mod sources;
#[cfg(test)]
pub(crate) mod testing;

pub use docker::{DockerConfig, DockerError, DockerExecutor, PullPolicy};
pub use shell::ShellExecutor;

/// Everything an executor needs to run one attempt.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub job: JobPayload,
    /// The GitLab the job came from (`https://gitlab.example.com`): artifacts
    /// are uploaded there and dependencies downloaded from it with the job
    /// token. Empty when the coordinator did not say; jobs that need it
    /// then fail with a message naming it.
    pub gitlab_url: String,
    /// Where the job's caches are restored from and saved to, as the
    /// coordinator signed them; empty without cache storage.
    pub caches: Vec<servitor_proto::agent::CacheAccess>,
    pub attempt: u32,
    /// Host directory private to this attempt; the executor creates what it
    /// needs below it and the caller removes it afterwards.
    pub work_dir: PathBuf,
    /// Slot index on this agent (`CI_CONCURRENT_ID`).
    pub concurrent_id: u32,
    /// Agent name, for `CI_RUNNER_*` style variables and log lines.
    pub agent_name: String,
    /// Identifies this agent installation among all on the Docker host (its
    /// work directory): containers carry it so that leftovers of this agent,
    /// and only this agent, can be removed after a crash.
    pub owner: String,
}

/// How the coordinator asks an attempt to stop.
#[derive(Clone, Debug, Default)]
pub struct CancelSignals {
    /// Stop the script, still run `after_script`, then report.
    pub graceful: CancellationToken,
    /// Kill everything at once; nothing more runs.
    pub abort: CancellationToken,
}

/// Where an attempt's output goes, in order. Sending never blocks the job for
/// long: the receiver drains it onto the output stream.
pub type OutputSink = mpsc::Sender<Bytes>;

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobResult {
    Success,
    Failed {
        kind: FailureKind,
        exit_code: Option<i32>,
        /// One line for the job log, e.g. "exit code 3".
        message: String,
    },
    /// Stopped because it was asked to (graceful or abort).
    Canceled {
        message: String,
    },
}

/// Runs job attempts.
pub trait Executor: Send + Sync + std::fmt::Debug {
    /// `docker` or `shell`.
    fn name(&self) -> &'static str;

    /// Runs one attempt to its end. Output goes to `output` as it is produced;
    /// the returned result says how it ended. Never panics on bad input:
    /// a payload it cannot run is a `Failed` result that says why.
    fn run(
        &self,
        ctx: JobContext,
        output: OutputSink,
        cancel: CancelSignals,
    ) -> impl std::future::Future<Output = JobResult> + Send;
}

impl JobResult {
    /// The closing line of a job log in gitlab-runner's words: `Job succeeded`,
    /// `ERROR: Job failed: exit code 1`, `ERROR: Job failed (system failure): …`.
    /// Executors do not write it themselves: whoever reports the attempt
    /// writes it once, after any output of its own.
    pub fn log_line(&self) -> String {
        match self {
            JobResult::Success => "Job succeeded".to_owned(),
            JobResult::Failed {
                kind: FailureKind::RunnerSystem | FailureKind::ImagePull,
                message,
                ..
            } => format!("ERROR: Job failed (system failure): {message}"),
            JobResult::Failed { message, .. } | JobResult::Canceled { message } => {
                format!("ERROR: Job failed: {message}")
            }
        }
    }

    /// `CI_JOB_STATUS` as `after_script` sees it.
    pub fn ci_job_status(&self) -> script::JobStatus {
        match self {
            JobResult::Success => script::JobStatus::Success,
            JobResult::Failed { .. } => script::JobStatus::Failed,
            JobResult::Canceled { .. } => script::JobStatus::Canceled,
        }
    }
}

/// Any executor, chosen at run time. [`Executor::run`] returns `impl Future`,
/// so the trait is not object safe; the agent holds one of these instead of a
/// `Box<dyn Executor>`.
#[derive(Debug)]
pub enum AnyExecutor {
    Docker(DockerExecutor),
    Shell(ShellExecutor),
}

impl From<DockerExecutor> for AnyExecutor {
    fn from(executor: DockerExecutor) -> Self {
        AnyExecutor::Docker(executor)
    }
}

impl From<ShellExecutor> for AnyExecutor {
    fn from(executor: ShellExecutor) -> Self {
        AnyExecutor::Shell(executor)
    }
}

impl Executor for AnyExecutor {
    fn name(&self) -> &'static str {
        match self {
            AnyExecutor::Docker(executor) => executor.name(),
            AnyExecutor::Shell(executor) => executor.name(),
        }
    }

    async fn run(&self, ctx: JobContext, output: OutputSink, cancel: CancelSignals) -> JobResult {
        match self {
            AnyExecutor::Docker(executor) => executor.run(ctx, output, cancel).await,
            AnyExecutor::Shell(executor) => executor.run(ctx, output, cancel).await,
        }
    }
}

/// Formats a duration the way Go's `time.Duration.String` does (`1h0m0s`,
/// `5m0s`, `45s`), because gitlab-runner's messages, which users grep job
/// logs for, are written with it.
pub fn go_duration(duration: std::time::Duration) -> String {
    const SECS_PER_MINUTE: u64 = 60;
    const SECS_PER_HOUR: u64 = 3600;
    let secs = duration.as_secs();
    let (hours, rest) = (secs / SECS_PER_HOUR, secs % SECS_PER_HOUR);
    let (minutes, seconds) = (rest / SECS_PER_MINUTE, rest % SECS_PER_MINUTE);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_read_like_gitlab_runner() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (60, "1m0s"),
            (300, "5m0s"),
            (3600, "1h0m0s"),
            (7261, "2h1m1s"),
        ];
        for (secs, want) in cases {
            assert_eq!(go_duration(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn closing_lines_follow_gitlab_runner() {
        assert_eq!(JobResult::Success.log_line(), "Job succeeded");
        let failed = JobResult::Failed {
            kind: FailureKind::Script,
            exit_code: Some(3),
            message: "exit code 3".into(),
        };
        assert_eq!(failed.log_line(), "ERROR: Job failed: exit code 3");
        let system = JobResult::Failed {
            kind: FailureKind::ImagePull,
            exit_code: None,
            message: "failed to pull image".into(),
        };
        assert_eq!(
            system.log_line(),
            "ERROR: Job failed (system failure): failed to pull image"
        );
        assert_eq!(failed.ci_job_status().as_str(), "failed");
    }
}
