//! A technician's `commit` or `rollback` while another process's engine
//! runs the trial (the agent at boot, or an `install` in another shell).
//!
//! The command cannot take the engine (see [`crate::engine_lock`]), so it
//! leaves its decision in `STATE/decision`, naming the bundle on trial, and
//! waits. The engine running the trial looks for it between rounds of
//! health checks and acts on it as if its own checks had decided. A
//! decision naming another bundle is stale (its command was killed) and is
//! dropped; so is any decision found when a trial starts.

use std::path::{Path, PathBuf};

use perch_support::durable::{self, Replace, WriteError};

use crate::statefile::{self, StateFile};

pub const DECISION_FILE: &str = "decision";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Rollback,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Rollback => "rollback",
        }
    }
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(DECISION_FILE)
}

/// The longest decision file read: `rollback <64 hex>\n` with room to spare.
const MAX_LEN: usize = 256;

/// Leaves `decision` for the trial of `bundle` (durably: the engine may
/// read it after a crash of this process).
pub fn request(state_dir: &Path, decision: Decision, bundle: &[u8; 32]) -> Result<(), WriteError> {
    let path = path(state_dir);
    // A directory in the way would make every request fail: move it aside.
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if statefile::not_a_file(&meta).is_some() {
            let _ = statefile::move_aside(&path, perch_support::now_unix());
        }
    }
    let text = format!("{} {}\n", decision.as_str(), hex::encode(bundle));
    durable::write_bytes(&path, 0o600, Replace::Allow, text.as_bytes())
}

/// The decision left for the trial of `bundle`, if any; removes whatever
/// it finds, so a decision is acted on once. A damaged one (too large, not
/// a file) is moved aside with one line on stderr and decides nothing.
pub fn take(state_dir: &Path, bundle: &[u8; 32]) -> Option<Decision> {
    let path = path(state_dir);
    let text = match statefile::read(&path, MAX_LEN) {
        Ok(StateFile::Bytes(b)) => String::from_utf8(b).ok(),
        Ok(StateFile::Missing) | Err(_) => return None,
        Ok(StateFile::Damaged(why)) => {
            match statefile::move_aside(&path, perch_support::now_unix()) {
                Ok(to) => eprintln!(
                    "perch-agent: decision {}: {why}; moved aside to {}",
                    path.display(),
                    to.display()
                ),
                Err(e) => {
                    eprintln!("perch-agent: decision {}: {why}; cannot move it aside: {e}", path.display())
                }
            }
            return None;
        }
    };
    withdraw(state_dir);
    let text = text?;
    let (word, digest) = text.trim().split_once(' ')?;
    if digest != hex::encode(bundle) {
        return None;
    }
    match word {
        "commit" => Some(Decision::Commit),
        "rollback" => Some(Decision::Rollback),
        _ => None,
    }
}

/// Removes a decision nobody acted on.
pub fn withdraw(state_dir: &Path) {
    let _ = std::fs::remove_file(path(state_dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_for_one_bundle_and_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        request(dir.path(), Decision::Rollback, &[7; 32]).unwrap();
        assert_eq!(take(dir.path(), &[8; 32]), None, "another bundle's trial");
        assert_eq!(take(dir.path(), &[7; 32]), None, "a stale decision was dropped");
        request(dir.path(), Decision::Commit, &[7; 32]).unwrap();
        assert_eq!(take(dir.path(), &[7; 32]), Some(Decision::Commit));
        assert_eq!(take(dir.path(), &[7; 32]), None);
        std::fs::write(dir.path().join(DECISION_FILE), "reboot now\n").unwrap();
        assert_eq!(take(dir.path(), &[7; 32]), None);
    }

    #[test]
    fn a_damaged_decision_file_is_moved_aside_and_requests_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(DECISION_FILE);
        std::fs::create_dir(&p).unwrap();
        assert_eq!(take(dir.path(), &[7; 32]), None);
        assert!(!p.exists(), "the directory was moved aside");
        std::fs::create_dir(&p).unwrap();
        request(dir.path(), Decision::Commit, &[7; 32]).unwrap();
        assert_eq!(take(dir.path(), &[7; 32]), Some(Decision::Commit));
        std::fs::write(&p, vec![b'x'; 10 << 20]).unwrap();
        assert_eq!(take(dir.path(), &[7; 32]), None);
        assert!(!p.exists());
    }
}
