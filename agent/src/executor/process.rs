//! Host processes that belong to a job (the shell executor's scripts, the git
//! CLI): each is started as the leader of its own process group so that it
//! and everything it started can be signalled together, and a guard kills the
//! group if the attempt is dropped half way.
//!
//! The crate forbids `unsafe`, so groups are signalled through the shell's
//! `kill` builtin rather than `libc::kill`.

use std::process::Stdio;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::output::JobOutput;

/// Every Linux host has it, and its `kill` builtin accepts a negative process
/// group id, unlike some minimal `kill` binaries.
const SIGNAL_SHELL: &str = "/bin/sh";

/// Bytes read from a pipe at a time: a few lines of log output.
const PUMP_CHUNK_BYTES: usize = 8 * 1024;

/// Signals the executor sends to a job's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Ask politely: shells exit, well-behaved programs clean up.
    Term,
    /// Stop now.
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        }
    }
}

/// A process group started for a job. Dropping it kills the group, so a job
/// future dropped mid-way leaves nothing running; call [`release`] once the
/// group has been dealt with.
///
/// [`release`]: ProcessGroup::release
#[derive(Debug)]
pub(crate) struct ProcessGroup {
    pgid: Option<u32>,
}

impl ProcessGroup {
    /// Guards the group led by `pgid` (a child started with
    /// `process_group(0)`).
    pub(crate) fn new(pgid: u32) -> Self {
        Self { pgid: Some(pgid) }
    }

    /// Sends `signal` to every process in the group. A group that is already
    /// gone is not an error.
    pub(crate) async fn signal(&self, signal: Signal) {
        let Some(pgid) = self.pgid else { return };
        let result = tokio::process::Command::new(SIGNAL_SHELL)
            .args(kill_args(pgid, signal))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if let Err(e) = result {
            tracing::warn!(pgid, signal = signal.name(), error = %e, "failed to signal a job's process group");
        }
    }

    /// Stops guarding: the caller has killed the group or it ended.
    pub(crate) fn release(mut self) {
        self.pgid = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // Blocks for the few milliseconds a shell takes; only reached when
            // an attempt is dropped before it finished.
            let result = std::process::Command::new(SIGNAL_SHELL)
                .args(kill_args(pgid, Signal::Kill))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if let Err(e) = result {
                tracing::warn!(pgid, error = %e, "failed to kill a dropped job's process group");
            }
        }
    }
}

fn kill_args(pgid: u32, signal: Signal) -> [String; 5] {
    [
        "-c".to_owned(),
        r#"kill -s "$1" -- "-$2" 2>/dev/null || true"#.to_owned(),
        "kill".to_owned(),
        signal.name().to_owned(),
        pgid.to_string(),
    ]
}

/// Copies `reader` into the job log as bytes arrive, so output shows up live.
pub(crate) async fn pump<R: AsyncRead + Unpin>(mut reader: R, out: JobOutput) {
    let mut buf = vec![0u8; PUMP_CHUNK_BYTES];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => out.write(Bytes::copy_from_slice(&buf[..n])).await,
            Err(e) => {
                tracing::warn!(error = %e, "failed to read job output");
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_group_is_killed_with_its_children() {
        let mut child = tokio::process::Command::new("/bin/sh")
            .args(["-c", "sleep 60 & sleep 60"])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pgid = child.id().unwrap();
        drop(ProcessGroup::new(pgid));
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the group leader should die when its guard is dropped")
            .unwrap();
        assert!(!status.success());
        // No process of the group is left.
        let left = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("kill -0 -- -{pgid} 2>/dev/null")])
            .status()
            .unwrap();
        assert!(!left.success(), "processes of group {pgid} survived");
    }
}
