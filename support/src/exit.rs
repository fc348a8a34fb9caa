//! The exit codes of the CLI contract, and the mapping from errors to them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | runtime failure |
//! | 2 | usage or config error |
//! | 3 | rejected for security (signature, threshold, hash, downgrade, expired, token, corrupt input) |

use perch_protocol::bundle::BundleError;
use perch_protocol::trust::TrustError;

use crate::durable::{ReadError, WriteError};
use crate::keyfile::KeyFileError;
use crate::trustfile::LoadTrustError;

pub const SUCCESS: i32 = 0;
pub const RUNTIME: i32 = 1;
pub const USAGE: i32 = 2;
pub const SECURITY: i32 = 3;

/// An error in how the command was invoked or configured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A refusal for security reasons that is not a bundle or trust error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecurityError(pub String);

/// Walks an error chain (outermost first) and picks the exit code of the
/// first error that has an opinion.
pub fn code_for<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> i32 {
    for e in chain {
        if let Some(b) = e.downcast_ref::<BundleError>() {
            return if b.is_security() { SECURITY } else { RUNTIME };
        }
        if e.is::<TrustError>() || e.is::<SecurityError>() || e.is::<perch_protocol::token::TokenError>() {
            return SECURITY;
        }
        if e.is::<UsageError>() {
            return USAGE;
        }
        if let Some(k) = e.downcast_ref::<KeyFileError>() {
            return match k {
                KeyFileError::Read(r) => read_code(r),
                KeyFileError::Write(WriteError::Io { .. }) => RUNTIME,
                _ => USAGE,
            };
        }
        if let Some(WriteError::Exists(_)) = e.downcast_ref::<WriteError>() {
            return USAGE;
        }
        if let Some(r) = e.downcast_ref::<ReadError>() {
            return read_code(r);
        }
        if let Some(t) = e.downcast_ref::<LoadTrustError>() {
            return match t {
                // An oversized trust document is hostile input, not a typo.
                LoadTrustError::Read(ReadError::TooLarge { .. }) => SECURITY,
                LoadTrustError::Read(r) => read_code(r),
                LoadTrustError::Trust { .. } => SECURITY,
            };
        }
    }
    RUNTIME
}

/// A named file that is missing or too large is the operator's to fix.
fn read_code(r: &ReadError) -> i32 {
    match r {
        ReadError::Io { source, .. } if !is_missing(source) => RUNTIME,
        _ => USAGE,
    }
}

fn is_missing(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory)
}
