//! Instance metadata answers the agent reads: Spot instance actions and
//! rebalance recommendations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        servitor_agent::imds::fuzzing::spot_action(text);
        servitor_agent::imds::fuzzing::rebalance(text);
    }
});
