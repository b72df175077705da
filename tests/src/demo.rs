//! The self-contained demo behind the README's first command: a GitLab
//! stand-in on loopback, the coordinator with its local fleet of real agent
//! processes, and a small pipeline — a passing job, a failing one, one with
//! `after_script` and a masked secret, and one canceled mid-run — shown live,
//! then summarised.
//!
//! It is a harness, like the tests, so it reports with `anyhow`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use servitor_agent::executor::docker::{DockerConfig, DockerExecutor};
use servitor_coordinator::config::{Config, ExecutorChoice};
use servitor_testkit::gitlab::{JobRecord, JobSpec, StandIn, StandInConfig};
use servitor_testkit::image::ensure_local_image;
use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};
use tokio_util::sync::CancellationToken;

/// Image the demo builds from the host's static busybox.
const DEMO_IMAGE: &str = "servitor-demo:latest";
/// The service the package job talks to (with the Docker executor).
const DEMO_SERVICE_IMAGE: &str = "servitor-demo-service:latest";
/// The whole pipeline must be done by then.
const DEMO_TIMEOUT: Duration = Duration::from_secs(180);
/// Most local instances in the demo; each gets its own instance metadata
/// stand-in, so a Spot notice can reach exactly one of them.
const DEMO_INSTANCES: u32 = 3;
/// Idle time of demo instances, short so scale-in shows.
const DEMO_IDLE_TIME: Duration = Duration::from_secs(3);
const SECRET: &str = "s3cr3t-deploy-key-7d1f";

/// Which executor the demo's agents use, and why.
async fn choose_executor() -> (ExecutorChoice, String) {
    match DockerExecutor::connect(DockerConfig::default()).await {
        Ok(docker) => match ensure_local_image(docker.client(), DEMO_IMAGE).await {
            Ok(built)
                if servitor_testkit::image::ensure_service_image(
                    docker.client(),
                    DEMO_SERVICE_IMAGE,
                )
                .await
                .is_ok() =>
            {
                (
                    ExecutorChoice::Docker,
                    format!(
                        "docker (image {DEMO_IMAGE}{})",
                        if built {
                            ", just built from the host's static busybox"
                        } else {
                            ""
                        }
                    ),
                )
            }
            Ok(_) => (
                ExecutorChoice::Shell,
                "shell (Docker answers, but the service image could not be built)".to_owned(),
            ),
            Err(e) => (
                ExecutorChoice::Shell,
                format!("shell (Docker answers, but no job image: {e})"),
            ),
        },
        Err(e) => (
            ExecutorChoice::Shell,
            format!("shell (Docker is not available: {e})"),
        ),
    }
}

fn demo_config(dir: &Path, gitlab_url: &str, executor: ExecutorChoice) -> Config {
    let mut config = crate::config::local(dir, gitlab_url, SocketAddr::from(([127, 0, 0, 1], 0)));
    config.fleet_mut().capacity_per_instance = 2;
    config.fleet_mut().max_instances = DEMO_INSTANCES;
    config.fleet_mut().idle_time = DEMO_IDLE_TIME;
    config.fleet_mut().local.executor = executor;
    config.fleet_mut().local.default_image = Some(DEMO_IMAGE.to_owned());
    config
}

/// The demo's dependency cache, as `cache: {key: deps-$CI_COMMIT_REF_NAME,
/// paths: [vendor/], policy: …}`.
fn demo_cache(policy: &str) -> servitor_proto::job::Cache {
    servitor_proto::job::Cache {
        key: "deps-$CI_COMMIT_REF_NAME".to_owned(),
        paths: vec!["vendor/".to_owned()],
        policy: policy.to_owned(),
        ..servitor_proto::job::Cache::default()
    }
}

fn pipeline(services: bool) -> Vec<(JobSpec, &'static str)> {
    let mut package = JobSpec::new("package")
        .needs("build")
        .cache(demo_cache("pull"))
        .script([
            "cat vendor/dep.txt",
            "cat dist/servitor.txt",
            "echo packaged",
        ]);
    if services {
        package = package
            .service(servitor_proto::job::Service {
                name: DEMO_SERVICE_IMAGE.to_owned(),
                alias: "registry".to_owned(),
                ..servitor_proto::job::Service::default()
            })
            .script([
                "cat vendor/dep.txt",
                "cat dist/servitor.txt",
                "wget -q -O - http://registry:8080/",
                "echo packaged",
            ]);
    }
    vec![
        (
            JobSpec::new("build")
                .script([
                    "mkdir -p vendor",
                    "test -f vendor/dep.txt || echo 'fetched dependency' > vendor/dep.txt",
                    "echo Compiling servitor...",
                    "mkdir -p dist",
                    "echo \"servitor build $CI_JOB_ID\" > dist/servitor.txt",
                    "sleep 1",
                    "echo Build finished",
                ])
                .artifact_paths(["dist/"])
                .cache(demo_cache("pull-push")),
            "passes; uploads dist/ as its artifacts, saves vendor/ as a cache",
        ),
        (
            package,
            "needs build: starts after it, with its artifacts, the cache (and a service with Docker)",
        ),
        (
            JobSpec::new("test").script([
                "echo running 3 tests",
                "echo 'test 2 of 3 failed'",
                "exit 3",
                "echo never printed",
            ]),
            "fails with exit code 3",
        ),
        (
            JobSpec::new("deploy")
                .masked_variable("DEPLOY_KEY", SECRET)
                .script(["echo deploying with key $DEPLOY_KEY", "sleep 1"])
                .after_script(["echo after_script sees CI_JOB_STATUS=$CI_JOB_STATUS"]),
            "passes; after_script runs; the key is masked",
        ),
        (
            JobSpec::new("long-running")
                .script(["for i in $(seq 1 60); do echo tick $i; sleep 1; done"])
                .after_script(["echo after_script ran after the cancel"]),
            "canceled mid-run; after_script still runs",
        ),
        (
            JobSpec::new("spot-victim").script([
                "echo building on $(hostname)",
                "for i in $(seq 1 6); do echo step $i of 6; sleep 1; done",
                "echo built",
            ]),
            "its instance gets a Spot notice mid-run; re-run elsewhere, ends green",
        ),
    ]
}

/// Runs the demo; its local instances start `agent_command` (with
/// `--config <file>` appended). Returns whether every job ended as the
/// pipeline expects.
///
/// # Errors
/// Anything that keeps the demo from running at all.
pub async fn run(agent_command: Vec<String>, shutdown: CancellationToken) -> anyhow::Result<bool> {
    let dir = std::env::temp_dir().join(format!("servitor-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&dir, agent_command, shutdown).await;
    // Containers may leave root-owned files; what cannot be removed stays in
    // the temporary directory.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &Path,
    agent_command: Vec<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<bool> {
    println!("Servitor demo");
    println!("=============");
    let (executor, why) = choose_executor().await;
    println!("Executor: {why}");

    let standin = StandIn::start(StandInConfig::default())
        .await
        .context("starting the GitLab stand-in")?;
    println!("GitLab stand-in (runner API over HTTP): {}", standin.url());
    std::fs::write(
        dir.join(crate::config::RUNNER_TOKEN_FILE),
        servitor_testkit::gitlab::DEFAULT_RUNNER_TOKEN,
    )?;
    std::fs::write(dir.join(crate::config::JOIN_TOKEN_FILE), random_token())?;

    let mut imds = Vec::new();
    for n in 1..=DEMO_INSTANCES {
        imds.push(
            ImdsStandIn::start(InstanceSpec {
                instance_id: format!("i-0demo{n:04}"),
                ..InstanceSpec::default()
            })
            .await
            .context("starting an instance metadata stand-in")?,
        );
    }
    println!(
        "Instance metadata stand-ins (IMDSv2): one per local instance, {}",
        imds.iter()
            .map(ImdsStandIn::url)
            .collect::<Vec<_>>()
            .join(", ")
    );

    let config = crate::config::write(
        &dir.join("coordinator.toml"),
        &demo_config(dir, &standin.url(), executor),
    )?;
    let secrets = config.load_secrets()?;
    let stop = shutdown.child_token();
    let coordinator = servitor_coordinator::start(
        config,
        secrets,
        servitor_coordinator::StartOptions {
            local_imds_endpoints: imds.iter().map(ImdsStandIn::url).collect(),
            agent_command: Some(agent_command),
            ..servitor_coordinator::StartOptions::default()
        },
        stop.clone(),
    )
    .await
    .context("starting the coordinator")?;
    println!(
        "Coordinator: agent link on {} (QUIC, mutual TLS), admin socket {}",
        coordinator.link_addr,
        coordinator.admin_socket.display()
    );

    let mut jobs = Vec::new();
    println!("\nPipeline:");
    for (spec, expect) in pipeline(executor == ExecutorChoice::Docker) {
        let name = spec.name.clone();
        let id = standin.push_job(spec).await?;
        println!("  #{id} {name:<14} {expect}");
        jobs.push((id, name));
    }
    println!();

    let started = tokio::time::Instant::now();
    let mut canceled = false;
    let mut reclaimed = false;
    let mut last_line = String::new();
    let all_final = loop {
        if shutdown.is_cancelled() {
            break false;
        }
        let records: Vec<JobRecord> = jobs.iter().filter_map(|(id, _)| standin.job(*id)).collect();
        // Cancel the long job once it is visibly running.
        if !canceled {
            if let Some(long) = records.iter().find(|r| r.name == "long-running") {
                if long.trace_text().contains("tick 3") {
                    standin.cancel(long.id, true)?;
                    println!(
                        "{:>5.1}s  canceling #{} long-running from GitLab",
                        started.elapsed().as_secs_f32(),
                        long.id
                    );
                    canceled = true;
                }
            }
        }
        // Reclaim the Spot victim's instance once its job is under way.
        if !reclaimed {
            if let Some(victim) = records.iter().find(|r| r.name == "spot-victim") {
                // A notice to an instance whose other job is still in its
                // canceled after_script would end that after_script too:
                // wait until the cancel is through there.
                let canceling_there = |n: usize| {
                    records.iter().any(|r| {
                        r.name == "long-running"
                            && !r.state.is_final()
                            && canceled
                            && instance_of(&coordinator, r.id) == Some(n)
                    })
                };
                if victim.trace_text().contains("step 2 of 6") {
                    if let Some(n) =
                        instance_of(&coordinator, victim.id).filter(|n| !canceling_there(*n))
                    {
                        if let Some(stand_in) = imds.get(n.saturating_sub(1)) {
                            stand_in.set_spot_action("terminate", Duration::from_secs(120));
                            println!(
                                "{:>5.1}s  AWS sends a Spot interruption notice to local-{n}, which runs #{} spot-victim",
                                started.elapsed().as_secs_f32(),
                                victim.id
                            );
                            reclaimed = true;
                        }
                    }
                }
            }
        }
        let line = live_line(&coordinator, &records);
        if line != last_line {
            println!("{:>5.1}s  {line}", started.elapsed().as_secs_f32());
            last_line = line;
        }
        if records.iter().all(|r| r.state.is_final()) {
            break true;
        }
        if started.elapsed() > DEMO_TIMEOUT {
            println!("the pipeline did not finish within {DEMO_TIMEOUT:?}");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // Show scale-in: idle instances are drained and stopped.
    if all_final {
        let until = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::time::Instant::now() < until && !coordinator.fleet_view.get().is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let line = live_line(&coordinator, &[]);
            if line != last_line {
                println!("{:>5.1}s  {line}", started.elapsed().as_secs_f32());
                last_line = line;
            }
        }
    }

    let records: Vec<JobRecord> = jobs.iter().filter_map(|(id, _)| standin.job(*id)).collect();
    let ok = summary(&records);
    coordinator.stop();
    coordinator.wait().await;
    Ok(ok && all_final)
}

/// The local instance number (`local-<n>`) running the job's attempt.
fn instance_of(coordinator: &servitor_coordinator::Coordinator, job_id: i64) -> Option<usize> {
    let agent = coordinator
        .core
        .jobs()
        .into_iter()
        .find(|j| j.job_id == job_id && j.state == "running")?
        .agent?;
    let instance = coordinator
        .core
        .agents()
        .into_iter()
        .find(|a| a.agent_id == agent)?
        .instance_id;
    instance.strip_prefix("local-")?.parse().ok()
}

fn live_line(coordinator: &servitor_coordinator::Coordinator, records: &[JobRecord]) -> String {
    let instances: Vec<String> = coordinator
        .fleet_view
        .get()
        .iter()
        .map(|i| format!("{} {}", i.id, i.state))
        .collect();
    let jobs: Vec<String> = records
        .iter()
        .map(|r| format!("{} {}", r.name, r.state.as_str()))
        .collect();
    format!(
        "instances [{}]  jobs [{}]",
        if instances.is_empty() {
            "none".to_owned()
        } else {
            instances.join(", ")
        },
        jobs.join(", ")
    )
}

/// Prints the outcome of each job and checks it against the pipeline's
/// expectations.
fn summary(records: &[JobRecord]) -> bool {
    use servitor_testkit::gitlab::JobState;
    println!("\nSummary");
    println!("-------");
    let mut all_ok = true;
    for r in records {
        let fin = r.final_update.as_ref();
        let reason = fin
            .and_then(|f| f.failure_reason.clone())
            .unwrap_or_default();
        let exit = fin.and_then(|f| f.exit_code);
        let trace = r.trace_text();
        let expected = match r.name.as_str() {
            "build" => {
                r.state == JobState::Success
                    && trace.contains("Build finished")
                    && r.artifacts.len() == 1
            }
            "package" => {
                r.state == JobState::Success
                    && trace.contains("Downloading artifacts for build")
                    && trace.contains("servitor build ")
                    && trace.contains("Successfully extracted cache")
                    && trace.contains("fetched dependency")
            }
            "test" => {
                r.state == JobState::Failed
                    && reason == "script_failure"
                    && exit == Some(3)
                    && !trace.contains("never printed")
            }
            "deploy" => {
                r.state == JobState::Success
                    && trace.contains("after_script sees CI_JOB_STATUS=success")
                    && trace.contains("[MASKED]")
                    && !trace.contains(SECRET)
            }
            "spot-victim" => {
                r.state == JobState::Success
                    && trace.contains("Spot interruption notice")
                    && trace.contains("Attempt 2 of 3")
                    && trace.contains("built")
                    && r.updates
                        .iter()
                        .filter(|u| u.state == "success" || u.state == "failed")
                        .count()
                        == 1
            }
            "long-running" => {
                r.state == JobState::Canceled && trace.contains("after_script ran after the cancel")
            }
            _ => true,
        };
        all_ok &= expected && r.checksum_ok != Some(false);
        println!(
            "  #{:<3} {:<14} {:<9} {:<16} exit {:<4} log {:>5} bytes, checksum {}  {}",
            r.id,
            r.name,
            r.state.as_str(),
            if reason.is_empty() { "-" } else { &reason },
            exit.map_or("-".to_owned(), |e| e.to_string()),
            r.trace.len(),
            match r.checksum_ok {
                Some(true) => "ok",
                Some(false) => "MISMATCH",
                None => "-",
            },
            if expected {
                "as expected"
            } else {
                "UNEXPECTED"
            }
        );
    }
    for name in ["package", "deploy", "spot-victim"] {
        if let Some(record) = records.iter().find(|r| r.name == name) {
            println!("\nJob log of #{} {name}, as GitLab stores it:", record.id);
            for line in strip_ansi(&record.trace_text()).lines() {
                println!("  | {line}");
            }
        }
    }
    println!(
        "\n{}",
        if all_ok {
            "Every job ended as expected."
        } else {
            "Some jobs did not end as expected."
        }
    );
    all_ok
}

/// Removes ANSI escapes and section markers for printing in a terminal.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            plain.push(c);
            continue;
        }
        // CSI: ESC [ parameters, then a final byte in @..~
        if chars.peek() == Some(&'[') {
            chars.next();
            for n in chars.by_ref() {
                if ('@'..='~').contains(&n) {
                    break;
                }
            }
        }
    }
    // Section markers run from `section_start:`/`section_end:` to a carriage
    // return.
    let mut out = String::with_capacity(plain.len());
    let mut rest = plain.as_str();
    loop {
        let next = ["section_start:", "section_end:"]
            .iter()
            .filter_map(|m| rest.find(m))
            .min();
        let Some(at) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..at]);
        match rest[at..].find('\r') {
            Some(end) => rest = &rest[at + end + 1..],
            None => break,
        }
    }
    out.replace('\r', "")
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn markers_and_colours_are_removed() {
        let log = "section_start:1:get_sources\r\x1b[0K\x1b[36;1mGetting source\x1b[0;m\nok\nsection_end:1:get_sources\r\x1b[0K\x1b[32;1mJob succeeded\x1b[0;m\n";
        assert_eq!(strip_ansi(log), "Getting source\nok\nJob succeeded\n");
    }
}
