//! Taking jobs from GitLab and seeing each one through: the poller asks for
//! work only while a slot is free, and each held job gets a task that keeps
//! GitLab informed (through its [`JobReporter`]) while the core finds it an
//! agent, streams its output, and reports its end exactly once.
//!
//! Not responsible for the wire details of GitLab (`gitlab`) or of agents
//! (`agents`), nor for choosing agents (`core`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::agent::{CancelMode, FailureKind, Finished, Outcome};
use servitor_proto::job::JobPayload;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::core::{AfterLoss, Core, JobEvent};
use crate::fleet::pricing::{PriceBook, PricedInstance};
use crate::gitlab::{
    FinalState, GitLabClient, GitLabError, JobReporter, ReceivedJob, RemoteEvent, Resume,
};
use crate::metrics::Outcome as JobOutcome;
use crate::store::{LeaseRecord, Store};
use servitor_runtime::backoff::Backoff;

/// Job request backoff bounds (gitlab-runner: 100 ms to 60 s).
const REQUEST_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REQUEST_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long to wait for the rest of an attempt's output after its result
/// arrived (they travel on different streams).
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// ANSI styles gitlab-runner uses in job logs.
const BOLD_GREEN: &str = "\x1b[32;1m";
const BOLD_RED: &str = "\x1b[31;1m";
const BOLD_CYAN: &str = "\x1b[36;1m";
const BOLD_YELLOW: &str = "\x1b[0;33m";
const RESET: &str = "\x1b[0;m";

/// What the job tasks need.
#[derive(Clone, Debug)]
pub struct JobsContext {
    pub core: Arc<Core>,
    /// The runner this context takes jobs for: its jobs run only on its
    /// fleet.
    pub runner: String,
    pub gitlab: Arc<GitLabClient>,
    /// Shown in each job log's first line.
    pub coordinator_name: String,
    pub max_attempts: u32,
    /// The lease book; `None` keeps jobs in memory only.
    pub store: Option<Store>,
    /// One permit per job held by any runner (the coordinator's
    /// `concurrent`).
    pub slots: Arc<Semaphore>,
    /// One permit per job held by this runner (its `concurrent`).
    pub runner_slots: Arc<Semaphore>,
    /// What instances cost, for the cost line at the end of each log.
    pub prices: Arc<PriceBook>,
}

/// Where one attempt ran and for how long, for the cost line.
#[derive(Clone, Debug)]
struct AttemptUse {
    instance: servitor_proto::agent::InstanceFacts,
    started: tokio::time::Instant,
    ended: Option<tokio::time::Instant>,
}

/// A job found in the lease book after a restart.
#[derive(Debug)]
pub struct Restored {
    pub lease: LeaseRecord,
    pub resume: Resume,
    /// The current attempt's result, when it arrived before the restart.
    pub result: Option<Finished>,
}

/// A held job's place under the runner's and the coordinator's
/// `concurrent`; both are given back when it is dropped.
#[derive(Debug)]
pub struct Permits {
    _runner: Option<OwnedSemaphorePermit>,
    _all: Option<OwnedSemaphorePermit>,
}

/// Asks GitLab for the runner's jobs while it and the coordinator hold
/// fewer than their `concurrent`, until `stop` is cancelled. Held jobs are
/// not affected by `stop`: they run on under `jobs_cancel`.
pub async fn poll_gitlab(
    ctx: JobsContext,
    stop: CancellationToken,
    jobs_cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Backoff::try_new(REQUEST_BACKOFF_MIN, REQUEST_BACKOFF_MAX)
        .expect("job request backoff bounds are valid constants");
    loop {
        // The runner's own share first: a runner at its limit does not hold
        // one of the coordinator's slots while it waits.
        let runner = tokio::select! {
            () = stop.cancelled() => return,
            permit = ctx.runner_slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let all = tokio::select! {
            () = stop.cancelled() => return,
            permit = ctx.slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let permit = Permits {
            _runner: Some(runner),
            _all: Some(all),
        };
        let requested = tokio::select! {
            () = stop.cancelled() => return,
            r = ctx.gitlab.next_job(&mut backoff, &stop) => r,
        };
        match requested {
            Ok(job) => {
                let ctx = ctx.clone();
                let cancel = jobs_cancel.child_token();
                tracker.spawn(async move {
                    take_job(ctx, job, cancel, permit).await;
                });
            }
            Err(GitLabError::Cancelled) => return,
            Err(e) => {
                // next_job retries everything worth retrying; what remains
                // (a rejected runner token) needs the operator.
                tracing::error!(error = %e, "stopped asking GitLab for jobs");
                return;
            }
        }
    }
}

async fn take_job(ctx: JobsContext, job: ReceivedJob, cancel: CancellationToken, permit: Permits) {
    match job.payload {
        Ok(payload) => {
            let span =
                tracing::info_span!("job", job_id = payload.id, name = %payload.display_name());
            run_job(ctx, Arc::from(payload), job.raw, cancel, None)
                .instrument(span)
                .await;
        }
        Err(unusable) => {
            // GitLab already considers the job running on us: fail it with a
            // log line that says why, rather than leaving it to time out.
            match (unusable.id, unusable.token.as_ref()) {
                (Some(id), Some(token)) => {
                    tracing::error!(job_id = id, error = %unusable.error, "job payload is unusable; failing it");
                    let message = format!(
                        "Job failed (system failure): the job payload could not be read: {}",
                        unusable.error
                    );
                    if let Err(e) = ctx.gitlab.reject_job(id, token, &message).await {
                        tracing::error!(job_id = id, error = %e, "failed to report an unusable job");
                    }
                }
                _ => tracing::error!(
                    error = %unusable.error,
                    "GitLab sent a job without an id or token; it cannot be run or reported, GitLab will time it out"
                ),
            }
        }
    }
    drop(permit);
}

/// What the job is waiting for.
#[derive(Debug, Default)]
struct AttemptProgress {
    attempt: u32,
    output_bytes: u64,
    output_ended: bool,
    result: Option<Finished>,
}

impl AttemptProgress {
    /// Accepts output that starts at `offset` in the attempt's output: the
    /// part already received (sent again after a reconnect) is skipped, and
    /// a gap (output lost with a link) is marked in the log.
    fn take_output(&mut self, offset: u64, bytes: Bytes) -> Option<Bytes> {
        let end = offset + bytes.len() as u64;
        if end <= self.output_bytes {
            return None;
        }
        if offset > self.output_bytes {
            let lost = offset - self.output_bytes;
            self.output_bytes = end;
            let mut marked = format!(
                "\n{BOLD_YELLOW}[{lost} bytes of output were lost with the agent's link]{RESET}\n"
            )
            .into_bytes();
            marked.extend_from_slice(&bytes);
            return Some(Bytes::from(marked));
        }
        let skip = usize::try_from(self.output_bytes - offset).unwrap_or(usize::MAX);
        self.output_bytes = end;
        Some(bytes.slice(skip.min(bytes.len())..))
    }
}

/// Sees one held job through to its single final report.
/// Picks up a job found in the lease book after a restart.
pub async fn resume_job(
    ctx: JobsContext,
    payload: Arc<JobPayload>,
    raw: Bytes,
    restored: Restored,
    cancel: CancellationToken,
) {
    // A restored job holds a slot like any other; if the restart lowered
    // `concurrent`, the job still runs to its end.
    let permit = Permits {
        _runner: ctx.runner_slots.clone().try_acquire_owned().ok(),
        _all: ctx.slots.clone().try_acquire_owned().ok(),
    };
    let span = tracing::info_span!("job", job_id = payload.id, name = %payload.display_name());
    run_job(ctx, payload, raw, cancel, Some(restored))
        .instrument(span)
        .await;
    drop(permit);
}

async fn run_job(
    ctx: JobsContext,
    payload: Arc<JobPayload>,
    raw: Bytes,
    cancel: CancellationToken,
    restored: Option<Restored>,
) {
    let job_id = payload.id;
    // A job resumed after a restart learns no new assignment for its
    // running attempt; its cost line counts from the restart.
    let resumed_on = restored
        .as_ref()
        .and_then(|r| r.lease.agent.clone())
        .map(|agent| (agent, tokio::time::Instant::now()));
    let (reporter, mut remote, mut events, mut progress) = match restored {
        Some(Restored {
            lease,
            resume,
            result,
        }) => {
            let output = resume.output;
            let (reporter, remote) =
                JobReporter::start_with(ctx.gitlab.clone(), &payload, cancel.clone(), resume);
            reporter.append(Bytes::from(format!(
                "{BOLD_YELLOW}The coordinator restarted at {}; the job goes on.{RESET}\n",
                utc_now()
            )));
            let events = ctx
                .core
                .restore_job(payload.clone(), raw, &ctx.runner, &lease, result.is_some())
                .await;
            let mut progress = AttemptProgress {
                result,
                ..AttemptProgress::default()
            };
            if lease.agent.is_some() {
                progress.attempt = lease.attempt;
                // What of this attempt's output the log already holds.
                if let Some((attempt, offset)) = output {
                    if attempt == lease.attempt {
                        progress.output_bytes = offset;
                    }
                }
            }
            tracing::info!(attempt = lease.attempt, agent = ?lease.agent, "resumed a held job");
            (reporter, remote, events, progress)
        }
        None => {
            // In the lease book before anyone acts on it; its log journal
            // follows it there.
            let events = ctx.core.hold_job(payload.clone(), raw, &ctx.runner).await;
            let resume = Resume {
                journal: ctx.store.as_ref().map(|store| store.journal(job_id, 0)),
                ..Resume::default()
            };
            let (reporter, remote) =
                JobReporter::start_with(ctx.gitlab.clone(), &payload, cancel.clone(), resume);
            reporter.append(Bytes::from(format!(
                "{BOLD_CYAN}Running with servitor {} on {}{RESET}\n",
                env!("CARGO_PKG_VERSION"),
                ctx.coordinator_name
            )));
            tracing::info!("holding job");
            (reporter, remote, events, AttemptProgress::default())
        }
    };

    let mut canceling = false;
    let mut waiting_said = false;
    let mut uses: Vec<AttemptUse> = Vec::new();
    let wait_note = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(wait_note);

    // A result that arrived before a restart is reported as it was.
    let known = progress.result.as_ref().map(|r| final_state_for(r, false));
    let final_state = if let Some(state) = known {
        state
    } else {
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    // The coordinator is shutting down: the lease stays in the
                    // store and the job keeps running on its agent; the next
                    // start picks it up. Nothing is reported.
                    return;
                }
                () = &mut wait_note, if !waiting_said && progress.attempt == 0 => {
                    waiting_said = true;
                    reporter.append(Bytes::from(format!("{BOLD_YELLOW}Waiting for a free agent slot...{RESET}\n")));
                }
                event = remote.recv() => match event {
                    Some(RemoteEvent::Canceling) => {
                        canceling = true;
                        reporter.append(Bytes::from(format!("{BOLD_YELLOW}Job is being canceled{RESET}\n")));
                        if !ctx.core.cancel_job(job_id, CancelMode::Graceful, "canceled in GitLab")
                            && ctx.core.unqueue_job(job_id)
                        {
                            // Never ran: nothing to stop, report right away.
                            break FinalState::Canceled;
                        }
                    }
                    Some(RemoteEvent::Abort(reason)) => {
                        tracing::info!(%reason, "GitLab ended the job; stopping it without a final update");
                        ctx.core.cancel_job(job_id, CancelMode::Abort, "canceled in GitLab");
                        ctx.core.release_job(job_id).await;
                        // GitLab took the job away: it ends with no result.
                        ctx.core.metrics().job_finished(JobOutcome::Lost);
                        return;
                    }
                    None => {}
                },
                event = events.recv() => match event {
                    None => return,
                    Some(JobEvent::Notice(text)) => {
                        reporter.append(Bytes::from(format!("{BOLD_YELLOW}{text}{RESET}\n")));
                    }
                    Some(JobEvent::Assigned { attempt, agent, instance, executor }) => {
                        progress = AttemptProgress { attempt, ..AttemptProgress::default() };
                        resumed_use(&mut uses, resumed_on.as_ref(), &ctx.core);
                        end_use(&mut uses);
                        uses.push(AttemptUse { instance: instance.clone(), started: tokio::time::Instant::now(), ended: None });
                        reporter.append(Bytes::from(format!(
                            "{}{BOLD_CYAN}Attempt {attempt} of {}: agent {agent} on {}, {executor} executor, started {}{RESET}\n",
                            section_start(attempt),
                            ctx.max_attempts,
                            describe_instance(&instance),
                            utc_now(),
                        )));
                        if canceling {
                            ctx.core.cancel_job(job_id, CancelMode::Graceful, "canceled in GitLab");
                        }
                    }
                    Some(JobEvent::Started { .. }) => {}
                    Some(JobEvent::Output { attempt, offset, bytes }) if attempt == progress.attempt => {
                        if let Some(fresh) = progress.take_output(offset, bytes) {
                            ctx.core.record_output(job_id, fresh.len());
                            reporter.append_output(attempt, progress.output_bytes, fresh);
                        }
                    }
                    Some(JobEvent::Output { .. }) => {}
                    Some(JobEvent::OutputEnd { attempt }) if attempt == progress.attempt => {
                        progress.output_ended = true;
                    }
                    Some(JobEvent::OutputEnd { .. }) => {}
                    Some(JobEvent::Finished { attempt, result }) if attempt == progress.attempt => {
                        let state = final_state_for(&result, canceling);
                        progress.result = Some(result);
                        // The rest of the output may still be in flight.
                        let deadline = tokio::time::Instant::now() + OUTPUT_DRAIN_TIMEOUT;
                        drain_output(&mut events, &mut progress, &reporter, deadline).await;
                        break state;
                    }
                    Some(JobEvent::Finished { .. }) => {}
                    Some(JobEvent::Refused { reason }) => {
                        reporter.append(Bytes::from(format!(
                            "{BOLD_RED}This job cannot run on runner {}: {reason}.{RESET}\n",
                            ctx.runner
                        )));
                        tracing::warn!(%reason, "refused a job its runner cannot run");
                        break FinalState::Failed { kind: FailureKind::Configuration, exit_code: None };
                    }
                    Some(JobEvent::Lost { attempt, reason, next }) => {
                        resumed_use(&mut uses, resumed_on.as_ref(), &ctx.core);
                        end_use(&mut uses);
                        reporter.append(Bytes::from(format!(
                            "\n{BOLD_YELLOW}Attempt {attempt} stopped at {}: {reason}.{RESET}\n{}",
                            utc_now(),
                            section_end(attempt)
                        )));
                        progress = AttemptProgress::default();
                        match next {
                            AfterLoss::Requeued => reporter.append(Bytes::from(format!(
                                "{BOLD_YELLOW}Running the job again (attempt {} of {}). GitLab still sees one running job.{RESET}\n",
                                attempt + 1,
                                ctx.max_attempts
                            ))),
                            AfterLoss::Exhausted => {
                                reporter.append(Bytes::from(format!(
                                    "{BOLD_RED}No attempts left: all {} were interrupted.{RESET}\n",
                                    ctx.max_attempts
                                )));
                                break FinalState::Failed { kind: FailureKind::Interrupted, exit_code: None };
                            }
                            AfterLoss::NoRerun => {
                                break FinalState::Failed { kind: FailureKind::Interrupted, exit_code: None };
                            }
                        }
                    }
                },
            }
        }
    };

    if progress.attempt > 0 {
        reporter.append(Bytes::from(section_end(progress.attempt)));
    }
    resumed_use(&mut uses, resumed_on.as_ref(), &ctx.core);
    end_use(&mut uses);
    ctx.core.metrics().job_finished(match &final_state {
        FinalState::Success => JobOutcome::Success,
        FinalState::Canceled => JobOutcome::Canceled,
        FinalState::Failed {
            kind: FailureKind::Interrupted,
            ..
        } => JobOutcome::Interrupted,
        FinalState::Failed { .. } => JobOutcome::Failed,
    });
    reporter.append(Bytes::from(closing_line(
        &final_state,
        progress.result.as_ref(),
    )));
    // The last line says where the job ran and what it cost.
    if let Some(line) = cost_line(&uses, &ctx.prices) {
        reporter.append(Bytes::from(format!("{BOLD_CYAN}{line}{RESET}\n")));
    }
    match reporter.finish(final_state).await {
        Ok(report) => tracing::info!(
            failure_reason = report.failure_reason.unwrap_or("none"),
            bytes = report.output.bytesize,
            "reported the job's end to GitLab"
        ),
        Err(GitLabError::Cancelled) => {
            // The job stays in the lease book: the next start reports it.
            tracing::info!(
                "coordinator stopping before the job's end was reported; the next start reports it"
            );
            return;
        }
        Err(e) => tracing::error!(error = %e, "failed to report the job's end to GitLab"),
    }
    ctx.core.release_job(job_id).await;
}

/// After a result: wait for the output to catch up, up to a deadline.
async fn drain_output(
    events: &mut mpsc::UnboundedReceiver<JobEvent>,
    progress: &mut AttemptProgress,
    reporter: &crate::gitlab::JobReporterHandle,
    deadline: tokio::time::Instant,
) {
    loop {
        let Some(result) = progress.result.as_ref() else {
            return;
        };
        if progress.output_ended || progress.output_bytes >= result.output_bytes {
            return;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) | Ok(None) => {
                tracing::warn!(
                    expected = result.output_bytes,
                    got = progress.output_bytes,
                    "output of the attempt did not arrive in full"
                );
                return;
            }
            Ok(Some(JobEvent::Output {
                attempt,
                offset,
                bytes,
            })) if attempt == progress.attempt => {
                if let Some(fresh) = progress.take_output(offset, bytes) {
                    reporter.append_output(attempt, progress.output_bytes, fresh);
                }
            }
            Ok(Some(JobEvent::OutputEnd { attempt })) if attempt == progress.attempt => {
                progress.output_ended = true;
            }
            Ok(Some(_)) => {}
        }
    }
}

/// Maps an agent's result to what GitLab is told.
fn final_state_for(result: &Finished, canceling: bool) -> FinalState {
    match result.outcome() {
        Outcome::Success if !canceling => FinalState::Success,
        Outcome::Canceled => FinalState::Canceled,
        Outcome::Success => FinalState::Canceled,
        Outcome::Failed | Outcome::Unspecified => {
            let kind = match result.failure() {
                FailureKind::Unspecified => FailureKind::RunnerSystem,
                k => k,
            };
            FinalState::Failed {
                kind,
                exit_code: result.exit_code,
            }
        }
    }
}

/// GitLab's collapsible section markers around one attempt.
fn section_start(attempt: u32) -> String {
    format!(
        "section_start:{}:servitor_attempt_{attempt}\r\x1b[0K",
        unix_now()
    )
}

fn section_end(attempt: u32) -> String {
    format!(
        "section_end:{}:servitor_attempt_{attempt}\r\x1b[0K",
        unix_now()
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// "instance i-0abc (m5.large, spot, us-east-1a)", leaving out what is unknown.
fn describe_instance(instance: &servitor_proto::agent::InstanceFacts) -> String {
    let details: Vec<&str> = [
        instance.instance_type.as_str(),
        instance.market.as_str(),
        instance.availability_zone.as_str(),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect();
    let id = if instance.instance_id.is_empty() {
        "an unnamed instance"
    } else {
        &instance.instance_id
    };
    if details.is_empty() {
        format!("instance {id}")
    } else {
        format!("instance {id} ({})", details.join(", "))
    }
}

/// The use of an attempt that was running when the coordinator restarted:
/// no assignment announces it, so it is read off its agent, counted from
/// the restart. Only while nothing else is recorded.
fn resumed_use(
    uses: &mut Vec<AttemptUse>,
    resumed_on: Option<&(String, tokio::time::Instant)>,
    core: &Core,
) {
    let Some((agent, since)) = resumed_on else {
        return;
    };
    if !uses.is_empty() {
        return;
    }
    if let Some(a) = core.agents().into_iter().find(|a| a.agent_id == *agent) {
        uses.push(AttemptUse {
            instance: servitor_proto::agent::InstanceFacts {
                instance_id: a.instance_id,
                instance_type: a.instance_type,
                availability_zone: a.zone,
                market: a.market,
                ..Default::default()
            },
            started: *since,
            ended: None,
        });
    }
}

/// Marks the running attempt's use as ended.
fn end_use(uses: &mut [AttemptUse]) {
    if let Some(last) = uses.last_mut() {
        last.ended.get_or_insert_with(tokio::time::Instant::now);
    }
}

/// "Ran on m5.large (spot, us-east-1a) for 2m 5s; estimated cost $0.0012":
/// where each attempt ran and what the instance time cost at its hourly
/// price. `None` when no attempt ran.
fn cost_line(uses: &[AttemptUse], prices: &PriceBook) -> Option<String> {
    let last = uses.last()?;
    let mut total = Duration::ZERO;
    let mut cost = 0.0;
    let mut unknown = false;
    for u in uses {
        let ran = u
            .ended
            .unwrap_or_else(tokio::time::Instant::now)
            .saturating_duration_since(u.started);
        total += ran;
        let priced = PricedInstance {
            instance_type: u.instance.instance_type.clone(),
            zone: u.instance.availability_zone.clone(),
            market: u.instance.market.clone(),
        };
        match prices.hourly(&priced) {
            Some(hourly) => cost += hourly * ran.as_secs_f64() / 3600.0,
            None => unknown = true,
        }
    }
    let kind = if last.instance.instance_type.is_empty() {
        "an instance of unknown type".to_owned()
    } else {
        last.instance.instance_type.clone()
    };
    let details: Vec<&str> = [
        last.instance.market.as_str(),
        last.instance.availability_zone.as_str(),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect();
    let details = if details.is_empty() {
        String::new()
    } else {
        format!(" ({})", details.join(", "))
    };
    let attempts = if uses.len() > 1 {
        format!(" over {} attempts", uses.len())
    } else {
        String::new()
    };
    let ran = humantime::format_duration(Duration::from_secs(total.as_secs()));
    let estimate = if unknown {
        "estimated cost unknown (no price for this instance type; see budget.on_demand_hourly_usd)"
            .to_owned()
    } else {
        format!("estimated cost ${cost:.4}")
    };
    Some(format!(
        "Ran on {kind}{details} for {ran}{attempts}; {estimate}"
    ))
}

/// The last line of the job log, in gitlab-runner's words.
fn closing_line(state: &FinalState, result: Option<&Finished>) -> String {
    let detail = result.map(|r| r.message.clone()).filter(|m| !m.is_empty());
    match state {
        FinalState::Success => format!("{BOLD_GREEN}Job succeeded{RESET}\n"),
        FinalState::Canceled => format!("{BOLD_RED}ERROR: Job failed: canceled{RESET}\n"),
        FinalState::Failed { kind, exit_code } => {
            let what = detail.unwrap_or_else(|| match exit_code {
                Some(code) => format!("exit code {code}"),
                None => "see the log above".to_owned(),
            });
            let system = matches!(kind, FailureKind::RunnerSystem | FailureKind::Interrupted);
            if system {
                format!("{BOLD_RED}ERROR: Job failed (system failure): {what}{RESET}\n")
            } else {
                format!("{BOLD_RED}ERROR: Job failed: {what}{RESET}\n")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_output_is_skipped_and_gaps_are_marked() {
        let mut p = AttemptProgress::default();
        assert_eq!(
            p.take_output(0, Bytes::from_static(b"hello ")).unwrap(),
            "hello "
        );
        // The same bytes again after a reconnect, plus more: only the new part.
        assert_eq!(
            p.take_output(0, Bytes::from_static(b"hello world"))
                .unwrap(),
            "world"
        );
        assert!(p.take_output(3, Bytes::from_static(b"lo wo")).is_none());
        assert_eq!(p.output_bytes, 11);
        // A gap: what was lost is said, then the output goes on.
        let marked = p.take_output(15, Bytes::from_static(b"!")).unwrap();
        let text = String::from_utf8_lossy(&marked);
        assert!(text.contains("[4 bytes of output were lost"), "{text}");
        assert!(text.ends_with('!'));
        assert_eq!(p.output_bytes, 16);
    }
}
