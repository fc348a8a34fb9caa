#![no_main]
//! Arbitrary text as the user JWT in an enrollment: never panics, and
//! nothing the fuzzer makes verifies (it cannot sign with the issuing key).
use libfuzzer_sys::fuzz_target;
use perch_protocol::jwt::check_user_jwt;
use perch_protocol::SecretKey;

fuzz_target!(|data: &[u8]| {
    let issuer = SecretKey::from_seed(&[3; 32]).public();
    let device = SecretKey::from_seed(&[4; 32]).public();
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(check_user_jwt(text, &issuer, &device, 1).is_err());
    }
});
