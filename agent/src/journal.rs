//! The deploy journal: one file in the state directory that says where the
//! device is in a deploy, which bundle each slot holds, and the highest
//! committed release counter per bundle name.
//!
//! File format: `PERCHJNL` | version u16 | reserved u16 | body len u32 |
//! CRC-32 of body u32 | postcard body. Version 2 added dirty slots, the
//! digest of the highest committed release and the recovery notices;
//! version 1 records are still read. Written with write-temp → fsync →
//! rename → fsync dir, so it is always the old or the new record, and the
//! CRC catches anything else (bad media, hand edits).
//!
//! Each state is persisted *before* its side effects, and every side effect
//! is safe to repeat, so replaying the journal after a crash finishes or
//! undoes whatever was in flight.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::{PayloadKind, VerifiedManifest};
use perch_support::durable::{self, ReadError, Replace, WriteError};

use crate::statefile::StateFile;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"PERCHJNL";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 20;
const MAX_BODY: usize = 1 << 20;
/// The largest journal (or counters) file read; anything larger is damaged.
pub const MAX_FILE: usize = HEADER_LEN + MAX_BODY;
/// Recovery notices kept (newest last), so the journal stays small.
const MAX_NOTICES: usize = 8;
pub const JOURNAL_FILE: &str = "journal";

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotId {
    A,
    B,
}

impl SlotId {
    pub fn other(self) -> SlotId {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotId::A => "a",
            SlotId::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<SlotId> {
        match s.trim() {
            "a" | "A" => Some(SlotId::A),
            "b" | "B" => Some(SlotId::B),
            _ => None,
        }
    }

    fn index(self) -> usize {
        match self {
            SlotId::A => 0,
            SlotId::B => 1,
        }
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the journal remembers of a bundle (its manifest stays in the bundle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub name: String,
    pub counter: u64,
    pub version: String,
    pub digest: [u8; 32],
    pub kind: PayloadKind,
    pub payload_len: u64,
    pub chunk_count: u32,
}

impl BundleRef {
    pub fn of(m: &VerifiedManifest) -> Self {
        let man = m.manifest();
        BundleRef {
            name: man.name.clone(),
            counter: man.counter,
            version: man.version.clone(),
            digest: m.digest().0,
            kind: man.kind,
            payload_len: man.payload_len(),
            chunk_count: man.chunk_count(),
        }
    }
}

impl fmt::Display for BundleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} #{} ({})", self.name, self.counter, self.version)
    }
}

/// Why a trial ended in rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackReason {
    /// Health checks still failed when the trial deadline passed.
    Health(String),
    /// The bootloader booted the old slot by itself (boot count ran out).
    BootFallback,
    /// Activation itself failed.
    Activation(String),
    /// An operator asked for it.
    Manual,
}

impl fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RollbackReason::Health(m) => write!(f, "health: {m}"),
            RollbackReason::BootFallback => f.write_str("boot_fallback"),
            RollbackReason::Activation(m) => write!(f, "activation: {m}"),
            RollbackReason::Manual => f.write_str("manual"),
        }
    }
}

/// Where a deploy stands. `slot` is always the slot being installed or tried;
/// `from` the slot that was running before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DeployState {
    #[default]
    Idle,
    /// Chunks `0..next_chunk` are verified and durable in `slot`.
    Staging {
        bundle: BundleRef,
        slot: SlotId,
        next_chunk: u32,
    },
    /// `slot` holds the complete, verified payload.
    Staged {
        bundle: BundleRef,
        slot: SlotId,
    },
    /// Switching the bootloader (or symlink) to `slot`.
    Activating {
        bundle: BundleRef,
        slot: SlotId,
        from: SlotId,
    },
    /// `slot` is on trial. `boot` is the boot id when it was activated, so a
    /// reboot can be told from no reboot; `deadline` (Unix seconds) is set
    /// once the new slot is running.
    Trial {
        bundle: BundleRef,
        slot: SlotId,
        from: SlotId,
        boot: String,
        deadline: Option<u64>,
    },
    /// Health passed; marking `slot` good in the bootloader.
    Committing {
        bundle: BundleRef,
        slot: SlotId,
    },
    Committed {
        bundle: BundleRef,
        slot: SlotId,
    },
    /// Switching back to `from`.
    RollingBack {
        bundle: BundleRef,
        slot: SlotId,
        from: SlotId,
        reason: RollbackReason,
    },
    RolledBack {
        bundle: BundleRef,
        slot: SlotId,
        reason: RollbackReason,
    },
    /// Failed before activation: the running slot never changed.
    Failed {
        bundle: Option<BundleRef>,
        reason: String,
    },
}

impl DeployState {
    pub fn name(&self) -> &'static str {
        match self {
            DeployState::Idle => "idle",
            DeployState::Staging { .. } => "staging",
            DeployState::Staged { .. } => "staged",
            DeployState::Activating { .. } => "activating",
            DeployState::Trial { .. } => "trial",
            DeployState::Committing { .. } => "committing",
            DeployState::Committed { .. } => "committed",
            DeployState::RollingBack { .. } => "rolling_back",
            DeployState::RolledBack { .. } => "rolled_back",
            DeployState::Failed { .. } => "failed",
        }
    }

    /// States a new install must not interrupt: the running slot or the
    /// bootloader is mid-change.
    pub fn is_switching(&self) -> bool {
        matches!(
            self,
            DeployState::Activating { .. }
                | DeployState::Trial { .. }
                | DeployState::Committing { .. }
                | DeployState::RollingBack { .. }
        )
    }

    pub fn bundle(&self) -> Option<&BundleRef> {
        match self {
            DeployState::Idle => None,
            DeployState::Failed { bundle, .. } => bundle.as_ref(),
            DeployState::Staging { bundle, .. }
            | DeployState::Staged { bundle, .. }
            | DeployState::Activating { bundle, .. }
            | DeployState::Trial { bundle, .. }
            | DeployState::Committing { bundle, .. }
            | DeployState::Committed { bundle, .. }
            | DeployState::RollingBack { bundle, .. }
            | DeployState::RolledBack { bundle, .. } => Some(bundle),
        }
    }
}

/// How the last deploy ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    RolledBack(RollbackReason),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOutcome {
    pub bundle: Option<BundleRef>,
    pub outcome: Outcome,
    pub at: u64,
}

/// What a slot holds, as far as the journal knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SlotContent {
    /// Nothing perch installed (a factory image, or unknown).
    #[default]
    Unknown,
    /// A complete, verified bundle.
    Bundle(BundleRef),
    /// Written to from this bundle, but not (yet) complete: staging was
    /// interrupted, failed, or the bundle was rejected after some verified
    /// chunks had already been written. Not a known bundle.
    Dirty(BundleRef),
}

/// The highest committed release of one bundle name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Highest {
    pub counter: u64,
    /// Its digest; `None` when recorded by a version-1 journal.
    pub digest: Option<[u8; 32]>,
}

impl Highest {
    /// The higher of two records; at equal counters the one that knows its digest.
    pub fn max(self, other: Highest) -> Highest {
        match self.counter.cmp(&other.counter) {
            std::cmp::Ordering::Less => other,
            std::cmp::Ordering::Greater => self,
            std::cmp::Ordering::Equal => {
                Highest { counter: self.counter, digest: self.digest.or(other.digest) }
            }
        }
    }
}

/// Highest committed release per bundle name (rollback protection).
pub type Counters = BTreeMap<String, Highest>;

/// Merges `from` into `into`, keeping the higher record of each name.
pub fn merge_counters(into: &mut Counters, from: &Counters) {
    for (name, h) in from {
        let merged = into.get(name).map_or(*h, |mine| mine.max(*h));
        into.insert(name.clone(), merged);
    }
}

/// A damaged or lost state file the agent recovered from: shown by
/// `status` long after the one log line scrolled away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub at: u64,
    pub text: String,
}

/// The whole persisted record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Journal {
    /// Bumped on every write; shows in `status` and helps tests order records.
    pub seq: u64,
    pub state: DeployState,
    /// What each slot holds.
    pub slots: [SlotContent; 2],
    /// Highest committed release per bundle name (rollback protection).
    pub highest: Counters,
    pub last: Option<LastOutcome>,
    /// State files found damaged or lost, oldest first (at most [`MAX_NOTICES`]).
    pub notices: Vec<Notice>,
}

/// The version-1 record, read for upgrades.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct JournalV1 {
    seq: u64,
    state: DeployState,
    slots: [Option<BundleRef>; 2],
    highest: BTreeMap<String, u64>,
    last: Option<LastOutcome>,
}

impl From<JournalV1> for Journal {
    fn from(v1: JournalV1) -> Journal {
        let slot = |b: Option<BundleRef>| b.map_or(SlotContent::Unknown, SlotContent::Bundle);
        let [a, b] = v1.slots;
        Journal {
            seq: v1.seq,
            state: v1.state,
            slots: [slot(a), slot(b)],
            highest: v1
                .highest
                .into_iter()
                .map(|(name, counter)| (name, Highest { counter, digest: None }))
                .collect(),
            last: v1.last,
            notices: Vec::new(),
        }
    }
}

impl Journal {
    /// The complete bundle `s` holds, if it holds one.
    pub fn slot(&self, s: SlotId) -> Option<&BundleRef> {
        match &self.slots[s.index()] {
            SlotContent::Bundle(b) => Some(b),
            SlotContent::Unknown | SlotContent::Dirty(_) => None,
        }
    }

    pub fn slot_content(&self, s: SlotId) -> &SlotContent {
        &self.slots[s.index()]
    }

    pub fn set_slot(&mut self, s: SlotId, c: SlotContent) {
        self.slots[s.index()] = c;
    }

    /// The highest committed counter of `name`.
    pub fn highest_counter(&self, name: &str) -> Option<u64> {
        self.highest.get(name).map(|h| h.counter)
    }

    /// Records a recovery, dropping the oldest beyond [`MAX_NOTICES`].
    pub fn add_notice(&mut self, at: u64, text: String) {
        self.notices.push(Notice { at, text });
        let excess = self.notices.len().saturating_sub(MAX_NOTICES);
        self.notices.drain(..excess);
    }

    pub fn encode(&self) -> Vec<u8> {
        let body =
            postcard::to_allocvec(self).expect("postcard encoding of an in-memory struct is infallible");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crate::checksum::crc32(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Journal, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("truncated ({} bytes)", bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err("bad magic".into());
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != 1 && version != VERSION {
            return Err(format!("unsupported journal version {version}"));
        }
        if bytes[10..12] != [0, 0] {
            return Err("reserved header bytes are not zero".into());
        }
        let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
        let crc = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let body = &bytes[HEADER_LEN..];
        if body.len() != len {
            return Err(format!("body is {} bytes, header says {len}", body.len()));
        }
        if crate::checksum::crc32(body) != crc {
            return Err("CRC mismatch".into());
        }
        let decoded = if version == 1 {
            postcard::take_from_bytes::<JournalV1>(body).map(|(j, rest)| (Journal::from(j), rest))
        } else {
            postcard::take_from_bytes::<Journal>(body)
        };
        match decoded {
            Ok((j, [])) => Ok(j),
            Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
            Err(e) => Err(format!("undecodable body: {e}")),
        }
    }
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The journal file in a state directory.
#[derive(Clone)]
pub struct JournalStore {
    path: PathBuf,
}

impl JournalStore {
    pub fn new(state_dir: &Path) -> Self {
        Self { path: state_dir.join(JOURNAL_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the journal; a missing file is a fresh device (Idle). A
    /// damaged one (garbage, over the size cap, a directory) is
    /// [`JournalError::Corrupt`].
    pub fn load(&self) -> Result<Journal, JournalError> {
        Ok(self.load_existing()?.unwrap_or_default())
    }

    /// Loads the journal; `None` if there is none.
    pub fn load_existing(&self) -> Result<Option<Journal>, JournalError> {
        let corrupt = |detail| JournalError::Corrupt { path: self.path.clone(), detail };
        match crate::statefile::read(&self.path, MAX_FILE)? {
            StateFile::Missing => Ok(None),
            StateFile::Damaged(why) => Err(corrupt(why)),
            StateFile::Bytes(b) => Journal::decode(&b).map(Some).map_err(corrupt),
        }
    }

    pub fn save(&self, j: &mut Journal) -> Result<(), JournalError> {
        j.seq += 1;
        durable::write_bytes(&self.path, 0o600, Replace::Allow, &j.encode())?;
        crate::failpoint::hit("journal-saved");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        let b = BundleRef {
            name: "os".into(),
            counter: 4,
            version: "1.2".into(),
            digest: [9; 32],
            kind: PayloadKind::Image,
            payload_len: 1000,
            chunk_count: 1,
        };
        let mut j = Journal {
            state: DeployState::Trial {
                bundle: b.clone(),
                slot: SlotId::B,
                from: SlotId::A,
                boot: "x".into(),
                deadline: Some(77),
            },
            ..Journal::default()
        };
        j.set_slot(SlotId::B, SlotContent::Bundle(b.clone()));
        j.set_slot(SlotId::A, SlotContent::Dirty(b));
        j.highest.insert("os".into(), Highest { counter: 3, digest: Some([1; 32]) });
        j.add_notice(5, "counters damaged".into());
        j
    }

    #[test]
    fn round_trip() {
        let j = sample();
        assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
    }

    #[test]
    fn a_version_1_journal_still_loads() {
        let b = sample().slot(SlotId::B).cloned();
        let v1 = JournalV1 {
            seq: 9,
            state: DeployState::Idle,
            slots: [None, b.clone()],
            highest: [("os".to_string(), 4)].into(),
            last: None,
        };
        let body = postcard::to_allocvec(&v1).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crate::checksum::crc32(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let j = Journal::decode(&bytes).unwrap();
        assert_eq!(j.seq, 9);
        assert_eq!(j.slot(SlotId::B), b.as_ref());
        assert_eq!(j.slot_content(SlotId::A), &SlotContent::Unknown);
        assert_eq!(j.highest["os"], Highest { counter: 4, digest: None });
    }

    #[test]
    fn counters_merge_to_the_highest_of_each_name() {
        let h = |counter, d: Option<u8>| Highest { counter, digest: d.map(|d| [d; 32]) };
        let mut a: Counters = [("os".to_string(), h(9, Some(1))), ("app".to_string(), h(2, None))].into();
        let b: Counters = [("os".to_string(), h(4, Some(2))), ("app".to_string(), h(2, Some(3)))].into();
        merge_counters(&mut a, &b);
        assert_eq!(a["os"], h(9, Some(1)));
        assert_eq!(a["app"], h(2, Some(3)), "an equal counter keeps the digest it knows");
    }

    #[test]
    fn every_flip_and_truncation_is_caught() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x04;
            assert!(Journal::decode(&b).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(Journal::decode(&bytes[..n]).is_err(), "cut at {n}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Journal::decode(&data);
            for version in [1u8, 2] {
                let mut framed = MAGIC.to_vec();
                framed.extend_from_slice(&[version, 0, 0, 0]);
                framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
                framed.extend_from_slice(&crate::checksum::crc32(&data).to_le_bytes());
                framed.extend_from_slice(&data);
                if let Ok(j) = Journal::decode(&framed) {
                    proptest::prop_assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
                }
            }
        }
    }
}
