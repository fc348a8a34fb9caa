//! The deploy journal: one file in the state directory that says where the
//! device is in a deploy, which bundle each slot holds, and the highest
//! committed release counter per bundle name.
//!
//! File format: `PERCHJNL` | version u16 | reserved u16 | body len u32 |
//! CRC-32 of body u32 | postcard body. Written with write-temp → fsync →
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
use perch_support::durable::{self, read_bounded, ReadError, Replace, WriteError};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"PERCHJNL";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 20;
const MAX_BODY: usize = 1 << 20;
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
            payload_len: man.payload_len,
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

/// The whole persisted record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Journal {
    /// Bumped on every write; shows in `status` and helps tests order records.
    pub seq: u64,
    pub state: DeployState,
    /// What each slot holds, when it is known to be complete.
    pub slots: [Option<BundleRef>; 2],
    /// Highest committed counter per bundle name (rollback protection).
    pub highest: BTreeMap<String, u64>,
    pub last: Option<LastOutcome>,
}

impl Journal {
    pub fn slot(&self, s: SlotId) -> Option<&BundleRef> {
        self.slots[s.index()].as_ref()
    }

    pub fn set_slot(&mut self, s: SlotId, b: Option<BundleRef>) {
        self.slots[s.index()] = b;
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
        if version != VERSION {
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
        match postcard::take_from_bytes::<Journal>(body) {
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

    /// Loads the journal; a missing file is a fresh device (Idle).
    pub fn load(&self) -> Result<Journal, JournalError> {
        if !self.path.exists() {
            return Ok(Journal::default());
        }
        let bytes = read_bounded(&self.path, HEADER_LEN + MAX_BODY)?;
        Journal::decode(&bytes).map_err(|detail| JournalError::Corrupt { path: self.path.clone(), detail })
    }

    pub fn save(&self, j: &mut Journal) -> Result<(), JournalError> {
        j.seq += 1;
        durable::write_bytes(&self.path, 0o600, Replace::Allow, &j.encode())?;
        crate::failpoint::hit("journal-saved");
        Ok(())
    }

    /// Moves a corrupt journal aside (kept for inspection) so the agent can
    /// start again from a safe state.
    pub fn quarantine(&self) -> std::io::Result<PathBuf> {
        let aside = self.path.with_extension(format!("corrupt-{}", perch_support::now_unix()));
        std::fs::rename(&self.path, &aside)?;
        Ok(aside)
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
        j.set_slot(SlotId::B, Some(b));
        j.highest.insert("os".into(), 3);
        j
    }

    #[test]
    fn round_trip() {
        let j = sample();
        assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
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
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&[1, 0, 0, 0]);
            framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
            framed.extend_from_slice(&crate::checksum::crc32(&data).to_le_bytes());
            framed.extend_from_slice(&data);
            let _ = Journal::decode(&framed);
        }
    }
}
