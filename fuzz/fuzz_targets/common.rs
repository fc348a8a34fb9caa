// Shared fixtures: a fixed org whose single release key signs nothing the
// fuzzer can forge, so reaching the payload means the signature check broke.
use std::sync::OnceLock;

use perch_protocol::trust::{SignedTrust, TrustBody, VerifiedTrust};
use perch_protocol::SecretKey;

pub const NOW: u64 = 1_800_000_000;

pub fn trust() -> &'static VerifiedTrust {
    static T: OnceLock<VerifiedTrust> = OnceLock::new();
    T.get_or_init(|| {
        let root = SecretKey::from_seed(&[1; 32]);
        let body = TrustBody {
            org: "fuzz".into(),
            version: 1,
            issued_at: 0,
            expires_at: None,
            root_key: root.public(),
            release_keys: vec![SecretKey::from_seed(&[2; 32]).public()],
            threshold: 1,
            issuing_keys: vec![],
        };
        SignedTrust::create(body, &root).unwrap().verify_anchor(NOW, None).unwrap()
    })
}
