#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Images from a private registry: the job's `credentials[]` and the
//! `DOCKER_AUTH_CONFIG` variable, with gitlab-runner's precedence, for the
//! job's image and its services; pull policies tried in order; and the
//! image's `executor_opts`.

use std::time::Duration;

use base64::Engine as _;
use bollard::query_parameters::RemoveImageOptionsBuilder;
use servitor_proto::job::Service;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_testkit::registry::{ManifestRequest, RegistryStandIn};
use servitor_tests::{ensure_service_image, Harness, HarnessOptions, SERVICE_IMAGE, TEST_IMAGE};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// The login GitLab's own registry accepts: the job token.
const GITLAB_USER: &str = "gitlab-ci-token";
const GITLAB_PASSWORD: &str = "job-token-for-the-registry";
/// A team's deploy login, given in `DOCKER_AUTH_CONFIG`.
const DEPLOY_USER: &str = "deployer";
const DEPLOY_PASSWORD: &str = "deploy-password";

fn auth_config(registry: &str, user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#)
}

/// The manifest requests for `repository` since `from`.
fn requests_for(registry: &RegistryStandIn, repository: &str, from: usize) -> Vec<ManifestRequest> {
    registry
        .manifest_requests()
        .into_iter()
        .skip(from)
        .filter(|r| r.repository == repository)
        .collect()
}

async fn remove_image(docker: &bollard::Docker, image: &str) {
    let _ = docker
        .remove_image(
            image,
            Some(RemoveImageOptionsBuilder::new().force(true).build()),
            None,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_images_pull_with_the_jobs_logins_in_gitlab_runners_order() {
    let executor = ensure_service_image().await.unwrap();
    let docker = executor.client();
    let registry = RegistryStandIn::start(&[
        (GITLAB_USER, GITLAB_PASSWORD),
        (DEPLOY_USER, DEPLOY_PASSWORD),
    ])
    .await
    .unwrap();
    let host = registry.host();
    // A tag of this run's own, so that no earlier run's pull is reused.
    let tag = format!("t{}", std::process::id());
    let image = registry
        .copy_from(docker, TEST_IMAGE, "group/job", &tag)
        .await
        .unwrap();
    let service_image = registry
        .copy_from(docker, SERVICE_IMAGE, "group/db", &tag)
        .await
        .unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();

    // GitLab's own registry login, from the payload, for the image and
    // the service.
    let id = h
        .standin
        .push_job(
            JobSpec::new("private")
                .image(&image)
                .pull_policy("always")
                .registry_login(&host, GITLAB_USER, GITLAB_PASSWORD)
                .service(Service {
                    name: service_image.clone(),
                    alias: "db".to_owned(),
                    pull_policy: vec!["always".to_owned()],
                    ..Service::default()
                })
                .script([
                    "echo ran in the private image",
                    "wget -q -O - http://db:8080/",
                ]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("ran in the private image"), "{text}");
    assert!(text.contains("service ready"), "{text}");
    assert_eq!(
        text.matches("Authenticating with credentials from job payload (GitLab Registry)")
            .count(),
        2,
        "{text}"
    );
    for repository in ["group/job", "group/db"] {
        let served: Vec<_> = requests_for(&registry, repository, 0)
            .into_iter()
            .filter(|r| r.served)
            .collect();
        assert!(!served.is_empty(), "{repository} was never pulled");
        assert!(
            served
                .iter()
                .all(|r| r.user.as_deref() == Some(GITLAB_USER)),
            "{served:?}"
        );
    }

    // DOCKER_AUTH_CONFIG comes first: the payload's (wrong) login is not
    // used for a registry the variable names.
    let seen = registry.manifest_requests().len();
    let id = h
        .standin
        .push_job(
            JobSpec::new("deploy-login")
                .image(&image)
                .pull_policy("always")
                .registry_login(&host, GITLAB_USER, "a-stale-token")
                .variable(
                    "DOCKER_AUTH_CONFIG",
                    auth_config(&host, DEPLOY_USER, DEPLOY_PASSWORD),
                )
                .script(["echo deployed"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains("Authenticating with credentials from $DOCKER_AUTH_CONFIG"),
        "{text}"
    );
    let requests = requests_for(&registry, "group/job", seen);
    assert!(requests.iter().any(|r| r.served), "{requests:?}");
    assert!(
        requests
            .iter()
            .filter(|r| r.user.is_some())
            .all(|r| r.user.as_deref() == Some(DEPLOY_USER)),
        "{requests:?}"
    );

    // No login: the pull is refused and the job fails saying where a
    // login goes, without running its script.
    let id = h
        .standin
        .push_job(
            JobSpec::new("no-login")
                .image(&image)
                .pull_policy("always")
                .script(["echo never runs"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert!(text.contains(&image), "{text}");
    assert!(text.contains("DOCKER_AUTH_CONFIG"), "{text}");
    assert!(!text.contains("$ echo never runs"), "{text}");

    // [always, if-not-present]: the registry refuses, the image pulled
    // before is used, with a warning.
    let id = h
        .standin
        .push_job(
            JobSpec::new("fallback")
                .image(&image)
                .pull_policies(["always", "if-not-present"])
                .script(["echo ran from the local copy"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains(&format!(
            "Using effective pull policy of [always if-not-present] for container {image}"
        )),
        "{text}"
    );
    assert!(
        text.contains("Failed to pull image with policy \"always\""),
        "{text}"
    );
    assert!(text.contains("ran from the local copy"), "{text}");

    remove_image(docker, &image).await;
    remove_image(docker, &service_image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_opts_set_the_user_and_an_unknown_option_fails_the_job() {
    servitor_tests::ensure_test_image().await.unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let platform = format!("linux/{}", docker_arch());
    let id = h
        .standin
        .push_job(
            JobSpec::new("as-nobody")
                .image(TEST_IMAGE)
                .image_executor_opts(serde_json::json!({
                    "docker": {"user": "65534", "platform": platform}
                }))
                .script(["echo uid=$(id -u)"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("uid=65534"), "{text}");

    let id = h
        .standin
        .push_job(
            JobSpec::new("gpus")
                .image(TEST_IMAGE)
                .image_executor_opts(serde_json::json!({"docker": {"gpus": "all"}}))
                .script(["echo never runs"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert!(text.contains("docker.gpus"), "{text}");
    assert!(!text.contains("$ echo never runs"), "{text}");
}

/// This machine's architecture as Docker platforms name it.
fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
