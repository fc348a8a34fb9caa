//! A rollout: one bundle, a set of devices cut into waves, and the rules
//! that move it from wave to wave. Pure: [`advance`] is handed the rollout,
//! the fleet view and the time, and returns the next rollout and what to
//! write to the desired state. The NATS side is in [`crate::rollouts`].
//!
//! Rules:
//! - a wave starts by naming the bundle in each of its devices' keys;
//! - a device counts as **committed** only when it reports running the
//!   bundle after its trial (`committed`, or `idle` on it), never when it
//!   merely installed it; it counts as **failed** when it reports
//!   `failed` or `rolled_back` for this bundle after the wave started
//!   (a bootloader fallback is a `rolled_back`);
//! - when a wave's failures pass the limit the rollout pauses by itself,
//!   at once, without waiting for the rest of the wave;
//! - the next wave starts only when every device of the current one is
//!   committed or failed (within the limit), and `wave_wait` has passed;
//! - a device that goes silent holds its wave: silence is never success.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::view::{DeviceView, FleetView};

/// The bundle a rollout installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub counter: u64,
    /// Hex.
    pub digest: String,
}

/// How many failures a wave may have before the rollout pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Limit {
    Count(u32),
    Percent(u8),
}

impl Limit {
    /// `3` or `10%`.
    pub fn parse(s: &str) -> Result<Limit, String> {
        let bad = || format!("'{s}' is not a failure limit (a count like 2, or a percentage like 10%)");
        match s.strip_suffix('%') {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= 100).map(Limit::Percent).ok_or_else(bad),
            None => s.parse::<u32>().map(Limit::Count).map_err(|_| bad()),
        }
    }

    fn exceeded(self, failures: usize, wave_size: usize) -> bool {
        match self {
            Limit::Count(n) => failures > n as usize,
            Limit::Percent(p) => failures * 100 > p as usize * wave_size,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Cumulative share of the devices this wave brings the rollout to.
    pub percent: u8,
    pub devices: Vec<String>,
    pub started_at: Option<u64>,
    /// Each device's last report sequence when the wave started: only
    /// later reports can fail it.
    #[serde(default)]
    pub baseline: BTreeMap<String, u64>,
    /// The epoch that sequence counts in. A device reporting in another
    /// epoch was wiped since: all its reports are later.
    #[serde(default)]
    pub baseline_epoch: BTreeMap<String, String>,
    /// When every device had an outcome (the `wave_wait` clock).
    pub settled_at: Option<u64>,
    /// Failures an operator accepted with `resume`.
    #[serde(default)]
    pub forgiven: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum State {
    Running,
    Paused { reason: String },
    Aborted,
    Done,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused { .. } => "paused",
            State::Aborted => "aborted",
            State::Done => "done",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub release: Release,
    /// What the operator asked for: `group:<g>` or `devices`.
    pub scope: String,
    pub waves: Vec<Wave>,
    pub max_failures: Limit,
    pub wave_wait_secs: u64,
    #[serde(flatten)]
    pub state: State,
    pub created_at: u64,
    pub updated_at: u64,
    /// The bundle (hex digest) each device ran when the rollout began, for
    /// `abort`; None when it ran no bundle perch knows.
    pub previous: BTreeMap<String, Option<String>>,
}

/// What a rollout step writes to the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `device.<id>` names this digest (written only if it does not already).
    Desire { device: String, digest: String },
    /// Remove `device.<id>`.
    Clear { device: String },
}

/// Where one device stands in its wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    Pending,
    Committed,
    Failed { reason: String },
}

/// Cuts `devices` (sorted) into waves at cumulative `percents` (ending at
/// 100). A wave that would be empty is skipped.
pub fn plan_waves(devices: &[String], percents: &[u8]) -> Result<Vec<Wave>, String> {
    if devices.is_empty() {
        return Err("no devices to roll out to".into());
    }
    if percents.last() != Some(&100) || percents.windows(2).any(|w| w[0] >= w[1]) || percents.contains(&0) {
        return Err("waves must grow and end at 100%, e.g. 5%,25%,100%".into());
    }
    let mut devices = devices.to_vec();
    devices.sort();
    devices.dedup();
    let n = devices.len();
    let (mut waves, mut taken) = (vec![], 0usize);
    for &p in percents {
        let upto = (n * p as usize).div_ceil(100).clamp(1, n);
        if upto > taken {
            waves.push(Wave {
                percent: p,
                devices: devices[taken..upto].to_vec(),
                started_at: None,
                baseline: BTreeMap::new(),
                baseline_epoch: BTreeMap::new(),
                settled_at: None,
                forgiven: vec![],
            });
            taken = upto;
        }
    }
    Ok(waves)
}

/// `5%,25%,100%` as percentages.
pub fn parse_waves(s: &str) -> Result<Vec<u8>, String> {
    s.split(',')
        .map(|w| {
            let w = w.trim();
            w.strip_suffix('%')
                .unwrap_or(w)
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("'{w}' is not a wave percentage"))
        })
        .collect()
}

/// Where a device stood when its wave started: its last report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baseline<'a> {
    pub seq: u64,
    /// Unknown for rollouts started before epochs were recorded.
    pub epoch: Option<&'a str>,
}

impl Baseline<'_> {
    /// Whether a report at `seq` of the device's current `epoch` came after.
    fn precedes(self, epoch: Option<&str>, seq: u64) -> bool {
        match self.epoch {
            Some(e) if epoch != Some(e) => true,
            _ => seq > self.seq,
        }
    }
}

/// Where `device` stands with `digest`, counting failures only from
/// reports after `baseline`.
pub fn outcome(v: Option<&DeviceView>, digest: &str, baseline: Baseline<'_>) -> Outcome {
    let Some(v) = v else { return Outcome::Pending };
    let runs = v.running_bundle.as_ref().is_some_and(|b| hex::encode(b.digest) == digest);
    // Settled on it: committed, or back on it after failing a later bundle.
    let later_failed = v.last_deploy.as_ref().is_some_and(|d| d.bundle.as_deref() != Some(digest));
    let settled = matches!(v.journal_state.as_deref(), Some("committed" | "idle")) || later_failed;
    if runs && settled {
        return Outcome::Committed;
    }
    if let Some(d) = &v.last_deploy {
        let about_this = d.bundle.as_deref() == Some(digest);
        let later = baseline.precedes(v.epoch.as_deref(), d.at_seq);
        if about_this && later && matches!(d.state.as_str(), "failed" | "rolled_back") {
            return Outcome::Failed { reason: d.reason.clone().unwrap_or_else(|| d.state.clone()) };
        }
    }
    Outcome::Pending
}

/// Per device of a wave, its outcome.
pub fn wave_outcomes(w: &Wave, digest: &str, view: &FleetView) -> Vec<(String, Outcome)> {
    let by_id: BTreeMap<&str, &DeviceView> = view.devices.iter().map(|d| (d.id.as_str(), d)).collect();
    w.devices
        .iter()
        .map(|id| {
            let base = Baseline {
                seq: w.baseline.get(id).copied().unwrap_or(0),
                epoch: w.baseline_epoch.get(id).map(String::as_str),
            };
            (id.clone(), outcome(by_id.get(id.as_str()).copied(), digest, base))
        })
        .collect()
}

/// The rollout with each wave's per-device outcomes, for `--json`.
pub fn progress_json(r: &Rollout, view: &FleetView) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    for (i, w) in r.waves.iter().enumerate() {
        if w.started_at.is_some() {
            let o: BTreeMap<String, Outcome> =
                wave_outcomes(w, &r.release.digest, view).into_iter().collect();
            v["waves"][i]["outcomes"] = serde_json::to_value(o).unwrap_or_default();
        }
    }
    v
}

fn start_wave(r: &mut Rollout, i: usize, view: &FleetView, now: u64) -> Vec<Action> {
    let by_id: BTreeMap<&str, &DeviceView> = view.devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let w = &mut r.waves[i];
    w.started_at = Some(now);
    w.baseline =
        w.devices.iter().map(|d| (d.clone(), by_id.get(d.as_str()).map_or(0, |v| v.last_seq))).collect();
    w.baseline_epoch =
        w.devices.iter().filter_map(|d| Some((d.clone(), by_id.get(d.as_str())?.epoch.clone()?))).collect();
    w.devices.iter().map(|d| Action::Desire { device: d.clone(), digest: r.release.digest.clone() }).collect()
}

/// The actions that (re)establish what the rollout has written so far:
/// for a driver that takes over, since every action is idempotent.
pub fn ensure(r: &Rollout) -> Vec<Action> {
    match r.state {
        State::Aborted => abort_actions(r),
        _ => r
            .waves
            .iter()
            .filter(|w| w.started_at.is_some())
            .flat_map(|w| &w.devices)
            .map(|d| Action::Desire { device: d.clone(), digest: r.release.digest.clone() })
            .collect(),
    }
}

fn abort_actions(r: &Rollout) -> Vec<Action> {
    r.waves
        .iter()
        .filter(|w| w.started_at.is_some())
        .flat_map(|w| &w.devices)
        .map(|d| match r.previous.get(d).cloned().flatten() {
            Some(digest) => Action::Desire { device: d.clone(), digest },
            None => Action::Clear { device: d.clone() },
        })
        .collect()
}

/// Stops the rollout and points every device it reached back at what it ran.
pub fn abort(r: &Rollout, now: u64) -> (Rollout, Vec<Action>) {
    let mut next = r.clone();
    next.state = State::Aborted;
    next.updated_at = now;
    (next, abort_actions(r))
}

/// Resumes a paused rollout; the failures seen so far in the current wave
/// are accepted (the limit counts new ones).
pub fn resume(r: &Rollout, view: &FleetView, now: u64) -> Result<Rollout, String> {
    if !matches!(r.state, State::Paused { .. }) {
        return Err(format!("rollout {} is {}, not paused", r.id, r.state.name()));
    }
    let mut next = r.clone();
    if let Some(w) = next.waves.iter_mut().rev().find(|w| w.started_at.is_some()) {
        for (id, o) in wave_outcomes(w, &r.release.digest, view) {
            if matches!(o, Outcome::Failed { .. }) && !w.forgiven.contains(&id) {
                w.forgiven.push(id);
            }
        }
    }
    next.state = State::Running;
    next.updated_at = now;
    Ok(next)
}

/// One step of a running rollout.
pub fn advance(r: &Rollout, view: &FleetView, now: u64) -> (Rollout, Vec<Action>) {
    let mut next = r.clone();
    if next.state != State::Running {
        return (next, vec![]);
    }
    let Some(cur) = next.waves.iter().rposition(|w| w.started_at.is_some()) else {
        let actions = start_wave(&mut next, 0, view, now);
        next.updated_at = now;
        return (next, actions);
    };
    let outcomes = wave_outcomes(&next.waves[cur], &next.release.digest, view);
    let w = &next.waves[cur];
    let failed: Vec<&String> = outcomes
        .iter()
        .filter(|(id, o)| matches!(o, Outcome::Failed { .. }) && !w.forgiven.contains(id))
        .map(|(id, _)| id)
        .collect();
    if next.max_failures.exceeded(failed.len(), w.devices.len()) {
        let names: Vec<&str> = failed.iter().map(|s| s.as_str()).collect();
        next.state = State::Paused {
            reason: format!(
                "wave {} ({}%): {} of {} devices failed ({}), over the limit of {}",
                cur + 1,
                w.percent,
                failed.len(),
                w.devices.len(),
                names.join(", "),
                next.max_failures
            ),
        };
        next.updated_at = now;
        return (next, vec![]);
    }
    if outcomes.iter().any(|(_, o)| *o == Outcome::Pending) {
        return (next, vec![]);
    }
    let settled_at = *next.waves[cur].settled_at.get_or_insert(now);
    if now < settled_at.saturating_add(next.wave_wait_secs) {
        if next != *r {
            next.updated_at = now;
        }
        return (next, vec![]);
    }
    next.updated_at = now;
    if cur + 1 < next.waves.len() {
        let actions = start_wave(&mut next, cur + 1, view, now);
        return (next, actions);
    }
    next.state = State::Done;
    (next, vec![])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{build, Stored};
    use perch_protocol::report::{BundleInfo, Report, ReportKind};

    const D: &str = "0707070707070707070707070707070707070707070707070707070707070707";

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i:02}")).collect()
    }

    fn rollout(n: usize, waves: &[u8], limit: Limit, wait: u64) -> Rollout {
        Rollout {
            id: "r1".into(),
            release: Release { name: "os".into(), counter: 2, digest: D.into() },
            scope: "group:g".into(),
            waves: plan_waves(&ids(n), waves).unwrap(),
            max_failures: limit,
            wave_wait_secs: wait,
            state: State::Running,
            created_at: 0,
            updated_at: 0,
            previous: ids(n).into_iter().map(|d| (d, Some("aa".repeat(32)))).collect(),
        }
    }

    /// A device's report at seq 10: what it runs, its journal, its last deploy state.
    fn stored(id: &str, runs_it: bool, journal: &str, reason: Option<&str>) -> Stored {
        let running_bundle = runs_it.then(|| BundleInfo {
            name: "os".into(),
            counter: 2,
            version: "2".into(),
            digest: [7; 32],
        });
        Stored {
            report: Report {
                device: id.into(),
                epoch: 1,
                seq: 10,
                boot_id: "b".into(),
                agent_version: "0".into(),
                at: 0,
                running_slot: Some(if runs_it { "b" } else { "a" }.into()),
                running_bundle,
                journal_state: journal.into(),
                kind: ReportKind::Deploy {
                    state: journal.into(),
                    reason: reason.map(String::from),
                    bundle: Some([7; 32]),
                },
            },
            stored_at: 100,
            site: None,
        }
    }

    fn view(reports: Vec<Stored>) -> FleetView {
        build(&[], reports, 100, 60, false)
    }

    /// A fleet where `committed` run the bundle and `failed` rolled it back.
    fn fleet(committed: &[&str], failed: &[&str]) -> FleetView {
        let ok = committed.iter().map(|id| stored(id, true, "committed", None));
        let bad = failed.iter().map(|id| stored(id, false, "rolled_back", Some("boot_fallback")));
        build(&[], ok.chain(bad).collect::<Vec<_>>(), 100, 60, false)
    }

    #[test]
    fn waves_are_cut_by_cumulative_share_and_never_empty() {
        let w = plan_waves(&ids(20), &[5, 25, 100]).unwrap();
        assert_eq!(w.iter().map(|w| w.devices.len()).collect::<Vec<_>>(), vec![1, 4, 15]);
        let w = plan_waves(&ids(3), &[5, 25, 100]).unwrap();
        assert_eq!(w.iter().map(|w| w.devices.len()).collect::<Vec<_>>(), vec![1, 2]);
        assert!(plan_waves(&ids(3), &[50, 25, 100]).is_err());
        assert!(plan_waves(&ids(3), &[50]).is_err());
        assert!(plan_waves(&[], &[100]).is_err());
        assert_eq!(parse_waves("5%, 25%,100").unwrap(), vec![5, 25, 100]);
        assert_eq!(Limit::parse("10%"), Ok(Limit::Percent(10)));
        assert_eq!(Limit::parse("2"), Ok(Limit::Count(2)));
        assert!(Limit::parse("x").is_err() && Limit::parse("101%").is_err());
    }

    #[test]
    fn a_wave_moves_on_only_when_committed_and_after_the_wait() {
        let r = rollout(4, &[25, 100], Limit::Count(0), 30);
        let (r, a) = advance(&r, &fleet(&[], &[]), 0);
        assert_eq!(a, vec![Action::Desire { device: "d00".into(), digest: D.into() }]);
        // Installed but silent since: nothing moves.
        let (r, a) = advance(&r, &fleet(&[], &[]), 10);
        assert!(a.is_empty());
        assert_eq!(r.waves[0].settled_at, None);
        // Committed: the wait starts...
        let (r, a) = advance(&r, &fleet(&["d00"], &[]), 20);
        assert!(a.is_empty());
        assert_eq!(r.waves[0].settled_at, Some(20));
        // ...and the next wave starts after it.
        let (r, a) = advance(&r, &fleet(&["d00"], &[]), 50);
        assert_eq!(a.len(), 3);
        assert!(r.waves[1].started_at.is_some());
        let (r, _) = advance(&r, &fleet(&["d00", "d01", "d02", "d03"], &[]), 60);
        let (r, _) = advance(&r, &fleet(&["d00", "d01", "d02", "d03"], &[]), 100);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn failures_past_the_limit_pause_at_once_and_resume_forgives_them() {
        let r = rollout(10, &[100], Limit::Percent(10), 0);
        let (r, _) = advance(&r, &fleet(&[], &[]), 0);
        // One of ten is within 10%.
        let (r, _) = advance(&r, &fleet(&[], &["d03"]), 1);
        assert_eq!(r.state, State::Running);
        // Two is past it, though eight are still pending.
        let (r, _) = advance(&r, &fleet(&[], &["d03", "d07"]), 2);
        let State::Paused { reason } = &r.state else { panic!("{:?}", r.state) };
        assert!(reason.contains("2 of 10 devices failed (d03, d07)"), "{reason}");
        // Paused: nothing happens.
        assert_eq!(advance(&r, &fleet(&[], &["d03", "d07"]), 3).1, vec![]);
        let r = resume(&r, &fleet(&[], &["d03", "d07"]), 4).unwrap();
        let (r, _) = advance(&r, &fleet(&[], &["d03", "d07"]), 5);
        assert_eq!(r.state, State::Running);
        let all: Vec<String> = ids(10).into_iter().filter(|d| d != "d03" && d != "d07").collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (r, _) = advance(&r, &fleet(&all, &["d03", "d07"]), 6);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn a_failure_from_before_the_wave_does_not_count() {
        let mut r = rollout(2, &[100], Limit::Count(0), 0);
        let (next, _) = advance(&r, &fleet(&[], &["d01"]), 0);
        r = next;
        // d01's rollback (seq 10) is from before the wave: baseline is 10.
        assert_eq!(r.waves[0].baseline.get("d01"), Some(&10));
        assert_eq!(r.waves[0].baseline_epoch.get("d01").map(String::as_str), Some("0000000000000001"));
        let (r, _) = advance(&r, &fleet(&[], &["d01"]), 1);
        assert_eq!(r.state, State::Running);
    }

    #[test]
    fn a_device_wiped_during_its_wave_still_fails_it_from_seq_1() {
        let mut r = rollout(2, &[100], Limit::Count(0), 0);
        let mut before = stored("d01", false, "idle", None);
        before.report.seq = 40;
        r = advance(&r, &view(vec![before]), 0).0;
        assert_eq!(r.waves[0].baseline.get("d01"), Some(&40));
        // Reflashed: a new epoch, counting from 1, and it fails the bundle.
        let mut failed = stored("d01", false, "rolled_back", Some("health: x"));
        (failed.report.epoch, failed.report.seq) = (2, 3);
        let (r, _) = advance(&r, &view(vec![failed]), 1);
        assert!(matches!(r.state, State::Paused { .. }), "{:?}", r.state);
    }

    #[test]
    fn back_on_the_bundle_after_failing_a_later_one_is_still_committed() {
        let mut v = fleet(&["d00"], &[]);
        let d = &mut v.devices[0];
        d.journal_state = Some("rolled_back".into());
        d.last_deploy.as_mut().unwrap().bundle = Some("11".repeat(32));
        assert_eq!(outcome(Some(d), D, Baseline::default()), Outcome::Committed);
        // In its trial on it: not yet.
        d.journal_state = Some("trial".into());
        d.last_deploy.as_mut().unwrap().bundle = Some(D.into());
        assert_eq!(outcome(Some(d), D, Baseline::default()), Outcome::Pending);
    }

    #[test]
    fn abort_points_devices_back_and_ensure_repeats_it() {
        let r = rollout(4, &[50, 100], Limit::Count(0), 0);
        let (r, _) = advance(&r, &fleet(&[], &[]), 0);
        let (mut r, a) = abort(&r, 1);
        assert_eq!(r.state, State::Aborted);
        assert_eq!(a.len(), 2, "only the devices the rollout reached");
        assert!(a.iter().all(|x| matches!(x, Action::Desire { digest, .. } if *digest == "aa".repeat(32))));
        r.previous.insert("d00".into(), None);
        assert!(ensure(&r).contains(&Action::Clear { device: "d00".into() }));
        assert!(resume(&r, &fleet(&[], &[]), 2).is_err());
    }
}
