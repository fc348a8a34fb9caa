//! Hook slots: the operator's own commands do the work. The payload is
//! staged in the state directory, then `write` runs with `PERCH_SLOT`,
//! `PERCH_KIND` and `PERCH_PAYLOAD` (the staged file). Every hook must be
//! safe to run twice: after a crash the agent repeats the step it was in.

use std::path::PathBuf;

use perch_protocol::bundle::PayloadKind;

use super::{reboot_with, shell, FileWriter, SlotBackend, SlotError, SlotWriter, Staged, Switch};
use crate::config::HookSlots;
use crate::journal::SlotId;

pub struct HookBackend {
    cfg: HookSlots,
    staging_dir: PathBuf,
}

impl HookBackend {
    pub fn new(cfg: HookSlots, staging_dir: PathBuf) -> Self {
        Self { cfg, staging_dir }
    }

    fn staged(&self, slot: SlotId) -> PathBuf {
        self.staging_dir.join(format!("hook-{slot}.payload"))
    }

    fn switch(&self) -> Switch {
        if self.cfg.reboot_required {
            Switch::RebootRequired
        } else {
            Switch::Running
        }
    }
}

impl SlotBackend for HookBackend {
    fn name(&self) -> &'static str {
        "hook"
    }

    fn booted(&self) -> Result<SlotId, SlotError> {
        let out = shell(&self.cfg.booted, &[])?;
        SlotId::parse(&out)
            .ok_or_else(|| SlotError::Booted(format!("`{}` printed '{}'", self.cfg.booted, out.trim())))
    }

    fn next_boot(&self) -> Result<Option<SlotId>, SlotError> {
        Ok(None)
    }

    fn open_writer(
        &self,
        slot: SlotId,
        _kind: PayloadKind,
        keep: bool,
        len: u64,
    ) -> Result<Box<dyn SlotWriter>, SlotError> {
        FileWriter::open_staging(&self.staged(slot), keep, len)
    }

    fn payload_path(&self, slot: SlotId) -> PathBuf {
        self.staged(slot)
    }

    /// `write` only ever sees an archive the engine checked entry by entry.
    fn finish(&self, staged: &Staged) -> Result<(), SlotError> {
        let (slot, kind) = (staged.slot(), staged.kind());
        let payload = self.staged(slot);
        let payload_str = payload.to_string_lossy().into_owned();
        shell(
            &self.cfg.write,
            &[("PERCH_SLOT", slot.as_str()), ("PERCH_KIND", kind.as_str()), ("PERCH_PAYLOAD", &payload_str)],
        )?;
        Ok(())
    }

    fn activate(&self, slot: SlotId) -> Result<Switch, SlotError> {
        shell(&self.cfg.activate, &[("PERCH_SLOT", slot.as_str())])?;
        Ok(self.switch())
    }

    fn confirm(&self, slot: SlotId) -> Result<(), SlotError> {
        shell(&self.cfg.confirm, &[("PERCH_SLOT", slot.as_str())]).map(drop)
    }

    fn rollback(&self, to: SlotId) -> Result<Switch, SlotError> {
        shell(&self.cfg.rollback, &[("PERCH_SLOT", to.as_str())])?;
        Ok(self.switch())
    }

    fn reboot(&self) -> Result<bool, SlotError> {
        reboot_with(self.cfg.reboot.as_deref())
    }
}
