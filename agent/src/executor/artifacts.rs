//! The `download_artifacts` and `upload_artifacts_on_*` stages: a job's
//! dependencies are downloaded from GitLab and extracted into the project
//! directory before its script; its artifacts are archived and uploaded
//! to GitLab after `after_script`, each entry whose `when` matches the
//! job's result. The instance talks to GitLab itself with the job token,
//! as gitlab-runner's helper does; log lines follow the helper's words.
//!
//! Not responsible for choosing or archiving files (see `archive`), the
//! HTTP exchange (see `crate::gitlab`), or deciding whether the stage
//! runs at all (the attempt skips it on abort and timeout).

use std::path::{Path, PathBuf};

use servitor_proto::job::{Artifact, JobPayload};
use tokio::process::Command;

use super::archive::{self, Note, Selection};
use super::output::JobOutput;
use super::JobContext;
use crate::gitlab::{JobApi, UploadQuery};

/// The job variable that sets how hard artifact zips are compressed.
const ARTIFACT_LEVEL_VARIABLE: &str = "ARTIFACT_COMPRESSION_LEVEL";

/// How an archive is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Zip,
    Gzip,
    Raw,
}

impl Format {
    fn parse(format: &str) -> Option<Self> {
        match format {
            "" | "zip" => Some(Format::Zip),
            "gzip" => Some(Format::Gzip),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Format::Zip => ".zip",
            Format::Gzip => ".gz",
            Format::Raw => "",
        }
    }
}

/// Whether the job has dependencies with artifacts to download.
pub(crate) fn has_downloads(job: &JobPayload) -> bool {
    job.dependencies.iter().any(|d| d.has_artifacts())
}

/// Downloads and extracts every dependency's artifacts into the project
/// directory, in payload order.
///
/// # Errors
/// The first dependency that cannot be downloaded or extracted, named.
pub(crate) async fn download(
    ctx: &JobContext,
    project_dir: &Path,
    tmp_dir: &Path,
    out: &JobOutput,
) -> Result<(), String> {
    let api = JobApi::new(&ctx.gitlab_url).map_err(|e| e.to_string())?;
    for dependency in ctx.job.dependencies.iter().filter(|d| d.has_artifacts()) {
        let who = format!("{} ({})", dependency.name, dependency.id);
        out.info(&format!("Downloading artifacts for {who}..."))
            .await;
        let file = tmp_dir.join(format!("dependency-{}.zip", dependency.id));
        let token = if dependency.token.is_empty() {
            &ctx.job.token
        } else {
            &dependency.token
        };
        let fetched = api
            .download_artifacts(dependency.id, token, &file)
            .await
            .map_err(|e| format!("downloading artifacts for {who} from coordinator failed: {e}"));
        let done = match fetched {
            Ok(done) => done,
            Err(e) => {
                out.error(&e).await;
                remove_quietly(&file).await;
                return Err(e);
            }
        };
        if let Some(host) = &done.redirected_to {
            out.line(&format!("Downloading artifacts from {host}... ok"))
                .await;
        } else {
            out.line(&format!(
                "Downloading artifacts from coordinator... ok        id={} responseStatus={}",
                dependency.id, done.status
            ))
            .await;
        }
        let (archive, dest) = (file.clone(), project_dir.to_path_buf());
        let extracted = tokio::task::spawn_blocking(move || archive::extract_zip(&archive, &dest))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        remove_quietly(&file).await;
        if let Err(e) = extracted {
            let message = format!("extracting artifacts of {who} failed: {e}");
            out.error(&message).await;
            return Err(message);
        }
    }
    Ok(())
}

/// The artifacts entries that apply to a job that succeeded (or not):
/// matching `when`, with something to collect.
pub(crate) fn uploads(job: &JobPayload, success: bool) -> Vec<&Artifact> {
    job.artifacts
        .iter()
        .filter(|a| a.when.applies(success) && (a.untracked || !a.paths.is_empty()))
        .collect()
}

/// Archives and uploads each entry of `entries`, in order.
///
/// # Errors
/// The first entry that could not be archived or that GitLab refused, in
/// gitlab-runner's words (a 413 says the archive is too large).
pub(crate) async fn upload(
    ctx: &JobContext,
    entries: &[&Artifact],
    project_dir: &Path,
    tmp_dir: &Path,
    out: &JobOutput,
) -> Result<(), String> {
    let api = JobApi::new(&ctx.gitlab_url).map_err(|e| e.to_string())?;
    for (index, artifact) in entries.iter().enumerate() {
        out.info("Uploading artifacts...").await;
        let Some(format) = Format::parse(&artifact.artifact_format) else {
            let message = format!(
                "unsupported artifact format {:?}; GitLab sends zip, gzip or raw",
                artifact.artifact_format
            );
            out.error(&message).await;
            return Err(message);
        };
        let selection = choose(&ctx.job, artifact, project_dir, out).await?;
        if selection.entries.is_empty() {
            out.error("No files to upload").await;
            continue;
        }
        let file_name = upload_name(&ctx.job.expand(&artifact.name), format);
        let (level, warning) = archive::Level::from_variable(
            ctx.job.variable(ARTIFACT_LEVEL_VARIABLE),
            ARTIFACT_LEVEL_VARIABLE,
        );
        if let Some(warning) = warning {
            out.warning(&warning).await;
        }
        let (path, temporary) =
            match archive_for(format, project_dir, tmp_dir, index, selection, level).await {
                Ok(made) => made,
                Err(e) => {
                    out.error(&e).await;
                    return Err(e);
                }
            };
        let artifact_type = if artifact.artifact_type.is_empty() {
            "archive"
        } else {
            &artifact.artifact_type
        };
        let query = UploadQuery {
            artifact_format: if artifact.artifact_format.is_empty() {
                "zip".to_owned()
            } else {
                artifact.artifact_format.clone()
            },
            artifact_type: artifact_type.to_owned(),
            expire_in: artifact.expire_in.clone(),
        };
        let sent = api
            .upload_artifact(ctx.job.id, &ctx.job.token, &path, &file_name, &query)
            .await;
        if temporary {
            remove_quietly(&path).await;
        }
        match sent {
            Ok(done) => {
                out.line(&format!(
                    "Uploading artifacts as \"{artifact_type}\" to coordinator... {}  id={} responseStatus={}",
                    done.status, ctx.job.id, done.status
                ))
                .await;
            }
            Err(e) => {
                let message =
                    format!("Uploading artifacts as \"{artifact_type}\" to coordinator... {e}");
                out.error(&message).await;
                return Err(format!("uploading artifacts failed: {e}"));
            }
        }
    }
    Ok(())
}

/// Chooses an entry's files and writes the helper's lines about them.
async fn choose(
    job: &JobPayload,
    artifact: &Artifact,
    project_dir: &Path,
    out: &JobOutput,
) -> Result<Selection, String> {
    let paths: Vec<String> = artifact.paths.iter().map(|p| job.expand(p)).collect();
    let exclude: Vec<String> = artifact.exclude.iter().map(|p| job.expand(p)).collect();
    let untracked = if artifact.untracked {
        untracked_files(project_dir, out).await
    } else {
        Vec::new()
    };
    let dir = project_dir.to_path_buf();
    let selection =
        tokio::task::spawn_blocking(move || archive::select(&dir, &paths, &exclude, &untracked))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
    let selection = match selection {
        Ok(selection) => selection,
        Err(e) => {
            out.error(&e).await;
            return Err(e);
        }
    };
    for note in &selection.notes {
        match note {
            Note::Info(text) => out.line(text).await,
            Note::Warning(text) => out.warning(text).await,
        }
    }
    Ok(selection)
}

/// Writes the archive for `format`; returns its path and whether it is a
/// temporary file (a raw upload sends the job's file itself).
async fn archive_for(
    format: Format,
    project_dir: &Path,
    tmp_dir: &Path,
    index: usize,
    selection: Selection,
    level: archive::Level,
) -> Result<(PathBuf, bool), String> {
    let dir = project_dir.to_path_buf();
    let dest = tmp_dir.join(format!("artifacts-{index}{}", format.extension()));
    let made = tokio::task::spawn_blocking(move || match format {
        Format::Zip => archive::write_zip(&dir, &selection, &dest, level).map(|_| (dest, true)),
        Format::Gzip => archive::write_gzip(&dir, &selection, &dest).map(|_| (dest, true)),
        Format::Raw => archive::raw_file(&dir, &selection).map(|path| (path, false)),
    })
    .await
    .map_err(|e| e.to_string())?;
    made.map_err(|e| e.to_string())
}

/// The file name GitLab stores: the base of `name` (`artifacts` when
/// unnamed; `default` when that is empty) plus the format's extension.
fn upload_name(name: &str, format: Format) -> String {
    let name = if name.is_empty() { "artifacts" } else { name };
    let base = Path::new(name)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .filter(|b| !b.is_empty() && b != ".")
        .unwrap_or_else(|| "default".to_owned());
    format!("{base}{}", format.extension())
}

/// Files git does not track (ignored ones too, as gitlab-runner lists
/// them: `git ls-files -o`, without `--exclude-standard`).
pub(crate) async fn untracked_files(project_dir: &Path, out: &JobOutput) -> Vec<String> {
    let listed = Command::new("git")
        .arg("-c")
        .arg(format!("safe.directory={}", project_dir.display()))
        .args(["ls-files", "-o", "-z"])
        .current_dir(project_dir)
        .kill_on_drop(true)
        .output()
        .await;
    match listed {
        Ok(output) if output.status.success() => output
            .stdout
            .split(|b| *b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect(),
        Ok(output) => {
            out.warning(&format!(
                "untracked: cannot list untracked files (is the project a git repository?): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
            .await;
            Vec::new()
        }
        Err(e) => {
            out.warning(&format!("untracked: cannot run git: {e}"))
                .await;
            Vec::new()
        }
    }
}

/// Removes a temporary archive; one already gone is fine.
pub(crate) async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "could not remove a temporary archive");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_follow_gitlab_runner() {
        assert_eq!(upload_name("", Format::Zip), "artifacts.zip");
        assert_eq!(upload_name("build-main", Format::Zip), "build-main.zip");
        assert_eq!(upload_name("junit.xml", Format::Gzip), "junit.xml.gz");
        assert_eq!(upload_name("dir/gl-sast.json", Format::Raw), "gl-sast.json");
        assert_eq!(upload_name(".", Format::Zip), "default.zip");
        assert_eq!(Format::parse("tarzstd"), None);
    }
}
