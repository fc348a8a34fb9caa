//! The value of a desired-state key in `PERCH_DESIRED` (`device.<id>` or
//! `group.<g>`): JSON `{"bundle": "<digest hex>"}`, so an operator can also
//! read and write it with the `nats` CLI.

use serde::{Deserialize, Serialize};

/// The longest value read: anything bigger is not a desired state.
pub const MAX_VALUE: usize = 1024;

#[derive(Serialize, Deserialize)]
struct Value {
    bundle: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    #[error("desired state is {0} bytes, over the {MAX_VALUE}-byte limit")]
    TooLarge(usize),
    #[error("desired state is not {{\"bundle\": \"<digest>\"}}: {0}")]
    Malformed(String),
    #[error("desired state's bundle is not a 64-digit hex digest")]
    BadDigest,
}

/// The stored form of "run the bundle with this digest".
pub fn encode(digest: &[u8; 32]) -> Vec<u8> {
    serde_json::to_vec(&Value { bundle: hex::encode(digest) }).unwrap_or_default()
}

/// The digest a stored value names.
pub fn decode(bytes: &[u8]) -> Result<[u8; 32], DesiredError> {
    if bytes.len() > MAX_VALUE {
        return Err(DesiredError::TooLarge(bytes.len()));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|e| DesiredError::Malformed(e.to_string()))?;
    crate::digest_from_hex(v.bundle.trim()).ok_or(DesiredError::BadDigest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let d = [7u8; 32];
        assert_eq!(decode(&encode(&d)), Ok(d));
        assert_eq!(decode(format!("{{\"bundle\": \" {} \"}}", hex::encode(d)).as_bytes()), Ok(d));
        assert!(matches!(decode(b"{\"bundle\": \"abc\"}"), Err(DesiredError::BadDigest)));
        assert!(matches!(decode(b"{}"), Err(DesiredError::Malformed(_))));
        assert!(matches!(decode(&[b' '; 2000]), Err(DesiredError::TooLarge(2000))));
    }

    proptest::proptest! {
        #[test]
        fn hostile_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = decode(&data);
        }
    }
}
