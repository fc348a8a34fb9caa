//! Which presence advisories a fleet view calls for: a device first heard
//! from is `new`, one quiet past `stale_after` `timeout`, one heard from
//! again `recover`, one quiet past `expire_after` `expire`. Each is sent
//! once: what was last advised per device is kept (by `perch watch`, in
//! the `PERCH_WATCH` bucket), so a restart or another watcher taking over
//! does not say it again.
//!
//! Pure: handed the view, what was advised and the time, it returns the
//! advisories and the new records.

use std::collections::BTreeMap;

use perch_protocol::advisory::AdvisoryEvent;
use serde::{Deserialize, Serialize};

use crate::view::FleetView;

/// What was last advised about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Advised {
    /// `new` or `recover`: it is heard from.
    Live,
    /// `timeout`.
    Stale,
    /// `expire`: nothing more until it is heard from again.
    Expired,
}

/// A device's record: what was advised, and the last-seen time it was
/// advised with (None: never heard from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub advised: Advised,
    pub seen: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub stale_after: u64,
    pub expire_after: u64,
}

/// One advisory to send, and the record to keep for its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub device: String,
    pub event: AdvisoryEvent,
    pub seen: Option<u64>,
    pub record: Presence,
}

/// The advisories `view` calls for, given what `known` says was advised.
///
/// A device is judged by its last report (the server's time). One that
/// never reported is judged from when it enrolled (`enrolled_at`, passed
/// in `enrolled`): an enrolled device that never speaks times out too,
/// with age -1. Devices the registry holds as anything but enrolled
/// (pending, approved, rejected, revoked) are not watched.
pub fn changes(
    view: &FleetView,
    enrolled: &BTreeMap<String, u64>,
    known: &BTreeMap<String, Presence>,
    limits: Limits,
    now: u64,
) -> Vec<Change> {
    let mut out = vec![];
    for d in &view.devices {
        if d.registry.as_deref().is_some_and(|s| s != "enrolled") {
            continue;
        }
        let Some(since) = d.last_seen.or_else(|| enrolled.get(&d.id).copied()) else { continue };
        let quiet = now.saturating_sub(since);
        let previous = known.get(&d.id).copied();
        // Heard from since a timeout or expiry was advised, even if quiet
        // again by now (it came and went between two looks): that is said
        // before any new timeout.
        let reported_since = previous.is_some_and(|p| p.advised != Advised::Live && d.last_seen > p.seen);
        let heard = d.last_seen.is_some() && (quiet <= limits.stale_after || reported_since);
        if !heard && quiet <= limits.stale_after {
            // Enrolled a moment ago and not heard from yet: give it time.
            continue;
        }
        let event = match (previous.map(|p| p.advised), heard) {
            // Heard from: new the first time (or after it expired, or
            // after a timeout it never recovered from because it was
            // never heard from), recover after a timeout.
            (None | Some(Advised::Expired), true) => Some(AdvisoryEvent::New),
            (Some(Advised::Stale), true) => Some(match previous.and_then(|p| p.seen) {
                Some(_) => AdvisoryEvent::Recover,
                None => AdvisoryEvent::New,
            }),
            (Some(Advised::Live), true) => None,
            // Quiet: expire past the long limit (once), else time out (once).
            (Some(Advised::Expired), false) => None,
            (_, false) if quiet > limits.expire_after => Some(AdvisoryEvent::Expire),
            (Some(Advised::Stale), false) => None,
            (None | Some(Advised::Live), false) => Some(AdvisoryEvent::Timeout),
        };
        if let Some(event) = event {
            let advised = match event {
                AdvisoryEvent::New | AdvisoryEvent::Recover => Advised::Live,
                AdvisoryEvent::Timeout => Advised::Stale,
                AdvisoryEvent::Expire => Advised::Expired,
            };
            let record = Presence { advised, seen: d.last_seen };
            out.push(Change { device: d.id.clone(), event, seen: d.last_seen, record });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::DeviceView;

    fn device(id: &str, last_seen: Option<u64>, registry: &str) -> DeviceView {
        DeviceView { registry: Some(registry.into()), last_seen, ..crate::view::empty(id) }
    }

    const LIMITS: Limits = Limits { stale_after: 60, expire_after: 600 };

    /// Runs `changes` at each (time, last seen) of one device, keeping the
    /// records as `perch watch` does; returns the events.
    fn lifetime(steps: &[(u64, Option<u64>)], enrolled_at: u64) -> Vec<(u64, &'static str)> {
        let mut known = BTreeMap::new();
        let enrolled = BTreeMap::from([("d".to_string(), enrolled_at)]);
        let mut out = vec![];
        for &(now, seen) in steps {
            let view = FleetView {
                now,
                stale_after_secs: 60,
                devices: vec![device("d", seen, "enrolled")],
                sites: vec![],
                reports_seq: 0,
            };
            for c in changes(&view, &enrolled, &known, LIMITS, now) {
                out.push((now, c.event.as_str()));
                known.insert(c.device, c.record);
            }
        }
        out
    }

    #[test]
    fn a_device_is_new_times_out_recovers_and_expires_once_each() {
        let steps = [
            (100, Some(100)),
            (150, Some(140)),
            (300, Some(140)),
            (400, Some(140)),
            (410, Some(405)),
            (420, Some(415)),
            (1100, Some(415)),
            (1200, Some(415)),
            (1300, Some(1290)),
        ];
        let got = lifetime(&steps, 0);
        assert_eq!(
            got,
            [(100, "new"), (300, "timeout"), (410, "recover"), (1100, "expire"), (1300, "new")],
            "{got:?}"
        );
    }

    #[test]
    fn an_enrolled_device_that_never_reports_times_out_then_expires_and_is_new_when_heard() {
        let got =
            lifetime(&[(10, None), (100, None), (200, None), (700, None), (800, None), (900, Some(890))], 0);
        assert_eq!(got, [(100, "timeout"), (700, "expire"), (900, "new")], "{got:?}");
        // Timed out without ever being heard from: its first report is new.
        let got = lifetime(&[(100, None), (150, Some(150))], 0);
        assert_eq!(got, [(100, "timeout"), (150, "new")], "{got:?}");
    }

    #[test]
    fn a_device_that_came_and_went_between_two_looks_recovers_then_times_out_again() {
        let got = lifetime(&[(100, Some(100)), (200, Some(100)), (400, Some(300)), (410, Some(300))], 0);
        assert_eq!(got, [(100, "new"), (200, "timeout"), (400, "recover"), (410, "timeout")], "{got:?}");
        // The same past an expiry: it is new again, then times out.
        let got = lifetime(&[(100, Some(100)), (800, Some(100)), (1000, Some(900)), (1010, Some(900))], 0);
        assert_eq!(got, [(100, "new"), (800, "expire"), (1000, "new"), (1010, "timeout")], "{got:?}");
    }

    #[test]
    fn a_watcher_that_starts_late_says_where_each_device_stands() {
        // First look at a device quiet for 5 minutes, and one for a day.
        assert_eq!(lifetime(&[(400, Some(100))], 0), [(400, "timeout")]);
        assert_eq!(lifetime(&[(90_000, Some(100))], 0), [(90_000, "expire")]);
    }

    #[test]
    fn devices_not_enrolled_are_not_watched_until_they_report() {
        let view = FleetView {
            now: 1000,
            stale_after_secs: 60,
            devices: vec![device("p", None, "pending"), device("r", Some(10), "revoked")],
            sites: vec![],
            reports_seq: 0,
        };
        let enrolled = BTreeMap::from([("p".to_string(), 0), ("r".to_string(), 0)]);
        assert!(changes(&view, &enrolled, &BTreeMap::new(), LIMITS, 1000).is_empty());
    }
}
