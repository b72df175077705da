//! Maps why a job failed, in Servitor's words ([`FailureKind`]), onto a
//! `failure_reason` the job's GitLab accepts, by gitlab-runner's rule
//! (`failureReasonMapper`). GitLab lists the reasons it knows in each job's
//! `features.failure_reasons`; a reason outside that list is never sent.
//!
//! Not responsible for deciding whether a job failed or retrying it: GitLab
//! retries by `retry:when` on the reason we send.

use servitor_proto::agent::FailureKind;

/// Reasons every GitLab that runs jobs knows; sent even when the job lists
/// no `failure_reasons` (gitlab-runner's mapper does the same).
pub const ALWAYS_ACCEPTED_REASONS: [&str; 3] = [
    "script_failure",
    "runner_system_failure",
    "job_execution_timeout",
];

/// The `failure_reason` to send for `kind`, given the job's
/// `features.failure_reasons`.
pub fn failure_reason(kind: FailureKind, accepted: &[String]) -> &'static str {
    let reason = match kind {
        // gitlab-runner sends an empty reason as a script failure.
        FailureKind::Unspecified | FailureKind::Script => "script_failure",
        FailureKind::ImagePull => "image_pull_failure",
        FailureKind::Timeout => "job_execution_timeout",
        FailureKind::RunnerSystem => "runner_system_failure",
        FailureKind::Configuration => "runner_configuration_error",
        FailureKind::Interrupted => "runner_interrupted",
    };
    map_reason(reason, accepted)
}

/// gitlab-runner's mapping of one of its own reasons onto what GitLab
/// accepts: as-is when accepted, else an older equivalent, else
/// `unknown_failure`.
pub fn map_reason(reason: &'static str, accepted: &[String]) -> &'static str {
    if reason.is_empty() {
        return "script_failure";
    }
    if ALWAYS_ACCEPTED_REASONS.contains(&reason) || accepted.iter().any(|a| a == reason) {
        return reason;
    }
    // Reasons newer than some GitLab versions, mapped onto what those knew.
    match reason {
        // A GitLab that predates `runner_interrupted` knows the case as a
        // system failure, which `retry: when: runner_system_failure` catches.
        "image_pull_failure" | "runner_external_dependency_failure" | "runner_interrupted" => {
            "runner_system_failure"
        }
        "runner_configuration_error" => "script_failure",
        _ => "unknown_failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn kinds_map_by_the_accepted_list() {
        let full = list(&[
            "unknown_failure",
            "script_failure",
            "runner_system_failure",
            "job_execution_timeout",
            "image_pull_failure",
            "runner_configuration_error",
            "runner_external_dependency_failure",
            "runner_interrupted",
        ]);
        let old = list(&["unknown_failure", "script_failure"]);
        let none: Vec<String> = Vec::new();
        let table: &[(FailureKind, &Vec<String>, &str)] = &[
            (FailureKind::Script, &full, "script_failure"),
            (FailureKind::Script, &none, "script_failure"),
            (FailureKind::Unspecified, &none, "script_failure"),
            (FailureKind::ImagePull, &full, "image_pull_failure"),
            (FailureKind::ImagePull, &old, "runner_system_failure"),
            (FailureKind::ImagePull, &none, "runner_system_failure"),
            (FailureKind::Timeout, &full, "job_execution_timeout"),
            (FailureKind::Timeout, &none, "job_execution_timeout"),
            (FailureKind::RunnerSystem, &full, "runner_system_failure"),
            (FailureKind::RunnerSystem, &none, "runner_system_failure"),
            (
                FailureKind::Configuration,
                &full,
                "runner_configuration_error",
            ),
            (FailureKind::Configuration, &old, "script_failure"),
            (FailureKind::Configuration, &none, "script_failure"),
            (FailureKind::Interrupted, &full, "runner_interrupted"),
            (FailureKind::Interrupted, &old, "runner_system_failure"),
        ];
        for (kind, accepted, want) in table {
            assert_eq!(
                failure_reason(*kind, accepted),
                *want,
                "{kind:?} with {accepted:?}"
            );
        }
    }

    #[test]
    fn raw_reasons_map_like_gitlab_runner() {
        let none: Vec<String> = Vec::new();
        let table: &[(&'static str, &[&str], &str)] = &[
            ("", &[], "script_failure"),
            (
                "runner_external_dependency_failure",
                &[],
                "runner_system_failure",
            ),
            (
                "runner_external_dependency_failure",
                &["runner_external_dependency_failure"],
                "runner_external_dependency_failure",
            ),
            // Unlike gitlab-runner (unknown_failure): an interrupted job must
            // still meet `retry: when: runner_system_failure` on older GitLab.
            ("runner_interrupted", &[], "runner_system_failure"),
            (
                "runner_interrupted",
                &["runner_interrupted"],
                "runner_interrupted",
            ),
            ("job_canceled", &[], "unknown_failure"),
            ("unknown_failure", &[], "unknown_failure"),
        ];
        for (reason, accepted, want) in table {
            assert_eq!(map_reason(reason, &list(accepted)), *want, "{reason}");
        }
        assert_eq!(map_reason("script_failure", &none), "script_failure");
    }
}
