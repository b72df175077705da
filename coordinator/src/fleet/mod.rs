//! The fleet: instances that run agents, and the reconcile loop that sizes
//! it to the work the coordinator holds.
//!
//! [`Fleet`] is the seam: [`local`] runs agent processes on this machine,
//! [`aws`] drives an EC2 Auto Scaling group. Every decision is made by one
//! pure function, [`policy::plan_with`] (which weighs the monthly cap with
//! [`budget::affordable_launches`]); the reconcile loop here only observes
//! (the fleet, the core, the spend ledger), remembers what the planner needs
//! of the past, calls the planner, and carries its plan out through the
//! seam. Not responsible for what runs on an instance (the agent) or for
//! jobs (`core`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::{AgentSnapshot, Core};
use crate::metrics::ScaleOp;

pub mod aws;
pub mod budget;
pub mod fargate;
pub mod local;
pub mod policy;
pub mod pricing;
pub mod schedule;

use policy::{InstanceState, TerminateReason};
use pricing::{PriceBook, PricedInstance};

/// How often the fleet is reconciled even when nothing signalled a change.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a burst of changes may settle into one decision.
const SETTLE: Duration = Duration::from_millis(50);

/// How long after a deadline the loop wakes, so the deadline has passed.
const DEADLINE_SLACK: Duration = Duration::from_millis(10);

/// A fleet failure.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("failed to start an agent process: {0}")]
    Spawn(String),
    #[error("failed to prepare the agent's files in {path}: {source}")]
    Files {
        path: String,
        source: std::io::Error,
    },
    /// An Auto Scaling or EC2 call failed.
    #[error("{operation} failed for auto scaling group {group}: {detail}")]
    Aws {
        operation: &'static str,
        group: String,
        detail: String,
        /// Worth trying again on the next reconcile (throttling, contention,
        /// an unreachable endpoint), as opposed to a refusal such as missing
        /// permissions or an unknown group.
        retryable: bool,
    },
    /// An ECS call failed.
    #[error("{operation} failed for ECS cluster {cluster}: {detail}")]
    Ecs {
        operation: &'static str,
        cluster: String,
        detail: String,
        retryable: bool,
    },
}

impl FleetError {
    /// Whether the next reconcile may succeed without anyone changing
    /// anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            FleetError::Spawn(_) | FleetError::Files { .. } => true,
            FleetError::Aws { retryable, .. } | FleetError::Ecs { retryable, .. } => *retryable,
        }
    }
}

/// One instance the fleet knows of.
#[derive(Clone, Debug)]
pub struct FleetInstance {
    pub id: String,
    /// When it was launched; `None` where the fleet cannot tell (a local
    /// agent found running after a restart, an instance EC2 would not
    /// describe).
    pub launched_at: Option<Instant>,
    /// Being removed: terminating, detaching or in standby.
    pub removing: bool,
    /// Scale-in protection as the fleet reports it; `None` where the fleet
    /// has no such notion (local processes).
    pub protected: Option<bool>,
    /// Waiting in a termination lifecycle hook for us to let it go.
    pub awaiting_release: bool,
    pub instance_type: String,
    pub zone: String,
    /// `spot` or `on-demand` as the cloud reports it; empty when unknown.
    pub market: String,
}

/// What a fleet looks like right now.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub instances: Vec<FleetInstance>,
    /// Instances asked for and not yet listed (a cloud group's desired
    /// capacity beyond its instances): they count as booting.
    pub pending: u32,
    /// The capacity the fleet is set to, where it has one.
    pub desired: Option<u32>,
    /// What a new instance will be, for the budget: type, zone and market.
    pub launch_profile: Option<LaunchProfile>,
    /// Someone else had changed the desired capacity; it was set back.
    pub drift_corrected: bool,
}

/// The kind of instance a launch brings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchProfile {
    /// Instance types it may be; the budget assumes the dearest.
    pub instance_types: Vec<String>,
    pub zones: Vec<String>,
    pub spot: bool,
}

/// The instances that run agents.
pub trait Fleet: Send + Sync + 'static {
    /// `local` or `aws-asg`, for logs and status.
    fn provider(&self) -> &'static str;
    /// Looks at the fleet (and, for a cloud group, corrects a desired
    /// capacity someone else changed).
    fn observe(&self) -> impl std::future::Future<Output = Result<Observation, FleetError>> + Send;
    /// Starts `count` new instances; returns how many were asked for.
    fn launch(
        &self,
        count: u32,
    ) -> impl std::future::Future<Output = Result<u32, FleetError>> + Send;
    /// Removes exactly this instance (its agent has been told to drain)
    /// and lowers the fleet's size by one.
    fn remove(&self, id: &str) -> impl std::future::Future<Output = Result<(), FleetError>> + Send;
    /// Sets scale-in protection on these instances, so that nothing but
    /// the coordinator takes a busy one. Fleets without it do nothing.
    fn protect(
        &self,
        ids: &[String],
        protected: bool,
    ) -> impl std::future::Future<Output = Result<(), FleetError>> + Send {
        let _ = (ids, protected);
        async { Ok(()) }
    }
    /// Lets an instance held by a termination lifecycle hook go, once its
    /// agent has drained. Fleets without hooks do nothing.
    fn release(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<(), FleetError>> + Send {
        let _ = id;
        async { Ok(()) }
    }
    /// The least time between two looks at the fleet when changes come
    /// fast, so a busy coordinator does not run into API rate limits.
    fn min_pass_gap(&self) -> Duration {
        Duration::ZERO
    }
    /// The current Spot price of an instance type in a zone, in US dollars
    /// an hour; `None` where the fleet has no Spot market.
    fn spot_price(
        &self,
        instance_type: &str,
        zone: &str,
    ) -> impl std::future::Future<Output = Result<Option<f64>, FleetError>> + Send {
        let _ = (instance_type, zone);
        async { Ok(None) }
    }
}

/// A fleet instance as the status display shows it.
#[derive(Clone, Debug)]
pub struct InstanceStatus {
    pub id: String,
    pub state: &'static str,
    pub age: Duration,
    pub instance_type: String,
    pub market: String,
    pub protected: Option<bool>,
}

/// The latest view of the fleet, for status displays.
#[derive(Clone, Debug, Default)]
pub struct FleetSummary {
    pub provider: &'static str,
    pub instances: Vec<InstanceStatus>,
    pub desired: Option<u32>,
    /// Launches the budget holds back right now.
    pub budget_held: u32,
    pub spent_usd: f64,
    pub budget_usd: Option<f64>,
    /// Reconcile passes shown so far: a pass that starts after something
    /// happened has seen it once this has grown by two.
    pub passes: u64,
}

/// The latest view of the fleet, shared with the admin API.
#[derive(Debug, Default)]
pub struct FleetView(Mutex<FleetSummary>);

impl FleetView {
    /// The instances as of the last reconcile.
    pub fn get(&self) -> Vec<InstanceStatus> {
        self.summary().instances
    }

    /// Everything as of the last reconcile.
    pub fn summary(&self) -> FleetSummary {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, mut summary: FleetSummary) {
        let mut current = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        summary.passes = current.passes + 1;
        *current = summary;
    }
}

/// The sizing knobs and time-of-day blocks the reconcile loop applies.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    /// Base policy; its `idle` knobs are the default when no block matches.
    pub policy: policy::FleetPolicy,
    pub blocks: Vec<schedule::PolicyBlock>,
    pub budget: Option<budget::BudgetSettings>,
}

/// What the reconcile loop works with besides the fleet itself.
#[derive(Clone, Debug)]
pub struct ReconcileContext {
    pub core: Arc<Core>,
    /// The runner whose jobs and agents this fleet serves.
    pub runner: String,
    pub view: Arc<FleetView>,
    pub prices: Arc<PriceBook>,
    /// Month-to-date spend, persisted; `None` without a budget. One for
    /// every runner's fleet: the budget is one cap over all.
    pub ledger: Option<Arc<Mutex<budget::SpendLedger>>>,
    /// What each runner's fleet costs an hour right now, so each fleet's
    /// budget decision sees the others' running costs.
    pub running_hourly: Arc<Mutex<HashMap<String, f64>>>,
}

impl ReconcileContext {
    /// The context of `runner`'s fleet, alone under a budget of its own.
    pub fn new(core: Arc<Core>, runner: impl Into<String>, prices: Arc<PriceBook>) -> Self {
        Self {
            core,
            runner: runner.into(),
            view: Arc::new(FleetView::default()),
            prices,
            ledger: None,
            running_hourly: Arc::default(),
        }
    }
}

/// How an instance looks to the reconcile loop, for status and metrics.
fn state_name(state: &InstanceState) -> &'static str {
    match state {
        InstanceState::Booting => "booting",
        InstanceState::Ready { busy: 0, .. } => "idle",
        InstanceState::Ready { .. } => "busy",
        InstanceState::Draining => "draining",
    }
}

/// Sizes the fleet to the work until `stop`. On stop it does nothing more:
/// a stopping coordinator never scales in.
pub async fn reconcile<F: Fleet>(
    fleet: Arc<F>,
    ctx: ReconcileContext,
    settings: FleetSettings,
    stop: CancellationToken,
) {
    let core = &ctx.core;
    // Accrue from where the ledger stopped: the coordinator's downtime cost
    // money too.
    let last_accrual = ctx
        .ledger
        .as_ref()
        .and_then(|l| {
            l.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .counted_until()
        })
        .unwrap_or_else(SystemTime::now);
    let mut memory = Memory::new(last_accrual);
    let mut failures: u32 = 0;
    let mut changes = core.changes();
    loop {
        let pass_started = Instant::now();
        let observed = match fleet.observe().await {
            Ok(o) => {
                failures = 0;
                Some(o)
            }
            Err(e) => {
                failures += 1;
                // Say it once, then only now and then: a long outage should
                // not flood the log.
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::error!(provider = fleet.provider(), error = %e, failures, "cannot read the fleet; keeping it as it is until it answers");
                }
                None
            }
        };
        // A stopping coordinator never acts on what its own stop did
        // (agents disconnecting look like lost capacity).
        if stop.is_cancelled() {
            return;
        }
        if let Some(observed) = observed {
            reconcile_once(
                fleet.as_ref(),
                &ctx,
                &settings,
                observed,
                &mut memory,
                &stop,
            )
            .await;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Ok(()) = changes.changed() => {
                // Let a burst of changes settle into one decision, and keep
                // a busy coordinator's API calls to the fleet's pace.
                let settle = Instant::now() + SETTLE;
                tokio::time::sleep_until(settle.max(pass_started + fleet.min_pass_gap())).await;
            }
            () = tokio::time::sleep_until(next_tick(memory.wake_at)) => {}
        }
    }
}

/// What the reconcile loop carries from one pass to the next: what the
/// planner needs to know of the past (when each instance was first seen,
/// whether it was found at start, when its agent was last seen, which ones
/// retire, recent launches) and the loop's own bookkeeping.
#[derive(Debug)]
struct Memory {
    /// A first look at the fleet has been taken: what it found is adopted.
    looked: bool,
    seen: HashMap<String, Sighting>,
    /// Instances retired for `max_use_count`, terminated once idle.
    retiring: HashSet<String>,
    recent_launches: Vec<Instant>,
    /// When the plan may next change with no event; the loop wakes then.
    wake_at: Option<Instant>,
    last_block: Option<usize>,
    last_accrual: SystemTime,
    budget_said: bool,
}

/// What the loop remembers of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sighting {
    first: Instant,
    /// There at the first look: running from before this coordinator.
    adopted: bool,
    /// When the core last knew an agent on it.
    agent: Option<Instant>,
}

impl Memory {
    fn new(last_accrual: SystemTime) -> Self {
        Self {
            looked: false,
            seen: HashMap::new(),
            retiring: HashSet::new(),
            recent_launches: Vec::new(),
            wake_at: None,
            last_block: None,
            last_accrual,
            budget_said: false,
        }
    }

    /// Updates what is remembered from this look at the fleet and the
    /// core, and returns the instances as the planner sees them.
    fn instances(
        &mut self,
        observed: &Observation,
        agents: &[AgentSnapshot],
        doomed: &HashSet<String>,
        now: Instant,
    ) -> Vec<policy::Instance> {
        let adopting = !self.looked;
        self.looked = true;
        let listed = |id: &String| observed.instances.iter().any(|i| i.id == *id);
        self.seen.retain(|id, _| listed(id));
        self.retiring.retain(listed);
        observed
            .instances
            .iter()
            .map(|i| {
                let agent = agents.iter().find(|a| a.instance_id == i.id);
                let sighting = self.seen.entry(i.id.clone()).or_insert(Sighting {
                    first: now,
                    adopted: adopting,
                    agent: None,
                });
                if agent.is_some() {
                    sighting.agent = Some(now);
                }
                policy::Instance {
                    id: i.id.clone(),
                    launched_at: i.launched_at,
                    first_seen: sighting.first,
                    adopted: sighting.adopted,
                    removing: i.removing,
                    protected: i.protected,
                    awaiting_release: i.awaiting_release,
                    agent: agent.map(|a| policy::AgentView {
                        busy: a.busy,
                        draining: a.draining,
                        idle_since: a.idle_since,
                        used: a.used,
                    }),
                    last_seen: sighting.agent,
                    interrupted: doomed.contains(&i.id),
                    retiring: self.retiring.contains(&i.id),
                }
            })
            .collect()
    }
}

/// One pass: observe (fleet, core, budget), plan, show, act.
async fn reconcile_once<F: Fleet>(
    fleet: &F,
    ctx: &ReconcileContext,
    settings: &FleetSettings,
    observed: Observation,
    memory: &mut Memory,
    stop: &CancellationToken,
) {
    let core = &ctx.core;
    if observed.drift_corrected {
        core.metrics().scale_op(ScaleOp::DriftCorrection, 1);
    }
    let agents: Vec<AgentSnapshot> = core
        .agents()
        .into_iter()
        .filter(|a| a.runner == ctx.runner)
        .collect();
    let doomed = core.doomed_instances();
    let demand = core.demand(&ctx.runner);
    core.metrics().set_jobs_held(
        &ctx.runner,
        count(
            &core
                .jobs()
                .into_iter()
                .filter(|j| j.runner == ctx.runner)
                .collect::<Vec<_>>(),
        ),
    );
    let now = Instant::now();
    let wall = SystemTime::now();
    let instances = memory.instances(&observed, &agents, &doomed, now);

    let mut policy = settings.policy.clone();
    policy.idle = schedule::active_policy(&settings.blocks, &settings.policy.idle, wall);
    if policy.idle.block != memory.last_block {
        tracing::info!(block = ?policy.idle.block, idle_count = policy.idle.idle_count, "sizing policy in force changed");
        memory.last_block = policy.idle.block;
    }
    if let Some(rate) = policy.launch_rate {
        memory
            .recent_launches
            .retain(|t| now.saturating_duration_since(*t) < rate.per);
    }
    // Prices feed the budget and every job's cost line.
    refresh_prices(fleet, &ctx.prices, &observed).await;
    let budget = observe_budget(ctx, settings, &observed, &agents, memory, wall);

    let plan = policy::plan_with(&policy::PlanInput {
        demand,
        instances: &instances,
        pending: observed.pending,
        policy: &policy,
        recent_launches: &memory.recent_launches,
        budget,
        now,
    });
    memory.wake_at = plan.wake_at;

    report_budget(ctx, settings, budget, &plan, memory);
    show(
        fleet,
        ctx,
        &Pass {
            observed: &observed,
            agents: &agents,
            instances: &instances,
            budget,
            plan: &plan,
            now,
        },
    );
    if stop.is_cancelled() {
        return;
    }
    execute(fleet, core, &plan, memory, demand, now, stop).await;
}

/// Accrues what the fleet cost since the last pass and returns where the
/// budget stands; `None` without one.
fn observe_budget(
    ctx: &ReconcileContext,
    settings: &FleetSettings,
    observed: &Observation,
    agents: &[AgentSnapshot],
    memory: &mut Memory,
    wall: SystemTime,
) -> Option<budget::BudgetInput> {
    let (Some(budget), Some(ledger)) = (&settings.budget, &ctx.ledger) else {
        return None;
    };
    let running_hourly: f64 = observed
        .instances
        .iter()
        .filter(|i| !i.removing)
        .map(|i| ctx.prices.hourly_or_warn(&instance_facts(i, agents)))
        .sum();
    let spent = {
        let mut ledger = ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = wall.duration_since(memory.last_accrual).unwrap_or_default();
        ledger.accrue(wall, running_hourly, elapsed);
        ledger.spent(wall)
    };
    memory.last_accrual = wall;
    // Every runner's fleet counts against the one cap.
    let all_running_hourly: f64 = {
        let mut running = ctx
            .running_hourly
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.insert(ctx.runner.clone(), running_hourly);
        running.values().sum()
    };
    Some(budget::BudgetInput {
        monthly_usd: budget.monthly_usd,
        spent_usd: spent,
        running_hourly_usd: all_running_hourly,
        launch_hourly_usd: observed
            .launch_profile
            .as_ref()
            .map_or(0.0, |p| ctx.prices.launch_hourly(p)),
        hours_left: budget::hours_left_in_month(wall),
    })
}
/// Tells waiting jobs and the log when the budget holds launches back.
fn report_budget(
    ctx: &ReconcileContext,
    settings: &FleetSettings,
    budget: Option<budget::BudgetInput>,
    plan: &policy::Plan,
    memory: &mut Memory,
) {
    let core = &ctx.core;
    let held = plan.held_back.budget;
    core.metrics().set_budget_blocked(&ctx.runner, held);
    let (Some(settings), Some(budget)) = (&settings.budget, budget) else {
        return;
    };
    core.metrics()
        .set_spend(budget.spent_usd, Some(settings.monthly_usd));
    if held > 0 {
        let text = format!(
            "Waiting for budget: the fleet would break the monthly cap of ${:.2} (${:.2} spent this month); the job runs when an instance frees up or the cap is raised.",
            settings.monthly_usd, budget.spent_usd
        );
        core.notify_waiting(&ctx.runner, &text);
        if !memory.budget_said {
            tracing::warn!(
                held_back = held,
                spent_usd = budget.spent_usd,
                monthly_usd = settings.monthly_usd,
                "not launching instances: the monthly budget would be exceeded"
            );
            memory.budget_said = true;
        }
    } else if memory.budget_said {
        tracing::info!(
            spent_usd = budget.spent_usd,
            "launches are within the budget again"
        );
        memory.budget_said = false;
    }
}

/// What one pass saw and decided, for [`show`].
struct Pass<'a> {
    observed: &'a Observation,
    agents: &'a [AgentSnapshot],
    instances: &'a [policy::Instance],
    budget: Option<budget::BudgetInput>,
    plan: &'a policy::Plan,
    now: Instant,
}

/// Publishes the pass's view of the fleet: gauges and the status summary.
fn show<F: Fleet>(fleet: &F, ctx: &ReconcileContext, pass: &Pass<'_>) {
    let Pass {
        observed,
        agents,
        instances,
        budget,
        plan,
        now,
    } = *pass;
    let metrics = ctx.core.metrics();
    // Pending instances are on their way: booting.
    let mut counts = [observed.pending, 0, 0, 0];
    for state in &plan.states {
        let slot = match state {
            InstanceState::Booting => 0,
            InstanceState::Ready { busy: 0, .. } => 1,
            InstanceState::Ready { .. } => 2,
            InstanceState::Draining => 3,
        };
        counts[slot] += 1;
    }
    metrics.set_instances(&ctx.runner, counts);
    let listed = count(&observed.instances);
    metrics.set_capacity(
        &ctx.runner,
        observed
            .desired
            .unwrap_or_else(|| listed.saturating_add(observed.pending)),
        listed,
    );
    let mut shown: Vec<InstanceStatus> = instances
        .iter()
        .zip(&plan.states)
        .zip(&observed.instances)
        .map(|((i, state), f)| InstanceStatus {
            id: i.id.clone(),
            state: state_name(state),
            age: now.saturating_duration_since(i.launched_at.unwrap_or(i.first_seen)),
            instance_type: f.instance_type.clone(),
            market: instance_facts(f, agents).market,
            protected: f.protected,
        })
        .collect();
    // Asked for, not listed yet.
    shown.extend((0..observed.pending).map(|n| InstanceStatus {
        id: format!("(pending {})", n + 1),
        state: state_name(&InstanceState::Booting),
        age: Duration::ZERO,
        instance_type: String::new(),
        market: String::new(),
        protected: None,
    }));
    ctx.view.set(FleetSummary {
        provider: fleet.provider(),
        instances: shown,
        desired: observed.desired,
        budget_held: plan.held_back.budget,
        spent_usd: budget.map_or(0.0, |b| b.spent_usd),
        budget_usd: budget.map(|b| b.monthly_usd),
        passes: 0,
    });
}

/// The scale operation a termination counts as.
fn scale_op(reason: &TerminateReason) -> ScaleOp {
    match reason {
        r if r.is_broken() => ScaleOp::Reap,
        TerminateReason::UsedUp { .. } => ScaleOp::Retire,
        _ => ScaleOp::Terminate,
    }
}

/// Carries the plan out through the fleet seam and the core, in the plan's
/// order, and records what was done.
async fn execute<F: Fleet>(
    fleet: &F,
    core: &Core,
    plan: &policy::Plan,
    memory: &mut Memory,
    demand: u32,
    now: Instant,
    stop: &CancellationToken,
) {
    if !plan.protect.is_empty() {
        match fleet.protect(&plan.protect, true).await {
            Ok(()) => {
                core.metrics()
                    .scale_op(ScaleOp::Protect, count(&plan.protect));
                tracing::info!(instances = ?plan.protect, "protected busy instances from scale-in");
            }
            Err(e) => {
                tracing::warn!(instances = ?plan.protect, error = %e, "failed to protect busy instances from scale-in")
            }
        }
    }
    if !plan.unprotect.is_empty() {
        match fleet.protect(&plan.unprotect, false).await {
            Ok(()) => {
                core.metrics()
                    .scale_op(ScaleOp::Unprotect, count(&plan.unprotect));
                tracing::info!(instances = ?plan.unprotect, "removed scale-in protection from idle instances");
            }
            Err(e) => {
                tracing::warn!(instances = ?plan.unprotect, error = %e, "failed to remove scale-in protection from idle instances")
            }
        }
    }
    for id in &plan.release {
        match fleet.release(id).await {
            Ok(()) => {
                tracing::info!(instance = %id, "completed the termination lifecycle action: the instance's agent holds no job")
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "failed to complete the termination lifecycle action")
            }
        }
    }
    for r in &plan.retire {
        tracing::info!(instance = %r.id, used = r.used, "instance reached max_use_count; draining it, it goes once its jobs are done");
        core.drain_instance(&r.id, true, "max_use_count reached");
        memory.retiring.insert(r.id.clone());
    }
    for t in &plan.terminate {
        // A job may have reached an idle instance since the plan was made:
        // it is removed only if still idle as it is drained.
        if matches!(t.reason, TerminateReason::Idle { .. })
            && !core.drain_if_idle(&t.id, true, "idle instance removed by the fleet")
        {
            tracing::debug!(instance = %t.id, "idle instance took a job before it could be removed; keeping it");
            continue;
        }
        if t.reason.is_broken() {
            tracing::warn!(instance = %t.id, reason = %t.reason, "removing a broken instance");
        } else {
            tracing::info!(instance = %t.id, reason = %t.reason, "removing an instance");
        }
        match fleet.remove(&t.id).await {
            Ok(()) => core.metrics().scale_op(scale_op(&t.reason), 1),
            Err(e) => {
                tracing::error!(instance = %t.id, error = %e, "failed to remove instance");
            }
        }
    }
    if plan.launch > 0 && !stop.is_cancelled() {
        match fleet.launch(plan.launch).await {
            Ok(n) => {
                memory
                    .recent_launches
                    .extend(std::iter::repeat_n(now, n as usize));
                core.metrics().scale_op(ScaleOp::Launch, n);
                tracing::info!(count = n, demand, "launched instances");
            }
            Err(e) => tracing::error!(error = %e, "failed to launch instances"),
        }
    }
    if plan.held_back != policy::HeldBack::default() {
        tracing::debug!(held_back = ?plan.held_back, "launches held back");
    }
}

/// The regular tick, or sooner when a deadline runs out (just after it, so
/// the planner sees it passed).
fn next_tick(wake_at: Option<Instant>) -> Instant {
    let regular = Instant::now() + RECONCILE_INTERVAL;
    wake_at.map_or(regular, |at| regular.min(at + DEADLINE_SLACK))
}

fn count<T>(items: &[T]) -> u32 {
    u32::try_from(items.len()).unwrap_or(u32::MAX)
}

/// An instance's type, zone and market: the agent's word where it joined
/// (it read them from instance metadata), the fleet's otherwise.
fn instance_facts(i: &FleetInstance, agents: &[crate::core::AgentSnapshot]) -> PricedInstance {
    let agent = agents.iter().find(|a| a.instance_id == i.id);
    let pick = |fleet: &str, agent: Option<&str>| match agent {
        Some(a) if !a.is_empty() => a.to_owned(),
        _ => fleet.to_owned(),
    };
    PricedInstance {
        instance_type: pick(&i.instance_type, agent.map(|a| a.instance_type.as_str())),
        zone: pick(&i.zone, agent.map(|a| a.zone.as_str())),
        market: pick(&i.market, agent.map(|a| a.market.as_str())),
    }
}

/// Fetches Spot prices the book lacks or holds for too long.
async fn refresh_prices<F: Fleet>(fleet: &F, prices: &PriceBook, observed: &Observation) {
    let mut wanted: Vec<(String, String)> = observed
        .instances
        .iter()
        .filter(|i| !i.instance_type.is_empty() && !i.zone.is_empty())
        .map(|i| (i.instance_type.clone(), i.zone.clone()))
        .collect();
    if let Some(profile) = observed.launch_profile.as_ref().filter(|p| p.spot) {
        for t in &profile.instance_types {
            for z in &profile.zones {
                wanted.push((t.clone(), z.clone()));
            }
        }
    }
    wanted.sort();
    wanted.dedup();
    for (instance_type, zone) in wanted {
        if !prices.spot_stale(&instance_type, &zone) {
            continue;
        }
        match fleet.spot_price(&instance_type, &zone).await {
            Ok(Some(price)) => prices.set_spot(&instance_type, &zone, price),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%instance_type, %zone, error = %e, "cannot read the Spot price; using the last one known");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two runners' fleets under one budget: each fleet's decision counts
    /// what the other's instances cost an hour, and both accrue into the
    /// one month-to-date spend.
    #[test]
    fn every_runners_fleet_counts_against_the_one_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let ledger = Arc::new(Mutex::new(
            budget::SpendLedger::open(dir.path(), store).unwrap(),
        ));
        let on_demand: std::collections::BTreeMap<String, f64> =
            [("m5.large".to_owned(), 0.5), ("m5.4xlarge".to_owned(), 2.0)].into();
        let prices = Arc::new(PriceBook::new(on_demand.clone()));
        let core = Core::new(crate::core::CoreSettings {
            max_attempts: 3,
            gitlab_url: String::new(),
        });
        let running_hourly = Arc::default();
        let context = |runner: &str| ReconcileContext {
            core: core.clone(),
            runner: runner.to_owned(),
            view: Arc::default(),
            prices: prices.clone(),
            ledger: Some(ledger.clone()),
            running_hourly: Arc::clone(&running_hourly),
        };
        let settings = FleetSettings {
            policy: policy::FleetPolicy {
                capacity_per_instance: 1,
                max_instances: 10,
                max_use_count: 0,
                boot_timeout: None,
                lost_grace: Duration::from_secs(30),
                launch_rate: None,
                idle: schedule::ActivePolicy::default(),
            },
            blocks: Vec::new(),
            budget: Some(budget::BudgetSettings {
                monthly_usd: 1000.0,
                on_demand_hourly_usd: on_demand,
            }),
        };
        let on_demand_of = |instance_type: &str, n: usize| {
            let mut observed = listed(&vec!["i-0"; n]);
            for (k, i) in observed.instances.iter_mut().enumerate() {
                i.id = format!("i-{instance_type}-{k}");
                i.instance_type = instance_type.to_owned();
                i.market = "on-demand".to_owned();
            }
            observed
        };
        let start = SystemTime::now();
        let mut lint = Memory::new(start);
        let mut build = Memory::new(start);
        let later = start + Duration::from_secs(3600);
        let lint_view = observe_budget(
            &context("lint"),
            &settings,
            &on_demand_of("m5.large", 2),
            &[],
            &mut lint,
            later,
        )
        .unwrap();
        assert!(
            (lint_view.running_hourly_usd - 1.0).abs() < 1e-9,
            "{lint_view:?}"
        );
        let build_view = observe_budget(
            &context("build"),
            &settings,
            &on_demand_of("m5.4xlarge", 1),
            &[],
            &mut build,
            later,
        )
        .unwrap();
        // The build fleet's decision sees the lint fleet's $1/h too...
        assert!(
            (build_view.running_hourly_usd - 3.0).abs() < 1e-9,
            "{build_view:?}"
        );
        // ...and the hour both ran is in the one spend: $1 + $2.
        assert!((build_view.spent_usd - 3.0).abs() < 1e-6, "{build_view:?}");
        // The lint fleet's next pass sees the build fleet's cost as well.
        let lint_again = observe_budget(
            &context("lint"),
            &settings,
            &on_demand_of("m5.large", 0),
            &[],
            &mut lint,
            later,
        )
        .unwrap();
        assert!(
            (lint_again.running_hourly_usd - 2.0).abs() < 1e-9,
            "{lint_again:?}"
        );
    }

    fn listed(ids: &[&str]) -> Observation {
        Observation {
            instances: ids
                .iter()
                .map(|id| FleetInstance {
                    id: (*id).to_owned(),
                    launched_at: None,
                    removing: false,
                    protected: None,
                    awaiting_release: false,
                    instance_type: String::new(),
                    zone: String::new(),
                    market: String::new(),
                })
                .collect(),
            ..Observation::default()
        }
    }

    fn agent_on(instance: &str, busy: u32) -> AgentSnapshot {
        AgentSnapshot {
            agent_id: format!("agent-{instance}"),
            runner: "default".to_owned(),
            instance_id: instance.to_owned(),
            instance_type: String::new(),
            zone: String::new(),
            market: String::new(),
            executor: "shell".to_owned(),
            capacity: 1,
            busy,
            draining: false,
            used: 2,
            connected_for: Duration::ZERO,
            idle_since: None,
            remote: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    /// What the planner learns of the past comes from the loop's memory:
    /// instances found at the first look are adopted, later ones are not;
    /// an agent's last sighting is kept after it leaves; instances that
    /// leave the fleet are forgotten.
    #[test]
    fn memory_marks_adoption_and_agent_sightings() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
        let mut memory = Memory::new(SystemTime::now());
        let none = HashSet::new();

        let first = memory.instances(&listed(&["old"]), &[], &none, t0);
        assert!(first[0].adopted, "found at the first look");
        assert_eq!((first[0].first_seen, first[0].last_seen), (t0, None));

        let second = memory.instances(&listed(&["old", "new"]), &[agent_on("old", 1)], &none, t1);
        assert_eq!(second[0].first_seen, t0);
        assert_eq!(second[0].last_seen, Some(t1), "its agent is back");
        assert_eq!(
            second[0].agent.as_ref().map(|a| (a.busy, a.used)),
            Some((1, 2))
        );
        assert!(!second[1].adopted, "launched since");
        assert_eq!(second[1].first_seen, t1);

        memory.retiring.insert("new".to_owned());
        let doomed: HashSet<String> = ["new".to_owned()].into();
        let third = memory.instances(&listed(&["new"]), &[], &doomed, t2);
        assert_eq!(third.len(), 1);
        assert!(third[0].interrupted && third[0].retiring);
        assert!(!memory.seen.contains_key("old"), "gone from the fleet");

        // Back in the fleet later: a new instance as far as anyone knows.
        let again = memory.instances(&listed(&["old", "new"]), &[], &none, t2);
        assert!(!again[0].adopted);
        assert_eq!(again[0].first_seen, t2);
        assert_eq!(again[1].last_seen, None, "the agent on `new` never joined");
    }
}
