#![no_main]
//! Arbitrary bytes as a device's lifecycle event (what the provisioner
//! reads on `perch.lifecycle.<id>`): never panics, and what it accepts is
//! about the sending device only and survives its own re-encoding.
use libfuzzer_sys::fuzz_target;
use perch_protocol::lifecycle::Event;

fuzz_target!(|data: &[u8]| {
    if let Ok((kind, e)) = Event::from_device(data, "dev-a") {
        assert_eq!(e.identity, "dev-a");
        assert_eq!(Event::from_device(&e.to_json(), "dev-a"), Ok((kind, e)));
    }
});
