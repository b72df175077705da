//! The local fleet: agent processes on this machine, started and stopped
//! like instances. The embedded default for trying Servitor out and for
//! tests; the agents are the real agent binary speaking the real link.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{Fleet, FleetError, FleetInstance};

/// How long a drained agent gets to exit on its own before it is killed.
const REMOVE_GRACE: Duration = Duration::from_secs(30);

/// How local agents are started.
#[derive(Clone, Debug)]
pub struct LocalFleetSettings {
    /// Program and leading arguments; `--config <file>` is appended.
    pub command: Vec<String>,
    /// Each instance gets a directory below this one.
    pub base_dir: PathBuf,
    pub coordinator: SocketAddr,
    pub ca_file: PathBuf,
    pub join_token_file: PathBuf,
    /// `docker` or `shell`.
    pub executor: String,
    pub default_image: Option<String>,
    pub capacity: u32,
    /// Instance metadata endpoints handed to local instances in launch
    /// order (`local-1` gets the first); instances past the list, or all
    /// when it is empty, do not watch instance metadata.
    pub imds_endpoints: Vec<String>,
}

#[derive(Debug)]
struct LocalInstance {
    child: Child,
    launched_at: Instant,
    removing: bool,
}

/// Agent processes on this machine.
#[derive(Debug)]
pub struct LocalFleet {
    settings: LocalFleetSettings,
    procs: Arc<Mutex<HashMap<String, LocalInstance>>>,
    next: AtomicU32,
}

impl LocalFleet {
    /// A fleet with no instances yet.
    pub fn new(settings: LocalFleetSettings) -> Self {
        Self {
            settings,
            procs: Arc::new(Mutex::new(HashMap::new())),
            next: AtomicU32::new(1),
        }
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalInstance>> {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The agent configuration for one local instance (`n` counts from 1).
    fn agent_config(&self, id: &str, n: u32, dir: &std::path::Path) -> String {
        let s = &self.settings;
        let mut text = format!(
            "coordinator = {coordinator:?}\nca_file = {ca:?}\njoin_token_file = {join:?}\nname = {id:?}\nstate_dir = {state:?}\ncapacity = {capacity}\n\n[executor]\nkind = {kind:?}\nwork_dir = {work:?}\n",
            coordinator = s.coordinator.to_string(),
            ca = s.ca_file.display().to_string(),
            join = s.join_token_file.display().to_string(),
            state = dir.join("state").display().to_string(),
            capacity = s.capacity,
            kind = s.executor,
            work = dir.join("builds").display().to_string(),
        );
        if let Some(image) = &s.default_image {
            text.push_str(&format!("default_image = {image:?}\n"));
        }
        text.push_str(&format!(
            "\n[instance]\nid = {id:?}\ninstance_type = \"local\"\nmarket = \"local\"\n"
        ));
        let endpoint = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| s.imds_endpoints.get(i));
        match endpoint {
            Some(url) => text.push_str(&format!("imds = true\nimds_endpoint = {url:?}\n")),
            None => text.push_str("imds = false\n"),
        }
        text
    }

    /// Agent log of an instance (its stderr).
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.settings.base_dir.join(id).join("agent.log")
    }

    /// Process id of an instance's agent, for fault-injection tests.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.procs().get(id).and_then(|p| p.child.id())
    }

    fn spawn_one(&self) -> Result<String, FleetError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("local-{n}");
        let dir = self.settings.base_dir.join(&id);
        let files = |source| FleetError::Files {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(files)?;
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, self.agent_config(&id, n, &dir)).map_err(files)?;
        let log = std::fs::File::create(dir.join("agent.log")).map_err(files)?;
        let (program, args) = self
            .settings
            .command
            .split_first()
            .ok_or_else(|| FleetError::Spawn("fleet.local.agent_command is empty".into()))?;
        let child = Command::new(program)
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Agents must not outlive a coordinator that exits normally.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FleetError::Spawn(format!("{program}: {e}")))?;
        self.procs().insert(
            id.clone(),
            LocalInstance {
                child,
                launched_at: Instant::now(),
                removing: false,
            },
        );
        Ok(id)
    }
}

impl Fleet for LocalFleet {
    fn instances(&self) -> Vec<FleetInstance> {
        let mut procs = self.procs();
        procs.retain(|id, p| match p.child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(instance = %id, %status, "local agent exited");
                false
            }
            _ => true,
        });
        let mut out: Vec<FleetInstance> = procs
            .iter()
            .map(|(id, p)| FleetInstance {
                id: id.clone(),
                launched_at: p.launched_at,
                removing: p.removing,
            })
            .collect();
        out.sort_by(|a, b| a.launched_at.cmp(&b.launched_at).then(a.id.cmp(&b.id)));
        out
    }

    async fn launch(&self, count: u32) -> Result<Vec<String>, FleetError> {
        (0..count).map(|_| self.spawn_one()).collect()
    }

    async fn remove(&self, id: &str) -> Result<(), FleetError> {
        let pid = {
            let mut procs = self.procs();
            let Some(p) = procs.get_mut(id) else {
                return Ok(());
            };
            p.removing = true;
            p.child.id()
        };
        // The agent was told to exit once idle; kill it if it has not by the
        // end of the grace period.
        let procs = self.procs.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(REMOVE_GRACE).await;
            let mut procs = procs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(p) = procs.get_mut(&id) {
                if p.child.id() == pid {
                    tracing::warn!(instance = %id, "agent did not exit after draining; killing it");
                    let _ = p.child.start_kill();
                }
            }
        });
        Ok(())
    }
}
