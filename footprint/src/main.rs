//! The floor for `perch-agent`'s footprint: a program that uses the same
//! tokio runtime and the same async-nats features as the agent, and uses
//! the client the way the agent does (TLS connect, core publish, subscribe
//! and requests, JetStream publish with an ack, a signal handler) and
//! nothing of perch. (No KV API: the agent reads its keys with direct gets,
//! and with LTO the KV code, and the regex engine it validates names
//! with, would count here and not in the agent.) `cargo xtask bench
//! footprint` builds both the same way and compares their sizes, and their
//! memory when idle and connected.
//!
//! Usage: `footprint-min URL [SECONDS]`: connect, exercise each feature
//! once, stay connected for SECONDS (default 0), exit 0.
#![forbid(unsafe_code)]

use std::time::Duration;

use futures_util::StreamExt;

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let idle: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        std::process::exit(2)
    };
    let code = rt.block_on(async move {
        let Ok(client) =
            async_nats::ConnectOptions::new().ping_interval(Duration::from_secs(10)).connect(url).await
        else {
            return 1;
        };
        let Ok(mut sub) = client.subscribe("footprint.echo").await else { return 1 };
        if client.publish("footprint.echo", "x".into()).await.is_err() {
            return 1;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), sub.next()).await;
        let _ =
            tokio::time::timeout(Duration::from_secs(2), client.request("footprint.req", "x".into())).await;
        let js = async_nats::jetstream::new(client.clone());
        // May fail (no such stream or bucket): the code is what counts.
        if let Ok(ack) = js.publish("footprint.js", "x".into()).await {
            let _ = tokio::time::timeout(Duration::from_secs(2), ack).await;
        }
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return 1;
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(idle)) => {}
            _ = term.recv() => {}
        }
        0
    });
    std::process::exit(code);
}
