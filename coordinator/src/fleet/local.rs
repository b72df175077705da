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

use super::{Fleet, FleetError, FleetInstance, Observation};

/// How long a drained agent gets to exit on its own before it is killed.
const REMOVE_GRACE: Duration = Duration::from_secs(30);

/// How local agents are started.
#[derive(Clone, Debug)]
pub struct LocalFleetSettings {
    /// Program and leading arguments; `--config <file>` is appended.
    pub command: Vec<String>,
    /// Each instance gets a directory below this one.
    pub base_dir: PathBuf,
    /// Instances are named `<prefix>-1`, `<prefix>-2`…; `local` for the
    /// only runner, `local-<runner>` for each of several, so no two
    /// runners' instances share a name.
    pub instance_prefix: String,
    /// The runner its agents take jobs for; empty for the only one.
    pub runner: String,
    pub coordinator: SocketAddr,
    pub ca_file: PathBuf,
    pub join_token_file: PathBuf,
    /// `docker` or `shell`.
    pub executor: String,
    pub default_image: Option<String>,
    /// Agents run containers privileged (Docker-in-Docker).
    pub privileged: bool,
    /// Seconds jobs wait for their services; 0 leaves the agent's default.
    pub wait_for_services_timeout: i64,
    pub capacity: u32,
    /// Instance metadata endpoints handed to local instances in launch
    /// order (`local-1` gets the first); instances past the list, or all
    /// when it is empty, do not watch instance metadata.
    pub imds_endpoints: Vec<String>,
}

#[derive(Debug)]
struct LocalInstance {
    process: AgentProcess,
    /// `None` for an agent found running from before a restart.
    launched_at: Option<Instant>,
    removing: bool,
}

/// A local agent process: started by this coordinator, or found running
/// from before a restart (adopted).
#[derive(Debug)]
enum AgentProcess {
    Child(Child),
    Adopted(u32),
}

impl AgentProcess {
    fn pid(&self) -> Option<u32> {
        match self {
            AgentProcess::Child(c) => c.id(),
            AgentProcess::Adopted(pid) => Some(*pid),
        }
    }

    /// Whether it has exited (and, for a child, reaps it).
    fn exited(&mut self) -> Option<String> {
        match self {
            AgentProcess::Child(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                _ => None,
            },
            AgentProcess::Adopted(pid) => (!process_alive(*pid)).then(|| "gone".to_owned()),
        }
    }

    fn kill(&mut self) {
        match self {
            AgentProcess::Child(c) => {
                let _ = c.start_kill();
            }
            AgentProcess::Adopted(pid) => kill_pid(*pid),
        }
    }
}

/// Whether a process runs (and is not a zombie).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// SIGKILL through the `kill` command (the crate forbids `unsafe`).
fn kill_pid(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The process still running from `dir`'s `agent.pid`, if it is the agent
/// started with that directory's configuration.
fn running_agent(dir: &std::path::Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = dir.join("agent.toml").display().to_string();
    let ours = String::from_utf8_lossy(&cmdline).contains(&config);
    (ours && process_alive(pid)).then_some(pid)
}

/// Agent processes on this machine.
#[derive(Debug)]
pub struct LocalFleet {
    settings: LocalFleetSettings,
    procs: Arc<Mutex<HashMap<String, LocalInstance>>>,
    next: AtomicU32,
}

impl LocalFleet {
    /// The local fleet. Agents still running from before a restart are
    /// adopted, not started again: their jobs go on.
    pub fn new(settings: LocalFleetSettings) -> Self {
        let mut procs = HashMap::new();
        let mut next = 1;
        if let Ok(entries) = std::fs::read_dir(&settings.base_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(n) = name
                    .strip_prefix(settings.instance_prefix.as_str())
                    .and_then(|n| n.strip_prefix('-'))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                next = next.max(n + 1);
                if let Some(pid) = running_agent(&entry.path()) {
                    tracing::info!(instance = %name, pid, "adopted a local agent still running from before the restart");
                    procs.insert(
                        name,
                        LocalInstance {
                            process: AgentProcess::Adopted(pid),
                            launched_at: None,
                            removing: false,
                        },
                    );
                }
            }
        }
        Self {
            settings,
            procs: Arc::new(Mutex::new(procs)),
            next: AtomicU32::new(next),
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
        if !s.runner.is_empty() {
            // Top-level key: it goes before the first table.
            text = format!("runner = {:?}\n{text}", s.runner);
        }
        if let Some(image) = &s.default_image {
            text.push_str(&format!("default_image = {image:?}\n"));
        }
        if s.privileged {
            text.push_str("privileged = true\n");
        }
        if s.wait_for_services_timeout != 0 {
            text.push_str(&format!(
                "wait_for_services_timeout = {}\n",
                s.wait_for_services_timeout
            ));
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
        self.procs().get(id).and_then(|p| p.process.pid())
    }

    /// Instances alive now; agents that exited are forgotten.
    pub fn instances(&self) -> Vec<FleetInstance> {
        let mut procs = self.procs();
        procs.retain(|id, p| match p.process.exited() {
            Some(status) => {
                tracing::info!(instance = %id, %status, "local agent exited");
                false
            }
            None => true,
        });
        let mut out: Vec<FleetInstance> = procs
            .iter()
            .map(|(id, p)| FleetInstance {
                id: id.clone(),
                launched_at: p.launched_at,
                removing: p.removing,
                protected: None,
                awaiting_release: false,
                instance_type: "local".to_owned(),
                zone: String::new(),
                market: "local".to_owned(),
            })
            .collect();
        // Adopted ones (no launch time) first, as they are the oldest.
        out.sort_by(|a, b| a.launched_at.cmp(&b.launched_at).then(a.id.cmp(&b.id)));
        out
    }

    fn spawn_one(&self) -> Result<String, FleetError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.settings.instance_prefix);
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
        let mut command = Command::new(program);
        // An instance holds no AWS credentials: what it needs (cache
        // objects) comes as pre-signed URLs.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AWS_") {
                command.env_remove(name);
            }
        }
        let child = command
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
        if let Some(pid) = child.id() {
            // Lets a restarted coordinator find and adopt this agent.
            std::fs::write(dir.join("agent.pid"), pid.to_string()).map_err(files)?;
        }
        self.procs().insert(
            id.clone(),
            LocalInstance {
                process: AgentProcess::Child(child),
                launched_at: Some(Instant::now()),
                removing: false,
            },
        );
        Ok(id)
    }
}

impl Fleet for LocalFleet {
    fn provider(&self) -> &'static str {
        "local"
    }

    async fn observe(&self) -> Result<Observation, FleetError> {
        Ok(Observation {
            instances: self.instances(),
            ..Observation::default()
        })
    }

    async fn launch(&self, count: u32) -> Result<u32, FleetError> {
        let ids = (0..count)
            .map(|_| self.spawn_one())
            .collect::<Result<Vec<_>, _>>()?;
        tracing::debug!(?ids, "started local agents");
        Ok(count)
    }

    async fn remove(&self, id: &str) -> Result<(), FleetError> {
        let pid = {
            let mut procs = self.procs();
            let Some(p) = procs.get_mut(id) else {
                return Ok(());
            };
            p.removing = true;
            p.process.pid()
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
                if p.process.pid() == pid {
                    tracing::warn!(instance = %id, "agent did not exit after draining; killing it");
                    p.process.kill();
                }
            }
        });
        Ok(())
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        // Started agents die with their handles (`kill_on_drop`); adopted
        // ones must be stopped by hand, so a clean exit leaves none behind.
        for p in self.procs().values_mut() {
            if let AgentProcess::Adopted(pid) = p.process {
                kill_pid(pid);
            }
        }
    }
}
