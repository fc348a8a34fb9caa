//! `perch`: the operator's CLI.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use perch_fleet::catalog::BundleArg;
use perch_protocol::bundle::BundleReader;
use perch_support::exit::{self, UsageError};
use perch_support::now_unix;
use perch_support::trustfile::load_trust;
use serde_json::json;

mod bundle_cli;
mod context_cli;
mod deploy_cli;

use bundle_cli::BundleCommand;
use context_cli::{Conn, ContextCommand};

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
    /// Presence advisories (Choria's io.choria.sr.v2.age_advisory) as
    /// devices are first heard from, go quiet, come back and expire, on
    /// perch.advisories.<event>.<device>. A service: run one or more (one
    /// is elected to send) until SIGTERM.
    Watch {
        #[command(flatten)]
        conn: Conn,
        /// This watcher's name, in each advisory's `replicator` (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// A device silent this long times out.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
        stale_after: Duration,
        /// A device silent this long expires: no more advisories until it is heard from.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        expire_after: Duration,
        /// How often to look.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        every: Duration,
    },
    /// The fleet in a browser: devices, rollouts, enrollment and bundles,
    /// live. Serves until SIGTERM; prints the login link at start.
    Console {
        #[command(flatten)]
        conn: Conn,
        /// Where to listen. Beyond loopback, --tls-cert and --tls-key are required.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The HTTPS certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The HTTPS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The org directory: lets the console revoke devices and issue
        /// enrollment tokens (both are signed with the org's keys).
        #[arg(long, env = "PERCH_ORG", value_name = "DIR")]
        org: Option<PathBuf>,
        /// A device silent this long is shown as stale.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
        stale_after: Duration,
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
        Command::Keygen { out, json } => bundle_cli::keygen(&out, json),
        Command::Bundle(cmd) => bundle_cli::run(cmd),
        Command::Publish { trust, conn, file, json } => publish(&trust, conn.target()?, &file, json),
        Command::Context(cmd) => context_cli::run(cmd),
        Command::Desired(cmd) => desired(cmd),
        Command::Deploy(args) => deploy_cli::run(*args),
        Command::Status { conn, device, stale_after, json, watch } => {
            let q = perch_fleet::status::Query { device, stale_after_secs: stale_after.as_secs() };
            status(&conn.target()?, &q, json, watch)
        }
        Command::Streams { conn, json } => streams(conn.target()?, json),
        Command::Console { conn, listen, tls_cert, tls_key, org, stale_after } => {
            let opts = perch_fleet::console::Options {
                listen,
                tls: tls_cert.zip(tls_key),
                org,
                stale_after_secs: stale_after.as_secs(),
            };
            console(conn.target()?, opts)
        }
        Command::Watch { conn, name, stale_after, expire_after, every } => {
            let limits = perch_fleet::presence::Limits {
                stale_after: stale_after.as_secs(),
                expire_after: expire_after.as_secs(),
            };
            if limits.expire_after <= limits.stale_after || every.is_zero() {
                bail!(UsageError(
                    "--expire-after must be longer than --stale-after, and --every above 0".into()
                ));
            }
            let name = name.unwrap_or_else(host_name);
            watch(conn.target()?, &perch_fleet::watch::Settings { name, limits, every })
        }
    }
}

/// The host's name, for `perch watch`'s default `--name`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "perch-watch".into())
}

/// Resolves on SIGTERM or SIGINT, listening from the moment it is made.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn watch(target: perch_fleet::link::Target, settings: &perch_fleet::watch::Settings) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Listening from the start: a SIGTERM while it connects is a clean stop too.
        let stop = stop_signal()?;
        tokio::pin!(stop);
        let client = tokio::select! {
            c = target.connect("perch watch") => c?,
            _ = &mut stop => return Ok(()),
        };
        perch_fleet::watch::run(&client, settings, stop).await?;
        anyhow::Ok(())
    })
}

fn console(target: perch_fleet::link::Target, opts: perch_fleet::console::Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let stop = stop_signal()?;
        perch_fleet::console::run(&target, opts, stop, |login| {
            println!("perch console: open {login}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        })
        .await?;
        anyhow::Ok(())
    })
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

fn time(unix: u64) -> String {
    perch_fleet::table::rfc3339(unix)
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
