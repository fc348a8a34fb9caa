#![no_main]
//! Arbitrary bytes as the provisioner's answer, an enrollment file and a
//! device credential (what the agent reads): never panics, and nothing the
//! fuzzer makes is accepted for the fixed org, which lists no issuing key.
use libfuzzer_sys::fuzz_target;
use perch_protocol::enroll::{EnrollResponse, Enrollment, Expect, SignedCredential, ENROLLMENT_PREFIX};
use perch_protocol::SecretKey;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let expect = Expect {
        device_id: "fuzz-1",
        device_key: SecretKey::from_seed(&[9; 32]).public(),
        trust_fingerprint: common::trust().fingerprint(),
        ca_fingerprint: None,
        now: common::NOW,
    };
    if let Ok(EnrollResponse::Enrolled(e)) = EnrollResponse::from_bytes(data) {
        assert!(e.verify(&expect).is_err());
    }
    if let Ok(e) = Enrollment::from_bytes(data) {
        assert!(e.verify(&expect).is_err());
    }
    let text = format!("{ENROLLMENT_PREFIX}\n{}", data_encoding::BASE32_NOPAD.encode(data));
    if let Ok(e) = Enrollment::from_text(&text) {
        assert!(e.verify(&expect).is_err());
    }
    if let Ok(c) = SignedCredential::from_bytes(data) {
        assert!(c.verify(common::trust(), common::NOW).is_err());
    }
});
