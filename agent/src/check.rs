//! Offline bundle check: everything `install` verifies before it writes.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{verify_stream, BundleError, VerifiedManifest};
use perch_protocol::trust::VerifiedTrust;

/// Why a bundle failed the check.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct CheckError {
    pub path: PathBuf,
    #[source]
    pub source: BundleError,
}

/// Verifies the bundle at `path` for `target` and discards the payload.
pub fn check_bundle(trust: &VerifiedTrust, path: &Path, now: u64) -> Result<VerifiedManifest, CheckError> {
    let err = |source| CheckError { path: path.into(), source };
    let file = File::open(path).map_err(|e| err(BundleError::Io(e)))?;
    verify_stream(io::BufReader::with_capacity(64 * 1024, file), trust, now, |_, _| Ok(())).map_err(err)
}
