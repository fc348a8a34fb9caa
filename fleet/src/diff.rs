//! `perch bundle diff OLD NEW`: what a device running OLD would download
//! to install NEW. A chunk of NEW whose written bytes (its signed hash) are
//! anywhere in OLD is read from the device's running slot and checked
//! against NEW's hash; every other chunk travels, compressed if it is.

use std::collections::HashSet;

use perch_protocol::bundle::Manifest;
use serde::Serialize;

/// The download a device running one bundle needs for another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Chunks of the new bundle.
    pub chunks: u32,
    /// Of those, found in the old one: not downloaded.
    pub reused: u32,
    /// Downloaded.
    pub fetched: u32,
    /// Bytes of the new payload taken from the old one.
    pub reused_bytes: u64,
    /// Bytes that cross the link (stored: compressed where a chunk is).
    pub fetched_bytes: u64,
    /// What the whole new bundle's payload costs without reuse.
    pub full_bytes: u64,
}

/// What a device running `old` downloads to install `new`.
pub fn diff(old: &Manifest, new: &Manifest) -> Diff {
    let have: HashSet<&[u8; 32]> = old.chunks().iter().map(|c| c.hash()).collect();
    let mut d = Diff {
        chunks: new.chunk_count(),
        reused: 0,
        fetched: 0,
        reused_bytes: 0,
        fetched_bytes: 0,
        full_bytes: new.stored_len(),
    };
    for c in new.chunks() {
        if have.contains(c.hash()) {
            d.reused += 1;
            d.reused_bytes += u64::from(c.len());
        } else {
            d.fetched += 1;
            d.fetched_bytes += u64::from(c.stored_len());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use perch_protocol::bundle::{ChunkEntry, Chunking, Format, PayloadKind, Release};

    fn manifest(chunks: Vec<ChunkEntry>) -> Manifest {
        let release = Release {
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
        };
        Manifest::from_parts(release, Format::V3, Chunking::Fixed { size: 4096 }, chunks, None).unwrap()
    }

    #[test]
    fn chunks_found_anywhere_in_the_old_bundle_are_not_fetched() {
        let raw = |b: u8, len: u32| ChunkEntry::Raw { hash: [b; 32], len };
        let old = manifest(vec![raw(1, 4096), raw(2, 4096), raw(3, 100)]);
        // Chunk 2 of the old one moved to the front; one new chunk, compressed.
        let z = ChunkEntry::Zstd { stored_hash: [9; 32], stored_len: 1000, hash: [7; 32], len: 4096 };
        let new = manifest(vec![raw(2, 4096), z, raw(1, 4096), raw(8, 10)]);
        let d = diff(&old, &new);
        assert_eq!((d.chunks, d.reused, d.fetched), (4, 2, 2));
        assert_eq!((d.reused_bytes, d.fetched_bytes, d.full_bytes), (8192, 1010, 4096 + 1000 + 4096 + 10));
        // Against itself: nothing to fetch.
        assert_eq!(diff(&new, &new).fetched_bytes, 0);
    }
}
