//! Helpers for `cargo xtask bench link`:
//!
//! - `fill STATE_DIR DEVICE N`: queues N realistic reports in an agent's outbox;
//! - `wait URL CREDS CA N`: waits until PERCH_REPORTS holds N messages, prints
//!   the seconds it took; fails saying how many it holds if the stream stops
//!   growing for 30 s, or after 600 s;
//! - `fetch URL CREDS CA DIGEST WINDOW`: reads a published bundle the way the
//!   agent does (direct gets, WINDOW ahead) and, as the baseline, bare direct
//!   gets of the same messages with the same window; prints both.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use perch_agent::fetch::{ChunkSource, FetchSettings};
use perch_agent::outbox::{Outbox, OutboxConfig};
use perch_protocol::report::{Lane, Report, ReportKind};

fn usage() -> ! {
    eprintln!(
        "usage: link-bench fill STATE_DIR DEVICE N | wait URL CREDS CA N | fetch URL CREDS CA DIGEST WINDOW"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["fill", state, device, n] => fill(state, device, n.parse().unwrap_or_else(|_| usage())),
        ["wait", url, creds, ca, n] => wait(url, creds, ca, n.parse().unwrap_or_else(|_| usage())),
        ["fetch", url, creds, ca, digest, window] => {
            fetch(url, creds, ca, digest, window.parse().unwrap_or_else(|_| usage()))
        }
        _ => usage(),
    }
}

fn fill(state: &str, device: &str, n: u64) {
    let cfg = OutboxConfig { telemetry_budget: 1 << 40, ..OutboxConfig::default() };
    let (mut ob, _) = Outbox::open(&PathBuf::from(state), cfg).expect("outbox");
    let (t, epoch) = (Instant::now(), ob.epoch());
    for _ in 0..n {
        ob.append(Lane::Telemetry, |seq| {
            Report {
                device: device.into(),
                epoch,
                seq,
                boot_id: "bench".into(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                at: 0,
                running_slot: Some("a".into()),
                running_bundle: None,
                journal_state: "Idle".into(),
                kind: ReportKind::Heartbeat,
            }
            .to_bytes()
        })
        .expect("append");
    }
    ob.flush().expect("flush");
    let (records, bytes) = ob.backlog();
    println!("{{\"queued\": {records}, \"bytes\": {bytes}, \"seconds\": {}}}", t.elapsed().as_secs_f64());
}

async fn js(url: &str, creds: &str, ca: &str) -> async_nats::jetstream::Context {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(ca).expect("CA").as_ref().to_vec();
    let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(der)).expect("tls");
    let client = async_nats::ConnectOptions::with_credentials_file(creds)
        .await
        .expect("creds")
        .require_tls(true)
        .tls_client_config(tls)
        .connect(url)
        .await
        .expect("connect");
    async_nats::jetstream::new(client)
}

/// How long the stream may stop growing before the wait gives up.
const STALL: Duration = Duration::from_secs(30);
/// The longest wait, however the stream grows.
const LIMIT: Duration = Duration::from_secs(600);

fn wait(url: &str, creds: &str, ca: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let js = js(url, creds, ca).await;
        let t = Instant::now();
        let (mut stored, mut grew) = (0u64, Instant::now());
        loop {
            if let Ok(mut s) = js.get_stream(perch_protocol::subjects::REPORTS_STREAM).await {
                let now = s.info().await.map(|i| i.state.messages).unwrap_or(stored);
                if now != stored {
                    (stored, grew) = (now, Instant::now());
                }
            }
            if stored >= n {
                break;
            }
            // Fail with a reason, never hang: a stream that stopped short
            // (records dropped, an agent that died) is said to be so.
            let why = if grew.elapsed() > STALL {
                format!("no new report for {} s", STALL.as_secs())
            } else if t.elapsed() > LIMIT {
                format!("{} s are up", LIMIT.as_secs())
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            eprintln!(
                "link-bench: waited {:.0} s for {n} reports in PERCH_REPORTS; {stored} stored and {why}",
                t.elapsed().as_secs_f64()
            );
            std::process::exit(1);
        }
        println!("{{\"stored\": {n}, \"seconds\": {}}}", t.elapsed().as_secs_f64());
    });
}

fn fetch(url: &str, creds: &str, ca: &str, digest_hex: &str, window: usize) {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(digest_hex, &mut digest).expect("digest");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let js = rt.block_on(js(url, creds, ca));
    let client = js.client();
    // The agent's path: a ChunkSource read to the end, on a blocking thread.
    let handle = rt.handle().clone();
    let c2 = client.clone();
    let (agent_bytes, agent_secs) = rt
        .block_on(rt.spawn_blocking(move || {
            let t = Instant::now();
            let settings = FetchSettings { window, ..FetchSettings::default() };
            let mut src = ChunkSource::open(handle, c2, digest, settings).expect("head");
            eprintln!("link-bench: head fetched");
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = src.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            (total, t.elapsed().as_secs_f64())
        }))
        .expect("join");
    eprintln!("link-bench: agent path read {agent_bytes} bytes");
    // The baseline: bare direct gets of the same messages, `window` in
    // flight, with nothing else done (no head parsing, no copying out).
    let (raw_bytes, raw_secs) = rt.block_on(async {
        let t = Instant::now();
        let count = (agent_bytes as usize).div_ceil(256 * 1024) as u32 + 1;
        let subject = |i: u32| {
            let s = if i == 0 { "m".to_string() } else { (i - 1).to_string() };
            format!(
                "$JS.API.DIRECT.GET.{}.perch.chunk.{digest_hex}.{s}",
                perch_protocol::subjects::CHUNKS_STREAM
            )
        };
        let mut inflight = futures_util::stream::FuturesOrdered::new();
        let (mut next, mut total) = (0u32, 0u64);
        loop {
            while inflight.len() < window.max(1) && next < count {
                let c = client.clone();
                let subj = subject(next);
                inflight.push_back(async move { c.request(subj, Default::default()).await });
                next += 1;
            }
            match inflight.next().await {
                Some(r) => total += r.expect("direct get").payload.len() as u64,
                None => break,
            }
        }
        (total, t.elapsed().as_secs_f64())
    });
    println!(
        "{{\"agent_bytes\": {agent_bytes}, \"agent_seconds\": {agent_secs}, \"raw_bytes\": {raw_bytes}, \"raw_seconds\": {raw_secs}, \"window\": {window}}}"
    );
}
