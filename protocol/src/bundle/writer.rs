use std::io::{self, Write};

use sha2::{Digest, Sha256};

use super::{
    manifest_context, BundleDigest, BundleError, ChunkEntry, Chunking, Format, Manifest, PayloadKind,
    Release, BUNDLE_MAGIC,
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
    /// The format to write: 3, or 2 for agents that read no other.
    pub format: Format,
    /// Compress each chunk with zstd at this level (1..=22; format 3), and
    /// keep it compressed if that makes it smaller.
    pub zstd_level: Option<i32>,
}

/// The zstd levels `--compress zstd:LEVEL` takes.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=22;

/// Hashes (and compresses, if asked) a payload as it streams past, handing
/// out the bytes to store after the head as each chunk ends
/// ([`take_stored`](Self::take_stored)), then produces its manifest.
pub struct ManifestBuilder {
    params: ManifestParams,
    chunk: Sha256,
    in_chunk: usize,
    /// The current chunk's bytes, when compressing.
    raw: Vec<u8>,
    /// Bytes ready to follow the head.
    stored: Vec<u8>,
    chunks: Vec<ChunkEntry>,
    /// Format 2 only.
    whole: Option<Sha256>,
    failed: Option<String>,
    /// Set for chunks cut by the caller ([`push_chunk`](Self::push_chunk)).
    chunking: Option<Chunking>,
}

/// Hashes one chunk and, with a zstd level, compresses it: its manifest
/// entry, and its compressed bytes if they are what is stored (only when
/// smaller than the chunk; `None`: the chunk is stored as it is). Each
/// chunk is one independent frame, so chunks can be built on any thread
/// and fetched, checked and decompressed alone.
pub fn build_chunk(raw: &[u8], zstd_level: Option<i32>) -> Result<(ChunkEntry, Option<Vec<u8>>), String> {
    build_linked_chunk(raw, zstd_level, 0, &[])
}

/// [`build_chunk`], compressing against `prefix`: the written bytes just
/// before this chunk, `window` of them or all there are if fewer (see
/// [`ChunkEntry::ZstdLinked`]). Still one frame per chunk, built on any
/// thread, but decoded only after the chunks before it. With an empty
/// prefix the chunk is independent.
pub fn build_linked_chunk(
    raw: &[u8],
    zstd_level: Option<i32>,
    window: u32,
    prefix: &[u8],
) -> Result<(ChunkEntry, Option<Vec<u8>>), String> {
    let hash = Sha256::digest(raw).into();
    let len = u32::try_from(raw.len()).map_err(|_| format!("a chunk of {} bytes", raw.len()))?;
    let Some(level) = zstd_level else { return Ok((ChunkEntry::Raw { hash, len }, None)) };
    if prefix.len() > window as usize {
        return Err(format!("a prefix of {} bytes for a window of {window}", prefix.len()));
    }
    let z = compress(raw, level, prefix).map_err(|e| format!("compressing a chunk: {e}"))?;
    if z.len() >= raw.len() {
        return Ok((ChunkEntry::Raw { hash, len }, None));
    }
    let stored_len = u32::try_from(z.len()).unwrap_or(u32::MAX);
    let stored_hash = Sha256::digest(&z).into();
    let entry = if prefix.is_empty() {
        ChunkEntry::Zstd { stored_hash, stored_len, hash, len }
    } else {
        ChunkEntry::ZstdLinked { window, stored_hash, stored_len, hash, len }
    };
    Ok((entry, Some(z)))
}

/// One zstd frame of `raw` at `level`, referring back into `prefix` if
/// it is not empty.
fn compress(raw: &[u8], level: i32, prefix: &[u8]) -> Result<Vec<u8>, &'static str> {
    use zstd::zstd_safe::{get_error_name, CCtx, CParameter};
    let mut c = CCtx::create();
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
    c.set_parameter(CParameter::CompressionLevel(level)).map_err(get_error_name)?;
    if !prefix.is_empty() {
        // The window must reach from the chunk's end back to the prefix's
        // start, or zstd would not look that far.
        let span = (prefix.len() + raw.len()) as u64;
        let log = (u64::BITS - span.saturating_sub(1).leading_zeros()).clamp(10, 27);
        c.set_parameter(CParameter::WindowLog(log)).map_err(get_error_name)?;
        c.ref_prefix(prefix).map_err(get_error_name)?;
    }
    // The XXH64 of the chunk, which the decoder checks: what lets an
    // installer write a decoded chunk without hashing it again.
    c.set_parameter(CParameter::ChecksumFlag(true)).map_err(get_error_name)?;
    c.compress2(&mut out, raw).map_err(get_error_name)?;
    // Signed only once it decodes back to the chunk: a device trusts a
    // checksummed frame's output as the signer's.
    match super::decompress::chunk(&out, raw.len(), prefix) {
        Ok(back) if back == raw => Ok(out),
        _ => Err("the frame does not decode back to the chunk"),
    }
}

impl ManifestBuilder {
    pub fn new(params: ManifestParams) -> Result<Self, BundleError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&params.chunk_size) {
            return Err(BundleError::InvalidManifest(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                params.chunk_size
            )));
        }
        if let Some(level) = params.zstd_level {
            if params.format == Format::V2 {
                return Err(BundleError::InvalidManifest("format 2 has no compression".into()));
            }
            if !ZSTD_LEVELS.contains(&level) {
                return Err(BundleError::InvalidManifest(format!(
                    "zstd level {level} is outside {}..={}",
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                )));
            }
        }
        let whole = (params.format == Format::V2).then(Sha256::new);
        Ok(Self {
            params,
            chunk: Sha256::new(),
            in_chunk: 0,
            raw: Vec::new(),
            stored: Vec::new(),
            chunks: Vec::new(),
            whole,
            failed: None,
            chunking: None,
        })
    }

    /// Adds a chunk the caller cut (fixed or content-defined, as
    /// `chunking` says) and built with [`build_chunk`]; the caller stores
    /// its bytes. Format 3 only, and not mixed with [`update`](Self::update).
    pub fn push_chunk(&mut self, chunking: Chunking, entry: ChunkEntry) -> Result<(), BundleError> {
        if self.whole.is_some() || self.in_chunk > 0 || self.chunking.is_some_and(|c| c != chunking) {
            return Err(BundleError::InvalidManifest(
                "chunks cut by the caller need format 3 and one chunking".into(),
            ));
        }
        self.chunking = Some(chunking);
        self.chunks.push(entry);
        Ok(())
    }

    pub fn update(&mut self, mut data: &[u8]) {
        if let Some(w) = &mut self.whole {
            w.update(data);
        }
        let size = self.params.chunk_size as usize;
        while !data.is_empty() {
            let take = (size - self.in_chunk).min(data.len());
            let piece = &data[..take];
            self.chunk.update(piece);
            if self.params.zstd_level.is_some() {
                self.raw.extend_from_slice(piece);
            } else {
                self.stored.extend_from_slice(piece);
            }
            self.in_chunk += take;
            data = &data[take..];
            if self.in_chunk == size {
                self.end_chunk();
            }
        }
    }

    /// The bytes to write after the head so far, in order: every chunk
    /// that has ended, as stored.
    pub fn take_stored(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.stored)
    }

    fn end_chunk(&mut self) {
        let hash = self.chunk.finalize_reset().into();
        // in_chunk <= chunk_size <= MAX_CHUNK_SIZE, a u32.
        let len = u32::try_from(self.in_chunk).unwrap_or(u32::MAX);
        self.in_chunk = 0;
        if self.params.zstd_level.is_none() {
            self.chunks.push(ChunkEntry::Raw { hash, len });
            return;
        }
        let raw = std::mem::take(&mut self.raw);
        match build_chunk(&raw, self.params.zstd_level) {
            Ok((entry, z)) => {
                self.chunks.push(entry);
                self.stored.extend_from_slice(z.as_deref().unwrap_or(&raw));
            }
            Err(e) => {
                self.failed.get_or_insert(format!("chunk {}: {e}", self.chunks.len()));
                self.chunks.push(ChunkEntry::Raw { hash, len });
            }
        }
        // The buffer back, for the next chunk.
        self.raw = raw;
        self.raw.clear();
    }

    /// The manifest, for a caller that writes the payload itself (it must
    /// be uncompressed then: the stored bytes are the input's).
    pub fn finish(self) -> Result<Manifest, BundleError> {
        self.finish_stored().map(|(m, _)| m)
    }

    /// The manifest, and the stored bytes not yet taken (the last chunk's).
    pub fn finish_stored(mut self) -> Result<(Manifest, Vec<u8>), BundleError> {
        if self.in_chunk > 0 {
            self.end_chunk();
        }
        let last = std::mem::take(&mut self.stored);
        if let Some(e) = self.failed {
            return Err(BundleError::InvalidManifest(e));
        }
        let p = self.params;
        let release = Release {
            name: p.name,
            counter: p.counter,
            version: p.version,
            targets: p.targets,
            kind: p.kind,
            created_at: p.created_at,
            expires_at: p.expires_at,
            min_agent_version: p.min_agent_version,
            allow_downgrade: p.allow_downgrade,
            allow_setid: p.allow_setid,
        };
        let whole = self.whole.map(|w| w.finalize().into());
        let chunking = self.chunking.unwrap_or(Chunking::Fixed { size: p.chunk_size });
        let m = Manifest::from_parts(release, p.format, chunking, self.chunks, whole)
            .map_err(BundleError::InvalidManifest)?;
        Ok((m, last))
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
        let manifest_bytes = manifest.encode();
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
        let signature = key.sign(manifest_context(self.manifest.format()), &self.signed_message());
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
            self.manifest.format().version(),
            u32::try_from(self.manifest_bytes.len()).map_err(too_big)?,
            u32::try_from(sigs.len()).map_err(too_big)?,
        );
        w.write_all(&header)?;
        w.write_all(&sigs)?;
        w.write_all(&self.manifest_bytes)
    }
}
