//! Two block slots (devices or plain files) that take raw images. Shared by
//! the U-Boot and GRUB backends.

use std::path::Path;

use perch_protocol::bundle::PayloadKind;

use super::{FileWriter, SlotError, SlotWriter};
use crate::config::SlotPaths;
use crate::journal::SlotId;

pub struct BlockSlots {
    paths: SlotPaths,
}

impl BlockSlots {
    pub fn new(paths: SlotPaths) -> Self {
        Self { paths }
    }

    pub fn path(&self, slot: SlotId) -> &Path {
        match slot {
            SlotId::A => &self.paths.a,
            SlotId::B => &self.paths.b,
        }
    }

    pub fn open_writer(&self, slot: SlotId, kind: PayloadKind) -> Result<Box<dyn SlotWriter>, SlotError> {
        if kind != PayloadKind::Image {
            return Err(SlotError::Unsupported("block slots take image bundles, not archives".into()));
        }
        // Never create or truncate: a device cannot be, and a resumed install keeps its chunks.
        FileWriter::open_device(self.path(slot))
    }
}
