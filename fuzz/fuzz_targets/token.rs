#![no_main]
//! Arbitrary text, and arbitrary bytes in base32 behind the prefix, as an
//! enrollment token: never panics, never verifies (the fuzzer has no
//! issuing key of the fixed org).
use libfuzzer_sys::fuzz_target;
use perch_protocol::token::{SignedToken, TOKEN_PREFIX};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = SignedToken::parse(text) {
            assert!(t.verify(common::trust(), common::NOW).is_err());
        }
    }
    let text = format!("{TOKEN_PREFIX}{}", data_encoding::BASE32_NOPAD.encode(data));
    if let Ok(t) = SignedToken::parse(&text) {
        let _ = t.unverified_body().provisioning_jwt();
        assert!(t.verify(common::trust(), common::NOW).is_err());
    }
});
