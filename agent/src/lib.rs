//! The Servitor agent: dials its coordinator over QUIC with mutual TLS, pulls
//! jobs, runs them with an [`executor`], and streams their output back.
//!
//! [`run_with_config`] is what the binary calls (the coordinator's local
//! fleet starts that binary); tests call it too.

#![forbid(unsafe_code)]

pub mod config;
pub mod executor;
pub mod gitlab;
pub mod imds;
pub mod link;
pub mod session;
pub mod task_metadata;

use servitor_proto::agent::InstanceFacts;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError, EnrollMethod, ExecutorKind};
use crate::executor::docker::{DockerConfig, DockerExecutor, PullPolicy};
use crate::executor::shell::ShellExecutor;
use crate::executor::AnyExecutor;
use crate::imds::InstanceMetadata;
use crate::link::{CaTrust, LinkSettings};
use crate::session::{AgentError, AgentSettings};
use servitor_runtime::secret::Secret;

use servitor_proto::link::TASK_CREDENTIAL_VARIABLE;

/// The task this agent runs in (from the task metadata endpoint) and the
/// credential the coordinator minted for it.
async fn task_identity() -> Result<(task_metadata::TaskFacts, Secret), ConfigError> {
    let credential = std::env::var(TASK_CREDENTIAL_VARIABLE)
        .ok()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| {
            ConfigError(format!(
                "enroll = \"ecs-task\" needs {TASK_CREDENTIAL_VARIABLE}, which the coordinator sets on the tasks it starts"
            ))
        })?;
    let uri = std::env::var(task_metadata::METADATA_URI_VARIABLE).map_err(|_| {
        ConfigError(format!(
            "enroll = \"ecs-task\" needs {}, which Fargate sets in a task's containers (platform version 1.4.0 or later)",
            task_metadata::METADATA_URI_VARIABLE
        ))
    })?;
    let facts = task_metadata::read(&uri)
        .await
        .map_err(|e| ConfigError(format!("enroll = \"ecs-task\": {e}")))?;
    Ok((facts, Secret::new(credential)))
}

/// Turns a validated configuration into settings: reads the trust anchor
/// and join token, picks the executor.
///
/// # Errors
/// Unreadable files and an executor that cannot start, named with the fix.
pub async fn settings_from_config(config: &AgentConfig) -> Result<AgentSettings, ConfigError> {
    let trust = match (&config.ca_file, &config.ca_sha256) {
        (Some(path), _) => CaTrust::Pem(std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "ca_file {} is not readable ({e}); copy the coordinator's ca.pem there",
                path.display()
            ))
        })?),
        (None, Some(pin)) => CaTrust::Sha256Pin(pin.clone()),
        (None, None) => return Err(ConfigError("set ca_file or ca_sha256".into())),
    };
    let join_token = match config.enroll {
        EnrollMethod::JoinToken => {
            Secret::from_file(&config.join_token_file, "join_token_file").map_err(ConfigError)?
        }
        EnrollMethod::AwsIid | EnrollMethod::EcsTask => Secret::new(""),
    };
    // In a Fargate task: the task, and the credential minted for it.
    let task = match config.enroll {
        EnrollMethod::EcsTask => Some(task_identity().await?),
        _ => None,
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "agent".to_owned());
    let imds = if config.instance.imds {
        Some(std::sync::Arc::new(
            imds::Imds::new(config.instance.imds_endpoint.as_deref())
                .map_err(|e| ConfigError(format!("instance.imds_endpoint: {e}")))?,
        ))
    } else {
        None
    };
    let facts = match &imds {
        Some(client) => match client.instance_facts().await {
            Ok(facts) => Some(facts),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read instance facts from instance metadata; using the configuration");
                None
            }
        },
        None => None,
    };
    let pick = |configured: &Option<String>, from_imds: Option<String>| {
        configured.clone().or(from_imds).unwrap_or_default()
    };
    let instance = InstanceFacts {
        instance_id: config
            .instance
            .id
            .clone()
            .or_else(|| facts.as_ref().map(|f| f.instance_id.clone()))
            .or_else(|| task.as_ref().map(|(t, _)| t.task_id().to_owned()))
            .unwrap_or_else(|| hostname.clone()),
        instance_type: pick(
            &config.instance.instance_type,
            facts
                .as_ref()
                .map(|f| f.instance_type.clone())
                .or_else(|| task.as_ref().map(|(t, _)| t.instance_type())),
        ),
        availability_zone: pick(
            &config.instance.zone,
            facts
                .as_ref()
                .map(|f| f.availability_zone.clone())
                .or_else(|| task.as_ref().map(|(t, _)| t.availability_zone.clone())),
        ),
        market: pick(
            &config.instance.market,
            facts.as_ref().map(|f| f.market.to_string()),
        ),
        hostname,
    };
    let agent_name = config
        .name
        .clone()
        .unwrap_or_else(|| instance.instance_id.clone());
    std::fs::create_dir_all(&config.executor.work_dir).map_err(|e| {
        ConfigError(format!(
            "executor.work_dir {} cannot be created ({e})",
            config.executor.work_dir.display()
        ))
    })?;
    let work_dir = std::fs::canonicalize(&config.executor.work_dir).map_err(|e| {
        ConfigError(format!(
            "executor.work_dir {} cannot be resolved ({e})",
            config.executor.work_dir.display()
        ))
    })?;
    let executor = pick_executor(config, &owner_key(&work_dir)).await?;
    let aws_identity = match (config.enroll, &imds) {
        (EnrollMethod::AwsIid, Some(client)) => Some(client.identity().await.map_err(|e| {
            ConfigError(format!(
                "enroll = \"aws-iid\" needs the instance identity document and its rsa2048 signature from instance metadata: {e}"
            ))
        })?),
        _ => None,
    };
    Ok(AgentSettings {
        link: LinkSettings {
            coordinator: config.coordinator.clone(),
            server_name: config.server_name.clone(),
            trust,
            join_token,
            aws_identity,
            ecs_task: task.map(
                |(facts, credential)| servitor_proto::agent::EcsTaskIdentity {
                    credential: credential.expose().to_owned(),
                    task_arn: facts.task_arn,
                },
            ),
            agent_name,
            state_dir: config.state_dir.clone(),
        },
        runner: config.runner.clone(),
        one_job: config.one_job,
        capacity: config.capacity,
        executor,
        work_dir,
        instance,
        imds,
    })
}

async fn pick_executor(config: &AgentConfig, owner: &str) -> Result<AnyExecutor, ConfigError> {
    let pull_policy: PullPolicy = config
        .executor
        .pull_policy
        .parse()
        .map_err(|e| ConfigError(format!("executor.pull_policy: {e}")))?;
    let allowed_pull_policies = config
        .executor
        .allowed_pull_policies
        .iter()
        .map(|p| p.parse())
        .collect::<Result<Vec<PullPolicy>, _>>()
        .map_err(|e| ConfigError(format!("executor.allowed_pull_policies: {e}")))?;
    let docker_config = DockerConfig {
        default_image: config.executor.default_image.clone(),
        pull_policy,
        allowed_pull_policies,
        privileged: config.executor.privileged,
        wait_for_services_secs: config.executor.wait_for_services_timeout,
    };
    let docker = match config.executor.kind {
        ExecutorKind::Shell => return Ok(AnyExecutor::from(ShellExecutor::new())),
        ExecutorKind::Docker => DockerExecutor::connect(docker_config)
            .await
            .map_err(|e| ConfigError(format!("executor.kind is docker but {e}")))?,
        ExecutorKind::Auto => match DockerExecutor::connect(docker_config).await {
            Ok(executor) => executor,
            Err(e) => {
                tracing::warn!(error = %e, "Docker is not available; running jobs with the shell executor");
                return Ok(AnyExecutor::from(ShellExecutor::new()));
            }
        },
    };
    if config.instance.imds && !config.instance.allow_container_metadata {
        check_container_metadata(&docker, config).await?;
    }
    // Containers a previous run of this agent left behind (killed mid-job).
    match docker.remove_leftovers(owner).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, "removed containers left by an earlier run"),
        Err(e) => tracing::warn!(error = %e, "could not look for leftover containers"),
    }
    Ok(AnyExecutor::from(docker))
}

/// Refuses to run jobs whose containers could read instance metadata.
async fn check_container_metadata(
    docker: &DockerExecutor,
    config: &AgentConfig,
) -> Result<(), ConfigError> {
    use executor::metadata_probe::{probe, MetadataReach};
    let Some(image) = &config.executor.default_image else {
        tracing::warn!("cannot check whether job containers reach instance metadata: no executor.default_image to probe with; make sure the launch template sets HttpPutResponseHopLimit = 1");
        return Ok(());
    };
    let endpoint = config
        .instance
        .imds_endpoint
        .clone()
        .unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.to_owned());
    match probe(docker.client(), image, &endpoint).await {
        Ok(MetadataReach::Blocked) => {
            tracing::info!("job containers cannot reach instance metadata");
            Ok(())
        }
        Ok(MetadataReach::Reachable) => Err(ConfigError(format!(
            "a job container on this instance got an instance metadata token from {endpoint}: any job could read the instance's user-data and role credentials. Set the launch template's metadata option HttpPutResponseHopLimit = 1 (the agent on the host still reaches it; containers behind Docker's bridge do not), or set instance.allow_container_metadata = true to accept the risk"
        ))),
        Ok(MetadataReach::Unknown(why)) => {
            tracing::warn!(%why, "cannot tell whether job containers reach instance metadata; make sure the launch template sets HttpPutResponseHopLimit = 1");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether job containers reach instance metadata; make sure the launch template sets HttpPutResponseHopLimit = 1");
            Ok(())
        }
    }
}

/// Where instance metadata is on EC2.
const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Runs the agent described by `config` until `shutdown`.
///
/// # Errors
/// Configuration problems, and a coordinator that refuses this agent.
pub async fn run_with_config(
    config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let settings = settings_from_config(&config).await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        agent = %settings.link.agent_name,
        executor = settings.executor_name(),
        capacity = settings.capacity,
        "servitor agent starting"
    );
    let (notice_tx, notices) = tokio::sync::mpsc::channel(NOTICE_QUEUE);
    if let Some(client) = settings.imds.clone() {
        let watch_stop = shutdown.child_token();
        let mut interruptions = imds::watch(client, imds::POLL_INTERVAL, watch_stop);
        tokio::spawn(async move {
            while let Some(interruption) = interruptions.recv().await {
                if notice_tx.send(notice_for(interruption)).await.is_err() {
                    return;
                }
            }
        });
    }
    session::run(settings, notices, shutdown).await?;
    Ok(())
}

/// What an instance metadata event means for the agent.
fn notice_for(interruption: imds::Interruption) -> session::Notice {
    match interruption {
        imds::Interruption::Spot { action, deadline } => session::Notice::Interrupt {
            reason: format!(
                "Spot interruption notice: {action} at {}",
                humantime::format_rfc3339_seconds(deadline)
            ),
            deadline,
        },
        imds::Interruption::AsgTerminating { state, deadline } => session::Notice::Interrupt {
            reason: format!("Auto Scaling moves the instance to {state}"),
            deadline,
        },
        imds::Interruption::Rebalance { .. } => session::Notice::Drain {
            reason:
                "EC2 rebalance recommendation: the instance is at elevated risk of interruption"
                    .to_owned(),
        },
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

impl RunError {
    /// Exit code for systemd: 64 for what a restart cannot fix.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Agent(AgentError::Refused(_)) => {
                servitor_runtime::exit::CONFIG
            }
            RunError::Agent(AgentError::Link(_)) => servitor_runtime::exit::TRANSIENT,
        }
    }
}

/// Notices waiting for the session; they are rare and tiny.
const NOTICE_QUEUE: usize = 8;

/// The key that marks this agent installation's containers: its work
/// directory, which no two agents on one host share.
fn owner_key(work_dir: &std::path::Path) -> String {
    work_dir.display().to_string()
}

impl AgentSettings {
    /// See [`executor::JobContext::owner`].
    pub fn owner(&self) -> String {
        owner_key(&self.work_dir)
    }

    /// The executor's name, for logs.
    pub fn executor_name(&self) -> &'static str {
        use crate::executor::Executor;
        self.executor.name()
    }
}
