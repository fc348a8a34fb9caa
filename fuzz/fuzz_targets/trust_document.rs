#![no_main]
//! Arbitrary bytes as a trust document: parse, anchor, and use as a rotation
//! of the fixed org. Must never panic, never accept a rotation.
use libfuzzer_sys::fuzz_target;
use perch_protocol::trust::SignedTrust;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = SignedTrust::parse(data) {
        let _ = doc.to_bytes();
        let _ = doc.clone().verify_anchor(common::NOW, None);
        assert!(doc.verify_rotation(common::trust(), common::NOW).is_err());
    }
});
