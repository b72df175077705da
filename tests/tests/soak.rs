#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The short soak: a few minutes of jobs under randomised faults of every
//! kind, then the checker's verdict from what GitLab saw. The seed is
//! printed; `SERVITOR_SOAK_SEED=<seed>` replays a run's jobs and faults.
//! The long soak is `servitor-soak` (see the README).

use servitor_tests::soak::{self, FaultKind, SoakOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_soak_loses_no_job_no_byte_and_reports_each_job_once() {
    servitor_tests::init_tracing();
    let seed = soak::seed_from_env().unwrap();
    eprintln!("soak seed {seed} (SERVITOR_SOAK_SEED={seed} replays it)");
    let report = soak::run(SoakOptions::short(seed)).await.unwrap();
    eprintln!("{}", report.summary());
    assert!(report.violations.is_empty(), "{}", report.summary());
    // The run must have done what it claims: jobs through, faults of most
    // kinds, re-runs among them.
    assert!(report.jobs >= 10, "{}", report.summary());
    let kinds = report.faults.len();
    assert!(
        kinds * 3 >= FaultKind::ALL.len() * 2,
        "only {kinds} kinds of fault were injected:\n{}",
        report.summary()
    );
    assert!(
        report.attempts > report.jobs,
        "no job was re-run:\n{}",
        report.summary()
    );
}
