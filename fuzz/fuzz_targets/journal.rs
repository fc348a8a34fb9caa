#![no_main]
//! Arbitrary bytes as a deploy journal, raw and behind a valid frame with a
//! matching CRC (to reach the postcard decoder). Never panics; whatever
//! decodes re-encodes to the same bytes.
use libfuzzer_sys::fuzz_target;
use perch_agent::journal::Journal;

fuzz_target!(|data: &[u8]| {
    if let Ok(j) = Journal::decode(data) {
        assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
    }
    let mut framed = b"PERCHJNL\x01\x00\x00\x00".to_vec();
    framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
    framed.extend_from_slice(&crc32fast_hash(data).to_le_bytes());
    framed.extend_from_slice(data);
    let _ = Journal::decode(&framed);
});

fn crc32fast_hash(data: &[u8]) -> u32 {
    // Same CRC-32 (IEEE) as the journal, without another dependency.
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
