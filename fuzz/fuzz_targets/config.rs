//! The configuration files an operator writes: the coordinator's and the
//! agent's, read and checked as at start-up.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = servitor_coordinator::config::Config::from_toml_str(text, "fuzz.toml");
        let _ = servitor_agent::config::AgentConfig::from_toml_str(text, "fuzz.toml");
    }
});
