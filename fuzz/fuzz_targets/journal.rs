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
    framed.extend_from_slice(&perch_agent::checksum::crc32(data).to_le_bytes());
    framed.extend_from_slice(data);
    let _ = Journal::decode(&framed);
});
