//! A second durable copy of the highest committed release per bundle name,
//! so rollback protection survives the loss or damage of the journal (and
//! the journal's copy survives the loss of this one). Stored with the
//! journal's own codec (a journal record holding only the counters).

use std::path::{Path, PathBuf};

use perch_support::durable::{self, ReadError, Replace, WriteError};

use crate::journal::{Counters, Journal, MAX_FILE};
use crate::statefile::{self, StateFile};

pub const COUNTERS_FILE: &str = "counters";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(COUNTERS_FILE)
}

pub fn save(state_dir: &Path, highest: &Counters) -> Result<(), WriteError> {
    let record = Journal { highest: highest.clone(), ..Journal::default() };
    durable::write_bytes(&path(state_dir), 0o600, Replace::Allow, &record.encode())
}

/// What the counters file holds.
#[derive(Debug)]
pub enum Loaded {
    Missing,
    Counters(Counters),
    /// Unreadable as a counters record: why.
    Damaged(String),
}

/// Reads the counters file; only an I/O failure that is not the file's
/// own fault is an error.
pub fn load(state_dir: &Path) -> Result<Loaded, ReadError> {
    Ok(match statefile::read(&path(state_dir), MAX_FILE)? {
        StateFile::Missing => Loaded::Missing,
        StateFile::Damaged(why) => Loaded::Damaged(why),
        StateFile::Bytes(b) => match Journal::decode(&b) {
            Ok(j) => Loaded::Counters(j.highest),
            Err(why) => Loaded::Damaged(why),
        },
    })
}
