//! The shell executor: runs a job's step scripts with `/bin/sh` directly on
//! the agent's host, in the attempt's work directory, for machines without
//! Docker.
//!
//! Each script runs as the leader of its own process group. Stopping it sends
//! SIGTERM to the whole group and SIGKILL after a grace period; when a script
//! ends, whatever it left running in its group is killed too. Not an
//! isolation boundary: jobs run as the agent's user and see its host.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use super::attempt::{Attempt, ScriptRunner, StepRun, StopSignals, STOP_GRACE};
use super::output::JobOutput;
use super::process::{pump, ProcessGroup, Signal};
use super::script::Environment;
use super::{CancelSignals, Executor, JobContext, JobResult, OutputSink};

/// The shell gitlab-runner's `sh` shell uses; busybox, dash and bash all
/// run our scripts.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// How long output may keep arriving after a script exited, from processes
/// that escaped its process group with its pipes open.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Variables of the agent's own (`SERVITOR_…`): never passed to a job.
const AGENT_VARIABLE_PREFIX: &str = "SERVITOR_";

/// Why a script could not be run on the host.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("cannot start {shell}: {source}; install a POSIX shell there or configure another")]
    Spawn {
        shell: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost track of the job's shell process: {0}")]
    Wait(#[source] std::io::Error),
}

/// Runs jobs on the host with a POSIX shell.
#[derive(Clone, Debug)]
pub struct ShellExecutor {
    shell: PathBuf,
}

impl Default for ShellExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl ShellExecutor {
    /// An executor using [`DEFAULT_SHELL`].
    pub fn new() -> Self {
        Self::with_shell(DEFAULT_SHELL)
    }

    /// An executor using another POSIX shell.
    pub fn with_shell(shell: impl Into<PathBuf>) -> Self {
        Self {
            shell: shell.into(),
        }
    }

    /// The shell scripts run with.
    pub fn shell(&self) -> &Path {
        &self.shell
    }

    async fn run_attempt(
        &self,
        ctx: JobContext,
        sink: OutputSink,
        cancel: CancelSignals,
    ) -> JobResult {
        let attempt = match Attempt::start(&ctx, sink, &cancel).await {
            Ok(attempt) => attempt,
            Err(result) => return result,
        };
        let out = &attempt.out;
        out.section_start("prepare_executor", "Preparing the \"shell\" executor")
            .await;
        out.info(&format!(
            "Using Shell ({}) executor...",
            self.shell.display()
        ))
        .await;
        if !ctx.job.services.is_empty() {
            out.warning("The shell executor starts no services (they need the docker executor); the job runs without them")
                .await;
        }
        out.section_end("prepare_executor").await;
        attempt.run_stages(self).await
    }
}

impl Executor for ShellExecutor {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn run(
        &self,
        ctx: JobContext,
        output: OutputSink,
        cancel: CancelSignals,
    ) -> impl std::future::Future<Output = JobResult> + Send {
        self.run_attempt(ctx, output, cancel)
    }
}

impl ScriptRunner for ShellExecutor {
    type Error = ShellError;

    fn environment(&self) -> Environment {
        Environment::Shared
    }

    async fn run_script(
        &self,
        step: &StepRun<'_>,
        out: &JobOutput,
        stop: &StopSignals,
    ) -> Result<i32, ShellError> {
        let dir = if step.layout.project_dir.is_dir() {
            &step.layout.project_dir
        } else {
            &step.layout.work_dir
        };
        let mut command = tokio::process::Command::new(&self.shell);
        // The agent's own settings (in a task, the spent enrollment
        // credential among them) are not the job's.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with(AGENT_VARIABLE_PREFIX) {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg(step.script)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .map_err(|source| ShellError::Spawn {
                shell: self.shell.clone(),
                source,
            })?;
        let group = child.id().map(ProcessGroup::new);
        let stdout = child
            .stdout
            .take()
            .map(|p| tokio::spawn(pump(p, out.clone())));
        let stderr = child
            .stderr
            .take()
            .map(|p| tokio::spawn(pump(p, out.clone())));

        let mut grace_end: Option<Instant> = None;
        let mut killed = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                () = stop.kill.cancelled(), if !killed => {
                    signal(group.as_ref(), Signal::Kill).await;
                    killed = true;
                }
                () = stop.terminate.cancelled(), if grace_end.is_none() && !killed => {
                    signal(group.as_ref(), Signal::Term).await;
                    grace_end = Some(Instant::now() + STOP_GRACE);
                }
                () = sleep_until_some(grace_end), if !killed => {
                    signal(group.as_ref(), Signal::Kill).await;
                    killed = true;
                }
            }
        };
        // What the script left running in its group is garbage now.
        if let Some(group) = group {
            group.signal(Signal::Kill).await;
            group.release();
        }
        for pumper in [stdout, stderr].into_iter().flatten() {
            let abort = pumper.abort_handle();
            if tokio::time::timeout(OUTPUT_DRAIN, pumper).await.is_err() {
                abort.abort();
            }
        }
        let status = status.map_err(ShellError::Wait)?;
        Ok(exit_code(status))
    }
}

async fn signal(group: Option<&ProcessGroup>, signal: Signal) {
    if let Some(group) = group {
        group.signal(signal).await;
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The exit code a shell would report: the code, or 128 + the signal.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    /// Shells report death by signal N as exit code 128 + N.
    const SIGNAL_EXIT_BASE: i32 = 128;
    status
        .code()
        .or_else(|| status.signal().map(|s| SIGNAL_EXIT_BASE + s))
        .unwrap_or(SIGNAL_EXIT_BASE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use crate::executor::testing::{collect_output, job_with, run_collecting};
    use servitor_proto::agent::FailureKind;

    #[tokio::test]
    async fn success_streams_echoed_commands_and_their_output() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(&["echo hello from $CI_SERVER", "echo second"], &[], 60);
        let (result, log) = run_collecting(
            &ShellExecutor::new(),
            job,
            dir.path(),
            CancelSignals::default(),
        )
        .await;
        assert_eq!(result, JobResult::Success, "{log}");
        assert!(
            log.contains("\x1b[32;1m$ echo hello from $CI_SERVER\x1b[0;m\nhello from yes\n"),
            "{log:?}"
        );
        assert!(log.contains("second\n"), "{log:?}");
    }

    #[tokio::test]
    async fn failure_stops_at_the_failing_command_and_after_script_sees_failed() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &["echo before", "sh -c 'exit 3'", "echo never-printed"],
            &["echo after status=$CI_JOB_STATUS shared=$CI_SHARED_ENVIRONMENT"],
            60,
        );
        let (result, log) = run_collecting(
            &ShellExecutor::new(),
            job,
            dir.path(),
            CancelSignals::default(),
        )
        .await;
        assert_eq!(
            result,
            JobResult::Failed {
                kind: FailureKind::Script,
                exit_code: Some(3),
                message: "exit code 3".into()
            },
            "{log}"
        );
        assert!(!log.contains("never-printed\n"), "{log:?}");
        assert!(log.contains("after status=failed shared=true\n"), "{log:?}");
    }

    /// Whether process `pid` still runs; a zombie has ended.
    fn process_alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X')
        })
    }

    #[tokio::test]
    async fn timeout_kills_the_script_group_and_runs_after_script() {
        /// A SIGKILLed process is gone within milliseconds; this only bounds
        /// the wait on a loaded machine.
        const DEATH_WAIT: Duration = Duration::from_secs(5);
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("background.pid");
        // A background process in the script's group, left running when the
        // script is stopped; it would outlive the test unless the group is
        // killed. It writes its pid (`exec` keeps it) so the test can watch it.
        let background = format!("sh -c 'echo $$ > {}; exec sleep 300' &", pid_file.display());
        let job = job_with(
            &[&background, "sleep 30"],
            &["echo after status=$CI_JOB_STATUS"],
            1,
        );
        let started = Instant::now();
        let (result, log) = run_collecting(
            &ShellExecutor::new(),
            job,
            dir.path(),
            CancelSignals::default(),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            result,
            JobResult::Failed {
                kind: FailureKind::Timeout,
                exit_code: None,
                message: "execution took longer than 1s seconds".into()
            },
            "{log}"
        );
        assert!(log.contains("after status=failed\n"), "{log:?}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("the background process never started ({e}):\n{log}"))
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + DEATH_WAIT;
        while process_alive(pid) {
            assert!(
                Instant::now() < deadline,
                "background process {pid} of the timed-out script survived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn graceful_cancel_runs_after_script_and_abort_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &["echo started", "sleep 30"],
            &["echo after status=$CI_JOB_STATUS"],
            60,
        );
        let cancel = CancelSignals::default();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let log = collect_output(rx);
        let ctx = crate::executor::testing::context(job.clone(), dir.path());
        let run = tokio::spawn({
            let cancel = cancel.clone();
            async move { ShellExecutor::new().run(ctx, tx, cancel).await }
        });
        log.wait_for("started\n").await;
        cancel.graceful.cancel();
        let result = run.await.unwrap();
        let text = log.finish().await;
        assert_eq!(
            result,
            JobResult::Canceled {
                message: "job canceled".into()
            },
            "{text}"
        );
        assert!(text.contains("after status=canceled\n"), "{text:?}");

        let dir = tempfile::tempdir().unwrap();
        let cancel = CancelSignals::default();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let log = collect_output(rx);
        let ctx = crate::executor::testing::context(job, dir.path());
        let run = tokio::spawn({
            let cancel = cancel.clone();
            async move { ShellExecutor::new().run(ctx, tx, cancel).await }
        });
        log.wait_for("started\n").await;
        let started = Instant::now();
        cancel.abort.cancel();
        let result = run.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "abort took {:?}",
            started.elapsed()
        );
        let text = log.finish().await;
        assert_eq!(
            result,
            JobResult::Canceled {
                message: "job aborted".into()
            },
            "{text}"
        );
        assert!(!text.contains("after status"), "{text:?}");
    }

    #[tokio::test]
    async fn a_missing_shell_is_a_system_failure_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(&["true"], &[], 60);
        let executor = ShellExecutor::with_shell("/nonexistent/sh");
        let (result, _) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        match result {
            JobResult::Failed {
                kind: FailureKind::RunnerSystem,
                message,
                ..
            } => assert!(message.contains("/nonexistent/sh"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
