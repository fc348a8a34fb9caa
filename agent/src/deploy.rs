//! The A/B deploy engine: stage a verified bundle into the slot that is not
//! running, activate it, try it, and commit or roll back. Every state is in
//! the journal before its side effects, and [`Engine::resume`] picks up
//! whatever a crash or reboot interrupted.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use perch_protocol::bundle::{
    BundleError, BundleReader, Checked, CheckedChunk, UncheckedChunk, VerifiedBundle, VerifiedManifest,
    Window,
};
use perch_support::exit::{Class, Classify};
use perch_support::now_unix;
use perch_support::trustfile::LoadTrustError;

use crate::config::Config;
use crate::decision::{self, Decision};
use crate::delta::{self, BundleSource, LocalChunks};
use crate::engine_lock::{EngineLock, LockError};
use crate::failpoint::hit;
use crate::health::TrialEnd;
use crate::journal::{
    BundleRef, DeployState, Highest, Journal, JournalError, JournalStore, LastOutcome, Outcome,
    RollbackReason, SlotContent, SlotId,
};
use crate::progress::Progress;
use crate::recovery::{self, Problem, Recovered};
use crate::sequencer::{self, LaneError, Lanes};
use crate::slots::{self, SlotBackend, SlotError, Staged, Switch};
use crate::spares::Spares;
use crate::written::Written;
use crate::{health, inhibit, statefile};

/// Threads that hash chunks while staging: two keep up with a fast disk
/// on a two-core device, while reading and writing run beside them.
const HASHERS: usize = 2;
/// At most this many lanes of linked chunks are decoded at once, one per
/// core (each keeps its own window: three times the manifest's largest and
/// a chunk, 12.25 MiB at the default `--compress-window`).
const MAX_LANES: usize = 4;

/// Where staging looks for chunks before it fetches them.
#[derive(Clone, Copy)]
struct Sources<'a> {
    /// The running slot, by its record.
    running: Option<&'a LocalChunks>,
    /// The slot being written, when a staging left it partly written:
    /// chunks already in place there.
    target: Option<&'a LocalChunks>,
}

/// This agent's version, compared with a manifest's `min_agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a deploy step failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{}", path.display())]
    Bundle { path: PathBuf, source: BundleError },
    /// Refused for security (target, downgrade, agent version).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Trust(#[from] LoadTrustError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// A deploy is mid-switch; it must finish first.
    #[error("{0}")]
    Busy(String),
    /// Another process's engine is working on this state directory.
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{0}")]
    Nothing(String),
}

impl DeployError {
    pub fn is_security(&self) -> bool {
        match self {
            DeployError::Bundle { source, .. } => source.is_security(),
            DeployError::Refused(_) => true,
            DeployError::Slot(s) => s.is_security(),
            _ => false,
        }
    }
}

impl Classify for DeployError {
    fn class(&self) -> Option<Class> {
        match self {
            _ if self.is_security() => Some(Class::Security),
            // Transparent: its chain skips it, so it is asked here.
            DeployError::Trust(t) => t.class(),
            _ => Some(Class::Runtime),
        }
    }
}

/// How a command left the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    Committed(BundleRef),
    RolledBack(BundleRef, RollbackReason),
    /// Activated; the trial starts after this reboot.
    AwaitingReboot(SlotId),
    /// Nothing was left to do.
    Idle,
    AlreadyRunning(BundleRef),
    /// Staging was interrupted and needs the bundle again.
    NeedsBundle(BundleRef),
}

/// What the engine tells an observer (the agent's reports).
pub enum EngineEvent<'a> {
    /// The journal moved to a new state (already persisted).
    State(&'a DeployState),
    /// Staging progress, every [`PROGRESS_EVERY`] chunks.
    Progress { done: u32, count: u32 },
    /// Staging is done: what came from the device and what from the bundle.
    Transferred { bundle: &'a BundleRef, transfer: Transfer },
}

/// Where one staging's chunks came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Written bytes the device already held: chunks of the running slot,
    /// and chunks kept on the target slot by an interrupted install.
    pub reused_bytes: u64,
    pub reused_chunks: u32,
    /// Bytes read from the bundle (file or link), as stored (compressed
    /// where the chunk is).
    pub fetched_bytes: u64,
    pub fetched_chunks: u32,
}

/// Who is told of engine events.
type Observer = Box<dyn FnMut(EngineEvent<'_>)>;

/// How often staging progress is told to the observer, in chunks.
pub const PROGRESS_EVERY: u32 = 16;

pub struct Engine {
    /// Held for the engine's lifetime: one engine per state directory.
    _lock: EngineLock,
    cfg: Config,
    store: JournalStore,
    backend: Box<dyn SlotBackend>,
    pub journal: Journal,
    pub progress: Progress,
    observer: Option<Observer>,
}

impl Engine {
    /// Opens the state directory, whatever state its files are in: a
    /// damaged journal is moved aside and the device falls back to the
    /// safe state (the bootloader is pointed at the slot that is running
    /// now); a damaged counters file is moved aside; the highest committed
    /// counters are the maximum of both records, and both are rewritten to
    /// hold it. What was recovered from is returned (one line each) for the
    /// caller to log, and kept in the journal's notices for `status`.
    ///
    /// Fails at once with [`DeployError::Lock`] while another process's
    /// engine works on the same state directory.
    pub fn open(cfg: Config, state_dir: &Path) -> Result<(Engine, Option<Recovered>), DeployError> {
        std::fs::create_dir_all(state_dir).map_err(|err| SlotError::Io { path: state_dir.into(), err })?;
        let lock = EngineLock::acquire(state_dir)?;
        let store = JournalStore::new(state_dir);
        let backend = slots::from_config(&cfg.slots, state_dir);
        let now = now_unix();
        let aside = |p: &Path| {
            let to =
                statefile::move_aside(p, now).map_err(|err| SlotError::Io { path: p.to_path_buf(), err });
            hit("state-moved-aside");
            to
        };
        let mut lines = Vec::new();
        if let Some(moved) = lock.moved_aside() {
            lines.push(format!(
                "engine lock {} was not a regular file; moved aside to {}",
                state_dir.join(crate::engine_lock::LOCK_FILE).display(),
                moved.display()
            ));
        }
        let found = recovery::find(state_dir)?;
        let mut journal = found.merged();
        for problem in found.problems(lock.existed()) {
            let line = match &problem {
                Problem::JournalDamaged { path, .. } => {
                    let booted = backend.booted()?;
                    backend.rollback(booted)?;
                    let to = aside(path)?;
                    format!(
                        "{problem}; moved aside to {}, kept the running slot and started a fresh journal",
                        to.display()
                    )
                }
                Problem::CountersDamaged { path, .. } => {
                    let to = aside(path)?;
                    format!("{problem}; moved aside to {} and rewrote it from the journal", to.display())
                }
                Problem::CountersLost => problem.to_string(),
            };
            lines.push(line);
        }
        // The counters copy first: a crash before the journal is saved
        // still leaves the highest counters in one of the two.
        if found.counters_stale(&journal.highest) {
            // Not fatal: the journal still holds the counters, and a full
            // disk must not stop the engine over a second copy.
            match crate::counters::save(state_dir, &journal.highest) {
                Ok(()) => hit("counters-saved"),
                Err(e) => lines
                    .push(format!("cannot rewrite the counters file: {}", perch_support::error_chain(&e))),
            }
        }
        if !lines.is_empty() {
            for line in &lines {
                journal.add_notice(now, line.clone());
            }
            store.save(&mut journal)?;
        }
        let recovered = (!lines.is_empty()).then_some(Recovered(lines));
        Ok((
            Engine { _lock: lock, cfg, store, backend, journal, progress: Progress::new(), observer: None },
            recovered,
        ))
    }

    /// What `status` shows, read without taking the engine (so it works
    /// while one installs) and without writing anything: the journal (with
    /// the highest counters of both records), what is wrong with the state
    /// files, and the slot backend. Damage is left for the next engine to
    /// recover from.
    pub fn inspect(cfg: &Config, state_dir: &Path) -> (Journal, Box<dyn SlotBackend>, Vec<String>) {
        let backend = slots::from_config(&cfg.slots, state_dir);
        let ran_before = std::fs::symlink_metadata(state_dir.join(crate::engine_lock::LOCK_FILE)).is_ok();
        match recovery::find(state_dir) {
            Ok(found) => {
                let problems = found.problems(ran_before).iter().map(ToString::to_string).collect();
                (found.merged(), backend, problems)
            }
            Err(e) => (Journal::default(), backend, vec![e.to_string()]),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.store.path().parent().unwrap_or(Path::new(".")).to_path_buf()
    }

    /// Sets who is told of every state change and of staging progress.
    pub fn observe(&mut self, f: impl FnMut(EngineEvent<'_>) + 'static) {
        self.observer = Some(Box::new(f));
    }

    pub fn backend(&self) -> &dyn SlotBackend {
        self.backend.as_ref()
    }

    fn save(&mut self, state: DeployState) -> Result<(), DeployError> {
        self.journal.state = state;
        self.store.save(&mut self.journal)?;
        if let Some(f) = self.observer.as_mut() {
            f(EngineEvent::State(&self.journal.state));
        }
        Ok(())
    }

    /// This boot's id. Unreadable or empty is an error: without it a reboot
    /// cannot be told from none, and a fallback could go unnoticed.
    fn boot_id(&self) -> Result<String, DeployError> {
        let path = &self.cfg.boot_id;
        let id = std::fs::read_to_string(path)
            .map_err(|err| SlotError::Io { path: path.clone(), err })?
            .trim()
            .to_string();
        if id.is_empty() {
            return Err(SlotError::Booted(format!("boot id file {} is empty", path.display())).into());
        }
        Ok(id)
    }

    // ---------------------------------------------------------------- install

    /// Installs the bundle at `path` into the inactive slot and takes it as
    /// far as it can go: committed, rolled back, or awaiting a reboot.
    pub fn install(&mut self, path: &Path) -> Result<Finished, DeployError> {
        let file = File::open(path)
            .map_err(|e| DeployError::Bundle { path: path.into(), source: BundleError::Io(e) })?;
        // Unbuffered: the reader asks for 64 KiB pieces, which a buffer would only copy.
        self.install_from(file, path)
    }

    /// [`install`](Self::install) from any seekable source of bundle bytes
    /// (a file, or chunks fetched over the link); `label` names it in errors.
    pub fn install_from<R: BundleSource>(
        &mut self,
        source: R,
        label: &Path,
    ) -> Result<Finished, DeployError> {
        let path = label;
        let now = now_unix();
        // Only the accepted trust version, or a newer one by a valid chain.
        let trust = crate::trust_store::for_engine(&self.cfg.trust, &self.state_dir(), now)?;
        let bundle_err = |source| DeployError::Bundle { path: path.into(), source };
        let mut reader = BundleReader::open_verified(source, &trust, now).map_err(bundle_err)?;
        check_whole_len(&mut reader).map_err(bundle_err)?;
        let bundle = BundleRef::of(reader.manifest());
        let booted = self.backend.booted()?;
        // The bundle the device runs, with nothing in flight (the last deploy
        // may have ended any way: a rollout aborted back to this bundle, say).
        let settled = matches!(
            self.journal.state,
            DeployState::Committed { .. }
                | DeployState::Idle
                | DeployState::RolledBack { .. }
                | DeployState::Failed { .. }
        );
        if self.journal.slot(booted).is_some_and(|b| b.digest == bundle.digest) && settled {
            return Ok(Finished::AlreadyRunning(bundle));
        }
        if let Err(e) = self.admit(reader.manifest()) {
            self.journal.last =
                Some(LastOutcome { bundle: Some(bundle), outcome: Outcome::Failed(e.to_string()), at: now });
            self.store.save(&mut self.journal)?;
            return Err(e);
        }
        if self.journal.state.is_switching() {
            return Err(DeployError::Busy(format!(
                "a deploy is {} ({}); it must finish first (perch-agent run, commit or rollback)",
                self.journal.state.name(),
                self.journal.state.bundle().map(|b| b.to_string()).unwrap_or_default()
            )));
        }
        let slot = booted.other();
        // A slot some staging left unfinished (this bundle's or another's)
        // may hold chunks of this bundle in place.
        let partly_staged = matches!(self.journal.slot_content(slot), SlotContent::Dirty(_));
        let (resume_at, same_bundle) = match &self.journal.state {
            DeployState::Staging { bundle: b, slot: s, next_chunk }
                if b.digest == bundle.digest && *s == slot =>
            {
                (Some(*next_chunk), true)
            }
            DeployState::Staged { bundle: b, slot: s } if b.digest == bundle.digest && *s == slot => {
                (None, true)
            }
            _ => (Some(0), false),
        };
        if let Some(recorded) = resume_at {
            // Trust, but verify: re-hash what is on the slot (reading is
            // cheap, fetching again is not) and resume at the first chunk
            // that is not there intact. Chunks written after the last
            // checkpoint count too, so a crash costs no download.
            let (from_chunk, window) = if same_bundle {
                self.intact_prefix(reader.manifest(), slot, path)?
            } else {
                (0, Window::starting_at(reader.manifest().manifest(), 0))
            };
            if self.backend.next_boot()? == Some(slot) {
                // The bootloader would boot the slot about to be overwritten
                // (a fallback it made by itself): pin the running slot first.
                self.backend.rollback(booted)?;
            }
            if from_chunk != recorded && from_chunk > 0 {
                self.save(DeployState::Staging { bundle: bundle.clone(), slot, next_chunk: from_chunk })?;
            }
            if from_chunk == 0 {
                // From its first write the slot holds no known bundle.
                self.journal.set_slot(slot, SlotContent::Dirty(bundle.clone()));
                self.save(DeployState::Staging { bundle: bundle.clone(), slot, next_chunk: 0 })?;
            } else {
                self.progress
                    .note(&format!("resuming {bundle} at chunk {from_chunk} of {}", bundle.chunk_count));
            }
            let local = self.running_chunks(booted, from_chunk < bundle.chunk_count);
            let target =
                if partly_staged { LocalChunks::in_place(self.backend.as_ref(), slot) } else { None };
            let sources = Sources { running: local.as_ref(), target: target.as_ref() };
            if let Err(e) = self.stage(&mut reader, path, &bundle, slot, window, sources) {
                let reason = perch_support::error_chain(&e);
                self.journal.last = Some(LastOutcome {
                    bundle: Some(bundle.clone()),
                    outcome: Outcome::Failed(reason.clone()),
                    at: now_unix(),
                });
                // The slot stays dirty: chunks verified before the failure
                // may have been written.
                self.save(DeployState::Failed { bundle: Some(bundle), reason })?;
                return Err(e);
            }
        }
        self.activate_when_allowed()
    }

    /// The chunks of the running slot, for a delta install, when its record
    /// can be used (see [`delta`]); otherwise every chunk is fetched.
    fn running_chunks(&self, booted: SlotId, wanted: bool) -> Option<LocalChunks> {
        let bundle = self.journal.slot(booted).filter(|_| wanted)?;
        match LocalChunks::of_slot(&self.state_dir(), self.backend.as_ref(), booted, bundle) {
            Ok(local) => Some(local),
            Err(why) => {
                self.progress.note(&format!("{why}; fetching every chunk"));
                None
            }
        }
    }

    /// How many chunks, from the first, read back from `slot` intact, and
    /// the window of the last of them (what a linked chunk after them is
    /// decoded against; empty for a bundle without linked chunks).
    fn intact_prefix(
        &self,
        m: &VerifiedManifest,
        slot: SlotId,
        label: &Path,
    ) -> Result<(u32, Window), DeployError> {
        let count = m.manifest().chunk_count();
        let mut window = Window::starting_at(m.manifest(), 0);
        let Ok(mut back) = self.backend.read_back(slot, m.manifest().payload_len()) else {
            return Ok((0, window));
        };
        let mut buf = Vec::new();
        for index in 0..count {
            buf.resize(m.manifest().chunk_len(index), 0);
            let intact = match back.read_exact(&mut buf) {
                Ok(()) => m.check_written(index, std::mem::take(&mut buf)).map_err(|(_, b)| b),
                Err(_) => Err(std::mem::take(&mut buf)),
            };
            match intact {
                Ok(chunk) => {
                    window
                        .push(&chunk)
                        .map_err(|source| DeployError::Bundle { path: label.into(), source })?;
                    buf = chunk.into_buffer();
                }
                Err(_) => {
                    if index > 0 {
                        self.progress.note(&format!(
                            "chunks 0..{index} on slot {slot} are intact; staging from there"
                        ));
                    }
                    return Ok((index, window));
                }
            }
        }
        Ok((count, window))
    }

    /// The checks on a verified manifest before anything is written.
    fn admit(&self, m: &VerifiedManifest) -> Result<(), DeployError> {
        let man = m.manifest();
        if !man.allows_target(&self.cfg.target) {
            return Err(DeployError::Refused(format!(
                "bundle {} is for targets [{}], this device is '{}'",
                man.name,
                man.targets.join(", "),
                self.cfg.target
            )));
        }
        if let Some(highest) = self.journal.highest.get(&man.name) {
            // The release committed last at the highest counter may come
            // back (an operator rolled it back by hand); nothing older may.
            let same_release = man.counter == highest.counter && highest.digest == Some(m.digest().0);
            if man.counter <= highest.counter && !same_release && !man.allow_downgrade {
                return Err(DeployError::Refused(format!(
                    "downgrade: bundle {} counter {} is not above the committed counter {}",
                    man.name, man.counter, highest.counter
                )));
            }
        }
        if let Some(min) = &man.min_agent_version {
            if version_key(min) > version_key(AGENT_VERSION) {
                return Err(DeployError::Refused(format!(
                    "bundle {} needs agent {min} or newer; this is {AGENT_VERSION}",
                    man.name
                )));
            }
        }
        Ok(())
    }

    /// Streams the verified payload into `slot`, from chunk `from_chunk`.
    ///
    /// A pipeline, so that reading, hashing, writing and syncing overlap:
    /// this thread reads chunks; [`HASHERS`] threads compare each with its
    /// signed hash; a writer thread writes the checked chunks (and only
    /// those: it takes [`CheckedChunk`]s) to the slot. A bundle with linked
    /// chunks goes to lanes instead (see [`sequencer`]): each hashes,
    /// decodes and writes its own chunks, on its own core. Every
    /// `checkpoint_bytes` written ([`Written`]) a syncer thread syncs the
    /// slot and then records in the journal the first chunk not yet known
    /// to be durable.
    ///
    /// Every byte that reaches the slot matched its signed chunk hash, and
    /// chunks kept from an interrupted install were re-hashed on the slot
    /// before resuming, so no whole-payload pass is needed here (that
    /// digest is checked by `perch bundle verify`).
    fn stage<R: BundleSource>(
        &mut self,
        reader: &mut VerifiedBundle<R>,
        label: &Path,
        bundle: &BundleRef,
        slot: SlotId,
        window: Window,
        sources: Sources<'_>,
    ) -> Result<(), DeployError> {
        let Sources { running: local, target } = sources;
        // The window holds the chunks before the first one to stage.
        let from_chunk = window.next();
        // Where each chunk goes in the slot (the running sums of the signed
        // lengths), and where the progress resumes.
        let layout = Arc::new(reader.manifest().manifest().clone());
        let resumed_bytes = layout.written_offset(from_chunk);
        // Kept: the chunks before `from_chunk`, and any in place.
        let keep = from_chunk > 0 || target.is_some();
        let mut writer = self.backend.open_writer(slot, bundle.kind, keep, bundle.payload_len)?;
        // Every bundle error names the bundle (its file, or where it is
        // fetched from): it becomes the failure reason the fleet sees.
        let bundle_err = |source| DeployError::Bundle { path: label.into(), source };
        // The chunks the device holds (by the running slot's record, or in
        // place on the slot being written) are read from there; only the
        // others are asked of the bundle.
        let total = layout.chunk_count();
        let mut scratch = Vec::new();
        // One lane per core for a bundle in several chains, read a chunk
        // of each in turn; otherwise payload order.
        let cores = thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_LANES);
        let lanes = sequencer::lanes(layout.as_ref(), from_chunk, cores);
        let order = sequencer::read_order(&lanes, total);
        let held: Vec<Option<(&LocalChunks, u64)>> = (from_chunk..total)
            .map(|i| {
                let c = layout.chunk(i)?;
                local.and_then(|l| l.find(c.hash(), c.len()).map(|at| (l, at))).or_else(|| {
                    let t = target?;
                    t.holds_in_place(reader.manifest(), i, &mut scratch)
                        .then(|| (t, layout.written_offset(i)))
                })
            })
            .collect();
        drop(scratch);
        let held_at = |index: u32| held.get((index - from_chunk) as usize).copied().flatten();
        let wanted: Vec<u32> = order.iter().copied().filter(|&i| held_at(i).is_none()).collect();
        reader.source_mut().plan(&wanted);
        let on = |s: SlotId| held.iter().flatten().filter(|(l, _)| l.slot() == s).count();
        let (from_running, in_place) = (local.map_or(0, |l| on(l.slot())), on(slot));
        let of = total - from_chunk;
        let found = match local {
            Some(l) => {
                format!("{from_running} of {of} chunks are on slot {} ({})", l.slot(), l.path().display())
            }
            None => format!("of {of} chunks"),
        };
        match (local.is_some(), in_place) {
            (false, 0) => {}
            (_, 0) => self.progress.note(&format!("{found}; fetching {}", wanted.len())),
            _ => self.progress.note(&format!(
                "{found}, {in_place} already in place on slot {slot}; fetching {}",
                wanted.len()
            )),
        }
        self.progress.start(&format!("staging {bundle} into slot {slot}"), resumed_bytes, bundle.payload_len);
        let abort = AtomicBool::new(false);
        let linked = layout.max_window() > 0;
        let (raw_tx, raw_rx) = mpsc::sync_channel::<UncheckedChunk>(8);
        // Shared by the hashers, and only by them: once they all stop,
        // the receiver is gone and the reader's sends fail.
        let raw_rx = Arc::new(Mutex::new(raw_rx));
        let (checked_tx, checked_rx) = mpsc::sync_channel::<CheckedChunk>(8);
        let spares = Spares::default();
        let (sync_tx, sync_rx) = mpsc::channel::<u32>();
        let written = Written::new(from_chunk, bundle.chunk_count, self.cfg.checkpoint_bytes, sync_tx);
        // Syncs and the journal checkpoints after them run on their own
        // thread: a sync that returns covers every write issued before it
        // started, and only then does the journal record the progress.
        let mut sync_handle = writer.handle()?;
        // Each lane of linked chunks writes what it decodes itself.
        let lane_handles = match linked {
            false => vec![],
            true => lanes.iter().map(|_| writer.handle()).collect::<Result<Vec<_>, _>>()?,
        };
        let (store, mut journal, staging) = (self.store.clone(), self.journal.clone(), bundle.clone());
        let manifest = reader.manifest().clone();
        let count = bundle.chunk_count;
        let mut told = from_chunk / PROGRESS_EVERY;
        let observer = &mut self.observer;
        let progress = &mut self.progress;
        let mut transfer =
            Transfer { reused_bytes: resumed_bytes, reused_chunks: from_chunk, ..Transfer::default() };

        // Scoped: no thread of this staging outlives it (a late syncer
        // must not overwrite the journal), and they borrow what they share.
        let (hashed, read_all, written_ok, synced) = thread::scope(|s| {
            let (onward, lanes) = sequencer::onward(
                s,
                &manifest,
                Lanes { starts: &lanes, window },
                lane_handles,
                checked_tx,
                &written,
                &abort,
                &spares,
            );
            // Lanes hash their own chunks; otherwise hashers do.
            let hashers: Vec<_> = (0..if linked { 0 } else { HASHERS })
                .map(|_| {
                    let (rx, tx, manifest, abort) = (raw_rx.clone(), onward.clone(), &manifest, &abort);
                    s.spawn(move || -> Result<(), LaneError> {
                        loop {
                            let next = rx
                                .lock()
                                .map_err(|_| BundleError::Io(std::io::Error::other("hasher lock")))?
                                .recv();
                            let Ok(chunk) = next else { return Ok(()) };
                            let checked =
                                manifest.check(chunk).inspect_err(|_| abort.store(true, Ordering::SeqCst))?;
                            hit("chunk-verified");
                            if !tx.send(checked)? {
                                return Ok(());
                            }
                        }
                    })
                })
                .collect();
            drop(raw_rx);

            let sync_thread = s.spawn(move || -> Result<Journal, DeployError> {
                while let Ok(mut upto) = sync_rx.recv() {
                    while let Ok(later) = sync_rx.try_recv() {
                        upto = later;
                    }
                    sync_handle.sync()?;
                    journal.state = DeployState::Staging { bundle: staging.clone(), slot, next_chunk: upto };
                    store.save(&mut journal)?;
                }
                // Staging ended: the last writes, made durable.
                sync_handle.sync()?;
                Ok(journal)
            });

            let (abort, written, at, spares) = (&abort, &written, &layout, &spares);
            let write_thread = s.spawn(move || -> Result<(), SlotError> {
                for chunk in checked_rx {
                    let index = chunk.index();
                    if let Err(e) = sequencer::write_chunk(writer.as_mut(), at, index, chunk.data()) {
                        abort.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                    written.record(index, chunk.data().len());
                    spares.give(chunk.into_buffer());
                }
                Ok(())
            });

            let read_all = (|| -> Result<(), DeployError> {
                for (index, at) in order.iter().map(|&i| (i, held_at(i))) {
                    if abort.load(Ordering::SeqCst) {
                        break;
                    }
                    // Sized for what goes in: the chunk as written when the
                    // device holds it, else as stored.
                    let c = layout.chunk(index);
                    let len = if at.is_some() { c.map(|c| c.len()) } else { c.map(|c| c.stored_len()) };
                    let mut buf = spares.take(len.unwrap_or(0) as usize);
                    // `Some(buf)`: still to fetch, into `buf`.
                    let to_fetch = match at {
                        Some((l, offset)) => {
                            // Checked against the new manifest here; a chunk that
                            // is not what the record said is fetched instead.
                            let len = layout.chunk(index).map_or(0, |c| c.len());
                            let read = l.read(offset, len, &mut buf);
                            hit("chunk-reused");
                            let checked = match read {
                                Ok(()) => manifest.check_written(index, buf).map_err(|e| e.1),
                                Err(_) => Err(buf),
                            };
                            match checked {
                                Ok(checked) => {
                                    transfer.reused_bytes += u64::from(len);
                                    transfer.reused_chunks += 1;
                                    if !onward.send(Checked::Written(checked)).map_err(bundle_err)? {
                                        return Ok(()); // the writer stopped; its error is reported below
                                    }
                                    None
                                }
                                Err(back) => Some(back),
                            }
                        }
                        _ => Some(buf),
                    };
                    if let Some(buf) = to_fetch {
                        let chunk = reader.read_unchecked_at(index, buf).map_err(bundle_err)?;
                        transfer.fetched_bytes +=
                            layout.chunk(index).map_or(0, |c| u64::from(c.stored_len()));
                        transfer.fetched_chunks += 1;
                        let sent = match onward.takes_read_chunks() {
                            true => onward.send_read(chunk).map_err(bundle_err)?,
                            false => raw_tx.send(chunk).is_ok(),
                        };
                        if !sent {
                            return Ok(()); // the next stage stopped; its error is reported below
                        }
                    }
                    // Reused chunks move the progress too.
                    let staged_bytes = resumed_bytes + written.bytes();
                    progress.set(staged_bytes);
                    let done = layout.chunk_at_written(staged_bytes).unwrap_or(count);
                    if done / PROGRESS_EVERY > told {
                        told = done / PROGRESS_EVERY;
                        if let Some(f) = observer.as_mut() {
                            f(EngineEvent::Progress { done, count });
                        }
                    }
                }
                Ok(())
            })();
            drop(raw_tx);
            drop(onward);
            // Every thread joined before any result is looked at.
            let join_err = |what: &str| DeployError::Nothing(format!("{what} thread panicked"));
            let mut hashed = Ok(());
            for h in hashers.into_iter().chain(lanes) {
                match h.join() {
                    Err(_) => hashed = Err(join_err("hasher")),
                    Ok(Err(e)) if hashed.is_ok() => {
                        hashed = Err(match e {
                            LaneError::Bundle(e) => bundle_err(e),
                            LaneError::Slot(e) => DeployError::Slot(e),
                        })
                    }
                    Ok(_) => {}
                }
            }
            let written_ok = write_thread.join().map_err(|_| join_err("slot writer"));
            // Every write has returned: the syncer's last sync covers them.
            written.finish();
            let synced = sync_thread.join().map_err(|_| join_err("slot syncer")).and_then(|r| r);
            (hashed, read_all, written_ok, synced)
        });
        let hashed_ok = hashed;
        let written = written_ok.and_then(|r| r.map_err(DeployError::from));
        self.progress.finish();
        // The syncer's copy of the journal is the newest one.
        if let Ok(j) = &synced {
            self.journal = j.clone();
        }
        hashed_ok?;
        read_all?;
        written?;
        synced?;
        hit("staging-written");
        // Every backend: a hook's `write` may run any `tar -x`, so no
        // archive reaches one before each entry was checked on the slot.
        let archive = reader.manifest().manifest().archive_policy();
        let staged = Staged::check(self.backend.as_ref(), slot, bundle.payload_len, archive)?;
        self.backend.finish(&staged)?;
        hit("slot-finished");
        // The record for the next delta install, before the journal names
        // the slot's bundle: a crash between the two leaves a record the
        // journal does not vouch for, which is not used.
        delta::save_head(&self.state_dir(), slot, reader.manifest().head()).map_err(JournalError::from)?;
        hit("head-saved");
        if let Some(f) = self.observer.as_mut() {
            f(EngineEvent::Transferred { bundle, transfer });
        }
        self.journal.set_slot(slot, SlotContent::Bundle(bundle.clone()));
        self.save(DeployState::Staged { bundle: bundle.clone(), slot })?;
        self.progress.note(&format!(
            "staged {bundle} in slot {slot}: {} chunks ({}) reused from the device, {} chunks ({}) fetched",
            transfer.reused_chunks,
            perch_support::mib(transfer.reused_bytes),
            transfer.fetched_chunks,
            perch_support::mib(transfer.fetched_bytes)
        ));
        Ok(())
    }

    // -------------------------------------------------------------- activation

    /// From `Staged`: waits for the inhibit gate, then activates.
    fn activate_when_allowed(&mut self) -> Result<Finished, DeployError> {
        let DeployState::Staged { bundle, slot } = self.journal.state.clone() else {
            return self.resume();
        };
        let mut said = String::new();
        while let Some(reason) = inhibit::reason(&self.cfg.inhibit) {
            if reason != said {
                self.progress.note(&format!(
                    "activation deferred: {reason}; checking again every {}",
                    perch_support::duration(self.cfg.inhibit.poll)
                ));
                said = reason;
            }
            thread::sleep(self.cfg.inhibit.poll);
        }
        let from = slot.other();
        self.save(DeployState::Activating { bundle: bundle.clone(), slot, from })?;
        self.activate(bundle, slot, from)
    }

    /// From `Activating` (persisted): switch, then start or await the trial.
    /// Safe to repeat: after a crash it runs again, so that a restart
    /// command that may not have run does run before the trial.
    fn activate(&mut self, bundle: BundleRef, slot: SlotId, from: SlotId) -> Result<Finished, DeployError> {
        hit("activating");
        let boot = self.boot_id()?;
        let switch = match self.backend.activate(slot) {
            Ok(s) => s,
            Err(e) => return self.roll_back(bundle, slot, from, RollbackReason::Activation(e.to_string())),
        };
        hit("activated");
        // Already running the new slot (a crash and reboot after the switch):
        // the trial starts now.
        let running = switch == Switch::Running || self.backend.booted()? == slot;
        match if running { Switch::Running } else { Switch::RebootRequired } {
            Switch::Running => {
                let deadline = now_unix() + self.cfg.health.trial.as_secs();
                self.save(DeployState::Trial {
                    bundle: bundle.clone(),
                    slot,
                    from,
                    boot,
                    deadline: Some(deadline),
                })?;
                self.run_trial(bundle, slot, from, deadline)
            }
            Switch::RebootRequired => {
                self.save(DeployState::Trial { bundle, slot, from, boot, deadline: None })?;
                self.progress.note(&format!("slot {slot} is set up for one trial boot"));
                self.reboot(slot)
            }
        }
    }

    fn reboot(&mut self, into: SlotId) -> Result<Finished, DeployError> {
        hit("rebooting");
        if self.backend.reboot()? {
            self.progress.note("rebooting");
        } else {
            self.progress.note(&format!("reboot the device to boot slot {into}"));
        }
        Ok(Finished::AwaitingReboot(into))
    }

    fn run_trial(
        &mut self,
        bundle: BundleRef,
        slot: SlotId,
        from: SlotId,
        deadline: u64,
    ) -> Result<Finished, DeployError> {
        hit("trial");
        let left = deadline.saturating_sub(now_unix());
        self.progress.note(&format!("trial of {bundle} in slot {slot}: health checks for up to {left}s"));
        let progress = &self.progress;
        let state_dir = self.state_dir();
        // A decision left before this trial began was for an earlier one.
        decision::withdraw(&state_dir);
        let decided = || decision::take(&state_dir, &bundle.digest);
        match health::trial(&self.cfg.health, deadline, |m| progress.note(m), decided) {
            TrialEnd::Passed | TrialEnd::Decided(Decision::Commit) => self.commit_trial(bundle, slot),
            TrialEnd::Failed(e) => self.roll_back(bundle, slot, from, RollbackReason::Health(e)),
            TrialEnd::Decided(Decision::Rollback) => {
                self.roll_back(bundle, slot, from, RollbackReason::Manual)
            }
        }
    }

    fn commit_trial(&mut self, bundle: BundleRef, slot: SlotId) -> Result<Finished, DeployError> {
        self.save(DeployState::Committing { bundle: bundle.clone(), slot })?;
        self.finish_commit(bundle, slot)
    }

    /// From `Committing` (persisted): mark the slot good, then record it.
    fn finish_commit(&mut self, bundle: BundleRef, slot: SlotId) -> Result<Finished, DeployError> {
        hit("committing");
        self.backend.confirm(slot)?;
        hit("confirmed");
        let this = Highest { counter: bundle.counter, digest: Some(bundle.digest) };
        let highest = self.journal.highest.get(&bundle.name).map_or(this, |h| h.max(this));
        self.journal.highest.insert(bundle.name.clone(), highest);
        crate::counters::save(&self.state_dir(), &self.journal.highest).map_err(JournalError::from)?;
        self.journal.last =
            Some(LastOutcome { bundle: Some(bundle.clone()), outcome: Outcome::Committed, at: now_unix() });
        self.save(DeployState::Committed { bundle: bundle.clone(), slot })?;
        Ok(Finished::Committed(bundle))
    }

    fn roll_back(
        &mut self,
        bundle: BundleRef,
        slot: SlotId,
        from: SlotId,
        reason: RollbackReason,
    ) -> Result<Finished, DeployError> {
        self.progress.note(&format!("rolling back {bundle} from slot {slot} to slot {from}: {reason}"));
        self.save(DeployState::RollingBack { bundle: bundle.clone(), slot, from, reason: reason.clone() })?;
        self.finish_roll_back(bundle, slot, from, reason)
    }

    /// From `RollingBack` (persisted).
    fn finish_roll_back(
        &mut self,
        bundle: BundleRef,
        slot: SlotId,
        from: SlotId,
        reason: RollbackReason,
    ) -> Result<Finished, DeployError> {
        hit("rolling-back");
        let switch = self.backend.rollback(from)?;
        hit("rolled-back");
        if switch == Switch::RebootRequired && self.backend.booted()? != from {
            return self.reboot(from);
        }
        self.done_rolled_back(bundle, slot, reason)
    }

    fn done_rolled_back(
        &mut self,
        bundle: BundleRef,
        slot: SlotId,
        reason: RollbackReason,
    ) -> Result<Finished, DeployError> {
        self.journal.last = Some(LastOutcome {
            bundle: Some(bundle.clone()),
            outcome: Outcome::RolledBack(reason.clone()),
            at: now_unix(),
        });
        self.save(DeployState::RolledBack { bundle: bundle.clone(), slot, reason: reason.clone() })?;
        Ok(Finished::RolledBack(bundle, reason))
    }

    // ------------------------------------------------------------------ replay

    /// Finishes or undoes whatever the journal says was in flight.
    pub fn resume(&mut self) -> Result<Finished, DeployError> {
        let booted = self.backend.booted()?;
        match self.journal.state.clone() {
            DeployState::Idle | DeployState::Failed { .. } | DeployState::RolledBack { .. } => {
                Ok(Finished::Idle)
            }
            DeployState::Committed { bundle, slot } => {
                if booted != slot {
                    // The committed slot stopped booting and the bootloader
                    // (or someone) went back: pin the slot that runs, so the
                    // next install may overwrite the other, and say so.
                    self.backend.rollback(booted)?;
                    return self.done_rolled_back(bundle, slot, RollbackReason::BootFallback);
                }
                Ok(Finished::Idle)
            }
            DeployState::Staging { bundle, .. } => Ok(Finished::NeedsBundle(bundle)),
            DeployState::Staged { bundle, slot } if booted == slot => {
                let reason = format!("slot {slot} was staged but is now the running slot; not activating it");
                self.save(DeployState::Failed { bundle: Some(bundle), reason: reason.clone() })?;
                Err(DeployError::Nothing(reason))
            }
            DeployState::Staged { .. } => self.activate_when_allowed(),
            DeployState::Activating { bundle, slot, from } => self.activate(bundle, slot, from),
            DeployState::Trial { bundle, slot, from, boot, deadline } => {
                if booted != slot {
                    if deadline.is_none() && boot == self.boot_id()? {
                        // Activated, but this boot is the one before the trial.
                        return Ok(Finished::AwaitingReboot(slot));
                    }
                    // We rebooted (or the trial was running) and the old slot is
                    // what runs: the bootloader fell back on its own.
                    return self.roll_back(bundle, slot, from, RollbackReason::BootFallback);
                }
                let deadline = match deadline {
                    Some(d) => d,
                    None => {
                        let d = now_unix() + self.cfg.health.trial.as_secs();
                        let boot = self.boot_id()?;
                        self.save(DeployState::Trial {
                            bundle: bundle.clone(),
                            slot,
                            from,
                            boot,
                            deadline: Some(d),
                        })?;
                        d
                    }
                };
                if now_unix() >= deadline {
                    return self.roll_back(
                        bundle,
                        slot,
                        from,
                        RollbackReason::Health("trial deadline passed".into()),
                    );
                }
                self.run_trial(bundle, slot, from, deadline)
            }
            DeployState::Committing { bundle, slot } => {
                if booted != slot {
                    // The bootloader gave up on the slot before it was marked
                    // good: confirming now would make a slot that failed to
                    // boot permanent.
                    return self.roll_back(bundle, slot, slot.other(), RollbackReason::BootFallback);
                }
                self.finish_commit(bundle, slot)
            }
            DeployState::RollingBack { bundle, slot, from, reason } => {
                if booted == from {
                    self.backend.rollback(from)?;
                    return self.done_rolled_back(bundle, slot, reason);
                }
                self.finish_roll_back(bundle, slot, from, reason)
            }
        }
    }

    // ------------------------------------------------------------ operator acts

    /// Commits the slot on trial now, without waiting for health checks.
    pub fn commit(&mut self) -> Result<Finished, DeployError> {
        let booted = self.backend.booted()?;
        match self.journal.state.clone() {
            DeployState::Trial { bundle, slot, .. } if booted == slot => self.commit_trial(bundle, slot),
            DeployState::Committing { bundle, slot } if booted == slot => self.finish_commit(bundle, slot),
            other => Err(DeployError::Nothing(format!("nothing to commit: the deploy is {}", other.name()))),
        }
    }

    /// Rolls back the trial, or a committed deploy to the other slot.
    pub fn rollback(&mut self) -> Result<Finished, DeployError> {
        match self.journal.state.clone() {
            DeployState::Trial { bundle, slot, from, .. }
            | DeployState::Activating { bundle, slot, from } => {
                self.roll_back(bundle, slot, from, RollbackReason::Manual)
            }
            DeployState::Committed { bundle, slot } if self.journal.slot(slot.other()).is_some() => {
                self.roll_back(bundle, slot, slot.other(), RollbackReason::Manual)
            }
            DeployState::RollingBack { bundle, slot, from, reason } => {
                self.finish_roll_back(bundle, slot, from, reason)
            }
            other => {
                Err(DeployError::Nothing(format!("nothing to roll back: the deploy is {}", other.name())))
            }
        }
    }
}

/// Refuses a bundle file shorter or longer than its signed head says, as
/// `verify_file` does, before anything is staged: delta reuse would
/// otherwise install a cut file whose missing chunks are on the device.
fn check_whole_len<R: BundleSource>(reader: &mut VerifiedBundle<R>) -> Result<(), BundleError> {
    let source = reader.source_mut();
    let Some(len) = source.whole_len().map_err(BundleError::Io)? else { return Ok(()) };
    let start = source.stream_position().map_err(BundleError::Io)?;
    reader.manifest().check_file_len(start, len)
}

/// Orders dotted versions numerically ("1.10.0" > "1.9.2"); non-numeric parts sort as 0.
fn version_key(v: &str) -> Vec<u64> {
    v.split(['.', '-', '+']).map(|p| p.parse().unwrap_or(0)).collect()
}
