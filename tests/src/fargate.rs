//! The Fargate side of the end-to-end harness: [`FargateStandIn`] plays
//! AWS Fargate for the ECS task records moto's server keeps. moto creates a
//! task's record on RunTask and runs nothing; the stand-in watches the
//! cluster and, for every task moto reports RUNNING, runs that task's
//! containers in the real Docker engine as its definition says (volumes,
//! init containers first, `dependsOn`, environment with the RunTask
//! overrides, a task metadata endpoint v4), and stops them as Fargate does
//! when the task is stopped through the API (SIGTERM, then SIGKILL after the
//! container's `stopTimeout`). When an essential container exits by itself,
//! it stops the task in moto, as ECS does.
//!
//! Containers run with the host's network (not `awsvpc`), so they reach the
//! coordinator's link and the GitLab stand-in on 127.0.0.1. No registry is
//! reachable: every image a task names must be local.
//!
//! Also here: the agent built as a static executable ([`static_agent`]) and
//! the image holding only it ([`ensure_agent_image`]), since a job image may
//! have no C library the agent could use.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_ecs::types::{
    ContainerCondition, ContainerDefinition, DesiredStatus, Task, TaskDefinition,
};
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptions,
    StartContainerOptions,
};
use bollard::Docker;
pub use servitor_testkit::image::{ensure_scratch_image, ScratchFile};
use servitor_testkit::task_metadata::{TaskMetadataStandIn, TaskSpec};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::aws::{Moto, REGION, ZONE};

/// The cluster the stand-in creates and watches.
pub const CLUSTER: &str = "servitor-ci";

/// The label on every container the stand-in starts; its value is the
/// task's ARN.
pub const TASK_LABEL: &str = "servitor-fargate-standin";

/// The label naming the stand-in that made a container or volume, so one
/// stand-in's clean-up never touches another's (tests run side by side).
const OWNER_LABEL: &str = "servitor-fargate-standin.owner";

/// The label naming the container of the task definition a container runs.
const CONTAINER_LABEL: &str = "servitor-fargate-standin.container";

/// ECS's reason when a task's essential container exited by itself.
pub const ESSENTIAL_EXITED: &str = "Essential container in task exited";

/// ECS's reason for a Fargate Spot interruption (stop code
/// `SpotInterruption`).
pub const SPOT_INTERRUPTED: &str = "Your Spot Task was interrupted.";

/// The reason the stand-in gives when a container other containers wait on
/// (an init container) did not exit 0.
pub const INIT_FAILED: &str = "CannotStartContainerError: the init container failed";

/// The image [`ensure_agent_image`] builds: the static agent alone.
pub const AGENT_IMAGE: &str = "servitor-test-agent:latest";

/// Where the agent's static executable sits inside [`AGENT_IMAGE`].
pub const AGENT_IMAGE_PATH: &str = "/servitor-agent";

/// The variable `tests/run.sh` sets to the static agent's path.
const STATIC_AGENT_VARIABLE: &str = "SERVITOR_STATIC_AGENT";

/// How often the stand-in looks at moto and at the containers it runs.
const POLL: Duration = Duration::from_millis(200);

/// How often a running task's log is read again (for [`FargateStandIn::logs`]
/// while it runs).
const LOG_REFRESH: Duration = Duration::from_secs(1);

/// How long reading a container's log may take.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Fargate's `stopTimeout` when the definition sets none, and its ceiling.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long past its SIGKILL a container may take to be reported gone
/// before the stand-in stops waiting for it.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The task size the metadata reports when neither the task nor its
/// definition says (Fargate's smallest).
const DEFAULT_CPU: u32 = 256;
const DEFAULT_MEMORY_MIB: u32 = 512;

/// DescribeTasks takes at most this many tasks a call.
const DESCRIBE_BATCH: usize = 100;

/// One task as the stand-in has seen and run it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskView {
    pub task_arn: String,
    /// The task definition's family.
    pub family: String,
    /// The image of the task's (first) essential container.
    pub image: String,
    /// Whether the task's essential containers were started (init
    /// containers done); false for a task held back or that failed to start.
    pub started: bool,
    /// The essential container's exit code, once it exited.
    pub exit_code: Option<i64>,
    /// The essential container's output (stdout and stderr interleaved):
    /// refreshed every second while it runs, complete once it exited. For a
    /// task whose init container failed, that container's output.
    pub logs: String,
    /// Why the task stopped, as moto records it.
    pub stopped_reason: Option<String>,
    /// The stand-in is done with the task: it stopped in moto and its
    /// containers are gone (or never ran).
    pub finished: bool,
}

/// A container the stand-in created for a task.
#[derive(Clone, Debug)]
struct Started {
    id: String,
    essential: bool,
    stop_timeout: Duration,
    /// When SIGTERM was sent: SIGKILL follows `stop_timeout` later.
    term_sent: Option<Instant>,
}

/// Everything the stand-in keeps about one task.
#[derive(Debug)]
struct TaskRecord {
    view: TaskView,
    /// Left RUNNING with nothing started (see [`FargateStandIn::hold_back`]).
    held: bool,
    /// moto was seen reporting the task's desired status STOPPED.
    stop_seen: bool,
    /// Cancelled when moto reports the task's desired status STOPPED.
    stop: CancellationToken,
    /// A Spot interruption is under way: its StopTask gives the reason.
    interrupted: bool,
    /// Containers created, in start order.
    containers: Vec<Started>,
    /// Docker volumes made for the task's volumes.
    volumes: Vec<String>,
    /// The task's metadata endpoint, while it runs.
    metadata: Option<TaskMetadataStandIn>,
}

/// What the background loop, the task drivers and the handle share.
#[derive(Debug)]
struct Shared {
    ecs: aws_sdk_ecs::Client,
    docker: Docker,
    /// This stand-in's value of [`OWNER_LABEL`].
    owner: String,
    /// Each subnet's Availability Zone, for the tasks' metadata.
    zones: HashMap<String, String>,
    hold_back: AtomicBool,
    /// Every task seen, in the order first seen.
    tasks: Mutex<Vec<TaskRecord>>,
}

/// Plays Fargate for the tasks of cluster [`CLUSTER`] in moto's server; see
/// the module documentation. Stopping it (or dropping it) removes every
/// container and volume it made.
#[derive(Debug)]
pub struct FargateStandIn {
    shared: Arc<Shared>,
    subnets: Vec<String>,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FargateStandIn {
    /// Prepares moto (task states frozen, so a task stays RUNNING until it
    /// is stopped; cluster [`CLUSTER`] with the `FARGATE` and `FARGATE_SPOT`
    /// capacity providers), finds the default VPC's subnets, and starts
    /// watching the cluster.
    ///
    /// # Errors
    /// moto refuses a call, has no default VPC, or the Docker engine does
    /// not answer.
    pub async fn start(moto: &Moto) -> anyhow::Result<Self> {
        // Without this every DescribeTasks moves a task one state on
        // (RUNNING → DEACTIVATING → … → STOPPED): tasks would seem to stop
        // by themselves.
        let url = format!("{}/moto-api/state-manager/set-transition", moto.url());
        let response = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .body(
                serde_json::json!({
                    "model_name": "ecs::task",
                    "transition": {"progression": "manual", "times": 1_000_000},
                })
                .to_string(),
            )
            .send()
            .await
            .with_context(|| format!("freezing moto's ECS task states at {url}"))?;
        if !response.status().is_success() {
            bail!(
                "moto refused to freeze its ECS task states ({} from {url}); is this moto's server 5.x?",
                response.status()
            );
        }
        let config = moto.sdk_config().await;
        let ecs = aws_sdk_ecs::Client::new(&config);
        let ec2 = aws_sdk_ec2::Client::new(&config);
        ecs.create_cluster()
            .cluster_name(CLUSTER)
            .capacity_providers("FARGATE")
            .capacity_providers("FARGATE_SPOT")
            .send()
            .await
            .context("CreateCluster")?;
        let (subnets, zones) = default_subnets(&ec2).await?;
        let docker = Docker::connect_with_defaults()
            .context("the Fargate stand-in needs the Docker engine")?;
        docker
            .ping()
            .await
            .context("the Fargate stand-in needs the Docker engine, which does not answer")?;
        static STAND_INS: AtomicU64 = AtomicU64::new(0);
        let owner = format!(
            "{}-{}",
            std::process::id(),
            STAND_INS.fetch_add(1, Ordering::Relaxed)
        );
        let shared = Arc::new(Shared {
            ecs,
            docker,
            owner,
            zones,
            hold_back: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(watch_cluster(shared.clone(), stop.clone()));
        Ok(Self {
            shared,
            subnets,
            runtime: tokio::runtime::Handle::current(),
            stop,
            watcher: Some(watcher),
        })
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        CLUSTER
    }

    /// The default VPC's subnets: RunTask's `awsvpcConfiguration` must name
    /// subnets moto knows.
    pub fn subnets(&self) -> &[String] {
        &self.subnets
    }

    /// An ECS client of the same moto server.
    pub fn ecs_client(&self) -> &aws_sdk_ecs::Client {
        &self.shared.ecs
    }

    /// Every task seen so far, in the order first seen.
    pub fn tasks(&self) -> Vec<TaskView> {
        lock(&self.shared.tasks)
            .iter()
            .map(|r| r.view.clone())
            .collect()
    }

    /// One task, if seen.
    pub fn task(&self, task_arn: &str) -> Option<TaskView> {
        lock(&self.shared.tasks)
            .iter()
            .find(|r| r.view.task_arn == task_arn)
            .map(|r| r.view.clone())
    }

    /// The essential container's output so far (empty for a task not seen).
    pub fn logs(&self, task_arn: &str) -> String {
        self.task(task_arn).map(|t| t.logs).unwrap_or_default()
    }

    /// Waits until `check` holds for the task, looking every 50 ms.
    ///
    /// # Errors
    /// Timeout, naming `what`, with the task as last seen.
    pub async fn wait_task(
        &self,
        task_arn: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&TaskView) -> bool,
    ) -> anyhow::Result<TaskView> {
        let deadline = Instant::now() + timeout;
        loop {
            let task = self.task(task_arn);
            if let Some(task) = task.as_ref().filter(|t| check(t)) {
                return Ok(task.clone());
            }
            if Instant::now() >= deadline {
                bail!("{what} did not happen within {timeout:?}; the task is {task:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A Fargate Spot interruption of the task: SIGTERM to its essential
    /// containers, then StopTask with [`SPOT_INTERRUPTED`]; SIGKILL follows
    /// after the containers' `stopTimeout`. Done in the background: watch
    /// [`tasks`](Self::tasks) for the effect.
    pub fn interrupt(&self, task_arn: &str) {
        let shared = self.shared.clone();
        let task_arn = task_arn.to_owned();
        self.runtime
            .spawn(async move { interrupt(&shared, &task_arn).await });
    }

    /// While `yes`, tasks seen for the first time stay RUNNING in moto with
    /// nothing started, for good: tasks whose agent never comes. Tasks seen
    /// before are not affected.
    pub fn hold_back(&self, yes: bool) {
        self.shared.hold_back.store(yes, Ordering::SeqCst);
    }

    /// Stops watching, then removes every container and volume this
    /// stand-in made and stops the tasks' metadata endpoints.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
            let _ = watcher.await;
        }
        drop_metadata(&self.shared);
        remove_owned(&self.shared.docker, &self.shared.owner).await;
    }
}

impl Drop for FargateStandIn {
    fn drop(&mut self) {
        let Some(watcher) = self.watcher.take() else {
            return; // stopped already
        };
        self.stop.cancel();
        watcher.abort();
        // On a multi-threaded runtime the watcher may be mid-call on another
        // thread: let it reach its next await, where the abort lands, so it
        // creates nothing after the clean-up looked.
        if matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread)
        ) {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !watcher.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        drop_metadata(&self.shared);
        // Drop cannot await: clean up on a thread of its own, with a client
        // of its own (a client is bound to the runtime that made it).
        let owner = self.shared.owner.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!(error = %e, "no runtime to remove the Fargate stand-in's containers; remove them by label {OWNER_LABEL}={owner}");
                    return;
                }
            };
            runtime.block_on(async {
                match Docker::connect_with_defaults() {
                    Ok(docker) => remove_owned(&docker, &owner).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach Docker to remove the Fargate stand-in's containers; remove them by label {OWNER_LABEL}={owner}")
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The default VPC's subnet ids, and each subnet's zone.
async fn default_subnets(
    ec2: &aws_sdk_ec2::Client,
) -> anyhow::Result<(Vec<String>, HashMap<String, String>)> {
    let filter = |name: &str, value: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(name)
            .values(value)
            .build()
    };
    let vpcs = ec2
        .describe_vpcs()
        .filters(filter("is-default", "true"))
        .send()
        .await
        .context("DescribeVpcs")?;
    let vpc = vpcs
        .vpcs()
        .first()
        .and_then(|v| v.vpc_id())
        .context("moto has no default VPC; the Fargate tasks need its subnets (a VPC without DNS hostnames makes moto fail RunTask)")?;
    let out = ec2
        .describe_subnets()
        .filters(filter("vpc-id", vpc))
        .send()
        .await
        .context("DescribeSubnets")?;
    let mut subnets = Vec::new();
    let mut zones = HashMap::new();
    for subnet in out.subnets() {
        if let Some(id) = subnet.subnet_id() {
            subnets.push(id.to_owned());
            if let Some(zone) = subnet.availability_zone() {
                zones.insert(id.to_owned(), zone.to_owned());
            }
        }
    }
    if subnets.is_empty() {
        bail!("moto's default VPC {vpc} has no subnets");
    }
    subnets.sort();
    Ok((subnets, zones))
}

/// The background loop: every [`POLL`], start what is new and stop what
/// moto stopped, until `stop`.
async fn watch_cluster(shared: Arc<Shared>, stop: CancellationToken) {
    // Task drivers live in this set: aborted with the loop.
    let mut drivers = tokio::task::JoinSet::new();
    let mut definitions: HashMap<String, TaskDefinition> = HashMap::new();
    loop {
        if let Err(e) = watch_once(&shared, &mut drivers, &mut definitions).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "the Fargate stand-in could not read moto's tasks"
            );
        }
        while drivers.try_join_next().is_some() {}
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// One look at the cluster.
async fn watch_once(
    shared: &Arc<Shared>,
    drivers: &mut tokio::task::JoinSet<()>,
    definitions: &mut HashMap<String, TaskDefinition>,
) -> anyhow::Result<()> {
    let running = list_tasks(&shared.ecs, DesiredStatus::Running).await?;
    let (new, gone): (Vec<String>, Vec<String>) = {
        let tasks = lock(&shared.tasks);
        let known: HashSet<&str> = tasks.iter().map(|r| r.view.task_arn.as_str()).collect();
        let live: HashSet<&str> = running.iter().map(String::as_str).collect();
        (
            running
                .iter()
                .filter(|arn| !known.contains(arn.as_str()))
                .cloned()
                .collect(),
            tasks
                .iter()
                .filter(|r| !r.stop_seen && !live.contains(r.view.task_arn.as_str()))
                .map(|r| r.view.task_arn.clone())
                .collect(),
        )
    };
    for task in describe_tasks(&shared.ecs, &new).await? {
        let Some(arn) = task.task_arn().map(str::to_owned) else {
            continue;
        };
        let definition_arn = task
            .task_definition_arn()
            .with_context(|| format!("task {arn} has no task definition"))?
            .to_owned();
        let definition = match definitions.get(&definition_arn) {
            Some(definition) => definition.clone(),
            None => {
                let definition = shared
                    .ecs
                    .describe_task_definition()
                    .task_definition(&definition_arn)
                    .send()
                    .await
                    .with_context(|| format!("DescribeTaskDefinition {definition_arn}"))?
                    .task_definition
                    .with_context(|| {
                        format!("moto describes no task definition {definition_arn}")
                    })?;
                definitions.insert(definition_arn, definition.clone());
                definition
            }
        };
        let held = shared.hold_back.load(Ordering::SeqCst);
        let stop = CancellationToken::new();
        let image = definition
            .container_definitions()
            .iter()
            .find(|c| c.essential().unwrap_or(true))
            .and_then(ContainerDefinition::image)
            .unwrap_or_default()
            .to_owned();
        lock(&shared.tasks).push(TaskRecord {
            view: TaskView {
                task_arn: arn.clone(),
                family: definition.family().unwrap_or_default().to_owned(),
                image,
                ..TaskView::default()
            },
            held,
            stop_seen: false,
            stop: stop.clone(),
            interrupted: false,
            containers: Vec::new(),
            volumes: Vec::new(),
            metadata: None,
        });
        if !held {
            drivers.spawn(drive(shared.clone(), task, definition, stop));
        }
    }
    if gone.is_empty() {
        return Ok(());
    }
    let described = describe_tasks(&shared.ecs, &gone).await?;
    for arn in gone {
        let task = described
            .iter()
            .find(|t| t.task_arn() == Some(arn.as_str()));
        // A task moto no longer describes is as good as stopped.
        let stopped = task.is_none_or(|t| t.desired_status() == Some("STOPPED"));
        if !stopped {
            continue;
        }
        let mut tasks = lock(&shared.tasks);
        let Some(record) = tasks.iter_mut().find(|r| r.view.task_arn == arn) else {
            continue;
        };
        record.stop_seen = true;
        if record.view.stopped_reason.is_none() {
            record.view.stopped_reason = task.and_then(Task::stopped_reason).map(str::to_owned);
        }
        record.stop.cancel();
        if record.held {
            record.view.finished = true;
        }
    }
    Ok(())
}

/// Every task of the cluster with the desired status.
async fn list_tasks(
    ecs: &aws_sdk_ecs::Client,
    status: DesiredStatus,
) -> anyhow::Result<Vec<String>> {
    let mut arns = Vec::new();
    let mut next = None;
    loop {
        let out = ecs
            .list_tasks()
            .cluster(CLUSTER)
            .desired_status(status.clone())
            .set_next_token(next)
            .send()
            .await
            .context("ListTasks")?;
        arns.extend(out.task_arns().iter().cloned());
        next = out.next_token().map(str::to_owned);
        if next.is_none() {
            return Ok(arns);
        }
    }
}

/// The tasks named, as moto describes them.
async fn describe_tasks(ecs: &aws_sdk_ecs::Client, arns: &[String]) -> anyhow::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for batch in arns.chunks(DESCRIBE_BATCH) {
        let out = ecs
            .describe_tasks()
            .cluster(CLUSTER)
            .set_tasks(Some(batch.to_vec()))
            .send()
            .await
            .context("DescribeTasks")?;
        tasks.extend(out.tasks().iter().cloned());
    }
    Ok(tasks)
}

/// Why a task's launch ended early.
enum Halt {
    /// moto stopped the task.
    Stopped,
    /// The task cannot run: stop it with `reason`; `detail` goes to its log.
    Failed { reason: String, detail: String },
}

impl Halt {
    /// A launch step the engine refused: ECS's `CannotStartContainerError`.
    fn docker(what: String) -> impl FnOnce(BollardError) -> Self {
        move |e| Self::Failed {
            reason: format!("CannotStartContainerError: {what}: {e}"),
            detail: format!("the Fargate stand-in could not {what}: {e}"),
        }
    }
}

/// Runs one task from start to end: launch, watch, stop, clean up.
async fn drive(
    shared: Arc<Shared>,
    task: Task,
    definition: TaskDefinition,
    stop: CancellationToken,
) {
    let arn = task.task_arn().unwrap_or_default().to_owned();
    match launch(&shared, &arn, &task, &definition, &stop).await {
        Ok(()) => watch_task(&shared, &arn, &stop).await,
        Err(Halt::Stopped) => {}
        Err(Halt::Failed { reason, detail }) => {
            with_record(&shared, &arn, |r| r.view.logs = detail);
            stop_task(&shared, &arn, &reason).await;
        }
    }
    stop_containers(&shared, &arn).await;
    finish(&shared, &arn).await;
}

/// Runs `f` on the task's record, if there is one.
fn with_record<T>(shared: &Shared, arn: &str, f: impl FnOnce(&mut TaskRecord) -> T) -> Option<T> {
    lock(&shared.tasks)
        .iter_mut()
        .find(|r| r.view.task_arn == arn)
        .map(f)
}

/// Starts the task's metadata endpoint, makes its volumes and starts its
/// containers in order, running those others wait on to completion.
async fn launch(
    shared: &Shared,
    arn: &str,
    task: &Task,
    definition: &TaskDefinition,
    stop: &CancellationToken,
) -> Result<(), Halt> {
    let task_id = arn.rsplit('/').next().unwrap_or(arn).to_owned();
    let metadata = TaskMetadataStandIn::start_at(
        task_spec(shared, arn, task, definition),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .map_err(|e| Halt::Failed {
        reason: format!("CannotStartContainerError: no task metadata endpoint: {e}"),
        detail: format!("the Fargate stand-in could not serve the task's metadata: {e}"),
    })?;
    let metadata_uri = metadata.uri();
    with_record(shared, arn, |r| r.metadata = Some(metadata));

    let labels = |container: &str| {
        HashMap::from([
            (TASK_LABEL.to_owned(), arn.to_owned()),
            (OWNER_LABEL.to_owned(), shared.owner.clone()),
            (CONTAINER_LABEL.to_owned(), container.to_owned()),
        ])
    };
    let mut volumes = HashMap::new();
    for volume in definition.volumes() {
        let Some(name) = volume.name() else { continue };
        let docker_name = format!("fargate-{task_id}-{name}");
        shared
            .docker
            .create_volume(VolumeCreateRequest {
                name: Some(docker_name.clone()),
                labels: Some(labels("")),
                ..Default::default()
            })
            .await
            .map_err(Halt::docker(format!("create volume {name}")))?;
        with_record(shared, arn, |r| r.volumes.push(docker_name.clone()));
        volumes.insert(name.to_owned(), docker_name);
    }

    let overrides = task
        .overrides()
        .map(|o| o.container_overrides())
        .unwrap_or_default();
    let steps = plan(definition.container_definitions()).map_err(|detail| Halt::Failed {
        reason: format!("ClientException: {detail}"),
        detail,
    })?;
    for step in steps {
        if stop.is_cancelled() {
            return Err(Halt::Stopped);
        }
        let container = step.container;
        let name = container.name().unwrap_or_default();
        let image = container.image().unwrap_or_default();
        match shared.docker.inspect_image(image).await {
            Ok(_) => {}
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                return Err(Halt::Failed {
                    reason: format!(
                        "CannotPullContainerError: {image} is not in the local Docker engine"
                    ),
                    detail: format!("container {name}'s image {image} is not a local image: the Fargate stand-in pulls nothing (no registry is reachable), so build it before the task runs"),
                })
            }
            Err(e) => return Err(Halt::docker(format!("inspect image {image}"))(e)),
        }
        let container_override = overrides.iter().find(|o| o.name() == Some(name));
        let mut environment: Vec<(String, String)> = vec![
            ("AWS_REGION".to_owned(), REGION.to_owned()),
            ("AWS_DEFAULT_REGION".to_owned(), REGION.to_owned()),
            ("AWS_EXECUTION_ENV".to_owned(), "AWS_ECS_FARGATE".to_owned()),
            (
                servitor_agent::task_metadata::METADATA_URI_VARIABLE.to_owned(),
                metadata_uri.clone(),
            ),
        ];
        let given = container.environment().iter().chain(
            container_override
                .map(|o| o.environment())
                .unwrap_or_default(),
        );
        for pair in given {
            let (Some(key), value) = (pair.name(), pair.value().unwrap_or_default()) else {
                continue;
            };
            environment.retain(|(k, _)| k != key);
            environment.push((key.to_owned(), value.to_owned()));
        }
        let command = match container_override.map(|o| o.command()) {
            Some(command) if !command.is_empty() => command.to_vec(),
            _ => container.command().to_vec(),
        };
        let mut mounts = Vec::new();
        for point in container.mount_points() {
            let source = point.source_volume().unwrap_or_default();
            let Some(volume) = volumes.get(source) else {
                return Err(Halt::Failed {
                    reason: format!(
                        "ClientException: container {name} mounts unknown volume {source}"
                    ),
                    detail: format!("container {name} mounts volume {source:?}, which the task definition does not declare"),
                });
            };
            mounts.push(Mount {
                target: point.container_path().map(str::to_owned),
                source: Some(volume.clone()),
                typ: Some(MountType::VOLUME),
                read_only: point.read_only(),
                ..Default::default()
            });
        }
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            entrypoint: (!container.entry_point().is_empty())
                .then(|| container.entry_point().to_vec()),
            cmd: (!command.is_empty()).then_some(command),
            env: Some(
                environment
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(labels(name)),
            host_config: Some(HostConfig {
                network_mode: Some("host".to_owned()),
                mounts: Some(mounts),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new()
            .name(&format!("fargate-{task_id}-{name}"))
            .build();
        let id = shared
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(Halt::docker(format!("create container {name}")))?
            .id;
        let stop_timeout = container
            .stop_timeout()
            .and_then(|s| u64::try_from(s).ok())
            .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs)
            .min(MAX_STOP_TIMEOUT);
        with_record(shared, arn, |r| {
            r.containers.push(Started {
                id: id.clone(),
                essential: container.essential().unwrap_or(true),
                stop_timeout,
                term_sent: None,
            });
        });
        shared
            .docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .map_err(Halt::docker(format!("start container {name}")))?;
        if step.to_completion {
            let code = loop {
                if let Some(code) = exit_code(&shared.docker, &id)
                    .await
                    .map_err(Halt::docker(format!("inspect container {name}")))?
                {
                    break code;
                }
                tokio::select! {
                    () = stop.cancelled() => return Err(Halt::Stopped),
                    () = tokio::time::sleep(POLL) => {}
                }
            };
            if step.must_succeed && code != 0 {
                let logs = container_logs(&id).await;
                return Err(Halt::Failed {
                    reason: INIT_FAILED.to_owned(),
                    detail: format!("container {name} exited with {code}:\n{logs}"),
                });
            }
        }
    }
    with_record(shared, arn, |r| r.view.started = true);
    Ok(())
}

/// What the task's metadata endpoint says of it.
fn task_spec(shared: &Shared, arn: &str, task: &Task, definition: &TaskDefinition) -> TaskSpec {
    let number = |value: Option<&str>| value.and_then(|v| v.trim().parse::<u32>().ok());
    let overrides = task.overrides();
    let cpu = number(overrides.and_then(|o| o.cpu()))
        .or_else(|| number(task.cpu()))
        .or_else(|| number(definition.cpu()))
        .unwrap_or(DEFAULT_CPU);
    let memory_mib = number(overrides.and_then(|o| o.memory()))
        .or_else(|| number(task.memory()))
        .or_else(|| number(definition.memory()))
        .unwrap_or(DEFAULT_MEMORY_MIB);
    // moto leaves availabilityZone out; the task's network interface names
    // its subnet, whose zone moto knows.
    let zone = task
        .availability_zone()
        .map(str::to_owned)
        .or_else(|| {
            task.attachments()
                .iter()
                .flat_map(|a| a.details())
                .find(|d| d.name() == Some("subnetId"))
                .and_then(|d| d.value())
                .and_then(|subnet| shared.zones.get(subnet).cloned())
        })
        .unwrap_or_else(|| ZONE.to_owned());
    TaskSpec {
        cluster: task.cluster_arn().unwrap_or(CLUSTER).to_owned(),
        task_arn: arn.to_owned(),
        family: definition.family().unwrap_or_default().to_owned(),
        revision: u32::try_from(definition.revision()).unwrap_or(0),
        zone,
        cpu,
        memory_mib,
    }
}

/// One container to start, in order.
#[derive(Debug)]
struct Step<'a> {
    container: &'a ContainerDefinition,
    /// Run it to its end before going on: it is not essential, or another
    /// container waits for it with SUCCESS or COMPLETE.
    to_completion: bool,
    /// Its end must be exit code 0 (not when only COMPLETE waits for it).
    must_succeed: bool,
}

/// The order to start a task's containers in: each after those it depends
/// on, and those to run to completion (init containers) as early as their
/// dependencies allow, otherwise in definition order.
///
/// # Errors
/// The dependencies form a cycle.
fn plan(containers: &[ContainerDefinition]) -> Result<Vec<Step<'_>>, String> {
    let index: HashMap<&str, usize> = containers
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.name().map(|n| (n, i)))
        .collect();
    let mut waits_on: Vec<Vec<usize>> = vec![Vec::new(); containers.len()];
    let mut conditions: Vec<Vec<&ContainerCondition>> = vec![Vec::new(); containers.len()];
    for (i, container) in containers.iter().enumerate() {
        for dependency in container.depends_on() {
            if let Some(&target) = index.get(dependency.container_name()) {
                waits_on[i].push(target);
                conditions[target].push(dependency.condition());
            }
        }
    }
    let awaited_to_end = |i: usize| {
        conditions[i].iter().any(|c| {
            matches!(
                c,
                ContainerCondition::Success | ContainerCondition::Complete
            )
        })
    };
    let to_completion = |i: usize| !containers[i].essential().unwrap_or(true) || awaited_to_end(i);
    let must_succeed = |i: usize| {
        conditions[i]
            .iter()
            .any(|c| matches!(c, ContainerCondition::Success))
            || !conditions[i]
                .iter()
                .any(|c| matches!(c, ContainerCondition::Complete))
    };
    let mut placed = vec![false; containers.len()];
    let mut steps = Vec::with_capacity(containers.len());
    while steps.len() < containers.len() {
        let ready: Vec<usize> = (0..containers.len())
            .filter(|&i| !placed[i] && waits_on[i].iter().all(|&d| placed[d]))
            .collect();
        let next = ready
            .iter()
            .copied()
            .find(|&i| to_completion(i))
            .or_else(|| ready.first().copied());
        let Some(i) = next else {
            let left: Vec<&str> = (0..containers.len())
                .filter(|&i| !placed[i])
                .filter_map(|i| containers[i].name())
                .collect();
            return Err(format!("the dependsOn of containers {left:?} form a cycle"));
        };
        placed[i] = true;
        steps.push(Step {
            container: &containers[i],
            to_completion: to_completion(i),
            must_succeed: must_succeed(i),
        });
    }
    Ok(steps)
}

/// Watches a started task until moto stops it or an essential container
/// exits; in the latter case stops the task in moto, as ECS does.
async fn watch_task(shared: &Shared, arn: &str, stop: &CancellationToken) {
    let essential: Vec<String> = with_record(shared, arn, |r| {
        r.containers
            .iter()
            .filter(|c| c.essential)
            .map(|c| c.id.clone())
            .collect()
    })
    .unwrap_or_default();
    let mut next_logs = Instant::now() + LOG_REFRESH;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        for id in &essential {
            match exit_code(&shared.docker, id).await {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => {
                    let interrupted = with_record(shared, arn, |r| r.interrupted).unwrap_or(false);
                    if !interrupted && !stop.is_cancelled() && still_running(shared, arn).await {
                        stop_task(shared, arn, ESSENTIAL_EXITED).await;
                    }
                    return;
                }
            }
        }
        if Instant::now() >= next_logs {
            if let Some(id) = essential.first() {
                let logs = container_logs(id).await;
                with_record(shared, arn, |r| r.view.logs = logs);
            }
            next_logs = Instant::now() + LOG_REFRESH;
        }
    }
}

/// Whether moto still wants the task running (nobody stopped it meanwhile).
async fn still_running(shared: &Shared, arn: &str) -> bool {
    match describe_tasks(&shared.ecs, &[arn.to_owned()]).await {
        Ok(tasks) => tasks.iter().any(|t| t.desired_status() == Some("RUNNING")),
        Err(e) => {
            tracing::warn!(
                task = arn,
                error = format!("{e:#}"),
                "the Fargate stand-in could not describe a task"
            );
            true
        }
    }
}

/// StopTask, recording the reason moto keeps.
async fn stop_task(shared: &Shared, arn: &str, reason: &str) {
    match shared
        .ecs
        .stop_task()
        .cluster(CLUSTER)
        .task(arn)
        .reason(reason)
        .send()
        .await
    {
        Ok(out) => {
            let kept = out
                .task()
                .and_then(Task::stopped_reason)
                .unwrap_or(reason)
                .to_owned();
            with_record(shared, arn, |r| r.view.stopped_reason = Some(kept));
        }
        Err(e) => {
            tracing::warn!(task = arn, reason, error = %aws_sdk_ecs::error::DisplayErrorContext(&e), "the Fargate stand-in could not stop a task");
        }
    }
}

/// A Spot interruption; see [`FargateStandIn::interrupt`].
async fn interrupt(shared: &Shared, arn: &str) {
    let now = Instant::now();
    let essential: Vec<String> = with_record(shared, arn, |r| {
        r.interrupted = true;
        r.containers
            .iter_mut()
            .filter(|c| c.essential && c.term_sent.is_none())
            .map(|c| {
                c.term_sent = Some(now);
                c.id.clone()
            })
            .collect()
    })
    .unwrap_or_default();
    for id in &essential {
        signal(&shared.docker, id, "TERM").await;
    }
    stop_task(shared, arn, SPOT_INTERRUPTED).await;
}

/// Stops the task's running containers as ECS does: SIGTERM (unless sent
/// already), then SIGKILL to any still running after its `stopTimeout`.
async fn stop_containers(shared: &Shared, arn: &str) {
    let containers = with_record(shared, arn, |r| r.containers.clone()).unwrap_or_default();
    let mut running = Vec::new();
    for mut container in containers {
        if !matches!(exit_code(&shared.docker, &container.id).await, Ok(None)) {
            continue;
        }
        let term_sent = match container.term_sent {
            Some(at) => at,
            None => {
                signal(&shared.docker, &container.id, "TERM").await;
                let now = Instant::now();
                with_record(shared, arn, |r| {
                    if let Some(c) = r.containers.iter_mut().find(|c| c.id == container.id) {
                        c.term_sent = Some(now);
                    }
                });
                now
            }
        };
        container.term_sent = Some(term_sent);
        running.push((container, false));
    }
    while !running.is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut still = Vec::new();
        for (container, killed) in running {
            if !matches!(exit_code(&shared.docker, &container.id).await, Ok(None)) {
                continue;
            }
            let kill_at = container.term_sent.unwrap_or_else(Instant::now) + container.stop_timeout;
            if Instant::now() >= kill_at + KILL_GRACE {
                tracing::warn!(
                    container = container.id,
                    "a task container outlived its SIGKILL"
                );
                continue;
            }
            let killed = killed || {
                if Instant::now() >= kill_at {
                    signal(&shared.docker, &container.id, "KILL").await;
                    true
                } else {
                    false
                }
            };
            still.push((container, killed));
        }
        running = still;
    }
}

/// Records the essential container's end and output, then removes the
/// task's containers, volumes and metadata endpoint.
async fn finish(shared: &Shared, arn: &str) {
    let (containers, volumes) = with_record(shared, arn, |r| {
        (r.containers.clone(), std::mem::take(&mut r.volumes))
    })
    .unwrap_or_default();
    let started = with_record(shared, arn, |r| r.view.started).unwrap_or(false);
    if started {
        if let Some(essential) = containers.iter().find(|c| c.essential) {
            let code = exit_code(&shared.docker, &essential.id)
                .await
                .ok()
                .flatten();
            let logs = container_logs(&essential.id).await;
            with_record(shared, arn, |r| {
                r.view.exit_code = code;
                r.view.logs = logs;
            });
        }
    }
    for container in &containers {
        remove_container(&shared.docker, &container.id).await;
    }
    for volume in &volumes {
        remove_volume(&shared.docker, volume).await;
    }
    // moto stopped the task at the StopTask before this; make sure the
    // view has its reason even if the watcher has not looked since.
    let reason = with_record(shared, arn, |r| r.view.stopped_reason.clone()).flatten();
    let reason = match reason {
        Some(reason) => Some(reason),
        None => describe_tasks(&shared.ecs, &[arn.to_owned()])
            .await
            .ok()
            .and_then(|tasks| {
                tasks
                    .first()
                    .and_then(Task::stopped_reason)
                    .map(str::to_owned)
            }),
    };
    with_record(shared, arn, |r| {
        r.metadata = None;
        r.view.stopped_reason = reason;
        r.view.finished = true;
    });
}

/// The container's exit code once it exited, `None` while it runs.
async fn exit_code(docker: &Docker, id: &str) -> Result<Option<i64>, BollardError> {
    let inspect = docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await?;
    let state = inspect.state.unwrap_or_default();
    if state.running.unwrap_or(false) || state.restarting.unwrap_or(false) {
        return Ok(None);
    }
    // Created but not started yet counts as running: it is about to.
    if matches!(
        state.status,
        Some(bollard::models::ContainerStateStatusEnum::CREATED)
    ) {
        return Ok(None);
    }
    Ok(Some(state.exit_code.unwrap_or(-1)))
}

/// Sends `signal` (`TERM`, `KILL`) to a container; one already stopped or
/// gone is fine.
async fn signal(docker: &Docker, id: &str, signal: &str) {
    let options = KillContainerOptionsBuilder::new().signal(signal).build();
    match docker.kill_container(id, Some(options)).await {
        Ok(())
        | Err(BollardError::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => {}
        Err(e) => {
            tracing::warn!(container = id, signal, error = %e, "the Fargate stand-in could not signal a task container")
        }
    }
}

/// A container's output, stdout and stderr interleaved as written. Read
/// with the `docker` command: this crate has no stream combinators to read
/// the engine's log stream with.
async fn container_logs(id: &str) -> String {
    let id = id.to_owned();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut file = tempfile::tempfile()?;
        let stderr = file.try_clone()?;
        let stdout = file.try_clone()?;
        let status = std::process::Command::new("docker")
            .args(["logs", &id])
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .status()?;
        let mut text = String::new();
        file.rewind()?;
        file.read_to_string(&mut text)?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "docker logs {id}: {}",
                text.trim()
            )));
        }
        Ok(text)
    });
    match tokio::time::timeout(LOG_TIMEOUT, read).await {
        Ok(Ok(Ok(text))) => text,
        Ok(Ok(Err(e))) => format!("(no log: {e})"),
        Ok(Err(e)) => format!("(no log: {e})"),
        Err(_) => format!("(no log: docker logs took over {LOG_TIMEOUT:?})"),
    }
}

/// Force-removes a container; one gone already is fine.
async fn remove_container(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(())
        | Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => {
            tracing::warn!(container = id, error = %e, "the Fargate stand-in could not remove a task container; remove it by label {TASK_LABEL}")
        }
    }
}

/// Removes a volume; one gone already is fine.
async fn remove_volume(docker: &Docker, name: &str) {
    match docker
        .remove_volume(name, None::<RemoveVolumeOptions>)
        .await
    {
        Ok(())
        | Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => {
            tracing::warn!(volume = name, error = %e, "the Fargate stand-in could not remove a task volume; remove it by label {OWNER_LABEL}")
        }
    }
}

/// Stops every task's metadata endpoint.
fn drop_metadata(shared: &Shared) {
    for record in lock(&shared.tasks).iter_mut() {
        record.metadata = None;
    }
}

/// Removes every container, then every volume, labelled with `owner`. Twice,
/// a moment apart: a task driver aborted mid-call may have created one more.
async fn remove_owned(docker: &Docker, owner: &str) {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{OWNER_LABEL}={owner}")])]);
    for pass in 0..2 {
        if pass > 0 {
            tokio::time::sleep(POLL).await;
        }
        match docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
        {
            Ok(containers) => {
                for id in containers.into_iter().filter_map(|c| c.id) {
                    remove_container(docker, &id).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the Fargate stand-in could not list its containers; remove them by label {OWNER_LABEL}={owner}")
            }
        }
        match docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
        {
            Ok(list) => {
                for volume in list.volumes.unwrap_or_default() {
                    remove_volume(docker, &volume.name).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the Fargate stand-in could not list its volumes; remove them by label {OWNER_LABEL}={owner}")
            }
        }
    }
}

/// A coordinator whose one runner is a Fargate runner, as the tests and
/// the bench run it.
#[derive(Clone, Copy, Debug)]
pub struct FargateRunner {
    /// How long a task may take for its agent to enroll.
    pub boot_timeout: Duration,
    /// A monthly cap, if any.
    pub monthly_usd: Option<f64>,
    pub keep_task_definitions: Duration,
}

impl Default for FargateRunner {
    fn default() -> Self {
        Self {
            boot_timeout: Duration::from_secs(120),
            monthly_usd: None,
            keep_task_definitions: Duration::from_secs(3600),
        }
    }
}

/// Starts moto, the Fargate stand-in on its cluster, and a coordinator
/// (under the GitLab stand-in) whose one runner is a Fargate runner there:
/// 0.5 vCPU and 1 GB tasks of the job's image (the busybox test image by
/// default) on `FARGATE_SPOT`, on-demand after one interruption, with the
/// agent image built from the static agent. The agent link has a fixed
/// port, so a restarted coordinator is where the tasks' agents dial.
///
/// # Errors
/// Any part that does not start, named.
pub async fn start_fargate_runner(
    runner: FargateRunner,
) -> anyhow::Result<(crate::Harness, FargateStandIn, Moto)> {
    use servitor_coordinator::config::{
        BudgetConfig, CapacityProvider, FargateConfig, FleetProvider,
    };
    crate::aws::aws_environment();
    crate::ensure_test_image().await?;
    let docker = Docker::connect_with_defaults().context("connecting to Docker")?;
    let agent_image = ensure_agent_image(&docker).await?;
    let moto = Moto::start().await?;
    let fargate = FargateStandIn::start(&moto).await?;
    let (url, cluster, subnets) = (
        moto.url().to_owned(),
        fargate.cluster().to_owned(),
        fargate.subnets().to_vec(),
    );
    let link = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let options = crate::HarnessOptions {
        executor: "shell",
        configure: crate::config::Tweak::new(move |c| {
            c.agents.listen = link;
            c.budget = runner.monthly_usd.map(|monthly_usd| BudgetConfig {
                monthly_usd,
                on_demand_hourly_usd: std::collections::BTreeMap::new(),
            });
            let fleet = c.fleet_mut();
            fleet.provider = FleetProvider::Fargate;
            fleet.max_instances = 4;
            fleet.boot_timeout = runner.boot_timeout;
            fleet.fargate = Some(FargateConfig {
                cluster: cluster.clone(),
                subnets: subnets.clone(),
                // moto's RunTask fails (HTTP 500, KeyError) without one;
                // it accepts any id.
                security_groups: vec!["sg-0123456789abcdef0".to_owned()],
                assign_public_ip: false,
                capacity_provider: CapacityProvider::FargateSpot,
                on_demand_after_interruptions: 1,
                cpu: 512,
                memory: 1024,
                agent_image: agent_image.clone(),
                default_image: Some(crate::TEST_IMAGE.to_owned()),
                // The tasks' containers share the host's network here.
                coordinator: "127.0.0.1".to_owned(),
                execution_role_arn: None,
                task_role_arn: None,
                region: Some(REGION.to_owned()),
                endpoint_url: Some(url.clone()),
                keep_task_definitions: runner.keep_task_definitions,
                prices: servitor_coordinator::config::FargatePricesConfig::default(),
            });
        }),
        ..crate::HarnessOptions::default()
    };
    let h = crate::Harness::start(options).await?;
    Ok((h, fargate, moto))
}

/// The agent built as a static executable, which runs in any job image
/// (one without a C library too). `tests/run.sh` builds it and sets
/// `SERVITOR_STATIC_AGENT` to it.
///
/// # Errors
/// The variable is unset, or names no file.
pub fn static_agent() -> anyhow::Result<PathBuf> {
    let Some(path) = std::env::var_os(STATIC_AGENT_VARIABLE) else {
        bail!("{STATIC_AGENT_VARIABLE} is not set: the Fargate tests need the agent built as a static executable; run them through tests/run.sh, which builds it and sets the variable");
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!(
            "{} ({STATIC_AGENT_VARIABLE}) is missing: tests/run.sh builds the static agent there; run it again",
            path.display()
        );
    }
    Ok(path)
}

/// Makes sure [`AGENT_IMAGE`] holds the current [`static_agent`]: an image
/// with nothing but that executable at [`AGENT_IMAGE_PATH`] (its
/// entrypoint), imported anew when the executable changed. Returns the
/// image's tag.
///
/// # Errors
/// The static agent is missing or not static, or Docker refuses the import.
pub async fn ensure_agent_image(docker: &Docker) -> anyhow::Result<String> {
    let path = static_agent()?;
    let agent = tokio::fs::read(&path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let is_static = servitor_testkit::image::is_static_executable(&agent)
        .map_err(|why| anyhow::anyhow!("{} is not an executable: {why}", path.display()))?;
    if !is_static {
        bail!("{} is dynamically linked and would not run in an image without a C library; build it as tests/run.sh does (RUSTFLAGS=\"-C target-feature=+crt-static\", --target x86_64-unknown-linux-gnu)", path.display());
    }
    ensure_scratch_image(
        docker,
        AGENT_IMAGE,
        &[ScratchFile {
            path: AGENT_IMAGE_PATH.trim_start_matches('/'),
            mode: 0o755,
            contents: &agent,
        }],
        &[format!(r#"ENTRYPOINT ["{AGENT_IMAGE_PATH}"]"#)],
    )
    .await?;
    Ok(AGENT_IMAGE.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use aws_sdk_ecs::types::ContainerDependency;

    fn container(
        name: &str,
        essential: bool,
        depends: &[(&str, ContainerCondition)],
    ) -> ContainerDefinition {
        let mut builder = ContainerDefinition::builder()
            .name(name)
            .essential(essential);
        for (target, condition) in depends {
            builder = builder.depends_on(
                ContainerDependency::builder()
                    .container_name(*target)
                    .condition(condition.clone())
                    .build()
                    .unwrap(),
            );
        }
        builder.build()
    }

    #[test]
    fn containers_start_after_what_they_wait_for_with_init_containers_run_to_their_end_first() {
        let containers = vec![
            container(
                "job",
                true,
                &[
                    ("init", ContainerCondition::Success),
                    ("side", ContainerCondition::Start),
                ],
            ),
            container("side", true, &[("prep", ContainerCondition::Complete)]),
            container("prep", true, &[]),
            container("init", false, &[]),
        ];
        let steps = plan(&containers).unwrap();
        let order: Vec<(&str, bool, bool)> = steps
            .iter()
            .map(|s| (s.container.name().unwrap(), s.to_completion, s.must_succeed))
            .collect();
        assert_eq!(
            order,
            [
                ("prep", true, false),
                ("init", true, true),
                ("side", false, true),
                ("job", false, true),
            ]
        );
        let cycle = vec![
            container("a", true, &[("b", ContainerCondition::Start)]),
            container("b", true, &[("a", ContainerCondition::Start)]),
        ];
        assert!(plan(&cycle).unwrap_err().contains("cycle"));
    }
}
