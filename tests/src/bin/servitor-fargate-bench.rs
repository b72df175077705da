//! Measures the Fargate runner's own overhead on this machine, with moto's
//! ECS and local containers standing in for AWS (whose 30–45 s task start
//! it does not control):
//!
//! - a job taken from GitLab → its task's RunTask answered (the task is in
//!   moto's list of the cluster's running tasks);
//! - the job's container started → the job's first output line in GitLab:
//!   the agent starts, reads its task's metadata, enrolls with the task's
//!   credential, dials the coordinator, is given its job and runs it.
//!
//! Needs moto's server (`SERVITOR_MOTO_SERVER`) and the static agent
//! (`SERVITOR_STATIC_AGENT`), as tests/run.sh sets them:
//! `target/debug/servitor-fargate-bench [SAMPLES]`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use bollard::query_parameters::ListContainersOptionsBuilder;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::fargate::{start_fargate_runner, FargateRunner, TASK_LABEL};
use servitor_tests::percentile;

/// How often the bench looks at moto and GitLab.
const POLL: Duration = Duration::from_millis(5);
/// Longest one sample may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(60);

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// When Docker says the task's job container started, as a tokio instant.
async fn container_started(
    docker: &bollard::Docker,
    task_arn: &str,
) -> anyhow::Result<tokio::time::Instant> {
    let filters: HashMap<String, Vec<String>> =
        HashMap::from([("label".to_owned(), vec![format!("{TASK_LABEL}={task_arn}")])]);
    let listed = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await?;
    let mut latest: Option<SystemTime> = None;
    for container in listed {
        let Some(id) = container.id else { continue };
        let inspected = docker.inspect_container(&id, None).await?;
        let started = inspected
            .state
            .and_then(|s| s.started_at)
            .context("a container with no start time")?;
        let at = humantime::parse_rfc3339_weak(&started)
            .with_context(|| format!("the start time {started:?}"))?;
        // The job's container starts after the init container.
        latest = latest.max(Some(at));
    }
    let at = latest.context("the task has no container")?;
    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
    Ok(tokio::time::Instant::now() - ago)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let samples: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("SAMPLES must be a whole number")?,
        None => 10,
    };
    let (mut h, fargate, _moto) = start_fargate_runner(FargateRunner::default()).await?;
    let docker = bollard::Docker::connect_with_defaults()?;
    let mut to_run_task = Vec::new();
    let mut to_first_line = Vec::new();
    for n in 0..samples {
        let before: HashSet<String> = fargate.tasks().into_iter().map(|t| t.task_arn).collect();
        let id = h
            .standin
            .push_job(
                JobSpec::new(format!("bench-{n}"))
                    .variable("GIT_STRATEGY", "none")
                    .script(["echo first-line"]),
            )
            .await?;
        let deadline = tokio::time::Instant::now() + SAMPLE_TIMEOUT;
        let (task_arn, run_task_at) = loop {
            let listed = fargate
                .ecs_client()
                .list_tasks()
                .cluster(fargate.cluster())
                .send()
                .await?;
            if let Some(arn) = listed.task_arns().iter().find(|arn| !before.contains(*arn)) {
                break (arn.clone(), tokio::time::Instant::now());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no task was started for job {id}");
            }
            tokio::time::sleep(POLL).await;
        };
        let first_line_at = loop {
            let record = h.standin.job(id).context("the job is gone")?;
            if record.trace_text().contains("\nfirst-line") {
                break tokio::time::Instant::now();
            }
            if record.state.is_final() || tokio::time::Instant::now() > deadline {
                bail!(
                    "job {id} ended or stalled before its first line:\n{}",
                    record.trace_text()
                );
            }
            tokio::time::sleep(POLL).await;
        };
        let record = h.wait_final(id, SAMPLE_TIMEOUT).await?;
        if record.state != JobState::Success {
            bail!("job {id} did not succeed:\n{}", record.trace_text());
        }
        let handed = record.handed_out.context("the job was never handed out")?;
        to_run_task.push(run_task_at.saturating_duration_since(handed));
        let started = container_started(&docker, &task_arn).await?;
        to_first_line.push(first_line_at.saturating_duration_since(started));
    }
    h.stop().await;
    to_run_task.sort();
    to_first_line.sort();
    println!("{samples} jobs, one Fargate task each (moto's ECS, local containers):");
    println!(
        "job taken -> RunTask answered:               p50 {}, p90 {}, max {}",
        ms(percentile(&to_run_task, 0.5)),
        ms(percentile(&to_run_task, 0.9)),
        ms(to_run_task.last().copied().unwrap_or_default())
    );
    println!(
        "job container started -> first log line:     p50 {}, p90 {}, max {}",
        ms(percentile(&to_first_line, 0.5)),
        ms(percentile(&to_first_line, 0.9)),
        ms(to_first_line.last().copied().unwrap_or_default())
    );
    Ok(())
}
