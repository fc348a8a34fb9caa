//! The `.perch` bundle format.
//!
//! ```text
//! header      magic "PERCHBDL", format version 2 or 3, manifest len, signatures len
//! signatures  postcard (manifest sha256, [(key id, ed25519 signature over that sha256)])
//! manifest    postcard manifest of that format, whose SHA-256 must be the signed one
//! payload     the chunks as stored (raw, or zstd in format 3), one after another
//! ```
//!
//! Format 3 (see [`Manifest`]) adds compressed and content-defined chunks
//! and drops the whole-payload hash; format 2 is still read and written.
//!
//! The signatures come first and sign the manifest's digest, so that
//! [`BundleReader::open_verified`] refuses an unsigned bundle after reading
//! at most the header and the signature block (64 KiB), before a byte of a
//! manifest that may be 40 MiB is buffered or decoded. Format 1 (manifest
//! first, signatures over its bytes) is refused by version: no agent reading
//! it has shipped.
//!
//! Reading is streaming and check-before-use: [`BundleReader::open_verified`]
//! checks the signatures against a [`VerifiedTrust`](crate::trust::VerifiedTrust),
//! then reads the manifest, and only then hands out a [`VerifiedBundle`],
//! which yields each chunk after its hash matched. [`BundleReader::open`]
//! parses the whole head unverified, for tools that display or re-sign it.

mod archive;
mod decompress;
mod manifest;
mod reader;
mod window;
mod writer;

pub use archive::{check_archive, raw_entry, ArchiveError, ArchivePolicy, Refusal, MAX_ENTRY_PATH};
pub use decompress::Decoder;
pub use manifest::{
    ChunkEntry, Chunking, Format, Manifest, ManifestError, PayloadKind, Release, MAX_WINDOW, MIN_CDC_CHUNK,
};
pub use reader::{
    check_archive_payload, claimed_digest, verify_stream, BundleReader, Checked, CheckedBytes, CheckedChunk,
    LinkedChunk, PayloadHasher, UncheckedChunk, VerifiedBundle, VerifiedManifest,
};
pub use window::Window;
pub use writer::{build_chunk, build_linked_chunk, BundleHead, ManifestBuilder, ManifestParams, ZSTD_LEVELS};

use crate::keys::SignatureCheckError;

pub const BUNDLE_MAGIC: &[u8; 8] = b"PERCHBDL";
/// The newest format this build writes (and the oldest it reads is 2).
pub const BUNDLE_FORMAT_VERSION: u16 = 3;

/// The most bytes a bundle's head (header, signature block, manifest) can
/// take: a bound for reading a kept head back.
pub const MAX_HEAD_LEN: usize = crate::codec::HEADER_LEN
    + crate::limits::MAX_SIGNATURES_LEN as usize
    + crate::limits::MAX_MANIFEST_LEN as usize;

/// Context string mixed into every signature over a manifest's digest, one
/// per format: no signature made for one format verifies for another, so a
/// header's version cannot be changed to read signed bytes another way.
pub(crate) fn manifest_context(format: Format) -> &'static [u8] {
    match format {
        Format::V2 => b"perch/bundle-digest/v2\0",
        Format::V3 => b"perch/bundle-digest/v3\0",
    }
}

/// Identifies a bundle: the SHA-256 of its manifest bytes. Two bundles with
/// the same digest have the same payload (the manifest lists every chunk hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BundleDigest(pub [u8; 32]);

impl core::fmt::Display for BundleDigest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Which part of the bundle a truncation or size error is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Header,
    Manifest,
    Signatures,
    Payload,
}

impl core::fmt::Display for Section {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Section::Header => "header",
            Section::Manifest => "manifest",
            Section::Signatures => "signatures",
            Section::Payload => "payload",
        })
    }
}

/// Why a bundle was refused or could not be read.
///
/// Everything but [`BundleError::Io`] is a security rejection (exit code 3).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a perch bundle (bad magic)")]
    BadMagic,
    #[error("unsupported bundle format version {0} (this build reads 2 and {BUNDLE_FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("bundle header: reserved bytes are not zero")]
    Reserved,
    #[error("bundle truncated in the {0}")]
    Truncated(Section),
    #[error("bundle {section} is {len} bytes, over the {max}-byte limit")]
    TooLarge { section: Section, len: u32, max: u32 },
    #[error("bundle {section} is malformed: {detail}")]
    Malformed { section: Section, detail: String },
    #[error("bundle manifest does not match the digest its signatures cover")]
    ManifestDigest,
    #[error("bundle manifest is invalid: {0}")]
    InvalidManifest(String),
    #[error(transparent)]
    Signatures(#[from] SignatureCheckError),
    #[error("bundle expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("chunk {index} of {count}: sha256 mismatch")]
    ChunkMismatch { index: u32, count: u32 },
    #[error("chunk {index} of {count}: length {got}, expected {expected}")]
    ChunkLength { index: u32, count: u32, got: usize, expected: usize },
    #[error("chunk {index} of {count}: its signed compressed bytes do not decompress to its signed length: {detail}")]
    Decompress { index: u32, count: u32, detail: String },
    /// A caller asked to decode a linked chunk without the chunks before
    /// it (a bug, or a resume that did not read them back).
    #[error(
        "chunk {index} of {count}: the written bytes before it, which it is decoded against, are not at hand"
    )]
    NoWindow { index: u32, count: u32 },
    #[error("chunk {index} is out of range (bundle has {count})")]
    ChunkOutOfRange { index: u32, count: u32 },
    #[error("payload sha256 mismatch (every chunk matched, the whole-payload digest did not)")]
    PayloadMismatch,
    #[error("bundle has unexpected data after the payload")]
    TrailingData,
    /// An archive payload holds what a device refuses.
    #[error(transparent)]
    Archive(ArchiveError),
    #[error("reading bundle")]
    Io(#[source] std::io::Error),
}

impl BundleError {
    /// True for rejections of the bundle itself, false for I/O trouble.
    pub fn is_security(&self) -> bool {
        match self {
            BundleError::Io(_) | BundleError::NoWindow { .. } => false,
            BundleError::Archive(a) => a.is_security(),
            _ => true,
        }
    }
}
