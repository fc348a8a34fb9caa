//! `perch-agent status`: the running slot, what each slot holds, the deploy
//! state, the last outcome, the enrollment, the link and the outbox.
//! [`DeviceStatus`] gathers it once; it renders as text or as one JSON
//! document, so the two cannot say different things.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::Config;
use crate::deploy::{Engine, Finished};
use crate::identity::Identity;
use crate::journal::{BundleRef, DeployState, Journal, Outcome, SlotContent, SlotId};
use crate::link::LinkState;

/// Everything `perch-agent status` shows.
pub struct DeviceStatus {
    /// The slot backend's name (`dir`, `uboot`, `grub`, `hook`).
    pub backend: &'static str,
    /// `None` when the backend cannot tell.
    pub booted: Option<SlotId>,
    pub next_boot: Option<SlotId>,
    pub journal: Journal,
    /// What is wrong with the state files now (a later engine recovers
    /// from it); the journal's notices say what was recovered from before.
    pub problems: Vec<String>,
    pub enrollment: EnrollmentStatus,
    /// `None`: no agent has run with an enrollment.
    pub link: Option<LinkState>,
    /// Reports waiting and their bytes, or why the outbox cannot be read.
    pub outbox: Result<(usize, u64), String>,
}

/// The device's enrollment, as `status` shows it.
pub enum EnrollmentStatus {
    Enrolled {
        device_id: String,
        org: String,
        groups: Vec<String>,
        expires_at: u64,
        fleet_urls: Vec<String>,
        key_id: String,
    },
    No,
    /// An enrollment is there but cannot be used: why.
    Unusable(String),
}

impl DeviceStatus {
    /// Reads the device's state without taking the engine (a running
    /// agent may hold it) and without writing anything.
    pub fn gather(cfg: &Config, state_dir: &Path, now: u64) -> DeviceStatus {
        let (journal, backend, problems) = Engine::inspect(cfg, state_dir);
        let enrollment = match Identity::new(state_dir).enrollment(cfg, now) {
            Ok(Some(v)) => EnrollmentStatus::Enrolled {
                key_id: v.credential.device_key.id().to_string(),
                org: v.trust.body().org.clone(),
                device_id: v.credential.device_id,
                groups: v.credential.groups,
                expires_at: v.credential.expires_at,
                fleet_urls: v.enrollment.fleet_urls,
            },
            Ok(None) => EnrollmentStatus::No,
            Err(e) => EnrollmentStatus::Unusable(e.to_string()),
        };
        DeviceStatus {
            backend: backend.name(),
            booted: backend.booted().ok(),
            next_boot: backend.next_boot().ok().flatten(),
            journal,
            problems,
            enrollment,
            link: LinkState::read(state_dir),
            outbox: crate::outbox::peek(state_dir).map_err(|e| e.to_string()),
        }
    }

    /// The JSON document (`status --json`; the fields are in the CLI
    /// reference).
    pub fn to_json(&self) -> Value {
        let j = &self.journal;
        let slot = |s: SlotId| slot_json(j.slot_content(s));
        let highest: serde_json::Map<String, Value> =
            j.highest.iter().map(|(name, h)| (name.clone(), json!(h.counter))).collect();
        let notices: Vec<Value> = j.notices.iter().map(|n| json!({ "at": n.at, "text": n.text })).collect();
        let last = j.last.as_ref().map(|l| {
            let (outcome, reason) = outcome_parts(&l.outcome);
            json!({ "outcome": outcome, "reason": reason, "at": l.at, "bundle": l.bundle.as_ref().map(bundle_json) })
        });
        let enrollment = match &self.enrollment {
            EnrollmentStatus::Enrolled { device_id, org, groups, expires_at, fleet_urls, key_id } => json!({
                "enrolled": true, "device_id": device_id, "org": org, "groups": groups,
                "expires_at": expires_at, "fleet_urls": fleet_urls, "key_id": key_id,
            }),
            EnrollmentStatus::No => json!({ "enrolled": false }),
            EnrollmentStatus::Unusable(why) => json!({ "enrolled": false, "problem": why }),
        };
        let mut doc = json!({
            "backend": self.backend,
            "booted_slot": self.booted.map(SlotId::as_str),
            "next_boot_slot": self.next_boot.map(SlotId::as_str),
            "slots": { "a": slot(SlotId::A), "b": slot(SlotId::B) },
            "deploy": state_json(&j.state),
            "last_outcome": last,
            "highest_counters": highest,
            "journal_seq": j.seq,
            "journal_problem": (!self.problems.is_empty()).then(|| self.problems.join("; ")),
            "state_notices": notices,
            "enrollment": enrollment,
            "link": self.link.as_ref().map(|l| json!(l)),
        });
        if let Ok((waiting, bytes)) = self.outbox {
            doc["outbox"] = json!({ "waiting": waiting, "bytes": bytes });
        }
        doc
    }

    /// The same, for people: one aligned line per fact.
    pub fn to_text(&self) -> String {
        let j = &self.journal;
        let slot = |s: Option<SlotId>| s.map_or("-", SlotId::as_str);
        let mut lines: Vec<(&str, String)> = vec![
            ("backend", self.backend.to_string()),
            ("running", format!("slot {}", slot(self.booted))),
            ("next boot", format!("slot {}", slot(self.next_boot))),
            ("slot a", slot_text(j.slot_content(SlotId::A))),
            ("slot b", slot_text(j.slot_content(SlotId::B))),
            ("deploy", state_text(&j.state)),
        ];
        let last = match &j.last {
            None => "-".to_string(),
            Some(l) => {
                let (outcome, reason) = outcome_parts(&l.outcome);
                let mut line = outcome.to_string();
                if let Some(b) = &l.bundle {
                    line.push_str(&format!(": {}", bundle_text(b)));
                }
                if let Some(r) = reason {
                    line.push_str(&format!(" ({r})"));
                }
                line
            }
        };
        lines.push(("last", last));
        if !self.problems.is_empty() {
            lines.push(("WARNING", self.problems.join("; ")));
        }
        for n in &j.notices {
            lines.push(("WARNING", format!("{} {}", rfc3339(n.at), n.text)));
        }
        lines.push((
            "enrolled",
            match &self.enrollment {
                EnrollmentStatus::Enrolled { device_id, groups, key_id, .. } => {
                    format!("as {device_id} (key {key_id}) in groups [{}]", groups.join(", "))
                }
                EnrollmentStatus::No => "no".to_string(),
                EnrollmentStatus::Unusable(why) => format!("no ({why})"),
            },
        ));
        lines.push((
            "link",
            match &self.link {
                Some(l) => format!("{} since {}", l.state, rfc3339(l.since)),
                None => "none (no agent has run with an enrollment)".to_string(),
            },
        ));
        lines.push((
            "outbox",
            match &self.outbox {
                Ok((n, bytes)) => format!("{n} reports waiting to be sent ({bytes} bytes)"),
                Err(e) => format!("unreadable ({e})"),
            },
        ));
        lines.iter().map(|(label, value)| format!("{label:<12} {value}\n")).collect()
    }
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

fn bundle_json(b: &BundleRef) -> Value {
    json!({
        "name": b.name,
        "counter": b.counter,
        "version": b.version,
        "digest": hex::encode(b.digest),
        "kind": b.kind.as_str(),
    })
}

fn bundle_text(b: &BundleRef) -> String {
    format!("{} #{} ({})", b.name, b.counter, b.version)
}

/// A deploy state's parts, named once for both renderings.
struct StateParts<'a> {
    bundle: Option<&'a BundleRef>,
    slot: Option<SlotId>,
    from: Option<SlotId>,
    /// Staging: the next chunk to write, of how many.
    synced: Option<(u64, u64)>,
    /// Trial: when it ends (`None`: when the health checks say).
    deadline: Option<Option<u64>>,
    reason: Option<String>,
}

fn state_parts(s: &DeployState) -> StateParts<'_> {
    let mut p =
        StateParts { bundle: s.bundle(), slot: None, from: None, synced: None, deadline: None, reason: None };
    match s {
        DeployState::Staging { slot, next_chunk, bundle } => {
            p.slot = Some(*slot);
            p.synced = Some((u64::from(*next_chunk), u64::from(bundle.chunk_count)));
        }
        DeployState::Staged { slot, .. }
        | DeployState::Committing { slot, .. }
        | DeployState::Committed { slot, .. } => p.slot = Some(*slot),
        DeployState::Activating { slot, from, .. } => (p.slot, p.from) = (Some(*slot), Some(*from)),
        DeployState::Trial { slot, from, deadline, .. } => {
            (p.slot, p.from, p.deadline) = (Some(*slot), Some(*from), Some(*deadline));
        }
        DeployState::RollingBack { slot, from, reason, .. } => {
            (p.slot, p.from, p.reason) = (Some(*slot), Some(*from), Some(reason.to_string()));
        }
        DeployState::RolledBack { slot, reason, .. } => {
            (p.slot, p.reason) = (Some(*slot), Some(reason.to_string()))
        }
        DeployState::Failed { reason, .. } => p.reason = Some(reason.clone()),
        DeployState::Idle => {}
    }
    p
}

fn state_json(s: &DeployState) -> Value {
    let p = state_parts(s);
    let mut v = json!({ "state": s.name() });
    if let Some(b) = p.bundle {
        v["bundle"] = bundle_json(b);
    }
    if let Some(slot) = p.slot {
        v["slot"] = json!(slot.as_str());
    }
    if let Some(from) = p.from {
        v["from"] = json!(from.as_str());
    }
    if let Some((next, count)) = p.synced {
        v["next_chunk"] = json!(next);
        v["chunk_count"] = json!(count);
    }
    if let Some(deadline) = p.deadline {
        v["deadline"] = json!(deadline);
    }
    if let Some(reason) = p.reason {
        v["reason"] = json!(reason);
    }
    v
}

fn state_text(s: &DeployState) -> String {
    let p = state_parts(s);
    let mut line = s.name().to_string();
    if let Some(b) = p.bundle {
        line.push_str(&format!(": {}", bundle_text(b)));
    }
    if let Some(slot) = p.slot {
        line.push_str(&format!(" in slot {}", slot.as_str()));
    }
    if let Some((next, count)) = p.synced {
        line.push_str(&format!(", synced to chunk {next} of {count}"));
    }
    if let Some(reason) = p.reason {
        line.push_str(&format!(" ({reason})"));
    }
    line
}

/// How `install` (or a resumed deploy) ended, for `install --json`:
/// `{"outcome": ..., "bundle": {...}, "deploy": {...}}`, plus the
/// rollback `reason` or the `slot` a reboot goes to.
pub fn finished_json(state: &DeployState, f: &Finished) -> Value {
    let (outcome, bundle) = match f {
        Finished::Committed(b) => ("committed", Some(b)),
        Finished::RolledBack(b, _) => ("rolled_back", Some(b)),
        Finished::AwaitingReboot(_) => ("awaiting_reboot", state.bundle()),
        Finished::Idle => ("idle", None),
        Finished::AlreadyRunning(b) => ("already_running", Some(b)),
        Finished::NeedsBundle(b) => ("needs_bundle", Some(b)),
    };
    let mut v = json!({ "outcome": outcome, "deploy": state_json(state) });
    if let Some(b) = bundle {
        v["bundle"] = bundle_json(b);
    }
    match f {
        Finished::RolledBack(_, reason) => v["reason"] = json!(reason.to_string()),
        Finished::AwaitingReboot(slot) => v["slot"] = json!(slot.as_str()),
        _ => {}
    }
    v
}

/// How `install` (or a resumed deploy) ended, for people: one line.
/// `state` is the journal's state now.
pub fn finished_text(state: &DeployState, f: &Finished) -> String {
    match f {
        Finished::Committed(b) => format!("committed {b}"),
        Finished::RolledBack(b, r) => format!("rolled back {b}: {r}"),
        Finished::AwaitingReboot(s) => format!("waiting for a reboot into slot {s}"),
        Finished::Idle => format!("nothing in flight ({})", state.name()),
        Finished::AlreadyRunning(b) => format!("{b} is already running; nothing to do"),
        Finished::NeedsBundle(b) => format!(
            "staging of {b} was interrupted; run `perch-agent install` with the bundle again to resume"
        ),
    }
}

/// The exit code of a finished deploy: a rolled-back one failed, for scripts.
pub fn finished_code(f: &Finished) -> u8 {
    u8::from(matches!(f, Finished::RolledBack(..)))
}

fn outcome_parts(o: &Outcome) -> (&'static str, Option<String>) {
    match o {
        Outcome::Committed => ("committed", None),
        Outcome::RolledBack(r) => ("rolled_back", Some(r.to_string())),
        Outcome::Failed(r) => ("failed", Some(r.clone())),
    }
}

/// A slot: its bundle, `null` for nothing perch installed, or for a slot
/// written to without completing `{"dirty": true, "partial": bundle}`
/// (no `counter` at the top: it holds no known bundle).
fn slot_json(c: &SlotContent) -> Value {
    match c {
        SlotContent::Unknown => Value::Null,
        SlotContent::Bundle(b) => bundle_json(b),
        SlotContent::Dirty(b) => json!({ "dirty": true, "partial": bundle_json(b) }),
    }
}

fn slot_text(c: &SlotContent) -> String {
    match c {
        SlotContent::Unknown => "(empty)".to_string(),
        SlotContent::Bundle(b) => bundle_text(b),
        SlotContent::Dirty(b) => {
            format!(
                "dirty: partly written from {} #{} ({}); not a known bundle",
                b.name, b.counter, b.version
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perch_protocol::bundle::PayloadKind;

    fn os(counter: u64) -> BundleRef {
        BundleRef {
            name: "os".into(),
            counter,
            version: format!("1.{counter}"),
            digest: [7; 32],
            kind: PayloadKind::Image,
            payload_len: 4096,
            chunk_count: 4,
        }
    }

    fn sample(state: DeployState) -> DeviceStatus {
        let mut journal = Journal { state, ..Journal::default() };
        journal.set_slot(SlotId::A, SlotContent::Bundle(os(3)));
        journal.set_slot(SlotId::B, SlotContent::Dirty(os(4)));
        DeviceStatus {
            backend: "uboot",
            booted: Some(SlotId::A),
            next_boot: None,
            journal,
            problems: vec![],
            enrollment: EnrollmentStatus::Enrolled {
                device_id: "drone-7".into(),
                org: "acme".into(),
                groups: vec!["drones".into(), "eu".into()],
                expires_at: 99,
                fleet_urls: vec!["tls://hub:4222".into()],
                key_id: "K1".into(),
            },
            link: None,
            outbox: Err("outbox/lane unreadable".into()),
        }
    }

    #[test]
    fn text_and_json_say_the_same_of_a_staging_device() {
        let st = sample(DeployState::Staging { bundle: os(4), slot: SlotId::B, next_chunk: 2 });
        let text = st.to_text();
        let v = st.to_json();
        assert!(
            text.contains("deploy       staging: os #4 (1.4) in slot b, synced to chunk 2 of 4\n"),
            "{text}"
        );
        assert_eq!(
            (v["deploy"]["next_chunk"].as_u64(), v["deploy"]["chunk_count"].as_u64()),
            (Some(2), Some(4))
        );
        assert!(
            text.contains("slot b       dirty: partly written from os #4 (1.4); not a known bundle\n"),
            "{text}"
        );
        assert_eq!(v["slots"]["b"]["dirty"], true);
        assert!(text.contains("next boot    slot -\n"), "{text}");
        assert!(v["next_boot_slot"].is_null());
        assert!(text.contains("enrolled     as drone-7 (key K1) in groups [drones, eu]\n"), "{text}");
        assert_eq!(v["enrollment"]["groups"][1], "eu");
        assert!(text.contains("outbox       unreadable (outbox/lane unreadable)\n"), "{text}");
        assert!(v.get("outbox").is_none(), "{v}");
        assert!(text.contains("link         none"), "{text}");
        assert!(v["link"].is_null());
    }

    #[test]
    fn every_text_line_has_its_label_in_a_column_of_its_own() {
        let mut st = sample(DeployState::Trial {
            bundle: os(4),
            slot: SlotId::B,
            from: SlotId::A,
            boot: "x".into(),
            deadline: Some(5),
        });
        st.problems = vec!["journal damaged".into()];
        st.link = Some(LinkState { state: "connected".into(), since: 0, urls: vec![], last_event: None });
        for line in st.to_text().lines() {
            assert_eq!(line.as_bytes()[12], b' ', "{line:?}");
            assert_ne!(line.as_bytes()[13], b' ', "{line:?}");
        }
        let v = st.to_json();
        assert_eq!((v["deploy"]["from"].as_str(), v["deploy"]["deadline"].as_u64()), (Some("a"), Some(5)));
        assert_eq!(v["journal_problem"], "journal damaged");
        assert_eq!(v["link"]["state"], "connected");
    }
}
