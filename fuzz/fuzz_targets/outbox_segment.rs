#![no_main]
//! Arbitrary bytes as an outbox segment file (what the agent reads after a
//! power cut): opening never fails or panics on content, what survives is a
//! run of increasing sequence numbers, and the file is cut to it.
use libfuzzer_sys::fuzz_target;
use perch_agent::outbox::{Outbox, OutboxConfig};
use perch_protocol::report::Lane;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let lane = dir.path().join("outbox/events");
    if std::fs::create_dir_all(&lane).is_err() || std::fs::write(lane.join("00000000000000000001.seg"), data).is_err() {
        return;
    }
    let (ob, _) = Outbox::open(dir.path(), OutboxConfig::default()).expect("content never makes open fail");
    let seqs: Vec<u64> = ob.pending(Lane::Events).map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
});
