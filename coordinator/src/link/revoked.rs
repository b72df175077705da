//! Revoked agents: agent ids whose certificates the coordinator no longer
//! accepts, kept in a file in the state directory so a restart does not
//! forget them.
//!
//! A certificate names its agent, so revoking the agent id revokes every
//! certificate it was ever issued, renewed ones included. The TLS handshake
//! refuses a revoked agent, renewal refuses it, and live sessions learn of a
//! revocation through [`Revocations::subscribe`] and close their link.
//!
//! Not responsible for deciding who is revoked (the operator does, through
//! the admin API).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The file, in the state directory, that lists revoked agents: one line
/// each, `agent id`, Unix seconds and reason, separated by tabs.
pub const REVOKED_FILE: &str = "revoked-agents";

/// One revocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub at: SystemTime,
    pub reason: String,
}

impl Revoked {
    /// One line for logs and the operator: when and why.
    pub fn describe(&self) -> String {
        let at = humantime::format_rfc3339_seconds(self.at);
        if self.reason.is_empty() {
            format!("revoked at {at}")
        } else {
            format!("revoked at {at}: {}", self.reason)
        }
    }
}

/// The revoked agents, and a signal that fires when one is added.
#[derive(Debug)]
pub struct Revocations {
    path: Option<PathBuf>,
    revoked: Mutex<HashMap<String, Revoked>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Revocations {
    /// The revocations recorded in `path` (none when it does not exist yet).
    ///
    /// # Errors
    /// When the file exists but cannot be read, or a line in it does not
    /// parse (the message names the line).
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let revoked = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|line| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: line {line} is not `agent-id<TAB>unix-seconds<TAB>reason`; fix or remove that line",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self::with(Some(path), revoked))
    }

    /// Revocations kept in memory only.
    pub fn in_memory() -> Self {
        Self::with(None, HashMap::new())
    }

    fn with(path: Option<PathBuf>, revoked: HashMap<String, Revoked>) -> Self {
        Self {
            path,
            revoked: Mutex::new(revoked),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// The revocation of `agent_id`, if it is revoked.
    pub fn get(&self, agent_id: &str) -> Option<Revoked> {
        self.lock().get(agent_id).cloned()
    }

    /// Revokes `agent_id`, on disk first. Returns the revocation in force and
    /// whether it is new (`false`: it was revoked before, and the first
    /// reason stands).
    ///
    /// # Errors
    /// When the file cannot be written: nothing is revoked then.
    pub fn revoke(&self, agent_id: &str, reason: &str) -> std::io::Result<(Revoked, bool)> {
        let mut revoked = self.lock();
        if let Some(earlier) = revoked.get(agent_id) {
            return Ok((earlier.clone(), false));
        }
        let reason = one_line(reason);
        let now = SystemTime::now();
        if let Some(path) = &self.path {
            let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(file, "{agent_id}\t{secs}\t{reason}")?;
            file.sync_all()?;
        }
        let entry = Revoked { at: now, reason };
        revoked.insert(agent_id.to_owned(), entry.clone());
        drop(revoked);
        self.changed.send_modify(|generation| *generation += 1);
        Ok((entry, true))
    }

    /// Changes whenever an agent is revoked.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Revoked>> {
        self.revoked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tabs and line breaks would break the file's lines.
fn one_line(reason: &str) -> String {
    reason
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The file's lines; the number of the first bad line on error.
fn parse(text: &str) -> Result<HashMap<String, Revoked>, usize> {
    let mut revoked = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (Some(id), Some(secs)) = (fields.next(), fields.next()) else {
            return Err(number + 1);
        };
        let secs: u64 = secs.parse().map_err(|_| number + 1)?;
        if id.is_empty() {
            return Err(number + 1);
        }
        // The first revocation of an agent stands.
        revoked.entry(id.to_owned()).or_insert(Revoked {
            at: UNIX_EPOCH + Duration::from_secs(secs),
            reason: fields.next().unwrap_or_default().to_owned(),
        });
    }
    Ok(revoked)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn revocations_survive_a_restart_and_the_first_reason_stands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOKED_FILE);
        let revocations = Revocations::open(path.clone()).unwrap();
        let mut changes = revocations.subscribe();
        assert_eq!(revocations.get("box-1"), None);

        let (first, new) = revocations
            .revoke("box-1", "leaked\tkey\nfrom a job")
            .unwrap();
        assert!(new);
        assert_eq!(first.reason, "leaked key from a job");
        assert!(changes.has_changed().unwrap(), "sessions are told");
        changes.mark_unchanged();

        let (again, new) = revocations.revoke("box-1", "another reason").unwrap();
        assert!(!new);
        assert_eq!(again.reason, "leaked key from a job");
        assert!(!changes.has_changed().unwrap());

        let restarted = Revocations::open(path.clone()).unwrap();
        let kept = restarted.get("box-1").unwrap();
        assert_eq!(kept.reason, "leaked key from a job");
        assert!(kept.describe().contains(": leaked key from a job"));
        assert_eq!(restarted.get("box-2"), None);

        std::fs::write(&path, "box-1\tnot-a-number\treason\n").unwrap();
        let err = Revocations::open(path).unwrap_err();
        assert!(err.to_string().contains("line 1 is not"), "{err}");
    }
}
