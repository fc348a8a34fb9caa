#![no_main]
//! Arbitrary bytes as the device's trust-version record
//! (`STATE/trust-version`): never panics, and whatever parses is exactly
//! what the record would write (one byte string, one meaning).
use libfuzzer_sys::fuzz_target;
use perch_protocol::trust::TrustFloor;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = TrustFloor::parse(data) {
        assert_eq!(f.to_text().as_bytes(), data);
    }
});
