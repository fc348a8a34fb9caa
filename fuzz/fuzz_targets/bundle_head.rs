#![no_main]
//! Arbitrary signature and manifest sections behind a valid format 2 or 3 header,
//! with the signature block naming the manifest's real digest, so the fuzzer
//! spends its time in manifest and signature decoding.
use libfuzzer_sys::fuzz_target;
use perch_protocol::bundle::{claimed_digest, BundleReader};
use sha2::{Digest, Sha256};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let split = u16::from_le_bytes([data[0], data[1]]) as usize % (data.len() - 1);
    let body = &data[2..];
    let (manifest, sig_list) = body.split_at(split.min(body.len()));
    let mut sigs = Sha256::digest(manifest).to_vec();
    sigs.extend_from_slice(sig_list);
    // Both formats' manifest decoders: the top bit of the second byte picks.
    let version: u16 = if data[1] & 0x80 != 0 { 3 } else { 2 };
    let mut bytes = b"PERCHBDL".to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(sigs.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&sigs);
    bytes.extend_from_slice(manifest);
    let claimed = claimed_digest(&bytes[..]);
    if let Ok(reader) = BundleReader::open(&bytes[..]) {
        let _ = reader.head().unverified_manifest().chunk_count();
        // What a fetcher compares before decoding is what names the bundle.
        assert_eq!(claimed.ok(), Some(reader.head().digest()));
        assert!(reader.verify(common::trust(), common::NOW).is_err());
    }
    assert!(BundleReader::open_verified(&bytes[..], common::trust(), common::NOW).is_err());
});
