//! The coordinator's configuration: a TOML file, checked in full before
//! anything binds or dials, with errors that name the key and the fix.
//!
//! Not responsible for reading secrets' contents at parse time: token files
//! are read by [`Config::load_secrets`] so that `check-config` can say which
//! file is unreadable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use servitor_runtime::secret::Secret;

/// A configuration problem. The message names the file, the key and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Top level of `coordinator.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the coordinator keeps its CA, system id and leases.
    pub state_dir: PathBuf,
    /// Most jobs held at once (gitlab-runner's `concurrent`).
    #[serde(default = "default_concurrent")]
    pub concurrent: u32,
    /// Attempts a job gets when its instances keep going away; after the
    /// last one it fails with `runner_interrupted` (or
    /// `runner_system_failure` on GitLab versions without it) so that
    /// GitLab's own `retry:` rules apply.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// GitLab, and the one runner's token when there are no `[[runners]]`.
    #[serde(default)]
    pub gitlab: GitLabConfig,
    pub agents: AgentsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The one runner's fleet, when there are no `[[runners]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
    /// Several GitLab runners served by this coordinator, each with its own
    /// token, share of `concurrent` and fleet (gitlab-runner's
    /// `[[runners]]`). Without them, `[gitlab]` and `[fleet]` describe one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runners: Vec<RunnerConfig>,
    /// A monthly spending cap; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where jobs' caches live. Without it, the local fleet keeps them in
    /// `state_dir/cache`; an AWS fleet has none (caches are neither
    /// restored nor saved, and jobs say so in their logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
}

/// `[cache]`: the distributed cache, in gitlab-runner's object layout
/// (`<path>/runner/<short token>/project/<id>/<key>`, or without the
/// runner part when `shared`), so caches can be shared with existing
/// gitlab-runner fleets.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `s3` or `local`.
    #[serde(rename = "type")]
    pub kind: CacheKind,
    /// A prefix for every object (gitlab-runner's `Path`).
    #[serde(default)]
    pub path: String,
    /// One cache for every runner (gitlab-runner's `Shared`).
    #[serde(default)]
    pub shared: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3CacheConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalCacheConfig>,
}

/// Where caches are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheKind {
    /// An S3 bucket; the coordinator signs URLs, instances need no
    /// credentials.
    S3,
    /// A directory on the coordinator's machine (the local fleet).
    Local,
}

/// `[cache.s3]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3CacheConfig {
    pub bucket: String,
    /// By default aws-config's chain (`AWS_REGION`, the profile, instance
    /// metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Another S3 endpoint (MinIO, a VPC endpoint); path-style addressing
    /// is used with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

/// `[cache.local]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCacheConfig {
    pub dir: PathBuf,
}

/// `[budget]`: the fleet stays under a monthly cap.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Most the fleet may cost in a calendar month (UTC), in US dollars.
    pub monthly_usd: f64,
    /// Hourly on-demand prices by instance type (Spot prices come from
    /// EC2's price history).
    #[serde(default)]
    pub on_demand_hourly_usd: std::collections::BTreeMap<String, f64>,
}

/// `[metrics]`: Prometheus metrics over HTTP.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address serving `/metrics`; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GitLabConfig {
    /// GitLab's URL, e.g. `https://gitlab.example.com`; every runner's
    /// unless it names its own.
    #[serde(default)]
    pub url: String,
    /// File holding the runner authentication token (`glrt-…`) of the one
    /// runner, when there are no `[[runners]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// A `[[runners]]` block: one GitLab runner this coordinator serves.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// A short name for status, metrics, logs and the agents of its fleet
    /// (`runner = "<name>"` in their configuration).
    pub name: String,
    /// File holding this runner's authentication token (`glrt-…`).
    pub token_file: PathBuf,
    /// GitLab's URL for this runner; `[gitlab] url` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Most jobs this runner holds at once (gitlab-runner's `limit`); the
    /// coordinator's `concurrent` caps all runners together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<u32>,
    /// The capacity its jobs run on, and only its jobs.
    pub fleet: FleetConfig,
}

/// The name of the one runner of a configuration without `[[runners]]`.
pub const DEFAULT_RUNNER: &str = "default";

/// A runner as the coordinator serves it, whichever way it was written.
#[derive(Clone, Debug)]
pub struct Runner {
    pub name: String,
    /// GitLab's URL, without a trailing slash.
    pub url: String,
    pub token_file: PathBuf,
    /// Most jobs it holds at once.
    pub concurrent: u32,
    pub fleet: FleetConfig,
    /// Where its settings are in the file (`fleet` or `runners[1].fleet`),
    /// for messages.
    pub fleet_key: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// UDP address the agent link (QUIC) listens on.
    pub listen: SocketAddr,
    /// File holding the join token agents present once to enroll.
    pub join_token_file: PathBuf,
    /// Extra DNS names or IPs for the server certificate (agents always
    /// accept the fixed name `servitor-coordinator`).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// How long an agent's client certificate lives.
    #[serde(default = "default_cert_validity", with = "humantime_serde_compat")]
    pub cert_validity: Duration,
    /// How long an agent may be out of touch before its attempts are re-run
    /// elsewhere.
    #[serde(default = "default_agent_grace", with = "humantime_serde_compat")]
    pub lost_grace: Duration,
    /// Enrollment by EC2 instance identity (`[agents.aws_iid]`): agents of
    /// the Auto Scaling group enroll with their signed identity document,
    /// so no join token travels in user-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_iid: Option<AwsIidConfig>,
}

/// `[agents.aws_iid]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AwsIidConfig {
    /// AWS's RSA-2048 certificates by Region, replacing the built-in set
    /// (a `region: <name>` line before each PEM certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates_file: Option<PathBuf>,
    /// How long after its launch an instance may enroll.
    #[serde(default = "default_max_document_age", with = "humantime_serde_compat")]
    pub max_document_age: Duration,
}

impl Default for AwsIidConfig {
    fn default() -> Self {
        Self {
            certificates_file: None,
            max_document_age: default_max_document_age(),
        }
    }
}

fn default_max_document_age() -> Duration {
    Duration::from_secs(30 * 60)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket of the admin gRPC API; relative paths are below `state_dir`.
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: default_admin_socket(),
        }
    }
}

/// Which fleet runs the agents.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FleetProvider {
    /// Agent processes on this machine.
    Local,
    /// An existing EC2 Auto Scaling group (`[fleet.aws]`).
    AwsAsg,
    /// One AWS Fargate task per job attempt, in the job's own image
    /// (`[fleet.fargate]`).
    Fargate,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub provider: FleetProvider,
    /// Job slots each instance offers.
    #[serde(default = "one")]
    pub capacity_per_instance: u32,
    /// Most instances at once.
    pub max_instances: u32,
    /// Idle job slots to keep warm.
    #[serde(default)]
    pub idle_count: u32,
    /// How long an instance may sit idle before it is removed.
    #[serde(default = "default_idle_time", with = "humantime_serde_compat")]
    pub idle_time: Duration,
    /// Idle slots as a factor of slots in use (on top of `idle_count`).
    #[serde(default)]
    pub scale_factor: f64,
    /// Most idle slots `scale_factor` may ask for; 0 means no limit.
    #[serde(default)]
    pub scale_factor_limit: u32,
    /// Jobs an instance runs before it is drained and replaced; 0 means
    /// no limit.
    #[serde(default)]
    pub max_use_count: u32,
    /// How long a launched instance may take for its agent to join before
    /// it is removed as broken.
    #[serde(default = "default_boot_timeout", with = "humantime_serde_compat")]
    pub boot_timeout: Duration,
    /// Most launches in any window of `launch_window`; 0 means no limit.
    #[serde(default)]
    pub max_launches: u32,
    #[serde(default = "default_launch_window", with = "humantime_serde_compat")]
    pub launch_window: Duration,
    /// Time-of-day overrides of the idle knobs; the last block whose
    /// periods match wins.
    #[serde(default)]
    pub policy: Vec<PolicyConfig>,
    #[serde(default)]
    pub local: LocalFleetConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsFleetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fargate: Option<FargateConfig>,
}

/// Which Fargate capacity a runner's tasks run on.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum CapacityProvider {
    /// Spot: a fraction of the price, two minutes' notice when reclaimed
    /// (the job then runs again on a new task).
    #[default]
    #[serde(rename = "FARGATE_SPOT")]
    FargateSpot,
    #[serde(rename = "FARGATE")]
    Fargate,
}

impl CapacityProvider {
    /// The capacity provider's name in the ECS API.
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityProvider::FargateSpot => "FARGATE_SPOT",
            CapacityProvider::Fargate => "FARGATE",
        }
    }
}

/// `[fleet.fargate]`: an ECS cluster where each job attempt runs as a task
/// of its own, in the job's image, with the agent injected by an init
/// container. `fleet.max_instances` caps the tasks at once and
/// `fleet.boot_timeout` how long a task may take for its agent to enroll.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FargateConfig {
    /// The cluster (name or ARN); `FARGATE_SPOT` must be one of its
    /// capacity providers for Spot.
    pub cluster: String,
    /// Subnets tasks start in (`awsvpc`); they need a route to the
    /// coordinator, GitLab and the image registries.
    pub subnets: Vec<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub assign_public_ip: bool,
    #[serde(default)]
    pub capacity_provider: CapacityProvider,
    /// After this many Spot interruptions of one job, its next task runs
    /// on on-demand `FARGATE`; 0 keeps it on Spot.
    #[serde(default)]
    pub on_demand_after_interruptions: u32,
    /// Task CPU units (1024 = one vCPU); a job may ask for another with the
    /// CI variable `SERVITOR_FARGATE_CPU`.
    #[serde(default = "default_task_cpu")]
    pub cpu: u32,
    /// Task memory in MiB; a job may ask with `SERVITOR_FARGATE_MEMORY`.
    #[serde(default = "default_task_memory")]
    pub memory: u32,
    /// The image holding the agent (`/servitor-agent`, a static
    /// executable) that the init container copies into the task.
    pub agent_image: String,
    /// Image for jobs that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image: Option<String>,
    /// The agent link's address as tasks reach it: `host:port`, or a host
    /// alone for the port `agents.listen` is bound to.
    pub coordinator: String,
    /// Role ECS pulls images and writes logs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
    /// Role the job's containers get; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// How long a task definition no task uses is kept before it is
    /// deregistered.
    #[serde(
        default = "default_keep_task_definitions",
        with = "humantime_serde_compat"
    )]
    pub keep_task_definitions: Duration,
    /// Hourly prices (US dollars); AWS's us-east-1 Linux/x86 on-demand
    /// prices by default, and the same for Spot unless set, so a budget
    /// never counts too little.
    #[serde(default)]
    pub prices: FargatePricesConfig,
}

/// `[fleet.fargate.prices]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FargatePricesConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_hour: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gb_hour: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_vcpu_hour: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_gb_hour: Option<f64>,
}

impl FargatePricesConfig {
    /// The prices, with the defaults filled in.
    pub fn resolve(&self) -> crate::fleet::fargate::size::FargatePrices {
        let defaults = crate::fleet::fargate::size::FargatePrices::default();
        let vcpu_hour = self.vcpu_hour.unwrap_or(defaults.vcpu_hour);
        let gb_hour = self.gb_hour.unwrap_or(defaults.gb_hour);
        crate::fleet::fargate::size::FargatePrices {
            vcpu_hour,
            gb_hour,
            spot_vcpu_hour: self.spot_vcpu_hour.unwrap_or(vcpu_hour),
            spot_gb_hour: self.spot_gb_hour.unwrap_or(gb_hour),
        }
    }
}

fn default_keep_task_definitions() -> Duration {
    Duration::from_secs(3600)
}
fn default_task_cpu() -> u32 {
    1024
}
fn default_task_memory() -> u32 {
    2048
}

/// `[fleet.aws]`: the Auto Scaling group the coordinator sizes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsFleetConfig {
    /// The group's name. It must exist; its launch template starts agents
    /// from user-data (see packer/).
    pub group: String,
    /// Region; by default aws-config's chain (`AWS_REGION`, the profile,
    /// instance metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint for the Auto Scaling and EC2 APIs, e.g. a VPC endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// A termination lifecycle hook on the group to complete once an
    /// instance's agent has handed back or finished its jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_hook: Option<String>,
}

/// A `[[fleet.policy]]` block, as gitlab-runner's `[[runners.autoscaler.policy]]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Cron expressions (minute hour day month weekday); empty means always.
    #[serde(default)]
    pub periods: Vec<String>,
    /// `UTC` or a fixed offset such as `+02:00`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default)]
    pub idle_count: u32,
    #[serde(default = "default_idle_time", with = "humantime_serde_compat")]
    pub idle_time: Duration,
    #[serde(default)]
    pub scale_factor: f64,
    #[serde(default)]
    pub scale_factor_limit: u32,
}

/// How local agents run their jobs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutorChoice {
    /// Docker when the engine answers, else the shell executor.
    #[default]
    Auto,
    Docker,
    Shell,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFleetConfig {
    #[serde(default)]
    pub executor: ExecutorChoice,
    /// Image for jobs that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image: Option<String>,
    /// Local agents run job and service containers privileged, as
    /// Docker-in-Docker needs (gitlab-runner's `privileged`). Off by default:
    /// a privileged job controls the machine.
    #[serde(default)]
    pub privileged: bool,
    /// Seconds jobs wait for their services (0: the agent's default, 30;
    /// -1: no wait).
    #[serde(default)]
    pub wait_for_services_timeout: i64,
    /// Program and arguments that start an agent; by default the
    /// `servitor-agent` binary beside the coordinator's.
    #[serde(default)]
    pub agent_command: Vec<String>,
    /// Instance metadata endpoints of local instances, in launch order
    /// (the first for `local-1`…), to try Spot notices and rebalance
    /// recommendations locally against a metadata stand-in. Instances
    /// beyond the list watch no metadata.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imds_endpoints: Vec<String>,
    /// Address local agents dial instead of the link's own: a relay or
    /// proxy in front of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dial: Option<SocketAddr>,
}

fn default_concurrent() -> u32 {
    4
}
fn default_max_attempts() -> u32 {
    3
}
fn one() -> u32 {
    1
}
/// Shortest client certificate life allowed (`agents.cert_validity`).
pub const MIN_CERT_VALIDITY: Duration = Duration::from_secs(30);

fn default_cert_validity() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_agent_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_time() -> Duration {
    Duration::from_secs(300)
}
fn default_boot_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_launch_window() -> Duration {
    Duration::from_secs(60)
}
fn default_timezone() -> String {
    "UTC".to_owned()
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("admin.sock")
}

/// Durations as humantime strings ("10m", "30s"), both ways: tests and
/// tools write configuration files from these types.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write it like \"30s\", \"10m\" or \"1h\""
            ))
        })
    }
}

impl PolicyConfig {
    /// The block the sizing policy reads.
    ///
    /// # Errors
    /// A period or time zone that does not parse, named with the fix.
    pub fn to_block(&self) -> Result<crate::fleet::schedule::PolicyBlock, String> {
        let periods = self
            .periods
            .iter()
            .enumerate()
            .map(|(i, p)| p.parse().map_err(|e| format!("periods[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let block = crate::fleet::schedule::PolicyBlock {
            periods,
            timezone: self
                .timezone
                .parse()
                .map_err(|e| format!("timezone: {e}"))?,
            idle_count: self.idle_count,
            idle_time: self.idle_time,
            scale_factor: self.scale_factor,
            scale_factor_limit: self.scale_factor_limit,
        };
        block.validate().map_err(|e| e.to_string())?;
        Ok(block)
    }
}

impl AgentsConfig {
    /// The agent link on `listen`, with every optional key at its default.
    pub fn new(listen: SocketAddr, join_token_file: PathBuf) -> Self {
        Self {
            listen,
            join_token_file,
            server_names: Vec::new(),
            cert_validity: default_cert_validity(),
            lost_grace: default_agent_grace(),
            aws_iid: None,
        }
    }
}

impl FleetConfig {
    /// A fleet of at most `max_instances`, every optional key at its default.
    pub fn new(provider: FleetProvider, max_instances: u32) -> Self {
        Self {
            provider,
            capacity_per_instance: one(),
            max_instances,
            idle_count: 0,
            idle_time: default_idle_time(),
            scale_factor: 0.0,
            scale_factor_limit: 0,
            max_use_count: 0,
            boot_timeout: default_boot_timeout(),
            max_launches: 0,
            launch_window: default_launch_window(),
            policy: Vec::new(),
            local: LocalFleetConfig::default(),
            aws: None,
            fargate: None,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            periods: Vec::new(),
            timezone: default_timezone(),
            idle_count: 0,
            idle_time: default_idle_time(),
            scale_factor: 0.0,
            scale_factor_limit: 0,
        }
    }
}

/// Secrets named by the configuration, read from their files.
#[derive(Clone, Debug)]
pub struct Secrets {
    /// Each runner's token, in the order of [`Config::runners`].
    pub runner_tokens: Vec<Secret>,
    pub join_token: Secret,
}

impl Config {
    /// A configuration with every optional key at its default.
    pub fn new(
        state_dir: PathBuf,
        gitlab: GitLabConfig,
        agents: AgentsConfig,
        fleet: FleetConfig,
    ) -> Self {
        Self {
            state_dir,
            concurrent: default_concurrent(),
            max_attempts: default_max_attempts(),
            gitlab,
            agents,
            admin: AdminConfig::default(),
            fleet: Some(fleet),
            runners: Vec::new(),
            budget: None,
            metrics: MetricsConfig::default(),
            cache: None,
        }
    }

    /// The configuration as `coordinator.toml` text; [`Config::from_toml_str`]
    /// reads it back unchanged.
    ///
    /// # Errors
    /// A value TOML cannot hold (a non-finite price).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self)
            .map_err(|e| ConfigError(format!("cannot write the configuration: {e}")))
    }

    /// Parses and validates a configuration text. `origin` names the file in
    /// messages.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the fix.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the key and the fix.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "{} is not readable ({e}); pass --config with the coordinator's configuration file",
                path.display()
            ))
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{origin}: {key} {why}")));
        if self.concurrent == 0 {
            return fail("concurrent", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return fail("max_attempts", "must be at least 1");
        }
        self.validate_runners(origin)?;
        let runners = self.runners();
        let any_asg = runners
            .iter()
            .any(|r| r.fleet.provider == FleetProvider::AwsAsg);
        if self.agents.aws_iid.is_some() && !any_asg {
            return fail(
                "agents.aws_iid",
                "needs fleet.provider = \"aws-asg\": instances prove they belong to the group it sizes; remove [agents.aws_iid] for other fleets, whose agents enroll with the join token",
            );
        }
        for runner in &runners {
            validate_fleet(&runner.fleet, &runner.fleet_key)
                .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        }
        if let Some(budget) = &self.budget {
            if !budget.monthly_usd.is_finite() || budget.monthly_usd <= 0.0 {
                return fail(
                    "budget.monthly_usd",
                    "must be a positive number of US dollars (remove [budget] for no cap)",
                );
            }
            for (t, price) in &budget.on_demand_hourly_usd {
                if !price.is_finite() || *price < 0.0 {
                    return fail(
                        &format!("budget.on_demand_hourly_usd.{t:?}"),
                        "must be a price of at least 0 US dollars an hour",
                    );
                }
            }
        }
        if let Some(cache) = &self.cache {
            match (cache.kind, &cache.s3, &cache.local) {
                (CacheKind::S3, None, _) => {
                    return fail(
                        "cache.type",
                        "is \"s3\" but there is no [cache.s3] table; add one with bucket = \"<bucket name>\"",
                    )
                }
                (CacheKind::S3, Some(s3), _) => {
                    if s3.bucket.trim().is_empty() {
                        return fail("cache.s3.bucket", "must name the bucket");
                    }
                    if let Some(url) = &s3.endpoint_url {
                        if !is_http_url(url) {
                            return fail(
                                "cache.s3.endpoint_url",
                                &format!("{url:?} must start with https:// (or http://)"),
                            );
                        }
                    }
                }
                (CacheKind::Local, _, None) => {
                    return fail(
                        "cache.type",
                        "is \"local\" but there is no [cache.local] table; add one with dir = \"<directory>\"",
                    )
                }
                (CacheKind::Local, _, Some(_)) => {
                    if let Some(remote) = runners
                        .iter()
                        .find(|r| r.fleet.provider != FleetProvider::Local)
                    {
                        return fail(
                            "cache.type",
                            &format!(
                                "is \"local\", which only agents on this machine can reach, but {}.provider is not \"local\"; use type = \"s3\" with an AWS fleet",
                                remote.fleet_key
                            ),
                        );
                    }
                }
            }
        }
        if self.agents.cert_validity < MIN_CERT_VALIDITY {
            return fail(
                "agents.cert_validity",
                "must be at least 30s: agents renew over their link when a third of it is left, and need that time to do so",
            );
        }
        Ok(())
    }

    /// Checks how the runners are written: either `[gitlab] token_file` and
    /// `[fleet]` for one, or `[[runners]]` blocks with distinct names,
    /// tokens and groups.
    fn validate_runners(&self, origin: &str) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{origin}: {key} {why}")));
        if self.runners.is_empty() {
            if self.gitlab.token_file.is_none() {
                return fail(
                    "gitlab.token_file",
                    "is missing; point it at the file holding the runner authentication token (glrt-…), or describe several runners with [[runners]] blocks",
                );
            }
            if self.fleet.is_none() {
                return fail(
                    "[fleet]",
                    "is missing; add one with provider = \"local\" or \"aws-asg\", or give each [[runners]] block its own [runners.fleet]",
                );
            }
            if !is_http_url(&self.gitlab.url) {
                return fail(
                    "gitlab.url",
                    &format!(
                        "{:?} must start with https:// (or http://)",
                        self.gitlab.url
                    ),
                );
            }
            return Ok(());
        }
        if self.fleet.is_some() {
            return fail(
                "[fleet]",
                "is set beside [[runners]]; each runner has its own fleet: move it into the runners' [runners.fleet] tables",
            );
        }
        if self.gitlab.token_file.is_some() {
            return fail(
                "gitlab.token_file",
                "is set beside [[runners]]; each runner names its own token_file: remove it from [gitlab]",
            );
        }
        for (i, runner) in self.runners.iter().enumerate() {
            let key = |k: &str| format!("runners[{i}].{k}");
            let name_ok = !runner.name.is_empty()
                && runner.name.len() <= 40
                && runner
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok {
                return fail(
                    &key("name"),
                    &format!(
                        "{:?} must be 1 to 40 letters, digits, '-', '_' or '.' (it names the runner in status, metrics and its agents' configuration)",
                        runner.name
                    ),
                );
            }
            if let Some(j) = self.runners[..i].iter().position(|r| r.name == runner.name) {
                return fail(
                    &key("name"),
                    &format!(
                        "{:?} is also runners[{j}]'s; give each runner its own name",
                        runner.name
                    ),
                );
            }
            if let Some(j) = self.runners[..i]
                .iter()
                .position(|r| r.token_file == runner.token_file)
            {
                return fail(
                    &key("token_file"),
                    &format!(
                        "{} is also runners[{j}]'s; each runner is registered in GitLab with a token of its own",
                        runner.token_file.display()
                    ),
                );
            }
            let url = runner.url.as_deref().unwrap_or(&self.gitlab.url);
            if url.is_empty() {
                return fail(
                    &key("url"),
                    "is missing; set url in [gitlab] for every runner, or in this block",
                );
            }
            if !is_http_url(url) {
                return fail(
                    &key("url"),
                    &format!("{url:?} must start with https:// (or http://)"),
                );
            }
            if runner.concurrent == Some(0) {
                return fail(&key("concurrent"), "must be at least 1");
            }
            if let Some(group) = runner.fleet.aws.as_ref().map(|a| &a.group) {
                let shared = self.runners[..i]
                    .iter()
                    .position(|r| r.fleet.aws.as_ref().is_some_and(|a| a.group == *group));
                if let Some(j) = shared {
                    return fail(
                        &key("fleet.aws.group"),
                        &format!("{group:?} is also runners[{j}]'s; each runner sizes a group of its own"),
                    );
                }
            }
        }
        Ok(())
    }

    /// The runners this coordinator serves, in the file's order: the
    /// `[[runners]]` blocks, or the one `[gitlab]` and `[fleet]` describe.
    pub fn runners(&self) -> Vec<Runner> {
        if self.runners.is_empty() {
            let (Some(token_file), Some(fleet)) = (&self.gitlab.token_file, &self.fleet) else {
                return Vec::new();
            };
            return vec![Runner {
                name: DEFAULT_RUNNER.to_owned(),
                url: self.gitlab.url.trim_end_matches('/').to_owned(),
                token_file: token_file.clone(),
                concurrent: self.concurrent,
                fleet: fleet.clone(),
                fleet_key: "fleet".to_owned(),
            }];
        }
        self.runners
            .iter()
            .enumerate()
            .map(|(i, r)| Runner {
                name: r.name.clone(),
                url: r
                    .url
                    .as_deref()
                    .unwrap_or(&self.gitlab.url)
                    .trim_end_matches('/')
                    .to_owned(),
                token_file: r.token_file.clone(),
                concurrent: r.concurrent.unwrap_or(self.concurrent).min(self.concurrent),
                fleet: r.fleet.clone(),
                fleet_key: format!("runners[{i}].fleet"),
            })
            .collect()
    }

    /// The one runner's fleet, for callers that build a configuration
    /// without `[[runners]]` (tests, the demo).
    ///
    /// # Panics
    /// When the configuration has `[[runners]]` instead.
    pub fn fleet_mut(&mut self) -> &mut FleetConfig {
        self.fleet
            .as_mut()
            .expect("a configuration with one runner has a [fleet]")
    }

    /// The admin socket path, resolved against the state directory.
    pub fn admin_socket(&self) -> PathBuf {
        if self.admin.socket.is_absolute() {
            self.admin.socket.clone()
        } else {
            self.state_dir.join(&self.admin.socket)
        }
    }

    /// Reads the token files.
    ///
    /// # Errors
    /// Names the unreadable file and the setting that points at it.
    pub fn load_secrets(&self) -> Result<Secrets, ConfigError> {
        let runner_tokens = if self.runners.is_empty() {
            self.gitlab
                .token_file
                .iter()
                .map(|file| Secret::from_file(file, "gitlab.token_file").map_err(ConfigError))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            self.runners
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Secret::from_file(&r.token_file, &format!("runners[{i}].token_file"))
                        .map_err(ConfigError)
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let join_token = Secret::from_file(&self.agents.join_token_file, "agents.join_token_file")
            .map_err(ConfigError)?;
        Ok(Secrets {
            runner_tokens,
            join_token,
        })
    }
}

/// Checks a `[fleet.fargate]` table; `key` is where it is in the file.
fn validate_fargate(f: &FargateConfig, key: &str) -> Result<(), String> {
    let fail = |k: &str, why: &str| Err(format!("{key}.{k} {why}"));
    if f.cluster.trim().is_empty() {
        return fail("cluster", "must name the ECS cluster");
    }
    if f.subnets.is_empty() {
        return fail(
            "subnets",
            "must list at least one subnet for the tasks (awsvpc networking)",
        );
    }
    if f.agent_image.trim().is_empty() {
        return fail(
            "agent_image",
            "must name the image holding the agent (/servitor-agent) that tasks' init container copies",
        );
    }
    if f.coordinator.trim().is_empty() || f.coordinator.contains(char::is_whitespace) {
        return fail(
            "coordinator",
            &format!(
                "{:?} must be host:port (or a host alone), the agent link as tasks reach it",
                f.coordinator
            ),
        );
    }
    if let Some(url) = &f.endpoint_url {
        if !is_http_url(url) {
            return fail(
                "endpoint_url",
                &format!("{url:?} must start with https:// (or http://)"),
            );
        }
    }
    crate::fleet::fargate::size::TaskSize {
        cpu: f.cpu,
        memory_mib: f.memory,
    }
    .validate()
    .map_err(|e| format!("{key}: {e}"))?;
    let prices = [
        ("prices.vcpu_hour", f.prices.vcpu_hour),
        ("prices.gb_hour", f.prices.gb_hour),
        ("prices.spot_vcpu_hour", f.prices.spot_vcpu_hour),
        ("prices.spot_gb_hour", f.prices.spot_gb_hour),
    ];
    for (name, price) in prices {
        if price.is_some_and(|p| !p.is_finite() || p < 0.0) {
            return fail(name, "must be a price of at least 0 US dollars an hour");
        }
    }
    Ok(())
}

fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// Checks one runner's fleet; `key` is where it is in the file.
fn validate_fleet(fleet: &FleetConfig, key: &str) -> Result<(), String> {
    let fail = |k: &str, why: &str| Err(format!("{key}.{k} {why}"));
    if fleet.capacity_per_instance == 0 {
        return fail("capacity_per_instance", "must be at least 1");
    }
    if fleet.max_instances == 0 {
        return fail("max_instances", "must be at least 1");
    }
    match (fleet.provider, &fleet.aws) {
        (FleetProvider::AwsAsg, None) => {
            return fail(
                "provider",
                &format!("is \"aws-asg\" but there is no [{key}.aws] table; add one with group = \"<auto scaling group name>\""),
            )
        }
        (FleetProvider::AwsAsg, Some(aws)) => {
            if aws.group.trim().is_empty() {
                return fail("aws.group", "must name the auto scaling group");
            }
            if let Some(url) = &aws.endpoint_url {
                if !is_http_url(url) {
                    return fail(
                        "aws.endpoint_url",
                        &format!("{url:?} must start with https:// (or http://)"),
                    );
                }
            }
        }
        (FleetProvider::Local | FleetProvider::Fargate, Some(_)) => {
            return fail(
                "aws",
                &format!("is set but {key}.provider is not \"aws-asg\"; set provider = \"aws-asg\" or remove [{key}.aws]"),
            )
        }
        (FleetProvider::Local | FleetProvider::Fargate, None) => {}
    }
    match (fleet.provider, &fleet.fargate) {
        (FleetProvider::Fargate, None) => {
            return fail(
                "provider",
                &format!("is \"fargate\" but there is no [{key}.fargate] table; add one with cluster, subnets, agent_image and coordinator"),
            )
        }
        (FleetProvider::Fargate, Some(f)) => validate_fargate(f, &format!("{key}.fargate"))?,
        (_, Some(_)) => {
            return fail(
                "fargate",
                &format!("is set but {key}.provider is not \"fargate\"; set provider = \"fargate\" or remove [{key}.fargate]"),
            )
        }
        (_, None) => {}
    }
    if !fleet.scale_factor.is_finite() || fleet.scale_factor < 0.0 {
        return fail("scale_factor", "must be a number of at least 0");
    }
    for (i, block) in fleet.policy.iter().enumerate() {
        block
            .to_block()
            .map_err(|e| format!("{key}.policy[{i}]: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../coordinator.example.toml");
        let config = Config::from_toml_str(text, "coordinator.example.toml").unwrap();
        assert_eq!(
            config.fleet.as_ref().unwrap().provider,
            FleetProvider::Local
        );
        assert!(config.concurrent >= 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = include_str!("../coordinator.example.toml").replace("concurrent", "concurent");
        let err = Config::from_toml_str(&text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurent"), "{err}");
    }

    #[test]
    fn policy_blocks_parse_and_bad_periods_are_named() {
        let base = include_str!("../coordinator.example.toml");
        let config = Config::from_toml_str(base, "c.toml").unwrap();
        assert_eq!(config.fleet.as_ref().unwrap().policy.len(), 1);
        let block = config.fleet.as_ref().unwrap().policy[0].to_block().unwrap();
        assert_eq!(block.periods.len(), 1);
        let bad = base.replace("* 8-18 * * mon-fri", "* 25 * * mon-fri");
        let err = Config::from_toml_str(&bad, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fleet.policy[0]: periods[0]") && err.contains("0-23"),
            "{err}"
        );
        let bad = base.replace("timezone = \"UTC\"", "timezone = \"Mars/Olympus\"");
        let err = Config::from_toml_str(&bad, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fleet.policy[0]: timezone"), "{err}");
    }

    #[test]
    fn aws_example_parses_and_mistakes_are_named() {
        let text = include_str!("../coordinator.aws.example.toml");
        let config = Config::from_toml_str(text, "coordinator.aws.example.toml").unwrap();
        assert_eq!(
            config.fleet.as_ref().unwrap().provider,
            FleetProvider::AwsAsg
        );
        let aws = config.fleet.as_ref().unwrap().aws.as_ref().unwrap();
        assert_eq!(aws.group, "servitor-runners");
        let budget = config.budget.as_ref().unwrap();
        assert!(budget.monthly_usd > 0.0);
        assert!(config.metrics.listen.is_some());
        let iid = config.agents.aws_iid.as_ref().unwrap();
        assert_eq!(iid.max_document_age, Duration::from_secs(1800));
        // Identity enrollment needs the group it checks membership of.
        let local = text.replace("provider = \"aws-asg\"", "provider = \"local\"");
        let err = Config::from_toml_str(&local, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents.aws_iid needs fleet.provider"), "{err}");
        let no_table = text.replace("[fleet.aws]", "[fleet.awz]");
        let err = Config::from_toml_str(&no_table, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("awz"), "{err}");
        let mut cut = String::new();
        let mut skip = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skip = line == "[fleet.aws]";
            }
            if !skip {
                cut.push_str(line);
                cut.push('\n');
            }
        }
        let err = Config::from_toml_str(&cut, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no [fleet.aws] table"), "{err}");
        let err = Config::from_toml_str(
            &text.replace("monthly_usd = 300.0", "monthly_usd = -1.0"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("budget.monthly_usd"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_fix() {
        let base = include_str!("../coordinator.example.toml");
        let err = Config::from_toml_str(
            &base.replace("idle_time = \"5m\"", "idle_time = \"soon\""),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not a duration") && err.contains("30s"),
            "{err}"
        );
        let err = Config::from_toml_str(
            &base.replace("max_instances = 4", "max_instances = 0"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("fleet.max_instances must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn several_runners_parse_and_mistakes_are_named() {
        let text = include_str!("../coordinator.runners.example.toml");
        let config = Config::from_toml_str(text, "coordinator.runners.example.toml").unwrap();
        let runners = config.runners();
        let names: Vec<&str> = runners.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["lint", "build", "light"]);
        let fargate = runners[2].fleet.fargate.as_ref().unwrap();
        assert_eq!(fargate.capacity_provider, CapacityProvider::FargateSpot);
        assert_eq!(fargate.on_demand_after_interruptions, 2);
        let e = Config::from_toml_str(&text.replace("memory = 2048", "memory = 3000"), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runners[2].fleet.fargate: memory = 3000 MiB does not go with cpu = 1024"),
            "{e}"
        );
        let e = Config::from_toml_str(&text.replace("cluster = \"servitor-ci\"\n", ""), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `cluster`"), "{e}");
        assert_eq!(runners[0].url, "https://gitlab.example.com");
        assert_eq!(runners[0].concurrent, 10);
        assert_eq!(
            runners[1].fleet.aws.as_ref().unwrap().group,
            "servitor-build"
        );
        assert_eq!(runners[1].fleet_key, "runners[1].fleet");
        let err = |text: &str| {
            Config::from_toml_str(text, "c.toml")
                .unwrap_err()
                .to_string()
        };
        let e = err(&text.replace("name = \"build\"", "name = \"lint\""));
        assert!(
            e.contains("runners[1].name \"lint\" is also runners[0]'s"),
            "{e}"
        );
        let e = err(&text.replace("build-token", "lint-token"));
        assert!(
            e.contains("runners[1].token_file") && e.contains("token of its own"),
            "{e}"
        );
        let e = err(&text.replace("group = \"servitor-build\"", "group = \"servitor-lint\""));
        assert!(e.contains("runners[1].fleet.aws.group"), "{e}");
        let e = err(&text.replace("name = \"build\"", "name = \"build jobs\""));
        assert!(e.contains("runners[1].name \"build jobs\" must be"), "{e}");
        let e = err(&text.replace("max_instances = 20", "max_instances = 0"));
        assert!(
            e.contains("runners[1].fleet.max_instances must be at least 1"),
            "{e}"
        );
        let e = err(&text.replace("url = \"https://gitlab.example.com\"", ""));
        assert!(e.contains("runners[0].url is missing"), "{e}");
        // The single-runner keys beside [[runners]] are named, with the fix.
        let e = err(&text.replace(
            "[gitlab]\n",
            "[gitlab]\ntoken_file = \"/etc/servitor/runner-token\"\n",
        ));
        assert!(
            e.contains("gitlab.token_file is set beside [[runners]]"),
            "{e}"
        );
        let e = err(&format!(
            "{text}\n[fleet]\nprovider = \"local\"\nmax_instances = 1\n"
        ));
        assert!(e.contains("[fleet] is set beside [[runners]]"), "{e}");
        // A runner's share cannot exceed the coordinator's cap.
        let capped = Config::from_toml_str(
            &text.replace("concurrent = 20", "concurrent = 99"),
            "c.toml",
        )
        .unwrap();
        assert_eq!(capped.runners()[1].concurrent, 30);
    }

    #[test]
    fn one_runner_needs_its_token_and_fleet() {
        let base = include_str!("../coordinator.example.toml");
        let config = Config::from_toml_str(base, "c.toml").unwrap();
        let runners = config.runners();
        assert_eq!(runners.len(), 1);
        assert_eq!(runners[0].name, DEFAULT_RUNNER);
        assert_eq!(runners[0].concurrent, config.concurrent);
        let no_token: String = base
            .lines()
            .filter(|l| !l.starts_with("token_file"))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = Config::from_toml_str(&no_token, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gitlab.token_file is missing"), "{e}");
    }
}
