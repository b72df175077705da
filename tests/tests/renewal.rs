//! Agents' certificates renew over the live link and revocation cuts an
//! agent off: short-lived certificates keep a long job on one link, a
//! reconnect after the first certificate ran out needs no new enrollment,
//! and a revoked agent loses its link at once while its job runs elsewhere.

use std::time::{Duration, Instant};

use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::config::Tweak;
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

/// Certificates this short renew every forty seconds or so, and still
/// outlive the twenty seconds a cut link takes to notice.
const SHORT_CERTIFICATES: Duration = Duration::from_secs(60);

/// Waits until the agents' logs hold `text` at least `times` times.
async fn wait_for_log(h: &Harness, text: &str, times: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let logs = h.agent_logs();
        if logs.matches(text).count() >= times {
            return logs;
        }
        assert!(
            start.elapsed() < timeout,
            "{text:?} not {times} times in the agents' logs within {timeout:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_over_the_live_link_and_a_reconnect_needs_no_enrollment() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 1,
        capacity_per_instance: 1,
        relay: true,
        configure: Tweak::new(|c| c.agents.cert_validity = SHORT_CERTIFICATES),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    // The job runs until the test is done with the link.
    let marker = h.dir.path().join("link-checked");
    let id = h
        .standin
        .push_job(JobSpec::new("outlives-its-certificate").script([
            "echo begin".to_owned(),
            format!("while [ ! -e {} ]; do sleep 0.2; done", marker.display()),
            "echo end".to_owned(),
        ]))
        .await
        .unwrap();
    h.wait_trace(id, "begin", JOB_TIMEOUT).await.unwrap();

    // Two renewals: the link outlives two certificates without reconnecting
    // (the coordinator closes a link whose certificate ran out).
    let logs = wait_for_log(
        &h,
        "renewed the agent's certificate over the link",
        2,
        SHORT_CERTIFICATES * 3,
    )
    .await;
    assert_eq!(
        logs.matches("connected to the coordinator").count(),
        1,
        "{logs}"
    );
    assert!(!logs.contains("certificate ran out"), "{logs}");

    // A broken path: the agent reconnects with the renewed certificate,
    // long after the one it enrolled with ran out.
    let relay = h.relay.as_ref().unwrap();
    relay.cut();
    wait_for_log(&h, "lost the coordinator", 1, Duration::from_secs(60)).await;
    relay.heal();
    let logs = wait_for_log(&h, "connected to the coordinator", 2, Duration::from_secs(60)).await;
    assert_eq!(
        logs.matches("enrolled with the coordinator").count(),
        1,
        "the agent enrolled once, then renewed: {logs}"
    );

    std::fs::write(&marker, "").unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("end"), "{text}");
    assert!(
        !text.contains("Attempt 2"),
        "one attempt, on one agent: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_at_once_and_its_job_runs_elsewhere() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 2,
        capacity_per_instance: 1,
        // Long: the job must move because of the revocation, not because
        // the agent was out of touch.
        lost_grace: Duration::from_secs(300),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("revoked-midway").script([
            "echo begin on $(hostname)",
            "for i in $(seq 1 6); do echo step $i; sleep 1; done",
            "echo all steps done",
        ]))
        .await
        .unwrap();
    h.wait_trace(id, "step 1", JOB_TIMEOUT).await.unwrap();
    let agent = h
        .coordinator()
        .core
        .agents()
        .into_iter()
        .find(|a| a.busy > 0)
        .expect("an agent runs the job")
        .agent_id;

    let revoke = |reason: &str| {
        let out = std::process::Command::new(servitor_tests::coordinator_binary().unwrap())
            .arg("--config")
            .arg(&h.config_path)
            .args(["revoke", &agent, "--reason", reason])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = revoke("its key was copied off the host");
    assert!(said.contains(&format!("agent {agent} revoked at")), "{said}");
    assert!(said.contains("its link is closed"), "{said}");

    // The agent hears why and stops; the job runs again on a new agent.
    let logs = wait_for_log(
        &h,
        "the coordinator revoked this agent's certificate",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(logs.contains("its key was copied off the host"), "{logs}");
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert!(text.contains("all steps done"), "{text}");
    assert!(
        h.coordinator()
            .core
            .agents()
            .iter()
            .all(|a| a.agent_id != agent),
        "the revoked agent is gone"
    );

    let again = revoke("twice");
    assert!(again.contains("was already revoked at"), "{again}");
    assert!(again.contains("its key was copied off the host"), "{again}");
}
