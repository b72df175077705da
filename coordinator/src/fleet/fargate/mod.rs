//! The Fargate runner: one ECS task per job attempt, in the job's own image,
//! with the agent injected by an init container — no SSH, no inbound port.
//!
//! Each pass of [`run`] looks at the runner's queued attempts and its tasks:
//! - an attempt with no task gets one: a task definition for its image and
//!   size (registered once, then reused), a one-task enrollment credential,
//!   and RunTask on `FARGATE_SPOT` (or `FARGATE`, also after repeated
//!   interruptions of the job when so configured); a job the runner cannot
//!   run (privileged, services, a size Fargate does not take, no image) fails
//!   at once with a line saying why, before any RunTask;
//! - a task whose agent has not enrolled within `boot_timeout`, or whose job
//!   is no longer held, is stopped; a task that stopped before its agent
//!   enrolled counts against its job, which fails after three;
//! - tasks started by this runner that it does not know of (a coordinator
//!   restart) are adopted when their job is held, stopped otherwise.
//!
//! A Spot interruption reaches the agent as SIGTERM: it hands the job back,
//! and the next pass starts a new task for the next attempt.
//!
//! Not responsible for the sizing policy of instance fleets (`policy`):
//! capacity here is exactly one task per waiting attempt.

pub mod size;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, CapacityProviderStrategyItem, Compatibility,
    ContainerCondition, ContainerDefinition, ContainerDependency, ContainerOverride, KeyValuePair,
    MountPoint, NetworkConfiguration, NetworkMode, Tag, TaskField, TaskOverride, Volume,
};
use servitor_proto::job::JobPayload;
use servitor_runtime::secret::Secret;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::size::{FargatePrices, TaskSize};
use super::{FleetError, FleetSummary, FleetView, InstanceStatus};
use crate::config::{CapacityProvider, FargateConfig};
use crate::core::{Core, QueuedAttempt};
use crate::link::task::{task_id, TaskBinding, TaskCredentials};

/// The task's container that runs the job (and the agent, as its
/// entrypoint).
pub const JOB_CONTAINER: &str = "job";
/// The init container that copies the agent into the shared volume.
pub const AGENT_CONTAINER: &str = "servitor-agent";
/// The volume the agent is copied into, and where it is mounted.
const AGENT_VOLUME: &str = "servitor";
const AGENT_DIR: &str = "/servitor";
/// Where the agent executable is in the agent image.
const AGENT_IN_IMAGE: &str = "/servitor-agent";
/// Fargate's longest stop timeout: the time a job has after SIGTERM (a Spot
/// interruption) to hand back.
const STOP_TIMEOUT_SECS: i32 = 120;
/// Memory reserved for each container, MiB (moto needs one on every
/// container; on Fargate the task's memory is what counts).
const AGENT_MEMORY_RESERVATION: i32 = 32;
const JOB_MEMORY_RESERVATION: i32 = 128;
/// A job whose task fails to start this often fails.
const MAX_START_FAILURES: u32 = 3;
/// How often a pass runs with nothing happening.
const TICK: Duration = Duration::from_secs(2);
/// Lets a burst of changes settle into one pass; short, as each waiting
/// attempt gets a RunTask of its own anyway, and the job waits for it.
const SETTLE: Duration = Duration::from_millis(20);
/// DescribeTasks takes at most this many tasks per call.
const DESCRIBE_BATCH: usize = 100;
/// CI variables a job may set to choose its task size.
pub const CPU_VARIABLE: &str = "SERVITOR_FARGATE_CPU";
pub const MEMORY_VARIABLE: &str = "SERVITOR_FARGATE_MEMORY";
/// Tag keys on tasks.
const TAG_JOB: &str = "servitor:job";
const TAG_ATTEMPT: &str = "servitor:attempt";
const TAG_RUNNER: &str = "servitor:runner";

/// The one monthly cap the Fargate runner shares with every runner's
/// fleet: the ledger its tasks' cost accrues into, and what each runner's
/// capacity costs an hour now.
#[derive(Clone, Debug)]
pub struct FargateBudget {
    pub monthly_usd: f64,
    pub ledger: Arc<Mutex<super::budget::SpendLedger>>,
    pub running_hourly: Arc<Mutex<HashMap<String, f64>>>,
}

/// What a Fargate runner needs besides its configuration.
#[derive(Clone, Debug)]
pub struct FargateSettings {
    pub runner: String,
    pub config: FargateConfig,
    /// Most tasks at once (`fleet.max_instances`).
    pub max_tasks: u32,
    /// How long a task may take for its agent to enroll.
    pub boot_timeout: Duration,
    /// The coordinator CA's pin, for the agents in tasks.
    pub ca_pin: String,
    /// The monthly cap; `None` without `[budget]`.
    pub budget: Option<FargateBudget>,
}

/// One task this runner started (or adopted).
#[derive(Debug)]
struct TaskRecord {
    job_id: i64,
    attempt: u32,
    started: Instant,
    /// Until it is spent or the task stops; `None` for an adopted task.
    credential: Option<Secret>,
    size: TaskSize,
    spot: bool,
    enrolled: bool,
    /// StopTask was sent.
    stopping: bool,
    /// Its task definition's ARN, when known.
    definition: Option<String>,
}

/// A task definition this runner registered.
#[derive(Debug, Clone)]
struct Definition {
    arn: String,
    last_used: Instant,
}

#[derive(Debug, Default)]
struct FargateState {
    /// By task ARN.
    tasks: HashMap<String, TaskRecord>,
    /// Registered task definitions by image and size.
    definitions: HashMap<(String, TaskSize), Definition>,
    /// Definitions this runner registered before a restart, by ARN, with
    /// when they were found: deregistered once unused for long enough.
    inherited: HashMap<String, Instant>,
    /// Spot interruptions per job.
    interruptions: HashMap<i64, u32>,
    /// Tasks per job that stopped or could not start before their agent
    /// enrolled.
    start_failures: HashMap<i64, u32>,
    /// The first pass looked for tasks from before a restart.
    adopted: bool,
    /// Jobs and attempts found in the lease book at start: their tasks are
    /// adopted even if the first pass comes before the jobs are held again.
    restored: HashMap<i64, u32>,
    /// Up to when the tasks' cost was accrued.
    accrued_until: Option<std::time::SystemTime>,
    /// The log said that the budget holds launches back.
    budget_said: bool,
}

/// A runner's Fargate capacity.
#[derive(Debug)]
pub struct FargateFleet {
    ecs: aws_sdk_ecs::Client,
    settings: FargateSettings,
    prices: FargatePrices,
    credentials: Arc<TaskCredentials>,
    state: Mutex<FargateState>,
}

/// What one job asks of Fargate, once it is known it can run there.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Launch {
    image: String,
    size: TaskSize,
}

/// Maps an ECS SDK error to a [`FleetError`] naming the call and cluster.
fn ecs_error<E, R>(operation: &'static str, cluster: &str, e: SdkError<E, R>) -> FleetError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (retryable, code, mut detail) = super::aws::sdk_error_parts(&e, |code| {
        code.contains("Throttl") || code == "ServerException" || code == "ServiceUnavailable"
    });
    if code.is_some_and(|c| c.contains("AccessDenied")) {
        detail
            .push_str("; the coordinator's role needs deploy/iam/coordinator-fargate-policy.json");
    }
    FleetError::Ecs {
        operation,
        cluster: cluster.to_owned(),
        detail,
        retryable,
    }
}

impl FargateFleet {
    /// A client for the runner's cluster; nothing is called yet.
    pub async fn connect(settings: FargateSettings, credentials: Arc<TaskCredentials>) -> Self {
        let sdk = super::aws::sdk_config_for(
            settings.config.region.as_deref(),
            settings.config.endpoint_url.as_deref(),
        )
        .await;
        Self {
            ecs: aws_sdk_ecs::Client::new(&sdk),
            prices: settings.config.prices.resolve(),
            settings,
            credentials,
            state: Mutex::new(FargateState::default()),
        }
    }

    /// Tells the runner which of its jobs (and attempts) the lease book
    /// held at start, before its first pass: their running tasks are kept.
    pub fn restoring(&self, jobs: impl IntoIterator<Item = (i64, u32)>) {
        self.state().restored.extend(jobs);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FargateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cluster(&self) -> &str {
        &self.settings.config.cluster
    }

    /// `startedBy` of this runner's tasks (ECS keeps at most 36 characters).
    fn started_by(&self) -> String {
        let mut tag = format!("servitor-{}", self.settings.runner);
        tag.truncate(36);
        tag
    }

    /// What the job needs from Fargate, or why it cannot run here.
    fn launch_for(&self, job: &JobPayload) -> Result<Launch, String> {
        let config = &self.settings.config;
        let dind = job
            .services
            .iter()
            .map(|s| s.name.as_str())
            .chain(job.image.iter().map(|i| i.name.as_str()))
            .any(|name| name.contains("dind"))
            || job.variable("DOCKER_HOST").is_some();
        if dind {
            return Err("it uses Docker-in-Docker, which needs privileged containers, and Fargate runs none; run it on a runner whose aws-asg or local fleet has privileged = true".to_owned());
        }
        if !job.services.is_empty() {
            let names: Vec<&str> = job.services.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "it asks for services ({}), which a Fargate runner does not start; run it on a runner with an aws-asg or local fleet",
                names.join(", ")
            ));
        }
        let image = job
            .image
            .as_ref()
            .map(|i| i.name.clone())
            .filter(|name| !name.is_empty())
            .or_else(|| config.default_image.clone())
            .ok_or_else(|| {
                "it names no image and the runner has no default_image; add image: to the job, or default_image to [fleet.fargate]".to_owned()
            })?;
        let number = |name: &str, default: u32| -> Result<u32, String> {
            match job.variable(name) {
                None => Ok(default),
                Some(text) => text
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name} = {text:?} is not a whole number")),
            }
        };
        let size = TaskSize {
            cpu: number(CPU_VARIABLE, config.cpu)?,
            memory_mib: number(MEMORY_VARIABLE, config.memory)?,
        }
        .validate()?;
        Ok(Launch { image, size })
    }

    /// The task definition for `launch`, registered on first use.
    async fn definition(&self, launch: &Launch) -> Result<String, FleetError> {
        let key = (launch.image.clone(), launch.size);
        if let Some(known) = self.state().definitions.get_mut(&key) {
            known.last_used = Instant::now();
            return Ok(known.arn.clone());
        }
        let config = &self.settings.config;
        let mount = |read_only: bool| {
            MountPoint::builder()
                .source_volume(AGENT_VOLUME)
                .container_path(AGENT_DIR)
                .read_only(read_only)
                .build()
        };
        let env = |name: &str, value: &str| KeyValuePair::builder().name(name).value(value).build();
        let agent = ContainerDefinition::builder()
            .name(AGENT_CONTAINER)
            .image(&config.agent_image)
            .essential(false)
            .entry_point(AGENT_IN_IMAGE)
            .command("--install")
            .command(AGENT_DIR)
            .memory_reservation(AGENT_MEMORY_RESERVATION)
            .mount_points(mount(false))
            .build();
        let depends = ContainerDependency::builder()
            .container_name(AGENT_CONTAINER)
            .condition(ContainerCondition::Success)
            .build()
            .map_err(|e| FleetError::Spawn(e.to_string()))?;
        let job = ContainerDefinition::builder()
            .name(JOB_CONTAINER)
            .image(&launch.image)
            .essential(true)
            .entry_point(format!("{AGENT_DIR}/servitor-agent"))
            .command("--task")
            .memory_reservation(JOB_MEMORY_RESERVATION)
            .stop_timeout(STOP_TIMEOUT_SECS)
            .mount_points(mount(true))
            .depends_on(depends)
            .environment(env("SERVITOR_COORDINATOR", &config.coordinator))
            .environment(env("SERVITOR_CA_SHA256", &self.settings.ca_pin))
            .environment(env("SERVITOR_RUNNER", &self.settings.runner))
            .build();
        let family = definition_family(&self.settings.runner, launch);
        let out = self
            .ecs
            .register_task_definition()
            .family(&family)
            .requires_compatibilities(Compatibility::Fargate)
            .network_mode(NetworkMode::Awsvpc)
            .cpu(launch.size.cpu.to_string())
            .memory(launch.size.memory_mib.to_string())
            .set_execution_role_arn(config.execution_role_arn.clone())
            .set_task_role_arn(config.task_role_arn.clone())
            .volumes(Volume::builder().name(AGENT_VOLUME).build())
            .container_definitions(agent)
            .container_definitions(job)
            .tags(tag(TAG_RUNNER, &self.settings.runner))
            .send()
            .await
            .map_err(|e| ecs_error("RegisterTaskDefinition", self.cluster(), e))?;
        let arn = out
            .task_definition()
            .and_then(|d| d.task_definition_arn())
            .ok_or_else(|| FleetError::Ecs {
                operation: "RegisterTaskDefinition",
                cluster: self.cluster().to_owned(),
                detail: "the answer names no task definition".to_owned(),
                retryable: true,
            })?
            .to_owned();
        tracing::info!(%family, image = %launch.image, size = %launch.size, "registered a task definition");
        self.state().definitions.insert(
            key,
            Definition {
                arn: arn.clone(),
                last_used: Instant::now(),
            },
        );
        Ok(arn)
    }

    /// Starts the task for one waiting attempt.
    async fn start_task(
        &self,
        queued: &QueuedAttempt,
        launch: &Launch,
    ) -> Result<String, FleetError> {
        let definition = self.definition(launch).await?;
        let config = &self.settings.config;
        let interruptions = self
            .state()
            .interruptions
            .get(&queued.job_id)
            .copied()
            .unwrap_or(0);
        let provider = if config.on_demand_after_interruptions > 0
            && interruptions >= config.on_demand_after_interruptions
        {
            CapacityProvider::Fargate
        } else {
            config.capacity_provider
        };
        let spot = provider == CapacityProvider::FargateSpot;
        let credential = self.credentials.mint(
            TaskBinding {
                runner: self.settings.runner.clone(),
                job_id: queued.job_id,
                attempt: queued.attempt,
            },
            self.settings.boot_timeout,
        );
        let network = AwsVpcConfiguration::builder()
            .set_subnets(Some(config.subnets.clone()))
            .set_security_groups(
                (!config.security_groups.is_empty()).then(|| config.security_groups.clone()),
            )
            .assign_public_ip(if config.assign_public_ip {
                AssignPublicIp::Enabled
            } else {
                AssignPublicIp::Disabled
            })
            .build()
            .map_err(|e| FleetError::Spawn(e.to_string()))?;
        let strategy = CapacityProviderStrategyItem::builder()
            .capacity_provider(provider.as_str())
            .weight(1)
            .build()
            .map_err(|e| FleetError::Spawn(e.to_string()))?;
        let overrides = TaskOverride::builder()
            .container_overrides(
                ContainerOverride::builder()
                    .name(JOB_CONTAINER)
                    .environment(
                        KeyValuePair::builder()
                            .name(servitor_proto::link::TASK_CREDENTIAL_VARIABLE)
                            .value(credential.expose())
                            .build(),
                    )
                    .environment(
                        KeyValuePair::builder()
                            .name("SERVITOR_MARKET")
                            .value(if spot { "spot" } else { "on-demand" })
                            .build(),
                    )
                    .build(),
            )
            .build();
        let sent = self
            .ecs
            .run_task()
            .cluster(self.cluster())
            .task_definition(&definition)
            .count(1)
            .started_by(self.started_by())
            .capacity_provider_strategy(strategy)
            .network_configuration(
                NetworkConfiguration::builder()
                    .awsvpc_configuration(network)
                    .build(),
            )
            .overrides(overrides)
            .tags(tag(TAG_RUNNER, &self.settings.runner))
            .tags(tag(TAG_JOB, &queued.job_id.to_string()))
            .tags(tag(TAG_ATTEMPT, &queued.attempt.to_string()))
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e) => {
                self.credentials.forget(&credential);
                return Err(ecs_error("RunTask", self.cluster(), e));
            }
        };
        let Some(arn) = out.tasks().first().and_then(|t| t.task_arn()) else {
            self.credentials.forget(&credential);
            let why: Vec<String> = out
                .failures()
                .iter()
                .map(|f| {
                    format!(
                        "{} {}",
                        f.reason().unwrap_or("unknown"),
                        f.detail().unwrap_or_default()
                    )
                })
                .collect();
            return Err(FleetError::Ecs {
                operation: "RunTask",
                cluster: self.cluster().to_owned(),
                detail: format!("no task started: {}", why.join("; ")),
                retryable: true,
            });
        };
        self.credentials.bind(&credential, arn);
        tracing::info!(job_id = queued.job_id, attempt = queued.attempt, task = %arn, provider = provider.as_str(), image = %launch.image, size = %launch.size, "started a task");
        self.state().tasks.insert(
            arn.to_owned(),
            TaskRecord {
                job_id: queued.job_id,
                attempt: queued.attempt,
                started: Instant::now(),
                credential: Some(credential),
                size: launch.size,
                spot,
                enrolled: false,
                stopping: false,
                definition: Some(definition),
            },
        );
        Ok(arn.to_owned())
    }

    async fn stop_task(&self, arn: &str, reason: &str) {
        match self
            .ecs
            .stop_task()
            .cluster(self.cluster())
            .task(arn)
            .reason(reason)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(task = %arn, %reason, "stopped a task");
                if let Some(record) = self.state().tasks.get_mut(arn) {
                    record.stopping = true;
                }
            }
            Err(e) => {
                tracing::warn!(task = %arn, error = %ecs_error("StopTask", self.cluster(), e), "failed to stop a task; trying again next pass");
            }
        }
    }

    /// Tasks started by this runner that are running, by ARN, with their
    /// job and attempt tags.
    async fn list_running(&self) -> Result<Vec<(String, Option<(i64, u32)>)>, FleetError> {
        let mut arns = Vec::new();
        let mut next = None;
        loop {
            let out = self
                .ecs
                .list_tasks()
                .cluster(self.cluster())
                .started_by(self.started_by())
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| ecs_error("ListTasks", self.cluster(), e))?;
            arns.extend(out.task_arns().iter().cloned());
            next = out.next_token().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        let mut found = Vec::new();
        for described in self.describe(&arns).await? {
            let job = tag_value(&described.tags, TAG_JOB).and_then(|v| v.parse().ok());
            let attempt = tag_value(&described.tags, TAG_ATTEMPT).and_then(|v| v.parse().ok());
            found.push((described.arn, job.zip(attempt)));
        }
        Ok(found)
    }

    async fn describe(&self, arns: &[String]) -> Result<Vec<Described>, FleetError> {
        let mut out = Vec::new();
        for batch in arns.chunks(DESCRIBE_BATCH) {
            let answer = self
                .ecs
                .describe_tasks()
                .cluster(self.cluster())
                .set_tasks(Some(batch.to_vec()))
                .include(TaskField::Tags)
                .send()
                .await
                .map_err(|e| ecs_error("DescribeTasks", self.cluster(), e))?;
            for task in answer.tasks() {
                let Some(arn) = task.task_arn() else { continue };
                out.push(Described {
                    arn: arn.to_owned(),
                    last_status: task.last_status().unwrap_or_default().to_owned(),
                    stopped_reason: task.stopped_reason().unwrap_or_default().to_owned(),
                    spot_interrupted: task
                        .stop_code()
                        .is_some_and(|c| c.as_str() == "SpotInterruption")
                        || task
                            .stopped_reason()
                            .is_some_and(|r| r.contains("Spot Task was interrupted")),
                    tags: task
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                        .collect(),
                });
            }
            // Tasks ECS no longer knows of are gone.
            for missing in answer.failures() {
                if let Some(arn) = missing.arn() {
                    out.push(Described {
                        arn: arn.to_owned(),
                        last_status: "STOPPED".to_owned(),
                        stopped_reason: missing.reason().unwrap_or("MISSING").to_owned(),
                        spot_interrupted: false,
                        tags: Vec::new(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// One pass: adopt, observe, stop what must stop, start what must
    /// start, show.
    async fn pass(&self, core: &Core, view: &FleetView) -> Result<(), FleetError> {
        let runner = self.settings.runner.clone();
        let held: HashMap<i64, u32> = core
            .jobs()
            .into_iter()
            .filter(|j| j.runner == runner)
            .map(|j| (j.job_id, j.attempt))
            .collect();
        if !self.state().adopted {
            self.adopt(&held).await?;
        }
        // What ECS says of the tasks we know.
        let known: Vec<String> = self.state().tasks.keys().cloned().collect();
        let described = self.describe(&known).await?;
        let enrolled: HashSet<(i64, u32)> = core
            .agents()
            .iter()
            .filter_map(|a| TaskBinding::from_agent_id(&a.agent_id))
            .filter(|b| b.runner == runner)
            .map(|b| (b.job_id, b.attempt))
            .collect();
        let mut refusals = Vec::new();
        let mut to_stop = Vec::new();
        {
            let mut state = self.state();
            for task in &described {
                if task.last_status != "STOPPED" {
                    continue;
                }
                let Some(record) = state.tasks.remove(&task.arn) else {
                    continue;
                };
                if let Some(credential) = &record.credential {
                    self.credentials.forget(credential);
                }
                if task.spot_interrupted {
                    *state.interruptions.entry(record.job_id).or_default() += 1;
                }
                tracing::info!(task = %task.arn, job_id = record.job_id, reason = %task.stopped_reason, "task stopped");
                let current = held.get(&record.job_id) == Some(&record.attempt);
                if !record.enrolled && current && !record.stopping {
                    let failures = state.start_failures.entry(record.job_id).or_default();
                    *failures += 1;
                    if *failures >= MAX_START_FAILURES {
                        refusals.push((
                            record.job_id,
                            format!(
                                "its task stopped before its agent started, {failures} times; the last: {}",
                                task.stopped_reason
                            ),
                        ));
                    }
                }
            }
            let FargateState {
                tasks,
                start_failures,
                ..
            } = &mut *state;
            for (arn, record) in tasks.iter_mut() {
                if enrolled.contains(&(record.job_id, record.attempt)) {
                    record.enrolled = true;
                    record.credential = None;
                }
                if record.stopping {
                    continue;
                }
                let current = held.get(&record.job_id) == Some(&record.attempt);
                let waited = record.started.elapsed();
                if !record.enrolled && waited >= self.settings.boot_timeout {
                    // A task that never enrolls counts against its job.
                    let failures = start_failures.entry(record.job_id).or_default();
                    *failures += 1;
                    if *failures >= MAX_START_FAILURES {
                        refusals.push((
                            record.job_id,
                            format!("its tasks' agents did not enroll, {failures} times"),
                        ));
                    }
                    to_stop.push((
                        arn.clone(),
                        format!(
                            "its agent did not enroll within {}",
                            humantime::format_duration(self.settings.boot_timeout)
                        ),
                    ));
                } else if !current && !record.enrolled {
                    to_stop.push((arn.clone(), "its job no longer waits for it".to_owned()));
                }
            }
        }
        for (arn, reason) in to_stop {
            self.stop_task(&arn, &format!("servitor: {reason}")).await;
        }
        for (job_id, reason) in refusals {
            core.refuse_job(job_id, &reason);
        }
        self.accrue();
        self.launch_waiting(core).await;
        self.accrue();
        self.retire_definitions().await;
        self.show(core, view);
        Ok(())
    }

    /// Starts a task for each waiting attempt that has none, up to the cap.
    async fn launch_waiting(&self, core: &Core) {
        let waiting = core.queued(&self.settings.runner);
        for queued in waiting {
            let (has_task, running) = {
                let state = self.state();
                (
                    state.tasks.values().any(|t| {
                        t.job_id == queued.job_id && t.attempt == queued.attempt && !t.stopping
                    }),
                    state.tasks.values().filter(|t| !t.stopping).count(),
                )
            };
            if has_task {
                continue;
            }
            if running >= usize::try_from(self.settings.max_tasks).unwrap_or(usize::MAX) {
                core.notify_waiting(
                    &self.settings.runner,
                    &format!(
                        "Waiting for a Fargate task: the runner runs at most {} at once.",
                        self.settings.max_tasks
                    ),
                );
                return;
            }
            let launch = match self.launch_for(&queued.payload) {
                Ok(launch) => launch,
                Err(reason) => {
                    core.refuse_job(queued.job_id, &reason);
                    continue;
                }
            };
            if let Some(text) = self.over_budget(&queued, &launch) {
                core.notify_waiting(&self.settings.runner, &text);
                return;
            }
            if let Err(e) = self.start_task(&queued, &launch).await {
                let failures = {
                    let mut state = self.state();
                    let failures = state.start_failures.entry(queued.job_id).or_default();
                    *failures += 1;
                    *failures
                };
                tracing::error!(job_id = queued.job_id, error = %e, failures, "could not start a task");
                if failures >= MAX_START_FAILURES || !e.is_retryable() {
                    core.refuse_job(
                        queued.job_id,
                        &format!("its task could not be started: {e}"),
                    );
                }
            }
        }
    }

    /// Adds what the tasks cost since the last pass to the month's spend,
    /// and tells the other runners' fleets what they cost an hour now.
    fn accrue(&self) {
        let Some(budget) = &self.settings.budget else {
            return;
        };
        let now = std::time::SystemTime::now();
        let hourly = self.running_hourly();
        let since = {
            let mut state = self.state();
            let since = state.accrued_until.replace(now);
            since.map(|at| now.duration_since(at).unwrap_or_default())
        };
        if let Some(elapsed) = since {
            budget
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .accrue(now, hourly, elapsed);
        }
        budget
            .running_hourly
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(self.settings.runner.clone(), hourly);
    }

    /// Why the task for `queued` would break the monthly cap, if it would:
    /// the month's spend plus every runner's capacity and this task, run
    /// to the month's end.
    fn over_budget(&self, queued: &QueuedAttempt, launch: &Launch) -> Option<String> {
        let budget = self.settings.budget.as_ref()?;
        let now = std::time::SystemTime::now();
        let spent = budget
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spent(now);
        let running: f64 = budget
            .running_hourly
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .sum();
        let spot = self.settings.config.capacity_provider == CapacityProvider::FargateSpot;
        let input = super::budget::BudgetInput {
            monthly_usd: budget.monthly_usd,
            spent_usd: spent,
            running_hourly_usd: running,
            launch_hourly_usd: self.prices.hourly(launch.size, spot),
            hours_left: super::budget::hours_left_in_month(now),
        };
        let mut state = self.state();
        if super::budget::affordable_launches(&input, 1) == 1 {
            if state.budget_said {
                tracing::info!(
                    spent_usd = spent,
                    "Fargate tasks are within the budget again"
                );
                state.budget_said = false;
            }
            return None;
        }
        if !state.budget_said {
            tracing::warn!(
                job_id = queued.job_id,
                spent_usd = spent,
                monthly_usd = budget.monthly_usd,
                "not starting Fargate tasks: the monthly budget would be exceeded"
            );
            state.budget_said = true;
        }
        Some(format!(
            "Waiting for budget: a {} task would break the monthly cap of ${:.2} (${spent:.2} spent this month); the job runs when capacity frees up or the cap is raised.",
            launch.size, budget.monthly_usd
        ))
    }

    /// Takes over tasks this runner started before a restart: those whose
    /// job is held at that attempt go on; the others are stopped.
    async fn adopt(&self, held: &HashMap<i64, u32>) -> Result<(), FleetError> {
        let found = self.list_running().await?;
        let mut held = held.clone();
        for (job, attempt) in std::mem::take(&mut self.state().restored) {
            held.entry(job).or_insert(attempt);
        }
        for (arn, tagged) in found {
            if self.state().tasks.contains_key(&arn) {
                continue;
            }
            match tagged {
                Some((job_id, attempt)) if held.get(&job_id) == Some(&attempt) => {
                    tracing::info!(task = %arn, job_id, attempt, "adopted a task still running from before the restart");
                    self.state().tasks.insert(
                        arn,
                        TaskRecord {
                            job_id,
                            attempt,
                            started: Instant::now(),
                            credential: None,
                            size: TaskSize {
                                cpu: self.settings.config.cpu,
                                memory_mib: self.settings.config.memory,
                            },
                            spot: self.settings.config.capacity_provider
                                == CapacityProvider::FargateSpot,
                            enrolled: true,
                            stopping: false,
                            definition: None,
                        },
                    );
                }
                _ => {
                    self.stop_task(&arn, "servitor: no held job needs this task")
                        .await;
                }
            }
        }
        // Definitions registered before the restart: kept for now, and
        // deregistered once unused as long as any other.
        let prefix = definition_prefix(&self.settings.runner);
        let mut next = None;
        loop {
            let out = self
                .ecs
                .list_task_definitions()
                .family_prefix(&prefix)
                .status(aws_sdk_ecs::types::TaskDefinitionStatus::Active)
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| ecs_error("ListTaskDefinitions", self.cluster(), e))?;
            {
                let mut state = self.state();
                for arn in out.task_definition_arns() {
                    state
                        .inherited
                        .entry(arn.clone())
                        .or_insert_with(Instant::now);
                }
            }
            next = out.next_token().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        self.state().adopted = true;
        Ok(())
    }

    /// Deregisters task definitions no task has used for
    /// `keep_task_definitions`: no new task can start from them, and the
    /// ones running go on.
    async fn retire_definitions(&self) {
        let keep = self.settings.config.keep_task_definitions;
        let unused: Vec<String> = {
            let mut state = self.state();
            let in_use: HashSet<String> = state
                .tasks
                .values()
                .filter_map(|t| t.definition.clone())
                .collect();
            for definition in state.definitions.values_mut() {
                if in_use.contains(&definition.arn) {
                    definition.last_used = Instant::now();
                }
            }
            state
                .definitions
                .values()
                .filter(|d| d.last_used.elapsed() >= keep)
                .map(|d| d.arn.clone())
                .chain(
                    state
                        .inherited
                        .iter()
                        .filter(|(arn, found)| found.elapsed() >= keep && !in_use.contains(*arn))
                        .map(|(arn, _)| arn.clone()),
                )
                .collect()
        };
        for arn in unused {
            match self
                .ecs
                .deregister_task_definition()
                .task_definition(&arn)
                .send()
                .await
            {
                Ok(_) => {
                    tracing::info!(definition = %arn, unused_for = %humantime::format_duration(keep), "deregistered an unused task definition");
                    let mut state = self.state();
                    state.definitions.retain(|_, d| d.arn != arn);
                    state.inherited.remove(&arn);
                }
                Err(e) => {
                    tracing::warn!(definition = %arn, error = %ecs_error("DeregisterTaskDefinition", self.cluster(), e), "failed to deregister an unused task definition; trying again next pass");
                }
            }
        }
    }

    /// Publishes the tasks as the fleet's instances, for status and
    /// metrics.
    fn show(&self, core: &Core, view: &FleetView) {
        let state = self.state();
        let mut counts = [0u32; 4];
        let instances: Vec<InstanceStatus> = state
            .tasks
            .iter()
            .map(|(arn, t)| {
                // The slots of `set_instances`: booting, idle, busy, draining.
                let (status, slot) = match (t.stopping, t.enrolled) {
                    (true, _) => ("draining", 3),
                    (false, false) => ("booting", 0),
                    (false, true) => ("busy", 2),
                };
                counts[slot] += 1;
                InstanceStatus {
                    id: task_id(arn).to_owned(),
                    state: status,
                    age: t.started.elapsed(),
                    instance_type: t.size.to_string(),
                    market: if t.spot { "spot" } else { "on-demand" }.to_owned(),
                    protected: None,
                }
            })
            .collect();
        let total = u32::try_from(instances.len()).unwrap_or(u32::MAX);
        core.metrics().set_instances(&self.settings.runner, counts);
        core.metrics()
            .set_capacity(&self.settings.runner, total, total);
        let (spent_usd, budget_usd) = match &self.settings.budget {
            Some(budget) => (
                budget
                    .ledger
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .spent(std::time::SystemTime::now()),
                Some(budget.monthly_usd),
            ),
            None => (0.0, None),
        };
        view.set(FleetSummary {
            provider: "fargate",
            instances,
            desired: None,
            budget_held: u32::from(state.budget_said),
            spent_usd,
            budget_usd,
            passes: 0,
        });
    }

    /// What the runner's tasks cost an hour right now.
    pub fn running_hourly(&self) -> f64 {
        self.state()
            .tasks
            .values()
            .filter(|t| !t.stopping)
            .map(|t| self.prices.hourly(t.size, t.spot))
            .sum()
    }
}

/// A task as DescribeTasks gives it.
#[derive(Debug)]
struct Described {
    arn: String,
    last_status: String,
    stopped_reason: String,
    spot_interrupted: bool,
    tags: Vec<(String, String)>,
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tag_value<'a>(tags: &'a [(String, String)], key: &str) -> Option<&'a str> {
    tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The start of every task definition family of a runner.
fn definition_prefix(runner: &str) -> String {
    let clean: String = runner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("servitor-{clean}-")
}

/// The task definition family of a runner's image and size: letters,
/// digits, `-` and `_` only, at most 255 characters.
fn definition_family(runner: &str, launch: &Launch) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!(
        "{}|{}|{}",
        launch.image, launch.size.cpu, launch.size.memory_mib
    ));
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{}{short}", definition_prefix(runner))
}

/// Runs the runner's Fargate passes until `stop`: on every change of the
/// held jobs or agents, and every few seconds.
pub async fn run(
    fleet: Arc<FargateFleet>,
    core: Arc<Core>,
    view: Arc<FleetView>,
    stop: CancellationToken,
) {
    let mut changes = core.changes();
    let mut failures: u32 = 0;
    loop {
        if stop.is_cancelled() {
            return;
        }
        match fleet.pass(&core, &view).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::error!(error = %e, failures, "cannot read the runner's Fargate tasks; trying again");
                }
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Ok(()) = changes.changed() => tokio::time::sleep(SETTLE).await,
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servitor_proto::job::{Image, JobVariable, Service};

    fn settings() -> FargateSettings {
        FargateSettings {
            runner: "light".into(),
            config: FargateConfig {
                cluster: "ci".into(),
                subnets: vec!["subnet-1".into()],
                security_groups: Vec::new(),
                assign_public_ip: false,
                capacity_provider: CapacityProvider::FargateSpot,
                on_demand_after_interruptions: 0,
                cpu: 1024,
                memory: 2048,
                agent_image: "servitor-agent:1".into(),
                default_image: None,
                coordinator: "10.0.0.5:7443".into(),
                execution_role_arn: None,
                task_role_arn: None,
                region: Some("us-east-1".into()),
                endpoint_url: Some("http://127.0.0.1:9".into()),
                keep_task_definitions: Duration::from_secs(3600),
                prices: crate::config::FargatePricesConfig::default(),
            },
            max_tasks: 4,
            boot_timeout: Duration::from_secs(120),
            ca_pin: "sha256:00".into(),
            budget: None,
        }
    }

    fn job(image: Option<&str>) -> JobPayload {
        JobPayload {
            id: 1,
            image: image.map(|name| Image {
                name: name.into(),
                ..Image::default()
            }),
            ..JobPayload::default()
        }
    }

    fn variable(key: &str, value: &str) -> JobVariable {
        JobVariable {
            key: key.into(),
            value: value.into(),
            ..JobVariable::default()
        }
    }

    #[tokio::test]
    async fn what_cannot_run_on_fargate_says_why_before_any_task() {
        let fleet = FargateFleet::connect(settings(), Arc::default()).await;
        let ok = fleet.launch_for(&job(Some("alpine:3.20"))).unwrap();
        assert_eq!(ok.image, "alpine:3.20");
        assert_eq!(
            ok.size,
            TaskSize {
                cpu: 1024,
                memory_mib: 2048
            }
        );

        let e = fleet.launch_for(&job(None)).unwrap_err();
        assert!(
            e.contains("names no image") && e.contains("default_image"),
            "{e}"
        );

        let mut dind = job(Some("docker:27"));
        dind.services.push(Service {
            name: "docker:27-dind".into(),
            ..Service::default()
        });
        let e = fleet.launch_for(&dind).unwrap_err();
        assert!(
            e.contains("Docker-in-Docker") && e.contains("privileged"),
            "{e}"
        );

        let mut services = job(Some("ruby:3"));
        services.services.push(Service {
            name: "postgres:16".into(),
            ..Service::default()
        });
        let e = fleet.launch_for(&services).unwrap_err();
        assert!(e.contains("services (postgres:16)"), "{e}");

        let mut sized = job(Some("alpine:3.20"));
        sized.variables.push(variable(CPU_VARIABLE, "2048"));
        sized.variables.push(variable(MEMORY_VARIABLE, "8192"));
        assert_eq!(
            fleet.launch_for(&sized).unwrap().size,
            TaskSize {
                cpu: 2048,
                memory_mib: 8192
            }
        );
        let mut bad = job(Some("alpine:3.20"));
        bad.variables.push(variable(MEMORY_VARIABLE, "100000"));
        let e = fleet.launch_for(&bad).unwrap_err();
        assert!(
            e.contains("memory = 100000 MiB does not go with cpu = 1024"),
            "{e}"
        );
        let mut words = job(Some("alpine:3.20"));
        words.variables.push(variable(CPU_VARIABLE, "lots"));
        let e = fleet.launch_for(&words).unwrap_err();
        assert!(
            e.contains("SERVITOR_FARGATE_CPU = \"lots\" is not a whole number"),
            "{e}"
        );
    }

    #[test]
    fn definition_families_are_valid_and_differ_by_image_and_size() {
        let a = Launch {
            image: "registry.example.com/team/ruby:3.3".into(),
            size: TaskSize {
                cpu: 1024,
                memory_mib: 2048,
            },
        };
        let b = Launch {
            size: TaskSize {
                cpu: 2048,
                memory_mib: 4096,
            },
            ..a.clone()
        };
        let fa = definition_family("light.jobs", &a);
        assert!(fa.starts_with("servitor-light-jobs-"), "{fa}");
        assert!(fa
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(fa, definition_family("light.jobs", &b));
        assert_eq!(fa, definition_family("light.jobs", &a));
    }
}
