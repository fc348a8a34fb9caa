//! Simulated devices, for `cargo xtask bench fleet` and the fleet-scale
//! test: thousands in one process, each on its own NATS connection with
//! its own credentials, running the agent's own code with no slots:
//!
//! - enrollment: [`perch_agent::enroll::online`] with a token, through the
//!   real provisioner;
//! - the FLEET link: [`perch_agent::link::start`] (hello on every connect);
//! - reports: the agent's [`Outbox`] (in a state directory per device, on
//!   tmpfs where the machine has one), [`Reporter`], `send_loop` and
//!   `heartbeat_loop`;
//! - desired state: [`perch_agent::desired::follow_with`], the agent's own
//!   follower (live key subscriptions, direct gets, one record per intent);
//! - bundles: [`ChunkSource`], the agent's fetcher, which fetches and checks
//!   the head and then as much of the payload as [`SimSettings::chunk_share`]
//!   says (so 10,000 devices do not move 10,000 bundles over loopback).
//!
//! What is simulated is only the slot: an install "runs" the bundle by
//! reporting the states the deploy engine reports (staging … committed),
//! or, for the devices told to fail it, a trial that rolls back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use perch_agent::config::Config;
use perch_agent::desired::{self, Deployer, Entry, Follow, Waiting};
use perch_agent::fetch::{ChunkSource, FetchSettings, OpenError};
use perch_agent::link::{self, LinkSettings};
use perch_agent::outbox::{Outbox, OutboxConfig};
use perch_agent::reports::{self, DeviceState, Reporter, SendSettings};
use perch_protocol::enroll::VerifiedEnrollment;
use perch_protocol::report::{BundleInfo, Lane, ReportKind};
use tokio::sync::{mpsc, Notify};

/// How every simulated device behaves.
#[derive(Clone)]
pub struct SimSettings {
    /// The agent configuration each device runs with (link, reports, fetch
    /// settings; its slots are never used).
    pub agent: Config,
    /// Each device's state directory is `root/<id>`.
    pub root: PathBuf,
    /// Share of each bundle's payload a device fetches (0.0 to 1.0); the
    /// head is always fetched and checked.
    pub chunk_share: f64,
    /// How long a simulated trial lasts.
    pub trial: Duration,
    /// Devices that roll back a bundle in their trial: (bundle digest, ids).
    pub fail: Option<([u8; 32], Arc<std::collections::BTreeSet<String>>)>,
}

/// What the simulated devices tell the harness.
#[derive(Debug, Clone)]
pub enum Event {
    /// The device read a new desired state (its follower acted on it).
    Noticed { device: String, key: String, revision: u64, at_ms: u64 },
    /// An install ended: committed, or rolled back.
    Ended { device: String, digest: [u8; 32], committed: bool, at_ms: u64 },
    /// An install could not run (the bundle is not there, say).
    Failed { device: String, reason: String },
}

/// Milliseconds since the Unix epoch: the harness compares them with the
/// time it wrote the desired state, on the same machine.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The agent configuration a simulated fleet runs: `extra` is appended
/// (`[reports]`, `[fetch]` tables).
pub fn agent_config(root: &std::path::Path, extra: &str) -> Result<Config, String> {
    let text = format!(
        "target = \"sim\"\ntrust = \"{}\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n{extra}",
        root.join("no-trust.json").display(),
        root.join("no-slots").display()
    );
    Config::parse(&text, "sim.toml").map_err(|e| e.to_string())
}

/// Enrolls device `id` with `token` through the provisioner, as the agent
/// does, into `root/<id>`.
pub async fn enroll(
    s: &SimSettings,
    token: &str,
    id: &str,
    group: &str,
) -> Result<VerifiedEnrollment, String> {
    let dir = s.root.join(id);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let plan = perch_agent::enroll::Plan {
        device_id: id.into(),
        groups: vec![group.into()],
        target: "sim".into(),
        wait: false,
        timeout: Duration::from_secs(120),
        max_backoff: Duration::from_secs(5),
    };
    perch_agent::enroll::online(&s.agent, &dir, token, &plan).await.map_err(|e| format!("{id}: {e}"))
}

/// A running simulated device.
pub struct SimDevice {
    pub id: String,
    pub client: Client,
    reporter: Reporter,
    stop: Arc<Notify>,
}

impl SimDevice {
    /// Reports waiting in the outbox (0 once JetStream acked them all).
    pub fn backlog(&self) -> usize {
        self.reporter.backlog().0
    }

    /// The highest report sequence number this device has queued.
    pub fn last_seq(&self) -> u64 {
        self.reporter.last_seq()
    }

    /// Queues one heartbeat now.
    pub fn heartbeat(&self) -> Result<(), String> {
        self.reporter.queue(Lane::Telemetry, ReportKind::Heartbeat).map(drop).map_err(|e| e.to_string())
    }

    pub fn stop(&self) {
        self.stop.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a simulated device runs: its journal state and bundle, as its
/// reports say.
#[derive(Default)]
struct Slot {
    journal: String,
    running: Option<BundleInfo>,
    /// The bundle the journal state is about.
    about: Option<[u8; 32]>,
}

/// Starts an enrolled device: link, reports, heartbeats, desired state.
pub async fn start(
    s: &SimSettings,
    v: VerifiedEnrollment,
    events: mpsc::UnboundedSender<Event>,
) -> Result<SimDevice, String> {
    let id = v.credential.device_id.clone();
    let groups = v.credential.groups.clone();
    let dir = s.root.join(&id);
    let key = perch_agent::identity::Identity::new(&dir).key().map_err(|e| format!("{id}: {e}"))?;
    let cfg = &s.agent;
    let ocfg = OutboxConfig { telemetry_budget: cfg.reports.telemetry_budget, ..OutboxConfig::default() };
    let (outbox, _) = Outbox::open(&dir, ocfg).map_err(|e| format!("{id}: outbox: {e}"))?;
    let slot = Arc::new(Mutex::new(Slot { journal: "idle".into(), ..Slot::default() }));
    let state = {
        let slot = slot.clone();
        Arc::new(move || -> DeviceState {
            let s = lock(&slot);
            (s.journal.clone(), Some("a".into()), s.running.clone())
        })
    };
    let reporter = Reporter::with_state(outbox, &id, "sim-boot", &dir, state);
    let settings = LinkSettings {
        ping_interval: cfg.link.ping_interval,
        max_backoff: cfg.link.max_backoff,
        alive_every: cfg.reports.heartbeat,
        urls: cfg.link.urls.clone(),
    };
    let link =
        link::start(v, Arc::new(key), &settings, &dir).await.map_err(|e| format!("{id}: link: {e}"))?;
    let client = link.client.clone();
    let connected = link.connected.clone();
    let stop = Arc::new(Notify::new());
    tokio::spawn(link.watch(stop.clone()));
    let send = SendSettings { ack_window: cfg.reports.ack_window, ack_timeout: cfg.reports.ack_timeout };
    tokio::spawn(reports::send_loop(client.clone(), reporter.clone(), send));
    tokio::spawn(reports::heartbeat_loop(reporter.clone(), cfg.reports.heartbeat));
    let deployer = SimDeployer {
        client: client.clone(),
        settings: s.clone(),
        r: Reach { id: id.clone(), reporter: reporter.clone(), slot, events },
    };
    let follow = Follow {
        client: client.clone(),
        state_dir: dir,
        device: id.clone(),
        groups,
        resync: cfg.fetch.resync,
        reporter: Some(reporter.clone()),
        connected,
    };
    tokio::spawn(desired::follow_with(follow, deployer));
    Ok(SimDevice { id, client, reporter, stop })
}

/// Installs by fetching (a share of) the bundle and reporting the engine's
/// states; the slot itself is simulated.
struct SimDeployer {
    client: Client,
    settings: SimSettings,
    r: Reach,
}

/// What reaching a state touches: the simulated slot and the reports.
#[derive(Clone)]
struct Reach {
    id: String,
    reporter: Reporter,
    slot: Arc<Mutex<Slot>>,
    events: mpsc::UnboundedSender<Event>,
}

impl Reach {
    /// Sets the journal state and reports it, as the engine's observer does.
    fn state(&self, state: &str, digest: [u8; 32], reason: Option<&str>, runs: Option<BundleInfo>) {
        {
            let mut s = lock(&self.slot);
            s.journal = state.into();
            s.about = Some(digest);
            if let Some(b) = runs {
                s.running = Some(b);
            }
        }
        let kind = ReportKind::Deploy {
            state: state.into(),
            reason: reason.map(String::from),
            bundle: Some(digest),
        };
        if let Err(e) = self.reporter.queue(Lane::Events, kind) {
            self.event(Event::Failed { device: self.id.clone(), reason: e.to_string() });
        }
    }

    fn event(&self, e: Event) {
        let _ = self.events.send(e);
    }
}

/// Why a fetch did not give a bundle.
enum FetchFailure {
    NotHere(String),
    Failed(String),
}

impl SimDeployer {
    /// Fetches and checks the head (then reports `staging`, as the engine
    /// does once it has one) and a share of the payload; the bundle's name,
    /// counter and version.
    async fn fetch(&self, digest: [u8; 32]) -> Result<BundleInfo, FetchFailure> {
        let (client, share, r) = (self.client.clone(), self.settings.chunk_share, self.r.clone());
        // A chunk's answer lost on loopback means a simulator process too
        // busy to read its sockets (the server drops a slow consumer's
        // messages): asked again after 5 s, not the agent's 60 s backstop
        // for slow radio links, so a lost answer does not hold a wave for
        // a minute that a real device would not lose.
        let settings = FetchSettings {
            window: self.settings.agent.fetch.window,
            request_timeout: Duration::from_secs(5),
            ..FetchSettings::default()
        };
        let rt = tokio::runtime::Handle::current();
        let fetched = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let failed = |e: String| FetchFailure::Failed(e);
            let mut source = ChunkSource::open(rt, client, digest, settings).map_err(|e| match e {
                OpenError::NotHere(_) => FetchFailure::NotHere(e.to_string()),
                e => FetchFailure::Failed(e.to_string()),
            })?;
            r.state("staging", digest, None, None);
            let head_len = source.head().len() as u64;
            let reader = perch_protocol::bundle::BundleReader::open(source.head())
                .map_err(|e| failed(e.to_string()))?;
            let m = reader.head().unverified_manifest();
            let info =
                BundleInfo { name: m.name.clone(), counter: m.counter, version: m.version.clone(), digest };
            let payload = source.file_len() - head_len;
            let mut left = head_len + (payload as f64 * share.clamp(0.0, 1.0)) as u64;
            let mut sink = vec![0u8; 64 << 10];
            while left > 0 {
                let n = source
                    .read(&mut sink[..left.min(64 << 10) as usize])
                    .map_err(|e| failed(e.to_string()))?;
                if n == 0 {
                    break;
                }
                left -= n as u64;
            }
            Ok(info)
        })
        .await;
        fetched.map_err(|e| FetchFailure::Failed(format!("fetch thread: {e}")))?
    }
}

impl Deployer for SimDeployer {
    fn is_switching(&self) -> bool {
        matches!(lock(&self.r.slot).journal.as_str(), "activating" | "trial" | "committing" | "rolling_back")
    }

    fn gave_up_on(&self, digest: &[u8; 32]) -> bool {
        let s = lock(&self.r.slot);
        matches!(s.journal.as_str(), "failed" | "rolled_back") && s.about == Some(*digest)
    }

    fn deploy(&self, entry: &Entry) -> impl std::future::Future<Output = Option<Waiting>> + Send {
        let entry = entry.clone();
        async move {
            let (digest, r) = (entry.bundle, &self.r);
            let (key, revision) = (entry.key.clone(), entry.revision);
            r.event(Event::Noticed { device: r.id.clone(), key, revision, at_ms: now_ms() });
            if lock(&r.slot).running.as_ref().is_some_and(|b| b.digest == digest) {
                return None;
            }
            let info = match self.fetch(digest).await {
                Ok(i) => i,
                Err(FetchFailure::NotHere(why)) => return Some(Waiting::NotHere(why)),
                Err(FetchFailure::Failed(e)) => {
                    r.state("failed", digest, Some(&e), None);
                    r.event(Event::Failed { device: r.id.clone(), reason: e });
                    return None;
                }
            };
            for s in ["staged", "activating", "trial"] {
                r.state(s, digest, None, None);
            }
            tokio::time::sleep(self.settings.trial).await;
            let fails =
                self.settings.fail.as_ref().is_some_and(|(d, ids)| *d == digest && ids.contains(&r.id));
            if fails {
                let why = "health: simulated failure";
                r.state("rolling_back", digest, Some(why), None);
                r.state("rolled_back", digest, Some(why), None);
            } else {
                r.state("committing", digest, None, None);
                r.state("committed", digest, None, Some(info));
            }
            r.event(Event::Ended { device: r.id.clone(), digest, committed: !fails, at_ms: now_ms() });
            None
        }
    }
}
