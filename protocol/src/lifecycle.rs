//! Choria lifecycle events, so Choria tooling sees perch devices come and
//! go: `io.choria.lifecycle.v1.<kind>` JSON on
//! `choria.lifecycle.event.<kind>.<component>` (plain NATS, best effort,
//! as in Choria itself). Schema: choria-io/schemas, `choria/lifecycle/v1`.
//!
//! A device sends `startup`, `alive` (on its heartbeat), `provisioned`
//! (once, after it enrolled), `upgraded` (when a deploy commits: `version`
//! and `new_version` are the bundles before and after, `NAME@COUNTER`) and
//! `shutdown`. It never publishes on `choria.>` itself: it sends its events
//! on its own subject ([`crate::subjects::lifecycle`]), and the provisioner
//! republishes those that [`Event::from_device`] accepts. So `identity` in
//! what Choria tooling reads is always the id of the device that sent it.
//! The provisioner announces itself (`startup`, `shutdown`) as
//! [`PROVISIONER`].

use serde::{Deserialize, Serialize};

/// The component name perch devices announce.
pub const COMPONENT: &str = "perch";

/// The component name a provisioner announces.
pub const PROVISIONER: &str = "perch-provisioner";

/// The `version` of an `upgraded` event when the slot held no bundle perch knows.
pub const NO_BUNDLE: &str = "none";

/// The kinds perch emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Shutdown,
    Alive,
    Provisioned,
    Upgraded,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Startup => "startup",
            Kind::Shutdown => "shutdown",
            Kind::Alive => "alive",
            Kind::Provisioned => "provisioned",
            Kind::Upgraded => "upgraded",
        }
    }

    fn from_protocol(protocol: &str) -> Option<Kind> {
        Some(match protocol.strip_prefix("io.choria.lifecycle.v1.")? {
            "startup" => Kind::Startup,
            "shutdown" => Kind::Shutdown,
            "alive" => Kind::Alive,
            "provisioned" => Kind::Provisioned,
            "upgraded" => Kind::Upgraded,
            _ => return None,
        })
    }

    /// Which of `version` and `new_version` Choria's schema requires.
    fn versions(self) -> (bool, bool) {
        match self {
            Kind::Startup | Kind::Alive => (true, false),
            Kind::Shutdown | Kind::Provisioned => (false, false),
            Kind::Upgraded => (true, true),
        }
    }
}

/// The subject a device's event of `kind` goes to.
pub fn subject(kind: Kind) -> String {
    subject_of(kind, COMPONENT)
}

/// The subject an event of `kind` from `component` goes to.
pub fn subject_of(kind: Kind, component: &str) -> String {
    format!("choria.lifecycle.event.{}.{component}", kind.as_str())
}

/// Longest event accepted from a device (perch's own are about 250 bytes).
pub const MAX_EVENT: usize = 1024;

/// Longest `version` or `new_version` accepted (`NAME@COUNTER` of an
/// `upgraded` event: a 64-byte name and a 20-digit counter).
pub const MAX_VERSION: usize = 96;

/// Why an event from a device is not republished.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("lifecycle event of {0} bytes (limit {MAX_EVENT})")]
    TooLarge(usize),
    #[error("lifecycle event is not an io.choria.lifecycle.v1 event: {0}")]
    Malformed(String),
    #[error("lifecycle event protocol {0:?} is not one perch sends")]
    Protocol(String),
    #[error("lifecycle event component {0:?} is not perch")]
    Component(String),
    #[error("lifecycle event id {0:?} is not a version 4 UUID")]
    Id(String),
    #[error("lifecycle event version or new_version is missing, extra, too long or not printable")]
    Version,
    #[error("lifecycle event names identity {claimed:?} but came from device {sender:?}")]
    Identity { claimed: String, sender: String },
}

/// One event, as Choria's `go-lifecycle` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub protocol: String,
    /// A UUID, unique per event.
    pub id: String,
    /// The device id.
    pub identity: String,
    pub component: String,
    pub timestamp: u64,
    /// The agent version (startup, alive), or the bundle before
    /// (upgraded).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    /// The bundle after (upgraded only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub new_version: Option<String>,
}

impl Event {
    /// A device's event; `version` is the agent's, kept where the kind
    /// has one. `id` is 16 random bytes (a version 4 UUID is made of
    /// them). For `upgraded`, see [`Event::upgraded`].
    pub fn new(kind: Kind, identity: &str, version: &str, id: [u8; 16], now: u64) -> Event {
        Event {
            protocol: format!("io.choria.lifecycle.v1.{}", kind.as_str()),
            id: uuid_v4(id),
            identity: identity.into(),
            component: COMPONENT.into(),
            timestamp: now,
            version: kind.versions().0.then(|| version.to_string()),
            new_version: None,
        }
    }

    /// A device's `upgraded` event: the bundle it ran before (`NAME@COUNTER`,
    /// or [`NO_BUNDLE`]) and the one it committed.
    pub fn upgraded(identity: &str, before: &str, after: &str, id: [u8; 16], now: u64) -> Event {
        Event {
            version: Some(before.into()),
            new_version: Some(after.into()),
            ..Event::new(Kind::Upgraded, identity, before, id, now)
        }
    }

    /// The same event with a fresh id (16 random bytes) and time: as it is
    /// sent, which may be later than it was made.
    pub fn stamped(mut self, id: [u8; 16], now: u64) -> Event {
        (self.id, self.timestamp) = (uuid_v4(id), now);
        self
    }

    /// The same event from another component (the provisioner's own).
    pub fn from_component(mut self, component: &str) -> Event {
        self.component = component.into();
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// An event `sender` published on its own subject, checked field by
    /// field: exactly what a perch agent sends, and about `sender` only.
    pub fn from_device(payload: &[u8], sender: &str) -> Result<(Kind, Event), LifecycleError> {
        if payload.len() > MAX_EVENT {
            return Err(LifecycleError::TooLarge(payload.len()));
        }
        let e: Event =
            serde_json::from_slice(payload).map_err(|err| LifecycleError::Malformed(err.to_string()))?;
        let Some(kind) = Kind::from_protocol(&e.protocol) else {
            return Err(LifecycleError::Protocol(e.protocol));
        };
        if e.component != COMPONENT {
            return Err(LifecycleError::Component(e.component));
        }
        if !is_uuid_v4(&e.id) {
            return Err(LifecycleError::Id(e.id));
        }
        let fits = |v: &Option<String>, wanted: bool| match v {
            Some(v) => {
                wanted && !v.is_empty() && v.len() <= MAX_VERSION && v.bytes().all(|c| c.is_ascii_graphic())
            }
            None => !wanted,
        };
        let (version, new_version) = kind.versions();
        if !fits(&e.version, version) || !fits(&e.new_version, new_version) {
            return Err(LifecycleError::Version);
        }
        if e.identity != sender {
            return Err(LifecycleError::Identity { claimed: e.identity, sender: sender.into() });
        }
        Ok((kind, e))
    }
}

/// Whether `s` is a lowercase version 4 UUID as [`uuid_v4`] writes it.
fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            14 => c == b'4',
            19 => matches!(c, b'8' | b'9' | b'a' | b'b'),
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
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

    #[test]
    fn a_device_s_own_events_are_accepted_as_sent() {
        for kind in [Kind::Startup, Kind::Shutdown, Kind::Alive, Kind::Provisioned] {
            let e = Event::new(kind, "drone-7", "0.1.0", [7; 16], 5);
            assert_eq!(Event::from_device(&e.to_json(), "drone-7"), Ok((kind, e)));
        }
        let up = Event::upgraded("drone-7", "os@6", "os@7", [7; 16], 5);
        assert_eq!(Event::from_device(&up.to_json(), "drone-7"), Ok((Kind::Upgraded, up)));
    }

    /// Each kind carries what Choria's schema requires of it, no more.
    #[test]
    fn each_kind_has_the_fields_choria_requires() {
        let v = |e: &Event| serde_json::to_value(e).unwrap();
        let alive = v(&Event::new(Kind::Alive, "d", "0.1.0", [1; 16], 5));
        assert_eq!(
            (&alive["protocol"], &alive["version"]),
            (&"io.choria.lifecycle.v1.alive".into(), &"0.1.0".into())
        );
        let prov = v(&Event::new(Kind::Provisioned, "d", "0.1.0", [1; 16], 5));
        assert!(prov.get("version").is_none() && prov.get("new_version").is_none(), "{prov}");
        let up = v(&Event::upgraded("d", NO_BUNDLE, "os@7", [1; 16], 5));
        assert_eq!((&up["version"], &up["new_version"]), (&"none".into(), &"os@7".into()));
        assert_eq!(subject(Kind::Upgraded), "choria.lifecycle.event.upgraded.perch");
        let p = Event::new(Kind::Startup, "prov-1", "0.1.0", [1; 16], 5).from_component(PROVISIONER);
        assert_eq!(p.component, "perch-provisioner");
        assert_eq!(
            subject_of(Kind::Startup, PROVISIONER),
            "choria.lifecycle.event.startup.perch-provisioner"
        );
    }

    #[test]
    fn an_event_naming_another_device_is_refused() {
        let e = Event::new(Kind::Startup, "drone-8", "0.1.0", [7; 16], 5);
        assert_eq!(
            Event::from_device(&e.to_json(), "drone-7"),
            Err(LifecycleError::Identity { claimed: "drone-8".into(), sender: "drone-7".into() })
        );
    }

    #[test]
    fn events_perch_would_not_send_are_refused() {
        let good = Event::new(Kind::Startup, "d", "0.1.0", [1; 16], 5);
        let json = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(&good).unwrap();
            f(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (json(&|v| v["protocol"] = "io.choria.lifecycle.v1.governor".into()), "protocol"),
            (json(&|v| v["protocol"] = "io.choria.lifecycle.v1.shutdown".into()), "a version on a shutdown"),
            (
                json(&|v| v["protocol"] = "io.choria.lifecycle.v1.upgraded".into()),
                "upgraded without new_version",
            ),
            (json(&|v| v["new_version"] = "os@2".into()), "new_version on a startup"),
            (json(&|v| v["component"] = "choria".into()), "component"),
            (json(&|v| v["id"] = "not-a-uuid".into()), "id"),
            (json(&|v| v["version"] = serde_json::Value::Null), "version"),
            (json(&|v| v["version"] = "x".repeat(MAX_VERSION + 1).into()), "version"),
            (json(&|v| v["extra"] = 1.into()), "unknown field"),
            (b"{\"protocol\":".to_vec(), "truncated"),
            (vec![b' '; MAX_EVENT + 1], "too large"),
        ];
        for (bytes, what) in cases {
            let refused = Event::from_device(&bytes, "d");
            assert!(refused.is_err(), "{what} accepted");
            // The field rules of each kind say why, not another check.
            if what.contains("version") {
                assert_eq!(refused, Err(LifecycleError::Version), "{what}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn hostile_event_bytes_never_panic_and_never_speak_for_another(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1200),
        ) {
            if let Ok((kind, e)) = Event::from_device(&data, "d") {
                proptest::prop_assert_eq!(e.identity.as_str(), "d");
                proptest::prop_assert_eq!(Event::from_device(&e.to_json(), "d"), Ok((kind, e)));
            }
        }

        #[test]
        fn any_flipped_byte_of_an_event_is_refused_or_still_this_device_s(
            pos in 0usize..400, mask in 1u8..=255,
        ) {
            let mut bytes = Event::new(Kind::Startup, "dev-a", "0.1.0", [3; 16], 9).to_json();
            let i = pos % bytes.len();
            bytes[i] ^= mask;
            if let Ok((_, e)) = Event::from_device(&bytes, "dev-a") {
                proptest::prop_assert_eq!(e.identity.as_str(), "dev-a");
            }
        }
    }
}
