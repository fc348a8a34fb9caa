//! Taking the trust document the fleet pushes (`perch-bootstrap trust
//! push`): the KV bucket `PERCH_TRUST`, key `doc`.
//!
//! Like the desired state, without any consumer on the server: a plain
//! subscription to the key's subject (the client re-subscribes after a
//! reconnect), and a direct get at start and every `fetch.resync`. Whatever
//! arrives goes through [`trust_store::update_bytes`]: only the accepted
//! version or a newer one by a valid rotation chain is installed, so a
//! writer of the bucket can push nothing the device would not take by hand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, StatusCode};
use futures_util::StreamExt;
use perch_protocol::subjects::{self, TRUST_BUCKET};
use perch_protocol::trust::MAX_TRUST_FILE_LEN;
use perch_support::durable::read_bounded;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::trust_store;

/// Follows the pushed trust document for as long as the agent runs.
/// `engine` is the deploy engine's turn: an update waits for an install to
/// end, so that an install never reads trust.doc before an update and the
/// records after it (a false refusal, and its revision marked handled).
pub async fn follow(
    client: Client,
    trust_path: PathBuf,
    state_dir: PathBuf,
    resync: Duration,
    engine: Arc<Mutex<()>>,
) {
    let mut sub = match client.subscribe(subjects::trust_doc()).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("trust push: not watching {} ({e}); reading it every resync", subjects::trust_doc());
            None
        }
    };
    // The last value refused, so a refusal is logged once, not every resync;
    // it is still tried each time (a later `trust update` may make it follow).
    let mut refused: Option<[u8; 32]> = None;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pushed = tokio::select! {
            _ = tick.tick() => match read(&client).await {
                Ok(v) => v,
                Err(e) => {
                    debug!("trust push: {e}");
                    continue;
                }
            },
            Some(msg) = next(&mut sub) => (!is_delete(&msg)).then(|| msg.payload.to_vec()),
        };
        let Some(bytes) = pushed else { continue };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let _turn = engine.lock().await;
        match apply(&trust_path, &state_dir, &bytes) {
            Err(e) if refused != Some(digest) => {
                warn!("trust push refused: {e}");
                refused = Some(digest);
            }
            Err(_) => {}
            Ok(()) => refused = None,
        }
    }
}

async fn next(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn is_delete(msg: &async_nats::Message) -> bool {
    let op = msg.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str());
    op.is_some_and(|v| v == "DEL" || v == "PURGE")
}

/// The pushed document, if there is one.
async fn read(client: &Client) -> Result<Option<Vec<u8>>, String> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err("not connected".into());
    }
    let api = format!("$JS.API.DIRECT.GET.KV_{TRUST_BUCKET}.{}", subjects::trust_doc());
    let msg = client.request(api, Default::default()).await.map_err(|e| e.to_string())?;
    if msg.status == Some(StatusCode::NOT_FOUND) || is_delete(&msg) {
        return Ok(None);
    }
    if msg.status.is_some_and(|s| s != StatusCode::OK) {
        return Err(format!("status {:?}", msg.status));
    }
    Ok(Some(msg.payload.to_vec()))
}

/// Installs `bytes` if the trust records allow it; why not, if not.
fn apply(trust_path: &Path, state_dir: &Path, bytes: &[u8]) -> Result<(), trust_store::TrustStoreError> {
    // Already installed (every start reads the key): nothing to write.
    if read_bounded(trust_path, MAX_TRUST_FILE_LEN).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    let from = Path::new("the pushed trust document");
    let c = trust_store::update_bytes(trust_path, from, bytes, state_dir, perch_support::now_unix())?;
    for w in &c.warnings {
        warn!("{w}");
    }
    let b = c.trust.body();
    info!(version = b.version, org = %b.org, "trust document from the fleet is the accepted one");
    Ok(())
}
