//! The operator API: tonic gRPC on a local Unix socket (status, drain). The
//! CLI's `status` subcommand is its client. The socket is private to the
//! service user (mode 0600), so no further authentication is needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use servitor_proto::admin::admin_client::AdminClient;
use servitor_proto::admin::admin_server::{Admin, AdminServer};
use servitor_proto::admin::{
    AgentStatus, DrainRequest, DrainResponse, FleetStatus, InstanceStatus, JobStatus,
    StatusRequest, StatusResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::fleet::FleetView;

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

/// What the admin service reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub core: Arc<Core>,
    pub fleet: Arc<FleetView>,
    pub system_id: String,
    /// The CA pin agents are configured with (`ca_sha256`).
    pub ca_pin: String,
    pub concurrent: u32,
    /// Cancelled by the Drain call: stop taking GitLab jobs.
    pub stop_polling: CancellationToken,
}

#[tonic::async_trait]
impl Admin for AdminState {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let agents = self
            .core
            .agents()
            .into_iter()
            .map(|a| AgentStatus {
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
        let jobs = self
            .core
            .jobs()
            .into_iter()
            .map(|j| JobStatus {
                job_id: j.job_id,
                name: j.name,
                attempt: j.attempt,
                state: j.state.to_owned(),
                agent_id: j.agent.unwrap_or_default(),
                age_secs: j.age.as_secs(),
                trace_bytes: j.output_bytes,
            })
            .collect();
        let summary = self.fleet.summary();
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
        let fleet = FleetStatus {
            provider: summary.provider.to_owned(),
            desired: summary.desired,
            spent_usd: summary.spent_usd,
            budget_usd: summary.budget_usd,
            budget_held: summary.budget_held,
        };
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            system_id: self.system_id.clone(),
            concurrent: self.concurrent,
            draining: self.stop_polling.is_cancelled(),
            agents,
            jobs,
            instances,
            fleet: Some(fleet),
            ca_pin: self.ca_pin.clone(),
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        tracing::info!("drain requested: no new GitLab jobs will be taken");
        self.stop_polling.cancel();
        Ok(Response::new(DrainResponse {}))
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
    let fleet = status.fleet.clone().unwrap_or_default();
    let mut heading = format!(
        "\nFLEET {}  instances {}",
        if fleet.provider.is_empty() {
            "?"
        } else {
            &fleet.provider
        },
        status.instances.len()
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
    for i in &status.instances {
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
    let _ = writeln!(out, "\nAGENTS ({})", status.agents.len());
    for a in &status.agents {
        let _ = writeln!(
            out,
            "  {:<24} instance {:<14} {:<6} {}/{} busy{}  connected {}s from {}",
            a.agent_id,
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
            "  #{:<8} {:<24} attempt {}  {:<9} {}  held {}s, {} log bytes",
            j.job_id,
            j.name,
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
