//! The sizing policy: a pure function from (held jobs, fleet, policy, clock)
//! to a plan of instances to launch, remove, retire and reap. No I/O, so it
//! is table-tested here and can drive a simulator.
//!
//! Not responsible for choosing the time-of-day knobs (see
//! [`super::schedule`], whose [`ActivePolicy`] is an input here) or for
//! carrying the plan out (the reconcile loop in [`super`]).

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::schedule::ActivePolicy;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Launched, agent not connected yet.
    Booting,
    /// Agent connected; `busy` slots in use; `idle_since` set when busy is 0.
    Ready {
        busy: u32,
        idle_since: Option<Instant>,
    },
    /// Being removed: no capacity, but it still counts towards
    /// `max_instances` while it exists.
    Draining,
}

/// One instance as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    /// When the fleet launched it; a `Booting` instance older than the boot
    /// timeout is reaped.
    pub launched_at: Instant,
    /// Jobs it has started so far, for `max_use_count`.
    pub used: u32,
}

/// At most `max` launches in any window of `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchRate {
    pub max: u32,
    pub per: Duration,
}

/// Every knob the full policy reads.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetPolicy {
    /// Job slots per instance; 0 is taken as 1.
    pub capacity_per_instance: u32,
    /// Most instances in any state (booting, ready, draining); never
    /// exceeded by a launch.
    pub max_instances: u32,
    /// Jobs an instance runs before it is retired; 0 means no limit.
    pub max_use_count: u32,
    /// How long a launched instance may take for its agent to join;
    /// `None` waits forever.
    pub boot_timeout: Option<Duration>,
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
    pub policy: &'a FleetPolicy,
    /// When each recent launch happened, one entry per instance; only those
    /// inside the launch-rate window matter.
    pub recent_launches: &'a [Instant],
    pub now: Instant,
}

/// Why an instance is reaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReapReason {
    /// Its agent never joined within the boot timeout.
    BootTimeout { waited: Duration },
}

impl fmt::Display for ReapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReapReason::BootTimeout { waited } => write!(
                f,
                "its agent did not join within {} of launch",
                humantime::format_duration(*waited)
            ),
        }
    }
}

/// An instance to terminate without draining, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub id: String,
    pub reason: ReapReason,
}

/// Launches the plan wanted but did not make, by cause; for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldBack {
    pub max_instances: u32,
    pub launch_rate: u32,
}

/// What the fleet should do now. Each instance appears in at most one list.
/// Carry it out in this order: reap, retire, remove, launch; the launch
/// count already assumes the reaped instances are gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub launch: u32,
    /// Idle instances to drain and remove, exactly these. Never busy.
    pub remove: Vec<String>,
    /// Instances that reached `max_use_count`: give them no new job and
    /// remove each once its running jobs finish (drain with exit when idle).
    /// They no longer count as capacity, so replacements are in `launch`.
    pub retire: Vec<String>,
    /// Booting instances to terminate now, with the reason to report.
    pub reap: Vec<Reaped>,
    pub held_back: HeldBack,
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

/// Decides launches, removals, retirements and reaps.
///
/// Capacity counts booting and ready instances, except those retired for
/// `max_use_count` or reaped for the boot timeout; jobs still running on a
/// retiring instance need no new slot. The target is
/// `ceil((demand − running on retiring + idle slots) / capacity_per_instance)`
/// instances. Below it, launch the difference, held back by `max_instances`
/// (counting every instance that still exists) and by the launch rate. Above
/// the target or above `max_instances`, remove only instances idle for at
/// least `idle_time`, longest idle first, and no more than the surplus.
pub fn plan_with(input: &PlanInput<'_>) -> Plan {
    let policy = input.policy;
    let now = input.now;
    let cap = policy.capacity_per_instance.max(1);
    let mut out = Plan::default();

    let mut live: u32 = 0;
    let mut lingering: u32 = 0; // retiring or draining: exist, offer nothing
    let mut running_on_retiring: u32 = 0;
    let mut idle: Vec<(&Instance, Instant)> = Vec::new();
    for i in input.instances {
        match &i.state {
            InstanceState::Draining => lingering += 1,
            InstanceState::Booting => {
                let waited = now.saturating_duration_since(i.launched_at);
                match policy.boot_timeout {
                    Some(limit) if waited >= limit => out.reap.push(Reaped {
                        id: i.id.clone(),
                        reason: ReapReason::BootTimeout { waited },
                    }),
                    _ => live += 1,
                }
            }
            InstanceState::Ready { busy, idle_since } => {
                if policy.max_use_count > 0 && i.used >= policy.max_use_count {
                    out.retire.push(i.id.clone());
                    lingering += 1;
                    running_on_retiring = running_on_retiring.saturating_add(*busy);
                    continue;
                }
                live += 1;
                if let (0, Some(since)) = (busy, idle_since) {
                    if now.saturating_duration_since(*since) >= policy.idle.idle_time {
                        idle.push((i, *since));
                    }
                }
            }
        }
    }

    let needed_slots = input
        .demand
        .saturating_sub(running_on_retiring)
        .saturating_add(idle_slots(&policy.idle, input.demand));
    let wanted = needed_slots.div_ceil(cap);

    if wanted > live {
        let need = wanted - live;
        let room = policy
            .max_instances
            .saturating_sub(live.saturating_add(lingering));
        let allowed_by_max = need.min(room);
        let allowed_by_rate = match policy.launch_rate {
            Some(rate) => {
                let recent = input
                    .recent_launches
                    .iter()
                    .filter(|t| now.saturating_duration_since(**t) < rate.per)
                    .count();
                rate.max
                    .saturating_sub(u32::try_from(recent).unwrap_or(u32::MAX))
            }
            None => u32::MAX,
        };
        out.launch = allowed_by_max.min(allowed_by_rate);
        out.held_back = HeldBack {
            max_instances: need - allowed_by_max,
            launch_rate: allowed_by_max - out.launch,
        };
    }

    // Above the target, or above a lowered max_instances: shed idle ones.
    let surplus = live.saturating_sub(wanted.min(policy.max_instances));
    idle.sort_by(|(a, a_since), (b, b_since)| a_since.cmp(b_since).then_with(|| a.id.cmp(&b.id)));
    out.remove = idle
        .into_iter()
        .take(usize::try_from(surplus).unwrap_or(usize::MAX))
        .map(|(i, _)| i.id.clone())
        .collect();
    out
}

/// The next moment the plan may change with no event: an idle instance
/// passing `idle_time`, a booting one passing the boot timeout. The
/// reconcile loop wakes then rather than on its next regular tick.
pub fn next_deadline(
    instances: &[Instance],
    policy: &FleetPolicy,
    now: Instant,
) -> Option<Instant> {
    instances
        .iter()
        .filter_map(|i| match &i.state {
            InstanceState::Ready {
                busy: 0,
                idle_since: Some(since),
            } => Some(*since + policy.idle.idle_time),
            InstanceState::Booting => policy.boot_timeout.map(|t| i.launched_at + t),
            _ => None,
        })
        .filter(|at| *at > now)
        .min()
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

    /// The basic knobs only: no use limit, boot timeout or launch rate.
    fn policy(cap: u32, max: u32, idle_count: u32) -> FleetPolicy {
        FleetPolicy {
            capacity_per_instance: cap,
            max_instances: max,
            max_use_count: 0,
            boot_timeout: None,
            launch_rate: None,
            idle: ActivePolicy {
                idle_count,
                idle_time: MINUTE,
                ..ActivePolicy::default()
            },
        }
    }

    /// One instance as the basic table writes it; launched "now", unused.
    struct InstanceView {
        id: String,
        state: InstanceState,
    }

    fn plan(demand: u32, views: &[InstanceView], policy: &FleetPolicy, now: Instant) -> Plan {
        let instances: Vec<Instance> = views
            .iter()
            .map(|v| Instance {
                id: v.id.clone(),
                state: v.state.clone(),
                launched_at: now,
                used: 0,
            })
            .collect();
        plan_with(&PlanInput {
            demand,
            instances: &instances,
            policy,
            recent_launches: &[],
            now,
        })
    }

    fn launch(n: u32) -> Plan {
        Plan {
            launch: n,
            ..Plan::default()
        }
    }

    fn remove(ids: &[&str]) -> Plan {
        Plan {
            remove: ids.iter().map(|s| (*s).to_owned()).collect(),
            ..Plan::default()
        }
    }

    /// The basic knobs only.
    #[test]
    fn basic_table() {
        let now = clock();
        let ready = |id: &str, busy: u32, idle_for: Option<u64>| InstanceView {
            id: id.into(),
            state: InstanceState::Ready {
                busy,
                idle_since: idle_for.map(|s| ago(now, s)),
            },
        };
        let view = |id: &str, state: InstanceState| InstanceView {
            id: id.into(),
            state,
        };
        let booting = |id: &str| view(id, InstanceState::Booting);
        let draining = |id: &str| view(id, InstanceState::Draining);
        #[rustfmt::skip]
        let cases: Vec<(&str, u32, Vec<InstanceView>, FleetPolicy, Plan)> = vec![
            // name,                               demand, instances,                    (cap, max, idle_count), want
            ("nothing to do",                       0, vec![],                                       policy(1, 4, 0), Plan::default()),
            ("scale out from zero",                 3, vec![],                                       policy(1, 4, 0), launch(3)),
            ("capped at max",                      10, vec![],                                       policy(1, 4, 0),
                Plan { launch: 4, held_back: HeldBack { max_instances: 6, launch_rate: 0 }, ..Plan::default() }),
            ("capacity per instance rounds up",     5, vec![],                                       policy(2, 10, 0), launch(3)),
            ("booting counts as capacity",          2, vec![booting("a"), booting("b")],             policy(1, 4, 0), Plan::default()),
            ("idle_count keeps warm slots",         0, vec![],                                       policy(1, 4, 1), launch(1)),
            ("idle past idle_time removed",         0, vec![ready("a", 0, Some(120))],               policy(1, 4, 0), remove(&["a"])),
            ("idle but not long enough",            0, vec![ready("a", 0, Some(10))],                policy(1, 4, 0), Plan::default()),
            ("busy never removed",                  0, vec![ready("a", 1, None)],                    policy(1, 4, 0), Plan::default()),
            ("idle_count protects an idle instance", 0, vec![ready("a", 0, Some(999)), ready("b", 0, Some(500))],
                                                                                                     policy(1, 4, 1), remove(&["a"])),
            ("draining is not capacity",            1, vec![draining("d")],                          policy(1, 4, 0), launch(1)),
            ("draining still counts towards max",   2, vec![draining("d")],                          policy(1, 2, 0),
                Plan { launch: 1, held_back: HeldBack { max_instances: 1, launch_rate: 0 }, ..Plan::default() }),
            ("lowered max removes idle surplus",    0, vec![ready("a", 0, Some(120)), ready("b", 0, Some(90))],
                                                                                                     policy(1, 1, 5),
                Plan { remove: ids(&["a"]), held_back: HeldBack { max_instances: 3, launch_rate: 0 }, ..Plan::default() }),
        ];
        for (name, demand, instances, policy, want) in cases {
            assert_eq!(plan(demand, &instances, &policy, now), want, "{name}");
        }
    }

    /// One instance for [`plan_with`], written compactly.
    #[derive(Clone, Copy)]
    enum I {
        /// Booting, launched this many seconds ago.
        Boot(&'static str, u64),
        /// Ready with `busy` slots in use, idle for `Some(secs)`, `used` jobs so far.
        Ready(&'static str, u32, Option<u64>, u32),
        Draining(&'static str),
    }

    fn instances(now: Instant, list: &[I]) -> Vec<Instance> {
        list.iter()
            .map(|i| {
                let (id, state, launched, used) = match *i {
                    I::Boot(id, age) => (id, InstanceState::Booting, age, 0),
                    I::Ready(id, busy, idle_for, used) => (
                        id,
                        InstanceState::Ready {
                            busy,
                            idle_since: idle_for.map(|s| ago(now, s)),
                        },
                        3600,
                        used,
                    ),
                    I::Draining(id) => (id, InstanceState::Draining, 3600, 0),
                };
                Instance {
                    id: id.into(),
                    state,
                    launched_at: ago(now, launched),
                    used,
                }
            })
            .collect()
    }

    /// cap 1, max 10, no idle slots, idle_time 1m, max_use_count 3, boot
    /// timeout 5m, at most 2 launches a minute. Cases change what they test.
    fn full() -> FleetPolicy {
        FleetPolicy {
            capacity_per_instance: 1,
            max_instances: 10,
            max_use_count: 3,
            boot_timeout: Some(5 * MINUTE),
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

    fn reaped(id: &str, secs: u64) -> Reaped {
        Reaped {
            id: id.into(),
            reason: ReapReason::BootTimeout {
                waited: Duration::from_secs(secs),
            },
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
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

    #[test]
    fn full_table() {
        let now = clock();
        let held = |max_instances, launch_rate| HeldBack {
            max_instances,
            launch_rate,
        };
        let no_rate = |p: &mut FleetPolicy| p.launch_rate = None;
        #[rustfmt::skip]
        let cases = vec![
            // scale out
            Case {
                name: "rate limit: two launches a minute",
                demand: 5,
                fleet: vec![],
                launched: vec![],
                policy: full(),
                want: Plan { launch: 2, held_back: held(0, 3), ..Plan::default() },
            },
            Case {
                name: "rate limit: launches inside the window use it up",
                demand: 5,
                fleet: vec![I::Boot("a", 10)],
                launched: vec![10],
                policy: full(),
                want: Plan { launch: 1, held_back: held(0, 3), ..Plan::default() },
            },
            Case {
                name: "rate limit: launches older than the window do not count",
                demand: 5,
                fleet: vec![I::Boot("a", 61), I::Boot("b", 60)],
                launched: vec![61, 60],
                policy: full(),
                want: Plan { launch: 2, held_back: held(0, 1), ..Plan::default() },
            },
            Case {
                name: "max before rate: nothing held back by a rate that max already stops",
                demand: 5,
                fleet: vec![],
                launched: vec![],
                policy: with(|p| p.max_instances = 1),
                want: Plan { launch: 1, held_back: held(4, 0), ..Plan::default() },
            },
            // scale_factor
            Case {
                name: "scale_factor: idle slots follow use",
                demand: 4,
                fleet: vec![],
                launched: vec![],
                policy: with(|p| { no_rate(p); p.idle.scale_factor = 0.5; }),
                want: launch(6),
            },
            Case {
                name: "scale_factor: rounds up",
                demand: 3,
                fleet: vec![],
                launched: vec![],
                policy: with(|p| { no_rate(p); p.idle.scale_factor = 0.5; }),
                want: launch(5),
            },
            Case {
                name: "scale_factor: capped by scale_factor_limit",
                demand: 8,
                fleet: vec![],
                launched: vec![],
                policy: with(|p| { no_rate(p); p.max_instances = 100; p.idle.scale_factor = 1.0; p.idle.scale_factor_limit = 3; }),
                want: launch(11),
            },
            Case {
                name: "scale_factor: idle_count is the floor",
                demand: 2,
                fleet: vec![],
                launched: vec![],
                policy: with(|p| { no_rate(p); p.idle.idle_count = 4; p.idle.scale_factor = 0.5; }),
                want: launch(6),
            },
            Case {
                name: "scale_factor: keeps an idle instance from removal",
                demand: 2,
                fleet: vec![I::Ready("a", 1, None, 0), I::Ready("b", 1, None, 0), I::Ready("c", 0, Some(600), 0)],
                launched: vec![],
                policy: with(|p| p.idle.scale_factor = 0.5),
                want: Plan::default(),
            },
            // boot timeout
            Case {
                name: "boot timeout: reaped and replaced",
                demand: 1,
                fleet: vec![I::Boot("slow", 300)],
                launched: vec![],
                policy: full(),
                want: Plan { launch: 1, reap: vec![reaped("slow", 300)], ..Plan::default() },
            },
            Case {
                name: "boot timeout: still in time",
                demand: 1,
                fleet: vec![I::Boot("slow", 299)],
                launched: vec![],
                policy: full(),
                want: Plan::default(),
            },
            Case {
                name: "boot timeout: reaped even without demand",
                demand: 0,
                fleet: vec![I::Boot("slow", 900)],
                launched: vec![],
                policy: full(),
                want: Plan { reap: vec![reaped("slow", 900)], ..Plan::default() },
            },
            Case {
                name: "boot timeout: off waits forever",
                demand: 1,
                fleet: vec![I::Boot("slow", 90_000)],
                launched: vec![],
                policy: with(|p| p.boot_timeout = None),
                want: Plan::default(),
            },
            // max_use_count
            Case {
                name: "max_use_count: busy instance retired and replaced",
                demand: 1,
                fleet: vec![I::Ready("worn", 1, None, 3)],
                launched: vec![],
                policy: full(),
                want: Plan { retire: ids(&["worn"]), ..Plan::default() },
            },
            Case {
                name: "max_use_count: the queued job gets a replacement",
                demand: 2,
                fleet: vec![I::Ready("worn", 1, None, 3)],
                launched: vec![],
                policy: full(),
                want: Plan { launch: 1, retire: ids(&["worn"]), ..Plan::default() },
            },
            Case {
                name: "max_use_count: idle slots are replaced",
                demand: 0,
                fleet: vec![I::Ready("worn", 0, Some(5), 3)],
                launched: vec![],
                policy: with(|p| p.idle.idle_count = 1),
                want: Plan { launch: 1, retire: ids(&["worn"]), ..Plan::default() },
            },
            Case {
                name: "max_use_count: below the count stays",
                demand: 1,
                fleet: vec![I::Ready("a", 1, None, 2)],
                launched: vec![],
                policy: full(),
                want: Plan::default(),
            },
            Case {
                name: "max_use_count: 0 means no limit",
                demand: 1,
                fleet: vec![I::Ready("a", 1, None, 1000)],
                launched: vec![],
                policy: with(|p| p.max_use_count = 0),
                want: Plan::default(),
            },
            Case {
                name: "max_use_count: a retiring instance still counts towards max",
                demand: 3,
                fleet: vec![I::Ready("worn", 1, None, 3), I::Ready("b", 1, None, 0)],
                launched: vec![],
                policy: with(|p| p.max_instances = 2),
                want: Plan { retire: ids(&["worn"]), held_back: held(1, 0), ..Plan::default() },
            },
            // max_instances
            Case {
                name: "max_instances: booting, ready and draining all count",
                demand: 6,
                fleet: vec![I::Boot("a", 10), I::Ready("b", 1, None, 0), I::Draining("c")],
                launched: vec![],
                policy: with(|p| { no_rate(p); p.max_instances = 4; }),
                want: Plan { launch: 1, held_back: held(3, 0), ..Plan::default() },
            },
            Case {
                name: "max_instances: a reaped instance frees its place",
                demand: 2,
                fleet: vec![I::Boot("slow", 600), I::Ready("b", 1, None, 0)],
                launched: vec![],
                policy: with(|p| p.max_instances = 2),
                want: Plan { launch: 1, reap: vec![reaped("slow", 600)], ..Plan::default() },
            },
            // scale in
            Case {
                name: "scale in: longest idle first, only the surplus, never busy",
                demand: 1,
                fleet: vec![I::Ready("busy", 1, None, 0), I::Ready("newer", 0, Some(120), 0), I::Ready("older", 0, Some(900), 0), I::Ready("fresh", 0, Some(30), 0)],
                launched: vec![],
                policy: with(|p| p.idle.idle_count = 1),
                want: remove(&["older", "newer"]),
            },
            Case {
                name: "scale in: capacity per instance counts slots",
                demand: 3,
                fleet: vec![I::Ready("a", 2, None, 0), I::Ready("b", 1, None, 0), I::Ready("c", 0, Some(600), 0)],
                launched: vec![],
                policy: with(|p| p.capacity_per_instance = 2),
                want: remove(&["c"]),
            },
            Case {
                name: "scale in: not while anything boots for the same demand",
                demand: 2,
                fleet: vec![I::Boot("a", 10), I::Ready("b", 0, Some(600), 0)],
                launched: vec![10],
                policy: full(),
                want: Plan::default(),
            },
        ];
        for c in cases {
            let fleet = instances(now, &c.fleet);
            let launched: Vec<Instant> = c.launched.iter().map(|s| ago(now, *s)).collect();
            let got = plan_with(&PlanInput {
                demand: c.demand,
                instances: &fleet,
                policy: &c.policy,
                recent_launches: &launched,
                now,
            });
            assert_eq!(got, c.want, "{}", c.name);
        }
    }

    #[test]
    fn the_next_deadline_is_the_earliest_idle_or_boot_expiry() {
        let now = clock();
        let p = full(); // idle_time 1m, boot timeout 5m
        let fleet = instances(
            now,
            &[
                I::Ready("busy", 1, None, 0),
                I::Ready("idle-20s", 0, Some(20), 0),
                I::Ready("idle-50s", 0, Some(50), 0),
                I::Ready("expired", 0, Some(600), 0),
                I::Boot("booting-4m", 240),
            ],
        );
        assert_eq!(
            next_deadline(&fleet, &p, now),
            Some(now + Duration::from_secs(10)),
            "idle for 50 s of 60: due in 10 s; an expired one is the plan's already"
        );
        let booting = instances(now, &[I::Boot("b", 240)]);
        assert_eq!(
            next_deadline(&booting, &p, now),
            Some(now + Duration::from_secs(60))
        );
        assert_eq!(
            next_deadline(&instances(now, &[I::Ready("busy", 1, None, 0)]), &p, now),
            None
        );
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
            plan_with(&PlanInput {
                demand: 0,
                instances: &fleet,
                policy: &policy,
                recent_launches: &[],
                now,
            })
        };
        assert_eq!(
            plan_at(before),
            Plan::default(),
            "work hours keep two warm slots"
        );
        assert_eq!(
            plan_at(after),
            remove(&["a", "b"]),
            "after hours nothing is kept"
        );
    }
}
