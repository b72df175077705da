//! The agent's configuration: a TOML file (written by user-data on a cloud
//! instance, or by the local fleet), checked in full before anything dials.
//! The types serialise too, so tools and tests write files from them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration problem. The message names the file, the key and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Top level of `agent.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The coordinator's agent link address, `host:port`.
    pub coordinator: String,
    /// Name the coordinator's certificate is checked against.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The coordinator CA certificate (PEM file). Either this or `ca_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 pin of the coordinator CA certificate, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_sha256: Option<String>,
    /// File holding the join token, used once to enroll (with
    /// `enroll = "join-token"`).
    #[serde(default)]
    pub join_token_file: PathBuf,
    /// How the agent proves itself when it enrolls: `join-token`, or
    /// `aws-iid` (its EC2 instance identity document, signed by AWS; no
    /// secret on the instance).
    #[serde(default)]
    pub enroll: EnrollMethod,
    /// Name to enroll under; defaults to the instance id, then the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the agent keeps its key and certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// The coordinator's runner (a `[[runners]]` name) whose jobs this
    /// agent takes. Leave it out when the coordinator serves one runner.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runner: String,
    /// Jobs run at once.
    #[serde(default = "one")]
    pub capacity: u32,
    /// Take one job, report it, and exit: the agent of a task started for
    /// one job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_job: bool,
    #[serde(default)]
    pub executor: ExecutorConfig,
    #[serde(default)]
    pub instance: InstanceConfig,
}

/// How an agent proves itself when it enrolls.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EnrollMethod {
    /// The join token in `join_token_file`.
    #[default]
    JoinToken,
    /// The instance identity document from instance metadata.
    AwsIid,
    /// In a Fargate task the coordinator started: the one-task credential
    /// it passed in `SERVITOR_TASK_CREDENTIAL`, and the task's ARN from the
    /// task metadata endpoint (`ECS_CONTAINER_METADATA_URI_V4`).
    EcsTask,
}

/// Which executor runs jobs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutorKind {
    /// Docker when the engine answers, else the shell executor.
    #[default]
    Auto,
    Docker,
    Shell,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    #[serde(default)]
    pub kind: ExecutorKind,
    /// Image for jobs that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image: Option<String>,
    /// `always`, `if-not-present` or `never`, for jobs that set none.
    #[serde(default = "default_pull_policy")]
    pub pull_policy: String,
    /// The pull policies a job's `pull_policy` may ask for
    /// (gitlab-runner's `allowed_pull_policies`); empty allows all three.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_pull_policies: Vec<String>,
    /// Run job and service containers privileged (gitlab-runner's
    /// `privileged`), as Docker-in-Docker needs. A privileged job controls
    /// its whole instance: enable it only where every job may.
    #[serde(default)]
    pub privileged: bool,
    /// Seconds a job waits for its services to answer (gitlab-runner's
    /// `wait_for_services_timeout`): 0 for the default 30, -1 not to wait.
    #[serde(default)]
    pub wait_for_services_timeout: i64,
    /// Where each attempt gets its build directory.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            kind: ExecutorKind::Auto,
            default_image: None,
            pull_policy: default_pull_policy(),
            allowed_pull_policies: Vec::new(),
            privileged: false,
            wait_for_services_timeout: 0,
            work_dir: default_work_dir(),
        }
    }
}

/// Facts about the instance; on EC2 these come from instance metadata.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Watch the instance metadata service (IMDSv2) for Spot interruption
    /// notices, rebalance recommendations and Auto Scaling termination, and
    /// read the instance's facts from it. Turn off off EC2.
    #[serde(default = "yes")]
    pub imds: bool,
    /// Run jobs even when a job's container can get an instance metadata
    /// token (checked at start with the Docker executor). Off: such an
    /// agent refuses to start, naming the launch-template fix.
    #[serde(default)]
    pub allow_container_metadata: bool,
    /// Instance metadata endpoint; by default the AWS SDK's resolution
    /// (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, then `http://169.254.169.254`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_endpoint: Option<String>,
    /// Overrides for what instance metadata would say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub market: Option<String>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            imds: true,
            allow_container_metadata: false,
            imds_endpoint: None,
            id: None,
            instance_type: None,
            zone: None,
            market: None,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_server_name() -> String {
    servitor_proto::link::DEFAULT_SERVER_NAME.to_owned()
}
fn one() -> u32 {
    1
}
fn default_pull_policy() -> String {
    "if-not-present".to_owned()
}
fn default_work_dir() -> PathBuf {
    PathBuf::from("/var/lib/servitor-agent/builds")
}

/// Pull policies gitlab-runner knows.
pub const PULL_POLICIES: [&str; 3] = ["always", "if-not-present", "never"];

impl AgentConfig {
    /// An agent of `coordinator` (`host:port`) that trusts the CA in
    /// `ca_file`, every optional key at its default.
    pub fn new(coordinator: String, ca_file: PathBuf, join_token_file: PathBuf) -> Self {
        Self {
            coordinator,
            server_name: default_server_name(),
            ca_file: Some(ca_file),
            ca_sha256: None,
            join_token_file,
            enroll: EnrollMethod::JoinToken,
            name: None,
            state_dir: None,
            runner: String::new(),
            capacity: one(),
            one_job: false,
            executor: ExecutorConfig::default(),
            instance: InstanceConfig::default(),
        }
    }

    /// The configuration as `agent.toml` text; [`AgentConfig::from_toml_str`]
    /// reads it back unchanged.
    ///
    /// # Errors
    /// A value TOML cannot hold.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self)
            .map_err(|e| ConfigError(format!("cannot write the agent configuration: {e}")))
    }

    /// Parses and validates a configuration text.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the fix.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig =
            toml::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let fail = |msg: String| Err(ConfigError(format!("{origin}: {msg}")));
        match (&config.ca_file, &config.ca_sha256) {
            (None, None) => {
                return fail("set ca_file (the coordinator's ca.pem) or ca_sha256 (its pin) so the agent knows which coordinator to trust".into())
            }
            (Some(_), Some(_)) => return fail("set only one of ca_file and ca_sha256".into()),
            (None, Some(pin)) if !is_pin(pin) => {
                return fail(format!("ca_sha256 {pin:?} must look like \"sha256:\" followed by 64 hex digits; `servitor-coordinator status` prints it"))
            }
            _ => {}
        }
        if config.capacity == 0 {
            return fail("capacity must be at least 1".into());
        }
        match config.enroll {
            EnrollMethod::JoinToken if config.join_token_file.as_os_str().is_empty() => {
                return fail("join_token_file is required to enroll with a join token; set it, or set enroll = \"aws-iid\" on an EC2 instance of the coordinator's group".into());
            }
            EnrollMethod::AwsIid if !config.instance.imds => {
                return fail("enroll = \"aws-iid\" reads the identity document from instance metadata; set instance.imds = true".into());
            }
            EnrollMethod::EcsTask if config.instance.imds => {
                return fail("enroll = \"ecs-task\" runs in a Fargate task, which has no instance metadata; set instance.imds = false".into());
            }
            _ => {}
        }
        if !config.coordinator.contains(':') {
            return fail(format!(
                "coordinator {:?} must be host:port, e.g. \"10.0.0.5:7443\"",
                config.coordinator
            ));
        }
        if !PULL_POLICIES.contains(&config.executor.pull_policy.as_str()) {
            return fail(format!(
                "executor.pull_policy {:?} must be one of {}",
                config.executor.pull_policy,
                PULL_POLICIES.join(", ")
            ));
        }
        if let Some(bad) = config
            .executor
            .allowed_pull_policies
            .iter()
            .find(|p| !PULL_POLICIES.contains(&p.as_str()))
        {
            return fail(format!(
                "executor.allowed_pull_policies has {bad:?}; each must be one of {}",
                PULL_POLICIES.join(", ")
            ));
        }
        Ok(config)
    }

    /// The configuration of the agent of a Fargate task, from the
    /// environment the coordinator gives the task: `SERVITOR_COORDINATOR`
    /// (host:port), `SERVITOR_CA_SHA256` (the CA pin), and optionally
    /// `SERVITOR_RUNNER`, `SERVITOR_MARKET` (`spot` or `on-demand`) and
    /// `SERVITOR_WORK_DIR` (`/builds`). It enrolls with its task's
    /// credential, runs its one job with the shell executor in the task's
    /// own container, and exits.
    ///
    /// # Errors
    /// A missing or invalid variable, named.
    pub fn from_task_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let required = |name: &str| {
            var(name).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                ConfigError(format!(
                    "{name} is not set; the coordinator sets it on the tasks it starts (run the agent with --config elsewhere)"
                ))
            })
        };
        let mut config = AgentConfig {
            coordinator: required("SERVITOR_COORDINATOR")?,
            server_name: default_server_name(),
            ca_file: None,
            ca_sha256: Some(required("SERVITOR_CA_SHA256")?),
            join_token_file: PathBuf::new(),
            enroll: EnrollMethod::EcsTask,
            name: None,
            state_dir: None,
            runner: var("SERVITOR_RUNNER").unwrap_or_default(),
            capacity: one(),
            one_job: true,
            executor: ExecutorConfig::default(),
            instance: InstanceConfig::default(),
        };
        config.executor.kind = ExecutorKind::Shell;
        config.executor.work_dir = var("SERVITOR_WORK_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/builds"), PathBuf::from);
        config.instance.imds = false;
        config.instance.market = var("SERVITOR_MARKET").filter(|m| !m.is_empty());
        let text = config.to_toml()?;
        Self::from_toml_str(&text, "the task's environment")
    }

    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the key and the fix.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "{} is not readable ({e}); pass --config with the agent's configuration file",
                path.display()
            ))
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }
}

fn is_pin(pin: &str) -> bool {
    pin.strip_prefix(servitor_proto::link::PIN_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../agent.example.toml");
        let config = AgentConfig::from_toml_str(text, "agent.example.toml").unwrap();
        assert_eq!(config.capacity, 1);
        assert_eq!(config.executor.kind, ExecutorKind::Docker);
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let base = "coordinator = \"c:1\"\njoin_token_file = \"/j\"\n";
        let err = AgentConfig::from_toml_str(base, "a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca_file") && err.contains("ca_sha256"),
            "{err}"
        );
        let err = AgentConfig::from_toml_str(&format!("{base}ca_sha256 = \"abc\"\n"), "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        let err = AgentConfig::from_toml_str(
            &format!("{base}ca_file = \"/ca\"\n[executor]\npull_policy = \"sometimes\"\n"),
            "a.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("if-not-present"), "{err}");
        let err = AgentConfig::from_toml_str(
            &format!("{base}ca_file = \"/ca\"\ncapacit = 2\n"),
            "a.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("capacit"), "{err}");
    }

    #[test]
    fn a_task_agent_is_configured_from_its_environment() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let env = |vars: Vec<(&'static str, String)>| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            }
        };
        let config = AgentConfig::from_task_env(env(vec![
            ("SERVITOR_COORDINATOR", "10.0.0.5:7443".into()),
            ("SERVITOR_CA_SHA256", pin.clone()),
            ("SERVITOR_RUNNER", "light".into()),
            ("SERVITOR_MARKET", "spot".into()),
        ]))
        .unwrap();
        assert_eq!(config.enroll, EnrollMethod::EcsTask);
        assert_eq!(config.runner, "light");
        assert!(config.one_job, "a task runs one job");
        assert_eq!(config.executor.kind, ExecutorKind::Shell);
        assert_eq!(config.executor.work_dir, PathBuf::from("/builds"));
        assert!(!config.instance.imds, "a task has no instance metadata");
        assert_eq!(config.instance.market.as_deref(), Some("spot"));
        let e = AgentConfig::from_task_env(env(vec![("SERVITOR_CA_SHA256", pin)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SERVITOR_COORDINATOR is not set"), "{e}");
        let e = AgentConfig::from_task_env(env(vec![
            ("SERVITOR_COORDINATOR", "10.0.0.5:7443".into()),
            ("SERVITOR_CA_SHA256", "sha256:short".into()),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("ca_sha256"), "{e}");
    }
}
