//! The lease book as a state machine: every held job with its [`Lease`], the
//! queue of attempts waiting for a slot, and the connected agents, with the
//! dispatcher that matches the two. An [`Input`] goes in with the time it
//! happened; [`Effect`]s come out, in the order they must be carried out.
//! No I/O, no clock, no channels: tests feed it inputs and read the effects.
//!
//! What the caller (`core`) must keep when carrying effects out: every
//! [`Effect::Persist`] of a step is on disk before any other effect of that
//! step, and steps' effects go out in the order the steps were taken. That
//! gives write-ahead of every Assign (a restarted coordinator knows who has
//! the attempt), a result on disk before its Ack (the agent may forget it),
//! and each job's events in order.
//!
//! Not responsible for persisting, sending, or counting anything itself, nor
//! for GitLab (`jobs`), the agent link (`agents`) or the fleet (`fleet`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::agent::{
    agent_message::Msg, coordinator_message, Ack, AgentMessage, Assign, AttemptRef, Cancel,
    CancelMode, CoordinatorMessage, Drain, Finished, InstanceFacts,
};
use servitor_proto::job::JobPayload;
use tokio::time::Instant;

use super::{Lease, LeaseError, LeaseEvent, LeaseState};
use crate::store::{Change, LeaseRecord};

/// How long an interrupted instance is remembered: far longer than any
/// instance outlives its notice.
const DOOMED_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// CI variable with which a job opts out of re-runs (a deploy that must not
/// run twice): set to `false`, the job fails at its first interruption.
pub const RERUN_VARIABLE: &str = "SERVITOR_RERUN_ON_INTERRUPTION";

/// Whether a job allows being run again after an interruption.
pub fn allows_rerun(job: &JobPayload) -> bool {
    !job.variable(RERUN_VARIABLE).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "false" | "0" | "no" | "never"
        )
    })
}

/// Something the job's own task must act on.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    /// The dispatcher gave the current attempt to an agent.
    Assigned {
        attempt: u32,
        agent: String,
        instance: InstanceFacts,
        executor: String,
    },
    Started {
        attempt: u32,
    },
    Output {
        attempt: u32,
        /// Position of `bytes` in the attempt's output.
        offset: u64,
        bytes: Bytes,
    },
    /// The output stream of the attempt ended.
    OutputEnd {
        attempt: u32,
    },
    Finished {
        attempt: u32,
        result: Finished,
    },
    /// A line for the job's log from the coordinator (why it waits).
    Notice(String),
    /// The job cannot run on its runner's capacity (a size Fargate does not
    /// take, privileged mode on Fargate…): it fails at once, saying why.
    Refused {
        reason: String,
    },
    /// The attempt is gone (agent lost or interrupted); `next` says what
    /// becomes of the job.
    Lost {
        attempt: u32,
        reason: String,
        next: AfterLoss,
    },
}

/// What becomes of a job whose attempt was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterLoss {
    /// A new attempt is queued.
    Requeued,
    /// It used all its attempts.
    Exhausted,
    /// It opted out of re-runs.
    NoRerun,
}

/// A metric to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// An attempt waited this long in the queue before it was assigned.
    QueueWait(Duration),
    Rerun,
    SpotInterruption,
}

/// What the caller must carry out, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Write to the lease book; durable before the step's other effects.
    Persist(Change),
    /// Tell the job's task.
    Event {
        job_id: i64,
        event: JobEvent,
    },
    /// Send to one session of an agent (dropped if that session is gone).
    Send {
        agent: String,
        session: u64,
        message: CoordinatorMessage,
    },
    Count(Metric),
}

/// An agent's hello, as the book needs it.
#[derive(Clone, Debug)]
pub struct AgentHello {
    pub agent: String,
    /// The runner whose jobs it takes.
    pub runner: String,
    /// The one job it may take (the agent of a task started for it).
    pub only_job: Option<i64>,
    pub instance: InstanceFacts,
    pub executor: String,
    pub capacity: u32,
    pub free_slots: u32,
    /// Attempts it says it still runs.
    pub running: Vec<AttemptRef>,
    /// Attempts whose results it still reports.
    pub reporting: Vec<AttemptRef>,
    pub remote: SocketAddr,
}

/// Something that happened.
#[derive(Clone, Debug)]
pub enum Input {
    /// A job taken from GitLab; its attempt 1 is queued.
    Hold {
        payload: Arc<JobPayload>,
        raw: Bytes,
        /// The runner that took it: only that runner's agents run it.
        runner: String,
    },
    /// A job found in the lease book after a restart.
    Restore {
        payload: Arc<JobPayload>,
        raw: Bytes,
        runner: String,
        lease: LeaseRecord,
        finished: bool,
    },
    /// The job is no longer held (reported, or GitLab took it away).
    Release { job_id: i64 },
    /// Ask the agent running the job's current attempt to stop it.
    Cancel {
        job_id: i64,
        mode: CancelMode,
        reason: String,
    },
    /// Take a queued job out of the queue (canceled before it ran).
    Unqueue { job_id: i64 },
    /// A queued job cannot run on its runner's capacity: it leaves the
    /// queue and fails with `reason`.
    Refuse { job_id: i64, reason: String },
    /// An agent connected (or reconnected) and said hello.
    Connected(AgentHello),
    /// A control message from an agent session.
    Message {
        agent: String,
        session: u64,
        message: AgentMessage,
    },
    /// The session's connection ended; the agent may come back.
    Disconnected { agent: String, session: u64 },
    /// The session's agent did not come back in time.
    Lost {
        agent: String,
        session: u64,
        reason: String,
    },
    /// The grace period after a restart is over: restored attempts whose
    /// agent has not come back run again.
    ExpireMissing { reason: String },
    /// Tell the agents on an instance to take no more work.
    Drain {
        instance: String,
        exit_when_idle: bool,
        reason: String,
        /// Only if none of them holds an attempt.
        only_idle: bool,
    },
    /// Tell an agent to stop an attempt that is not wanted.
    StopStale { agent: String, attempt: AttemptRef },
    /// Tell every queued job of a runner, once, why it waits.
    NotifyWaiting { runner: String, text: String },
}

/// What a drain request found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    Yes,
    NoAgent,
    /// Asked to drain only an idle agent, and it was not.
    Busy,
}

/// The answer to an input, besides its effects.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Done,
    /// Whether the input applied (a cancel reached an agent, a job was
    /// unqueued, a lost agent had not come back).
    Applied(bool),
    /// The new session, and the attempts the agent runs that are not wanted.
    Connected {
        session: u64,
        stale: Vec<AttemptRef>,
    },
    Drained(Drained),
}

/// An input's effects and reply.
#[derive(Clone, Debug)]
pub struct Step {
    pub effects: Vec<Effect>,
    pub reply: Reply,
}

/// A view of an agent for the fleet and status displays.
#[derive(Clone, Debug)]
pub struct AgentSnapshot {
    pub agent_id: String,
    /// The runner whose jobs it takes.
    pub runner: String,
    pub instance_id: String,
    /// As the agent read them from instance metadata; empty off EC2.
    pub instance_type: String,
    pub zone: String,
    pub market: String,
    pub executor: String,
    pub capacity: u32,
    pub busy: u32,
    pub draining: bool,
    /// Attempts started since it connected.
    pub used: u32,
    pub connected_for: Duration,
    pub idle_since: Option<Instant>,
    pub remote: SocketAddr,
}

/// An attempt waiting for an agent, with its job.
#[derive(Clone, Debug)]
pub struct QueuedAttempt {
    pub job_id: i64,
    pub attempt: u32,
    pub payload: Arc<JobPayload>,
}

/// A view of a held job for status displays.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub job_id: i64,
    /// The runner that took it.
    pub runner: String,
    pub name: String,
    pub attempt: u32,
    pub state: &'static str,
    pub agent: Option<String>,
    pub age: Duration,
    /// Log bytes the current attempt produced so far.
    pub output_bytes: u64,
}

/// One job the coordinator holds.
#[derive(Debug)]
struct HeldJob {
    payload: Arc<JobPayload>,
    raw: Bytes,
    runner: String,
    lease: Lease,
    taken_at: Instant,
    /// When its current attempt was queued (for the queue-wait metric).
    queued_at: Instant,
    /// Told in its log that it waits for budget.
    waiting_noticed: bool,
    /// Log bytes of the current attempt received so far.
    output_bytes: u64,
}

/// One connected agent.
#[derive(Debug)]
struct AgentEntry {
    /// Distinguishes this connection from an earlier one of the same agent.
    session: u64,
    runner: String,
    only_job: Option<i64>,
    instance: InstanceFacts,
    executor: String,
    capacity: u32,
    /// Free slots in the agent's last pull.
    free_reported: u32,
    /// Assigned, not yet acknowledged with `Started`.
    unacked: HashSet<(i64, u32)>,
    /// Every attempt this agent holds (assigned or running).
    attempts: HashSet<(i64, u32)>,
    draining: bool,
    /// Attempts this agent started since it connected (`max_use_count`).
    used: u32,
    connected_at: Instant,
    idle_since: Option<Instant>,
    remote: SocketAddr,
}

impl AgentEntry {
    /// How many more attempts this agent asked for and has not been given.
    fn credit(&self) -> u32 {
        if self.draining {
            return 0;
        }
        let unacked = u32::try_from(self.unacked.len()).unwrap_or(u32::MAX);
        self.free_reported.saturating_sub(unacked)
    }

    fn touch_idle(&mut self, now: Instant) {
        if self.attempts.is_empty() {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
    }
}

/// Effects of the step under way.
#[derive(Debug, Default)]
struct Out(Vec<Effect>);

impl Out {
    fn persist(&mut self, change: Change) {
        self.0.push(Effect::Persist(change));
    }

    fn event(&mut self, job_id: i64, event: JobEvent) {
        self.0.push(Effect::Event { job_id, event });
    }

    fn send(&mut self, agent: &str, session: u64, msg: coordinator_message::Msg) {
        self.0.push(Effect::Send {
            agent: agent.to_owned(),
            session,
            message: CoordinatorMessage { msg: Some(msg) },
        });
    }

    fn cancel(
        &mut self,
        agent: &str,
        session: u64,
        (job_id, attempt): (i64, u32),
        mode: CancelMode,
        reason: &str,
    ) {
        self.send(
            agent,
            session,
            coordinator_message::Msg::Cancel(Cancel {
                attempt: Some(AttemptRef::new(job_id, attempt)),
                mode: mode.into(),
                reason: reason.to_owned(),
            }),
        );
    }

    fn count(&mut self, metric: Metric) {
        self.0.push(Effect::Count(metric));
    }
}

/// Every held job and connected agent.
#[derive(Debug)]
pub struct LeaseBook {
    /// Attempts a job gets before it fails for good.
    max_attempts: u32,
    jobs: BTreeMap<i64, HeldJob>,
    queue: VecDeque<i64>,
    /// By id, in order: dispatch takes the first agent with the most
    /// credit without comparing names.
    agents: BTreeMap<String, AgentEntry>,
    next_session: u64,
    /// Instances whose agent said they are going away or at risk, and
    /// when; kept after the agent leaves so the fleet can let them go.
    doomed: HashMap<String, Instant>,
    /// Sent with each assignment: where the agent reaches GitLab with the
    /// job token (artifacts, dependencies).
    gitlab_url: String,
}

impl LeaseBook {
    /// A book holding nothing.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            jobs: BTreeMap::new(),
            queue: VecDeque::new(),
            agents: BTreeMap::new(),
            next_session: 0,
            doomed: HashMap::new(),
            gitlab_url: String::new(),
        }
    }

    /// Names the GitLab agents upload artifacts to and download
    /// dependencies from (the one jobs are taken from).
    #[must_use]
    pub fn with_gitlab_url(mut self, url: impl Into<String>) -> Self {
        self.gitlab_url = url.into();
        self
    }

    /// Applies an input that happened at `now`.
    pub fn handle(&mut self, now: Instant, input: Input) -> Step {
        let mut out = Out::default();
        let reply = match input {
            Input::Hold {
                payload,
                raw,
                runner,
            } => {
                self.hold(now, &mut out, payload, raw, runner);
                Reply::Done
            }
            Input::Restore {
                payload,
                raw,
                runner,
                lease,
                finished,
            } => {
                let id = payload.id;
                let lease = Lease::restore(self.max_attempts, &lease, finished);
                let queued = *lease.state() == LeaseState::Queued;
                self.insert(now, payload, raw, runner, lease);
                if queued {
                    self.queue.push_back(id);
                }
                Reply::Done
            }
            Input::Release { job_id } => {
                self.release(now, &mut out, job_id);
                Reply::Done
            }
            Input::Cancel {
                job_id,
                mode,
                reason,
            } => Reply::Applied(self.cancel(&mut out, job_id, mode, &reason)),
            Input::Unqueue { job_id } => {
                let before = self.queue.len();
                self.queue.retain(|id| *id != job_id);
                Reply::Applied(before != self.queue.len())
            }
            Input::Refuse { job_id, reason } => {
                let queued = self
                    .jobs
                    .get(&job_id)
                    .is_some_and(|j| *j.lease.state() == LeaseState::Queued);
                if queued {
                    self.queue.retain(|id| *id != job_id);
                    out.event(job_id, JobEvent::Refused { reason });
                }
                Reply::Applied(queued)
            }
            Input::Connected(hello) => {
                let (session, stale) = self.connected(now, &mut out, hello);
                Reply::Connected { session, stale }
            }
            Input::Message {
                agent,
                session,
                message,
            } => {
                self.message(now, &mut out, &agent, session, message);
                Reply::Done
            }
            Input::Disconnected { agent, session } => {
                if let Some(entry) = self.agents.get_mut(&agent) {
                    if entry.session == session {
                        // Keep the entry's attempts for a returning agent,
                        // but give it no more work.
                        entry.free_reported = 0;
                        entry.draining = true;
                    }
                }
                Reply::Done
            }
            Input::Lost {
                agent,
                session,
                reason,
            } => Reply::Applied(self.lost(now, &mut out, &agent, session, &reason)),
            Input::ExpireMissing { reason } => {
                let missing: Vec<(i64, u32)> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| {
                        j.lease
                            .state()
                            .agent()
                            .is_some_and(|a| !self.agents.contains_key(a))
                    })
                    .map(|(id, j)| (*id, j.lease.attempt()))
                    .collect();
                for key in missing {
                    self.lose_attempt(now, &mut out, key, &reason);
                }
                Reply::Done
            }
            Input::Drain {
                instance,
                exit_when_idle,
                reason,
                only_idle,
            } => {
                Reply::Drained(self.drain(&mut out, &instance, exit_when_idle, &reason, only_idle))
            }
            Input::StopStale { agent, attempt } => {
                if let Some(entry) = self.agents.get(&agent) {
                    out.cancel(
                        &agent,
                        entry.session,
                        (attempt.job_id, attempt.attempt),
                        CancelMode::Abort,
                        "stale attempt",
                    );
                }
                Reply::Done
            }
            Input::NotifyWaiting { runner, text } => {
                for id in &self.queue {
                    if let Some(job) = self.jobs.get_mut(id) {
                        if job.runner == runner
                            && *job.lease.state() == LeaseState::Queued
                            && !job.waiting_noticed
                        {
                            job.waiting_noticed = true;
                            out.event(*id, JobEvent::Notice(text.clone()));
                        }
                    }
                }
                Reply::Done
            }
        };
        self.dispatch(now, &mut out);
        Step {
            effects: out.0,
            reply,
        }
    }

    fn insert(
        &mut self,
        now: Instant,
        payload: Arc<JobPayload>,
        raw: Bytes,
        runner: String,
        lease: Lease,
    ) {
        self.jobs.insert(
            payload.id,
            HeldJob {
                payload,
                raw,
                runner,
                lease,
                taken_at: now,
                queued_at: now,
                waiting_noticed: false,
                output_bytes: 0,
            },
        );
    }

    fn hold(
        &mut self,
        now: Instant,
        out: &mut Out,
        payload: Arc<JobPayload>,
        raw: Bytes,
        runner: String,
    ) {
        let id = payload.id;
        out.persist(Change::Hold {
            job_id: id,
            raw: raw.clone(),
            runner: runner.clone(),
        });
        self.insert(now, payload, raw, runner, Lease::new(self.max_attempts));
        self.queue.push_back(id);
    }

    fn release(&mut self, now: Instant, out: &mut Out, job_id: i64) {
        out.persist(Change::Remove { job_id });
        let Some(job) = self.jobs.remove(&job_id) else {
            return;
        };
        self.queue.retain(|id| *id != job_id);
        let key = (job_id, job.lease.attempt());
        let Some(agent) = job.lease.state().agent() else {
            return;
        };
        if let Some(entry) = self.agents.get_mut(agent) {
            let held = entry.attempts.remove(&key);
            entry.unacked.remove(&key);
            if held && *job.lease.state() != LeaseState::Finished {
                out.cancel(agent, entry.session, key, CancelMode::Abort, "job released");
            }
            entry.touch_idle(now);
        }
    }

    fn cancel(&mut self, out: &mut Out, job_id: i64, mode: CancelMode, reason: &str) -> bool {
        let Some(job) = self.jobs.get(&job_id) else {
            return false;
        };
        let Some(agent) = job.lease.state().agent() else {
            return false;
        };
        let Some(entry) = self.agents.get(agent) else {
            return false;
        };
        out.cancel(
            agent,
            entry.session,
            (job_id, job.lease.attempt()),
            mode,
            reason,
        );
        true
    }

    fn connected(
        &mut self,
        now: Instant,
        out: &mut Out,
        hello: AgentHello,
    ) -> (u64, Vec<AttemptRef>) {
        let agent_id = hello.agent;
        self.next_session += 1;
        let session = self.next_session;
        let mut stale = Vec::new();
        let mut attempts = HashSet::new();
        for a in &hello.running {
            let current = self
                .jobs
                .get(&a.job_id)
                .is_some_and(|job| job.lease.held_by(a.attempt, &agent_id));
            if current {
                attempts.insert((a.job_id, a.attempt));
            } else {
                stale.push(*a);
            }
        }
        // Attempts held by this agent that it neither runs nor reports a
        // result for are lost (the agent restarted, or it finished and was
        // acknowledged by a coordinator that then crashed before reporting;
        // the result is in the lease book then).
        let known: HashSet<(i64, u32)> = hello
            .reporting
            .iter()
            .map(|a| (a.job_id, a.attempt))
            .chain(attempts.iter().copied())
            .collect();
        let forgotten: Vec<(i64, u32)> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.lease.state().agent() == Some(agent_id.as_str()))
            .map(|(id, j)| (*id, j.lease.attempt()))
            .filter(|key| !known.contains(key))
            .collect();
        let idle_since = attempts.is_empty().then_some(now);
        self.agents.insert(
            agent_id,
            AgentEntry {
                session,
                runner: hello.runner,
                only_job: hello.only_job,
                instance: hello.instance,
                executor: hello.executor,
                capacity: hello.capacity,
                free_reported: hello.free_slots,
                unacked: HashSet::new(),
                attempts,
                draining: false,
                used: 0,
                connected_at: now,
                idle_since,
                remote: hello.remote,
            },
        );
        for key in forgotten {
            self.lose_attempt(now, out, key, "the agent restarted and no longer runs it");
        }
        (session, stale)
    }

    fn lost(
        &mut self,
        now: Instant,
        out: &mut Out,
        agent: &str,
        session: u64,
        reason: &str,
    ) -> bool {
        if self.agents.get(agent).is_none_or(|e| e.session != session) {
            return false;
        }
        let Some(entry) = self.agents.remove(agent) else {
            return false;
        };
        for key in entry.attempts {
            self.lose_attempt(now, out, key, reason);
        }
        true
    }

    fn message(
        &mut self,
        now: Instant,
        out: &mut Out,
        agent_id: &str,
        session: u64,
        message: AgentMessage,
    ) {
        let is_current = self
            .agents
            .get(agent_id)
            .is_some_and(|a| a.session == session);
        if !is_current {
            return;
        }
        match message.msg {
            Some(Msg::Pull(pull)) => {
                if let Some(entry) = self.agents.get_mut(agent_id) {
                    entry.free_reported = pull.free_slots;
                }
            }
            Some(Msg::Started(started)) => {
                let Some(a) = started.attempt else { return };
                self.started(out, agent_id, session, a);
            }
            Some(Msg::Finished(finished)) => {
                let Some(a) = finished.attempt else { return };
                self.finished(now, out, agent_id, session, a, finished);
            }
            Some(Msg::Rejected(rejected)) => {
                let Some(a) = rejected.attempt else { return };
                let key = (a.job_id, a.attempt);
                let Some(entry) = self.agents.get_mut(agent_id) else {
                    return;
                };
                entry.unacked.remove(&key);
                // It refused: this pull's credit is spent.
                entry.free_reported = 0;
                let held = entry.attempts.remove(&key);
                entry.touch_idle(now);
                if !held {
                    return;
                }
                tracing::warn!(agent = %agent_id, attempt = %a, reason = %rejected.reason, "agent refused an assignment; queueing it again");
                if let Some(job) = self.jobs.get_mut(&a.job_id) {
                    let refused = job.lease.apply(LeaseEvent::Refused {
                        agent: agent_id.to_owned(),
                        attempt: a.attempt,
                    });
                    if refused.is_ok() {
                        out.persist(Change::Lease {
                            job_id: a.job_id,
                            lease: job.lease.record(),
                        });
                        self.queue.push_front(a.job_id);
                    }
                }
            }
            Some(Msg::Interrupting(notice)) => {
                tracing::warn!(agent = %agent_id, reason = %notice.reason, "agent is being interrupted; re-running its jobs elsewhere");
                out.count(Metric::SpotInterruption);
                let Some(entry) = self.agents.get_mut(agent_id) else {
                    return;
                };
                let instance = entry.instance.instance_id.clone();
                let reason = if instance.is_empty() {
                    notice.reason.clone()
                } else {
                    format!("instance {instance}: {}", notice.reason)
                };
                entry.draining = true;
                entry.free_reported = 0;
                entry.unacked.clear();
                let mut taken: Vec<(i64, u32)> = entry.attempts.drain().collect();
                taken.sort_unstable();
                entry.touch_idle(now);
                // Stop them there at once: the new attempt must not race the
                // old one for the job's side effects.
                for key in &taken {
                    out.cancel(
                        agent_id,
                        session,
                        *key,
                        CancelMode::Abort,
                        "instance interrupted; the job runs again elsewhere",
                    );
                }
                if !instance.is_empty() {
                    self.doomed.insert(instance, now);
                }
                for key in taken {
                    self.lose_attempt(now, out, key, &reason);
                }
            }
            Some(Msg::Draining(draining)) => {
                tracing::info!(agent = %agent_id, reason = %draining.reason, "agent takes no new work");
                if let Some(entry) = self.agents.get_mut(agent_id) {
                    entry.draining = true;
                    entry.free_reported = 0;
                    let instance = entry.instance.instance_id.clone();
                    if !instance.is_empty() {
                        self.doomed.insert(instance, now);
                    }
                }
            }
            Some(Msg::Hello(_)) => {
                tracing::warn!(agent = %agent_id, "second hello on a control stream ignored");
            }
            // Renewal is the link's business, answered before the book sees it.
            Some(Msg::Heartbeat(_) | Msg::Renew(_)) | None => {}
        }
    }

    fn started(&mut self, out: &mut Out, agent_id: &str, session: u64, a: AttemptRef) {
        let key = (a.job_id, a.attempt);
        if let Some(entry) = self.agents.get_mut(agent_id) {
            // The slot this attempt took was counted in the agent's last
            // pull; the next pull reports afresh.
            if entry.unacked.remove(&key) {
                entry.free_reported = entry.free_reported.saturating_sub(1);
                entry.used += 1;
            }
        }
        let applied = self.jobs.get_mut(&a.job_id).map(|job| {
            job.lease.apply(LeaseEvent::Started {
                agent: agent_id.to_owned(),
                attempt: a.attempt,
            })
        });
        if matches!(applied, Some(Ok(()))) {
            out.event(a.job_id, JobEvent::Started { attempt: a.attempt });
            return;
        }
        tracing::warn!(agent = %agent_id, attempt = %a, "agent started an attempt that is not current; stopping it");
        if let Some(entry) = self.agents.get_mut(agent_id) {
            entry.attempts.remove(&key);
        }
        out.cancel(agent_id, session, key, CancelMode::Abort, "stale attempt");
    }

    fn finished(
        &mut self,
        now: Instant,
        out: &mut Out,
        agent_id: &str,
        session: u64,
        a: AttemptRef,
        finished: Finished,
    ) {
        let key = (a.job_id, a.attempt);
        // The result goes into the lease book before the agent is told it
        // may forget it.
        let current = self
            .jobs
            .get(&a.job_id)
            .is_some_and(|j| j.lease.held_by(a.attempt, agent_id));
        if current {
            out.persist(Change::Result {
                job_id: a.job_id,
                result: finished.clone(),
            });
        }
        if let Some(entry) = self.agents.get_mut(agent_id) {
            entry.unacked.remove(&key);
            entry.attempts.remove(&key);
            entry.touch_idle(now);
            // Whatever became of it here, the agent may forget it.
            out.send(
                agent_id,
                session,
                coordinator_message::Msg::Ack(Ack { attempt: Some(a) }),
            );
        }
        let Some(job) = self.jobs.get_mut(&a.job_id) else {
            return;
        };
        match job.lease.apply(LeaseEvent::Finished {
            agent: agent_id.to_owned(),
            attempt: a.attempt,
        }) {
            Ok(()) => out.event(
                a.job_id,
                JobEvent::Finished {
                    attempt: a.attempt,
                    result: finished,
                },
            ),
            Err(LeaseError::Invalid {
                state: "finished", ..
            }) => {
                tracing::debug!(agent = %agent_id, attempt = %a, "a result sent again after a reconnect; already known");
            }
            Err(e @ LeaseError::StaleAttempt { .. }) => {
                // Expected after a hand-back: the fence at work.
                tracing::info!(agent = %agent_id, attempt = %a, error = %e, "dropped the result of a superseded attempt");
            }
            Err(e) => {
                tracing::warn!(agent = %agent_id, attempt = %a, error = %e, "dropped a result");
            }
        }
    }

    fn drain(
        &mut self,
        out: &mut Out,
        instance_id: &str,
        exit_when_idle: bool,
        reason: &str,
        only_idle: bool,
    ) -> Drained {
        let on_instance = |a: &AgentEntry| a.instance.instance_id == instance_id;
        if only_idle
            && self
                .agents
                .values()
                .any(|a| on_instance(a) && !(a.attempts.is_empty() && a.unacked.is_empty()))
        {
            return Drained::Busy;
        }
        let mut drained = Drained::NoAgent;
        let mut on: Vec<(&String, &mut AgentEntry)> = self
            .agents
            .iter_mut()
            .filter(|(_, a)| a.instance.instance_id == instance_id)
            .collect();
        on.sort_by(|a, b| a.0.cmp(b.0));
        for (id, entry) in on {
            entry.draining = true;
            out.send(
                id,
                entry.session,
                coordinator_message::Msg::Drain(Drain {
                    reason: reason.to_owned(),
                    exit_when_idle,
                }),
            );
            drained = Drained::Yes;
        }
        drained
    }

    /// An attempt is gone: queue the next one, or tell the job that it ends
    /// here (attempts ran out, or it opted out of re-runs).
    fn lose_attempt(
        &mut self,
        now: Instant,
        out: &mut Out,
        (job_id, attempt): (i64, u32),
        reason: &str,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        if job.lease.attempt() == attempt
            && job.lease.state().agent().is_some()
            && !allows_rerun(&job.payload)
        {
            if job.lease.apply(LeaseEvent::GiveUp { attempt }).is_ok() {
                out.event(
                    job_id,
                    JobEvent::Lost {
                        attempt,
                        reason: format!(
                            "{reason}; the job sets {RERUN_VARIABLE}=false, so it is not run again"
                        ),
                        next: AfterLoss::NoRerun,
                    },
                );
            }
            return;
        }
        match job.lease.apply(LeaseEvent::Lost { attempt }) {
            Ok(()) => {
                job.queued_at = now;
                out.count(Metric::Rerun);
                out.persist(Change::Lease {
                    job_id,
                    lease: job.lease.record(),
                });
                out.event(
                    job_id,
                    JobEvent::Lost {
                        attempt,
                        reason: reason.to_owned(),
                        next: AfterLoss::Requeued,
                    },
                );
                self.queue.push_back(job_id);
            }
            Err(LeaseError::AttemptsExhausted { .. }) => {
                if job.lease.apply(LeaseEvent::GiveUp { attempt }).is_ok() {
                    out.event(
                        job_id,
                        JobEvent::Lost {
                            attempt,
                            reason: reason.to_owned(),
                            next: AfterLoss::Exhausted,
                        },
                    );
                }
            }
            Err(e) => {
                tracing::debug!(job_id, attempt, error = %e, "loss of a stale attempt ignored");
            }
        }
    }

    /// Matches queued attempts with agents of their runner that asked for
    /// work, never giving an agent more than it asked for. Spreads work: the
    /// agent with the most credit goes first (ties by name, so the choice
    /// is repeatable). A job whose runner has no agent free waits without
    /// holding up other runners' jobs behind it.
    fn dispatch(&mut self, now: Instant, out: &mut Out) {
        let mut index = 0;
        while let Some(&job_id) = self.queue.get(index) {
            if !self.agents.values().any(|a| a.credit() > 0) {
                return;
            }
            let Some(job) = self
                .jobs
                .get(&job_id)
                .filter(|j| *j.lease.state() == LeaseState::Queued)
            else {
                self.queue.remove(index);
                continue;
            };
            let best = self
                .agents
                .iter()
                .filter(|(_, a)| {
                    a.runner == job.runner
                        && a.only_job.is_none_or(|only| only == job_id)
                        && a.credit() > 0
                })
                // The first of the most credit is the lowest name.
                .min_by_key(|(_, a)| std::cmp::Reverse(a.credit()))
                .map(|(id, _)| id.clone());
            let Some(agent_id) = best else {
                index += 1;
                continue;
            };
            self.queue.remove(index);
            let (Some(job), Some(entry)) =
                (self.jobs.get_mut(&job_id), self.agents.get_mut(&agent_id))
            else {
                continue;
            };
            if job
                .lease
                .apply(LeaseEvent::Assign {
                    agent: agent_id.clone(),
                })
                .is_err()
            {
                continue;
            }
            let attempt = job.lease.attempt();
            out.count(Metric::QueueWait(
                now.saturating_duration_since(job.queued_at),
            ));
            // Write ahead: a restarted coordinator must know who has it.
            out.persist(Change::Lease {
                job_id,
                lease: job.lease.record(),
            });
            entry.unacked.insert((job_id, attempt));
            entry.attempts.insert((job_id, attempt));
            entry.idle_since = None;
            // The job learns of its attempt before the agent can send any of
            // its output.
            out.event(
                job_id,
                JobEvent::Assigned {
                    attempt,
                    agent: agent_id.clone(),
                    instance: entry.instance.clone(),
                    executor: entry.executor.clone(),
                },
            );
            out.send(
                &agent_id,
                entry.session,
                coordinator_message::Msg::Assign(Assign {
                    attempt: Some(AttemptRef::new(job_id, attempt)),
                    job_json: job.raw.to_vec(),
                    gitlab_url: self.gitlab_url.clone(),
                    caches: Vec::new(),
                }),
            );
        }
    }

    /// Whether output for this attempt is wanted from this agent. Output
    /// may trail the result (it is resent after a reconnect), so a finished
    /// current attempt still takes it.
    pub fn accepts_output(&self, agent_id: &str, attempt: AttemptRef) -> bool {
        self.jobs.get(&attempt.job_id).is_some_and(|job| {
            let holder = match job.lease.state() {
                LeaseState::Finished => true,
                other => other.agent() == Some(agent_id),
            };
            job.lease.attempt() == attempt.attempt && holder
        })
    }

    /// Counts log bytes of the job's current attempt, for status displays.
    pub fn record_output(&mut self, job_id: i64, bytes: u64) {
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.output_bytes += bytes;
        }
    }

    /// Instances whose agent said they are going away or at risk, also
    /// after the agent left; forgotten a day after the notice.
    pub fn doomed_instances(&mut self, now: Instant) -> HashSet<String> {
        self.doomed
            .retain(|_, at| now.saturating_duration_since(*at) < DOOMED_MEMORY);
        self.doomed.keys().cloned().collect()
    }

    /// Attempts of `runner`'s jobs that need a slot: queued plus assigned
    /// or running.
    pub fn demand(&self, runner: &str) -> u32 {
        let n = self
            .jobs
            .values()
            .filter(|j| j.runner == runner && *j.lease.state() != LeaseState::Finished)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// `runner`'s attempts waiting for an agent, in queue order, with their
    /// jobs: what a fleet that starts capacity per job (Fargate) starts.
    pub fn queued(&self, runner: &str) -> Vec<QueuedAttempt> {
        self.queue
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.runner == runner && *j.lease.state() == LeaseState::Queued)
            .map(|j| QueuedAttempt {
                job_id: j.payload.id,
                attempt: j.lease.attempt(),
                payload: j.payload.clone(),
            })
            .collect()
    }

    /// The connected agents, by id.
    pub fn agents(&self, now: Instant) -> Vec<AgentSnapshot> {
        let out: Vec<AgentSnapshot> = self
            .agents
            .iter()
            .map(|(id, a)| AgentSnapshot {
                agent_id: id.clone(),
                runner: a.runner.clone(),
                instance_id: a.instance.instance_id.clone(),
                instance_type: a.instance.instance_type.clone(),
                zone: a.instance.availability_zone.clone(),
                market: a.instance.market.clone(),
                executor: a.executor.clone(),
                capacity: a.capacity,
                busy: u32::try_from(a.attempts.len()).unwrap_or(u32::MAX),
                draining: a.draining,
                used: a.used,
                connected_for: now.saturating_duration_since(a.connected_at),
                idle_since: a.idle_since,
                remote: a.remote,
            })
            .collect();
        // In agent id order, as the map keeps them.
        out
    }

    /// The held jobs, by id.
    pub fn jobs(&self, now: Instant) -> Vec<JobSnapshot> {
        self.jobs
            .values()
            .map(|j| JobSnapshot {
                job_id: j.payload.id,
                runner: j.runner.clone(),
                name: j.payload.display_name(),
                attempt: j.lease.attempt(),
                state: j.lease.state().name(),
                agent: j.lease.state().agent().map(str::to_owned),
                age: now.saturating_duration_since(j.taken_at),
                output_bytes: j.output_bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
