//! `perch bundle verify`: the whole bundle, payload included.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use perch_protocol::bundle::{
    check_archive_payload, BundleError, BundleReader, PayloadHasher, VerifiedManifest,
};
use perch_protocol::trust::VerifiedTrust;

/// Why a bundle file failed verification.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    #[source]
    pub source: BundleError,
}

/// Verifies every byte of the bundle at `path`.
///
/// Chunks are read and checked on this thread while the whole-payload digest
/// runs on a second one: the two SHA-256 passes overlap instead of adding up.
pub fn verify_file(trust: &VerifiedTrust, path: &Path, now: u64) -> Result<VerifiedManifest, VerifyError> {
    let err = |source| VerifyError { path: path.into(), source };
    let file = File::open(path).map_err(|e| err(BundleError::Io(e)))?;
    let mut bundle = BundleReader::open_verified(file, trust, now).map_err(err)?;

    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(3);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    let hasher = thread::spawn(move || {
        let mut whole = PayloadHasher::default();
        for buf in full_rx {
            whole.update(&buf);
            // The reader may already be gone after an error; that is fine.
            let _ = empty_tx.send(buf);
        }
        whole.finalize()
    });
    let read_all = (|| loop {
        let mut buf = empty_rx.try_recv().unwrap_or_default();
        if bundle.read_chunk(&mut buf)?.is_none() {
            return Ok(());
        }
        if full_tx.send(buf).is_err() {
            return Err(BundleError::Io(std::io::Error::other("payload hasher stopped")));
        }
    })();
    drop(full_tx);
    let digest =
        hasher.join().map_err(|_| err(BundleError::Io(std::io::Error::other("payload hasher panicked"))))?;
    read_all.map_err(err)?;
    let manifest = bundle.into_manifest();
    manifest.check_payload_digest(digest).map_err(err)?;
    if manifest.manifest().archive_policy().is_some() {
        // A second pass: every tar entry, as a device checks it before unpacking.
        let file = File::open(path).map_err(|e| err(BundleError::Io(e)))?;
        BundleReader::open_verified(std::io::BufReader::new(file), trust, now)
            .and_then(check_archive_payload)
            .map_err(err)?;
    }
    Ok(manifest)
}
