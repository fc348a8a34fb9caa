use std::io::{self, Write};

use sha2::{Digest, Sha256};

use super::{
    BundleDigest, BundleError, Manifest, PayloadKind, BUNDLE_FORMAT_VERSION, BUNDLE_MAGIC, MANIFEST_CONTEXT,
};
use crate::codec;
use crate::keys::SignatureEntry;
use crate::limits::{MAX_CHUNK_SIZE, MAX_SIGNATURES, MIN_CHUNK_SIZE};
use crate::SecretKey;

/// The manifest fields chosen by whoever builds the bundle.
#[derive(Debug, Clone)]
pub struct ManifestParams {
    pub name: String,
    pub counter: u64,
    pub version: String,
    pub targets: Vec<String>,
    pub kind: PayloadKind,
    pub chunk_size: u32,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub min_agent_version: Option<String>,
    pub allow_downgrade: bool,
    /// Setuid and setgid files may be in the archive.
    pub allow_setid: bool,
}

/// Hashes a payload as it streams past, then produces its manifest.
pub struct ManifestBuilder {
    params: ManifestParams,
    chunk: Sha256,
    in_chunk: usize,
    chunk_hashes: Vec<[u8; 32]>,
    whole: Sha256,
    len: u64,
}

impl ManifestBuilder {
    pub fn new(params: ManifestParams) -> Result<Self, BundleError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&params.chunk_size) {
            return Err(BundleError::InvalidManifest(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                params.chunk_size
            )));
        }
        Ok(Self {
            params,
            chunk: Sha256::new(),
            in_chunk: 0,
            chunk_hashes: Vec::new(),
            whole: Sha256::new(),
            len: 0,
        })
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.len += data.len() as u64;
        let size = self.params.chunk_size as usize;
        while !data.is_empty() {
            let take = (size - self.in_chunk).min(data.len());
            self.chunk.update(&data[..take]);
            self.in_chunk += take;
            data = &data[take..];
            if self.in_chunk == size {
                self.chunk_hashes.push(self.chunk.finalize_reset().into());
                self.in_chunk = 0;
            }
        }
    }

    pub fn finish(mut self) -> Result<Manifest, BundleError> {
        if self.in_chunk > 0 {
            self.chunk_hashes.push(self.chunk.finalize().into());
        }
        let p = self.params;
        let m = Manifest {
            name: p.name,
            counter: p.counter,
            version: p.version,
            targets: p.targets,
            kind: p.kind,
            payload_len: self.len,
            chunk_size: p.chunk_size,
            chunk_hashes: self.chunk_hashes,
            payload_sha256: self.whole.finalize().into(),
            created_at: p.created_at,
            expires_at: p.expires_at,
            min_agent_version: p.min_agent_version,
            allow_downgrade: p.allow_downgrade,
            allow_setid: p.allow_setid,
        };
        m.validate().map_err(BundleError::InvalidManifest)?;
        Ok(m)
    }
}

/// Everything before the payload: the manifest and its signatures.
#[derive(Debug, Clone)]
pub struct BundleHead {
    pub(super) manifest: Manifest,
    pub(super) manifest_bytes: Vec<u8>,
    pub(super) signatures: Vec<SignatureEntry>,
}

impl BundleHead {
    /// A head with no signatures yet.
    pub fn new(manifest: Manifest) -> Result<Self, BundleError> {
        manifest.validate().map_err(BundleError::InvalidManifest)?;
        let manifest_bytes = codec::encode(&manifest);
        Ok(Self { manifest, manifest_bytes, signatures: Vec::new() })
    }

    /// The manifest as read, before any signature check. Fit for display only.
    pub fn unverified_manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    pub fn digest(&self) -> BundleDigest {
        BundleDigest(Sha256::digest(&self.manifest_bytes).into())
    }

    /// Adds `key`'s signature. Signing twice with one key adds nothing:
    /// returns whether anything was added.
    pub fn add_signature(&mut self, key: &SecretKey) -> Result<bool, BundleError> {
        let key_id = key.public().id();
        if self.signatures.iter().any(|s| s.key_id == key_id) {
            return Ok(false);
        }
        if self.signatures.len() >= MAX_SIGNATURES {
            return Err(BundleError::InvalidManifest(format!("already {MAX_SIGNATURES} signatures")));
        }
        let signature = key.sign(MANIFEST_CONTEXT, &self.signed_message());
        self.signatures.push(SignatureEntry { key_id, signature });
        Ok(true)
    }

    /// What every signature on this head covers: the manifest's length and
    /// SHA-256, so that a reader checks it before reading the manifest.
    pub(super) fn signed_message(&self) -> [u8; 36] {
        // `write_to` refuses a manifest whose length does not fit a u32.
        let len = u32::try_from(self.manifest_bytes.len()).unwrap_or(u32::MAX);
        super::reader::signed_message(len, &self.digest().0)
    }

    /// Writes header, signatures and manifest. The payload follows.
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<()> {
        let sigs = codec::encode(&(self.digest().0, &self.signatures));
        let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "bundle section over 4 GiB");
        let header = codec::encode_header(
            BUNDLE_MAGIC,
            BUNDLE_FORMAT_VERSION,
            u32::try_from(self.manifest_bytes.len()).map_err(too_big)?,
            u32::try_from(sigs.len()).map_err(too_big)?,
        );
        w.write_all(&header)?;
        w.write_all(&sigs)?;
        w.write_all(&self.manifest_bytes)
    }
}
