//! `perch bundle build`: payload in, unsigned bundle out.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{
    check_archive, ArchivePolicy, BundleError, BundleHead, Manifest, ManifestBuilder, ManifestParams,
    PayloadKind,
};
use perch_support::durable::{self, Replace, WriteError};

use crate::archive::{self, ArchiveError};

/// Read size while hashing: small enough to stay in L2 between read and hash.
const READ_PIECE: usize = 64 * 1024;

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    InvalidParams(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the archive built would be refused by a device: {0}")]
    Check(perch_protocol::bundle::ArchiveError),
    #[error("{}: input changed while the bundle was being built", .0.display())]
    InputChanged(PathBuf),
}

/// Builds an unsigned bundle at `out` from `input` (a file for `image`, a
/// directory for `archive`). The output appears atomically, or not at all.
pub fn build_bundle(params: ManifestParams, input: &Path, out: &Path) -> Result<Manifest, BuildError> {
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // An archive is first written to a temp file beside the output; the tar is
    // then handled exactly like an image.
    let tar_tmp;
    let payload_path = match params.kind {
        PayloadKind::Image => input,
        PayloadKind::Archive => {
            let tmp = tempfile::Builder::new()
                .prefix(".perch-tar-")
                .tempfile_in(out_dir)
                .map_err(|source| BuildError::Io { path: out_dir.into(), source })?;
            let policy = ArchivePolicy { allow_setid: params.allow_setid };
            let writer = archive::write_tar(input, BufWriter::new(tmp.as_file()), policy)?;
            writer
                .into_inner()
                .map_err(|e| BuildError::Io { path: tmp.path().into(), source: e.into_error() })?;
            // What a device would refuse must never be signed: check the tar
            // with the device's own check.
            let tar = File::open(tmp.path())
                .map_err(|source| BuildError::Io { path: tmp.path().into(), source })?;
            check_archive(io::BufReader::new(tar), policy).map_err(BuildError::Check)?;
            tar_tmp = tmp;
            tar_tmp.path()
        }
    };
    let manifest = hash_payload(params.clone(), payload_path, &mut io::sink())?;
    let head = BundleHead::new(manifest.clone()).map_err(params_error)?;
    durable::write_atomic(out, 0o644, Replace::Allow, |file| {
        let mut w = BufWriter::with_capacity(READ_PIECE, file);
        head.write_to(&mut w).map_err(|source| BuildError::Io { path: out.into(), source })?;
        // Hash again while copying: if the input changed since the first
        // pass, the bundle would not match its own manifest.
        let again = hash_payload(params, payload_path, &mut w)?;
        w.flush().map_err(|source| BuildError::Io { path: out.into(), source })?;
        if again != manifest {
            return Err(BuildError::InputChanged(input.into()));
        }
        Ok(())
    })?;
    Ok(manifest)
}

/// Streams `path` through a [`ManifestBuilder`], copying what it stores
/// (each chunk raw or compressed) to `copy`.
fn hash_payload(params: ManifestParams, path: &Path, copy: &mut impl Write) -> Result<Manifest, BuildError> {
    let io_err = |source| BuildError::Io { path: path.into(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let mut builder = ManifestBuilder::new(params).map_err(params_error)?;
    let mut buf = vec![0u8; READ_PIECE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        builder.update(&buf[..n]);
        copy.write_all(&builder.take_stored()).map_err(io_err)?;
    }
    let (manifest, last) = builder.finish_stored().map_err(params_error)?;
    copy.write_all(&last).map_err(io_err)?;
    Ok(manifest)
}

fn params_error(e: BundleError) -> BuildError {
    match e {
        BundleError::InvalidManifest(m) => BuildError::InvalidParams(m),
        other => BuildError::InvalidParams(other.to_string()),
    }
}
