//! The randomised fault soak: the real coordinator (its own process) and
//! real agents (a local fleet running jobs in Docker) under a GitLab
//! stand-in, fed a stream of jobs of varied length and output while faults
//! drawn from a seed hit agents, the link, GitLab and the coordinator.
//!
//! Afterwards a checker that reads only what the stand-in saw decides: every
//! job reported exactly once and successfully, none lost, each trace holding
//! its job's output whole and in order (an attempt cut short holding a
//! prefix of it), checksum and size right, no masked value anywhere, no
//! request GitLab would refuse as malformed and none after a job's final
//! update.
//!
//! The seed is printed first, so a failing run can be replayed with the
//! same jobs and the same schedule of faults (the timing of the machine
//! still differs from run to run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use servitor_coordinator::config::ExecutorChoice;
use servitor_testkit::gitlab::{Fault, JobRecord, JobSpec, JobState, Route, StandIn};
use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};
use tokio::time::Instant;

use crate::{config, CoordinatorProcess, UdpRelay};

/// Every kind of fault the soak injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// `kill -9` of an agent.
    AgentKill,
    /// SIGSTOP, then SIGCONT well within the lost grace.
    AgentFreezeShort,
    /// SIGSTOP, then SIGCONT after the lost grace has passed.
    AgentFreezeLong,
    /// SIGTERM of an agent (it hands its jobs back and leaves).
    AgentTerm,
    /// A Spot interruption notice on an instance's metadata.
    SpotNotice,
    /// The link between every agent and the coordinator cut, then healed.
    LinkCut,
    /// `kill -9` of the coordinator, then a new one on the same state.
    CoordinatorKill,
    /// SIGTERM of the coordinator, then a new one on the same state.
    CoordinatorTerm,
    /// GitLab answers one request 500, 502 or 503.
    GitLab5xx,
    /// GitLab answers one request 429 with `Retry-After`.
    GitLab429,
    /// GitLab answers one job request or job update 409.
    GitLab409,
    /// GitLab answers a trace PATCH 416 (it holds another length).
    GitLab416,
    /// GitLab applies a trace PATCH but its answer is lost.
    LostTraceAck,
    /// Every GitLab request is slow for a while.
    SlowGitLab,
    /// GitLab answers every request 502 for a while.
    GitLabDown,
}

impl FaultKind {
    pub const ALL: [FaultKind; 15] = [
        FaultKind::AgentKill,
        FaultKind::AgentFreezeShort,
        FaultKind::AgentFreezeLong,
        FaultKind::AgentTerm,
        FaultKind::SpotNotice,
        FaultKind::LinkCut,
        FaultKind::CoordinatorKill,
        FaultKind::CoordinatorTerm,
        FaultKind::GitLab5xx,
        FaultKind::GitLab429,
        FaultKind::GitLab409,
        FaultKind::GitLab416,
        FaultKind::LostTraceAck,
        FaultKind::SlowGitLab,
        FaultKind::GitLabDown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::AgentKill => "agent kill -9",
            FaultKind::AgentFreezeShort => "agent SIGSTOP within grace",
            FaultKind::AgentFreezeLong => "agent SIGSTOP past grace",
            FaultKind::AgentTerm => "agent SIGTERM",
            FaultKind::SpotNotice => "Spot notice",
            FaultKind::LinkCut => "link cut and healed",
            FaultKind::CoordinatorKill => "coordinator kill -9 + restart",
            FaultKind::CoordinatorTerm => "coordinator SIGTERM + restart",
            FaultKind::GitLab5xx => "GitLab 5xx",
            FaultKind::GitLab429 => "GitLab 429",
            FaultKind::GitLab409 => "GitLab 409",
            FaultKind::GitLab416 => "GitLab 416",
            FaultKind::LostTraceAck => "lost trace acknowledgement",
            FaultKind::SlowGitLab => "slow GitLab",
            FaultKind::GitLabDown => "GitLab down",
        }
    }
}

/// How long and how hard to soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub seed: u64,
    /// How long jobs are fed and faults injected; the run then heals every
    /// fault and waits for the jobs left.
    pub duration: Duration,
    /// Jobs kept queued or running at once.
    pub in_flight: usize,
    /// Mean time between faults (drawn uniformly from half to one and a
    /// half of it).
    pub mean_fault_interval: Duration,
    /// How long GitLab stays down when it goes down.
    pub gitlab_down_for: Duration,
    /// An agent not heard from for this long is lost and its jobs re-run.
    pub lost_grace: Duration,
    pub max_instances: u32,
    pub capacity_per_instance: u32,
    /// The kinds to draw from.
    pub faults: Vec<FaultKind>,
    /// Longest wait for the last jobs once the faults stop.
    pub drain_timeout: Duration,
}

impl SoakOptions {
    /// A run of a few minutes, as the test suite runs it.
    pub fn short(seed: u64) -> Self {
        Self {
            seed,
            duration: Duration::from_secs(150),
            in_flight: 5,
            mean_fault_interval: Duration::from_secs(6),
            gitlab_down_for: Duration::from_secs(20),
            lost_grace: Duration::from_secs(8),
            max_instances: 3,
            capacity_per_instance: 2,
            faults: FaultKind::ALL.to_vec(),
            drain_timeout: Duration::from_secs(240),
        }
    }

    /// A run of `minutes`, with GitLab down for a whole minute at a time.
    pub fn long(seed: u64, minutes: u64) -> Self {
        Self {
            duration: Duration::from_secs(minutes * 60),
            in_flight: 8,
            mean_fault_interval: Duration::from_secs(10),
            gitlab_down_for: Duration::from_secs(60),
            max_instances: 4,
            ..Self::short(seed)
        }
    }
}

/// What a soak did and found.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub jobs: usize,
    /// Attempts started over all jobs (a re-run is a second attempt).
    pub attempts: usize,
    pub output_bytes: u64,
    pub faults: BTreeMap<FaultKind, u32>,
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

impl SoakReport {
    pub fn faults_injected(&self) -> u32 {
        self.faults.values().sum()
    }

    /// A few lines for a person: the seed, the counts and each violation.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "soak seed {}: {} jobs, {} attempts, {} output bytes, {} faults in {:.0?}, {} invariant violations\n",
            self.seed,
            self.jobs,
            self.attempts,
            self.output_bytes,
            self.faults_injected(),
            self.elapsed,
            self.violations.len()
        );
        for (kind, n) in &self.faults {
            let _ = writeln!(out, "  {:<32} {n}", kind.name());
        }
        for v in &self.violations {
            let _ = writeln!(out, "VIOLATION: {v}");
        }
        out
    }
}

/// A job the soak pushed and what its output must be.
#[derive(Debug)]
struct Expected {
    tag: usize,
    /// The job's output, masked as GitLab must show it.
    output: Vec<u8>,
    secret: String,
}

/// A job's script (one line, so its output follows one echoed command)
/// and its output, drawn from `rng`.
fn draw_job(rng: &mut StdRng, tag: usize) -> (JobSpec, Expected) {
    let secret = format!("soak{:012x}", rng.random::<u64>() & 0xffff_ffff_ffff);
    // The echoed command must not contain the markers it prints.
    let mut parts = vec![format!("printf 'B%sN-%s\\n' EGI {tag}")];
    let mut output = format!("BEGIN-{tag}\n").into_bytes();
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..6) {
            0 => {
                // Steady output over seconds.
                let lines = rng.random_range(5..40);
                parts.push(format!(
                    "i=0; while [ $i -lt {lines} ]; do echo \"s{tag} line $i\"; sleep 0.2; i=$((i+1)); done"
                ));
                for i in 0..lines {
                    output.extend_from_slice(format!("s{tag} line {i}\n").as_bytes());
                }
            }
            // A burst of up to a few megabytes, while the job's log stays
            // under GitLab's output limit (4 MiB, where the runner cuts it
            // with a notice, as gitlab-runner does).
            1 if output.len() < 1_000_000 => {
                let n = rng.random_range(1_000..400_000);
                parts.push(format!("seq 1 {n}"));
                for i in 1..=n {
                    output.extend_from_slice(format!("{i}\n").as_bytes());
                }
            }
            2 => {
                // Bytes that are not text.
                parts.push("printf '\\001\\002\\377\\376\\000\\200binary\\n'".to_owned());
                output.extend_from_slice(b"\x01\x02\xff\xfe\x00\x80binary\n");
            }
            3 => {
                // A secret written in two pieces, apart in time.
                parts.push(
                    "printf 'secret=%s' \"${SOAK_SECRET%????????}\"; sleep 0.3; printf '%s\\n' \"${SOAK_SECRET#????????}\""
                        .to_owned(),
                );
                output.extend_from_slice(b"secret=[MASKED]\n");
            }
            1 | 4 => {
                // A pause with no output at all.
                let tenths = rng.random_range(5..50);
                parts.push(format!("sleep {}.{}", tenths / 10, tenths % 10));
            }
            _ => {
                // A line without its newline, then more.
                parts.push(format!("printf 'part-%s' {tag}; sleep 0.2; echo ' whole'"));
                output.extend_from_slice(format!("part-{tag} whole\n").as_bytes());
            }
        }
    }
    // Every job ends without a newline.
    parts.push(format!("printf 'E%sD-%s' N {tag}"));
    output.extend_from_slice(format!("END-{tag}").as_bytes());
    let spec = JobSpec::new(format!("soak-{tag}"))
        .masked_variable("SOAK_SECRET", secret.clone())
        .script([parts.join("; ")])
        .timeout(Duration::from_secs(1800));
    (
        spec,
        Expected {
            tag,
            output,
            secret,
        },
    )
}

/// The seed in `SERVITOR_SOAK_SEED`, or a new one from the clock.
///
/// # Errors
/// The variable is set but is not a whole number.
pub fn seed_from_env() -> anyhow::Result<u64> {
    match std::env::var("SERVITOR_SOAK_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SERVITOR_SOAK_SEED={v:?}: not a whole number")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()))),
    }
}

/// Runs one soak.
///
/// # Errors
/// Setting up failed (the Docker engine, a binary, a port); invariant
/// violations are in the report, not errors.
pub async fn run(options: SoakOptions) -> anyhow::Result<SoakReport> {
    let started = Instant::now();
    crate::ensure_test_image().await?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let standin = StandIn::start(servitor_testkit::gitlab::StandInConfig {
        long_poll: Duration::from_secs(5),
        trace_update_interval: 1,
        ..servitor_testkit::gitlab::StandInConfig::default()
    })
    .await?;
    std::fs::write(
        dir.path().join(config::RUNNER_TOKEN_FILE),
        servitor_testkit::gitlab::DEFAULT_RUNNER_TOKEN,
    )?;
    std::fs::write(
        dir.path().join(config::JOIN_TOKEN_FILE),
        "soak-join-token-0123456789",
    )?;
    // Instances are numbered in launch order; each has its own metadata.
    let instances = usize::try_from(options.duration.as_secs() / 2)
        .unwrap_or(64)
        .clamp(32, 512);
    let mut imds = Vec::with_capacity(instances);
    for n in 1..=instances {
        imds.push(
            ImdsStandIn::start(InstanceSpec {
                instance_id: format!("i-0soak{n:05}"),
                ..InstanceSpec::default()
            })
            .await?,
        );
    }
    let relay = UdpRelay::start().await?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    relay.set_target(listen);
    let mut cfg = config::local(dir.path(), &standin.url(), listen);
    cfg.concurrent = options.max_instances * options.capacity_per_instance;
    // Enough attempts that the faults cannot use them up.
    cfg.max_attempts = 50;
    cfg.agents.lost_grace = options.lost_grace;
    {
        let fleet = cfg.fleet_mut();
        fleet.max_instances = options.max_instances;
        fleet.capacity_per_instance = options.capacity_per_instance;
        fleet.local.executor = ExecutorChoice::Docker;
        fleet.local.default_image = Some(crate::TEST_IMAGE.to_owned());
        fleet.local.imds_endpoints = imds.iter().map(ImdsStandIn::url).collect();
        fleet.local.dial = Some(relay.addr());
        fleet.local.agent_command = vec![crate::agent_binary()?.display().to_string()];
    }
    let config_path = dir.path().join("coordinator.toml");
    config::write(&config_path, &cfg)?;
    let log = dir.path().join("coordinator.log");
    let mut soak = Soak {
        standin,
        imds,
        relay,
        config_path,
        log,
        state_dir: dir.path().join("state"),
        coordinator: None,
        options: options.clone(),
        report: SoakReport {
            seed: options.seed,
            ..SoakReport::default()
        },
        expected: BTreeMap::new(),
        next_tag: 1,
        healing: Vec::new(),
        since: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
    };
    soak.coordinator = Some(CoordinatorProcess::start(&soak.config_path, &soak.log)?);
    let result = soak.drive(&mut rng, started).await;
    soak.cleanup().await;
    result?;
    soak.report.elapsed = started.elapsed();
    // Kept when something was wrong, for the logs.
    if !soak.report.violations.is_empty() {
        let kept = dir.keep();
        soak.report
            .violations
            .push(format!("logs kept in {}", kept.display()));
    }
    Ok(soak.report)
}

/// A fault that ends by itself: the moment it heals and how.
enum Healing {
    Cont(u32, Instant),
    Relay(Instant),
    GitLabUp(Instant),
    Latency(Instant),
}

impl Healing {
    fn due(&self) -> Instant {
        match self {
            Healing::Cont(_, at)
            | Healing::Relay(at)
            | Healing::GitLabUp(at)
            | Healing::Latency(at) => *at,
        }
    }
}

struct Soak {
    standin: StandIn,
    imds: Vec<ImdsStandIn>,
    relay: UdpRelay,
    config_path: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
    coordinator: Option<CoordinatorProcess>,
    options: SoakOptions,
    report: SoakReport,
    expected: BTreeMap<i64, Expected>,
    next_tag: usize,
    healing: Vec<Healing>,
    /// Unix time the soak started, for the containers it leaves.
    since: i64,
}

impl Soak {
    async fn drive(&mut self, rng: &mut StdRng, started: Instant) -> anyhow::Result<()> {
        let end = started + self.options.duration;
        let mut next_fault = Instant::now() + self.fault_gap(rng) + Duration::from_secs(5);
        loop {
            let now = Instant::now();
            self.heal_due(now);
            if now >= end {
                break;
            }
            self.feed(rng).await?;
            if now >= next_fault {
                let kind = self.options.faults[rng.random_range(0..self.options.faults.len())];
                if self.inject(kind, rng).await? {
                    *self.report.faults.entry(kind).or_default() += 1;
                }
                next_fault = Instant::now() + self.fault_gap(rng);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Heal everything still broken, then wait for the last jobs.
        let now = Instant::now() + Duration::from_secs(3600);
        self.heal_due(now);
        let deadline = Instant::now() + self.options.drain_timeout;
        for &id in self.expected.keys() {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self.standin.wait_for_final(id, left).await;
        }
        self.check();
        Ok(())
    }

    fn fault_gap(&self, rng: &mut StdRng) -> Duration {
        self.options
            .mean_fault_interval
            .mul_f64(rng.random_range(0.5..1.5))
    }

    /// Keeps `in_flight` jobs pending or running.
    async fn feed(&mut self, rng: &mut StdRng) -> anyhow::Result<()> {
        let open = self
            .expected
            .keys()
            .filter(|id| self.standin.job(**id).is_some_and(|j| !j.state.is_final()))
            .count();
        for _ in open..self.options.in_flight {
            let (spec, expected) = draw_job(rng, self.next_tag);
            self.next_tag += 1;
            let id = self.standin.push_job(spec).await?;
            self.expected.insert(id, expected);
        }
        Ok(())
    }

    fn heal_due(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.healing)
            .into_iter()
            .partition(|h| h.due() <= now);
        self.healing = later;
        for h in due {
            match h {
                Healing::Cont(pid, _) => signal(pid, "CONT"),
                Healing::Relay(_) => self.relay.heal(),
                Healing::GitLabUp(_) => self.standin.set_down(false),
                Healing::Latency(_) => self.standin.set_latency(Duration::ZERO),
            }
        }
    }

    /// Agents alive now: instance name and process id.
    fn agents(&self) -> Vec<(String, u32)> {
        live_agents(&self.state_dir.join("local-fleet"))
    }

    fn running_jobs(&self) -> Vec<i64> {
        self.expected
            .keys()
            .copied()
            .filter(|id| {
                self.standin
                    .job(*id)
                    .is_some_and(|j| j.state == JobState::Running)
            })
            .collect()
    }

    /// Injects one fault; `false` when there was nothing to inject it into
    /// (no agent alive, no job running, the same fault still in effect).
    async fn inject(&mut self, kind: FaultKind, rng: &mut StdRng) -> anyhow::Result<bool> {
        let grace = self.options.lost_grace;
        let agents = self.agents();
        let agent = (!agents.is_empty()).then(|| agents[rng.random_range(0..agents.len())].clone());
        let running = self.running_jobs();
        let job = (!running.is_empty()).then(|| running[rng.random_range(0..running.len())]);
        let frozen = self
            .healing
            .iter()
            .filter_map(|h| match h {
                Healing::Cont(pid, _) => Some(*pid),
                _ => None,
            })
            .collect::<Vec<_>>();
        let now = Instant::now();
        match kind {
            FaultKind::AgentKill | FaultKind::AgentTerm => {
                let Some((_, pid)) = agent else {
                    return Ok(false);
                };
                if frozen.contains(&pid) {
                    return Ok(false);
                }
                signal(
                    pid,
                    if kind == FaultKind::AgentKill {
                        "KILL"
                    } else {
                        "TERM"
                    },
                );
            }
            FaultKind::AgentFreezeShort | FaultKind::AgentFreezeLong => {
                let Some((_, pid)) = agent else {
                    return Ok(false);
                };
                if frozen.contains(&pid) {
                    return Ok(false);
                }
                let for_ = if kind == FaultKind::AgentFreezeShort {
                    grace.mul_f64(rng.random_range(0.1..0.4))
                } else {
                    grace.mul_f64(rng.random_range(1.5..2.5))
                };
                signal(pid, "STOP");
                self.healing.push(Healing::Cont(pid, now + for_));
            }
            FaultKind::SpotNotice => {
                let Some((name, _)) = agent else {
                    return Ok(false);
                };
                let Some(n) = instance_number(&name) else {
                    return Ok(false);
                };
                let Some(imds) = n.checked_sub(1).and_then(|i| self.imds.get(i)) else {
                    return Ok(false);
                };
                imds.set_spot_action("terminate", Duration::from_secs(120));
            }
            FaultKind::LinkCut => {
                if self.healing.iter().any(|h| matches!(h, Healing::Relay(_))) {
                    return Ok(false);
                }
                self.relay.cut();
                let for_ = grace.mul_f64(rng.random_range(0.1..1.5));
                self.healing.push(Healing::Relay(now + for_));
            }
            FaultKind::CoordinatorKill | FaultKind::CoordinatorTerm => {
                if let Some(c) = self.coordinator.take() {
                    if kind == FaultKind::CoordinatorKill {
                        c.kill().await;
                    } else {
                        c.stop().await;
                    }
                }
                self.coordinator = Some(CoordinatorProcess::start(&self.config_path, &self.log)?);
            }
            FaultKind::GitLab5xx => {
                let status = [500, 502, 503][rng.random_range(0..3)];
                let route = self.route(rng, job);
                self.standin.fail_next(route, vec![Fault::status(status)]);
            }
            FaultKind::GitLab429 => {
                let route = self.route(rng, job);
                self.standin.fail_next(route, vec![Fault::rate_limited(1)]);
            }
            FaultKind::GitLab409 => {
                let route = match job {
                    Some(id) if rng.random_bool(0.5) => Route::UpdateJob(id),
                    _ => Route::RequestJob,
                };
                self.standin.fail_next(route, vec![Fault::status(409)]);
            }
            FaultKind::GitLab416 => {
                let Some(id) = job else { return Ok(false) };
                self.standin.next_patch_416(id)?;
            }
            FaultKind::LostTraceAck => {
                let Some(id) = job else { return Ok(false) };
                self.standin
                    .fail_next(Route::PatchTrace(id), vec![Fault::lost_answer()]);
            }
            FaultKind::SlowGitLab => {
                if self
                    .healing
                    .iter()
                    .any(|h| matches!(h, Healing::Latency(_)))
                {
                    return Ok(false);
                }
                let latency = Duration::from_millis(rng.random_range(300..2_000));
                self.standin.set_latency(latency);
                let for_ = Duration::from_secs(rng.random_range(5..20));
                self.healing.push(Healing::Latency(now + for_));
            }
            FaultKind::GitLabDown => {
                if self
                    .healing
                    .iter()
                    .any(|h| matches!(h, Healing::GitLabUp(_)))
                {
                    return Ok(false);
                }
                self.standin.set_down(true);
                self.healing
                    .push(Healing::GitLabUp(now + self.options.gitlab_down_for));
            }
        }
        tracing::info!(fault = kind.name(), "soak: injected");
        Ok(true)
    }

    /// A route a GitLab error hits: job requests, or a running job's
    /// updates or trace.
    fn route(&self, rng: &mut StdRng, job: Option<i64>) -> Route {
        match (job, rng.random_range(0..3)) {
            (Some(id), 0) => Route::UpdateJob(id),
            (Some(id), 1) => Route::PatchTrace(id),
            _ => Route::RequestJob,
        }
    }

    /// Stops the coordinator and every agent it left, and their containers.
    async fn cleanup(&mut self) {
        self.standin.set_down(false);
        self.relay.heal();
        for (_, pid) in self.agents() {
            signal(pid, "CONT");
        }
        if let Some(c) = self.coordinator.take() {
            c.stop().await;
        }
        // Agents adopted across a kill -9 are not the new coordinator's
        // children; those still running are stopped here.
        for (_, pid) in self.agents() {
            signal(pid, "KILL");
        }
        remove_job_containers(self.since).await;
    }

    /// The invariants, from what the stand-in saw alone.
    fn check(&mut self) {
        let mut violations = Vec::new();
        self.report.jobs = self.expected.len();
        for (&id, expected) in &self.expected {
            let Some(record) = self.standin.job(id) else {
                violations.push(format!(
                    "job {id} (soak-{}) is unknown to GitLab",
                    expected.tag
                ));
                continue;
            };
            self.report.attempts += attempts_in(&record.trace);
            self.report.output_bytes += record.trace.len() as u64;
            violations.extend(check_job(&record, expected));
        }
        self.report.violations = violations;
    }
}

/// Violations of one job's invariants.
fn check_job(record: &JobRecord, expected: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    let name = format!("job {} (soak-{})", record.id, expected.tag);
    let text = record.trace_text();
    let tail = || {
        let t = &text[text.len().saturating_sub(1500)..];
        t.to_owned()
    };
    match record.state {
        JobState::Success => {}
        s if !s.is_final() => {
            out.push(format!(
                "{name} never finished (lost): {s:?}, log ends:\n{}",
                tail()
            ));
            return out;
        }
        s => out.push(format!(
            "{name} ended {s:?} ({:?}), log ends:\n{}",
            record
                .final_update
                .as_ref()
                .and_then(|u| u.failure_reason.clone()),
            tail()
        )),
    }
    let finals = record
        .updates
        .iter()
        .filter(|u| u.status == 200 && matches!(u.state.as_str(), "success" | "failed"))
        .count();
    if finals != 1 {
        out.push(format!("{name} reported final {finals} times"));
    }
    if record.checksum_ok != Some(true) || record.bytesize_ok != Some(true) {
        out.push(format!(
            "{name}: checksum {:?}, bytesize {:?} for {} stored bytes",
            record.checksum_ok,
            record.bytesize_ok,
            record.trace.len()
        ));
    }
    if let Some(final_at) = record.final_update.as_ref().map(|u| u.at) {
        let after = record.updates.iter().filter(|u| u.at > final_at).count()
            + record.patches.iter().filter(|p| p.at > final_at).count();
        if after > 0 {
            out.push(format!("{name}: {after} requests after its final update"));
        }
    }
    let malformed = record.updates.iter().filter(|u| u.status == 400).count()
        + record.patches.iter().filter(|p| p.status == 400).count();
    if malformed > 0 {
        out.push(format!(
            "{name}: {malformed} requests GitLab refused as malformed (400)"
        ));
    }
    if contains(&record.trace, expected.secret.as_bytes()) {
        out.push(format!("{name}: its masked variable's value is in the log"));
    }
    if let Err(e) = check_output(&record.trace, expected) {
        out.push(format!("{name}: {e}; log ends:\n{}", tail()));
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle, 0).is_some()
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The attempt sections' starts in a trace.
fn attempt_starts(trace: &[u8]) -> Vec<usize> {
    let marker = b"section_start:";
    let mut starts = Vec::new();
    let mut from = 0;
    while let Some(at) = find(trace, marker, from) {
        let line_end = find(trace, b"\r", at).unwrap_or(trace.len());
        if contains(&trace[at..line_end], b":servitor_attempt_") {
            starts.push(at);
        }
        from = at + marker.len();
    }
    starts
}

fn attempts_in(trace: &[u8]) -> usize {
    attempt_starts(trace).len()
}

/// The job's own bytes of an attempt's log from `from` on: the runner's
/// lines the coordinator or agent put between them (coloured, such as
/// "The coordinator restarted…", each with its newline) and GitLab's
/// section markers are taken out. Job output holds no escape character.
fn job_bytes(section: &[u8]) -> Vec<u8> {
    const RESET: &[u8] = b"\x1b[0;m";
    let mut out = Vec::with_capacity(section.len());
    let mut i = 0;
    while i < section.len() {
        if section[i..].starts_with(b"section_") {
            // `section_start:<time>:<name>\r\x1b[0K`
            match find(section, b"\x1b[0K", i) {
                Some(end) => i = end + 4,
                None => break,
            }
        } else if section[i] == 0x1b {
            if section[i..].starts_with(b"\x1b[0K") {
                i += 4;
                continue;
            }
            match find(section, RESET, i) {
                Some(end) => {
                    i = end + RESET.len();
                    if section.get(i) == Some(&b'\n') {
                        i += 1;
                    }
                }
                None => break,
            }
        } else {
            out.push(section[i]);
            i += 1;
        }
    }
    out
}

/// Each attempt's output whole (the last) or a prefix (those cut short),
/// in order, with nothing but the runner's own lines among it.
fn check_output(trace: &[u8], expected: &Expected) -> Result<(), String> {
    let starts = attempt_starts(trace);
    if starts.is_empty() {
        return Err("no attempt section in the log".to_owned());
    }
    let begin = format!("BEGIN-{}\n", expected.tag).into_bytes();
    let want = &expected.output;
    // GitLab's output limit counts every attempt's output: a re-run can
    // reach it, and then the log ends with the limit's notice, cut there
    // as gitlab-runner cuts it. The last attempt is then a prefix too.
    let limited = contains(trace, b"Job's log exceeded limit of");
    let last = starts.len() - 1;
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(trace.len());
        let section = &trace[start..end];
        let Some(at) = find(section, &begin, 0) else {
            if i == last {
                return Err(format!(
                    "attempt {} of {} never printed its first line",
                    i + 1,
                    starts.len()
                ));
            }
            continue;
        };
        let got = job_bytes(&section[at..]);
        let same = got
            .iter()
            .zip(want.iter())
            .take_while(|(a, b)| a == b)
            .count();
        let show = |bytes: &[u8], from: usize| {
            String::from_utf8_lossy(&bytes[from..(from + 40).min(bytes.len())]).into_owned()
        };
        if i == last && !limited {
            if same < want.len() {
                return Err(format!(
                    "the last attempt's output differs from the job's at byte {same} of {} (got {:?}, want {:?})",
                    want.len(),
                    show(&got, same),
                    show(want, same),
                ));
            }
            continue;
        }
        // A cut attempt: a prefix of the output. Where the cut fell inside
        // a secret, the part of it written before the cut is not masked
        // (no whole value was written), as gitlab-runner's masker does;
        // the runner may end the cut attempt's output with a newline.
        let rest = &got[same..];
        let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
        let partial_secret = want[same..].starts_with(b"[MASKED]")
            && rest.len() < expected.secret.len()
            && expected.secret.as_bytes().starts_with(rest);
        if !rest.is_empty() && !partial_secret {
            return Err(format!(
                "attempt {} of {}: its output departs from the job's at byte {same} (got {:?}, want {:?})",
                i + 1,
                starts.len(),
                show(&got, same),
                show(want, same),
            ));
        }
    }
    Ok(())
}

fn instance_number(name: &str) -> Option<usize> {
    name.rsplit('-').next()?.parse().ok()
}

fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Agents of a local fleet still running: each instance directory's
/// `agent.pid`, when that process is alive and is an agent.
fn live_agents(base: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = std::fs::read_to_string(entry.path().join("agent.pid")) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| contains(&c, b"servitor-agent"));
        if alive && ours {
            out.push((entry.file_name().to_string_lossy().into_owned(), pid));
        }
    }
    out.sort();
    out
}

/// Job containers agents left behind when they were killed: those with
/// an agent's label created since the soak started.
async fn remove_job_containers(since: i64) {
    let Ok(docker) = bollard::Docker::connect_with_local_defaults() else {
        return;
    };
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![servitor_agent::executor::docker::LABEL_AGENT.to_owned()],
    )]);
    let Ok(list) = docker
        .list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
    else {
        return;
    };
    for c in list {
        if c.created.unwrap_or(0) < since {
            continue;
        }
        if let Some(id) = c.id {
            let _ = docker
                .remove_container(
                    &id,
                    Some(
                        bollard::query_parameters::RemoveContainerOptionsBuilder::new()
                            .force(true)
                            .build(),
                    ),
                )
                .await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn expected(output: &[u8]) -> Expected {
        Expected {
            tag: 7,
            output: output.to_vec(),
            secret: "soak000000000000".to_owned(),
        }
    }

    fn section(n: u32) -> String {
        format!("section_start:1700000000:servitor_attempt_{n}\r\x1b[0K")
    }

    #[test]
    fn a_whole_last_attempt_after_a_cut_one_passes() {
        let trace = format!(
            "{}$ printf ...\nBEGIN-7\nline 1\n\n\x1b[33;1mAttempt 1 stopped\x1b[0;m\n{}$ printf ...\nBEGIN-7\nline 1\nline 2\nEND-7\nsection_end:1:x\r\x1b[0K",
            section(1),
            section(2)
        );
        check_output(
            trace.as_bytes(),
            &expected(b"BEGIN-7\nline 1\nline 2\nEND-7"),
        )
        .unwrap();
        assert_eq!(attempts_in(trace.as_bytes()), 2);
    }

    #[test]
    fn runner_lines_amid_the_output_and_a_cut_inside_a_secret_pass() {
        let e = Expected {
            tag: 7,
            output: b"BEGIN-7\nsecret=[MASKED]\npart whole\nEND-7".to_vec(),
            secret: "soak0123456789ab".to_owned(),
        };
        let trace = format!(
            "{}BEGIN-7\nsecret=soak0123\n\x1b[0;33mAttempt 1 stopped\x1b[0;m\n{}BEGIN-7\nsecret=[MASKED]\npart\x1b[0;33mThe coordinator restarted; the job goes on.\x1b[0;m\n whole\nEND-7section_end:1:step_script\r\x1b[0K",
            section(1),
            section(2)
        );
        check_output(trace.as_bytes(), &e).unwrap();
        // Not a prefix of the secret: a leak of something else.
        let trace = format!(
            "{}BEGIN-7\nsecret=XXXX\n{}BEGIN-7\nsecret=[MASKED]\npart whole\nEND-7",
            section(1),
            section(2)
        );
        assert!(check_output(trace.as_bytes(), &e).is_err());
    }

    #[test]
    fn a_log_cut_at_the_output_limit_holds_a_prefix() {
        let e = expected(b"BEGIN-7\nline 1\nline 2\nEND-7");
        let trace = format!(
            "{}BEGIN-7\nline 1\n\x1b[33;1mJob's log exceeded limit of 4194304 bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
            section(1)
        );
        check_output(trace.as_bytes(), &e).unwrap();
        let trace = format!("{}BEGIN-7\nline 1\n", section(1));
        assert!(check_output(trace.as_bytes(), &e).is_err());
    }

    #[test]
    fn a_lost_byte_in_the_last_attempt_is_found() {
        let trace = format!("{}BEGIN-7\nline 1\nine 2\nEND-7", section(1));
        let e = check_output(
            trace.as_bytes(),
            &expected(b"BEGIN-7\nline 1\nline 2\nEND-7"),
        )
        .unwrap_err();
        assert!(e.contains("differs"), "{e}");
    }

    #[test]
    fn a_cut_attempt_with_foreign_bytes_is_found() {
        let trace = format!(
            "{}BEGIN-7\nline 1\nXXX\n{}BEGIN-7\nline 1\nline 2\nEND-7",
            section(1),
            section(2)
        );
        let e = check_output(
            trace.as_bytes(),
            &expected(b"BEGIN-7\nline 1\nline 2\nEND-7"),
        )
        .unwrap_err();
        assert!(e.contains("attempt 1 of 2"), "{e}");
    }

    #[test]
    fn the_same_seed_draws_the_same_jobs() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|tag| draw_job(&mut rng, tag).1.output)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }
}
