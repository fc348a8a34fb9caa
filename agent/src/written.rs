//! What a staging has written, and when to make it durable.
//!
//! Chunks are written out of order, by the slot writer thread or by the
//! lanes that decode linked chunks. Each is recorded here once its write
//! returned. Every `checkpoint` bytes, the first chunk not yet written
//! (the only safe point to resume from) goes to the syncer, whose sync
//! covers every write that returned before it started
//! ([`SlotWriter::handle`](crate::slots::SlotWriter::handle)); only after
//! that sync does the journal record it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Mutex;

pub struct Written {
    inner: Mutex<Inner>,
    /// Bytes written since this staging started, for the progress bar.
    bytes: AtomicU64,
    checkpoint: u64,
    count: u32,
}

struct Inner {
    /// The first chunk not yet written.
    durable_from: u32,
    /// Written chunks after `durable_from`.
    later: BTreeSet<u32>,
    /// Bytes since the last checkpoint.
    since: u64,
    /// Gone once staging ends, so that the syncer stops.
    syncer: Option<Sender<u32>>,
}

impl Written {
    /// Staging from chunk `from` of `count`, asking `syncer` for a sync
    /// every `checkpoint` bytes.
    pub fn new(from: u32, count: u32, checkpoint: u64, syncer: Sender<u32>) -> Written {
        Written {
            inner: Mutex::new(Inner {
                durable_from: from,
                later: BTreeSet::new(),
                since: 0,
                syncer: Some(syncer),
            }),
            bytes: AtomicU64::new(0),
            checkpoint,
            count,
        }
    }

    /// Chunk `index`, `len` bytes, was written (its write returned).
    pub fn record(&self, index: u32, len: usize) {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        // A poisoned lock: a thread panicked, and staging fails anyway.
        let Ok(mut g) = self.inner.lock() else { return };
        let g = &mut *g;
        g.later.insert(index);
        while g.later.remove(&g.durable_from) {
            g.durable_from += 1;
        }
        g.since += len as u64;
        if g.since >= self.checkpoint && g.durable_from < self.count {
            g.since = 0;
            if let Some(tx) = &g.syncer {
                let _ = tx.send(g.durable_from);
            }
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// No more writes: the syncer makes the last ones durable and stops.
    pub fn finish(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.syncer = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_checkpoint_names_the_first_chunk_not_yet_written() {
        let (tx, rx) = mpsc::channel();
        let w = Written::new(2, 10, 300, tx);
        // Chunks 3 and 4 before 2: nothing before 2 is missing, but 2 is.
        w.record(3, 100);
        w.record(4, 100);
        w.record(6, 100);
        assert_eq!(rx.try_recv(), Ok(2), "300 bytes written, chunk 2 still missing");
        w.record(2, 100);
        w.record(5, 100);
        assert!(rx.try_recv().is_err(), "200 bytes since the last checkpoint");
        w.record(7, 100);
        assert_eq!(rx.try_recv(), Ok(8), "2..=7 are written");
        assert_eq!(w.bytes(), 600);
    }

    #[test]
    fn no_checkpoint_once_every_chunk_is_written_and_the_syncer_stops_at_finish() {
        let (tx, rx) = mpsc::channel();
        let w = Written::new(0, 2, 1, tx);
        w.record(1, 10);
        assert_eq!(rx.try_recv(), Ok(0));
        w.record(0, 10);
        assert!(rx.try_recv().is_err(), "the last sync, at the end, covers it");
        w.finish();
        assert_eq!(rx.recv(), Err(mpsc::RecvError), "the syncer's loop ends");
    }
}
