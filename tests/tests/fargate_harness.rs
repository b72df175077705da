#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The Fargate stand-in on its own, with task definitions these tests
//! register (no coordinator): moto's ECS holds the task records, the
//! stand-in runs them in the real Docker engine. An init container fills
//! the task's shared volume before the essential container starts; the
//! essential container sees its definition's and RunTask's environment and
//! its task metadata endpoint; a task whose essential container exits is
//! stopped in moto; StopTask and Spot interruptions send SIGTERM, then
//! SIGKILL after the stop timeout; a held-back task runs nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_ecs::types::{
    CapacityProviderStrategyItem, Compatibility, ContainerCondition, ContainerDefinition,
    ContainerDependency, KeyValuePair, LaunchType, MountPoint, NetworkConfiguration, NetworkMode,
    TaskOverride, Volume,
};
use servitor_tests::aws::Moto;
use servitor_tests::fargate::{
    ensure_agent_image, ensure_scratch_image, static_agent, FargateStandIn, ScratchFile,
    AGENT_IMAGE_PATH, ESSENTIAL_EXITED, INIT_FAILED, SPOT_INTERRUPTED, TASK_LABEL,
};
use servitor_tests::{ensure_test_image, TEST_IMAGE};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The init image: the host's static busybox and a file to hand over.
const INIT_IMAGE: &str = "servitor-test-fargate-init:latest";

/// What the init image's file holds.
const PAYLOAD: &str = "handed over by the init container";

/// Where the task's shared volume is mounted.
const SHARED: &str = "/shared";

/// moto, the stand-in, and the images these tests use.
async fn start() -> (Moto, FargateStandIn) {
    ensure_test_image().await.unwrap();
    let busybox = std::fs::read(servitor_testkit::image::BUSYBOX_PATH)
        .expect("these tests need Debian's busybox-static on the host");
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    ensure_scratch_image(
        &docker,
        INIT_IMAGE,
        &[
            ScratchFile {
                path: "bin/busybox",
                mode: 0o755,
                contents: &busybox,
            },
            ScratchFile {
                path: "payload.txt",
                mode: 0o644,
                contents: format!("{PAYLOAD}\n").as_bytes(),
            },
        ],
        &[],
    )
    .await
    .unwrap();
    let moto = Moto::start().await.unwrap();
    let fargate = FargateStandIn::start(&moto).await.unwrap();
    (moto, fargate)
}

/// A task definition with an init container (from `init_command`, when
/// given) that the job container waits on with SUCCESS, and the job
/// container running `script` in the test job image.
async fn register(
    fargate: &FargateStandIn,
    family: &str,
    init_command: Option<&[&str]>,
    script: &str,
    stop_timeout: i32,
) -> String {
    let mount = |read_only: bool| {
        MountPoint::builder()
            .source_volume("shared")
            .container_path(SHARED)
            .read_only(read_only)
            .build()
    };
    let mut job = ContainerDefinition::builder()
        .name("job")
        .image(TEST_IMAGE)
        .essential(true)
        .entry_point("sh")
        .entry_point("-c")
        .command(script)
        .environment(
            KeyValuePair::builder()
                .name("GREETING")
                .value("from-definition")
                .build(),
        )
        .environment(
            KeyValuePair::builder()
                .name("EXTRA")
                .value("from-definition")
                .build(),
        )
        .mount_points(mount(true))
        .stop_timeout(stop_timeout)
        // moto answers 500 for a container with neither memory setting.
        .memory_reservation(64);
    let mut request = fargate
        .ecs_client()
        .register_task_definition()
        .family(family)
        .requires_compatibilities(Compatibility::Fargate)
        .network_mode(NetworkMode::Awsvpc)
        .cpu("256")
        .memory("512")
        .volumes(Volume::builder().name("shared").build());
    if let Some(command) = init_command {
        let mut init = ContainerDefinition::builder()
            .name("init")
            .image(INIT_IMAGE)
            .essential(false)
            .entry_point("/bin/busybox")
            .mount_points(mount(false))
            .memory_reservation(16);
        for part in command {
            init = init.command(*part);
        }
        request = request.container_definitions(init.build());
        job = job.depends_on(
            ContainerDependency::builder()
                .container_name("init")
                .condition(ContainerCondition::Success)
                .build()
                .unwrap(),
        );
    }
    let out = request
        .container_definitions(job.build())
        .send()
        .await
        .unwrap();
    out.task_definition()
        .unwrap()
        .task_definition_arn()
        .unwrap()
        .to_owned()
}

/// Runs one task of `definition` on Fargate Spot (or on-demand), with
/// `EXTRA` overridden for the job container; returns its ARN.
async fn run(fargate: &FargateStandIn, definition: &str, spot: bool) -> String {
    let network = NetworkConfiguration::builder()
        .awsvpc_configuration(
            aws_sdk_ecs::types::AwsVpcConfiguration::builder()
                .subnets(&fargate.subnets()[0])
                // moto answers 500 (KeyError) for an awsvpcConfiguration
                // without security groups; it accepts any id.
                .security_groups("sg-0123456789abcdef0")
                .build()
                .unwrap(),
        )
        .build();
    let overrides = TaskOverride::builder()
        .container_overrides(
            aws_sdk_ecs::types::ContainerOverride::builder()
                .name("job")
                .environment(
                    KeyValuePair::builder()
                        .name("EXTRA")
                        .value("from-override")
                        .build(),
                )
                .build(),
        )
        .build();
    let mut request = fargate
        .ecs_client()
        .run_task()
        .cluster(fargate.cluster())
        .task_definition(definition)
        .network_configuration(network)
        .overrides(overrides);
    request = if spot {
        request.capacity_provider_strategy(
            CapacityProviderStrategyItem::builder()
                .capacity_provider("FARGATE_SPOT")
                .weight(1)
                .build()
                .unwrap(),
        )
    } else {
        request.launch_type(LaunchType::Fargate)
    };
    let out = request.send().await.unwrap();
    assert!(out.failures().is_empty(), "{:?}", out.failures());
    out.tasks()[0].task_arn().unwrap().to_owned()
}

/// The task as moto describes it: last status, desired status, reason.
async fn described(fargate: &FargateStandIn, arn: &str) -> (String, String, String) {
    let out = fargate
        .ecs_client()
        .describe_tasks()
        .cluster(fargate.cluster())
        .tasks(arn)
        .send()
        .await
        .unwrap();
    let task = &out.tasks()[0];
    (
        task.last_status().unwrap_or_default().to_owned(),
        task.desired_status().unwrap_or_default().to_owned(),
        task.stopped_reason().unwrap_or_default().to_owned(),
    )
}

/// Containers (any state) the stand-in made for the task.
async fn containers_of(arn: &str) -> usize {
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let filters = HashMap::from([("label".to_owned(), vec![format!("{TASK_LABEL}={arn}")])]);
    docker
        .list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
        .len()
}

/// Docker volumes the stand-in made for the task.
async fn volumes_of(arn: &str) -> usize {
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let id = arn.rsplit('/').next().unwrap();
    let volumes = docker
        .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
        .await
        .unwrap()
        .volumes
        .unwrap_or_default();
    volumes.iter().filter(|v| v.name.contains(id)).count()
}

/// Waits until the stand-in is done with the task.
async fn finished(fargate: &FargateStandIn, arn: &str) -> servitor_tests::fargate::TaskView {
    fargate
        .wait_task(arn, "the task's end", TIMEOUT, |t| t.finished)
        .await
        .unwrap()
}

/// Prints a line once the container runs, then waits; SIGTERM prints and
/// exits 143.
const WAITS_FOR_SIGTERM: &str =
    "trap 'echo got SIGTERM; exit 143' TERM; echo waiting; sleep 300 & wait $!";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_init_container_fills_the_shared_volume_and_a_task_whose_essential_container_exits_is_stopped(
) {
    let (_moto, fargate) = start().await;
    let script = format!(
        "cat {SHARED}/payload.txt; \
         echo \"greeting=$GREETING extra=$EXTRA\"; \
         wget -qO- \"$ECS_CONTAINER_METADATA_URI_V4/task\"; echo; \
         if touch {SHARED}/written 2>/dev/null; then echo shared-writable; else echo shared-read-only; fi"
    );
    let copy = ["cp", "/payload.txt", &format!("{SHARED}/payload.txt")];
    let definition = register(&fargate, "harness-job", Some(&copy[..]), &script, 5).await;
    let broken = register(
        &fargate,
        "harness-broken-init",
        Some(&["sh", "-c", "echo init is broken; exit 3"][..]),
        "echo must not run",
        5,
    )
    .await;
    let started = Instant::now();
    let arn = run(&fargate, &definition, true).await;
    let broken_arn = run(&fargate, &broken, false).await;

    let task = finished(&fargate, &arn).await;
    let took = started.elapsed();
    assert_eq!(task.exit_code, Some(0), "{task:#?}");
    assert!(task.started);
    assert_eq!(task.family, "harness-job");
    assert_eq!(task.image, TEST_IMAGE);
    assert_eq!(task.stopped_reason.as_deref(), Some(ESSENTIAL_EXITED));
    let logs = &task.logs;
    assert!(logs.contains(PAYLOAD), "{logs}");
    assert!(
        logs.contains("greeting=from-definition extra=from-override"),
        "{logs}"
    );
    assert!(logs.contains(&format!("\"TaskARN\":\"{arn}\"")), "{logs}");
    assert!(logs.contains("\"Family\":\"harness-job\""), "{logs}");
    assert!(logs.contains("shared-read-only"), "{logs}");
    assert_eq!(fargate.logs(&arn), *logs);
    assert_eq!(
        described(&fargate, &arn).await,
        (
            "STOPPED".to_owned(),
            "STOPPED".to_owned(),
            ESSENTIAL_EXITED.to_owned()
        )
    );
    assert_eq!(containers_of(&arn).await, 0, "its containers are removed");

    // An init container that fails: the job container never starts.
    let task = finished(&fargate, &broken_arn).await;
    assert!(!task.started, "{task:#?}");
    assert_eq!(task.exit_code, None);
    assert_eq!(task.stopped_reason.as_deref(), Some(INIT_FAILED));
    assert!(task.logs.contains("init is broken"), "{}", task.logs);
    assert!(!task.logs.contains("must not run"), "{}", task.logs);
    assert_eq!(described(&fargate, &broken_arn).await.2, INIT_FAILED);
    assert_eq!(fargate.tasks().len(), 2);
    eprintln!("a task with an init container ran and stopped in {took:?}");
    fargate.stop().await;
    assert_eq!(containers_of(&broken_arn).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_task_sends_sigterm_and_sigkill_follows_after_the_stop_timeout() {
    let (_moto, fargate) = start().await;
    let polite = register(&fargate, "harness-polite", None, WAITS_FOR_SIGTERM, 20).await;
    let stubborn = register(
        &fargate,
        "harness-stubborn",
        None,
        "trap 'echo ignoring SIGTERM' TERM; echo waiting; while true; do sleep 1; done",
        2,
    )
    .await;
    let polite = run(&fargate, &polite, true).await;
    let stubborn = run(&fargate, &stubborn, true).await;
    for arn in [&polite, &stubborn] {
        fargate
            .wait_task(arn, "the container's first line", TIMEOUT, |t| {
                t.logs.contains("waiting")
            })
            .await
            .unwrap();
        assert_eq!(
            described(&fargate, arn).await.0,
            "RUNNING",
            "moto keeps a running task RUNNING however often it is described"
        );
    }
    let stopped = Instant::now();
    for arn in [&polite, &stubborn] {
        fargate
            .ecs_client()
            .stop_task()
            .cluster(fargate.cluster())
            .task(arn)
            .reason("stopped by the test")
            .send()
            .await
            .unwrap();
    }
    let task = finished(&fargate, &polite).await;
    assert_eq!(task.exit_code, Some(143), "{task:#?}");
    assert!(task.logs.contains("got SIGTERM"), "{}", task.logs);
    assert_eq!(task.stopped_reason.as_deref(), Some("stopped by the test"));
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "it exited at SIGTERM, long before its 20 s stop timeout: {:?}",
        stopped.elapsed()
    );
    let task = finished(&fargate, &stubborn).await;
    let took = stopped.elapsed();
    assert_eq!(task.exit_code, Some(137), "SIGKILL: {task:#?}");
    assert!(task.logs.contains("ignoring SIGTERM"), "{}", task.logs);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "SIGKILL comes after the 2 s stop timeout: {took:?}"
    );
    assert_eq!(
        described(&fargate, &stubborn).await,
        (
            "STOPPED".to_owned(),
            "STOPPED".to_owned(),
            "stopped by the test".to_owned()
        )
    );
    fargate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_sends_one_sigterm_and_a_held_back_task_runs_nothing() {
    let (_moto, fargate) = start().await;
    let definition = register(&fargate, "harness-spot", None, WAITS_FOR_SIGTERM, 20).await;
    let arn = run(&fargate, &definition, true).await;
    fargate
        .wait_task(&arn, "the container's first line", TIMEOUT, |t| {
            t.logs.contains("waiting")
        })
        .await
        .unwrap();
    fargate.interrupt(&arn);
    let task = finished(&fargate, &arn).await;
    assert_eq!(task.exit_code, Some(143), "{task:#?}");
    assert_eq!(
        task.logs.matches("got SIGTERM").count(),
        1,
        "one SIGTERM: {}",
        task.logs
    );
    assert_eq!(task.stopped_reason.as_deref(), Some(SPOT_INTERRUPTED));
    assert_eq!(described(&fargate, &arn).await.2, SPOT_INTERRUPTED);

    fargate.hold_back(true);
    let held = run(&fargate, &definition, true).await;
    fargate
        .wait_task(&held, "the stand-in seeing the task", TIMEOUT, |_| true)
        .await
        .unwrap();
    fargate.hold_back(false);
    // Several looks later, still nothing runs and moto still has it RUNNING.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let task = fargate.task(&held).unwrap();
    assert!(!task.started && !task.finished, "{task:#?}");
    assert_eq!(containers_of(&held).await, 0);
    assert_eq!(described(&fargate, &held).await.1, "RUNNING");
    fargate
        .ecs_client()
        .stop_task()
        .cluster(fargate.cluster())
        .task(&held)
        .reason("never enrolled")
        .send()
        .await
        .unwrap();
    let task = finished(&fargate, &held).await;
    assert_eq!(task.stopped_reason.as_deref(), Some("never enrolled"));
    assert!(!task.started);

    // Dropped while a task runs: its containers and volume go with it.
    let live = run(&fargate, &definition, true).await;
    fargate
        .wait_task(&live, "the container's first line", TIMEOUT, |t| {
            t.logs.contains("waiting")
        })
        .await
        .unwrap();
    assert_eq!(containers_of(&live).await, 1);
    assert_eq!(volumes_of(&live).await, 1);
    drop(fargate);
    assert_eq!(containers_of(&live).await, 0);
    assert_eq!(volumes_of(&live).await, 0);
}

/// Needs the static agent `tests/run.sh` builds (`SERVITOR_STATIC_AGENT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_image_holds_the_static_agent_alone() {
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let tag = ensure_agent_image(&docker).await.unwrap();
    let first = docker.inspect_image(&tag).await.unwrap();
    // Unchanged executable: the same image, not imported again.
    ensure_agent_image(&docker).await.unwrap();
    let again = docker.inspect_image(&tag).await.unwrap();
    assert_eq!(first.id, again.id);
    let config = again.config.unwrap();
    assert_eq!(
        config.entrypoint.unwrap_or_default(),
        [AGENT_IMAGE_PATH.to_owned()]
    );
    let agent = std::fs::metadata(static_agent().unwrap()).unwrap().len();
    let size = u64::try_from(again.size.unwrap()).unwrap();
    assert!(
        size >= agent && size < agent + 64 * 1024,
        "the image holds the agent alone: {size} bytes for a {agent}-byte agent"
    );
}
