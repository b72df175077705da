//! Helpers shared by the executors' tests: job payloads, contexts, and an
//! output collector that can wait for a line while the job runs.

// Test helpers fail loudly on anything unexpected.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::job::{JobFeatures, JobPayload, RunnerInfo, Step};
use tokio::sync::{mpsc, Notify};

use super::{CancelSignals, Executor, JobContext, JobResult};

/// How long a test waits for expected output before failing.
const OUTPUT_WAIT: Duration = Duration::from_secs(60);

/// A unique job id per call, so tests running at once can tell their
/// containers apart.
pub(crate) fn unique_job_id() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static NEXT: AtomicI64 = AtomicI64::new(0);
    let base = i64::from(std::process::id()) * 1_000_000;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A job with a `script` step, an optional `after_script` step and a timeout
/// in seconds.
pub(crate) fn job_with(script: &[&str], after_script: &[&str], timeout_secs: i64) -> JobPayload {
    let mut steps = vec![Step {
        name: "script".into(),
        script: script.iter().map(|s| (*s).to_owned()).collect(),
        timeout: timeout_secs,
        when: "on_success".into(),
        allow_failure: false,
    }];
    if !after_script.is_empty() {
        steps.push(Step {
            name: "after_script".into(),
            script: after_script.iter().map(|s| (*s).to_owned()).collect(),
            timeout: timeout_secs,
            when: "always".into(),
            allow_failure: true,
        });
    }
    JobPayload {
        id: unique_job_id(),
        token: "glcbt-test-token".into(),
        runner_info: RunnerInfo {
            timeout: timeout_secs,
        },
        steps,
        features: JobFeatures {
            trace_sections: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

pub(crate) fn context(job: JobPayload, work_dir: &Path) -> JobContext {
    JobContext {
        job,
        gitlab_url: String::new(),
        caches: Vec::new(),
        attempt: 1,
        work_dir: work_dir.to_path_buf(),
        concurrent_id: 0,
        agent_name: "test-agent".into(),
        owner: "test-owner".into(),
    }
}

/// Runs `job` to its end and returns the result and the whole log.
pub(crate) async fn run_collecting<E: Executor>(
    executor: &E,
    job: JobPayload,
    work_dir: &Path,
    cancel: CancelSignals,
) -> (JobResult, String) {
    let (tx, rx) = mpsc::channel(1024);
    let log = collect_output(rx);
    let result = executor.run(context(job, work_dir), tx, cancel).await;
    (result, log.finish().await)
}

/// Output collected in the background while a job runs.
pub(crate) struct Collected {
    text: Arc<Mutex<String>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) fn collect_output(mut rx: mpsc::Receiver<Bytes>) -> Collected {
    let text = Arc::new(Mutex::new(String::new()));
    let changed = Arc::new(Notify::new());
    let task = tokio::spawn({
        let text = Arc::clone(&text);
        let changed = Arc::clone(&changed);
        async move {
            while let Some(chunk) = rx.recv().await {
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk));
                changed.notify_waiters();
            }
            changed.notify_waiters();
        }
    });
    Collected {
        text,
        changed,
        task,
    }
}

impl Collected {
    /// What arrived so far.
    pub(crate) fn snapshot(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; panics after [`OUTPUT_WAIT`].
    pub(crate) async fn wait_for(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + OUTPUT_WAIT;
        loop {
            let notified = self.changed.notified();
            if self.snapshot().contains(needle) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "no {needle:?} in the job output within {OUTPUT_WAIT:?}:\n{}",
                    self.snapshot()
                );
            }
        }
    }

    /// Waits for the sender to close and returns everything.
    pub(crate) async fn finish(self) -> String {
        let Collected { text, task, .. } = self;
        task.await.unwrap();
        let text = text.lock().unwrap().clone();
        if std::env::var_os("SERVITOR_TEST_SHOW_LOG").is_some() {
            eprintln!("---- job log ----\n{}\n---- end ----", text.escape_debug());
        }
        text
    }
}
