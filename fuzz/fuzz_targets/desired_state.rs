#![no_main]
//! Arbitrary bytes as a desired-state value (what a device reads from
//! PERCH_DESIRED) and as the agent's record of the last one it acted on
//! (`STATE/desired.json`): never panics; a digest that parses round-trips.
use libfuzzer_sys::fuzz_target;
use perch_agent::desired::Handled;
use perch_protocol::desired;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = desired::decode(data) {
        assert_eq!(desired::decode(&desired::encode(&d)), Ok(d));
    }
    let _ = Handled::parse(data);
});
