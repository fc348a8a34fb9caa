//! `perch-agent status`: the running slot, what each slot holds, the deploy
//! state and the last outcome, as text or one JSON document.

use serde_json::{json, Value};

use crate::journal::{BundleRef, DeployState, Journal, Outcome, SlotContent, SlotId};

fn bundle_json(b: &BundleRef) -> Value {
    json!({
        "name": b.name,
        "counter": b.counter,
        "version": b.version,
        "digest": hex::encode(b.digest),
        "kind": b.kind.as_str(),
    })
}

fn state_json(s: &DeployState) -> Value {
    let mut v = json!({ "state": s.name() });
    if let Some(b) = s.bundle() {
        v["bundle"] = bundle_json(b);
    }
    match s {
        DeployState::Staging { slot, next_chunk, bundle } => {
            v["slot"] = json!(slot.as_str());
            v["next_chunk"] = json!(next_chunk);
            v["chunk_count"] = json!(bundle.chunk_count);
        }
        DeployState::Staged { slot, .. }
        | DeployState::Committing { slot, .. }
        | DeployState::Committed { slot, .. } => {
            v["slot"] = json!(slot.as_str());
        }
        DeployState::Activating { slot, from, .. } => {
            v["slot"] = json!(slot.as_str());
            v["from"] = json!(from.as_str());
        }
        DeployState::Trial { slot, from, deadline, .. } => {
            v["slot"] = json!(slot.as_str());
            v["from"] = json!(from.as_str());
            v["deadline"] = json!(deadline);
        }
        DeployState::RollingBack { slot, from, reason, .. } => {
            v["slot"] = json!(slot.as_str());
            v["from"] = json!(from.as_str());
            v["reason"] = json!(reason.to_string());
        }
        DeployState::RolledBack { slot, reason, .. } => {
            v["slot"] = json!(slot.as_str());
            v["reason"] = json!(reason.to_string());
        }
        DeployState::Failed { reason, .. } => v["reason"] = json!(reason),
        DeployState::Idle => {}
    }
    v
}

/// How `install` (or a resumed deploy) ended, for `install --json`:
/// `{"outcome": ..., "bundle": {...}, "deploy": {...}}`, plus the
/// rollback `reason` or the `slot` a reboot goes to.
pub fn finished_json(state: &DeployState, f: &crate::deploy::Finished) -> Value {
    use crate::deploy::Finished;
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

fn outcome_text(o: &Outcome) -> (String, Option<String>) {
    match o {
        Outcome::Committed => ("committed".into(), None),
        Outcome::RolledBack(r) => ("rolled_back".into(), Some(r.to_string())),
        Outcome::Failed(r) => ("failed".into(), Some(r.clone())),
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

/// The status document. `problems`: what is wrong with the state files
/// now (a later engine recovers from it); the journal's notices say what
/// was recovered from before.
pub fn to_json(
    j: &Journal,
    backend: &str,
    booted: Option<SlotId>,
    next_boot: Option<SlotId>,
    problems: &[String],
) -> Value {
    let slot = |s: SlotId| slot_json(j.slot_content(s));
    let highest: serde_json::Map<String, Value> =
        j.highest.iter().map(|(name, h)| (name.clone(), json!(h.counter))).collect();
    let notices: Vec<Value> = j.notices.iter().map(|n| json!({ "at": n.at, "text": n.text })).collect();
    let last = j.last.as_ref().map(|l| {
        let (outcome, reason) = outcome_text(&l.outcome);
        json!({ "outcome": outcome, "reason": reason, "at": l.at, "bundle": l.bundle.as_ref().map(bundle_json) })
    });
    json!({
        "backend": backend,
        "booted_slot": booted.map(SlotId::as_str),
        "next_boot_slot": next_boot.map(SlotId::as_str),
        "slots": { "a": slot(SlotId::A), "b": slot(SlotId::B) },
        "deploy": state_json(&j.state),
        "last_outcome": last,
        "highest_counters": highest,
        "journal_seq": j.seq,
        "journal_problem": (!problems.is_empty()).then(|| problems.join("; ")),
        "state_notices": notices,
    })
}

/// The same, for people.
pub fn to_text(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let b = |v: &Value| {
        if v.is_null() {
            "(empty)".to_string()
        } else if v["dirty"] == true {
            let p = &v["partial"];
            format!(
                "dirty: partly written from {} #{} ({}); not a known bundle",
                s(&p["name"]),
                s(&p["counter"]),
                s(&p["version"])
            )
        } else {
            format!("{} #{} ({})", s(&v["name"]), s(&v["counter"]), s(&v["version"]))
        }
    };
    out.push_str(&format!("backend      {}\n", s(&v["backend"])));
    out.push_str(&format!("running      slot {}\n", s(&v["booted_slot"])));
    out.push_str(&format!("next boot    slot {}\n", s(&v["next_boot_slot"])));
    out.push_str(&format!("slot a       {}\n", b(&v["slots"]["a"])));
    out.push_str(&format!("slot b       {}\n", b(&v["slots"]["b"])));
    let d = &v["deploy"];
    let mut state = s(&d["state"]);
    if !d["bundle"].is_null() {
        state.push_str(&format!(": {}", b(&d["bundle"])));
    }
    if !d["slot"].is_null() {
        state.push_str(&format!(" in slot {}", s(&d["slot"])));
    }
    if !d["next_chunk"].is_null() {
        state.push_str(&format!(", synced to chunk {} of {}", s(&d["next_chunk"]), s(&d["chunk_count"])));
    }
    if !d["reason"].is_null() {
        state.push_str(&format!(" ({})", s(&d["reason"])));
    }
    out.push_str(&format!("deploy       {state}\n"));
    match &v["last_outcome"] {
        Value::Null => out.push_str("last         -\n"),
        l => {
            let mut line = s(&l["outcome"]);
            if !l["bundle"].is_null() {
                line.push_str(&format!(": {}", b(&l["bundle"])));
            }
            if !l["reason"].is_null() {
                line.push_str(&format!(" ({})", s(&l["reason"])));
            }
            out.push_str(&format!("last         {line}\n"));
        }
    }
    if let Some(p) = v["journal_problem"].as_str() {
        out.push_str(&format!("WARNING      {p}\n"));
    }
    for n in v["state_notices"].as_array().into_iter().flatten() {
        let at = n["at"].as_u64().unwrap_or(0);
        let when =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at));
        out.push_str(&format!("WARNING      {when} {}\n", s(&n["text"])));
    }
    out
}
