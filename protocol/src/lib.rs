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

pub mod bundle;
pub mod desired;
pub mod enroll;
pub mod jwt;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod registry;
pub mod report;
pub mod subjects;
pub mod token;
pub mod trust;

mod codec;
#[cfg(test)]
mod testkit;

pub use keys::{KeyError, KeyId, PublicKey, SecretKey};
