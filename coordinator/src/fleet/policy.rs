//! The sizing policy: a pure function from (held jobs, fleet, policy, clock)
//! to a plan of instances to launch and to remove. No I/O, so it is
//! table-tested here and can drive a simulator.

use std::time::Duration;

use tokio::time::Instant;

/// Knobs, named as in gitlab-runner's `[runners.autoscaler]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizingPolicy {
    pub capacity_per_instance: u32,
    pub max_instances: u32,
    /// Idle job slots to keep ready beyond demand.
    pub idle_count: u32,
    /// How long an instance must sit idle before it may be removed.
    pub idle_time: Duration,
}

/// One instance as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    pub state: InstanceState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Launched, agent not connected yet.
    Booting,
    /// Agent connected; `busy` slots in use; `idle_since` set when busy is 0.
    Ready {
        busy: u32,
        idle_since: Option<Instant>,
    },
    /// Being removed; counts for nothing.
    Draining,
}

/// What the fleet should do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub launch: u32,
    /// Instances to drain and remove, exactly these.
    pub remove: Vec<String>,
}

/// Decides launches and removals.
///
/// `demand` is the number of job attempts the coordinator holds that need a
/// slot (queued plus running). Booting instances count as capacity, so a slow
/// boot never causes a second launch for the same job.
pub fn plan(demand: u32, instances: &[InstanceView], policy: &SizingPolicy, now: Instant) -> Plan {
    let cap = policy.capacity_per_instance.max(1);
    let wanted_slots = demand.saturating_add(policy.idle_count);
    let wanted = wanted_slots.div_ceil(cap).min(policy.max_instances);
    let live: Vec<&InstanceView> = instances
        .iter()
        .filter(|i| i.state != InstanceState::Draining)
        .collect();
    let live_count = u32::try_from(live.len()).unwrap_or(u32::MAX);

    if wanted > live_count {
        return Plan {
            launch: wanted - live_count,
            remove: Vec::new(),
        };
    }

    // Remove only instances idle past idle_time, longest idle first, and
    // never so many that fewer than `wanted` remain.
    let mut idle: Vec<(&InstanceView, Instant)> = live
        .iter()
        .filter_map(|i| match i.state {
            InstanceState::Ready {
                busy: 0,
                idle_since: Some(since),
            } if now.saturating_duration_since(since) >= policy.idle_time => Some((*i, since)),
            _ => None,
        })
        .collect();
    idle.sort_by_key(|(i, since)| (*since, i.id.clone()));
    let surplus = usize::try_from(live_count - wanted).unwrap_or(usize::MAX);
    Plan {
        launch: 0,
        remove: idle
            .into_iter()
            .take(surplus)
            .map(|(i, _)| i.id.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(cap: u32, max: u32, idle_count: u32) -> SizingPolicy {
        SizingPolicy {
            capacity_per_instance: cap,
            max_instances: max,
            idle_count,
            idle_time: Duration::from_secs(60),
        }
    }

    fn ready(id: &str, busy: u32, idle_for: Option<u64>, now: Instant) -> InstanceView {
        InstanceView {
            id: id.into(),
            state: InstanceState::Ready {
                busy,
                idle_since: idle_for.map(|s| now - Duration::from_secs(s)),
            },
        }
    }

    fn booting(id: &str) -> InstanceView {
        InstanceView {
            id: id.into(),
            state: InstanceState::Booting,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn table() {
        tokio::time::advance(Duration::from_secs(3600)).await;
        let now = Instant::now();
        struct Case {
            name: &'static str,
            demand: u32,
            instances: Vec<InstanceView>,
            policy: SizingPolicy,
            want: Plan,
        }
        let cases = vec![
            Case {
                name: "nothing to do",
                demand: 0,
                instances: vec![],
                policy: policy(1, 4, 0),
                want: Plan::default(),
            },
            Case {
                name: "scale out from zero",
                demand: 3,
                instances: vec![],
                policy: policy(1, 4, 0),
                want: Plan {
                    launch: 3,
                    remove: vec![],
                },
            },
            Case {
                name: "capped at max",
                demand: 10,
                instances: vec![],
                policy: policy(1, 4, 0),
                want: Plan {
                    launch: 4,
                    remove: vec![],
                },
            },
            Case {
                name: "capacity per instance rounds up",
                demand: 5,
                instances: vec![],
                policy: policy(2, 10, 0),
                want: Plan {
                    launch: 3,
                    remove: vec![],
                },
            },
            Case {
                name: "booting counts as capacity",
                demand: 2,
                instances: vec![booting("a"), booting("b")],
                policy: policy(1, 4, 0),
                want: Plan::default(),
            },
            Case {
                name: "idle_count keeps warm slots",
                demand: 0,
                instances: vec![],
                policy: policy(1, 4, 1),
                want: Plan {
                    launch: 1,
                    remove: vec![],
                },
            },
            Case {
                name: "idle past idle_time removed",
                demand: 0,
                instances: vec![ready("a", 0, Some(120), now)],
                policy: policy(1, 4, 0),
                want: Plan {
                    launch: 0,
                    remove: vec!["a".into()],
                },
            },
            Case {
                name: "idle but not long enough",
                demand: 0,
                instances: vec![ready("a", 0, Some(10), now)],
                policy: policy(1, 4, 0),
                want: Plan::default(),
            },
            Case {
                name: "busy never removed",
                demand: 0,
                instances: vec![ready("a", 1, None, now)],
                policy: policy(1, 4, 0),
                want: Plan::default(),
            },
            Case {
                name: "idle_count protects an idle instance",
                demand: 0,
                instances: vec![ready("a", 0, Some(999), now), ready("b", 0, Some(500), now)],
                policy: policy(1, 4, 1),
                want: Plan {
                    launch: 0,
                    remove: vec!["a".into()],
                },
            },
            Case {
                name: "draining is not capacity",
                demand: 1,
                instances: vec![InstanceView {
                    id: "d".into(),
                    state: InstanceState::Draining,
                }],
                policy: policy(1, 4, 0),
                want: Plan {
                    launch: 1,
                    remove: vec![],
                },
            },
        ];
        for c in cases {
            assert_eq!(
                plan(c.demand, &c.instances, &c.policy, now),
                c.want,
                "{}",
                c.name
            );
        }
    }
}
