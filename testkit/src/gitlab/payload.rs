//! Builds the job payload of a 201 answer the way GitLab presents a build
//! to a runner (`Ci::BuildRunnerPresenter` and `JobRequest::Response`):
//! job and git info, predefined variables before the project's, steps,
//! image and features.
//!
//! Not responsible for the job's lifecycle (see `api`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Job;

/// Every failure reason a recent GitLab accepts
/// (`Enums::Ci::CommitStatus.failure_reasons`), sent as
/// `features.failure_reasons`.
pub(super) const FAILURE_REASONS: &[&str] = &[
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "forward_deployment_failure",
    "user_blocked",
    "project_deleted",
    "ci_quota_exceeded",
    "pipeline_loop_detected",
    "no_matching_runner",
    "trace_size_exceeded",
    "builds_disabled",
    "environment_creation_failure",
    "deployment_rejected",
    "failed_outdated_deployment_job",
    "job_execution_server_timeout",
    "stuck_pending_with_matching_runners",
    "stuck_pending_no_matching_runners",
    "no_updates_running",
    "no_updates_canceling",
    "server_timeout_running",
    "server_timeout_canceling",
    "runner_configuration_error",
    "runner_external_dependency_failure",
    "runner_interrupted",
];

/// The project id every stand-in job belongs to.
const PROJECT_ID: i64 = 1;

const ALPHANUMERIC: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// `len` random alphanumerics.
pub(super) fn random_token(len: usize) -> String {
    (0..len)
        .map(|_| char::from(ALPHANUMERIC[rand::random_range(0..ALPHANUMERIC.len())]))
        .collect()
}

fn variable(key: &str, value: &str, public: bool, masked: bool) -> Value {
    json!({ "key": key, "value": value, "public": public, "masked": masked })
}

/// The `dependencies[]` of `job` as Rails presents them: each needed job's
/// id and name, the running job's own token (newest Rails), and its
/// `archive` file when it has one.
pub(super) fn dependencies(job: &Job, jobs: &BTreeMap<i64, Job>) -> Value {
    let token = job.record.token.expose();
    let list: Vec<Value> = job
        .needs
        .iter()
        .filter_map(|id| jobs.get(id))
        .map(|dependency| {
            let mut entry = json!({
                "id": dependency.record.id,
                "name": dependency.record.name,
                "token": token,
            });
            if let Some(archive) = dependency.record.archive() {
                entry["artifacts_file"] = json!({
                    "filename": archive.filename,
                    "size": archive.body.len(),
                });
            }
            entry
        })
        .collect();
    Value::Array(list)
}

/// The 201 body for `job`, served from `base_url`.
pub(super) fn build(job: &Job, base_url: &str, dependencies: Value) -> Value {
    let spec = &job.spec;
    let id = job.record.id;
    let token = job.record.token.expose();
    let project_path = spec.project_path.trim_matches('/');
    let (namespace, project_name) = project_path.rsplit_once('/').unwrap_or(("", project_path));
    let host_port = base_url.trim_start_matches("http://");
    let project_url = format!("{base_url}/{project_path}");
    let repo_url = format!("http://gitlab-ci-token:{token}@{host_port}/{project_path}.git");
    let sha = job
        .sha
        .clone()
        .unwrap_or_else(|| "0000000000000000000000000000000000000000".to_owned());
    let branch = &job.branch;
    let depth = spec.git.as_ref().map_or(0, |g| g.depth);
    let pipeline_ref = format!("refs/pipelines/{}", job.pipeline_id);
    let mut refspecs = vec![format!("+{pipeline_ref}:{pipeline_ref}")];
    if depth > 0 {
        refspecs.push(format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"));
    } else {
        refspecs.push("+refs/heads/*:refs/remotes/origin/*".to_owned());
        refspecs.push("+refs/tags/*:refs/tags/*".to_owned());
    }
    let timeout = spec.timeout.as_secs();

    let mut variables = vec![
        variable("CI", "true", true, false),
        variable("GITLAB_CI", "true", true, false),
        variable("CI_SERVER_URL", base_url, true, false),
        variable("CI_SERVER_HOST", "127.0.0.1", true, false),
        variable("CI_JOB_ID", &id.to_string(), true, false),
        variable(
            "CI_JOB_URL",
            &format!("{project_url}/-/jobs/{id}"),
            true,
            false,
        ),
        variable("CI_JOB_TOKEN", token, false, true),
        variable("CI_JOB_NAME", &spec.name, true, false),
        variable("CI_JOB_STAGE", &spec.stage, true, false),
        variable("CI_PIPELINE_ID", &job.pipeline_id.to_string(), true, false),
        variable("CI_PROJECT_ID", &PROJECT_ID.to_string(), true, false),
        variable("CI_PROJECT_NAME", project_name, true, false),
        variable("CI_PROJECT_PATH", project_path, true, false),
        variable("CI_PROJECT_NAMESPACE", namespace, true, false),
        variable("CI_PROJECT_URL", &project_url, true, false),
        variable("CI_REPOSITORY_URL", &repo_url, false, false),
        variable("CI_COMMIT_SHA", &sha, true, false),
        variable("CI_COMMIT_REF_NAME", branch, true, false),
        variable("CI_COMMIT_BRANCH", branch, true, false),
        variable("CI_DEFAULT_BRANCH", branch, true, false),
        variable("GIT_DEPTH", &depth.to_string(), true, false),
    ];
    // A job without a repository behind it is a project that set
    // `GIT_STRATEGY: none`: the runner fetches nothing.
    if spec.git.is_none() {
        variables.push(variable("GIT_STRATEGY", "none", true, false));
    }
    for v in &spec.variables {
        let mut entry = variable(&v.key, &v.value, false, v.masked);
        // GitLab sends `file` only when true.
        if v.file {
            entry["file"] = Value::Bool(true);
        }
        variables.push(entry);
    }

    let mut steps = vec![json!({
        "name": "script",
        "script": spec.script,
        "timeout": timeout,
        "when": "on_success",
        "allow_failure": false,
    })];
    if !spec.release.is_empty() {
        steps.push(json!({
            "name": "release",
            "script": spec.release,
            "timeout": timeout,
            "when": "on_success",
            "allow_failure": false,
        }));
    }
    if !spec.after_script.is_empty() {
        steps.push(json!({
            "name": "after_script",
            "script": spec.after_script,
            "timeout": timeout,
            "when": "always",
            "allow_failure": true,
        }));
    }

    let image = spec.image.as_ref().map_or(Value::Null, |image| {
        json!({
            "name": image.name,
            "entrypoint": null,
            "ports": [],
            "pull_policy": if image.pull_policy.is_empty() { Value::Null } else { json!(image.pull_policy) },
            "executor_opts": image.executor_opts,
        })
    });

    let mut features = json!({
        "trace_sections": true,
        "failure_reasons": FAILURE_REASONS,
    });
    if !spec.token_mask_prefixes.is_empty() {
        features["token_mask_prefixes"] = json!(spec.token_mask_prefixes);
    }

    json!({
        "id": id,
        "token": token,
        "allow_git_fetch": true,
        "job_info": {
            "id": id,
            "name": spec.name,
            "stage": spec.stage,
            "project_id": PROJECT_ID,
            "project_name": project_name,
            "project_full_path": project_path,
            "pipeline_id": job.pipeline_id,
            "time_in_queue_seconds": 0,
        },
        "git_info": {
            "repo_url": repo_url,
            "ref": branch,
            "sha": sha,
            "before_sha": "0000000000000000000000000000000000000000",
            "ref_type": "branch",
            "refspecs": refspecs,
            "depth": depth,
            "repo_object_format": "sha1",
            "protected": false,
        },
        "runner_info": { "timeout": timeout, "runner_session_url": null },
        "variables": variables,
        "steps": steps,
        "image": image,
        "services": spec.services,
        "hooks": spec.hooks,
        "artifacts": spec.artifacts,
        "cache": spec.cache,
        "credentials": spec.credentials,
        "dependencies": dependencies,
        "features": features,
    })
}
