//! Measures Servitor's design targets on this machine, end to end through
//! the real binaries:
//!
//! - agent idle RSS (target ≤ 10 MiB), read from `/proc/<pid>/status`;
//! - job taken → first output line in the GitLab trace (target ≤ 0.5 s on
//!   loopback beyond Docker's own container start), with the shell executor
//!   (no container) and with the Docker executor;
//! - Spot notice visible in instance metadata → the job's script running
//!   again on a warm agent (target ≤ 2 s);
//! - coordinator killed (`kill -9`) and started again → its agent
//!   reconnected with the running job reconciled (target ≤ 5 s).
//!
//! Run it in release: `cargo run --release -p servitor-tests --bin servitor-bench`.

use std::time::Duration;

use anyhow::{bail, Context};
use servitor_testkit::gitlab::JobSpec;
use servitor_tests::{percentile, proc_status_kib, Harness, HarnessOptions};

/// Jobs measured per executor.
const SAMPLES: usize = 10;

/// Resident memory of a process: total, anonymous (heap, stacks) and
/// file-backed (the binary's code pages), in KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

fn rss_kib(pid: u32) -> anyhow::Result<Rss> {
    Ok(Rss {
        total: proc_status_kib(pid, "VmRSS:")?,
        anon: proc_status_kib(pid, "RssAnon:")?,
        file: proc_status_kib(pid, "RssFile:")?,
    })
}

async fn first_line_latency(executor: &'static str) -> anyhow::Result<(Vec<Duration>, Rss)> {
    let h = Harness::start(HarnessOptions {
        executor,
        max_instances: 1,
        capacity_per_instance: 1,
        ..HarnessOptions::default()
    })
    .await?;
    let mut samples = Vec::new();
    let mut rss = Rss::default();
    for n in 0..=SAMPLES {
        let marker = format!("first-line-{n}");
        let id = h
            .standin
            .push_job(JobSpec::new(format!("bench-{n}")).script([format!("echo {marker}")]))
            .await?;
        // Poll the stand-in's stored trace closely.
        let seen = loop {
            if let Some(r) = h.standin.job(id) {
                if r.trace_text().contains(&format!("\n{marker}")) {
                    break tokio::time::Instant::now();
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let taken = h
            .standin
            .request_log()
            .iter()
            .rev()
            .find(|r| r.status == 201)
            .map(|r| r.at)
            .context("no 201 in the request log")?;
        h.wait_final(id, Duration::from_secs(60)).await?;
        // The first job also starts the agent: measure warm agents only.
        if n > 0 {
            samples.push(seen.duration_since(taken));
        }
        if n == 0 {
            // Let the agent settle, then read its idle RSS.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pid = h
                .coordinator()
                .local_fleet
                .as_ref()
                .and_then(|f| f.pid("local-1"))
                .context("local-1 is not running")?;
            rss = rss_kib(pid)?;
        }
    }
    samples.sort();
    Ok((samples, rss))
}

/// Spot notice → the job's next attempt printing its first script line.
async fn handback_latency() -> anyhow::Result<Vec<Duration>> {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 2,
        capacity_per_instance: 1,
        // One idle slot kept warm: the re-run finds an agent waiting.
        idle_count: 1,
        imds_instances: 2 * HANDBACK_SAMPLES,
        ..HarnessOptions::default()
    })
    .await?;
    let mut samples = Vec::new();
    for n in 0..HANDBACK_SAMPLES {
        let id = h
            .standin
            .push_job(JobSpec::new(format!("handback-{n}")).script([
                "echo started",
                "for i in $(seq 1 30); do echo tick $i; sleep 0.2; done",
            ]))
            .await?;
        h.wait_trace(id, "tick 2", Duration::from_secs(60)).await?;
        // Wait until the warm spare has connected, so the figure is the
        // hand-back itself and not an instance boot.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while h
            .coordinator()
            .core
            .agents()
            .iter()
            .filter(|a| !a.draining)
            .count()
            < 2
        {
            if tokio::time::Instant::now() > deadline {
                bail!("the warm spare agent never connected");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let imds = h.imds_of_job(id).context("job has no instance")?;
        let notice_at = tokio::time::Instant::now();
        imds.set_spot_action("terminate", Duration::from_secs(120));
        let again = loop {
            let text = h
                .standin
                .job(id)
                .map(|r| r.trace_text())
                .unwrap_or_default();
            if text
                .split("Attempt 2 of")
                .nth(1)
                .is_some_and(|after| after.contains("\nstarted"))
            {
                break tokio::time::Instant::now();
            }
            if notice_at.elapsed() > Duration::from_secs(30) {
                bail!("the job did not run again within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        samples.push(again.duration_since(notice_at));
        h.wait_final(id, Duration::from_secs(60)).await?;
    }
    samples.sort();
    Ok(samples)
}

/// `kill -9` of the coordinator, start again → the agent's running attempt
/// re-adopted (the coordinator logs the reconnect with `running=1`).
async fn restart_latency() -> anyhow::Result<Vec<Duration>> {
    use servitor_testkit::gitlab::{StandIn, StandInConfig};
    use servitor_tests::{process_config, CoordinatorProcess};
    let standin = StandIn::start(StandInConfig::default()).await?;
    let dir = tempfile::tempdir()?;
    let (config, log) = process_config(dir.path(), &standin.url())?;
    let mut coordinator = CoordinatorProcess::start(&config, &log)?;
    let id = standin
        .push_job(
            JobSpec::new("outlives-restarts")
                .script(["for i in $(seq 1 600); do echo tick $i; sleep 0.1; done"]),
        )
        .await?;
    standin
        .wait_for(id, "output", Duration::from_secs(60), |r| {
            r.trace_text().contains("tick 2")
        })
        .await?;
    let mut samples = Vec::new();
    for _ in 0..RESTART_SAMPLES {
        let before = std::fs::read_to_string(&log)?.matches("running=1").count();
        coordinator.kill().await;
        let started = tokio::time::Instant::now();
        coordinator = CoordinatorProcess::start(&config, &log)?;
        loop {
            if std::fs::read_to_string(&log)?.matches("running=1").count() > before {
                samples.push(started.elapsed());
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not reconnect within 60 s of the restart");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    coordinator.stop().await;
    samples.sort();
    Ok(samples)
}

/// Coordinator restarts measured.
const RESTART_SAMPLES: usize = 5;

/// Hand-backs measured; each uses up one local instance.
const HANDBACK_SAMPLES: usize = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build; run with --release for representative figures");
    }
    let mut failed = false;
    for executor in ["shell", "docker"] {
        let (samples, rss) = match first_line_latency(executor).await {
            Ok(v) => v,
            Err(e) => bail!("{executor} executor: {e:#}"),
        };
        let p50 = percentile(&samples, 0.5);
        let p90 = percentile(&samples, 0.9);
        let max = samples.last().copied().unwrap_or_default();
        println!(
            "{executor:>6} executor: job taken -> first output line in GitLab: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms ({} jobs)",
            p50.as_secs_f64() * 1000.0,
            p90.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            samples.len()
        );
        println!(
            "{executor:>6} executor: agent idle RSS {:.1} MiB ({:.1} MiB anonymous, {:.1} MiB file-backed code)",
            rss.total as f64 / 1024.0,
            rss.anon as f64 / 1024.0,
            rss.file as f64 / 1024.0
        );
        if executor == "shell" && p50 > Duration::from_millis(500) {
            failed = true;
        }
        if rss.total > 10 * 1024 {
            failed = true;
        }
    }
    let handback = handback_latency().await?;
    let p50 = percentile(&handback, 0.5);
    let max = handback.last().copied().unwrap_or_default();
    println!(
        "  spot notice -> job running again on a warm agent: p50 {:.0} ms, max {:.0} ms ({} hand-backs, IMDS polled every {:?})",
        p50.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        handback.len(),
        servitor_agent::imds::POLL_INTERVAL
    );
    if max > Duration::from_secs(2) {
        failed = true;
    }
    let restart = restart_latency().await?;
    let p50 = percentile(&restart, 0.5);
    let max = restart.last().copied().unwrap_or_default();
    println!(
        "  coordinator kill -9 and start -> agent reconnected, running job reconciled: p50 {:.0} ms, max {:.0} ms ({} restarts; includes the coordinator's own start-up)",
        p50.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        restart.len()
    );
    if max > Duration::from_secs(5) {
        failed = true;
    }
    if failed {
        println!("some figures are over their design targets");
    }
    Ok(())
}
