//! What the agent of a Fargate task reads about its task from the task
//! metadata endpoint v4 (`$ECS_CONTAINER_METADATA_URI_V4/task`): the task's
//! ARN, which binds its enrollment to the credential minted for it, and
//! its zone.

use std::time::Duration;

use serde::Deserialize;

/// The variable Fargate sets in every container of a task.
pub const METADATA_URI_VARIABLE: &str = "ECS_CONTAINER_METADATA_URI_V4";
/// How long the endpoint may take; it is local to the task.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of an answer read: a task document is a few kilobytes.
const MAX_BODY: usize = 256 * 1024;

/// The fields of `/task` the agent uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TaskFacts {
    #[serde(rename = "TaskARN")]
    pub task_arn: String,
    #[serde(rename = "AvailabilityZone", default)]
    pub availability_zone: String,
    #[serde(rename = "Limits", default)]
    pub limits: Option<Limits>,
}

/// The task's size as the endpoint gives it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Limits {
    /// vCPUs.
    #[serde(rename = "CPU")]
    pub cpu: f64,
    /// MiB.
    #[serde(rename = "Memory")]
    pub memory: u64,
}

impl TaskFacts {
    /// The instance type the agent reports, from which the coordinator
    /// prices the task: `fargate-<cpu units>-<memory MiB>`, or `fargate`
    /// when the size is not known.
    pub fn instance_type(&self) -> String {
        match self.limits {
            Some(Limits { cpu, memory }) if cpu > 0.0 => {
                // Whole CPU units: 0.25 vCPU is 256.
                let units = (cpu * 1024.0).round();
                format!("fargate-{units}-{memory}")
            }
            _ => "fargate".to_owned(),
        }
    }

    /// The task id at the end of the ARN.
    pub fn task_id(&self) -> &str {
        self.task_arn.rsplit('/').next().unwrap_or(&self.task_arn)
    }
}

/// Reads the task's document from the endpoint at `uri`.
///
/// # Errors
/// The endpoint cannot be reached, answers with an error, or sends
/// something that is not a task document; the message names the URI.
pub async fn read(uri: &str) -> Result<TaskFacts, String> {
    let url = format!("{}/task", uri.trim_end_matches('/'));
    // Plain HTTP to the task's own endpoint: no certificate roots needed,
    // and a job image may have none (the platform verifier refuses to
    // start without them).
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .tls_certs_only(Vec::new())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let response = client.get(&url).send().await.map_err(|e| {
        format!(
            "cannot reach the task metadata endpoint {url}: {}",
            with_sources(&e)
        )
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "the task metadata endpoint {url} answered {status}"
        ));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("reading {url}: {e}"))?;
    if body.len() > MAX_BODY {
        return Err(format!(
            "{url} sent {} bytes; a task document is a few kilobytes",
            body.len()
        ));
    }
    let facts: TaskFacts = serde_json::from_slice(&body)
        .map_err(|e| format!("{url} did not send a task document: {e}"))?;
    if !facts.task_arn.starts_with("arn:") || !facts.task_arn.contains(":task/") {
        return Err(format!(
            "{url} names the task {:?}, which is not a task ARN",
            facts.task_arn
        ));
    }
    Ok(facts)
}

/// An error and its causes, as one line: reqwest's own text leaves out
/// what went wrong underneath (a refused connection, an unknown host).
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use servitor_testkit::task_metadata::{TaskMetadataStandIn, TaskSpec};

    #[tokio::test]
    async fn the_task_document_gives_the_arn_and_zone() {
        let standin = TaskMetadataStandIn::start_at(
            TaskSpec {
                cluster: "ci".into(),
                task_arn: "arn:aws:ecs:eu-west-1:123456789012:task/ci/4f1d2e".into(),
                family: "servitor-light-1".into(),
                revision: 3,
                zone: "eu-west-1b".into(),
                cpu: 1024,
                memory_mib: 2048,
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let facts = read(&standin.uri()).await.unwrap();
        assert_eq!(facts.task_id(), "4f1d2e");
        assert_eq!(facts.availability_zone, "eu-west-1b");
        assert_eq!(facts.instance_type(), "fargate-1024-2048");
        let e = read("http://127.0.0.1:9/v4/x").await.unwrap_err();
        assert!(e.contains("cannot reach the task metadata endpoint"), "{e}");
    }
}
