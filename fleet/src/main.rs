//! `perch`: the operator's CLI.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use perch_fleet::build::{build_bundle, Cut};
use perch_fleet::catalog::BundleArg;
use perch_fleet::context;
use perch_fleet::sign::{sign_file, SignOutcome};
use perch_fleet::verify::verify_file;
use perch_protocol::bundle::{
    BundleHead, BundleReader, Chunking, Format, Manifest, ManifestParams, PayloadKind, MAX_WINDOW,
    ZSTD_LEVELS,
};
use perch_protocol::limits::DEFAULT_CHUNK_SIZE;
use perch_protocol::SecretKey;
use perch_support::exit::{self, UsageError};
use perch_support::trustfile::load_trust;
use perch_support::{keyfile, now_unix};
use serde_json::json;

mod deploy_cli;

#[derive(Parser)]
#[command(
    name = "perch",
    version,
    about = "perch operator CLI: release keys, signed bundles, publishing and fleet status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a release key pair: PREFIX.key (mode 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// The key id and the two paths, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build, sign, verify and inspect bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Saved connection settings (URL, credential, CA), as `nats context` keeps them.
    #[command(subcommand)]
    Context(ContextCommand),
    /// Verify a bundle and upload it to the fleet's PERCH_CHUNKS stream.
    Publish {
        /// The org trust document: the bundle is verified against it first.
        #[arg(long)]
        trust: PathBuf,
        #[command(flatten)]
        conn: Conn,
        /// The signed bundle file.
        file: PathBuf,
        /// What was published (digest, chunks, bytes sent), as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Which bundle a device or a group should run (devices follow it).
    #[command(subcommand)]
    Desired(DesiredCommand),
    /// Roll a published bundle out in waves (and pause, resume, abort, list).
    Deploy(Box<deploy_cli::DeployArgs>),
    /// The fleet as its devices report it: who is online, what runs where,
    /// how the last deploy went.
    Status {
        #[command(flatten)]
        conn: Conn,
        /// One device, with an account of every report it stored.
        #[arg(long)]
        device: Option<String>,
        /// A device silent this long is shown as stale.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
        stale_after: Duration,
        /// Print one JSON document.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every two seconds until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Each stream and bucket: its leader and copies, and whether every
    /// copy is current. Exits 1 unless all are: check it before taking
    /// another server of a cluster down.
    Streams {
        #[command(flatten)]
        conn: Conn,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DesiredCommand {
    /// Name a published bundle for a device or a group. Writing the same
    /// bundle again is how a device is asked to retry one that failed.
    Set {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArgs,
        /// The bundle: a published NAME@COUNTER, or its bundle file (it must be published).
        #[arg(
            long,
            conflicts_with = "digest",
            required_unless_present = "digest",
            value_name = "NAME@COUNTER|FILE"
        )]
        bundle: Option<String>,
        /// The bundle digest (hex), as `perch bundle inspect` shows it.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Remove a device's or a group's key (a device falls back to its groups').
    Clear {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Every key in force.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct ScopeArgs {
    /// One device, by its id.
    #[arg(long)]
    device: Option<String>,
    /// A group: every device enrolled with it.
    #[arg(long)]
    group: Option<String>,
}

impl ScopeArgs {
    fn scope(self) -> perch_fleet::desired::Scope {
        use perch_fleet::desired::Scope;
        match (self.device, self.group) {
            (Some(d), _) => Scope::Device(d),
            (None, g) => Scope::Group(g.unwrap_or_default()),
        }
    }
}

/// The three connection settings.
#[derive(Args)]
pub struct Settings {
    /// NATS URL; repeat for several.
    #[arg(long = "url", value_name = "URL")]
    urls: Vec<String>,
    /// A FLEET user credential (`perch-bootstrap nats creds --account fleet`).
    #[arg(long, value_name = "FILE")]
    creds: Option<PathBuf>,
    /// The fleet CA certificate (ORG/tls/ca.pem).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

/// How the operator reaches the fleet's NATS.
#[derive(Args)]
pub struct Conn {
    #[command(flatten)]
    settings: Settings,
    /// The saved context for the settings not given as flags or in
    /// PERCH_URL, PERCH_CREDS, PERCH_CA (default: PERCH_CONTEXT, else the
    /// one `perch context use` selected).
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
}

impl Conn {
    /// The settings, resolved against the environment and the context.
    pub fn resolve(self) -> Result<context::Resolved> {
        let Settings { urls, creds, ca } = self.settings;
        let flags = context::Flags { urls, creds, ca, context: self.context };
        Ok(context::resolve(flags, &env_var)?)
    }

    pub fn target(self) -> Result<perch_fleet::link::Target> {
        Ok(self.resolve()?.target)
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[derive(Subcommand)]
enum ContextCommand {
    /// Save a context (replacing one of that name): the settings given,
    /// file paths made absolute.
    Add {
        /// The context's name (letters, digits, '-', '_', '.').
        name: String,
        #[command(flatten)]
        settings: Settings,
        /// A line saying what the context is for.
        #[arg(long)]
        description: Option<String>,
        /// Also select it.
        #[arg(long = "use")]
        select: bool,
    },
    /// Select the context networked commands use.
    Use {
        /// The context's name.
        name: String,
    },
    /// List the saved contexts; `*` marks the selected one.
    Ls {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// What a networked command would connect with now, and where each
    /// setting comes from.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Delete a saved context.
    Rm {
        /// The context's name.
        name: String,
    },
}

fn context_cmd(cmd: ContextCommand) -> Result<()> {
    let store = context::Store::from_env(&env_var)?;
    match cmd {
        ContextCommand::Add { name, settings: Settings { urls, creds, ca }, description, select } => {
            let c = context::made(description, urls, creds, ca)?;
            store.save(&name, &c)?;
            if select {
                store.select(&name)?;
            }
            println!(
                "saved context '{name}' in {}{}",
                store.dir().display(),
                if select { " and selected it" } else { "" }
            );
        }
        ContextCommand::Use { name } => {
            store.select(&name)?;
            println!("selected context '{name}'");
        }
        ContextCommand::Ls { json } => {
            let selected = store.selected()?;
            let mut rows = vec![];
            for name in store.names()? {
                let c = store.load(&name)?;
                rows.push((selected.as_deref() == Some(name.as_str()), name, c));
            }
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(sel, name, c)| {
                        json!({"name": name, "selected": sel, "description": c.description,
                               "urls": c.urls, "creds": c.creds, "ca": c.ca})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&json!({ "contexts": list }))?);
            } else if rows.is_empty() {
                println!(
                    "no contexts in {} (perch context add NAME --url .. --creds .. --ca ..)",
                    store.dir().display()
                );
            } else {
                let width = rows.iter().map(|(_, n, _)| n.len()).max().unwrap_or(0);
                for (sel, name, c) in rows {
                    let mark = if sel { '*' } else { ' ' };
                    println!("{mark} {name:<width$}  {}  {}", c.urls.join(","), c.description);
                }
            }
        }
        ContextCommand::Show { conn, json } => {
            let r = conn.resolve()?;
            let t = &r.target;
            if json {
                let v = json!({
                    "context": r.context,
                    "urls": t.urls, "urls_from": r.urls_from.to_string(),
                    "creds": t.creds, "creds_from": r.creds_from.to_string(),
                    "ca": t.ca, "ca_from": r.ca_from.to_string(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("context  {}", r.context.as_deref().unwrap_or("(none)"));
                println!("url      {}  ({})", t.urls.join(","), r.urls_from);
                println!("creds    {}  ({})", t.creds.display(), r.creds_from);
                println!("ca       {}  ({})", t.ca.display(), r.ca_from);
            }
        }
        ContextCommand::Rm { name } => {
            store.remove(&name)?;
            println!("removed context '{name}'");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum BundleCommand {
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
struct BuildArgs {
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version, to stdout.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", exit::one_line_usage("perch", &e.to_string()));
            return ExitCode::from(exit::USAGE as u8);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perch: {}", perch_support::chain_line(e.chain()));
            ExitCode::from(exit::code_for(e.chain(), &[perch_fleet::CLASSIFY]) as u8)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    perch_net::init_logging_if_asked();
    perch_support::sigpipe::die_on_closed_pipe();
    match cli.command {
        Command::Keygen { out, json } => keygen(&out, json),
        Command::Publish { trust, conn, file, json } => publish(&trust, conn.target()?, &file, json),
        Command::Context(cmd) => context_cmd(cmd),
        Command::Desired(cmd) => desired(cmd),
        Command::Deploy(args) => deploy_cli::run(*args),
        Command::Status { conn, device, stale_after, json, watch } => {
            let q = perch_fleet::status::Query { device, stale_after_secs: stale_after.as_secs() };
            status(&conn.target()?, &q, json, watch)
        }
        Command::Streams { conn, json } => streams(conn.target()?, json),
        Command::Bundle(BundleCommand::Build(args)) => build(args),
        Command::Bundle(BundleCommand::Sign { key, file, json }) => {
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
        Command::Bundle(BundleCommand::Verify { trust, file, json }) => verify(&trust, &file, json),
        Command::Bundle(BundleCommand::Inspect { file, json }) => inspect(&file, json),
        Command::Bundle(BundleCommand::Diff { old, new, json }) => diff(&old, &new, json),
    }
}

fn streams(target: perch_fleet::link::Target, json: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let all = rt.block_on(async {
        let c = target.connect("perch streams").await?;
        anyhow::Ok(perch_fleet::streams::all(&async_nats::jetstream::new(c)).await)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        println!("{:<20} {:>8} {:>10}  {:<10} followers", "stream", "replicas", "messages", "leader");
        for h in &all {
            let leader = match &h.leader {
                None => "(none)",
                Some(l) if l.is_empty() => "(single)",
                Some(l) => l,
            };
            let followers: Vec<String> = h
                .followers
                .iter()
                .map(|f| match (f.offline, f.current) {
                    (true, _) => format!("{} offline", f.server),
                    (false, true) => format!("{} current", f.server),
                    (false, false) if f.lag > 0 => format!("{} behind by {}", f.server, f.lag),
                    (false, false) => format!("{} not current", f.server),
                })
                .collect();
            let replicas = if h.exists { h.replicas.to_string() } else { "-".into() };
            println!(
                "{:<20} {replicas:>8} {:>10}  {leader:<10} {}",
                h.stream,
                h.messages,
                followers.join(", ")
            );
        }
    }
    let problems: Vec<String> = all.iter().filter_map(perch_fleet::streams::Health::problem).collect();
    if !problems.is_empty() {
        anyhow::bail!("not every copy is current: {}", problems.join("; "));
    }
    Ok(())
}

fn keygen(prefix: &Path, json: bool) -> Result<()> {
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
    let manifest = build_bundle(params, cut, a.compress_window, &a.input, &a.out)?;
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
        w => format!(", each decoded against up to {w} bytes before it"),
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

/// `--compress-window`: bytes, or K or M (binary), up to [`MAX_WINDOW`].
fn parse_window(s: &str) -> Result<u32, String> {
    let (digits, unit) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1024),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1024 * 1024),
            None => (s, 1),
        },
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}': expected a size such as 4M, 512K or 0"))?;
    n.checked_mul(unit)
        .filter(|&b| b <= u64::from(MAX_WINDOW))
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| format!("'{s}' is over the largest window, {} MiB", MAX_WINDOW >> 20))
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
        "payload_sha256": m.payload_sha256().map(hex::encode),
        "created_at": m.created_at,
        "expires_at": m.expires_at,
        "min_agent_version": m.min_agent_version,
        "allow_downgrade": m.allow_downgrade,
        "allow_setid": m.allow_setid,
    })
}

fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn publish(trust: &Path, target: perch_fleet::link::Target, file: &Path, json: bool) -> Result<()> {
    use perch_fleet::publish::{self, Published};
    if !file.is_file() {
        return Err(UsageError(format!("{}: no such bundle file", file.display())).into());
    }
    let now = now_unix();
    let trust = load_trust(trust, now)?;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} chunks")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("publishing");
        b
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let done = rt.block_on(publish::publish(&trust, file, &target, now, |acked, total| {
        if let Some(b) = &bar {
            b.set_length(u64::from(total));
            b.set_position(u64::from(acked));
        }
    }));
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let done = done?;
    if json {
        let (chunks, bytes, sent) = match done {
            Published::Sent { chunks, bytes } => (chunks, bytes, true),
            Published::AlreadyThere { chunks } => (chunks, 0, false),
        };
        let head = BundleReader::open(std::fs::File::open(file)?)?;
        let m = head.head().unverified_manifest();
        let doc = json!({
            "file": file,
            "name": m.name,
            "counter": m.counter,
            "digest": head.head().digest().to_string(),
            "chunk_count": chunks,
            "bytes_sent": bytes,
            "already_published": !sent,
        });
        println!("{doc}");
        return Ok(());
    }
    match done {
        Published::Sent { chunks, bytes } => {
            println!("published {} ({chunks} chunks, {bytes} bytes)", file.display())
        }
        Published::AlreadyThere { chunks } => {
            println!("{} is already published ({chunks} chunks); nothing sent", file.display())
        }
    }
    Ok(())
}

/// `perch status`: once (table or JSON), or redrawn until interrupted.
fn status(
    target: &perch_fleet::link::Target,
    q: &perch_fleet::status::Query,
    json: bool,
    watch: bool,
) -> Result<()> {
    use perch_fleet::status::{read, StatusError};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = target.connect("perch status").await?;
        loop {
            let r = read(&client, q, now_unix()).await.map_err(|e: StatusError| anyhow::Error::new(e))?;
            // A device's own view shows no rollouts.
            let rollouts = match q.device {
                Some(_) => vec![],
                None => {
                    perch_fleet::rollout_store::shown(&async_nats::jetstream::new(client.clone())).await?
                }
            };
            for why in &r.refused {
                eprintln!("perch: report set aside: {why}");
            }
            if json {
                let mut doc = serde_json::to_value(&r.view)?;
                doc["rollouts"] =
                    rollouts.iter().map(|x| perch_fleet::rollout::progress_json(x, &r.view)).collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            let mut table = perch_fleet::table::render(&r.view);
            // Rollouts under way, and the last one that ended.
            let live = |x: &&perch_fleet::rollout::Rollout| {
                matches!(
                    x.state,
                    perch_fleet::rollout::State::Running | perch_fleet::rollout::State::Paused { .. }
                )
            };
            let last_ended = rollouts.iter().rfind(|x| !live(x));
            for x in rollouts.iter().filter(live).chain(last_ended) {
                table.push('\n');
                table.push_str(&perch_fleet::table::render_rollout(x, &r.view));
            }
            if !watch {
                print!("{table}");
                return Ok(());
            }
            // Clear the screen and redraw from the top.
            print!("\x1b[2J\x1b[H{}\n(every 2 s; Ctrl-C to stop)\n{table}", time(now_unix()));
            std::io::Write::flush(&mut std::io::stdout())?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// `perch desired set|clear|list`.
fn desired(cmd: DesiredCommand) -> Result<()> {
    use perch_fleet::desired;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match cmd {
            DesiredCommand::Set { conn, scope, bundle, digest } => {
                let bundle = bundle.as_deref().map(BundleArg::parse).transpose()?;
                let digest = digest
                    .map(|hex| {
                        perch_protocol::digest_from_hex(hex.trim())
                            .ok_or_else(|| UsageError(format!("--digest {hex}: not a 64-digit hex digest")))
                    })
                    .transpose()?;
                let scope = scope.scope();
                let js = async_nats::jetstream::new(conn.target()?.connect("perch desired").await?);
                let d = match (bundle, digest) {
                    (Some(b), _) => b.digest(&js).await?,
                    (None, Some(d)) => d,
                    (None, None) => return Err(UsageError("give --bundle or --digest".into()).into()),
                };
                let rev = desired::set(&js, &scope, &d).await?;
                println!("{} -> {} (revision {rev})", scope.key()?, hex::encode(d));
            }
            DesiredCommand::Clear { conn, scope } => {
                let scope = scope.scope();
                let js = async_nats::jetstream::new(conn.target()?.connect("perch desired").await?);
                desired::clear(&js, &scope).await?;
                println!("{} cleared", scope.key()?);
            }
            DesiredCommand::List { conn, json } => {
                let js = async_nats::jetstream::new(conn.target()?.connect("perch desired").await?);
                let all = desired::list(&js).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else if all.is_empty() {
                    println!("(no desired state)");
                }
                for e in all.iter().filter(|_| !json) {
                    println!("{:<24} {}  (revision {})", e.key, e.bundle, e.revision);
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is in `--help`.
    #[test]
    fn no_flag_or_argument_has_a_blank_help() {
        let blank = perch_support::clap_help::blank_help(&super::Cli::command());
        assert!(blank.is_empty(), "no help text: {blank:#?}");
    }
}
