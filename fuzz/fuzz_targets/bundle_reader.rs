#![no_main]
//! Arbitrary bytes as a whole bundle: must never panic, and must never verify.
use libfuzzer_sys::fuzz_target;
use perch_protocol::bundle::verify_stream;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let r = verify_stream(data, common::trust(), common::NOW, |_, _| Ok(()));
    assert!(r.is_err(), "the fuzzer produced a bundle signed by a key it does not have");
});
