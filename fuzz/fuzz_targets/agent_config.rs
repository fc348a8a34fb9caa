#![no_main]
//! Arbitrary text as agent.toml: never panics, errors are one line.
use libfuzzer_sys::fuzz_target;
use perch_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::parse(text, "agent.toml") {
        assert!(!e.to_string().contains('\n'));
    }
});
