//! Loading the org trust document from disk.

use std::path::{Path, PathBuf};

use perch_protocol::trust::{SignedTrust, TrustError, VerifiedTrust, MAX_TRUST_FILE_LEN};

use crate::durable::{read_bounded, ReadError};

/// Why a trust document could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadTrustError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{}", path.display())]
    Trust { path: PathBuf, source: TrustError },
}

/// Reads and anchors a trust document (root signature, expiry).
pub fn load_trust(path: &Path, now: u64) -> Result<VerifiedTrust, LoadTrustError> {
    let bytes = read_bounded(path, MAX_TRUST_FILE_LEN)?;
    SignedTrust::parse(&bytes)
        .and_then(|t| t.verify_anchor(now, None))
        .map_err(|source| LoadTrustError::Trust { path: path.into(), source })
}
