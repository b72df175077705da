#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Real pipelines: jobs pass artifacts to the jobs that need them, reports
//! go up in their formats, `when` and `exclude` rules hold, and GitLab's
//! refusals reach the log, all through the real agent, the real Docker
//! engine and the GitLab stand-in's artifact endpoints.

use std::io::Read;
use std::time::Duration;

use servitor_proto::job::{Artifact, When};
use servitor_testkit::gitlab::{ArtifactRecord, Fault, JobRecord, JobSpec, JobState, Route};
use servitor_tests::{Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn zip_names(record: &ArtifactRecord) -> Vec<String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(record.body.clone())).unwrap();
    let mut names: Vec<String> = (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().to_owned())
        .collect();
    names.sort();
    names
}

fn zip_file(record: &ArtifactRecord, name: &str) -> String {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(record.body.clone())).unwrap();
    let mut text = String::new();
    zip.by_name(name)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text
}

fn final_reason(r: &JobRecord) -> Option<String> {
    r.final_update
        .as_ref()
        .and_then(|f| f.failure_reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_artifacts_reach_the_job_that_needs_them() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let build = h
        .standin
        .push_job(
            JobSpec::new("build")
                .script([
                    "mkdir -p out/sub",
                    "echo built by $CI_JOB_NAME > out/app.bin",
                    "echo scratch > out/app.tmp",
                    "echo deep > out/sub/deep.txt",
                ])
                .artifact(Artifact {
                    name: "bundle-$CI_JOB_NAME".into(),
                    paths: vec!["out/".into()],
                    exclude: vec!["out/*.tmp".into()],
                    expire_in: "1 week".into(),
                    artifact_type: "archive".into(),
                    artifact_format: "zip".into(),
                    ..Artifact::default()
                }),
        )
        .await
        .unwrap();
    let r = h.wait_final(build, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("upload_artifacts_on_success"), "{text}");
    assert!(
        text.contains("Uploading artifacts for successful job"),
        "{text}"
    );
    assert!(
        text.contains("out/: found 5 matching artifact files and directories"),
        "{text}"
    );
    assert!(text.contains("out/*.tmp: excluded 1 files"), "{text}");
    assert!(
        text.contains("Uploading artifacts as \"archive\" to coordinator... 201 Created"),
        "{text}"
    );
    assert_eq!(r.artifacts.len(), 1, "one upload");
    let archive = &r.artifacts[0];
    assert_eq!(archive.filename, "bundle-build.zip");
    assert_eq!(archive.artifact_format, "zip");
    assert_eq!(archive.expire_in.as_deref(), Some("1 week"));
    assert_eq!(
        zip_names(archive),
        vec!["out/", "out/app.bin", "out/sub/", "out/sub/deep.txt"]
    );
    assert_eq!(zip_file(archive, "out/app.bin"), "built by build\n");
    // The upload happened before the final update, with the job running.
    assert!(archive.at <= r.final_update.as_ref().unwrap().at);

    let test = h
        .standin
        .push_job(JobSpec::new("test").needs("build").script([
            "cat out/app.bin",
            "cat out/sub/deep.txt",
            "test ! -e out/app.tmp && echo no scratch",
        ]))
        .await
        .unwrap();
    let r = h.wait_final(test, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains(&format!("Downloading artifacts for build ({build})...")),
        "{text}"
    );
    assert!(text.contains("built by build"), "{text}");
    assert!(text.contains("no scratch"), "{text}");
    let objects = h.standin.object_requests();
    assert_eq!(objects.len(), 1, "one direct download from object storage");
    assert!(
        !objects[0].job_token_sent,
        "the job token must not follow the redirect to object storage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_uploads_its_reports_and_failure_artifacts_only() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("unit")
                .script([
                    "mkdir -p out logs",
                    "echo binary > out/app",
                    "echo 'it broke' > logs/test.log",
                    "echo '<testsuite failures=\"1\"/>' > report.xml",
                    "exit 3",
                ])
                .artifact_paths(["out/"])
                .artifact(Artifact {
                    name: "junit.xml".into(),
                    paths: vec!["report.xml".into()],
                    when: When::Always,
                    artifact_type: "junit".into(),
                    artifact_format: "gzip".into(),
                    ..Artifact::default()
                })
                .artifact(Artifact {
                    name: "logs".into(),
                    paths: vec!["logs/".into()],
                    when: When::OnFailure,
                    artifact_type: "archive".into(),
                    artifact_format: "zip".into(),
                    ..Artifact::default()
                }),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(final_reason(&r).as_deref(), Some("script_failure"));
    assert_eq!(
        r.final_update.as_ref().unwrap().exit_code,
        Some(3),
        "the script's failure stands"
    );
    assert!(
        text.contains("Uploading artifacts for failed job"),
        "{text}"
    );
    let uploads: Vec<(&str, &str, &str)> = r
        .artifacts
        .iter()
        .map(|a| {
            (
                a.artifact_type.as_str(),
                a.artifact_format.as_str(),
                a.filename.as_str(),
            )
        })
        .collect();
    assert_eq!(
        uploads,
        vec![
            ("junit", "gzip", "junit.xml.gz"),
            ("archive", "zip", "logs.zip")
        ],
        "the on_success archive is not uploaded for a failed job"
    );
    let mut report = String::new();
    flate2::read::MultiGzDecoder::new(r.artifacts[0].body.as_slice())
        .read_to_string(&mut report)
        .unwrap();
    assert_eq!(report, "<testsuite failures=\"1\"/>\n");
    let header = flate2::read::GzDecoder::new(r.artifacts[0].body.as_slice());
    assert_eq!(
        header.header().and_then(|h| h.filename()),
        Some(&b"report.xml"[..])
    );
    assert_eq!(zip_file(&r.artifacts[1], "logs/test.log"), "it broke\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_named_in_the_log_and_fail_the_job() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    // Too large: GitLab answers 413 and the job fails, saying so, after
    // one try.
    h.standin.set_max_artifacts_size(16 * 1024);
    let big = h
        .standin
        .push_job(
            JobSpec::new("big")
                .script(["head -c 200000 /dev/urandom > big.bin"])
                .artifact_paths(["big.bin"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(big, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(final_reason(&r).as_deref(), Some("script_failure"));
    assert!(text.contains("too large archive"), "{text}");
    assert!(text.contains("413"), "{text}");
    assert!(text.contains("maximum artifacts size"), "{text}");
    assert!(r.artifacts.is_empty());

    // A dependency whose artifacts are gone (404): the job fails before
    // its script, naming the dependency.
    h.standin.set_max_artifacts_size(u64::MAX);
    let build = h
        .standin
        .push_job(
            JobSpec::new("compile")
                .script(["echo x > x.txt"])
                .artifact_paths(["x.txt"]),
        )
        .await
        .unwrap();
    assert_eq!(
        h.wait_final(build, JOB_TIMEOUT).await.unwrap().state,
        JobState::Success
    );
    h.standin
        .fail_next(Route::DownloadArtifacts(build), vec![Fault::status(404)]);
    let test = h
        .standin
        .push_job(
            JobSpec::new("check")
                .needs("compile")
                .script(["echo script ran"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(test, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert!(
        text.contains(&format!(
            "downloading artifacts for compile ({build}) from coordinator failed: not found (404)"
        )),
        "{text}"
    );
    assert!(!text.contains("script ran"), "{text}");

    // A transient failure is retried and the job goes on.
    h.standin
        .fail_next(Route::DownloadArtifacts(build), vec![Fault::status(502)]);
    let again = h
        .standin
        .push_job(
            JobSpec::new("check-again")
                .needs("compile")
                .script(["cat x.txt"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(again, JOB_TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_takes_what_git_does_not_track_ignored_files_included() {
    let repo =
        servitor_tests::git_repository(&[("tracked.txt", "in git\n"), (".gitignore", "*.log\n")])
            .unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("untracked")
                .git(repo.path())
                .script(["echo new > new.txt", "echo noisy > debug.log"])
                .artifact(Artifact {
                    untracked: true,
                    artifact_type: "archive".into(),
                    artifact_format: "zip".into(),
                    ..Artifact::default()
                }),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert_eq!(r.artifacts.len(), 1, "{text}");
    assert_eq!(r.artifacts[0].filename, "artifacts.zip");
    assert_eq!(zip_names(&r.artifacts[0]), vec!["debug.log", "new.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_mid_run_uploads_its_artifacts_once_from_the_attempt_that_finishes() {
    let h = Harness::start(HarnessOptions {
        executor: "shell",
        max_instances: 2,
        capacity_per_instance: 1,
        lost_grace: Duration::from_secs(3),
        imds_instances: 2,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("package")
                .script([
                    "mkdir -p dist",
                    "echo attempt $CI_JOB_ID > dist/marker",
                    "for i in $(seq 1 6); do echo step $i; sleep 1; done",
                    "echo packaged >> dist/marker",
                ])
                .artifact_paths(["dist/"])
                .artifact(Artifact {
                    name: "junit.xml".into(),
                    paths: vec!["dist/marker".into()],
                    when: When::Always,
                    artifact_type: "junit".into(),
                    artifact_format: "gzip".into(),
                    ..Artifact::default()
                }),
        )
        .await
        .unwrap();
    h.wait_trace(id, "step 2", JOB_TIMEOUT).await.unwrap();
    h.imds_of_job(id)
        .unwrap()
        .set_spot_action("terminate", Duration::from_secs(120));
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(text.contains("Attempt 2 of 3"), "{text}");
    assert_eq!(
        text.matches("Uploading artifacts for successful job")
            .count(),
        1,
        "{text}"
    );
    let kinds: Vec<&str> = r
        .artifacts
        .iter()
        .map(|a| a.artifact_type.as_str())
        .collect();
    assert_eq!(
        kinds,
        vec!["archive", "junit"],
        "each uploaded exactly once"
    );
    assert_eq!(
        zip_file(&r.artifacts[0], "dist/marker"),
        format!("attempt {id}\npackaged\n"),
        "the archive is the finished attempt's, from a clean directory"
    );
}
