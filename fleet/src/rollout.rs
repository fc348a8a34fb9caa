//! A rollout: one bundle, a set of devices cut into waves, and the rules
//! that move it from wave to wave. Pure: [`advance`] is handed the rollout,
//! the fleet view and the time, and returns the next rollout and what to
//! write to the desired state. The NATS side is in [`crate::rollout_store`].
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

use crate::view::{DeployReport, DeviceView, FleetView};

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
    /// The rollout's `devices[..upto]` are this wave and those before it.
    #[serde(default)]
    pub upto: usize,
    pub started_at: Option<u64>,
    /// The last sequence of `PERCH_REPORTS` when the wave started: only a
    /// report stored after it can fail the wave. One number for the whole
    /// wave, however many devices (a device's own sequence numbers would
    /// take a map of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_seq: Option<u64>,
    /// When every device had an outcome (the `wave_wait` clock).
    pub settled_at: Option<u64>,
    /// Failures an operator accepted with `resume`.
    #[serde(default)]
    pub forgiven: Vec<String>,
    /// Older records (before the device list moved to the rollout) list each wave's devices here,
    /// with each one's last report sequence and epoch as the baseline;
    /// [`Rollout::normalize`] moves the devices to the rollout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baseline: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baseline_epoch: BTreeMap<String, String>,
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

/// A rollout, as kept in `PERCH_ROLLOUTS`. Its size grows with the device
/// count only by the sorted id list (and the few devices with keys of
/// their own): about 12 bytes a device, so a NATS message of 1 MiB (the
/// servers' default `max_payload`) holds a rollout to some 80,000 devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub release: Release,
    /// What the operator asked for: `group:<g>` or `devices`.
    pub scope: String,
    /// Every device of the rollout, sorted; wave `i` is
    /// `devices[waves[i-1].upto..waves[i].upto]`.
    #[serde(default)]
    pub devices: Vec<String>,
    pub waves: Vec<Wave>,
    pub max_failures: Limit,
    pub wave_wait_secs: u64,
    #[serde(flatten)]
    pub state: State,
    pub created_at: u64,
    pub updated_at: u64,
    /// A group rollout whose last wave names the bundle in the group's key
    /// (one write, not one per device), then clears the device keys the
    /// earlier waves wrote, so every device follows the group again.
    #[serde(default)]
    pub group_key: bool,
    /// The group's key before the rollout (hex digest; None: no key),
    /// which `abort` puts back once the last wave has written it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_before: Option<String>,
    /// Devices (indexes into `devices`) with a desired-state key of their
    /// own when the rollout began: the group's key does not reach them, so
    /// every wave writes theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<u32>,
    /// What `abort` points devices back at: digest → device indexes. A
    /// device the rollout reached that is not listed has its key cleared
    /// (it follows its group's key again).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub restore: BTreeMap<String, Vec<u32>>,
    /// Older records: per device, the bundle it ran.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub previous: BTreeMap<String, Option<String>>,
}

impl Rollout {
    /// Moves an older record's per-wave device lists and `previous` map to
    /// the rollout's device list, `upto` marks and `restore`; every device
    /// keeps its own key (such a rollout never writes a group key). A
    /// record already in this form is left as it is.
    pub fn normalize(&mut self) {
        if !self.devices.is_empty() || self.waves.iter().all(|w| w.devices.is_empty()) {
            return;
        }
        for w in &mut self.waves {
            self.devices.append(&mut w.devices);
            w.upto = self.devices.len();
        }
        self.pinned = (0..self.devices.len() as u32).collect();
        let index: BTreeMap<&str, u32> =
            self.devices.iter().enumerate().map(|(i, d)| (d.as_str(), i as u32)).collect();
        for (d, before) in std::mem::take(&mut self.previous) {
            if let (Some(digest), Some(i)) = (before, index.get(d.as_str())) {
                self.restore.entry(digest).or_default().push(*i);
            }
        }
    }

    /// The devices of wave `i`.
    pub fn wave_devices(&self, i: usize) -> &[String] {
        let from = if i == 0 { 0 } else { self.waves[i - 1].upto };
        self.devices.get(from..self.waves[i].upto).unwrap_or(&[])
    }

    /// The group a group rollout is for.
    pub fn group(&self) -> Option<&str> {
        self.scope.strip_prefix("group:")
    }

    fn is_pinned(&self, i: usize) -> bool {
        self.pinned.binary_search(&(i as u32)).is_ok()
    }

    /// Whether wave `i` names the bundle in the group's key.
    fn writes_group_key(&self, i: usize) -> bool {
        self.group_key && i + 1 == self.waves.len() && self.group().is_some()
    }
}

/// What a rollout step writes to the desired state, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `device.<id>` names this digest (written only if it does not already).
    Desire { device: String, digest: String },
    /// Remove `device.<id>`.
    Clear { device: String },
    /// `group.<g>` names this digest (written only if it does not already).
    DesireGroup { group: String, digest: String },
    /// Remove `group.<g>`.
    ClearGroup { group: String },
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
/// 100). A wave that would be empty is skipped. The devices, sorted and
/// without repeats, and the waves.
pub fn plan_waves(devices: &[String], percents: &[u8]) -> Result<(Vec<String>, Vec<Wave>), String> {
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
                upto,
                started_at: None,
                reports_seq: None,
                settled_at: None,
                forgiven: vec![],
                devices: vec![],
                baseline: BTreeMap::new(),
                baseline_epoch: BTreeMap::new(),
            });
            taken = upto;
        }
    }
    Ok((devices, waves))
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

/// Where a device stood when its wave started.
#[derive(Debug, Clone, Copy, Default)]
pub enum Baseline<'a> {
    /// Nothing known: every report counts.
    #[default]
    None,
    /// The stream's last sequence: reports stored after it count.
    Stream(u64),
    /// An older record: the device's own last report sequence, in
    /// its epoch (unknown for the oldest records).
    Device { seq: u64, epoch: Option<&'a str> },
}

impl Baseline<'_> {
    /// Whether `d`, reported by a device now in `epoch`, came after.
    fn precedes(self, d: &DeployReport, epoch: Option<&str>) -> bool {
        match self {
            Baseline::None => true,
            Baseline::Stream(seq) => d.stored_seq > seq,
            Baseline::Device { epoch: Some(e), .. } if epoch != Some(e) => true,
            Baseline::Device { seq, .. } => d.at_seq > seq,
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
        if about_this
            && baseline.precedes(d, v.epoch.as_deref())
            && matches!(d.state.as_str(), "failed" | "rolled_back")
        {
            return Outcome::Failed { reason: d.reason.clone().unwrap_or_else(|| d.state.clone()) };
        }
    }
    Outcome::Pending
}

/// The fleet's devices by id, for looking many up.
pub fn by_id(view: &FleetView) -> BTreeMap<&str, &DeviceView> {
    view.devices.iter().map(|d| (d.id.as_str(), d)).collect()
}

/// Per device of wave `i`, its outcome.
pub fn wave_outcomes(r: &Rollout, i: usize, view: &FleetView) -> Vec<(String, Outcome)> {
    let by_id = by_id(view);
    let w = &r.waves[i];
    r.wave_devices(i)
        .iter()
        .map(|id| {
            let base = match (w.reports_seq, w.baseline.get(id)) {
                (Some(seq), _) => Baseline::Stream(seq),
                (None, Some(seq)) => {
                    Baseline::Device { seq: *seq, epoch: w.baseline_epoch.get(id).map(String::as_str) }
                }
                (None, None) => Baseline::None,
            };
            (id.clone(), outcome(by_id.get(id.as_str()).copied(), &r.release.digest, base))
        })
        .collect()
}

/// The rollout with each started wave's per-device outcomes, for `--json`.
pub fn progress_json(r: &Rollout, view: &FleetView) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    for (i, w) in r.waves.iter().enumerate() {
        v["waves"][i]["devices"] = serde_json::json!(r.wave_devices(i).len());
        if w.started_at.is_some() {
            let o: BTreeMap<String, Outcome> = wave_outcomes(r, i, view).into_iter().collect();
            v["waves"][i]["outcomes"] = serde_json::to_value(o).unwrap_or_default();
        }
    }
    v
}

/// What wave `i` writes when it starts (or again, when a driver takes over).
fn wave_actions(r: &Rollout, i: usize) -> Vec<Action> {
    let digest = &r.release.digest;
    let from = r.waves[i].upto - r.wave_devices(i).len();
    let desire = |d: &String| Action::Desire { device: d.clone(), digest: digest.clone() };
    let (Some(group), true) = (r.group(), r.writes_group_key(i)) else {
        return r.wave_devices(i).iter().map(desire).collect();
    };
    let mut out = vec![Action::DesireGroup { group: group.into(), digest: digest.clone() }];
    let pinned = r.wave_devices(i).iter().enumerate().filter(|(k, _)| r.is_pinned(from + k));
    out.extend(pinned.map(|(_, d)| desire(d)));
    out
}

/// What a group rollout writes when it is done: the earlier waves' device
/// keys cleared, so those devices follow the group's key (which names the
/// same bundle: they record it, and one that failed it does not retry)
/// and a later change of the group reaches them. Done only now, long after
/// the group's key was written, so no copy of the bucket can still hand a
/// device the key's value from before.
fn done_actions(r: &Rollout) -> Vec<Action> {
    let Some(last) = r.waves.len().checked_sub(1) else { return vec![] };
    if !r.writes_group_key(last) {
        return vec![];
    }
    let before_last = r.waves[last].upto - r.wave_devices(last).len();
    let unpinned = r.devices[..before_last].iter().enumerate().filter(|(k, _)| !r.is_pinned(*k));
    unpinned.map(|(_, d)| Action::Clear { device: d.clone() }).collect()
}

fn start_wave(r: &mut Rollout, i: usize, view: &FleetView, now: u64) -> Vec<Action> {
    let w = &mut r.waves[i];
    w.started_at = Some(now);
    w.reports_seq = Some(view.reports_seq);
    wave_actions(r, i)
}

/// The actions that (re)establish what the rollout has written so far:
/// for a driver that takes over, since every action is idempotent.
pub fn ensure(r: &Rollout) -> Vec<Action> {
    match r.state {
        State::Aborted => abort_actions(r),
        State::Done => done_actions(r),
        _ => (0..r.waves.len())
            .filter(|i| r.waves[*i].started_at.is_some())
            .flat_map(|i| wave_actions(r, i))
            .collect(),
    }
}

fn abort_actions(r: &Rollout) -> Vec<Action> {
    let reached = r.waves.iter().rposition(|w| w.started_at.is_some()).map_or(0, |i| r.waves[i].upto);
    let mut back: BTreeMap<u32, &str> = BTreeMap::new();
    for (digest, devices) in &r.restore {
        for i in devices {
            back.insert(*i, digest);
        }
    }
    let mut out = vec![];
    let group_written =
        r.waves.iter().enumerate().any(|(i, w)| w.started_at.is_some() && r.writes_group_key(i));
    if let (Some(group), true) = (r.group(), group_written) {
        // The group's key first, as when it was written.
        out.push(match &r.group_before {
            Some(digest) => Action::DesireGroup { group: group.into(), digest: digest.clone() },
            None => Action::ClearGroup { group: group.into() },
        });
    }
    out.extend(r.devices[..reached].iter().enumerate().map(|(i, d)| match back.get(&(i as u32)) {
        Some(digest) => Action::Desire { device: d.clone(), digest: digest.to_string() },
        None => Action::Clear { device: d.clone() },
    }));
    out
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
    if let Some(i) = next.waves.iter().rposition(|w| w.started_at.is_some()) {
        let failed: Vec<String> = wave_outcomes(r, i, view)
            .into_iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed { .. }))
            .map(|(id, _)| id)
            .collect();
        let w = &mut next.waves[i];
        for id in failed {
            if !w.forgiven.contains(&id) {
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
    let outcomes = wave_outcomes(&next, cur, view);
    let w = &next.waves[cur];
    let size = outcomes.len();
    let failed: Vec<&String> = outcomes
        .iter()
        .filter(|(id, o)| matches!(o, Outcome::Failed { .. }) && !w.forgiven.contains(id))
        .map(|(id, _)| id)
        .collect();
    if next.max_failures.exceeded(failed.len(), size) {
        // A few by name: a wave of thousands can fail by the hundred.
        let mut names: Vec<&str> = failed.iter().take(5).map(|s| s.as_str()).collect();
        let more = format!("and {} more", failed.len().saturating_sub(5));
        if failed.len() > 5 {
            names.push(&more);
        }
        next.state = State::Paused {
            reason: format!(
                "wave {} ({}%): {} of {} devices failed ({}), over the limit of {}",
                cur + 1,
                w.percent,
                failed.len(),
                size,
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
    let actions = done_actions(&next);
    (next, actions)
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

    const BEFORE: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    /// A rollout to group g, whose key named BEFORE.
    fn rollout(n: usize, waves: &[u8], limit: Limit, wait: u64) -> Rollout {
        let (devices, waves) = plan_waves(&ids(n), waves).unwrap();
        Rollout {
            id: "r1".into(),
            release: Release { name: "os".into(), counter: 2, digest: D.into() },
            scope: "group:g".into(),
            devices,
            waves,
            max_failures: limit,
            wave_wait_secs: wait,
            state: State::Running,
            created_at: 0,
            updated_at: 0,
            group_key: true,
            group_before: Some(BEFORE.into()),
            pinned: vec![],
            restore: BTreeMap::new(),
            previous: BTreeMap::new(),
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
            stream_seq: 10,
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
        let (d, w) = plan_waves(&ids(20), &[5, 25, 100]).unwrap();
        assert_eq!(d, ids(20));
        assert_eq!(w.iter().map(|w| w.upto).collect::<Vec<_>>(), vec![1, 5, 20]);
        let (_, w) = plan_waves(&ids(3), &[5, 25, 100]).unwrap();
        assert_eq!(w.iter().map(|w| w.upto).collect::<Vec<_>>(), vec![1, 3]);
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
        // ...and the last wave starts after it: one write, the group's key.
        let (r, a) = advance(&r, &fleet(&["d00"], &[]), 50);
        assert_eq!(a, vec![Action::DesireGroup { group: "g".into(), digest: D.into() }]);
        assert!(r.waves[1].started_at.is_some());
        let (r, _) = advance(&r, &fleet(&["d00", "d01", "d02", "d03"], &[]), 60);
        // Done: the first wave's device key is cleared (the group's rules).
        let (r, a) = advance(&r, &fleet(&["d00", "d01", "d02", "d03"], &[]), 100);
        assert_eq!(r.state, State::Done);
        assert_eq!(a, vec![Action::Clear { device: "d00".into() }]);
        assert_eq!(ensure(&r), a, "a driver that takes over finishes the clearing");
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
        // d01's rollback is stored at 10, as the wave started: it does not count.
        assert_eq!(r.waves[0].reports_seq, Some(10));
        let (r, _) = advance(&r, &fleet(&[], &["d01"]), 1);
        assert_eq!(r.state, State::Running);
        // One stored after the wave started does, whatever the device's own
        // sequence or epoch (a reflashed device counts from 1 again).
        let mut failed = stored("d01", false, "rolled_back", Some("health: x"));
        (failed.report.epoch, failed.report.seq, failed.stream_seq) = (2, 3, 11);
        let (r, _) = advance(&r, &view(vec![failed]), 2);
        assert!(matches!(r.state, State::Paused { .. }), "{:?}", r.state);
    }

    #[test]
    fn an_older_record_is_read_and_keeps_its_per_device_baselines() {
        let old = serde_json::json!({
            "id": "r0", "release": {"name": "os", "counter": 2, "digest": D}, "scope": "group:g",
            "waves": [
                {"percent": 50, "devices": ["d00"], "started_at": 5, "baseline": {"d00": 10},
                 "baseline_epoch": {"d00": "0000000000000001"}, "settled_at": null},
                {"percent": 100, "devices": ["d01"], "started_at": null, "settled_at": null},
            ],
            "max_failures": {"count": 0}, "wave_wait_secs": 0, "state": "running",
            "created_at": 0, "updated_at": 0, "previous": {"d00": BEFORE, "d01": null},
        });
        let mut r: Rollout = serde_json::from_value(old).unwrap();
        r.normalize();
        assert_eq!(r.devices, ids(2));
        assert_eq!((r.waves[0].upto, r.waves[1].upto), (1, 2));
        assert_eq!(r.restore.get(BEFORE), Some(&vec![0]));
        // Its devices keep their own keys: no group key is ever written.
        assert_eq!(ensure(&r), vec![Action::Desire { device: "d00".into(), digest: D.into() }]);
        // d00's failure at its own seq 10 is from before its wave...
        assert_eq!(wave_outcomes(&r, 0, &fleet(&[], &["d00"]))[0].1, Outcome::Pending);
        // ...in another epoch, after it.
        let mut failed = stored("d00", false, "rolled_back", Some("x"));
        failed.report.epoch = 2;
        assert!(matches!(wave_outcomes(&r, 0, &view(vec![failed]))[0].1, Outcome::Failed { .. }));
        let (r, a) = advance(&r, &fleet(&["d00"], &[]), 6);
        assert_eq!(a, vec![Action::Desire { device: "d01".into(), digest: D.into() }]);
        assert!(serde_json::to_value(&r).unwrap()["waves"][0].get("devices").is_none());
    }

    #[test]
    fn a_device_with_its_own_key_gets_it_written_in_the_last_wave_too() {
        let mut r = rollout(4, &[50, 100], Limit::Count(0), 0);
        r.pinned = vec![0, 3];
        r.restore.insert("bb".repeat(32), vec![0, 3]);
        let (r, a) = advance(&r, &fleet(&[], &[]), 0);
        assert_eq!(a.len(), 2);
        let (r, a) = advance(&r, &fleet(&["d00", "d01"], &[]), 1);
        assert_eq!(
            a,
            vec![
                Action::DesireGroup { group: "g".into(), digest: D.into() },
                Action::Desire { device: "d03".into(), digest: D.into() },
            ]
        );
        // Abort: the group's key back first, then each device.
        let (_, a) = abort(&r, 2);
        assert_eq!(a[0], Action::DesireGroup { group: "g".into(), digest: BEFORE.into() });
        assert_eq!(a[1], Action::Desire { device: "d00".into(), digest: "bb".repeat(32) });
        assert_eq!(a[2], Action::Clear { device: "d01".into() });
        assert_eq!(a.len(), 5);
        // Done: only the unpinned device of the first wave is cleared.
        let (r, a) = advance(&r, &fleet(&["d00", "d01", "d02", "d03"], &[]), 3);
        assert_eq!(r.state, State::Done);
        assert_eq!(a, vec![Action::Clear { device: "d01".into() }]);
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
        let mut r = rollout(4, &[50, 100], Limit::Count(0), 0);
        r.restore.insert("cc".repeat(32), vec![1]);
        let (r, _) = advance(&r, &fleet(&[], &[]), 0);
        let (r, a) = abort(&r, 1);
        assert_eq!(r.state, State::Aborted);
        // The group's key was never written: only the devices reached.
        assert_eq!(
            a,
            vec![
                Action::Clear { device: "d00".into() },
                Action::Desire { device: "d01".into(), digest: "cc".repeat(32) },
            ]
        );
        assert_eq!(ensure(&r), a);
        assert!(resume(&r, &fleet(&[], &[]), 2).is_err());
    }
}
