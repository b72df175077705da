//! The coordinator itself is killed (`kill -9`) mid-job and started again:
//! the lease book brings the job back, the agent reconnects and reports the
//! attempt it still runs, the GitLab log goes on at the right offset, and
//! the job is reported exactly once. And when the agent cannot reconnect,
//! the job runs again on a new instance as soon as the grace is over.

// Helpers here are test code too: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use servitor_testkit::gitlab::{JobSpec, JobState, StandIn, StandInConfig};
use servitor_tests::{CoordinatorProcess, ProcessOptions};

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

/// How long an agent gets to come back in the test below; short, so the
/// test is, but long enough for a loaded machine's agent to reconnect.
const LOST_GRACE: Duration = Duration::from_secs(5);

/// What the job's re-run may take beyond the grace: the coordinator
/// starting, a new agent process starting and joining, the shell executor
/// starting the script, and the log reaching GitLab. Minutes less than the
/// boot timeout (10 minutes by default), which is what a silent adopted
/// instance used to hold the job for.
const RERUN_SLACK: Duration = Duration::from_secs(25);

/// How long a removed local agent that never heard it should drain has
/// before it is killed (the local fleet's grace), with room to spare.
const REMOVAL_BOUND: Duration = Duration::from_secs(45);

/// The restarted coordinator listens on a new port (`listen` on port 0),
/// so the agent it adopts keeps dialling the old one and never comes back.
/// The adopted instance counts as capacity only for `lost_grace`: then the
/// job runs again on a new instance, ends green once, and the silent
/// instance is removed as broken, with a warning naming the likely cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_agent_that_never_reconnects_is_replaced_within_the_grace() {
    servitor_tests::init_tracing();
    let standin = StandIn::start(StandInConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config_path, log) = servitor_tests::process_config_with(
        dir.path(),
        &standin.url(),
        &ProcessOptions {
            fixed_port: false,
            lost_grace: LOST_GRACE,
        },
    )
    .unwrap();
    let first = CoordinatorProcess::start(&config_path, &log).unwrap();
    let id = standin
        .push_job(JobSpec::new("outlives-its-agent").script([
            "echo started",
            "sleep 4",
            "echo finished",
        ]))
        .await
        .unwrap();
    standin
        .wait_for(id, "the job running", JOB_TIMEOUT, |r| {
            r.trace_text().contains("\nstarted\n")
        })
        .await
        .unwrap();
    let instance_dir = dir.path().join("state/local-fleet/local-1");
    let old_agent: u32 = std::fs::read_to_string(instance_dir.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    first.kill().await;
    assert!(
        servitor_tests::process_running(old_agent),
        "the agent outlives the coordinator"
    );
    let restarted = tokio::time::Instant::now();
    let second = CoordinatorProcess::start(&config_path, &log).unwrap();
    let logs = || {
        let coordinator = std::fs::read_to_string(&log).unwrap_or_default();
        let mut agents = String::new();
        for n in 1..=3 {
            let path = dir
                .path()
                .join(format!("state/local-fleet/local-{n}/agent.log"));
            if let Ok(text) = std::fs::read_to_string(path) {
                agents.push_str(&format!("--- local-{n}\n{text}\n"));
            }
        }
        format!("coordinator log:\n{coordinator}\nagent logs:\n{agents}")
    };

    let rerun = standin
        .wait_for(id, "the job running again", JOB_TIMEOUT, |r| {
            r.trace_text().contains("Attempt 2 of 3")
        })
        .await;
    let waited = restarted.elapsed();
    let rerun = rerun.unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    // The figure, for whoever runs it with --nocapture.
    eprintln!(
        "job re-run on a new instance {waited:?} after the restart (lost_grace {LOST_GRACE:?})"
    );
    let text = rerun.trace_text();
    assert!(
        text.contains("local-2"),
        "attempt 2 runs on a new instance: {text}"
    );
    assert!(
        waited < LOST_GRACE + RERUN_SLACK,
        "re-run {waited:?} after the restart; the grace is {LOST_GRACE:?}\n{}",
        logs()
    );

    let r = standin
        .wait_for_final(id, JOB_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}\n{}", logs());
    let finals = r
        .updates
        .iter()
        .filter(|u| u.state == "success" || u.state == "failed")
        .count();
    assert_eq!(finals, 1, "reported exactly once");
    assert_eq!(text.matches("\nfinished\n").count(), 1, "{text}");

    // The silent instance is removed as broken, named with the cause.
    let deadline = tokio::time::Instant::now() + REMOVAL_BOUND;
    while servitor_tests::process_running(old_agent) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the adopted agent that never came back still runs\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let coordinator_log = std::fs::read_to_string(&log).unwrap_or_default();
    let warning = coordinator_log
        .lines()
        .find(|l| l.contains("removing a broken instance") && l.contains("local-1"))
        .unwrap_or_else(|| panic!("no warning about local-1\n{}", logs()));
    assert!(
        warning.contains("WARN")
            && warning.contains("agents.lost_grace")
            && warning.contains("no longer listens on"),
        "{warning}"
    );
    second.stop().await;
}

/// Found by the soak: a coordinator restarted while GitLab was down exited
/// ("gitlab answered 502"), leaving its agents and their jobs without it
/// for the whole outage. It now starts, serves the jobs it holds, and
/// reports them once GitLab answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_while_gitlab_is_down_serves_its_jobs_and_reports_them_later() {
    servitor_tests::init_tracing();
    let standin = StandIn::start(StandInConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config_path, log) = servitor_tests::process_config(dir.path(), &standin.url()).unwrap();
    let first = CoordinatorProcess::start(&config_path, &log).unwrap();
    let id = standin
        .push_job(
            JobSpec::new("outlives-the-outage")
                .script(["for i in $(seq 1 40); do echo line $i; sleep 0.25; done"]),
        )
        .await
        .unwrap();
    standin
        .wait_for(id, "line 4 in the log", JOB_TIMEOUT, |r| {
            r.trace_text().contains("line 4\n")
        })
        .await
        .unwrap();
    standin.set_down(true);
    first.kill().await;
    let mut second = CoordinatorProcess::start(&config_path, &log).unwrap();
    // It starts and stays up while GitLab is down: its agent reconnects.
    servitor_tests::wait_until("the agent back with the coordinator", JOB_TIMEOUT, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("agent connected capacity")
            .count()
            >= 2
    })
    .await
    .unwrap();
    assert!(
        second.child.try_wait().unwrap().is_none(),
        "the coordinator exited while GitLab was down:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    standin.set_down(false);
    let r = standin.wait_for_final(id, JOB_TIMEOUT).await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let r = r.unwrap_or_else(|e| panic!("{e}\ncoordinator log:\n{logs}"));
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}\n{logs}");
    assert!(logs.contains("GitLab does not answer at start"), "{logs}");
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
    assert_eq!(r.checksum_ok, Some(true));
    second.stop().await;
}

/// Found by the soak: a job whose attempt had ended but whose end GitLab
/// had not yet taken (GitLab down) was dropped from the lease book when the
/// coordinator stopped cleanly, and never reported. It now stays there and
/// the next start reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ended_but_not_yet_reported_survives_a_clean_stop() {
    servitor_tests::init_tracing();
    let standin = StandIn::start(StandInConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config_path, log) = servitor_tests::process_config(dir.path(), &standin.url()).unwrap();
    let first = CoordinatorProcess::start(&config_path, &log).unwrap();
    let signal = dir.path().join("go-on");
    let id = standin
        .push_job(JobSpec::new("ends-while-gitlab-is-down").script([
            "echo first line".to_owned(),
            format!("while [ ! -e {} ]; do sleep 0.1; done", signal.display()),
            "printf 'the end'".to_owned(),
        ]))
        .await
        .unwrap();
    standin
        .wait_for(id, "the first line", JOB_TIMEOUT, |r| {
            r.trace_text().contains("first line\n")
        })
        .await
        .unwrap();
    standin.set_down(true);
    std::fs::write(&signal, "").unwrap();
    let agent_log = dir.path().join("state/local-fleet/local-1/agent.log");
    servitor_tests::wait_until("the attempt ending", JOB_TIMEOUT, || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .contains("attempt ended")
    })
    .await
    .unwrap();
    // The result is in; GitLab cannot take it. A clean stop, a new start.
    first.stop().await;
    let second = CoordinatorProcess::start(&config_path, &log).unwrap();
    standin.set_down(false);
    let r = standin.wait_for_final(id, JOB_TIMEOUT).await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let r = r.unwrap_or_else(|e| panic!("{e}\ncoordinator log:\n{logs}"));
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}\n{logs}");
    assert!(text.contains("the end"), "{text}");
    let finals = r
        .updates
        .iter()
        .filter(|u| u.status == 200 && (u.state == "success" || u.state == "failed"))
        .count();
    assert_eq!(finals, 1, "reported exactly once");
    assert_eq!(r.checksum_ok, Some(true));
    second.stop().await;
}
