#![no_main]
//! Arbitrary bytes as an outbox segment file (what the agent reads after a
//! power cut or bad media), through the same pure scan `Outbox::open` uses,
//! with no file I/O so the fuzzer runs at memory speed: it never panics;
//! the records it keeps have increasing sequence numbers and lie in order
//! inside the input; damage and kept bytes cover the input exactly; and
//! the kept bytes alone scan back to the same records with no damage.
use libfuzzer_sys::fuzz_target;
use perch_agent::outbox::segment::scan;

fuzz_target!(|data: &[u8]| {
    let s = scan(data);
    assert_eq!(s.records.len(), s.kept.len());
    assert!(s.records.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(s.kept.windows(2).all(|w| w[0].end <= w[1].start));
    assert!(s.kept.iter().all(|r| r.start < r.end && r.end <= data.len()));
    let kept: usize = s.kept.iter().map(|r| r.len()).sum();
    let damaged: u64 = s.damage.iter().map(|d| d.bytes).sum();
    assert_eq!(kept as u64 + damaged, data.len() as u64, "every byte is kept or counted as damage");
    // Only the last stretch can be a tail.
    assert!(s.damage.iter().rev().skip(1).all(|d| !d.tail));
    let good: Vec<u8> = s.kept.iter().flat_map(|r| data[r.clone()].iter().copied()).collect();
    let again = scan(&good);
    assert_eq!(again.records, s.records);
    assert!(again.damage.is_empty());
});
