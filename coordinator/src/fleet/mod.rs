//! The fleet: instances that run agents, and the reconcile loop that sizes
//! it to the work the coordinator holds.
//!
//! [`Fleet`] is the seam (`local` here: agent processes on this machine);
//! the decision itself is [`policy::plan_with`], a pure function. Not responsible
//! for what runs on an instance (the agent) or for jobs (`core`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::Core;

pub mod local;
pub mod policy;
pub mod schedule;

use policy::InstanceState;

/// How often the fleet is reconciled even when nothing signalled a change.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

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
}

/// One instance the fleet knows of.
#[derive(Clone, Debug)]
pub struct FleetInstance {
    pub id: String,
    pub launched_at: Instant,
    /// Being removed.
    pub removing: bool,
}

/// The instances that run agents.
pub trait Fleet: Send + Sync + 'static {
    /// Instances alive now.
    fn instances(&self) -> Vec<FleetInstance>;
    /// Starts `count` new instances; returns their ids.
    fn launch(
        &self,
        count: u32,
    ) -> impl std::future::Future<Output = Result<Vec<String>, FleetError>> + Send;
    /// Removes exactly this instance (its agent has been told to drain).
    fn remove(&self, id: &str) -> impl std::future::Future<Output = Result<(), FleetError>> + Send;
}

/// A fleet instance as the status display shows it.
#[derive(Clone, Debug)]
pub struct InstanceStatus {
    pub id: String,
    pub state: &'static str,
    pub age: Duration,
}

/// The latest view of the fleet, for status displays.
#[derive(Debug, Default)]
pub struct FleetView(Mutex<Vec<InstanceStatus>>);

impl FleetView {
    /// The instances as of the last reconcile.
    pub fn get(&self) -> Vec<InstanceStatus> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, instances: Vec<InstanceStatus>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = instances;
    }
}

/// The sizing knobs and time-of-day blocks the reconcile loop applies.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    /// Base policy; its `idle` knobs are the default when no block matches.
    pub policy: policy::FleetPolicy,
    pub blocks: Vec<schedule::PolicyBlock>,
}

/// Sizes the fleet to the work until `stop`. On stop it does nothing more:
/// a stopping coordinator never scales in.
pub async fn reconcile<F: Fleet>(
    fleet: Arc<F>,
    core: Arc<Core>,
    settings: FleetSettings,
    view: Arc<FleetView>,
    stop: CancellationToken,
) {
    let mut recent_launches: Vec<Instant> = Vec::new();
    let mut last_block = None;
    loop {
        let instances = fleet.instances();
        let agents = core.agents();
        let now = Instant::now();
        let mut sized = Vec::with_capacity(instances.len());
        for i in &instances {
            let agent = agents.iter().find(|a| a.instance_id == i.id);
            let state = match agent {
                _ if i.removing => InstanceState::Draining,
                Some(a) if a.draining => InstanceState::Draining,
                Some(a) => InstanceState::Ready {
                    busy: a.busy,
                    idle_since: a.idle_since,
                },
                None => InstanceState::Booting,
            };
            sized.push(policy::Instance {
                id: i.id.clone(),
                state,
                launched_at: i.launched_at,
                used: agent.map_or(0, |a| a.used),
            });
        }
        view.set(
            sized
                .iter()
                .map(|i| InstanceStatus {
                    id: i.id.clone(),
                    state: match i.state {
                        InstanceState::Booting => "booting",
                        InstanceState::Ready { busy: 0, .. } => "idle",
                        InstanceState::Ready { .. } => "busy",
                        InstanceState::Draining => "draining",
                    },
                    age: now.saturating_duration_since(i.launched_at),
                })
                .collect(),
        );
        let mut current = settings.policy.clone();
        current.idle = schedule::active_policy(
            &settings.blocks,
            &settings.policy.idle,
            std::time::SystemTime::now(),
        );
        if current.idle.block != last_block {
            tracing::info!(block = ?current.idle.block, idle_count = current.idle.idle_count, "sizing policy in force changed");
            last_block = current.idle.block;
        }
        if let Some(rate) = current.launch_rate {
            recent_launches.retain(|t| now.saturating_duration_since(*t) < rate.per);
        }
        let plan = policy::plan_with(&policy::PlanInput {
            demand: core.demand(),
            instances: &sized,
            policy: &current,
            recent_launches: &recent_launches,
            now,
        });
        for reaped in &plan.reap {
            tracing::warn!(instance = %reaped.id, reason = %reaped.reason, "removing an instance that never joined; check the image and its user-data");
            if let Err(e) = fleet.remove(&reaped.id).await {
                tracing::error!(instance = %reaped.id, error = %e, "failed to remove instance");
            }
        }
        for id in &plan.retire {
            tracing::info!(instance = %id, "instance reached max_use_count; draining and replacing it");
            core.drain_instance(id, true, "max_use_count reached");
            if let Err(e) = fleet.remove(id).await {
                tracing::error!(instance = %id, error = %e, "failed to remove instance");
            }
        }
        for id in &plan.remove {
            tracing::info!(instance = %id, "removing idle instance");
            core.drain_instance(id, true, "idle instance removed by the fleet");
            if let Err(e) = fleet.remove(id).await {
                tracing::error!(instance = %id, error = %e, "failed to remove instance");
            }
        }
        if plan.launch > 0 {
            match fleet.launch(plan.launch).await {
                Ok(ids) => {
                    recent_launches.extend(ids.iter().map(|_| now));
                    tracing::info!(count = ids.len(), ids = ?ids, "launched instances");
                }
                Err(e) => tracing::error!(error = %e, "failed to launch instances"),
            }
        }
        if plan.held_back != policy::HeldBack::default() {
            tracing::debug!(held_back = ?plan.held_back, "launches held back");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = core.changed.notified() => {
                // Let a burst of changes settle into one decision.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
    }
}
