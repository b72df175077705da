//! The GitLab job payload (`POST /api/v4/jobs/request` → 201), as serde types.
//!
//! GitLab adds fields between releases and leaves out the ones that do not
//! apply, so every field is optional or defaulted and unknown fields are
//! ignored. Only `id` and `token` are required: without them a job can be
//! neither run nor reported.

use serde::{Deserialize, Serialize};

/// A job as GitLab hands it to a runner.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobPayload {
    pub id: i64,
    /// The job token (`CI_JOB_TOKEN`). Never log it.
    #[serde(deserialize_with = "nullable")]
    pub token: String,
    pub allow_git_fetch: bool,
    #[serde(deserialize_with = "nullable")]
    pub job_info: JobInfo,
    #[serde(deserialize_with = "nullable")]
    pub git_info: GitInfo,
    #[serde(deserialize_with = "nullable")]
    pub runner_info: RunnerInfo,
    #[serde(deserialize_with = "nullable")]
    pub variables: Vec<JobVariable>,
    #[serde(deserialize_with = "nullable")]
    pub steps: Vec<Step>,
    #[serde(deserialize_with = "nullable")]
    pub hooks: Vec<Hook>,
    pub image: Option<Image>,
    #[serde(deserialize_with = "nullable")]
    pub services: Vec<Service>,
    #[serde(deserialize_with = "nullable")]
    pub artifacts: Vec<Artifact>,
    #[serde(deserialize_with = "nullable")]
    pub cache: Vec<Cache>,
    #[serde(deserialize_with = "nullable")]
    pub credentials: Vec<Credential>,
    #[serde(deserialize_with = "nullable")]
    pub dependencies: Vec<Dependency>,
    #[serde(deserialize_with = "nullable")]
    pub features: JobFeatures,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobInfo {
    pub id: i64,
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub stage: String,
    pub project_id: i64,
    #[serde(deserialize_with = "nullable")]
    pub project_name: String,
    #[serde(deserialize_with = "nullable")]
    pub project_full_path: String,
    pub pipeline_id: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GitInfo {
    /// Project URL with `gitlab-ci-token:<job token>@` userinfo. Never log it.
    #[serde(deserialize_with = "nullable")]
    pub repo_url: String,
    #[serde(rename = "ref")]
    #[serde(deserialize_with = "nullable")]
    pub git_ref: String,
    #[serde(deserialize_with = "nullable")]
    pub sha: String,
    #[serde(deserialize_with = "nullable")]
    pub before_sha: String,
    #[serde(deserialize_with = "nullable")]
    pub ref_type: String,
    #[serde(deserialize_with = "nullable")]
    pub refspecs: Vec<String>,
    pub depth: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunnerInfo {
    /// Job timeout in seconds; 0 or less means the default.
    pub timeout: i64,
}

/// Job timeout gitlab-runner applies when GitLab sends none (common/build.go).
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 7200;

impl RunnerInfo {
    /// The job timeout, with GitLab's default when none is set.
    pub fn timeout(&self) -> std::time::Duration {
        let secs = u64::try_from(self.timeout)
            .ok()
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
        std::time::Duration::from_secs(secs)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobVariable {
    #[serde(deserialize_with = "nullable")]
    pub key: String,
    #[serde(deserialize_with = "nullable")]
    pub value: String,
    pub public: bool,
    pub masked: bool,
    /// A file-type variable: the value is written to a file and the variable
    /// holds the file's path.
    pub file: bool,
    /// Not expanded.
    pub raw: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    /// `script`, `release`, `after_script`.
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub script: Vec<String>,
    pub timeout: i64,
    /// `on_success`, `on_failure` or `always`.
    #[serde(deserialize_with = "nullable")]
    pub when: String,
    pub allow_failure: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hook {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub script: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Image {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub entrypoint: Vec<String>,
    /// `always`, `if-not-present`, `never`, tried in order.
    #[serde(deserialize_with = "nullable")]
    pub pull_policy: Vec<String>,
    /// Executor options: `{docker: {platform, user}}`. Kept as JSON so that
    /// an option this runner does not know fails the job instead of being
    /// dropped.
    #[serde(deserialize_with = "nullable")]
    pub executor_opts: serde_json::Map<String, serde_json::Value>,
}

/// A registry login GitLab sends with a job (`credentials[]`): its own
/// container registry or dependency proxy, with the job token.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Credential {
    /// `registry` is the only kind a runner uses.
    #[serde(rename = "type")]
    #[serde(deserialize_with = "nullable")]
    pub kind: String,
    /// The registry's host and port.
    #[serde(deserialize_with = "nullable")]
    pub url: String,
    #[serde(deserialize_with = "nullable")]
    pub username: String,
    /// Usually the job token. Never log it.
    #[serde(deserialize_with = "nullable")]
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// One `services[]` entry: a container started beside the job's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    /// The image, unexpanded.
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    #[serde(deserialize_with = "nullable")]
    pub entrypoint: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    pub command: Vec<String>,
    /// Extra host names, separated by spaces or commas, unexpanded.
    #[serde(deserialize_with = "nullable")]
    pub alias: String,
    #[serde(deserialize_with = "nullable")]
    pub variables: Vec<ServiceVariable>,
    #[serde(deserialize_with = "nullable")]
    pub pull_policy: Vec<String>,
    /// As [`Image::executor_opts`].
    #[serde(deserialize_with = "nullable")]
    pub executor_opts: serde_json::Map<String, serde_json::Value>,
}

/// A service's own variable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceVariable {
    #[serde(deserialize_with = "nullable")]
    pub key: String,
    /// Rails sends strings; numbers and booleans are read as their text.
    #[serde(deserialize_with = "stringly")]
    pub value: String,
}

/// Reads a string, a number or a boolean as text, `null` as empty.
fn stringly<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// When an artifact or cache entry applies (`artifacts:when`, `cache:when`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    Always,
    OnFailure,
    /// Also what an empty or unknown value means, as in gitlab-runner.
    #[default]
    #[serde(other)]
    OnSuccess,
}

impl When {
    /// Whether an entry with this `when` applies to a job that succeeded
    /// (or not).
    pub fn applies(self, success: bool) -> bool {
        match self {
            When::OnSuccess => success,
            When::OnFailure => !success,
            When::Always => true,
        }
    }
}

/// One `artifacts[]` entry: the archive of `artifacts:paths` or one report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Artifact {
    /// `artifacts:name`, unexpanded; `artifacts` when empty.
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    pub untracked: bool,
    /// Globs relative to the project directory, unexpanded.
    #[serde(deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    pub exclude: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    pub when: When,
    /// Passed to GitLab unchanged (`1 week`, `never`); GitLab's default when
    /// empty.
    #[serde(deserialize_with = "nullable")]
    pub expire_in: String,
    /// `archive` or a report type (`junit`, `dotenv`, …).
    #[serde(deserialize_with = "nullable")]
    pub artifact_type: String,
    /// `zip`, `gzip` or `raw`; `zip` when empty.
    #[serde(deserialize_with = "nullable")]
    pub artifact_format: String,
}

/// The artifacts file of a dependency (`JobArtifactFile`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArtifactFile {
    #[serde(deserialize_with = "nullable")]
    pub filename: String,
    pub size: u64,
}

/// One `dependencies[]` entry: a job whose artifacts this job downloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dependency {
    pub id: i64,
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    /// The token to download with (the running job's own in newer GitLab).
    /// Never log it.
    #[serde(deserialize_with = "nullable")]
    pub token: String,
    /// Present when the job has artifacts to download.
    pub artifacts_file: Option<ArtifactFile>,
}

impl Dependency {
    /// Whether there is anything to download (gitlab-runner skips entries
    /// without a file name).
    pub fn has_artifacts(&self) -> bool {
        self.artifacts_file
            .as_ref()
            .is_some_and(|file| !file.filename.is_empty())
    }
}

/// One `cache[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cache {
    /// Unexpanded; GitLab sends at least `default`.
    #[serde(deserialize_with = "nullable")]
    pub key: String,
    pub untracked: bool,
    #[serde(deserialize_with = "nullable")]
    pub paths: Vec<String>,
    /// `pull`, `push` or `pull-push` (also when empty).
    #[serde(deserialize_with = "nullable")]
    pub policy: String,
    #[serde(deserialize_with = "nullable")]
    pub when: When,
    #[serde(deserialize_with = "nullable")]
    pub fallback_keys: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobFeatures {
    pub trace_sections: bool,
    /// The failure reasons this GitLab accepts.
    #[serde(deserialize_with = "nullable")]
    pub failure_reasons: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    pub token_mask_prefixes: Vec<String>,
}

/// Expands `$NAME` and `${NAME}` in `text` with `lookup`, unknown names
/// empty, as Go's `os.Expand` (and so gitlab-runner) does. `$$` is a
/// literal `$`; a `$` that starts no name is kept.
pub fn expand_with(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => {
                    out.push_str(&lookup(&braced[..end]).unwrap_or_default());
                    rest = &braced[end + 1..];
                }
                None => {
                    out.push_str(&rest[at..]);
                    rest = "";
                }
            }
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(&lookup(&after[..len]).unwrap_or_default());
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    out
}

/// Reads `null` as the type's default: GitLab sends `null` for empty lists
/// and strings in some versions.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why a job payload cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("job payload is not valid JSON for a GitLab job: {0}")]
    Json(#[from] serde_json::Error),
    #[error("job payload has no {0}; GitLab always sends it, so the response did not come from a GitLab runner API")]
    Missing(&'static str),
}

impl JobPayload {
    /// Parses a payload and checks the fields every job needs.
    ///
    /// # Errors
    /// Fails on invalid JSON or a missing `id` or `token`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, PayloadError> {
        let job: JobPayload = serde_json::from_slice(bytes)?;
        if job.id <= 0 {
            return Err(PayloadError::Missing("id"));
        }
        if job.token.is_empty() {
            return Err(PayloadError::Missing("token"));
        }
        Ok(job)
    }

    /// The step with this name (`script`, `after_script`, …).
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The value of a job variable, last definition wins as in GitLab.
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    /// Expands job variables in `text` as gitlab-runner expands the values
    /// it reads itself (artifact names and paths, cache keys): `$NAME` and
    /// `${NAME}`, the last definition of a name winning.
    pub fn expand(&self, text: &str) -> String {
        expand_with(text, |name| self.variable(name).map(str::to_owned))
    }

    /// A human name for logs: the job name, or its id.
    pub fn display_name(&self) -> String {
        if self.job_info.name.is_empty() {
            format!("job {}", self.id)
        } else {
            self.job_info.name.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "CI_JOB_NAME" => Some("build".into()),
            "REF" => Some("main".into()),
            _ => None,
        }
    }

    #[test]
    fn names_in_both_spellings_expand_and_unknown_ones_vanish() {
        let cases = [
            ("$CI_JOB_NAME-$REF", "build-main"),
            ("${CI_JOB_NAME}_x", "build_x"),
            ("out/$MISSING/x", "out//x"),
            ("cost $$5", "cost $5"),
            ("a $ b", "a $ b"),
            ("trailing $", "trailing $"),
            ("${unclosed", "${unclosed"),
            ("plain", "plain"),
        ];
        for (text, want) in cases {
            assert_eq!(expand_with(text, lookup), want, "{text}");
        }
    }

    #[test]
    fn minimal_payload_parses_with_defaults() {
        let job =
            JobPayload::from_json(br#"{"id": 5, "token": "glcbt-abc", "new_field": [1]}"#).unwrap();
        assert_eq!(job.id, 5);
        assert!(job.steps.is_empty());
        assert_eq!(
            job.runner_info.timeout().as_secs(),
            DEFAULT_JOB_TIMEOUT_SECS
        );
    }

    #[test]
    fn payload_without_token_is_refused_with_the_field_named() {
        let err = JobPayload::from_json(br#"{"id": 5}"#).unwrap_err();
        assert!(err.to_string().contains("no token"), "{err}");
        let err = JobPayload::from_json(b"not json").unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn nulls_and_gitlab_shapes_parse() {
        let job = JobPayload::from_json(
            br#"{"id": 9, "token": "t", "image": null, "services": null, "job_info": null,
                 "variables": [{"key": "A", "value": "1", "public": true, "masked": false},
                               {"key": "A", "value": "2", "public": true, "masked": false}],
                 "steps": [{"name": "script", "script": ["echo hi"], "timeout": 3600, "when": "on_success", "allow_failure": false}],
                 "runner_info": {"timeout": 60, "runner_session_url": null},
                 "git_info": {"ref": "main", "refspecs": ["+refs/heads/main:refs/remotes/origin/main"], "depth": 20}}"#,
        )
        .unwrap();
        assert_eq!(job.variable("A"), Some("2"));
        assert_eq!(job.step("script").unwrap().script, vec!["echo hi"]);
        assert_eq!(job.runner_info.timeout().as_secs(), 60);
        assert_eq!(job.git_info.git_ref, "main");
    }

    #[test]
    fn artifacts_dependencies_and_caches_parse_as_gitlab_sends_them() {
        let job = JobPayload::from_json(
            br#"{"id": 9, "token": "t",
                 "artifacts": [
                   {"name": "build", "untracked": false, "paths": ["out/"], "exclude": ["out/*.tmp"],
                    "when": "on_success", "expire_in": "1 week", "artifact_type": "archive", "artifact_format": "zip"},
                   {"name": "junit.xml", "paths": ["report.xml"], "when": "always", "expire_in": null,
                    "artifact_type": "junit", "artifact_format": "gzip"},
                   {"paths": ["x"], "when": "sometimes"}],
                 "dependencies": [
                   {"id": 3, "name": "build", "token": "t", "artifacts_file": {"filename": "artifacts.zip", "size": 10}},
                   {"id": 4, "name": "lint", "token": "t"}],
                 "cache": [{"key": "default-non_protected", "untracked": false, "paths": ["vendor/"],
                            "policy": "pull-push", "when": "on_success", "fallback_keys": ["main"]}]}"#,
        )
        .unwrap();
        assert_eq!(job.artifacts[0].exclude, vec!["out/*.tmp"]);
        assert_eq!(job.artifacts[1].when, When::Always);
        assert_eq!(job.artifacts[1].expire_in, "");
        assert_eq!(
            job.artifacts[2].when,
            When::OnSuccess,
            "unknown is on_success"
        );
        assert!(job.dependencies[0].has_artifacts());
        assert!(!job.dependencies[1].has_artifacts());
        assert_eq!(job.cache[0].fallback_keys, vec!["main"]);
        assert!(When::Always.applies(false) && !When::OnFailure.applies(true));
        let job = JobPayload::from_json(
            br#"{"id": 9, "token": "t",
                 "services": [{"name": "postgres:16", "alias": "db, pg", "entrypoint": null,
                               "command": ["postgres", "-c", "fsync=off"], "ports": [],
                               "variables": [{"key": "POSTGRES_DB", "value": "ci"}, {"key": "N", "value": 3}],
                               "pull_policy": null}]}"#,
        )
        .unwrap();
        let service = &job.services[0];
        assert_eq!(service.alias, "db, pg");
        assert_eq!(service.command, vec!["postgres", "-c", "fsync=off"]);
        assert_eq!(service.variables[1].value, "3");
    }
}
