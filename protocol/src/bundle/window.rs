//! The written bytes a linked chunk is decoded against (see
//! [`ChunkEntry::ZstdLinked`](super::ChunkEntry::ZstdLinked)).
//!
//! A [`Window`] is fed whole chunks in payload order: chunks that matched
//! their signed written hash ([`CheckedChunk`]s), or linked chunks as the
//! decoder made them from their signed bytes ([`DecodedChunk`]s), whose
//! own hash is checked meanwhile on another thread. So a decoder is only
//! ever given signed bytes, or its own output for signed bytes; and a
//! chunk decoded against a chunk whose check then fails is never written,
//! since that failure stops the install. It keeps the last
//! [`Manifest::max_window`] of them: at most 8 MiB, and nothing for a
//! bundle without linked chunks.

use super::{BundleError, CheckedChunk, DecodedChunk, Manifest};

/// The last written bytes before chunk [`next`](Self::next).
#[derive(Debug, Clone)]
pub struct Window {
    /// Payload bytes `start..start + bytes.len()`.
    bytes: Vec<u8>,
    start: u64,
    next: u32,
    /// How many bytes to keep (the manifest's largest window).
    keep: usize,
    count: u32,
}

impl Window {
    /// An empty window that takes chunks from `first` on. A linked chunk
    /// can be decoded once the chunks its prefix covers were pushed, so to
    /// resume at chunk `n`, start at 0 (or far enough back) and push the
    /// chunks before `n` again.
    pub fn starting_at(m: &Manifest, first: u32) -> Window {
        Window {
            bytes: Vec::new(),
            start: m.written_offset(first),
            next: first,
            keep: m.max_window() as usize,
            count: m.chunk_count(),
        }
    }

    /// The chunk this window expects next.
    pub fn next(&self) -> u32 {
        self.next
    }

    /// Appends chunk [`next`](Self::next), checked against its signed hash.
    pub fn push(&mut self, chunk: &CheckedChunk) -> Result<(), BundleError> {
        self.push_verified(chunk.index(), chunk.data())
    }

    /// Appends linked chunk [`next`](Self::next) as it was decoded; its
    /// hash is to be checked ([`VerifiedManifest::check_decoded`]) before
    /// any of it is written.
    ///
    /// [`VerifiedManifest::check_decoded`]: super::VerifiedManifest::check_decoded
    pub fn push_decoded(&mut self, chunk: &DecodedChunk) -> Result<(), BundleError> {
        self.push_verified(chunk.index(), chunk.data())
    }

    /// Appends chunk `index`'s written bytes; the caller has checked them.
    pub(super) fn push_verified(&mut self, index: u32, data: &[u8]) -> Result<(), BundleError> {
        if index != self.next {
            return Err(BundleError::NoWindow { index, count: self.count });
        }
        self.next += 1;
        if self.keep == 0 {
            self.start += data.len() as u64;
            return Ok(());
        }
        self.bytes.extend_from_slice(data);
        // Trim only once twice the window is held, so each byte is moved
        // about once.
        if self.bytes.len() > 2 * self.keep {
            let drop = self.bytes.len() - self.keep;
            self.bytes.drain(..drop);
            self.start += drop as u64;
        }
        Ok(())
    }

    /// The bytes chunk `index` of `m` is decoded against: it must be the
    /// chunk this window expects next.
    pub(super) fn prefix(&self, m: &Manifest, index: u32) -> Result<&[u8], BundleError> {
        let range = m.prefix_range(index);
        let no = || BundleError::NoWindow { index, count: self.count };
        if index != self.next || range.start < self.start {
            return Err(no());
        }
        let from = usize::try_from(range.start - self.start).map_err(|_| no())?;
        self.bytes.get(from..).ok_or_else(no)
    }
}
