//! The contract both sides of perch share.
//!
//! This crate holds the bundle format (a streaming reader and writer), the
//! trust document, key handling and the threshold-signature check. It does
//! no I/O of its own: readers and writers are `std::io::Read`/`Write` values
//! handed in by the caller, and time is passed in as Unix seconds.
//!
//! Invariants worth knowing before you touch anything here:
//! - A [`bundle::VerifiedManifest`] can only be built by checking signatures
//!   against a [`trust::VerifiedTrust`], which itself can only be built by
//!   checking the org root signature. Code holding one of them never has to
//!   re-check anything.
//! - Every length read from input is bounded before anything is allocated.
//! - Every parser rejects trailing bytes: one byte string, one meaning.
#![forbid(unsafe_code)]

pub mod advisory;
pub mod bundle;
pub mod desired;
pub mod enroll;
pub mod jwt;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod readable;
pub mod registry;
pub mod report;
pub mod subjects;
pub mod token;
pub mod trust;

mod codec;
#[cfg(test)]
mod testkit;

pub use keys::{KeyError, KeyId, PublicKey, SecretKey};

/// A SHA-256 digest as perch writes it everywhere: 64 hex digits. `None`
/// for anything else.
pub fn digest_from_hex(s: &str) -> Option<[u8; 32]> {
    let mut d = [0u8; 32];
    hex::decode_to_slice(s, &mut d).ok().map(|()| d)
}

#[cfg(test)]
mod digest_tests {
    #[test]
    fn a_digest_is_exactly_64_hex_digits() {
        let d = [0xab; 32];
        assert_eq!(super::digest_from_hex(&hex::encode(d)), Some(d));
        assert_eq!(super::digest_from_hex(&hex::encode(d).to_uppercase()), Some(d));
        for bad in
            ["", "ab", &"a".repeat(63), &"a".repeat(65), &"g".repeat(64), &format!(" {}", "a".repeat(63))]
        {
            assert_eq!(super::digest_from_hex(bad), None, "{bad:?}");
        }
    }
}
