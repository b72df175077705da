//! The `restore_cache` and `archive_cache` stages: each `cache[]` entry is
//! restored before the script from the first of its keys that exists, and
//! saved under its primary key after `after_script` when its `when` matches
//! the job's result, each as its `policy` allows. The coordinator names
//! where each key lives (pre-signed URLs, or files on this machine); the
//! agent holds no credentials. Caches never fail a job: every problem is a
//! warning, as in gitlab-runner, whose log lines these are.
//!
//! Not responsible for keys (the coordinator computes and signs them) or
//! for choosing and archiving files (see `archive`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use servitor_proto::agent::{CacheAccess, CacheObject};
use servitor_proto::job::{Cache, JobPayload};

use super::archive::{self, Note};
use super::artifacts::remove_quietly;
use super::output::JobOutput;
use super::JobContext;
use crate::gitlab::{save_body, BodyError};

/// Tries for a transfer that fails on the network or with a 5xx.
const TRIES: u32 = 3;
/// The job variable that sets how hard cache zips are compressed.
const CACHE_LEVEL_VARIABLE: &str = "CACHE_COMPRESSION_LEVEL";
/// The job variable that bounds each cache transfer, in minutes.
const REQUEST_TIMEOUT_VARIABLE: &str = "CACHE_REQUEST_TIMEOUT";
const DEFAULT_REQUEST_MINUTES: u64 = 10;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What a policy allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Pull,
    Push,
    PullPush,
}

impl Policy {
    fn parse(policy: &str) -> Option<Self> {
        match policy {
            "pull" => Some(Policy::Pull),
            "push" => Some(Policy::Push),
            "" | "pull-push" => Some(Policy::PullPush),
            _ => None,
        }
    }

    fn pulls(self) -> bool {
        matches!(self, Policy::Pull | Policy::PullPush)
    }

    fn pushes(self) -> bool {
        matches!(self, Policy::Push | Policy::PullPush)
    }
}

/// The entries that have something to cache, with their access.
fn entries(ctx: &JobContext) -> Vec<(&Cache, Option<&CacheAccess>)> {
    ctx.job
        .cache
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.untracked || !entry.paths.is_empty())
        .map(|(index, entry)| {
            let access = ctx
                .caches
                .iter()
                .find(|a| usize::try_from(a.index).ok() == Some(index));
            (entry, access)
        })
        .collect()
}

/// Whether the `restore_cache` stage runs at all.
pub(crate) fn has_restore(ctx: &JobContext) -> bool {
    !entries(ctx).is_empty()
}

/// Restores each entry whose policy pulls from the first of its keys that
/// exists.
///
/// # Errors
/// Only an unknown `policy`, which gitlab-runner also fails the job for.
pub async fn restore(
    ctx: &JobContext,
    project_dir: &Path,
    tmp_dir: &Path,
    out: &JobOutput,
) -> Result<(), String> {
    let http = client(&ctx.job, out).await;
    for (index, (entry, access)) in entries(ctx).into_iter().enumerate() {
        let policy = policy_of(entry)?;
        let Some(access) = access else {
            not_configured(&ctx.job, entry, out).await;
            continue;
        };
        for warning in &access.warnings {
            out.warning(warning).await;
        }
        if !policy.pulls() {
            let key = access.save.as_ref().map_or("", |o| o.key.as_str());
            out.info(&format!("Not downloading cache {key} due to policy"))
                .await;
            continue;
        }
        for object in &access.restore {
            out.info(&format!("Checking cache for {}...", object.key))
                .await;
            let file = tmp_dir.join(format!("cache-{index}.zip"));
            match fetch(&http, object, &file, out).await {
                Ok(source) => {
                    let (archive, dest) = (source.clone(), project_dir.to_path_buf());
                    let extracted =
                        tokio::task::spawn_blocking(move || archive::extract_zip(&archive, &dest))
                            .await;
                    remove_quietly(&file).await;
                    match extracted {
                        Ok(Ok(_)) => {
                            out.info("Successfully extracted cache").await;
                            break;
                        }
                        Ok(Err(e)) => out.warning(&format!("{e}")).await,
                        Err(e) => out.warning(&format!("{e}")).await,
                    }
                }
                Err(e) => {
                    remove_quietly(&file).await;
                    out.warning(&e).await;
                }
            }
            out.warning("Failed to extract cache").await;
        }
    }
    Ok(())
}

/// The entries the `archive_cache` stage handles for a job that succeeded
/// (or not).
pub(crate) fn has_save(ctx: &JobContext, success: bool) -> bool {
    entries(ctx)
        .iter()
        .any(|(entry, _)| entry.when.applies(success))
}

/// Saves each entry whose `when` matches and whose policy pushes.
pub async fn save(
    ctx: &JobContext,
    success: bool,
    project_dir: &Path,
    tmp_dir: &Path,
    out: &JobOutput,
) {
    let http = client(&ctx.job, out).await;
    for (index, (entry, access)) in entries(ctx).into_iter().enumerate() {
        if !entry.when.applies(success) {
            continue;
        }
        let Ok(policy) = policy_of(entry) else {
            continue;
        };
        let Some(access) = access else {
            not_configured(&ctx.job, entry, out).await;
            continue;
        };
        let Some(target) = &access.save else {
            out.warning("Failed to create cache: no place to save it")
                .await;
            continue;
        };
        if !policy.pushes() {
            out.info(&format!("Not uploading cache {} due to policy", target.key))
                .await;
            continue;
        }
        out.info(&format!("Creating cache {}...", target.key)).await;
        match archive_and_send(
            &ctx.job,
            entry,
            &http,
            target,
            project_dir,
            tmp_dir,
            index,
            out,
        )
        .await
        {
            Ok(true) => out.info("Created cache").await,
            Ok(false) => {}
            Err(e) => {
                out.warning(&e).await;
                out.warning("Failed to create cache").await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)] // one call site; the stage's whole context
async fn archive_and_send(
    job: &JobPayload,
    entry: &Cache,
    http: &reqwest::Client,
    target: &CacheObject,
    project_dir: &Path,
    tmp_dir: &Path,
    index: usize,
    out: &JobOutput,
) -> Result<bool, String> {
    let paths: Vec<String> = entry.paths.iter().map(|p| job.expand(p)).collect();
    let untracked = if entry.untracked {
        super::artifacts::untracked_files(project_dir, out).await
    } else {
        Vec::new()
    };
    let (level, warning) =
        archive::Level::from_variable(job.variable(CACHE_LEVEL_VARIABLE), CACHE_LEVEL_VARIABLE);
    if let Some(warning) = warning {
        out.warning(&warning).await;
    }
    let file = tmp_dir.join(format!("cache-{index}.zip"));
    let (dir, dest) = (project_dir.to_path_buf(), file.clone());
    let made = tokio::task::spawn_blocking(move || {
        let selection = archive::select(&dir, &paths, &[], &untracked)?;
        if selection.entries.is_empty() {
            return Ok((selection.notes, None));
        }
        let size = archive::write_zip(&dir, &selection, &dest, level)?;
        Ok::<_, archive::ArchiveError>((selection.notes, Some(size)))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string());
    let (notes, size) = match made {
        Ok(made) => made,
        Err(e) => {
            remove_quietly(&file).await;
            return Err(e);
        }
    };
    for note in notes {
        match note {
            Note::Info(text) => out.line(&text).await,
            Note::Warning(text) => out.warning(&text).await,
        }
    }
    let Some(size) = size else {
        out.warning("No files to cache; nothing is saved").await;
        return Ok(false);
    };
    let sent = send(http, target, &file, size, out).await;
    remove_quietly(&file).await;
    sent.map(|()| true)
}

fn policy_of(entry: &Cache) -> Result<Policy, String> {
    Policy::parse(&entry.policy).ok_or_else(|| {
        format!(
            "unknown cache policy {:?} for cache {:?}; use pull, push or pull-push",
            entry.policy, entry.key
        )
    })
}

async fn not_configured(job: &JobPayload, entry: &Cache, out: &JobOutput) {
    out.warning(&format!(
        "No cache storage is configured on the coordinator: cache {} is neither restored nor saved",
        job.expand(&entry.key)
    ))
    .await;
}

/// The client for the job's cache transfers: each may take the job's
/// `CACHE_REQUEST_TIMEOUT` (minutes, gitlab-runner's default 10).
async fn client(job: &JobPayload, out: &JobOutput) -> reqwest::Client {
    let minutes = match job.variable(REQUEST_TIMEOUT_VARIABLE) {
        None => DEFAULT_REQUEST_MINUTES,
        Some(value) => match value.trim().parse::<u64>() {
            Ok(minutes) if minutes > 0 => minutes,
            _ => {
                out.warning(&format!(
                    "{REQUEST_TIMEOUT_VARIABLE} {value:?} is not a whole number of minutes; using {DEFAULT_REQUEST_MINUTES}"
                ))
                .await;
                DEFAULT_REQUEST_MINUTES
            }
        },
    };
    crate::gitlab::http_client(|| {
        reqwest::Client::builder()
            .user_agent(concat!("servitor-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(minutes.saturating_mul(60)))
    })
    .unwrap_or_else(|_| {
        // Without any roots at all, plain-HTTP object stores still work.
        reqwest::Client::builder()
            .tls_certs_only(Vec::new())
            .build()
            .unwrap_or_default()
    })
}

/// The archive of `object`: a file on this machine as it is, or a
/// download into `dest`.
async fn fetch(
    http: &reqwest::Client,
    object: &CacheObject,
    dest: &Path,
    out: &JobOutput,
) -> Result<PathBuf, String> {
    if !object.path.is_empty() {
        let path = PathBuf::from(&object.path);
        return match tokio::fs::metadata(&path).await {
            Ok(_) => Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err("file does not exist".to_owned())
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        };
    }
    out.line(&format!(
        "Downloading cache from {}",
        without_query(&object.url)
    ))
    .await;
    let mut tries = 0;
    loop {
        tries += 1;
        match download_once(http, object, dest).await {
            Ok(()) => return Ok(dest.to_path_buf()),
            Err((e, retry)) if retry && tries < TRIES => {
                tracing::info!(error = %e, tries, "cache download failed; trying again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

async fn download_once(
    http: &reqwest::Client,
    object: &CacheObject,
    dest: &Path,
) -> Result<(), (String, bool)> {
    let mut request = http.get(&object.url);
    for (name, value) in &object.headers {
        request = request.header(name, value);
    }
    let response = request.send().await.map_err(|e| (e.to_string(), true))?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Err(("file does not exist".to_owned(), false)),
        status => return Err((format!("{status}"), status.is_server_error())),
    }
    save_body(response, dest).await.map_err(|e| match e {
        BodyError::Read(e) => (e.to_string(), true),
        BodyError::Write(e) => (format!("{}: {e}", dest.display()), false),
    })
}

/// Puts the archive at `file` where `target` says: an upload to its URL
/// with the headers its signature covers, or a file replaced atomically.
async fn send(
    http: &reqwest::Client,
    target: &CacheObject,
    file: &Path,
    size: u64,
    out: &JobOutput,
) -> Result<(), String> {
    if !target.path.is_empty() {
        let dest = PathBuf::from(&target.path);
        let parent = dest.parent().unwrap_or(Path::new("/"));
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| format!("{}: {e}", parent.display()))?;
        let staging = dest.with_extension(format!("tmp-{}", std::process::id()));
        tokio::fs::copy(file, &staging)
            .await
            .map_err(|e| format!("{}: {e}", staging.display()))?;
        return tokio::fs::rename(&staging, &dest)
            .await
            .map_err(|e| format!("{}: {e}", dest.display()));
    }
    out.line(&format!(
        "Uploading cache.zip to {}",
        without_query(&target.url)
    ))
    .await;
    let mut tries = 0;
    loop {
        tries += 1;
        let body = tokio::fs::File::open(file)
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let mut request = http
            .put(&target.url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", size)
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(body),
            ));
        for (name, value) in &target.headers {
            request = request.header(name, value);
        }
        let failure = match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                (
                    format!("upload refused: {status}"),
                    status.is_server_error(),
                )
            }
            Err(e) => (e.to_string(), true),
        };
        if !failure.1 || tries >= TRIES {
            return Err(failure.0);
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// A URL without its query (the signature), for the log.
fn without_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(base, _)| base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_as_gitlab_runner_reads_them() {
        assert_eq!(Policy::parse(""), Some(Policy::PullPush));
        assert!(Policy::parse("pull").is_some_and(|p| p.pulls() && !p.pushes()));
        assert!(Policy::parse("push").is_some_and(|p| !p.pulls() && p.pushes()));
        assert_eq!(Policy::parse("sometimes"), None);
        assert_eq!(
            without_query("https://s3/bucket/key?X-Amz-Signature=abc"),
            "https://s3/bucket/key"
        );
    }
}
