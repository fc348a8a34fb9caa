//! A second durable copy of the highest committed counter per bundle name,
//! so rollback protection survives even a corrupt journal. Stored with the
//! journal's own codec (a journal record holding only the counters).

use std::collections::BTreeMap;
use std::path::Path;

use perch_support::durable::{self, read_bounded, Replace, WriteError};

use crate::journal::Journal;

const FILE: &str = "counters";

pub fn save(state_dir: &Path, highest: &BTreeMap<String, u64>) -> Result<(), WriteError> {
    let record = Journal { highest: highest.clone(), ..Journal::default() };
    durable::write_bytes(&state_dir.join(FILE), 0o600, Replace::Allow, &record.encode())
}

/// The saved counters; empty if there are none or they cannot be read.
pub fn load(state_dir: &Path) -> BTreeMap<String, u64> {
    read_bounded(&state_dir.join(FILE), 1 << 20)
        .ok()
        .and_then(|b| Journal::decode(&b).ok())
        .map(|j| j.highest)
        .unwrap_or_default()
}
