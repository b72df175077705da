//! The GitLab side of one held job: commits it (`PUT state=running`), keeps
//! it alive, streams its masked log as trace PATCHes, learns cancellation
//! from `Job-Status`, and sends the final update with the trace checksum.
//!
//! [`JobReporter::start`] spawns one task per job. Output goes in through
//! [`JobReporterHandle::append`], which masks it and caps it at the output
//! limit right away, so memory stays bounded however fast a job writes; the
//! task sends it at its own pace and never loses a byte. Memory holds at
//! most the newest [`WINDOW_BYTES`] GitLab has not confirmed
//! ([`LogWindow`]); the whole masked log is in the job's trace journal, so
//! output GitLab has not taken yet, and bytes it confirmed before and asks
//! for again (a 416 naming a shorter size, a 412), are read from there and
//! sent from whatever offset GitLab holds.
//!
//! Not responsible for running the job or deciding its outcome: the
//! coordinator core reacts to [`RemoteEvent`]s and calls
//! [`JobReporterHandle::finish`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::agent::FailureKind;
use servitor_proto::job::JobPayload;
use servitor_runtime::backoff::Backoff;
use servitor_runtime::secret::Secret;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::client::{
    GitLabClient, JobState, JobUpdate, PatchOutcome, RemoteJobStatus, TraceOutput, UpdateAck,
};
use super::failure::failure_reason;
use super::mask::Masker;
use super::window::{Dropped, LogWindow};
use super::GitLabError;
use crate::store::Journal;

/// How long new output waits to be sent with what follows it: a person
/// watching sees each line within a moment.
pub const TRACE_COALESCE: Duration = Duration::from_millis(200);

/// PATCHes a job may send in quick succession (each [`TRACE_COALESCE`]
/// after its output) before they are spaced out. A job that prints now and
/// then never waits longer; a chatty one settles at one PATCH per
/// [`trace_gap`], as gitlab-runner paces them, so a thousand busy jobs cost
/// GitLab hundreds of requests a second, not thousands. A full PATCH, and
/// everything once the job ends, goes at once.
pub const TRACE_BURST: u32 = 5;

/// Longest spacing of a chatty job's PATCHes. GitLab names an interval
/// (3 s while someone watches the log, 60 s otherwise) and gitlab-runner
/// follows it, but the 60 s is only learnt to have become 3 s (someone
/// opened the log) from an answer, so following it would leave a new
/// watcher without lines for up to a minute.
pub const TRACE_MAX_GAP: Duration = Duration::from_secs(3);

/// Spacing of a chatty job's PATCHes under GitLab's update interval.
fn trace_gap(update_interval: Duration) -> Duration {
    update_interval.min(TRACE_MAX_GAP)
}

/// Largest trace PATCH body (gitlab-runner's `DefaultTracePatchLimit`).
pub const MAX_PATCH_BYTES: usize = 1024 * 1024;

/// Most unconfirmed log bytes of one job kept in memory when the log is
/// journaled: a PATCH's worth for a chatty job. Older unconfirmed bytes are
/// read back from the journal, so a thousand jobs writing faster than
/// GitLab takes their logs cost a thousand windows, not a thousand logs.
pub const WINDOW_BYTES: u64 = 256 * 1024;

/// Longest silence before a keep-alive `PUT state=running`. GitLab drops a
/// job with no update for 30 minutes, and cancellation is only learnt from
/// answers, so even a silent job asks at least this often.
pub const KEEPALIVE_MAX: Duration = Duration::from_secs(30);

/// Update interval until GitLab names one (gitlab-runner starts at 3 s).
const DEFAULT_UPDATE_INTERVAL: Duration = Duration::from_secs(3);

/// Bounds on `X-GitLab-Trace-Update-Interval`: never hammer GitLab on a 0,
/// never wait longer than gitlab-runner's 15-minute clamp.
const MIN_UPDATE_INTERVAL: Duration = Duration::from_secs(1);
const MAX_UPDATE_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// How long the final update is repeated while GitLab answers 202: Rails
/// stops waiting for trace chunks after 5 minutes and applies the state.
const FINAL_ACCEPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// How long the final update (and the trace before it) is retried through
/// GitLab errors. Past this GitLab's 30-minute no-update rule is about to
/// drop the job anyway.
const FINAL_RETRY_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// Retry bounds of PATCHes and keep-alives.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Consecutive 416 answers we follow at once before backing off: GitLab
/// names the right offset each time, so more means something else writes.
const MAX_QUICK_416: u32 = 3;

/// How many times a 412 (GitLab rejected the trace) restarts the trace.
const MAX_TRACE_RESETS: u32 = 1;

/// Events are rare (at most one `Canceling` and one `Abort`).
const EVENT_CAPACITY: usize = 4;

/// What GitLab wants done with the job, learnt from its answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteEvent {
    /// Graceful cancel: stop the script, run after_script, then finish.
    Canceling,
    /// Stop everything now; GitLab has finalized the job, so no final update.
    Abort(AbortReason),
}

/// Why GitLab aborted a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// `Job-Status: canceled`.
    Canceled,
    /// `Job-Status: failed` (dropped by GitLab, e.g. stuck or timed out).
    Failed,
    /// 403: the job is no longer ours (finished elsewhere, erased, token expired).
    Forbidden,
    /// 404 on an update.
    NotFound,
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Canceled => "canceled",
            Self::Failed => "failed by gitlab",
            Self::Forbidden => "job no longer accepts updates",
            Self::NotFound => "job not found",
        })
    }
}

/// How the job ended, in Servitor's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalState {
    Success,
    Failed {
        kind: FailureKind,
        exit_code: Option<i32>,
    },
    /// Stopped because GitLab asked (graceful cancel).
    Canceled,
}

/// gitlab-runner's internal reason for a canceled job.
const JOB_CANCELED_REASON: &str = "job_canceled";

/// What the final update said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalReport {
    /// Checksum and size of the trace as sent.
    pub output: TraceOutput,
    /// The `failure_reason` sent, for failed jobs.
    pub failure_reason: Option<&'static str>,
    /// Final updates sent (more than one after 202s or errors).
    pub attempts: u32,
    /// `Job-Status` of the accepting answer.
    pub job_status: Option<RemoteJobStatus>,
    /// Whether output past the limit was dropped.
    pub truncated: bool,
}

/// The masked log of one job.
struct Trace {
    masker: Masker,
    log: LogWindow,
    limit: u64,
    truncated: bool,
    closed: bool,
    /// Where the log is journaled, so it survives a coordinator restart.
    journal: Option<Journal>,
    /// The attempt whose output was appended last, and how far into that
    /// output the log reaches (what the masker still holds back excluded).
    output_attempt: u32,
    output_end: u64,
}

/// Where a resumed job's log stands (after a coordinator restart).
#[derive(Debug, Default)]
pub struct Resume {
    /// The masked log written before.
    pub trace: Vec<u8>,
    /// Journal to keep appending to.
    pub journal: Option<Journal>,
    /// Attempt and output offset the log reached.
    pub output: Option<(u32, u64)>,
}

impl Trace {
    /// Appends masked bytes, then journals what was appended.
    fn add(&mut self, masked: Vec<u8>, committed: u64) {
        let Some(appended) = self.push(masked) else {
            return;
        };
        let attempt = self.output_attempt;
        if let Some(journal) = self.journal.as_mut() {
            if let Err(e) = journal.append(attempt, committed, &appended) {
                // The job goes on; only a restart would lose this part.
                tracing::warn!(error = %e, "cannot journal the job log; it will not survive a coordinator restart");
                self.journal = None;
                self.log.keep_all();
            }
        }
    }

    /// Appends masked bytes, enforcing the output limit like gitlab-runner:
    /// up to the limit, then one notice, then nothing. Returns what was
    /// appended.
    fn push(&mut self, mut masked: Vec<u8>) -> Option<Bytes> {
        if self.truncated || masked.is_empty() {
            return None;
        }
        let room = usize::try_from(self.limit.saturating_sub(self.log.len())).unwrap_or(usize::MAX);
        if masked.len() > room {
            // Cut on a UTF-8 character boundary so the log stays valid text.
            let mut cut = room;
            while cut > 0 && cut > room.saturating_sub(3) && (masked[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            if (masked[cut] & 0xC0) == 0x80 {
                cut = room;
            }
            masked.truncate(cut);
            masked.extend_from_slice(
                format!(
                    "\n\x1b[33;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
                    self.limit
                )
                .as_bytes(),
            );
            self.truncated = true;
        }
        let bytes = Bytes::from(masked);
        self.log.push(bytes.clone());
        Some(bytes)
    }
}

/// Why the reporter task stopped.
#[derive(Clone, Copy, Debug)]
enum Ended {
    Finished,
    Aborted(AbortReason),
    Cancelled,
    Dropped,
}

struct Shared {
    job_id: i64,
    trace: Mutex<Trace>,
    notify: Notify,
    /// Bytes GitLab confirmed holding.
    acked: AtomicU64,
    ended: Mutex<Option<Ended>>,
}

impl Shared {
    fn trace(&self) -> MutexGuard<'_, Trace> {
        self.trace.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn trace_len(&self) -> u64 {
        self.trace().log.len()
    }
}

struct FinishRequest {
    state: FinalState,
    reply: oneshot::Sender<Result<FinalReport, GitLabError>>,
}

/// Starts reporters; see [`JobReporter::start`].
pub struct JobReporter;

impl JobReporter {
    /// Takes over the GitLab side of `job`: spawns the task that commits,
    /// keeps alive, streams and finally reports it. The receiver yields what
    /// GitLab wants done with the job. Cancelling `cancel` stops the task
    /// without a final update (the coordinator is stopping; the job's lease
    /// survives it). Call it inside a Tokio runtime.
    pub fn start(
        client: Arc<GitLabClient>,
        job: &JobPayload,
        cancel: CancellationToken,
    ) -> (JobReporterHandle, mpsc::Receiver<RemoteEvent>) {
        Self::start_with(client, job, cancel, Resume::default())
    }

    /// As [`Self::start`], continuing a log written before (a restart): the
    /// log is sent from where GitLab's copy ends (learnt from its 416).
    pub fn start_with(
        client: Arc<GitLabClient>,
        job: &JobPayload,
        cancel: CancellationToken,
        resume: Resume,
    ) -> (JobReporterHandle, mpsc::Receiver<RemoteEvent>) {
        let limit = client.settings().output_limit;
        let (output_attempt, output_end) = resume.output.unwrap_or((0, 0));
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let (finish_tx, finish_rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            job_id: job.id,
            trace: Mutex::new(Trace {
                masker: Masker::for_job(job),
                truncated: resume.trace.len() as u64 >= limit,
                log: LogWindow::new(
                    resume.trace,
                    resume.journal.is_some().then_some(WINDOW_BYTES),
                ),
                limit,
                closed: false,
                journal: resume.journal,
                output_attempt,
                output_end,
            }),
            notify: Notify::new(),
            acked: AtomicU64::new(0),
            ended: Mutex::new(None),
        });
        let now = Instant::now();
        let pump = Pump {
            client,
            job_id: job.id,
            token: Secret::new(job.token.clone()),
            accepted_reasons: job.features.failure_reasons.clone(),
            shared: Arc::clone(&shared),
            events: events_tx,
            cancel,
            commands: finish_rx,
            sent: 0,
            update_interval: DEFAULT_UPDATE_INTERVAL,
            committed: false,
            keepalive_at: now,
            patch_not_before: now,
            pending_since: None,
            patch_paid_until: now,
            patch_backoff: retry_backoff(),
            put_backoff: retry_backoff(),
            trace_enabled: true,
            canceling_seen: false,
            quick_416: 0,
            trace_resets: 0,
        };
        let span = info_span!("gitlab_job", job = job.id);
        tokio::spawn(pump.run().instrument(span));
        let handle = JobReporterHandle {
            shared,
            finish: finish_tx,
        };
        (handle, events_rx)
    }
}

fn retry_backoff() -> Backoff {
    Backoff::try_new(RETRY_MIN, RETRY_MAX).expect("retry bounds are valid constants")
}

/// Feeds one job's reporter. Clones share the same job.
#[derive(Clone)]
pub struct JobReporterHandle {
    shared: Arc<Shared>,
    finish: mpsc::Sender<FinishRequest>,
}

impl std::fmt::Debug for JobReporterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobReporterHandle")
            .field("job_id", &self.shared.job_id)
            .finish()
    }
}

impl JobReporterHandle {
    pub fn job_id(&self) -> i64 {
        self.shared.job_id
    }

    /// Adds job output. It is masked and capped at once and sent within
    /// [`TRACE_COALESCE`]; output after [`Self::finish`] is ignored.
    pub fn append(&self, bytes: Bytes) {
        {
            let mut trace = self.shared.trace();
            if trace.closed || trace.truncated {
                return;
            }
            // The coordinator's own lines end whatever the masker held back,
            // so the journaled output offset stays exact.
            let mut masked = trace.masker.write(&bytes);
            masked.extend_from_slice(&trace.masker.flush());
            let committed = trace.output_end;
            trace.add(masked, committed);
        }
        self.shared.notify.notify_one();
    }

    /// Adds an attempt's output; `end` is the position, in that attempt's
    /// output, just past `bytes`. Journaled with how much of the output the
    /// log holds, so a restarted coordinator resumes it exactly.
    pub fn append_output(&self, attempt: u32, end: u64, bytes: Bytes) {
        {
            let mut trace = self.shared.trace();
            if trace.closed || trace.truncated {
                return;
            }
            trace.output_attempt = attempt;
            trace.output_end = end;
            let masked = trace.masker.write(&bytes);
            let committed = end.saturating_sub(trace.masker.held_back() as u64);
            trace.add(masked, committed);
        }
        self.shared.notify.notify_one();
    }

    /// Bytes GitLab confirmed holding.
    pub fn sent_bytes(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Bytes of masked log held in memory: what GitLab has not confirmed
    /// yet, or the whole log when there is no journal to read it back from.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> u64 {
        self.shared.trace().log.held()
    }

    /// Bytes of masked log produced so far (sent or not).
    pub fn trace_len(&self) -> u64 {
        self.shared.trace_len()
    }

    /// Ends the log, sends all of it, then the final state with the trace
    /// checksum; repeats the update while GitLab answers 202 (up to 5
    /// minutes) and retries GitLab errors with backoff.
    ///
    /// # Errors
    /// [`GitLabError::JobAborted`] when GitLab aborted the job (no final
    /// update is due), [`GitLabError::Cancelled`] on shutdown,
    /// [`GitLabError::ReporterClosed`] when called twice,
    /// [`GitLabError::FinalUpdateNotAccepted`], or the error that made the
    /// final update fail.
    pub async fn finish(&self, state: FinalState) -> Result<FinalReport, GitLabError> {
        {
            let mut trace = self.shared.trace();
            if trace.closed {
                return Err(GitLabError::ReporterClosed {
                    job_id: self.shared.job_id,
                });
            }
            trace.closed = true;
            let rest = trace.masker.flush();
            let committed = trace.output_end;
            trace.add(rest, committed);
        }
        self.shared.notify.notify_one();
        let (reply, answer) = oneshot::channel();
        if self
            .finish
            .send(FinishRequest { state, reply })
            .await
            .is_err()
        {
            return Err(self.ended_error());
        }
        answer.await.unwrap_or_else(|_| Err(self.ended_error()))
    }

    fn ended_error(&self) -> GitLabError {
        let job_id = self.shared.job_id;
        let ended = *self
            .shared
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match ended {
            Some(Ended::Aborted(reason)) => GitLabError::JobAborted { job_id, reason },
            Some(Ended::Cancelled) => GitLabError::Cancelled,
            _ => GitLabError::ReporterClosed { job_id },
        }
    }
}

/// The reporter task's state.
struct Pump {
    client: Arc<GitLabClient>,
    job_id: i64,
    token: Secret,
    accepted_reasons: Vec<String>,
    shared: Arc<Shared>,
    events: mpsc::Sender<RemoteEvent>,
    cancel: CancellationToken,
    commands: mpsc::Receiver<FinishRequest>,
    /// The offset of the next PATCH: what we believe GitLab holds.
    sent: u64,
    update_interval: Duration,
    /// The first `PUT state=running` went through.
    committed: bool,
    keepalive_at: Instant,
    patch_not_before: Instant,
    /// When the oldest unsent output arrived.
    pending_since: Option<Instant>,
    /// PATCH pacing (the generic cell rate algorithm): when the PATCHes
    /// sent so far would all have been paid for at one per gap. A PATCH
    /// may go once this is at most `TRACE_BURST - 1` gaps ahead.
    patch_paid_until: Instant,
    patch_backoff: Backoff,
    put_backoff: Backoff,
    /// False once GitLab said 404 to a PATCH or the offsets cannot be
    /// reconciled: no more PATCHes, the final update still goes out.
    trace_enabled: bool,
    canceling_seen: bool,
    quick_416: u32,
    trace_resets: u32,
}

/// Whether the main loop goes on.
enum Flow {
    Continue,
    Stop(Ended),
}

/// How a final update attempt ended.
enum FinalStep {
    Done(Result<FinalReport, GitLabError>),
    ResendTrace,
}

impl Pump {
    async fn run(mut self) {
        let mut finishing: Option<FinishRequest> = None;
        // When finish was asked for, and when the first final update went out.
        let mut finish_asked: Option<Instant> = None;
        let mut final_started: Option<Instant> = None;
        let ended = loop {
            let now = Instant::now();
            if finishing.is_some() {
                let asked = *finish_asked.get_or_insert(now);
                if self.trace_enabled && now.duration_since(asked) >= FINAL_RETRY_DEADLINE {
                    error!(
                        sent = self.sent,
                        "gave up sending the rest of the trace; sending the final update"
                    );
                    self.trace_enabled = false;
                }
            }
            let len = self.shared.trace_len();
            let unsent = self.trace_enabled && len > self.sent;
            if !unsent {
                self.pending_since = None;
            } else if self.pending_since.is_none() {
                self.pending_since = Some(now);
            }
            if !unsent {
                if let Some(request) = finishing.take() {
                    let started = *final_started.get_or_insert(now);
                    let asked = finish_asked.unwrap_or(started);
                    match self.final_update(request.state, started, asked).await {
                        FinalStep::Done(result) => {
                            let ended = match &result {
                                Err(GitLabError::Cancelled) => Ended::Cancelled,
                                Err(GitLabError::JobAborted { reason, .. }) => {
                                    Ended::Aborted(*reason)
                                }
                                _ => Ended::Finished,
                            };
                            // The caller may have stopped waiting; nothing to do then.
                            let _ = request.reply.send(result);
                            break ended;
                        }
                        FinalStep::ResendTrace => {
                            finishing = Some(request);
                            continue;
                        }
                    }
                }
            }
            let patch_at = (unsent && (self.committed || finishing.is_some())).then(|| {
                let ready = if finishing.is_some() || len - self.sent >= MAX_PATCH_BYTES as u64 {
                    now
                } else {
                    let coalesced = self.pending_since.unwrap_or(now) + TRACE_COALESCE;
                    coalesced.max(self.patch_allowed_at())
                };
                ready.max(self.patch_not_before)
            });
            let wake = patch_at.map_or(self.keepalive_at, |p| p.min(self.keepalive_at));
            let flow = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Flow::Stop(Ended::Cancelled),
                request = self.commands.recv(), if finishing.is_none() => match request {
                    Some(request) => {
                        finishing = Some(request);
                        Flow::Continue
                    }
                    None => Flow::Stop(Ended::Dropped),
                },
                () = self.shared.notify.notified() => Flow::Continue,
                () = sleep_until(wake) => {
                    if patch_at.is_some_and(|p| p <= Instant::now()) {
                        self.send_patch().await
                    } else {
                        self.keepalive().await
                    }
                }
            };
            if let Flow::Stop(ended) = flow {
                if let Some(request) = finishing.take() {
                    let error = match ended {
                        Ended::Aborted(reason) => GitLabError::JobAborted {
                            job_id: self.job_id,
                            reason,
                        },
                        Ended::Cancelled => GitLabError::Cancelled,
                        Ended::Finished | Ended::Dropped => GitLabError::ReporterClosed {
                            job_id: self.job_id,
                        },
                    };
                    let _ = request.reply.send(Err(error));
                }
                break ended;
            }
        };
        match ended {
            Ended::Dropped => warn!("job reporter dropped without a final update"),
            Ended::Cancelled => info!("job reporter stopped for shutdown"),
            Ended::Aborted(reason) => info!(%reason, "job aborted by gitlab"),
            Ended::Finished => {}
        }
        *self
            .shared
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(ended);
    }

    /// Runs `call` unless the coordinator stops first.
    async fn guarded<T>(&self, call: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => None,
            out = call => Some(out),
        }
    }

    /// The earliest a PATCH may go under the pacing.
    fn patch_allowed_at(&self) -> Instant {
        let burst = trace_gap(self.update_interval) * (TRACE_BURST - 1);
        self.patch_paid_until
            .checked_sub(burst)
            .unwrap_or(self.patch_paid_until)
    }

    fn keepalive_interval(&self) -> Duration {
        self.update_interval.min(KEEPALIVE_MAX)
    }

    /// GitLab answered: the job is alive as far as it is concerned.
    fn contact(&mut self, interval: Option<Duration>) {
        if let Some(interval) = interval {
            self.update_interval = interval.clamp(MIN_UPDATE_INTERVAL, MAX_UPDATE_INTERVAL);
        }
        self.keepalive_at = Instant::now() + self.keepalive_interval();
    }

    fn emit(&self, event: RemoteEvent) {
        // The core may have stopped listening; the event no longer matters then.
        let _ = self.events.try_send(event);
    }

    /// Acts on `Job-Status` from any answer.
    fn observe(&mut self, status: Option<&RemoteJobStatus>) -> Flow {
        match status {
            Some(RemoteJobStatus::Canceling) if !self.canceling_seen => {
                self.canceling_seen = true;
                info!("gitlab asks to cancel the job gracefully");
                self.emit(RemoteEvent::Canceling);
                Flow::Continue
            }
            Some(RemoteJobStatus::Canceled) => self.abort(AbortReason::Canceled),
            Some(RemoteJobStatus::Failed) => self.abort(AbortReason::Failed),
            _ => Flow::Continue,
        }
    }

    fn abort(&self, reason: AbortReason) -> Flow {
        self.emit(RemoteEvent::Abort(reason));
        Flow::Stop(Ended::Aborted(reason))
    }

    fn abort_for(&self, error: &GitLabError) -> Option<Flow> {
        match error {
            GitLabError::JobForbidden { job_status, .. } => Some(match job_status {
                Some(RemoteJobStatus::Canceled) => self.abort(AbortReason::Canceled),
                Some(RemoteJobStatus::Failed) => self.abort(AbortReason::Failed),
                _ => self.abort(AbortReason::Forbidden),
            }),
            _ => None,
        }
    }

    /// Sends the next chunk of unsent trace.
    async fn send_patch(&mut self) -> Flow {
        let read = self.shared.trace().log.read(self.sent, MAX_PATCH_BYTES);
        let chunk = match read {
            Ok(chunk) => chunk,
            Err(dropped) => match self.read_journal(dropped).await {
                Ok(chunk) => chunk,
                Err(flow) => return flow,
            },
        };
        if chunk.is_empty() {
            return Flow::Continue;
        }
        let offset = self.sent;
        let len = chunk.len() as u64;
        let gap = trace_gap(self.update_interval);
        self.patch_paid_until = self.patch_paid_until.max(Instant::now()) + gap;
        let call = self
            .client
            .patch_trace(self.job_id, &self.token, offset, chunk);
        let Some(answer) = self.guarded(call).await else {
            return Flow::Stop(Ended::Cancelled);
        };
        match answer {
            Ok(response) => {
                self.contact(response.update_interval);
                if let Flow::Stop(ended) = self.observe(response.job_status.as_ref()) {
                    return Flow::Stop(ended);
                }
                match response.outcome {
                    PatchOutcome::Appended { remote_size } if remote_size == offset + len => {
                        self.quick_416 = 0;
                        self.patch_backoff.reset();
                        self.set_sent(remote_size);
                    }
                    // A 202 whose Range does not add up is handled like a 416:
                    // trust GitLab's size, and back off if it keeps happening.
                    PatchOutcome::Appended { remote_size }
                    | PatchOutcome::RangeMismatch { remote_size } => {
                        self.quick_416 += 1;
                        warn!(
                            offset,
                            remote_size,
                            "gitlab holds a different amount of trace; resending from its size"
                        );
                        self.set_sent(remote_size);
                        // GitLab named where to go on: the resend is free.
                        self.patch_paid_until = self
                            .patch_paid_until
                            .checked_sub(gap)
                            .unwrap_or(self.patch_paid_until);
                        if self.quick_416 > MAX_QUICK_416 {
                            let delay = self.patch_backoff.next_delay();
                            warn!(delay = ?delay, "repeated trace offset mismatches; backing off");
                            self.patch_not_before = Instant::now() + delay;
                        }
                    }
                }
                Flow::Continue
            }
            Err(e) => {
                if let Some(flow) = self.abort_for(&e) {
                    return flow;
                }
                if let GitLabError::JobNotFound { .. } = e {
                    warn!("gitlab does not know the job's trace (404); no more trace is sent");
                    self.trace_enabled = false;
                    return Flow::Continue;
                }
                // Every other failure is retried: bytes are never dropped.
                let delay = self.patch_backoff.next_delay_at_least(e.retry_after());
                warn!(error = %e, delay = ?delay, "trace patch failed; retrying");
                self.patch_not_before = Instant::now() + delay;
                Flow::Continue
            }
        }
    }

    fn set_sent(&mut self, remote_size: u64) {
        let len = {
            let mut trace = self.shared.trace();
            let len = trace.log.len();
            if remote_size <= len {
                trace.log.confirm(remote_size);
            }
            len
        };
        if remote_size > len {
            error!(
                remote_size,
                local_size = len,
                "gitlab holds more trace than this job produced; no more trace is sent"
            );
            self.trace_enabled = false;
            return;
        }
        self.sent = remote_size;
        self.shared.acked.store(remote_size, Ordering::Relaxed);
    }

    /// Reads the next PATCH from the journal: memory no longer holds it
    /// (GitLab asks again for bytes it confirmed, or fell behind the job).
    async fn read_journal(&mut self, dropped: Dropped) -> Result<Bytes, Flow> {
        let journal = self.shared.trace().journal.clone();
        let Some(journal) = journal else {
            error!(
                from = self.sent,
                kept_from = dropped.kept_from,
                "gitlab asks for trace that is no longer held, and without a journal it is gone; no more trace is sent"
            );
            self.trace_enabled = false;
            return Err(Flow::Continue);
        };
        debug!(
            from = self.sent,
            kept_from = dropped.kept_from,
            "sending trace from the journal"
        );
        let Some(read) = self.guarded(journal.read(self.sent, MAX_PATCH_BYTES)).await else {
            return Err(Flow::Stop(Ended::Cancelled));
        };
        match read {
            Ok(chunk) if chunk.is_empty() => {
                error!(
                    from = self.sent,
                    "the trace journal lacks bytes this job produced; no more trace is sent"
                );
                self.trace_enabled = false;
                Err(Flow::Continue)
            }
            Ok(chunk) => Ok(chunk),
            Err(e) => {
                let delay = self.patch_backoff.next_delay();
                warn!(error = %e, delay = ?delay, "cannot read the trace from its journal; retrying");
                self.patch_not_before = Instant::now() + delay;
                Err(Flow::Continue)
            }
        }
    }

    /// `PUT state=running`: commits the job the first time, keeps it alive after.
    async fn keepalive(&mut self) -> Flow {
        let update = JobUpdate::running();
        let call = self.client.update_job(self.job_id, &self.token, &update);
        let Some(answer) = self.guarded(call).await else {
            return Flow::Stop(Ended::Cancelled);
        };
        match answer {
            Ok(response) => {
                if !self.committed {
                    debug!("job committed (state running)");
                }
                self.committed = true;
                self.put_backoff.reset();
                self.contact(response.update_interval);
                self.observe(response.job_status.as_ref())
            }
            Err(e) => {
                if let Some(flow) = self.abort_for(&e) {
                    return flow;
                }
                if let GitLabError::JobNotFound { .. } = e {
                    return self.abort(AbortReason::NotFound);
                }
                let delay = if e.is_retryable() {
                    self.put_backoff.next_delay_at_least(e.retry_after())
                } else {
                    self.keepalive_interval()
                };
                warn!(error = %e, delay = ?delay, "job keep-alive failed; retrying");
                self.keepalive_at = Instant::now() + delay;
                Flow::Continue
            }
        }
    }

    /// Sends the final state until GitLab takes it.
    /// `started` is the first final update (for the 202 limit), `asked`
    /// when finish was asked for (for the retry deadline).
    async fn final_update(
        &mut self,
        state: FinalState,
        started: Instant,
        asked: Instant,
    ) -> FinalStep {
        let (output, truncated) = {
            let trace = self.shared.trace();
            (trace.log.output(), trace.truncated)
        };
        let update = match state {
            FinalState::Success => JobUpdate {
                state: JobState::Success,
                failure_reason: None,
                exit_code: None,
                output: Some(output),
            },
            FinalState::Failed { kind, exit_code } => JobUpdate {
                state: JobState::Failed,
                failure_reason: Some(failure_reason(kind, &self.accepted_reasons)),
                exit_code,
                output: Some(output),
            },
            // gitlab-runner reports a canceled job as failed with its internal
            // `job_canceled`, mapped onto what this GitLab accepts.
            FinalState::Canceled => JobUpdate {
                state: JobState::Failed,
                failure_reason: Some(super::map_reason(
                    JOB_CANCELED_REASON,
                    &self.accepted_reasons,
                )),
                exit_code: None,
                output: Some(output),
            },
        };
        let mut backoff = Backoff::try_new(Duration::from_secs(1), RETRY_MAX)
            .expect("final retry bounds are valid constants");
        let mut attempts = 0;
        loop {
            attempts += 1;
            let call = self.client.update_job(self.job_id, &self.token, &update);
            let Some(answer) = self.guarded(call).await else {
                return FinalStep::Done(Err(GitLabError::Cancelled));
            };
            let wait = match answer {
                Ok(response) => match response.ack {
                    UpdateAck::Accepted => {
                        info!(
                            state = update.state.as_str(),
                            failure_reason = update.failure_reason,
                            bytes = output.bytesize,
                            "final update accepted"
                        );
                        return FinalStep::Done(Ok(FinalReport {
                            output,
                            failure_reason: update.failure_reason,
                            attempts,
                            job_status: response.job_status,
                            truncated,
                        }));
                    }
                    UpdateAck::TraceRejected if self.trace_resets < MAX_TRACE_RESETS => {
                        self.trace_resets += 1;
                        warn!("gitlab rejected the trace (412); sending it again from the start");
                        self.sent = 0;
                        self.trace_enabled = true;
                        return FinalStep::ResendTrace;
                    }
                    UpdateAck::TraceRejected | UpdateAck::NotYetAccepted => {
                        if started.elapsed() >= FINAL_ACCEPT_TIMEOUT {
                            return FinalStep::Done(Err(GitLabError::FinalUpdateNotAccepted {
                                job_id: self.job_id,
                                waited: started.elapsed(),
                            }));
                        }
                        let wait = response
                            .update_interval
                            .unwrap_or(self.update_interval)
                            .clamp(MIN_UPDATE_INTERVAL, MAX_UPDATE_INTERVAL);
                        debug!(wait = ?wait, "final update not yet accepted (202); repeating");
                        wait
                    }
                },
                Err(e) if e.is_retryable() && asked.elapsed() < FINAL_RETRY_DEADLINE => {
                    let delay = backoff.next_delay_at_least(e.retry_after());
                    warn!(error = %e, delay = ?delay, "final update failed; retrying");
                    delay
                }
                Err(e) => {
                    let result = match self.abort_for(&e) {
                        Some(Flow::Stop(Ended::Aborted(reason))) => Err(GitLabError::JobAborted {
                            job_id: self.job_id,
                            reason,
                        }),
                        _ => Err(e),
                    };
                    return FinalStep::Done(result);
                }
            };
            if self.guarded(sleep(wait)).await.is_none() {
                return FinalStep::Done(Err(GitLabError::Cancelled));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(limit: u64) -> Trace {
        Trace {
            masker: Masker::new(Vec::<Vec<u8>>::new(), Vec::<Vec<u8>>::new()),
            log: LogWindow::new(Vec::new(), None),
            limit,
            truncated: false,
            closed: false,
            journal: None,
            output_attempt: 0,
            output_end: 0,
        }
    }

    fn text(t: &Trace) -> String {
        String::from_utf8(t.log.read(0, usize::MAX).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn output_limit_cuts_once_with_notice() {
        let mut t = trace(10);
        t.push(b"12345".to_vec());
        t.push(b"67890abc".to_vec());
        t.push(b"dropped".to_vec());
        let text = text(&t);
        assert!(text.starts_with("1234567890\n"), "{text:?}");
        assert!(text.contains("Job's log exceeded limit of 10 bytes."));
        assert_eq!(text.matches("exceeded").count(), 1);
        assert!(!text.contains("dropped"));
        assert!(t.truncated);
    }

    #[test]
    fn output_limit_keeps_utf8_whole() {
        let mut t = trace(4);
        t.push("abcé".as_bytes().to_vec()); // 'é' is 2 bytes: 5 bytes in all
        assert!(text(&t).starts_with("abc\n"));
    }
}
