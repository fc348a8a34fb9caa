//! Verifying a whole bundle file on every core: the file reads and the
//! threads, over perch-protocol's checks (which do no I/O themselves).
//!
//! Format 3 has no whole-payload digest: the signed manifest fixes every
//! chunk's hash, so each byte is hashed once, and chunks are independent.
//! Each worker takes the next unchecked chunk, reads it at its offset
//! (`read_at`, so no shared file position), and has the protocol check it
//! (`VerifiedManifest::check_stored`: its stored hash, and for a
//! compressed chunk its decoding into exactly its signed length, hashed
//! too). Format 2 adds its
//! whole-payload digest on one more thread. A bundle with linked chunks
//! (each decoded against the chunks before it) is checked a chain at a
//! time on each worker, each chain in order.

use std::fs::File;
use std::io::{self, Seek};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;

use perch_protocol::bundle::{
    BundleError, BundleReader, Decoder, PayloadHasher, Section, VerifiedManifest, Window,
};
use perch_protocol::trust::VerifiedTrust;

/// Bytes read and hashed at a time for format 2's whole-payload digest.
const PIECE: usize = 64 * 1024;

/// Verifies every byte of the bundle in `file`: the signatures against
/// `trust`, the expiry, and every chunk against the signed manifest, on
/// `threads` workers (at least one). The first failing chunk (the lowest
/// index among those seen failing) is the error.
pub fn verify_file(
    file: &File,
    trust: &VerifiedTrust,
    now: u64,
    threads: usize,
) -> Result<VerifiedManifest, BundleError> {
    let mut reader = file;
    reader.rewind().map_err(BundleError::Io)?;
    let bundle = BundleReader::open_verified(reader, trust, now)?;
    let start = reader.stream_position().map_err(BundleError::Io)?;
    let len = file.metadata().map_err(BundleError::Io)?.len();
    bundle.manifest().check_file_len(start, len)?;
    let manifest = bundle.into_manifest();
    let m = manifest.manifest();
    if m.max_window() > 0 {
        return verify_chains(file, start, manifest, threads);
    }
    let count = m.chunk_count();
    let next = AtomicU32::new(0);
    let abort = AtomicBool::new(false);
    let failed: Mutex<Option<(u32, BundleError)>> = Mutex::new(None);
    let fail = |index: u32, e: BundleError| first_failure(&failed, &abort, index, e);
    let whole = thread::scope(|s| {
        let whole =
            m.payload_sha256().map(|_| s.spawn(|| payload_digest(file, start, m.stored_len(), &abort)));
        for _ in 0..threads.max(1).min(count as usize) {
            s.spawn(|| {
                let mut buf = Vec::new();
                while !abort.load(Ordering::SeqCst) {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= count {
                        break;
                    }
                    let checked = read_stored_at(file, start, &manifest, index, &mut buf)
                        .and_then(|()| manifest.check_stored(index, &buf));
                    if let Err(e) = checked {
                        fail(index, e);
                        break;
                    }
                }
            });
        }
        whole.map(|h| h.join())
    });
    if let Some((_, e)) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    if let Some(digest) = whole {
        let digest = digest.map_err(|_| BundleError::Io(io::Error::other("payload hasher panicked")))??;
        manifest.check_payload_digest(digest)?;
    }
    Ok(manifest)
}

/// Linked chunks are decoded in payload order, each against the chunks
/// before it in its chain: each worker takes the next chain whole (see
/// `Manifest::chain_starts`) and checks its chunks in order.
fn verify_chains(
    file: &File,
    start: u64,
    manifest: VerifiedManifest,
    threads: usize,
) -> Result<VerifiedManifest, BundleError> {
    let m = manifest.manifest();
    let starts = m.chain_starts();
    let ends: Vec<u32> = starts.iter().skip(1).copied().chain([m.chunk_count()]).collect();
    let next = AtomicU32::new(0);
    let abort = AtomicBool::new(false);
    let failed: Mutex<Option<(u32, BundleError)>> = Mutex::new(None);
    thread::scope(|s| {
        for _ in 0..threads.max(1).min(starts.len()) {
            s.spawn(|| {
                let (mut buf, mut decoder) = (Vec::new(), Decoder::default());
                while !abort.load(Ordering::SeqCst) {
                    let chain = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let (Some(&first), Some(&end)) = (starts.get(chain), ends.get(chain)) else { break };
                    let mut window = Window::starting_at(m, first);
                    for index in first..end {
                        let checked =
                            read_stored_at(file, start, &manifest, index, &mut buf).and_then(|()| {
                                manifest.check_stored_in_chain(index, &buf, &mut window, &mut decoder)
                            });
                        if let Err(e) = checked {
                            first_failure(&failed, &abort, index, e);
                            return;
                        }
                    }
                }
            });
        }
    });
    match failed.into_inner().ok().flatten() {
        Some((_, e)) => Err(e),
        None => Ok(manifest),
    }
}

/// Keeps the failure of the lowest chunk seen failing, and stops the
/// workers.
fn first_failure(failed: &Mutex<Option<(u32, BundleError)>>, abort: &AtomicBool, index: u32, e: BundleError) {
    abort.store(true, Ordering::SeqCst);
    if let Ok(mut f) = failed.lock() {
        if f.as_ref().is_none_or(|(i, _)| index < *i) {
            *f = Some((index, e));
        }
    }
}

/// Reads chunk `index`'s stored bytes from where they lie in the file.
fn read_stored_at(
    file: &File,
    start: u64,
    manifest: &VerifiedManifest,
    index: u32,
    buf: &mut Vec<u8>,
) -> Result<(), BundleError> {
    let m = manifest.manifest();
    let count = m.chunk_count();
    let entry = m.chunk(index).ok_or(BundleError::ChunkOutOfRange { index, count })?;
    buf.resize(entry.stored_len() as usize, 0);
    read_at(file, buf, start + m.stored_offset(index))
}

/// Format 2's whole-payload SHA-256, read in order on its own thread.
fn payload_digest(file: &File, start: u64, len: u64, abort: &AtomicBool) -> Result<[u8; 32], BundleError> {
    let mut whole = PayloadHasher::default();
    let mut buf = vec![0u8; 4 * PIECE];
    let mut done = 0;
    while done < len && !abort.load(Ordering::SeqCst) {
        let n = (len - done).min(buf.len() as u64) as usize;
        read_at(file, &mut buf[..n], start + done)?;
        whole.update(&buf[..n]);
        done += n as u64;
    }
    Ok(whole.finalize())
}

fn read_at(file: &File, buf: &mut [u8], at: u64) -> Result<(), BundleError> {
    file.read_exact_at(buf, at).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BundleError::Truncated(Section::Payload),
        _ => BundleError::Io(e),
    })
}
