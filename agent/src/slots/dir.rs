//! Directory slots: `ROOT/a` and `ROOT/b`, and `ROOT/current`, a symlink to
//! the running one, swapped atomically (symlink + rename). An archive
//! payload is staged as `ROOT/.staging-<slot>.tar`, then unpacked into
//! `ROOT/.<slot>.new`, fsynced, and renamed over `ROOT/<slot>`.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::PayloadKind;
use perch_support::durable::sync_dir;

use super::{io_err, read_prefix, shell, FileWriter, SlotBackend, SlotError, SlotWriter, Switch};
use crate::config::DirSlots;
use crate::journal::SlotId;

pub struct DirBackend {
    cfg: DirSlots,
}

impl DirBackend {
    pub fn new(cfg: DirSlots) -> Self {
        Self { cfg }
    }

    fn slot_dir(&self, slot: SlotId) -> PathBuf {
        self.cfg.root.join(slot.as_str())
    }

    fn staging(&self, slot: SlotId) -> PathBuf {
        self.cfg.root.join(format!(".staging-{slot}.tar"))
    }

    fn current(&self) -> PathBuf {
        self.cfg.root.join("current")
    }

    fn point_current_at(&self, slot: SlotId) -> Result<(), SlotError> {
        let tmp = self.cfg.root.join(".current.tmp");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(slot.as_str(), &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, self.current()).map_err(io_err(&tmp))?;
        sync_dir(&self.cfg.root).map_err(io_err(&self.cfg.root))?;
        if let Some(cmd) = &self.cfg.restart {
            shell(cmd, &[("PERCH_SLOT", slot.as_str())])?;
        }
        Ok(())
    }
}

impl SlotBackend for DirBackend {
    fn name(&self) -> &'static str {
        "dir"
    }

    /// A device without `current` yet runs slot a.
    fn booted(&self) -> Result<SlotId, SlotError> {
        let cur = self.current();
        match fs::read_link(&cur) {
            Ok(target) => SlotId::parse(&target.to_string_lossy()).ok_or_else(|| {
                SlotError::Booted(format!("{} points at {}", cur.display(), target.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SlotId::A),
            Err(e) => Err(io_err(&cur)(e)),
        }
    }

    fn next_boot(&self) -> Result<Option<SlotId>, SlotError> {
        self.booted().map(Some)
    }

    fn open_writer(
        &self,
        slot: SlotId,
        kind: PayloadKind,
        resume: bool,
    ) -> Result<Box<dyn SlotWriter>, SlotError> {
        if kind != PayloadKind::Archive {
            return Err(SlotError::Unsupported("directory slots take archive bundles, not images".into()));
        }
        fs::create_dir_all(&self.cfg.root).map_err(io_err(&self.cfg.root))?;
        FileWriter::open(&self.staging(slot), true, !resume)
    }

    fn read_back(&self, slot: SlotId, len: u64) -> Result<Box<dyn Read>, SlotError> {
        read_prefix(&self.staging(slot), len)
    }

    fn finish(&self, slot: SlotId, _kind: PayloadKind, len: u64) -> Result<(), SlotError> {
        let tar_path = self.staging(slot);
        let fresh = self.cfg.root.join(format!(".{slot}.new"));
        let unpack = |detail: String| SlotError::Unpack { slot, detail };
        if fresh.exists() {
            fs::remove_dir_all(&fresh).map_err(io_err(&fresh))?;
        }
        fs::create_dir_all(&fresh).map_err(io_err(&fresh))?;
        let tar_file = File::open(&tar_path).map_err(io_err(&tar_path))?;
        let mut archive = tar::Archive::new(tar_file.take(len));
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        // `unpack` refuses entries that would land outside `fresh` (`..`, absolute paths).
        archive.unpack(&fresh).map_err(|e| unpack(e.to_string()))?;
        sync_tree(&fresh)?;
        let dest = self.slot_dir(slot);
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
        }
        fs::rename(&fresh, &dest).map_err(io_err(&fresh))?;
        sync_dir(&self.cfg.root).map_err(io_err(&self.cfg.root))?;
        Ok(())
    }

    /// The tar is kept until the journal says staged, so a crash before
    /// that can unpack it again.
    fn cleanup(&self, slot: SlotId) {
        let _ = fs::remove_file(self.staging(slot));
    }

    fn activate(&self, slot: SlotId) -> Result<Switch, SlotError> {
        self.point_current_at(slot)?;
        Ok(Switch::Running)
    }

    fn confirm(&self, _slot: SlotId) -> Result<(), SlotError> {
        Ok(())
    }

    fn rollback(&self, to: SlotId) -> Result<Switch, SlotError> {
        self.point_current_at(to)?;
        Ok(Switch::Running)
    }

    fn reboot(&self) -> Result<bool, SlotError> {
        Ok(false)
    }
}

/// fsyncs every file and directory under `root`, so the unpacked slot
/// survives a power cut before it is renamed into place.
fn sync_tree(root: &Path) -> Result<(), SlotError> {
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io_err(&path))?;
        if ft.is_dir() {
            sync_tree(&path)?;
        } else if ft.is_file() {
            File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
        }
    }
    sync_dir(root).map_err(io_err(root))
}
