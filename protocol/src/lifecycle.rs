//! Choria lifecycle events, so Choria tooling sees perch devices come and
//! go: `io.choria.lifecycle.v1.startup` / `.shutdown` JSON on
//! `choria.lifecycle.event.<type>.perch` (plain NATS, best effort, as in
//! Choria itself). Schema: choria-io/schemas, `choria/lifecycle/v1`.

use serde::{Deserialize, Serialize};

/// The component name perch devices announce.
pub const COMPONENT: &str = "perch";

/// The kinds perch emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Shutdown,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Startup => "startup",
            Kind::Shutdown => "shutdown",
        }
    }
}

/// The subject an event of `kind` goes to.
pub fn subject(kind: Kind) -> String {
    format!("choria.lifecycle.event.{}.{COMPONENT}", kind.as_str())
}

/// One event, as Choria's `go-lifecycle` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub protocol: String,
    /// A UUID, unique per event.
    pub id: String,
    /// The device id.
    pub identity: String,
    pub component: String,
    pub timestamp: u64,
    /// The agent version (startup only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
}

impl Event {
    /// `id` is 16 random bytes (a version 4 UUID is made of them).
    pub fn new(kind: Kind, identity: &str, version: &str, id: [u8; 16], now: u64) -> Event {
        Event {
            protocol: format!("io.choria.lifecycle.v1.{}", kind.as_str()),
            id: uuid_v4(id),
            identity: identity.into(),
            component: COMPONENT.into(),
            timestamp: now,
            version: (kind == Kind::Startup).then(|| version.to_string()),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Formats 16 random bytes as a version 4 (random) UUID.
fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_like_choria_s() {
        let e = Event::new(Kind::Startup, "drone-7", "0.1.0", [0xab; 16], 1535369537);
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["protocol"], "io.choria.lifecycle.v1.startup");
        assert_eq!(v["identity"], "drone-7");
        assert_eq!(v["component"], "perch");
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["timestamp"], 1535369537);
        assert_eq!(v["id"], "abababab-abab-4bab-abab-abababababab");
        let s = Event::new(Kind::Shutdown, "drone-7", "0.1.0", [0; 16], 1);
        assert!(!String::from_utf8(s.to_json()).unwrap().contains("version"));
        assert_eq!(subject(Kind::Shutdown), "choria.lifecycle.event.shutdown.perch");
    }
}
