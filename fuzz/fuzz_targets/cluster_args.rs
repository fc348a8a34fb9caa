#![no_main]
//! Arbitrary text as a `nats cluster --server` or a `--replicas` value:
//! never panics; an accepted server only holds characters that are safe
//! unescaped in nats-server's config, and an accepted count is 1 to 5.
use libfuzzer_sys::fuzz_target;
use perch_bootstrap::cluster::Member;
use perch_net::Replicas;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = text.parse::<Member>() {
        let safe = |t: &str| t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        assert!(safe(&m.name) && safe(&m.host));
    }
    if let Ok(r) = text.parse::<Replicas>() {
        assert!((1..=5).contains(&r.count(&Default::default())));
    }
});
