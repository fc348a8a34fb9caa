//! The signed description of a bundle, in memory and on the wire.
//!
//! Two wire formats decode into one [`Manifest`]:
//! - format 2: fixed-size chunks, each stored as written, plus a
//!   whole-payload SHA-256 (redundant with the chunk hashes, kept so that
//!   format-2 bundles still verify as they were signed);
//! - format 3: a table of chunks, each stored raw or zstd-compressed (alone,
//!   or linked to the written bytes before it) with both hashes signed (of
//!   the bytes that travel and of the bytes that are written), fixed-size
//!   or content-defined; no whole-payload hash.
//!
//! Offsets are never stored: they are the running sums of the lengths,
//! computed once when a manifest is made ([`Manifest::from_parts`]), so a
//! manifest cannot name overlapping or out-of-order chunks.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_CHUNK_SIZE, MAX_LABEL_LEN, MAX_TARGETS, MIN_CHUNK_SIZE};

/// What the payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadKind {
    /// Raw bytes for a block slot.
    Image,
    /// A deterministic tar of a directory tree, for a directory slot.
    Archive,
}

impl PayloadKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PayloadKind::Image => "image",
            PayloadKind::Archive => "archive",
        }
    }
}

/// The wire format a manifest is encoded in (the bundle header's version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V2,
    V3,
}

impl Format {
    pub fn version(self) -> u16 {
        match self {
            Format::V2 => 2,
            Format::V3 => 3,
        }
    }

    pub fn from_version(v: u16) -> Option<Format> {
        match v {
            2 => Some(Format::V2),
            3 => Some(Format::V3),
            _ => None,
        }
    }
}

/// How the payload was cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunking {
    /// Every chunk `size` bytes but a shorter last one: for block images,
    /// whose changes stay in place.
    Fixed { size: u32 },
    /// Content-defined (FastCDC): each chunk `min..=max` bytes but a
    /// shorter last one, so bytes inserted in an archive move only the
    /// chunks around them.
    Cdc { min: u32, avg: u32, max: u32 },
}

/// Largest window a linked chunk may name: what a decoding device keeps
/// in memory beside the chunk. 8 MiB is also zstd -19's own window.
pub const MAX_WINDOW: u32 = 8 * 1024 * 1024;

/// Smallest `min` a content-defined chunking may declare.
pub const MIN_CDC_CHUNK: u32 = crate::limits::MIN_CHUNK_SIZE;

/// One chunk: how it travels, and what is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkEntry {
    /// Stored as written.
    Raw { hash: [u8; 32], len: u32 },
    /// Stored as one zstd frame of `stored_len` bytes hashing to
    /// `stored_hash`, which decompresses to exactly `len` bytes hashing to
    /// `hash`. The stored hash is checked before a byte is decompressed.
    Zstd { stored_hash: [u8; 32], stored_len: u32, hash: [u8; 32], len: u32 },
    /// As [`Zstd`](Self::Zstd), but compressed with the written bytes just
    /// before it in the payload as a zstd prefix (the `window` bytes that
    /// end where this chunk starts, or all of them if fewer), so that it
    /// can refer back to them as a whole-file compressor would. Decoding
    /// it needs those bytes first, checked against their own hashes: a
    /// [`Window`](super::Window) holds them.
    ZstdLinked { window: u32, stored_hash: [u8; 32], stored_len: u32, hash: [u8; 32], len: u32 },
}

impl ChunkEntry {
    /// The SHA-256 of the bytes written.
    pub fn hash(&self) -> &[u8; 32] {
        match self {
            ChunkEntry::Raw { hash, .. }
            | ChunkEntry::Zstd { hash, .. }
            | ChunkEntry::ZstdLinked { hash, .. } => hash,
        }
    }

    /// How many bytes are written (never 0 in a valid manifest, so no
    /// `is_empty`).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        match self {
            ChunkEntry::Raw { len, .. }
            | ChunkEntry::Zstd { len, .. }
            | ChunkEntry::ZstdLinked { len, .. } => *len,
        }
    }

    /// The SHA-256 of the bytes that travel.
    pub fn stored_hash(&self) -> &[u8; 32] {
        match self {
            ChunkEntry::Raw { hash, .. } => hash,
            ChunkEntry::Zstd { stored_hash, .. } | ChunkEntry::ZstdLinked { stored_hash, .. } => stored_hash,
        }
    }

    /// How many bytes travel.
    pub fn stored_len(&self) -> u32 {
        match self {
            ChunkEntry::Raw { len, .. } => *len,
            ChunkEntry::Zstd { stored_len, .. } | ChunkEntry::ZstdLinked { stored_len, .. } => *stored_len,
        }
    }

    pub fn is_compressed(&self) -> bool {
        matches!(self, ChunkEntry::Zstd { .. } | ChunkEntry::ZstdLinked { .. })
    }

    /// How many written bytes before this chunk its decoder needs (0: none).
    pub fn window(&self) -> u32 {
        match self {
            ChunkEntry::ZstdLinked { window, .. } => *window,
            _ => 0,
        }
    }
}

/// The manifest fields that are the same in every format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Bundle name; the release counter is monotonic per name.
    pub name: String,
    /// Release counter. A device refuses a counter not above its highest committed one.
    pub counter: u64,
    /// Free-form display version ("2.4.1-rc2").
    pub version: String,
    /// Device targets this bundle may be installed on. Empty means any.
    pub targets: Vec<String>,
    pub kind: PayloadKind,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which the bundle is refused.
    pub expires_at: Option<u64>,
    /// Lowest agent version able to install this bundle.
    pub min_agent_version: Option<String>,
    /// Signed permission to install below the device's highest committed counter.
    pub allow_downgrade: bool,
    /// Signed permission for setuid and setgid files in an archive. Without
    /// it, the builder refuses such inputs and the device such entries.
    pub allow_setid: bool,
}

/// The signed description of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    release: Release,
    format: Format,
    payload_len: u64,
    chunking: Chunking,
    chunks: Vec<ChunkEntry>,
    /// Format 2 only: the SHA-256 of the whole payload.
    payload_sha256: Option<[u8; 32]>,
    /// Where each chunk starts in the slot, and one past the end.
    written_at: Vec<u64>,
    /// Where each chunk starts in the bundle's payload, and one past the end.
    stored_at: Vec<u64>,
}

impl std::ops::Deref for Manifest {
    type Target = Release;

    fn deref(&self) -> &Release {
        &self.release
    }
}

impl Manifest {
    /// A manifest from its parts, checked ([`validate`](Self::validate)).
    pub fn from_parts(
        release: Release,
        format: Format,
        chunking: Chunking,
        chunks: Vec<ChunkEntry>,
        payload_sha256: Option<[u8; 32]>,
    ) -> Result<Manifest, String> {
        let sums = |f: fn(&ChunkEntry) -> u32| {
            let mut at = Vec::with_capacity(chunks.len() + 1);
            let mut pos = 0u64;
            at.push(0);
            for c in &chunks {
                pos += u64::from(f(c));
                at.push(pos);
            }
            at
        };
        let (written_at, stored_at) = (sums(ChunkEntry::len), sums(ChunkEntry::stored_len));
        let payload_len = written_at.last().copied().unwrap_or(0);
        let m = Manifest {
            release,
            format,
            payload_len,
            chunking,
            chunks,
            payload_sha256,
            written_at,
            stored_at,
        };
        m.validate()?;
        Ok(m)
    }

    pub fn release(&self) -> &Release {
        &self.release
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes written to the slot.
    pub fn payload_len(&self) -> u64 {
        self.payload_len
    }

    /// Bytes of payload in the bundle (less than [`payload_len`](Self::payload_len) if compressed).
    pub fn stored_len(&self) -> u64 {
        self.stored_at.last().copied().unwrap_or(0)
    }

    pub fn chunking(&self) -> Chunking {
        self.chunking
    }

    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }

    pub fn chunk(&self, index: u32) -> Option<&ChunkEntry> {
        self.chunks.get(index as usize)
    }

    /// Format 2's whole-payload SHA-256; None in format 3.
    pub fn payload_sha256(&self) -> Option<&[u8; 32]> {
        self.payload_sha256.as_ref()
    }

    pub fn chunk_count(&self) -> u32 {
        // validate() guarantees this fits.
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// Bytes chunk `index` writes (0 past the end).
    pub fn chunk_len(&self, index: u32) -> usize {
        self.chunk(index).map_or(0, |c| c.len() as usize)
    }

    /// Where chunk `index` starts in the slot; `chunk_count()` gives the end.
    pub fn written_offset(&self, index: u32) -> u64 {
        self.written_at.get(index as usize).copied().unwrap_or(self.payload_len)
    }

    /// The written bytes chunk `index` is decoded against (see
    /// [`ChunkEntry::ZstdLinked`]): `start..end` of the payload, empty for
    /// an unlinked chunk.
    pub fn prefix_range(&self, index: u32) -> std::ops::Range<u64> {
        let end = self.written_offset(index);
        let window = self.chunk(index).map_or(0, ChunkEntry::window);
        end.saturating_sub(u64::from(window))..end
    }

    /// The chunks that start a chain: no chunk from one on is decoded
    /// against bytes before it, so the chains can be decoded at once, each
    /// against its own [`Window`](super::Window). Chunk 0 always starts
    /// one; in a bundle without linked chunks every chunk does.
    pub fn chain_starts(&self) -> Vec<u32> {
        let mut starts = Vec::new();
        let mut reach = u64::MAX;
        for index in (0..self.chunk_count()).rev() {
            reach = reach.min(self.prefix_range(index).start);
            if reach >= self.written_offset(index) {
                starts.push(index);
            }
        }
        starts.reverse();
        starts
    }

    /// The largest window any chunk names (0: every chunk decodes alone).
    pub fn max_window(&self) -> u32 {
        self.chunks.iter().map(ChunkEntry::window).max().unwrap_or(0)
    }

    /// Where chunk `index` starts in the bundle's payload; `chunk_count()` gives the end.
    pub fn stored_offset(&self, index: u32) -> u64 {
        let end = self.stored_len();
        self.stored_at.get(index as usize).copied().unwrap_or(end)
    }

    /// The chunk whose written bytes hold slot offset `offset`.
    pub fn chunk_at_written(&self, offset: u64) -> Option<u32> {
        chunk_at(&self.written_at, offset)
    }

    /// The chunk whose stored bytes hold bundle payload offset `offset`.
    pub fn chunk_at_stored(&self, offset: u64) -> Option<u32> {
        chunk_at(&self.stored_at, offset)
    }

    /// Whether this bundle may be installed on `target`.
    pub fn allows_target(&self, target: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == target)
    }

    /// Checks everything a manifest must satisfy beyond decoding.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.release;
        label("name", &r.name, true)?;
        if r.version.len() > MAX_LABEL_LEN || r.version.chars().any(char::is_control) {
            return Err(format!("version must be at most {MAX_LABEL_LEN} printable characters"));
        }
        if r.targets.len() > MAX_TARGETS {
            return Err(format!("more than {MAX_TARGETS} targets"));
        }
        for t in &r.targets {
            label("target", t, false)?;
        }
        if matches!(r.expires_at, Some(e) if e <= r.created_at) {
            return Err("expires before it was created".into());
        }
        if let Some(v) = &r.min_agent_version {
            label("min_agent_version", v, false)?;
        }
        if r.allow_setid && r.kind != PayloadKind::Archive {
            return Err("allow_setid is for archive bundles only".into());
        }
        if self.chunks.is_empty() || self.payload_len == 0 {
            return Err("payload is empty".into());
        }
        if u32::try_from(self.chunks.len()).is_err() {
            return Err("more than 2^32 chunks".into());
        }
        let (min, max) = match self.chunking {
            Chunking::Fixed { size } => {
                if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
                    return Err(format!("chunk size {size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"));
                }
                (size, size)
            }
            Chunking::Cdc { min, avg, max } => {
                if !(MIN_CDC_CHUNK <= min && min <= avg && avg <= max && max <= MAX_CHUNK_SIZE) {
                    return Err(format!(
                        "content-defined chunking {min}/{avg}/{max} must have \
                         {MIN_CDC_CHUNK} <= min <= avg <= max <= {MAX_CHUNK_SIZE}"
                    ));
                }
                (min, max)
            }
        };
        let last = self.chunks.len() - 1;
        for (i, c) in self.chunks.iter().enumerate() {
            let len = c.len();
            let fits = if i == last { (1..=max).contains(&len) } else { (min..=max).contains(&len) };
            if !fits {
                return Err(format!("chunk {i} writes {len} bytes, outside what its chunking allows"));
            }
            if c.is_compressed() {
                // The builder stores a chunk raw when compressing does not
                // shrink it: a stored chunk is never bigger than it writes.
                let stored_len = c.stored_len();
                if stored_len == 0 || stored_len >= len {
                    return Err(format!("chunk {i}: {stored_len} compressed bytes for {len} written"));
                }
            }
            if let ChunkEntry::ZstdLinked { window, .. } = c {
                if !(1..=MAX_WINDOW).contains(window) {
                    return Err(format!("chunk {i}: a window of {window} bytes is outside 1..={MAX_WINDOW}"));
                }
            }
        }
        if self.format == Format::V2 {
            if !matches!(self.chunking, Chunking::Fixed { .. })
                || self.chunks.iter().any(ChunkEntry::is_compressed)
            {
                return Err("format 2 has fixed-size, uncompressed chunks only".into());
            }
            if self.payload_sha256.is_none() {
                return Err("format 2 needs the whole-payload sha256".into());
            }
        } else if self.payload_sha256.is_some() {
            return Err("format 3 has no whole-payload sha256".into());
        }
        Ok(())
    }

    /// The bytes that are signed (their SHA-256 is the bundle digest).
    pub fn encode(&self) -> Vec<u8> {
        let r = self.release.clone();
        match self.format {
            Format::V2 => {
                let size = match self.chunking {
                    Chunking::Fixed { size } => size,
                    // validate() refuses anything else in format 2.
                    Chunking::Cdc { max, .. } => max,
                };
                crate::codec::encode(&WireV2 {
                    name: r.name,
                    counter: r.counter,
                    version: r.version,
                    targets: r.targets,
                    kind: r.kind,
                    payload_len: self.payload_len,
                    chunk_size: size,
                    chunk_hashes: self.chunks.iter().map(|c| *c.hash()).collect(),
                    payload_sha256: self.payload_sha256.unwrap_or_default(),
                    created_at: r.created_at,
                    expires_at: r.expires_at,
                    min_agent_version: r.min_agent_version,
                    allow_downgrade: r.allow_downgrade,
                    allow_setid: r.allow_setid,
                })
            }
            Format::V3 => crate::codec::encode(&WireV3 {
                name: r.name,
                counter: r.counter,
                version: r.version,
                targets: r.targets,
                kind: r.kind,
                chunking: self.chunking,
                chunks: self.chunks.clone(),
                created_at: r.created_at,
                expires_at: r.expires_at,
                min_agent_version: r.min_agent_version,
                allow_downgrade: r.allow_downgrade,
                allow_setid: r.allow_setid,
            }),
        }
    }

    /// Decodes and checks the manifest bytes of a bundle of `format`.
    pub fn decode(format: Format, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        match format {
            Format::V2 => {
                let w: WireV2 = crate::codec::decode_exact(bytes).map_err(ManifestError::Malformed)?;
                if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&w.chunk_size) {
                    return Err(ManifestError::Invalid(format!(
                        "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                        w.chunk_size
                    )));
                }
                let expected = w.payload_len.div_ceil(u64::from(w.chunk_size));
                if expected != w.chunk_hashes.len() as u64 {
                    return Err(ManifestError::Invalid(format!(
                        "{} chunk hashes for a {}-byte payload in {}-byte chunks (expected {expected})",
                        w.chunk_hashes.len(),
                        w.payload_len,
                        w.chunk_size
                    )));
                }
                let size = u64::from(w.chunk_size);
                let chunks = w
                    .chunk_hashes
                    .iter()
                    .enumerate()
                    .map(|(i, hash)| {
                        let len = w.payload_len.saturating_sub(i as u64 * size).min(size) as u32;
                        ChunkEntry::Raw { hash: *hash, len }
                    })
                    .collect();
                let release = Release {
                    name: w.name,
                    counter: w.counter,
                    version: w.version,
                    targets: w.targets,
                    kind: w.kind,
                    created_at: w.created_at,
                    expires_at: w.expires_at,
                    min_agent_version: w.min_agent_version,
                    allow_downgrade: w.allow_downgrade,
                    allow_setid: w.allow_setid,
                };
                let chunking = Chunking::Fixed { size: w.chunk_size };
                Manifest::from_parts(release, Format::V2, chunking, chunks, Some(w.payload_sha256))
                    .map_err(ManifestError::Invalid)
            }
            Format::V3 => {
                let w: WireV3 = crate::codec::decode_exact(bytes).map_err(ManifestError::Malformed)?;
                let release = Release {
                    name: w.name,
                    counter: w.counter,
                    version: w.version,
                    targets: w.targets,
                    kind: w.kind,
                    created_at: w.created_at,
                    expires_at: w.expires_at,
                    min_agent_version: w.min_agent_version,
                    allow_downgrade: w.allow_downgrade,
                    allow_setid: w.allow_setid,
                };
                Manifest::from_parts(release, Format::V3, w.chunking, w.chunks, None)
                    .map_err(ManifestError::Invalid)
            }
        }
    }
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// Not a manifest of its format at all.
    Malformed(String),
    /// Decodes, but breaks a rule.
    Invalid(String),
}

/// The index `i` with `at[i] <= offset < at[i + 1]`.
fn chunk_at(at: &[u64], offset: u64) -> Option<u32> {
    let end = *at.last()?;
    if offset >= end {
        return None;
    }
    // `at` is sorted and starts at 0: the last start not after `offset`.
    let i = at.partition_point(|&start| start <= offset).checked_sub(1)?;
    u32::try_from(i).ok()
}

/// Format 2 as signed: the field order is the wire format.
#[derive(Serialize, Deserialize)]
struct WireV2 {
    name: String,
    counter: u64,
    version: String,
    targets: Vec<String>,
    kind: PayloadKind,
    payload_len: u64,
    chunk_size: u32,
    chunk_hashes: Vec<[u8; 32]>,
    payload_sha256: [u8; 32],
    created_at: u64,
    expires_at: Option<u64>,
    min_agent_version: Option<String>,
    allow_downgrade: bool,
    allow_setid: bool,
}

/// Format 3 as signed. The payload length is the sum of the chunks'.
#[derive(Serialize, Deserialize)]
struct WireV3 {
    name: String,
    counter: u64,
    version: String,
    targets: Vec<String>,
    kind: PayloadKind,
    chunking: Chunking,
    chunks: Vec<ChunkEntry>,
    created_at: u64,
    expires_at: Option<u64>,
    min_agent_version: Option<String>,
    allow_downgrade: bool,
    allow_setid: bool,
}

/// Names, targets and versions: short, and safe to use in file names and NATS subjects.
fn label(field: &str, s: &str, strict: bool) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_') || (!strict && c == '.');
    if s.is_empty() || s.len() > MAX_LABEL_LEN || !s.chars().all(ok_char) {
        let allowed = if strict { "A-Z a-z 0-9 - _" } else { "A-Z a-z 0-9 - _ ." };
        return Err(format!("{field} '{}' must be 1..={MAX_LABEL_LEN} of {allowed}", s.escape_default()));
    }
    Ok(())
}

impl Manifest {
    /// Compares one chunk's written bytes with its signed hash (and length).
    pub(crate) fn check_chunk(&self, index: u32, data: &[u8]) -> Result<(), super::BundleError> {
        use sha2::{Digest, Sha256};
        let count = self.chunk_count();
        let entry = self.chunk(index).ok_or(super::BundleError::ChunkOutOfRange { index, count })?;
        let expected = entry.len() as usize;
        if data.len() != expected {
            return Err(super::BundleError::ChunkLength { index, count, got: data.len(), expected });
        }
        if Sha256::digest(data).as_slice() != entry.hash() {
            return Err(super::BundleError::ChunkMismatch { index, count });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            name: "app".into(),
            counter: 1,
            version: "1".into(),
            targets: vec![],
            kind: PayloadKind::Image,
            created_at: 1,
            expires_at: None,
            min_agent_version: None,
            allow_downgrade: false,
            allow_setid: false,
        }
    }

    fn raw(len: u32) -> ChunkEntry {
        ChunkEntry::Raw { hash: [len as u8; 32], len }
    }

    #[test]
    fn offsets_are_running_sums_and_every_offset_finds_its_chunk() {
        let z = ChunkEntry::Zstd { stored_hash: [1; 32], stored_len: 100, hash: [2; 32], len: 5000 };
        let chunks = vec![raw(5000), z, raw(4096), raw(7)];
        let cdc = Chunking::Cdc { min: 4096, avg: 4500, max: 5000 };
        let m = Manifest::from_parts(release(), Format::V3, cdc, chunks, None).unwrap();
        assert_eq!(m.payload_len(), 14_103);
        assert_eq!(m.stored_len(), 9_203);
        assert_eq!((m.written_offset(2), m.stored_offset(2)), (10_000, 5_100));
        assert_eq!(m.written_offset(4), 14_103);
        assert_eq!(m.chunk_at_written(0), Some(0));
        assert_eq!(m.chunk_at_written(4_999), Some(0));
        assert_eq!(m.chunk_at_written(5_000), Some(1));
        assert_eq!(m.chunk_at_written(14_102), Some(3));
        assert_eq!(m.chunk_at_written(14_103), None);
        assert_eq!(m.chunk_at_stored(5_099), Some(1));
        assert_eq!(m.chunk_at_stored(5_100), Some(2));
    }

    #[test]
    fn a_chain_starts_where_no_later_chunk_reaches_back_past_it() {
        let linked = |window| ChunkEntry::ZstdLinked {
            window,
            stored_hash: [1; 32],
            stored_len: 100,
            hash: [2; 32],
            len: 4096,
        };
        let fixed = Chunking::Fixed { size: 4096 };
        let chain =
            |chunks| Manifest::from_parts(release(), Format::V3, fixed, chunks, None).unwrap().chain_starts();
        // Unlinked chunks: each one starts a chain.
        assert_eq!(chain(vec![raw(4096), raw(4096), raw(4096)]), [0, 1, 2]);
        // Chunk 3 starts again (its own window stays inside), but chunk 5
        // reaches back two chunks, into chunk 3's chain: 4 starts none.
        let chunks = vec![raw(4096), linked(4096), linked(8192), raw(4096), linked(4096), linked(8192)];
        assert_eq!(chain(chunks), [0, 3]);
        // A window that reaches before the payload's start changes nothing.
        assert_eq!(chain(vec![linked(MAX_WINDOW), raw(4096), linked(1)]), [0, 1]);
    }

    #[test]
    fn both_formats_round_trip_and_format_2_keeps_its_bytes() {
        let fixed = Chunking::Fixed { size: 4096 };
        let v2 = Manifest::from_parts(release(), Format::V2, fixed, vec![raw(4096), raw(10)], Some([9; 32]))
            .unwrap();
        assert_eq!(Manifest::decode(Format::V2, &v2.encode()).unwrap(), v2);
        let z = ChunkEntry::Zstd { stored_hash: [1; 32], stored_len: 10, hash: [2; 32], len: 4096 };
        let v3 = Manifest::from_parts(release(), Format::V3, fixed, vec![z, raw(1)], None).unwrap();
        assert_eq!(Manifest::decode(Format::V3, &v3.encode()).unwrap(), v3);
        // One format's bytes are not the other's manifest.
        assert!(Manifest::decode(Format::V3, &v2.encode()).is_err());
        assert!(Manifest::decode(Format::V2, &v3.encode()).is_err());
    }

    #[test]
    fn tables_that_break_the_rules_are_refused() {
        let fixed = Chunking::Fixed { size: 4096 };
        let refused = |format, chunking, chunks: Vec<ChunkEntry>, sha: Option<[u8; 32]>| {
            Manifest::from_parts(release(), format, chunking, chunks, sha).unwrap_err()
        };
        // A middle chunk shorter than the fixed size.
        refused(Format::V3, fixed, vec![raw(4096), raw(100), raw(4096)], None);
        // A compressed chunk no smaller than what it writes, or empty.
        for stored_len in [0, 4096, 9000] {
            let z = ChunkEntry::Zstd { stored_hash: [1; 32], stored_len, hash: [2; 32], len: 4096 };
            refused(Format::V3, fixed, vec![z], None);
        }
        // Content-defined chunks outside min..=max, and bad bounds.
        let cdc = Chunking::Cdc { min: 4096, avg: 8192, max: 16384 };
        refused(Format::V3, cdc, vec![raw(100), raw(5000)], None);
        refused(Format::V3, cdc, vec![raw(20000)], None);
        refused(Format::V3, Chunking::Cdc { min: 16, avg: 8192, max: 16384 }, vec![raw(100)], None);
        refused(Format::V3, Chunking::Cdc { min: 9000, avg: 8192, max: 16384 }, vec![raw(100)], None);
        // Nothing at all.
        refused(Format::V3, fixed, vec![], None);
        // Format 2: no compression, no CDC, and its whole-payload hash.
        let z = ChunkEntry::Zstd { stored_hash: [1; 32], stored_len: 10, hash: [2; 32], len: 4096 };
        refused(Format::V2, fixed, vec![z], Some([0; 32]));
        refused(Format::V2, cdc, vec![raw(5000)], Some([0; 32]));
        refused(Format::V2, fixed, vec![raw(10)], None);
        refused(Format::V3, fixed, vec![raw(10)], Some([0; 32]));
    }
}
