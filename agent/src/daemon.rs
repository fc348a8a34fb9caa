//! What `perch-agent run` does besides finishing the journal's work: queue
//! reports from the start (with or without a link), enroll in the
//! background if it must, then keep the FLEET link and send the reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use perch_protocol::enroll::VerifiedEnrollment;
use perch_support::now_unix;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::enroll::{self, Plan};
use crate::identity::{self, Identity};
use crate::link::{self, LinkSettings};
use crate::outbox::{Outbox, OutboxConfig, Repair};
use crate::reports::{self, Reporter, SendSettings};

/// Runs until the process ends. `engine` is held by whoever uses the
/// deploy engine, so that only one install runs at a time; `reporter` (from
/// [`reporter`]) queues the reports. Returns once `stop` is notified and
/// the link has said goodbye.
pub async fn run(
    cfg: Config,
    state_dir: PathBuf,
    engine: Arc<tokio::sync::Mutex<()>>,
    reporter: Option<Reporter>,
    stop: Arc<tokio::sync::Notify>,
) {
    if let Some(r) = &reporter {
        tokio::spawn(reports::heartbeat_loop(r.clone(), cfg.reports.heartbeat));
        tokio::spawn(reports::journal_watch(r.clone(), engine.clone(), cfg.fetch.resync));
    }
    let Some(v) = enrolled(&cfg, &state_dir).await else {
        return stop.notified().await;
    };
    let key = match Identity::new(&state_dir).key() {
        Ok(k) => Arc::new(k),
        Err(e) => return error!("device key unusable: {e}"),
    };
    let (device, groups) = (v.credential.device_id.clone(), v.credential.groups.clone());
    let settings = LinkSettings {
        ping_interval: cfg.link.ping_interval,
        max_backoff: cfg.link.max_backoff,
        urls: cfg.link.urls.clone(),
    };
    let link = match link::start(v, key, &settings, &state_dir).await {
        Ok(l) => l,
        Err(e) => return error!("FLEET link: {e}"),
    };
    if let Some(r) = reporter.clone() {
        let send = SendSettings { ack_window: cfg.reports.ack_window, ack_timeout: cfg.reports.ack_timeout };
        tokio::spawn(reports::send_loop(link.client.clone(), r, send));
    }
    tokio::spawn(crate::trust_update::follow(
        link.client.clone(),
        cfg.trust.clone(),
        state_dir.clone(),
        cfg.fetch.resync,
        engine.clone(),
    ));
    tokio::spawn(crate::desired::follow(
        link.client.clone(),
        cfg,
        state_dir,
        device,
        groups,
        engine,
        reporter,
        link.connected.clone(),
    ));
    link.watch(stop).await;
}

/// The device's reporter, or None (logged) if its outbox cannot be opened:
/// the agent still deploys, it only cannot tell anyone.
pub fn reporter(cfg: &Config, state_dir: &Path) -> Option<Reporter> {
    match open_reporter(cfg, state_dir) {
        Ok(r) => Some(r),
        Err(e) => {
            error!("reports are off: {e}");
            None
        }
    }
}

fn open_reporter(cfg: &Config, state_dir: &Path) -> Result<Reporter, String> {
    let device = identity::device_id(cfg, None).map_err(|e| e.to_string())?;
    let boot_id = std::fs::read_to_string(&cfg.boot_id).map(|s| s.trim().to_string()).unwrap_or_default();
    let ocfg = OutboxConfig { telemetry_budget: cfg.reports.telemetry_budget, ..OutboxConfig::default() };
    let (outbox, repairs) = Outbox::open(state_dir, ocfg).map_err(|e| e.to_string())?;
    for r in repairs {
        match r {
            Repair::Cut { file, bytes } => {
                warn!(file = %file.display(), bytes, "outbox: cut off a torn record (power loss mid-write)")
            }
            Repair::Corrupt { file, records, bytes } => warn!(
                file = %file.display(),
                records,
                bytes,
                "outbox: skipped corrupt records (damaged storage, not a power loss); later ones kept, their sequence numbers stay a gap"
            ),
            Repair::NewEpoch { file, why } => {
                warn!(file = %file.display(), why, "outbox: epoch unreadable; reports count from a new one")
            }
            Repair::MovedAside { file, to, why } => warn!(
                file = %file.display(),
                to = %to.display(),
                why,
                "outbox: not a file the agent writes; moved aside, not read"
            ),
        }
    }
    let reporter = Reporter::new(outbox, &device, &boot_id, state_dir, cfg.slots.clone());
    let (n, bytes) = reporter.backlog();
    if n > 0 {
        info!(records = n, bytes, "outbox: reports waiting from before");
    }
    Ok(reporter)
}

/// The stored enrollment, or a background enrollment with the configured
/// token. None: the agent works offline.
async fn enrolled(cfg: &Config, state_dir: &Path) -> Option<VerifiedEnrollment> {
    match Identity::new(state_dir).enrollment(cfg, now_unix()) {
        Ok(Some(v)) => return Some(v),
        Ok(None) => {}
        Err(e) => {
            error!("stored enrollment unusable: {e}");
            return None;
        }
    }
    let Some(file) = &cfg.enroll.token_file else {
        info!("not enrolled and no enroll.token_file: working offline (local installs only)");
        return None;
    };
    let token = match perch_support::durable::read_bounded(file, perch_protocol::token::MAX_TOKEN_TEXT + 64) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => {
            error!("cannot enroll: {e}");
            return None;
        }
    };
    let plan = match identity::device_id(cfg, None) {
        Ok(device_id) => Plan {
            device_id,
            groups: cfg.enroll.groups.clone(),
            target: cfg.target.clone(),
            wait: true,
            timeout: Duration::MAX,
            max_backoff: cfg.enroll.max_backoff,
        },
        Err(e) => {
            error!("cannot enroll: {e}");
            return None;
        }
    };
    match enroll::online(cfg, state_dir, &token, &plan).await {
        Ok(v) => Some(v),
        Err(e) => {
            error!("enrollment stopped: {e}");
            None
        }
    }
}
