//! What the deploy state directory says, whatever state its two records
//! are in: the journal and the counters copy are read independently, and
//! the highest committed counters are the maximum of both, so they are
//! lost only when both files are. Damage and loss are named here, one
//! line each; [`crate::deploy::Engine::open`] acts on them.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::counters;
use crate::journal::{merge_counters, Counters, Journal, JournalError, JournalStore};

/// The two records as found on disk.
#[derive(Debug)]
pub struct Found {
    /// The journal; `None` if missing or damaged.
    pub journal: Option<Journal>,
    /// Why the journal is damaged.
    pub journal_damage: Option<JournalError>,
    pub counters: counters::Loaded,
    pub counters_path: PathBuf,
}

/// Reads both records without writing anything. Errors only for I/O
/// trouble that is not a file's own fault.
pub fn find(state_dir: &Path) -> Result<Found, JournalError> {
    let (journal, journal_damage) = match JournalStore::new(state_dir).load_existing() {
        Ok(j) => (j, None),
        Err(e @ JournalError::Corrupt { .. }) => (None, Some(e)),
        Err(e) => return Err(e),
    };
    let counters = counters::load(state_dir)?;
    Ok(Found { journal, journal_damage, counters, counters_path: counters::path(state_dir) })
}

impl Found {
    /// The journal to go on with: the one found (or a fresh one, nothing
    /// in flight), holding the highest counters of both records.
    pub fn merged(&self) -> Journal {
        let mut j = self.journal.clone().unwrap_or_default();
        if let counters::Loaded::Counters(c) = &self.counters {
            merge_counters(&mut j.highest, c);
        }
        j
    }

    /// Whether the counters file must be (re)written to hold `merged`.
    pub fn counters_stale(&self, merged: &Counters) -> bool {
        match &self.counters {
            counters::Loaded::Counters(c) => c != merged,
            counters::Loaded::Missing | counters::Loaded::Damaged(_) => true,
        }
    }

    /// What is wrong, one problem each. `ran_before`: an engine has used
    /// this state directory before (its lock file was there), so two
    /// missing records mean lost ones, not a new device.
    pub fn problems(&self, ran_before: bool) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(JournalError::Corrupt { path, detail }) = &self.journal_damage {
            out.push(Problem::JournalDamaged { path: path.clone(), detail: detail.clone() });
        }
        if let counters::Loaded::Damaged(detail) = &self.counters {
            out.push(Problem::CountersDamaged { path: self.counters_path.clone(), detail: detail.clone() });
        }
        let counters_gone = !matches!(self.counters, counters::Loaded::Counters(_));
        let journal_gone = self.journal.is_none();
        let damaged = self.journal_damage.is_some() || matches!(self.counters, counters::Loaded::Damaged(_));
        if journal_gone && counters_gone && (ran_before || damaged) {
            out.push(Problem::CountersLost);
        }
        out
    }
}

/// One thing found wrong with the deploy state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    JournalDamaged {
        path: PathBuf,
        detail: String,
    },
    CountersDamaged {
        path: PathBuf,
        detail: String,
    },
    /// Neither record is readable on a device that had them.
    CountersLost,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::JournalDamaged { path, detail } => write!(f, "journal {}: {detail}", path.display()),
            Problem::CountersDamaged { path, detail } => {
                write!(f, "counters file {}: {detail}", path.display())
            }
            Problem::CountersLost => f.write_str(
                "ROLLBACK PROTECTION LOST: neither the journal nor the counters file is readable on a \
                 device that has installed before; any validly signed release can be installed, \
                 older ones included, until releases are committed again",
            ),
        }
    }
}

/// What opening the state directory recovered from: one line each, for
/// the log (and kept in the journal's notices for `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered(pub Vec<String>);

impl fmt::Display for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}
