//! Linked chunks while staging (`ChunkEntry::ZstdLinked`: compressed
//! against the written bytes before them).
//!
//! The hashers check chunks in any order, but a linked chunk can only be
//! decoded once every chunk before it is known. For a bundle with linked
//! chunks, a sequencer thread takes every checked chunk (fetched or reused
//! from the device), puts them back in payload order, and decodes each
//! linked one against a [`Window`] of the chunks before it. A payload
//! built in several chains (`perch bundle build` starts one every 32 MiB)
//! is split into lanes, one sequencer each, so that the chains are decoded
//! on every core at once; staging reads the lanes' chunks in turn. A chunk from a
//! checksummed frame goes to the writer as it is decoded
//! ([`Decoded::Written`]); one from an older bundle without frame
//! checksums goes to checker threads, which compare it with its signed
//! hash while the next is decoded, and only then hand it to the writer. A
//! bundle without linked chunks goes straight to the writer.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use crate::spares::Spares;

use perch_protocol::bundle::{
    BundleError, Checked, CheckedChunk, Decoded, DecodedChunk, Decoder, Manifest, VerifiedManifest, Window,
};

/// Where a checked chunk goes next.
#[derive(Clone)]
pub enum Onward {
    /// The writer, and the bundle's chunk count.
    Writer(SyncSender<CheckedChunk>, u32),
    /// The sequencer of each lane, by its first chunk (increasing), and
    /// the bundle's chunk count.
    Sequencers(Vec<(u32, SyncSender<Checked>)>, u32),
}

impl Onward {
    /// Passes `chunk` on. `Ok(false)`: the next stage has stopped (it
    /// reports its own error).
    pub fn send(&self, chunk: Checked) -> Result<bool, BundleError> {
        match (self, chunk) {
            (Onward::Writer(tx, _), Checked::Written(c)) => Ok(tx.send(c).is_ok()),
            (Onward::Sequencers(lanes, count), c) => {
                let index = match &c {
                    Checked::Written(c) => c.index(),
                    Checked::Linked(c) => c.index(),
                };
                // The lane the chunk falls in: the last that starts at or
                // before it. A chunk before the first is never asked for.
                match lanes.iter().rev().find(|(start, _)| *start <= index) {
                    Some((_, tx)) => Ok(tx.send(c).is_ok()),
                    None => Err(BundleError::NoWindow { index, count: *count }),
                }
            }
            // Only a manifest with linked chunks makes them, and such a
            // manifest always gets a sequencer.
            (Onward::Writer(_, count), Checked::Linked(c)) => {
                Err(BundleError::NoWindow { index: c.index(), count: *count })
            }
        }
    }
}

/// Where staging from chunk `from` splits the payload into lanes, each
/// decoded by its own sequencer: the first chunk of each, `from` first.
/// Lanes start only where a chain does (`Manifest::chain_starts`), near
/// equal shares of the bytes left, at most `cores` of them; a bundle
/// without linked chunks, or with one chain, has one lane.
pub fn lanes(m: &Manifest, from: u32, cores: usize) -> Vec<u32> {
    let mut starts = vec![from];
    if m.max_window() == 0 || cores <= 1 {
        return starts;
    }
    let chains: Vec<u32> = m.chain_starts().into_iter().filter(|&c| c > from).collect();
    let (begin, end) = (m.written_offset(from), m.payload_len());
    for share in 1..cores as u64 {
        let target = begin + (end - begin) * share / cores as u64;
        if let Some(&c) = chains.iter().find(|&&c| m.written_offset(c) >= target) {
            if starts.last().is_some_and(|&last| c > last) {
                starts.push(c);
            }
        }
    }
    starts
}

/// The order staging reads chunks `lanes[0]..count` in: a chunk of each
/// lane in turn, so that every lane's sequencer has work.
pub fn read_order(lanes: &[u32], count: u32) -> Vec<u32> {
    let ends = lanes.iter().skip(1).copied().chain([count]);
    let mut runs: Vec<std::ops::Range<u32>> = lanes.iter().copied().zip(ends).map(|(a, b)| a..b).collect();
    let mut order = Vec::with_capacity(count.saturating_sub(lanes.first().copied().unwrap_or(0)) as usize);
    loop {
        let before = order.len();
        order.extend(runs.iter_mut().filter_map(Iterator::next));
        if order.len() == before {
            return order;
        }
    }
}

/// Where staging decodes from: the first chunk of each lane (see
/// [`lanes`]), and the window of the chunks before the first lane's start
/// (the others start a chain).
pub struct Lanes<'a> {
    pub starts: &'a [u32],
    pub window: Window,
}

/// Where the hashers send checked chunks: the writer's channel itself, or,
/// for a bundle with linked chunks, a sequencer per lane started here that
/// feeds it, with `checkers` threads that compare each decoded chunk of an
/// older bundle with its signed hash while the sequencer decodes the next.
/// The threads are `s`'s: none outlives the staging that made them.
pub fn onward<'scope>(
    s: &'scope Scope<'scope, '_>,
    manifest: &'scope VerifiedManifest,
    Lanes { starts: lanes, window }: Lanes<'_>,
    writer: SyncSender<CheckedChunk>,
    abort: &'scope AtomicBool,
    checkers: usize,
    spares: &Spares,
) -> (Onward, Vec<ScopedJoinHandle<'scope, Result<(), BundleError>>>) {
    let m = manifest.manifest();
    if m.max_window() == 0 {
        return (Onward::Writer(writer, m.chunk_count()), vec![]);
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
    let mut first = Some(window);
    let mut senders = Vec::with_capacity(lanes.len());
    for &start in lanes {
        let window = first.take().unwrap_or_else(|| Window::starting_at(m, start));
        let (tx, rx) = mpsc::sync_channel::<Checked>(16);
        senders.push((start, tx));
        let (writer, decoded_tx, spares) = (writer.clone(), decoded_tx.clone(), spares.clone());
        threads.push(s.spawn(move || sequence(manifest, window, rx, &writer, &decoded_tx, abort, &spares)));
    }
    (Onward::Sequencers(senders, m.chunk_count()), threads)
}

/// One lane's sequencer: puts its chunks back in payload order, decodes
/// each linked one against `window`, and hands them on.
fn sequence(
    manifest: &VerifiedManifest,
    mut window: Window,
    rx: Receiver<Checked>,
    writer: &SyncSender<CheckedChunk>,
    decoded_tx: &SyncSender<DecodedChunk>,
    abort: &AtomicBool,
    spares: &Spares,
) -> Result<(), BundleError> {
    // Chunks that came early; at most what the pipeline holds in flight.
    let mut early: BTreeMap<u32, Checked> = BTreeMap::new();
    let mut decoder = Decoder::default();
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
                    let buf = spares.take(manifest.manifest().chunk_len(c.index()));
                    let (decoded, stored) = manifest
                        .decode_linked(c, &mut window, &mut decoder, buf)
                        .inspect_err(|_| abort.store(true, Ordering::SeqCst))?;
                    spares.give(stored);
                    match decoded {
                        Decoded::Written(c) => writer.send(c).is_ok(),
                        Decoded::Unhashed(decoded) => decoded_tx.send(decoded).is_ok(),
                    }
                }
            };
            crate::failpoint::hit("chunk-in-order");
            if !sent {
                return Ok(()); // the writer or the checkers stopped; they report why
            }
        }
    }
    Ok(())
}
