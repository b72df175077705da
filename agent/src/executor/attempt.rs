//! The stages every executor runs in the same order, with the same limits:
//! lay out the work directory, fetch sources, run the script steps, then
//! `after_script`, under the job timeout and the coordinator's cancel
//! signals. How a script runs (a container, a host process) is the
//! [`ScriptRunner`] seam.
//!
//! Not responsible for preparing what a runner needs (images), for
//! reporting the result, or for removing the work directory.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use servitor_proto::agent::FailureKind;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::JobOutput;
use super::script::{self, Environment, JobStatus, Layout, ScriptEnv};
use super::{artifacts, cache};
use super::{go_duration, sources, CancelSignals, JobContext, JobResult, OutputSink};

/// How long a script gets between SIGTERM and SIGKILL when it is stopped:
/// enough to flush a log or remove a lock file, short enough that a canceled
/// job frees its slot promptly.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a runner may take to tear a script down after it was told to
/// kill it. A runner that hangs longer (a wedged Docker engine) is dropped,
/// and its guards clean up in the background.
const KILL_LIMIT: Duration = Duration::from_secs(30);

/// The step GitLab runs after the others, whatever happened.
const AFTER_SCRIPT: &str = "after_script";

/// The step `release:` becomes (`release-cli create …`).
const RELEASE: &str = "release";

/// The one hook GitLab sends (`hooks:pre_get_sources_script`).
const PRE_GET_SOURCES: &str = "pre_get_sources_script";

/// One script for a runner to run.
#[derive(Debug)]
pub(crate) struct StepRun<'a> {
    /// The stage name (`step_script`, `after_script`), used in labels.
    pub name: &'a str,
    /// The script file, on the host and (by the layout's design) in the job.
    pub script: &'a Path,
    pub layout: &'a Layout,
}

/// How the driver asks a running script to stop.
#[derive(Clone, Debug, Default)]
pub(crate) struct StopSignals {
    /// SIGTERM now, SIGKILL after [`STOP_GRACE`].
    pub terminate: CancellationToken,
    /// SIGKILL now.
    pub kill: CancellationToken,
}

/// Runs one script file to its end and returns its exit code, streaming its
/// output live. Honours [`StopSignals`]; a killed script returns whatever
/// exit code the kill left (the driver knows why it asked).
pub(crate) trait ScriptRunner: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    fn environment(&self) -> Environment;

    fn run_script(
        &self,
        step: &StepRun<'_>,
        out: &JobOutput,
        stop: &StopSignals,
    ) -> impl Future<Output = Result<i32, Self::Error>> + Send;
}

/// Why a stage stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interrupt {
    Timeout,
    Canceled,
    Aborted,
}

/// How one step ended.
#[derive(Debug)]
enum StepEnd {
    Exited(i32),
    Interrupted(Interrupt),
    Error(String),
}

/// One attempt in progress.
#[derive(Debug)]
pub(crate) struct Attempt<'a> {
    pub ctx: &'a JobContext,
    pub cancel: &'a CancelSignals,
    pub out: JobOutput,
    pub layout: Layout,
    timeout: Duration,
    deadline: Instant,
}

impl<'a> Attempt<'a> {
    /// Starts the clock and lays out the work directory. The job timeout
    /// counts from here, as gitlab-runner's counts from taking the job.
    pub(crate) async fn start(
        ctx: &'a JobContext,
        sink: OutputSink,
        cancel: &'a CancelSignals,
    ) -> Result<Self, JobResult> {
        let timeout = ctx.job.runner_info.timeout();
        let deadline = Instant::now() + timeout;
        let out = JobOutput::new(sink, ctx.job.features.trace_sections);
        out.line(&format!(
            "Running with servitor-agent {} on {}",
            env!("CARGO_PKG_VERSION"),
            ctx.agent_name
        ))
        .await;
        let layout = match Layout::create(&ctx.work_dir, &ctx.job).await {
            Ok(layout) => layout,
            Err(e) => return Err(system_failure(e.to_string())),
        };
        Ok(Self {
            ctx,
            cancel,
            out,
            layout,
            timeout,
            deadline,
        })
    }

    /// Runs `stage` until it ends or the attempt is interrupted; an
    /// interrupted stage is dropped, so it must clean up on drop.
    pub(crate) async fn bounded<F: Future>(&self, stage: F) -> Result<F::Output, Interrupt> {
        tokio::select! {
            biased;
            () = self.cancel.abort.cancelled() => Err(Interrupt::Aborted),
            () = self.cancel.graceful.cancelled() => Err(Interrupt::Canceled),
            () = tokio::time::sleep_until(self.deadline) => Err(Interrupt::Timeout),
            output = stage => Ok(output),
        }
    }

    /// The result of an attempt stopped by `interrupt`.
    pub(crate) fn interrupted(&self, interrupt: Interrupt) -> JobResult {
        match interrupt {
            Interrupt::Timeout => JobResult::Failed {
                kind: FailureKind::Timeout,
                exit_code: None,
                message: format!(
                    "execution took longer than {} seconds",
                    go_duration(self.timeout)
                ),
            },
            Interrupt::Canceled => JobResult::Canceled {
                message: "job canceled".to_owned(),
            },
            Interrupt::Aborted => JobResult::Canceled {
                message: "job aborted".to_owned(),
            },
        }
    }

    /// Runs sources, steps and `after_script` with `runner`.
    pub(crate) async fn run_stages<R: ScriptRunner>(&self, runner: &R) -> JobResult {
        let out = &self.out;
        let env = match ScriptEnv::prepare(self.ctx, &self.layout, runner.environment()).await {
            Ok(env) => env,
            Err(e) => return system_failure(e.to_string()),
        };
        for key in &env.skipped {
            out.warning(&format!(
                "variable {key:?} is not a valid shell variable name; it is not exported"
            ))
            .await;
        }

        out.section_start("get_sources", "Getting source from Git repository")
            .await;
        if let Some(failed) = self.pre_get_sources(runner, &env).await {
            out.section_end("get_sources").await;
            return failed;
        }
        let fetched = self
            .bounded(sources::fetch(&self.ctx.job, &self.layout.project_dir, out))
            .await;
        out.section_end("get_sources").await;
        match fetched {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return system_failure(e.to_string()),
            Err(interrupt) => return self.interrupted(interrupt),
        }

        if cache::has_restore(self.ctx) {
            out.section_start("restore_cache", "Restoring cache").await;
            let restored = self
                .bounded(cache::restore(
                    self.ctx,
                    &self.layout.project_dir,
                    &self.layout.tmp_dir,
                    out,
                ))
                .await;
            out.section_end("restore_cache").await;
            match restored {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    return JobResult::Failed {
                        kind: FailureKind::Configuration,
                        exit_code: None,
                        message,
                    }
                }
                Err(interrupt) => return self.interrupted(interrupt),
            }
        }

        if artifacts::has_downloads(&self.ctx.job) {
            out.section_start("download_artifacts", "Downloading artifacts")
                .await;
            let downloaded = self
                .bounded(artifacts::download(
                    self.ctx,
                    &self.layout.project_dir,
                    &self.layout.tmp_dir,
                    out,
                ))
                .await;
            out.section_end("download_artifacts").await;
            match downloaded {
                Ok(Ok(())) => {}
                Ok(Err(message)) => return script_failure(message),
                Err(interrupt) => return self.interrupted(interrupt),
            }
        }

        let mut result = JobResult::Success;
        for step in &self.ctx.job.steps {
            if step.name == AFTER_SCRIPT {
                continue;
            }
            let failed = !matches!(result, JobResult::Success);
            let runs = match step.when.as_str() {
                "always" => true,
                "on_failure" => failed,
                _ => !failed,
            };
            if !runs || matches!(result, JobResult::Canceled { .. }) {
                continue;
            }
            let stage = format!("step_{}", step.name);
            out.section_start(
                &stage,
                &format!("Executing \"{stage}\" stage of the job script"),
            )
            .await;
            // gitlab-runner expands job variables in the release step's
            // lines itself (`release-cli create --tag-name $CI_COMMIT_TAG`).
            let script: Vec<String> = if step.name == RELEASE {
                step.script.iter().map(|l| self.ctx.job.expand(l)).collect()
            } else {
                step.script.clone()
            };
            let end = self
                .run_step(runner, &env, &stage, &script, JobStatus::Running, None)
                .await;
            out.section_end(&stage).await;
            let interrupted = matches!(end, StepEnd::Interrupted(_));
            result = self.step_result(end);
            if interrupted {
                break;
            }
        }

        let aborted = self.cancel.abort.is_cancelled();
        if let Some(step) = self.ctx.job.step(AFTER_SCRIPT) {
            if !aborted && !step.script.is_empty() {
                self.run_after_script(runner, &env, &step.script, &result)
                    .await;
            }
        }
        if self.cancel.abort.is_cancelled() {
            return self.interrupted(Interrupt::Aborted);
        }
        if let Err(interrupt) = self.save_cache(&result).await {
            return self.interrupted(interrupt);
        }
        self.upload_artifacts(result).await
    }

    /// The job's `pre_get_sources_script` hooks, run as a script of the job
    /// (in its image with the docker executor, never on the instance
    /// itself) before any git command, as gitlab-runner runs them inside
    /// `get_sources`. Skipped with `GIT_STRATEGY` `none` or `empty`, as
    /// gitlab-runner does. A failing hook fails the job.
    async fn pre_get_sources<R: ScriptRunner>(
        &self,
        runner: &R,
        env: &ScriptEnv,
    ) -> Option<JobResult> {
        let job = &self.ctx.job;
        let mut lines = Vec::new();
        for hook in &job.hooks {
            if hook.name == PRE_GET_SOURCES {
                lines.extend(hook.script.iter().cloned());
            } else {
                self.out
                    .warning(&format!(
                        "hooks:{} is not known to this runner; skipped",
                        hook.name
                    ))
                    .await;
            }
        }
        let git_skipped = matches!(job.variable("GIT_STRATEGY"), Some("none" | "empty"));
        if lines.is_empty() || git_skipped {
            return None;
        }
        // The hook's script starts in the project directory, as every
        // script does.
        if let Err(e) = tokio::fs::create_dir_all(&self.layout.project_dir).await {
            return Some(system_failure(format!(
                "cannot create {}: {e}",
                self.layout.project_dir.display()
            )));
        }
        let end = self
            .run_step(
                runner,
                env,
                PRE_GET_SOURCES,
                &lines,
                JobStatus::Running,
                None,
            )
            .await;
        match end {
            StepEnd::Exited(0) => None,
            other => Some(self.step_result(other)),
        }
    }

    /// The `archive_cache` stage (`archive_cache_on_failure` for a failed
    /// job). Skipped after a timeout, as in gitlab-runner; never fails the
    /// job.
    async fn save_cache(&self, result: &JobResult) -> Result<(), Interrupt> {
        let timed_out = matches!(
            result,
            JobResult::Failed {
                kind: FailureKind::Timeout,
                ..
            }
        );
        let success = matches!(result, JobResult::Success);
        if timed_out || !cache::has_save(self.ctx, success) {
            return Ok(());
        }
        let (stage, header) = if success {
            ("archive_cache", "Saving cache for successful job")
        } else {
            ("archive_cache_on_failure", "Saving cache for failed job")
        };
        let out = &self.out;
        out.section_start(stage, header).await;
        let saved = tokio::select! {
            biased;
            () = self.cancel.abort.cancelled() => Err(Interrupt::Aborted),
            () = tokio::time::sleep_until(self.deadline) => Err(Interrupt::Timeout),
            () = cache::save(
                self.ctx,
                success,
                &self.layout.project_dir,
                &self.layout.tmp_dir,
                out,
            ) => Ok(()),
        };
        out.section_end(stage).await;
        saved
    }

    /// The `upload_artifacts_on_*` stage. Skipped after a timeout, as in
    /// gitlab-runner, and after an abort: an attempt handed back uploads
    /// nothing, so only the attempt that finishes the job does. A graceful
    /// cancel still uploads the `on_failure` entries. A failed upload
    /// fails a job that had succeeded; a failed job keeps its own reason.
    async fn upload_artifacts(&self, result: JobResult) -> JobResult {
        if matches!(
            result,
            JobResult::Failed {
                kind: FailureKind::Timeout,
                ..
            }
        ) {
            return result;
        }
        let success = matches!(result, JobResult::Success);
        let entries = artifacts::uploads(&self.ctx.job, success);
        if entries.is_empty() {
            return result;
        }
        let (stage, header) = if success {
            (
                "upload_artifacts_on_success",
                "Uploading artifacts for successful job",
            )
        } else {
            (
                "upload_artifacts_on_failure",
                "Uploading artifacts for failed job",
            )
        };
        let out = &self.out;
        out.section_start(stage, header).await;
        let sent = tokio::select! {
            biased;
            () = self.cancel.abort.cancelled() => Err(Interrupt::Aborted),
            () = tokio::time::sleep_until(self.deadline) => Err(Interrupt::Timeout),
            sent = artifacts::upload(
                self.ctx,
                &entries,
                &self.layout.project_dir,
                &self.layout.tmp_dir,
                out,
            ) => Ok(sent),
        };
        out.section_end(stage).await;
        match sent {
            Ok(Ok(())) => result,
            Ok(Err(message)) if success => script_failure(message),
            Ok(Err(_)) => result,
            Err(interrupt) => self.interrupted(interrupt),
        }
    }

    async fn run_after_script<R: ScriptRunner>(
        &self,
        runner: &R,
        env: &ScriptEnv,
        commands: &[String],
        result: &JobResult,
    ) {
        let out = &self.out;
        out.section_start(AFTER_SCRIPT, "Running after_script")
            .await;
        out.info("Running after script...").await;
        let deadline = Instant::now() + script::AFTER_SCRIPT_TIMEOUT;
        let end = self
            .run_step(
                runner,
                env,
                AFTER_SCRIPT,
                commands,
                result.ci_job_status(),
                Some(deadline),
            )
            .await;
        let problem = match end {
            StepEnd::Exited(0) | StepEnd::Interrupted(Interrupt::Aborted) => None,
            StepEnd::Exited(code) => Some(format!("exit code {code}")),
            StepEnd::Interrupted(_) => Some(format!(
                "execution took longer than {} seconds",
                go_duration(script::AFTER_SCRIPT_TIMEOUT)
            )),
            StepEnd::Error(message) => Some(message),
        };
        if let Some(problem) = problem {
            out.warning(&format!(
                "after_script failed, but job will continue unaffected: {problem}"
            ))
            .await;
        }
        out.section_end(AFTER_SCRIPT).await;
    }

    /// Writes and runs one step's script. `own_deadline` is for
    /// `after_script`, which ignores the job timeout and graceful cancel.
    async fn run_step<R: ScriptRunner>(
        &self,
        runner: &R,
        env: &ScriptEnv,
        stage: &str,
        commands: &[String],
        status: JobStatus,
        own_deadline: Option<Instant>,
    ) -> StepEnd {
        let text = script::render(commands, env, status, &self.layout.project_dir);
        let path =
            match script::write_script(&self.layout, stage, &text, runner.environment()).await {
                Ok(path) => path,
                Err(e) => return StepEnd::Error(e.to_string()),
            };
        let step = StepRun {
            name: stage,
            script: &path,
            layout: &self.layout,
        };
        let graceful_applies = own_deadline.is_none();
        let deadline = own_deadline.unwrap_or(self.deadline);
        let stop = StopSignals::default();
        let run = runner.run_script(&step, &self.out, &stop);
        tokio::pin!(run);
        let mut interrupt = None;
        let mut kill_deadline: Option<Instant> = None;
        let exit = loop {
            tokio::select! {
                biased;
                exit = &mut run => break exit,
                () = self.cancel.abort.cancelled(), if kill_deadline.is_none() => {
                    stop.kill.cancel();
                    interrupt = Some(Interrupt::Aborted);
                    kill_deadline = Some(Instant::now() + KILL_LIMIT);
                }
                () = self.cancel.graceful.cancelled(), if graceful_applies && interrupt.is_none() => {
                    stop.terminate.cancel();
                    interrupt = Some(Interrupt::Canceled);
                }
                () = tokio::time::sleep_until(deadline), if interrupt.is_none() => {
                    stop.terminate.cancel();
                    interrupt = Some(Interrupt::Timeout);
                }
                () = sleep_until_some(kill_deadline) => {
                    tracing::warn!(stage, "script runner did not stop in time after a kill; leaving its cleanup to the background");
                    return StepEnd::Interrupted(Interrupt::Aborted);
                }
            }
        };
        match (interrupt, exit) {
            (Some(interrupt), _) => StepEnd::Interrupted(interrupt),
            (None, Ok(code)) => StepEnd::Exited(code),
            (None, Err(e)) => StepEnd::Error(e.to_string()),
        }
    }

    fn step_result(&self, end: StepEnd) -> JobResult {
        match end {
            StepEnd::Exited(0) => JobResult::Success,
            StepEnd::Exited(code) => JobResult::Failed {
                kind: FailureKind::Script,
                exit_code: Some(code),
                message: format!("exit code {code}"),
            },
            StepEnd::Interrupted(interrupt) => self.interrupted(interrupt),
            StepEnd::Error(message) => system_failure(message),
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A failure of the job's own doing (a dependency it names is missing, its
/// artifacts cannot be uploaded), reported as gitlab-runner reports a
/// failed helper stage.
pub(crate) fn script_failure(message: String) -> JobResult {
    JobResult::Failed {
        kind: FailureKind::Script,
        exit_code: None,
        message,
    }
}

/// A failure of the runner rather than of the job's script.
pub(crate) fn system_failure(message: String) -> JobResult {
    JobResult::Failed {
        kind: FailureKind::RunnerSystem,
        exit_code: None,
        message,
    }
}
