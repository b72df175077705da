//! The Servitor coordinator: a GitLab runner that takes jobs, holds their
//! leases, and runs them on agents that dial in over QUIC with mutual TLS.
//!
//! [`start`] wires the pieces together and is what the binary, the demo and
//! the end-to-end tests call:
//! - [`jobs`] asks GitLab for work and sees each held job through;
//! - [`core`] holds the leases and dispatches attempts to agents;
//! - [`agents`] serves agent connections accepted by [`link`];
//! - [`fleet`] sizes the set of instances to the work;
//! - [`admin`] answers the operator on a Unix socket.

#![forbid(unsafe_code)]

pub mod admin;
pub mod agents;
pub mod cache;
pub mod config;
pub mod core;
pub mod fleet;
pub mod gitlab;
pub mod jobs;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod pki;
pub mod store;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, ExecutorChoice, FleetProvider, Secrets};
use crate::core::{Core, CoreSettings};
use crate::fleet::aws::{AwsFleet, AwsFleetSettings};
use crate::fleet::local::{LocalFleet, LocalFleetSettings};
use crate::fleet::pricing::PriceBook;
use crate::fleet::{FleetError, FleetView, ReconcileContext};

/// Why the coordinator could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(
        "state directory {path}: {source}; create it and give it to the user the service runs as"
    )]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Link(#[from] link::LinkError),
    #[error("{0}")]
    GitLab(#[from] gitlab::GitLabError),
    #[error("{0}")]
    Admin(#[from] admin::AdminError),
    #[error("lease book: {0}")]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Cache(#[from] cache::CacheError),
    #[error("{0}")]
    Fleet(#[from] FleetError),
    #[error("{0}")]
    Metrics(#[from] metrics::MetricsError),
    #[error("{0}")]
    Budget(#[from] fleet::budget::BudgetError),
}

impl CoordinatorError {
    /// Exit code for systemd: 64 for what a restart cannot fix, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CoordinatorError::Config(_) | CoordinatorError::StateDir { .. } => {
                servitor_runtime::exit::CONFIG
            }
            CoordinatorError::GitLab(e) if !e.is_retryable() => servitor_runtime::exit::CONFIG,
            CoordinatorError::Fleet(e) if !e.is_retryable() => servitor_runtime::exit::CONFIG,
            CoordinatorError::Metrics(e) if !e.is_retryable() => servitor_runtime::exit::CONFIG,
            _ => servitor_runtime::exit::TRANSIENT,
        }
    }
}

/// File name of the agent binary the local fleet starts by default.
const AGENT_BINARY: &str = "servitor-agent";

/// The `servitor-agent` binary in this executable's directory, where the
/// packages and `cargo build` put both.
///
/// # Errors
/// [`ConfigError`] naming the path looked at and the fix, when it is not
/// there.
fn agent_beside_this_binary() -> Result<PathBuf, ConfigError> {
    let exe = std::env::current_exe().map_err(|e| {
        ConfigError(format!(
            "fleet.local: cannot tell where this binary is ({e}); set fleet.local.agent_command to the servitor-agent binary"
        ))
    })?;
    let agent = exe.with_file_name(AGENT_BINARY);
    if agent.is_file() {
        Ok(agent)
    } else {
        Err(ConfigError(format!(
            "fleet.local: the local fleet runs {AGENT_BINARY}, but {} does not exist; install it beside servitor-coordinator (cargo build builds both) or set fleet.local.agent_command",
            agent.display()
        )))
    }
}

/// Overrides for embedding the coordinator (demo, tests).
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Program and arguments that start a local agent, instead of the
    /// configured or default one.
    pub agent_command: Option<Vec<String>>,
    /// Instance metadata endpoints for local instances, in launch order.
    pub local_imds_endpoints: Vec<String>,
    /// Address local agents dial instead of the link's own (a relay in
    /// front of it).
    pub local_dial_addr: Option<SocketAddr>,
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    pub core: Arc<Core>,
    /// The local fleet, when `fleet.provider = "local"`.
    pub local_fleet: Option<Arc<LocalFleet>>,
    /// The Auto Scaling group, when `fleet.provider = "aws-asg"`.
    pub aws_fleet: Option<Arc<AwsFleet>>,
    pub fleet_view: Arc<FleetView>,
    /// Where Prometheus metrics are served, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The agent link's bound address.
    pub link_addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub system_id: String,
    pub ca_pem_path: PathBuf,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    store: store::Store,
}

impl Coordinator {
    /// Waits until shutdown is requested and every task has stopped, and
    /// everything handed to the lease book is on disk. Held jobs are not
    /// reported on shutdown: their leases survive.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "the lease book's last changes were not saved");
        }
    }

    /// Requests shutdown.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

fn ensure_private_dir(path: &std::path::Path) -> Result<(), CoordinatorError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| CoordinatorError::StateDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    Ok(())
}

/// Starts the coordinator: state, PKI, GitLab verification, agent link,
/// fleet, poller and admin API. Returns once everything listens.
///
/// # Errors
/// Anything that stops it from starting, named with the fix.
pub async fn start(
    config: Config,
    secrets: Secrets,
    options: StartOptions,
    shutdown: CancellationToken,
) -> Result<Coordinator, CoordinatorError> {
    ensure_private_dir(&config.state_dir)?;
    let system_id = gitlab::load_or_create_system_id(&config.state_dir)?;
    let pki = pki::Pki::load_or_create(&config.state_dir, &config.agents.server_names)?;
    let ca_pem_path = config.state_dir.join("ca.pem");
    std::fs::write(&ca_pem_path, pki.ca_pem()).map_err(|source| CoordinatorError::StateDir {
        path: ca_pem_path.clone(),
        source,
    })?;

    let gitlab = Arc::new(gitlab::GitLabClient::new(gitlab::GitLabSettings::new(
        config.gitlab.url.clone(),
        secrets.runner_token.clone(),
        system_id.clone(),
    ))?);
    gitlab.verify().await?;
    tracing::info!(url = %config.gitlab.url, %system_id, "runner token verified with GitLab");

    let cache = match &config.cache {
        Some(cache) => Some(Arc::new(
            cache::CacheStore::new(cache, secrets.runner_token.expose()).await?,
        )),
        None if config.fleet.provider == config::FleetProvider::Local => {
            Some(Arc::new(cache::CacheStore::local(
                config.state_dir.join("cache"),
                secrets.runner_token.expose(),
            )))
        }
        None => {
            tracing::warn!("no [cache] configured: jobs' caches are neither restored nor saved (their logs say so); see the README's cache section");
            None
        }
    };

    let enrollment = link::Enrollment {
        join_token: secrets.join_token.clone(),
        aws_iid: aws_iid_enrollment(&config).await?,
    };
    let link = Arc::new(link::LinkServer::bind_with(
        config.agents.listen,
        &pki,
        enrollment,
        config.agents.cert_validity,
    )?);
    let link_addr = link.local_addr();
    tracing::info!(addr = %link_addr, ca_pin = %pki.ca_sha256_pin(), "agent link listening");

    let store = store::Store::open(&config.state_dir)?;
    let stored = store.load()?;
    if !stored.is_empty() {
        tracing::info!(
            jobs = stored.len(),
            "resuming held jobs from the lease book"
        );
    }
    let core = Core::with_store(
        CoreSettings {
            max_attempts: config.max_attempts,
            gitlab_url: config.gitlab.url.trim_end_matches('/').to_owned(),
        },
        Some(store.clone()),
    );
    let tracker = TaskTracker::new();
    let fleet_view = Arc::new(FleetView::default());

    // Local agents dial loopback when the link listens on every address.
    let dial = if let Some(addr) = options.local_dial_addr {
        addr
    } else if link_addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), link_addr.port())
    } else {
        link_addr
    };
    let prices = Arc::new(PriceBook::new(
        config
            .budget
            .as_ref()
            .map(|b| b.on_demand_hourly_usd.clone())
            .unwrap_or_default(),
    ));
    let ledger = match &config.budget {
        Some(_) => Some(Arc::new(std::sync::Mutex::new(
            fleet::budget::SpendLedger::open(&config.state_dir, store.clone())?,
        ))),
        None => None,
    };
    let metrics_addr = match config.metrics.listen {
        Some(addr) => {
            let server = metrics::bind(addr).await?;
            let bound = server.local_addr();
            tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
            let metrics = core.metrics().clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                if let Err(e) = server.run(metrics, stop).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
            Some(bound)
        }
        None => None,
    };
    let (local_fleet, aws_fleet) = match config.fleet.provider {
        FleetProvider::Local => (
            Some(local_fleet(&config, &options, dial, &ca_pem_path)?),
            None,
        ),
        FleetProvider::AwsAsg => {
            let aws = config.fleet.aws.as_ref().ok_or_else(|| {
                ConfigError(
                    "fleet.provider is \"aws-asg\" but there is no [fleet.aws] table".into(),
                )
            })?;
            let fleet = AwsFleet::connect(AwsFleetSettings {
                group: aws.group.clone(),
                region: aws.region.clone(),
                endpoint_url: aws.endpoint_url.clone(),
                lifecycle_hook: aws.lifecycle_hook.clone(),
                max_instances: config.fleet.max_instances,
            })
            .await?;
            (None, Some(Arc::new(fleet)))
        }
    };

    let stop_polling = shutdown.child_token();
    let admin_socket = config.admin_socket();
    let admin_state = admin::AdminState {
        core: core.clone(),
        fleet: fleet_view.clone(),
        system_id: system_id.clone(),
        ca_pin: pki.ca_sha256_pin(),
        concurrent: config.concurrent,
        stop_polling: stop_polling.clone(),
    };
    {
        let path = admin_socket.clone();
        let stop = shutdown.clone();
        // Bind before returning so `status` works as soon as start() does.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tracker.spawn(async move {
            let served = admin::serve_with_ready(&path, admin_state, stop, ready_tx).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
        if let Ok(Err(e)) = ready_rx.await {
            return Err(e.into());
        }
    }

    tracker.spawn(agents::serve_agents(
        core.clone(),
        link.clone(),
        agents::Serving {
            lost_grace: config.agents.lost_grace,
            cache,
        },
        shutdown.clone(),
        tracker.clone(),
    ));
    let blocks = config
        .fleet
        .policy
        .iter()
        .map(config::PolicyConfig::to_block)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError(format!("fleet.policy: {e}")))?;
    let fleet_settings = fleet::FleetSettings {
        budget: config
            .budget
            .as_ref()
            .map(|b| fleet::budget::BudgetSettings {
                monthly_usd: b.monthly_usd,
                on_demand_hourly_usd: b.on_demand_hourly_usd.clone(),
            }),
        policy: fleet::policy::FleetPolicy {
            capacity_per_instance: config.fleet.capacity_per_instance,
            max_instances: config.fleet.max_instances,
            max_use_count: config.fleet.max_use_count,
            boot_timeout: Some(config.fleet.boot_timeout),
            lost_grace: config.agents.lost_grace,
            launch_rate: (config.fleet.max_launches > 0).then_some(fleet::policy::LaunchRate {
                max: config.fleet.max_launches,
                per: config.fleet.launch_window,
            }),
            idle: fleet::schedule::ActivePolicy {
                idle_count: config.fleet.idle_count,
                idle_time: config.fleet.idle_time,
                scale_factor: config.fleet.scale_factor,
                scale_factor_limit: config.fleet.scale_factor_limit,
                block: None,
            },
        },
        blocks,
    };
    let reconcile_ctx = ReconcileContext {
        core: core.clone(),
        view: fleet_view.clone(),
        prices: prices.clone(),
        ledger,
    };
    if let Some(fleet) = &local_fleet {
        tracker.spawn(fleet::reconcile(
            fleet.clone(),
            reconcile_ctx,
            fleet_settings,
            shutdown.clone(),
        ));
    } else if let Some(fleet) = &aws_fleet {
        tracker.spawn(fleet::reconcile(
            fleet.clone(),
            reconcile_ctx,
            fleet_settings,
            shutdown.clone(),
        ));
    }
    let jobs_ctx = jobs::JobsContext {
        core: core.clone(),
        gitlab,
        coordinator_name: format!("coordinator {system_id}"),
        max_attempts: config.max_attempts,
        store: Some(store.clone()),
        slots: Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(config.concurrent).unwrap_or(usize::MAX),
        )),
        prices,
    };
    let resumed = !stored.is_empty();
    for job in stored {
        let payload = match servitor_proto::job::JobPayload::from_json(&job.raw) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(job_id = job.job_id, error = %e, "stored job cannot be read; forgetting it (GitLab will time it out)");
                drop(store.submit(vec![store::Change::Remove { job_id: job.job_id }]));
                continue;
            }
        };
        let journal = Some(store.journal(job.job_id, job.trace.len() as u64));
        let restored = jobs::Restored {
            result: job.result,
            lease: job.lease,
            resume: gitlab::Resume {
                trace: job.trace,
                journal,
                output: job.output,
            },
        };
        tracker.spawn(jobs::resume_job(
            jobs_ctx.clone(),
            Arc::new(payload),
            bytes::Bytes::from(job.raw),
            restored,
            shutdown.child_token(),
        ));
    }
    if resumed {
        // Agents that held attempts get the grace period to reconnect.
        let core = core.clone();
        let grace = config.agents.lost_grace;
        let stop = shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(grace) => core.expire_missing_agents(&format!(
                    "its agent did not come back within {} of the coordinator restarting",
                    humantime::format_duration(grace)
                )).await,
            }
        });
    }
    tracker.spawn(jobs::poll_gitlab(
        jobs_ctx,
        stop_polling,
        shutdown.clone(),
        tracker.clone(),
    ));
    {
        let link = link.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            shutdown.cancelled().await;
            link.close();
        });
    }

    Ok(Coordinator {
        core,
        local_fleet,
        aws_fleet,
        fleet_view,
        metrics_addr,
        link_addr,
        admin_socket,
        system_id,
        ca_pem_path,
        shutdown,
        tracker,
        store,
    })
}

/// Enrollment by instance identity, when `[agents.aws_iid]` asks for it:
/// the certificates (built in, or the configured file), the group's
/// membership, and the record of instances that enrolled.
async fn aws_iid_enrollment(
    config: &Config,
) -> Result<Option<link::AwsIidEnrollment>, CoordinatorError> {
    let (Some(iid), Some(aws)) = (&config.agents.aws_iid, &config.fleet.aws) else {
        return Ok(None);
    };
    let verifier = match &iid.certificates_file {
        None => link::iid::IidVerifier::aws(iid.max_document_age),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!(
                    "agents.aws_iid.certificates_file {}: {e}",
                    path.display()
                ))
            })?;
            link::iid::IidVerifier::from_pem_set(
                &text,
                &path.display().to_string(),
                iid.max_document_age,
            )
            .map_err(ConfigError)?
        }
    };
    let membership = fleet::aws::AsgMembership::connect(&AwsFleetSettings {
        group: aws.group.clone(),
        region: aws.region.clone(),
        endpoint_url: aws.endpoint_url.clone(),
        lifecycle_hook: aws.lifecycle_hook.clone(),
        max_instances: config.fleet.max_instances,
    })
    .await;
    let record = config.state_dir.join("enrolled-instances");
    let enrolled = link::EnrolledInstances::open(Some(record.clone())).map_err(|source| {
        CoordinatorError::StateDir {
            path: record,
            source,
        }
    })?;
    tracing::info!(
        regions = verifier.regions().len(),
        group = %aws.group,
        "agents of the group may enroll by instance identity"
    );
    Ok(Some(link::AwsIidEnrollment {
        verifier,
        membership: Arc::new(membership),
        enrolled: Arc::new(enrolled),
    }))
}

/// The local fleet: agent processes of the `servitor-agent` binary installed
/// beside this one, unless `fleet.local.agent_command` (or the embedder)
/// names another program.
fn local_fleet(
    config: &Config,
    options: &StartOptions,
    dial: SocketAddr,
    ca_pem_path: &std::path::Path,
) -> Result<Arc<LocalFleet>, CoordinatorError> {
    let command = match (
        &options.agent_command,
        config.fleet.local.agent_command.is_empty(),
    ) {
        (Some(c), _) => c.clone(),
        (None, false) => config.fleet.local.agent_command.clone(),
        (None, true) => vec![agent_beside_this_binary()?.display().to_string()],
    };
    Ok(Arc::new(LocalFleet::new(LocalFleetSettings {
        command,
        base_dir: config.state_dir.join("local-fleet"),
        coordinator: dial,
        ca_file: ca_pem_path.to_owned(),
        join_token_file: config.agents.join_token_file.clone(),
        executor: match config.fleet.local.executor {
            ExecutorChoice::Auto => "auto",
            ExecutorChoice::Docker => "docker",
            ExecutorChoice::Shell => "shell",
        }
        .to_owned(),
        default_image: config.fleet.local.default_image.clone(),
        privileged: config.fleet.local.privileged,
        wait_for_services_timeout: config.fleet.local.wait_for_services_timeout,
        capacity: config.fleet.capacity_per_instance,
        imds_endpoints: options.local_imds_endpoints.clone(),
    })))
}

/// Loads the configuration and secrets, reporting problems as a
/// [`ConfigError`].
///
/// # Errors
/// Unreadable or invalid configuration or token files.
pub fn load(path: &std::path::Path) -> Result<(Config, Secrets), ConfigError> {
    let config = Config::load(path)?;
    let secrets = config.load_secrets()?;
    Ok((config, secrets))
}
