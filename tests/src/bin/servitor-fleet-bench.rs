//! Measures the fleet on this machine:
//!
//! - the sizing decision (`policy::plan_with`, pure) for fleets of 10 to
//!   5,000 instances: the cost of one reconcile pass's thinking;
//! - against moto's server through the real AWS SDK, with instances
//!   "booted" at once by the test booter: a job taken from GitLab → the
//!   group's desired capacity raised (scale-out reaction), → the job's
//!   first output (launch, agent joins, dispatch), and the job done →
//!   its instance terminated, less `idle_time` (scale-in reaction).
//!
//! Needs moto's server (`SERVITOR_MOTO_SERVER`, as tests/run.sh sets it).
//! Run it in release: `cargo run --release -p servitor-tests --bin servitor-fleet-bench`.

use std::time::{Duration, Instant};

use anyhow::Context;
use servitor_coordinator::fleet::policy::{self, AgentView, FleetPolicy, Instance};
use servitor_coordinator::fleet::schedule::ActivePolicy;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::aws::{AwsHarness, AwsOptions};
use servitor_tests::percentile;

/// Samples of each moto figure.
const SAMPLES: usize = 8;
/// The idle time the scale-in figure is measured beyond.
const IDLE_TIME: Duration = Duration::from_secs(1);

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Median time of one `plan_with` call over a fleet of `n` instances, a
/// third busy, a third idle past idle_time, a third booting.
fn plan_cost(n: usize) -> Duration {
    let now = tokio::time::Instant::now() + Duration::from_secs(3600);
    let instances: Vec<Instance> = (0..n)
        .map(|k| {
            let agent = |busy: u32, idle_for: Option<u64>| AgentView {
                busy,
                draining: false,
                idle_since: idle_for.map(|s| now - Duration::from_secs(s)),
                used: 1,
            };
            Instance {
                agent: match k % 3 {
                    0 => Some(agent(1, None)),
                    1 => Some(agent(0, Some(600))),
                    _ => None,
                },
                last_seen: (k % 3 != 2).then_some(now),
                ..Instance::launched(format!("i-{k:017x}"), now - Duration::from_secs(60))
            }
        })
        .collect();
    let policy = FleetPolicy {
        capacity_per_instance: 1,
        max_instances: u32::try_from(n * 2).unwrap_or(u32::MAX),
        max_use_count: 100,
        boot_timeout: Some(Duration::from_secs(600)),
        lost_grace: Duration::from_secs(30),
        launch_rate: None,
        idle: ActivePolicy {
            idle_count: 2,
            idle_time: Duration::from_secs(300),
            ..ActivePolicy::default()
        },
    };
    let demand = u32::try_from(n / 2).unwrap_or(u32::MAX);
    let rounds = (200_000 / n.max(1)).clamp(20, 20_000);
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let plan = policy::plan_with(&policy::PlanInput {
            demand,
            instances: &instances,
            pending: 0,
            policy: &policy,
            recent_launches: &[],
            budget: None,
            now,
        });
        samples.push(start.elapsed());
        std::hint::black_box(plan);
    }
    samples.sort();
    percentile(&samples, 0.5)
}

struct MotoFigures {
    pickup: Vec<Duration>,
    scale_out: Vec<Duration>,
    first_output: Vec<Duration>,
    scale_in: Vec<Duration>,
}

async fn moto_figures() -> anyhow::Result<MotoFigures> {
    let h = AwsHarness::start(AwsOptions {
        max_instances: 1,
        idle_time: Duration::from_secs(1),
        ..AwsOptions::default()
    })
    .await?;
    let mut figures = MotoFigures {
        pickup: Vec::new(),
        scale_out: Vec::new(),
        first_output: Vec::new(),
        scale_in: Vec::new(),
    };
    for n in 0..SAMPLES {
        let queued = Instant::now();
        let id = h
            .standin
            .push_job(JobSpec::new(format!("sample-{n}")).script(["echo sample output"]))
            .await?;
        // GitLab's own part (the long poll handing the job over) is not
        // the fleet's: count from the coordinator taking the job.
        h.standin
            .wait_for(id, "taken", Duration::from_secs(30), |r| {
                r.state != JobState::Pending
            })
            .await?;
        let taken = Instant::now();
        figures.pickup.push(queued.elapsed());
        h.group
            .wait_for("scale-out", Duration::from_secs(30), |d, _| d >= 1)
            .await?;
        figures.scale_out.push(taken.elapsed());
        h.standin
            .wait_for(id, "first output", Duration::from_secs(30), |r| {
                r.trace_text().contains("\nsample output\n")
            })
            .await?;
        figures.first_output.push(taken.elapsed());
        h.wait_final(id, Duration::from_secs(30)).await?;
        let done = Instant::now();
        h.group
            .wait_for("scale-in", Duration::from_secs(30), |d, i| {
                d == 0 && i.is_empty()
            })
            .await?;
        figures
            .scale_in
            .push(done.elapsed().saturating_sub(IDLE_TIME));
    }
    Ok(figures)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build; run with --release for representative figures");
    }
    println!("sizing decision (plan_with), median of many calls:");
    for n in [10, 100, 1_000, 5_000] {
        println!("  {n:>5} instances: {}", us(plan_cost(n)));
    }
    let mut f = moto_figures()
        .await
        .context("the moto figures need moto's server (SERVITOR_MOTO_SERVER)")?;
    for v in [
        &mut f.pickup,
        &mut f.scale_out,
        &mut f.first_output,
        &mut f.scale_in,
    ] {
        v.sort();
    }
    let row = |name: &str, v: &[Duration]| {
        println!(
            "  {name}: p50 {}, max {} ({} samples)",
            ms(percentile(v, 0.5)),
            ms(*v.last().unwrap_or(&Duration::ZERO)),
            v.len()
        );
    };
    println!("aws-asg fleet against moto's server (real SDK, instances boot at once):");
    row(
        "job queued in GitLab → taken by the coordinator (the stand-in's long poll)",
        &f.pickup,
    );
    row("job taken → desired capacity raised", &f.scale_out);
    row(
        "job taken → its first output line in GitLab (launch, join, dispatch)",
        &f.first_output,
    );
    row(
        "job done → its idle instance terminated, beyond idle_time",
        &f.scale_in,
    );
    Ok(())
}
