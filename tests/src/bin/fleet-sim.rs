//! Simulated fleet for `cargo xtask bench fleet` (see `perch_tests::sim`):
//! N devices enroll with one token through the provisioner, C at a time,
//! then run the agent's link, outbox and desired-state follower until
//! standard input closes. A device holds about three file descriptors (its
//! connection and two outbox segments): the bench runs a few of these
//! processes, each with a few thousand devices, to stay under the limit.
//!
//! Writes JSON lines to standard output:
//! - `{"enrolled": N, "seconds": S}` once every device has enrolled;
//! - `{"ready": N}` once every device has started;
//! - `{"noticed": ID, "key": K, "revision": R, "at_ms": T}` when a device
//!   acts on a new desired state;
//! - `{"ended": ID, "digest": HEX, "committed": BOOL, "at_ms": T}`;
//! - `{"failed": ID, "reason": TEXT}`;
//! - `{"backlog": N}` for each line `backlog` read on standard input.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use perch_tests::sim::{self, Event, SimSettings};

const USAGE: &str = "usage: fleet-sim --token FILE --devices N --prefix P [--first K] --group G --root DIR \
[--concurrency C] [--heartbeat SECS] [--resync SECS] [--chunk-share F] [--trial-ms MS] [--fail HEX:FROM..TO] \
[--url URL]...";

struct Args {
    token: PathBuf,
    devices: usize,
    prefix: String,
    /// The first device's index: ids are `<prefix>-<first + i>`.
    first: usize,
    group: String,
    root: PathBuf,
    concurrency: usize,
    heartbeat: u64,
    resync: u64,
    chunk_share: f64,
    trial_ms: u64,
    fail: Option<([u8; 32], std::ops::Range<usize>)>,
    /// The servers the devices connect to once enrolled (`[link] urls`): a
    /// field site's, say. None: the ones their enrollment names.
    urls: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        token: PathBuf::new(),
        devices: 0,
        prefix: "sim".into(),
        first: 0,
        group: String::new(),
        root: PathBuf::new(),
        concurrency: 200,
        heartbeat: 60,
        resync: 30,
        chunk_share: 0.05,
        trial_ms: 0,
        fail: None,
        urls: vec![],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let num = |v: Option<&String>, what: &str| -> Result<u64, String> {
        v.and_then(|v| v.parse().ok()).ok_or_else(|| format!("{what} takes a number"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--token" => a.token = it.next().ok_or(USAGE)?.into(),
            "--devices" => a.devices = num(it.next(), flag)? as usize,
            "--prefix" => a.prefix = it.next().ok_or(USAGE)?.clone(),
            "--first" => a.first = num(it.next(), flag)? as usize,
            "--group" => a.group = it.next().ok_or(USAGE)?.clone(),
            "--root" => a.root = it.next().ok_or(USAGE)?.into(),
            "--concurrency" => a.concurrency = num(it.next(), flag)?.max(1) as usize,
            "--heartbeat" => a.heartbeat = num(it.next(), flag)?.max(1),
            "--resync" => a.resync = num(it.next(), flag)?.max(1),
            "--trial-ms" => a.trial_ms = num(it.next(), flag)?,
            "--url" => a.urls.push(it.next().ok_or(USAGE)?.clone()),
            "--chunk-share" => {
                a.chunk_share =
                    it.next().and_then(|v| v.parse().ok()).ok_or("--chunk-share takes 0.0 to 1.0")?
            }
            "--fail" => {
                let v = it.next().ok_or(USAGE)?;
                let bad = || format!("--fail takes HEX:FROM..TO, not {v}");
                let (hex_digest, range) = v.split_once(':').ok_or_else(bad)?;
                let (from, to) = range.split_once("..").ok_or_else(bad)?;
                let d = perch_protocol::digest_from_hex(hex_digest).ok_or_else(bad)?;
                a.fail = Some((d, from.parse().map_err(|_| bad())?..to.parse().map_err(|_| bad())?));
            }
            _ => return Err(USAGE.into()),
        }
    }
    if a.token.as_os_str().is_empty() || a.root.as_os_str().is_empty() || a.group.is_empty() || a.devices == 0
    {
        return Err(USAGE.into());
    }
    Ok(a)
}

fn main() {
    let a = parse().unwrap_or_else(|e| {
        eprintln!("fleet-sim: {e}");
        std::process::exit(2)
    });
    perch_net::init_logging(tracing::Level::WARN);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(a)) {
        eprintln!("fleet-sim: {e}");
        std::process::exit(1)
    }
}

fn say(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn id(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:05}")
}

async fn run(a: Args) -> Result<(), String> {
    let token = std::fs::read_to_string(&a.token).map_err(|e| format!("{}: {e}", a.token.display()))?;
    // (TOML strings: a URL has no quote or backslash to escape.)
    let urls: Vec<String> = a.urls.iter().map(|u| format!("\"{u}\"")).collect();
    let extra = format!(
        "[reports]\nheartbeat = \"{}s\"\n[fetch]\nresync = \"{}s\"\n[link]\nmax_backoff = \"5s\"\nurls = [{}]\n",
        a.heartbeat,
        a.resync,
        urls.join(", ")
    );
    let fail = a
        .fail
        .as_ref()
        .map(|(d, r)| (*d, Arc::new(r.clone().map(|i| id(&a.prefix, i)).collect::<BTreeSet<_>>())));
    let settings = SimSettings {
        agent: sim::agent_config(&a.root, &extra)?,
        root: a.root.clone(),
        chunk_share: a.chunk_share,
        trial: Duration::from_millis(a.trial_ms),
        fail,
    };
    let settings = Arc::new(settings);
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let mut tasks = Vec::with_capacity(a.devices);
    for i in 0..a.devices {
        let permit = slots.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (s, token, group, id) =
            (settings.clone(), token.clone(), a.group.clone(), id(&a.prefix, a.first + i));
        tasks.push(tokio::spawn(async move {
            let r = sim::enroll(&s, &token, &id, &group).await;
            drop(permit);
            r
        }));
    }
    let mut enrolled = Vec::with_capacity(a.devices);
    for t in tasks {
        enrolled.push(t.await.map_err(|e| e.to_string())??);
    }
    say(serde_json::json!({"enrolled": enrolled.len(), "seconds": started.elapsed().as_secs_f64()}));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut devices = Vec::with_capacity(a.devices);
    for v in enrolled {
        devices.push(sim::start(&settings, v, tx.clone()).await?);
    }
    say(serde_json::json!({"ready": devices.len()}));
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            say(match e {
                Event::Noticed { device, key, revision, at_ms } => {
                    serde_json::json!({"noticed": device, "key": key, "revision": revision, "at_ms": at_ms})
                }
                Event::Ended { device, digest, committed, at_ms } => serde_json::json!({
                    "ended": device, "digest": hex::encode(digest), "committed": committed, "at_ms": at_ms
                }),
                Event::Failed { device, reason } => serde_json::json!({"failed": device, "reason": reason}),
            });
        }
    });
    // Commands on standard input until it closes.
    let (ctx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if ctx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(cmd) = commands.recv().await {
        if cmd.trim() == "backlog" {
            let n: usize = devices.iter().map(|d| d.backlog()).sum();
            say(serde_json::json!({"backlog": n}));
        }
    }
    for d in &devices {
        d.stop();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
