//! Presence advisories in the shape of Choria's stream replicator
//! (`io.choria.sr.v2.age_advisory`), so Choria-side tooling that watches
//! nodes come and go watches perch devices unchanged.
//!
//! `perch watch` sends one when a device is first heard from (`new`), goes
//! quiet for longer than the stale limit (`timeout`), is heard from again
//! (`recover`), or stays quiet past the expiry limit (`expire`), as plain
//! NATS messages on `perch.advisories.<event>.<device>`.

use serde::{Deserialize, Serialize};

pub const PROTOCOL: &str = "io.choria.sr.v2.age_advisory";

/// The report field that names a device: what `value` holds.
pub const INSPECT_FIELD: &str = "device";

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvisoryEvent {
    /// First heard from (or heard from again after it expired).
    New,
    /// Quiet for longer than the stale limit.
    Timeout,
    /// Heard from again after a timeout.
    Recover,
    /// Quiet past the expiry limit: no more advisories until it is heard from.
    Expire,
}

impl AdvisoryEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AdvisoryEvent::New => "new",
            AdvisoryEvent::Timeout => "timeout",
            AdvisoryEvent::Recover => "recover",
            AdvisoryEvent::Expire => "expire",
        }
    }
}

/// One advisory, field for field as Choria's replicator writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgeAdvisory {
    pub protocol: String,
    /// A KSUID: unique, and sorts by time.
    pub event_id: String,
    pub inspect_field: String,
    /// Seconds since the device was last heard from; -1 if never.
    pub age: f64,
    /// When it was last heard from (Unix seconds; 0 if never).
    pub seen: i64,
    /// Which `perch watch` sent it (its `--name`).
    pub replicator: String,
    /// When it was sent (Unix seconds).
    pub timestamp: i64,
    pub event: AdvisoryEvent,
    /// The device id.
    pub value: String,
}

impl AgeAdvisory {
    /// An advisory about `device`, last heard from at `seen` (None: never).
    /// `random` makes the event id unique.
    pub fn new(
        event: AdvisoryEvent,
        device: &str,
        seen: Option<u64>,
        now: u64,
        replicator: &str,
        random: [u8; 16],
    ) -> AgeAdvisory {
        AgeAdvisory {
            protocol: PROTOCOL.into(),
            event_id: ksuid(now, random),
            inspect_field: INSPECT_FIELD.into(),
            age: seen.map_or(-1.0, |s| now.saturating_sub(s) as f64),
            seen: seen.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
            replicator: replicator.into(),
            timestamp: i64::try_from(now).unwrap_or(i64::MAX),
            event,
            value: device.into(),
        }
    }

    pub fn subject(&self) -> String {
        subject(self.event, &self.value)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `perch.advisories.<event>.<device>`.
pub fn subject(event: AdvisoryEvent, device: &str) -> String {
    format!("{ALL_PREFIX}.{}.{device}", event.as_str())
}

const ALL_PREFIX: &str = "perch.advisories";

/// Every advisory: `perch.advisories.>`.
pub const ALL: &str = "perch.advisories.>";

/// A KSUID (27 base62 digits of 4 bytes of seconds since 2014-05-13 and 16
/// random bytes), as Choria's replicator uses for `event_id`: ids sort by
/// the time they were made.
pub fn ksuid(now: u64, random: [u8; 16]) -> String {
    const EPOCH: u64 = 1_400_000_000;
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let secs = u32::try_from(now.saturating_sub(EPOCH)).unwrap_or(u32::MAX);
    let mut n = [0u8; 20];
    n[..4].copy_from_slice(&secs.to_be_bytes());
    n[4..].copy_from_slice(&random);
    // Base 62 by long division of the 160-bit big-endian number.
    let mut out = [b'0'; 27];
    for slot in out.iter_mut().rev() {
        let mut rem = 0u32;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        *slot = DIGITS[rem as usize];
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksuids_are_27_base62_digits_and_sort_by_time() {
        // The KSUID spec's largest value, and a time before its epoch.
        assert_eq!(ksuid(1_400_000_000 + u64::from(u32::MAX), [0xff; 16]), "aWgEPTl1tmebfsQzFP4bxwgy80V");
        assert_eq!(ksuid(0, [0; 16]), "000000000000000000000000000");
        let a = ksuid(1_700_000_000, [0xff; 16]);
        let b = ksuid(1_700_000_001, [0; 16]);
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), 27);
    }

    #[test]
    fn an_advisory_reads_as_choria_writes_one() {
        let a = AgeAdvisory::new(AdvisoryEvent::Timeout, "drone-7", Some(1000), 1600, "hq", [1; 16]);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["protocol"], "io.choria.sr.v2.age_advisory");
        assert_eq!(
            (v["age"].as_f64(), &v["seen"], &v["event"]),
            (Some(600.0), &1000.into(), &"timeout".into())
        );
        assert_eq!(a.subject(), "perch.advisories.timeout.drone-7");
        let never = AgeAdvisory::new(AdvisoryEvent::Timeout, "d", None, 1600, "hq", [1; 16]);
        assert_eq!((never.age, never.seen), (-1.0, 0));
        assert_eq!(serde_json::from_slice::<AgeAdvisory>(&a.to_bytes()).unwrap(), a);
    }
}
