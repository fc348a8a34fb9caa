#![no_main]
//! Arbitrary bytes as a deploy journal (or counters file), raw and behind a
//! valid frame with a matching CRC for each version the decoder reads (to
//! reach the postcard decoders). Never panics; whatever decodes re-encodes
//! to a record that decodes to the same value.
use libfuzzer_sys::fuzz_target;
use perch_agent::journal::Journal;

fuzz_target!(|data: &[u8]| {
    if let Ok(j) = Journal::decode(data) {
        assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
    }
    for version in [1u8, 2] {
        let mut framed = b"PERCHJNL".to_vec();
        framed.extend_from_slice(&[version, 0, 0, 0]);
        framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
        framed.extend_from_slice(&perch_agent::checksum::crc32(data).to_le_bytes());
        framed.extend_from_slice(data);
        if let Ok(j) = Journal::decode(&framed) {
            assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
        }
    }
});
