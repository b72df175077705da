//! The fleet's decisions: one pure function, [`plan_with`], from plain
//! inputs (what the fleet, the core and the budget look like now, the
//! policy in force, and an injected clock) to every action the reconcile
//! loop carries out: launch, protect, unprotect, release, retire (drain for
//! `max_use_count`), terminate with its reason, and the next moment the
//! plan may change with no event. No I/O, so it is table-tested here with
//! made-up instants and can drive a simulator.
//!
//! Not responsible for choosing the time-of-day knobs (see
//! [`super::schedule`], whose [`ActivePolicy`] is an input here), for
//! reading the fleet, the core or the spend ledger, or for carrying the plan
//! out (the reconcile loop in [`super`] does all three).

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::budget::{affordable_launches, BudgetInput};
use super::schedule::ActivePolicy;

/// How an instance counts for sizing, and how status and metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Launched (or found running after a restart), agent not connected
    /// yet: capacity on its way.
    Booting,
    /// Agent connected; `busy` slots in use; `idle_since` set when busy is 0.
    Ready {
        busy: u32,
        idle_since: Option<Instant>,
    },
    /// Being removed, retiring, or without a working agent: no capacity,
    /// but it still counts towards `max_instances` while it exists.
    Draining,
}

/// The agent on an instance, as the core sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentView {
    /// Job attempts it holds.
    pub busy: u32,
    /// Takes no new work: told to drain, going away, or out of touch (the
    /// core keeps an agent that dropped its link for `lost_grace`).
    pub draining: bool,
    /// Since when it holds nothing; `None` while busy.
    pub idle_since: Option<Instant>,
    /// Jobs it started since it connected, for `max_use_count`.
    pub used: u32,
}

/// One instance as the planner sees it: the fleet's facts, its agent, and
/// what the reconcile loop remembers of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// When the fleet launched it, where the fleet can tell; a local agent
    /// found running after a restart has no launch time.
    pub launched_at: Option<Instant>,
    /// When this coordinator first saw it.
    pub first_seen: Instant,
    /// It was there when this coordinator started (found at the first look
    /// at the fleet): its agent must reconnect within `lost_grace`.
    pub adopted: bool,
    /// The fleet is taking it away (terminating, detaching, standby, or a
    /// local agent told to stop).
    pub removing: bool,
    /// Scale-in protection as the fleet reports it; `None` where the fleet
    /// has no such notion.
    pub protected: Option<bool>,
    /// Held in a termination lifecycle hook, waiting for us to let it go.
    pub awaiting_release: bool,
    /// Its agent, while the core knows one there.
    pub agent: Option<AgentView>,
    /// When its agent was last known to the core, if ever since this
    /// coordinator started.
    pub last_seen: Option<Instant>,
    /// Its agent said the instance is going away or at risk (Spot notice,
    /// Auto Scaling termination, rebalance, SIGTERM).
    pub interrupted: bool,
    /// Retired earlier for `max_use_count`: it goes once idle.
    pub retiring: bool,
}

impl Instance {
    /// An instance launched by this coordinator at `launched_at`, with no
    /// agent yet and nothing else known.
    pub fn launched(id: impl Into<String>, launched_at: Instant) -> Self {
        Self {
            id: id.into(),
            launched_at: Some(launched_at),
            first_seen: launched_at,
            adopted: false,
            removing: false,
            protected: None,
            awaiting_release: false,
            agent: None,
            last_seen: None,
            interrupted: false,
            retiring: false,
        }
    }

    fn busy(&self) -> u32 {
        self.agent.as_ref().map_or(0, |a| a.busy)
    }
}

/// At most `max` launches in any window of `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchRate {
    pub max: u32,
    pub per: Duration,
}

/// Every knob the planner reads.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetPolicy {
    /// Job slots per instance; 0 is taken as 1.
    pub capacity_per_instance: u32,
    /// Most instances in any state (booting, ready, draining); never
    /// exceeded by a launch.
    pub max_instances: u32,
    /// Jobs an instance runs before it is retired; 0 means no limit.
    pub max_use_count: u32,
    /// How long a launched instance may take for its agent to join, and how
    /// long an agent that left may take to come back; `None` waits forever.
    pub boot_timeout: Option<Duration>,
    /// How long the agent of an instance found running at start has to
    /// reconnect (`agents.lost_grace`, the time any agent gets to come
    /// back); an adopted instance still inside its boot timeout gets the
    /// rest of that instead, where the fleet knows its launch time.
    pub lost_grace: Duration,
    /// Launch throttle; `None` launches as fast as demand asks.
    pub launch_rate: Option<LaunchRate>,
    /// The idle knobs in force now (see [`super::schedule::active_policy`]).
    pub idle: ActivePolicy,
}

/// Everything [`plan_with`] decides from.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    /// Job attempts the coordinator holds that need a slot: queued plus
    /// running.
    pub demand: u32,
    pub instances: &'a [Instance],
    /// Instances asked for and not listed yet (a cloud group's desired
    /// capacity beyond its instances): booting capacity, never terminated.
    pub pending: u32,
    pub policy: &'a FleetPolicy,
    /// When each recent launch happened, one entry per instance; only those
    /// inside the launch-rate window matter.
    pub recent_launches: &'a [Instant],
    /// Where the monthly budget stands; `None` without a budget.
    pub budget: Option<BudgetInput>,
    pub now: Instant,
}

/// Why an instance is terminated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TerminateReason {
    /// Scale-in: idle past `idle_time` and not needed. Carry it out only if
    /// the instance is still idle as its agent is drained (a job may have
    /// reached it since the plan was made); keep it otherwise.
    Idle { idle_for: Duration },
    /// Its agent never joined within the boot timeout.
    BootTimeout { waited: Duration },
    /// Found running at start, its agent did not reconnect in time.
    NeverReconnected { waited: Duration },
    /// Its agent was here, left, and did not come back within the boot
    /// timeout.
    AgentLeft { gone_for: Duration },
    /// Retired for `max_use_count` and now idle.
    UsedUp { used: u32 },
    /// Going away anyway (Spot notice, Auto Scaling termination) or at
    /// risk, and it holds no job: terminating it ourselves, with the
    /// desired capacity lowered, keeps a cloud group from launching a
    /// replacement nobody asked for.
    Interrupted { agent_left: bool },
}

impl TerminateReason {
    /// An instance that does not work (its agent never joined or stopped
    /// answering), as opposed to one that did its part.
    pub fn is_broken(&self) -> bool {
        matches!(
            self,
            TerminateReason::BootTimeout { .. }
                | TerminateReason::NeverReconnected { .. }
                | TerminateReason::AgentLeft { .. }
        )
    }
}

fn human(d: Duration) -> humantime::FormattedDuration {
    // Whole seconds read better in a log line than nanoseconds.
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

impl fmt::Display for TerminateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TerminateReason::Idle { idle_for } => write!(f, "idle for {}", human(*idle_for)),
            TerminateReason::BootTimeout { waited } => write!(
                f,
                "its agent did not join within {} of launch; check the image and its user-data",
                human(*waited)
            ),
            TerminateReason::NeverReconnected { waited } => write!(
                f,
                "it was running when the coordinator started and its agent did not reconnect within {} (agents.lost_grace); the agent likely dials an address the coordinator no longer listens on (agents.listen changed, or a port 0 that moved) or is stuck",
                human(*waited)
            ),
            TerminateReason::AgentLeft { gone_for } => write!(
                f,
                "its agent left and did not come back within {} (fleet.boot_timeout)",
                human(*gone_for)
            ),
            TerminateReason::UsedUp { used } => {
                write!(f, "it ran {used} jobs (fleet.max_use_count) and is idle")
            }
            TerminateReason::Interrupted { agent_left: false } => {
                write!(f, "it was interrupted and its jobs are handed back")
            }
            TerminateReason::Interrupted { agent_left: true } => {
                write!(f, "it was interrupted and its agent has left")
            }
        }
    }
}

/// An instance to terminate, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    pub id: String,
    pub reason: TerminateReason,
}

/// An instance that reached `max_use_count`: its agent is drained (no new
/// job; exit once idle), and the instance goes once its jobs are done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retirement {
    pub id: String,
    pub used: u32,
}

/// Launches the plan wanted but did not make, by cause; for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldBack {
    pub max_instances: u32,
    pub launch_rate: u32,
    /// The monthly budget would be exceeded.
    pub budget: u32,
}

/// What the fleet should do now. Carry it out in this order: protect,
/// unprotect, release, retire, terminate, launch. The launch count already
/// assumes the terminated instances are gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub launch: u32,
    /// Busy instances to protect from scale-in, so that nothing but the
    /// coordinator takes one (a lowered desired capacity, AZ rebalancing).
    pub protect: Vec<String>,
    /// Idle instances that lose their protection.
    pub unprotect: Vec<String>,
    /// Instances held by a termination lifecycle hook whose agent holds no
    /// job: complete the lifecycle action.
    pub release: Vec<String>,
    pub retire: Vec<Retirement>,
    /// Exactly these instances, each at most once; never a busy one.
    pub terminate: Vec<Termination>,
    pub held_back: HeldBack,
    /// The next moment the plan may change with no event (an idle time, a
    /// boot timeout or a grace running out, a launch leaving the rate
    /// window); the loop wakes then.
    pub wake_at: Option<Instant>,
    /// How each input instance counts, in input order.
    pub states: Vec<InstanceState>,
}

/// Idle slots to keep: at least `idle_count`, or `scale_factor` × slots in
/// use when that is more, the factor's share capped by `scale_factor_limit`
/// (0 = no cap).
pub fn idle_slots(idle: &ActivePolicy, in_use: u32) -> u32 {
    let by_factor = if idle.scale_factor.is_finite() && idle.scale_factor > 0.0 {
        // A float-to-int `as` saturates, which is what a huge product wants.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let slots = (f64::from(in_use) * idle.scale_factor).ceil() as u32;
        match idle.scale_factor_limit {
            0 => slots,
            limit => slots.min(limit),
        }
    } else {
        0
    };
    idle.idle_count.max(by_factor)
}

/// How one instance counts, what happens to it, and when that may change.
struct Verdict {
    state: InstanceState,
    count: Count,
    terminate: Option<TerminateReason>,
    retire: bool,
    /// Jobs running there that need no other slot (a retiring instance
    /// finishes them).
    finishing: u32,
    /// When its verdict may change with no event.
    due: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    /// Capacity: booting or ready.
    Live,
    /// Exists and offers nothing: counts towards `max_instances` only.
    Lingering,
    /// Terminated by this plan: neither.
    Gone,
}

impl Verdict {
    fn new(state: InstanceState, count: Count) -> Self {
        Self {
            state,
            count,
            terminate: None,
            retire: false,
            finishing: 0,
            due: None,
        }
    }

    fn terminated(reason: TerminateReason) -> Self {
        Self {
            terminate: Some(reason),
            ..Self::new(InstanceState::Draining, Count::Gone)
        }
    }

    fn due(mut self, at: Option<Instant>) -> Self {
        self.due = at;
        self
    }
}

/// The verdict on one instance, before sizing.
fn judge(i: &Instance, policy: &FleetPolicy, now: Instant) -> Verdict {
    let since = |t: Instant| now.saturating_duration_since(t);
    if i.removing {
        return Verdict::new(InstanceState::Draining, Count::Lingering);
    }
    if i.interrupted {
        return match &i.agent {
            Some(a) if a.busy == 0 => {
                Verdict::terminated(TerminateReason::Interrupted { agent_left: false })
            }
            // Its jobs are being handed back; it goes once they are.
            Some(_) => Verdict::new(InstanceState::Draining, Count::Lingering),
            None => Verdict::terminated(TerminateReason::Interrupted { agent_left: true }),
        };
    }
    let used_up = policy.max_use_count > 0
        && i.agent
            .as_ref()
            .is_some_and(|a| a.used >= policy.max_use_count);
    if i.retiring || used_up {
        let used = i.agent.as_ref().map_or(0, |a| a.used);
        return match &i.agent {
            Some(a) if a.busy > 0 => Verdict {
                retire: !i.retiring,
                finishing: a.busy,
                ..Verdict::new(InstanceState::Draining, Count::Lingering)
            },
            _ => Verdict {
                retire: !i.retiring,
                ..Verdict::terminated(TerminateReason::UsedUp { used })
            },
        };
    }
    match (&i.agent, i.last_seen) {
        (Some(a), _) if a.draining => Verdict::new(InstanceState::Draining, Count::Lingering),
        (Some(a), _) => {
            let due = match (a.busy, a.idle_since) {
                (0, Some(idle)) => Some(idle + policy.idle.idle_time),
                _ => None,
            };
            Verdict::new(
                InstanceState::Ready {
                    busy: a.busy,
                    idle_since: a.idle_since,
                },
                Count::Live,
            )
            .due(due)
        }
        // Its agent was here and left: no capacity, it may never serve
        // again; a reboot gets the boot timeout to bring it back.
        (None, Some(seen)) => match policy.boot_timeout {
            Some(limit) if since(seen) >= limit => {
                Verdict::terminated(TerminateReason::AgentLeft {
                    gone_for: since(seen),
                })
            }
            limit => {
                Verdict::new(InstanceState::Draining, Count::Lingering).due(limit.map(|l| seen + l))
            }
        },
        // Found running at start: capacity only while its agent may still
        // be reconnecting, like any agent that lost its link.
        (None, None) if i.adopted => {
            let mut deadline = i.first_seen + policy.lost_grace;
            if let (Some(launched), Some(limit)) = (i.launched_at, policy.boot_timeout) {
                // Still booting when the coordinator started.
                deadline = deadline.max(launched + limit);
            }
            if now >= deadline {
                Verdict::terminated(TerminateReason::NeverReconnected {
                    waited: since(i.first_seen),
                })
            } else {
                Verdict::new(InstanceState::Booting, Count::Live).due(Some(deadline))
            }
        }
        (None, None) => {
            let launched = i.launched_at.unwrap_or(i.first_seen);
            match policy.boot_timeout {
                Some(limit) if since(launched) >= limit => {
                    Verdict::terminated(TerminateReason::BootTimeout {
                        waited: since(launched),
                    })
                }
                limit => Verdict::new(InstanceState::Booting, Count::Live)
                    .due(limit.map(|l| launched + l)),
            }
        }
    }
}

/// Decides everything the fleet does now.
///
/// Each instance is judged on its own first: protection follows whether it
/// is busy; one that is going away, used up, broken (its agent never
/// joined, left for good, or, found running at start, never reconnected) is
/// terminated once it holds no job, and no longer counts as capacity.
///
/// Then sizing: capacity counts booting (pending included) and ready
/// instances; jobs still running on a retiring instance need no new slot.
/// The target is
/// `ceil((demand − running on retiring + idle slots) / capacity_per_instance)`
/// instances. Below it, launch the difference, held back by `max_instances`
/// (counting every instance that still exists), the launch rate and the
/// budget, in that order. Above the target or above `max_instances`,
/// terminate only instances idle for at least `idle_time`, longest idle
/// first, and no more than the surplus.
pub fn plan_with(input: &PlanInput<'_>) -> Plan {
    let policy = input.policy;
    let now = input.now;
    let cap = policy.capacity_per_instance.max(1);
    let mut out = Plan::default();
    let mut due: Vec<Instant> = Vec::new();

    let mut live: u32 = input.pending;
    let mut lingering: u32 = 0;
    let mut finishing: u32 = 0;
    let mut idle: Vec<(&Instance, Instant)> = Vec::new();
    for i in input.instances {
        let busy = i.busy();
        match (i.protected, busy > 0) {
            (Some(false), true) => out.protect.push(i.id.clone()),
            (Some(true), false) if i.agent.is_some() && !i.removing => {
                out.unprotect.push(i.id.clone());
            }
            _ => {}
        }
        if i.awaiting_release && busy == 0 {
            out.release.push(i.id.clone());
        }
        let verdict = judge(i, policy, now);
        match verdict.count {
            Count::Live => live += 1,
            Count::Lingering => lingering += 1,
            Count::Gone => {}
        }
        finishing = finishing.saturating_add(verdict.finishing);
        if verdict.retire {
            out.retire.push(Retirement {
                id: i.id.clone(),
                used: i.agent.as_ref().map_or(0, |a| a.used),
            });
        }
        if let Some(reason) = verdict.terminate {
            out.terminate.push(Termination {
                id: i.id.clone(),
                reason,
            });
        }
        if let InstanceState::Ready {
            busy: 0,
            idle_since: Some(since),
        } = verdict.state
        {
            if now.saturating_duration_since(since) >= policy.idle.idle_time {
                idle.push((i, since));
            }
        }
        due.extend(verdict.due);
        out.states.push(verdict.state);
    }

    let needed_slots = input
        .demand
        .saturating_sub(finishing)
        .saturating_add(idle_slots(&policy.idle, input.demand));
    let wanted = needed_slots.div_ceil(cap);

    if wanted > live {
        let need = wanted - live;
        let room = policy
            .max_instances
            .saturating_sub(live.saturating_add(lingering));
        let allowed_by_max = need.min(room);
        let window: Vec<Instant> = match policy.launch_rate {
            Some(rate) => input
                .recent_launches
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < rate.per)
                .copied()
                .collect(),
            None => Vec::new(),
        };
        let allowed_by_rate = match policy.launch_rate {
            Some(rate) => rate
                .max
                .saturating_sub(u32::try_from(window.len()).unwrap_or(u32::MAX)),
            None => u32::MAX,
        };
        let allowed_by_rate = allowed_by_max.min(allowed_by_rate);
        let affordable = match &input.budget {
            Some(budget) => affordable_launches(budget, allowed_by_rate),
            None => allowed_by_rate,
        };
        out.launch = affordable;
        out.held_back = HeldBack {
            max_instances: need - allowed_by_max,
            launch_rate: allowed_by_max - allowed_by_rate,
            budget: allowed_by_rate - affordable,
        };
        if out.held_back.launch_rate > 0 {
            // The oldest launch in the window leaves it first.
            if let (Some(rate), Some(oldest)) = (policy.launch_rate, window.iter().min()) {
                due.push(*oldest + rate.per);
            }
        }
    }

    // Above the target, or above a lowered max_instances: shed idle ones.
    let surplus = live.saturating_sub(wanted.min(policy.max_instances));
    idle.sort_by(|(a, a_since), (b, b_since)| a_since.cmp(b_since).then_with(|| a.id.cmp(&b.id)));
    out.terminate.extend(
        idle.into_iter()
            .take(usize::try_from(surplus).unwrap_or(usize::MAX))
            .map(|(i, since)| Termination {
                id: i.id.clone(),
                reason: TerminateReason::Idle {
                    idle_for: now.saturating_duration_since(since),
                },
            }),
    );
    out.wake_at = due.into_iter().filter(|at| *at > now).min();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    /// A clock reading far enough from the process start that tests can
    /// look back in time.
    fn clock() -> Instant {
        Instant::now() + Duration::from_secs(24 * 3600)
    }

    fn ago(now: Instant, secs: u64) -> Instant {
        now - Duration::from_secs(secs)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// One instance for [`plan_with`], written compactly.
    #[derive(Clone, Copy)]
    enum I {
        /// Booting, launched this many seconds ago.
        Boot(&'static str, u64),
        /// Ready with `busy` slots in use, idle for `Some(secs)`, `used` jobs so far.
        Ready(&'static str, u32, Option<u64>, u32),
        /// Being removed by the fleet.
        Removing(&'static str),
        /// Found running at start this many seconds ago, launched this
        /// many seconds ago where the fleet knows; its agent not back.
        Adopted(&'static str, u64, Option<u64>),
        /// Its agent left this many seconds ago.
        Left(&'static str, u64),
        /// Its agent said it goes away; the agent holds `Some(busy)` jobs,
        /// or has left.
        Doomed(&'static str, Option<u32>),
        /// Retired earlier; its agent holds `Some(busy)` jobs, or has left.
        Retiring(&'static str, Option<u32>),
        /// Ready with scale-in protection as given and `busy` jobs.
        Guarded(&'static str, bool, u32),
        /// Held in a termination lifecycle hook, its agent `busy`.
        Hooked(&'static str, u32),
    }

    fn agent(now: Instant, busy: u32, idle_for: Option<u64>, used: u32) -> Option<AgentView> {
        Some(AgentView {
            busy,
            draining: false,
            idle_since: idle_for.map(|s| ago(now, s)),
            used,
        })
    }

    fn instances(now: Instant, list: &[I]) -> Vec<Instance> {
        let hour_old = |id: &str| Instance {
            last_seen: Some(now),
            ..Instance::launched(id, ago(now, 3600))
        };
        let idle_since = |busy: u32| (busy == 0).then_some(5);
        list.iter()
            .map(|i| match *i {
                I::Boot(id, age) => Instance::launched(id, ago(now, age)),
                I::Ready(id, busy, idle_for, used) => Instance {
                    agent: agent(now, busy, idle_for, used),
                    ..hour_old(id)
                },
                I::Removing(id) => Instance {
                    removing: true,
                    ..hour_old(id)
                },
                I::Adopted(id, adopted, launched) => Instance {
                    launched_at: launched.map(|s| ago(now, s)),
                    first_seen: ago(now, adopted),
                    adopted: true,
                    ..Instance::launched(id, ago(now, adopted))
                },
                I::Left(id, gone) => Instance {
                    last_seen: Some(ago(now, gone)),
                    ..hour_old(id)
                },
                I::Doomed(id, busy) => Instance {
                    interrupted: true,
                    agent: busy.and_then(|b| {
                        agent(now, b, idle_since(b), 0).map(|a| AgentView {
                            draining: true,
                            ..a
                        })
                    }),
                    ..hour_old(id)
                },
                I::Retiring(id, busy) => Instance {
                    retiring: true,
                    agent: busy.and_then(|b| {
                        agent(now, b, idle_since(b), 3).map(|a| AgentView {
                            draining: true,
                            ..a
                        })
                    }),
                    ..hour_old(id)
                },
                I::Guarded(id, protected, busy) => Instance {
                    protected: Some(protected),
                    agent: agent(now, busy, idle_since(busy), 0),
                    ..hour_old(id)
                },
                I::Hooked(id, busy) => Instance {
                    removing: true,
                    awaiting_release: true,
                    protected: Some(false),
                    agent: agent(now, busy, idle_since(busy), 0),
                    ..hour_old(id)
                },
            })
            .collect()
    }

    /// The basic knobs only: no use limit, boot timeout or launch rate.
    fn policy(cap: u32, max: u32, idle_count: u32) -> FleetPolicy {
        FleetPolicy {
            capacity_per_instance: cap,
            max_instances: max,
            max_use_count: 0,
            boot_timeout: None,
            lost_grace: secs(30),
            launch_rate: None,
            idle: ActivePolicy {
                idle_count,
                idle_time: MINUTE,
                ..ActivePolicy::default()
            },
        }
    }

    /// cap 1, max 10, no idle slots, idle_time 1m, max_use_count 3, boot
    /// timeout 5m, lost_grace 30s, at most 2 launches a minute. Cases
    /// change what they test.
    fn full() -> FleetPolicy {
        FleetPolicy {
            capacity_per_instance: 1,
            max_instances: 10,
            max_use_count: 3,
            boot_timeout: Some(5 * MINUTE),
            lost_grace: secs(30),
            launch_rate: Some(LaunchRate {
                max: 2,
                per: MINUTE,
            }),
            idle: ActivePolicy {
                idle_time: MINUTE,
                ..ActivePolicy::default()
            },
        }
    }

    fn with(change: impl FnOnce(&mut FleetPolicy)) -> FleetPolicy {
        let mut p = full();
        change(&mut p);
        p
    }

    fn no_rate(p: &mut FleetPolicy) {
        p.launch_rate = None;
    }

    /// The decisions alone: states and the wake-up time have tests of
    /// their own.
    fn decisions(mut plan: Plan) -> Plan {
        plan.states.clear();
        plan.wake_at = None;
        plan
    }

    fn launch(n: u32) -> Plan {
        Plan {
            launch: n,
            ..Plan::default()
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn end(id: &str, reason: TerminateReason) -> Termination {
        Termination {
            id: id.into(),
            reason,
        }
    }

    fn idle(id: &str, s: u64) -> Termination {
        end(id, TerminateReason::Idle { idle_for: secs(s) })
    }

    fn remove(list: &[(&str, u64)]) -> Plan {
        Plan {
            terminate: list.iter().map(|(id, s)| idle(id, *s)).collect(),
            ..Plan::default()
        }
    }

    fn reaped(id: &str, s: u64) -> Termination {
        end(id, TerminateReason::BootTimeout { waited: secs(s) })
    }

    fn retired(id: &str, used: u32) -> Retirement {
        Retirement {
            id: id.into(),
            used,
        }
    }

    fn held(max_instances: u32, launch_rate: u32) -> HeldBack {
        HeldBack {
            max_instances,
            launch_rate,
            budget: 0,
        }
    }

    struct Case {
        name: &'static str,
        demand: u32,
        fleet: Vec<I>,
        /// Seconds ago of each recent launch.
        launched: Vec<u64>,
        policy: FleetPolicy,
        want: Plan,
    }

    fn run(now: Instant, c: &Case) -> Plan {
        let fleet = instances(now, &c.fleet);
        let launched: Vec<Instant> = c.launched.iter().map(|s| ago(now, *s)).collect();
        plan_with(&PlanInput {
            demand: c.demand,
            instances: &fleet,
            pending: 0,
            policy: &c.policy,
            recent_launches: &launched,
            budget: None,
            now,
        })
    }

    fn check(cases: Vec<Case>) {
        let now = clock();
        for c in cases {
            assert_eq!(decisions(run(now, &c)), c.want, "{}", c.name);
        }
    }

    fn case(
        name: &'static str,
        demand: u32,
        fleet: Vec<I>,
        policy: FleetPolicy,
        want: Plan,
    ) -> Case {
        Case {
            name,
            demand,
            fleet,
            launched: vec![],
            policy,
            want,
        }
    }

    /// The basic knobs only.
    #[test]
    fn basic_table() {
        use I::{Boot, Ready, Removing};
        #[rustfmt::skip]
        let cases = vec![
            // name,                                demand, instances,                            (cap, max, idle_count), want
            case("nothing to do",                       0, vec![],                                       policy(1, 4, 0), Plan::default()),
            case("scale out from zero",                 3, vec![],                                       policy(1, 4, 0), launch(3)),
            case("capped at max",                      10, vec![],                                       policy(1, 4, 0),
                Plan { launch: 4, held_back: held(6, 0), ..Plan::default() }),
            case("capacity per instance rounds up",     5, vec![],                                       policy(2, 10, 0), launch(3)),
            case("booting counts as capacity",          2, vec![Boot("a", 0), Boot("b", 0)],             policy(1, 4, 0), Plan::default()),
            case("idle_count keeps warm slots",         0, vec![],                                       policy(1, 4, 1), launch(1)),
            case("idle past idle_time removed",         0, vec![Ready("a", 0, Some(120), 0)],            policy(1, 4, 0), remove(&[("a", 120)])),
            case("idle but not long enough",            0, vec![Ready("a", 0, Some(10), 0)],             policy(1, 4, 0), Plan::default()),
            case("busy never removed",                  0, vec![Ready("a", 1, None, 0)],                 policy(1, 4, 0), Plan::default()),
            case("idle_count protects an idle instance", 0, vec![Ready("a", 0, Some(999), 0), Ready("b", 0, Some(500), 0)],
                                                                                                         policy(1, 4, 1), remove(&[("a", 999)])),
            case("removing is not capacity",            1, vec![Removing("d")],                          policy(1, 4, 0), launch(1)),
            case("removing still counts towards max",   2, vec![Removing("d")],                          policy(1, 2, 0),
                Plan { launch: 1, held_back: held(1, 0), ..Plan::default() }),
            case("lowered max removes idle surplus",    0, vec![Ready("a", 0, Some(120), 0), Ready("b", 0, Some(90), 0)],
                                                                                                         policy(1, 1, 5),
                Plan { terminate: vec![idle("a", 120)], held_back: held(3, 0), ..Plan::default() }),
        ];
        check(cases);
    }

    #[test]
    fn sizing_table() {
        use I::{Boot, Ready, Removing};
        #[rustfmt::skip]
        let cases = vec![
            // scale out
            Case {
                name: "rate limit: two launches a minute",
                demand: 5, fleet: vec![], launched: vec![], policy: full(),
                want: Plan { launch: 2, held_back: held(0, 3), ..Plan::default() },
            },
            Case {
                name: "rate limit: launches inside the window use it up",
                demand: 5, fleet: vec![Boot("a", 10)], launched: vec![10], policy: full(),
                want: Plan { launch: 1, held_back: held(0, 3), ..Plan::default() },
            },
            Case {
                name: "rate limit: launches older than the window do not count",
                demand: 5, fleet: vec![Boot("a", 61), Boot("b", 60)], launched: vec![61, 60], policy: full(),
                want: Plan { launch: 2, held_back: held(0, 1), ..Plan::default() },
            },
            case("max before rate: nothing held back by a rate that max already stops",
                5, vec![], with(|p| p.max_instances = 1),
                Plan { launch: 1, held_back: held(4, 0), ..Plan::default() }),
            // scale_factor
            case("scale_factor: idle slots follow use",
                4, vec![], with(|p| { no_rate(p); p.idle.scale_factor = 0.5; }), launch(6)),
            case("scale_factor: rounds up",
                3, vec![], with(|p| { no_rate(p); p.idle.scale_factor = 0.5; }), launch(5)),
            case("scale_factor: capped by scale_factor_limit",
                8, vec![], with(|p| { no_rate(p); p.max_instances = 100; p.idle.scale_factor = 1.0; p.idle.scale_factor_limit = 3; }),
                launch(11)),
            case("scale_factor: idle_count is the floor",
                2, vec![], with(|p| { no_rate(p); p.idle.idle_count = 4; p.idle.scale_factor = 0.5; }), launch(6)),
            case("scale_factor: keeps an idle instance from removal",
                2, vec![Ready("a", 1, None, 0), Ready("b", 1, None, 0), Ready("c", 0, Some(600), 0)],
                with(|p| p.idle.scale_factor = 0.5), Plan::default()),
            // boot timeout
            case("boot timeout: terminated and replaced",
                1, vec![Boot("slow", 300)], full(),
                Plan { launch: 1, terminate: vec![reaped("slow", 300)], ..Plan::default() }),
            case("boot timeout: still in time", 1, vec![Boot("slow", 299)], full(), Plan::default()),
            case("boot timeout: terminated even without demand",
                0, vec![Boot("slow", 900)], full(),
                Plan { terminate: vec![reaped("slow", 900)], ..Plan::default() }),
            case("boot timeout: off waits forever",
                1, vec![Boot("slow", 90_000)], with(|p| p.boot_timeout = None), Plan::default()),
            // max_use_count
            case("max_use_count: busy instance retired, not replaced for the job it finishes",
                1, vec![Ready("worn", 1, None, 3)], full(),
                Plan { retire: vec![retired("worn", 3)], ..Plan::default() }),
            case("max_use_count: the queued job gets a replacement",
                2, vec![Ready("worn", 1, None, 3)], full(),
                Plan { launch: 1, retire: vec![retired("worn", 3)], ..Plan::default() }),
            case("max_use_count: an idle one is retired, terminated and its slot replaced",
                0, vec![Ready("worn", 0, Some(5), 3)], with(|p| p.idle.idle_count = 1),
                Plan {
                    launch: 1,
                    retire: vec![retired("worn", 3)],
                    terminate: vec![end("worn", TerminateReason::UsedUp { used: 3 })],
                    ..Plan::default()
                }),
            case("max_use_count: a retiring one still busy needs no new slot for its job",
                1, vec![I::Retiring("worn", Some(1))], full(), Plan::default()),
            case("max_use_count: a retiring one goes once idle",
                0, vec![I::Retiring("worn", Some(0))], full(),
                Plan { terminate: vec![end("worn", TerminateReason::UsedUp { used: 3 })], ..Plan::default() }),
            case("max_use_count: below the count stays", 1, vec![Ready("a", 1, None, 2)], full(), Plan::default()),
            case("max_use_count: 0 means no limit",
                1, vec![Ready("a", 1, None, 1000)], with(|p| p.max_use_count = 0), Plan::default()),
            case("max_use_count: a retiring instance still counts towards max",
                3, vec![Ready("worn", 1, None, 3), Ready("b", 1, None, 0)], with(|p| p.max_instances = 2),
                Plan { retire: vec![retired("worn", 3)], held_back: held(1, 0), ..Plan::default() }),
            // max_instances
            case("max_instances: booting, ready and removing all count",
                6, vec![Boot("a", 10), Ready("b", 1, None, 0), Removing("c")],
                with(|p| { no_rate(p); p.max_instances = 4; }),
                Plan { launch: 1, held_back: held(3, 0), ..Plan::default() }),
            case("max_instances: a terminated instance frees its place",
                2, vec![Boot("slow", 600), Ready("b", 1, None, 0)], with(|p| p.max_instances = 2),
                Plan { launch: 1, terminate: vec![reaped("slow", 600)], ..Plan::default() }),
            // scale in
            case("scale in: longest idle first, only the surplus, never busy",
                1, vec![Ready("busy", 1, None, 0), Ready("newer", 0, Some(120), 0), Ready("older", 0, Some(900), 0), Ready("fresh", 0, Some(30), 0)],
                with(|p| p.idle.idle_count = 1), remove(&[("older", 900), ("newer", 120)])),
            case("scale in: capacity per instance counts slots",
                3, vec![Ready("a", 2, None, 0), Ready("b", 1, None, 0), Ready("c", 0, Some(600), 0)],
                with(|p| p.capacity_per_instance = 2), remove(&[("c", 600)])),
            Case {
                name: "scale in: not while anything boots for the same demand",
                demand: 2, fleet: vec![Boot("a", 10), Ready("b", 0, Some(600), 0)], launched: vec![10], policy: full(),
                want: Plan::default(),
            },
        ];
        check(cases);
    }

    /// Every kind of action, each from the plain facts that call for it.
    #[test]
    fn every_action_table() {
        use I::{Doomed, Guarded, Hooked, Left, Ready};
        let interrupted = |agent_left| TerminateReason::Interrupted { agent_left };
        #[rustfmt::skip]
        let cases = vec![
            case("protect: a busy instance without protection",
                1, vec![Guarded("a", false, 1)], full(),
                Plan { protect: ids(&["a"]), ..Plan::default() }),
            case("protect: already protected is left alone",
                1, vec![Guarded("a", true, 1)], full(), Plan::default()),
            case("unprotect: an idle instance loses its protection before it may be chosen",
                0, vec![Guarded("a", true, 0)], with(|p| p.idle.idle_count = 1),
                Plan { unprotect: ids(&["a"]), ..Plan::default() }),
            case("release: a hooked instance whose agent holds nothing",
                0, vec![Hooked("a", 0)], full(),
                Plan { release: ids(&["a"]), ..Plan::default() }),
            case("release: not while its agent still holds a job (protected meanwhile)",
                1, vec![Hooked("a", 1)], full(),
                Plan { launch: 1, protect: ids(&["a"]), ..Plan::default() }),
            case("interrupted: terminated once its jobs are handed back, and replaced",
                1, vec![Doomed("a", Some(0))], full(),
                Plan { launch: 1, terminate: vec![end("a", interrupted(false))], ..Plan::default() }),
            case("interrupted: kept while it still hands jobs back",
                1, vec![Doomed("a", Some(1))], full(), launch(1)),
            case("interrupted: terminated when its agent has left",
                0, vec![Doomed("a", None)], full(),
                Plan { terminate: vec![end("a", interrupted(true))], ..Plan::default() }),
            case("left: no capacity while it may come back",
                1, vec![Left("a", 60)], full(), launch(1)),
            case("left: terminated once gone for the boot timeout",
                0, vec![Left("a", 300)], full(),
                Plan { terminate: vec![end("a", TerminateReason::AgentLeft { gone_for: secs(300) })], ..Plan::default() }),
            case("idle: surplus terminated with how long it was idle",
                0, vec![Ready("a", 0, Some(61), 0)], full(), remove(&[("a", 61)])),
        ];
        check(cases);
    }

    /// An instance found running when the coordinator started must prove
    /// itself within `lost_grace`, like any agent that lost its link:
    /// until then it counts as capacity, after it is broken.
    #[test]
    fn adopted_instances_table() {
        use I::{Adopted, Ready};
        let silent = |s| TerminateReason::NeverReconnected { waited: secs(s) };
        #[rustfmt::skip]
        let cases = vec![
            case("adopted: capacity while its agent may still reconnect",
                1, vec![Adopted("a", 29, None)], full(), Plan::default()),
            case("adopted: not back within lost_grace, terminated and its job gets a new instance",
                1, vec![Adopted("a", 30, None)], full(),
                Plan { launch: 1, terminate: vec![end("a", silent(30))], ..Plan::default() }),
            case("adopted: terminated also with nothing to run",
                0, vec![Adopted("a", 45, None)], full(),
                Plan { terminate: vec![end("a", silent(45))], ..Plan::default() }),
            case("adopted: the boot timeout does not apply (a local agent has no launch time)",
                1, vec![Adopted("a", 30, None)], with(|p| p.boot_timeout = Some(10 * MINUTE)),
                Plan { launch: 1, terminate: vec![end("a", silent(30))], ..Plan::default() }),
            case("adopted: an old cloud instance is not reaped before its agent had the grace",
                1, vec![Adopted("a", 5, Some(7200))], full(), Plan::default()),
            case("adopted: an old cloud instance gets lost_grace, no more",
                1, vec![Adopted("a", 30, Some(7200))], full(),
                Plan { launch: 1, terminate: vec![end("a", silent(30))], ..Plan::default() }),
            case("adopted: one still booting at start gets the rest of its boot timeout",
                1, vec![Adopted("a", 60, Some(90))], full(), Plan::default()),
            case("adopted: ... and no more",
                1, vec![Adopted("a", 270, Some(300))], full(),
                Plan { launch: 1, terminate: vec![end("a", silent(270))], ..Plan::default() }),
            case("adopted: once its agent is back it is an instance like any other",
                1, vec![Ready("a", 1, None, 0)], full(), Plan::default()),
            case("adopted: the broken one frees its place under max_instances",
                1, vec![Adopted("a", 31, None)], with(|p| p.max_instances = 1),
                Plan { launch: 1, terminate: vec![end("a", silent(31))], ..Plan::default() }),
        ];
        check(cases);
    }

    /// The monthly cap holds scale-out after the other limits.
    #[test]
    fn the_budget_holds_launches_back() {
        let now = clock();
        let budget = |monthly_usd| BudgetInput {
            monthly_usd,
            spent_usd: 10.0,
            running_hourly_usd: 0.0,
            launch_hourly_usd: 0.10,
            hours_left: 100.0,
        };
        let plan = |monthly, policy: &FleetPolicy| {
            decisions(plan_with(&PlanInput {
                demand: 5,
                instances: &[],
                pending: 0,
                policy,
                recent_launches: &[],
                budget: Some(budget(monthly)),
                now,
            }))
        };
        let unlimited = with(no_rate);
        // $10 spent, $10 an instance until the month ends.
        assert_eq!(
            plan(30.0, &unlimited),
            Plan {
                launch: 2,
                held_back: HeldBack {
                    budget: 3,
                    ..HeldBack::default()
                },
                ..Plan::default()
            }
        );
        assert_eq!(plan(1000.0, &unlimited), launch(5));
        // The rate allows two; the budget takes what is left of those.
        assert_eq!(
            plan(20.0, &full()),
            Plan {
                launch: 1,
                held_back: HeldBack {
                    max_instances: 0,
                    launch_rate: 3,
                    budget: 1
                },
                ..Plan::default()
            }
        );
    }

    /// Pending instances (asked for, not listed) are capacity and never
    /// terminated.
    #[test]
    fn pending_instances_count_as_booting() {
        let now = clock();
        let p = with(no_rate);
        let plan = |pending| {
            decisions(plan_with(&PlanInput {
                demand: 3,
                instances: &[],
                pending,
                policy: &p,
                recent_launches: &[],
                budget: None,
                now,
            }))
        };
        assert_eq!(plan(2), launch(1));
        assert_eq!(plan(3), Plan::default());
    }

    #[test]
    fn the_plan_wakes_at_the_earliest_deadline() {
        use I::{Adopted, Boot, Left, Ready};
        let now = clock();
        let p = full(); // idle_time 1m, boot timeout 5m, lost_grace 30s
        let wake = |list: &[I], launched: &[u64], demand: u32| {
            let fleet = instances(now, list);
            let launched: Vec<Instant> = launched.iter().map(|s| ago(now, *s)).collect();
            plan_with(&PlanInput {
                demand,
                instances: &fleet,
                pending: 0,
                policy: &p,
                recent_launches: &launched,
                budget: None,
                now,
            })
            .wake_at
            .map(|at| at.duration_since(now))
        };
        assert_eq!(
            wake(
                &[
                    Ready("busy", 1, None, 0),
                    Ready("idle-20s", 0, Some(20), 0),
                    Ready("idle-50s", 0, Some(50), 0),
                    Ready("expired", 0, Some(600), 0),
                    Boot("booting-4m", 240),
                ],
                &[],
                1
            ),
            Some(secs(10)),
            "idle for 50 s of 60: due in 10 s; an expired one is the plan's already"
        );
        assert_eq!(wake(&[Boot("b", 240)], &[], 1), Some(secs(60)));
        assert_eq!(wake(&[Adopted("a", 12, None)], &[], 1), Some(secs(18)));
        assert_eq!(
            wake(&[Adopted("a", 12, Some(200))], &[], 1),
            Some(secs(100))
        );
        assert_eq!(wake(&[Left("a", 280)], &[], 0), Some(secs(20)));
        assert_eq!(
            wake(&[], &[50, 20], 5),
            Some(secs(10)),
            "held back by the launch rate: wakes as the oldest launch leaves the window"
        );
        assert_eq!(wake(&[Ready("busy", 1, None, 0)], &[], 1), None);
    }

    #[test]
    fn states_follow_the_instances() {
        use I::{Adopted, Boot, Doomed, Left, Ready, Removing};
        let now = clock();
        let fleet = instances(
            now,
            &[
                Boot("boot", 10),
                Adopted("adopted", 10, None),
                Ready("busy", 1, None, 0),
                Ready("idle", 0, Some(5), 0),
                Removing("removing"),
                Left("left", 10),
                Doomed("doomed", Some(1)),
                Adopted("silent", 31, None),
            ],
        );
        let plan = plan_with(&PlanInput {
            demand: 1,
            instances: &fleet,
            pending: 0,
            policy: &full(),
            recent_launches: &[],
            budget: None,
            now,
        });
        assert_eq!(
            plan.states,
            vec![
                InstanceState::Booting,
                InstanceState::Booting,
                InstanceState::Ready {
                    busy: 1,
                    idle_since: None
                },
                InstanceState::Ready {
                    busy: 0,
                    idle_since: Some(ago(now, 5))
                },
                InstanceState::Draining,
                InstanceState::Draining,
                InstanceState::Draining,
                InstanceState::Draining,
            ]
        );
    }

    #[test]
    fn reasons_read_as_log_lines() {
        let text = TerminateReason::NeverReconnected { waited: secs(30) }.to_string();
        assert!(
            text.contains("within 30s (agents.lost_grace)")
                && text.contains("no longer listens on"),
            "{text}"
        );
        assert_eq!(
            TerminateReason::Idle {
                idle_for: Duration::from_millis(61_500)
            }
            .to_string(),
            "idle for 1m 1s"
        );
        assert!(TerminateReason::AgentLeft { gone_for: secs(1) }.is_broken());
        assert!(!TerminateReason::UsedUp { used: 3 }.is_broken());
    }

    /// A period switch changes `idle_count`, and with it the plan.
    #[test]
    fn period_switch_changes_the_plan() {
        use super::super::schedule::{active_policy, PolicyBlock};
        use std::time::{SystemTime, UNIX_EPOCH};

        let now = clock();
        // 2026-08-24 (a Monday) at 17:59 and 18:00 UTC.
        let monday = UNIX_EPOCH + Duration::from_secs(1_787_529_600);
        let (before, after) = (monday + 1079 * MINUTE, monday + 1080 * MINUTE);
        let blocks = [PolicyBlock {
            periods: vec!["* 8-17 * * mon-fri".parse().expect("valid period")],
            timezone: super::super::schedule::TimeZone::UTC,
            idle_count: 2,
            idle_time: 30 * MINUTE,
            scale_factor: 0.0,
            scale_factor_limit: 0,
        }];
        let default = ActivePolicy {
            idle_count: 0,
            idle_time: MINUTE,
            ..ActivePolicy::default()
        };
        let fleet = instances(
            now,
            &[
                I::Ready("a", 0, Some(600), 0),
                I::Ready("b", 0, Some(300), 0),
            ],
        );
        let plan_at = |wall: SystemTime| {
            let policy = FleetPolicy {
                idle: active_policy(&blocks, &default, wall),
                ..full()
            };
            decisions(plan_with(&PlanInput {
                demand: 0,
                instances: &fleet,
                pending: 0,
                policy: &policy,
                recent_launches: &[],
                budget: None,
                now,
            }))
        };
        assert_eq!(
            plan_at(before),
            Plan::default(),
            "work hours keep two warm slots"
        );
        assert_eq!(
            plan_at(after),
            remove(&[("a", 600), ("b", 300)]),
            "after hours nothing is kept"
        );
    }
}
