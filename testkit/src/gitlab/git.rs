//! Git over HTTP for the stand-in's jobs: serves a job's repository under
//! `/<namespace>/<project>.git/` with git's smart HTTP protocol by running
//! `git http-backend` as a CGI program. As on GitLab, a job fetches with
//! HTTP basic auth `gitlab-ci-token:<job token>`, valid only while the job
//! is running; anything else gets 401 with a `WWW-Authenticate` challenge.
//!
//! Read only: pushes are refused. Not responsible for creating
//! repositories (tests do that with the git CLI).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State as Extract;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{StandInError, State};

/// The user name GitLab expects with a job token.
const JOB_TOKEN_USER: &str = "gitlab-ci-token";

/// Runs git with the given arguments in `dir`, returning trimmed stdout.
async fn git_output(dir: &Path, args: &[&str]) -> Result<String, StandInError> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output()
        .await
        .map_err(|e| StandInError::Repository {
            dir: dir.to_owned(),
            reason: format!("cannot run git: {e}; install git"),
        })?;
    if !output.status.success() {
        return Err(StandInError::Repository {
            dir: dir.to_owned(),
            reason: format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The commit and branch a job runs for: `branch` if given, else the
/// repository's current branch.
pub(super) async fn head(
    dir: &Path,
    branch: Option<&str>,
) -> Result<(String, String), StandInError> {
    let branch = match branch {
        Some(b) => b.to_owned(),
        None => git_output(dir, &["symbolic-ref", "--short", "HEAD"]).await?,
    };
    let sha = git_output(
        dir,
        &[
            "rev-parse",
            "--verify",
            &format!("refs/heads/{branch}^{{commit}}"),
        ],
    )
    .await?;
    Ok((sha, branch))
}

/// Creates the pipeline's persistent ref, which GitLab's refspecs fetch.
pub(super) async fn create_pipeline_ref(
    dir: &Path,
    pipeline_id: i64,
    sha: &str,
) -> Result<(), StandInError> {
    git_output(
        dir,
        &["update-ref", &format!("refs/pipelines/{pipeline_id}"), sha],
    )
    .await
    .map(drop)
}

/// Minimal standard base64 decoding, for `Authorization: Basic`.
fn base64_decode(input: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let trimmed = input.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in trimmed.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xFF).ok()?);
        }
    }
    Some(out)
}

/// The password of `Authorization: Basic` when the user is `gitlab-ci-token`.
fn job_token_from_basic(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded)?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (user == JOB_TOKEN_USER).then(|| password.to_owned())
}

fn unauthorized() -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, "HTTP Basic: Access denied\n").into_response();
    response.headers_mut().insert(
        "WWW-Authenticate",
        HeaderValue::from_static("Basic realm=\"GitLab\""),
    );
    response
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"message": "404 Not Found"})),
    )
        .into_response()
}

/// Everything the API routes do not take: git requests, or 404.
pub(super) async fn serve(
    Extract(state): Extract<Arc<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let Some(at) = path.find(".git/") else {
        return not_found();
    };
    let project = path[..at].trim_start_matches('/');
    let path_info = &path[at + ".git".len()..];
    let query = uri.query().unwrap_or("");
    if path_info.contains("git-receive-pack") || query.contains("git-receive-pack") {
        return (
            StatusCode::FORBIDDEN,
            "pushing with a job token is not allowed\n",
        )
            .into_response();
    }
    let Some(token) = job_token_from_basic(&headers) else {
        return unauthorized();
    };
    // The token must be that of a running job of this project with a repository.
    let repo_dir = {
        let inner = state.lock();
        let own = inner.jobs.values().find_map(|job| {
            let matches = job.record.state.is_executing()
                && job.record.token.expose() == token
                && job.spec.project_path.trim_matches('/') == project;
            matches
                .then(|| job.spec.git.as_ref().map(|g| g.repo_dir.clone()))
                .flatten()
        });
        // Another project of the instance (a submodule, say): any running
        // job's token reads it, as with a job token allowlist that lets it.
        own.or_else(|| {
            let running = inner
                .jobs
                .values()
                .any(|job| job.record.state.is_executing() && job.record.token.expose() == token);
            running
                .then(|| inner.repositories.get(project).cloned())
                .flatten()
        })
    };
    let Some(repo_dir) = repo_dir else {
        return unauthorized();
    };
    match run_backend(&repo_dir, &method, path_info, query, &headers, body).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(error = %e, "git http-backend failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

/// Runs `git http-backend` for one request and turns its CGI output into
/// an HTTP response.
async fn run_backend(
    repo_dir: &Path,
    method: &Method,
    path_info: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, std::io::Error> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut command = Command::new("git");
    command
        .arg("http-backend")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env("GIT_PROJECT_ROOT", repo_dir)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path_info)
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", JOB_TOKEN_USER)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, env) in [
        ("git-protocol", "HTTP_GIT_PROTOCOL"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
    ] {
        let value = header(name);
        if !value.is_empty() {
            command.env(env, value);
        }
    }
    let mut child = command.spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("git http-backend has no stdin"))?;
    // Feed the body while reading the output, so neither side blocks.
    let writer = tokio::spawn(async move {
        let result = stdin.write_all(&body).await;
        drop(stdin);
        result
    });
    let output = child.wait_with_output().await?;
    // A backend that stops reading early (an error answer) is not our error.
    let _ = writer.await;
    if !output.status.success() && output.stdout.is_empty() {
        return Err(std::io::Error::other(format!(
            "git http-backend exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(parse_cgi(&output.stdout))
}

/// Splits CGI output into headers (`Status:` among them) and body.
fn parse_cgi(output: &[u8]) -> Response {
    let (head, body) = match find(output, b"\r\n\r\n") {
        Some(at) => (&output[..at], &output[at + 4..]),
        None => match find(output, b"\n\n") {
            Some(at) => (&output[..at], &output[at + 2..]),
            None => (&output[..0], output),
        },
    };
    let mut status = StatusCode::OK;
    let mut response_headers = HeaderMap::new();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response_headers.append(name, value);
        }
    }
    let mut response = Response::new(Body::from(body.to_vec()));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    response
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(
            base64_decode("Z2l0bGFiLWNpLXRva2VuOnNlY3JldA==").unwrap(),
            b"gitlab-ci-token:secret"
        );
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("a$b").is_none());
    }

    #[test]
    fn cgi_output_parses() {
        let response = parse_cgi(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["content-type"], "text/plain");
        let response =
            parse_cgi(b"Content-Type: application/x-git-upload-pack-advertisement\n\n0000");
        assert_eq!(response.status(), StatusCode::OK);
    }
}
