#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Nothing a job prints is lost: output that ends without a newline (a
//! `printf` as the last command, a long last line written in many small
//! pieces, the last words of an attempt handed back on a Spot notice)
//! reaches the GitLab trace in full, with both executors, every run — the
//! attempt's end must not overtake its last bytes anywhere on the way from
//! the job to GitLab.

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

/// What the first attempt prints last, without a newline, before its
/// instance is interrupted. The echoed command
/// (`$ printf 'tail-%s' before-handback`) does not contain it.
const HANDBACK_TAIL: &str = "tail-before-handback";

/// How long the job sleeps after its tail: the first attempt is handed back
/// during the sleep (instance metadata is polled every second); the second
/// sleeps it through and succeeds.
const HANDBACK_JOB_SLEEP_SECS: u32 = 15;

async fn output_without_newline_before_a_handback_reaches_the_trace(executor: &'static str) {
    let h = Harness::start(HarnessOptions {
        executor,
        max_instances: 2,
        capacity_per_instance: 1,
        imds_instances: 2,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("handback-tail").script([
            "echo begin".to_owned(),
            "printf 'tail-%s' before-handback".to_owned(),
            format!("sleep {HANDBACK_JOB_SLEEP_SECS}"),
        ]))
        .await
        .unwrap();
    // The command is echoed right before it runs: once the echo is in the
    // trace, the tail follows within moments, and the notice lands while
    // the job sleeps with the tail as its last output.
    h.wait_trace(id, "printf 'tail-%s' before-handback", JOB_TIMEOUT)
        .await
        .unwrap();
    h.imds_of_job(id)
        .expect("the job runs on an instance with instance metadata")
        .set_spot_action("terminate", Duration::from_secs(120));
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    let handback = text
        .find("Attempt 1 stopped at")
        .unwrap_or_else(|| panic!("the first attempt was not handed back:\n{text}"));
    assert!(
        text[handback..].contains("Spot interruption notice"),
        "handed back for the notice: {text}"
    );
    assert!(
        text[..handback].contains(HANDBACK_TAIL),
        "the first attempt's last output is missing before the hand-back:\n{text}"
    );
    assert!(text[handback..].contains("Attempt 2 of"), "{text}");
    assert!(text.contains("Job succeeded"), "{text}");
    assert_eq!(r.checksum_ok, Some(true), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_job_output_without_a_newline_before_a_spot_handback_is_kept() {
    output_without_newline_before_a_handback_reaches_the_trace("docker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_job_output_without_a_newline_before_a_spot_handback_is_kept() {
    output_without_newline_before_a_handback_reaches_the_trace("shell").await;
}
