//! The fleet view: what `perch status` shows, built from the devices'
//! reports (`PERCH_REPORTS`) and the registry (`PERCH_REGISTRY`).
//!
//! Pure: it is handed reports and records and the time, and knows nothing
//! of NATS, so every rule here is unit-tested.
//!
//! Rules an operator relies on:
//! - "last seen" is the server's time of the last report stored, not the
//!   device's clock (drones may have none);
//! - a device not heard from within `stale_after` is `stale`, whatever its
//!   last report said: silence is never shown as healthy;
//! - report accounting (with `--device`): sequence numbers are counted, and
//!   any missing range not covered by a `Dropped` report is shown as a gap;
//! - a device's current epoch is the one of its report stored last: a device
//!   whose state was wiped counts again from 1 in a new epoch, and its
//!   reports from before are neither shown as its state nor counted.

use std::collections::BTreeMap;

use perch_protocol::registry::DeviceRecord;
use perch_protocol::report::{BundleInfo, Report, ReportKind};
use serde::Serialize;

/// One report as read from the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub report: Report,
    /// When the server stored it (unix seconds).
    pub stored_at: u64,
    /// Its sequence in `PERCH_REPORTS`: a report stored later has a higher
    /// one, whatever the device's clock or epoch.
    pub stream_seq: u64,
    /// The field site it came through (None: sent to the hub directly).
    pub site: Option<String>,
}

/// Whether a device is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Online,
    Stale,
    /// Registered, but no report stored.
    Silent,
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Liveness::Online => "online",
            Liveness::Stale => "stale",
            Liveness::Silent => "silent",
        })
    }
}

/// A deploy state a device reported, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployReport {
    pub state: String,
    pub reason: Option<String>,
    /// The bundle it is about (digest, hex).
    pub bundle: Option<String>,
    pub at_seq: u64,
    /// Its sequence in `PERCH_REPORTS` (what a rollout's wave compares
    /// with the stream's last sequence when the wave started).
    #[serde(skip)]
    pub stored_seq: u64,
}

/// Where the chunks of a device's last staging came from: reused from the
/// device (a delta install) or fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferReport {
    /// The bundle staged (digest, hex).
    pub bundle: String,
    pub reused_bytes: u64,
    pub reused_chunks: u32,
    pub fetched_bytes: u64,
    pub fetched_chunks: u32,
    pub at_seq: u64,
}

/// How a device's reports add up (only when every report was read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Accounting {
    /// Messages stored.
    pub stored: u64,
    /// Distinct sequence numbers.
    pub distinct: u64,
    pub first: u64,
    pub last: u64,
    /// Sequence numbers stored more than once (only possible for reports
    /// resent after the duplicate window).
    pub duplicates: u64,
    /// Reports from the device's earlier epochs (before its state was wiped).
    pub earlier: u64,
    /// Telemetry the device dropped over its budget, and said so.
    pub dropped: u64,
    /// Ranges of sequence numbers neither stored nor reported dropped.
    pub gaps: Vec<(u64, u64)>,
}

impl Accounting {
    /// Nothing lost and nothing twice.
    pub fn exact(&self) -> bool {
        self.duplicates == 0 && self.gaps.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceView {
    pub id: String,
    /// The registry's status (`enrolled`, `pending`, `revoked`...), if known.
    pub registry: Option<String>,
    pub groups: Vec<String>,
    pub liveness: Liveness,
    pub last_seen: Option<u64>,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    pub running_slot: Option<String>,
    pub running_bundle: Option<BundleInfo>,
    /// The deploy journal's state at the last report.
    pub journal_state: Option<String>,
    /// The last deploy state reported (an event), with its reason.
    pub last_deploy: Option<DeployReport>,
    /// Staging progress, while a download is under way.
    pub progress: Option<(u32, u32)>,
    /// Where the chunks of its last staging came from.
    pub transfer: Option<TransferReport>,
    /// The epoch of the device's report stored last (16 hex digits, as in
    /// its message ids): `last_seq` and every `at_seq` count within it.
    pub epoch: Option<String>,
    /// The highest report sequence number read (in `epoch`).
    pub last_seq: u64,
    /// The field site its newest report came through; None: the hub.
    pub site: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reports: Option<Accounting>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetView {
    pub now: u64,
    pub stale_after_secs: u64,
    pub devices: Vec<DeviceView>,
    /// The field sites whose reports the hub takes.
    pub sites: Vec<SiteView>,
    /// The highest `PERCH_REPORTS` sequence read (a rollout's wave counts
    /// only reports stored after the one its start saw).
    #[serde(skip)]
    pub reports_seq: u64,
}

/// A field site as the hub sees it: how long since it last heard from the
/// site's server (reports or JetStream's heartbeats), so how stale the
/// hub's view of its devices, and the site's of the hub, may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteView {
    pub name: String,
    /// Seconds since the hub last heard from the site; None: never.
    pub last_heard_secs: Option<u64>,
    /// Reports stored at the site that the hub has not taken yet, as far
    /// as the hub knows.
    pub lag: u64,
}

/// Builds the view from `reports` in the order the stream stored them.
/// `complete` says every report of these devices was read (not just the
/// last per subject), so they can be accounted for.
pub fn build(
    registry: &[DeviceRecord],
    reports: impl IntoIterator<Item = Stored>,
    now: u64,
    stale_after_secs: u64,
    complete: bool,
) -> FleetView {
    let mut by_id: BTreeMap<String, DeviceView> = BTreeMap::new();
    for rec in registry {
        let mut v = empty(&rec.id);
        v.registry = Some(rec.status.to_string());
        v.groups = rec.groups.clone();
        by_id.insert(rec.id.clone(), v);
    }
    let reports: Vec<Stored> = reports.into_iter().collect();
    // Stream order: the last report stored names the device's epoch.
    let epochs: BTreeMap<&str, u64> =
        reports.iter().map(|s| (s.report.device.as_str(), s.report.epoch)).collect();
    let mut earlier: BTreeMap<String, u64> = BTreeMap::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut dropped: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    let mut latest_seq: BTreeMap<String, u64> = BTreeMap::new();
    for Stored { report: r, stored_at, stream_seq, site } in &reports {
        let stored_at = *stored_at;
        let v = by_id.entry(r.device.clone()).or_insert_with(|| empty(&r.device));
        v.last_seen = Some(v.last_seen.map_or(stored_at, |t| t.max(stored_at)));
        if epochs.get(r.device.as_str()) != Some(&r.epoch) {
            *earlier.entry(r.device.clone()).or_default() += 1;
            continue;
        }
        seqs.entry(r.device.clone()).or_default().push(r.seq);
        match &r.kind {
            ReportKind::Deploy { state, reason, bundle }
                if v.last_deploy.as_ref().is_none_or(|d| d.at_seq < r.seq) =>
            {
                v.last_deploy = Some(DeployReport {
                    state: state.clone(),
                    reason: reason.clone(),
                    bundle: bundle.map(hex::encode),
                    at_seq: r.seq,
                    stored_seq: *stream_seq,
                });
            }
            ReportKind::Transfer { bundle, reused_bytes, reused_chunks, fetched_bytes, fetched_chunks }
                if v.transfer.as_ref().is_none_or(|t| t.at_seq < r.seq) =>
            {
                v.transfer = Some(TransferReport {
                    bundle: hex::encode(bundle),
                    reused_bytes: *reused_bytes,
                    reused_chunks: *reused_chunks,
                    fetched_bytes: *fetched_bytes,
                    fetched_chunks: *fetched_chunks,
                    at_seq: r.seq,
                });
            }
            ReportKind::Dropped { first, last, .. } => {
                dropped.entry(r.device.clone()).or_default().push((*first, *last));
            }
            _ => {}
        }
        // The device's own state as of its newest report.
        let newest = latest_seq.entry(r.device.clone()).or_insert(0);
        if r.seq >= *newest {
            *newest = r.seq;
            v.last_seq = r.seq;
            v.site = site.clone();
            v.boot_id = Some(r.boot_id.clone());
            v.agent_version = Some(r.agent_version.clone());
            v.running_slot = r.running_slot.clone();
            v.running_bundle = r.running_bundle.clone();
            v.journal_state = Some(r.journal_state.clone());
            v.progress = match r.kind {
                ReportKind::Progress { chunks_done, chunk_count } => Some((chunks_done, chunk_count)),
                _ if r.journal_state == "staging" => v.progress,
                _ => None,
            };
        }
    }
    for v in by_id.values_mut() {
        v.epoch = epochs.get(v.id.as_str()).map(|e| format!("{e:016x}"));
        v.liveness = match v.last_seen {
            None => Liveness::Silent,
            Some(t) if now.saturating_sub(t) <= stale_after_secs => Liveness::Online,
            Some(_) => Liveness::Stale,
        };
        if complete {
            let s = seqs.remove(&v.id).unwrap_or_default();
            let mut a = account(s, dropped.remove(&v.id).unwrap_or_default());
            a.earlier = earlier.remove(&v.id).unwrap_or(0);
            v.reports = Some(a);
        }
    }
    let reports_seq = reports.iter().map(|s| s.stream_seq).max().unwrap_or(0);
    FleetView { now, stale_after_secs, devices: by_id.into_values().collect(), sites: vec![], reports_seq }
}

/// A device with nothing known of it but its id.
pub(crate) fn empty(id: &str) -> DeviceView {
    DeviceView {
        id: id.into(),
        registry: None,
        groups: vec![],
        liveness: Liveness::Silent,
        last_seen: None,
        boot_id: None,
        agent_version: None,
        running_slot: None,
        running_bundle: None,
        journal_state: None,
        last_deploy: None,
        progress: None,
        transfer: None,
        epoch: None,
        last_seq: 0,
        site: None,
        reports: None,
    }
}

/// Counts one device's sequence numbers; gaps are the ranges between 1 and
/// the highest seen that are neither stored nor reported dropped.
pub fn account(mut seqs: Vec<u64>, dropped: Vec<(u64, u64)>) -> Accounting {
    let stored = seqs.len() as u64;
    seqs.sort_unstable();
    let before = seqs.len();
    seqs.dedup();
    let duplicates = (before - seqs.len()) as u64;
    let mut covered: Vec<(u64, u64)> = seqs.iter().map(|&s| (s, s)).collect();
    let mut dropped_count = 0;
    for (a, b) in dropped {
        if a <= b {
            dropped_count += b - a + 1;
            covered.push((a, b));
        }
    }
    covered.sort_unstable();
    let last = covered.iter().map(|r| r.1).max().unwrap_or(0);
    let mut gaps = Vec::new();
    let mut next = 1u64;
    for (a, b) in covered {
        if a > next {
            gaps.push((next, a - 1));
        }
        next = next.max(b.saturating_add(1));
    }
    Accounting {
        stored,
        distinct: seqs.len() as u64,
        first: seqs.first().copied().unwrap_or(0),
        last,
        duplicates,
        earlier: 0,
        dropped: dropped_count,
        gaps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(device: &str, seq: u64, kind: ReportKind) -> Stored {
        Stored {
            report: Report {
                device: device.into(),
                epoch: 7,
                seq,
                boot_id: "b1".into(),
                agent_version: "0.1.0".into(),
                at: 0,
                running_slot: Some("a".into()),
                running_bundle: None,
                journal_state: "idle".into(),
                kind,
            },
            stored_at: 1000 + seq,
            stream_seq: seq,
            site: None,
        }
    }

    #[test]
    fn accounting_finds_gaps_duplicates_and_honours_dropped_ranges() {
        let a = account(vec![1, 2, 3, 3, 7, 8], vec![(4, 5)]);
        assert_eq!(a.stored, 6);
        assert_eq!(a.distinct, 5);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.dropped, 2);
        assert_eq!(a.gaps, vec![(6, 6)]);
        assert!(!a.exact());
        let ok = account((1..=100).collect(), vec![]);
        assert!(ok.exact());
        assert_eq!((ok.first, ok.last, ok.distinct), (1, 100, 100));
        // Reports from before a purge (starting above 1) are a gap too.
        assert_eq!(account(vec![5, 6], vec![]).gaps, vec![(1, 4)]);
        assert!(account(vec![], vec![]).exact());
    }

    #[test]
    fn silence_is_never_healthy() {
        let rec: DeviceRecord = serde_json::from_value(serde_json::json!({
            "id": "quiet", "status": "enrolled", "key": "", "nats_user": "", "groups": ["g"],
            "target": "t", "agent_version": "0", "token": null, "via": "token",
            "created_at": 0, "updated_at": 0, "enrolled_at": 0
        }))
        .unwrap();
        let reports = vec![
            report("d1", 1, ReportKind::Heartbeat),
            report("d1", 2, ReportKind::Deploy { state: "committed".into(), reason: None, bundle: None }),
            report("old", 1, ReportKind::Heartbeat),
        ];
        let v = build(&[rec], reports, 1010, 60, false);
        let by: BTreeMap<_, _> = v.devices.iter().map(|d| (d.id.as_str(), d)).collect();
        assert_eq!(by["d1"].liveness, Liveness::Online);
        assert_eq!(by["d1"].last_deploy.as_ref().map(|d| d.state.as_str()), Some("committed"));
        assert_eq!(by["quiet"].liveness, Liveness::Silent);
        assert_eq!(by["quiet"].registry.as_deref(), Some("enrolled"));
        let later = build(&[], vec![report("d1", 1, ReportKind::Heartbeat)], 5000, 60, false);
        assert_eq!(later.devices[0].liveness, Liveness::Stale);
        assert!(later.devices[0].reports.is_none());
    }

    #[test]
    fn the_newest_report_wins_whatever_the_order_read() {
        let mut newer = report("d1", 9, ReportKind::Progress { chunks_done: 16, chunk_count: 40 });
        newer.report.journal_state = "staging".into();
        newer.report.running_slot = Some("b".into());
        let older = report(
            "d1",
            3,
            ReportKind::Deploy { state: "failed".into(), reason: Some("x".into()), bundle: None },
        );
        let v = build(&[], vec![newer, older], 1010, 60, true);
        let d = &v.devices[0];
        assert_eq!(d.running_slot.as_deref(), Some("b"));
        assert_eq!(d.progress, Some((16, 40)));
        assert_eq!(d.last_deploy.as_ref().map(|d| d.at_seq), Some(3));
        assert_eq!(d.reports.as_ref().map(|a| a.gaps.clone()), Some(vec![(1, 2), (4, 8)]));
    }

    #[test]
    fn a_wiped_device_counts_again_in_a_new_epoch_and_its_old_reports_step_aside() {
        let mut old: Vec<Stored> = (1..=50).map(|n| report("d1", n, ReportKind::Heartbeat)).collect();
        old.push(report("d1", 51, ReportKind::Deploy { state: "failed".into(), reason: None, bundle: None }));
        old[50].report.running_slot = Some("b".into());
        // Reflashed and re-provisioned: a new outbox, a new epoch, from 1.
        let new: Vec<Stored> = (1..=3)
            .map(|n| {
                let mut r = report("d1", n, ReportKind::Heartbeat);
                r.report.epoch = 8;
                r.stored_at = 2000 + n;
                r
            })
            .collect();
        let v = build(&[], old.into_iter().chain(new), 2010, 60, true);
        let d = &v.devices[0];
        assert_eq!((d.last_seq, d.running_slot.as_deref()), (3, Some("a")));
        assert_eq!(d.last_deploy, None, "the old install's outcome is not this one's");
        let a = d.reports.as_ref().unwrap();
        assert_eq!((a.stored, a.first, a.last, a.earlier), (3, 1, 3, 51));
        assert!(a.exact(), "{a:?}");
    }
}
