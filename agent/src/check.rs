//! Offline bundle check: everything `install` verifies before it writes.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{check_archive_payload, BundleError, BundleReader, VerifiedManifest};
use perch_protocol::trust::VerifiedTrust;
use perch_support::bundle_file::verify_file;
use perch_support::exit::{Class, Classify};

/// Why a bundle failed the check.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct CheckError {
    pub path: PathBuf,
    #[source]
    pub source: BundleError,
}

impl Classify for CheckError {
    fn class(&self) -> Option<Class> {
        self.source.class()
    }
}

/// Verifies the bundle at `path` for `target` and discards the payload.
pub fn check_bundle(trust: &VerifiedTrust, path: &Path, now: u64) -> Result<VerifiedManifest, CheckError> {
    let err = |source| CheckError { path: path.into(), source };
    let open = || File::open(path).map(|f| io::BufReader::with_capacity(64 * 1024, f));
    let file = File::open(path).map_err(|e| err(BundleError::Io(e)))?;
    // Every core: the device checks a bundle as fast as it can read it.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let manifest = verify_file(&file, trust, now, threads).map_err(err)?;
    if manifest.manifest().archive_policy().is_some() {
        // A second pass, as `install` does before it unpacks: every tar entry.
        let file = open().map_err(|e| err(BundleError::Io(e)))?;
        BundleReader::open_verified(file, trust, now).and_then(check_archive_payload).map_err(err)?;
    }
    Ok(manifest)
}
