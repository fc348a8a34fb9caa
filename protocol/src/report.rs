//! Device reports: what a device tells the fleet, through its outbox, into
//! the JetStream stream `PERCH_REPORTS`.
//!
//! Every report carries the device id, its per-device sequence number, the
//! boot id, the agent version, the running slot and bundle, and the deploy
//! journal's state: the fleet's status view is built from nothing else.
//! On the wire a report is postcard; its `Nats-Msg-Id` is
//! `<device>.<epoch>.<seq>`, so a resend after a reconnect is stored once.
//!
//! Sequence numbers count within an *epoch*: a random number the device's
//! outbox draws when it is created. A device whose state was wiped (reflashed,
//! re-provisioned) starts again at 1 in a new epoch, so its new reports are
//! neither taken for resends of its old ones nor ranked below them.

use serde::{Deserialize, Serialize};

use crate::subjects::is_token;

/// Largest encoded report accepted.
pub const MAX_REPORT: usize = 64 * 1024;

/// Which outbox lane a report travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lane {
    /// Deployment events and outcomes: never dropped.
    Events,
    /// Heartbeats and telemetry: the oldest are dropped when over budget.
    Telemetry,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Events, Lane::Telemetry];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Events => "events",
            Lane::Telemetry => "telemetry",
        }
    }
}

/// The bundle a slot runs or a deploy is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleInfo {
    pub name: String,
    pub counter: u64,
    pub version: String,
    #[serde(with = "crate::readable")]
    pub digest: [u8; 32],
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportKind {
    /// The agent is alive; sent at the heartbeat interval.
    Heartbeat,
    /// The deploy journal changed state (`Staging`, `Trial`, `Committed`...).
    /// A deploy state the device reached, why, and the bundle (digest) it
    /// is about, so a rollout can tell this bundle's outcome from another's.
    Deploy {
        state: String,
        reason: Option<String>,
        #[serde(with = "crate::readable::option")]
        bundle: Option<[u8; 32]>,
    },
    /// Staging progress, every N chunks.
    Progress { chunks_done: u32, chunk_count: u32 },
    /// Telemetry records `first..=last` were dropped to stay in budget.
    Dropped { first: u64, last: u64, count: u64 },
    /// Free-form, for tests and operators' own checks.
    Note(String),
    /// How a bundle was staged: the bytes the device already held
    /// (`reused`: read from its slots and checked against the new
    /// manifest) and the bytes read from the bundle (`fetched`: as stored,
    /// so compressed where the chunk is). Sent once staging is done.
    /// Appended last: older readers' variants keep their tags.
    Transfer {
        #[serde(with = "crate::readable")]
        bundle: [u8; 32],
        reused_bytes: u64,
        reused_chunks: u32,
        fetched_bytes: u64,
        fetched_chunks: u32,
    },
}

/// One report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub device: String,
    /// The outbox's epoch: `seq` counts within it.
    pub epoch: u64,
    pub seq: u64,
    pub boot_id: String,
    pub agent_version: String,
    /// Unix seconds on the device's clock (shown, never trusted).
    pub at: u64,
    /// `a` or `b`, if known.
    pub running_slot: Option<String>,
    pub running_bundle: Option<BundleInfo>,
    /// The deploy journal's state name.
    pub journal_state: String,
    pub kind: ReportKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("report is {0} bytes, over the {MAX_REPORT}-byte limit")]
    TooLarge(usize),
    #[error("report is malformed: {0}")]
    Malformed(String),
    #[error("report names device '{0}', which is not a valid device id")]
    BadDevice(String),
}

impl Report {
    pub fn to_bytes(&self) -> Vec<u8> {
        crate::codec::encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ReportError> {
        if bytes.len() > MAX_REPORT {
            return Err(ReportError::TooLarge(bytes.len()));
        }
        let r: Report = crate::codec::decode_exact(bytes).map_err(ReportError::Malformed)?;
        if !is_token(&r.device) {
            return Err(ReportError::BadDevice(r.device.chars().take(80).collect()));
        }
        Ok(r)
    }

    /// The `Nats-Msg-Id` of this report: `<device>.<epoch>.<seq>`.
    pub fn msg_id(&self) -> String {
        msg_id(&self.device, self.epoch, self.seq)
    }
}

/// The `Nats-Msg-Id` of a device's report `seq` in `epoch` (16 hex digits).
pub fn msg_id(device: &str, epoch: u64, seq: u64) -> String {
    format!("{device}.{epoch:016x}.{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            device: "drone-1".into(),
            epoch: 0x0123_4567_89ab_cdef,
            seq: 42,
            boot_id: "b".into(),
            agent_version: "0.1.0".into(),
            at: 1,
            running_slot: Some("a".into()),
            running_bundle: None,
            journal_state: "Idle".into(),
            kind: ReportKind::Heartbeat,
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(Report::from_bytes(&r.to_bytes()).unwrap(), r);
        assert_eq!(r.msg_id(), "drone-1.0123456789abcdef.42");
        let mut bad = sample();
        bad.device = "a.b".into();
        assert!(matches!(Report::from_bytes(&bad.to_bytes()), Err(ReportError::BadDevice(_))));
    }

    proptest::proptest! {
        #[test]
        fn hostile_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Report::from_bytes(&data);
        }
    }
}
