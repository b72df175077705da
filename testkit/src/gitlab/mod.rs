//! A GitLab stand-in that speaks the runner API over HTTP on 127.0.0.1, for
//! the demo and end-to-end tests: the same paths, headers, status codes and
//! edge cases as GitLab (Rails behind Workhorse), a job state machine like
//! Rails', and git's smart HTTP protocol for the jobs' repositories (through
//! `git http-backend`, authenticated by job token as GitLab does).
//!
//! Tests drive it from Rust: queue jobs ([`StandIn::push_job`]), cancel
//! them, read what the runner sent ([`StandIn::job`]), and inject faults
//! (rate limits, server errors, 416s, 202s on the final update).
//!
//! Artifacts are stored in memory as uploaded and served to dependent jobs,
//! with a redirect to an object-store URL for direct downloads.
//!
//! It is not GitLab: no pipelines, caches, runner registration or web UI, and it stores the trace exactly as received
//! (GitLab would also hide the job token in it; not doing so lets tests see
//! whether the runner masked it).

mod api;
mod artifacts;
mod git;
mod payload;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use servitor_proto::job::{Artifact, Cache, Credential, Hook, Service};
use servitor_runtime::secret::Secret;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The runner token a default stand-in accepts.
pub const DEFAULT_RUNNER_TOKEN: &str = "glrt-servitor-standin";

/// How long a job request is held when nothing is queued; short so tests
/// do not wait on it (GitLab's Workhorse holds ~50 s).
pub const DEFAULT_LONG_POLL: Duration = Duration::from_secs(2);

/// `X-GitLab-Trace-Update-Interval` in seconds: what GitLab sends while
/// someone watches the job's log.
pub const DEFAULT_TRACE_UPDATE_INTERVAL: u64 = 3;

/// GitLab's default maximum artifacts size (100 MB).
pub const DEFAULT_MAX_ARTIFACTS_SIZE: u64 = 100 * 1024 * 1024;

/// Project path jobs belong to unless their spec names one.
pub const DEFAULT_PROJECT_PATH: &str = "servitor/demo";

/// Why the stand-in cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("cannot listen on 127.0.0.1:{port} ({source}); pick a free port or 0")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("no job {0} in the stand-in")]
    NoSuchJob(i64),
    #[error("job {job_id} is {state:?}; {action} needs it {needs}")]
    WrongState {
        job_id: i64,
        state: JobState,
        action: &'static str,
        needs: &'static str,
    },
    #[error("job {job:?} needs {needs:?}, but no job of that name was pushed before it")]
    UnknownNeed { job: String, needs: String },
    #[error("git repository {dir} cannot be served ({reason}); create it with `git init` and commit to it")]
    Repository { dir: PathBuf, reason: String },
    #[error("job {job_id} did not reach {what} within {timeout:?}")]
    Timeout {
        job_id: i64,
        what: &'static str,
        timeout: Duration,
    },
    #[error("the runner did not make {count} job requests within {timeout:?}")]
    RequestsTimeout { count: usize, timeout: Duration },
}

impl StandInError {
    /// Nothing the stand-in refuses gets better by asking again.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// How to run a stand-in.
#[derive(Clone, Debug)]
pub struct StandInConfig {
    /// Runner tokens accepted; any other gets 403.
    pub runner_tokens: Vec<String>,
    /// Longest hold of a job request that carries the current `last_update`.
    pub long_poll: Duration,
    /// `X-GitLab-Trace-Update-Interval` sent on PUT and PATCH answers (seconds).
    pub trace_update_interval: u64,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            runner_tokens: vec![DEFAULT_RUNNER_TOKEN.to_owned()],
            long_poll: DEFAULT_LONG_POLL,
            trace_update_interval: DEFAULT_TRACE_UPDATE_INTERVAL,
            port: 0,
        }
    }
}

/// A job variable as a project would define it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VariableSpec {
    pub key: String,
    pub value: String,
    pub masked: bool,
    /// A file-type variable.
    pub file: bool,
}

/// A job's image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSpec {
    pub name: String,
    /// `always`, `if-not-present` or `never`, in order; empty leaves it to
    /// the runner.
    pub pull_policy: Vec<String>,
    /// `executor_opts`, as GitLab passes them; `null` when unset.
    pub executor_opts: serde_json::Value,
}

/// A repository served to the job over git's smart HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSpec {
    /// A local repository (work tree or bare) with at least one commit.
    pub repo_dir: PathBuf,
    /// The branch the job runs for; the repository's current branch if `None`.
    pub branch: Option<String>,
    /// `GIT_DEPTH`; 0 fetches everything.
    pub depth: i64,
}

/// A job to queue, in `.gitlab-ci.yml` terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub name: String,
    pub stage: String,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// The `release` step's script, as Rails builds it from `release:`.
    pub release: Vec<String>,
    pub variables: Vec<VariableSpec>,
    pub image: Option<ImageSpec>,
    pub timeout: Duration,
    /// `namespace/project`: the repository URL path and `CI_PROJECT_PATH`.
    pub project_path: String,
    pub git: Option<GitSpec>,
    /// `features.token_mask_prefixes` of the payload.
    pub token_mask_prefixes: Vec<String>,
    /// `artifacts[]` of the payload, as GitLab's presenter sends them.
    pub artifacts: Vec<Artifact>,
    /// `cache[]` of the payload (keys as Rails sends them, suffixes and
    /// all).
    pub cache: Vec<Cache>,
    /// `services[]` of the payload.
    pub services: Vec<Service>,
    /// `hooks[]` of the payload.
    pub hooks: Vec<Hook>,
    /// Names of earlier jobs whose artifacts this job downloads
    /// (`needs:`); the job is handed out only once they have finished.
    pub needs: Vec<String>,
    /// `credentials[]` of the payload: registry logins.
    pub credentials: Vec<Credential>,
    /// Only the runner with this token gets the job, as GitLab hands a job
    /// only to runners whose tags match it; any runner when `None`.
    pub runner_token: Option<String>,
}

impl JobSpec {
    /// A job with GitLab's defaults: stage `test`, a 1-hour timeout.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            stage: "test".to_owned(),
            script: Vec::new(),
            after_script: Vec::new(),
            release: Vec::new(),
            variables: Vec::new(),
            image: None,
            timeout: Duration::from_secs(3600),
            project_path: DEFAULT_PROJECT_PATH.to_owned(),
            git: None,
            token_mask_prefixes: Vec::new(),
            artifacts: Vec::new(),
            cache: Vec::new(),
            services: Vec::new(),
            hooks: Vec::new(),
            needs: Vec::new(),
            credentials: Vec::new(),
            runner_token: None,
        }
    }

    /// Hands the job only to the runner with `token` (as tags would).
    #[must_use]
    pub fn for_runner(mut self, token: impl Into<String>) -> Self {
        self.runner_token = Some(token.into());
        self
    }

    /// Adds a `credentials[]` entry of type `registry`, as GitLab sends for
    /// its container registry.
    #[must_use]
    pub fn registry_login(
        mut self,
        url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials.push(Credential {
            kind: "registry".to_owned(),
            url: url.into(),
            username: username.into(),
            password: password.into(),
        });
        self
    }

    /// `hooks:pre_get_sources_script`.
    #[must_use]
    pub fn pre_get_sources<I: IntoIterator<Item = S>, S: Into<String>>(mut self, lines: I) -> Self {
        self.hooks.push(Hook {
            name: "pre_get_sources_script".to_owned(),
            script: lines.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Adds a `services[]` entry.
    #[must_use]
    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// Adds a `cache[]` entry.
    #[must_use]
    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache.push(cache);
        self
    }

    /// Adds an `artifacts[]` entry.
    #[must_use]
    pub fn artifact(mut self, artifact: Artifact) -> Self {
        self.artifacts.push(artifact);
        self
    }

    /// `artifacts: paths:` as GitLab presents it: one `archive` entry in
    /// zip, uploaded on success.
    #[must_use]
    pub fn artifact_paths<I: IntoIterator<Item = S>, S: Into<String>>(self, paths: I) -> Self {
        self.artifact(Artifact {
            paths: paths.into_iter().map(Into::into).collect(),
            artifact_type: "archive".to_owned(),
            artifact_format: "zip".to_owned(),
            ..Artifact::default()
        })
    }

    /// `needs: [name]`: runs after the last job pushed under that name and
    /// downloads its artifacts before the script.
    #[must_use]
    pub fn needs(mut self, name: impl Into<String>) -> Self {
        self.needs.push(name.into());
        self
    }

    #[must_use]
    pub fn script<I: IntoIterator<Item = S>, S: Into<String>>(mut self, lines: I) -> Self {
        self.script = lines.into_iter().map(Into::into).collect();
        self
    }

    /// A `release` step (`release-cli create …` lines).
    #[must_use]
    pub fn release<I: IntoIterator<Item = S>, S: Into<String>>(mut self, lines: I) -> Self {
        self.release = lines.into_iter().map(Into::into).collect();
        self
    }

    #[must_use]
    pub fn after_script<I: IntoIterator<Item = S>, S: Into<String>>(mut self, lines: I) -> Self {
        self.after_script = lines.into_iter().map(Into::into).collect();
        self
    }

    #[must_use]
    pub fn variable(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.variables.push(VariableSpec {
            key: key.into(),
            value: value.into(),
            ..VariableSpec::default()
        });
        self
    }

    #[must_use]
    pub fn masked_variable(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.variables.push(VariableSpec {
            key: key.into(),
            value: value.into(),
            masked: true,
            file: false,
        });
        self
    }

    #[must_use]
    pub fn file_variable(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.variables.push(VariableSpec {
            key: key.into(),
            value: value.into(),
            masked: false,
            file: true,
        });
        self
    }

    #[must_use]
    pub fn image(mut self, name: impl Into<String>) -> Self {
        self.image = Some(ImageSpec {
            name: name.into(),
            ..ImageSpec::default()
        });
        self
    }

    /// Sets the image's pull policy (after [`Self::image`]).
    #[must_use]
    pub fn pull_policy(self, policy: impl Into<String>) -> Self {
        self.pull_policies([policy])
    }

    /// Sets the image's pull policies, tried in order (after
    /// [`Self::image`]).
    #[must_use]
    pub fn pull_policies<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        policies: I,
    ) -> Self {
        if let Some(image) = &mut self.image {
            image.pull_policy = policies.into_iter().map(Into::into).collect();
        }
        self
    }

    /// Sets the image's `executor_opts` (after [`Self::image`]).
    #[must_use]
    pub fn image_executor_opts(mut self, opts: serde_json::Value) -> Self {
        if let Some(image) = &mut self.image {
            image.executor_opts = opts;
        }
        self
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    #[must_use]
    pub fn project_path(mut self, path: impl Into<String>) -> Self {
        self.project_path = path.into();
        self
    }

    /// Serves `repo_dir` to the job, on its current branch, depth 20
    /// (GitLab's project default).
    #[must_use]
    pub fn git(mut self, repo_dir: impl Into<PathBuf>) -> Self {
        self.git = Some(GitSpec {
            repo_dir: repo_dir.into(),
            branch: None,
            depth: 20,
        });
        self
    }
}

/// A job's status, as GitLab's `Job-Status` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    Canceling,
    Canceled,
    Success,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Success => "success",
            Self::Failed => "failed",
        }
    }

    /// Job-token calls are allowed in these states (Rails' `EXECUTING_STATUSES`).
    pub fn is_executing(self) -> bool {
        matches!(self, Self::Running | Self::Canceling)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Canceled | Self::Success | Self::Failed)
    }
}

/// One `PUT /jobs/:id` as received.
#[derive(Clone, Debug)]
pub struct UpdateRecord {
    pub at: Instant,
    pub state: String,
    pub failure_reason: Option<String>,
    /// `None` when the field was absent.
    pub exit_code: Option<i64>,
    pub checksum: Option<String>,
    pub bytesize: Option<u64>,
    /// The status the stand-in answered.
    pub status: u16,
    /// The body (its `token` replaced with `***`).
    pub body: serde_json::Value,
}

/// One `PATCH /jobs/:id/trace` as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchRecord {
    pub at: Instant,
    /// The start of `Content-Range`, when it parsed.
    pub start: Option<u64>,
    pub len: usize,
    pub status: u16,
}

/// Everything the stand-in knows about a job.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub id: i64,
    pub name: String,
    pub token: Secret,
    pub state: JobState,
    /// The trace as stored (exactly the accepted PATCH bodies, in order).
    pub trace: Vec<u8>,
    pub updates: Vec<UpdateRecord>,
    /// The final update GitLab applied.
    pub final_update: Option<UpdateRecord>,
    /// Whether the final update's checksum matched the stored trace.
    pub checksum_ok: Option<bool>,
    /// Whether the final update's bytesize matched the stored trace.
    pub bytesize_ok: Option<bool>,
    pub patches: Vec<PatchRecord>,
    /// The 201 body the runner got (`null` while pending).
    pub payload: serde_json::Value,
    /// The runner manager the job went to.
    pub system_id: Option<String>,
    /// The token of the runner that took it.
    pub runner_token: Option<String>,
    /// Whether that runner advertised `cancel_gracefully`.
    pub supports_canceling: bool,
    /// When a job request took it (the 201 answer).
    pub handed_out: Option<Instant>,
    /// Artifacts uploaded, in order.
    pub artifacts: Vec<ArtifactRecord>,
}

/// One `POST /jobs/:id/artifacts` the stand-in stored.
#[derive(Clone, Debug)]
pub struct ArtifactRecord {
    pub at: Instant,
    pub artifact_type: String,
    pub artifact_format: String,
    pub expire_in: Option<String>,
    /// The multipart part's file name.
    pub filename: String,
    pub body: Vec<u8>,
}

/// One request to the stand-in's object store (a direct download).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRequest {
    pub key: String,
    /// Whether the job token was sent along (it must not be).
    pub job_token_sent: bool,
}

impl JobRecord {
    /// The trace as text (lossy), for assertions.
    pub fn trace_text(&self) -> String {
        String::from_utf8_lossy(&self.trace).into_owned()
    }
}

/// Jobs by stage, see [`StandIn::counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub pending: usize,
    /// Running or canceling.
    pub running: usize,
    /// Success, failed or canceled.
    pub finished: usize,
    /// Trace bytes stored over all jobs.
    pub trace_bytes: u64,
}

/// One `POST /jobs/request` as received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub at: Instant,
    pub system_id: Option<String>,
    pub last_update: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// The status answered (0 while the request is held).
    pub status: u16,
}

/// One `POST /runners/verify` as received.
#[derive(Clone, Debug)]
pub struct VerifyRecord {
    pub at: Instant,
    pub system_id: Option<String>,
    pub info: serde_json::Value,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub status: u16,
}

/// An endpoint faults can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Verify,
    RequestJob,
    UpdateJob(i64),
    PatchTrace(i64),
    /// `GET /jobs/:id/artifacts` of the job whose artifacts are fetched.
    DownloadArtifacts(i64),
    /// `POST /jobs/:id/artifacts`.
    UploadArtifacts(i64),
}

/// An injected answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub status: u16,
    /// `Retry-After` in seconds.
    pub retry_after: Option<u64>,
    /// The request is carried out as usual and only its answer is lost
    /// (replaced by this one), as when a proxy times out after Rails
    /// applied it. Trace PATCHes honour it; other routes answer it
    /// without applying the request.
    pub applied: bool,
}

impl Fault {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            applied: false,
        }
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            status: 429,
            retry_after: Some(retry_after_secs),
            applied: false,
        }
    }

    /// The request is applied, its answer lost: the runner sees a 502.
    pub fn lost_answer() -> Self {
        Self {
            status: 502,
            retry_after: None,
            applied: true,
        }
    }
}

/// What every request meets before it is handled: a slow or a down GitLab.
#[derive(Clone, Copy, Debug, Default)]
struct Weather {
    latency: Duration,
    /// Every request is answered 502, as a proxy in front of a GitLab that
    /// is down answers.
    down: bool,
}

/// A job and what only the stand-in needs about it.
struct Job {
    record: JobRecord,
    spec: JobSpec,
    pipeline_id: i64,
    /// Repository commit and branch, when the job has a repository.
    sha: Option<String>,
    branch: String,
    /// Answer the next PATCHes 416 regardless of offset.
    force_416: u32,
    /// Answer the next final updates 202.
    not_accepted: u32,
    /// Answer the next final updates 412, dropping the trace held.
    reject_trace: u32,
    /// The jobs `spec.needs` names, resolved when it was pushed.
    needs: Vec<i64>,
}

/// A runner manager seen on verify or job request.
#[derive(Clone, Debug, Default)]
struct Manager {
    cancel_gracefully: bool,
}

struct Inner {
    next_job_id: i64,
    jobs: BTreeMap<i64, Job>,
    queue: VecDeque<i64>,
    /// The runner queue version (`X-GitLab-Last-Update`).
    queue_value: String,
    managers: HashMap<String, Manager>,
    requests: Vec<RequestRecord>,
    verifies: Vec<VerifyRecord>,
    faults: HashMap<Route, VecDeque<Fault>>,
    /// Larger uploads get 413.
    max_artifacts_size: u64,
    /// Direct downloads redirect to the object store.
    object_storage: bool,
    objects: HashMap<String, Vec<u8>>,
    object_requests: Vec<ObjectRequest>,
    /// Other projects' repositories by path (submodules).
    repositories: HashMap<String, PathBuf>,
}

struct State {
    config: StandInConfig,
    base_url: String,
    inner: Mutex<Inner>,
    /// Bumped on every change, for long polls and waiters.
    changed: watch::Sender<u64>,
    /// Job requests received so far, for tests that wait for the runner to
    /// ask (apart from `changed`, which wakes held long polls).
    requests_seen: watch::Sender<usize>,
    weather: Mutex<Weather>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn weather(&self) -> Weather {
        *self.weather.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_fault(&self, route: Route) -> Option<Fault> {
        self.lock().faults.get_mut(&route)?.pop_front()
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A running stand-in. Dropping it stops the server.
pub struct StandIn {
    state: Arc<State>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn").field("addr", &self.addr).finish()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl StandIn {
    /// Starts serving on 127.0.0.1.
    ///
    /// # Errors
    /// [`StandInError::Bind`] when the port is taken.
    pub async fn start(config: StandInConfig) -> Result<Self, StandInError> {
        let port = config.port;
        let bind = |source| StandInError::Bind { port, source };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let (changed, _) = watch::channel(0);
        let (requests_seen, _) = watch::channel(0);
        let state = Arc::new(State {
            config,
            base_url: format!("http://{addr}"),
            inner: Mutex::new(Inner {
                next_job_id: 1,
                jobs: BTreeMap::new(),
                queue: VecDeque::new(),
                queue_value: random_hex(16),
                managers: HashMap::new(),
                requests: Vec::new(),
                verifies: Vec::new(),
                faults: HashMap::new(),
                max_artifacts_size: DEFAULT_MAX_ARTIFACTS_SIZE,
                object_storage: true,
                objects: HashMap::new(),
                object_requests: Vec::new(),
                repositories: HashMap::new(),
            }),
            changed,
            requests_seen,
            weather: Mutex::new(Weather::default()),
        });
        let stop = CancellationToken::new();
        let router = api::router(Arc::clone(&state));
        crate::serve(listener, router, &stop, "gitlab stand-in");
        Ok(Self { state, addr, stop })
    }

    /// The GitLab URL to configure the runner with, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.state.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a job as GitLab does when a pipeline creates it; the next job
    /// request gets it. With a repository, the pipeline's persistent ref
    /// (`refs/pipelines/<id>`) is created in it, as GitLab does.
    ///
    /// # Errors
    /// [`StandInError::Repository`] when the repository has no commit or
    /// git cannot read it.
    pub async fn push_job(&self, spec: JobSpec) -> Result<i64, StandInError> {
        let (id, pipeline_id, needs) = {
            let mut inner = self.state.lock();
            let mut needs = Vec::new();
            for name in &spec.needs {
                let found = inner
                    .jobs
                    .values()
                    .rev()
                    .find(|job| &job.record.name == name)
                    .map(|job| job.record.id);
                match found {
                    Some(id) => needs.push(id),
                    None => {
                        return Err(StandInError::UnknownNeed {
                            job: spec.name.clone(),
                            needs: name.clone(),
                        })
                    }
                }
            }
            let id = inner.next_job_id;
            inner.next_job_id += 1;
            (id, 1000 + id, needs)
        };
        let (sha, branch) = match &spec.git {
            Some(git) => {
                let (sha, branch) = git::head(&git.repo_dir, git.branch.as_deref()).await?;
                git::create_pipeline_ref(&git.repo_dir, pipeline_id, &sha).await?;
                (Some(sha), branch)
            }
            None => (None, "main".to_owned()),
        };
        let token = format!("glcbt-{}", payload::random_token(20));
        let job = Job {
            record: JobRecord {
                id,
                name: spec.name.clone(),
                token: Secret::new(token),
                state: JobState::Pending,
                trace: Vec::new(),
                updates: Vec::new(),
                final_update: None,
                checksum_ok: None,
                bytesize_ok: None,
                patches: Vec::new(),
                payload: serde_json::Value::Null,
                system_id: None,
                runner_token: None,
                supports_canceling: false,
                handed_out: None,
                artifacts: Vec::new(),
            },
            spec,
            pipeline_id,
            sha,
            branch,
            force_416: 0,
            not_accepted: 0,
            reject_trace: 0,
            needs,
        };
        {
            let mut inner = self.state.lock();
            inner.jobs.insert(id, job);
            inner.queue.push_back(id);
            // A new job ticks the runner queue, as Rails' `tick_runner_queue`.
            inner.queue_value = random_hex(16);
        }
        self.state.bump();
        Ok(id)
    }

    /// Cancels a job as the UI does. Graceful: a running job goes to
    /// `canceling` when its runner advertised `cancel_gracefully`, else
    /// straight to `canceled`. Forced: `canceled` at once.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`], or [`StandInError::WrongState`] for a
    /// job already finished.
    pub fn cancel(&self, job_id: i64, graceful: bool) -> Result<JobState, StandInError> {
        let new_state = {
            let mut inner = self.state.lock();
            let job = inner
                .jobs
                .get_mut(&job_id)
                .ok_or(StandInError::NoSuchJob(job_id))?;
            let state = job.record.state;
            let new_state = match state {
                JobState::Pending => JobState::Canceled,
                JobState::Running if graceful && job.record.supports_canceling => {
                    JobState::Canceling
                }
                JobState::Running | JobState::Canceling => JobState::Canceled,
                _ => {
                    return Err(StandInError::WrongState {
                        job_id,
                        state,
                        action: "cancel",
                        needs: "pending, running or canceling",
                    })
                }
            };
            job.record.state = new_state;
            if state == JobState::Pending {
                inner.queue.retain(|id| *id != job_id);
            }
            new_state
        };
        self.state.bump();
        Ok(new_state)
    }

    /// Marks a job failed from GitLab's side (as a stuck-job or timeout
    /// sweep does); the runner then sees `Job-Status: failed` / 403.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`].
    pub fn drop_job(&self, job_id: i64) -> Result<(), StandInError> {
        self.with_job(job_id, |job| job.record.state = JobState::Failed)
    }

    /// Sets the maximum artifacts size; larger uploads get 413.
    pub fn set_max_artifacts_size(&self, bytes: u64) {
        self.state.lock().max_artifacts_size = bytes;
    }

    /// Serves `dir` as the repository of project `path` (`group/lib`), to
    /// any running job's token: a submodule's project.
    pub fn serve_repository(&self, path: &str, dir: impl Into<PathBuf>) {
        self.state
            .lock()
            .repositories
            .insert(path.trim_matches('/').to_owned(), dir.into());
    }

    /// Requests the object store behind direct downloads received.
    pub fn object_requests(&self) -> Vec<ObjectRequest> {
        self.state.lock().object_requests.clone()
    }

    /// A snapshot of one job.
    pub fn job(&self, job_id: i64) -> Option<JobRecord> {
        self.state
            .lock()
            .jobs
            .get(&job_id)
            .map(|j| j.record.clone())
    }

    /// Jobs waiting for a runner to take them.
    pub fn pending(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// How many jobs are in each stage, and the trace bytes stored, without
    /// copying any job (for load generators that watch a large stand-in).
    pub fn counts(&self) -> JobCounts {
        let inner = self.state.lock();
        let mut counts = JobCounts {
            pending: inner.queue.len(),
            ..JobCounts::default()
        };
        for job in inner.jobs.values() {
            match job.record.state {
                JobState::Pending => {}
                JobState::Running | JobState::Canceling => counts.running += 1,
                JobState::Success | JobState::Failed | JobState::Canceled => counts.finished += 1,
            }
            counts.trace_bytes += job.record.trace.len() as u64;
        }
        counts
    }

    /// When each of `job_ids` was handed out to a runner (`None` for jobs
    /// not taken or unknown), in the same order.
    pub fn handed_out(&self, job_ids: &[i64]) -> Vec<Option<Instant>> {
        let inner = self.state.lock();
        job_ids
            .iter()
            .map(|id| inner.jobs.get(id).and_then(|j| j.record.handed_out))
            .collect()
    }

    /// Snapshots of all jobs, by id.
    pub fn jobs(&self) -> Vec<JobRecord> {
        self.state
            .lock()
            .jobs
            .values()
            .map(|j| j.record.clone())
            .collect()
    }

    /// Waits until `check` holds for the job.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`], or [`StandInError::Timeout`] naming `what`.
    pub async fn wait_for(
        &self,
        job_id: i64,
        what: &'static str,
        timeout: Duration,
        check: impl Fn(&JobRecord) -> bool,
    ) -> Result<JobRecord, StandInError> {
        let mut changes = self.state.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let record = self.job(job_id).ok_or(StandInError::NoSuchJob(job_id))?;
            if check(&record) {
                return Ok(record);
            }
            let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
            if changed.is_err() {
                return Err(StandInError::Timeout {
                    job_id,
                    what,
                    timeout,
                });
            }
        }
    }

    /// Waits until the job is success, failed or canceled.
    ///
    /// # Errors
    /// As [`Self::wait_for`].
    pub async fn wait_for_final(
        &self,
        job_id: i64,
        timeout: Duration,
    ) -> Result<JobRecord, StandInError> {
        self.wait_for(job_id, "a final state", timeout, |j| j.state.is_final())
            .await
    }

    /// Answers the next calls to `route` with `faults`, in order.
    pub fn fail_next(&self, route: Route, faults: Vec<Fault>) {
        self.state
            .lock()
            .faults
            .entry(route)
            .or_default()
            .extend(faults);
    }

    /// Every request waits `latency` before it is handled (a slow GitLab);
    /// zero ends that.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .weather
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .latency = latency;
    }

    /// While `down`, every request is answered 502 Bad Gateway unhandled,
    /// as the proxy in front of a GitLab that is down answers.
    pub fn set_down(&self, down: bool) {
        self.state
            .weather
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .down = down;
        self.state.bump();
    }

    /// Answers the next job requests with `faults`, in order.
    pub fn fail_next_requests(&self, faults: Vec<Fault>) {
        self.fail_next(Route::RequestJob, faults);
    }

    /// Cuts the stored trace to `len` bytes, so the runner's next PATCH
    /// gets a 416 and must resend from there.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`].
    pub fn truncate_trace(&self, job_id: i64, len: usize) -> Result<(), StandInError> {
        self.with_job(job_id, |job| job.record.trace.truncate(len))
    }

    /// Answers the job's next PATCH 416 whatever its offset.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`].
    pub fn next_patch_416(&self, job_id: i64) -> Result<(), StandInError> {
        self.with_job(job_id, |job| job.force_416 += 1)
    }

    /// Answers the job's next final update 412 (trace validation failed)
    /// and drops the trace it holds, so the whole trace must come again.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`].
    pub fn reject_final_trace(&self, job_id: i64) -> Result<(), StandInError> {
        self.with_job(job_id, |job| job.reject_trace += 1)
    }

    /// Answers the job's next `count` final updates 202 (trace still being
    /// persisted), as Rails does.
    ///
    /// # Errors
    /// [`StandInError::NoSuchJob`].
    pub fn accept_final_after(&self, job_id: i64, count: u32) -> Result<(), StandInError> {
        self.with_job(job_id, |job| job.not_accepted = count)
    }

    /// Every job request so far, oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.state.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().requests.len()
    }

    /// Waits until the runner has made `count` job requests in all (the
    /// last one may still be held).
    ///
    /// # Errors
    /// [`StandInError::RequestsTimeout`].
    pub async fn wait_for_requests(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<(), StandInError> {
        let mut seen = self.state.requests_seen.subscribe();
        let reached = tokio::time::timeout(timeout, async {
            seen.wait_for(|n| *n >= count).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(StandInError::RequestsTimeout { count, timeout }),
        }
    }

    /// Every verify call so far.
    pub fn verify_log(&self) -> Vec<VerifyRecord> {
        self.state.lock().verifies.clone()
    }

    /// The current runner queue version (`X-GitLab-Last-Update`).
    pub fn queue_value(&self) -> String {
        self.state.lock().queue_value.clone()
    }

    fn with_job(&self, job_id: i64, f: impl FnOnce(&mut Job)) -> Result<(), StandInError> {
        {
            let mut inner = self.state.lock();
            let job = inner
                .jobs
                .get_mut(&job_id)
                .ok_or(StandInError::NoSuchJob(job_id))?;
            f(job);
        }
        self.state.bump();
        Ok(())
    }
}
