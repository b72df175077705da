//! The fleet: instances that run agents, and the reconcile loop that sizes
//! it to the work the coordinator holds.
//!
//! [`Fleet`] is the seam (`local` here: agent processes on this machine);
//! the decision itself is [`policy::plan`], a pure function. Not responsible
//! for what runs on an instance (the agent) or for jobs (`core`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::Core;

pub mod local;
pub mod policy;
pub mod schedule;

pub use policy::SizingPolicy;
use policy::{InstanceState, InstanceView};

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

/// Sizes the fleet to the work until `stop`. On stop it does nothing more:
/// a stopping coordinator never scales in.
pub async fn reconcile<F: Fleet>(
    fleet: Arc<F>,
    core: Arc<Core>,
    policy: SizingPolicy,
    view: Arc<FleetView>,
    stop: CancellationToken,
) {
    loop {
        let instances = fleet.instances();
        let agents = core.agents();
        let now = Instant::now();
        let views: Vec<InstanceView> = instances
            .iter()
            .map(|i| {
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
                InstanceView {
                    id: i.id.clone(),
                    state,
                }
            })
            .collect();
        view.set(
            instances
                .iter()
                .zip(&views)
                .map(|(i, v)| InstanceStatus {
                    id: i.id.clone(),
                    state: match v.state {
                        InstanceState::Booting => "booting",
                        InstanceState::Ready { busy: 0, .. } => "idle",
                        InstanceState::Ready { .. } => "busy",
                        InstanceState::Draining => "draining",
                    },
                    age: now.saturating_duration_since(i.launched_at),
                })
                .collect(),
        );
        let plan = policy::plan(core.demand(), &views, &policy, now);
        if plan.launch > 0 {
            match fleet.launch(plan.launch).await {
                Ok(ids) => tracing::info!(count = ids.len(), ids = ?ids, "launched instances"),
                Err(e) => tracing::error!(error = %e, "failed to launch instances"),
            }
        }
        for id in plan.remove {
            tracing::info!(instance = %id, "removing idle instance");
            core.drain_instance(&id, true, "idle instance removed by the fleet");
            if let Err(e) = fleet.remove(&id).await {
                tracing::error!(instance = %id, error = %e, "failed to remove instance");
            }
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
