//! The fleet: instances that run agents, and the reconcile loop that sizes
//! it to the work the coordinator holds.
//!
//! [`Fleet`] is the seam: [`local`] runs agent processes on this machine,
//! [`aws`] drives an EC2 Auto Scaling group. The decisions are pure
//! functions: [`policy::plan_with`] sizes, [`budget::affordable_launches`]
//! keeps the fleet under its monthly cap. Not responsible for what runs on
//! an instance (the agent) or for jobs (`core`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::metrics::ScaleOp;

pub mod aws;
pub mod budget;
pub mod local;
pub mod policy;
pub mod pricing;
pub mod schedule;

use policy::InstanceState;
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
}

impl FleetError {
    /// Whether the next reconcile may succeed without anyone changing
    /// anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            FleetError::Spawn(_) | FleetError::Files { .. } => true,
            FleetError::Aws { retryable, .. } => *retryable,
        }
    }
}

/// One instance the fleet knows of.
#[derive(Clone, Debug)]
pub struct FleetInstance {
    pub id: String,
    /// When it was launched (or first seen, for an instance whose launch
    /// time the fleet cannot tell).
    pub launched_at: Instant,
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

    fn set(&self, summary: FleetSummary) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = summary;
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
    pub view: Arc<FleetView>,
    pub prices: Arc<PriceBook>,
    /// Month-to-date spend, persisted; `None` without a budget.
    pub ledger: Option<Arc<Mutex<budget::SpendLedger>>>,
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
    let mut recent_launches: Vec<Instant> = Vec::new();
    let mut last_block = None;
    // Accrue from where the ledger stopped: the coordinator's downtime cost
    // money too.
    let mut last_accrual = ctx
        .ledger
        .as_ref()
        .and_then(|l| {
            l.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .counted_until()
        })
        .unwrap_or_else(std::time::SystemTime::now);
    let mut budget_said = false;
    let mut retiring = std::collections::HashSet::new();
    let mut joined = std::collections::HashMap::new();
    let mut wake_at = None;
    let mut failures: u32 = 0;
    loop {
        let pass_started = tokio::time::Instant::now();
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
                &mut ReconcileMemory {
                    recent_launches: &mut recent_launches,
                    last_block: &mut last_block,
                    last_accrual: &mut last_accrual,
                    budget_said: &mut budget_said,
                    retiring: &mut retiring,
                    joined: &mut joined,
                    wake_at: &mut wake_at,
                },
                &stop,
            )
            .await;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = core.changed.notified() => {
                // Let a burst of changes settle into one decision, and keep
                // a busy coordinator's API calls to the fleet's pace.
                let settle = tokio::time::Instant::now() + SETTLE;
                tokio::time::sleep_until(settle.max(pass_started + fleet.min_pass_gap())).await;
            }
            () = tokio::time::sleep_until(next_tick(wake_at)) => {}
        }
    }
}

/// What one reconcile pass carries over to the next.
struct ReconcileMemory<'a> {
    recent_launches: &'a mut Vec<Instant>,
    last_block: &'a mut Option<usize>,
    last_accrual: &'a mut std::time::SystemTime,
    budget_said: &'a mut bool,
    /// Instances drained for `max_use_count`, removed once idle.
    retiring: &'a mut std::collections::HashSet<String>,
    /// When the plan may next change with no event (an idle time running
    /// out); the loop wakes then.
    wake_at: &'a mut Option<Instant>,
    /// Instances whose agent joined, and when it was last seen.
    joined: &'a mut std::collections::HashMap<String, Instant>,
}

async fn reconcile_once<F: Fleet>(
    fleet: &F,
    ctx: &ReconcileContext,
    settings: &FleetSettings,
    observed: Observation,
    memory: &mut ReconcileMemory<'_>,
    stop: &CancellationToken,
) {
    let core = &ctx.core;
    if observed.drift_corrected {
        core.metrics().scale_op(ScaleOp::DriftCorrection, 1);
    }
    let agents = core.agents();
    let now = Instant::now();
    let wall = std::time::SystemTime::now();
    let mut sized = Vec::with_capacity(observed.instances.len());
    let mut to_protect = Vec::new();
    let mut to_unprotect = Vec::new();
    let mut to_release = Vec::new();
    memory
        .joined
        .retain(|id, _| observed.instances.iter().any(|i| i.id == *id));
    for i in &observed.instances {
        let agent = agents.iter().find(|a| a.instance_id == i.id);
        if agent.is_some() {
            memory.joined.insert(i.id.clone(), now);
        }
        // An instance whose agent was here and left is no capacity: it is
        // not booting, and it may never serve again.
        let left = agent.is_none() && memory.joined.contains_key(&i.id);
        let state = match agent {
            _ if i.removing || left => InstanceState::Draining,
            Some(a) if a.draining => InstanceState::Draining,
            Some(a) => InstanceState::Ready {
                busy: a.busy,
                idle_since: a.idle_since,
            },
            None => InstanceState::Booting,
        };
        let busy = agent.map_or(0, |a| a.busy);
        // Busy instances are protected so that nothing else (a lowered
        // desired capacity, AZ rebalancing) picks them; idle ones lose it
        // before the policy may choose them.
        match (i.protected, busy > 0, agent.is_some()) {
            (Some(false), true, _) => to_protect.push(i.id.clone()),
            (Some(true), false, true) if !i.removing => to_unprotect.push(i.id.clone()),
            _ => {}
        }
        if i.awaiting_release && busy == 0 {
            to_release.push(i.id.clone());
        }
        sized.push(policy::Instance {
            id: i.id.clone(),
            state,
            launched_at: i.launched_at,
            used: agent.map_or(0, |a| a.used),
        });
    }
    for n in 0..observed.pending {
        // Asked for, not listed yet: capacity on its way, never reaped.
        sized.push(policy::Instance {
            id: format!("(pending {})", n + 1),
            state: InstanceState::Booting,
            launched_at: now,
            used: 0,
        });
    }
    if !to_protect.is_empty() {
        match fleet.protect(&to_protect, true).await {
            Ok(()) => {
                ctx.core
                    .metrics()
                    .scale_op(ScaleOp::Protect, count(&to_protect));
                tracing::info!(instances = ?to_protect, "protected busy instances from scale-in");
            }
            Err(e) => {
                tracing::warn!(instances = ?to_protect, error = %e, "failed to protect busy instances from scale-in")
            }
        }
    }
    if !to_unprotect.is_empty() {
        match fleet.protect(&to_unprotect, false).await {
            Ok(()) => {
                ctx.core
                    .metrics()
                    .scale_op(ScaleOp::Unprotect, count(&to_unprotect));
                tracing::info!(instances = ?to_unprotect, "removed scale-in protection from idle instances");
            }
            Err(e) => {
                tracing::warn!(instances = ?to_unprotect, error = %e, "failed to remove scale-in protection from idle instances")
            }
        }
    }
    for id in &to_release {
        match fleet.release(id).await {
            Ok(()) => {
                tracing::info!(instance = %id, "completed the termination lifecycle action: the instance's agent holds no job")
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "failed to complete the termination lifecycle action")
            }
        }
    }

    let mut current = settings.policy.clone();
    current.idle = schedule::active_policy(&settings.blocks, &settings.policy.idle, wall);
    if current.idle.block != *memory.last_block {
        tracing::info!(block = ?current.idle.block, idle_count = current.idle.idle_count, "sizing policy in force changed");
        *memory.last_block = current.idle.block;
    }
    if let Some(rate) = current.launch_rate {
        memory
            .recent_launches
            .retain(|t| now.saturating_duration_since(*t) < rate.per);
    }
    let demand = core.demand();
    core.metrics().set_jobs_held(count(&core.jobs()));
    *memory.wake_at = policy::next_deadline(&sized, &current, now);
    let mut plan = policy::plan_with(&policy::PlanInput {
        demand,
        instances: &sized,
        policy: &current,
        recent_launches: memory.recent_launches,
        now,
    });

    // Money: accrue what the fleet cost since the last pass, then hold
    // back launches the monthly cap cannot pay for.
    let mut spent = 0.0;
    let mut budget_held = 0;
    // Prices feed the budget and every job's cost line.
    refresh_prices(fleet, &ctx.prices, &observed).await;
    if let (Some(budget), Some(ledger)) = (&settings.budget, &ctx.ledger) {
        let running_hourly: f64 = observed
            .instances
            .iter()
            .filter(|i| !i.removing)
            .map(|i| ctx.prices.hourly_or_warn(&instance_facts(i, &agents)))
            .sum();
        {
            let mut ledger = ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let elapsed = wall
                .duration_since(*memory.last_accrual)
                .unwrap_or_default();
            ledger.accrue(wall, running_hourly, elapsed);
            spent = ledger.spent(wall);
        }
        *memory.last_accrual = wall;
        if plan.launch > 0 {
            let launch_hourly = observed
                .launch_profile
                .as_ref()
                .map_or(0.0, |p| ctx.prices.launch_hourly(p));
            let affordable = budget::affordable_launches(&budget::BudgetInput {
                monthly_usd: budget.monthly_usd,
                spent_usd: spent,
                running_hourly_usd: running_hourly,
                launch_hourly_usd: launch_hourly,
                hours_left: budget::hours_left_in_month(wall),
                wanted: plan.launch,
            });
            budget_held = plan.launch - affordable;
            plan.launch = affordable;
        }
        if budget_held > 0 {
            let text = format!(
                "Waiting for budget: the fleet would break the monthly cap of ${:.2} (${spent:.2} spent this month); the job runs when an instance frees up or the cap is raised.",
                budget.monthly_usd
            );
            core.notify_waiting(&text);
            if !*memory.budget_said {
                tracing::warn!(
                    held_back = budget_held,
                    spent_usd = spent,
                    monthly_usd = budget.monthly_usd,
                    "not launching instances: the monthly budget would be exceeded"
                );
                *memory.budget_said = true;
            }
        } else if *memory.budget_said {
            tracing::info!(spent_usd = spent, "launches are within the budget again");
            *memory.budget_said = false;
        }
        ctx.core
            .metrics()
            .set_spend(spent, Some(budget.monthly_usd));
    }
    core.metrics().set_budget_blocked(budget_held);

    let mut counts = [0u32; 4];
    for i in &sized {
        let slot = match i.state {
            InstanceState::Booting => 0,
            InstanceState::Ready { busy: 0, .. } => 1,
            InstanceState::Ready { .. } => 2,
            InstanceState::Draining => 3,
        };
        counts[slot] += 1;
    }
    ctx.core
        .metrics()
        .set_instances(counts[0], counts[1], counts[2], counts[3]);
    core.metrics().set_capacity(
        observed.desired.unwrap_or_else(|| count(&sized)),
        count(&observed.instances),
    );
    ctx.view.set(FleetSummary {
        provider: fleet.provider(),
        instances: sized
            .iter()
            .map(|i| {
                let fleet_instance = observed.instances.iter().find(|f| f.id == i.id);
                InstanceStatus {
                    id: i.id.clone(),
                    state: state_name(&i.state),
                    age: now.saturating_duration_since(i.launched_at),
                    instance_type: fleet_instance
                        .map(|f| f.instance_type.clone())
                        .unwrap_or_default(),
                    market: fleet_instance
                        .map(|f| instance_facts(f, &agents).market)
                        .unwrap_or_default(),
                    protected: fleet_instance.and_then(|f| f.protected),
                }
            })
            .collect(),
        desired: observed.desired,
        budget_held,
        spent_usd: spent,
        budget_usd: settings.budget.as_ref().map(|b| b.monthly_usd),
    });

    if stop.is_cancelled() {
        return;
    }
    for reaped in &plan.reap {
        tracing::warn!(instance = %reaped.id, reason = %reaped.reason, "removing an instance that never joined; check the image and its user-data");
        match fleet.remove(&reaped.id).await {
            Ok(()) => core.metrics().scale_op(ScaleOp::Reap, 1),
            Err(e) => {
                tracing::error!(instance = %reaped.id, error = %e, "failed to remove instance");
            }
        }
    }
    for id in &plan.retire {
        tracing::info!(instance = %id, "instance reached max_use_count; draining it, it goes once its jobs are done");
        core.drain_instance(id, true, "max_use_count reached");
        memory.retiring.insert(id.clone());
    }
    // An instance going away (Spot notice, Auto Scaling termination) or at
    // risk (rebalance) is let go as soon as its jobs are handed back or
    // done: terminating it ourselves, with the desired capacity lowered,
    // keeps the group from launching a replacement nobody asked for; the
    // policy launches one if the work needs it. An instance whose agent
    // left and did not come back within the boot timeout is broken: it
    // goes too.
    let grace = settings.policy.boot_timeout.unwrap_or(Duration::MAX);
    let doomed = core.doomed_instances();
    for i in observed.instances.iter().filter(|i| !i.removing) {
        let why = match agents.iter().find(|a| a.instance_id == i.id) {
            Some(a) if doomed.contains(&i.id) && a.busy == 0 => {
                Some("it was interrupted and its jobs are handed back")
            }
            Some(_) => None,
            None if doomed.contains(&i.id) => Some("it was interrupted and its agent has left"),
            None => memory
                .joined
                .get(&i.id)
                .filter(|since| now.saturating_duration_since(**since) >= grace)
                .map(|_| "its agent left and did not come back within the boot timeout"),
        };
        if let Some(why) = why {
            match fleet.remove(&i.id).await {
                Ok(()) => {
                    tracing::info!(instance = %i.id, reason = why, "removed an instance that serves no more");
                    core.metrics().scale_op(ScaleOp::Terminate, 1);
                    memory.joined.remove(&i.id);
                }
                Err(e) => {
                    tracing::warn!(instance = %i.id, error = %e, "failed to remove an instance that serves no more");
                }
            }
        }
    }
    // Retired instances go once their running jobs are done, never before.
    let mut done = Vec::new();
    for id in memory.retiring.iter() {
        match observed.instances.iter().find(|i| i.id == *id) {
            None => done.push(id.clone()),
            Some(i) if i.removing => done.push(id.clone()),
            Some(_) => {
                let busy = agents
                    .iter()
                    .find(|a| a.instance_id == *id)
                    .map_or(0, |a| a.busy);
                if busy == 0 {
                    match fleet.remove(id).await {
                        Ok(()) => {
                            tracing::info!(instance = %id, "removed an instance that reached max_use_count");
                            core.metrics().scale_op(ScaleOp::Retire, 1);
                            done.push(id.clone());
                        }
                        Err(e) => {
                            tracing::error!(instance = %id, error = %e, "failed to remove instance");
                        }
                    }
                }
            }
        }
    }
    for id in done {
        memory.retiring.remove(&id);
    }
    for id in &plan.remove {
        // A job may have reached the instance since the plan was made:
        // only an instance still idle as it is drained is removed.
        if !core.drain_if_idle(id, true, "idle instance removed by the fleet") {
            tracing::debug!(instance = %id, "idle instance took a job before it could be removed; keeping it");
            continue;
        }
        tracing::info!(instance = %id, "removing idle instance");
        match fleet.remove(id).await {
            Ok(()) => core.metrics().scale_op(ScaleOp::Terminate, 1),
            Err(e) => tracing::error!(instance = %id, error = %e, "failed to remove instance"),
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

/// The regular tick, or sooner when an idle time runs out (just after it,
/// so the policy sees it passed).
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
