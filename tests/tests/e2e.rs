//! End-to-end: GitLab stand-in (real HTTP) → coordinator → real agent
//! processes over QUIC mTLS → jobs in the real Docker engine → results back
//! in the stand-in exactly as GitLab would record them.

use std::process::Stdio;
use std::time::Duration;

use servitor_coordinator::config::PolicyConfig;
use servitor_testkit::gitlab::{Fault, JobSpec, JobState};
use servitor_tests::config::Tweak;
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

fn final_reason(r: &servitor_testkit::gitlab::JobRecord) -> Option<String> {
    r.final_update
        .as_ref()
        .and_then(|f| f.failure_reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_job_streams_its_log_with_a_matching_checksum() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("build").script(["echo first line", "sleep 2", "echo second line"]))
        .await
        .unwrap();
    // The first line is visible while the job still runs.
    let live = h.wait_trace(id, "first line", JOB_TIMEOUT).await.unwrap();
    assert!(
        !live.state.is_final(),
        "first line should arrive before the job ends"
    );
    assert!(!live.trace_text().contains("second line"));
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "log:\n{}", r.trace_text());
    let text = r.trace_text();
    assert!(text.contains("$ echo first line"), "{text}");
    assert!(text.contains("second line"));
    assert!(text.contains("Job succeeded"));
    assert_eq!(
        r.checksum_ok,
        Some(true),
        "checksum of the trace must match"
    );
    assert_eq!(r.bytesize_ok, Some(true));
    assert_eq!(
        r.final_update.as_ref().unwrap().exit_code,
        None,
        "exit_code is omitted on success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_script_reports_exit_code_and_after_script_still_runs() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("test")
                .script(["echo before", "exit 42", "echo not reached"])
                .after_script(["echo after_script saw $CI_JOB_STATUS"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(final_reason(&r).as_deref(), Some("script_failure"));
    assert_eq!(r.final_update.as_ref().unwrap().exit_code, Some(42));
    assert!(
        !text.contains("not reached\n") || !text.contains("\nnot reached"),
        "{text}"
    );
    assert!(text.contains("after_script saw failed"), "{text}");
    assert!(text.contains("ERROR: Job failed: exit code 42"), "{text}");
    assert_eq!(r.checksum_ok, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_variable_never_reaches_the_log_even_split_across_writes() {
    let secret = "hunter2-very-secret-value";
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("mask")
                .masked_variable("API_KEY", secret)
                .script([
                    "echo whole: $API_KEY",
                    // The secret leaves the container in two writes, apart in time.
                    "printf 'split: %s' \"$(echo $API_KEY | cut -c1-12)\"; sleep 1; printf '%s done\\n' \"$(echo $API_KEY | cut -c13-)\"",
                    "echo token glpat-abcdefghijklmnop1234 end",
                ]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(!text.contains(secret), "secret leaked:\n{text}");
    assert!(
        !text.contains("hunter2"),
        "part of the secret leaked:\n{text}"
    );
    assert!(text.contains("whole: [MASKED]"), "{text}");
    assert!(text.contains("split: [MASKED] done"), "{text}");
    assert!(!text.contains("abcdefghijklmnop1234"), "{text}");
    assert!(text.contains("glpat-[MASKED]"), "{text}");
    let token = r.token.expose().to_owned();
    assert!(!text.contains(&token), "the job token leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_cancel_stops_the_script_runs_after_script_and_reports() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("long")
                .script(["for i in $(seq 1 120); do echo tick $i; sleep 1; done"])
                .after_script(["echo cleanup after $CI_JOB_STATUS"]),
        )
        .await
        .unwrap();
    h.wait_trace(id, "tick 2", JOB_TIMEOUT).await.unwrap();
    assert_eq!(h.standin.cancel(id, true).unwrap(), JobState::Canceling);
    let r = h.wait_final(id, Duration::from_secs(60)).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Canceled, "{text}");
    assert!(text.contains("cleanup after canceled"), "{text}");
    assert!(!text.contains("tick 100"), "{text}");
    assert!(
        r.final_update.is_some(),
        "a graceful cancel ends with a final update"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_cancel_kills_at_once_without_after_script_or_final_update() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("long")
                .script(["for i in $(seq 1 120); do echo tick $i; sleep 1; done"])
                .after_script(["echo after_script must not run"]),
        )
        .await
        .unwrap();
    h.wait_trace(id, "tick 2", JOB_TIMEOUT).await.unwrap();
    assert_eq!(h.standin.cancel(id, false).unwrap(), JobState::Canceled);
    // The job is released and its container killed: the agent becomes idle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let busy: u32 = h.coordinator().core.agents().iter().map(|a| a.busy).sum();
        if busy == 0 && h.coordinator().core.jobs().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the aborted job was not released"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = h.standin.job(id).unwrap();
    assert!(
        r.final_update.is_none(),
        "no final update after a hard cancel"
    );
    assert!(!r.trace_text().contains("after_script must not run"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_fails_with_job_execution_timeout() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("slow")
                .timeout(Duration::from_secs(3))
                .script(["echo start", "sleep 60"])
                .after_script(["echo after timeout: $CI_JOB_STATUS"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(
        final_reason(&r).as_deref(),
        Some("job_execution_timeout"),
        "{text}"
    );
    assert!(text.contains("execution took longer than"), "{text}");
    assert!(text.contains("after timeout: failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_failure_is_reported_with_a_reason_gitlab_accepts() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("pull")
                .image("servitor-no-such-image:1")
                .pull_policy("never")
                .script(["echo never runs"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    // image_pull_failure is not in this GitLab's failure_reasons: gitlab-runner's
    // mapping sends runner_system_failure instead.
    assert_eq!(
        final_reason(&r).as_deref(),
        Some("runner_system_failure"),
        "{text}"
    );
    assert!(text.contains("servitor-no-such-image:1"), "{text}");
    assert!(!text.contains("$ echo never runs"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_416_recovery_leaves_gitlab_with_the_exact_log() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("chatty")
                .script(["for i in $(seq 1 10); do echo line $i; sleep 0.3; done"]),
        )
        .await
        .unwrap();
    h.wait_trace(id, "line 3", JOB_TIMEOUT).await.unwrap();
    // GitLab lost the tail of what it stored: the next patch gets 416.
    let stored = h.standin.job(id).unwrap().trace.len();
    h.standin.truncate_trace(id, stored / 2).unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        r.patches.iter().any(|p| p.status == 416),
        "a 416 must have happened"
    );
    assert_eq!(
        r.checksum_ok,
        Some(true),
        "trace must be byte-identical:\n{text}"
    );
    assert_eq!(r.bytesize_ok, Some(true));
    for i in 1..=10 {
        assert_eq!(
            text.matches(&format!("line {i}\n")).count(),
            1,
            "line {i} once:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_requests_back_off_on_429_and_5xx() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    h.standin.fail_next_requests(vec![
        Fault::rate_limited(2),
        Fault::status(500),
        Fault::status(502),
    ]);
    let id = h
        .standin
        .push_job(JobSpec::new("after-faults").script(["echo made it"]))
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    let log = h.standin.request_log();
    let limited = log
        .iter()
        .position(|r| r.status == 429)
        .expect("a 429 answer");
    let next = &log[limited + 1];
    assert!(
        next.at.duration_since(log[limited].at) >= Duration::from_secs(2),
        "Retry-After: 2 must be honoured"
    );
    let after_500 = log
        .iter()
        .position(|r| r.status == 500)
        .expect("a 500 answer");
    assert!(log[after_500 + 1].at > log[after_500].at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_cloned_over_http_with_the_job_token() {
    let repo =
        servitor_tests::git_repository(&[("VERSION", "servitor-source-check 1.2.3\n")]).unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("src")
                .git(repo.path())
                .script(["cat VERSION", "pwd"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("servitor-source-check 1.2.3"), "{text}");
    assert!(
        !text.contains(r.token.expose()),
        "job token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_executor_runs_jobs_without_docker() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let ok = h
        .standin
        .push_job(JobSpec::new("ok").script(["echo on the host"]))
        .await
        .unwrap();
    let bad = h
        .standin
        .push_job(JobSpec::new("bad").script(["exit 7"]))
        .await
        .unwrap();
    let r = h.wait_final(ok, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    assert!(
        r.trace_text().contains("shell executor"),
        "{}",
        r.trace_text()
    );
    let r = h.wait_final(bad, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.final_update.as_ref().unwrap().exit_code, Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_scales_out_to_demand_and_in_after_idle_time() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 2,
        capacity_per_instance: 1,
        idle_time: Duration::from_secs(2),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            h.standin
                .push_job(JobSpec::new(format!("j{n}")).script(["sleep 2", "echo done"]))
                .await
                .unwrap(),
        );
    }
    // Three jobs, capacity 1 each, at most 2 instances.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut peak = 0;
    while tokio::time::Instant::now() < deadline {
        peak = peak.max(h.coordinator().fleet_view.get().len());
        if h.coordinator().core.agents().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &ids {
        let r = h.wait_final(*id, JOB_TIMEOUT).await.unwrap();
        assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
        peak = peak.max(h.coordinator().fleet_view.get().len());
    }
    assert_eq!(peak, 2, "scaled out to max_instances and no further");
    // Idle past idle_time: drained and stopped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !h.coordinator().fleet_view.get().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle instances were not removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_lists_agents_and_jobs() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("visible-job").script(["echo started", "sleep 30"]))
        .await
        .unwrap();
    h.wait_trace(id, "started", JOB_TIMEOUT).await.unwrap();
    let out = tokio::process::Command::new(servitor_tests::coordinator_binary().unwrap())
        .arg("--config")
        .arg(&h.config_path)
        .arg("status")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("visible-job"), "{text}");
    assert!(text.contains("running"), "{text}");
    assert!(text.contains("AGENTS (1)"), "{text}");
    assert!(text.contains("local-1"), "{text}");
    h.standin.cancel(id, false).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_wrong_join_token_is_refused_and_exits_64() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 1,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("join"), "not-the-right-token").unwrap();
    let config = format!(
        "coordinator = {:?}\nca_file = {:?}\njoin_token_file = {:?}\nname = \"intruder\"\n[executor]\nkind = \"shell\"\nwork_dir = {:?}\n",
        h.coordinator().link_addr.to_string(),
        h.coordinator().ca_pem_path.display().to_string(),
        dir.path().join("join").display().to_string(),
        dir.path().join("builds").display().to_string(),
    );
    std::fs::write(dir.path().join("agent.toml"), config).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(servitor_tests::agent_binary().unwrap())
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .stdout(Stdio::null())
            .output(),
    )
    .await
    .expect("a refused agent exits instead of retrying forever")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("join token rejected"), "{stderr}");
    assert!(!h
        .coordinator()
        .core
        .agents()
        .iter()
        .any(|a| a.agent_id.starts_with("intruder")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_command_runs_its_pipeline_green() {
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_servitor-demo")).output(),
    )
    .await
    .expect("the demo finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Every job ended as expected."), "{stdout}");
    assert!(stdout.contains("Executor: "), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_period_in_force_keeps_an_idle_instance_warm() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        capacity_per_instance: 1,
        configure: Tweak::new(|c| {
            c.fleet_mut().policy.push(PolicyConfig {
                periods: vec!["* * * * *".to_owned()],
                idle_count: 1,
                idle_time: Duration::from_secs(600),
                ..PolicyConfig::default()
            });
        }),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    // No job at all: the period in force asks for one idle slot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.coordinator().core.agents().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warm instance was started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No second one follows.
    servitor_tests::two_fleet_passes(&h.coordinator().fleet_view)
        .await
        .unwrap();
    assert_eq!(
        h.coordinator().fleet_view.get().len(),
        1,
        "exactly one warm instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_reached_max_use_count_is_replaced() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        capacity_per_instance: 1,
        max_instances: 2,
        configure: Tweak::new(|c| c.fleet_mut().max_use_count = 1),
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let first = h
        .standin
        .push_job(JobSpec::new("one").script(["echo one"]))
        .await
        .unwrap();
    let r = h.wait_final(first, JOB_TIMEOUT).await.unwrap();
    assert!(
        r.trace_text().contains("instance local-1"),
        "{}",
        r.trace_text()
    );
    let second = h
        .standin
        .push_job(JobSpec::new("two").script(["echo two"]))
        .await
        .unwrap();
    let r = h.wait_final(second, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    assert!(
        !r.trace_text().contains("instance local-1 "),
        "a used-up instance takes no new job: {}",
        r.trace_text()
    );
}
