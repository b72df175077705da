//! A job request's answer from GitLab: the payload decoder, and the
//! coordinator's reading of it (the unusable-job fallback, the job's
//! masker made from its variables).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = servitor_proto::job::JobPayload::from_json(data);
    servitor_coordinator::gitlab::fuzzing::job_answer(data);
});
