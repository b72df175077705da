//! How far one coordinator scales: many simulated agents in this process,
//! each enrolled with the join token and holding its own client
//! certificate, each on its own QUIC connection with mutual TLS, against
//! the real `servitor-coordinator` binary taking jobs from the GitLab
//! stand-in over HTTP.
//!
//! The simulated agents speak the agent protocol as the real agent does
//! (hello, heartbeats at the coordinator's pace, started, each attempt's
//! output on a stream of its own, finished, pull) but run nothing: a job
//! ends at once, or after streaming a set amount of output.
//!
//! For each agent count it reports, in phases:
//! 1. connect: every agent enrolled and connected, and how long it took;
//! 2. idle: agents connected and heartbeating, the coordinator's RSS and CPU;
//! 3. dispatch: jobs taken from GitLab, assigned, finished and reported per
//!    second over the window, with the p50/p99 time from GitLab handing a
//!    job out to its agent getting the assignment;
//! 4. trace: aggregate job output reaching GitLab per second.
//!
//! Build the coordinator with release optimisations, then run:
//! `cargo build --profile scale --workspace --bins &&
//!  target/scale/servitor-scale-bench --agents 1000,5000`
//! (`--perf <file>` records a CPU profile of the coordinator during the
//! dispatch window with `perf`, `--perf-trace <file>` during the trace
//! window; `--coordinator <path>` measures another
//! build of the coordinator).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use servitor_agent::link::{connect, CaTrust, LinkSettings};
use servitor_coordinator::config::{ExecutorChoice, MetricsConfig};
use servitor_proto::agent::{
    agent_message, coordinator_message, AgentMessage, AttemptRef, CoordinatorMessage, Finished,
    Heartbeat, Hello, InstanceFacts, Outcome, OutputHeader, Pull, Started,
};
use servitor_proto::frame::{write_frame, FrameReader};
use servitor_runtime::secret::Secret;
use servitor_testkit::gitlab::{JobSpec, StandIn, StandInConfig, DEFAULT_RUNNER_TOKEN};
use servitor_tests::{
    config, coordinator_binary, percentile, proc_status_kib, process_running, CoordinatorProcess,
};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Knobs, from the command line.
#[derive(Clone, Debug)]
struct Options {
    agents: Vec<usize>,
    capacity: u32,
    idle: Duration,
    dispatch: Duration,
    trace: Duration,
    trace_bytes_per_job: usize,
    connect_concurrency: usize,
    perf: Option<PathBuf>,
    perf_trace: Option<PathBuf>,
    coordinator: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            agents: vec![1000, 5000],
            capacity: 1,
            idle: Duration::from_secs(20),
            dispatch: Duration::from_secs(60),
            trace: Duration::from_secs(30),
            trace_bytes_per_job: 1 << 20,
            connect_concurrency: 64,
            perf: None,
            perf_trace: None,
            coordinator: None,
        }
    }
}

const USAGE: &str = "usage: servitor-scale-bench [--agents 1000,5000] [--capacity 1] \
[--idle-secs 20] [--dispatch-secs 60] [--trace-secs 30] [--trace-mib-per-job 1] \
[--connect-concurrency 64] [--perf <perf.data>] [--perf-trace <perf.data>] [--coordinator <binary>]";

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut options = Self::default();
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
            let secs = |v: &str| -> anyhow::Result<Duration> {
                Ok(Duration::from_secs(v.parse().with_context(|| {
                    format!("{flag} {v:?} is not a number of seconds")
                })?))
            };
            match flag.as_str() {
                "--agents" => {
                    options.agents = value
                        .split(',')
                        .map(|n| n.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .with_context(|| {
                            format!("--agents {value:?}: give numbers, e.g. 1000,5000")
                        })?;
                }
                "--capacity" => options.capacity = value.parse().context("--capacity")?,
                "--idle-secs" => options.idle = secs(&value)?,
                "--dispatch-secs" => options.dispatch = secs(&value)?,
                "--trace-secs" => options.trace = secs(&value)?,
                "--trace-mib-per-job" => {
                    let mib: usize = value.parse().context("--trace-mib-per-job")?;
                    options.trace_bytes_per_job = mib << 20;
                }
                "--connect-concurrency" => {
                    options.connect_concurrency = value.parse().context("--connect-concurrency")?;
                }
                "--perf" => options.perf = Some(PathBuf::from(value)),
                "--perf-trace" => options.perf_trace = Some(PathBuf::from(value)),
                "--coordinator" => options.coordinator = Some(PathBuf::from(value)),
                _ => bail!("unknown option {flag}; {USAGE}"),
            }
        }
        if options.agents.is_empty() || options.agents.contains(&0) {
            bail!("--agents needs at least one agent");
        }
        if options.capacity == 0 {
            bail!("--capacity must be at least 1");
        }
        Ok(options)
    }
}

/// What the simulated agents do with a job.
#[derive(Clone, Copy, Debug)]
enum Work {
    /// Finish at once with no output.
    Instant,
    /// Stream this many bytes of output, then finish.
    Output(usize),
}

/// Output is written in pieces of about this size, as the real agent's
/// executors read it.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// Shared by every simulated agent.
#[derive(Debug)]
struct Fleet {
    work: Mutex<Work>,
    connected: AtomicU64,
    lost: AtomicU64,
    heartbeats: AtomicU64,
    /// When each assignment arrived, by job id.
    arrivals: Mutex<Vec<(i64, Instant)>>,
    /// What a job streams, chunk after chunk: lines of text.
    chunk: Bytes,
}

impl Fleet {
    fn new() -> Self {
        let mut line = b"0123456789abcdefghijklmnopqrstuvwxyz ".repeat(3);
        line.push(b'\n');
        Self {
            work: Mutex::new(Work::Instant),
            connected: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            arrivals: Mutex::new(Vec::new()),
            chunk: Bytes::from(line.repeat(OUTPUT_CHUNK / line.len())),
        }
    }

    fn work(&self) -> Work {
        *self
            .work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_work(&self, work: Work) {
        *self
            .work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = work;
    }

    fn take_arrivals(&self) -> Vec<(i64, Instant)> {
        std::mem::take(
            &mut *self
                .arrivals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

fn msg(m: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

/// One simulated agent: enrolls, connects, and serves jobs until `stop`.
async fn run_agent(
    settings: LinkSettings,
    capacity: u32,
    fleet: Arc<Fleet>,
    stop: CancellationToken,
    connecting: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let link = match connect(&settings).await {
        Ok(link) => link,
        Err(e) => {
            if fleet.lost.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("agent {} could not connect: {e}", settings.agent_name);
            }
            return Err(e.into());
        }
    };
    let connection = link.connection;
    let (mut send, recv) = connection.open_bi().await?;
    let mut frames = FrameReader::new(recv);
    let hello = Hello {
        protocol_version: servitor_proto::link::PROTOCOL_VERSION,
        agent_name: settings.agent_name.clone(),
        instance: Some(InstanceFacts {
            instance_id: settings.agent_name.clone(),
            instance_type: "sim".into(),
            availability_zone: "local".into(),
            market: "spot".into(),
            hostname: settings.agent_name.clone(),
        }),
        capacity,
        free_slots: capacity,
        running: Vec::new(),
        executor: "simulated".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        reporting: Vec::new(),
        runner: String::new(),
    };
    write_frame(&mut send, &msg(agent_message::Msg::Hello(hello))).await?;
    fleet.connected.fetch_add(1, Ordering::Relaxed);
    drop(connecting);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
    let mut heartbeat = tokio::time::interval(servitor_proto::link::HEARTBEAT_INTERVAL);
    heartbeat.reset();
    let mut sequence = 0u64;
    let mut free = capacity;
    let result = loop {
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            _ = heartbeat.tick() => {
                sequence += 1;
                write_frame(&mut send, &msg(agent_message::Msg::Heartbeat(Heartbeat { sequence }))).await?;
                fleet.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Some(finished) = done_rx.recv() => {
                write_frame(&mut send, &msg(agent_message::Msg::Finished(finished))).await?;
                free += 1;
                write_frame(&mut send, &msg(agent_message::Msg::Pull(Pull { free_slots: free }))).await?;
            }
            frame = frames.next::<CoordinatorMessage>() => {
                let message = match frame {
                    Ok(Some(m)) => m,
                    Ok(None) => break Err(anyhow::anyhow!("coordinator closed the control stream")),
                    Err(e) => break Err(e.into()),
                };
                match message.msg {
                    Some(coordinator_message::Msg::Welcome(welcome)) => {
                        if welcome.heartbeat_interval_ms > 0 {
                            let every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms));
                            heartbeat = tokio::time::interval_at(Instant::now() + every, every);
                        }
                    }
                    Some(coordinator_message::Msg::Assign(assign)) => {
                        let Some(attempt) = assign.attempt else { continue };
                        fleet
                            .arrivals
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((attempt.job_id, Instant::now()));
                        free = free.saturating_sub(1);
                        write_frame(&mut send, &msg(agent_message::Msg::Started(Started { attempt: Some(attempt) }))).await?;
                        tokio::spawn(run_attempt(connection.clone(), attempt, fleet.clone(), done_tx.clone()));
                    }
                    Some(
                        coordinator_message::Msg::Ack(_)
                        | coordinator_message::Msg::Cancel(_)
                        | coordinator_message::Msg::Drain(_)
                        | coordinator_message::Msg::Heartbeat(_)
                        | coordinator_message::Msg::Renewed(_),
                    )
                    | None => {}
                }
            }
        }
    };
    fleet.connected.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = &result {
        if !stop.is_cancelled() && fleet.lost.fetch_add(1, Ordering::Relaxed) < 3 {
            let why = connection
                .close_reason()
                .map_or_else(|| "still open".to_owned(), |r| r.to_string());
            eprintln!("agent {} lost its link: {e} ({why})", settings.agent_name);
        }
    }
    let _ = send.finish();
    connection.close(0u32.into(), b"bye");
    result
}

/// One attempt: its output on a stream of its own (as the real agent
/// sends it), then its result.
async fn run_attempt(
    connection: quinn::Connection,
    attempt: AttemptRef,
    fleet: Arc<Fleet>,
    done: mpsc::UnboundedSender<Finished>,
) {
    let mut sent = 0u64;
    if let Ok(mut stream) = connection.open_uni().await {
        let header = OutputHeader {
            attempt: Some(attempt),
            offset: 0,
        };
        if write_frame(&mut stream, &header).await.is_ok() {
            if let Work::Output(total) = fleet.work() {
                while (sent as usize) < total {
                    let n = fleet.chunk.len().min(total - sent as usize);
                    if stream.write_chunk(fleet.chunk.slice(..n)).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                }
            }
            let _ = stream.finish();
            // As the real agent: let the coordinator take the tail first.
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.stopped()).await;
        }
    }
    let _ = done.send(Finished {
        attempt: Some(attempt),
        outcome: Outcome::Success.into(),
        output_bytes: sent,
        ..Finished::default()
    });
}

/// Runs `measure` while `perf` records the process `pid` into `path`, if
/// one is named.
async fn profiled<T>(
    path: Option<&Path>,
    pid: u32,
    measure: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let Some(path) = path else {
        return measure.await;
    };
    let mut perf = tokio::process::Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o"])
        .arg(path)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting perf (install linux-perf, or drop --perf)")?;
    let measured = measure.await;
    if let Some(perf_pid) = perf.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf_pid.to_string()])
            .status();
    }
    let _ = perf.wait().await;
    measured
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    /// User + system CPU time.
    cpu: Duration,
    rss_kib: u64,
    peak_rss_kib: u64,
    threads: u64,
}

fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; the list starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = 100; // USER_HZ on Linux
    Ok(ProcSample {
        cpu: Duration::from_millis(ticks * 1000 / hz),
        rss_kib: proc_status_kib(pid, "VmRSS:")?,
        peak_rss_kib: proc_status_kib(pid, "VmHWM:")?,
        threads: proc_status_kib(pid, "Threads:")?,
    })
}

/// CPU use between two samples, in percent of one core.
fn cpu_percent(before: ProcSample, after: ProcSample, over: Duration) -> f64 {
    let used = after.cpu.saturating_sub(before.cpu);
    100.0 * used.as_secs_f64() / over.as_secs_f64()
}

/// What a measuring window saw: how fast a count grew, and the
/// coordinator's CPU use (percent of one core) and memory at its end.
struct Window {
    per_sec: f64,
    cpu: f64,
    end: ProcSample,
}

/// Measures for `over`: `count` before and after, and the coordinator.
async fn window(pid: u32, over: Duration, count: impl Fn() -> u64) -> anyhow::Result<Window> {
    let (from, before) = (count(), proc_sample(pid)?);
    let t0 = Instant::now();
    tokio::time::sleep(over).await;
    let took = t0.elapsed();
    let end = proc_sample(pid)?;
    let grown = count().saturating_sub(from);
    Ok(Window {
        per_sec: grown as f64 / took.as_secs_f64(),
        cpu: cpu_percent(before, end, took),
        end,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The coordinator under test.
struct Coordinator {
    process: CoordinatorProcess,
    pid: u32,
    addr: String,
    ca_pem: String,
    log: PathBuf,
}

async fn start_coordinator(
    dir: &Path,
    standin: &StandIn,
    options: &Options,
    agents: usize,
) -> anyhow::Result<Coordinator> {
    std::fs::write(dir.join(config::RUNNER_TOKEN_FILE), DEFAULT_RUNNER_TOKEN)?;
    std::fs::write(dir.join(config::JOIN_TOKEN_FILE), "scale-bench-join-token")?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut cfg = config::local(dir, &standin.url(), listen);
    let slots = u32::try_from(agents)?.saturating_mul(options.capacity);
    cfg.concurrent = slots;
    cfg.metrics = MetricsConfig::default();
    // The simulated agents are not instances of the local fleet. The fleet
    // is held at one placeholder instance that never joins (demand always
    // asks for one), so it starts no real agent.
    cfg.fleet_mut().max_instances = 1;
    cfg.fleet_mut().max_launches = 1;
    cfg.fleet_mut().launch_window = Duration::from_secs(24 * 3600);
    cfg.fleet_mut().boot_timeout = Duration::from_secs(24 * 3600);
    cfg.fleet_mut().local.executor = ExecutorChoice::Shell;
    cfg.fleet_mut().local.agent_command = vec!["sh".into(), "-c".into(), "exec sleep 86400".into()];
    let path = dir.join("coordinator.toml");
    config::write(&path, &cfg)?;
    let binary = match &options.coordinator {
        Some(path) => path.clone(),
        None => coordinator_binary()?,
    };
    let log = dir.join("coordinator.log");
    let process = CoordinatorProcess::start_binary(&binary, &path, &log)?;
    let pid = process
        .child
        .id()
        .context("the coordinator exited at once")?;
    let ca_path = cfg.state_dir.join("ca.pem");
    let ready = || {
        std::fs::metadata(&ca_path).is_ok_and(|m| m.len() > 0)
            && standin.verify_log().iter().any(|v| v.status == 200)
    };
    servitor_tests::wait_until(
        "the coordinator verified and listening",
        Duration::from_secs(60),
        || ready() || !process_running(pid),
    )
    .await?;
    if !process_running(pid) {
        bail!("the coordinator exited; see {}", log.display());
    }
    Ok(Coordinator {
        process,
        pid,
        addr: listen.to_string(),
        ca_pem: std::fs::read_to_string(&ca_path)?,
        log,
    })
}

/// Keeps at least `backlog` jobs pending in GitLab until `stop`.
async fn feed(
    standin: Arc<StandIn>,
    backlog: usize,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let mut pushed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while !stop.is_cancelled() {
        let pending = standin.pending();
        for _ in pending..backlog {
            standin
                .push_job(JobSpec::new(format!("scale-{pushed}")).script(["true"]))
                .await?;
            pushed += 1;
        }
        tick.tick().await;
    }
    Ok(pushed)
}

/// Figures of one agent count.
#[derive(Debug, Default)]
struct Report {
    agents: usize,
    connect: Duration,
    connected: u64,
    lost: u64,
    idle_rss_mib: f64,
    idle_cpu: f64,
    heartbeats_per_sec: f64,
    jobs_per_sec: f64,
    dispatch_cpu: f64,
    dispatch_rss_mib: f64,
    held_to_assigned_p50: Duration,
    held_to_assigned_p99: Duration,
    trace_mb_per_sec: f64,
    trace_cpu: f64,
    peak_rss_mib: f64,
    threads: u64,
}

async fn measure(options: &Options, agents: usize) -> anyhow::Result<Report> {
    let mut report = Report {
        agents,
        ..Report::default()
    };
    let dir = tempfile::tempdir()?;
    let standin = Arc::new(
        StandIn::start(StandInConfig {
            // Traces are sent as fast as the coordinator likes.
            trace_update_interval: 1,
            ..StandInConfig::default()
        })
        .await?,
    );
    let coordinator = start_coordinator(dir.path(), &standin, options, agents).await?;
    let pid = coordinator.pid;
    let fleet = Arc::new(Fleet::new());
    let stop = CancellationToken::new();

    // 1. Connect every agent, a few at a time.
    eprintln!("[{agents}] connecting agents");
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(options.connect_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..agents {
        let settings = LinkSettings::new(
            coordinator.addr.clone(),
            CaTrust::Pem(coordinator.ca_pem.clone()),
            Secret::new("scale-bench-join-token".to_owned()),
            format!("sim-{n:05}"),
        );
        let fleet = fleet.clone();
        let stop = stop.clone();
        let permit = gate.clone().acquire_owned().await?;
        let capacity = options.capacity;
        tasks.spawn(run_agent(settings, capacity, fleet, stop, permit));
    }
    servitor_tests::wait_until("every agent connected", Duration::from_secs(600), || {
        fleet.connected.load(Ordering::Relaxed) >= agents as u64
            || fleet.lost.load(Ordering::Relaxed) > 0
    })
    .await?;
    report.connect = started.elapsed();
    if fleet.lost.load(Ordering::Relaxed) > 0 {
        bail!(
            "agents were lost while connecting; see {}",
            coordinator.log.display()
        );
    }

    // 2. Idle: connected and heartbeating.
    eprintln!("[{agents}] idle for {:?}", options.idle);
    let idle = window(pid, options.idle, || {
        fleet.heartbeats.load(Ordering::Relaxed)
    })
    .await?;
    report.idle_cpu = idle.cpu;
    report.idle_rss_mib = mib(idle.end.rss_kib);
    report.heartbeats_per_sec = idle.per_sec;
    report.connected = fleet.connected.load(Ordering::Relaxed);

    // 3. Dispatch: jobs that end at once, GitLab never empty.
    eprintln!("[{agents}] dispatching for {:?}", options.dispatch);
    fleet.set_work(Work::Instant);
    let feeding = CancellationToken::new();
    let backlog = (agents * options.capacity as usize).clamp(200, 2000);
    let feeder = tokio::spawn(feed(standin.clone(), backlog, feeding.clone()));
    // Let the pipeline fill before the window opens.
    let warm = Duration::from_secs(5);
    tokio::time::sleep(warm).await;
    let _ = fleet.take_arrivals();
    let dispatch = profiled(
        options.perf.as_deref(),
        pid,
        window(pid, options.dispatch, || standin.counts().finished as u64),
    )
    .await?;
    feeding.cancel();
    feeder.await??;
    report.jobs_per_sec = dispatch.per_sec;
    report.dispatch_cpu = dispatch.cpu;
    report.dispatch_rss_mib = mib(dispatch.end.rss_kib);
    let arrivals = fleet.take_arrivals();
    let ids: Vec<i64> = arrivals.iter().map(|(id, _)| *id).collect();
    let handed = standin.handed_out(&ids);
    let mut waits: Vec<Duration> = arrivals
        .iter()
        .zip(handed)
        .filter_map(|((_, arrived), handed)| handed.map(|h| arrived.saturating_duration_since(h)))
        .collect();
    waits.sort();
    if !waits.is_empty() {
        report.held_to_assigned_p50 = percentile(&waits, 0.50);
        report.held_to_assigned_p99 = percentile(&waits, 0.99);
    }
    // Let the queue run dry before the next phase.
    servitor_tests::wait_until(
        "the dispatch backlog done",
        Duration::from_secs(120),
        || {
            let c = standin.counts();
            c.pending == 0 && c.running == 0
        },
    )
    .await?;

    // 4. Trace: every job streams output.
    eprintln!("[{agents}] streaming output for {:?}", options.trace);
    fleet.set_work(Work::Output(options.trace_bytes_per_job));
    let feeding = CancellationToken::new();
    let backlog = (agents * options.capacity as usize).clamp(50, 400);
    let feeder = tokio::spawn(feed(standin.clone(), backlog, feeding.clone()));
    tokio::time::sleep(warm).await;
    let trace = profiled(
        options.perf_trace.as_deref(),
        pid,
        window(pid, options.trace, || standin.counts().trace_bytes),
    )
    .await?;
    feeding.cancel();
    feeder.await??;
    report.trace_mb_per_sec = trace.per_sec / 1e6;
    report.trace_cpu = trace.cpu;
    report.peak_rss_mib = mib(trace.end.peak_rss_kib);
    report.threads = trace.end.threads;
    report.lost = fleet.lost.load(Ordering::Relaxed);

    stop.cancel();
    while tasks.join_next().await.is_some() {}
    coordinator.process.stop().await;
    Ok(report)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    servitor_tests::init_tracing();
    let options = Options::parse()?;
    let mut reports = Vec::new();
    for &agents in &options.agents {
        let report = measure(&options, agents).await?;
        eprintln!("{report:#?}");
        reports.push(report);
    }
    println!("| agents | connect all | coordinator idle RSS / CPU | heartbeats/s | jobs/s (taken → reported) | held → assigned p50 / p99 | CPU while dispatching | trace MB/s | CPU while streaming | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} ({} held, {} lost) | {:.1} s | {:.0} MiB / {:.0} % | {:.0} | {:.0} | {} / {} | {:.0} % | {:.0} | {:.0} % | {:.0} MiB |",
            r.agents,
            r.connected,
            r.lost,
            r.connect.as_secs_f64(),
            r.idle_rss_mib,
            r.idle_cpu,
            r.heartbeats_per_sec,
            r.jobs_per_sec,
            ms(r.held_to_assigned_p50),
            ms(r.held_to_assigned_p99),
            r.dispatch_cpu,
            r.trace_mb_per_sec,
            r.trace_cpu,
            r.peak_rss_mib,
        );
    }
    Ok(())
}
