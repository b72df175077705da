//! Tests of the stand-in's wire behaviour with plain HTTP, and of its git
//! server with the git CLI.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use super::*;

async fn standin() -> StandIn {
    StandIn::start(StandInConfig::default()).await.unwrap()
}

/// Takes the next job with a plain job request, returning its payload.
async fn take(standin: &StandIn) -> Value {
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/api/v4/jobs/request", standin.url()))
        .json(&json!({
            "token": DEFAULT_RUNNER_TOKEN,
            "system_id": "s_standintest1",
            "info": {"features": {"cancel_gracefully": true}},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

fn variable<'a>(payload: &'a Value, key: &str) -> &'a Value {
    payload["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key"] == key)
        .unwrap_or_else(|| panic!("no variable {key}"))
}

#[tokio::test]
async fn payload_is_built_like_gitlab() {
    let standin = standin();
    let standin = standin.await;
    let id = standin
        .push_job(
            JobSpec::new("unit")
                .script(["make", "make test"])
                .after_script(["echo bye"])
                .masked_variable("SECRET", "verysecret1")
                .file_variable("KUBECONFIG", "cfg")
                .image("alpine:3")
                .pull_policy("if-not-present")
                .timeout(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let payload = take(&standin).await;
    assert_eq!(payload["id"], id);
    let token = payload["token"].as_str().unwrap();
    assert!(token.starts_with("glcbt-"));
    assert_eq!(payload["runner_info"]["timeout"], 600);
    assert_eq!(payload["job_info"]["name"], "unit");
    assert_eq!(
        payload["git_info"]["repo_url"],
        format!(
            "http://gitlab-ci-token:{token}@{}/{DEFAULT_PROJECT_PATH}.git",
            standin.addr()
        )
    );
    let refspecs = payload["git_info"]["refspecs"].as_array().unwrap();
    assert_eq!(refspecs[0], "+refs/pipelines/1001:refs/pipelines/1001");
    assert_eq!(variable(&payload, "CI_JOB_TOKEN")["masked"], true);
    assert_eq!(variable(&payload, "CI_JOB_TOKEN")["value"], token);
    assert_eq!(variable(&payload, "CI_JOB_ID")["value"], id.to_string());
    assert_eq!(
        variable(&payload, "CI_PROJECT_PATH")["value"],
        DEFAULT_PROJECT_PATH
    );
    assert_eq!(variable(&payload, "SECRET")["masked"], true);
    assert_eq!(variable(&payload, "KUBECONFIG")["file"], true);
    assert!(variable(&payload, "SECRET").get("file").is_none());
    let steps = payload["steps"].as_array().unwrap();
    assert_eq!(steps[0]["name"], "script");
    assert_eq!(steps[0]["when"], "on_success");
    assert_eq!(steps[0]["script"], json!(["make", "make test"]));
    assert_eq!(steps[1]["name"], "after_script");
    assert_eq!(steps[1]["when"], "always");
    assert_eq!(steps[1]["allow_failure"], true);
    assert_eq!(payload["image"]["name"], "alpine:3");
    assert_eq!(payload["image"]["pull_policy"], json!(["if-not-present"]));
    assert_eq!(payload["features"]["trace_sections"], true);
    let reasons = payload["features"]["failure_reasons"].as_array().unwrap();
    assert!(reasons.contains(&json!("runner_configuration_error")));
    assert_eq!(reasons.len(), 34);

    // The payload parses as the runner's types.
    let job = servitor_proto::job::JobPayload::from_json(payload.to_string().as_bytes()).unwrap();
    assert_eq!(job.step("after_script").unwrap().script, vec!["echo bye"]);
    let record = standin.job(id).unwrap();
    assert_eq!(record.state, JobState::Running);
    assert!(record.supports_canceling);
}

#[tokio::test]
async fn job_endpoints_follow_rails() {
    let standin = standin().await;
    let id = standin.push_job(JobSpec::new("w")).await.unwrap();
    let payload = take(&standin).await;
    let token = payload["token"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let put = |body: Value| {
        http.put(format!("{}/api/v4/jobs/{id}", standin.url()))
            .json(&body)
            .send()
    };
    let patch = |range: Option<&str>, body: &'static str, token: &str| {
        let mut request = http
            .patch(format!(
                "{}/api/v4/jobs/{id}/trace?debug_trace=false",
                standin.url()
            ))
            .header("JOB-TOKEN", token)
            .body(body);
        if let Some(range) = range {
            request = request.header("Content-Range", range);
        }
        request.send()
    };

    let r = put(json!({"token": token, "state": "running"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["job-status"], "running");
    assert_eq!(r.headers()["x-gitlab-trace-update-interval"], "3");
    let r = put(json!({"token": token, "state": "bogus"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = put(json!({"token": "glcbt-wrong", "state": "running"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let r = patch(None, "x", &token).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = patch(Some("0-4"), "hello", &token).await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-5");
    assert_eq!(r.headers()["job-status"], "running");
    let r = patch(Some("3-5"), "abc", &token).await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["range"], "0-5");
    let r = patch(Some("5-7"), "abc", "glcbt-wrong").await.unwrap();
    assert_eq!(r.status(), 403);

    let checksum = format!("crc32:{:08x}", crc32fast::hash(b"hello"));
    let r = put(json!({"token": token, "state": "failed", "failure_reason": "not_a_reason"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = put(json!({
        "token": token, "state": "failed", "failure_reason": "script_failure", "exit_code": 2,
        "output": {"checksum": checksum, "bytesize": 5}
    }))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["job-status"], "failed");
    let record = standin.job(id).unwrap();
    assert_eq!(record.checksum_ok, Some(true));
    assert_eq!(record.bytesize_ok, Some(true));
    assert_eq!(record.final_update.as_ref().unwrap().exit_code, Some(2));
    assert_eq!(record.final_update.as_ref().unwrap().body["token"], "***");

    // A finished job takes no more calls.
    let r = put(json!({"token": token, "state": "running"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["job-status"], "failed");
    let r = patch(Some("5-7"), "abc", &token).await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn graceful_cancel_needs_the_runner_to_support_it() {
    let standin = standin().await;
    let id = standin.push_job(JobSpec::new("c")).await.unwrap();
    take(&standin).await;
    assert_eq!(standin.cancel(id, true).unwrap(), JobState::Canceling);
    assert_eq!(standin.cancel(id, false).unwrap(), JobState::Canceled);
    assert!(standin.cancel(id, false).is_err());

    // A pending job is canceled at once and never handed out.
    let id = standin.push_job(JobSpec::new("p")).await.unwrap();
    assert_eq!(standin.cancel(id, true).unwrap(), JobState::Canceled);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/v4/jobs/request", standin.url()))
        .json(&json!({"token": DEFAULT_RUNNER_TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers().contains_key("x-gitlab-last-update"));
}

async fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args([
            "-c",
            "user.name=Servitor Test",
            "-c",
            "user.email=test@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .await
        .expect("the git CLI is needed for the git-over-HTTP tests; install git")
}

async fn git_ok(dir: &Path, args: &[&str]) -> String {
    let output = git(dir, args).await;
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn git_clone_works_with_the_job_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git_ok(&repo, &["init", "-q", "-b", "main"]).await;
    std::fs::write(repo.join("README"), "hello from the stand-in\n").unwrap();
    git_ok(&repo, &["add", "README"]).await;
    git_ok(&repo, &["commit", "-q", "-m", "first"]).await;
    let head = git_ok(&repo, &["rev-parse", "HEAD"]).await;

    let standin = standin().await;
    let id = standin
        .push_job(JobSpec::new("clone").project_path("group/app").git(&repo))
        .await
        .unwrap();
    let payload = take(&standin).await;
    assert_eq!(payload["git_info"]["sha"], head.as_str());
    assert_eq!(payload["git_info"]["ref"], "main");
    let repo_url = payload["git_info"]["repo_url"].as_str().unwrap().to_owned();
    assert!(repo_url.ends_with("/group/app.git"));

    // Fetch as a runner does: init, then fetch the payload's refspecs.
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git_ok(&work, &["init", "-q"]).await;
    let mut args = vec!["fetch", "-q", "--depth", "20", repo_url.as_str()];
    let refspecs: Vec<String> = payload["git_info"]["refspecs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    args.extend(refspecs.iter().map(String::as_str));
    git_ok(&work, &args).await;
    git_ok(&work, &["checkout", "-q", &head]).await;
    assert_eq!(
        std::fs::read_to_string(work.join("README")).unwrap(),
        "hello from the stand-in\n"
    );

    // A plain clone works too.
    git_ok(dir.path(), &["clone", "-q", &repo_url, "clone"]).await;
    assert!(dir.path().join("clone/README").exists());

    // A wrong token, no token or a push is refused.
    let token = payload["token"].as_str().unwrap();
    let wrong = repo_url.replace(token, "glcbt-wrongtoken");
    let output = git(dir.path(), &["clone", "-q", &wrong, "wrong"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Authentication failed") || stderr.contains("401"),
        "{stderr}"
    );
    assert!(!stderr.contains(token));
    let anonymous = format!("{}/group/app.git", standin.url());
    let output = git(dir.path(), &["clone", "-q", &anonymous, "anon"]).await;
    assert!(!output.status.success());
    let output = git(
        &dir.path().join("clone"),
        &["push", "-q", "origin", "HEAD:refs/heads/x"],
    )
    .await;
    assert!(!output.status.success());

    // Once the job is over its token no longer reads the repository.
    standin.cancel(id, false).unwrap();
    let output = git(dir.path(), &["clone", "-q", &repo_url, "late"]).await;
    assert!(!output.status.success());
}

#[tokio::test]
async fn a_down_gitlab_answers_every_request_502_until_it_is_up() {
    let s = standin().await;
    let http = reqwest::Client::new();
    let verify = || {
        http.post(format!("{}/api/v4/runners/verify", s.url()))
            .json(&json!({"token": DEFAULT_RUNNER_TOKEN, "system_id": "s_standintest1"}))
            .send()
    };
    assert_eq!(verify().await.unwrap().status(), 200);
    s.set_down(true);
    assert_eq!(verify().await.unwrap().status(), 502);
    s.set_down(false);
    assert_eq!(verify().await.unwrap().status(), 200);
}
