#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! One coordinator, several GitLab runners: each verifies and asks for jobs
//! with its own token and system id, and its jobs run on its own fleet only.

use std::process::Stdio;
use std::time::Duration;

use servitor_agent::config::{AgentConfig, ExecutorKind};
use servitor_testkit::gitlab::{JobSpec, JobState, StandInConfig};
use servitor_tests::{Harness, HarnessOptions, TestRunner};

const SMALL_TOKEN: &str = "glrt-small-runner-token-0123";
const LARGE_TOKEN: &str = "glrt-large-runner-token-4567";

fn two_runners() -> HarnessOptions {
    HarnessOptions {
        executor: "shell",
        concurrent: 4,
        capacity_per_instance: 1,
        standin: StandInConfig {
            runner_tokens: vec![SMALL_TOKEN.to_owned(), LARGE_TOKEN.to_owned()],
            ..StandInConfig::default()
        },
        runners: vec![
            TestRunner {
                name: "small".into(),
                token: SMALL_TOKEN.into(),
                max_instances: 1,
            },
            TestRunner {
                name: "large".into(),
                token: LARGE_TOKEN.into(),
                max_instances: 2,
            },
        ],
        ..HarnessOptions::default()
    }
}

/// Jobs GitLab hands to the small runner run on the small runner's
/// instances, the large runner's on its own; each job went to the runner
/// manager (system id) of the runner that took it; `status` shows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_runners_jobs_run_on_its_own_fleet() {
    let mut h = Harness::start(two_runners()).await.unwrap();
    let coordinator = h.coordinator();
    let names: Vec<&str> = coordinator
        .runners
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["small", "large"]);
    let small_id = coordinator.runners[0].system_id.clone();
    let large_id = coordinator.runners[1].system_id.clone();
    assert_ne!(small_id, large_id, "each runner has its own system id");

    let mut jobs = Vec::new();
    for n in 0..2 {
        for (runner, token) in [("small", SMALL_TOKEN), ("large", LARGE_TOKEN)] {
            let id = h
                .standin
                .push_job(
                    JobSpec::new(format!("{runner}-{n}"))
                        .script([format!("echo built by the {runner} runner")])
                        .for_runner(token),
                )
                .await
                .unwrap();
            jobs.push((id, runner, token));
        }
    }
    for (id, runner, token) in &jobs {
        let record = h.wait_final(*id, Duration::from_secs(90)).await.unwrap();
        let trace = record.trace_text();
        assert_eq!(record.state, JobState::Success, "{trace}");
        assert!(
            trace.contains(&format!("built by the {runner} runner")),
            "{trace}"
        );
        let other = if *runner == "small" { "large" } else { "small" };
        assert!(
            trace.contains(&format!("on local-{runner}-"))
                && !trace.contains(&format!("local-{other}-")),
            "job {id} of the {runner} runner ran on another fleet:\n{trace}"
        );
        assert!(
            trace.contains(&format!("(runner {runner})")),
            "the log's first line names the runner:\n{trace}"
        );
        assert_eq!(record.runner_token.as_deref(), Some(*token));
        let expected = if *runner == "small" {
            &small_id
        } else {
            &large_id
        };
        assert_eq!(record.system_id.as_ref(), Some(expected));
    }

    let mut admin = servitor_coordinator::admin::connect(&h.coordinator().admin_socket)
        .await
        .unwrap();
    let status = admin
        .status(servitor_proto::admin::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let shown: Vec<(String, String)> = status
        .runners
        .iter()
        .map(|r| (r.name.clone(), r.system_id.clone()))
        .collect();
    assert_eq!(
        shown,
        [
            ("small".to_owned(), small_id),
            ("large".to_owned(), large_id)
        ]
    );
    let text = servitor_coordinator::admin::render_status(&status);
    assert!(
        text.contains("RUNNER small") && text.contains("RUNNER large"),
        "{text}"
    );
    for agent in &status.agents {
        assert!(
            agent
                .instance_id
                .starts_with(&format!("local-{}-", agent.runner)),
            "{agent:?}"
        );
    }
    h.stop().await;
}

/// The coordinator's `concurrent` caps every runner together, and a
/// runner's own `concurrent` caps it alone: never more jobs are held than
/// either allows, and every job still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_caps_each_runner_and_all_together() {
    let mut options = two_runners();
    options.concurrent = 2;
    options.runners[0].max_instances = 2;
    options.configure = servitor_tests::config::Tweak::new(|c| c.runners[0].concurrent = Some(1));
    let mut h = Harness::start(options).await.unwrap();
    let mut jobs = Vec::new();
    for n in 0..3 {
        for (runner, token) in [("small", SMALL_TOKEN), ("large", LARGE_TOKEN)] {
            let spec = JobSpec::new(format!("{runner}-{n}"))
                .script(["sleep 1", "echo done"])
                .for_runner(token);
            jobs.push(h.standin.push_job(spec).await.unwrap());
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (mut most, mut most_small) = (0, 0);
    loop {
        let held = h.coordinator().core.jobs();
        most = most.max(held.len());
        most_small = most_small.max(held.iter().filter(|j| j.runner == "small").count());
        let done = jobs
            .iter()
            .all(|id| h.standin.job(*id).is_some_and(|j| j.state.is_final()));
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most <= 2, "{most} jobs held at once; concurrent = 2");
    assert!(
        most_small <= 1,
        "{most_small} small jobs at once; its concurrent = 1"
    );
    for id in jobs {
        let record = h.standin.job(id).unwrap();
        assert_eq!(record.state, JobState::Success, "{}", record.trace_text());
    }
    h.stop().await;
}

/// An agent that names a runner this coordinator does not serve is turned
/// away with the runners it does serve, and stops with the configuration
/// exit code rather than redialling forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_an_unknown_runner_is_refused_and_stops() {
    let mut h = Harness::start(two_runners()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(
        h.coordinator().link_addr.to_string(),
        h.coordinator().ca_pem_path.clone(),
        h.dir.path().join(servitor_tests::config::JOIN_TOKEN_FILE),
    );
    config.runner = "medium".to_owned();
    config.state_dir = Some(dir.path().join("state"));
    config.executor.kind = ExecutorKind::Shell;
    config.executor.work_dir = dir.path().join("builds");
    config.instance.imds = false;
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(servitor_tests::agent_binary().unwrap())
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the refused agent stops instead of redialling")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(i32::from(servitor_runtime::exit::CONFIG)),
        "{stderr}"
    );
    assert!(
        stderr.contains("serves no runner \\\"medium\\\"")
            || stderr.contains("serves no runner \"medium\""),
        "{stderr}"
    );
    assert!(stderr.contains("small, large"), "{stderr}");
    assert!(
        !h.coordinator()
            .core
            .agents()
            .iter()
            .any(|a| a.runner == "medium"),
        "the refused agent takes no work"
    );
    h.stop().await;
}
