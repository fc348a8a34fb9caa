//! What the link announces to Choria that outlives a process: `provisioned`
//! once after an enrollment, and `upgraded` once per committed deploy
//! (see `perch_protocol::lifecycle`). Each is owed through a small state
//! file, so an event owed while the link was down is sent when it is up:
//!
//! - `STATE/lifecycle-provisioned`: written when an enrollment is stored,
//!   removed once `provisioned` is sent;
//! - `STATE/lifecycle-upgraded`: the last commit announced (or found when
//!   the daemon first looked: a commit made before then is not news).
//!
//! It is the journal's latest commit that is owed: of several commits made
//! while the link was down, only the last is announced, and a commit
//! followed within the poll (2 s) by a failed install is not.
//!
//! Both are written with `durable` (write-temp, fsync, rename, fsync dir).

use std::path::Path;

use perch_protocol::lifecycle::NO_BUNDLE;
use perch_support::durable::{self, Replace};

use crate::journal::{JournalStore, Outcome, SlotContent, SlotId};

const PROVISIONED: &str = "lifecycle-provisioned";
const UPGRADED: &str = "lifecycle-upgraded";

/// An enrollment was stored: `provisioned` is owed. Best effort, as
/// every lifecycle event is: the enrollment does not depend on it.
pub fn owe_provisioned(state_dir: &Path) {
    if let Err(e) = durable::write_bytes(&state_dir.join(PROVISIONED), 0o644, Replace::Allow, b"owed\n") {
        tracing::warn!("the Choria provisioned event will not be sent: {e}");
    }
}

/// Called before the daemon's engine runs: from now on, every commit is
/// news (the first time, what the journal holds is not).
pub fn baseline(state_dir: &Path) {
    if !state_dir.join(UPGRADED).exists() {
        let _ = upgrade_owed(state_dir);
    }
}

pub fn provisioned_owed(state_dir: &Path) -> bool {
    state_dir.join(PROVISIONED).is_file()
}

pub fn provisioned_sent(state_dir: &Path) {
    if let Err(e) = std::fs::remove_file(state_dir.join(PROVISIONED)) {
        tracing::warn!("the Choria provisioned event may be sent again after a restart: {e}");
    }
}

/// An `upgraded` event owed: the bundles before and after (`NAME@COUNTER`),
/// and the key [`upgraded_sent`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub before: String,
    pub after: String,
    key: String,
}

/// The last commit in the journal, if it was not announced yet. The first
/// time (no record), what the journal holds is taken as announced.
pub fn upgrade_owed(state_dir: &Path) -> Option<Upgrade> {
    let journal = JournalStore::new(state_dir).load().ok()?;
    let last = journal.last.as_ref().filter(|l| l.outcome == Outcome::Committed);
    let key = last.and_then(|l| l.bundle.as_ref()).map_or_else(
        || "none".to_string(),
        |b| format!("{}:{}", last.map_or(0, |l| l.at), hex::encode(b.digest)),
    );
    let recorded = perch_support::durable::read_bounded(&state_dir.join(UPGRADED), 256).ok();
    match recorded {
        None => {
            // First look: nothing is owed for what happened before.
            let _ = durable::write_bytes(&state_dir.join(UPGRADED), 0o644, Replace::Allow, key.as_bytes());
            return None;
        }
        Some(r) if r == key.as_bytes() => return None,
        Some(_) => {}
    }
    let after = last?.bundle.as_ref()?;
    let name = |c: &SlotContent| match c {
        SlotContent::Bundle(b) => format!("{}@{}", b.name, b.counter),
        _ => NO_BUNDLE.to_string(),
    };
    // The committed bundle's slot; the other one holds what ran before.
    let committed = [SlotId::A, SlotId::B]
        .into_iter()
        .find(|s| matches!(journal.slot_content(*s), SlotContent::Bundle(b) if b.digest == after.digest));
    let before = committed.map_or_else(|| NO_BUNDLE.to_string(), |s| name(journal.slot_content(s.other())));
    Some(Upgrade { before, after: format!("{}@{}", after.name, after.counter), key })
}

pub fn upgraded_sent(state_dir: &Path, u: &Upgrade) {
    if let Err(e) = durable::write_bytes(&state_dir.join(UPGRADED), 0o644, Replace::Allow, u.key.as_bytes()) {
        tracing::warn!("the Choria upgraded event may be sent again after a restart: {e}");
    }
}
