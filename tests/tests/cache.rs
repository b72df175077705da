#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Caches live off the instance: one job saves, the next restores, through
//! moto's S3 with URLs the coordinator signed (the agents run without any
//! AWS credentials), or through the local fleet's directory; fallback keys
//! are tried in order and policies hold.

use std::time::Duration;

use servitor_coordinator::config::{CacheConfig, CacheKind, S3CacheConfig};
use servitor_proto::job::Cache;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::aws::{aws_environment, Moto, REGION};
use servitor_tests::config::Tweak;
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const BUCKET: &str = "servitor-cache";

fn vendor_cache(key: &str, fallbacks: &[&str], policy: &str) -> Cache {
    Cache {
        key: key.to_owned(),
        paths: vec!["vendor/".to_owned()],
        policy: policy.to_owned(),
        fallback_keys: fallbacks.iter().map(|k| (*k).to_owned()).collect(),
        ..Cache::default()
    }
}

/// Runs a job that fills `vendor/` and saves it under `deps-main`, then one
/// that restores it through a fallback key with a pull-only policy.
async fn save_then_restore(h: &Harness) -> String {
    let warm = h
        .standin
        .push_job(
            JobSpec::new("warm")
                .script(["mkdir -p vendor", "echo lib-v1 > vendor/lib.txt"])
                .cache(vendor_cache("deps-main", &[], "pull-push")),
        )
        .await
        .unwrap();
    let r = h.wait_final(warm, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("Saving cache for successful job"), "{text}");
    assert!(text.contains("Creating cache deps-main..."), "{text}");
    assert!(text.contains("Created cache"), "{text}");
    // The first job found nothing to restore, and said so without failing.
    assert!(text.contains("Checking cache for deps-main..."), "{text}");
    assert!(text.contains("Failed to extract cache"), "{text}");

    let using = h
        .standin
        .push_job(
            JobSpec::new("use")
                .script(["cat vendor/lib.txt"])
                .cache(vendor_cache("deps-feature", &["deps-main"], "pull")),
        )
        .await
        .unwrap();
    let r = h.wait_final(using, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    let feature = text.find("Checking cache for deps-feature...").unwrap();
    let main = text.find("Checking cache for deps-main...").unwrap();
    let extracted = text.find("Successfully extracted cache").unwrap();
    assert!(feature < main && main < extracted, "{text}");
    assert!(text.contains("lib-v1"), "{text}");
    assert!(
        text.contains("Not uploading cache deps-feature due to policy"),
        "{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_go_through_s3_with_signed_urls_and_the_agents_hold_no_credentials() {
    aws_environment();
    let moto = Moto::start().await.unwrap();
    let created = reqwest::Client::new()
        .put(format!("{}/{BUCKET}", moto.url()))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let endpoint = moto.url().to_owned();
    let h = Harness::start(HarnessOptions {
        configure: Tweak::new(move |config| {
            config.cache = Some(CacheConfig {
                kind: CacheKind::S3,
                path: "ci".to_owned(),
                shared: false,
                s3: Some(S3CacheConfig {
                    bucket: BUCKET.to_owned(),
                    region: Some(REGION.to_owned()),
                    endpoint_url: Some(endpoint.clone()),
                }),
                local: None,
            });
        }),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let text = save_then_restore(&h).await;
    assert!(
        text.contains(&format!(
            "Downloading cache from {}/{BUCKET}/ci/",
            moto.url()
        )),
        "{text}"
    );

    // gitlab-runner's layout: <path>/runner/<short token>/project/<id>/<key>,
    // with the key in the object's metadata.
    let config = moto.sdk_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );
    let object = s3
        .head_object()
        .bucket(BUCKET)
        .key("ci/runner/servitor-/project/1/deps-main")
        .send()
        .await
        .unwrap();
    assert_eq!(
        object
            .metadata()
            .and_then(|m| m.get("cachekey"))
            .map(String::as_str),
        Some("deps-main")
    );

    // The agents that did it have no AWS credentials at all.
    let fleet = h.coordinator().local_fleet.as_ref().unwrap();
    let mut checked = 0;
    for instance in ["local-1", "local-2"] {
        if let Some(pid) = fleet.pid(instance) {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let names: Vec<String> = environ
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            assert!(
                !names.iter().any(|v| v.starts_with("AWS_")),
                "agent {instance} has AWS variables: {names:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no agent left to check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fleet_keeps_caches_in_its_state_directory() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    save_then_restore(&h).await;
    let saved = h
        .dir
        .path()
        .join("state/cache/runner/servitor-/project/1/deps-main");
    assert!(saved.is_file(), "{} is missing", saved.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_saves_only_caches_that_ask_for_it() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("flaky")
                .script([
                    "mkdir -p vendor logs",
                    "echo v > vendor/x",
                    "echo l > logs/y",
                    "exit 1",
                ])
                .cache(vendor_cache("success-only", &[], "pull-push"))
                .cache(Cache {
                    key: "failure-logs".to_owned(),
                    paths: vec!["logs/".to_owned()],
                    when: servitor_proto::job::When::OnFailure,
                    ..Cache::default()
                }),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(
        r.final_update.as_ref().unwrap().exit_code,
        Some(1),
        "{text}"
    );
    assert!(text.contains("Saving cache for failed job"), "{text}");
    assert!(text.contains("Creating cache failure-logs..."), "{text}");
    assert!(!text.contains("Creating cache success-only"), "{text}");
}
