//! `perch bundle build`: payload in, unsigned bundle out.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{
    build_linked_chunk, check_archive, ArchivePolicy, BundleError, BundleHead, ChunkEntry, Chunking, Format,
    Manifest, ManifestBuilder, ManifestParams, PayloadKind, MIN_CDC_CHUNK,
};
use perch_protocol::limits::MAX_CHUNK_SIZE;
use perch_support::durable::{self, Replace, WriteError};
use perch_support::exit::{Class, Classify};

use crate::archive::{self, ArchiveError};

/// Read size while hashing: small enough to stay in L2 between read and hash.
const READ_PIECE: usize = 64 * 1024;

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    InvalidParams(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the archive built would be refused by a device: {0}")]
    Check(perch_protocol::bundle::ArchiveError),
    #[error("{}: input changed while the bundle was being built", .0.display())]
    InputChanged(PathBuf),
}

impl Classify for BuildError {
    fn class(&self) -> Option<Class> {
        match self {
            BuildError::InvalidParams(_) | BuildError::Check(_) => Some(Class::Usage),
            BuildError::Archive(e) => e.class(),
            BuildError::Write(e) => e.class(),
            BuildError::Io { source, .. } if perch_support::exit::is_missing(source) => Some(Class::Usage),
            BuildError::Io { .. } | BuildError::InputChanged(_) => Some(Class::Runtime),
        }
    }
}

/// How `perch bundle build` cuts the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Chunks of `chunk_size` bytes: block images, whose changes stay in place.
    Fixed,
    /// Content-defined (FastCDC 2020), averaging `chunk_size` bytes, from
    /// a quarter of it to three times it: inserting bytes (a file added to
    /// an archive) moves only the chunks around them.
    ContentDefined,
}

impl Cut {
    fn chunking(self, size: u32) -> Chunking {
        match self {
            Cut::Fixed => Chunking::Fixed { size },
            Cut::ContentDefined => Chunking::Cdc {
                min: (size / 4).max(MIN_CDC_CHUNK),
                avg: size,
                max: size.saturating_mul(3).min(MAX_CHUNK_SIZE),
            },
        }
    }
}

/// Builds an unsigned bundle at `out` from `input` (a file for `image`, a
/// directory for `archive`). The output appears atomically, or not at all.
///
/// With compression, `window` > 0 links each chunk to the `window` written
/// bytes before it (see [`ChunkEntry::ZstdLinked`]); 0 makes every chunk
/// an independent frame. Linking restarts every `chain` bytes (see
/// [`LINK_CHAIN`]).
pub fn build_bundle(
    params: ManifestParams,
    cut: Cut,
    window: u32,
    chain: u64,
    input: &Path,
    out: &Path,
) -> Result<Manifest, BuildError> {
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // An archive is first written to a temp file beside the output; the tar is
    // then handled exactly like an image.
    let tar_tmp;
    let payload_path = match params.kind {
        PayloadKind::Image => input,
        PayloadKind::Archive => {
            let tmp = tempfile::Builder::new()
                .prefix(".perch-tar-")
                .tempfile_in(out_dir)
                .map_err(|source| BuildError::Io { path: out_dir.into(), source })?;
            let policy = ArchivePolicy { allow_setid: params.allow_setid };
            let writer = archive::write_tar(input, BufWriter::new(tmp.as_file()), policy)?;
            writer
                .into_inner()
                .map_err(|e| BuildError::Io { path: tmp.path().into(), source: e.into_error() })?;
            // What a device would refuse must never be signed: check the tar
            // with the device's own check.
            let tar = File::open(tmp.path())
                .map_err(|source| BuildError::Io { path: tmp.path().into(), source })?;
            check_archive(io::BufReader::new(tar), policy).map_err(BuildError::Check)?;
            tar_tmp = tmp;
            tar_tmp.path()
        }
    };
    if params.format == Format::V3 {
        let chunking = cut.chunking(params.chunk_size);
        return build_v3(params, chunking, window, chain, payload_path, out_dir, out);
    }
    if cut != Cut::Fixed {
        return Err(BuildError::InvalidParams("format 2 has fixed-size chunks only".into()));
    }
    let manifest = hash_payload(params.clone(), payload_path, &mut io::sink())?;
    let head = BundleHead::new(manifest.clone()).map_err(params_error)?;
    durable::write_atomic(out, 0o644, Replace::Allow, |file| {
        let mut w = BufWriter::with_capacity(READ_PIECE, file);
        head.write_to(&mut w).map_err(|source| BuildError::Io { path: out.into(), source })?;
        // Hash again while copying: if the input changed since the first
        // pass, the bundle would not match its own manifest.
        let again = hash_payload(params, payload_path, &mut w)?;
        w.flush().map_err(|source| BuildError::Io { path: out.into(), source })?;
        if again != manifest {
            return Err(BuildError::InputChanged(input.into()));
        }
        Ok(())
    })?;
    Ok(manifest)
}

/// Format 3 in one pass over the payload: chunks are cut, then hashed and
/// compressed on every core in batches, and stored in order in a temp
/// file beside the output; the head (which needs every chunk's entry)
/// is written first, then the stored bytes are copied after it. What is
/// stored is exactly what was hashed, whatever happens to the input.
/// The last `window` bytes before each batch are kept for linked chunks.
fn build_v3(
    params: ManifestParams,
    chunking: Chunking,
    window: u32,
    chain: u64,
    payload: &Path,
    out_dir: &Path,
    out: &Path,
) -> Result<Manifest, BuildError> {
    let in_err = |source| BuildError::Io { path: payload.into(), source };
    let tmp = tempfile::Builder::new()
        .prefix(".perch-payload-")
        .tempfile_in(out_dir)
        .map_err(|source| BuildError::Io { path: out_dir.into(), source })?;
    let tmp_err = |source| BuildError::Io { path: tmp.path().into(), source };
    let level = params.zstd_level;
    let mut builder = ManifestBuilder::new(params).map_err(params_error)?;
    let mut stored = BufWriter::with_capacity(READ_PIECE, tmp.as_file());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(2 * threads);
    let window = if level.is_some() { window } else { 0 };
    // The payload's last `window` bytes before the batch.
    let mut history = Vec::new();
    let mut chain = Chain { len: chain.max(1), ..Chain::default() };
    let mut flush = |batch: &mut Vec<Vec<u8>>| -> Result<(), BuildError> {
        let built = build_batch(batch, &mut history, &mut chain, level, window, threads);
        for (raw, b) in batch.drain(..).zip(built) {
            let (entry, z) = b.map_err(BuildError::InvalidParams)?;
            builder.push_chunk(chunking, entry).map_err(params_error)?;
            stored.write_all(z.as_deref().unwrap_or(&raw)).map_err(tmp_err)?;
        }
        Ok(())
    };
    let file = File::open(payload).map_err(in_err)?;
    for chunk in cut_chunks(file, chunking) {
        batch.push(chunk.map_err(in_err)?);
        if batch.len() == 2 * threads {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)?;
    stored.flush().map_err(tmp_err)?;
    drop(stored);
    let manifest = builder.finish().map_err(params_error)?;
    let head = BundleHead::new(manifest.clone()).map_err(params_error)?;
    durable::write_atomic(out, 0o644, Replace::Allow, |file| {
        let out_err = |source| BuildError::Io { path: out.into(), source };
        let mut w = BufWriter::with_capacity(READ_PIECE, file);
        head.write_to(&mut w).map_err(out_err)?;
        let mut from = File::open(tmp.path()).map_err(tmp_err)?;
        let copied = io::copy(&mut from, &mut w).map_err(out_err)?;
        w.flush().map_err(out_err)?;
        if copied != manifest.stored_len() {
            return Err(BuildError::InputChanged(tmp.path().into()));
        }
        Ok(())
    })?;
    Ok(manifest)
}

/// A chunk's manifest entry and its compressed bytes (see [`build_linked_chunk`]).
type Built = Result<(ChunkEntry, Option<Vec<u8>>), String>;

/// Builds each chunk of `batch` (see [`build_linked_chunk`]) on up to
/// `threads` threads, in order. `history` holds the payload's last
/// `window` bytes before the batch on entry, and before the next batch on
/// return.
fn build_batch(
    batch: &[Vec<u8>],
    history: &mut Vec<u8>,
    chain: &mut Chain,
    level: Option<i32>,
    window: u32,
    threads: usize,
) -> Vec<Built> {
    // The history and the batch in one buffer, so that each chunk's
    // prefix is one slice of it.
    let mut ctx = std::mem::take(history);
    // Each chunk's prefix, as a range of `ctx`, and the window it names.
    let mut at = Vec::with_capacity(batch.len());
    for raw in batch {
        let (before, first) = chain.next(raw.len());
        let reach = before.min(u64::from(window));
        let end = ctx.len();
        // In the first chain the window may reach before the payload's
        // start (a device clips it there); later, it must stop at its
        // chain's start, or the chains could not be decoded apart.
        let named = if first { window } else { u32::try_from(reach).unwrap_or(window) };
        at.push((end.saturating_sub(usize::try_from(reach).unwrap_or(usize::MAX))..end, named));
        if window > 0 {
            ctx.extend_from_slice(raw);
        }
    }
    let ctx = &ctx;
    let build = |(raw, (prefix, named)): (&Vec<u8>, &(std::ops::Range<usize>, u32))| {
        build_linked_chunk(raw, level, *named, &ctx[prefix.clone()])
    };
    let built = if batch.len() <= 1 || threads <= 1 {
        batch.iter().zip(&at).map(build).collect()
    } else {
        let per = batch.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = batch
                .chunks(per)
                .zip(at.chunks(per))
                .map(|(part, at)| s.spawn(move || part.iter().zip(at).map(build).collect::<Vec<_>>()))
                .collect();
            parts
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| vec![Err("a chunk builder thread panicked".into())])
                })
                .collect()
        })
    };
    let keep = ctx.len().min(window as usize);
    *history = ctx[ctx.len() - keep..].to_vec();
    built
}

/// How far a chain of linked chunks runs, by default, before the next
/// chunk starts a new one, decoded alone: an installer decodes the chains
/// on all its cores at once (`Manifest::chain_starts`). Each restart
/// costs about a window's worth of context: 1.5 % of a root image's
/// compressed size at 32 MiB (see the benchmarks page).
pub const LINK_CHAIN: u64 = 32 << 20;

/// Where the payload's chunks fall in chains of `len` bytes.
#[derive(Default)]
struct Chain {
    len: u64,
    /// The payload offset of the next chunk.
    offset: u64,
    /// Where the chain it belongs to starts.
    start: u64,
}

impl Chain {
    /// Places the next chunk, of `len` bytes: how many bytes of its chain
    /// come before it, and whether that chain is the payload's first.
    fn next(&mut self, len: usize) -> (u64, bool) {
        if self.offset - self.start >= self.len {
            self.start = self.offset;
        }
        let before = self.offset - self.start;
        self.offset += len as u64;
        (before, self.start == 0)
    }
}

/// The payload cut into chunks as `chunking` says.
fn cut_chunks(file: File, chunking: Chunking) -> Box<dyn Iterator<Item = io::Result<Vec<u8>>>> {
    match chunking {
        Chunking::Fixed { size } => {
            let mut file = file;
            Box::new(std::iter::from_fn(move || {
                let mut buf = Vec::with_capacity(size as usize);
                match (&mut file).take(u64::from(size)).read_to_end(&mut buf) {
                    Ok(0) => None,
                    Ok(_) => Some(Ok(buf)),
                    Err(e) => Some(Err(e)),
                }
            }))
        }
        Chunking::Cdc { min, avg, max } => Box::new(
            fastcdc::v2020::StreamCDC::new(
                io::BufReader::new(file),
                min as usize,
                avg as usize,
                max as usize,
            )
            .map(|c| c.map(|c| c.data).map_err(|e| io::Error::other(e.to_string()))),
        ),
    }
}

/// Streams `path` through a [`ManifestBuilder`], copying what it stores
/// (each chunk raw or compressed) to `copy`.
fn hash_payload(params: ManifestParams, path: &Path, copy: &mut impl Write) -> Result<Manifest, BuildError> {
    let io_err = |source| BuildError::Io { path: path.into(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let mut builder = ManifestBuilder::new(params).map_err(params_error)?;
    let mut buf = vec![0u8; READ_PIECE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        builder.update(&buf[..n]);
        copy.write_all(&builder.take_stored()).map_err(io_err)?;
    }
    let (manifest, last) = builder.finish_stored().map_err(params_error)?;
    copy.write_all(&last).map_err(io_err)?;
    Ok(manifest)
}

fn params_error(e: BundleError) -> BuildError {
    match e {
        BundleError::InvalidManifest(m) => BuildError::InvalidParams(m),
        other => BuildError::InvalidParams(other.to_string()),
    }
}
