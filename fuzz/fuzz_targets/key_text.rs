#![no_main]
//! Arbitrary text as a public or secret key file: never panics, and what
//! parses prints back to the same key.
use libfuzzer_sys::fuzz_target;
use perch_protocol::{PublicKey, SecretKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(k) = PublicKey::from_text(text) {
        assert_eq!(PublicKey::from_text(&k.to_text()).unwrap(), k);
    }
    if let Ok(k) = SecretKey::from_text(text) {
        assert_eq!(SecretKey::from_text(&k.to_text()).unwrap().public(), k.public());
    }
});
