//! The agent's life: dial the coordinator (reconnecting with backoff), say
//! hello with the attempts still running here, pull work up to capacity, run
//! each assignment with the executor while its output streams back on its
//! own QUIC stream, and report each end.
//!
//! Running jobs do not depend on the connection: a dropped link is redialled
//! while they go on, and their results are reported on the new connection.
//! Not responsible for TLS and enrollment (`link`) or running scripts
//! (`executor`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::agent::{
    agent_message, coordinator_message, AgentMessage, AttemptRef, CancelMode, CoordinatorMessage,
    Draining, FailureKind, Finished, Heartbeat, Hello, InstanceFacts, Interrupting, Outcome,
    OutputHeader, Pull, Rejected, Renewed, Started,
};
use servitor_proto::frame::{write_frame, FrameReader};
use servitor_proto::job::JobPayload;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::executor::{AnyExecutor, CancelSignals, Executor, JobContext, JobResult};
use crate::link::{
    certificate_close, connect, runner_refusal, CertificateClose, LinkError, LinkSettings,
    NotRenewed, Renewal,
};
use servitor_runtime::backoff::Backoff;

/// Reconnect backoff bounds: quick first retry, at most a minute apart.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(60);
/// A session that lasted this long was healthy: reset the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Fastest heartbeat the agent agrees to: more often only costs the
/// coordinator work and tells it nothing new.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Slowest heartbeat the agent agrees to: a failed heartbeat write is how
/// the agent notices a dead link while it has nothing else to say, so two
/// must fit in QUIC's idle timeout.
const MAX_HEARTBEAT: Duration =
    Duration::from_secs(servitor_proto::link::IDLE_TIMEOUT.as_secs() / 2);
// The protocol's own pace is one the agent accepts.
const _: () = assert!(
    servitor_proto::link::HEARTBEAT_INTERVAL.as_millis() >= MIN_HEARTBEAT.as_millis()
        && servitor_proto::link::HEARTBEAT_INTERVAL.as_millis() <= MAX_HEARTBEAT.as_millis()
);
/// Output chunks buffered between the executor and the stream.
const OUTPUT_QUEUE: usize = 256;
/// Output kept per attempt for resending after a reconnect; GitLab keeps at
/// most 4 MiB of a log by default, so this covers a whole log.
const OUTPUT_REPLAY_BYTES: usize = 8 * 1024 * 1024;
/// How long an exiting agent waits for the coordinator to close first.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);
/// How long to wait for the coordinator to take an output stream's tail.
const OUTPUT_FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How long running jobs get to stop when the agent itself is stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How long the coordinator has to answer a renewal before it is asked
/// again.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
    #[error("{0}")]
    Link(#[from] LinkError),
}

/// What the agent needs to run.
#[derive(Debug)]
pub struct AgentSettings {
    pub link: LinkSettings,
    /// The coordinator's runner whose jobs this agent takes; empty for
    /// its only one.
    pub runner: String,
    /// Take one job, report it, and exit (the agent of a task).
    pub one_job: bool,
    pub capacity: u32,
    pub executor: AnyExecutor,
    pub work_dir: PathBuf,
    pub instance: InstanceFacts,
    /// Instance metadata, when the agent watches it.
    pub imds: Option<Arc<crate::imds::Imds>>,
}

/// Something the instance learned about its own future.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The instance is going away (Spot interruption, ASG termination,
    /// SIGTERM): hand every job back, take no more work, exit.
    Interrupt {
        reason: String,
        /// When the instance will be gone.
        deadline: std::time::SystemTime,
    },
    /// The instance is at elevated risk (rebalance recommendation): take no
    /// new work, let running jobs finish here.
    Drain { reason: String },
}

/// Time kept in hand before an interruption deadline: jobs still running
/// then are stopped so their results can be reported before the instance
/// goes.
const DEADLINE_MARGIN: Duration = Duration::from_secs(15);

/// A job attempt running here.
#[derive(Debug)]
struct Running {
    cancel: CancelSignals,
    slot: u32,
}

/// An attempt that ended, waiting to be reported.
#[derive(Debug)]
struct Done {
    attempt: AttemptRef,
    result: JobResult,
    output: OutputLog,
}

/// A result the coordinator has not acknowledged yet, with the output it
/// may still need (a connection can die with both in flight).
#[derive(Debug)]
struct Report {
    finished: Finished,
    output: OutputLog,
    /// Already sent on the current connection.
    sent: bool,
}

/// How a session ended.
enum SessionEnd {
    /// Reconnect.
    Lost,
    /// Stop the agent.
    Exit,
}

/// Runs the agent until the instance goes away (a [`Notice::Interrupt`],
/// or `shutdown`, which is SIGTERM) and every job was handed back, or until
/// the coordinator tells it to exit. Whatever the way out, the tasks it
/// spawned are ended or given [`SHUTDOWN_GRACE`] to end before it returns.
///
/// # Errors
/// Only what reconnecting cannot fix: an enrollment refusal.
pub async fn run(
    settings: AgentSettings,
    mut notices: mpsc::Receiver<Notice>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let settings = Arc::new(settings);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut state = AgentState::new(Some(done_tx));
    let mut signals = Signals {
        notices: &mut notices,
        shutdown: &shutdown,
        stop_seen: false,
    };
    let result = serve(&settings, &mut state, &mut done_rx, &mut signals).await;
    state.wind_down().await;
    result
}

/// Connects and runs sessions, one after another, until the agent is done.
async fn serve(
    settings: &Arc<AgentSettings>,
    state: &mut AgentState,
    done_rx: &mut mpsc::UnboundedReceiver<Done>,
    signals: &mut Signals<'_>,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::try_new(RECONNECT_MIN, RECONNECT_MAX)
        .expect("reconnect backoff bounds are valid constants");
    loop {
        if state.interrupt.is_some() && state.running.is_empty() {
            return Ok(());
        }
        let link = tokio::select! {
            notice = signals.next() => {
                state.apply_notice(notice);
                // About to dial anyway: the notice goes out after the hello.
                state.redial_now = false;
                continue;
            }
            link = connect(&settings.link) => link,
        };
        let link = match link {
            Ok(link) => link,
            Err(e) if !e.is_retryable() => return Err(AgentError::Refused(e.to_string())),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the coordinator");
                if wait_to_redial(delay, state, signals, done_rx).await == Redial::Now {
                    backoff.reset();
                }
                continue;
            }
        };
        tracing::info!(agent_id = %link.agent_id, "connected to the coordinator");
        state.links.send_replace(Some(link.connection.clone()));
        let started = tokio::time::Instant::now();
        let mut link = link;
        let end = session(
            settings,
            &link.connection,
            &mut link.renewal,
            state,
            done_rx,
            signals,
        )
        .await;
        if let SessionEnd::Exit = end {
            // The control stream is finished: give the coordinator a moment
            // to read its end and close, so it sees a clean goodbye.
            let _ = tokio::time::timeout(GOODBYE_WAIT, link.connection.closed()).await;
        }
        state.links.send_replace(None);
        let closed_by_coordinator = link.connection.close_reason();
        link.connection.close(0u32.into(), b"bye");
        match closed_by_coordinator.as_ref().and_then(certificate_close) {
            Some(CertificateClose::Revoked(reason)) => {
                tracing::error!(agent_id = %link.agent_id, %reason, "the coordinator revoked this agent's certificate; stopping");
                crate::link::forget_credentials(&settings.link)?;
                return Err(AgentError::Refused(
                    LinkError::Revoked(format!(" ({reason})")).to_string(),
                ));
            }
            Some(CertificateClose::Expired(reason)) => {
                tracing::warn!(agent_id = %link.agent_id, %reason, "the coordinator closed the link: the agent's certificate ran out");
            }
            None => {}
        }
        if let Some(reason) = closed_by_coordinator.as_ref().and_then(runner_refusal) {
            tracing::error!(agent_id = %link.agent_id, runner = %settings.runner, %reason, "the coordinator does not serve this agent's runner; stopping");
            return Err(AgentError::Refused(format!(
                "the coordinator refused runner = {:?}: {reason}; set runner in the agent's configuration (RUNNER= in user-data) to one of its runners",
                settings.runner
            )));
        }
        match end {
            SessionEnd::Exit => return Ok(()),
            SessionEnd::Lost => {
                if started.elapsed() >= HEALTHY_SESSION {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "lost the coordinator; reconnecting");
                if wait_to_redial(delay, state, signals, done_rx).await == Redial::Now {
                    backoff.reset();
                }
            }
        }
    }
}

/// How a wait before redialling the coordinator ended.
#[derive(Debug, PartialEq, Eq)]
enum Redial {
    /// The delay ran out.
    AfterDelay,
    /// The instance is going away and the coordinator has not been told:
    /// dial at once, its jobs must start elsewhere before the deadline.
    Now,
}

/// Waits `delay` before redialling while still minding the instance:
/// notices are applied the moment they come (a drain stops new work at
/// once), finished attempts are recorded, and an interruption the
/// coordinator has not heard of ends the wait.
async fn wait_to_redial(
    delay: Duration,
    state: &mut AgentState,
    signals: &mut Signals<'_>,
    done_rx: &mut mpsc::UnboundedReceiver<Done>,
) -> Redial {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        if std::mem::take(&mut state.redial_now) {
            tracing::info!("redialling at once to report the interruption");
            return Redial::Now;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Redial::AfterDelay,
            notice = signals.next() => {
                state.apply_notice(notice);
            }
            Some(done) = done_rx.recv() => {
                tracing::info!(attempt = %done.attempt, result = ?done.result, "attempt ended while the coordinator is out of reach");
                state.finish(done);
            }
        }
    }
}

/// Notices from instance metadata, and SIGTERM turned into one.
struct Signals<'a> {
    notices: &'a mut mpsc::Receiver<Notice>,
    shutdown: &'a CancellationToken,
    stop_seen: bool,
}

impl Signals<'_> {
    /// The next notice; never returns if there are none.
    async fn next(&mut self) -> Notice {
        tokio::select! {
            () = self.shutdown.cancelled(), if !self.stop_seen => {
                self.stop_seen = true;
                Notice::Interrupt {
                    reason: "the agent was told to stop (SIGTERM)".into(),
                    deadline: std::time::SystemTime::now() + SHUTDOWN_GRACE,
                }
            }
            notice = self.notices.recv() => match notice {
                Some(n) => n,
                None => std::future::pending().await,
            },
        }
    }
}

#[derive(Debug)]
struct AgentState {
    running: HashMap<(i64, u32), Running>,
    /// Results the coordinator has not acknowledged.
    reports: Vec<Report>,
    draining: bool,
    exit_when_idle: bool,
    done_tx: Option<mpsc::UnboundedSender<Done>>,
    /// Set once the instance is going away; sent on every (re)connection.
    interrupt: Option<Interrupting>,
    /// Why the agent takes no new work, if it drains for a notice.
    drain_reason: Option<String>,
    /// Parent of every attempt's abort token: cancelled at the interruption
    /// deadline.
    abort_all: CancellationToken,
    /// The current connection, for attempts' output streams.
    links: watch::Sender<Option<quinn::Connection>>,
    /// An interruption was noticed and not yet written on a live control
    /// stream: the next wait to redial is skipped.
    redial_now: bool,
    /// Every task the agent spawns: attempts and interruption deadline
    /// timers.
    tasks: TaskTracker,
    /// Stops the deadline timers when the agent exits.
    timers: CancellationToken,
}

impl AgentState {
    fn new(done_tx: Option<mpsc::UnboundedSender<Done>>) -> Self {
        Self {
            running: HashMap::new(),
            reports: Vec::new(),
            draining: false,
            exit_when_idle: false,
            done_tx,
            interrupt: None,
            drain_reason: None,
            abort_all: CancellationToken::new(),
            links: watch::Sender::new(None),
            redial_now: false,
            tasks: TaskTracker::new(),
            timers: CancellationToken::new(),
        }
    }

    /// Ends what the agent spawned, on its way out: deadline timers stop,
    /// attempts still running are killed (no session is left to report
    /// them), and the tasks get [`SHUTDOWN_GRACE`] to end.
    async fn wind_down(&mut self) {
        self.timers.cancel();
        if !self.running.is_empty() {
            tracing::warn!(
                running = self.running.len(),
                "exiting with jobs still running; killing them"
            );
            self.abort_all.cancel();
        }
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                grace = ?SHUTDOWN_GRACE,
                "tasks did not end in time; exiting without them"
            );
        }
    }

    /// Applies a notice; returns the message to tell the coordinator, if
    /// anything changed.
    fn apply_notice(&mut self, notice: Notice) -> Option<AgentMessage> {
        match notice {
            Notice::Interrupt { reason, deadline } => {
                if self.interrupt.is_some() {
                    return None;
                }
                let left = deadline
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                let abort_in = left.saturating_sub(DEADLINE_MARGIN);
                tracing::warn!(%reason, deadline_in = ?left, running = self.running.len(), "instance is going away: handing jobs back");
                self.draining = true;
                self.redial_now = true;
                let abort_all = self.abort_all.clone();
                let stop = self.timers.clone();
                let span = tracing::info_span!("interruption_deadline", %reason);
                self.tasks.spawn(
                    async move {
                        tokio::select! {
                            () = tokio::time::sleep(abort_in) => {
                                tracing::warn!("interruption deadline near; stopping the jobs still running");
                                abort_all.cancel();
                            }
                            () = stop.cancelled() => {}
                        }
                    }
                    .instrument(span),
                );
                let deadline_unix_ms = deadline
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .and_then(|d| i64::try_from(d.as_millis()).ok())
                    .unwrap_or(0);
                let notice = Interrupting {
                    reason,
                    deadline_unix_ms,
                };
                self.interrupt = Some(notice.clone());
                Some(msg(agent_message::Msg::Interrupting(notice)))
            }
            Notice::Drain { reason } => {
                if self.draining {
                    return None;
                }
                tracing::warn!(%reason, "taking no new work; running jobs finish here");
                self.draining = true;
                self.drain_reason = Some(reason.clone());
                Some(msg(agent_message::Msg::Draining(Draining { reason })))
            }
        }
    }

    /// Interrupted and nothing left to run or report: time to go.
    fn done_after_interrupt(&self) -> bool {
        self.interrupt.is_some() && self.running.is_empty() && self.reports.is_empty()
    }

    fn finish(&mut self, done: Done) {
        let Done {
            attempt,
            result,
            output,
        } = done;
        self.running.remove(&(attempt.job_id, attempt.attempt));
        let finished = finished_message(attempt, result, output.total());
        self.reports.push(Report {
            finished,
            output,
            sent: false,
        });
    }

    fn free_slot(&self, capacity: u32) -> Option<u32> {
        (0..capacity).find(|slot| !self.running.values().any(|r| r.slot == *slot))
    }
}

fn finished_message(attempt: AttemptRef, result: JobResult, output_bytes: u64) -> Finished {
    let (outcome, failure, exit_code, message) = match result {
        JobResult::Success => (
            Outcome::Success,
            FailureKind::Unspecified,
            None,
            String::new(),
        ),
        JobResult::Failed {
            kind,
            exit_code,
            message,
        } => (Outcome::Failed, kind, exit_code, message),
        JobResult::Canceled { message } => {
            (Outcome::Canceled, FailureKind::Unspecified, None, message)
        }
    };
    Finished {
        attempt: Some(attempt),
        outcome: outcome.into(),
        failure: failure.into(),
        exit_code,
        output_bytes,
        message,
    }
}

fn msg(m: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

async fn session(
    settings: &Arc<AgentSettings>,
    connection: &quinn::Connection,
    renewal: &mut Renewal,
    state: &mut AgentState,
    done_rx: &mut mpsc::UnboundedReceiver<Done>,
    signals: &mut Signals<'_>,
) -> SessionEnd {
    let (mut send, recv) = match connection.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not open the control stream");
            return SessionEnd::Lost;
        }
    };
    let mut frames = FrameReader::new(recv);
    let free = settings
        .capacity
        .saturating_sub(len_u32(state.running.len()));
    let hello = Hello {
        protocol_version: servitor_proto::link::PROTOCOL_VERSION,
        agent_name: settings.link.agent_name.clone(),
        instance: Some(settings.instance.clone()),
        capacity: settings.capacity,
        free_slots: if state.draining { 0 } else { free },
        running: state
            .running
            .keys()
            .map(|(j, a)| AttemptRef::new(*j, *a))
            .collect(),
        executor: settings.executor.name().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        reporting: state
            .reports
            .iter()
            .filter_map(|r| r.finished.attempt)
            .collect(),
        runner: settings.runner.clone(),
    };
    if write_frame(&mut send, &msg(agent_message::Msg::Hello(hello)))
        .await
        .is_err()
    {
        return SessionEnd::Lost;
    }
    // What happened while we were away: notices, then results.
    let standing: Vec<AgentMessage> = state
        .interrupt
        .clone()
        .map(|n| msg(agent_message::Msg::Interrupting(n)))
        .into_iter()
        .chain(
            state
                .drain_reason
                .clone()
                .map(|reason| msg(agent_message::Msg::Draining(Draining { reason }))),
        )
        .collect();
    for message in standing {
        if write_frame(&mut send, &message).await.is_err() {
            return SessionEnd::Lost;
        }
    }
    // Any interruption is told now.
    state.redial_now = false;
    // Results not acknowledged before: their output may have died with the
    // old connection, so it goes again too (the coordinator skips what it
    // has).
    for report in &mut state.reports {
        report.sent = false;
    }
    if send_reports(connection, &mut send, state).await.is_err() {
        return SessionEnd::Lost;
    }

    // The coordinator names its pace in its Welcome; until then, the
    // protocol's.
    let mut heartbeat = heartbeat_timer(servitor_proto::link::HEARTBEAT_INTERVAL, false);
    let mut sequence = 0u64;
    // The certificate is renewed over this link when its time comes; while
    // a request is out, the timer waits for its answer instead.
    let renew_timer = tokio::time::sleep(renewal.due_in());
    tokio::pin!(renew_timer);
    let mut renewing = false;
    loop {
        if state.exit_when_idle && state.running.is_empty() {
            tracing::info!("drained and idle; exiting");
            let _ = send.finish();
            return SessionEnd::Exit;
        }
        if state.done_after_interrupt() {
            tracing::info!("every job handed back or reported; exiting");
            let _ = send.finish();
            return SessionEnd::Exit;
        }
        tokio::select! {
            notice = signals.next() => {
                if let Some(message) = state.apply_notice(notice) {
                    if write_frame(&mut send, &message).await.is_err() {
                        return SessionEnd::Lost;
                    }
                    if matches!(message.msg, Some(agent_message::Msg::Interrupting(_))) {
                        state.redial_now = false;
                    }
                }
            }
            () = &mut renew_timer => {
                if renewing {
                    tracing::warn!(waited = ?RENEW_TIMEOUT, "the coordinator did not answer the certificate renewal; asking again");
                }
                match renewal.request() {
                    Ok(renew) => {
                        if write_frame(&mut send, &msg(agent_message::Msg::Renew(renew))).await.is_err() {
                            return SessionEnd::Lost;
                        }
                        renewing = true;
                        renew_timer.as_mut().reset(tokio::time::Instant::now() + RENEW_TIMEOUT);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot ask for a new certificate");
                        renew_timer.as_mut().reset(tokio::time::Instant::now() + renewal.retry_in());
                    }
                }
            }
            _ = heartbeat.tick() => {
                sequence += 1;
                if write_frame(&mut send, &msg(agent_message::Msg::Heartbeat(Heartbeat { sequence }))).await.is_err() {
                    return SessionEnd::Lost;
                }
            }
            done = done_rx.recv() => {
                let Some(done) = done else { return SessionEnd::Exit };
                tracing::info!(attempt = %done.attempt, result = ?done.result, "attempt ended");
                state.finish(done);
                // The output went on the attempt's own stream, unless its
                // end was not seen to arrive there (the attempt ended while
                // the link was down, or its stream died with an older
                // link): then it goes again, before the result.
                if let Some(report) = state.reports.last_mut() {
                    let resend = !report.output.delivered;
                    if send_report(connection, &mut send, report, resend).await.is_err() {
                        return SessionEnd::Lost;
                    }
                }
                if !state.draining {
                    let free = settings.capacity.saturating_sub(len_u32(state.running.len()));
                    if write_frame(&mut send, &msg(agent_message::Msg::Pull(Pull { free_slots: free }))).await.is_err() {
                        return SessionEnd::Lost;
                    }
                }
            }
            // Cancel-safe: a frame half-read when another branch wins is
            // kept for the next turn.
            frame = frames.next::<CoordinatorMessage>() => {
                let message = match frame {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        tracing::warn!("coordinator closed the control stream");
                        return SessionEnd::Lost;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control stream failed");
                        return SessionEnd::Lost;
                    }
                };
                if let Some(coordinator_message::Msg::Welcome(welcome)) = &message.msg {
                    let pace = heartbeat_interval(welcome.heartbeat_interval_ms);
                    if welcome.heartbeat_interval_ms != 0 && pace != Duration::from_millis(welcome.heartbeat_interval_ms.into()) {
                        tracing::warn!(
                            asked_ms = welcome.heartbeat_interval_ms,
                            using = ?pace,
                            "the coordinator asked for a heartbeat interval out of bounds; using the nearest bound"
                        );
                    }
                    heartbeat = heartbeat_timer(pace, true);
                }
                if let Some(coordinator_message::Msg::Renewed(answer)) = message.msg {
                    renewing = false;
                    let next = renewed(renewal, answer);
                    renew_timer.as_mut().reset(tokio::time::Instant::now() + next);
                    continue;
                }
                let replies = handle(settings, state, message);
                for reply in replies {
                    if write_frame(&mut send, &reply).await.is_err() {
                        return SessionEnd::Lost;
                    }
                }
            }
        }
    }
}

/// Takes the answer to a renewal; returns how long until the next request.
fn renewed(renewal: &mut Renewal, answer: Renewed) -> Duration {
    match renewal.accept(answer) {
        Ok(valid_for) => {
            tracing::info!(
                valid_for = %humantime::format_duration(valid_for),
                "renewed the agent's certificate over the link"
            );
            renewal.due_in()
        }
        Err(not_renewed) => {
            let retry_in = renewal.retry_in();
            let expires = humantime::format_rfc3339_seconds(renewal.expires_at());
            match not_renewed {
                NotRenewed::Refused(reason) => tracing::warn!(
                    %reason, %expires, ?retry_in,
                    "the coordinator refused to renew the agent's certificate; the link ends when it expires unless a later request succeeds"
                ),
                NotRenewed::Unusable(reason) => tracing::warn!(
                    %reason, %expires, ?retry_in,
                    "could not take the renewed certificate; asking again"
                ),
            }
            retry_in
        }
    }
}

/// The heartbeat interval to keep: what the coordinator asked for in its
/// Welcome (milliseconds; 0 means it left it to the protocol's default),
/// within [`MIN_HEARTBEAT`] and [`MAX_HEARTBEAT`].
fn heartbeat_interval(asked_ms: u32) -> Duration {
    if asked_ms == 0 {
        return servitor_proto::link::HEARTBEAT_INTERVAL;
    }
    Duration::from_millis(asked_ms.into()).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

/// A heartbeat timer at `period`; its first tick is at once, or one period
/// from now when `delayed` (the pace changed mid-session).
fn heartbeat_timer(period: Duration, delayed: bool) -> tokio::time::Interval {
    let start = if delayed {
        tokio::time::Instant::now() + period
    } else {
        tokio::time::Instant::now()
    };
    let mut timer = tokio::time::interval_at(start, period);
    // After a stall (a slow write), one heartbeat says as much as a burst.
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Handles one coordinator message; returns the replies to send.
fn handle(
    settings: &Arc<AgentSettings>,
    state: &mut AgentState,
    message: CoordinatorMessage,
) -> Vec<AgentMessage> {
    let mut replies = Vec::new();
    match message.msg {
        Some(coordinator_message::Msg::Welcome(welcome)) => {
            for stale in welcome.stale {
                if let Some(r) = state.running.get(&(stale.job_id, stale.attempt)) {
                    tracing::warn!(attempt = %stale, "coordinator no longer wants this attempt; killing it");
                    r.cancel.abort.cancel();
                }
            }
        }
        Some(coordinator_message::Msg::Assign(assign)) => {
            let Some(attempt) = assign.attempt else {
                return replies;
            };
            let reject = |reason: &str| {
                msg(agent_message::Msg::Rejected(Rejected {
                    attempt: Some(attempt),
                    reason: reason.to_owned(),
                }))
            };
            if state.draining {
                replies.push(reject("agent is draining"));
                return replies;
            }
            let Some(slot) = state.free_slot(settings.capacity) else {
                replies.push(reject("no free slot"));
                return replies;
            };
            let job = match JobPayload::from_json(&assign.job_json) {
                Ok(job) => job,
                Err(e) => {
                    replies.push(reject(&format!("job payload unusable: {e}")));
                    return replies;
                }
            };
            let cancel = CancelSignals {
                graceful: CancellationToken::new(),
                abort: state.abort_all.child_token(),
            };
            state.running.insert(
                (attempt.job_id, attempt.attempt),
                Running {
                    cancel: cancel.clone(),
                    slot,
                },
            );
            let Some(done_tx) = state.done_tx.clone() else {
                return replies;
            };
            let span = tracing::info_span!(
                "attempt",
                job_id = attempt.job_id,
                attempt = attempt.attempt
            );
            state.tasks.spawn(
                run_attempt(
                    settings.clone(),
                    state.links.subscribe(),
                    attempt,
                    JobOrder {
                        job,
                        gitlab_url: assign.gitlab_url,
                        caches: assign.caches,
                    },
                    slot,
                    cancel,
                    done_tx,
                )
                .instrument(span),
            );
            replies.push(msg(agent_message::Msg::Started(Started {
                attempt: Some(attempt),
            })));
            if settings.one_job {
                // The agent of a task: this job is its only one.
                tracing::info!(%attempt, "took its one job; exits once it is reported");
                state.draining = true;
                state.exit_when_idle = true;
            }
        }
        Some(coordinator_message::Msg::Cancel(cancel)) => {
            let Some(attempt) = cancel.attempt else {
                return replies;
            };
            if let Some(r) = state.running.get(&(attempt.job_id, attempt.attempt)) {
                tracing::info!(%attempt, reason = %cancel.reason, mode = ?cancel.mode(), "cancel");
                match cancel.mode() {
                    CancelMode::Abort => r.cancel.abort.cancel(),
                    CancelMode::Graceful | CancelMode::Unspecified => r.cancel.graceful.cancel(),
                }
            }
        }
        Some(coordinator_message::Msg::Drain(drain)) => {
            tracing::info!(reason = %drain.reason, exit_when_idle = drain.exit_when_idle, "draining");
            state.draining = true;
            state.exit_when_idle |= drain.exit_when_idle;
        }
        Some(coordinator_message::Msg::Ack(ack)) => {
            if let Some(attempt) = ack.attempt {
                state
                    .reports
                    .retain(|r| r.finished.attempt != Some(attempt));
            }
        }
        // Renewals are the session's; a stray answer means nothing here.
        Some(coordinator_message::Msg::Heartbeat(_) | coordinator_message::Msg::Renewed(_))
        | None => {}
    }
    replies
}

/// Sends every report not sent on this connection: its output on a stream
/// of its own, then the result.
async fn send_reports(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    state: &mut AgentState,
) -> Result<(), servitor_proto::frame::FrameError> {
    for report in state.reports.iter_mut().filter(|r| !r.sent) {
        send_report(connection, send, report, true).await?;
    }
    Ok(())
}

/// Sends one result, after its output on a stream of its own when
/// `with_output` (the coordinator skips what it already has).
async fn send_report(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    report: &mut Report,
    with_output: bool,
) -> Result<(), servitor_proto::frame::FrameError> {
    if let (Some(attempt), true) = (report.finished.attempt, with_output) {
        if let Ok(mut stream) = connection.open_uni().await {
            let header = OutputHeader {
                attempt: Some(attempt),
                offset: report.output.start,
            };
            if write_frame(&mut stream, &header).await.is_ok()
                && matches!(
                    write_output(&mut stream, &report.output.kept).await,
                    Sent::Ok
                )
            {
                let _ = stream.finish();
            }
        }
    }
    write_frame(
        send,
        &msg(agent_message::Msg::Finished(report.finished.clone())),
    )
    .await?;
    report.sent = true;
    Ok(())
}

/// What an assignment asks the agent to run.
#[derive(Debug)]
struct JobOrder {
    job: JobPayload,
    /// Where the job's artifacts go and its dependencies come from.
    gitlab_url: String,
    /// Where its caches live.
    caches: Vec<servitor_proto::agent::CacheAccess>,
}

/// Runs one attempt and streams its output on its own stream, resending
/// it on a new stream after a reconnect.
async fn run_attempt(
    settings: Arc<AgentSettings>,
    links: watch::Receiver<Option<quinn::Connection>>,
    attempt: AttemptRef,
    order: JobOrder,
    slot: u32,
    cancel: CancelSignals,
    done_tx: mpsc::UnboundedSender<Done>,
) {
    let work_dir = settings
        .work_dir
        .join(format!("{}-{}", attempt.job_id, attempt.attempt));
    let ctx = JobContext {
        job: order.job,
        gitlab_url: order.gitlab_url,
        caches: order.caches,
        attempt: attempt.attempt,
        work_dir: work_dir.clone(),
        concurrent_id: slot,
        agent_name: settings.link.agent_name.clone(),
        owner: settings.owner(),
    };
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(OUTPUT_QUEUE);
    let forward = forward_output(attempt, out_rx, links, cancel.abort.clone());
    let (result, output) = tokio::join!(settings.executor.run(ctx, out_tx, cancel), forward);
    if let Err(e) = tokio::fs::remove_dir_all(&work_dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %work_dir.display(), error = %e, "could not remove the build directory");
        }
    }
    let _ = done_tx.send(Done {
        attempt,
        result,
        output,
    });
}

/// An attempt's output as far back as it can be resent.
#[derive(Debug, Default)]
struct OutputLog {
    /// The most recent output, at most [`OUTPUT_REPLAY_BYTES`].
    kept: Vec<u8>,
    /// Position of `kept[0]` in the attempt's output.
    start: u64,
    /// The coordinator's end of the link acknowledged all of it, on a
    /// stream of the link the attempt ended on.
    delivered: bool,
}

impl OutputLog {
    fn push(&mut self, chunk: &[u8]) {
        self.kept.extend_from_slice(chunk);
        if self.kept.len() > OUTPUT_REPLAY_BYTES {
            let cut = self.kept.len() - OUTPUT_REPLAY_BYTES;
            self.kept.drain(..cut);
            self.start += cut as u64;
        }
    }

    fn total(&self) -> u64 {
        self.start + self.kept.len() as u64
    }
}

/// What became of a write to the output stream.
enum Sent {
    Ok,
    /// The coordinator refused the stream: the attempt is stale.
    Refused,
    /// The link is gone.
    Lost,
}

async fn write_output(stream: &mut quinn::SendStream, bytes: &[u8]) -> Sent {
    match stream.write_all(bytes).await {
        Ok(()) => Sent::Ok,
        Err(quinn::WriteError::Stopped(_)) => Sent::Refused,
        Err(_) => Sent::Lost,
    }
}

/// Opens an output stream on the current connection and resends what the
/// log holds; the coordinator skips what it already has.
async fn reopen(
    links: &watch::Receiver<Option<quinn::Connection>>,
    attempt: AttemptRef,
    log: &OutputLog,
) -> Option<quinn::SendStream> {
    let connection = links.borrow().clone()?;
    let mut stream = connection.open_uni().await.ok()?;
    let header = OutputHeader {
        attempt: Some(attempt),
        offset: log.start,
    };
    write_frame(&mut stream, &header).await.ok()?;
    match write_output(&mut stream, &log.kept).await {
        Sent::Ok => Some(stream),
        Sent::Refused | Sent::Lost => None,
    }
}

/// Moves an attempt's output from the executor onto the link, across
/// reconnects. Returns the output log, kept until the result is
/// acknowledged.
async fn forward_output(
    attempt: AttemptRef,
    mut output: mpsc::Receiver<Bytes>,
    mut links: watch::Receiver<Option<quinn::Connection>>,
    abort: CancellationToken,
) -> OutputLog {
    let mut log = OutputLog::default();
    let mut stream = reopen(&links, attempt, &log).await;
    let mut refused = false;
    loop {
        tokio::select! {
            chunk = output.recv() => {
                let Some(chunk) = chunk else { break };
                log.push(&chunk);
                if let Some(s) = stream.as_mut() {
                    match write_output(s, &chunk).await {
                        Sent::Ok => {}
                        Sent::Refused => {
                            // The attempt is stale: stop it, but keep
                            // draining so the executor can end.
                            tracing::warn!(%attempt, "output stream refused; stopping the attempt");
                            abort.cancel();
                            refused = true;
                            stream = None;
                        }
                        Sent::Lost => {
                            tracing::warn!(%attempt, "output stream lost with the link; the job goes on and its output is resent after the reconnect");
                            stream = None;
                        }
                    }
                }
            }
            // A new connection (or none): the old stream may be dead even
            // if writes to it still succeed, so start over on the new one.
            changed = links.changed(), if !refused => {
                if changed.is_err() {
                    refused = true;
                } else {
                    stream = reopen(&links, attempt, &log).await;
                }
            }
        }
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
        // Let the coordinator read the tail before the result is sent.
        // Output not seen to arrive goes again with the result.
        log.delivered = matches!(
            tokio::time::timeout(OUTPUT_FLUSH_WAIT, s.stopped()).await,
            Ok(Ok(None))
        );
    }
    log
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_log_keeps_the_tail_and_its_position() {
        let mut log = OutputLog::default();
        log.push(&vec![b'a'; OUTPUT_REPLAY_BYTES - 1]);
        log.push(b"bcd");
        assert_eq!(log.kept.len(), OUTPUT_REPLAY_BYTES);
        assert_eq!(log.start, 2);
        assert_eq!(log.total(), OUTPUT_REPLAY_BYTES as u64 + 2);
        assert!(log.kept.ends_with(b"bcd"));
    }

    #[test]
    fn heartbeat_interval_follows_the_coordinator_within_bounds() {
        let ms = Duration::from_millis;
        let cases = [
            (
                0,
                servitor_proto::link::HEARTBEAT_INTERVAL,
                "unset: the protocol's",
            ),
            (250, ms(250), "as asked"),
            (5_000, ms(5_000), "as asked"),
            (10_000, MAX_HEARTBEAT, "the slowest allowed, as asked"),
            (1, MIN_HEARTBEAT, "too fast: the fastest allowed"),
            (99, MIN_HEARTBEAT, "too fast: the fastest allowed"),
            (100, MIN_HEARTBEAT, "the fastest allowed, as asked"),
            (60_000, MAX_HEARTBEAT, "too slow: the slowest allowed"),
            (u32::MAX, MAX_HEARTBEAT, "too slow: the slowest allowed"),
        ];
        for (asked, want, why) in cases {
            assert_eq!(heartbeat_interval(asked), want, "{asked} ms: {why}");
        }
        assert!(
            MAX_HEARTBEAT * 2 <= servitor_proto::link::IDLE_TIMEOUT,
            "two heartbeats fit in QUIC's idle timeout"
        );
    }

    fn spot_notice() -> Notice {
        Notice::Interrupt {
            reason: "spot".into(),
            deadline: std::time::SystemTime::now() + Duration::from_secs(120),
        }
    }

    /// An agent with one attempt running, whose results come on the
    /// returned channel.
    fn busy_agent() -> (AgentState, mpsc::UnboundedReceiver<Done>) {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut state = AgentState::new(Some(done_tx));
        let cancel = CancelSignals {
            graceful: CancellationToken::new(),
            abort: state.abort_all.child_token(),
        };
        state.running.insert((7, 1), Running { cancel, slot: 0 });
        (state, done_rx)
    }

    fn signals<'a>(
        notices: &'a mut mpsc::Receiver<Notice>,
        shutdown: &'a CancellationToken,
    ) -> Signals<'a> {
        Signals {
            notices,
            shutdown,
            stop_seen: false,
        }
    }

    /// Five seconds into the longest reconnect backoff.
    const INTO_THE_WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn spot_notice_during_the_reconnect_backoff_is_applied_at_once_and_ends_it() {
        let (mut state, mut done_rx) = busy_agent();
        let (notice_tx, mut notices) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let mut signals = signals(&mut notices, &shutdown);
        tokio::spawn(async move {
            tokio::time::sleep(INTO_THE_WAIT).await;
            notice_tx.send(spot_notice()).await
        });
        let started = tokio::time::Instant::now();
        let end = wait_to_redial(RECONNECT_MAX, &mut state, &mut signals, &mut done_rx).await;
        assert_eq!(end, Redial::Now);
        assert_eq!(
            started.elapsed(),
            INTO_THE_WAIT,
            "the agent redials the moment the notice comes"
        );
        assert!(state.draining, "no new work from now on");
        assert!(state.interrupt.is_some(), "it is told after the hello");
        assert!(
            !state.abort_all.is_cancelled(),
            "the job runs on until the coordinator or the deadline stops it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_during_the_reconnect_backoff_ends_it() {
        let (mut state, mut done_rx) = busy_agent();
        let (_notice_tx, mut notices) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let mut signals = signals(&mut notices, &shutdown);
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                tokio::time::sleep(INTO_THE_WAIT).await;
                shutdown.cancel();
            }
        });
        let started = tokio::time::Instant::now();
        let end = wait_to_redial(RECONNECT_MAX, &mut state, &mut signals, &mut done_rx).await;
        assert_eq!((end, started.elapsed()), (Redial::Now, INTO_THE_WAIT));
        let told = state.interrupt.as_ref().map(|i| i.reason.clone());
        assert!(
            told.as_deref().is_some_and(|r| r.contains("SIGTERM")),
            "{told:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_and_finished_attempts_during_the_backoff_are_applied_while_it_goes_on() {
        let (mut state, mut done_rx) = busy_agent();
        let done_tx = state
            .done_tx
            .clone()
            .expect("the agent has a result channel");
        let (notice_tx, mut notices) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let mut signals = signals(&mut notices, &shutdown);
        tokio::spawn(async move {
            tokio::time::sleep(INTO_THE_WAIT).await;
            let _ = notice_tx
                .send(Notice::Drain {
                    reason: "rebalance".into(),
                })
                .await;
            let _ = done_tx.send(Done {
                attempt: AttemptRef::new(7, 1),
                result: JobResult::Success,
                output: OutputLog::default(),
            });
        });
        let just_after = INTO_THE_WAIT + Duration::from_millis(1);
        let waited = tokio::time::timeout(
            just_after,
            wait_to_redial(RECONNECT_MAX, &mut state, &mut signals, &mut done_rx),
        )
        .await;
        assert!(waited.is_err(), "a drain or a result does not cut it short");
        assert!(state.draining, "the drain is applied at once");
        assert!(state.running.is_empty(), "the attempt's end is recorded");
        assert_eq!(state.reports.len(), 1, "its result waits for the link");
        let started = tokio::time::Instant::now();
        let end = wait_to_redial(RECONNECT_MAX, &mut state, &mut signals, &mut done_rx).await;
        assert_eq!(
            (end, started.elapsed()),
            (Redial::AfterDelay, RECONNECT_MAX)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn spot_notice_the_lost_session_could_not_send_skips_one_backoff() {
        let (mut state, mut done_rx) = busy_agent();
        let (_notice_tx, mut notices) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let mut signals = signals(&mut notices, &shutdown);
        // Noticed just as the link died: the Interrupting frame never went.
        assert!(state.apply_notice(spot_notice()).is_some());
        let started = tokio::time::Instant::now();
        let end = wait_to_redial(RECONNECT_MAX, &mut state, &mut signals, &mut done_rx).await;
        assert_eq!((end, started.elapsed()), (Redial::Now, Duration::ZERO));
        // Only once: a coordinator that stays out of reach is not hammered.
        let delay = Duration::from_secs(3);
        let end = wait_to_redial(delay, &mut state, &mut signals, &mut done_rx).await;
        assert_eq!((end, started.elapsed()), (Redial::AfterDelay, delay));
    }

    #[tokio::test(start_paused = true)]
    async fn exit_stops_deadline_timers_and_waits_for_tasks_only_so_long() {
        let mut state = AgentState::new(None);
        assert!(state.apply_notice(spot_notice()).is_some());
        assert_eq!(state.tasks.len(), 1, "the deadline timer runs");
        state.tasks.spawn(std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        state.wind_down().await;
        assert_eq!(
            started.elapsed(),
            SHUTDOWN_GRACE,
            "a stuck task holds the exit up for the grace period only"
        );
        assert_eq!(
            state.tasks.len(),
            1,
            "the timer ended; the stuck task is left"
        );
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            !state.abort_all.is_cancelled(),
            "no timer fires after the agent exited"
        );
    }

    #[tokio::test]
    async fn exit_kills_attempts_nobody_can_report_and_waits_for_them() {
        let work = tempfile::tempdir().expect("a temporary directory");
        let settings = Arc::new(AgentSettings {
            link: LinkSettings::new(
                "127.0.0.1:9",
                crate::link::CaTrust::Sha256Pin(String::new()),
                servitor_runtime::secret::Secret::new("unused"),
                "exit-test",
            ),
            runner: String::new(),
            one_job: false,
            capacity: 1,
            executor: AnyExecutor::from(crate::executor::ShellExecutor::new()),
            work_dir: work.path().to_path_buf(),
            instance: InstanceFacts::default(),
            imds: None,
        });
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut state = AgentState::new(Some(done_tx));
        let job = crate::executor::testing::job_with(&["sleep 300"], &[], 600);
        let attempt = AttemptRef::new(job.id, 1);
        let assign = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Assign(
                servitor_proto::agent::Assign {
                    attempt: Some(attempt),
                    job_json: serde_json::to_vec(&job).expect("a payload serializes"),
                    gitlab_url: String::new(),
                    caches: Vec::new(),
                },
            )),
        };
        let replies = handle(&settings, &mut state, assign);
        assert!(
            matches!(
                replies.as_slice(),
                [AgentMessage {
                    msg: Some(agent_message::Msg::Started(_))
                }]
            ),
            "{replies:?}"
        );
        let started = tokio::time::Instant::now();
        state.wind_down().await;
        assert!(
            started.elapsed() < SHUTDOWN_GRACE / 2,
            "the job was killed, not waited for: {:?}",
            started.elapsed()
        );
        assert!(state.tasks.is_empty(), "the attempt's task ended");
        let done = done_rx.try_recv().expect("the attempt ended");
        assert!(
            matches!(done.result, JobResult::Canceled { .. }),
            "{:?}",
            done.result
        );
    }

    #[tokio::test]
    async fn interrupt_notice_is_sent_once_and_drain_only_stops_new_work() {
        let mut state = AgentState::new(None);
        let drain = state.apply_notice(Notice::Drain {
            reason: "rebalance".into(),
        });
        assert!(matches!(
            drain,
            Some(AgentMessage {
                msg: Some(agent_message::Msg::Draining(_))
            })
        ));
        assert!(state.draining && state.interrupt.is_none());
        assert!(
            !state.done_after_interrupt(),
            "a drain does not end the agent"
        );
        let deadline = std::time::SystemTime::now() + Duration::from_secs(120);
        let first = state.apply_notice(Notice::Interrupt {
            reason: "spot".into(),
            deadline,
        });
        assert!(matches!(
            first,
            Some(AgentMessage {
                msg: Some(agent_message::Msg::Interrupting(_))
            })
        ));
        assert!(state
            .apply_notice(Notice::Interrupt {
                reason: "again".into(),
                deadline
            })
            .is_none());
        assert!(
            state.done_after_interrupt(),
            "nothing runs: the agent may go"
        );
        assert!(
            !state.abort_all.is_cancelled(),
            "jobs are stopped only near the deadline"
        );
    }
}
