//! Test fixtures shared by this crate's unit tests.

use crate::trust::{SignedTrust, TrustBody};
use crate::SecretKey;

/// Org "acme": root key seed 1, one release key (seed 2, threshold 1), and
/// `issuing` as its only issuing key.
pub fn org(issuing: &SecretKey) -> SignedTrust {
    let root = SecretKey::from_seed(&[1; 32]);
    let body = TrustBody {
        org: "acme".into(),
        version: 1,
        issued_at: 0,
        expires_at: None,
        root_key: root.public(),
        release_keys: vec![SecretKey::from_seed(&[2; 32]).public()],
        threshold: 1,
        issuing_keys: vec![issuing.public()],
    };
    SignedTrust::create(body, &root).unwrap()
}
