#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! A Fargate runner end to end: moto's ECS through the real SDK holds the
//! task records, and the stand-in runs each task moto starts as real
//! containers — the init container copies the static agent from the agent
//! image into the task's volume, and the job's own image (busybox, no
//! glibc) runs it as its entrypoint, with a task metadata endpoint.

use std::time::Duration;

use servitor_proto::job::Service;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::aws::Moto;
use servitor_tests::fargate::{start_fargate_runner, FargateRunner, FargateStandIn};
use servitor_tests::{Harness, TEST_IMAGE};

/// A job that fetches no sources: the busybox job image has no git.
fn sourceless(name: &str) -> JobSpec {
    JobSpec::new(name).variable("GIT_STRATEGY", "none")
}

/// Every task's container logs, for failure messages.
fn all_logs(fargate: &FargateStandIn) -> String {
    fargate
        .tasks()
        .iter()
        .map(|t| {
            format!(
                "--- task {} ({:?})\n{}",
                t.task_arn, t.stopped_reason, t.logs
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A coordinator whose one runner is a Fargate runner on the stand-in's
/// cluster.
async fn fargate_harness(boot_timeout: Duration) -> (Harness, FargateStandIn, Moto) {
    fargate_harness_with(boot_timeout, None, Duration::from_secs(3600)).await
}

/// [`fargate_harness`] under a monthly budget, keeping unused task
/// definitions so long.
async fn fargate_harness_with(
    boot_timeout: Duration,
    monthly_usd: Option<f64>,
    keep_task_definitions: Duration,
) -> (Harness, FargateStandIn, Moto) {
    start_fargate_runner(FargateRunner {
        boot_timeout,
        monthly_usd,
        keep_task_definitions,
    })
    .await
    .unwrap()
}

/// A job runs green in its own image as a task of its own: the agent came
/// in through the init container and ran in an image without glibc, the
/// job never saw the task's enrollment credential, and the task stopped
/// once its one job was reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_green_in_its_own_image_as_a_fargate_task() {
    let (mut h, fargate, _moto) = fargate_harness(Duration::from_secs(120)).await;
    let id = h
        .standin
        .push_job(
            JobSpec::new("light")
                .image(TEST_IMAGE)
                .variable("GIT_STRATEGY", "none")
                .script([
                    "echo \"credential=[${SERVITOR_TASK_CREDENTIAL:-}]\"",
                    "test ! -e /lib/libc.so.6 && echo no glibc here",
                    "echo built > out.txt",
                    "printf 'done'",
                ])
                // Uploaded from an image with no certificate authorities.
                .artifact_paths(["out.txt"]),
        )
        .await
        .unwrap();
    let record = h.wait_final(id, Duration::from_secs(120)).await.unwrap();
    let trace = record.trace_text();
    assert_eq!(
        record.state,
        JobState::Success,
        "{trace}\n{}",
        all_logs(&fargate)
    );
    assert!(trace.contains("credential=[]"), "{trace}");
    assert!(trace.contains("no glibc here"), "{trace}");
    assert!(
        trace.contains("done"),
        "output without a final newline: {trace}"
    );
    assert_eq!(record.artifacts.len(), 1, "{trace}");
    let tasks = fargate.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].image, TEST_IMAGE, "the job's own image");
    servitor_testkit::wait_until(
        "the task to stop after its one job",
        Duration::from_secs(30),
        || {
            // Stopped, and its exit code and log final.
            fargate.tasks().first().is_some_and(|t| t.finished)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        fargate.tasks()[0].exit_code,
        Some(0),
        "{:?}",
        fargate.tasks()
    );
    h.stop().await;
}

/// A Fargate Spot interruption (SIGTERM to the task) hands the job back;
/// it runs again on a new task — on-demand after one interruption, as
/// configured — and GitLab sees one green job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_reruns_the_job_on_a_new_task() {
    let (mut h, fargate, _moto) = fargate_harness(Duration::from_secs(120)).await;
    let id = h
        .standin
        .push_job(sourceless("interrupted").script(["echo started", "sleep 6", "echo finished"]))
        .await
        .unwrap();
    h.wait_trace(id, "started", Duration::from_secs(60))
        .await
        .unwrap();
    let first = fargate.tasks()[0].task_arn.clone();
    fargate.interrupt(&first);
    let record = h.wait_final(id, Duration::from_secs(120)).await.unwrap();
    let trace = record.trace_text();
    assert_eq!(
        record.state,
        JobState::Success,
        "{trace}\n{}",
        all_logs(&fargate)
    );
    assert!(trace.contains("Attempt 2"), "{trace}");
    assert!(trace.contains("finished"), "{trace}");
    // One interruption sends the job's next task to on-demand Fargate.
    let (first_attempt, second_attempt) = trace.split_once("Attempt 2").unwrap();
    assert!(first_attempt.contains("spot"), "{trace}");
    assert!(second_attempt.contains("on-demand"), "{trace}");
    // Priced by Fargate's per-vCPU and per-GB prices.
    assert!(trace.contains("estimated cost $"), "{trace}");
    let tasks = fargate.tasks();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert!(tasks.iter().any(|t| t.task_arn != first));
    h.stop().await;
}

/// What cannot run on Fargate fails at once with the reason, before any
/// task: Docker-in-Docker, and a size Fargate does not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_fargate_cannot_run_fail_at_once_without_a_task() {
    let (mut h, fargate, _moto) = fargate_harness(Duration::from_secs(120)).await;
    let dind = h
        .standin
        .push_job(
            JobSpec::new("dind")
                .image("docker:27")
                .service(Service {
                    name: "docker:27-dind".to_owned(),
                    ..Service::default()
                })
                .script(["docker info"]),
        )
        .await
        .unwrap();
    let sized = h
        .standin
        .push_job(
            JobSpec::new("sized")
                .variable("SERVITOR_FARGATE_MEMORY", "3000")
                .script(["true"]),
        )
        .await
        .unwrap();
    let record = h.wait_final(dind, Duration::from_secs(30)).await.unwrap();
    let trace = record.trace_text();
    assert_eq!(record.state, JobState::Failed, "{trace}");
    assert!(
        trace.contains("Docker-in-Docker") && trace.contains("privileged"),
        "{trace}"
    );
    let record = h.wait_final(sized, Duration::from_secs(30)).await.unwrap();
    let trace = record.trace_text();
    assert_eq!(record.state, JobState::Failed, "{trace}");
    assert!(
        trace.contains("memory = 3000 MiB does not go with cpu = 512"),
        "{trace}"
    );
    assert!(fargate.tasks().is_empty(), "{:?}", fargate.tasks());
    h.stop().await;
}

/// A task whose agent never comes is stopped at `boot_timeout`, and the
/// job runs on the next task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_never_enrolls_is_stopped_and_its_job_runs_on_another() {
    let (mut h, fargate, _moto) = fargate_harness(Duration::from_secs(5)).await;
    fargate.hold_back(true);
    let id = h
        .standin
        .push_job(sourceless("patient").script(["echo ran"]))
        .await
        .unwrap();
    servitor_testkit::wait_until(
        "the silent task to be stopped",
        Duration::from_secs(30),
        || {
            fargate.tasks().iter().any(|t| {
                t.stopped_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("did not enroll"))
            })
        },
    )
    .await
    .unwrap();
    fargate.hold_back(false);
    let record = h.wait_final(id, Duration::from_secs(90)).await.unwrap();
    let trace = record.trace_text();
    assert_eq!(
        record.state,
        JobState::Success,
        "{trace}\n{}",
        all_logs(&fargate)
    );
    assert!(trace.contains("ran"), "{trace}");
    assert!(fargate.tasks().len() >= 2, "{:?}", fargate.tasks());
    h.stop().await;
}

/// Under a monthly cap the task would break, no task starts: the job waits
/// and its log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_would_break_the_budget_is_not_started() {
    let (mut h, fargate, _moto) = fargate_harness_with(
        Duration::from_secs(120),
        Some(0.01),
        Duration::from_secs(3600),
    )
    .await;
    let id = h
        .standin
        .push_job(sourceless("thrifty").script(["echo ran"]))
        .await
        .unwrap();
    let record = h
        .wait_trace(id, "Waiting for budget", Duration::from_secs(30))
        .await
        .unwrap();
    let trace = record.trace_text();
    assert!(trace.contains("monthly cap of $0.01"), "{trace}");
    assert!(fargate.tasks().is_empty(), "{:?}", fargate.tasks());
    let status = servitor_coordinator::admin::render_status(
        &servitor_coordinator::admin::connect(&h.coordinator().admin_socket)
            .await
            .unwrap()
            .status(servitor_proto::admin::StatusRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(
        status.contains("FLEET fargate") && status.contains("of $0.01"),
        "{status}"
    );
    h.stop().await;
}

/// A task definition no task has used for `keep_task_definitions` is
/// deregistered; the job that used it had run green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_task_definition_is_deregistered() {
    let (mut h, fargate, _moto) =
        fargate_harness_with(Duration::from_secs(120), None, Duration::from_secs(2)).await;
    let id = h
        .standin
        .push_job(sourceless("once").script(["echo ran"]))
        .await
        .unwrap();
    let record = h.wait_final(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(record.state, JobState::Success, "{}", record.trace_text());
    let family = fargate.tasks()[0].family.clone();
    let ecs = fargate.ecs_client().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let described = ecs
            .describe_task_definition()
            .task_definition(&family)
            .send()
            .await;
        let inactive = described
            .as_ref()
            .ok()
            .and_then(|out| out.task_definition())
            .and_then(|d| d.status())
            .is_some_and(|s| s.as_str() == "INACTIVE");
        if inactive {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{family} was not deregistered: {described:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.stop().await;
}

/// A coordinator restarted while a task runs its job adopts the task: the
/// agent reconnects, the job finishes there, no second task is started,
/// and GitLab sees one green job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_adopts_the_running_task() {
    let (mut h, fargate, _moto) = fargate_harness(Duration::from_secs(120)).await;
    let id = h
        .standin
        .push_job(sourceless("long").script(["echo started", "sleep 5", "echo finished"]))
        .await
        .unwrap();
    h.wait_trace(id, "started", Duration::from_secs(60))
        .await
        .unwrap();
    h.restart().await.unwrap();
    let record = h.wait_final(id, Duration::from_secs(90)).await.unwrap();
    let trace = record.trace_text();
    assert_eq!(
        record.state,
        JobState::Success,
        "{trace}\n{}",
        all_logs(&fargate)
    );
    assert!(trace.contains("The coordinator restarted"), "{trace}");
    assert!(trace.contains("finished"), "{trace}");
    assert!(
        !trace.contains("Attempt 2"),
        "the job went on where it ran: {trace}"
    );
    assert_eq!(fargate.tasks().len(), 1, "{:?}", fargate.tasks());
    h.stop().await;
}
