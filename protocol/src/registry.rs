//! The device registry's records, as stored in the JetStream KV bucket
//! `PERCH_REGISTRY` under `device.<id>` (JSON). The provisioner writes them
//! (perch-bootstrap); the operator's `perch status` reads them.

use serde::{Deserialize, Serialize};

const DEVICE_PREFIX: &str = "device.";

/// The registry key of a device's record.
pub fn device_key(id: &str) -> String {
    format!("{DEVICE_PREFIX}{id}")
}

/// The device id a registry key names, if it is a device record's key.
pub fn device_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(DEVICE_PREFIX)
}

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Asked with a manual-approval token; waits for `approve`.
    Pending,
    /// Approved; enrolled the next time it asks.
    Approved,
    Enrolled,
    Rejected,
    Revoked,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pad, not write_str: tables give it a width.
        f.pad(match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Enrolled => "enrolled",
            Status::Rejected => "rejected",
            Status::Revoked => "revoked",
        })
    }
}

/// A request to enroll a known device id with a new key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rekey {
    /// The new perch device key (hex).
    pub key: String,
    pub requested_at: u64,
    pub approved: bool,
}

/// What the registry knows of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub status: Status,
    /// The perch device key (hex); also its NATS user nkey.
    pub key: String,
    pub nats_user: String,
    pub groups: Vec<String>,
    pub target: String,
    pub agent_version: String,
    /// The token it enrolled with (hex id); none for the offline path.
    pub token: Option<String>,
    /// `token` or `offline`.
    pub via: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub enrolled_at: Option<u64>,
    #[serde(default)]
    pub rekey: Option<Rekey>,
    /// The last request nonces seen (hex): a replayed request is refused.
    #[serde(default)]
    pub nonces: Vec<String>,
}

/// How many request nonces a record remembers.
const NONCES_KEPT: usize = 16;

impl DeviceRecord {
    pub fn remember_nonce(&mut self, nonce: &[u8; 16]) {
        self.nonces.push(hex::encode(nonce));
        let excess = self.nonces.len().saturating_sub(NONCES_KEPT);
        self.nonces.drain(..excess);
    }

    pub fn has_nonce(&self, nonce: &[u8; 16]) -> bool {
        let n = hex::encode(nonce);
        self.nonces.contains(&n)
    }
}
