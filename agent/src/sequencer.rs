//! Linked chunks while staging (`ChunkEntry::ZstdLinked`: compressed
//! against the written bytes before them).
//!
//! The hashers check chunks in any order, but a linked chunk can only be
//! decoded once every chunk before it is known. For a bundle with linked
//! chunks, a sequencer thread takes every checked chunk (fetched or reused
//! from the device), puts them back in payload order, and decodes each
//! linked one against a [`Window`] of the chunks before it. Checker
//! threads compare each decoded chunk with its signed hash while the next
//! is decoded, and only then hand it to the writer. A bundle without
//! linked chunks goes straight to the writer.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use perch_protocol::bundle::{BundleError, Checked, CheckedChunk, DecodedChunk, VerifiedManifest, Window};

/// Where a checked chunk goes next.
#[derive(Clone)]
pub enum Onward {
    /// The writer, and the bundle's chunk count.
    Writer(SyncSender<CheckedChunk>, u32),
    Sequencer(SyncSender<Checked>),
}

impl Onward {
    /// Passes `chunk` on. `Ok(false)`: the next stage has stopped (it
    /// reports its own error).
    pub fn send(&self, chunk: Checked) -> Result<bool, BundleError> {
        match (self, chunk) {
            (Onward::Writer(tx, _), Checked::Written(c)) => Ok(tx.send(c).is_ok()),
            (Onward::Sequencer(tx), c) => Ok(tx.send(c).is_ok()),
            // Only a manifest with linked chunks makes them, and such a
            // manifest always gets a sequencer.
            (Onward::Writer(_, count), Checked::Linked(c)) => {
                Err(BundleError::NoWindow { index: c.index(), count: *count })
            }
        }
    }
}

/// Where the hashers send checked chunks: the writer's channel itself, or,
/// for a bundle with linked chunks, a sequencer started here that feeds it
/// (`window` holds the chunks before the first one staged), with
/// `checkers` threads that compare each decoded chunk with its signed hash
/// while the sequencer decodes the next.
/// The threads are `s`'s: none outlives the staging that made them.
pub fn onward<'scope>(
    s: &'scope Scope<'scope, '_>,
    manifest: &'scope VerifiedManifest,
    window: Window,
    writer: SyncSender<CheckedChunk>,
    abort: &'scope AtomicBool,
    checkers: usize,
) -> (Onward, Vec<ScopedJoinHandle<'scope, Result<(), BundleError>>>) {
    if manifest.manifest().max_window() == 0 {
        return (Onward::Writer(writer, manifest.manifest().chunk_count()), vec![]);
    }
    let (decoded_tx, decoded_rx) = mpsc::sync_channel::<DecodedChunk>(8);
    let decoded_rx = Arc::new(Mutex::new(decoded_rx));
    let mut threads: Vec<_> = (0..checkers.max(1))
        .map(|_| {
            let (rx, writer) = (decoded_rx.clone(), writer.clone());
            s.spawn(move || -> Result<(), BundleError> {
                loop {
                    let next =
                        rx.lock().map_err(|_| BundleError::Io(io::Error::other("checker lock")))?.recv();
                    let Ok(decoded) = next else { return Ok(()) };
                    let checked = manifest
                        .check_decoded(decoded)
                        .inspect_err(|_| abort.store(true, Ordering::SeqCst))?;
                    if writer.send(checked).is_err() {
                        return Ok(()); // the writer stopped; it reports why
                    }
                }
            })
        })
        .collect();
    let (tx, rx) = mpsc::sync_channel::<Checked>(16);
    threads.push(s.spawn(move || {
        let mut window = window;
        // Chunks that came early; at most what the pipeline holds in flight.
        let mut early: BTreeMap<u32, Checked> = BTreeMap::new();
        for chunk in rx {
            let index = match &chunk {
                Checked::Written(c) => c.index(),
                Checked::Linked(c) => c.index(),
            };
            early.insert(index, chunk);
            while let Some(chunk) = early.remove(&window.next()) {
                let sent = match chunk {
                    Checked::Written(c) => {
                        window.push(&c)?;
                        writer.send(c).is_ok()
                    }
                    Checked::Linked(c) => {
                        let decoded = manifest
                            .decode_linked(c, &window)
                            .inspect_err(|_| abort.store(true, Ordering::SeqCst))?;
                        window.push_decoded(&decoded)?;
                        decoded_tx.send(decoded).is_ok()
                    }
                };
                crate::failpoint::hit("chunk-in-order");
                if !sent {
                    return Ok(()); // the writer or the checkers stopped; they report why
                }
            }
        }
        Ok(())
    }));
    (Onward::Sequencer(tx), threads)
}
