//! End-to-end tests of the client and the job reporter against the GitLab
//! stand-in, over real HTTP on loopback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use servitor_proto::agent::FailureKind;
use servitor_proto::job::JobPayload;
use servitor_runtime::backoff::Backoff;
use servitor_runtime::secret::Secret;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use servitor_testkit::gitlab::{
    Fault, JobRecord, JobSpec, JobState as StandInState, Route, StandIn, StandInConfig,
    DEFAULT_RUNNER_TOKEN,
};

const WAIT: Duration = Duration::from_secs(10);
const SYSTEM_ID: &str = "s_0123456789ab";

async fn standin_with(interval: u64) -> StandIn {
    StandIn::start(StandInConfig {
        trace_update_interval: interval,
        ..StandInConfig::default()
    })
    .await
    .unwrap()
}

fn settings(standin: &StandIn, token: &str) -> GitLabSettings {
    let mut settings = GitLabSettings::new(
        format!("{}/ci/", standin.url()),
        Secret::new(token),
        SYSTEM_ID,
    );
    settings.request_timeout = Duration::from_secs(5);
    settings.poll_interval = Duration::from_millis(100);
    settings
}

fn client(standin: &StandIn) -> Arc<GitLabClient> {
    Arc::new(GitLabClient::new(settings(standin, DEFAULT_RUNNER_TOKEN)).unwrap())
}

/// Queues `spec` and takes it as the runner would.
async fn take_job(standin: &StandIn, client: &GitLabClient, spec: JobSpec) -> JobPayload {
    let id = standin.push_job(spec).await.unwrap();
    let mut backoff =
        Backoff::try_new(Duration::from_millis(10), Duration::from_millis(50)).unwrap();
    let job = client
        .next_job(&mut backoff, &CancellationToken::new())
        .await
        .unwrap();
    let payload = job.payload.unwrap();
    assert_eq!(payload.id, id);
    *payload
}

async fn start_reporter(
    standin: &StandIn,
    client: &Arc<GitLabClient>,
    spec: JobSpec,
) -> (JobPayload, JobReporterHandle, mpsc::Receiver<RemoteEvent>) {
    let job = take_job(standin, client, spec).await;
    let (handle, events) = JobReporter::start(Arc::clone(client), &job, CancellationToken::new());
    (job, handle, events)
}

async fn wait_for(
    standin: &StandIn,
    id: i64,
    what: &'static str,
    check: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    standin.wait_for(id, what, WAIT, check).await.unwrap()
}

#[tokio::test]
async fn verify_ok_and_bad_token() {
    let standin = standin_with(3).await;
    let verified = client(&standin).verify().await.unwrap();
    assert_eq!(verified.id, Some(1));
    let log = standin.verify_log();
    assert_eq!(log[0].system_id.as_deref(), Some(SYSTEM_ID));
    assert_eq!(log[0].info["name"], "servitor");
    assert_eq!(log[0].info["features"]["cancel_gracefully"], true);
    assert_eq!(log[0].info["features"]["artifacts"], true);
    assert_eq!(log[0].info["features"]["services"], true);
    assert_eq!(log[0].info["features"]["session"], false);
    assert_eq!(
        log[0].user_agent.as_deref(),
        Some(concat!("servitor/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(log[0].request_id.as_ref().map(String::len), Some(32));

    let bad = GitLabClient::new(settings(&standin, "glrt-wrong")).unwrap();
    let err = bad.verify().await.unwrap_err();
    assert!(matches!(err, GitLabError::Forbidden), "{err:?}");
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("invalid or the runner was deleted"),
        "{err}"
    );

    standin.fail_next(Route::Verify, vec![Fault::status(422)]);
    let err = client(&standin).verify().await.unwrap_err();
    assert!(matches!(err, GitLabError::Orphaned), "{err:?}");
}

#[tokio::test]
async fn request_204_then_201_with_last_update_echoed() {
    let standin = standin_with(3).await;
    let client = client(&standin);
    assert!(matches!(
        client.request_job().await.unwrap(),
        RequestedJob::NoJob
    ));
    let first_value = standin.queue_value();
    assert_eq!(client.last_update().as_deref(), Some(first_value.as_str()));

    let id = standin
        .push_job(JobSpec::new("build").script(["echo hi"]))
        .await
        .unwrap();
    let RequestedJob::Job(job) = client.request_job().await.unwrap() else {
        panic!("expected a job");
    };
    let payload = job.payload.unwrap();
    assert_eq!(payload.id, id);
    assert_eq!(payload.job_info.name, "build");
    assert!(payload.token.starts_with("glcbt-"));
    let log = standin.request_log();
    assert_eq!(log[0].last_update, None);
    assert_eq!(log[1].last_update.as_deref(), Some(first_value.as_str()));
    assert_eq!(log[1].status, 201);
    assert_eq!(standin.job(id).unwrap().state, StandInState::Running);
}

#[tokio::test]
async fn long_poll_is_answered_as_soon_as_a_job_is_queued() {
    let standin = standin_with(3).await;
    let client = client(&standin);
    assert!(matches!(
        client.request_job().await.unwrap(),
        RequestedJob::NoJob
    ));
    // The runner now holds the current queue version: the next request is held.
    let started = Instant::now();
    let waiter = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.request_job().await })
    };
    // Queue the job only once the second request is held at the stand-in.
    standin.wait_for_requests(2, WAIT).await.unwrap();
    let held = started.elapsed();
    standin.push_job(JobSpec::new("late")).await.unwrap();
    let answer = waiter.await.unwrap().unwrap();
    assert!(matches!(answer, RequestedJob::Job(_)));
    let took = started.elapsed();
    assert!(
        took < held + Duration::from_millis(1500),
        "answered {:?} after the job was queued, not at once",
        took - held
    );

    // The queue version moved with the new job: the next request learns it
    // at once, and the one after is held for the whole long poll.
    let started = Instant::now();
    assert!(matches!(
        client.request_job().await.unwrap(),
        RequestedJob::NoJob
    ));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(client.last_update(), Some(standin.queue_value()));
    let started = Instant::now();
    assert!(matches!(
        client.request_job().await.unwrap(),
        RequestedJob::NoJob
    ));
    assert!(started.elapsed() >= Duration::from_millis(1900));
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_backed_off() {
    let standin = standin_with(3).await;
    let client = client(&standin);
    standin.fail_next_requests(vec![
        Fault::rate_limited(1),
        Fault::status(500),
        Fault::status(502),
        Fault::status(409),
    ]);
    standin
        .push_job(JobSpec::new("after faults"))
        .await
        .unwrap();
    let mut backoff =
        Backoff::try_new(Duration::from_millis(100), Duration::from_millis(400)).unwrap();
    let job = client
        .next_job(&mut backoff, &CancellationToken::new())
        .await
        .unwrap();
    assert!(job.payload.is_ok());
    let log = standin.request_log();
    let statuses: Vec<u16> = log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 500, 502, 409, 201]);
    let gaps: Vec<Duration> = log.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_secs(1),
        "Retry-After not honoured: {gaps:?}"
    );
    for gap in &gaps[1..] {
        // Jittered between half and all of the current backoff step.
        assert!(*gap >= Duration::from_millis(50), "no backoff: {gaps:?}");
    }
}

#[tokio::test]
async fn forbidden_stops_the_poller_and_cancel_ends_it() {
    let standin = standin_with(3).await;
    let bad = GitLabClient::new(settings(&standin, "glrt-wrong")).unwrap();
    let mut backoff =
        Backoff::try_new(Duration::from_millis(10), Duration::from_millis(50)).unwrap();
    let err = bad
        .next_job(&mut backoff, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, GitLabError::Forbidden), "{err:?}");
    assert_eq!(standin.request_count(), 1);

    let cancel = CancellationToken::new();
    let client = client(&standin);
    let poller = {
        let cancel = cancel.clone();
        tokio::spawn(async move { client.next_job(&mut backoff, &cancel).await })
    };
    // Cancel while the poll is held at the stand-in.
    standin.wait_for_requests(2, WAIT).await.unwrap();
    cancel.cancel();
    let err = poller.await.unwrap().unwrap_err();
    assert!(matches!(err, GitLabError::Cancelled), "{err:?}");
}

#[tokio::test]
async fn unusable_job_can_be_rejected() {
    let standin = standin_with(3).await;
    let client = client(&standin);
    let id = standin.push_job(JobSpec::new("x")).await.unwrap();
    let job = take_job_raw(&client).await;
    let payload = job.payload.unwrap();
    let token = Secret::new(payload.token.clone());
    client
        .reject_job(id, &token, "the job payload could not be read")
        .await
        .unwrap();
    let record = standin.job(id).unwrap();
    assert_eq!(record.state, StandInState::Failed);
    let update = record.final_update.clone().unwrap();
    assert_eq!(
        update.failure_reason.as_deref(),
        Some("runner_system_failure")
    );
    assert_eq!(record.checksum_ok, Some(true));
    assert!(record.trace_text().contains("could not be read"));
}

async fn take_job_raw(client: &GitLabClient) -> ReceivedJob {
    let mut backoff =
        Backoff::try_new(Duration::from_millis(10), Duration::from_millis(50)).unwrap();
    client
        .next_job(&mut backoff, &CancellationToken::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn trace_arrives_in_order_with_a_correct_checksum() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("trace")).await;
    let first = wait_for(&standin, job.id, "running update", |r| {
        !r.updates.is_empty()
    })
    .await;
    assert_eq!(first.updates[0].state, "running");
    assert_eq!(first.updates[0].status, 200);

    // The first line goes out promptly, without waiting for more.
    let started = Instant::now();
    handle.append(Bytes::from_static(b"line 1\n"));
    wait_for(&standin, job.id, "first line", |r| !r.trace.is_empty()).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let mut expected = b"line 1\n".to_vec();
    for i in 2..200 {
        let line = format!("line {i}\n");
        expected.extend_from_slice(line.as_bytes());
        handle.append(Bytes::from(line));
        if i % 50 == 0 {
            // Let this much reach GitLab before appending more, so the log
            // goes out in several PATCHes.
            let sent = expected.len();
            wait_for(&standin, job.id, "a batch of lines", |r| {
                r.trace.len() >= sent
            })
            .await;
        }
    }
    let report = handle.finish(FinalState::Success).await.unwrap();
    assert_eq!(report.output, TraceOutput::of(&expected));
    assert_eq!(handle.sent_bytes(), expected.len() as u64);
    assert_eq!(handle.trace_len(), expected.len() as u64);

    let record = standin.job(job.id).unwrap();
    assert_eq!(record.trace, expected);
    assert_eq!(record.state, StandInState::Success);
    assert_eq!(record.checksum_ok, Some(true));
    assert_eq!(record.bytesize_ok, Some(true));
    let last = record.final_update.unwrap();
    assert_eq!(last.state, "success");
    assert_eq!(last.exit_code, None);
    assert_eq!(last.failure_reason, None);
    assert!(record.patches.iter().all(|p| p.status == 202));
    assert!(
        record.patches.len() >= 2,
        "{} patches",
        record.patches.len()
    );

    // A second finish is refused.
    let err = handle.finish(FinalState::Success).await.unwrap_err();
    assert!(matches!(err, GitLabError::ReporterClosed { .. }), "{err:?}");
}

#[tokio::test]
async fn trace_is_restored_after_416() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let spec = JobSpec::new("416").masked_variable("SECRET", "hide-me-please");
    let (job, handle, _events) = start_reporter(&standin, &client, spec).await;
    handle.append(Bytes::from_static(b"first part, secret hide-me-please\n"));
    wait_for(&standin, job.id, "first part", |r| r.trace.len() > 10).await;
    // GitLab lost some trace: the next PATCH gets 416 and must resend.
    standin.truncate_trace(job.id, 5).unwrap();
    handle.append(Bytes::from_static(b"second part\n"));
    wait_for(&standin, job.id, "second part", |r| {
        r.trace_text().contains("second")
    })
    .await;
    // And a 416 out of the blue (same offset) is survived too.
    standin.next_patch_416(job.id).unwrap();
    handle.append(Bytes::from_static(b"third part\n"));
    let report = handle.finish(FinalState::Success).await.unwrap();

    let expected = b"first part, secret [MASKED]\nsecond part\nthird part\n";
    let record = standin.job(job.id).unwrap();
    assert_eq!(record.trace_text(), String::from_utf8_lossy(expected));
    assert_eq!(report.output, TraceOutput::of(expected));
    assert_eq!(record.checksum_ok, Some(true));
    assert!(record.patches.iter().filter(|p| p.status == 416).count() >= 2);
}

#[tokio::test]
async fn memory_keeps_a_window_of_the_log_and_the_journal_serves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let standin = standin_with(1).await;
    let client = client(&standin);
    let job = take_job(&standin, &client, JobSpec::new("journaled")).await;
    store
        .submit(vec![crate::store::Change::Hold {
            job_id: job.id,
            raw: Bytes::from_static(b"{}"),
            runner: "default".into(),
        }])
        .durable()
        .await
        .unwrap();
    let resume = Resume {
        journal: Some(store.journal(job.id, 0)),
        ..Resume::default()
    };
    let (handle, _events) =
        JobReporter::start_with(Arc::clone(&client), &job, CancellationToken::new(), resume);

    // More output at once than memory keeps: the oldest goes out from the
    // journal.
    let mut expected = Vec::new();
    for i in 0..6000 {
        let line = format!("line {i:05} {}\n", "x".repeat(90));
        expected.extend_from_slice(line.as_bytes());
        handle.append(Bytes::from(line));
    }
    let len = expected.len() as u64;
    assert!(len > 2 * WINDOW_BYTES);
    assert!(handle.held_bytes() <= WINDOW_BYTES);
    servitor_testkit::wait_until("gitlab to confirm the log", WAIT, || {
        handle.sent_bytes() == len
    })
    .await
    .unwrap();
    assert_eq!(standin.job(job.id).unwrap().trace, expected);
    assert_eq!(handle.held_bytes(), 0, "confirmed bytes stay in memory");

    // GitLab lost all but the first bytes: they come back from the journal.
    standin.truncate_trace(job.id, 5).unwrap();
    handle.append(Bytes::from_static(b"second part\n"));
    expected.extend_from_slice(b"second part\n");
    let total = expected.len();
    wait_for(&standin, job.id, "the log resent", |r| {
        r.trace.len() == total
    })
    .await;
    assert_eq!(standin.job(job.id).unwrap().trace, expected);

    // Trace validation fails at the final update: all of it goes again.
    standin.reject_final_trace(job.id).unwrap();
    handle.append(Bytes::from_static(b"last line\n"));
    expected.extend_from_slice(b"last line\n");
    let report = handle.finish(FinalState::Success).await.unwrap();
    let record = standin.job(job.id).unwrap();
    assert_eq!(record.trace, expected);
    assert_eq!(report.output, TraceOutput::of(&expected));
    assert_eq!(record.checksum_ok, Some(true));
    assert!(record.updates.iter().any(|u| u.status == 412));
    assert!(record.patches.iter().any(|p| p.status == 416));
}

#[tokio::test]
async fn a_chatty_job_settles_at_one_patch_per_interval() {
    // GitLab asks for a PATCH a second.
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("chatty")).await;
    wait_for(&standin, job.id, "running update", |r| {
        !r.updates.is_empty()
    })
    .await;
    // A line every 50 ms for 4 s: unpaced, a PATCH every 200 ms (20).
    let mut expected = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(4) {
        tick.tick().await;
        let line = format!("line {}\n", expected.len());
        expected.extend_from_slice(line.as_bytes());
        handle.append(Bytes::from(line));
    }
    let report = handle.finish(FinalState::Success).await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let record = standin.job(job.id).unwrap();
    assert_eq!(record.trace, expected);
    assert_eq!(report.output, TraceOutput::of(&expected));
    // The burst, then one a second, then the rest at the end.
    let most = TRACE_BURST as usize + elapsed.ceil() as usize + 1;
    assert!(
        record.patches.len() <= most,
        "{} patches in {elapsed:.1} s, at most {most} expected",
        record.patches.len()
    );
}

#[tokio::test]
async fn masked_values_never_reach_gitlab_even_when_split() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let spec = JobSpec::new("mask")
        .masked_variable("API_KEY", "sup3r-s3cret-value")
        .variable("PLAIN", "shown");
    let (job, handle, _events) = start_reporter(&standin, &client, spec).await;
    let text = format!(
        "key=sup3r-s3cret-value plain=shown url=https://gitlab-ci-token:{}@host/x.git pat=glpat-abcdEFGH1234 end\n",
        job.token
    );
    // Split the text at every place across two appends of job output,
    // pausing so that each half goes out as its own PATCH some of the time.
    let mut end = 0u64;
    for split in (0..text.len()).step_by(7) {
        let (first, second) = text.as_bytes().split_at(split);
        end += first.len() as u64;
        handle.append_output(1, end, Bytes::copy_from_slice(first));
        if split % 21 == 0 {
            tokio::time::sleep(Duration::from_millis(220)).await;
        }
        end += second.len() as u64;
        handle.append_output(1, end, Bytes::copy_from_slice(second));
    }
    handle.finish(FinalState::Success).await.unwrap();
    let record = standin.job(job.id).unwrap();
    let trace = record.trace_text();
    assert!(!trace.contains("s3cret"), "{trace}");
    assert!(!trace.contains(&job.token), "job token leaked");
    assert!(!trace.contains("abcdEFGH1234"), "{trace}");
    let line = "key=[MASKED] plain=shown url=https://gitlab-ci-token:[MASKED]@host/x.git pat=glpat-[MASKED] end\n";
    assert_eq!(trace, line.repeat(text.len().div_ceil(7)));
    assert_eq!(record.checksum_ok, Some(true));
}

#[tokio::test]
async fn canceling_is_reported_and_the_job_still_finishes() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, mut events) = start_reporter(&standin, &client, JobSpec::new("c")).await;
    wait_for(&standin, job.id, "running", |r| !r.updates.is_empty()).await;
    assert_eq!(
        standin.cancel(job.id, true).unwrap(),
        StandInState::Canceling
    );
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert_eq!(event, Some(RemoteEvent::Canceling));
    handle.append(Bytes::from_static(b"after_script ran\n"));
    let report = handle
        .finish(FinalState::Failed {
            kind: FailureKind::Script,
            exit_code: None,
        })
        .await
        .unwrap();
    assert_eq!(report.failure_reason, Some("script_failure"));
    let record = standin.job(job.id).unwrap();
    assert_eq!(record.state, StandInState::Canceled);
    assert_eq!(record.trace_text(), "after_script ran\n");
    assert_eq!(record.checksum_ok, Some(true));
}

#[tokio::test]
async fn canceled_and_dropped_jobs_abort() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, mut events) = start_reporter(&standin, &client, JobSpec::new("a")).await;
    wait_for(&standin, job.id, "running", |r| !r.updates.is_empty()).await;
    standin.cancel(job.id, false).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert_eq!(event, Some(RemoteEvent::Abort(AbortReason::Canceled)));
    let err = handle.finish(FinalState::Success).await.unwrap_err();
    assert!(
        matches!(
            err,
            GitLabError::JobAborted {
                reason: AbortReason::Canceled,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(standin.job(job.id).unwrap().final_update.is_none());

    // GitLab failing the job (a stuck-job sweep) aborts as well.
    let (job, _handle, mut events) = start_reporter(&standin, &client, JobSpec::new("b")).await;
    wait_for(&standin, job.id, "running", |r| !r.updates.is_empty()).await;
    standin.drop_job(job.id).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert_eq!(event, Some(RemoteEvent::Abort(AbortReason::Failed)));
}

#[tokio::test]
async fn final_update_is_repeated_on_202() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("202")).await;
    standin.accept_final_after(job.id, 2).unwrap();
    handle.append(Bytes::from_static(b"done\n"));
    let report = handle.finish(FinalState::Success).await.unwrap();
    assert_eq!(report.attempts, 3);
    let record = standin.job(job.id).unwrap();
    let finals: Vec<(String, u16)> = record
        .updates
        .iter()
        .filter(|u| u.state != "running")
        .map(|u| (u.state.clone(), u.status))
        .collect();
    assert_eq!(
        finals,
        vec![
            ("success".to_owned(), 202),
            ("success".to_owned(), 202),
            ("success".to_owned(), 200)
        ]
    );
    let gaps: Vec<Duration> = record
        .updates
        .iter()
        .filter(|u| u.state != "running")
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(900)),
        "{gaps:?}"
    );
    assert_eq!(record.state, StandInState::Success);
}

#[tokio::test]
async fn exit_code_and_failure_reason_are_sent_right() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let cases = [
        // Not in this GitLab's failure_reasons: mapped as gitlab-runner does.
        (
            FailureKind::ImagePull,
            Some(3),
            "runner_system_failure",
            Some(3),
        ),
        (FailureKind::Script, Some(0), "script_failure", None),
        (FailureKind::Timeout, None, "job_execution_timeout", None),
        (
            FailureKind::Configuration,
            Some(1),
            "runner_configuration_error",
            Some(1),
        ),
    ];
    for (kind, exit_code, reason, sent_code) in cases {
        let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("f")).await;
        let report = handle
            .finish(FinalState::Failed { kind, exit_code })
            .await
            .unwrap();
        assert_eq!(report.failure_reason, Some(reason));
        let record = standin.job(job.id).unwrap();
        assert_eq!(record.state, StandInState::Failed);
        let update = record.final_update.unwrap();
        assert_eq!(update.state, "failed");
        assert_eq!(update.failure_reason.as_deref(), Some(reason), "{kind:?}");
        assert_eq!(update.exit_code, sent_code.map(i64::from), "{kind:?}");
        assert_eq!(update.body.get("exit_code").is_some(), sent_code.is_some());
        assert_eq!(update.checksum.as_deref(), Some("crc32:00000000"));
        assert_eq!(update.bytesize, Some(0));
    }
}

#[tokio::test]
async fn patch_errors_are_retried_without_losing_bytes() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("r")).await;
    wait_for(&standin, job.id, "running", |r| !r.updates.is_empty()).await;
    standin.fail_next(
        Route::PatchTrace(job.id),
        vec![
            Fault::status(500),
            Fault::rate_limited(1),
            Fault::status(503),
        ],
    );
    standin.fail_next(Route::UpdateJob(job.id), vec![Fault::status(502)]);
    handle.append(Bytes::from_static(b"abc\n"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.append(Bytes::from_static(b"def\n"));
    handle.finish(FinalState::Success).await.unwrap();
    let record = standin.job(job.id).unwrap();
    assert_eq!(record.trace, b"abc\ndef\n");
    assert_eq!(record.checksum_ok, Some(true));
    let statuses: Vec<u16> = record.patches.iter().map(|p| p.status).collect();
    assert_eq!(&statuses[..3], &[500, 429, 503], "{statuses:?}");
    let rate_limited = &record.patches[1];
    let next = &record.patches[2];
    assert!(next.at - rate_limited.at >= Duration::from_secs(1));
}

#[tokio::test]
async fn big_output_goes_in_patches_of_at_most_one_mib() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("big")).await;
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxy\n";
    let mut expected = Vec::new();
    while expected.len() < 2 * MAX_PATCH_BYTES + 1000 {
        expected.extend_from_slice(line);
    }
    for chunk in expected.chunks(64 * 1024) {
        handle.append(Bytes::copy_from_slice(chunk));
    }
    handle.finish(FinalState::Success).await.unwrap();
    let record = standin.job(job.id).unwrap();
    assert!(record.trace == expected, "trace differs");
    assert!(record.patches.len() >= 3);
    assert!(record.patches.iter().all(|p| p.len <= MAX_PATCH_BYTES));
    assert_eq!(record.checksum_ok, Some(true));
}

#[tokio::test]
async fn output_past_the_limit_is_dropped_with_a_notice() {
    let standin = standin_with(1).await;
    let mut settings = settings(&standin, DEFAULT_RUNNER_TOKEN);
    settings.output_limit = 64;
    let client = Arc::new(GitLabClient::new(settings).unwrap());
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("limit")).await;
    for i in 0..20 {
        handle.append(Bytes::from(format!("line number {i}\n")));
    }
    let report = handle.finish(FinalState::Success).await.unwrap();
    assert!(report.truncated);
    let record = standin.job(job.id).unwrap();
    let trace = record.trace_text();
    assert!(trace.starts_with("line number 0\n"));
    assert_eq!(
        trace
            .matches("Job's log exceeded limit of 64 bytes.")
            .count(),
        1
    );
    assert!(!trace.contains("line number 19"));
    assert_eq!(record.checksum_ok, Some(true));
}

#[tokio::test]
async fn silent_jobs_are_kept_alive() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let (job, handle, _events) = start_reporter(&standin, &client, JobSpec::new("quiet")).await;
    let record = wait_for(&standin, job.id, "three keep-alives", |r| {
        r.updates.iter().filter(|u| u.state == "running").count() >= 3
    })
    .await;
    let gap = record.updates[2].at - record.updates[1].at;
    assert!(gap >= Duration::from_millis(900), "{gap:?}");
    handle.finish(FinalState::Success).await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_without_a_final_update() {
    let standin = standin_with(1).await;
    let client = client(&standin);
    let job = take_job(&standin, &client, JobSpec::new("stop")).await;
    let cancel = CancellationToken::new();
    let (handle, _events) = JobReporter::start(Arc::clone(&client), &job, cancel.clone());
    wait_for(&standin, job.id, "running", |r| !r.updates.is_empty()).await;
    cancel.cancel();
    let err = handle.finish(FinalState::Success).await.unwrap_err();
    assert!(matches!(err, GitLabError::Cancelled), "{err:?}");
    let record = standin.job(job.id).unwrap();
    assert_eq!(record.state, StandInState::Running);
    assert!(record.final_update.is_none());
}

/// A "GitLab" that answers every connection with what `answer` writes
/// (after reading the request's first bytes), for answers no stand-in
/// would give. Returns its URL and how many bytes it managed to write.
async fn hostile_gitlab<F, Fut>(answer: F) -> (String, Arc<std::sync::atomic::AtomicU64>)
where
    F: Fn(tokio::net::TcpStream, Arc<std::sync::atomic::AtomicU64>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&written);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0_u8; 4096];
            let _ = stream.read(&mut buf).await;
            tokio::spawn(answer(stream, Arc::clone(&counter)));
        }
    });
    (url, written)
}

fn hostile_client(url: &str) -> GitLabClient {
    let mut settings = GitLabSettings::new(url, Secret::new(DEFAULT_RUNNER_TOKEN), SYSTEM_ID);
    settings.request_timeout = Duration::from_secs(2);
    GitLabClient::new(settings).unwrap()
}

#[tokio::test]
async fn garbage_from_gitlab_is_a_transport_error_to_retry() {
    use tokio::io::AsyncWriteExt;
    let (url, _) = hostile_gitlab(|mut s, _| async move {
        let _ = s.write_all(b"\x00\xffnot http at all\r\n\r\n").await;
    })
    .await;
    let e = hostile_client(&url).verify().await.unwrap_err();
    assert!(matches!(e, GitLabError::Transport(_)), "{e:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn an_enormous_job_payload_is_refused_unread() {
    use tokio::io::AsyncWriteExt;
    // A 201 whose body never ends, without a length.
    let (url, written) = hostile_gitlab(|mut s, written| async move {
        let head = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(head).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let framed = [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk, b"\r\n".to_vec()].concat();
        while s.write_all(&framed).await.is_ok() {
            written.fetch_add(framed.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .await;
    let client = hostile_client(&url);
    let e = client.request_job().await.unwrap_err();
    assert!(
        matches!(e, GitLabError::AnswerTooLarge { limit, .. } if limit == MAX_JOB_PAYLOAD_BYTES),
        "{e:?}"
    );
    assert!(e.to_string().contains("larger than"), "{e}");
    assert!(e.is_retryable());
    // Read no further than the limit (and what sockets buffer).
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < (MAX_JOB_PAYLOAD_BYTES as u64) * 2,
        "{sent} bytes were taken from the answer"
    );
    // A Content-Length over the limit is refused before any of it is read.
    let (url, written) = hostile_gitlab(|mut s, written| async move {
        let head = format!(
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            1_u64 << 40
        );
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {
            written.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .await;
    let e = hostile_client(&url).request_job().await.unwrap_err();
    assert!(matches!(e, GitLabError::AnswerTooLarge { .. }), "{e:?}");
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < 16 * 1024 * 1024,
        "{sent} bytes were taken from the answer"
    );
}

#[tokio::test]
async fn a_gitlab_that_never_answers_times_out() {
    let (url, _) = hostile_gitlab(|s, _| async move {
        // Holds the connection open and says nothing.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    })
    .await;
    let started = Instant::now();
    let e = hostile_client(&url).verify().await.unwrap_err();
    assert!(matches!(e, GitLabError::Transport(_)), "{e:?}");
    assert!(e.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
