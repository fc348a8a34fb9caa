//! The written bytes a linked chunk is decoded against (see
//! [`ChunkEntry::ZstdLinked`](super::ChunkEntry::ZstdLinked)).
//!
//! A [`Window`] is fed whole chunks in payload order: chunks that matched
//! their signed written hash ([`CheckedChunk`]s), or linked chunks as the
//! decoder makes them from their signed bytes, straight into the window
//! ([`VerifiedManifest::decode_linked`](super::VerifiedManifest::decode_linked)),
//! confirmed by their frame's checksum or by their own hash before
//! anything else is decoded. So a decoder is only ever given signed
//! bytes, or its own output for signed bytes. An installer writes a
//! decoded chunk from the window itself. It keeps the last
//! [`Manifest::max_window`] of them (in a buffer of three times that and
//! a chunk), and nothing for a
//! bundle without linked chunks.

use super::decompress::Decoder;
use super::{BundleError, CheckedChunk, Manifest};

/// The last written bytes before chunk [`next`](Self::next).
#[derive(Debug, Clone)]
pub struct Window {
    /// Payload bytes `start..start + end` are `bytes[..end]`. The buffer
    /// only grows (to three windows and a chunk), so that a chunk is
    /// decoded straight into it, after its prefix, with no copy and no
    /// fresh pages; the last `keep` bytes move to its front when it is full.
    bytes: Vec<u8>,
    end: usize,
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
            end: 0,
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

    /// Appends chunk `index`'s written bytes; the caller has checked them.
    pub(super) fn push_verified(&mut self, index: u32, data: &[u8]) -> Result<(), BundleError> {
        if index != self.next {
            return Err(BundleError::NoWindow { index, count: self.count });
        }
        if self.keep == 0 {
            self.next += 1;
            self.start += data.len() as u64;
            return Ok(());
        }
        self.make_room(data.len());
        self.bytes[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
        self.next += 1;
        Ok(())
    }

    /// Decodes linked chunk `index` of `m`, which must be the chunk this
    /// window expects next, from its `stored` bytes (which matched their
    /// signed hash) straight into the window, into exactly its signed
    /// length: the decoded bytes, now part of the window.
    pub(super) fn decode_next(
        &mut self,
        m: &Manifest,
        index: u32,
        stored: &[u8],
        decoder: &mut Decoder,
    ) -> Result<&[u8], BundleError> {
        let count = self.count;
        let len = m.chunk_len(index);
        // Room first: it may move the prefix to the buffer's front.
        self.make_room(len);
        let from = self.prefix_start(m, index)?;
        let (before, after) = self.bytes.split_at_mut(self.end);
        let out = after.get_mut(..len).ok_or(BundleError::NoWindow { index, count })?;
        decoder.decode(stored, &before[from..], out).map_err(|detail| BundleError::Decompress {
            index,
            count,
            detail,
        })?;
        let at = self.end;
        self.end += len;
        self.next += 1;
        Ok(&self.bytes[at..self.end])
    }

    /// Makes room for `len` more bytes after the last `keep`.
    fn make_room(&mut self, len: usize) {
        if self.end + len <= self.bytes.len() {
            return;
        }
        if self.end > self.keep {
            let drop = self.end - self.keep;
            self.bytes.copy_within(drop..self.end, 0);
            self.start += drop as u64;
            self.end = self.keep;
        }
        if self.end + len > self.bytes.len() {
            // Room for the window and two more windows' worth of chunks:
            // the last `keep` bytes move to the front once per two windows
            // decoded (once per window cost 10 % of a lane's time).
            let size = (self.end + len).max(3 * self.keep + len);
            if self.bytes.is_empty() {
                // Zeroed by the allocator (fresh pages), not by a pass.
                self.bytes = vec![0; size];
            } else {
                self.bytes.resize(size, 0);
            }
        }
    }

    /// Where in `bytes` chunk `index`'s prefix starts: it must be the
    /// chunk this window expects next, and the window must reach back to
    /// its prefix's start.
    fn prefix_start(&self, m: &Manifest, index: u32) -> Result<usize, BundleError> {
        let range = m.prefix_range(index);
        let no = || BundleError::NoWindow { index, count: self.count };
        if index != self.next || range.start < self.start {
            return Err(no());
        }
        let from = usize::try_from(range.start - self.start).map_err(|_| no())?;
        if from > self.end {
            return Err(no());
        }
        Ok(from)
    }

    /// The bytes chunk `index` of `m` is decoded against: it must be the
    /// chunk this window expects next.
    pub(super) fn prefix(&self, m: &Manifest, index: u32) -> Result<&[u8], BundleError> {
        let from = self.prefix_start(m, index)?;
        Ok(&self.bytes[from..self.end])
    }
}
