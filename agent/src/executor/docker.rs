//! The Docker executor: runs each step script of a job in a fresh container
//! of the job's image through the Docker Engine API (bollard), with the
//! attempt's work directory bind-mounted at the same path, so
//! `CI_PROJECT_DIR` and every other path mean the same on the host and in the
//! job. Sources are fetched on the host before the first container starts.
//!
//! It resolves the image and its pull policy, streams container output live,
//! stops a container with SIGTERM and then SIGKILL after a grace period on
//! timeout or graceful cancel, kills it at once on abort, and always removes
//! its containers. A job's services run beside it on a network of the
//! job's own (see `services`). Pulls carry the registry login `auth`
//! chooses. Not responsible for caches, artifacts, removing the work
//! directory (the caller does), or building the local job image tests use
//! (the test kit does).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use bollard::container::AttachContainerResults;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerWaitResponse, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StartContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use servitor_proto::agent::FailureKind;
use tokio::time::Instant;

use super::attempt::{Attempt, ScriptRunner, StepRun, StopSignals, STOP_GRACE};
use super::auth::{self, RegistryAuth};
use super::output::JobOutput;
use super::script::Environment;
use super::services::{self, ServiceSettings, Services};
use super::{CancelSignals, Executor, JobContext, JobResult, OutputSink};

/// Label with the GitLab job id on every container the executor starts.
pub const LABEL_JOB_ID: &str = "servitor.job_id";
/// Label with the attempt number.
pub const LABEL_ATTEMPT: &str = "servitor.attempt";
/// Label with the agent's name, so an agent finds its own leftovers on a
/// host shared with other agents.
pub const LABEL_AGENT: &str = "servitor.agent";
/// Label with the stage the container runs (`step_script`, `after_script`).
pub const LABEL_STEP: &str = "servitor.step";

/// Where Docker's socket is unless `DOCKER_HOST` says otherwise.
const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Request timeout for calls that last as long as a job (attached output,
/// waiting for exit). GitLab lets a job run for up to a month, and the job's
/// own timeout is enforced by the executor, not by this client.
const STREAM_TIMEOUT: Duration = Duration::from_secs(31 * 24 * 3600);

/// How long output may keep arriving after a container exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// The job's script runs as a child of this wrapper, PID 1 of the
/// container. PID 1 gets no default signal handling, so without the trap
/// SIGTERM would be ignored and every stop would wait out the grace period;
/// with it, the script shell gets SIGTERM and the container ends when it does.
const CONTAINER_WRAPPER: &str = r#"trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 143' TERM; sh "$1" & child=$!; wait "$child""#;

/// Why the Docker executor could not do something.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine at {host}: {source}; start dockerd, set DOCKER_HOST to its socket, and let the agent's user use it (the docker group)")]
    Connect {
        host: String,
        #[source]
        source: BollardError,
    },
    #[error("docker {what} failed: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: BollardError,
    },
    #[error(
        "docker wait for a container ended without an exit status; check the Docker engine's log"
    )]
    NoExitStatus,
    #[error("image {image:?} is not present on this host and its pull policy is \"never\"; load or build it on the host, or use pull policy \"if-not-present\" or \"always\"")]
    ImageNotPresent { image: String },
    #[error("failed to pull image {image:?}: {source}; {hint}")]
    Pull {
        image: String,
        #[source]
        source: BollardError,
        hint: String,
    },
    #[error("pull policy {0:?} is not one of \"always\", \"if-not-present\", \"never\"")]
    UnknownPullPolicy(String),
    #[error("pull_policy ([{requested}]) defined in GitLab pipeline config is not one of the allowed_pull_policies ([{allowed}]); use one of those in .gitlab-ci.yml, or add it to the agent's executor.allowed_pull_policies")]
    PullPolicyNotAllowed { requested: String, allowed: String },
}

impl DockerError {
    pub(crate) fn api(what: &'static str) -> impl FnOnce(BollardError) -> DockerError {
        move |source| DockerError::Api { what, source }
    }

    /// Whether trying again later may help (the engine was busy or down),
    /// as opposed to a problem with the job or the host's setup.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DockerError::Connect { .. } | DockerError::Api { .. })
    }
}

/// When to pull a job's image (`image:pull_policy` in `.gitlab-ci.yml`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull every time; gitlab-runner's default.
    #[default]
    Always,
    /// Use the local image; pull only when it is missing.
    IfNotPresent,
    /// Use the local image; fail when it is missing.
    Never,
}

impl FromStr for PullPolicy {
    type Err = DockerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "always" => Ok(PullPolicy::Always),
            "if-not-present" => Ok(PullPolicy::IfNotPresent),
            "never" => Ok(PullPolicy::Never),
            other => Err(DockerError::UnknownPullPolicy(other.to_owned())),
        }
    }
}

impl std::fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        })
    }
}

/// The agent's Docker settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerConfig {
    /// The image for jobs that name none.
    pub default_image: Option<String>,
    /// The pull policy for jobs that give none.
    pub pull_policy: PullPolicy,
    /// The pull policies a job may ask for; empty for any.
    pub allowed_pull_policies: Vec<PullPolicy>,
    /// Run job and service containers privileged (gitlab-runner's
    /// `privileged`), as Docker-in-Docker needs. Off by default: a
    /// privileged job can do anything its instance can.
    pub privileged: bool,
    /// Seconds a job waits for its services to answer: 0 for gitlab-runner's
    /// default (30), negative not to wait.
    pub wait_for_services_secs: i64,
}

impl DockerConfig {
    /// How long a job waits for its services; `None` not to wait.
    fn wait_for_services(&self) -> Option<Duration> {
        match u64::try_from(self.wait_for_services_secs) {
            Err(_) => None,
            Ok(0) => Some(services::WAIT_TIMEOUT),
            Ok(secs) => Some(Duration::from_secs(secs)),
        }
    }
}

/// Runs jobs in Docker containers.
#[derive(Clone, Debug)]
pub struct DockerExecutor {
    docker: Docker,
    /// The same client with a request timeout as long as a job, for calls
    /// that last as long as a container runs.
    streaming: Docker,
    /// Shared: executors are cloned per job.
    config: std::sync::Arc<DockerConfig>,
}

impl DockerExecutor {
    /// Connects to the local Docker engine (`DOCKER_HOST`, else the default
    /// Unix socket) and checks that it answers.
    ///
    /// # Errors
    /// [`DockerError::Connect`] names the address tried and the fix.
    pub async fn connect(config: DockerConfig) -> Result<Self, DockerError> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| DEFAULT_DOCKER_HOST.to_owned());
        let connect_error = |source| DockerError::Connect {
            host: host.clone(),
            source,
        };
        let docker = Docker::connect_with_defaults().map_err(connect_error)?;
        // The engine may speak an older API than this client's default.
        let docker = docker.negotiate_version().await.map_err(connect_error)?;
        docker.ping().await.map_err(connect_error)?;
        Ok(Self::with_client(docker, config))
    }

    /// An executor over an existing client.
    pub fn with_client(docker: Docker, config: DockerConfig) -> Self {
        let streaming = docker.clone().with_timeout(STREAM_TIMEOUT);
        Self {
            docker,
            streaming,
            config: std::sync::Arc::new(config),
        }
    }

    /// The Docker client, e.g. for building a local test image.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Removes every container the agent `owner` (see [`JobContext::owner`])
    /// left behind (after a crash);
    /// returns how many. Call it at start-up, before taking jobs.
    ///
    /// # Errors
    /// Fails when the containers cannot be listed or removed.
    pub async fn remove_leftovers(&self, owner: &str) -> Result<usize, DockerError> {
        let ids = containers_labelled(&self.docker, LABEL_AGENT, owner).await?;
        for id in &ids {
            self.docker
                .remove_container(
                    id,
                    Some(
                        RemoveContainerOptionsBuilder::new()
                            .force(true)
                            .v(true)
                            .build(),
                    ),
                )
                .await
                .map_err(DockerError::api("remove leftover container"))?;
        }
        let networks = services::remove_leftover_networks(&self.docker, owner).await?;
        Ok(ids.len() + networks)
    }

    async fn run_attempt(
        &self,
        ctx: JobContext,
        sink: OutputSink,
        cancel: CancelSignals,
    ) -> JobResult {
        let attempt = match Attempt::start(&ctx, sink, &cancel).await {
            Ok(attempt) => attempt,
            Err(result) => return result,
        };
        let out = &attempt.out;
        out.section_start("prepare_executor", "Preparing the \"docker\" executor")
            .await;
        let prepared = self.prepare(&attempt).await;
        out.section_end("prepare_executor").await;
        match prepared {
            Ok((runner, services)) => {
                let result = attempt.run_stages(&runner).await;
                // However the attempt ended (a hand-back too), its services
                // go with it.
                if let Some(services) = services {
                    services.remove().await;
                }
                result
            }
            Err(result) => result,
        }
    }

    /// Starts the job's services and waits for them; `None` without any.
    async fn start_services(
        &self,
        attempt: &Attempt<'_>,
        labels: &HashMap<String, String>,
        auth: &RegistryAuth,
    ) -> Result<Option<Services>, JobResult> {
        let job = &attempt.ctx.job;
        if job.services.is_empty() {
            return Ok(None);
        }
        let out = &attempt.out;
        let work_dir = attempt.layout.work_dir.to_string_lossy().into_owned();
        let settings = ServiceSettings {
            labels,
            work_dir: &work_dir,
            privileged: self.config.privileged,
        };
        let pull = |image: String, policies: Vec<String>, platform: Option<String>| async move {
            self.ensure_image(&image, &policies, platform.as_deref(), auth, out)
                .await
        };
        let started = attempt
            .bounded(Services::start(
                &self.docker,
                job,
                attempt.ctx.attempt,
                &settings,
                out,
                pull,
            ))
            .await;
        let services = match started {
            Ok(Ok(services)) => services,
            Ok(Err(failed)) => {
                let services::StartFailure {
                    services,
                    kind,
                    message,
                } = failed;
                services.remove().await;
                return Err(JobResult::Failed {
                    kind,
                    exit_code: None,
                    message,
                });
            }
            Err(interrupt) => return Err(attempt.interrupted(interrupt)),
        };
        let Some(timeout) = self.config.wait_for_services() else {
            return Ok(Some(services));
        };
        match attempt.bounded(services.wait(job, timeout, out)).await {
            Ok(()) => Ok(Some(services)),
            Err(interrupt) => {
                services.remove().await;
                Err(attempt.interrupted(interrupt))
            }
        }
    }

    /// Resolves the job's image and makes it present, and starts its
    /// services; returns the runner for its steps or how the attempt ended.
    async fn prepare(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<(ContainerRunner<'_>, Option<Services>), JobResult> {
        let job = &attempt.ctx.job;
        let out = &attempt.out;
        let spec = job.image.as_ref();
        let image = spec
            .map(|i| i.name.trim())
            .filter(|name| !name.is_empty())
            .or(self.config.default_image.as_deref())
            .ok_or_else(|| configuration_failure(
                "the job names no image and the agent has no default image; set image: in .gitlab-ci.yml or a default image in the agent's Docker settings".to_owned(),
            ))?
            .to_owned();
        let options = ImageOptions::parse(
            spec.map(|i| &i.executor_opts)
                .unwrap_or(&serde_json::Map::new()),
            "image",
        )
        .map_err(configuration_failure)?;
        let auth = RegistryAuth::for_job(job, auth::host_config().await)
            .await
            .map_err(|e| configuration_failure(e.to_string()))?;
        out.info(&format!("Using Docker executor with image {image} ..."))
            .await;
        let policies = spec.map(|i| i.pull_policy.as_slice()).unwrap_or_default();
        match attempt
            .bounded(self.ensure_image(&image, policies, options.platform.as_deref(), &auth, out))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let kind = match e {
                    DockerError::ImageNotPresent { .. } | DockerError::Pull { .. } => {
                        FailureKind::ImagePull
                    }
                    DockerError::UnknownPullPolicy(_)
                    | DockerError::PullPolicyNotAllowed { .. } => FailureKind::Configuration,
                    _ => FailureKind::RunnerSystem,
                };
                return Err(JobResult::Failed {
                    kind,
                    exit_code: None,
                    message: e.to_string(),
                });
            }
            Err(interrupt) => return Err(attempt.interrupted(interrupt)),
        }
        let entrypoint = spec
            .map(|i| i.entrypoint.clone())
            .filter(|entrypoint| !entrypoint.is_empty());
        let ctx = attempt.ctx;
        let labels = services::attempt_labels(ctx.job.id, ctx.attempt, &ctx.owner);
        let services = self.start_services(attempt, &labels, &auth).await?;
        let runner = ContainerRunner {
            executor: self,
            image,
            options,
            entrypoint,
            labels,
            network: services.as_ref().map(|s| s.network.clone()),
            mounts: services
                .as_ref()
                .map(Services::shared_mounts)
                .unwrap_or_default(),
        };
        Ok((runner, services))
    }

    /// Makes `image` present by the first of its pull `policies` that
    /// works, as gitlab-runner does: `[always, if-not-present]` uses the
    /// local image when the registry cannot be reached.
    async fn ensure_image(
        &self,
        image: &str,
        policies: &[String],
        platform: Option<&str>,
        auth: &RegistryAuth,
        out: &JobOutput,
    ) -> Result<(), DockerError> {
        let policies = choose_pull_policies(
            policies,
            self.config.pull_policy,
            &self.config.allowed_pull_policies,
        )?;
        if policies.len() > 1 {
            let names: Vec<_> = policies.iter().map(ToString::to_string).collect();
            out.info(&format!(
                "Using effective pull policy of [{}] for container {image}",
                names.join(" ")
            ))
            .await;
        }
        let mut policies = policies.into_iter().peekable();
        while let Some(policy) = policies.next() {
            match self
                .ensure_image_by(image, policy, platform, auth, out)
                .await
            {
                Err(e) if policies.peek().is_some() => {
                    out.warning(&format!(
                        "Failed to pull image with policy \"{policy}\": {e}"
                    ))
                    .await;
                }
                result => return result,
            }
        }
        Ok(())
    }

    /// Makes `image` present according to `policy`.
    async fn ensure_image_by(
        &self,
        image: &str,
        policy: PullPolicy,
        platform: Option<&str>,
        auth: &RegistryAuth,
        out: &JobOutput,
    ) -> Result<(), DockerError> {
        let pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent | PullPolicy::Never => {
                !image_exists(&self.docker, image).await?
            }
        };
        if !pull {
            out.info(&format!("Using locally found image {image} ..."))
                .await;
            return Ok(());
        }
        if policy == PullPolicy::Never {
            return Err(DockerError::ImageNotPresent {
                image: image.to_owned(),
            });
        }
        let login = auth.for_image(image).await;
        if let Some(found) = &login {
            out.info(&format!(
                "Authenticating with credentials from {}",
                found.origin
            ))
            .await;
        }
        out.info(&format!("Pulling docker image {image} ...")).await;
        let (from_image, tag) = pull_reference(image);
        let mut options = CreateImageOptionsBuilder::new().from_image(from_image);
        if let Some(tag) = tag {
            options = options.tag(tag);
        }
        if let Some(platform) = platform {
            options = options.platform(platform);
        }
        let hint = match &login {
            Some(found) => format!(
                "the pull used the login from {}: check that it is current and may read this image",
                found.origin
            ),
            None => "check the image name and that its registry is reachable from this host; for a private registry, give its login in the DOCKER_AUTH_CONFIG variable".to_owned(),
        };
        let mut progress = self.streaming.create_image(
            Some(options.build()),
            None,
            login.map(|found| found.credentials),
        );
        while let Some(item) = progress.next().await {
            item.map_err(|source| DockerError::Pull {
                image: image.to_owned(),
                source,
                hint: hint.clone(),
            })?;
        }
        if let Ok(inspect) = self.docker.inspect_image(image).await {
            if let Some(id) = inspect.id {
                out.info(&format!("Using docker image {id} for {image} ..."))
                    .await;
            }
        }
        Ok(())
    }
}

/// The pull policies to try for an image, in order: the job's
/// (`requested`), else the agent's `default`, narrowed to the `allowed` ones
/// (all when empty).
fn choose_pull_policies(
    requested: &[String],
    default: PullPolicy,
    allowed: &[PullPolicy],
) -> Result<Vec<PullPolicy>, DockerError> {
    if requested.is_empty() {
        return Ok(vec![default]);
    }
    let requested = requested
        .iter()
        .map(|p| p.parse::<PullPolicy>())
        .collect::<Result<Vec<_>, _>>()?;
    if allowed.is_empty() {
        return Ok(requested);
    }
    let chosen: Vec<_> = requested
        .iter()
        .copied()
        .filter(|p| allowed.contains(p))
        .collect();
    if chosen.is_empty() {
        let list = |policies: &[PullPolicy]| {
            policies
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Err(DockerError::PullPolicyNotAllowed {
            requested: list(&requested),
            allowed: list(allowed),
        });
    }
    Ok(chosen)
}

/// What a job's `executor_opts` may set for the Docker executor
/// (gitlab-runner's `docker: {platform, user}`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImageOptions {
    /// The platform to pull and run, such as `linux/arm64`.
    pub platform: Option<String>,
    /// The user the container runs as.
    pub user: Option<String>,
}

impl ImageOptions {
    /// Reads `executor_opts` of `what` (`image`, `services[0]`). An option
    /// this runner does not know is an error, as in gitlab-runner: a job
    /// that asked for it must not run without it.
    pub(crate) fn parse(
        opts: &serde_json::Map<String, serde_json::Value>,
        what: &str,
    ) -> Result<Self, String> {
        let mut options = Self::default();
        let mut unknown = Vec::new();
        for (executor, value) in opts {
            if !matches!(executor.as_str(), "docker" | "kubernetes") {
                unknown.push(executor.clone());
                continue;
            }
            let Some(fields) = value.as_object() else {
                if !value.is_null() {
                    unknown.push(executor.clone());
                }
                continue;
            };
            for (field, value) in fields {
                let text = value.as_str().map(str::to_owned);
                match (executor.as_str(), field.as_str(), text) {
                    ("docker", "platform", Some(text)) => {
                        options.platform = Some(text).filter(|t| !t.is_empty());
                    }
                    ("docker", "user", Some(text)) => {
                        options.user = Some(text).filter(|t| !t.is_empty());
                    }
                    // For the Kubernetes executor; not this one's concern.
                    ("kubernetes", "user", Some(_)) => {}
                    _ => unknown.push(format!("{executor}.{field}")),
                }
            }
        }
        if unknown.is_empty() {
            Ok(options)
        } else {
            Err(format!(
                "{what} executor_opts has options this runner does not support: {}; it supports docker.platform and docker.user (strings)",
                unknown.join(", ")
            ))
        }
    }
}

impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn run(
        &self,
        ctx: JobContext,
        output: OutputSink,
        cancel: CancelSignals,
    ) -> impl std::future::Future<Output = JobResult> + Send {
        self.run_attempt(ctx, output, cancel)
    }
}

fn configuration_failure(message: String) -> JobResult {
    JobResult::Failed {
        kind: FailureKind::Configuration,
        exit_code: None,
        message,
    }
}

/// What to ask the engine to pull: the name, and `latest` when it has no tag
/// or digest (without a tag the engine would pull every tag).
fn pull_reference(image: &str) -> (&str, Option<&'static str>) {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        (image, None)
    } else {
        (image, Some("latest"))
    }
}

/// Whether `image` is present in the engine's image store.
async fn image_exists(docker: &Docker, image: &str) -> Result<bool, DockerError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(source) => Err(DockerError::Api {
            what: "inspect image",
            source,
        }),
    }
}

/// Ids of all containers, running or not, with label `key=value`.
async fn containers_labelled(
    docker: &Docker,
    key: &str,
    value: &str,
) -> Result<Vec<String>, DockerError> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(DockerError::api("list containers"))?;
    Ok(containers.into_iter().filter_map(|c| c.id).collect())
}

/// Runs one attempt's step scripts in containers of its image.
struct ContainerRunner<'a> {
    executor: &'a DockerExecutor,
    image: String,
    /// The image's `executor_opts`.
    options: ImageOptions,
    entrypoint: Option<Vec<String>>,
    labels: HashMap<String, String>,
    /// The job's network, when it has services.
    network: Option<String>,
    /// Volumes shared with the services (`/certs/client`).
    mounts: Vec<Mount>,
}

impl ScriptRunner for ContainerRunner<'_> {
    type Error = DockerError;

    fn environment(&self) -> Environment {
        Environment::Disposable
    }

    async fn run_script(
        &self,
        step: &StepRun<'_>,
        out: &JobOutput,
        stop: &StopSignals,
    ) -> Result<i32, DockerError> {
        let docker = &self.executor.docker;
        let mut labels = self.labels.clone();
        labels.insert(LABEL_STEP.to_owned(), step.name.to_owned());
        let work_dir = step.layout.work_dir.to_string_lossy().into_owned();
        let working_dir = if step.layout.project_dir.is_dir() {
            &step.layout.project_dir
        } else {
            &step.layout.work_dir
        };
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            entrypoint: self.entrypoint.clone(),
            cmd: Some(vec![
                "sh".to_owned(),
                "-c".to_owned(),
                CONTAINER_WRAPPER.to_owned(),
                "sh".to_owned(),
                step.script.to_string_lossy().into_owned(),
            ]),
            working_dir: Some(working_dir.to_string_lossy().into_owned()),
            user: self.options.user.clone(),
            labels: Some(labels),
            tty: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                // A mount rather than a `binds` string: a path may hold `:`.
                mounts: Some(
                    std::iter::once(Mount {
                        target: Some(work_dir.clone()),
                        source: Some(work_dir),
                        typ: Some(MountType::BIND),
                        ..Default::default()
                    })
                    .chain(self.mounts.iter().cloned())
                    .collect(),
                ),
                network_mode: self.network.clone(),
                privileged: Some(self.executor.config.privileged),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut options = CreateContainerOptionsBuilder::new();
        if let Some(platform) = &self.options.platform {
            options = options.platform(platform);
        }
        let created = docker
            .create_container(Some(options.build()), body)
            .await
            .map_err(DockerError::api("create container"))?;
        let guard = ContainerGuard::new(docker.clone(), created.id.clone());
        let result = self.drive(&created.id, out, stop).await;
        guard.remove().await;
        result
    }
}

impl ContainerRunner<'_> {
    /// Starts the container, streams its output and waits for its exit,
    /// stopping it when asked.
    async fn drive(
        &self,
        id: &str,
        out: &JobOutput,
        stop: &StopSignals,
    ) -> Result<i32, DockerError> {
        let docker = &self.executor.docker;
        let streaming = &self.executor.streaming;
        // Attached before the start, the output is the container's own
        // stdout and stderr, every byte as the job wrote it, ending when the
        // container's streams close. Following the engine's log instead
        // loses output: the json-file driver writes a last line that has no
        // newline only when the container's stream closes, and a follower
        // told the container is gone may stop before reading it (about half
        // the time for `printf done` as the last command); log drivers such
        // as `none` or `awslogs` cannot be read back at all.
        let attached = streaming
            .attach_container(
                id,
                Some(
                    AttachContainerOptionsBuilder::new()
                        .stream(true)
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            )
            .await
            .map_err(DockerError::api("attach to container"))?;
        // Nothing is written to the job's stdin; the write half stays open
        // until the container is done so the engine sees no hang-up.
        let AttachContainerResults {
            output: logs,
            input: _stdin,
        } = attached;
        docker
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(DockerError::api("start container"))?;

        let pump = async move {
            futures_util::pin_mut!(logs);
            while let Some(item) = logs.next().await {
                match item {
                    Ok(chunk) => out.write(chunk.into_bytes()).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost a container's output stream");
                        return;
                    }
                }
            }
        };
        tokio::pin!(pump);
        let wait = streaming.wait_container(id, None::<WaitContainerOptions>);
        tokio::pin!(wait);

        let mut pump_done = false;
        let mut grace_end: Option<Instant> = None;
        let mut killed = false;
        let exit = loop {
            tokio::select! {
                () = &mut pump, if !pump_done => pump_done = true,
                item = wait.next() => break exit_status(item),
                () = stop.kill.cancelled(), if !killed => {
                    signal(docker, id, "KILL").await;
                    killed = true;
                }
                () = stop.terminate.cancelled(), if grace_end.is_none() && !killed => {
                    signal(docker, id, "TERM").await;
                    grace_end = Some(Instant::now() + STOP_GRACE);
                }
                () = sleep_until_some(grace_end), if !killed => {
                    signal(docker, id, "KILL").await;
                    killed = true;
                }
            }
        };
        if !pump_done && tokio::time::timeout(OUTPUT_DRAIN, pump).await.is_err() {
            tracing::warn!(
                container = id,
                "container output did not end after it exited"
            );
        }
        exit
    }
}

async fn signal(docker: &Docker, id: &str, signal: &str) {
    let options = KillContainerOptionsBuilder::new().signal(signal).build();
    match docker.kill_container(id, Some(options)).await {
        Ok(()) => {}
        // Not running (409) or gone (404): it already stopped.
        Err(BollardError::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => {}
        Err(e) => {
            tracing::warn!(container = id, signal, error = %e, "failed to signal a job container")
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The exit code from the first item of a container wait stream. bollard
/// reports a non-zero exit as an error carrying the code.
fn exit_status(
    item: Option<Result<ContainerWaitResponse, BollardError>>,
) -> Result<i32, DockerError> {
    let code = match item {
        Some(Ok(response)) => response.status_code,
        Some(Err(BollardError::DockerContainerWaitError { code, .. })) => code,
        Some(Err(source)) => {
            return Err(DockerError::Api {
                what: "wait for container",
                source,
            })
        }
        None => return Err(DockerError::NoExitStatus),
    };
    Ok(i32::try_from(code).unwrap_or(i32::MAX))
}

/// Removes a container when dropped, so a job future dropped half way leaves
/// no container behind; [`ContainerGuard::remove`] does it in line.
pub(crate) struct ContainerGuard {
    docker: Docker,
    id: Option<String>,
}

impl ContainerGuard {
    /// Removes container `id` unless kept.
    pub(crate) fn new(docker: Docker, id: String) -> Self {
        Self {
            docker,
            id: Some(id),
        }
    }

    /// Keeps the container (it started; someone else removes it later).
    pub(crate) fn keep(mut self) -> String {
        self.id.take().unwrap_or_default()
    }

    pub(crate) async fn remove(mut self) {
        if let Some(id) = self.id.take() {
            remove_container(&self.docker, &id).await;
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let docker = self.docker.clone();
                runtime.spawn(async move { remove_container(&docker, &id).await });
            }
            Err(_) => {
                tracing::warn!(container = %id, "no runtime left to remove a job container; remove it by its servitor.job_id label")
            }
        }
    }
}

/// Force-removes a container and its anonymous volumes.
pub(crate) async fn remove_container(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(())
        | Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => tracing::warn!(container = id, error = %e, "failed to remove a job container"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use crate::executor::testing::{collect_output, context, job_with, run_collecting};
    use servitor_proto::job::{Image, JobVariable};

    /// The job image the tests build locally; no registry is reachable.
    const TEST_IMAGE: &str = "servitor-test-job:latest";

    /// An executor on the real engine with the test image present. Fails the
    /// test, naming what is missing, when Docker or busybox is not there.
    async fn executor() -> DockerExecutor {
        let config = DockerConfig {
            default_image: Some(TEST_IMAGE.to_owned()),
            pull_policy: PullPolicy::IfNotPresent,
            allowed_pull_policies: Vec::new(),
            privileged: false,
            wait_for_services_secs: 0,
        };
        let executor = DockerExecutor::connect(config)
            .await
            .unwrap_or_else(|e| panic!("these tests need the Docker engine: {e}"));
        servitor_testkit::image::ensure_local_image(executor.client(), TEST_IMAGE)
            .await
            .unwrap_or_else(|e| panic!("these tests need the local job image {TEST_IMAGE}: {e}"));
        executor
    }

    async fn assert_no_containers(executor: &DockerExecutor, job_id: i64) {
        let left = containers_labelled(executor.client(), LABEL_JOB_ID, &job_id.to_string())
            .await
            .unwrap();
        assert!(
            left.is_empty(),
            "containers of job {job_id} were left behind: {left:?}"
        );
    }

    fn failed(kind: FailureKind, exit_code: Option<i32>, message: &str) -> JobResult {
        JobResult::Failed {
            kind,
            exit_code,
            message: message.to_owned(),
        }
    }

    #[tokio::test]
    async fn success_streams_output_live() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(&["echo first-line", "sleep 3", "echo second-line"], &[], 60);
        let job_id = job.id;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let log = collect_output(rx);
        let ctx = context(job, dir.path());
        let run = tokio::spawn({
            let executor = executor.clone();
            async move { executor.run(ctx, tx, CancelSignals::default()).await }
        });
        log.wait_for("first-line\n").await;
        assert!(
            !run.is_finished(),
            "output arrived only after the job ended"
        );
        assert!(!log.snapshot().contains("second-line\n"));
        let result = run.await.unwrap();
        let text = log.finish().await;
        assert_eq!(result, JobResult::Success, "{text}");
        assert!(
            text.contains("\x1b[32;1m$ echo first-line\x1b[0;m\nfirst-line\n"),
            "{text:?}"
        );
        assert!(text.contains("second-line\n"), "{text:?}");
        assert!(text.contains(":step_script\r\x1b[0K"), "{text:?}");
        assert_no_containers(&executor, job_id).await;
    }

    #[tokio::test]
    async fn a_failing_command_stops_the_script_and_after_script_sees_failed() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &["echo before", "sh -c 'exit 3'", "echo never-printed"],
            &["echo after status=$CI_JOB_STATUS", "exit 9"],
            60,
        );
        let job_id = job.id;
        let (result, log) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        assert_eq!(
            result,
            failed(FailureKind::Script, Some(3), "exit code 3"),
            "{log}"
        );
        assert!(log.contains("before\n"), "{log:?}");
        assert!(!log.contains("never-printed\n"), "{log:?}");
        assert!(log.contains("after status=failed\n"), "{log:?}");
        assert!(
            log.contains("after_script failed, but job will continue unaffected: exit code 9"),
            "{log:?}"
        );
        assert_no_containers(&executor, job_id).await;
    }

    #[tokio::test]
    async fn variables_reach_the_script_and_paths_match_the_host() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let mut job = job_with(
            &[
                r#"echo "normal=$NORMAL masked=$MASKED disposable=$CI_DISPOSABLE_ENVIRONMENT""#,
                r#"cat "$CONFIG_FILE""#,
                r#"test "$(pwd)" = "$CI_PROJECT_DIR" && echo "in project dir""#,
                r#"echo made-in-container > "$CI_PROJECT_DIR/out.txt""#,
            ],
            &[],
            60,
        );
        job.job_info.project_full_path = "group/project".into();
        job.variables = vec![
            JobVariable {
                key: "NORMAL".into(),
                value: "plain value".into(),
                public: true,
                ..Default::default()
            },
            JobVariable {
                key: "MASKED".into(),
                value: "s3cr3t-value".into(),
                masked: true,
                ..Default::default()
            },
            JobVariable {
                key: "CONFIG_FILE".into(),
                value: "from a file variable\n".into(),
                file: true,
                ..Default::default()
            },
        ];
        let (result, log) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        assert_eq!(result, JobResult::Success, "{log}");
        assert!(
            log.contains("normal=plain value masked=s3cr3t-value disposable=true\n"),
            "{log:?}"
        );
        assert!(log.contains("from a file variable\n"), "{log:?}");
        assert!(log.contains("in project dir\n"), "{log:?}");
        let written = dir.path().join("builds/group/project/out.txt");
        assert_eq!(
            std::fs::read_to_string(written).unwrap(),
            "made-in-container\n"
        );
    }

    #[tokio::test]
    async fn timeout_stops_the_script_and_after_script_still_runs() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &["echo started", "sleep 60", "echo never-printed"],
            &["echo after status=$CI_JOB_STATUS"],
            2,
        );
        let job_id = job.id;
        let started = Instant::now();
        let (result, log) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        assert_eq!(
            result,
            failed(
                FailureKind::Timeout,
                None,
                "execution took longer than 2s seconds"
            ),
            "{log}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
        assert!(!log.contains("never-printed\n"), "{log:?}");
        assert!(log.contains("after status=failed\n"), "{log:?}");
        assert_no_containers(&executor, job_id).await;
    }

    #[tokio::test]
    async fn graceful_cancel_stops_the_script_and_runs_after_script() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &["echo started", "sleep 60"],
            &["echo after status=$CI_JOB_STATUS"],
            120,
        );
        let job_id = job.id;
        let cancel = CancelSignals::default();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let log = collect_output(rx);
        let ctx = context(job, dir.path());
        let run = tokio::spawn({
            let (executor, cancel) = (executor.clone(), cancel.clone());
            async move { executor.run(ctx, tx, cancel).await }
        });
        log.wait_for("started\n").await;
        let canceled_at = Instant::now();
        cancel.graceful.cancel();
        let result = run.await.unwrap();
        let text = log.finish().await;
        assert_eq!(
            result,
            JobResult::Canceled {
                message: "job canceled".into()
            },
            "{text}"
        );
        // SIGTERM reaches the script at once; the grace period is not waited out.
        assert!(
            canceled_at.elapsed() < STOP_GRACE,
            "took {:?}",
            canceled_at.elapsed()
        );
        assert!(text.contains("after status=canceled\n"), "{text:?}");
        assert_no_containers(&executor, job_id).await;
    }

    #[tokio::test]
    async fn abort_kills_at_once_without_after_script() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &[
                "trap 'echo ignoring TERM' TERM",
                "echo started",
                "while true; do sleep 1; done",
            ],
            &["echo after status=$CI_JOB_STATUS"],
            120,
        );
        let job_id = job.id;
        let cancel = CancelSignals::default();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let log = collect_output(rx);
        let ctx = context(job, dir.path());
        let run = tokio::spawn({
            let (executor, cancel) = (executor.clone(), cancel.clone());
            async move { executor.run(ctx, tx, cancel).await }
        });
        log.wait_for("started\n").await;
        let aborted_at = Instant::now();
        cancel.abort.cancel();
        let result = run.await.unwrap();
        let text = log.finish().await;
        assert_eq!(
            result,
            JobResult::Canceled {
                message: "job aborted".into()
            },
            "{text}"
        );
        assert!(
            aborted_at.elapsed() < Duration::from_secs(5),
            "abort took {:?}",
            aborted_at.elapsed()
        );
        assert!(!text.contains("after status"), "{text:?}");
        assert_no_containers(&executor, job_id).await;
    }

    #[tokio::test]
    async fn pull_policy_never_with_a_missing_image_is_an_image_pull_failure() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let mut job = job_with(&["echo never-printed"], &["echo after"], 60);
        job.image = Some(Image {
            name: "servitor-test-absent:never".into(),
            pull_policy: vec!["never".into()],
            ..Default::default()
        });
        let job_id = job.id;
        let (result, log) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        match &result {
            JobResult::Failed {
                kind: FailureKind::ImagePull,
                message,
                ..
            } => {
                assert!(message.contains("not present"), "{message}");
                assert!(message.contains("\"never\""), "{message}");
            }
            other => panic!("unexpected {other:?}\n{log}"),
        }
        assert!(!log.contains("never-printed\n"), "{log:?}");
        assert_no_containers(&executor, job_id).await;
    }

    #[tokio::test]
    async fn pulling_an_unreachable_image_is_an_image_pull_failure() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let mut job = job_with(&["echo never-printed"], &[], 60);
        job.image = Some(Image {
            name: "registry.invalid/servitor/absent:1".into(),
            pull_policy: vec!["always".into()],
            ..Default::default()
        });
        let (result, log) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        match &result {
            JobResult::Failed {
                kind: FailureKind::ImagePull,
                message,
                ..
            } => assert!(message.contains("failed to pull image"), "{message}"),
            other => panic!("unexpected {other:?}\n{log}"),
        }
        assert!(
            log.contains("Pulling docker image registry.invalid/servitor/absent:1"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_pull_policy_is_a_configuration_failure() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let mut job = job_with(&["true"], &[], 60);
        job.image = Some(Image {
            name: TEST_IMAGE.into(),
            pull_policy: vec!["sometimes".into()],
            ..Default::default()
        });
        let (result, _) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        assert!(
            matches!(&result, JobResult::Failed { kind: FailureKind::Configuration, message, .. } if message.contains("sometimes")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn the_local_image_is_built_once_and_runs_busybox() {
        let executor = executor().await;
        // Present now, so not built again.
        assert!(
            !servitor_testkit::image::ensure_local_image(executor.client(), TEST_IMAGE)
                .await
                .unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(
            &["id -un", "ls /tmp > /dev/null", "env | grep -c PATH"],
            &[],
            60,
        );
        let (result, log) =
            run_collecting(&executor, job, dir.path(), CancelSignals::default()).await;
        assert_eq!(result, JobResult::Success, "{log}");
        assert!(log.contains("root\n"), "{log:?}");
    }

    #[tokio::test]
    async fn a_dropped_job_leaves_no_container_behind() {
        let executor = executor().await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_with(&["echo started", "sleep 60"], &[], 120);
        let job_id = job.id;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let log = collect_output(rx);
        let ctx = context(job, dir.path());
        let run = tokio::spawn({
            let executor = executor.clone();
            async move { executor.run(ctx, tx, CancelSignals::default()).await }
        });
        log.wait_for("started\n").await;
        run.abort();
        let _ = run.await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = containers_labelled(executor.client(), LABEL_JOB_ID, &job_id.to_string())
                .await
                .unwrap();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containers of a dropped job survived: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    async fn leftovers_of_an_agent_are_removed() {
        let executor = executor().await;
        let agent = format!(
            "leftover-test-{}",
            crate::executor::testing::unique_job_id()
        );
        let body = ContainerCreateBody {
            image: Some(TEST_IMAGE.to_owned()),
            cmd: Some(vec!["true".to_owned()]),
            labels: Some(HashMap::from([(LABEL_AGENT.to_owned(), agent.clone())])),
            ..Default::default()
        };
        executor
            .client()
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .unwrap();
        assert_eq!(executor.remove_leftovers(&agent).await.unwrap(), 1);
        let left = containers_labelled(executor.client(), LABEL_AGENT, &agent)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn pull_policies_are_tried_in_the_jobs_order_within_the_allowed_ones() {
        use PullPolicy::{Always, IfNotPresent, Never};
        let job = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            choose_pull_policies(&[], IfNotPresent, &[Always]).unwrap(),
            [IfNotPresent]
        );
        assert_eq!(
            choose_pull_policies(&job(&["always", "if-not-present"]), Never, &[]).unwrap(),
            [Always, IfNotPresent]
        );
        assert_eq!(
            choose_pull_policies(
                &job(&["always", "if-not-present"]),
                Always,
                &[IfNotPresent, Never]
            )
            .unwrap(),
            [IfNotPresent]
        );
        let err = choose_pull_policies(&job(&["never"]), Always, &[Always]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pull_policy ([never]) defined in GitLab pipeline config is not one of the allowed_pull_policies ([always]); use one of those in .gitlab-ci.yml, or add it to the agent's executor.allowed_pull_policies"
        );
        assert!(matches!(
            choose_pull_policies(&job(&["sometimes"]), Always, &[]),
            Err(DockerError::UnknownPullPolicy(_))
        ));
    }

    #[test]
    fn executor_opts_take_platform_and_user_and_refuse_the_rest() {
        let opts = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert_eq!(
            ImageOptions::parse(
                &opts(
                    serde_json::json!({"docker": {"platform": "linux/arm64", "user": "1000"},
                                         "kubernetes": {"user": "1000"}})
                ),
                "image"
            )
            .unwrap(),
            ImageOptions {
                platform: Some("linux/arm64".to_owned()),
                user: Some("1000".to_owned()),
            }
        );
        let err = ImageOptions::parse(
            &opts(serde_json::json!({"docker": {"gpus": "all", "user": 5}, "podman": {}})),
            "services[1]",
        )
        .unwrap_err();
        assert!(err.starts_with("services[1] executor_opts"), "{err}");
        assert!(err.contains("docker.gpus"), "{err}");
        assert!(err.contains("docker.user"), "{err}");
        assert!(err.contains("podman"), "{err}");
    }

    #[test]
    fn pull_policies_and_references_parse() {
        assert_eq!(
            "if-not-present".parse::<PullPolicy>().unwrap(),
            PullPolicy::IfNotPresent
        );
        assert_eq!(PullPolicy::Never.to_string(), "never");
        assert!("sometimes".parse::<PullPolicy>().is_err());
        assert_eq!(pull_reference("alpine"), ("alpine", Some("latest")));
        assert_eq!(
            pull_reference("registry:5000/team/app"),
            ("registry:5000/team/app", Some("latest"))
        );
        assert_eq!(
            pull_reference("registry:5000/team/app:1.2"),
            ("registry:5000/team/app:1.2", None)
        );
        assert_eq!(
            pull_reference("alpine@sha256:abc"),
            ("alpine@sha256:abc", None)
        );
    }
}
