//! `perch bundle verify`: the whole bundle, payload included.

use std::fs::File;
use std::path::{Path, PathBuf};

use perch_support::exit::{Class, Classify};

use perch_protocol::bundle::{check_archive_payload, BundleError, BundleReader, VerifiedManifest};
use perch_protocol::trust::VerifiedTrust;

/// Why a bundle file failed verification.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    #[source]
    pub source: BundleError,
}

impl Classify for VerifyError {
    fn class(&self) -> Option<Class> {
        self.source.class()
    }
}

/// Verifies every byte of the bundle at `path`, on every core (each byte
/// of a format-3 payload is hashed once; see [`perch_support::bundle_file::verify_file`]).
pub fn verify_file(trust: &VerifiedTrust, path: &Path, now: u64) -> Result<VerifiedManifest, VerifyError> {
    let err = |source| VerifyError { path: path.into(), source };
    let file = File::open(path).map_err(|e| err(BundleError::Io(e)))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let manifest = perch_support::bundle_file::verify_file(&file, trust, now, threads).map_err(err)?;
    if manifest.manifest().archive_policy().is_some() {
        // A second pass: every tar entry, as a device checks it before unpacking.
        let file = File::open(path).map_err(|e| err(BundleError::Io(e)))?;
        BundleReader::open_verified(std::io::BufReader::new(file), trust, now)
            .and_then(check_archive_payload)
            .map_err(err)?;
    }
    Ok(manifest)
}
