//! [`TaskMetadataStandIn`]: a local HTTP server that speaks the ECS task
//! metadata endpoint v4 (`$ECS_CONTAINER_METADATA_URI_V4` and its `/task`
//! path) for one made-up Fargate task, with the fields AWS documents for
//! Fargate (Cluster, TaskARN, Family, Revision, DesiredStatus, KnownStatus,
//! Limits, AvailabilityZone, LaunchType, Containers). Tests point agents
//! in task containers at it, as Fargate would through the environment.
//!
//! Not responsible for stats or anything else an agent does not read.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The made-up task the stand-in describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    pub cluster: String,
    pub task_arn: String,
    pub family: String,
    pub revision: u32,
    pub zone: String,
    /// CPU units and memory in MiB of the task.
    pub cpu: u32,
    pub memory_mib: u32,
}

/// A running task metadata stand-in.
#[derive(Debug)]
pub struct TaskMetadataStandIn {
    addr: SocketAddr,
    spec: Arc<TaskSpec>,
    stop: CancellationToken,
}

impl TaskMetadataStandIn {
    /// Serves `spec` on `address` (a port of 0 picks a free one): bind it
    /// where the task's containers can reach it.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start_at(spec: TaskSpec, address: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let addr = listener.local_addr()?;
        let spec = Arc::new(spec);
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/v4/{container}", get(container))
            .route("/v4/{container}/task", get(task))
            .with_state(spec.clone());
        crate::serve(listener, router, &stop, "the task metadata stand-in");
        Ok(Self { addr, spec, stop })
    }

    /// What `ECS_CONTAINER_METADATA_URI_V4` holds in the task's containers.
    pub fn uri(&self) -> String {
        format!("http://{}/v4/servitor-job", self.addr)
    }

    /// The task described.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }
}

impl Drop for TaskMetadataStandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn container(State(spec): State<Arc<TaskSpec>>) -> impl IntoResponse {
    Json(container_json(&spec))
}

fn container_json(spec: &TaskSpec) -> serde_json::Value {
    json!({
        "DockerId": "servitor-job-0123456789",
        "Name": "job",
        "DockerName": "job",
        "Image": "job-image",
        "Labels": {
            "com.amazonaws.ecs.cluster": spec.cluster,
            "com.amazonaws.ecs.container-name": "job",
            "com.amazonaws.ecs.task-arn": spec.task_arn,
            "com.amazonaws.ecs.task-definition-family": spec.family,
            "com.amazonaws.ecs.task-definition-version": spec.revision.to_string(),
        },
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Type": "NORMAL",
        "ContainerARN": format!("{}/job", spec.task_arn),
    })
}

async fn task(State(spec): State<Arc<TaskSpec>>) -> impl IntoResponse {
    Json(json!({
        "Cluster": spec.cluster,
        "TaskARN": spec.task_arn,
        "Family": spec.family,
        "Revision": spec.revision.to_string(),
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Limits": {
            "CPU": f64::from(spec.cpu) / 1024.0,
            "Memory": spec.memory_mib,
        },
        "AvailabilityZone": spec.zone,
        "LaunchType": "FARGATE",
        "Containers": [container_json(&spec)],
    }))
}
