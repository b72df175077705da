//! The coordinator itself is killed (`kill -9`) mid-job and started again:
//! the lease book brings the job back, the agent reconnects and reports the
//! attempt it still runs, the GitLab log goes on at the right offset, and
//! the job is reported exactly once.

// Helpers here are test code too: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use servitor_testkit::gitlab::{JobSpec, JobState, StandIn, StandInConfig};
use servitor_tests::CoordinatorProcess;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_job_resumes_it_and_reports_once() {
    servitor_tests::init_tracing();
    let standin = StandIn::start(StandInConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config_path, log) = servitor_tests::process_config(dir.path(), &standin.url()).unwrap();
    let first = CoordinatorProcess::start(&config_path, &log).unwrap();
    let id = standin
        .push_job(
            JobSpec::new("survives-the-coordinator")
                .script(["for i in $(seq 1 40); do echo line $i; sleep 0.25; done"]),
        )
        .await
        .unwrap();
    standin
        .wait_for(id, "line 8 in the log", JOB_TIMEOUT, |r| {
            r.trace_text().contains("line 8\n")
        })
        .await
        .unwrap();

    // kill -9: no shutdown code runs; the agent keeps running the job.
    // `kill` returns once the process is gone, and its UDP port with it.
    first.kill().await;
    let second = CoordinatorProcess::start(&config_path, &log).unwrap();

    let r = standin.wait_for_final(id, JOB_TIMEOUT).await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let agent_log = std::fs::read_to_string(dir.path().join("state/local-fleet/local-1/agent.log"))
        .unwrap_or_default();
    let r = r.unwrap_or_else(|e| panic!("{e}\ncoordinator log:\n{logs}\nagent log:\n{agent_log}"));
    let text = r.trace_text();
    let logs = format!("{logs}\nagent log:\n{agent_log}");
    assert_eq!(r.state, JobState::Success, "{text}\n{logs}");
    let finals = r
        .updates
        .iter()
        .filter(|u| u.state == "success" || u.state == "failed")
        .count();
    assert_eq!(finals, 1, "reported exactly once");
    assert!(text.contains("The coordinator restarted"), "{text}");
    assert!(
        !text.contains("Attempt 2"),
        "the same attempt went on: {text}"
    );
    for i in 1..=40 {
        assert_eq!(
            text.matches(&format!("\nline {i}\n")).count(),
            1,
            "line {i} exactly once:\n{text}"
        );
    }
    assert_eq!(r.checksum_ok, Some(true), "trace byte-exact:\n{text}");
    assert!(
        logs.contains("resuming held jobs from the lease book"),
        "{logs}"
    );
    assert!(logs.contains("adopted a local agent"), "{logs}");
    if std::env::var_os("SERVITOR_TEST_SHOW_LOG").is_some() {
        eprintln!("{logs}");
    }
    second.stop().await;
}
