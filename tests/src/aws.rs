//! The AWS side of the end-to-end harness: moto's server on a free
//! 127.0.0.1 port as the Auto Scaling and EC2 APIs (driven through the real
//! AWS SDK), an Auto Scaling group in it, and an "instance booter" that
//! plays the part of EC2 booting each instance moto creates: it starts a
//! real agent whose instance metadata stand-in reports that instance's id,
//! type and zone, and kills it when the instance leaves the group.
//!
//! moto launches no machines; everything else here is the real thing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_autoscaling::config::{Credentials, Region};
use servitor_agent::config::{AgentConfig, ExecutorKind};
use servitor_coordinator::config::{AwsFleetConfig, FleetProvider};
use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};
use tokio_util::sync::CancellationToken;

/// Region every test works in.
pub const REGION: &str = "us-east-1";
/// The zone the test groups launch into.
pub const ZONE: &str = "us-east-1a";
/// The instance type of the test groups' launch template.
pub const INSTANCE_TYPE: &str = "m5.large";

/// The coordinator under test reads credentials through aws-config's
/// normal chain; the environment is the first link. moto accepts any.
pub fn aws_environment() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Set once, with the same values, before any test reads them; the
        // standard library serialises its own environment access.
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", REGION);
    });
}

/// moto's server, stopped when dropped.
#[derive(Debug)]
pub struct Moto {
    child: tokio::process::Child,
    url: String,
}

/// Where moto's server is: `SERVITOR_MOTO_SERVER`, else `moto_server` on
/// the PATH.
fn moto_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SERVITOR_MOTO_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("moto_server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("moto's server is missing: these tests need `moto_server` (pip install 'moto[server]'); tests/run.sh installs it in a virtual environment and sets SERVITOR_MOTO_SERVER")
}

impl Moto {
    /// Starts moto's server on a free port and waits until it answers.
    ///
    /// # Errors
    /// moto is missing or does not come up.
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let binary = moto_binary()?;
        let child = tokio::process::Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let moto = Self { child, url };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(moto);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("moto's server did not answer on {} within 30s", moto.url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The endpoint URL for both services.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An SDK configuration that reaches this server.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .load()
            .await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// An image id moto knows (the first Amazon one it lists).
///
/// # Errors
/// The call fails, or moto lists no image.
pub async fn moto_image(ec2: &aws_sdk_ec2::Client) -> anyhow::Result<String> {
    let images = ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .context("DescribeImages")?;
    Ok(images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .context("moto lists no images")?
        .to_owned())
}

/// One instance of the group as the test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInstance {
    pub id: String,
    pub lifecycle: String,
    pub protected: bool,
}

/// An Auto Scaling group in moto, and the clients to look at it.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub asg: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
}

impl Group {
    /// A group that already exists in moto (made by a CloudFormation stack,
    /// say).
    pub async fn existing(moto: &Moto, name: &str) -> Self {
        let config = moto.sdk_config().await;
        Self {
            name: name.to_owned(),
            asg: aws_sdk_autoscaling::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
        }
    }

    /// Creates a launch template (`m5.large`, on-demand) and a group using
    /// it in one zone: MinSize 0, the given MaxSize, desired 0.
    ///
    /// # Errors
    /// Any API call fails.
    pub async fn create(moto: &Moto, name: &str, max_size: i32) -> anyhow::Result<Self> {
        let config = moto.sdk_config().await;
        let asg = aws_sdk_autoscaling::Client::new(&config);
        let ec2 = aws_sdk_ec2::Client::new(&config);
        let image = moto_image(&ec2).await?;
        let template = format!("{name}-template");
        ec2.create_launch_template()
            .launch_template_name(&template)
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(image)
                    .instance_type(aws_sdk_ec2::types::InstanceType::from(INSTANCE_TYPE))
                    .build(),
            )
            .send()
            .await
            .context("CreateLaunchTemplate")?;
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_name(&template)
                    .version("$Latest")
                    .build(),
            )
            .availability_zones(ZONE)
            .min_size(0)
            .max_size(max_size)
            .desired_capacity(0)
            .send()
            .await
            .context("CreateAutoScalingGroup")?;
        Ok(Self {
            name: name.to_owned(),
            asg,
            ec2,
        })
    }

    /// Takes an instance out of the group (DetachInstances, lowering the
    /// desired capacity); the instance itself keeps running.
    ///
    /// # Errors
    /// The call fails.
    pub async fn detach(&self, id: &str) -> anyhow::Result<()> {
        self.asg
            .detach_instances()
            .auto_scaling_group_name(&self.name)
            .instance_ids(id)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .context("DetachInstances")?;
        Ok(())
    }

    /// Desired capacity and instances now.
    ///
    /// # Errors
    /// The call fails or the group is gone.
    pub async fn describe(&self) -> anyhow::Result<(i32, Vec<GroupInstance>)> {
        let out = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.name)
            .send()
            .await
            .context("DescribeAutoScalingGroups")?;
        let group = out
            .auto_scaling_groups()
            .first()
            .context("the group is gone")?;
        let instances = group
            .instances()
            .iter()
            .map(|i| GroupInstance {
                id: i.instance_id().unwrap_or_default().to_owned(),
                lifecycle: i
                    .lifecycle_state()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                protected: i.protected_from_scale_in().unwrap_or(false),
            })
            .collect();
        Ok((group.desired_capacity().unwrap_or(0), instances))
    }

    /// Sets the desired capacity as someone other than the coordinator.
    ///
    /// # Errors
    /// The call fails.
    pub async fn set_desired(&self, desired: i32) -> anyhow::Result<()> {
        self.asg
            .set_desired_capacity()
            .auto_scaling_group_name(&self.name)
            .desired_capacity(desired)
            .send()
            .await
            .context("SetDesiredCapacity")?;
        Ok(())
    }

    /// The EC2 state (`running`, `terminated`, ...) of an instance.
    ///
    /// # Errors
    /// The call fails or the instance is unknown.
    pub async fn ec2_state(&self, id: &str) -> anyhow::Result<String> {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .context("DescribeInstances")?;
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .and_then(|i| i.state())
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .with_context(|| format!("no instance {id}"))
    }

    /// Waits until `check` holds for the group, polling it.
    ///
    /// # Errors
    /// Timeout, with the last view of the group.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(i32, &[GroupInstance]) -> bool,
    ) -> anyhow::Result<(i32, Vec<GroupInstance>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (desired, instances) = self.describe().await?;
            if check(desired, &instances) {
                return Ok((desired, instances));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("timed out waiting for {what}; desired {desired}, instances {instances:?}");
            }
            // Often enough for the benchmark's figures to mean something.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How booted agents reach the coordinator and what they run.
#[derive(Clone, Debug)]
pub struct BootSettings {
    pub coordinator: std::net::SocketAddr,
    pub ca_file: PathBuf,
    pub join_token_file: PathBuf,
    /// `docker` or `shell`.
    pub executor: &'static str,
    pub capacity: u32,
    /// What instance metadata says of the market: `spot` or `on-demand`.
    pub market: &'static str,
    /// Instances that never boot (a broken image): the first `n` launched.
    pub broken: usize,
    /// Agents enroll by instance identity, their documents signed by this
    /// key (AWS's, in the test), with no join token on the instance.
    pub identity_signer: Option<Arc<servitor_testkit::iid::IidSigner>>,
}

#[derive(Debug)]
struct Booted {
    child: tokio::process::Child,
    imds: ImdsStandIn,
}

/// Plays EC2: boots an agent for every instance moto puts in the group,
/// and takes it away when the instance leaves.
#[derive(Debug)]
pub struct Booter {
    booted: Arc<Mutex<HashMap<String, Booted>>>,
    /// Where agents booted from now on dial.
    dial: Arc<Mutex<std::net::SocketAddr>>,
    /// Every instance id ever seen, in order, and whether it booted.
    pub seen: Arc<Mutex<Vec<(String, bool)>>>,
    /// Instances detached from the group: their machines run on.
    detached: Arc<Mutex<std::collections::HashSet<String>>>,
    stop: CancellationToken,
    base: PathBuf,
}

impl Booter {
    /// Starts watching the group.
    pub fn start(group: Group, settings: BootSettings, base: &Path) -> Self {
        let booted: Arc<Mutex<HashMap<String, Booted>>> = Arc::default();
        let seen: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let dial = Arc::new(Mutex::new(settings.coordinator));
        let detached: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let stop = CancellationToken::new();
        let booter = Self {
            booted: booted.clone(),
            dial: dial.clone(),
            seen: seen.clone(),
            detached: detached.clone(),
            stop: stop.clone(),
            base: base.to_owned(),
        };
        let base = base.to_owned();
        tokio::spawn(async move {
            loop {
                if let Ok((_, instances)) = group.describe().await {
                    let live: Vec<&GroupInstance> = instances
                        .iter()
                        .filter(|i| {
                            i.lifecycle == "InService" || i.lifecycle.starts_with("Pending")
                        })
                        .collect();
                    // Instances that left the group: their machine is gone,
                    // unless it was only detached.
                    let gone: Vec<String> = {
                        let map = lock(&booted);
                        let detached = lock(&detached);
                        map.keys()
                            .filter(|id| !live.iter().any(|i| &&i.id == id))
                            .filter(|id| !detached.contains(*id))
                            .cloned()
                            .collect()
                    };
                    for id in gone {
                        if let Some(mut b) = lock(&booted).remove(&id) {
                            let _ = b.child.start_kill();
                        }
                    }
                    for i in live {
                        let known = lock(&seen).iter().any(|(id, _)| *id == i.id);
                        if known {
                            continue;
                        }
                        let boots = lock(&seen).len() >= settings.broken;
                        lock(&seen).push((i.id.clone(), boots));
                        if !boots {
                            continue;
                        }
                        let settings = BootSettings {
                            coordinator: *lock(&dial),
                            ..settings.clone()
                        };
                        match boot(&i.id, &settings, &base).await {
                            Ok(b) => {
                                lock(&booted).insert(i.id.clone(), b);
                            }
                            Err(e) => {
                                tracing::error!(instance = %i.id, error = %e, "test booter failed to start an agent")
                            }
                        }
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            for (_, mut b) in lock(&booted).drain() {
                let _ = b.child.start_kill();
            }
        });
        booter
    }

    /// Takes an instance out of the group while its machine, agent and all,
    /// keeps running (as DetachInstances does).
    ///
    /// # Errors
    /// The API call fails.
    pub async fn detach(&self, group: &Group, id: &str) -> anyhow::Result<()> {
        lock(&self.detached).insert(id.to_owned());
        group.detach(id).await
    }

    /// Whether an instance's agent process has exited, and how.
    pub fn exit_status(&self, id: &str) -> Option<std::process::ExitStatus> {
        lock(&self.booted)
            .get_mut(id)
            .and_then(|b| b.child.try_wait().ok().flatten())
    }

    /// Agents booted from now on dial `addr` (a coordinator that moved);
    /// those running keep dialling where they were told at boot.
    pub fn redirect(&self, addr: std::net::SocketAddr) {
        *lock(&self.dial) = addr;
    }

    /// Every booted agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.base) {
            for entry in entries.flatten() {
                let log = entry.path().join("agent.log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    out.push_str(&format!("--- {}\n{text}\n", log.display()));
                }
            }
        }
        out
    }

    /// Makes an instance's metadata announce a Spot interruption.
    ///
    /// # Errors
    /// The instance has no running agent.
    pub fn spot_notice(&self, id: &str) -> anyhow::Result<()> {
        let booted = lock(&self.booted);
        let b = booted
            .get(id)
            .with_context(|| format!("{id} has no running agent"))?;
        b.imds
            .set_spot_action("terminate", Duration::from_secs(120));
        Ok(())
    }
}

impl Drop for Booter {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, mut b) in lock(&self.booted).drain() {
            let _ = b.child.start_kill();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Boots one instance: its metadata service and its agent.
async fn boot(id: &str, s: &BootSettings, base: &Path) -> anyhow::Result<Booted> {
    let imds = ImdsStandIn::start(InstanceSpec {
        instance_id: id.to_owned(),
        instance_type: INSTANCE_TYPE.to_owned(),
        zone: ZONE.to_owned(),
        region: REGION.to_owned(),
        life_cycle: s.market.to_owned(),
    })
    .await
    .context("starting an instance metadata stand-in")?;
    let dir = base.join(id);
    std::fs::create_dir_all(&dir)?;
    let mut config = AgentConfig::new(
        s.coordinator.to_string(),
        s.ca_file.clone(),
        s.join_token_file.clone(),
    );
    config.name = Some(id.to_owned());
    config.state_dir = Some(dir.join("state"));
    config.capacity = s.capacity;
    config.executor.kind = match s.executor {
        "docker" => ExecutorKind::Docker,
        _ => ExecutorKind::Shell,
    };
    config.executor.work_dir = dir.join("builds");
    if s.executor == "docker" {
        config.executor.default_image = Some(crate::TEST_IMAGE.to_owned());
    }
    config.instance.imds = true;
    config.instance.imds_endpoint = Some(imds.url());
    if let Some(signer) = &s.identity_signer {
        imds.sign_identity_with(signer.clone());
        config.enroll = servitor_agent::config::EnrollMethod::AwsIid;
        config.join_token_file = PathBuf::new();
    }
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config.to_toml()?)?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = tokio::process::Command::new(crate::agent_binary()?)
        .arg("--config")
        .arg(&config_path)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("starting an agent")?;
    Ok(Booted { child, imds })
}

/// Knobs of one AWS harness.
#[derive(Clone, Debug)]
pub struct AwsOptions {
    /// `docker` or `shell`.
    pub executor: &'static str,
    pub concurrent: u32,
    pub max_instances: u32,
    pub capacity_per_instance: u32,
    pub idle_count: u32,
    pub idle_time: Duration,
    pub boot_timeout: Duration,
    pub lost_grace: Duration,
    /// The group's MaxSize.
    pub group_max_size: i32,
    pub market: &'static str,
    /// The first `n` instances never boot.
    pub broken: usize,
    /// Agents enroll by instance identity (`[agents.aws_iid]`), with
    /// documents signed by a test key instead of AWS's.
    pub aws_iid: bool,
    /// With `aws_iid`: the instances' documents are signed by a key other
    /// than the one the coordinator trusts (forged).
    pub aws_iid_forged: bool,
    /// Changes beyond these knobs (`max_use_count`, a lifecycle hook,
    /// `[[fleet.policy]]`, `[budget]`), on the typed configuration.
    pub configure: crate::config::Tweak,
}

impl Default for AwsOptions {
    fn default() -> Self {
        Self {
            executor: "shell",
            concurrent: 4,
            max_instances: 3,
            capacity_per_instance: 1,
            idle_count: 0,
            idle_time: Duration::from_secs(2),
            boot_timeout: Duration::from_secs(120),
            lost_grace: Duration::from_secs(30),
            group_max_size: 10,
            market: "spot",
            broken: 0,
            aws_iid: false,
            aws_iid_forged: false,
            configure: crate::config::Tweak::default(),
        }
    }
}

/// moto, a group in it, a GitLab stand-in, the coordinator sizing the
/// group (started in process through the same `start` the binary uses),
/// and the booter playing EC2.
#[derive(Debug)]
pub struct AwsHarness {
    pub standin: servitor_testkit::gitlab::StandIn,
    pub coordinator: Option<servitor_coordinator::Coordinator>,
    pub group: Group,
    pub booter: Booter,
    pub moto: Moto,
    pub dir: tempfile::TempDir,
    config_path: PathBuf,
    shutdown: CancellationToken,
}

impl AwsHarness {
    /// Starts everything.
    ///
    /// # Errors
    /// Any prerequisite (moto, Docker, the agent binary) or start failure.
    pub async fn start(options: AwsOptions) -> anyhow::Result<Self> {
        let moto = Moto::start().await?;
        let group = Group::create(&moto, "servitor-test", options.group_max_size).await?;
        Self::start_on(moto, group, options).await
    }

    /// Starts everything but moto and the group, which are given
    /// (`group_max_size` does not apply).
    ///
    /// # Errors
    /// Any prerequisite (Docker, the agent binary) or start failure.
    pub async fn start_on(moto: Moto, group: Group, options: AwsOptions) -> anyhow::Result<Self> {
        crate::init_tracing();
        aws_environment();
        if options.executor == "docker" {
            crate::ensure_test_image().await?;
        }
        let dir = tempfile::tempdir()?;
        let standin = servitor_testkit::gitlab::StandIn::start(Default::default())
            .await
            .context("starting the GitLab stand-in")?;
        std::fs::write(
            dir.path().join(crate::config::RUNNER_TOKEN_FILE),
            servitor_testkit::gitlab::DEFAULT_RUNNER_TOKEN,
        )?;
        std::fs::write(
            dir.path().join(crate::config::JOIN_TOKEN_FILE),
            "aws-test-join-token-0123456789",
        )?;
        // A fixed port, so agents find a restarted coordinator again.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut config = crate::config::local(
            dir.path(),
            &standin.url(),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        );
        config.concurrent = options.concurrent;
        config.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)));
        config.fleet_mut().provider = FleetProvider::AwsAsg;
        config.fleet_mut().capacity_per_instance = options.capacity_per_instance;
        config.fleet_mut().max_instances = options.max_instances;
        config.fleet_mut().idle_count = options.idle_count;
        config.fleet_mut().idle_time = options.idle_time;
        config.fleet_mut().boot_timeout = options.boot_timeout;
        config.agents.lost_grace = options.lost_grace;
        config.fleet_mut().aws = Some(AwsFleetConfig {
            group: group.name.clone(),
            region: Some(REGION.to_owned()),
            endpoint_url: Some(moto.url().to_owned()),
            lifecycle_hook: None,
        });
        let identity_signer = if options.aws_iid {
            let signer = Arc::new(servitor_testkit::iid::IidSigner::generate());
            let certificates = dir.path().join("iid-certificates.pem");
            std::fs::write(
                &certificates,
                format!("region: {REGION}\n{}", signer.certificate_pem()),
            )?;
            config.agents.aws_iid = Some(servitor_coordinator::config::AwsIidConfig {
                certificates_file: Some(certificates),
                ..Default::default()
            });
            if options.aws_iid_forged {
                Some(Arc::new(servitor_testkit::iid::IidSigner::generate()))
            } else {
                Some(signer)
            }
        } else {
            None
        };
        options.configure.apply(&mut config);
        let config_path = dir.path().join("coordinator.toml");
        crate::config::write(&config_path, &config)?;
        let shutdown = CancellationToken::new();
        let coordinator = start_coordinator(&config_path, shutdown.clone()).await?;
        let booter = Booter::start(
            group.clone(),
            BootSettings {
                coordinator: coordinator.link_addr,
                ca_file: coordinator.ca_pem_path.clone(),
                join_token_file: dir.path().join(crate::config::JOIN_TOKEN_FILE),
                executor: options.executor,
                capacity: options.capacity_per_instance,
                market: options.market,
                broken: options.broken,
                identity_signer,
            },
            &dir.path().join("instances"),
        );
        Ok(Self {
            standin,
            coordinator: Some(coordinator),
            group,
            booter,
            moto,
            dir,
            config_path,
            shutdown,
        })
    }

    /// The running coordinator.
    pub fn coordinator(&self) -> &servitor_coordinator::Coordinator {
        self.coordinator
            .as_ref()
            .expect("the coordinator runs until the harness stops it")
    }

    /// Stops the coordinator (a clean stop: leases stay, nothing scales
    /// in) and starts a new one on the same state and group.
    ///
    /// # Errors
    /// The new coordinator does not start.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(c) = self.coordinator.take() {
            c.wait().await;
        }
        self.shutdown = CancellationToken::new();
        // The old link's socket closes once its last connection has gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match start_coordinator(&self.config_path, self.shutdown.clone()).await {
                Ok(c) => {
                    self.coordinator = Some(c);
                    return Ok(());
                }
                Err(e)
                    if format!("{e:#}").contains("Address already in use")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the coordinator (cleanly) and starts a new one on the same
    /// state and group, listening on a new port: the agents running keep
    /// dialling the old one and never reach it; instances booted from now
    /// on are told the new one.
    ///
    /// # Errors
    /// The configuration cannot be rewritten or the new coordinator does
    /// not start.
    pub async fn restart_elsewhere(&mut self) -> anyhow::Result<()> {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = servitor_coordinator::config::Config::load(&self.config_path)?;
        config.agents.listen = listen;
        crate::config::write(&self.config_path, &config)?;
        // Before it starts, so no instance it launches is told the old one.
        self.booter.redirect(listen);
        self.restart().await
    }

    /// The coordinator's Prometheus metrics, fetched over HTTP.
    ///
    /// # Errors
    /// The endpoint does not answer.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let addr = self
            .coordinator()
            .metrics_addr
            .context("metrics are not configured")?;
        let body = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(body)
    }

    /// Waits for a job's final state, with its log and the agents' logs in
    /// the error if it does not get there.
    ///
    /// # Errors
    /// Timeout.
    pub async fn wait_final(
        &self,
        job_id: i64,
        timeout: Duration,
    ) -> anyhow::Result<servitor_testkit::gitlab::JobRecord> {
        match self.standin.wait_for_final(job_id, timeout).await {
            Ok(r) => Ok(r),
            Err(e) => bail!(
                "{e}; log so far:\n{}\nagent logs:\n{}",
                self.standin
                    .job(job_id)
                    .map(|r| r.trace_text())
                    .unwrap_or_default(),
                self.booter.agent_logs()
            ),
        }
    }
}

impl Drop for AwsHarness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A metric's value from a Prometheus text exposition, by its full name
/// with labels as written (`servitor_x{a="b"}`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn start_coordinator(
    config_path: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<servitor_coordinator::Coordinator> {
    let config = servitor_coordinator::config::Config::load(config_path)?;
    let secrets = config.load_secrets()?;
    servitor_coordinator::start(
        config,
        secrets,
        servitor_coordinator::StartOptions::default(),
        shutdown,
    )
    .await
    .context("starting the coordinator")
}
