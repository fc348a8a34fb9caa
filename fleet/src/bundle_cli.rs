//! `perch keygen` and `perch bundle build|sign|verify|inspect|diff`: release
//! keys and bundle files, all offline. (A module of the `perch` binary; the
//! bundle format is perch-protocol's, building and signing perch-fleet's.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use perch_fleet::build::{build_bundle, Cut};
use perch_fleet::sign::{sign_file, SignOutcome};
use perch_fleet::verify::verify_file;
use perch_protocol::bundle::{
    BundleHead, BundleReader, Chunking, Format, Manifest, ManifestParams, PayloadKind, MAX_WINDOW,
    ZSTD_LEVELS,
};
use perch_protocol::limits::DEFAULT_CHUNK_SIZE;
use perch_protocol::SecretKey;
use perch_support::exit::UsageError;
use perch_support::trustfile::load_trust;
use perch_support::{keyfile, now_unix};
use serde_json::json;

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Build an unsigned bundle from an image file or a directory.
    Build(BuildArgs),
    /// Add one signature to a bundle, in place and atomically.
    Sign {
        /// The release secret key (PREFIX.key).
        #[arg(long)]
        key: PathBuf,
        /// The bundle file, signed in place.
        file: PathBuf,
        /// The key id and whether a signature was added, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a bundle completely: signatures, threshold, expiry, every chunk.
    Verify {
        /// The org trust document.
        #[arg(long)]
        trust: PathBuf,
        /// The bundle file.
        file: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Print a bundle's manifest and signers without verifying them.
    Inspect {
        /// The bundle file.
        file: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// How many chunks and bytes a device running OLD downloads to install
    /// NEW (chunks whose bytes it already has are read from its slot).
    /// Reads both heads without verifying them.
    Diff {
        /// The bundle the device runs.
        old: PathBuf,
        /// The bundle it is to install.
        new: PathBuf,
        /// One JSON document: chunks, reused, fetched, reused_bytes,
        /// fetched_bytes, full_bytes.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Image,
    Archive,
}

#[derive(Clone, Copy, ValueEnum)]
enum ChunkingArg {
    Fixed,
    Cdc,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Bundle name (A-Z a-z 0-9 - _).
    #[arg(long)]
    name: String,
    /// Release counter, monotonic per name.
    #[arg(long)]
    counter: u64,
    /// image: raw bytes for a block slot; archive: a directory for a dir slot.
    #[arg(long, value_enum)]
    kind: Kind,
    /// The image file, or the directory to archive.
    #[arg(long)]
    input: PathBuf,
    /// The bundle file to write (unsigned).
    #[arg(long)]
    out: PathBuf,
    /// What was built (name, counter, digest, sizes), as JSON.
    #[arg(long)]
    json: bool,
    /// Chunk size in bytes (one chunk travels as one NATS message); with
    /// content-defined chunking, the average (chunks are a quarter of it
    /// to three times it).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// How the payload is cut: `fixed` (the default for images, whose
    /// changes stay in place) or `cdc`, content-defined (the default for
    /// archives: a file added or grown moves only the chunks around it, so
    /// a delta update stays small). Format 3 only for `cdc`.
    #[arg(long, value_enum)]
    chunking: Option<ChunkingArg>,
    /// Bundle format: 3, or 2 for agents older than format 3 (no
    /// compression, and a whole-payload hash).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=3))]
    format: u16,
    /// Compress each chunk: `zstd` (level 19) or `zstd:LEVEL` (1-22). A
    /// chunk that does not shrink is kept as it is. Format 3 only.
    #[arg(long, value_name = "zstd[:LEVEL]", value_parser = parse_compress)]
    compress: Option<i32>,
    /// With --compress: how far back each compressed chunk may refer, into
    /// the bytes written before it (`4M`, `512K`, bytes, or `0`). A longer
    /// window gives a smaller bundle (4M comes within 1% of `zstd -19` of
    /// the whole payload), a slower build, and as much memory on the device
    /// while it installs; `0` makes every chunk decode alone.
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_window)]
    compress_window: u32,
    /// With --compress and a window: start linking afresh every SIZE bytes
    /// (`32M`, `1M`, ...). A device decodes that many chains at once, one
    /// per core; each restart costs about a window's worth of context.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_chain)]
    compress_chain: u64,
    /// A compatible device target; repeat for several. None means any target.
    #[arg(long = "target", value_name = "T")]
    targets: Vec<String>,
    /// Display version (defaults to the counter).
    #[arg(long = "release-version", value_name = "V")]
    version: Option<String>,
    /// Refuse the bundle after this long, e.g. "90d".
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
    /// Lowest agent version able to install it.
    #[arg(long)]
    min_agent_version: Option<String>,
    /// Signed permission to install below a device's highest committed counter.
    #[arg(long)]
    allow_downgrade: bool,
    /// Signed permission for setuid/setgid files in an archive (refused without it).
    #[arg(long)]
    allow_setid: bool,
}

pub fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Build(args) => build(args),
        BundleCommand::Sign { key, file, json } => {
            let key = keyfile::read_secret(&key)?;
            let outcome = sign_file(&file, &key)?;
            let (SignOutcome::Added(id) | SignOutcome::AlreadySigned(id)) = &outcome;
            let added = matches!(outcome, SignOutcome::Added(_));
            if json {
                println!("{}", json!({ "file": file, "key_id": id.to_string(), "added": added }));
            } else if added {
                println!("signed {} with key {id}", file.display());
            } else {
                println!("{} is already signed by key {id}; nothing changed", file.display());
            }
            Ok(())
        }
        BundleCommand::Verify { trust, file, json } => verify(&trust, &file, json),
        BundleCommand::Inspect { file, json } => inspect(&file, json),
        BundleCommand::Diff { old, new, json } => diff(&old, &new, json),
    }
}

pub fn keygen(prefix: &Path, json: bool) -> Result<()> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("reading OS randomness")?;
    let key = SecretKey::from_seed(&seed);
    let (secret, public) = keyfile::write_pair(prefix, &key)?;
    if json {
        println!(
            "{}",
            json!({ "key_id": key.public().id().to_string(), "secret": secret, "public": public })
        );
        return Ok(());
    }
    println!("key id {}", key.public().id());
    println!("secret {} (keep it offline; mode 0600)", secret.display());
    println!("public {}", public.display());
    Ok(())
}

fn build(a: BuildArgs) -> Result<()> {
    let now = now_unix();
    let params = ManifestParams {
        name: a.name,
        counter: a.counter,
        version: a.version.unwrap_or_else(|| a.counter.to_string()),
        targets: a.targets,
        kind: match a.kind {
            Kind::Image => PayloadKind::Image,
            Kind::Archive => PayloadKind::Archive,
        },
        chunk_size: a.chunk_size,
        created_at: now,
        expires_at: a.expires_in.map(|d| now.saturating_add(d.as_secs())),
        min_agent_version: a.min_agent_version,
        allow_downgrade: a.allow_downgrade,
        allow_setid: a.allow_setid,
        format: if a.format == 2 { Format::V2 } else { Format::V3 },
        zstd_level: a.compress,
    };
    if !a.input.exists() {
        return Err(UsageError(format!("{}: no such file or directory", a.input.display())).into());
    }
    if params.kind == PayloadKind::Image && !a.input.is_file() {
        return Err(UsageError(format!(
            "{}: an image bundle takes a file (use --kind archive for a directory)",
            a.input.display()
        ))
        .into());
    }
    let cut = match (a.chunking, params.kind, params.format) {
        (Some(ChunkingArg::Cdc), _, _) => Cut::ContentDefined,
        (None, PayloadKind::Archive, Format::V3) => Cut::ContentDefined,
        _ => Cut::Fixed,
    };
    let manifest = build_bundle(params, cut, a.compress_window, a.compress_chain, &a.input, &a.out)?;
    if a.json {
        let head = BundleReader::open(std::fs::File::open(&a.out)?)?;
        let doc = json!({
            "out": a.out,
            "name": manifest.name,
            "counter": manifest.counter,
            "version": manifest.version,
            "digest": head.head().digest().to_string(),
            "payload_len": manifest.payload_len(),
            "stored_len": manifest.stored_len(),
            "chunk_count": manifest.chunk_count(),
            "signed": false,
        });
        println!("{doc}");
        return Ok(());
    }
    println!(
        "built {} ({} {}, {} bytes in {} chunks); unsigned: sign it with `perch bundle sign`",
        a.out.display(),
        manifest.name,
        manifest.counter,
        manifest.payload_len(),
        manifest.chunk_count()
    );
    Ok(())
}

fn verify(trust: &Path, file: &Path, json: bool) -> Result<()> {
    let now = now_unix();
    if !file.is_file() {
        return Err(UsageError(format!("{}: no such bundle file", file.display())).into());
    }
    let trust = load_trust(trust, now)?;
    let verified = verify_file(&trust, file, now)?;
    let m = verified.manifest();
    let signers: Vec<String> = verified.signers().iter().map(|k| k.to_string()).collect();
    if json {
        let mut doc = manifest_json(m);
        doc["verified"] = json!(true);
        doc["digest"] = json!(verified.digest().to_string());
        doc["signers"] = json!(signers);
        doc["threshold"] = json!(trust.threshold());
        println!("{doc}");
    } else {
        // Format 2's whole-payload hash, as `sha256sum` prints it; format 3
        // has none (its chunk hashes fix the payload).
        let sha = m.payload_sha256().map(|h| format!(", sha256 {}", hex::encode(h))).unwrap_or_default();
        println!(
            "OK {}: {} counter {} (version {}), {} chunks{sha}, signed by {} of {} required: {}",
            file.display(),
            m.name,
            m.counter,
            m.version,
            m.chunk_count(),
            signers.len(),
            trust.threshold(),
            signers.join(", ")
        );
    }
    Ok(())
}

fn diff(old: &Path, new: &Path, json: bool) -> Result<()> {
    let head = |file: &Path| -> Result<Manifest> {
        let f = std::fs::File::open(file).map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
        let reader = BundleReader::open(f).with_context(|| file.display().to_string())?;
        Ok(reader.head().unverified_manifest().clone())
    };
    let d = perch_fleet::diff::diff(&head(old)?, &head(new)?);
    if json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(());
    }
    let share = |part: u64| if d.full_bytes == 0 { 0.0 } else { 100.0 * part as f64 / d.full_bytes as f64 };
    println!(
        "{} of {} chunks to download: {} bytes ({:.1}% of the bundle's {} bytes); {} chunks ({} bytes) reused from {}",
        d.fetched,
        d.chunks,
        d.fetched_bytes,
        share(d.fetched_bytes),
        d.full_bytes,
        d.reused,
        d.reused_bytes,
        old.display()
    );
    Ok(())
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    let reader = BundleReader::open(f).with_context(|| file.display().to_string())?;
    let head: &BundleHead = reader.head();
    let m = head.unverified_manifest();
    let sigs: Vec<String> = head.signatures().iter().map(|s| s.key_id.to_string()).collect();
    if json {
        let mut doc = manifest_json(m);
        doc["verified"] = json!(false);
        doc["digest"] = json!(head.digest().to_string());
        doc["signatures"] = json!(sigs);
        println!("{doc}");
        return Ok(());
    }
    let targets = if m.targets.is_empty() { "any".to_string() } else { m.targets.join(", ") };
    println!("{} (NOT verified: run `perch bundle verify` to check it)", file.display());
    println!("  name        {}", m.name);
    println!("  counter     {}", m.counter);
    println!("  version     {}", m.version);
    println!("  kind        {}", m.kind.as_str());
    println!("  format      {}", m.format().version());
    println!("  payload     {} bytes in {} chunks ({})", m.payload_len(), m.chunk_count(), chunking(m));
    let window = match m.max_window() {
        0 => String::new(),
        w => format!(", each decoded against up to {w} bytes before it, in {} chains", linked_chains(m)),
    };
    println!("  stored      {} bytes ({} chunks compressed{window})", m.stored_len(), compressed(m));
    if let Some(h) = m.payload_sha256() {
        println!("  sha256      {}", hex::encode(h));
    }
    println!("  digest      {}", head.digest());
    println!("  targets     {targets}");
    println!("  created     {}", time(m.created_at));
    println!("  expires     {}", m.expires_at.map(time).unwrap_or_else(|| "never".into()));
    println!("  min agent   {}", m.min_agent_version.as_deref().unwrap_or("any"));
    println!("  downgrade   {}", if m.allow_downgrade { "allowed" } else { "refused" });
    println!("  setid       {}", if m.allow_setid { "allowed" } else { "refused" });
    println!("  signatures  {} {}", sigs.len(), sigs.join(" "));
    Ok(())
}

/// `--compress`: the zstd level.
fn parse_compress(s: &str) -> Result<i32, String> {
    let level = match s.strip_prefix("zstd") {
        Some("") => 19,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| format!("'{s}': expected zstd or zstd:LEVEL"))?,
        None => return Err(format!("'{s}': the one compression is zstd (zstd or zstd:LEVEL)")),
    };
    if !ZSTD_LEVELS.contains(&level) {
        return Err(format!("zstd level {level} is outside {}..={}", ZSTD_LEVELS.start(), ZSTD_LEVELS.end()));
    }
    Ok(level)
}

/// A size in bytes, or K, M or G (binary).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1 << 20),
            None => match s.strip_suffix(['G', 'g']) {
                Some(d) => (d, 1 << 30),
                None => (s, 1),
            },
        },
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}': expected a size such as 4M, 512K or 0"))?;
    n.checked_mul(unit).ok_or_else(|| format!("'{s}' is too large"))
}

/// `--compress-chain`: a size of at least 64 KiB.
fn parse_chain(s: &str) -> Result<u64, String> {
    Some(parse_size(s)?).filter(|&b| b >= 64 << 10).ok_or_else(|| format!("'{s}' is under 64K"))
}

/// `--compress-window`: a size up to [`MAX_WINDOW`].
fn parse_window(s: &str) -> Result<u32, String> {
    Some(parse_size(s)?)
        .filter(|&b| b <= u64::from(MAX_WINDOW))
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| format!("'{s}' is over the largest window, {} MiB", MAX_WINDOW >> 20))
}

/// How many chains of linked chunks the payload is in (chains a device
/// can decode at once); 0 without linked chunks.
fn linked_chains(m: &Manifest) -> usize {
    if m.max_window() == 0 {
        return 0;
    }
    m.chain_starts().len()
}

/// How the payload was cut, as `inspect` shows it.
fn chunking(m: &Manifest) -> String {
    match m.chunking() {
        Chunking::Fixed { size } => format!("fixed {size}"),
        Chunking::Cdc { min, avg, max } => format!("content-defined {min}/{avg}/{max}"),
    }
}

fn compressed(m: &Manifest) -> usize {
    m.chunks().iter().filter(|c| c.is_compressed()).count()
}

fn manifest_json(m: &Manifest) -> serde_json::Value {
    json!({
        "name": m.name,
        "counter": m.counter,
        "version": m.version,
        "kind": m.kind.as_str(),
        "targets": m.targets,
        "format": m.format().version(),
        "payload_len": m.payload_len(),
        "stored_len": m.stored_len(),
        "chunk_size": match m.chunking() { Chunking::Fixed { size } => Some(size), Chunking::Cdc { .. } => None },
        "chunking": chunking(m),
        "chunk_count": m.chunk_count(),
        "compressed_chunks": compressed(m),
        "compress_window": m.max_window(),
        "compress_chains": linked_chains(m),
        "payload_sha256": m.payload_sha256().map(hex::encode),
        "created_at": m.created_at,
        "expires_at": m.expires_at,
        "min_agent_version": m.min_agent_version,
        "allow_downgrade": m.allow_downgrade,
        "allow_setid": m.allow_setid,
    })
}

fn time(unix: u64) -> String {
    perch_fleet::table::rfc3339(unix)
}
