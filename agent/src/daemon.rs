//! `perch-agent run`: the daemon. It finishes whatever the deploy journal
//! says was in flight, and meanwhile queues reports from the start (with or
//! without a link), enrolls in the background if it must, then keeps the
//! FLEET link and sends the reports, until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use perch_protocol::enroll::VerifiedEnrollment;
use perch_support::exit::{Class, Classify};
use perch_support::now_unix;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::deploy::{DeployError, Engine};
use crate::enroll::{self, Plan};
use crate::identity::{self, Identity};
use crate::link::{self, LinkSettings};
use crate::outbox::{Outbox, OutboxConfig, Repair};
use crate::reports::{self, Reporter, SendSettings};
use crate::service::Notifier;

/// Why the daemon could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error("the deploy engine stopped: {0}")]
    EngineStopped(String),
}

impl Classify for DaemonError {
    fn class(&self) -> Option<Class> {
        match self {
            // Transparent: their chain skips this type, so they are asked here.
            DaemonError::Config(e) => e.class(),
            DaemonError::Deploy(e) => e.class(),
            DaemonError::Runtime(_) | DaemonError::EngineStopped(_) => Some(Class::Runtime),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT. Logs go to stderr; systemd
/// (`NOTIFY_SOCKET`, `WATCHDOG_USEC`) is told of readiness at once.
pub fn serve(config_path: &Path, state_dir: &Path) -> Result<(), DaemonError> {
    perch_net::init_logging(tracing::Level::INFO);
    let cfg = Config::load(config_path)?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    rt.block_on(serve_async(cfg, config_path.to_path_buf(), state_dir.to_path_buf()))
}

async fn serve_async(cfg: Config, config_path: PathBuf, state_dir: PathBuf) -> Result<(), DaemonError> {
    // The link (enrolling first if need be) runs while the engine finishes
    // whatever the journal says is in flight; new installs wait for it.
    let engine_turn = Arc::new(tokio::sync::Mutex::new(()));
    let turn = engine_turn.clone().lock_owned().await;
    let stop = Arc::new(tokio::sync::Notify::new());
    let reporter = reporter(&cfg, &state_dir);
    // Before any engine runs: what the journal holds now was reported when
    // it happened, or happened while no agent ran.
    if let Some(r) = &reporter {
        r.baseline();
    }
    let observer = reporter.clone().map(reports::engine_observer);
    // Before the engine resumes: a trial it commits now is news for Choria.
    crate::announce::baseline(&state_dir);
    let link = tokio::spawn(run(cfg, state_dir.clone(), engine_turn, reporter, stop.clone()));
    // Ready at once (the agent is up and answers signals): a resumed install
    // at boot may take longer than any start timeout. The watchdog is pinged
    // from the runtime while the engine works on its own thread.
    let notifier = Notifier::from_env().map(Arc::new);
    if let Some(n) = &notifier {
        n.ready("finishing the deploy journal's work");
        if let Some(every) = crate::service::watchdog_interval() {
            let n = n.clone();
            tokio::spawn(async move {
                loop {
                    n.watchdog();
                    tokio::time::sleep(every).await;
                }
            });
        }
    }
    let resumed = tokio::task::spawn_blocking(move || -> Result<&'static str, DaemonError> {
        let _turn = turn;
        // The engine is not Send: it lives on this thread only.
        let (mut engine, problem) = open_waiting(&config_path, &state_dir)?;
        for line in problem.iter().flat_map(|r| &r.0) {
            warn!("{line}");
        }
        // What the engine finishes now (a trial after a reboot, a
        // bootloader fallback) is reported like any deploy.
        if let Some(o) = observer {
            engine.observe(o);
        }
        let f = engine.resume()?;
        // On stdout as `run --once` prints it: how the journal's work ended.
        println!("{}", crate::status::finished_text(&engine.journal.state, &f));
        Ok(engine.journal.state.name())
    })
    .await;
    let state = resumed.map_err(|e| DaemonError::EngineStopped(e.to_string()))??;
    if let Some(n) = &notifier {
        n.status(&format!("deploy {state}"));
    }
    let signal = shutdown_signal().await;
    info!("{signal}: stopping");
    if let Some(n) = &notifier {
        n.stopping();
    }
    stop.notify_one();
    // A goodbye on the link if it is up; never long.
    let _ = tokio::time::timeout(Duration::from_secs(3), link).await;
    Ok(())
}

/// The daemon's engine at startup: a local command (a technician's
/// `install`) may hold it for a while; wait for it rather than fail.
fn open_waiting(
    config: &Path,
    state_dir: &Path,
) -> Result<(Engine, Option<crate::recovery::Recovered>), DaemonError> {
    let mut told = false;
    loop {
        match Engine::open(Config::load(config)?, state_dir) {
            Err(DeployError::Lock(l)) if l.is_held() => {
                if !told {
                    warn!("{l}; waiting for it");
                    told = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return Ok(other?),
        }
    }
}

/// Waits for SIGTERM (the service manager) or SIGINT; which one.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // No signal handling: run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The link side: runs until `stop`. `engine` is held by whoever uses the
/// deploy engine, so that only one install runs at a time; `reporter` (from
/// [`reporter`]) queues the reports. Returns once `stop` is notified and
/// the link has said goodbye.
async fn run(
    cfg: Config,
    state_dir: PathBuf,
    engine: Arc<tokio::sync::Mutex<()>>,
    reporter: Option<Reporter>,
    stop: Arc<tokio::sync::Notify>,
) {
    if let Some(r) = &reporter {
        tokio::spawn(reports::heartbeat_loop(r.clone(), cfg.reports.heartbeat));
        // A technician's install next to the daemon reaches the fleet within
        // seconds, not on the next desired-state resync (30 s by default).
        let every = cfg.fetch.resync.min(reports::JOURNAL_WATCH_EVERY);
        tokio::spawn(reports::journal_watch(r.clone(), engine.clone(), every));
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
        alive_every: cfg.reports.heartbeat,
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
fn reporter(cfg: &Config, state_dir: &Path) -> Option<Reporter> {
    match open_reporter(cfg, state_dir) {
        Ok(r) => Some(r),
        Err(e) => {
            error!("reports are off: {e}");
            None
        }
    }
}

fn open_reporter(cfg: &Config, state_dir: &Path) -> Result<Reporter, String> {
    let device = identity::reporting_id(cfg, state_dir).map_err(|e| e.to_string())?;
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
