//! Chunk buffers passed back for reuse while staging: the slot writer
//! gives back each chunk's buffer once written, the sequencer each stored
//! chunk's once decoded, and the reader and the sequencer take them for
//! the next chunks. Fresh 256 KiB buffers cost a page fault per 4 KiB.

use std::sync::{Arc, Mutex};

/// More than the pipeline ever holds in flight: beyond it, a buffer is
/// dropped.
const MAX_SPARES: usize = 64;

#[derive(Clone, Default)]
pub struct Spares(Arc<Mutex<Vec<Vec<u8>>>>);

impl Spares {
    /// A spare buffer that holds `len` bytes without growing if there is
    /// one (growing one copies it), else any spare, else a new one. Stored
    /// chunks are small and decoded ones large: both kinds come back here.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let Ok(mut v) = self.0.lock() else { return Vec::new() };
        match v.iter().rposition(|b| b.capacity() >= len) {
            Some(at) => v.swap_remove(at),
            None => v.pop().unwrap_or_default(),
        }
    }

    pub fn give(&self, buf: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            if v.len() < MAX_SPARES {
                v.push(buf);
            }
        }
    }
}
