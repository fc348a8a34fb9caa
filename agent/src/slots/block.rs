//! Two block slots (devices or plain files) that take raw images. Shared by
//! the U-Boot and GRUB backends.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::PayloadKind;

use super::{io_err, SlotError, SlotWriter};
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
        let path = self.path(slot).to_path_buf();
        // Never truncate: a device cannot be, and a resumed install keeps its chunks.
        let file = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
        Ok(Box::new(BlockWriter { file, path }))
    }

    pub fn read_back(&self, slot: SlotId, len: u64) -> Result<Box<dyn Read>, SlotError> {
        let path = self.path(slot);
        let f = File::open(path).map_err(io_err(path))?;
        Ok(Box::new(f.take(len)))
    }
}

struct BlockWriter {
    file: File,
    path: PathBuf,
}

impl SlotWriter for BlockWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), SlotError> {
        self.file.write_all_at(data, offset).map_err(io_err(&self.path))
    }

    fn sync(&mut self) -> Result<(), SlotError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}
