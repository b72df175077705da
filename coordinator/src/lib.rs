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
use tracing::Instrument;

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
    #[error("runner {runner:?}: {source}")]
    Runner {
        runner: String,
        source: gitlab::GitLabError,
    },
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
            CoordinatorError::GitLab(e) | CoordinatorError::Runner { source: e, .. }
                if !e.is_retryable() =>
            {
                servitor_runtime::exit::CONFIG
            }
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

/// One runner the coordinator serves: its GitLab identity and its fleet.
#[derive(Debug)]
pub struct RunnerHandle {
    pub name: String,
    pub system_id: String,
    /// Its fleet, when `provider = "local"`.
    pub local_fleet: Option<Arc<LocalFleet>>,
    /// Its Auto Scaling group, when `provider = "aws-asg"`.
    pub aws_fleet: Option<Arc<AwsFleet>>,
    /// Its ECS cluster, when `provider = "fargate"`.
    pub fargate: Option<Arc<fleet::fargate::FargateFleet>>,
    pub fleet_view: Arc<FleetView>,
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    pub core: Arc<Core>,
    /// Every runner, in the configuration's order.
    pub runners: Vec<RunnerHandle>,
    /// The first runner's local fleet (the only runner's, without
    /// `[[runners]]`), when it has one.
    pub local_fleet: Option<Arc<LocalFleet>>,
    /// The first runner's Auto Scaling group, when it has one.
    pub aws_fleet: Option<Arc<AwsFleet>>,
    /// The first runner's fleet as status shows it.
    pub fleet_view: Arc<FleetView>,
    /// Where Prometheus metrics are served, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The agent link's bound address.
    pub link_addr: SocketAddr,
    pub admin_socket: PathBuf,
    /// The first runner's system id.
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

/// Starts the coordinator: state, PKI, each runner's GitLab verification,
/// agent link, each runner's fleet and poller, and the admin API. Returns
/// once everything listens.
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
    let runners = config.runners();
    if runners.is_empty() || runners.len() != secrets.runner_tokens.len() {
        return Err(ConfigError(format!(
            "{} runners but {} runner tokens were read; load the secrets of this configuration (servitor_coordinator::load)",
            runners.len(),
            secrets.runner_tokens.len()
        ))
        .into());
    }
    // Without [[runners]], the one runner keeps the id it always had.
    let several = !config.runners.is_empty();
    let system_ids = runners
        .iter()
        .map(|r| {
            if several {
                gitlab::load_or_create_runner_system_id(&config.state_dir, &r.name)
            } else {
                gitlab::load_or_create_system_id(&config.state_dir)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pki = pki::Pki::load_or_create(&config.state_dir, &config.agents.server_names)?;
    let ca_pem_path = config.state_dir.join("ca.pem");
    std::fs::write(&ca_pem_path, pki.ca_pem()).map_err(|source| CoordinatorError::StateDir {
        path: ca_pem_path.clone(),
        source,
    })?;

    let mut clients = Vec::with_capacity(runners.len());
    for ((runner, token), system_id) in runners.iter().zip(&secrets.runner_tokens).zip(&system_ids)
    {
        let client = Arc::new(gitlab::GitLabClient::new(gitlab::GitLabSettings::new(
            runner.url.clone(),
            token.clone(),
            system_id.clone(),
        ))?);
        match client.verify().await {
            Ok(_) => {
                tracing::info!(runner = %runner.name, url = %runner.url, %system_id, "runner token verified with GitLab");
            }
            // GitLab down or unreachable is no reason to stop: the jobs
            // held and their agents are served meanwhile (their logs wait
            // in the journal), and new jobs are asked for with backoff.
            Err(e) if e.is_retryable() => {
                tracing::warn!(runner = %runner.name, url = %runner.url, error = %e, "GitLab does not answer at start; held jobs and their agents are served meanwhile, and new jobs are taken once it answers");
            }
            Err(source) => {
                return Err(CoordinatorError::Runner {
                    runner: runner.name.clone(),
                    source,
                })
            }
        }
        clients.push(client);
    }

    let mut agent_runners = Vec::with_capacity(runners.len());
    let mut said_no_cache = false;
    for (runner, token) in runners.iter().zip(&secrets.runner_tokens) {
        let cache = match &config.cache {
            Some(cache) => Some(Arc::new(
                cache::CacheStore::new(cache, token.expose()).await?,
            )),
            None if runner.fleet.provider == FleetProvider::Local => Some(Arc::new(
                cache::CacheStore::local(config.state_dir.join("cache"), token.expose()),
            )),
            None => {
                if !said_no_cache {
                    tracing::warn!("no [cache] configured: jobs' caches are neither restored nor saved on AWS fleets (their logs say so); see the README's cache section");
                    said_no_cache = true;
                }
                None
            }
        };
        agent_runners.push(agents::AgentRunner {
            name: runner.name.clone(),
            gitlab_url: runner.url.clone(),
            cache,
        });
    }

    let revoked_path = config.state_dir.join(link::REVOKED_FILE);
    let revocations = Arc::new(link::Revocations::open(revoked_path.clone()).map_err(
        |source| CoordinatorError::StateDir {
            path: revoked_path,
            source,
        },
    )?);
    // Fargate runners' tasks enroll with credentials minted per task.
    let task_credentials = runners
        .iter()
        .any(|r| r.fleet.provider == FleetProvider::Fargate)
        .then(|| Arc::new(link::task::TaskCredentials::default()));
    let enrollment = link::Enrollment {
        join_token: secrets.join_token.clone(),
        aws_iid: aws_iid_enrollment(&config, &runners).await?,
        revocations: revocations.clone(),
        tasks: task_credentials.clone(),
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
            gitlab_url: runners[0].url.clone(),
        },
        Some(store.clone()),
    );
    for runner in &runners {
        core.metrics().add_runner(&runner.name);
    }
    let tracker = TaskTracker::new();

    // Local agents dial loopback when the link listens on every address.
    let dial = if let Some(addr) = options.local_dial_addr {
        addr
    } else if link_addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), link_addr.port())
    } else {
        link_addr
    };
    let mut prices = PriceBook::new(
        config
            .budget
            .as_ref()
            .map(|b| b.on_demand_hourly_usd.clone())
            .unwrap_or_default(),
    );
    // Tasks are priced by their size: the first Fargate runner's prices.
    if let Some(fargate) = runners.iter().find_map(|r| r.fleet.fargate.as_ref()) {
        prices = prices.with_fargate(fargate.prices.resolve());
    }
    let prices = Arc::new(prices);
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
    let mut handles = Vec::with_capacity(runners.len());
    // What each runner's capacity costs an hour: the one budget sees all.
    let running_hourly: Arc<std::sync::Mutex<std::collections::HashMap<String, f64>>> =
        Arc::default();
    for (runner, system_id) in runners.iter().zip(&system_ids) {
        let mut handle = RunnerHandle {
            name: runner.name.clone(),
            system_id: system_id.clone(),
            local_fleet: None,
            aws_fleet: None,
            fargate: None,
            fleet_view: Arc::new(FleetView::default()),
        };
        match runner.fleet.provider {
            FleetProvider::Local => {
                handle.local_fleet = Some(local_fleet(
                    &config,
                    runner,
                    several,
                    &options,
                    dial,
                    &ca_pem_path,
                )?);
            }
            FleetProvider::AwsAsg => {
                let settings = aws_settings(runner)?;
                handle.aws_fleet = Some(Arc::new(AwsFleet::connect(settings).await?));
            }
            FleetProvider::Fargate => {
                let (Some(fargate), Some(credentials)) = (&runner.fleet.fargate, &task_credentials)
                else {
                    return Err(ConfigError(format!(
                        "{}.provider is \"fargate\" but there is no [{}.fargate] table",
                        runner.fleet_key, runner.fleet_key
                    ))
                    .into());
                };
                let mut fargate = fargate.clone();
                if !fargate.coordinator.contains(':') {
                    // A host alone: tasks dial the port the link is bound to.
                    fargate.coordinator = format!("{}:{}", fargate.coordinator, link_addr.port());
                }
                let settings = fleet::fargate::FargateSettings {
                    runner: runner.name.clone(),
                    config: fargate,
                    max_tasks: runner.fleet.max_instances,
                    boot_timeout: runner.fleet.boot_timeout,
                    ca_pin: pki.ca_sha256_pin(),
                    budget: match (&config.budget, &ledger) {
                        (Some(budget), Some(ledger)) => Some(fleet::fargate::FargateBudget {
                            monthly_usd: budget.monthly_usd,
                            ledger: ledger.clone(),
                            running_hourly: Arc::clone(&running_hourly),
                        }),
                        _ => None,
                    },
                };
                handle.fargate = Some(Arc::new(
                    fleet::fargate::FargateFleet::connect(settings, credentials.clone()).await,
                ));
            }
        }
        handles.push(handle);
    }

    let stop_polling = shutdown.child_token();
    let admin_socket = config.admin_socket();
    let admin_state = admin::AdminState {
        core: core.clone(),
        runners: runners
            .iter()
            .zip(&handles)
            .map(|(runner, handle)| admin::AdminRunner {
                name: runner.name.clone(),
                system_id: handle.system_id.clone(),
                concurrent: runner.concurrent,
                fleet: handle.fleet_view.clone(),
            })
            .collect(),
        ca_pin: pki.ca_sha256_pin(),
        concurrent: config.concurrent,
        stop_polling: stop_polling.clone(),
        revocations,
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
            runners: agent_runners.into(),
        },
        shutdown.clone(),
        tracker.clone(),
    ));
    // The runner that resumes each job found in the lease book, decided once.
    let stored_runners: Vec<usize> = stored
        .iter()
        .map(|job| stored_runner(&runners, job))
        .collect();
    for (index, (runner, handle)) in runners.iter().zip(&handles).enumerate() {
        let fleet_settings = fleet_settings(&config, runner)?;
        let ctx = ReconcileContext {
            core: core.clone(),
            runner: runner.name.clone(),
            view: handle.fleet_view.clone(),
            prices: prices.clone(),
            ledger: ledger.clone(),
            running_hourly: Arc::clone(&running_hourly),
        };
        let span = tracing::info_span!("fleet", runner = %runner.name);
        if let Some(fleet) = &handle.local_fleet {
            tracker.spawn(
                fleet::reconcile(fleet.clone(), ctx, fleet_settings, shutdown.clone())
                    .instrument(span),
            );
        } else if let Some(fleet) = &handle.aws_fleet {
            tracker.spawn(
                fleet::reconcile(fleet.clone(), ctx, fleet_settings, shutdown.clone())
                    .instrument(span),
            );
        } else if let Some(fleet) = &handle.fargate {
            // Jobs held again from the lease book keep their tasks, even if
            // the first pass comes before they are.
            fleet.restoring(
                stored
                    .iter()
                    .zip(&stored_runners)
                    .filter(|(_, r)| **r == index)
                    .map(|(job, _)| (job.job_id, job.lease.attempt)),
            );
            tracker.spawn(
                fleet::fargate::run(
                    fleet.clone(),
                    core.clone(),
                    handle.fleet_view.clone(),
                    shutdown.clone(),
                )
                .instrument(span),
            );
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(config.concurrent).unwrap_or(usize::MAX),
    ));
    let contexts: Vec<jobs::JobsContext> = runners
        .iter()
        .zip(&handles)
        .zip(clients)
        .map(|((runner, handle), gitlab)| jobs::JobsContext {
            core: core.clone(),
            runner: runner.name.clone(),
            gitlab,
            coordinator_name: if several {
                format!("coordinator {} (runner {})", handle.system_id, runner.name)
            } else {
                format!("coordinator {}", handle.system_id)
            },
            max_attempts: config.max_attempts,
            store: Some(store.clone()),
            slots: slots.clone(),
            runner_slots: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(runner.concurrent).unwrap_or(usize::MAX),
            )),
            prices: prices.clone(),
        })
        .collect();
    let resumed = !stored.is_empty();
    for (job, runner) in stored.into_iter().zip(stored_runners) {
        let payload = match servitor_proto::job::JobPayload::from_json(&job.raw) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(job_id = job.job_id, error = %e, "stored job cannot be read; forgetting it (GitLab will time it out)");
                drop(store.submit(vec![store::Change::Remove { job_id: job.job_id }]));
                continue;
            }
        };
        let ctx = &contexts[runner];
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
            ctx.clone(),
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
    for ctx in contexts {
        let span = tracing::info_span!("runner", runner = %ctx.runner);
        tracker.spawn(
            jobs::poll_gitlab(ctx, stop_polling.clone(), shutdown.clone(), tracker.clone())
                .instrument(span),
        );
    }
    {
        let link = link.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            shutdown.cancelled().await;
            link.close();
        });
    }

    let first = &handles[0];
    Ok(Coordinator {
        core,
        local_fleet: first.local_fleet.clone(),
        aws_fleet: first.aws_fleet.clone(),
        fleet_view: first.fleet_view.clone(),
        system_id: first.system_id.clone(),
        runners: handles,
        metrics_addr,
        link_addr,
        admin_socket,
        ca_pem_path,
        shutdown,
        tracker,
        store,
    })
}

/// The runner (an index into `runners`) that resumes a job found in the
/// lease book: the one that took it, or the first when the book does not
/// say (written before runners had names) or names a runner no longer
/// configured.
fn stored_runner(runners: &[config::Runner], job: &store::StoredJob) -> usize {
    let Some(name) = job.runner.as_deref() else {
        return 0;
    };
    runners.iter().position(|r| r.name == name).unwrap_or_else(|| {
        tracing::warn!(job_id = job.job_id, runner = %name, instead = %runners[0].name, "the runner that took this job is no longer configured; its fleet cannot run it, the first runner's does");
        0
    })
}

/// The Auto Scaling group of an `aws-asg` runner.
fn aws_settings(runner: &config::Runner) -> Result<AwsFleetSettings, ConfigError> {
    let aws = runner.fleet.aws.as_ref().ok_or_else(|| {
        ConfigError(format!(
            "{}.provider is \"aws-asg\" but there is no [{}.aws] table",
            runner.fleet_key, runner.fleet_key
        ))
    })?;
    Ok(AwsFleetSettings {
        group: aws.group.clone(),
        region: aws.region.clone(),
        endpoint_url: aws.endpoint_url.clone(),
        lifecycle_hook: aws.lifecycle_hook.clone(),
        max_instances: runner.fleet.max_instances,
    })
}

/// The sizing knobs of a runner's fleet, with the budget they all share.
fn fleet_settings(
    config: &Config,
    runner: &config::Runner,
) -> Result<fleet::FleetSettings, ConfigError> {
    let f = &runner.fleet;
    let blocks = f
        .policy
        .iter()
        .map(config::PolicyConfig::to_block)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError(format!("{}.policy: {e}", runner.fleet_key)))?;
    Ok(fleet::FleetSettings {
        budget: config
            .budget
            .as_ref()
            .map(|b| fleet::budget::BudgetSettings {
                monthly_usd: b.monthly_usd,
                on_demand_hourly_usd: b.on_demand_hourly_usd.clone(),
            }),
        policy: fleet::policy::FleetPolicy {
            capacity_per_instance: f.capacity_per_instance,
            max_instances: f.max_instances,
            max_use_count: f.max_use_count,
            boot_timeout: Some(f.boot_timeout),
            lost_grace: config.agents.lost_grace,
            launch_rate: (f.max_launches > 0).then_some(fleet::policy::LaunchRate {
                max: f.max_launches,
                per: f.launch_window,
            }),
            idle: fleet::schedule::ActivePolicy {
                idle_count: f.idle_count,
                idle_time: f.idle_time,
                scale_factor: f.scale_factor,
                scale_factor_limit: f.scale_factor_limit,
                block: None,
            },
        },
        blocks,
    })
}

/// Enrollment by instance identity, when `[agents.aws_iid]` asks for it:
/// the certificates (built in, or the configured file), membership of any
/// of the groups the runners size, and the record of instances that
/// enrolled.
async fn aws_iid_enrollment(
    config: &Config,
    runners: &[config::Runner],
) -> Result<Option<link::AwsIidEnrollment>, CoordinatorError> {
    let Some(iid) = &config.agents.aws_iid else {
        return Ok(None);
    };
    let groups: Vec<AwsFleetSettings> = runners
        .iter()
        .filter(|r| r.fleet.provider == FleetProvider::AwsAsg)
        .map(aws_settings)
        .collect::<Result<_, _>>()?;
    if groups.is_empty() {
        return Ok(None);
    }
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
    let mut memberships = Vec::with_capacity(groups.len());
    for group in &groups {
        memberships.push(fleet::aws::AsgMembership::connect(group).await);
    }
    let record = config.state_dir.join("enrolled-instances");
    let enrolled = link::EnrolledInstances::open(Some(record.clone())).map_err(|source| {
        CoordinatorError::StateDir {
            path: record,
            source,
        }
    })?;
    tracing::info!(
        regions = verifier.regions().len(),
        groups = ?groups.iter().map(|g| g.group.as_str()).collect::<Vec<_>>(),
        "agents of the groups may enroll by instance identity"
    );
    Ok(Some(link::AwsIidEnrollment {
        verifier,
        membership: Arc::new(fleet::aws::AnyGroup(memberships)),
        enrolled: Arc::new(enrolled),
    }))
}

/// A runner's local fleet: agent processes of the `servitor-agent` binary
/// installed beside this one, unless `fleet.local.agent_command` (or the
/// embedder) names another program. With several runners, each runner's
/// instances have a name and directory of their own.
fn local_fleet(
    config: &Config,
    runner: &config::Runner,
    several: bool,
    options: &StartOptions,
    dial: SocketAddr,
    ca_pem_path: &std::path::Path,
) -> Result<Arc<LocalFleet>, CoordinatorError> {
    let local = &runner.fleet.local;
    // The embedder's relay first, then the configured one, then the link.
    let dial = match options.local_dial_addr {
        Some(_) => dial,
        None => local.dial.unwrap_or(dial),
    };
    let command = match (&options.agent_command, local.agent_command.is_empty()) {
        (Some(c), _) => c.clone(),
        (None, false) => local.agent_command.clone(),
        (None, true) => vec![agent_beside_this_binary()?.display().to_string()],
    };
    let (base_dir, instance_prefix, agent_runner) = if several {
        (
            config
                .state_dir
                .join(format!("local-fleet-{}", runner.name)),
            format!("local-{}", runner.name),
            runner.name.clone(),
        )
    } else {
        (
            config.state_dir.join("local-fleet"),
            "local".to_owned(),
            String::new(),
        )
    };
    Ok(Arc::new(LocalFleet::new(LocalFleetSettings {
        command,
        base_dir,
        instance_prefix,
        runner: agent_runner,
        coordinator: dial,
        ca_file: ca_pem_path.to_owned(),
        join_token_file: config.agents.join_token_file.clone(),
        executor: match local.executor {
            ExecutorChoice::Auto => "auto",
            ExecutorChoice::Docker => "docker",
            ExecutorChoice::Shell => "shell",
        }
        .to_owned(),
        default_image: local.default_image.clone(),
        privileged: local.privileged,
        wait_for_services_timeout: local.wait_for_services_timeout,
        capacity: runner.fleet.capacity_per_instance,
        imds_endpoints: if options.local_imds_endpoints.is_empty() {
            local.imds_endpoints.clone()
        } else {
            options.local_imds_endpoints.clone()
        },
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
