//! The coordinator itself is killed (`kill -9`) mid-job and started again:
//! the lease book brings the job back, the agent reconnects and reports the
//! attempt it still runs, the GitLab log goes on at the right offset, and
//! the job is reported exactly once.

// Helpers here are test code too: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use servitor_coordinator::standin::{JobSpec, JobState, StandIn, StandInConfig};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Coordinator {
    child: tokio::process::Child,
}

impl Coordinator {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = tokio::process::Command::new(servitor_tests::coordinator_binary().unwrap())
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// A clean stop: the coordinator stops its local agents too.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_job_resumes_it_and_reports_once() {
    servitor_tests::init_tracing();
    let standin = StandIn::start(StandInConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner-token"),
        servitor_coordinator::standin::DEFAULT_RUNNER_TOKEN,
    )
    .unwrap();
    std::fs::write(dir.path().join("join-token"), "restart-test-join-token").unwrap();
    let config = format!(
        r#"
state_dir = {state:?}
concurrent = 2

[gitlab]
url = {url:?}
token_file = {token:?}

[agents]
listen = "127.0.0.1:{port}"
join_token_file = {join:?}
lost_grace = "30s"

[fleet]
provider = "local"
capacity_per_instance = 1
max_instances = 1

[fleet.local]
executor = "shell"
agent_command = [{agent:?}]
"#,
        state = dir.path().join("state").display().to_string(),
        url = standin.url(),
        token = dir.path().join("runner-token").display().to_string(),
        port = free_udp_port(),
        join = dir.path().join("join-token").display().to_string(),
        agent = servitor_tests::agent_binary()
            .unwrap()
            .display()
            .to_string(),
    );
    let config_path = dir.path().join("coordinator.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("coordinator.log");

    let first = Coordinator::start(&config_path, &log);
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
    let mut first = first;
    first.child.start_kill().unwrap();
    let _ = first.child.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = Coordinator::start(&config_path, &log);

    let r = standin.wait_for_final(id, JOB_TIMEOUT).await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let r = r.unwrap_or_else(|e| panic!("{e}\ncoordinator log:\n{logs}"));
    let text = r.trace_text();
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
    second.stop().await;
}
