//! The operator API: tonic gRPC on a local Unix socket (status, drain,
//! revoke). The CLI's subcommands are its client. The socket is private to the
//! service user (mode 0600), so no further authentication is needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use servitor_proto::admin::admin_client::AdminClient;
use servitor_proto::admin::admin_server::{Admin, AdminServer};
use servitor_proto::admin::{
    AgentStatus, DrainRequest, DrainResponse, FleetStatus, InstanceStatus, JobStatus,
    RevokeRequest, RevokeResponse, RunnerStatus, StatusRequest, StatusResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::fleet::FleetView;
use crate::link::Revocations;

/// Admin API failures.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the coordinator's admin socket {path}: {detail}; is the coordinator running, and are you the user it runs as?")]
    Connect { path: PathBuf, detail: String },
    #[error("admin request failed: {0}")]
    Call(#[from] Status),
    #[error("admin server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A runner, as the admin service shows it.
#[derive(Debug, Clone)]
pub struct AdminRunner {
    pub name: String,
    pub system_id: String,
    pub concurrent: u32,
    pub fleet: Arc<FleetView>,
}

/// What the admin service reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub core: Arc<Core>,
    /// Every runner, in the configuration's order.
    pub runners: Vec<AdminRunner>,
    /// The CA pin agents are configured with (`ca_sha256`).
    pub ca_pin: String,
    pub concurrent: u32,
    /// Cancelled by the Drain call: stop taking GitLab jobs.
    pub stop_polling: CancellationToken,
    /// Agents whose certificates are revoked.
    pub revocations: Arc<Revocations>,
}

/// One runner's part of the status: its fleet as of the last reconcile
/// pass, and how many of the held jobs are its own.
fn runner_status(runner: &AdminRunner, held: &[crate::core::JobSnapshot]) -> RunnerStatus {
    let summary = runner.fleet.summary();
    let instances = summary
        .instances
        .iter()
        .map(|i| InstanceStatus {
            instance_id: i.id.clone(),
            state: i.state.to_owned(),
            age_secs: i.age.as_secs(),
            instance_type: i.instance_type.clone(),
            market: i.market.clone(),
            protected: i.protected,
        })
        .collect();
    RunnerStatus {
        name: runner.name.clone(),
        system_id: runner.system_id.clone(),
        concurrent: runner.concurrent,
        held: u32::try_from(held.iter().filter(|j| j.runner == runner.name).count())
            .unwrap_or(u32::MAX),
        fleet: Some(FleetStatus {
            provider: summary.provider.to_owned(),
            desired: summary.desired,
            spent_usd: summary.spent_usd,
            budget_usd: summary.budget_usd,
            budget_held: summary.budget_held,
        }),
        instances,
    }
}

#[tonic::async_trait]
impl Admin for AdminState {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let agents = self
            .core
            .agents()
            .into_iter()
            .map(|a| AgentStatus {
                runner: a.runner,
                agent_id: a.agent_id,
                instance_id: a.instance_id,
                executor: a.executor,
                capacity: a.capacity,
                running: a.busy,
                draining: a.draining,
                connected_secs: a.connected_for.as_secs(),
                remote_addr: a.remote.to_string(),
            })
            .collect();
        let held = self.core.jobs();
        let runners: Vec<RunnerStatus> = self
            .runners
            .iter()
            .map(|r| runner_status(r, &held))
            .collect();
        let jobs = held
            .into_iter()
            .map(|j| JobStatus {
                runner: j.runner,
                job_id: j.job_id,
                name: j.name,
                attempt: j.attempt,
                state: j.state.to_owned(),
                agent_id: j.agent.unwrap_or_default(),
                age_secs: j.age.as_secs(),
                trace_bytes: j.output_bytes,
            })
            .collect();
        let first = runners.first().cloned().unwrap_or_default();
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            system_id: first.system_id,
            concurrent: self.concurrent,
            draining: self.stop_polling.is_cancelled(),
            agents,
            jobs,
            instances: first.instances,
            fleet: first.fleet,
            ca_pin: self.ca_pin.clone(),
            runners,
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        tracing::info!("drain requested: no new GitLab jobs will be taken");
        self.stop_polling.cancel();
        Ok(Response::new(DrainResponse {}))
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let RevokeRequest { agent_id, reason } = request.into_inner();
        let agent_id = agent_id.trim();
        if agent_id.is_empty() {
            return Err(Status::invalid_argument(
                "no agent id given; `servitor-coordinator status` lists them",
            ));
        }
        let was_connected = self.core.agents().iter().any(|a| a.agent_id == agent_id);
        let (revoked, new) = self.revocations.revoke(agent_id, &reason).map_err(|e| {
            Status::internal(format!(
                "cannot record the revocation in the state directory ({e}); nothing was revoked"
            ))
        })?;
        if new {
            tracing::warn!(agent = %agent_id, connected = was_connected, revocation = %revoked.describe(), "agent revoked: its certificate is refused from now on");
        }
        Ok(Response::new(RevokeResponse {
            was_connected,
            already_revoked: !new,
            revocation: revoked.describe(),
        }))
    }
}

/// The CLI's answer to a revocation, one line.
pub fn render_revocation(agent_id: &str, response: &RevokeResponse) -> String {
    if response.already_revoked {
        format!(
            "agent {agent_id} was already {}; nothing changed\n",
            response.revocation
        )
    } else if response.was_connected {
        format!(
            "agent {agent_id} {}; its link is closed and its jobs run again elsewhere\n",
            response.revocation
        )
    } else {
        format!(
            "agent {agent_id} {} (it is not connected now; it cannot connect or renew again)\n",
            response.revocation
        )
    }
}

/// Serves the admin API on `path` until `stop`; `ready` learns whether the
/// socket could be bound.
///
/// # Errors
/// The server fails after binding.
pub async fn serve_with_ready(
    path: &Path,
    state: AdminState,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<Result<(), AdminError>>,
) -> Result<(), AdminError> {
    let listener = match bind(path) {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(state))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}

fn bind(path: &Path) -> Result<tokio::net::UnixListener, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    let bind = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind)?;
    }
    // A socket left by a killed coordinator would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    Ok(listener)
}

/// Connects to the admin API on `path`.
///
/// # Errors
/// The socket is missing or refuses.
pub async fn connect(path: &Path) -> Result<AdminClient<tonic::transport::Channel>, AdminError> {
    let socket = path.to_owned();
    let fail = |detail: String| AdminError::Connect {
        path: path.to_owned(),
        detail,
    };
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
        .map_err(|e| fail(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            fail(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ))
        })?;
    Ok(AdminClient::new(channel))
}

/// Renders a status snapshot as the `status` subcommand prints it.
pub fn render_status(status: &StatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "servitor coordinator {}  system_id {}  jobs {}/{}{}",
        status.version,
        status.system_id,
        status.jobs.len(),
        status.concurrent,
        if status.draining { "  (draining)" } else { "" }
    );
    if !status.ca_pin.is_empty() {
        let _ = writeln!(out, "agents trust ca_sha256 = {:?}", status.ca_pin);
    }
    let several = status.runners.len() > 1;
    let runners: Vec<RunnerStatus> = if status.runners.is_empty() {
        // A coordinator from before runners were listed.
        vec![RunnerStatus {
            system_id: status.system_id.clone(),
            fleet: status.fleet.clone(),
            instances: status.instances.clone(),
            ..RunnerStatus::default()
        }]
    } else {
        status.runners.clone()
    };
    for runner in &runners {
        render_fleet(&mut out, runner, several);
    }
    let _ = writeln!(out, "\nAGENTS ({})", status.agents.len());
    for a in &status.agents {
        let _ = writeln!(
            out,
            "  {:<24} {}instance {:<14} {:<6} {}/{} busy{}  connected {}s from {}",
            a.agent_id,
            if several {
                format!("runner {:<10} ", a.runner)
            } else {
                String::new()
            },
            a.instance_id,
            a.executor,
            a.running,
            a.capacity,
            if a.draining { " draining" } else { "" },
            a.connected_secs,
            a.remote_addr
        );
    }
    let _ = writeln!(out, "\nJOBS ({})", status.jobs.len());
    for j in &status.jobs {
        let _ = writeln!(
            out,
            "  #{:<8} {:<24} {}attempt {}  {:<9} {}  held {}s, {} log bytes",
            j.job_id,
            j.name,
            if several {
                format!("runner {:<10} ", j.runner)
            } else {
                String::new()
            },
            j.attempt,
            j.state,
            if j.agent_id.is_empty() {
                "-"
            } else {
                &j.agent_id
            },
            j.age_secs,
            j.trace_bytes
        );
    }
    out
}

/// One runner's fleet section of the status: a heading with its size and
/// budget, then its instances. With several runners the heading names the
/// runner, its system id and its jobs.
fn render_fleet(out: &mut String, runner: &RunnerStatus, several: bool) {
    use std::fmt::Write;
    let fleet = runner.fleet.clone().unwrap_or_default();
    let mut heading = String::from("\n");
    if several {
        let _ = writeln!(
            heading,
            "RUNNER {}  system_id {}  jobs {}/{}",
            runner.name, runner.system_id, runner.held, runner.concurrent
        );
    }
    let _ = write!(
        heading,
        "FLEET {}  instances {}",
        if fleet.provider.is_empty() {
            "?"
        } else {
            &fleet.provider
        },
        runner.instances.len()
    );
    if let Some(desired) = fleet.desired {
        let _ = write!(heading, "  desired {desired}");
    }
    match fleet.budget_usd {
        Some(cap) => {
            let _ = write!(
                heading,
                "  spent ${:.2} of ${cap:.2} this month",
                fleet.spent_usd
            );
        }
        None if fleet.spent_usd > 0.0 => {
            let _ = write!(heading, "  spent ${:.2} this month", fleet.spent_usd);
        }
        None => {}
    }
    if fleet.budget_held > 0 {
        let _ = write!(
            heading,
            "  ({} launches held back by the budget)",
            fleet.budget_held
        );
    }
    let _ = writeln!(out, "{heading}");
    for i in &runner.instances {
        let kind = [i.instance_type.as_str(), i.market.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            out,
            "  {:<20} {:<10} {:<18} up {}s{}",
            i.instance_id,
            i.state,
            kind,
            i.age_secs,
            if i.protected == Some(true) {
                "  protected"
            } else {
                ""
            }
        );
    }
}
