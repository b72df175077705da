#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Git as gitlab-runner does it: every `GIT_STRATEGY`, `GIT_CHECKOUT`,
//! `GIT_CLEAN_FLAGS`, and submodules fetched over smart HTTP with the job
//! token; the `release` step after the script.

use std::time::Duration;

use servitor_testkit::gitlab::{JobSpec, JobState, DEFAULT_PROJECT_PATH};
use servitor_tests::{git, git_repository, Harness, HarnessOptions};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_git_strategy_leaves_the_directory_gitlab_runner_would() {
    let repo = git_repository(&[("VERSION", "1.2.3\n")]).unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let job = |name: &str, strategy: &str| {
        JobSpec::new(name)
            .git(repo.path())
            .variable("GIT_STRATEGY", strategy)
            .script(["ls -A", "echo files: $(ls -A | wc -l)"])
    };
    let cases = [
        (
            job("clone", "clone"),
            vec!["Created fresh repository.", "VERSION", "Checking out"],
        ),
        (job("fetch", "fetch"), vec!["VERSION", "Checking out"]),
        (
            job("none", "none"),
            vec!["Skipping Git repository setup", "files: 0"],
        ),
        (
            job("empty", "empty"),
            vec![
                "Skipping Git repository setup and creating an empty build directory",
                "files: 0",
            ],
        ),
        (
            job("bogus", "sometimes"),
            vec![
                "GIT_STRATEGY: expected either 'clone', 'fetch', 'none' or 'empty' got \"sometimes\", using default value \"fetch\"",
                "VERSION",
            ],
        ),
        (
            job("no-checkout", "fetch").variable("GIT_CHECKOUT", "false"),
            vec!["Skipping Git checkout", "files: 1"],
        ),
    ];
    for (spec, wanted) in cases {
        let name = spec.name.clone();
        let id = h.standin.push_job(spec).await.unwrap();
        let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
        let text = r.trace_text();
        assert_eq!(r.state, JobState::Success, "{name}: {text}");
        for line in wanted {
            assert!(text.contains(line), "{name}: {line:?} missing:\n{text}");
        }
        assert!(
            !text.contains(r.token.expose()),
            "{name}: the job token leaked"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submodules_are_fetched_with_the_job_token() {
    let lib = git_repository(&[("LIB.txt", "from the submodule\n")]).unwrap();
    let main = git_repository(&[("README", "main project\n")]).unwrap();
    let lib_path = lib.path().to_string_lossy().into_owned();
    git(
        main.path(),
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            &lib_path,
            "lib",
        ],
    )
    .unwrap();
    // As on GitLab: a URL relative to the project's own.
    git(
        main.path(),
        &[
            "config",
            "-f",
            ".gitmodules",
            "submodule.lib.url",
            "../lib.git",
        ],
    )
    .unwrap();
    git(main.path(), &["add", ".gitmodules", "lib"]).unwrap();
    git(main.path(), &["commit", "-q", "-m", "add lib"]).unwrap();

    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let namespace = DEFAULT_PROJECT_PATH.rsplit_once('/').unwrap().0;
    h.standin
        .serve_repository(&format!("{namespace}/lib"), lib.path());
    let id = h
        .standin
        .push_job(
            JobSpec::new("with-submodule")
                .git(main.path())
                .variable("GIT_SUBMODULE_STRATEGY", "normal")
                .script(["cat lib/LIB.txt"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains("Updating/initializing submodules with git depth set to 20..."),
        "{text}"
    );
    assert!(text.contains("Updated submodules"), "{text}");
    assert!(text.contains("from the submodule"), "{text}");
    assert!(!text.contains(r.token.expose()), "the job token leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_step_runs_after_the_script_with_variables_expanded_by_the_runner() {
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("publish")
                .variable("RELEASE_TAG", "v1.2.3")
                .script(["echo building"])
                // Single quotes: only the runner's own expansion can fill it.
                .release(["echo 'release-cli create --tag-name $RELEASE_TAG'"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    assert!(
        text.contains("Executing \"step_release\" stage of the job script"),
        "{text}"
    );
    let script = text.find("building").unwrap();
    let release = text.find("release-cli create --tag-name v1.2.3").unwrap();
    assert!(script < release, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_get_sources_hooks_run_in_the_job_before_git_and_can_fail_it() {
    let repo = git_repository(&[("VERSION", "1.2.3\n")]).unwrap();
    let h = Harness::start(HarnessOptions::default()).await.unwrap();
    let id = h
        .standin
        .push_job(
            JobSpec::new("hooked")
                .git(repo.path())
                .pre_get_sources([
                    "echo hook-$((6*7)) ran in a container: $(test -f /.dockerenv && echo yes)",
                ])
                .script(["cat VERSION"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Success, "{text}");
    let hook = text.find("hook-42 ran in a container: yes").unwrap();
    let fetch = text.find("Fetching changes").unwrap();
    assert!(hook < fetch, "the hook runs before git: {text}");
    assert!(text.contains("1.2.3"), "{text}");

    let id = h
        .standin
        .push_job(
            JobSpec::new("hook-fails")
                .git(repo.path())
                .pre_get_sources(["exit 3"])
                .script(["echo script-$((1+1))"]),
        )
        .await
        .unwrap();
    let r = h.wait_final(id, JOB_TIMEOUT).await.unwrap();
    let text = r.trace_text();
    assert_eq!(r.state, JobState::Failed, "{text}");
    assert_eq!(
        r.final_update.as_ref().unwrap().exit_code,
        Some(3),
        "{text}"
    );
    assert!(!text.contains("Fetching changes"), "{text}");
    assert!(!text.contains("script-2"), "{text}");
}
