//! The coordinator's shared state: the jobs it holds (each with its
//! [`Lease`]), the queue of attempts waiting for a slot, and the agents that
//! are connected, with the dispatcher that matches the two.
//!
//! Everything here runs under one short-lived lock and never awaits while
//! holding it: messages to agents and jobs go through unbounded channels whose
//! sends cannot block. Not responsible for GitLab I/O (`jobs`), the agent
//! link (`agents`), or the fleet (`fleet`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use servitor_proto::agent::{
    coordinator_message, Ack, AgentMessage, Assign, AttemptRef, Cancel, CancelMode,
    CoordinatorMessage, Drain, Finished, InstanceFacts,
};
use servitor_proto::job::JobPayload;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::lease::{Lease, LeaseEvent, LeaseState};
use crate::metrics::Metrics;
use crate::store::{LeaseRecord, Store};

/// Something the job's own task must act on.
#[derive(Debug)]
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

/// One job the coordinator holds.
#[derive(Debug)]
struct HeldJob {
    payload: Arc<JobPayload>,
    raw: Bytes,
    lease: Lease,
    events: mpsc::UnboundedSender<JobEvent>,
    taken_at: Instant,
    /// When its current attempt was queued (for the queue-wait metric).
    queued_at: Instant,
    /// Told in its log that it waits for budget.
    waiting_noticed: bool,
    /// Log bytes of the current attempt received so far.
    output_bytes: u64,
}

/// What a drain request found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drained {
    Yes,
    NoAgent,
    /// Asked to drain only an idle agent, and it was not.
    Busy,
}

/// One connected agent.
#[derive(Debug)]
struct AgentEntry {
    /// Distinguishes this connection from an earlier one of the same agent.
    session: u64,
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
    tx: mpsc::UnboundedSender<CoordinatorMessage>,
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
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<i64, HeldJob>,
    queue: VecDeque<i64>,
    agents: HashMap<String, AgentEntry>,
    next_session: u64,
    /// Where leases are persisted; `None` keeps them in memory only.
    store: Option<Store>,
    metrics: Arc<Metrics>,
    /// Instances whose agent said they are going away or at risk, and
    /// when; kept after the agent leaves so the fleet can let them go.
    doomed: HashMap<String, Instant>,
}

impl State {
    /// Writes a job's lease to the store, before anyone acts on it.
    fn persist_lease(&self, job_id: i64) {
        let (Some(store), Some(job)) = (&self.store, self.jobs.get(&job_id)) else {
            return;
        };
        let record = LeaseRecord {
            attempt: job.lease.attempt,
            agent: job.lease.state.agent().map(str::to_owned),
        };
        if let Err(e) = store.save_lease(job_id, &record) {
            tracing::error!(job_id, error = %e, "cannot persist a lease; a coordinator restart now would lose track of this attempt");
        }
    }
}

/// A view of an agent for the fleet and status displays.
#[derive(Clone, Debug)]
pub struct AgentSnapshot {
    pub agent_id: String,
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
    pub connected_for: std::time::Duration,
    pub idle_since: Option<Instant>,
    pub remote: SocketAddr,
}

/// A view of a held job for status displays.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub job_id: i64,
    pub name: String,
    pub attempt: u32,
    pub state: &'static str,
    pub agent: Option<String>,
    pub age: std::time::Duration,
    /// Log bytes the current attempt produced so far.
    pub output_bytes: u64,
}

/// Settings the core needs.
#[derive(Clone, Debug)]
pub struct CoreSettings {
    /// Attempts a job gets before it fails for good.
    pub max_attempts: u32,
}

/// Shared coordinator state. Cheap to clone through `Arc`.
#[derive(Debug)]
pub struct Core {
    state: Mutex<State>,
    settings: CoreSettings,
    /// Woken when demand or the agent set changes (the fleet listens).
    pub changed: Notify,
    metrics: Arc<Metrics>,
}

impl Core {
    /// A core holding nothing, keeping leases in memory only.
    pub fn new(settings: CoreSettings) -> Arc<Self> {
        Self::with_store(settings, None)
    }

    /// A core holding nothing that persists leases in `store`.
    pub fn with_store(settings: CoreSettings, store: Option<Store>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        Arc::new(Self {
            state: Mutex::new(State {
                store,
                metrics: metrics.clone(),
                ..State::default()
            }),
            settings,
            changed: Notify::new(),
            metrics,
        })
    }

    /// Holds a job found in the store after a restart. Its attempt stays
    /// with the agent that had it, waiting for that agent to reconnect
    /// (see [`Core::expire_missing_agents`]); an unassigned job is queued.
    pub fn restore_job(
        &self,
        payload: Arc<JobPayload>,
        raw: Bytes,
        lease: &LeaseRecord,
        finished: bool,
    ) -> mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = payload.id;
        {
            let mut state = self.lock();
            let mut restored = Lease::new(self.settings.max_attempts);
            restored.attempt = lease.attempt.max(1);
            if finished {
                restored.state = LeaseState::Finished;
            } else if let Some(agent) = &lease.agent {
                restored.state = LeaseState::Running {
                    agent: agent.clone(),
                };
            }
            let queued = restored.state == LeaseState::Queued;
            state.jobs.insert(
                id,
                HeldJob {
                    payload,
                    raw,
                    lease: restored,
                    events: tx,
                    taken_at: Instant::now(),
                    queued_at: Instant::now(),
                    waiting_noticed: false,
                    output_bytes: 0,
                },
            );
            if queued {
                state.queue.push_back(id);
            }
            dispatch(&mut state);
        }
        self.changed.notify_one();
        rx
    }

    /// Restored attempts whose agent has not reconnected go back to the
    /// queue. Called once the grace period after a restart is over.
    pub fn expire_missing_agents(&self, reason: &str) {
        {
            let mut state = self.lock();
            let missing: Vec<(i64, u32)> = state
                .jobs
                .iter()
                .filter(|(_, j)| {
                    j.lease
                        .state
                        .agent()
                        .is_some_and(|a| !state.agents.contains_key(a))
                })
                .map(|(id, j)| (*id, j.lease.attempt))
                .collect();
            for key in missing {
                lose_attempt(&mut state, key, reason);
            }
            dispatch(&mut state);
        }
        self.changed.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock already aborted the task that held
        // it; the state itself is still consistent (every mutation completes
        // before any call that could panic), so keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts holding a job; its attempt 1 is queued. Returns the receiver
    /// of the job's events.
    pub fn hold_job(
        &self,
        payload: Arc<JobPayload>,
        raw: Bytes,
    ) -> mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = payload.id;
        {
            let mut state = self.lock();
            state.jobs.insert(
                id,
                HeldJob {
                    payload,
                    raw,
                    lease: Lease::new(self.settings.max_attempts),
                    events: tx,
                    taken_at: Instant::now(),
                    queued_at: Instant::now(),
                    waiting_noticed: false,
                    output_bytes: 0,
                },
            );
            state.queue.push_back(id);
            dispatch(&mut state);
        }
        self.changed.notify_one();
        rx
    }

    /// Stops holding a job (it was reported or GitLab took it away). If an
    /// agent still runs an attempt, it is told to abort it.
    pub fn release_job(&self, job_id: i64) {
        {
            let mut state = self.lock();
            if let Some(store) = &state.store {
                if let Err(e) = store.remove_job(job_id) {
                    tracing::warn!(job_id, error = %e, "cannot remove a released job from the store");
                }
            }
            if let Some(job) = state.jobs.remove(&job_id) {
                state.queue.retain(|id| *id != job_id);
                let key = (job_id, job.lease.attempt);
                if let Some(agent) = job.lease.state.agent() {
                    if let Some(entry) = state.agents.get_mut(agent) {
                        let held = entry.attempts.remove(&key);
                        entry.unacked.remove(&key);
                        if held && job.lease.state != LeaseState::Finished {
                            send_cancel(&entry.tx, key, CancelMode::Abort, "job released");
                        }
                        touch_idle(entry);
                    }
                }
            }
            dispatch(&mut state);
        }
        self.changed.notify_one();
    }

    /// Asks the agent running the job's current attempt to stop it.
    pub fn cancel_job(&self, job_id: i64, mode: CancelMode, reason: &str) -> bool {
        let state = self.lock();
        let Some(job) = state.jobs.get(&job_id) else {
            return false;
        };
        let Some(agent) = job.lease.state.agent() else {
            return false;
        };
        let Some(entry) = state.agents.get(agent) else {
            return false;
        };
        send_cancel(&entry.tx, (job_id, job.lease.attempt), mode, reason);
        true
    }

    /// Takes a queued job out of the queue (it was canceled before it ran).
    /// Returns false if it is not queued.
    pub fn unqueue_job(&self, job_id: i64) -> bool {
        let mut state = self.lock();
        let before = state.queue.len();
        state.queue.retain(|id| *id != job_id);
        before != state.queue.len()
    }

    /// Registers a newly connected agent. `running` are the attempts it says
    /// it still runs; the ones that are no longer wanted are returned so the
    /// agent can be told to stop them.
    #[allow(clippy::too_many_arguments)]
    pub fn agent_connected(
        &self,
        agent_id: &str,
        instance: InstanceFacts,
        executor: String,
        capacity: u32,
        free_slots: u32,
        running: &[AttemptRef],
        reporting: &[AttemptRef],
        remote: SocketAddr,
        tx: mpsc::UnboundedSender<CoordinatorMessage>,
    ) -> (u64, Vec<AttemptRef>) {
        let mut stale = Vec::new();
        let session;
        {
            let mut state = self.lock();
            state.next_session += 1;
            session = state.next_session;
            let mut attempts = HashSet::new();
            for a in running {
                let current = state.jobs.get(&a.job_id).is_some_and(|job| {
                    job.lease.attempt == a.attempt && job.lease.state.agent() == Some(agent_id)
                });
                if current {
                    attempts.insert((a.job_id, a.attempt));
                } else {
                    stale.push(*a);
                }
            }
            // Attempts held by this agent that it neither runs nor reports
            // a result for are lost (the agent restarted, or it finished
            // and was acknowledged by a coordinator that then crashed
            // before reporting; the result is in the lease book then).
            let known: HashSet<(i64, u32)> = reporting
                .iter()
                .map(|a| (a.job_id, a.attempt))
                .chain(attempts.iter().copied())
                .collect();
            let forgotten: Vec<(i64, u32)> = state
                .jobs
                .iter()
                .filter(|(_, j)| j.lease.state.agent() == Some(agent_id))
                .map(|(id, j)| (*id, j.lease.attempt))
                .filter(|key| !known.contains(key))
                .collect();
            let idle_since = attempts.is_empty().then(Instant::now);
            state.agents.insert(
                agent_id.to_owned(),
                AgentEntry {
                    session,
                    instance,
                    executor,
                    capacity,
                    free_reported: free_slots,
                    unacked: HashSet::new(),
                    attempts,
                    draining: false,
                    used: 0,
                    tx,
                    connected_at: Instant::now(),
                    idle_since,
                    remote,
                },
            );
            for key in forgotten {
                lose_attempt(&mut state, key, "the agent restarted and no longer runs it");
            }
            dispatch(&mut state);
        }
        self.changed.notify_one();
        (session, stale)
    }

    /// The agent's connection ended. Its attempts stay assigned to it: it may
    /// come back and report them; [`Core::agent_lost`] gives them up.
    pub fn agent_disconnected(&self, agent_id: &str, session: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.agents.get_mut(agent_id) {
            if entry.session == session {
                // Keep the entry's attempts for a returning agent, but give it
                // no more work.
                entry.free_reported = 0;
                entry.draining = true;
            }
        }
        drop(state);
        self.changed.notify_one();
    }

    /// The agent has not come back within the grace period: its attempts go
    /// back to the queue. Returns false if it came back meanwhile.
    pub fn agent_lost(&self, agent_id: &str, session: u64, reason: &str) -> bool {
        {
            let mut state = self.lock();
            let Some(entry) = state.agents.get(agent_id) else {
                return false;
            };
            if entry.session != session {
                return false;
            }
            let Some(entry) = state.agents.remove(agent_id) else {
                return false;
            };
            for key in entry.attempts {
                lose_attempt(&mut state, key, reason);
            }
            dispatch(&mut state);
        }
        self.changed.notify_one();
        true
    }

    /// Handles one control message from an agent session.
    pub fn agent_message(&self, agent_id: &str, session: u64, message: AgentMessage) {
        use servitor_proto::agent::agent_message::Msg;
        let mut state = self.lock();
        let is_current = state
            .agents
            .get(agent_id)
            .is_some_and(|a| a.session == session);
        if !is_current {
            return;
        }
        match message.msg {
            Some(Msg::Pull(pull)) => {
                if let Some(entry) = state.agents.get_mut(agent_id) {
                    entry.free_reported = pull.free_slots;
                }
            }
            Some(Msg::Started(started)) => {
                let Some(a) = started.attempt else { return };
                let key = (a.job_id, a.attempt);
                if let Some(entry) = state.agents.get_mut(agent_id) {
                    // The slot this attempt took was counted in the agent's
                    // last pull; the next pull reports afresh.
                    if entry.unacked.remove(&key) {
                        entry.free_reported = entry.free_reported.saturating_sub(1);
                        entry.used += 1;
                    }
                }
                let applied = state.jobs.get_mut(&a.job_id).map(|job| {
                    job.lease
                        .apply(LeaseEvent::Started {
                            agent: agent_id.to_owned(),
                            attempt: a.attempt,
                        })
                        .map(|()| {
                            let _ = job.events.send(JobEvent::Started { attempt: a.attempt });
                        })
                });
                if !matches!(applied, Some(Ok(()))) {
                    tracing::warn!(agent = %agent_id, attempt = %a, "agent started an attempt that is not current; stopping it");
                    if let Some(entry) = state.agents.get_mut(agent_id) {
                        entry.attempts.remove(&key);
                        send_cancel(&entry.tx, key, CancelMode::Abort, "stale attempt");
                    }
                }
            }
            Some(Msg::Finished(finished)) => {
                let Some(a) = finished.attempt else { return };
                let key = (a.job_id, a.attempt);
                // The result goes into the lease book before the agent is
                // told it may forget it.
                let current = state.jobs.get(&a.job_id).is_some_and(|j| {
                    j.lease.attempt == a.attempt && j.lease.state.agent() == Some(agent_id)
                });
                if current {
                    if let Some(store) = &state.store {
                        if let Err(e) = store.save_result(a.job_id, &finished) {
                            tracing::error!(job_id = a.job_id, error = %e, "cannot persist a result; a coordinator restart now would run the job again");
                        }
                    }
                }
                if let Some(entry) = state.agents.get_mut(agent_id) {
                    entry.unacked.remove(&key);
                    entry.attempts.remove(&key);
                    touch_idle(entry);
                    // Whatever became of it here, the agent may forget it.
                    let _ = entry.tx.send(CoordinatorMessage {
                        msg: Some(coordinator_message::Msg::Ack(Ack { attempt: Some(a) })),
                    });
                }
                if let Some(job) = state.jobs.get_mut(&a.job_id) {
                    match job.lease.apply(LeaseEvent::Finished {
                        agent: agent_id.to_owned(),
                        attempt: a.attempt,
                    }) {
                        Ok(()) => {
                            let _ = job.events.send(JobEvent::Finished {
                                attempt: a.attempt,
                                result: finished,
                            });
                        }
                        Err(crate::lease::LeaseError::Invalid {
                            state: "finished", ..
                        }) => {
                            tracing::debug!(agent = %agent_id, attempt = %a, "a result sent again after a reconnect; already known");
                        }
                        Err(e @ crate::lease::LeaseError::StaleAttempt { .. }) => {
                            // Expected after a hand-back: the fence at work.
                            tracing::info!(agent = %agent_id, attempt = %a, error = %e, "dropped the result of a superseded attempt");
                        }
                        Err(e) => {
                            tracing::warn!(agent = %agent_id, attempt = %a, error = %e, "dropped a result");
                        }
                    }
                }
            }
            Some(Msg::Rejected(rejected)) => {
                let Some(a) = rejected.attempt else { return };
                let key = (a.job_id, a.attempt);
                if let Some(entry) = state.agents.get_mut(agent_id) {
                    entry.unacked.remove(&key);
                    // It refused: this pull's credit is spent.
                    entry.free_reported = 0;
                    let held = entry.attempts.remove(&key);
                    touch_idle(entry);
                    if held {
                        tracing::warn!(agent = %agent_id, attempt = %a, reason = %rejected.reason, "agent refused an assignment; queueing it again");
                        if let Some(job) = state.jobs.get_mut(&a.job_id) {
                            let refused = job.lease.apply(LeaseEvent::Refused {
                                agent: agent_id.to_owned(),
                                attempt: a.attempt,
                            });
                            if refused.is_ok() {
                                state.persist_lease(a.job_id);
                                state.queue.push_front(a.job_id);
                            }
                        }
                    }
                }
            }
            Some(Msg::Interrupting(notice)) => {
                tracing::warn!(agent = %agent_id, reason = %notice.reason, "agent is being interrupted; re-running its jobs elsewhere");
                state.metrics.spot_interruption();
                let instance = state
                    .agents
                    .get(agent_id)
                    .map(|e| e.instance.instance_id.clone())
                    .unwrap_or_default();
                let reason = if instance.is_empty() {
                    notice.reason.clone()
                } else {
                    format!("instance {instance}: {}", notice.reason)
                };
                let mut taken = Vec::new();
                if !instance.is_empty() {
                    state.doomed.insert(instance.clone(), Instant::now());
                }
                if let Some(entry) = state.agents.get_mut(agent_id) {
                    entry.draining = true;
                    entry.free_reported = 0;
                    entry.unacked.clear();
                    taken.extend(entry.attempts.drain());
                    touch_idle(entry);
                    // Stop them there at once: the new attempt must not
                    // race the old one for the job's side effects.
                    for key in &taken {
                        send_cancel(
                            &entry.tx,
                            *key,
                            CancelMode::Abort,
                            "instance interrupted; the job runs again elsewhere",
                        );
                    }
                }
                for key in taken {
                    lose_attempt(&mut state, key, &reason);
                }
            }
            Some(Msg::Draining(draining)) => {
                tracing::info!(agent = %agent_id, reason = %draining.reason, "agent takes no new work");
                if let Some(entry) = state.agents.get_mut(agent_id) {
                    entry.draining = true;
                    entry.free_reported = 0;
                    let instance = entry.instance.instance_id.clone();
                    if !instance.is_empty() {
                        state.doomed.insert(instance, Instant::now());
                    }
                }
            }
            Some(Msg::Hello(_)) => {
                tracing::warn!(agent = %agent_id, "second hello on a control stream ignored");
            }
            Some(Msg::Heartbeat(_)) | None => {}
        }
        dispatch(&mut state);
        drop(state);
        self.changed.notify_one();
    }

    /// Whether output for this attempt should be accepted from this agent;
    /// if so, the job's event sender.
    pub fn output_target(
        &self,
        agent_id: &str,
        attempt: AttemptRef,
    ) -> Option<mpsc::UnboundedSender<JobEvent>> {
        let state = self.lock();
        let job = state.jobs.get(&attempt.job_id)?;
        // Output may trail the result (it is resent after a reconnect), so
        // a finished current attempt still takes it.
        let holder = match &job.lease.state {
            LeaseState::Finished => true,
            other => other.agent() == Some(agent_id),
        };
        (job.lease.attempt == attempt.attempt && holder).then(|| job.events.clone())
    }

    /// Counts log bytes of the job's current attempt, for status displays.
    pub fn record_output(&self, job_id: i64, bytes: usize) {
        if let Some(job) = self.lock().jobs.get_mut(&job_id) {
            job.output_bytes += bytes as u64;
        }
    }

    /// Tells an agent to stop an attempt that is not wanted any more.
    pub fn stop_stale(&self, agent_id: &str, attempt: AttemptRef) {
        let state = self.lock();
        if let Some(entry) = state.agents.get(agent_id) {
            send_cancel(
                &entry.tx,
                (attempt.job_id, attempt.attempt),
                CancelMode::Abort,
                "stale attempt",
            );
        }
    }

    /// Tells the agent on an instance to take no more work and, if asked, to
    /// exit once idle. Returns false if no agent runs there.
    pub fn drain_instance(&self, instance_id: &str, exit_when_idle: bool, reason: &str) -> bool {
        self.drain_where(instance_id, exit_when_idle, reason, false) == Drained::Yes
    }

    /// Like [`Core::drain_instance`], but only if the instance's agent holds
    /// no attempt at this moment: the check and the drain happen under one
    /// lock, so no job can reach the instance in between. Returns whether
    /// it may be removed (also when no agent runs there).
    pub fn drain_if_idle(&self, instance_id: &str, exit_when_idle: bool, reason: &str) -> bool {
        self.drain_where(instance_id, exit_when_idle, reason, true) != Drained::Busy
    }

    fn drain_where(
        &self,
        instance_id: &str,
        exit_when_idle: bool,
        reason: &str,
        only_idle: bool,
    ) -> Drained {
        let mut state = self.lock();
        let on_instance = |a: &AgentEntry| a.instance.instance_id == instance_id;
        if only_idle
            && state
                .agents
                .values()
                .any(|a| on_instance(a) && !(a.attempts.is_empty() && a.unacked.is_empty()))
        {
            return Drained::Busy;
        }
        let mut drained = Drained::NoAgent;
        for entry in state.agents.values_mut().filter(|a| on_instance(a)) {
            entry.draining = true;
            let _ = entry.tx.send(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Drain(Drain {
                    reason: reason.to_owned(),
                    exit_when_idle,
                })),
            });
            drained = Drained::Yes;
        }
        drained
    }

    /// Tells every queued job, once, why it waits (in its log).
    pub fn notify_waiting(&self, text: &str) {
        let mut state = self.lock();
        let State { queue, jobs, .. } = &mut *state;
        for id in queue.iter() {
            if let Some(job) = jobs.get_mut(id) {
                if job.lease.state == LeaseState::Queued && !job.waiting_noticed {
                    job.waiting_noticed = true;
                    let _ = job.events.send(JobEvent::Notice(text.to_owned()));
                }
            }
        }
    }

    /// Instances whose agent said they are going away (Spot notice, Auto
    /// Scaling termination, SIGTERM) or at risk (rebalance), also after the
    /// agent has left. Forgotten after a day.
    pub fn doomed_instances(&self) -> HashSet<String> {
        let mut state = self.lock();
        state.doomed.retain(|_, at| at.elapsed() < DOOMED_MEMORY);
        state.doomed.keys().cloned().collect()
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Attempts that need a slot: queued plus assigned or running.
    pub fn demand(&self) -> u32 {
        let state = self.lock();
        let n = state
            .jobs
            .values()
            .filter(|j| j.lease.state != LeaseState::Finished)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The connected agents.
    pub fn agents(&self) -> Vec<AgentSnapshot> {
        let state = self.lock();
        let mut out: Vec<AgentSnapshot> = state
            .agents
            .iter()
            .map(|(id, a)| AgentSnapshot {
                agent_id: id.clone(),
                instance_id: a.instance.instance_id.clone(),
                instance_type: a.instance.instance_type.clone(),
                zone: a.instance.availability_zone.clone(),
                market: a.instance.market.clone(),
                executor: a.executor.clone(),
                capacity: a.capacity,
                busy: u32::try_from(a.attempts.len()).unwrap_or(u32::MAX),
                draining: a.draining,
                used: a.used,
                connected_for: a.connected_at.elapsed(),
                idle_since: a.idle_since,
                remote: a.remote,
            })
            .collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    /// The held jobs.
    pub fn jobs(&self) -> Vec<JobSnapshot> {
        let state = self.lock();
        state
            .jobs
            .values()
            .map(|j| JobSnapshot {
                job_id: j.payload.id,
                name: j.payload.display_name(),
                attempt: j.lease.attempt,
                state: j.lease.state.name(),
                agent: j.lease.state.agent().map(str::to_owned),
                age: j.taken_at.elapsed(),
                output_bytes: j.output_bytes,
            })
            .collect()
    }
}

/// Sends a cancel to an agent; a closed channel means the agent is gone,
/// which the session's end already handles.
fn send_cancel(
    tx: &mpsc::UnboundedSender<CoordinatorMessage>,
    (job_id, attempt): (i64, u32),
    mode: CancelMode,
    reason: &str,
) {
    let _ = tx.send(CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Cancel(Cancel {
            attempt: Some(AttemptRef::new(job_id, attempt)),
            mode: mode.into(),
            reason: reason.to_owned(),
        })),
    });
}

fn touch_idle(entry: &mut AgentEntry) {
    if entry.attempts.is_empty() {
        entry.idle_since.get_or_insert_with(Instant::now);
    } else {
        entry.idle_since = None;
    }
}

/// How long an interrupted instance is remembered: far longer than any
/// instance outlives its notice.
const DOOMED_MEMORY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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

/// An attempt is gone: queue the next one, or tell the job that it ends
/// here (attempts ran out, or it opted out of re-runs).
fn lose_attempt(state: &mut State, (job_id, attempt): (i64, u32), reason: &str) {
    let Some(job) = state.jobs.get_mut(&job_id) else {
        return;
    };
    if attempt == job.lease.attempt
        && job.lease.state.agent().is_some()
        && !allows_rerun(&job.payload)
    {
        job.lease.state = LeaseState::Finished;
        let _ = job.events.send(JobEvent::Lost {
            attempt,
            reason: format!(
                "{reason}; the job sets {RERUN_VARIABLE}=false, so it is not run again"
            ),
            next: AfterLoss::NoRerun,
        });
        return;
    }
    match job.lease.apply(LeaseEvent::Lost { attempt }) {
        Ok(()) => {
            let _ = job.events.send(JobEvent::Lost {
                attempt,
                reason: reason.to_owned(),
                next: AfterLoss::Requeued,
            });
            job.queued_at = Instant::now();
            state.metrics.rerun();
            state.persist_lease(job_id);
            state.queue.push_back(job_id);
        }
        Err(crate::lease::LeaseError::AttemptsExhausted { .. }) => {
            job.lease.state = LeaseState::Finished;
            let _ = job.events.send(JobEvent::Lost {
                attempt,
                reason: reason.to_owned(),
                next: AfterLoss::Exhausted,
            });
        }
        Err(e) => {
            tracing::debug!(job_id, attempt, error = %e, "loss of a stale attempt ignored");
        }
    }
}

/// Matches queued attempts with agents that asked for work, never giving an
/// agent more than it asked for. Spreads work: the agent with the most
/// credit goes first.
fn dispatch(state: &mut State) {
    while let Some(&job_id) = state.queue.front() {
        let Some(job) = state.jobs.get(&job_id) else {
            state.queue.pop_front();
            continue;
        };
        if job.lease.state != LeaseState::Queued {
            state.queue.pop_front();
            continue;
        }
        let best = state
            .agents
            .iter()
            .filter(|(_, a)| a.credit() > 0)
            .max_by_key(|(id, a)| (a.credit(), std::cmp::Reverse((*id).clone())))
            .map(|(id, _)| id.clone());
        let Some(agent_id) = best else {
            return;
        };
        state.queue.pop_front();
        let Some(job) = state.jobs.get_mut(&job_id) else {
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
        let attempt = job.lease.attempt;
        state.metrics.observe_queue_wait(job.queued_at.elapsed());
        let raw = job.raw.clone();
        let events = job.events.clone();
        // Write ahead: a restarted coordinator must know who has it.
        state.persist_lease(job_id);
        let Some(entry) = state.agents.get_mut(&agent_id) else {
            continue;
        };
        entry.unacked.insert((job_id, attempt));
        entry.attempts.insert((job_id, attempt));
        entry.idle_since = None;
        let _ = entry.tx.send(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Assign(Assign {
                attempt: Some(AttemptRef::new(job_id, attempt)),
                job_json: raw.to_vec(),
            })),
        });
        let _ = events.send(JobEvent::Assigned {
            attempt,
            agent: agent_id,
            instance: entry.instance.clone(),
            executor: entry.executor.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servitor_proto::agent::{agent_message::Msg, Pull, Started};

    fn job(id: i64) -> (Arc<JobPayload>, Bytes) {
        let payload = JobPayload {
            id,
            token: "t".into(),
            ..JobPayload::default()
        };
        (Arc::new(payload), Bytes::from_static(b"{}"))
    }

    fn connect(
        core: &Core,
        id: &str,
        free: u32,
    ) -> (u64, mpsc::UnboundedReceiver<CoordinatorMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (session, stale) = core.agent_connected(
            id,
            InstanceFacts::default(),
            "shell".into(),
            free,
            free,
            &[],
            &[],
            "127.0.0.1:1".parse().unwrap(),
            tx,
        );
        assert!(stale.is_empty());
        (session, rx)
    }

    fn assigns(rx: &mut mpsc::UnboundedReceiver<CoordinatorMessage>) -> Vec<AttemptRef> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Some(coordinator_message::Msg::Assign(a)) = m.msg {
                out.push(a.attempt.unwrap());
            }
        }
        out
    }

    #[tokio::test]
    async fn never_assigns_more_than_asked() {
        let core = Core::new(CoreSettings { max_attempts: 3 });
        let (session, mut rx) = connect(&core, "a", 1);
        let mut job_rxs = Vec::new();
        for id in 1..=3 {
            let (p, raw) = job(id);
            job_rxs.push(core.hold_job(p, raw));
        }
        assert_eq!(assigns(&mut rx), vec![AttemptRef::new(1, 1)]);
        // A repeated pull before the agent acknowledged does not add credit.
        core.agent_message(
            "a",
            session,
            AgentMessage {
                msg: Some(Msg::Pull(Pull { free_slots: 1 })),
            },
        );
        assert!(assigns(&mut rx).is_empty());
        // Acknowledged, then a pull with a free slot again: the next job.
        core.agent_message(
            "a",
            session,
            AgentMessage {
                msg: Some(Msg::Started(Started {
                    attempt: Some(AttemptRef::new(1, 1)),
                })),
            },
        );
        // Started spends the slot of the earlier pull: nothing more yet.
        assert!(
            assigns(&mut rx).is_empty(),
            "a started attempt used the only slot"
        );
        core.agent_message(
            "a",
            session,
            AgentMessage {
                msg: Some(Msg::Pull(Pull { free_slots: 1 })),
            },
        );
        assert_eq!(assigns(&mut rx), vec![AttemptRef::new(2, 1)]);
    }

    #[tokio::test]
    async fn lost_agent_requeues_to_another_and_fences_the_old() {
        let core = Core::new(CoreSettings { max_attempts: 3 });
        let (s1, mut rx1) = connect(&core, "a", 1);
        let (p, raw) = job(7);
        let mut events = core.hold_job(p, raw);
        assert_eq!(assigns(&mut rx1), vec![AttemptRef::new(7, 1)]);
        core.agent_disconnected("a", s1);
        assert!(core.agent_lost("a", s1, "gone"));
        let (_s2, mut rx2) = connect(&core, "b", 1);
        assert_eq!(assigns(&mut rx2), vec![AttemptRef::new(7, 2)]);
        assert!(core.output_target("b", AttemptRef::new(7, 2)).is_some());
        assert!(core.output_target("a", AttemptRef::new(7, 1)).is_none());
        let mut lost = false;
        while let Ok(e) = events.try_recv() {
            lost |= matches!(
                e,
                JobEvent::Lost {
                    attempt: 1,
                    next: AfterLoss::Requeued,
                    ..
                }
            );
        }
        assert!(lost);
    }

    #[tokio::test]
    async fn restored_attempt_the_agent_no_longer_has_runs_again_unless_it_reports_it() {
        let core = Core::new(CoreSettings { max_attempts: 3 });
        let lease = LeaseRecord {
            attempt: 1,
            agent: Some("a".into()),
        };
        let (p, raw) = job(1);
        let mut gone = core.restore_job(p, raw, &lease, false);
        let (p, raw) = job(2);
        let mut reporting = core.restore_job(p, raw, &lease, false);
        let (tx, _rx) = mpsc::unbounded_channel();
        core.agent_connected(
            "a",
            InstanceFacts::default(),
            "shell".into(),
            1,
            0,
            &[],
            &[AttemptRef::new(2, 1)],
            "127.0.0.1:1".parse().unwrap(),
            tx,
        );
        assert!(matches!(
            gone.try_recv(),
            Ok(JobEvent::Lost {
                attempt: 1,
                next: AfterLoss::Requeued,
                ..
            })
        ));
        assert!(
            reporting.try_recv().is_err(),
            "a result is on its way: nothing lost"
        );
    }

    #[tokio::test]
    async fn reconnecting_agent_keeps_its_attempt_and_stale_ones_are_named() {
        let core = Core::new(CoreSettings { max_attempts: 3 });
        let (s1, mut rx1) = connect(&core, "a", 1);
        let (p, raw) = job(7);
        let _events = core.hold_job(p, raw);
        assert_eq!(assigns(&mut rx1).len(), 1);
        core.agent_disconnected("a", s1);
        let (tx, _rx) = mpsc::unbounded_channel();
        let (s2, stale) = core.agent_connected(
            "a",
            InstanceFacts::default(),
            "shell".into(),
            1,
            0,
            &[AttemptRef::new(7, 1), AttemptRef::new(99, 4)],
            &[],
            "127.0.0.1:1".parse().unwrap(),
            tx,
        );
        assert_eq!(stale, vec![AttemptRef::new(99, 4)]);
        assert!(
            !core.agent_lost("a", s1, "old session"),
            "the old session's grace timer must not fire"
        );
        assert!(core.output_target("a", AttemptRef::new(7, 1)).is_some());
        assert!(s2 > s1);
    }
}
