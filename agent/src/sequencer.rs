//! Linked chunks while staging (`ChunkEntry::ZstdLinked`: compressed
//! against the written bytes before them).
//!
//! A linked chunk can only be decoded once every chunk before it is
//! known. For a bundle with linked chunks, staging sends each chunk to a
//! lane: the chunks it reads, unchecked, and the ones it takes from the
//! device, checked. A lane hashes the stored bytes of each chunk as it
//! comes, puts its chunks back in payload order, decodes each linked one
//! against a [`Window`] of the chunks before it, checks it there, and
//! writes it to the slot from the window itself. A payload built in
//! several chains (`perch bundle build` starts one every 32 MiB) is split
//! into lanes, one per core, so that the chains are decoded on every core
//! at once; staging reads the lanes' chunks in turn.
//!
//! Each lane writes what it decoded on its own core, through its own
//! handle on the slot: handing 256 KiB chunks to a writer thread on the
//! other core made that thread's copy into the page cache five times
//! slower than the same copy from a cache the data is still in (the
//! writer thread was the bottleneck of a compressed install). What the
//! lanes wrote goes to [`Written`], for the journal's checkpoints. A
//! bundle without linked chunks goes to the hashers and the writer
//! thread instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use perch_protocol::bundle::{
    BundleError, Checked, CheckedChunk, Decoder, Manifest, UncheckedChunk, VerifiedManifest, Window,
};

use crate::failpoint;
use crate::slots::{SlotError, SlotWriter};
use crate::spares::Spares;
use crate::written::Written;

/// Why a lane (or a hasher) stopped.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Slot(#[from] SlotError),
}

/// Writes chunk `index`'s checked bytes at their place in the slot.
pub fn write_chunk(
    writer: &mut dyn SlotWriter,
    m: &Manifest,
    index: u32,
    data: &[u8],
) -> Result<(), SlotError> {
    writer.write_at(m.written_offset(index), data)?;
    failpoint::trace(format_args!("write {index}"));
    failpoint::hit("chunk-written");
    Ok(())
}

/// A chunk for a lane: read from the bundle, or already checked (taken
/// from the device).
pub enum ForLane {
    Read(UncheckedChunk),
    Checked(Checked),
}

impl ForLane {
    fn index(&self) -> u32 {
        match self {
            ForLane::Read(c) => c.index(),
            ForLane::Checked(Checked::Written(c)) => c.index(),
            ForLane::Checked(Checked::Linked(c)) => c.index(),
        }
    }
}

/// Where a chunk goes next.
#[derive(Clone)]
pub enum Onward {
    /// Checked chunks go to the writer (a bundle without linked chunks),
    /// with the bundle's chunk count.
    Writer(SyncSender<CheckedChunk>, u32),
    /// Every chunk goes to the lane it falls in, by the lane's first chunk
    /// (increasing), with the bundle's chunk count.
    Lanes(Vec<(u32, SyncSender<ForLane>)>, u32),
}

impl Onward {
    /// Passes a checked chunk on. `Ok(false)`: the next stage has stopped
    /// (it reports its own error).
    pub fn send(&self, chunk: Checked) -> Result<bool, BundleError> {
        match (self, chunk) {
            (Onward::Writer(tx, _), Checked::Written(c)) => Ok(tx.send(c).is_ok()),
            (Onward::Lanes(..), c) => self.to_lane(ForLane::Checked(c)),
            // Only a manifest with linked chunks makes them, and such a
            // manifest always gets lanes.
            (Onward::Writer(_, count), Checked::Linked(c)) => {
                Err(BundleError::NoWindow { index: c.index(), count: *count })
            }
        }
    }

    /// Whether chunks as read go to the lanes, unchecked: each lane hashes
    /// its own (else they go to the hashers).
    pub fn takes_read_chunks(&self) -> bool {
        matches!(self, Onward::Lanes(..))
    }

    /// Passes on a chunk as read, to its lane (see
    /// [`takes_read_chunks`](Self::takes_read_chunks)).
    pub fn send_read(&self, chunk: UncheckedChunk) -> Result<bool, BundleError> {
        self.to_lane(ForLane::Read(chunk))
    }

    fn to_lane(&self, chunk: ForLane) -> Result<bool, BundleError> {
        let index = chunk.index();
        let (lanes, count) = match self {
            Onward::Lanes(lanes, count) => (&lanes[..], *count),
            Onward::Writer(_, count) => (&[][..], *count),
        };
        // The lane the chunk falls in: the last that starts at or before
        // it. A chunk before the first is never asked for.
        match lanes.iter().rev().find(|(start, _)| *start <= index) {
            Some((_, tx)) => Ok(tx.send(chunk).is_ok()),
            None => Err(BundleError::NoWindow { index, count }),
        }
    }
}

/// Where staging from chunk `from` splits the payload into lanes, each
/// decoded by its own sequencer: the first chunk of each, `from` first.
/// Lanes start only where a chain does (`Manifest::chain_starts`), near
/// equal shares of the work left, at most `cores` of them; a bundle
/// without linked chunks, or with one chain, has one lane.
pub fn lanes(m: &Manifest, from: u32, cores: usize) -> Vec<u32> {
    let mut starts = vec![from];
    if m.max_window() == 0 || cores <= 1 {
        return starts;
    }
    let chains: Vec<u32> = m.chain_starts().into_iter().filter(|&c| c > from).collect();
    let (begin, end) = (work_before(m, from), work_before(m, m.chunk_count()));
    for share in 1..cores as u64 {
        let target = begin + (end - begin) * share / cores as u64;
        if let Some(&c) = chains.iter().find(|&&c| work_before(m, c) >= target) {
            if starts.last().is_some_and(|&last| c > last) {
                starts.push(c);
            }
        }
    }
    starts
}

/// A lane's work up to chunk `index`, in units of one written byte. Each
/// written byte costs its frame checksum, the window and the copy into
/// the page cache; each stored byte its SHA-256 and most of zstd's work
/// (a run of zeros stores in a few bytes and decodes almost for free).
/// Measured on the bench's ext4 image (x86_64, 2026-12-01), a stored byte
/// cost about as much as 6 written ones: splitting by written bytes alone
/// left one of two lanes with 30 % more work.
fn work_before(m: &Manifest, index: u32) -> u64 {
    const STORED_BYTE: u64 = 6;
    m.written_offset(index) + STORED_BYTE * m.stored_offset(index)
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

/// Where chunks go once read: for a bundle without linked chunks, to the
/// hashers and then the writer's channel; for one with linked chunks, to a
/// lane started here for each of `lanes`, which hashes, decodes and
/// writes its chunks through its own handle in `handles`, and records
/// each in `written`. The threads are `s`'s: none outlives the staging
/// that made them.
#[allow(clippy::too_many_arguments)]
pub fn onward<'scope>(
    s: &'scope Scope<'scope, '_>,
    manifest: &'scope VerifiedManifest,
    Lanes { starts: lanes, window }: Lanes<'_>,
    handles: Vec<Box<dyn SlotWriter>>,
    writer: SyncSender<CheckedChunk>,
    written: &'scope Written,
    abort: &'scope AtomicBool,
    spares: &Spares,
) -> (Onward, Vec<ScopedJoinHandle<'scope, Result<(), LaneError>>>) {
    let m = manifest.manifest();
    if m.max_window() == 0 {
        return (Onward::Writer(writer, m.chunk_count()), vec![]);
    }
    let mut first = Some(window);
    let mut senders = Vec::with_capacity(lanes.len());
    let mut threads = Vec::with_capacity(lanes.len());
    for (&start, handle) in lanes.iter().zip(handles) {
        let window = first.take().unwrap_or_else(|| Window::starting_at(m, start));
        let (tx, rx) = mpsc::sync_channel::<ForLane>(16);
        senders.push((start, tx));
        let lane = Lane { manifest, written, handle, spares: spares.clone(), abort };
        threads
            .push(s.spawn(move || lane.run(window, rx).inspect_err(|_| abort.store(true, Ordering::SeqCst))));
    }
    (Onward::Lanes(senders, m.chunk_count()), threads)
}

/// One lane.
struct Lane<'a> {
    manifest: &'a VerifiedManifest,
    written: &'a Written,
    /// This lane's own handle on the slot.
    handle: Box<dyn SlotWriter>,
    spares: Spares,
    abort: &'a AtomicBool,
}

impl Lane<'_> {
    /// Hashes each chunk read as it comes, puts the lane's chunks back in
    /// payload order, decodes each linked one against `window`, and writes
    /// them.
    fn run(mut self, mut window: Window, rx: Receiver<ForLane>) -> Result<(), LaneError> {
        let m = self.manifest.manifest();
        // Chunks that came early; at most what the pipeline holds in flight.
        let mut early: BTreeMap<u32, Checked> = BTreeMap::new();
        let mut decoder = Decoder::default();
        for chunk in rx {
            if self.abort.load(Ordering::SeqCst) {
                return Ok(()); // another thread failed; it reports why
            }
            let index = chunk.index();
            let chunk = match chunk {
                ForLane::Read(c) => {
                    let checked = self.manifest.check(c)?;
                    failpoint::hit("chunk-verified");
                    checked
                }
                ForLane::Checked(c) => c,
            };
            early.insert(index, chunk);
            while let Some(chunk) = early.remove(&window.next()) {
                let (index, len) = match chunk {
                    Checked::Written(c) => {
                        window.push(&c)?;
                        write_chunk(self.handle.as_mut(), m, c.index(), c.data())?;
                        let done = (c.index(), c.data().len());
                        self.spares.give(c.into_buffer());
                        done
                    }
                    Checked::Linked(c) => {
                        let (decoded, stored) = self.manifest.decode_linked(c, &mut window, &mut decoder)?;
                        write_chunk(self.handle.as_mut(), m, decoded.index(), decoded.data())?;
                        self.spares.give(stored);
                        (decoded.index(), decoded.data().len())
                    }
                };
                failpoint::hit("chunk-in-order");
                self.written.record(index, len);
            }
        }
        Ok(())
    }
}
