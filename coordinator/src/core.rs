//! The coordinator's shared state, as a thin shell around the pure
//! [`LeaseBook`]: lock, feed the input with the time, unlock, then carry the
//! effects out with no lock held.
//!
//! How effects go out: under the book's lock, a step's lease book changes
//! are handed to the store's writer (which never blocks) and the rest of its
//! effects join the outbox, so both are in the book's order. Outside the
//! lock, the caller awaits its commit, then delivers the outbox from the
//! front for as long as the entries there are on disk. Whatever order callers
//! wake in, effects go out in the order the book decided them, and never
//! before the changes they depend on are durable (an Assign after its lease,
//! an Ack after its result). A slow disk delays the attempts that wait for it;
//! it never holds the lock that every agent and job needs.
//!
//! Not responsible for deciding anything (`lease::book`), GitLab I/O
//! (`jobs`), the agent link (`agents`), or the fleet (`fleet`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use servitor_proto::agent::{AgentMessage, AttemptRef, CancelMode, CoordinatorMessage};
use servitor_proto::job::JobPayload;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::lease::book::{Drained, Effect, Input, LeaseBook, Metric, Reply};
use crate::metrics::Metrics;
use crate::store::{Commit, LeaseRecord, Store};

pub use crate::lease::book::{
    allows_rerun, AfterLoss, AgentHello, AgentSnapshot, JobEvent, JobSnapshot, QueuedAttempt,
    RERUN_VARIABLE,
};

/// Settings the core needs.
#[derive(Clone, Debug)]
pub struct CoreSettings {
    /// Attempts a job gets before it fails for good.
    pub max_attempts: u32,
    /// The GitLab jobs are taken from; agents reach it with job tokens.
    pub gitlab_url: String,
}

/// Effects of one step, waiting for the step's changes to be durable.
#[derive(Debug)]
struct Pending {
    /// The store request they wait for, if the step changed the book.
    seq: Option<u64>,
    effects: Vec<Effect>,
}

/// Effects decided and not yet carried out, and where they go.
#[derive(Debug, Default)]
struct Outbox {
    pending: VecDeque<Pending>,
    /// Each live agent session's control stream writer.
    agents: HashMap<(String, u64), mpsc::UnboundedSender<CoordinatorMessage>>,
    /// Each held job's task.
    jobs: HashMap<i64, mpsc::UnboundedSender<JobEvent>>,
}

/// Shared coordinator state. Cheap to clone through `Arc`.
#[derive(Debug)]
pub struct Core {
    book: Mutex<LeaseBook>,
    outbox: Mutex<Outbox>,
    /// Where leases are persisted; `None` keeps them in memory only.
    store: Option<Store>,
    /// Bumped when demand or the agent set changes: every runner's fleet
    /// listens.
    changed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// A registration that must happen with the step that needs it.
enum Register {
    None,
    Job(i64, mpsc::UnboundedSender<JobEvent>),
    Agent(String, mpsc::UnboundedSender<CoordinatorMessage>),
}

impl Core {
    /// A core holding nothing, keeping leases in memory only.
    pub fn new(settings: CoreSettings) -> Arc<Self> {
        Self::with_store(settings, None)
    }

    /// A core holding nothing that persists leases in `store`.
    pub fn with_store(settings: CoreSettings, store: Option<Store>) -> Arc<Self> {
        Arc::new(Self {
            book: Mutex::new(
                LeaseBook::new(settings.max_attempts).with_gitlab_url(settings.gitlab_url),
            ),
            outbox: Mutex::new(Outbox::default()),
            store,
            changed: watch::channel(0).0,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Wakes every fleet: demand or the agent set changed.
    fn touch(&self) {
        self.changed
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Changes of demand or of the agent set, for a fleet to wait on.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn book(&self) -> MutexGuard<'_, LeaseBook> {
        // A panic while holding the lock already aborted the task that held
        // it; the book itself is still consistent (every mutation completes
        // before any call that could panic), so keep serving.
        self.book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Feeds one input under the lock: its changes go to the store and its
    /// other effects to the outbox, both in the book's order.
    fn step(&self, input: Input, register: Register) -> (Reply, Option<Commit>) {
        let mut book = self.book();
        let step = book.handle(Instant::now(), input);
        let (persists, effects): (Vec<Effect>, Vec<Effect>) = step
            .effects
            .into_iter()
            .partition(|e| matches!(e, Effect::Persist(_)));
        let changes: Vec<_> = persists
            .into_iter()
            .filter_map(|e| match e {
                Effect::Persist(change) => Some(change),
                _ => None,
            })
            .collect();
        let commit = match (&self.store, changes.is_empty()) {
            (Some(store), false) => Some(store.submit(changes)),
            _ => None,
        };
        let mut outbox = self.outbox();
        match register {
            Register::None => {}
            Register::Job(id, tx) => {
                outbox.jobs.insert(id, tx);
            }
            Register::Agent(agent, tx) => {
                if let Reply::Connected { session, .. } = &step.reply {
                    outbox.agents.retain(|(a, _), _| *a != agent);
                    outbox.agents.insert((agent, *session), tx);
                }
            }
        }
        outbox.pending.push_back(Pending {
            seq: commit.as_ref().map(Commit::seq),
            effects,
        });
        (step.reply, commit)
    }

    /// Feeds an input and carries its effects out: awaits its changes on
    /// disk, then delivers everything that is ready, its own effects
    /// included.
    async fn run(&self, input: Input, register: Register) -> Reply {
        let (reply, commit) = self.step(input, register);
        if let Some(commit) = commit {
            if let Err(e) = commit.durable().await {
                tracing::error!(error = %e, "lease book change not saved; a coordinator restart now would lose track of it");
            }
        }
        self.deliver();
        reply
    }

    /// For inputs that change nothing on disk: their effects go out now,
    /// unless earlier ones are still waiting for the disk (then with them).
    fn run_now(&self, input: Input) -> Reply {
        let (reply, commit) = self.step(input, Register::None);
        // None of these inputs changes the book on disk; were one to, its
        // effects would still go out in order, with the next delivery after
        // its commit.
        debug_assert!(commit.is_none(), "an input run at once persisted a change");
        self.deliver();
        reply
    }

    /// Carries out pending effects from the front of the outbox for as long
    /// as the changes they wait for are on disk.
    fn deliver(&self) {
        let durable = self.store.as_ref().map_or(u64::MAX, Store::durable_through);
        let mut outbox = self.outbox();
        while outbox
            .pending
            .front()
            .is_some_and(|p| p.seq.is_none_or(|s| s <= durable))
        {
            let Some(pending) = outbox.pending.pop_front() else {
                break;
            };
            for effect in pending.effects {
                match effect {
                    Effect::Persist(_) => {}
                    Effect::Event { job_id, event } => {
                        if let Some(tx) = outbox.jobs.get(&job_id) {
                            // A closed channel: the job's task ended.
                            let _ = tx.send(event);
                        }
                    }
                    Effect::Send {
                        agent,
                        session,
                        message,
                    } => {
                        if let Some(tx) = outbox.agents.get(&(agent, session)) {
                            // A closed channel: the session already ended,
                            // which its end handles.
                            let _ = tx.send(message);
                        }
                    }
                    Effect::Count(metric) => match metric {
                        Metric::QueueWait(wait) => self.metrics.observe_queue_wait(wait),
                        Metric::Rerun => self.metrics.rerun(),
                        Metric::SpotInterruption => self.metrics.spot_interruption(),
                    },
                }
            }
        }
    }

    /// Holds a job found in the store after a restart. Its attempt stays
    /// with the agent that had it, waiting for that agent to reconnect
    /// (see [`Core::expire_missing_agents`]); an unassigned job is queued.
    pub async fn restore_job(
        &self,
        payload: Arc<JobPayload>,
        raw: Bytes,
        runner: &str,
        lease: &LeaseRecord,
        finished: bool,
    ) -> mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = payload.id;
        let input = Input::Restore {
            payload,
            raw,
            runner: runner.to_owned(),
            lease: lease.clone(),
            finished,
        };
        self.run(input, Register::Job(id, tx)).await;
        self.touch();
        rx
    }

    /// Restored attempts whose agent has not reconnected go back to the
    /// queue. Called once the grace period after a restart is over.
    pub async fn expire_missing_agents(&self, reason: &str) {
        let input = Input::ExpireMissing {
            reason: reason.to_owned(),
        };
        self.run(input, Register::None).await;
        self.touch();
    }

    /// Starts holding a job `runner` took; it is in the lease book, and its
    /// attempt 1 queued for that runner's agents, when this returns.
    /// Returns the receiver of the job's events.
    pub async fn hold_job(
        &self,
        payload: Arc<JobPayload>,
        raw: Bytes,
        runner: &str,
    ) -> mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = payload.id;
        let input = Input::Hold {
            payload,
            raw,
            runner: runner.to_owned(),
        };
        self.run(input, Register::Job(id, tx)).await;
        self.touch();
        rx
    }

    /// Stops holding a job (it was reported or GitLab took it away), and
    /// forgets it in the lease book. If an agent still runs an attempt, it
    /// is told to abort it.
    pub async fn release_job(&self, job_id: i64) {
        self.run(Input::Release { job_id }, Register::None).await;
        self.outbox().jobs.remove(&job_id);
        self.touch();
    }

    /// Asks the agent running the job's current attempt to stop it.
    pub fn cancel_job(&self, job_id: i64, mode: CancelMode, reason: &str) -> bool {
        let input = Input::Cancel {
            job_id,
            mode,
            reason: reason.to_owned(),
        };
        self.run_now(input) == Reply::Applied(true)
    }

    /// Fails a queued job that cannot run on its runner's capacity, with
    /// `reason` in its log. Returns false if it is not queued (an agent has
    /// it already).
    pub fn refuse_job(&self, job_id: i64, reason: &str) -> bool {
        let input = Input::Refuse {
            job_id,
            reason: reason.to_owned(),
        };
        self.run_now(input) == Reply::Applied(true)
    }

    /// Takes a queued job out of the queue (it was canceled before it ran).
    /// Returns false if it is not queued.
    pub fn unqueue_job(&self, job_id: i64) -> bool {
        self.run_now(Input::Unqueue { job_id }) == Reply::Applied(true)
    }

    /// Registers a newly connected agent. `hello.running` are the attempts
    /// it says it still runs; the ones that are no longer wanted are
    /// returned so the agent can be told to stop them.
    pub async fn agent_connected(
        &self,
        hello: AgentHello,
        tx: mpsc::UnboundedSender<CoordinatorMessage>,
    ) -> (u64, Vec<AttemptRef>) {
        let agent_id = hello.agent.clone();
        let reply = self
            .run(Input::Connected(hello), Register::Agent(agent_id, tx))
            .await;
        self.touch();
        match reply {
            Reply::Connected { session, stale } => (session, stale),
            other => unreachable!("a hello is answered with its session, not {other:?}"),
        }
    }

    /// The agent's connection ended. Its attempts stay assigned to it: it may
    /// come back and report them; [`Core::agent_lost`] gives them up.
    pub fn agent_disconnected(&self, agent_id: &str, session: u64) {
        self.run_now(Input::Disconnected {
            agent: agent_id.to_owned(),
            session,
        });
        self.touch();
    }

    /// The agent has not come back within the grace period: its attempts go
    /// back to the queue. Returns false if it came back meanwhile.
    pub async fn agent_lost(&self, agent_id: &str, session: u64, reason: &str) -> bool {
        let input = Input::Lost {
            agent: agent_id.to_owned(),
            session,
            reason: reason.to_owned(),
        };
        let lost = self.run(input, Register::None).await == Reply::Applied(true);
        if lost {
            self.outbox().agents.remove(&(agent_id.to_owned(), session));
            self.touch();
        }
        lost
    }

    /// Handles one control message from an agent session.
    pub async fn agent_message(&self, agent_id: &str, session: u64, message: AgentMessage) {
        let input = Input::Message {
            agent: agent_id.to_owned(),
            session,
            message,
        };
        self.run(input, Register::None).await;
        self.touch();
    }

    /// Whether output for this attempt should be accepted from this agent;
    /// if so, the job's event sender.
    pub fn output_target(
        &self,
        agent_id: &str,
        attempt: AttemptRef,
    ) -> Option<mpsc::UnboundedSender<JobEvent>> {
        let book = self.book();
        if !book.accepts_output(agent_id, attempt) {
            return None;
        }
        self.outbox().jobs.get(&attempt.job_id).cloned()
    }

    /// Counts log bytes of the job's current attempt, for status displays.
    pub fn record_output(&self, job_id: i64, bytes: usize) {
        self.book().record_output(job_id, bytes as u64);
    }

    /// Tells an agent to stop an attempt that is not wanted any more.
    pub fn stop_stale(&self, agent_id: &str, attempt: AttemptRef) {
        self.run_now(Input::StopStale {
            agent: agent_id.to_owned(),
            attempt,
        });
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
        let input = Input::Drain {
            instance: instance_id.to_owned(),
            exit_when_idle,
            reason: reason.to_owned(),
            only_idle,
        };
        match self.run_now(input) {
            Reply::Drained(d) => d,
            _ => Drained::NoAgent,
        }
    }

    /// Tells every queued job of `runner`, once, why it waits (in its log).
    pub fn notify_waiting(&self, runner: &str, text: &str) {
        self.run_now(Input::NotifyWaiting {
            runner: runner.to_owned(),
            text: text.to_owned(),
        });
    }

    /// Instances whose agent said they are going away (Spot notice, Auto
    /// Scaling termination, SIGTERM) or at risk (rebalance), also after the
    /// agent has left. Forgotten after a day.
    pub fn doomed_instances(&self) -> HashSet<String> {
        self.book().doomed_instances(Instant::now())
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Attempts of `runner`'s jobs that need a slot: queued plus assigned
    /// or running.
    pub fn demand(&self, runner: &str) -> u32 {
        self.book().demand(runner)
    }

    /// `runner`'s attempts waiting for an agent, with their jobs.
    pub fn queued(&self, runner: &str) -> Vec<QueuedAttempt> {
        self.book().queued(runner)
    }

    /// The connected agents.
    pub fn agents(&self) -> Vec<AgentSnapshot> {
        self.book().agents(Instant::now())
    }

    /// The held jobs.
    pub fn jobs(&self) -> Vec<JobSnapshot> {
        self.book().jobs(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servitor_proto::agent::{coordinator_message, InstanceFacts};

    fn job(id: i64) -> (Arc<JobPayload>, Bytes) {
        let payload = JobPayload {
            id,
            token: "t".into(),
            ..JobPayload::default()
        };
        (Arc::new(payload), Bytes::from_static(b"{}"))
    }

    /// The shell with a real lease book on disk: nothing reaches an agent
    /// before the change it depends on is durable, and the book on disk
    /// says what the agent was told.
    #[tokio::test]
    async fn an_assign_reaches_the_agent_only_after_its_lease_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let core = Core::with_store(
            CoreSettings {
                max_attempts: 3,
                gitlab_url: String::new(),
            },
            Some(store.clone()),
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hello = AgentHello {
            agent: "a".into(),
            runner: "default".into(),
            only_job: None,
            instance: InstanceFacts::default(),
            executor: "shell".into(),
            capacity: 1,
            free_slots: 1,
            running: Vec::new(),
            reporting: Vec::new(),
            remote: "127.0.0.1:1".parse().unwrap(),
        };
        core.agent_connected(hello, tx).await;
        let (p, raw) = job(7);
        let _events = core.hold_job(p, raw, "default").await;
        let message = rx.try_recv().expect("assigned when hold_job returns");
        assert!(matches!(
            message.msg,
            Some(coordinator_message::Msg::Assign(_))
        ));
        // What the agent was told is what a restart would find.
        let stored = store.load().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            stored[0].lease,
            LeaseRecord {
                attempt: 1,
                agent: Some("a".into())
            }
        );
        core.release_job(7).await;
        assert!(
            store.load().unwrap().is_empty(),
            "released jobs are forgotten"
        );
    }
}
