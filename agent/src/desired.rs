//! Following the desired state: the JetStream KV bucket `PERCH_DESIRED`,
//! keys `device.<id>` and `group.<g>` (the device's own key beats its
//! groups'). A desired bundle the device does not run yet is fetched from
//! `PERCH_CHUNKS` and installed by the deploy engine.
//!
//! How changes are seen, without any consumer on the server:
//! - live: a plain subscription to the keys' subjects (`$KV.PERCH_DESIRED.
//!   <key>`); every put reaches the device the moment it is made;
//! - on every reconnect, and every `fetch.resync` as a safety net (KV
//!   watchers are known not to survive server restarts, nats.rs#1596):
//!   the keys are read with direct gets.
//!
//! A direct get is answered by whichever server holds a copy of the
//! bucket, and a copy may lag the put the device just heard: a read that
//! does not show a heard key newer than before is asked again for a few
//! seconds (measured at 10,000 devices: otherwise over 1% of them waited
//! for their resync).
//!
//! Each read yields the effective key and its revision (the stream
//! sequence). The last revision acted on is kept in `STATE/desired.json`,
//! so the agent resumes from it after a reconnect, a crash or a reboot: a
//! new revision of the same key is a new intent, the same one is not acted
//! on twice. A bundle that failed or rolled back is therefore not tried
//! again until its key is written again (re-putting the same bundle is how
//! an operator asks for a retry). Another key taking over with the bundle
//! already handled (a rollout clearing a device's key once its group's key
//! names the same bundle) is not a new intent: it is recorded, not
//! installed, so a device that failed the bundle does not retry it. The
//! revision is recorded only when a deploy has ended, so one cut short by
//! a crash resumes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::{Client, StatusCode};
use futures_util::StreamExt;
use perch_protocol::report::{Lane, ReportKind};
use perch_protocol::subjects::{self, DESIRED_BUCKET};
use perch_support::durable::{self, read_bounded, Replace};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::deploy::{DeployError, Engine, Finished};
use crate::fetch::{ChunkSource, FetchSettings, OpenError};
use crate::journal::{JournalStore, Outcome};
use crate::reports::Reporter;

/// The key in force for a device, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `device.<id>` or `group.<g>`.
    pub key: String,
    /// The key's revision: its message's sequence in the bucket's stream.
    pub revision: u64,
    pub bundle: [u8; 32],
}

/// The last desired state acted on; `STATE/desired.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handled {
    pub key: String,
    pub revision: u64,
    /// The bundle digest (hex), for the operator reading the file.
    pub bundle: String,
}

pub const HANDLED_FILE: &str = "desired.json";

impl Handled {
    fn of(e: &Entry) -> Self {
        Handled { key: e.key.clone(), revision: e.revision, bundle: hex::encode(e.bundle) }
    }

    fn is(&self, e: &Entry) -> bool {
        self.key == e.key && self.revision == e.revision
    }

    /// The same bundle, now named by another key.
    fn same_bundle_other_key(&self, e: &Entry) -> bool {
        self.key != e.key && self.bundle == hex::encode(e.bundle)
    }

    pub fn parse(bytes: &[u8]) -> Result<Handled, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a desired-state record: {e}"))
    }

    /// The record in `state_dir`; None if there is none or it is unreadable
    /// (then the journal's last outcome still keeps a failed bundle from
    /// being retried).
    pub fn load(state_dir: &Path) -> Option<Handled> {
        let path = state_dir.join(HANDLED_FILE);
        let bytes = match read_bounded(&path, 4096) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return None,
            Err(e) => {
                warn!("{e}; reading the desired state afresh");
                return None;
            }
        };
        Handled::parse(&bytes)
            .map_err(|e| warn!("{}: {e}; reading the desired state afresh", path.display()))
            .ok()
    }

    fn save(&self, state_dir: &Path) {
        let path = state_dir.join(HANDLED_FILE);
        let json = serde_json::to_vec(self).unwrap_or_default();
        if let Err(e) = durable::write_bytes(&path, 0o644, Replace::Allow, &json) {
            warn!("{e}: the desired state may be acted on again after a restart");
        }
    }
}

/// What to do with the desired state just read.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Nothing,
    /// Seen before (a failed or rolled-back bundle): record, do not retry.
    Record,
    Install,
}

fn decide(handled: Option<&Handled>, entry: Option<&Entry>, gave_up: impl Fn(&[u8; 32]) -> bool) -> Decision {
    let Some(e) = entry else { return Decision::Nothing };
    match handled {
        Some(h) if h.is(e) => Decision::Nothing,
        Some(h) if h.same_bundle_other_key(e) => Decision::Record,
        // Nothing recorded (first run, or a lost record): the journal still
        // knows whether this bundle failed here.
        None if gave_up(&e.bundle) => Decision::Record,
        _ => Decision::Install,
    }
}

/// The subject a desired-state key is stored under.
fn key_subject(key: &str) -> String {
    format!("$KV.{DESIRED_BUCKET}.{key}")
}

/// The desired-state keys of a device, strongest first.
fn keys(device: &str, groups: &[String]) -> Vec<String> {
    let mut keys = vec![subjects::desired_device_key(device)];
    keys.extend(groups.iter().map(|g| subjects::desired_group_key(g)));
    keys
}

/// One key as read: the revision of its last message (a put, or the
/// marker of a delete), None if it was never written; and the bundle it
/// names, if it holds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRead {
    pub key: String,
    pub revision: Option<u64>,
    pub bundle: Option<[u8; 32]>,
}

/// The keys of a device as read at once, strongest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reads(pub Vec<KeyRead>);

impl Reads {
    /// The desired state in force: the strongest key that holds a value.
    pub fn effective(&self) -> Option<Entry> {
        self.0.iter().find_map(|k| match (k.revision, k.bundle) {
            (Some(revision), Some(bundle)) => Some(Entry { key: k.key.clone(), revision, bundle }),
            _ => None,
        })
    }

    fn revision(&self, key: &str) -> Option<u64> {
        self.0.iter().find(|k| k.key == key).and_then(|k| k.revision)
    }
}

/// Reads every key of `device` in `groups` at once (one round trip, not
/// one per key, when 10,000 devices wake to one put).
pub async fn read(client: &Client, device: &str, groups: &[String]) -> Result<Reads, String> {
    let answers =
        futures_util::future::join_all(keys(device, groups).into_iter().map(|key| read_key(client, key)))
            .await;
    answers.into_iter().collect::<Result<Vec<_>, _>>().map(Reads)
}

/// One key's last message; see [`KeyRead`].
async fn read_key(client: &Client, key: String) -> Result<KeyRead, String> {
    let api = format!("$JS.API.DIRECT.GET.KV_{DESIRED_BUCKET}.{}", key_subject(&key));
    let msg = client.request(api, Default::default()).await.map_err(|e| format!("{key}: {e}"))?;
    if msg.status == Some(StatusCode::NOT_FOUND) {
        return Ok(KeyRead { key, revision: None, bundle: None });
    }
    if msg.status.is_some_and(|s| s != StatusCode::OK) {
        return Err(format!("{key}: status {:?}", msg.status));
    }
    let headers = msg.headers.as_ref();
    // (A standard header: looked up by its constant, not its text.)
    let revision = headers
        .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
        .map(|v| v.as_str())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| format!("{key}: the answer has no Nats-Sequence"))?;
    // A deleted key reads as a marker with no value.
    let op = headers.and_then(|h| h.get("KV-Operation")).map(|v| v.as_str());
    if op.is_some_and(|v| v == "DEL" || v == "PURGE") {
        return Ok(KeyRead { key, revision: Some(revision), bundle: None });
    }
    let bundle = perch_protocol::desired::decode(&msg.payload).map_err(|e| format!("{key}: {e}"))?;
    Ok(KeyRead { key, revision: Some(revision), bundle: Some(bundle) })
}

/// The keys whose change was heard since the last read. A direct get is
/// answered by any server holding a copy of the bucket, and a copy may
/// not have stored a put that the device has already heard: a read that
/// gives a heard key no newer revision than before is asked again, for a
/// few seconds, instead of waiting for the next resync.
#[derive(Default)]
struct Heard(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl Heard {
    fn add(&self, key: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string());
    }

    fn take(&self) -> std::collections::BTreeSet<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How often a read that missed a heard change is asked again (at 0.1,
/// 0.2, 0.4, 0.8 and 1.6 s: a copy of the bucket a few seconds behind).
const STALE_TRIES: u32 = 5;

/// Whether `reads` shows every heard key newer than the revision read
/// before it was heard (`before`: None if the key had no message).
fn has_caught_up(reads: &Reads, heard: &[(String, Option<u64>)]) -> bool {
    heard.iter().all(|(key, before)| match (reads.revision(key), before) {
        (Some(now), Some(before)) => now > *before,
        (now, None) => now.is_some(),
        (None, Some(_)) => false,
    })
}

/// Reads the keys until every heard change shows (at most
/// [`STALE_TRIES`] more times); what the last read gave.
async fn read_fresh(
    client: &Client,
    device: &str,
    groups: &[String],
    heard: &[(String, Option<u64>)],
) -> Result<Reads, String> {
    let mut tries = 0;
    loop {
        let reads = read(client, device, groups).await?;
        if tries >= STALE_TRIES || has_caught_up(&reads, heard) {
            return Ok(reads);
        }
        debug!("desired state: a copy of the bucket has not stored the change heard yet; reading again");
        tokio::time::sleep(std::time::Duration::from_millis(100 << tries)).await;
        tries += 1;
    }
}

/// Wakes `wake` on every put or delete of one of the keys, noting the key
/// in `heard`, for as long as the client lives (the client re-subscribes
/// after a reconnect by itself).
async fn watch_keys(client: &Client, keys: &[String], wake: Arc<Notify>, heard: Arc<Heard>) {
    for key in keys {
        match client.subscribe(key_subject(key)).await {
            Ok(mut sub) => {
                let (wake, heard, key) = (wake.clone(), heard.clone(), key.clone());
                tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if is_change(&msg) {
                            heard.add(&key);
                        }
                        wake.notify_one();
                    }
                });
            }
            Err(e) => warn!("desired state: not watching {key} ({e}); reading it every resync"),
        }
    }
}

/// Whether a message on a key's subject is the put or delete itself (a
/// value, or a `KV-Operation` header), not a field site's wake-up (empty:
/// the key may not have changed, only its bundle arrived).
fn is_change(msg: &async_nats::Message) -> bool {
    !msg.payload.is_empty() || msg.headers.as_ref().is_some_and(|h| h.get("KV-Operation").is_some())
}

/// What the follower hands a new desired bundle to: the deploy engine
/// ([`EngineDeployer`]) in the agent, a simulated device in `cargo xtask
/// bench fleet` (which runs this follower, the link and the outbox
/// without slots).
pub trait Deployer: Send + Sync + 'static {
    /// Mid-switch (a trial or a rollback waiting for its reboot): a change
    /// is neither acted on nor recorded until the slot settles.
    fn is_switching(&self) -> bool;
    /// Whether the last outcome here is a failure or rollback of `digest`
    /// (keeps a failed bundle from looping when the record was lost).
    fn gave_up_on(&self, digest: &[u8; 32]) -> bool;
    /// Fetches and installs `entry`'s bundle, reporting every outcome.
    /// None once it has ended; why, if it could not start.
    fn deploy(&self, entry: &Entry) -> impl std::future::Future<Output = Option<Waiting>> + Send;
}

/// The follower's link and where it keeps its record.
pub struct Follow {
    pub client: Client,
    pub state_dir: PathBuf,
    pub device: String,
    pub groups: Vec<String>,
    /// How often the keys are read even with no change heard (`fetch.resync`).
    pub resync: std::time::Duration,
    pub reporter: Option<Reporter>,
    /// Notified on every (re)connect.
    pub connected: Arc<Notify>,
}

/// Follows the desired state for as long as the agent runs. `connected`
/// is notified on every (re)connect.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    client: Client,
    cfg: Config,
    state_dir: PathBuf,
    device: String,
    groups: Vec<String>,
    engine: Arc<Mutex<()>>,
    reporter: Option<Reporter>,
    connected: Arc<Notify>,
) {
    let resync = cfg.fetch.resync;
    let deployer = EngineDeployer {
        client: client.clone(),
        cfg,
        state_dir: state_dir.clone(),
        engine,
        reporter: reporter.clone(),
    };
    follow_with(Follow { client, state_dir, device, groups, resync, reporter, connected }, deployer).await
}

/// Follows the desired state, handing each new intent to `deployer`.
pub async fn follow_with<D: Deployer>(f: Follow, deployer: D) {
    let Follow { client, state_dir, device, groups, resync, reporter, connected } = f;
    let wake = connected;
    let heard = Arc::new(Heard::default());
    watch_keys(&client, &keys(&device, &groups), wake.clone(), heard.clone()).await;
    // Each key's revision at the last read.
    let mut last = Reads(vec![]);
    let mut handled = Handled::load(&state_dir);
    // The revision told to wait for a local command, so it is said once.
    let mut waiting = None;
    // Reads that failed in a row (their retries back off).
    let mut failed_reads = 0u32;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => debug!("desired state: change or reconnect"),
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        let changed: Vec<(String, Option<u64>)> = heard
            .take()
            .into_iter()
            .map(|k| {
                let before = last.revision(&k);
                (k, before)
            })
            .collect();
        let entry = match read_fresh(&client, &device, &groups, &changed).await {
            Ok(reads) => {
                failed_reads = 0;
                let e = reads.effective();
                last = reads;
                e
            }
            Err(e) => {
                // The changes heard are still to be seen.
                for (k, _) in &changed {
                    heard.add(k);
                }
                // Asked again soon (with jitter: a fleet that timed out
                // together must not ask again together), not at the next
                // resync: a change must not wait a resync for one lost answer.
                let pause = crate::enroll::backoff(failed_reads, std::time::Duration::from_secs(30));
                warn!("desired state: {e}; reading again in {}", perch_support::duration(pause));
                failed_reads = failed_reads.saturating_add(1);
                let wake = wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    wake.notify_one();
                });
                continue;
            }
        };
        let Some(entry) = entry else { continue };
        if deployer.is_switching() {
            continue;
        }
        match decide(handled.as_ref(), Some(&entry), |d| deployer.gave_up_on(d)) {
            Decision::Nothing => continue,
            Decision::Record => {}
            Decision::Install => {
                if let Some(why) = deployer.deploy(&entry).await {
                    // Not acted on: the next resync or change tries again.
                    if waiting != Some(entry.revision) {
                        warn!("desired state waits: {}", why.reason());
                        if let (Waiting::NotHere(reason), Some(r)) = (&why, &reporter) {
                            // Said once per revision, so the fleet sees why
                            // the device has not started (a rollout waits).
                            let kind = ReportKind::Deploy {
                                state: "waiting".into(),
                                reason: Some(reason.clone()),
                                bundle: Some(entry.bundle),
                            };
                            if let Err(e) = r.queue(Lane::Events, kind) {
                                warn!("waiting report not queued: {e}");
                            }
                        }
                        waiting = Some(entry.revision);
                    }
                    continue;
                }
            }
        }
        let h = Handled::of(&entry);
        h.save(&state_dir);
        handled = Some(h);
    }
}

/// Why a deploy did not start; the next wake-up or resync tries again.
pub enum Waiting {
    /// A local command (a technician's `perch-agent install`, say) holds
    /// the deploy engine: who holds it.
    Busy(String),
    /// The bundle is not on the server yet (not published, or a field site
    /// still copying it).
    NotHere(String),
}

impl Waiting {
    fn reason(&self) -> &str {
        match self {
            Waiting::Busy(r) | Waiting::NotHere(r) => r,
        }
    }
}

/// The agent's deployer: the deploy engine, one install at a time.
pub struct EngineDeployer {
    client: Client,
    cfg: Config,
    state_dir: PathBuf,
    engine: Arc<Mutex<()>>,
    reporter: Option<Reporter>,
}

impl Deployer for EngineDeployer {
    fn is_switching(&self) -> bool {
        JournalStore::new(&self.state_dir).load().is_ok_and(|j| j.state.is_switching())
    }

    fn gave_up_on(&self, digest: &[u8; 32]) -> bool {
        gave_up_on(&self.state_dir, digest)
    }

    fn deploy(&self, entry: &Entry) -> impl std::future::Future<Output = Option<Waiting>> + Send {
        deploy(&self.client, &self.cfg, &self.state_dir, entry, &self.engine, &self.reporter)
    }
}

/// Fetches and installs the bundle `entry` names; every outcome is reported.
/// None once it has ended; why, if it could not start.
async fn deploy(
    client: &Client,
    cfg: &Config,
    state_dir: &Path,
    entry: &Entry,
    engine: &Mutex<()>,
    reporter: &Option<Reporter>,
) -> Option<Waiting> {
    let digest = entry.bundle;
    let _turn = engine.lock().await;
    let settings = FetchSettings {
        window: cfg.fetch.window,
        budget: cfg.fetch.budget,
        max_backoff: cfg.link.max_backoff,
        ledger: Some(state_dir.join(crate::fetch::LEDGER_FILE)),
        ..FetchSettings::default()
    };
    let outcome =
        install(client.clone(), cfg.clone(), state_dir.to_path_buf(), entry, settings, reporter.clone())
            .await;
    match outcome {
        Err(Failure::EngineInUse(busy)) => return Some(Waiting::Busy(busy)),
        Err(Failure::NotHere(why)) => return Some(Waiting::NotHere(why)),
        _ => {}
    }
    // The deploy has ended: a retry (a new revision) gets a fresh budget.
    let _ = std::fs::remove_file(state_dir.join(crate::fetch::LEDGER_FILE));
    match outcome {
        Ok(f) => info!(bundle = %hex::encode(&digest[..8]), "deploy: {f}"),
        Err(Failure::EngineInUse(_) | Failure::NotHere(_)) => {}
        Err(Failure::Failed(e)) => {
            warn!(bundle = %hex::encode(&digest[..8]), "deploy failed: {e}");
            // The engine reports every state it reaches; this is for a
            // failure before it got the bundle at all (no head, say).
            if let Some(r) = reporter {
                let kind =
                    ReportKind::Deploy { state: "failed".into(), reason: Some(e), bundle: Some(digest) };
                if let Err(e) = r.queue(Lane::Events, kind) {
                    warn!("deploy report not queued: {e}");
                }
            }
        }
    }
    None
}

/// Why an install from the link did not finish.
enum Failure {
    /// Another process's engine works on the state directory; nothing was done.
    EngineInUse(String),
    /// The bundle is not on the server yet; nothing was done, and the next
    /// wake-up or resync looks again.
    NotHere(String),
    Failed(String),
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
    entry: &Entry,
    settings: FetchSettings,
    reporter: Option<Reporter>,
) -> Result<String, Failure> {
    let rt = tokio::runtime::Handle::current();
    let (digest, key, revision) = (entry.bundle, entry.key.clone(), entry.revision);
    let joined = tokio::task::spawn_blocking(move || -> Result<String, Failure> {
        let (mut engine, problem) = Engine::open(cfg, &state_dir).map_err(|e| match e {
            DeployError::Lock(l) if l.is_held() => Failure::EngineInUse(l.to_string()),
            e => Failure::Failed(e.to_string()),
        })?;
        info!(%key, revision, bundle = %hex::encode(&digest[..8]), "desired state names a new bundle; fetching it");
        // Each line already says what was found and what was done about it.
        for line in problem.iter().flat_map(|r| &r.0) {
            warn!("{line}");
        }
        if let Some(r) = reporter {
            engine.observe(crate::reports::engine_observer(r));
        }
        let source = ChunkSource::open(rt, client, digest, settings).map_err(|e| match e {
            OpenError::NotHere(_) => Failure::NotHere(e.to_string()),
            e => Failure::Failed(e.to_string()),
        })?;
        let label = PathBuf::from(format!("nats:{}", subjects::chunk(&digest, None)));
        let f = engine
            .install_from(source, &label)
            .map_err(|e| Failure::Failed(perch_support::error_chain(&e)))?;
        Ok(match f {
            Finished::Committed(_) => "Committed".into(),
            Finished::RolledBack(_, r) => format!("RolledBack: {r}"),
            Finished::AwaitingReboot(s) => format!("AwaitingReboot into slot {s}"),
            Finished::AlreadyRunning(_) => "AlreadyRunning".into(),
            Finished::Idle | Finished::NeedsBundle(_) => engine.journal.state.name().to_string(),
        })
    })
    .await;
    joined.map_err(|e| Failure::Failed(format!("install thread: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, revision: u64, b: u8) -> Entry {
        Entry { key: key.into(), revision, bundle: [b; 32] }
    }

    #[test]
    fn a_revision_is_acted_on_once() {
        let e = entry("device.d1", 7, 1);
        let never = |_: &[u8; 32]| false;
        assert_eq!(decide(None, None, never), Decision::Nothing);
        assert_eq!(decide(None, Some(&e), never), Decision::Install);
        let h = Handled::of(&e);
        assert_eq!(decide(Some(&h), Some(&e), never), Decision::Nothing);
        // Re-putting the same bundle is a new revision: a retry.
        assert_eq!(decide(Some(&h), Some(&entry("device.d1", 9, 1)), never), Decision::Install);
        // The device key deleted, the group's rules with another bundle: a new intent.
        assert_eq!(decide(Some(&h), Some(&entry("group.g", 7, 2)), never), Decision::Install);
        // With the same bundle: recorded, not installed (nor retried, had it failed).
        assert_eq!(decide(Some(&h), Some(&entry("group.g", 8, 1)), never), Decision::Record);
    }

    #[test]
    fn a_read_has_caught_up_only_when_each_heard_key_is_newer_than_before() {
        let k = |key: &str, revision: Option<u64>, b: Option<u8>| KeyRead {
            key: key.into(),
            revision,
            bundle: b.map(|b| [b; 32]),
        };
        // The device's key deleted (a marker at 12), the group's at 9.
        let reads = Reads(vec![k("device.d", Some(12), None), k("group.g", Some(9), Some(4))]);
        assert_eq!(reads.effective(), Some(entry("group.g", 9, 4)));
        assert!(has_caught_up(&reads, &[]));
        // A put heard on the group's key, read at 9 before: a copy that
        // still gives 9 has not stored it.
        assert!(!has_caught_up(&reads, &[("group.g".into(), Some(9))]));
        assert!(has_caught_up(&reads, &[("group.g".into(), Some(8))]));
        // The delete heard: its marker is newer than the put before it.
        assert!(has_caught_up(&reads, &[("device.d".into(), Some(11))]));
        // A key never written before: any revision is news, none is not.
        assert!(has_caught_up(&reads, &[("group.g".into(), None)]));
        let unwritten = Reads(vec![k("device.d", None, None)]);
        assert!(!has_caught_up(&unwritten, &[("device.d".into(), None)]));
        assert_eq!(unwritten.effective(), None);
    }

    #[test]
    fn without_a_record_the_journal_keeps_a_failed_bundle_from_looping() {
        let e = entry("group.g", 3, 2);
        assert_eq!(decide(None, Some(&e), |d| *d == [2; 32]), Decision::Record);
        assert_eq!(decide(None, Some(&e), |d| *d == [9; 32]), Decision::Install);
    }

    #[test]
    fn the_record_survives_a_restart_and_garbage_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Handled::load(dir.path()), None);
        let h = Handled::of(&entry("device.d1", 42, 3));
        h.save(dir.path());
        assert_eq!(Handled::load(dir.path()), Some(h));
        std::fs::write(dir.path().join(HANDLED_FILE), b"{\"key\": 1").unwrap();
        assert_eq!(Handled::load(dir.path()), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_records_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = Handled::parse(&data);
        }
    }
}
