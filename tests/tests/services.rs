#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Services: containers started beside a job on a network of its own,
//! reachable by their default aliases and their `alias`es, with their
//! `command` and variables, waited for, and removed with the job; the
//! privileged setting and the `/certs/client` volume Docker-in-Docker
//! needs.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptionsBuilder};
use servitor_proto::job::{Service, ServiceVariable};
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::config::Tweak;
use servitor_tests::{ensure_service_image, Harness, HarnessOptions, SERVICE_IMAGE};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn service(alias: &str) -> Service {
    Service {
        name: SERVICE_IMAGE.to_owned(),
        alias: alias.to_owned(),
        ..Service::default()
    }
}

/// What this harness's agents left in Docker of job `job_id`: containers
/// and networks (job ids restart at 1 with every stand-in, so the agent's
/// label, which names its directory, tells harnesses apart).
async fn leftovers(docker: &bollard::Docker, h: &Harness, job_id: i64) -> (usize, usize) {
    let ours = |labels: Option<&HashMap<String, String>>| {
        labels
            .and_then(|l| l.get("servitor.agent"))
            .is_some_and(|owner| owner.starts_with(&*h.dir.path().to_string_lossy()))
    };
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("servitor.job_id={job_id}")],
    )]);
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .unwrap();
    (
        containers
            .iter()
            .filter(|c| ours(c.labels.as_ref()))
            .count(),
        networks.iter().filter(|n| ours(n.labels.as_ref())).count(),
    )
}

/// Waits a little for the removal that follows a job's end, then asserts
/// nothing of the job is left.
async fn assert_nothing_left(docker: &bollard::Docker, h: &Harness, job_id: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut left = leftovers(docker, h, job_id).await;
    while left != (0, 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftovers(docker, h, job_id).await;
    }
    assert_eq!(left, (0, 0), "containers and networks left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_answer_by_alias_with_their_command_and_variables_and_leave_nothing_behind() {
    let docker = ensure_service_image().await.unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("integration")
                .service(service("web, api"))
                .service(Service {
                    alias: "greeter".to_owned(),
                    command: vec![
                        "sh".to_owned(),
                        "-c".to_owned(),
                        "mkdir -p /www && echo \"greeting=$GREETING\" > /www/index.html && exec busybox httpd -f -p 8080 -h /www".to_owned(),
                    ],
                    variables: vec![ServiceVariable {
                        key: "GREETING".to_owned(),
                        value: "hello-$CI_JOB_NAME".to_owned(),
                    }],
                    ..service("")
                })
                .script([
                    "wget -q -O - http://servitor-test-service:8080/",
                    "wget -q -O - http://web:8080/",
                    "wget -q -O - http://api:8080/",
                    "wget -q -O - http://greeter:8080/",
                ]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains("Starting service servitor-test-service:latest ..."),
        "{text}"
    );
    assert!(
        text.contains("Waiting for services to be up and running (timeout 30 seconds)..."),
        "{text}"
    );
    assert_eq!(text.matches("service ready").count(), 3, "{text}");
    assert!(text.contains("greeting=hello-integration"), "{text}");
    // The second service's default alias is the first one's: skipped.
    assert!(
        text.contains("Skipping alias \"servitor-test-service\""),
        "{text}"
    );
    assert!(!text.contains("probably didn't start properly"), "{text}");
    assert_nothing_left(docker.client(), &h, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_share_certs_with_the_job_and_unprivileged_jobs_stay_confined() {
    ensure_service_image().await.unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let dind_like = Service {
        alias: "docker".to_owned(),
        command: vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "mkdir -p /certs/client /www && echo from-the-service > /certs/client/ca.pem && echo up > /www/index.html && exec busybox httpd -f -p 8080 -h /www".to_owned(),
        ],
        ..service("")
    };
    let id = h
        .standin
        .push_job(JobSpec::new("dind").service(dind_like).script([
            "wget -q -O - http://docker:8080/",
            "cat /certs/client/ca.pem",
        ]))
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("from-the-service"), "{text}");

    let id = h
        .standin
        .push_job(JobSpec::new("plain").script([MOUNT]))
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert!(!text.contains("mounted-42"), "{text}");
}

/// Succeeds only in a privileged container.
const MOUNT: &str =
    "mkdir -p /tmp/m && busybox mount -t tmpfs none /tmp/m && echo mounted-$((40+2))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_never_answers_is_a_warning_with_its_logs_not_a_failure() {
    ensure_service_image().await.unwrap();
    let h = Harness::start(HarnessOptions {
        configure: Tweak::new(|config| config.fleet_mut().local.wait_for_services_timeout = 2),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let silent = Service {
        alias: "silent".to_owned(),
        command: vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "echo starting but never listening; sleep 300".to_owned(),
        ],
        ..service("")
    };
    let id = h
        .standin
        .push_job(
            JobSpec::new("impatient")
                .service(silent)
                .script(["echo the job ran anyway"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains("Waiting for services to be up and running (timeout 2 seconds)..."),
        "{text}"
    );
    assert!(text.contains("probably didn't start properly"), "{text}");
    assert!(text.contains("did not answer on"), "{text}");
    assert!(
        text.contains("starting but never listening"),
        "the service's logs: {text}"
    );
    assert!(text.contains("the job ran anyway"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_is_asked_of_the_engine() {
    ensure_service_image().await.unwrap();
    let h = Harness::start(HarnessOptions {
        configure: Tweak::new(|config| config.fleet_mut().local.privileged = true),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("privileged").script([MOUNT]))
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    // Where the engine may grant privileges the job mounts; where it may
    // not (an engine itself confined, as on some CI machines), the job fails
    // as a system failure that names the engine's refusal, never as a
    // script that ran without the privileges it was promised.
    let reason = r
        .final_update
        .as_ref()
        .and_then(|f| f.failure_reason.clone());
    match r.state {
        JobState::Success => assert!(text.contains("mounted-42"), "{text}"),
        _ => {
            assert_eq!(reason.as_deref(), Some("runner_system_failure"), "{text}");
            assert!(text.contains("operation not permitted"), "{text}");
            assert!(!text.contains("$ mkdir"), "the script must not run: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_stops_the_services_and_the_rerun_starts_its_own() {
    let docker = ensure_service_image().await.unwrap();
    let h = Harness::start(HarnessOptions {
        max_instances: 2,
        capacity_per_instance: 1,
        lost_grace: Duration::from_secs(3),
        imds_instances: 2,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("with-db").service(service("db")).script([
            "wget -q -O - http://db:8080/",
            "for i in $(seq 1 6); do echo step $i; sleep 1; done",
        ]))
        .await
        .unwrap();
    h.wait_trace(id, "step 2", JOB_TIMEOUT).await.unwrap();
    h.imds_of_job(id)
        .unwrap()
        .set_spot_action("terminate", Duration::from_secs(120));
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert_eq!(
        text.matches("Starting service servitor-test-service:latest")
            .count(),
        2,
        "each attempt starts its own: {text}"
    );
    assert_eq!(text.matches("service ready").count(), 2, "{text}");
    assert_nothing_left(docker.client(), &h, id).await;
}
