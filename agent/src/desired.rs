//! Following the desired state: the JetStream KV bucket `PERCH_DESIRED`,
//! keys `device.<id>` and `group.<g>` (the device's own key beats its
//! groups'). A desired bundle the device does not run yet is fetched from
//! `PERCH_CHUNKS` and installed by the deploy engine.
//!
//! The keys are read in full every `fetch.resync` with direct gets (the
//! only JetStream calls a device's grant allows for them), so a change made
//! while the device was offline, or across a server restart, is seen on the
//! first read after the link returns. A bundle that failed or rolled back
//! is not tried again until the desired state names another one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::{Client, StatusCode};
use perch_protocol::report::{Lane, ReportKind};
use perch_protocol::subjects::{self, DESIRED_BUCKET};
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::Config;
use crate::deploy::{Engine, EngineEvent, Finished};
use crate::fetch::{ChunkSource, FetchSettings};
use crate::journal::{DeployState, JournalStore, Outcome};
use crate::reports::Reporter;

/// The value of a desired-state key (JSON).
#[derive(Debug, Clone, Deserialize)]
pub struct Desired {
    /// The bundle digest (hex), as `perch bundle inspect` shows it.
    pub bundle: String,
}

/// Reads the desired bundle digest for `device` in `groups`.
pub async fn read(client: &Client, device: &str, groups: &[String]) -> Result<Option<[u8; 32]>, String> {
    let mut keys = vec![subjects::desired_device_key(device)];
    keys.extend(groups.iter().map(|g| subjects::desired_group_key(g)));
    for key in keys {
        let api = format!("$JS.API.DIRECT.GET.KV_{DESIRED_BUCKET}.$KV.{DESIRED_BUCKET}.{key}");
        let msg = client.request(api, Default::default()).await.map_err(|e| format!("{key}: {e}"))?;
        if msg.status == Some(StatusCode::NOT_FOUND) {
            continue;
        }
        if msg.status.is_some_and(|s| s != StatusCode::OK) {
            return Err(format!("{key}: status {:?}", msg.status));
        }
        // A deleted key reads as a marker with no value.
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
        if deleted {
            continue;
        }
        let d: Desired =
            serde_json::from_slice(&msg.payload).map_err(|e| format!("{key}: not a desired state: {e}"))?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(d.bundle.trim(), &mut digest)
            .map_err(|_| format!("{key}: bundle is not a digest"))?;
        return Ok(Some(digest));
    }
    Ok(None)
}

/// Follows the desired state for as long as the agent runs.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    client: Client,
    cfg: Config,
    state_dir: PathBuf,
    device: String,
    groups: Vec<String>,
    engine: Arc<Mutex<()>>,
    reporter: Option<Reporter>,
    link_backoff: std::time::Duration,
) {
    let mut handled: Option<[u8; 32]> = None;
    let mut tick = tokio::time::interval(cfg.fetch.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        let digest = match read(&client, &device, &groups).await {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                warn!("desired state: {e}");
                continue;
            }
        };
        if handled == Some(digest) || gave_up_on(&state_dir, &digest) {
            continue;
        }
        info!(bundle = %hex::encode(&digest[..8]), "desired state names a new bundle; fetching it");
        let _turn = engine.lock().await;
        let settings = FetchSettings {
            window: cfg.fetch.window,
            budget: cfg.fetch.budget,
            max_backoff: link_backoff,
            // An answer lost with a dropped link is never coming: ask again
            // as soon as the link could have been noticed dead and back.
            request_timeout: cfg.link.ping_interval.saturating_mul(2).max(std::time::Duration::from_secs(1)),
        };
        let outcome =
            install(client.clone(), cfg.clone(), state_dir.clone(), digest, settings, reporter.clone()).await;
        handled = Some(digest);
        match outcome {
            Ok(f) => info!(bundle = %hex::encode(&digest[..8]), "deploy: {f}"),
            Err(e) => {
                warn!(bundle = %hex::encode(&digest[..8]), "deploy failed: {e}");
                // The engine reports every state it reaches; this is for a
                // failure before it got the bundle at all (no head, say).
                if let Some(r) = &reporter {
                    let kind = ReportKind::Deploy { state: "Failed".into(), reason: Some(e) };
                    if let Err(e) = r.queue(Lane::Events, kind) {
                        warn!("deploy report not queued: {e}");
                    }
                }
            }
        }
    }
}

/// Why a deploy state came about, for the report.
fn reason_of(s: &DeployState) -> Option<String> {
    match s {
        DeployState::Failed { reason, .. } => Some(reason.clone()),
        DeployState::RollingBack { reason, .. } | DeployState::RolledBack { reason, .. } => {
            Some(reason.to_string())
        }
        _ => None,
    }
}

/// Whether the journal's last outcome is a failure or rollback of `digest`.
fn gave_up_on(state_dir: &Path, digest: &[u8; 32]) -> bool {
    let Ok(j) = JournalStore::new(state_dir).load() else { return false };
    j.last.as_ref().is_some_and(|l| {
        l.bundle.as_ref().is_some_and(|b| b.digest == *digest)
            && matches!(l.outcome, Outcome::Failed(_) | Outcome::RolledBack(_))
    })
}

/// Fetches and installs `digest` on a blocking thread; the state reached.
async fn install(
    client: Client,
    cfg: Config,
    state_dir: PathBuf,
    digest: [u8; 32],
    settings: FetchSettings,
    reporter: Option<Reporter>,
) -> Result<String, String> {
    let rt = tokio::runtime::Handle::current();
    let joined = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let (mut engine, problem) = Engine::open(cfg, &state_dir).map_err(|e| e.to_string())?;
        if let Some(p) = problem {
            warn!("{p}; moved aside, kept the running slot and started a fresh journal");
        }
        if let Some(r) = reporter {
            engine.observe(move |ev| {
                let (lane, kind) = match ev {
                    EngineEvent::State(s) => {
                        (Lane::Events, ReportKind::Deploy { state: s.name().into(), reason: reason_of(s) })
                    }
                    EngineEvent::Progress { done, count } => {
                        (Lane::Telemetry, ReportKind::Progress { chunks_done: done, chunk_count: count })
                    }
                };
                if let Err(e) = r.queue(lane, kind) {
                    warn!("deploy report not queued: {e}");
                }
            });
        }
        let source = ChunkSource::open(rt, client, digest, settings).map_err(|e| e.to_string())?;
        let label = PathBuf::from(format!("nats:{}", subjects::chunk(&digest, None)));
        let f = engine.install_from(source, &label).map_err(|e| format!("{e:#}"))?;
        Ok(match f {
            Finished::Committed(_) => "Committed".into(),
            Finished::RolledBack(_, r) => format!("RolledBack: {r}"),
            Finished::AwaitingReboot(s) => format!("AwaitingReboot into slot {s}"),
            Finished::AlreadyRunning(_) => "AlreadyRunning".into(),
            Finished::Idle | Finished::NeedsBundle(_) => engine.journal.state.name().to_string(),
        })
    })
    .await;
    joined.map_err(|e| format!("install thread: {e}"))?
}
