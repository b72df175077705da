//! The headers the coordinator reads from GitLab's answers. Each input
//! line is one header, `name:value`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pairs: Vec<(&[u8], &[u8])> = data
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let at = line.iter().position(|b| *b == b':')?;
            Some((&line[..at], &line[at + 1..]))
        })
        .collect();
    servitor_coordinator::gitlab::fuzzing::answer_headers(&pairs);
});
