//! The GitLab runner API client: one method per endpoint we use, each
//! returning a classified answer or a [`GitLabError`].
//!
//! It owns the wire details (base URL, headers, bodies, the
//! `X-GitLab-Last-Update` echo, `Retry-After`) and nothing else: it does not
//! keep jobs alive or stream logs (see the reporter) and retries only inside
//! [`GitLabClient::next_job`], the job-request driver.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::{Response, StatusCode};
use serde_json::{json, Map, Value};
use servitor_proto::job::{JobPayload, PayloadError};
use servitor_runtime::backoff::Backoff;
use servitor_runtime::secret::Secret;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::GitLabError;

/// The runner name GitLab shows for this runner manager.
pub const RUNNER_NAME: &str = "servitor";

/// `User-Agent` of every call, so GitLab admins can tell our runner apart.
pub const USER_AGENT: &str = concat!("servitor/", env!("CARGO_PKG_VERSION"));

/// HTTP timeout of `jobs/request`: Workhorse may hold the request ~50 s
/// (long polling), so anything at or below 60 s would cut healthy polls.
pub const JOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Default timeout of every other call: these answer at once when GitLab is
/// healthy, and a hung call must not stall a job's keep-alives for long.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Least time between two job requests when GitLab answers "no job" without
/// holding the request (gitlab-runner's `check_interval` default).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(3);

/// Default cap of a job's log, as gitlab-runner's `output_limit`
/// (`DefaultTraceOutputLimit`, 4 MiB).
pub const DEFAULT_OUTPUT_LIMIT: u64 = 4 * 1024 * 1024;

/// Longest `Retry-After` we obey: a larger value is more likely a broken
/// proxy than a real request to stay away for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// A job request that took at least this long was held by Workhorse's long
/// poll, so the next one can go out at once.
const LONG_POLL_HELD: Duration = Duration::from_secs(1);

/// How much of an error body we keep for an error message.
const ERROR_BODY_CHARS: usize = 300;

/// Largest job payload read. GitLab's are well under a megabyte even with
/// hundreds of variables; a larger answer is a broken GitLab or a proxy,
/// and must not make the coordinator allocate without bound.
pub const MAX_JOB_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// Largest body read of any other answer (errors, verify).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Header carrying GitLab's per-runner queue version.
const LAST_UPDATE_HEADER: &str = "x-gitlab-last-update";
/// Header carrying the job's status on PUT/PATCH answers.
const JOB_STATUS_HEADER: &str = "job-status";
/// Header carrying the trace update interval (seconds).
const UPDATE_INTERVAL_HEADER: &str = "x-gitlab-trace-update-interval";

/// Where and how to reach GitLab.
#[derive(Clone, Debug)]
pub struct GitLabSettings {
    /// The GitLab instance, e.g. `https://gitlab.example.com` (a trailing
    /// `/` or `/ci` is accepted, as gitlab-runner does).
    pub url: String,
    /// The runner authentication token (`glrt-…`).
    pub token: Secret,
    /// This runner manager's id (`s_` + 12 alphanumerics).
    pub system_id: String,
    /// Timeout of every call except the long-polled job request.
    pub request_timeout: Duration,
    /// Least time between job requests that GitLab answers without holding.
    pub poll_interval: Duration,
    /// The executor name shown in GitLab.
    pub executor: String,
    /// Cap of each job's log in bytes; output past it is dropped.
    pub output_limit: u64,
}

impl GitLabSettings {
    /// Settings with the defaults for everything but where to go and who we are.
    pub fn new(url: impl Into<String>, token: Secret, system_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token,
            system_id: system_id.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            executor: "docker".to_owned(),
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }
}

/// The features this runner advertises in `info.features`.
///
/// Only what we implement is `true`. GitLab decides from this list which
/// jobs it may hand us: a job needing a feature we do not claim (artifacts
/// reports, `release:`, …) is dropped by GitLab with `runner_unsupported`
/// instead of being run wrongly, while claiming a feature we lack would make
/// GitLab hand us jobs whose needs we then silently ignore. Keep this in
/// step with what the coordinator and agents really do.
pub fn runner_features() -> Map<String, Value> {
    const FEATURES: &[(&str, bool)] = &[
        ("variables", true),
        ("image", true),
        ("cancelable", true),
        ("cancel_gracefully", true),
        ("trace_reset", true),
        ("trace_checksum", true),
        ("trace_size", true),
        ("masking", true),
        ("refspecs", true),
        ("return_exit_code", true),
        ("raw_variables", true),
        // Agents upload artifacts (archive and reports, zip, gzip and raw)
        // and download dependencies themselves, with the job token.
        ("artifacts", true),
        ("artifacts_exclude", true),
        ("upload_multiple_artifacts", true),
        ("upload_raw_artifacts", true),
        // Caches: keys, fallbacks, policies, in S3 or a local directory.
        ("cache", true),
        ("fallback_cache_keys", true),
        // `release:` runs as its own step after the script.
        ("multi_build_steps", true),
        // Services on a network of the job's own, aliases and variables.
        ("services", true),
        ("service_variables", true),
        ("service_multiple_aliases", true),
        // `executor_opts: {docker: {platform, user}}` for images and
        // services; an unknown option fails the job.
        ("image_executor_opts", true),
        ("service_executor_opts", true),
        ("shared", false),
        ("session", false),
        ("terminal", false),
        ("proxy", false),
        ("vault_secrets", false),
        ("native_steps_integration", false),
        ("two_phase_job_commit", false),
        ("job_inputs", false),
    ];
    FEATURES
        .iter()
        .map(|(name, on)| ((*name).to_owned(), Value::Bool(*on)))
        .collect()
}

/// GitLab's architecture names follow Go's `GOARCH`.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// What `POST /runners/verify` told us.
#[derive(Clone, Debug, Default)]
pub struct VerifiedRunner {
    /// The runner's id, when GitLab sent one (very old GitLab answers plain text).
    pub id: Option<i64>,
    /// When the runner token expires (ISO 8601), if it does.
    pub token_expires_at: Option<String>,
}

/// The answer to one job request.
#[derive(Debug)]
pub enum RequestedJob {
    /// GitLab assigned a job to us; it is now ours to run or fail.
    Job(ReceivedJob),
    /// No job for now.
    NoJob,
}

/// A job GitLab assigned to this runner.
pub struct ReceivedJob {
    /// The 201 body exactly as received.
    pub raw: Bytes,
    /// The parsed job, or why it cannot be used.
    pub payload: Result<Box<JobPayload>, UnusableJob>,
}

impl std::fmt::Debug for ReceivedJob {
    // The payload holds the job token and masked variables: print only the id.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = match &self.payload {
            Ok(job) => Some(job.id),
            Err(unusable) => unusable.id,
        };
        f.debug_struct("ReceivedJob")
            .field("bytes", &self.raw.len())
            .field("id", &id)
            .field("usable", &self.payload.is_ok())
            .finish()
    }
}

/// A job GitLab assigned whose payload we cannot use. It must still be
/// failed (see [`GitLabClient::reject_job`]) when its id and token are
/// known, or GitLab keeps it running until its stuck-job timeout.
pub struct UnusableJob {
    pub id: Option<i64>,
    pub token: Option<Secret>,
    pub error: PayloadError,
}

impl std::fmt::Debug for UnusableJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnusableJob")
            .field("id", &self.id)
            .field("token", &self.token)
            .field("error", &self.error.to_string())
            .finish()
    }
}

impl ReceivedJob {
    fn parse(raw: Bytes) -> Self {
        let payload = JobPayload::from_json(&raw).map(Box::new).map_err(|error| {
            let value: Option<Value> = serde_json::from_slice(&raw).ok();
            let id = value.as_ref().and_then(|v| v.get("id")?.as_i64());
            let token = value
                .as_ref()
                .and_then(|v| v.get("token")?.as_str())
                .filter(|t| !t.is_empty())
                .map(Secret::new);
            UnusableJob { id, token, error }
        });
        Self { raw, payload }
    }
}

/// The job state sent with `PUT /jobs/:id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Running,
    Success,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
        }
    }
}

/// The trace summary of a final update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceOutput {
    /// IEEE CRC-32 of every trace byte sent.
    pub checksum: u32,
    /// Number of trace bytes sent.
    pub bytesize: u64,
}

impl TraceOutput {
    /// The summary of a whole trace.
    pub fn of(trace: &[u8]) -> Self {
        Self {
            checksum: crc32fast::hash(trace),
            bytesize: trace.len() as u64,
        }
    }

    /// The checksum as GitLab expects it: `crc32:%08x`.
    pub fn checksum_string(&self) -> String {
        format!("crc32:{:08x}", self.checksum)
    }
}

/// One `PUT /jobs/:id` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobUpdate {
    pub state: JobState,
    /// Sent only with `failed`; must be a reason the job's GitLab accepts.
    pub failure_reason: Option<&'static str>,
    /// Omitted when 0 or unknown, as gitlab-runner does.
    pub exit_code: Option<i32>,
    pub output: Option<TraceOutput>,
}

impl JobUpdate {
    /// The keep-alive (and commit) update.
    pub fn running() -> Self {
        Self {
            state: JobState::Running,
            failure_reason: None,
            exit_code: None,
            output: None,
        }
    }

    fn body(&self, token: &Secret, info: Value) -> Value {
        let mut body = Map::new();
        body.insert("token".into(), token.expose().into());
        body.insert("state".into(), self.state.as_str().into());
        if self.state == JobState::Failed {
            if let Some(reason) = self.failure_reason {
                body.insert("failure_reason".into(), reason.into());
            }
        }
        if let Some(code) = self.exit_code.filter(|c| *c != 0) {
            body.insert("exit_code".into(), code.into());
        }
        if let Some(output) = &self.output {
            let checksum = output.checksum_string();
            // The top-level checksum is deprecated but older GitLab reads only it.
            body.insert("checksum".into(), checksum.clone().into());
            body.insert(
                "output".into(),
                json!({ "checksum": checksum, "bytesize": output.bytesize }),
            );
        }
        body.insert("info".into(), info);
        Value::Object(body)
    }
}

/// The job status GitLab reports in `Job-Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteJobStatus {
    Running,
    /// Graceful cancel: stop the script, run after_script, send the final update.
    Canceling,
    /// Hard cancel: stop everything, no final update.
    Canceled,
    Failed,
    Success,
    Other(String),
}

impl RemoteJobStatus {
    pub fn parse(value: &str) -> Self {
        match value.trim() {
            "running" => Self::Running,
            "canceling" => Self::Canceling,
            "canceled" => Self::Canceled,
            "failed" => Self::Failed,
            "success" => Self::Success,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Running => "running",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Failed => "failed",
            Self::Success => "success",
            Self::Other(s) => s,
        }
    }

    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(JOB_STATUS_HEADER)?.to_str().ok()?;
        (!value.trim().is_empty()).then(|| Self::parse(value))
    }
}

/// How GitLab took a `PUT /jobs/:id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateAck {
    /// 200: applied.
    Accepted,
    /// 202: the final state is accepted but GitLab is still persisting the
    /// live trace; send the same update again after the interval.
    NotYetAccepted,
    /// 412: GitLab rejected the trace (checksum mismatch); send the whole
    /// trace again from offset 0, then the update.
    TraceRejected,
}

/// A classified `PUT /jobs/:id` answer.
#[derive(Clone, Debug)]
pub struct UpdateResponse {
    pub ack: UpdateAck,
    pub job_status: Option<RemoteJobStatus>,
    pub update_interval: Option<Duration>,
}

/// What happened to one trace PATCH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchOutcome {
    /// 202: appended; GitLab now holds `remote_size` bytes.
    Appended { remote_size: u64 },
    /// 416: our offset was wrong; GitLab holds `remote_size` bytes, so send
    /// again from there.
    RangeMismatch { remote_size: u64 },
}

/// A classified `PATCH /jobs/:id/trace` answer.
#[derive(Clone, Debug)]
pub struct PatchResponse {
    pub outcome: PatchOutcome,
    pub job_status: Option<RemoteJobStatus>,
    pub update_interval: Option<Duration>,
}

/// The GitLab runner API client. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct GitLabClient {
    http: reqwest::Client,
    /// `<url>/api/v4/`.
    api: String,
    settings: GitLabSettings,
    /// The last non-empty `X-GitLab-Last-Update` seen on any answer.
    last_update: Mutex<Option<String>>,
}

/// Applies gitlab-runner's URL rule: strip a trailing `/` and `/ci`, then
/// append `/api/v4/`.
fn api_base(url: &str) -> Result<String, GitLabError> {
    let invalid = |reason: &str| GitLabError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let mut base = url.trim().trim_end_matches('/');
    if let Some(stripped) = base.strip_suffix("/ci") {
        base = stripped.trim_end_matches('/');
    }
    let parsed = reqwest::Url::parse(base).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("only http and https are supported"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "it must not carry credentials; the token goes in the token file",
        ));
    }
    Ok(format!("{base}/api/v4/"))
}

/// A fresh correlation id: 32 hex digits, like a UUID without dashes.
fn request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Parses `Retry-After` given in seconds. The HTTP-date form is not used by
/// GitLab (it sends seconds) and falls back to our own backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Parses `X-GitLab-Trace-Update-Interval` (seconds).
fn update_interval(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(UPDATE_INTERVAL_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// Parses a `Range: 0-<size>` answer header into the size.
fn remote_size(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::RANGE)?.to_str().ok()?;
    let (_, end) = value.trim().split_once('-')?;
    end.trim().parse().ok()
}

/// Errors every endpoint shares: rate limits and server trouble.
fn transient(status: StatusCode, headers: &HeaderMap) -> Option<GitLabError> {
    match status.as_u16() {
        429 => Some(GitLabError::RateLimited {
            retry_after: retry_after(headers),
        }),
        408 | 500..=599 => Some(GitLabError::Server {
            status: status.as_u16(),
            retry_after: retry_after(headers),
        }),
        _ => None,
    }
}

/// An answer's body, at most `limit` bytes of it: a longer one is
/// refused as soon as it is known to be longer (by its `Content-Length` or
/// as it arrives), never read whole.
///
/// # Errors
/// [`GitLabError::AnswerTooLarge`], or [`GitLabError::Transport`] when the
/// body breaks off.
async fn body_capped(
    mut response: Response,
    what: &'static str,
    limit: usize,
) -> Result<Bytes, GitLabError> {
    let too_large = || GitLabError::AnswerTooLarge { what, limit };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| GitLabError::Transport(e.without_url()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Builds an error for an answer nobody expects, keeping GitLab's message.
async fn unexpected(what: &'static str, response: Response) -> GitLabError {
    let status = response.status().as_u16();
    let text = match body_capped(response, what, MAX_ANSWER_BYTES).await {
        Ok(body) => String::from_utf8_lossy(&body).into_owned(),
        Err(e) => e.to_string(),
    };
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").map(Value::to_string))
        .unwrap_or(text);
    GitLabError::Unexpected {
        what,
        status,
        message: message.chars().take(ERROR_BODY_CHARS).collect(),
    }
}

impl GitLabClient {
    /// Builds a client.
    ///
    /// # Errors
    /// [`GitLabError::InvalidUrl`] for a URL gitlab-runner would refuse too,
    /// [`GitLabError::Client`] if the HTTP stack cannot start.
    pub fn new(settings: GitLabSettings) -> Result<Self, GitLabError> {
        let api = api_base(&settings.url)?;
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(settings.request_timeout)
            .build()
            .map_err(GitLabError::Client)?;
        Ok(Self {
            http,
            api,
            settings,
            last_update: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> &GitLabSettings {
        &self.settings
    }

    /// The API base, `<url>/api/v4/`.
    pub fn api_url(&self) -> &str {
        &self.api
    }

    /// The `last_update` value the next job request will carry.
    pub fn last_update(&self) -> Option<String> {
        self.last_update
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The `info` object sent with verify, job requests and updates.
    pub fn info(&self) -> Value {
        json!({
            "name": RUNNER_NAME,
            "version": env!("CARGO_PKG_VERSION"),
            "platform": std::env::consts::OS,
            "architecture": go_arch(),
            "executor": self.settings.executor,
            "features": runner_features(),
        })
    }

    /// Sends a request with the headers every call carries and remembers
    /// `X-GitLab-Last-Update` from the answer.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Response, GitLabError> {
        let response = request
            .header("X-Request-Id", request_id())
            .send()
            .await
            .map_err(|e| GitLabError::Transport(e.without_url()))?;
        if let Some(value) = response
            .headers()
            .get(LAST_UPDATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            *self
                .last_update
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(value.to_owned());
        }
        Ok(response)
    }

    fn post_json(&self, path: &str, body: &Value, timeout: Duration) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.api))
            .timeout(timeout)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(body)
    }

    /// `POST /runners/verify`: checks the token and registers this runner
    /// manager (with `system_id` and `info`).
    ///
    /// # Errors
    /// [`GitLabError::Forbidden`] for a bad or deleted token,
    /// [`GitLabError::Orphaned`] for an orphaned runner, transient errors
    /// for rate limits, server trouble and transport failures.
    pub async fn verify(&self) -> Result<VerifiedRunner, GitLabError> {
        let body = json!({
            "token": self.settings.token.expose(),
            "system_id": self.settings.system_id,
            "info": self.info(),
        });
        let response = self
            .send(self.post_json("runners/verify", &body, self.settings.request_timeout))
            .await?;
        let status = response.status();
        match status.as_u16() {
            200 | 201 => {
                // Very old GitLab answers plain text; the token is still good.
                let body = body_capped(response, "runner verify", MAX_ANSWER_BYTES).await?;
                let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                Ok(VerifiedRunner {
                    id: value.get("id").and_then(Value::as_i64),
                    token_expires_at: value
                        .get("token_expires_at")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                })
            }
            403 => Err(GitLabError::Forbidden),
            422 => Err(GitLabError::Orphaned),
            _ => match transient(status, response.headers()) {
                Some(e) => Err(e),
                None => Err(unexpected("runner verify", response).await),
            },
        }
    }

    /// One `POST /jobs/request`. GitLab may hold it up to about 50 s.
    ///
    /// # Errors
    /// [`GitLabError::Forbidden`] (bad token, not retryable),
    /// [`GitLabError::Conflict`], [`GitLabError::RateLimited`],
    /// [`GitLabError::Server`], [`GitLabError::Transport`] (retryable), and
    /// [`GitLabError::Unexpected`] for anything else.
    pub async fn request_job(&self) -> Result<RequestedJob, GitLabError> {
        self.request_job_once().await.map(|(job, _)| job)
    }

    /// Like `request_job`, also telling whether a "no job" answer came with
    /// a queue version (from Rails) or bare (from Workhorse's long poll).
    async fn request_job_once(&self) -> Result<(RequestedJob, bool), GitLabError> {
        let mut body = json!({
            "token": self.settings.token.expose(),
            "system_id": self.settings.system_id,
            "info": self.info(),
        });
        if let Some(last_update) = self.last_update() {
            body["last_update"] = Value::String(last_update);
        }
        let response = self
            .send(self.post_json("jobs/request", &body, JOB_REQUEST_TIMEOUT))
            .await?;
        let status = response.status();
        match status.as_u16() {
            201 => {
                let raw = body_capped(response, "job request", MAX_JOB_PAYLOAD_BYTES).await?;
                Ok((RequestedJob::Job(ReceivedJob::parse(raw)), false))
            }
            204 => {
                let bare = !response.headers().contains_key(LAST_UPDATE_HEADER);
                Ok((RequestedJob::NoJob, bare))
            }
            403 => Err(GitLabError::Forbidden),
            409 => Err(GitLabError::Conflict),
            422 => Err(GitLabError::Orphaned),
            _ => match transient(status, response.headers()) {
                Some(e) => Err(e),
                None => Err(unexpected("job request", response).await),
            },
        }
    }

    /// Asks for jobs until GitLab hands one over, backing off (with jitter,
    /// and never below `Retry-After`) on 409, 429, 5xx and transport errors.
    /// `backoff` is reset after every healthy answer.
    ///
    /// # Errors
    /// A fatal answer ([`GitLabError::Forbidden`], [`GitLabError::Orphaned`],
    /// [`GitLabError::Unexpected`]) or [`GitLabError::Cancelled`]. An
    /// in-flight request is dropped on cancel; if GitLab had just assigned
    /// a job, that job is dropped by GitLab's stuck-job timeout.
    pub async fn next_job(
        &self,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<ReceivedJob, GitLabError> {
        loop {
            let started = Instant::now();
            let answer = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(GitLabError::Cancelled),
                answer = self.request_job_once() => answer,
            };
            let delay = match answer {
                Ok((RequestedJob::Job(job), _)) => {
                    backoff.reset();
                    return Ok(job);
                }
                Ok((RequestedJob::NoJob, bare)) => {
                    backoff.reset();
                    let elapsed = started.elapsed();
                    if bare && elapsed >= LONG_POLL_HELD {
                        Duration::ZERO
                    } else {
                        self.settings.poll_interval.saturating_sub(elapsed)
                    }
                }
                Err(e) if e.is_retryable() => {
                    let delay = backoff.next_delay_at_least(e.retry_after());
                    warn!(error = %e, delay = ?delay, "job request failed; backing off");
                    delay
                }
                Err(e) => return Err(e),
            };
            if !delay.is_zero() {
                debug!(delay = ?delay, "waiting before the next job request");
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Err(GitLabError::Cancelled),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// `PUT /jobs/:id`: keep-alive or final state.
    ///
    /// # Errors
    /// [`GitLabError::JobForbidden`] (403: abort the job),
    /// [`GitLabError::JobNotFound`] (404, treated as abort), transient errors
    /// for 409/429/5xx/transport, [`GitLabError::Unexpected`] for anything else.
    pub async fn update_job(
        &self,
        job_id: i64,
        token: &Secret,
        update: &JobUpdate,
    ) -> Result<UpdateResponse, GitLabError> {
        let body = update.body(token, self.info());
        let request = self
            .http
            .put(format!("{}jobs/{job_id}", self.api))
            .timeout(self.settings.request_timeout)
            .header("JOB-TOKEN", token.expose())
            .json(&body);
        let response = self.send(request).await?;
        let status = response.status();
        let headers = response.headers();
        let job_status = RemoteJobStatus::from_headers(headers);
        let update_interval = update_interval(headers);
        let ack = match status.as_u16() {
            200 => UpdateAck::Accepted,
            202 => UpdateAck::NotYetAccepted,
            412 => UpdateAck::TraceRejected,
            403 => return Err(GitLabError::JobForbidden { job_id, job_status }),
            404 => return Err(GitLabError::JobNotFound { job_id }),
            409 => return Err(GitLabError::Conflict),
            _ => {
                return Err(match transient(status, headers) {
                    Some(e) => e,
                    None => unexpected("job update", response).await,
                })
            }
        };
        Ok(UpdateResponse {
            ack,
            job_status,
            update_interval,
        })
    }

    /// `PATCH /jobs/:id/trace`: appends `bytes` at `offset`.
    ///
    /// # Errors
    /// [`GitLabError::JobForbidden`] (403: abort), [`GitLabError::JobNotFound`]
    /// (404: stop sending trace), transient errors for 429/5xx/transport,
    /// [`GitLabError::BadResponse`] for a 416 without a usable `Range`.
    pub async fn patch_trace(
        &self,
        job_id: i64,
        token: &Secret,
        offset: u64,
        bytes: Bytes,
    ) -> Result<PatchResponse, GitLabError> {
        if bytes.is_empty() {
            // GitLab never gets an empty patch from gitlab-runner; an empty
            // Content-Range end would be before its start.
            return Err(GitLabError::BadResponse {
                what: "trace patch",
                reason: "refusing to send an empty patch".into(),
            });
        }
        let end = offset + bytes.len() as u64 - 1;
        let request = self
            .http
            .patch(format!("{}jobs/{job_id}/trace?debug_trace=false", self.api))
            .timeout(self.settings.request_timeout)
            .header("JOB-TOKEN", token.expose())
            .header(CONTENT_TYPE, "text/plain")
            .header(reqwest::header::CONTENT_RANGE, format!("{offset}-{end}"))
            .body(bytes.clone());
        let response = self.send(request).await?;
        let status = response.status();
        let headers = response.headers();
        let job_status = RemoteJobStatus::from_headers(headers);
        let interval = update_interval(headers);
        let outcome = match status.as_u16() {
            200..=299 => PatchOutcome::Appended {
                remote_size: remote_size(headers).unwrap_or(end + 1),
            },
            416 => match remote_size(headers) {
                Some(remote_size) => PatchOutcome::RangeMismatch { remote_size },
                None => {
                    return Err(GitLabError::BadResponse {
                        what: "trace patch",
                        reason: "416 without a Range header naming the stored size".into(),
                    })
                }
            },
            403 => return Err(GitLabError::JobForbidden { job_id, job_status }),
            404 => return Err(GitLabError::JobNotFound { job_id }),
            _ => {
                return Err(match transient(status, headers) {
                    Some(e) => e,
                    None => unexpected("trace patch", response).await,
                })
            }
        };
        Ok(PatchResponse {
            outcome,
            job_status,
            update_interval: interval,
        })
    }

    /// Fails a job we cannot run (for instance an unusable payload): writes
    /// `message` as its log and reports `runner_system_failure`, a reason
    /// every GitLab accepts. One attempt each; the caller decides on retries.
    ///
    /// # Errors
    /// Whatever the trace patch or the update returns.
    pub async fn reject_job(
        &self,
        job_id: i64,
        token: &Secret,
        message: &str,
    ) -> Result<(), GitLabError> {
        let line = format!("\x1b[31;1mERROR: {message}\x1b[0;m\n");
        let trace = Bytes::from(line.into_bytes());
        self.patch_trace(job_id, token, 0, trace.clone()).await?;
        let update = JobUpdate {
            state: JobState::Failed,
            failure_reason: Some("runner_system_failure"),
            exit_code: None,
            output: Some(TraceOutput::of(&trace)),
        };
        self.update_job(job_id, token, &update).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_follows_gitlab_runner() {
        for (input, want) in [
            (
                "https://gitlab.example.com",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "https://gitlab.example.com/",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "https://gitlab.example.com/ci",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "https://gitlab.example.com/ci/",
                "https://gitlab.example.com/api/v4/",
            ),
            ("http://h:8080/gitlab/", "http://h:8080/gitlab/api/v4/"),
            ("http://h/gitlab/ci", "http://h/gitlab/api/v4/"),
        ] {
            assert_eq!(api_base(input).unwrap(), want, "{input}");
        }
        for bad in ["ftp://h", "not a url", "https://user:pw@h", ""] {
            let err = api_base(bad).unwrap_err();
            assert!(err.to_string().contains("set gitlab.url"), "{err}");
        }
    }

    #[test]
    fn features_claim_only_what_we_do() {
        let features = runner_features();
        let on: Vec<&str> = features
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
            .collect();
        for wanted in [
            "variables",
            "image",
            "cancelable",
            "cancel_gracefully",
            "trace_reset",
            "trace_checksum",
            "trace_size",
            "masking",
            "refspecs",
            "return_exit_code",
            "raw_variables",
            "artifacts",
            "artifacts_exclude",
            "upload_multiple_artifacts",
            "upload_raw_artifacts",
            "cache",
            "fallback_cache_keys",
            "services",
            "service_variables",
            "service_multiple_aliases",
            "multi_build_steps",
            "image_executor_opts",
            "service_executor_opts",
        ] {
            assert!(on.contains(&wanted), "{wanted} must be advertised");
        }
        for never in ["session", "terminal", "two_phase_job_commit"] {
            assert_eq!(features.get(never), Some(&Value::Bool(false)), "{never}");
        }
        assert_eq!(on.len(), 23);
    }

    #[test]
    fn update_body_omits_zero_exit_code_and_reason_unless_failed() {
        let token = Secret::new("glcbt-x");
        let success = JobUpdate {
            state: JobState::Success,
            failure_reason: Some("script_failure"),
            exit_code: Some(0),
            output: Some(TraceOutput::of(b"hello")),
        };
        let body = success.body(&token, Value::Null);
        assert!(body.get("exit_code").is_none());
        assert!(body.get("failure_reason").is_none());
        let checksum = format!("crc32:{:08x}", crc32fast::hash(b"hello"));
        assert_eq!(body["output"]["checksum"], checksum.as_str());
        assert_eq!(body["checksum"], checksum.as_str());
        assert_eq!(body["output"]["bytesize"], 5);

        let failed = JobUpdate {
            state: JobState::Failed,
            failure_reason: Some("script_failure"),
            exit_code: Some(2),
            output: None,
        };
        let body = failed.body(&token, Value::Null);
        assert_eq!(body["exit_code"], 2);
        assert_eq!(body["failure_reason"], "script_failure");
        assert_eq!(body["token"], "glcbt-x");
        assert!(body.get("output").is_none());
    }

    #[test]
    fn checksum_string_is_zero_padded() {
        let out = TraceOutput {
            checksum: 0xab,
            bytesize: 0,
        };
        assert_eq!(out.checksum_string(), "crc32:000000ab");
    }

    #[test]
    fn headers_parse() {
        let mut h = HeaderMap::new();
        h.insert("Range", "0-1234".parse().unwrap());
        h.insert("Retry-After", "7".parse().unwrap());
        h.insert("X-GitLab-Trace-Update-Interval", "60".parse().unwrap());
        h.insert("Job-Status", "canceling".parse().unwrap());
        assert_eq!(remote_size(&h), Some(1234));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        assert_eq!(update_interval(&h), Some(Duration::from_secs(60)));
        assert_eq!(
            RemoteJobStatus::from_headers(&h),
            Some(RemoteJobStatus::Canceling)
        );
        h.insert("Retry-After", "999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            "Retry-After",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn unusable_payload_keeps_id_and_token() {
        let job = ReceivedJob::parse(Bytes::from_static(
            br#"{"id": 7, "token": "glcbt-t", "steps": "not a list"}"#,
        ));
        let unusable = job.payload.unwrap_err();
        assert_eq!(unusable.id, Some(7));
        assert_eq!(unusable.token.as_ref().map(Secret::expose), Some("glcbt-t"));
        assert!(!format!("{unusable:?}").contains("glcbt-t"));

        let job = ReceivedJob::parse(Bytes::from_static(b"<html>"));
        let unusable = job.payload.unwrap_err();
        assert_eq!(unusable.id, None);
        assert!(unusable.token.is_none());
    }

    #[test]
    fn request_ids_are_32_hex_digits() {
        let id = request_id();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, request_id());
    }
}

/// Entry points of the fuzz targets (`fuzz/`): what the coordinator reads
/// from GitLab's answers, with arbitrary bytes. Built only for fuzzing.
#[cfg(fuzzing)]
pub mod fuzzing {
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

    /// A job request's 201 body, as `request_job` takes it.
    pub fn job_answer(raw: &[u8]) {
        let job = super::ReceivedJob::parse(bytes::Bytes::copy_from_slice(raw));
        if let Ok(payload) = &job.payload {
            // The job's masker is made from what GitLab sent, then masks
            // output that holds the payload itself.
            let mut masker = super::super::Masker::for_job(payload);
            let _ = masker.write(raw);
            let _ = masker.flush();
        }
    }

    /// The answer headers every call reads (`Retry-After`, the trace's
    /// `Range`, `Job-Status`, the update interval), as name-value pairs.
    pub fn answer_headers(pairs: &[(&[u8], &[u8])]) {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                headers.append(name, value);
            }
        }
        let _ = super::retry_after(&headers);
        let _ = super::update_interval(&headers);
        let _ = super::remote_size(&headers);
        let _ = super::RemoteJobStatus::from_headers(&headers);
    }
}
