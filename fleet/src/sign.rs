//! `perch bundle sign`: add one signature, rewriting the file atomically.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{BundleError, BundleReader};
use perch_protocol::{KeyId, SecretKey};
use perch_support::durable::{self, Replace, WriteError};
use perch_support::exit::{Class, Classify};

/// Why a bundle could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{}", path.display())]
    Bundle { path: PathBuf, source: BundleError },
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl Classify for SignError {
    fn class(&self) -> Option<Class> {
        match self {
            SignError::Open { source, .. } if perch_support::exit::is_missing(source) => Some(Class::Usage),
            SignError::Open { .. } => Some(Class::Runtime),
            SignError::Bundle { source, .. } => source.class(),
            SignError::Write(e) => e.class(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignOutcome {
    Added(KeyId),
    AlreadySigned(KeyId),
}

/// Adds `key`'s signature to the bundle at `path`. The payload is checked
/// against the manifest while it is copied, so a damaged bundle is refused
/// rather than signed. Signing twice with one key leaves the file untouched.
pub fn sign_file(path: &Path, key: &SecretKey) -> Result<SignOutcome, SignError> {
    let bundle_err = |source| SignError::Bundle { path: path.into(), source };
    let file = File::open(path).map_err(|source| SignError::Open { path: path.into(), source })?;
    let (mut head, mut payload) = BundleReader::open(file).map_err(bundle_err)?.into_resign_parts();
    let id = key.public().id();
    if !head.add_signature(key).map_err(bundle_err)? {
        return Ok(SignOutcome::AlreadySigned(id));
    }
    durable::write_atomic(path, 0o644, Replace::Allow, |out| {
        let mut w = BufWriter::with_capacity(64 * 1024, out);
        let io = |e| bundle_err(BundleError::Io(e));
        head.write_to(&mut w).map_err(io)?;
        let mut buf = Vec::new();
        // As stored: a compressed chunk stays compressed.
        while payload.read_stored_checked(&mut buf).map_err(bundle_err)?.is_some() {
            w.write_all(&buf).map_err(io)?;
        }
        w.flush().map_err(io)
    })?;
    Ok(SignOutcome::Added(id))
}
