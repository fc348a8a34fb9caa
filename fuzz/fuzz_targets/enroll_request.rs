#![no_main]
//! Arbitrary bytes, and arbitrary text, as an enrollment request (what the
//! provisioner reads off the wire and `sign-request` reads from a file):
//! never panics, and a request the fuzzer made never proves possession of
//! the key it names unless the fuzzer found a valid ed25519 signature.
use libfuzzer_sys::fuzz_target;
use perch_protocol::enroll::{SignedRequest, REQUEST_PREFIX};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SignedRequest::from_bytes(data) {
        let _ = r.unverified_body().device_id.len();
        let _ = r.verify_possession();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SignedRequest::from_text(text);
    }
    let text = format!("{REQUEST_PREFIX}\n{}", data_encoding::BASE32_NOPAD.encode(data));
    if let Ok(r) = SignedRequest::from_text(&text) {
        let _ = r.verify_possession();
    }
});
