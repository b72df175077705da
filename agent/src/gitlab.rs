//! The job-token calls an instance makes to GitLab itself, as
//! gitlab-runner's helper does: uploading an artifact
//! (`POST /api/v4/jobs/:id/artifacts`) and downloading a dependency's
//! (`GET /api/v4/jobs/:id/artifacts`), with gitlab-runner's retries and
//! its reading of each status.
//!
//! Not responsible for what goes into an archive or where it is extracted
//! (see `executor::artifacts`), nor for the runner-token API (the
//! coordinator speaks that).

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderValue, LOCATION};
use reqwest::{multipart, StatusCode};
use servitor_runtime::backoff::Backoff;
use tokio::io::AsyncWriteExt;

const USER_AGENT: &str = concat!("servitor-agent/", env!("CARGO_PKG_VERSION"));

/// Tries for an upload GitLab answers 503 to (gitlab-runner: 6).
const UPLOAD_TRIES_UNAVAILABLE: u32 = 6;
/// Tries for any other retryable failure (gitlab-runner: 3).
const TRIES: u32 = 3;
/// Redirects followed for one download: GitLab to object storage is one;
/// more than a few is a loop.
const MAX_REDIRECTS: usize = 5;
/// Waiting for a response's headers after the body went (gitlab-runner:
/// 10 minutes, while GitLab stores a large artifact).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What an artifact upload is, in the query GitLab (Workhorse) reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadQuery {
    pub artifact_format: String,
    pub artifact_type: String,
    pub expire_in: String,
}

impl UploadQuery {
    /// The query pairs, each only when set, in the alphabetical order Go's
    /// `url.Values` encodes them in.
    fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("artifact_format", self.artifact_format.as_str()),
            ("artifact_type", self.artifact_type.as_str()),
            ("expire_in", self.expire_in.as_str()),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect()
    }
}

/// Why a job-token call failed for good.
#[derive(Debug, thiserror::Error)]
pub enum JobApiError {
    #[error("no GitLab URL to reach: the coordinator sent none with the job (coordinator older than this agent?)")]
    NoUrl,
    #[error("GitLab URL {0:?} is not a valid http(s) URL")]
    BadUrl(String),
    #[error("too large archive: GitLab refused {size} bytes (413 Request Entity Too Large); raise the maximum artifacts size (instance or project CI/CD settings) or upload fewer files")]
    TooLarge { size: u64 },
    #[error("forbidden (403): the job token is not valid or the job is no longer running")]
    Forbidden,
    #[error("unauthorized (401): the job token was not accepted")]
    Unauthorized,
    #[error("not found (404): the job has no such artifacts (expired or erased?)")]
    NotFound,
    #[error("GitLab answered {status}{detail}")]
    Status { status: StatusCode, detail: String },
    #[error("{what}: {source}")]
    Transport {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("too many redirects (more than {MAX_REDIRECTS}) from {0}")]
    Redirects(String),
}

impl JobApiError {
    /// Whether another try may go better (gitlab-runner retries all but
    /// 401, 403, 404 and 413).
    fn retryable(&self) -> bool {
        matches!(
            self,
            JobApiError::Status { .. } | JobApiError::Transport { .. } | JobApiError::Redirects(_)
        )
    }

    fn transport(what: &'static str) -> impl FnOnce(reqwest::Error) -> Self {
        move |source| JobApiError::Transport { what, source }
    }

    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| JobApiError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}

/// A successful call, for the log line.
#[derive(Clone, Debug)]
pub struct Done {
    pub status: StatusCode,
    /// Where the bytes came from, when GitLab sent us elsewhere (object
    /// storage).
    pub redirected_to: Option<String>,
    /// Tries it took.
    pub tries: u32,
}

/// Job-token calls to one GitLab.
#[derive(Clone, Debug)]
pub struct JobApi {
    http: reqwest::Client,
    /// `https://gitlab.example.com`, no trailing slash.
    base: String,
}

impl JobApi {
    /// A client for the GitLab at `url`.
    ///
    /// # Errors
    /// Fails on an empty or non-http(s) URL, or when no HTTP client can be
    /// built (no TLS roots).
    pub fn new(url: &str) -> Result<Self, JobApiError> {
        let base = url.trim_end_matches('/');
        if base.is_empty() {
            return Err(JobApiError::NoUrl);
        }
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(JobApiError::BadUrl(url.to_owned()));
        }
        let http = http_client(|| {
            reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(RESPONSE_TIMEOUT)
                // Redirects are followed by hand: the job token goes to
                // GitLab only, never to the object store it redirects to.
                .redirect(reqwest::redirect::Policy::none())
        })
        .map_err(JobApiError::transport("build the HTTP client"))?;
        Ok(Self {
            http,
            base: base.to_owned(),
        })
    }

    /// Uploads `file` as job `job_id`'s artifact named `filename`, retrying
    /// as gitlab-runner does: 503 up to six tries, other failures but 401,
    /// 403, 404 and 413 up to three, a 307 moves the next try to the host
    /// it names.
    ///
    /// # Errors
    /// The last failure once the tries are spent, or the first one that
    /// no retry can fix.
    pub async fn upload_artifact(
        &self,
        job_id: i64,
        token: &str,
        file: &Path,
        filename: &str,
        query: &UploadQuery,
    ) -> Result<Done, JobApiError> {
        let mut base = self.base.clone();
        let mut backoff = retry_backoff();
        let mut tries = 0;
        loop {
            tries += 1;
            let url = format!("{base}/api/v4/jobs/{job_id}/artifacts");
            let error = match self.upload_once(&url, token, file, filename, query).await {
                Ok(Upload::Stored(status)) => {
                    return Ok(Done {
                        status,
                        redirected_to: (base != self.base).then_some(base),
                        tries,
                    })
                }
                Ok(Upload::Moved(location)) => {
                    base = origin_of(&location).unwrap_or(base);
                    JobApiError::Status {
                        status: StatusCode::TEMPORARY_REDIRECT,
                        detail: format!(" (moved to {location})"),
                    }
                }
                Err(e) => e,
            };
            let limit = match &error {
                JobApiError::Status { status, .. }
                    if *status == StatusCode::SERVICE_UNAVAILABLE =>
                {
                    UPLOAD_TRIES_UNAVAILABLE
                }
                _ => TRIES,
            };
            if !error.retryable() || tries >= limit {
                return Err(error);
            }
            tracing::info!(job_id, tries, error = %error, "artifact upload failed; trying again");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn upload_once(
        &self,
        url: &str,
        token: &str,
        file: &Path,
        filename: &str,
        query: &UploadQuery,
    ) -> Result<Upload, JobApiError> {
        let opened = tokio::fs::File::open(file)
            .await
            .map_err(JobApiError::io("open the archive", file))?;
        let size = opened
            .metadata()
            .await
            .map_err(JobApiError::io("read the archive's size", file))?
            .len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(opened));
        let part = multipart::Part::stream_with_length(body, size)
            .file_name(filename.to_owned())
            .mime_str("application/octet-stream")
            .map_err(JobApiError::transport("build the upload"))?;
        let form = multipart::Form::new().part("file", part);
        let response = self
            .http
            .post(url)
            .query(&query.pairs())
            .header("JOB-TOKEN", token)
            .multipart(form)
            .send()
            .await
            .map_err(JobApiError::transport("send the artifact"))?;
        let status = response.status();
        match status {
            StatusCode::CREATED | StatusCode::OK => Ok(Upload::Stored(status)),
            StatusCode::TEMPORARY_REDIRECT => Ok(Upload::Moved(location(&response))),
            StatusCode::PAYLOAD_TOO_LARGE => Err(JobApiError::TooLarge { size }),
            StatusCode::FORBIDDEN => Err(JobApiError::Forbidden),
            StatusCode::UNAUTHORIZED => Err(JobApiError::Unauthorized),
            StatusCode::NOT_FOUND => Err(JobApiError::NotFound),
            _ => Err(JobApiError::Status {
                status,
                detail: detail(response).await,
            }),
        }
    }

    /// Downloads job `job_id`'s artifacts archive into `dest` (created or
    /// replaced), following a redirect to object storage without the
    /// token. Tries up to three times; 401, 403 and 404 are final. The
    /// first try asks for a direct download, as gitlab-runner does.
    ///
    /// # Errors
    /// The last failure once the tries are spent, or the first one that
    /// no retry can fix.
    pub async fn download_artifacts(
        &self,
        job_id: i64,
        token: &str,
        dest: &Path,
    ) -> Result<Done, JobApiError> {
        let mut backoff = retry_backoff();
        let mut tries = 0;
        loop {
            tries += 1;
            let direct = tries == 1;
            match self.download_once(job_id, token, dest, direct).await {
                Ok((status, redirected_to)) => {
                    return Ok(Done {
                        status,
                        redirected_to,
                        tries,
                    })
                }
                Err(e) if e.retryable() && tries < TRIES => {
                    tracing::info!(job_id, tries, error = %e, "artifact download failed; trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn download_once(
        &self,
        job_id: i64,
        token: &str,
        dest: &Path,
        direct: bool,
    ) -> Result<(StatusCode, Option<String>), JobApiError> {
        let mut request = self
            .http
            .get(format!("{}/api/v4/jobs/{job_id}/artifacts", self.base))
            .header("JOB-TOKEN", token);
        if direct {
            request = request.query(&[("direct_download", "true")]);
        }
        let mut response = request
            .send()
            .await
            .map_err(JobApiError::transport("ask for the artifacts"))?;
        let mut redirected_to = None;
        let mut hops = 0;
        while response.status().is_redirection() {
            hops += 1;
            let next = location(&response);
            if hops > MAX_REDIRECTS || next.is_empty() {
                return Err(JobApiError::Redirects(next));
            }
            let target = reqwest::Url::parse(&next)
                .or_else(|_| response.url().join(&next))
                .map_err(|_| JobApiError::BadUrl(next.clone()))?;
            let same_origin = origin_of(target.as_str()) == origin_of(&self.base);
            let mut follow = self.http.get(target.clone());
            if same_origin {
                follow = follow.header("JOB-TOKEN", token);
            } else {
                redirected_to = target.host_str().map(str::to_owned);
            }
            response = follow
                .send()
                .await
                .map_err(JobApiError::transport("follow the redirect"))?;
        }
        let status = response.status();
        match status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => return Err(JobApiError::Forbidden),
            StatusCode::UNAUTHORIZED => return Err(JobApiError::Unauthorized),
            StatusCode::NOT_FOUND => return Err(JobApiError::NotFound),
            _ => {
                return Err(JobApiError::Status {
                    status,
                    detail: detail(response).await,
                })
            }
        }
        save_body(response, dest).await.map_err(|e| match e {
            BodyError::Read(source) => JobApiError::Transport {
                what: "read the artifacts",
                source,
            },
            BodyError::Write(source) => JobApiError::io("write", dest)(source),
        })?;
        Ok((status, redirected_to))
    }
}

/// Why a response body did not reach its file.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The peer or the network failed; another try may work.
    Read(reqwest::Error),
    /// The file could not be written.
    Write(std::io::Error),
}

/// Streams `response`'s body into `dest` (created or replaced).
pub(crate) async fn save_body(response: reqwest::Response, dest: &Path) -> Result<(), BodyError> {
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(BodyError::Write)?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        file.write_all(&chunk.map_err(BodyError::Read)?)
            .await
            .map_err(BodyError::Write)?;
    }
    file.flush().await.map_err(BodyError::Write)
}

enum Upload {
    Stored(StatusCode),
    Moved(String),
}

/// gitlab-runner's retry pacing between tries: 1 s growing to 5 s.
fn retry_backoff() -> Backoff {
    Backoff::try_new(Duration::from_secs(1), Duration::from_secs(5))
        .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let origin = parsed.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

/// The first line of an error body, to say what GitLab said.
async fn detail(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let line = text.lines().next().unwrap_or_default().trim();
    if line.is_empty() {
        String::new()
    } else {
        let short: String = line.chars().take(200).collect();
        format!(": {short}")
    }
}

/// Builds an HTTP client from `make`, trusting the system's certificate
/// authorities, or — where there are none, as in a job image without
/// `ca-certificates` that a Fargate task's agent runs in — the Mozilla
/// roots built into the agent, saying so once.
///
/// # Errors
/// The client cannot be built even with the built-in roots.
pub(crate) fn http_client(
    make: impl Fn() -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, reqwest::Error> {
    static SAID: std::sync::Once = std::sync::Once::new();
    match make().build() {
        Ok(client) => Ok(client),
        Err(system) => {
            let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS
                .iter()
                .filter_map(|der| reqwest::Certificate::from_der(der).ok());
            let client = make().tls_certs_only(roots).build()?;
            SAID.call_once(|| {
                tracing::warn!(error = %system, "no usable certificate authorities on this system (no ca-certificates in the image?); trusting the Mozilla roots built into the agent");
            });
            Ok(client)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_holds_only_what_is_set_in_go_order() {
        let query = UploadQuery {
            artifact_format: "gzip".into(),
            artifact_type: "junit".into(),
            expire_in: String::new(),
        };
        assert_eq!(
            query.pairs(),
            vec![("artifact_format", "gzip"), ("artifact_type", "junit")]
        );
    }

    #[test]
    fn urls_are_checked_and_origins_read() {
        assert!(matches!(JobApi::new(""), Err(JobApiError::NoUrl)));
        assert!(matches!(
            JobApi::new("ftp://x"),
            Err(JobApiError::BadUrl(_))
        ));
        assert_eq!(
            origin_of("https://s3.example.com:9000/bucket/key?sig=1").as_deref(),
            Some("https://s3.example.com:9000")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080/api").as_deref(),
            Some("http://127.0.0.1:8080")
        );
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(!JobApiError::TooLarge { size: 1 }.retryable());
        assert!(!JobApiError::Forbidden.retryable());
        assert!(!JobApiError::NotFound.retryable());
        assert!(JobApiError::Status {
            status: StatusCode::BAD_GATEWAY,
            detail: String::new()
        }
        .retryable());
    }
}
