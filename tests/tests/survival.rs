//! Jobs survive their instance: an agent that is told to stop, killed,
//! frozen or interrupted hands its job back (or loses it), and the
//! coordinator runs it again elsewhere while GitLab sees one job — with one
//! final report.

use std::time::Duration;

use servitor_testkit::gitlab::{JobRecord, JobSpec, JobState};
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// A job that takes a while and says where it is.
fn long_job(name: &str) -> JobSpec {
    JobSpec::new(name).script([
        "echo begin on $(hostname)",
        "for i in $(seq 1 8); do echo step $i; sleep 1; done",
        "echo all steps done",
    ])
}

fn final_updates(r: &JobRecord) -> usize {
    r.updates
        .iter()
        .filter(|u| u.state == "success" || u.state == "failed")
        .count()
}

fn options() -> HarnessOptions {
    HarnessOptions {
        executor: "shell",
        max_instances: 2,
        capacity_per_instance: 1,
        lost_grace: Duration::from_secs(3),
        ..HarnessOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_hands_the_job_to_another_agent() {
    let h = Harness::start(options()).await.unwrap();
    let id = h.standin.push_job(long_job("survivor")).await.unwrap();
    h.wait_trace(id, "step 2", JOB_TIMEOUT).await.unwrap();
    let first = h.instance_of(id).expect("the job runs somewhere");
    h.signal_agent(&first, "TERM").unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert_eq!(final_updates(&r), 1, "exactly one final report");
    assert!(
        text.contains("section_start:") && text.contains(":servitor_attempt_1"),
        "{text}"
    );
    assert!(text.contains(":servitor_attempt_2"), "{text}");
    assert!(text.contains("Attempt 1 stopped at"), "{text}");
    assert!(text.contains("SIGTERM"), "the log says why: {text}");
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert!(text.contains("all steps done"), "{text}");
    assert_eq!(r.checksum_ok, Some(true), "{text}");
    // The second attempt ran elsewhere.
    let second_line = text
        .lines()
        .find(|l| l.contains("Attempt 2 of 3"))
        .unwrap()
        .to_owned();
    assert!(
        !second_line.contains(&format!("instance {first} ")),
        "{second_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_job_runs_again_after_the_grace_period() {
    let h = Harness::start(options()).await.unwrap();
    let id = h.standin.push_job(long_job("orphan")).await.unwrap();
    h.wait_trace(id, "step 2", JOB_TIMEOUT).await.unwrap();
    let first = h.instance_of(id).unwrap();
    h.signal_agent(&first, "KILL").unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert_eq!(final_updates(&r), 1);
    assert!(text.contains("out of touch"), "{text}");
    assert!(text.contains(":servitor_attempt_2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_is_replaced_and_its_stale_attempt_killed_when_it_thaws() {
    let h = Harness::start(options()).await.unwrap();
    // The first attempt runs long (it is still running when its agent
    // thaws); the second finds the marker the first left and ends quickly.
    let marker = h.dir.path().join("first-attempt-ran");
    let script = format!(
        "if [ -e {m} ]; then echo second attempt; else touch {m}; for i in $(seq 1 90); do echo step $i; sleep 1; done; fi",
        m = marker.display()
    );
    let id = h
        .standin
        .push_job(JobSpec::new("frozen").script(["echo begin".to_owned(), script]))
        .await
        .unwrap();
    h.wait_trace(id, "step 1", JOB_TIMEOUT).await.unwrap();
    let first = h.instance_of(id).unwrap();
    h.signal_agent(&first, "STOP").unwrap();
    // Past the heartbeat silence limit and the grace period: attempt 2 runs.
    h.wait_trace(id, "Attempt 2 of 3", JOB_TIMEOUT)
        .await
        .unwrap();
    h.signal_agent(&first, "CONT").unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("second attempt"), "{text}");
    assert_eq!(final_updates(&r), 1, "the thawed attempt must not report");
    // The thawed agent reconnects, reports its attempt, and is told to kill it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let killed = |logs: &str| {
        logs.contains("coordinator no longer wants this attempt; killing it")
            || logs.contains("output stream refused; stopping the attempt")
    };
    while !(killed(&h.agent_logs())
        && h.agent_logs()
            .contains("attempt=job 1 attempt 1 result=Canceled"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale attempt was not killed:\n{}",
            h.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r2 = h.standin.job(id).unwrap();
    assert_eq!(final_updates(&r2), 1);
    assert_eq!(
        r2.trace.len(),
        r.trace.len(),
        "nothing appended after the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_that_opts_out_fails_at_the_first_interruption() {
    let h = Harness::start(options()).await.unwrap();
    let id = h
        .standin
        .push_job(long_job("deploy").variable("SERVITOR_RERUN_ON_INTERRUPTION", "false"))
        .await
        .unwrap();
    h.wait_trace(id, "step 1", JOB_TIMEOUT).await.unwrap();
    let first = h.instance_of(id).unwrap();
    h.signal_agent(&first, "TERM").unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(
        r.final_update.as_ref().unwrap().failure_reason.as_deref(),
        Some("runner_interrupted"),
        "{text}"
    );
    assert!(
        text.contains("SERVITOR_RERUN_ON_INTERRUPTION=false"),
        "{text}"
    );
    assert!(!text.contains(":servitor_attempt_2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_fails_with_runner_interrupted_when_attempts_run_out() {
    let h = Harness::start(HarnessOptions {
        max_attempts: 2,
        ..options()
    })
    .await
    .unwrap();
    let id = h.standin.push_job(long_job("unlucky")).await.unwrap();
    h.wait_trace(id, "step 1", JOB_TIMEOUT).await.unwrap();
    h.signal_agent(&h.instance_of(id).unwrap(), "TERM").unwrap();
    // Wait for the second attempt's output, then interrupt it too.
    let wanted = "Attempt 2 of 2";
    h.wait_trace(id, wanted, JOB_TIMEOUT).await.unwrap();
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    let second = loop {
        let text = h.standin.job(id).unwrap().trace_text();
        let after = text.split(wanted).nth(1).unwrap_or_default().to_owned();
        if after.contains("step 1") {
            break h.instance_of(id).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "attempt 2 never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    h.signal_agent(&second, "TERM").unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(
        r.final_update.as_ref().unwrap().failure_reason.as_deref(),
        Some("runner_interrupted"),
        "{text}"
    );
    assert!(text.contains("No attempts left"), "{text}");
    assert_eq!(final_updates(&r), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_mid_job_reruns_it_on_another_agent_as_one_gitlab_job() {
    let h = Harness::start(HarnessOptions {
        imds_instances: 2,
        ..options()
    })
    .await
    .unwrap();
    let id = h.standin.push_job(long_job("spot")).await.unwrap();
    h.wait_trace(id, "step 2", JOB_TIMEOUT).await.unwrap();
    h.imds_of_job(id)
        .unwrap()
        .set_spot_action("terminate", Duration::from_secs(120));
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert_eq!(final_updates(&r), 1, "GitLab sees one final report");
    assert!(
        text.contains("Spot interruption notice: terminate at"),
        "{text}"
    );
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert!(text.contains("all steps done"), "{text}");
    assert_eq!(r.checksum_ok, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_stops_new_work_but_the_running_job_finishes_there() {
    let h = Harness::start(HarnessOptions {
        imds_instances: 2,
        ..options()
    })
    .await
    .unwrap();
    let id = h.standin.push_job(long_job("steady")).await.unwrap();
    h.wait_trace(id, "step 1", JOB_TIMEOUT).await.unwrap();
    let first = h.instance_of(id).unwrap();
    h.imds_of_job(id).unwrap().set_rebalance();
    // The coordinator learns the agent drains.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !h
        .coordinator()
        .core
        .agents()
        .iter()
        .any(|a| a.instance_id == first && a.draining)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never reported draining"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = h
        .standin
        .push_job(JobSpec::new("next").script(["echo next job"]))
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        !text.contains("Attempt 2"),
        "the job finished where it ran: {text}"
    );
    let r = h.wait_final(next, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    assert!(
        !r.trace_text().contains(&format!("instance {first} ")),
        "no new work for the draining agent: {}",
        r.trace_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_link_reconnects_and_the_job_finishes_once_with_its_whole_log() {
    let h = Harness::start(HarnessOptions {
        relay: true,
        max_instances: 1,
        lost_grace: Duration::from_secs(60),
        ..options()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("through-the-cut")
                .script(["for i in $(seq 1 100); do echo line $i; sleep 0.3; done"]),
        )
        .await
        .unwrap();
    h.wait_trace(id, "line 3\n", JOB_TIMEOUT).await.unwrap();
    let relay = h.relay.as_ref().unwrap();
    relay.cut();
    // Heal only once the agent has noticed the link is gone (heartbeat
    // silence, then QUIC's idle timeout), so it has to redial.
    servitor_tests::wait_until(
        "the agent noticing the cut",
        Duration::from_secs(60),
        || h.agent_logs().contains("lost the coordinator"),
    )
    .await
    .unwrap();
    relay.heal();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert_eq!(final_updates(&r), 1);
    assert!(
        !text.contains("Attempt 2"),
        "the attempt survived the cut: {text}"
    );
    for i in 1..=100 {
        assert_eq!(
            text.matches(&format!("\nline {i}\n")).count(),
            1,
            "line {i} exactly once, none lost to the cut:\n{text}"
        );
    }
    assert_eq!(r.checksum_ok, Some(true));
    assert!(
        h.agent_logs().contains("connected to the coordinator")
            && h.agent_logs()
                .matches("connected to the coordinator")
                .count()
                >= 2,
        "the agent redialled:\n{}",
        h.agent_logs()
    );
}

/// Found by the soak: an attempt that ended while its agent was dialling
/// the coordinator again had its result sent on the new link without the
/// output it wrote after the old link died, and GitLab's log lost its last
/// lines while the job succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_while_the_link_is_down_reaches_the_log_when_the_job_ends_in_the_cut() {
    let h = Harness::start(HarnessOptions {
        relay: true,
        max_instances: 1,
        lost_grace: Duration::from_secs(120),
        ..options()
    })
    .await
    .unwrap();
    let signal = h.dir.path().join("cut-made");
    let ended = h.dir.path().join("job-ended");
    let id = h
        .standin
        .push_job(JobSpec::new("ends-in-the-cut").script([
            "echo before the cut".to_owned(),
            format!("while [ ! -e {} ]; do sleep 0.1; done", signal.display()),
            "for i in $(seq 1 20); do echo during the cut $i; done".to_owned(),
            "printf 'the last words'".to_owned(),
            format!("touch {}", ended.display()),
        ]))
        .await
        .unwrap();
    h.wait_trace(id, "before the cut\n", JOB_TIMEOUT)
        .await
        .unwrap();
    let relay = h.relay.as_ref().unwrap();
    relay.cut();
    servitor_tests::wait_until(
        "the agent noticing the cut",
        Duration::from_secs(60),
        || h.agent_logs().contains("lost the coordinator"),
    )
    .await
    .unwrap();
    // The agent dials again (its handshake waits on the cut)…
    let before = relay.handshakes_dropped();
    servitor_tests::wait_until("the agent dialling", Duration::from_secs(60), || {
        relay.handshakes_dropped() > before
    })
    .await
    .unwrap();
    // …the job goes on and ends during that dial…
    std::fs::write(&signal, "").unwrap();
    servitor_tests::wait_until(
        "the job's script ending during the cut",
        Duration::from_secs(60),
        || ended.exists(),
    )
    .await
    .unwrap();
    // …and the dial goes through.
    relay.heal();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert_eq!(final_updates(&r), 1);
    for i in 1..=20 {
        assert!(
            text.contains(&format!("during the cut {i}\n")),
            "line {i} lost:\n{text}"
        );
    }
    assert!(text.contains("the last words"), "{text}");
    assert_eq!(r.checksum_ok, Some(true));
}
