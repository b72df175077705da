//! The Docker executor: runs each step script of a job in a fresh container
//! of the job's image through the Docker Engine API (bollard), with the
//! attempt's work directory bind-mounted at the same path, so
//! `CI_PROJECT_DIR` and every other path mean the same on the host and in the
//! job. Sources are fetched on the host before the first container starts.
//!
//! It resolves the image and its pull policy, streams container output live,
//! stops a container with SIGTERM and then SIGKILL after a grace period on
//! timeout or graceful cancel, kills it at once on abort, and always removes
//! its containers. It also builds the small local job image the tests and
//! the demo use ([`ensure_local_image`]), since no registry is reachable
//! there. Not responsible for services, caches, artifacts, registry
//! credentials, or removing the work directory (the caller does).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerWaitResponse, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StartContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use servitor_proto::agent::FailureKind;
use tokio::time::Instant;

use super::attempt::{Attempt, ScriptRunner, StepRun, StopSignals, STOP_GRACE};
use super::output::JobOutput;
use super::script::Environment;
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

/// Request timeout for calls that last as long as a job (following logs,
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

/// The statically linked busybox Debian's busybox-static installs.
const BUSYBOX_PATH: &str = "/bin/busybox";

/// Applets the local job image links to busybox: what CI scripts commonly
/// call.
const BUSYBOX_APPLETS: &[&str] = &[
    "[",
    "ash",
    "awk",
    "basename",
    "cat",
    "chmod",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "du",
    "echo",
    "env",
    "expr",
    "false",
    "find",
    "grep",
    "gzip",
    "head",
    "hostname",
    "id",
    "kill",
    "ln",
    "ls",
    "md5sum",
    "mkdir",
    "mktemp",
    "mv",
    "printf",
    "ps",
    "pwd",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "sh",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "tail",
    "tar",
    "tee",
    "test",
    "timeout",
    "touch",
    "tr",
    "true",
    "uname",
    "uniq",
    "wc",
    "wget",
    "which",
    "whoami",
    "xargs",
    "yes",
];

/// ustar works in blocks of this size (POSIX pax/ustar format).
const TAR_BLOCK: usize = 512;

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
    #[error("failed to pull image {image:?}: {source}; check the image name and that its registry is reachable from this host")]
    Pull {
        image: String,
        #[source]
        source: BollardError,
    },
    #[error("pull policy {0:?} is not one of \"always\", \"if-not-present\", \"never\"")]
    UnknownPullPolicy(String),
    #[error("{path} is missing ({source}); install Debian's busybox-static to build the local job image")]
    BusyboxMissing {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a statically linked executable ({reason}) and would not run in an empty image; install Debian's busybox-static")]
    BusyboxNotStatic { path: &'static str, reason: String },
}

impl DockerError {
    fn api(what: &'static str) -> impl FnOnce(BollardError) -> DockerError {
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
}

/// Runs jobs in Docker containers.
#[derive(Clone, Debug)]
pub struct DockerExecutor {
    docker: Docker,
    /// The same client with a request timeout as long as a job, for calls
    /// that last as long as a container runs.
    streaming: Docker,
    config: DockerConfig,
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
            config,
        }
    }

    /// The Docker client, e.g. for [`ensure_local_image`].
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
        Ok(ids.len())
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
        let runner = self.prepare(&attempt).await;
        out.section_end("prepare_executor").await;
        match runner {
            Ok(runner) => attempt.run_stages(&runner).await,
            Err(result) => result,
        }
    }

    /// Resolves the job's image and makes it present; returns the runner for
    /// its steps or how the attempt ended.
    async fn prepare(&self, attempt: &Attempt<'_>) -> Result<ContainerRunner<'_>, JobResult> {
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
        let policy = match spec.and_then(|i| i.pull_policy.first()) {
            Some(policy) => policy
                .parse()
                .map_err(|e: DockerError| configuration_failure(e.to_string()))?,
            None => self.config.pull_policy,
        };
        out.info(&format!("Using Docker executor with image {image} ..."))
            .await;
        match attempt
            .bounded(self.ensure_image(&image, policy, out))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let kind = match e {
                    DockerError::ImageNotPresent { .. } | DockerError::Pull { .. } => {
                        FailureKind::ImagePull
                    }
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
        let labels = HashMap::from([
            (LABEL_JOB_ID.to_owned(), ctx.job.id.to_string()),
            (LABEL_ATTEMPT.to_owned(), ctx.attempt.to_string()),
            (LABEL_AGENT.to_owned(), ctx.owner.clone()),
        ]);
        Ok(ContainerRunner {
            executor: self,
            image,
            entrypoint,
            labels,
        })
    }

    /// Makes `image` present according to `policy`.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
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
        out.info(&format!("Pulling docker image {image} ...")).await;
        let (from_image, tag) = pull_reference(image);
        let mut options = CreateImageOptionsBuilder::new().from_image(from_image);
        if let Some(tag) = tag {
            options = options.tag(tag);
        }
        let mut progress = self
            .streaming
            .create_image(Some(options.build()), None, None);
        while let Some(item) = progress.next().await {
            item.map_err(|source| DockerError::Pull {
                image: image.to_owned(),
                source,
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
    entrypoint: Option<Vec<String>>,
    labels: HashMap<String, String>,
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
            labels: Some(labels),
            tty: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                // A mount rather than a `binds` string: a path may hold `:`.
                mounts: Some(vec![Mount {
                    target: Some(work_dir.clone()),
                    source: Some(work_dir),
                    typ: Some(MountType::BIND),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = docker
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .map_err(DockerError::api("create container"))?;
        let guard = ContainerGuard {
            docker: docker.clone(),
            id: Some(created.id.clone()),
        };
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
        docker
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(DockerError::api("start container"))?;

        let logs = streaming.logs(
            id,
            Some(
                LogsOptionsBuilder::new()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
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
struct ContainerGuard {
    docker: Docker,
    id: Option<String>,
}

impl ContainerGuard {
    async fn remove(mut self) {
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
        Err(e) => tracing::warn!(container = id, error = %e, "failed to remove a job container"),
    }
}

/// Makes sure image `tag` exists locally, building it when missing from the
/// host's statically linked busybox: a root file system with `bin/busybox`,
/// its common applets (`sh`, `echo`, `sleep`…) as symlinks, `/tmp` and a
/// root user, imported as an image. Returns whether it built the image.
///
/// # Errors
/// Fails when busybox is missing or not static (the message says to install
/// Debian's busybox-static), or when the engine refuses the import.
pub async fn ensure_local_image(docker: &Docker, tag: &str) -> Result<bool, DockerError> {
    // Jobs starting together would each import the image, leaving all but
    // the last import behind as untagged images.
    static IMPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _importing = IMPORTING.lock().await;
    if image_exists(docker, tag).await? {
        return Ok(false);
    }
    let busybox =
        tokio::fs::read(BUSYBOX_PATH)
            .await
            .map_err(|source| DockerError::BusyboxMissing {
                path: BUSYBOX_PATH,
                source,
            })?;
    match elf_has_interpreter(&busybox) {
        Ok(false) => {}
        Ok(true) => {
            return Err(DockerError::BusyboxNotStatic {
                path: BUSYBOX_PATH,
                reason: "it names a dynamic loader".to_owned(),
            })
        }
        Err(reason) => {
            return Err(DockerError::BusyboxNotStatic {
                path: BUSYBOX_PATH,
                reason: reason.to_owned(),
            })
        }
    }
    let rootfs = busybox_rootfs(&busybox);
    let options = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(tag)
        .changes(vec![
            "ENV PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
            r#"CMD ["sh"]"#.to_owned(),
        ])
        .build();
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(rootfs.into())), None);
    while let Some(item) = progress.next().await {
        item.map_err(DockerError::api("import image"))?;
    }
    Ok(true)
}

/// Whether an ELF executable asks for a dynamic loader (has a `PT_INTERP`
/// program header). `Err` says why the bytes are not a readable ELF file.
fn elf_has_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
    const MAGIC: &[u8] = b"\x7fELF";
    const CLASS_32: u8 = 1;
    const CLASS_64: u8 = 2;
    const DATA_LE: u8 = 1;
    const DATA_BE: u8 = 2;
    const PT_INTERP: u32 = 3;

    if elf.get(..MAGIC.len()) != Some(MAGIC) {
        return Err("not an ELF file");
    }
    let little = match elf.get(5) {
        Some(&DATA_LE) => true,
        Some(&DATA_BE) => false,
        _ => return Err("unknown ELF byte order"),
    };
    let read = |offset: usize, len: usize| -> Result<u64, &'static str> {
        let bytes = offset
            .checked_add(len)
            .and_then(|end| elf.get(offset..end))
            .ok_or("truncated ELF file")?;
        let mut value = 0u64;
        for i in 0..len {
            let byte = if little { bytes[len - 1 - i] } else { bytes[i] };
            value = (value << 8) | u64::from(byte);
        }
        Ok(value)
    };
    // Field offsets of the ELF header for each class (System V gABI).
    let (phoff, phentsize, phnum) = match elf.get(4) {
        Some(&CLASS_64) => (read(0x20, 8)?, read(0x36, 2)?, read(0x38, 2)?),
        Some(&CLASS_32) => (read(0x1c, 4)?, read(0x2a, 2)?, read(0x2c, 2)?),
        _ => return Err("unknown ELF class"),
    };
    let phoff = usize::try_from(phoff).map_err(|_| "truncated ELF file")?;
    // Both widths are u16 fields, so these conversions cannot fail on any
    // target with a 32-bit or larger usize.
    let phentsize = usize::try_from(phentsize).map_err(|_| "bad program header size")?;
    let phnum = usize::try_from(phnum).map_err(|_| "bad program header count")?;
    for i in 0..phnum {
        let offset = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("truncated ELF file")?;
        if read(offset, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A root file system around `busybox` as an uncompressed ustar archive.
fn busybox_rootfs(busybox: &[u8]) -> Vec<u8> {
    /// Directory modes: world-writable sticky `/tmp`, private `/root`.
    const DIR_MODE: u32 = 0o755;
    const TMP_MODE: u32 = 0o1777;
    const ROOT_HOME_MODE: u32 = 0o700;
    const EXEC_MODE: u32 = 0o755;
    const FILE_MODE: u32 = 0o644;

    let mut tar = Tar::default();
    for dir in ["bin/", "usr/", "usr/bin/", "etc/"] {
        tar.entry(dir, DIR_MODE, EntryKind::Dir, &[]);
    }
    tar.entry("tmp/", TMP_MODE, EntryKind::Dir, &[]);
    tar.entry("root/", ROOT_HOME_MODE, EntryKind::Dir, &[]);
    tar.entry("bin/busybox", EXEC_MODE, EntryKind::File, busybox);
    for applet in BUSYBOX_APPLETS {
        tar.entry(
            &format!("bin/{applet}"),
            EXEC_MODE,
            EntryKind::Symlink("busybox"),
            &[],
        );
    }
    tar.entry(
        "usr/bin/env",
        EXEC_MODE,
        EntryKind::Symlink("/bin/busybox"),
        &[],
    );
    tar.entry(
        "etc/passwd",
        FILE_MODE,
        EntryKind::File,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    tar.entry("etc/group", FILE_MODE, EntryKind::File, b"root:x:0:\n");
    tar.finish()
}

#[derive(Clone, Copy, Debug)]
enum EntryKind<'a> {
    File,
    Dir,
    Symlink(&'a str),
}

/// A minimal ustar writer: regular files, directories and symlinks with
/// short names, owned by root.
#[derive(Debug, Default)]
struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    fn entry(&mut self, name: &str, mode: u32, kind: EntryKind<'_>, data: &[u8]) {
        // Field offsets and widths of the ustar header (POSIX.1-1988).
        let mut header = [0u8; TAR_BLOCK];
        put(&mut header[0..100], name.as_bytes());
        octal(&mut header[100..108], u64::from(mode));
        octal(&mut header[108..116], 0); // uid: root
        octal(&mut header[116..124], 0); // gid: root
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], 0); // mtime: reproducible archives
        let (flag, link) = match kind {
            EntryKind::File => (b'0', ""),
            EntryKind::Dir => (b'5', ""),
            EntryKind::Symlink(target) => (b'2', target),
        };
        header[156] = flag;
        put(&mut header[157..257], link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        put(&mut header[265..297], b"root");
        put(&mut header[297..329], b"root");
        // The checksum is computed with its own field filled with spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
        let checksum = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(checksum.as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(data);
        let padding = (TAR_BLOCK - data.len() % TAR_BLOCK) % TAR_BLOCK;
        self.bytes.resize(self.bytes.len() + padding, 0);
    }

    /// The archive, closed with the two zero blocks ustar ends with.
    fn finish(mut self) -> Vec<u8> {
        self.bytes.resize(self.bytes.len() + 2 * TAR_BLOCK, 0);
        self.bytes
    }
}

/// Copies `value` into a NUL-padded header field; names here are constants
/// far shorter than any field.
fn put(field: &mut [u8], value: &[u8]) {
    let len = value.len().min(field.len());
    field[..len].copy_from_slice(&value[..len]);
}

/// Writes `value` as zero-padded octal followed by a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}", width = field.len() - 1);
    put(field, digits.as_bytes());
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
        };
        let executor = DockerExecutor::connect(config)
            .await
            .unwrap_or_else(|e| panic!("these tests need the Docker engine: {e}"));
        ensure_local_image(executor.client(), TEST_IMAGE)
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
        assert!(!ensure_local_image(executor.client(), TEST_IMAGE)
            .await
            .unwrap());
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
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .unwrap();
        assert_eq!(executor.remove_leftovers(&agent).await.unwrap(), 1);
        let left = containers_labelled(executor.client(), LABEL_AGENT, &agent)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn busybox_rootfs_is_a_valid_tar() {
        let tar = busybox_rootfs(b"#!fake busybox\n");
        assert_eq!(tar.len() % TAR_BLOCK, 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rootfs.tar");
        std::fs::write(&path, &tar).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
            .expect("this test needs tar on the host to read the archive back");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("bin/sh -> busybox"), "{listing}");
        assert!(listing.contains("drwxrwxrwt"), "{listing}");
        assert!(
            listing.contains("root/root        15") && listing.contains("bin/busybox"),
            "{listing}"
        );
        let extract = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(extract.status.success());
        assert_eq!(
            std::fs::read(dir.path().join("bin/busybox")).unwrap(),
            b"#!fake busybox\n"
        );
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let busybox = std::fs::read(BUSYBOX_PATH).unwrap_or_else(|e| {
            panic!("this test needs {BUSYBOX_PATH}: {e}; install Debian's busybox-static")
        });
        assert_eq!(elf_has_interpreter(&busybox), Ok(false));
        let dynamic = std::fs::read("/bin/ls").unwrap();
        assert_eq!(elf_has_interpreter(&dynamic), Ok(true));
        assert!(elf_has_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_has_interpreter(&busybox[..64]).is_err());
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
