//! Configuration files the harness, the benches and the demo write: built
//! from the coordinator's and agent's own configuration types and
//! serialised, so they cannot drift from the schema the binaries read.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use servitor_coordinator::config::{
    AgentsConfig, Config, FleetConfig, FleetProvider, GitLabConfig,
};

/// File names below a test directory; tests write the tokens there.
pub const RUNNER_TOKEN_FILE: &str = "runner-token";
pub const JOIN_TOKEN_FILE: &str = "join-token";

/// A change a test makes to the typed configuration before it is written
/// (`max_use_count`, `[[fleet.policy]]` blocks, `[budget]`…).
#[derive(Clone, Default)]
pub struct Tweak(Option<Arc<Change>>);

/// What a [`Tweak`] runs.
type Change = dyn Fn(&mut Config) + Send + Sync;

impl Tweak {
    /// A tweak that runs `change`.
    pub fn new(change: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(change)))
    }

    /// Applies the tweak, if any.
    pub fn apply(&self, config: &mut Config) {
        if let Some(change) = &self.0 {
            change(config);
        }
    }
}

impl std::fmt::Debug for Tweak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Tweak(..)"
        } else {
            "Tweak(none)"
        })
    }
}

/// A coordinator with a local fleet of one instance, its state in
/// `dir/state`, GitLab at `gitlab_url`, the agent link on `listen`, and the
/// token files in `dir` (which the caller writes).
pub fn local(dir: &Path, gitlab_url: &str, listen: SocketAddr) -> Config {
    Config::new(
        dir.join("state"),
        GitLabConfig {
            url: gitlab_url.to_owned(),
            token_file: Some(dir.join(RUNNER_TOKEN_FILE)),
        },
        AgentsConfig::new(listen, dir.join(JOIN_TOKEN_FILE)),
        FleetConfig::new(FleetProvider::Local, 1),
    )
}

/// Writes `config` to `path` as `coordinator.toml` text and reads it back
/// through the coordinator's own loader, so what a test runs is exactly
/// what the file says. Returns the configuration as read.
///
/// # Errors
/// The file cannot be written, or the loader refuses it.
pub fn write(path: &Path, config: &Config) -> anyhow::Result<Config> {
    let text = config.to_toml()?;
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(Config::load(path)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::time::Duration;

    use servitor_coordinator::config::PolicyConfig;

    use super::*;

    #[test]
    fn a_written_configuration_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = local(
            dir.path(),
            "http://127.0.0.1:1",
            "127.0.0.1:0".parse().unwrap(),
        );
        config.fleet_mut().idle_time = Duration::from_secs(90);
        config.fleet_mut().policy.push(PolicyConfig {
            periods: vec!["* 9-17 * * mon-fri".to_owned()],
            idle_count: 2,
            ..PolicyConfig::default()
        });
        let read = write(&dir.path().join("c.toml"), &config).unwrap();
        assert_eq!(
            read.fleet.as_ref().unwrap().idle_time,
            Duration::from_secs(90)
        );
        assert_eq!(read.fleet.as_ref().unwrap().policy[0].idle_count, 2);
        assert_eq!(
            read.fleet.as_ref().unwrap().policy[0].periods,
            config.fleet_mut().policy[0].periods
        );
        assert_eq!(
            read.gitlab.token_file,
            Some(dir.path().join(RUNNER_TOKEN_FILE))
        );
        assert_eq!(read.to_toml().unwrap(), config.to_toml().unwrap());
    }
}
