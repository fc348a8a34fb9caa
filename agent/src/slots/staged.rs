//! What a backend's `finish` is handed: an image, or an archive whose every
//! entry passed `check_archive` as read back from the slot. Only
//! [`Staged::check`] makes one, so no backend (a dir unpacker, an
//! operator's `write` hook) can be given an archive nobody checked.

use std::io::BufReader;

use perch_protocol::bundle::{check_archive, ArchivePolicy, PayloadKind};

use super::{SlotBackend, SlotError};
use crate::journal::SlotId;

/// The staged payload of one slot, checked as its kind needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staged {
    slot: SlotId,
    len: u64,
    /// True only when `check_archive` accepted the bytes on the slot.
    archive: bool,
}

impl Staged {
    /// Reads an archive back from `slot` through `backend` and checks every
    /// entry (a refusal names it; nothing is written); an image (`archive`
    /// is `None`) passes as it is: its bytes matched their signed hashes.
    pub fn check(
        backend: &dyn SlotBackend,
        slot: SlotId,
        len: u64,
        archive: Option<ArchivePolicy>,
    ) -> Result<Staged, SlotError> {
        if let Some(policy) = archive {
            let back = backend.read_back(slot, len)?;
            check_archive(BufReader::new(back), policy).map_err(|err| SlotError::Archive { slot, err })?;
        }
        Ok(Staged { slot, len, archive: archive.is_some() })
    }

    pub fn slot(&self) -> SlotId {
        self.slot
    }

    /// The payload's length on the slot.
    pub fn payload_len(&self) -> u64 {
        self.len
    }

    pub fn kind(&self) -> PayloadKind {
        if self.archive {
            PayloadKind::Archive
        } else {
            PayloadKind::Image
        }
    }
}
