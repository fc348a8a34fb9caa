//! Reports: queued in the [`Outbox`](crate::outbox::Outbox) and sent to the
//! JetStream stream `PERCH_REPORTS`, one `Nats-Msg-Id` per record.
//!
//! - [`Reporter::queue`] builds a report (device, sequence number, boot id,
//!   agent version, journal state) and appends it durably.
//! - [`send_loop`] keeps up to `ack_window` reports in flight, events
//!   first, and marks each done only when JetStream acked it. On a timeout
//!   or a lost link it starts again from the first record not acked; what
//!   JetStream had already stored is recognised by its message id.
//! - [`heartbeat_loop`] queues a heartbeat every interval.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::stream::{FuturesOrdered, StreamExt};
use perch_protocol::report::{BundleInfo, Lane, Report, ReportKind};
use perch_protocol::subjects;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::outbox::{Outbox, OutboxError};

/// Queues reports; shared by everything in the agent that reports.
#[derive(Clone)]
pub struct Reporter {
    outbox: Arc<Mutex<Outbox>>,
    device: String,
    boot_id: String,
    state_dir: PathBuf,
    /// Where each report's journal state and running bundle come from.
    state: StateSource,
    wake: Arc<Notify>,
    /// The journal state last accounted for (name, bundle): reached by
    /// this agent's engine, or reported by [`journal_watch`].
    last_deploy: Arc<Mutex<Option<DeployKey>>>,
}

type DeployKey = (String, Option<[u8; 32]>);

/// What a report says the device is doing: the journal's state name, the
/// running slot and the bundle in it.
pub type DeviceState = (String, Option<String>, Option<BundleInfo>);

/// Where a report's [`DeviceState`] comes from.
#[derive(Clone)]
enum StateSource {
    /// The journal and the booted slot, read afresh for every report.
    Device(Box<crate::config::Slots>),
    /// Told by the caller: a simulated device (`cargo xtask bench fleet`)
    /// that runs the agent's link, outbox and desired-state follower with
    /// no slots at all.
    Given(Arc<dyn Fn() -> DeviceState + Send + Sync>),
}

impl Reporter {
    pub fn new(
        outbox: Outbox,
        device: &str,
        boot_id: &str,
        state_dir: &Path,
        slots: crate::config::Slots,
    ) -> Self {
        Self::make(outbox, device, boot_id, state_dir, StateSource::Device(Box::new(slots)))
    }

    /// A reporter whose device state is whatever `state` says: for a
    /// simulated device, which has an outbox but no journal or slots.
    pub fn with_state(
        outbox: Outbox,
        device: &str,
        boot_id: &str,
        state_dir: &Path,
        state: Arc<dyn Fn() -> DeviceState + Send + Sync>,
    ) -> Self {
        Self::make(outbox, device, boot_id, state_dir, StateSource::Given(state))
    }

    fn make(outbox: Outbox, device: &str, boot_id: &str, state_dir: &Path, state: StateSource) -> Self {
        Self {
            outbox: Arc::new(Mutex::new(outbox)),
            device: device.into(),
            boot_id: boot_id.into(),
            state_dir: state_dir.into(),
            state,
            wake: Arc::new(Notify::new()),
            last_deploy: Arc::new(Mutex::new(None)),
        }
    }

    fn last_deploy(&self) -> std::sync::MutexGuard<'_, Option<DeployKey>> {
        self.last_deploy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the journal's state as it is now as already accounted for:
    /// called once when the agent starts, before its engine does anything,
    /// so that what a restart finds is never reported again.
    pub fn baseline(&self) {
        if let Ok(j) = crate::journal::JournalStore::new(&self.state_dir).load() {
            *self.last_deploy() = Some(deploy_key(&j.state));
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The journal's state name, the running slot and its bundle: read
    /// afresh for every report, so a report never says what used to be.
    fn device_state(&self) -> DeviceState {
        let slots = match &self.state {
            StateSource::Device(slots) => slots,
            StateSource::Given(f) => return f(),
        };
        let journal = crate::journal::JournalStore::new(&self.state_dir).load().ok();
        let booted = crate::slots::from_config(slots, &self.state_dir).booted().ok();
        let bundle = journal.as_ref().zip(booted).and_then(|(j, s)| j.slot(s).cloned()).map(|b| BundleInfo {
            name: b.name,
            counter: b.counter,
            version: b.version,
            digest: b.digest,
        });
        let state = journal.map(|j| j.state.name().to_string()).unwrap_or_else(|| "unknown".into());
        (state, booted.map(|s| s.as_str().to_string()), bundle)
    }

    /// Queues one report; returns its sequence number.
    pub fn queue(&self, lane: Lane, kind: ReportKind) -> Result<u64, OutboxError> {
        let (journal_state, running_slot, running_bundle) = self.device_state();
        let mut ob = self.outbox();
        let epoch = ob.epoch();
        let make = |seq: u64, kind: ReportKind| -> Vec<u8> {
            Report {
                device: self.device.clone(),
                epoch,
                seq,
                boot_id: self.boot_id.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                at: perch_support::now_unix(),
                running_slot: running_slot.clone(),
                running_bundle: running_bundle.clone(),
                journal_state: journal_state.clone(),
                kind,
            }
            .to_bytes()
        };
        let (seq, dropped) = ob.append(lane, |seq| make(seq, kind))?;
        if let Some(d) = dropped {
            // Every sequence number is accounted for: sent, or declared dropped.
            let kind = ReportKind::Dropped { first: d.first, last: d.last, count: d.count };
            ob.append(Lane::Events, |seq| make(seq, kind))?;
        }
        drop(ob);
        self.wake.notify_one();
        Ok(seq)
    }

    /// The sequence number of the last report queued (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.outbox().last_seq()
    }

    /// Records waiting, and their bytes.
    pub fn backlog(&self) -> (usize, u64) {
        self.outbox().backlog()
    }
}

/// What the deploy engine tells its observer, queued as reports: every
/// state as an event (with why, and which bundle), staging progress as
/// telemetry. Used for installs from the desired state and for the work
/// the engine finishes at startup (a trial after a reboot, a bootloader
/// fallback), so every true outcome reaches the fleet.
pub fn engine_observer(r: Reporter) -> impl FnMut(crate::deploy::EngineEvent<'_>) + 'static {
    use crate::deploy::EngineEvent;
    move |ev| {
        let (lane, kind) = match ev {
            EngineEvent::State(s) => {
                *r.last_deploy() = Some(deploy_key(s));
                (
                    Lane::Events,
                    ReportKind::Deploy {
                        state: s.name().into(),
                        reason: reason_of(s),
                        bundle: s.bundle().map(|b| b.digest),
                    },
                )
            }
            EngineEvent::Progress { done, count } => {
                (Lane::Telemetry, ReportKind::Progress { chunks_done: done, chunk_count: count })
            }
            EngineEvent::Transferred { bundle, transfer: t } => (
                Lane::Events,
                ReportKind::Transfer {
                    bundle: bundle.digest,
                    reused_bytes: t.reused_bytes,
                    reused_chunks: t.reused_chunks,
                    fetched_bytes: t.fetched_bytes,
                    fetched_chunks: t.fetched_chunks,
                },
            ),
        };
        if let Err(e) = r.queue(lane, kind) {
            warn!("deploy report not queued: {e}");
        }
    }
}

fn deploy_key(s: &crate::journal::DeployState) -> DeployKey {
    (s.name().to_string(), s.bundle().map(|b| b.digest))
}

/// How often [`journal_watch`] looks at the journal (a small file; the
/// link's check for owed lifecycle events runs as often).
pub const JOURNAL_WATCH_EVERY: Duration = Duration::from_secs(2);

/// Reports deploy states that another process's engine reached: a
/// technician's `perch-agent install`, `commit` or `rollback` while the
/// agent runs. Every `every`, the journal's state is compared with the last
/// one accounted for (see [`Reporter::baseline`]; this agent's own engine
/// reports its states itself) and reported, with its reason, if it
/// differs. Skipped while this agent's engine works (`engine` held). A
/// failure report that is not a journal state (a bundle that could not be
/// fetched or was refused) leaves the baseline alone, so it is never
/// followed by a report of the unchanged journal state.
pub async fn journal_watch(reporter: Reporter, engine: Arc<tokio::sync::Mutex<()>>, every: Duration) {
    use crate::journal::JournalStore;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(_turn) = engine.try_lock() else { continue };
        let Ok(journal) = JournalStore::new(&reporter.state_dir).load() else { continue };
        let s = &journal.state;
        let key = deploy_key(s);
        {
            let mut last = reporter.last_deploy();
            if last.as_ref() == Some(&key) {
                continue;
            }
            // Without a baseline (none could be read at start), this is it.
            if last.replace(key.clone()).is_none() {
                continue;
            }
        }
        debug!(state = %key.0, "a deploy state reached outside this agent");
        let kind = ReportKind::Deploy { state: key.0, reason: reason_of(s), bundle: key.1 };
        if let Err(e) = reporter.queue(Lane::Events, kind) {
            warn!("deploy report not queued: {e}");
        }
    }
}

/// Why a deploy state came about, for the report.
fn reason_of(s: &crate::journal::DeployState) -> Option<String> {
    use crate::journal::DeployState;
    match s {
        DeployState::Failed { reason, .. } => Some(reason.clone()),
        DeployState::RollingBack { reason, .. } | DeployState::RolledBack { reason, .. } => {
            Some(reason.to_string())
        }
        _ => None,
    }
}

/// Queues a heartbeat every `interval`, for as long as the agent runs.
pub async fn heartbeat_loop(reporter: Reporter, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = reporter.queue(Lane::Telemetry, ReportKind::Heartbeat) {
            warn!("heartbeat not queued: {e}");
        }
    }
}

/// How the sender behaves.
#[derive(Debug, Clone)]
pub struct SendSettings {
    pub ack_window: usize,
    pub ack_timeout: Duration,
}

/// Sends queued reports for as long as the agent runs.
pub async fn send_loop(client: async_nats::Client, reporter: Reporter, settings: SendSettings) {
    let js = jetstream::new(client.clone());
    let mut last_checkpoint = tokio::time::Instant::now();
    loop {
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let batch = next_batch(&reporter, settings.ack_window);
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                warn!("outbox: {}", perch_support::error_chain(&e));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), reporter.wake.notified()).await;
            continue;
        }
        let mut inflight = FuturesOrdered::new();
        let mut failed = false;
        let epoch = reporter.outbox().epoch();
        for (lane, seq, payload) in batch {
            let mut headers = async_nats::HeaderMap::new();
            // A record keeps the epoch it was made in, should the outbox's
            // have been replaced since (a lost epoch file).
            let made_in = Report::from_bytes(&payload).map_or(epoch, |r| r.epoch);
            let id = perch_protocol::report::msg_id(&reporter.device, made_in, seq);
            headers.insert("Nats-Msg-Id", id.as_str());
            let subject = format!("{}.{}", subjects::reports(&reporter.device), lane.as_str());
            match js.publish_with_headers(subject, headers, payload.into()).await {
                Ok(ack) => {
                    let t = settings.ack_timeout;
                    inflight.push_back(async move { (lane, seq, tokio::time::timeout(t, ack).await) });
                }
                Err(e) => {
                    debug!("report {seq} not sent: {e}");
                    failed = true;
                    break;
                }
            }
        }
        while let Some((lane, seq, res)) = inflight.next().await {
            match res {
                Ok(Ok(_ack)) => {
                    if let Err(e) = reporter.outbox().ack(lane, seq) {
                        warn!("outbox: {}", perch_support::error_chain(&e));
                    }
                }
                Ok(Err(e)) => {
                    debug!("report {seq} not acked: {e}");
                    failed = true;
                    break;
                }
                Err(_) => {
                    debug!("report {seq}: no ack in {:?}", settings.ack_timeout);
                    failed = true;
                    break;
                }
            }
        }
        // Acks are cheap to lose (resends are deduplicated), fsyncs are not
        // free: persist the done marks a few times a second.
        if failed || last_checkpoint.elapsed() > Duration::from_millis(250) {
            if let Err(e) = reporter.outbox().checkpoint() {
                warn!("outbox checkpoint: {}", perch_support::error_chain(&e));
            }
            last_checkpoint = tokio::time::Instant::now();
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Up to `window` waiting records, events first, made durable before they go.
fn next_batch(reporter: &Reporter, window: usize) -> Result<Vec<(Lane, u64, Vec<u8>)>, OutboxError> {
    let mut ob = reporter.outbox();
    ob.flush()?;
    let mut out = Vec::with_capacity(window);
    for lane in Lane::ALL {
        for r in ob.pending(lane).take(window - out.len()) {
            out.push((lane, r.seq, r.payload.clone()));
        }
    }
    Ok(out)
}
