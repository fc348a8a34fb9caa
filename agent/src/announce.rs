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

/// Called before the daemon's engine runs (and by the link, for agents
/// that run one without the daemon): from now on, every commit is news;
/// what the journal holds the first time is not.
pub fn baseline(state_dir: &Path) {
    if state_dir.join(UPGRADED).exists() {
        return;
    }
    if let Some((key, _)) = latest_commit(state_dir) {
        record(state_dir, &key);
    } else {
        record(state_dir, NONE);
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

/// The key recorded when the journal holds no commit.
const NONE: &str = "none";

/// The journal's latest commit, if it was not announced yet; nothing
/// before [`baseline`] made a record.
pub fn upgrade_owed(state_dir: &Path) -> Option<Upgrade> {
    let recorded = perch_support::durable::read_bounded(&state_dir.join(UPGRADED), 256).ok()?;
    let (key, (before, after)) = latest_commit(state_dir)?;
    (recorded != key.as_bytes()).then_some(Upgrade { before, after, key })
}

/// The latest commit's key (its time and digest) and the bundles before and
/// after it, `NAME@COUNTER`.
fn latest_commit(state_dir: &Path) -> Option<(String, (String, String))> {
    let journal = JournalStore::new(state_dir).load().ok()?;
    let last = journal.last.as_ref().filter(|l| l.outcome == Outcome::Committed)?;
    let after = last.bundle.as_ref()?;
    let name = |c: &SlotContent| match c {
        SlotContent::Bundle(b) => format!("{}@{}", b.name, b.counter),
        _ => NO_BUNDLE.to_string(),
    };
    // The committed bundle's slot; the other one holds what ran before.
    let committed = [SlotId::A, SlotId::B]
        .into_iter()
        .find(|s| matches!(journal.slot_content(*s), SlotContent::Bundle(b) if b.digest == after.digest));
    let before = committed.map_or_else(|| NO_BUNDLE.to_string(), |s| name(journal.slot_content(s.other())));
    let key = format!("{}:{}", last.at, hex::encode(after.digest));
    Some((key, (before, format!("{}@{}", after.name, after.counter))))
}

fn record(state_dir: &Path, key: &str) {
    if let Err(e) = durable::write_bytes(&state_dir.join(UPGRADED), 0o644, Replace::Allow, key.as_bytes()) {
        tracing::warn!("the Choria upgraded event may be sent again after a restart: {e}");
    }
}

pub fn upgraded_sent(state_dir: &Path, u: &Upgrade) {
    record(state_dir, &u.key);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{BundleRef, Journal, LastOutcome};
    use perch_protocol::bundle::PayloadKind;

    fn app(counter: u64) -> BundleRef {
        BundleRef {
            name: "app".into(),
            counter,
            version: counter.to_string(),
            digest: [counter as u8; 32],
            kind: PayloadKind::Archive,
            payload_len: 1,
            chunk_count: 1,
        }
    }

    /// The journal after committing `counter` into `slot`, `before` in the other.
    fn commit(dir: &Path, slot: SlotId, counter: u64, before: SlotContent) {
        let mut j = Journal::default();
        j.set_slot(slot, SlotContent::Bundle(app(counter)));
        j.set_slot(slot.other(), before);
        j.last =
            Some(LastOutcome { bundle: Some(app(counter)), outcome: Outcome::Committed, at: counter * 10 });
        JournalStore::new(dir).save(&mut j).unwrap();
    }

    #[test]
    fn each_commit_after_the_baseline_is_owed_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        commit(d, SlotId::B, 1, SlotContent::Unknown);
        // No record yet: nothing is owed, and the baseline takes what is there.
        assert_eq!(upgrade_owed(d), None);
        baseline(d);
        assert_eq!(upgrade_owed(d), None);
        commit(d, SlotId::A, 2, SlotContent::Bundle(app(1)));
        let u = upgrade_owed(d).unwrap();
        assert_eq!((u.before.as_str(), u.after.as_str()), ("app@1", "app@2"));
        upgraded_sent(d, &u);
        assert_eq!(upgrade_owed(d), None);
        // A baseline again changes nothing once there is a record.
        commit(d, SlotId::B, 3, SlotContent::Dirty(app(2)));
        baseline(d);
        let u = upgrade_owed(d).unwrap();
        assert_eq!((u.before.as_str(), u.after.as_str()), (NO_BUNDLE, "app@3"));
    }

    #[test]
    fn provisioned_is_owed_until_sent() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!provisioned_owed(dir.path()));
        owe_provisioned(dir.path());
        assert!(provisioned_owed(dir.path()));
        provisioned_sent(dir.path());
        assert!(!provisioned_owed(dir.path()));
    }
}
