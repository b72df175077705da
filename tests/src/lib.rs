//! The end-to-end harness: a GitLab stand-in over real HTTP, the real
//! coordinator started in process through the same `start` the binary uses,
//! and real agent processes (the built `servitor-agent` binary) that dial it
//! over QUIC with mutual TLS and run jobs in the real Docker engine.
//!
//! A prerequisite that is missing (Docker, the job image, the agent binary)
//! fails the test with a message naming it; nothing passes silently.

pub mod aws;
pub mod config;
pub mod demo;
pub mod fargate;
pub mod soak;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use servitor_coordinator::config::{ExecutorChoice, RunnerConfig};
use servitor_coordinator::{Coordinator, StartOptions};
use servitor_testkit::gitlab::{JobRecord, StandIn, StandInConfig};
use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};
use tokio_util::sync::CancellationToken;

pub use servitor_testkit::wait_until;

/// The job image tests run in, built from the host's static busybox.
pub const TEST_IMAGE: &str = "servitor-test-job:latest";

/// The service image tests start beside jobs (HTTP on
/// `servitor_testkit::image::SERVICE_PORT`).
pub const SERVICE_IMAGE: &str = "servitor-test-service:latest";

/// The `p`-th percentile (0.0 to 1.0) of sorted samples, nearest rank;
/// for the bench binaries.
///
/// # Panics
/// On no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Waits until the fleet has shown two reconcile passes more than now:
/// the second started after this call, so whatever it would decide from
/// what holds now has been decided and done. For tests that show that
/// nothing happens.
///
/// # Errors
/// The passes did not come within 30 s (a pass runs at least every 2 s).
pub async fn two_fleet_passes(view: &servitor_coordinator::fleet::FleetView) -> anyhow::Result<()> {
    let start = view.summary().passes;
    wait_until(
        "two fleet reconcile passes",
        Duration::from_secs(30),
        || view.summary().passes >= start + 2,
    )
    .await?;
    Ok(())
}

/// Test logs on stderr when `RUST_LOG` asks for them.
pub fn init_tracing() {
    servitor_runtime::telemetry::init(servitor_runtime::telemetry::LogFormat::Plain, "warn");
}

/// The built agent binary. `tests/run.sh` builds it before the tests.
///
/// # Errors
/// Names the build command when it is missing.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir
            .parent()
            .context("test binary has no target directory")?;
    }
    let agent = dir.join("servitor-agent");
    if !agent.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build --workspace --bins` (tests/run.sh does)",
            agent.display()
        );
    }
    Ok(agent)
}

/// Runs git in `dir` as a test author, failing with git's message.
///
/// # Errors
/// When git cannot run or fails.
pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .context("running git")?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A git repository holding `files` (path, contents) in one commit on
/// `main`, for jobs to fetch.
///
/// # Errors
/// When a file cannot be written or git fails, with git's message.
pub fn git_repository(files: &[(&str, &str)]) -> anyhow::Result<tempfile::TempDir> {
    let repo = tempfile::tempdir().context("creating a repository directory")?;
    git(repo.path(), &["init", "-q", "-b", "main"])?;
    for (path, contents) in files {
        std::fs::write(repo.path().join(path), contents)
            .with_context(|| format!("writing {path}"))?;
        git(repo.path(), &["add", path])?;
    }
    git(repo.path(), &["commit", "-q", "-m", "first"])?;
    Ok(repo)
}

/// The built coordinator binary.
///
/// # Errors
/// Names the build command when it is missing.
pub fn coordinator_binary() -> anyhow::Result<PathBuf> {
    let agent = agent_binary()?;
    let coordinator = agent.with_file_name("servitor-coordinator");
    if !coordinator.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build --workspace --bins` (tests/run.sh does)",
            coordinator.display()
        );
    }
    Ok(coordinator)
}

/// Makes sure Docker answers and the test job image exists.
///
/// # Errors
/// Names what is missing: the engine, or a static busybox to build the image.
pub async fn ensure_test_image() -> anyhow::Result<()> {
    use servitor_agent::executor::docker::{DockerConfig, DockerExecutor};
    use servitor_testkit::image::ensure_local_image;
    let docker = DockerExecutor::connect(DockerConfig::default())
        .await
        .context("these tests need the Docker engine")?;
    ensure_local_image(docker.client(), TEST_IMAGE)
        .await
        .context("these tests need the job image (Debian's busybox-static on the host)")?;
    Ok(())
}

/// Makes sure the service image exists, and returns a Docker client for
/// looking at what jobs leave behind.
///
/// # Errors
/// As [`ensure_test_image`].
pub async fn ensure_service_image() -> anyhow::Result<servitor_agent::executor::DockerExecutor> {
    use servitor_agent::executor::docker::{DockerConfig, DockerExecutor};
    let docker = DockerExecutor::connect(DockerConfig::default())
        .await
        .context("these tests need the Docker engine")?;
    servitor_testkit::image::ensure_service_image(docker.client(), SERVICE_IMAGE)
        .await
        .context("these tests need the service image (Debian's busybox-static on the host)")?;
    Ok(docker)
}

/// Knobs of one harness.
#[derive(Clone, Debug)]
pub struct HarnessOptions {
    /// `docker` or `shell`.
    pub executor: &'static str,
    pub concurrent: u32,
    pub max_instances: u32,
    pub capacity_per_instance: u32,
    pub idle_count: u32,
    pub idle_time: Duration,
    pub lost_grace: Duration,
    pub max_attempts: u32,
    pub standin: StandInConfig,
    /// Instance metadata stand-ins to start, one per local instance in
    /// launch order.
    pub imds_instances: usize,
    /// Put a UDP relay the test controls between agents and coordinator.
    pub relay: bool,
    /// Changes to the configuration beyond these knobs (`max_use_count`,
    /// `[[fleet.policy]]` blocks…), made on the typed configuration.
    pub configure: config::Tweak,
    /// Several runners instead of one: each a `[[runners]]` block with the
    /// token given (which the stand-in must accept) and a local fleet made
    /// from the knobs above, applied before `configure`.
    pub runners: Vec<TestRunner>,
}

/// A runner of a harness with several.
#[derive(Clone, Debug)]
pub struct TestRunner {
    pub name: String,
    pub token: String,
    /// Its fleet's most instances.
    pub max_instances: u32,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        Self {
            executor: "docker",
            concurrent: 4,
            max_instances: 2,
            capacity_per_instance: 2,
            idle_count: 0,
            idle_time: Duration::from_secs(300),
            lost_grace: Duration::from_secs(30),
            max_attempts: 3,
            standin: StandInConfig::default(),
            imds_instances: 0,
            relay: false,
            configure: config::Tweak::default(),
            runners: Vec::new(),
        }
    }
}

/// A GitLab stand-in and a coordinator with its local fleet.
#[derive(Debug)]
pub struct Harness {
    pub standin: StandIn,
    pub coordinator: Option<Coordinator>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Instance metadata stand-ins: `imds[0]` serves `local-1`, and so on.
    pub imds: Vec<ImdsStandIn>,
    /// The relay agents dial through, when asked for.
    pub relay: Option<UdpRelay>,
    shutdown: CancellationToken,
}

impl Harness {
    /// Starts the stand-in and the coordinator.
    ///
    /// # Errors
    /// Any prerequisite or start failure, named.
    pub async fn start(options: HarnessOptions) -> anyhow::Result<Self> {
        init_tracing();
        if options.executor == "docker" {
            ensure_test_image().await?;
        }
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let standin = StandIn::start(options.standin.clone())
            .await
            .context("starting the GitLab stand-in")?;
        let token = options
            .standin
            .runner_tokens
            .first()
            .cloned()
            .unwrap_or_default();
        std::fs::write(dir.path().join(config::RUNNER_TOKEN_FILE), token)?;
        std::fs::write(
            dir.path().join(config::JOIN_TOKEN_FILE),
            "test-join-token-0123456789",
        )?;
        let mut config = config::local(dir.path(), &standin.url(), "127.0.0.1:0".parse()?);
        config.concurrent = options.concurrent;
        config.max_attempts = options.max_attempts;
        config.agents.lost_grace = options.lost_grace;
        config.fleet_mut().capacity_per_instance = options.capacity_per_instance;
        config.fleet_mut().max_instances = options.max_instances;
        config.fleet_mut().idle_count = options.idle_count;
        config.fleet_mut().idle_time = options.idle_time;
        config.fleet_mut().local.executor = match options.executor {
            "shell" => ExecutorChoice::Shell,
            _ => ExecutorChoice::Docker,
        };
        config.fleet_mut().local.default_image = Some(TEST_IMAGE.to_owned());
        if !options.runners.is_empty() {
            config.gitlab.token_file = None;
            let fleet = config.fleet.take().context("a one-runner configuration")?;
            for runner in &options.runners {
                let token_file = dir.path().join(format!("runner-token-{}", runner.name));
                std::fs::write(&token_file, &runner.token)?;
                let mut fleet = fleet.clone();
                fleet.max_instances = runner.max_instances;
                config.runners.push(RunnerConfig {
                    name: runner.name.clone(),
                    token_file,
                    url: None,
                    concurrent: None,
                    fleet,
                });
            }
        }
        options.configure.apply(&mut config);
        let config_path = dir.path().join("coordinator.toml");
        let config = config::write(&config_path, &config)?;
        let secrets = config.load_secrets()?;
        let mut imds = Vec::new();
        for n in 1..=options.imds_instances {
            imds.push(
                ImdsStandIn::start(InstanceSpec {
                    instance_id: format!("i-0local{n:04}"),
                    ..InstanceSpec::default()
                })
                .await
                .context("starting an instance metadata stand-in")?,
            );
        }
        let relay = if options.relay {
            Some(UdpRelay::start().await?)
        } else {
            None
        };
        let shutdown = CancellationToken::new();
        let agent = agent_binary()?;
        let coordinator = servitor_coordinator::start(
            config,
            secrets,
            StartOptions {
                agent_command: Some(vec![agent.display().to_string()]),
                local_imds_endpoints: imds.iter().map(ImdsStandIn::url).collect(),
                local_dial_addr: relay.as_ref().map(UdpRelay::addr),
            },
            shutdown.clone(),
        )
        .await
        .context("starting the coordinator")?;
        if let Some(relay) = &relay {
            relay.set_target(coordinator.link_addr);
        }
        Ok(Self {
            standin,
            coordinator: Some(coordinator),
            dir,
            config_path,
            imds,
            relay,
            shutdown,
        })
    }

    /// The running coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        self.coordinator
            .as_ref()
            .expect("the coordinator runs until the harness is stopped")
    }

    /// Waits for a job's final state, with its log in the error if it does
    /// not get there.
    ///
    /// # Errors
    /// Timeout, with the job's state and log so far.
    pub async fn wait_final(&self, job_id: i64, timeout: Duration) -> anyhow::Result<JobRecord> {
        match self.standin.wait_for_final(job_id, timeout).await {
            Ok(record) => Ok(record),
            Err(e) => {
                let record = self.standin.job(job_id);
                bail!(
                    "{e}; job is {:?}, log so far:\n{}\nagent logs:\n{}",
                    record.as_ref().map(|r| r.state),
                    record.map(|r| r.trace_text()).unwrap_or_default(),
                    self.agent_logs()
                )
            }
        }
    }

    /// Waits until the job's log contains `text`.
    ///
    /// # Errors
    /// Timeout, with the log so far.
    pub async fn wait_trace(
        &self,
        job_id: i64,
        text: &str,
        timeout: Duration,
    ) -> anyhow::Result<JobRecord> {
        let wanted = text.to_owned();
        match self
            .standin
            .wait_for(job_id, "a line in the log", timeout, move |r| {
                r.trace_text().contains(&wanted)
            })
            .await
        {
            Ok(r) => Ok(r),
            Err(e) => bail!(
                "{e} ({text:?}); log so far:\n{}\nagent logs:\n{}",
                self.standin
                    .job(job_id)
                    .map(|r| r.trace_text())
                    .unwrap_or_default(),
                self.agent_logs()
            ),
        }
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to a local
    /// instance's agent process.
    ///
    /// # Errors
    /// The instance is not running, or `kill` failed.
    pub fn signal_agent(&self, instance: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .coordinator()
            .local_fleet
            .as_ref()
            .and_then(|f| f.pid(instance))
            .with_context(|| format!("{instance} is not running"))?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// The instance whose agent runs the job's current attempt.
    pub fn instance_of(&self, job_id: i64) -> Option<String> {
        let agent = self
            .coordinator()
            .core
            .jobs()
            .into_iter()
            .find(|j| j.job_id == job_id)?
            .agent?;
        self.coordinator()
            .core
            .agents()
            .into_iter()
            .find(|a| a.agent_id == agent)
            .map(|a| a.instance_id)
    }

    /// The instance metadata stand-in of the instance running the job.
    pub fn imds_of_job(&self, job_id: i64) -> Option<&ImdsStandIn> {
        let instance = self.instance_of(job_id)?;
        let n: usize = instance.strip_prefix("local-")?.parse().ok()?;
        self.imds.get(n.checked_sub(1)?)
    }

    /// Every local agent's stderr, for failure messages.
    pub fn agent_logs(&self) -> String {
        let base = self.dir.path().join("state").join("local-fleet");
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&base) {
            for entry in entries.flatten() {
                let log = entry.path().join("agent.log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    out.push_str(&format!("--- {}\n{text}\n", log.display()));
                }
            }
        }
        out
    }

    /// Stops the coordinator and waits for its tasks.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(c) = self.coordinator.take() {
            c.wait().await;
        }
    }

    /// Stops the coordinator (a clean stop: leases stay) and starts a new
    /// one from the same configuration file and state. Agents find it again
    /// only if the configuration names a fixed `agents.listen` port.
    ///
    /// # Errors
    /// The new coordinator does not start.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.shutdown = CancellationToken::new();
        let config = servitor_coordinator::config::Config::load(&self.config_path)?;
        let secrets = config.load_secrets()?;
        let agent = agent_binary()?;
        // The old link's socket closes once its last connection has gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let started = servitor_coordinator::start(
                config.clone(),
                secrets.clone(),
                StartOptions {
                    agent_command: Some(vec![agent.display().to_string()]),
                    local_imds_endpoints: self.imds.iter().map(ImdsStandIn::url).collect(),
                    local_dial_addr: self.relay.as_ref().map(UdpRelay::addr),
                },
                self.shutdown.clone(),
            )
            .await;
            match started {
                Ok(c) => {
                    self.coordinator = Some(c);
                    return Ok(());
                }
                Err(e)
                    if e.to_string().contains("Address already in use")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("restarting the coordinator"),
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A UDP relay between agents and the coordinator that a test can cut, to
/// drop the link without touching either process.
#[derive(Debug)]
pub struct UdpRelay {
    addr: std::net::SocketAddr,
    target: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    cut: Arc<AtomicBool>,
    /// Handshake packets from agents dropped while cut: each says an agent
    /// is dialling.
    handshakes_dropped: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
}

impl UdpRelay {
    /// Starts a relay on 127.0.0.1; it forwards once a target is set.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub async fn start() -> anyhow::Result<Self> {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let target: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let cut = Arc::new(AtomicBool::new(false));
        let handshakes_dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = CancellationToken::new();
        let relay = Self {
            addr,
            target: target.clone(),
            cut: cut.clone(),
            handshakes_dropped: handshakes_dropped.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(async move {
            // One upstream socket per client, so replies find their way back.
            let mut upstreams: HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> =
                HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, client) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = front.recv_from(&mut buf) => match r { Ok(v) => v, Err(_) => return },
                };
                let Some(to) = *target
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                else {
                    continue;
                };
                if cut.load(Ordering::SeqCst) {
                    // QUIC's long header (the handshake's packets) sets the
                    // first bit; packets of a live connection do not.
                    if n > 0 && buf[0] & 0x80 != 0 {
                        handshakes_dropped.fetch_add(1, Ordering::SeqCst);
                    }
                    continue;
                }
                let upstream = match upstreams.get(&client) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        let u = Arc::new(u);
                        upstreams.insert(client, u.clone());
                        let (u2, front2, cut2, stop2) =
                            (u.clone(), front.clone(), cut.clone(), stop.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                let n = tokio::select! {
                                    () = stop2.cancelled() => return,
                                    r = u2.recv(&mut buf) => match r { Ok(n) => n, Err(_) => return },
                                };
                                if !cut2.load(Ordering::SeqCst) {
                                    let _ = front2.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        let _ = u.connect(to).await;
                        u
                    }
                };
                let _ = upstream.send(&buf[..n]).await;
            }
        });
        Ok(relay)
    }

    /// The address agents dial.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Where datagrams go.
    pub fn set_target(&self, target: std::net::SocketAddr) {
        *self
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(target);
    }

    /// Drops every datagram both ways until [`UdpRelay::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Handshake packets agents sent while the relay was cut: one shows an
    /// agent is dialling (and, the handshake lost, waits in that dial).
    pub fn handshakes_dropped(&self) -> u64 {
        self.handshakes_dropped.load(Ordering::SeqCst)
    }

    /// Lets datagrams through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A coordinator running as its own process (`servitor-coordinator run`),
/// so tests can kill it for real.
#[derive(Debug)]
pub struct CoordinatorProcess {
    pub child: tokio::process::Child,
}

impl CoordinatorProcess {
    /// Starts `servitor-coordinator --config <config> run`, appending its
    /// stderr to `log`.
    ///
    /// # Errors
    /// The binary is missing or does not start.
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> anyhow::Result<Self> {
        Self::start_binary(&coordinator_binary()?, config, log)
    }

    /// Like [`Self::start`], with another build of the coordinator.
    ///
    /// # Errors
    /// The binary does not start.
    pub fn start_binary(
        binary: &std::path::Path,
        config: &std::path::Path,
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = tokio::process::Command::new(binary)
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child })
    }

    /// `kill -9`: no shutdown code runs, agents keep running.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// A clean stop (SIGTERM): the coordinator stops its local agents too.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// Knobs of [`process_config_with`].
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// Listen on a UDP port chosen now, the same at every start, so agents
    /// find a restarted coordinator again; `false` listens on port 0, a new
    /// port at every start, so agents started before a restart dial a port
    /// nobody listens on.
    pub fixed_port: bool,
    pub lost_grace: Duration,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            fixed_port: true,
            lost_grace: Duration::from_secs(30),
        }
    }
}

/// Writes a configuration for a coordinator process (one local shell
/// agent, a fixed UDP port so agents can find it again after a restart)
/// and the token files. Returns the configuration path and the log path.
///
/// # Errors
/// Files cannot be written or the binaries are missing.
pub fn process_config(
    dir: &std::path::Path,
    gitlab_url: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    process_config_with(dir, gitlab_url, &ProcessOptions::default())
}

/// Like [`process_config`], with the given knobs.
///
/// # Errors
/// Files cannot be written or the binaries are missing.
pub fn process_config_with(
    dir: &std::path::Path,
    gitlab_url: &str,
    options: &ProcessOptions,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::write(
        dir.join(config::RUNNER_TOKEN_FILE),
        servitor_testkit::gitlab::DEFAULT_RUNNER_TOKEN,
    )?;
    std::fs::write(dir.join(config::JOIN_TOKEN_FILE), "process-test-join-token")?;
    let port = if options.fixed_port {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        0
    };
    let mut config = config::local(dir, gitlab_url, SocketAddr::from(([127, 0, 0, 1], port)));
    config.concurrent = 2;
    config.agents.lost_grace = options.lost_grace;
    config.fleet_mut().local.executor = ExecutorChoice::Shell;
    // No agent_command: the coordinator finds servitor-agent beside itself.
    agent_binary()?;
    let path = dir.join("coordinator.toml");
    config::write(&path, &config)?;
    Ok((path, dir.join("coordinator.log")))
}

/// One `/proc/<pid>/status` figure, in KiB (or a count, as `Threads:`).
///
/// # Errors
/// The process is gone, or the line is missing or malformed.
pub fn proc_status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} line"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("malformed {key} line"))?
        .parse()?)
}

/// Whether a process runs (a zombie does not).
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// The workspace's root directory (the tests crate sits one level below).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate has a parent directory")
        .to_path_buf()
}

/// A finished command's exit code and output, for failure messages.
pub fn describe_output(output: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a user-data script as a test may: writing under `etc`, without
/// root or systemd, with only the variables given (none of the ones it
/// reads inherited from whoever runs the tests).
pub fn run_user_data(script: &Path, etc: &Path, vars: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new("bash");
    command
        .arg(script)
        .env("SERVITOR_ETC", etc)
        .env("SERVITOR_NO_SYSTEMCTL", "1");
    for name in [
        "COORDINATOR",
        "CA_SHA256",
        "ENROLL",
        "JOIN_TOKEN",
        "CAPACITY",
        "DEFAULT_IMAGE",
    ] {
        command.env_remove(name);
    }
    for (name, value) in vars {
        command.env(name, value);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running bash {}: {e}", script.display()))
}
