#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Nothing a job prints is lost: output that ends without a newline (a
//! `printf` as the last command, a long last line written in many small
//! pieces) reaches the GitLab trace in full, with both executors, every
//! run — the attempt's end must not overtake its last bytes anywhere on the
//! way from the job to GitLab.

use std::time::Duration;

use servitor_testkit::gitlab::{JobRecord, JobSpec, JobState};
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Jobs per executor and kind: the loss this guards against was a race,
/// so one lucky run proves little.
const RUNS: usize = 4;

/// Pieces of the long last line; each is a separate write by the shell.
const LONG_LINE_PIECES: usize = 3000;

/// What the long-line job prints: `piece0000-piece0001-…`, no newline.
fn long_line() -> String {
    (0..LONG_LINE_PIECES)
        .map(|i| format!("piece{i:04}-"))
        .collect()
}

/// A job whose last command prints a short text without a newline. The
/// echoed command (`$ printf 'tail-%s' …`) does not contain what it prints.
fn short_tail_job(n: usize) -> JobSpec {
    JobSpec::new(format!("short-tail-{n}")).script([
        "echo begin".to_owned(),
        format!("printf 'tail-%s' {}", 4200 + n),
    ])
}

/// A job whose last line is long, written in thousands of small pieces, and
/// never ends with a newline.
fn long_tail_job(n: usize) -> JobSpec {
    JobSpec::new(format!("long-tail-{n}")).script([
        "echo begin".to_owned(),
        format!(
            "i=0; while [ $i -lt {LONG_LINE_PIECES} ]; do printf 'piece%04d-' $i; i=$((i+1)); done"
        ),
    ])
}

fn assert_complete(r: &JobRecord, wanted: &str) {
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains(wanted),
        "the job's last output ({} bytes, ending {:?}) is missing from the trace:\n{text}",
        wanted.len(),
        &wanted[wanted.len().saturating_sub(20)..]
    );
    assert!(text.contains("Job succeeded"), "{text}");
    assert_eq!(r.checksum_ok, Some(true), "{text}");
}

async fn last_output_without_newline_reaches_the_trace(executor: &'static str) {
    let h = Harness::start(HarnessOptions {
        executor,
        max_instances: 1,
        capacity_per_instance: 2,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let mut jobs = Vec::new();
    for n in 0..RUNS {
        let short = h.standin.push_job(short_tail_job(n)).await.unwrap();
        jobs.push((short, format!("tail-{}", 4200 + n)));
        let long = h.standin.push_job(long_tail_job(n)).await.unwrap();
        jobs.push((long, long_line()));
    }
    for (id, wanted) in jobs {
        let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
        assert_complete(&r, &wanted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_job_output_without_a_final_newline_is_kept() {
    last_output_without_newline_reaches_the_trace("docker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_job_output_without_a_final_newline_is_kept() {
    last_output_without_newline_reaches_the_trace("shell").await;
}
