//! Delta installs: the chunks of a new bundle that the device already holds.
//!
//! When a slot is staged, its bundle's head (header, signatures, manifest)
//! is kept as `STATE/slots/<slot>.head`. When the next bundle is staged,
//! the running slot's head says where each of its chunks lies in that
//! slot's payload (the block device, or the staged archive the slot
//! backend keeps). A chunk of the new manifest whose written hash is among
//! them is read from there, and written only if its bytes hash to the
//! **new** signed manifest's hash ([`VerifiedManifest::check_written`]);
//! otherwise it is fetched.
//!
//! The record is not trusted and need not be verified again: a damaged,
//! missing or lying head, or a slot whose bytes changed since (a root
//! file system mounted read-write), costs a fetch, never an unchecked
//! byte. It is used only when its digest is the one the journal records
//! for the slot, so a head left by an interrupted staging is never used.
//!
//! [`VerifiedManifest::check_written`]: perch_protocol::bundle::VerifiedManifest::check_written

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{BundleHead, BundleReader, Manifest, VerifiedManifest, MAX_HEAD_LEN};
use perch_support::durable::{self, Replace};

use crate::journal::{BundleRef, SlotId};
use crate::slots::SlotBackend;

/// Where a slot's head is kept.
pub fn head_path(state_dir: &Path, slot: SlotId) -> PathBuf {
    state_dir.join("slots").join(format!("{slot}.head"))
}

/// Keeps `head` as the record of what `slot` holds (written atomically).
pub fn save_head(state_dir: &Path, slot: SlotId, head: &BundleHead) -> Result<(), durable::WriteError> {
    let path = head_path(state_dir, slot);
    let dir = state_dir.join("slots");
    std::fs::create_dir_all(&dir).map_err(|source| durable::WriteError::Io { path: dir.clone(), source })?;
    let mut bytes = Vec::new();
    head.write_to(&mut bytes).map_err(|source| durable::WriteError::Io { path: path.clone(), source })?;
    durable::write_bytes(&path, 0o600, Replace::Allow, &bytes)
}

/// The chunks one slot holds, by their written hash.
pub struct LocalChunks {
    slot: SlotId,
    file: File,
    path: PathBuf,
    /// Written hash → (offset in the payload, length).
    by_hash: HashMap<[u8; 32], (u64, u32)>,
}

impl LocalChunks {
    /// The chunks of `slot`, which holds `bundle` by the journal's record,
    /// or why they cannot be used (one line, for the progress log).
    pub fn of_slot(
        state_dir: &Path,
        backend: &dyn SlotBackend,
        slot: SlotId,
        bundle: &BundleRef,
    ) -> Result<Self, String> {
        let head_file = head_path(state_dir, slot);
        let bytes = durable::read_bounded(&head_file, MAX_HEAD_LEN)
            .map_err(|e| format!("no record of slot {slot}'s chunks ({}: {e})", head_file.display()))?;
        let damaged = |e: String| format!("the record of slot {slot}'s chunks is damaged ({e})");
        // Decoding checks the manifest hashes to the digest its signature
        // block names; that digest must be the journal's.
        let reader = BundleReader::open(&bytes[..]).map_err(|e| damaged(e.to_string()))?;
        if reader.head().digest().0 != bundle.digest {
            return Err(format!("the record of slot {slot}'s chunks is for another bundle than {bundle}"));
        }
        let manifest = reader.head().unverified_manifest();
        if manifest.payload_len() != bundle.payload_len {
            return Err(damaged("its payload length is not the journal's".into()));
        }
        let path = backend.payload_path(slot);
        let file = File::open(&path)
            .map_err(|e| format!("slot {slot}'s payload {} cannot be read: {e}", path.display()))?;
        Ok(LocalChunks { slot, file, path, by_hash: index(manifest) })
    }

    /// The slot about to be written, when a staging left it partly
    /// written, for the chunks of the new bundle already in place there:
    /// an install of another bundle that was cut short, or this one's own
    /// writes after its last checkpoint (staging then opens the slot
    /// keeping its bytes). A chunk is looked for only at its own offset,
    /// where staging writes that same chunk and no other, so nothing is
    /// overwritten before it is read.
    pub fn in_place(backend: &dyn SlotBackend, slot: SlotId) -> Option<Self> {
        let path = backend.payload_path(slot);
        let file = File::open(&path).ok()?;
        Some(LocalChunks { slot, file, path, by_hash: HashMap::new() })
    }

    /// Whether chunk `index` of `m` is in place: its bytes at its own
    /// offset hash to its signed hash.
    pub fn holds_in_place(&self, m: &VerifiedManifest, index: u32, buf: &mut Vec<u8>) -> bool {
        let len = m.manifest().chunk_len(index) as u32;
        self.read(m.manifest().written_offset(index), len, buf).is_ok() && m.check_chunk(index, buf).is_ok()
    }

    pub fn slot(&self) -> SlotId {
        self.slot
    }

    /// Where a chunk with this written hash and length lies, if the slot has one.
    pub fn find(&self, hash: &[u8; 32], len: u32) -> Option<u64> {
        self.by_hash.get(hash).filter(|(_, l)| *l == len).map(|(offset, _)| *offset)
    }

    /// Reads `len` bytes at `offset` of the slot's payload into `buf`.
    pub fn read(&self, offset: u64, len: u32, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, offset)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Written hash → where its first copy lies.
fn index(m: &Manifest) -> HashMap<[u8; 32], (u64, u32)> {
    let mut by_hash = HashMap::with_capacity(m.chunk_count() as usize);
    for (i, c) in m.chunks().iter().enumerate() {
        let offset = m.written_offset(i as u32);
        by_hash.entry(*c.hash()).or_insert((offset, c.len()));
    }
    by_hash
}

/// A bundle's bytes, which can be told in advance which chunks staging
/// will read.
pub trait BundleSource: std::io::Read + std::io::Seek {
    /// Staging will read these chunks, in this order (payload order, or
    /// its chains side by side: see `sequencer::lanes`), and others
    /// only when a chunk taken from the device fails its check. A source
    /// that fetches ahead fetches these and skips the rest.
    fn plan(&mut self, _chunks: &[u32]) {}

    /// The whole bundle's length, when the source holds all of it (a
    /// file): staging checks it against the signed manifest before a
    /// write, so a cut or padded file is refused even when the chunks it
    /// lacks are already on the device. `None` for a source that fetches.
    fn whole_len(&mut self) -> std::io::Result<Option<u64>> {
        Ok(None)
    }
}

impl BundleSource for File {
    fn whole_len(&mut self) -> std::io::Result<Option<u64>> {
        Ok(Some(self.metadata()?.len()))
    }
}
