#![no_main]
//! Arbitrary bytes as a device report (what the fleet reads from
//! PERCH_REPORTS): never panics; what parses survives a round trip.
//! (Byte-for-byte re-encoding is not promised: postcard accepts overlong
//! varints, found by this target. Nothing signs or compares report bytes.)
use libfuzzer_sys::fuzz_target;
use perch_protocol::report::Report;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Report::from_bytes(data) {
        assert_eq!(Report::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
    }
});
