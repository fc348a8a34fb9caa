//! GRUB block slots, switched with `grub-editenv ENVFILE`.
//!
//! `saved_entry` / `perch_slot` name the slot GRUB boots by default. A trial
//! sets the one-shot `next_entry` (GRUB clears it as it boots), so if the new
//! slot hangs, the next boot is the old default again. Confirming moves
//! `saved_entry` to the new slot. The kernel command line carries `perch.slot=`.

use std::path::PathBuf;
use std::process::Command;

use perch_protocol::bundle::PayloadKind;

use super::block::BlockSlots;
use super::{booted_from_cmdline, reboot_with, run, SlotBackend, SlotError, SlotWriter, Staged, Switch};
use crate::config::GrubSlots;
use crate::journal::SlotId;

pub struct GrubBackend {
    cfg: GrubSlots,
    block: BlockSlots,
}

impl GrubBackend {
    pub fn new(cfg: GrubSlots) -> Self {
        let block = BlockSlots::new(cfg.devices.clone());
        Self { cfg, block }
    }

    fn entry(&self, slot: SlotId) -> &str {
        match slot {
            SlotId::A => &self.cfg.entries.a,
            SlotId::B => &self.cfg.entries.b,
        }
    }

    fn editenv(&self, args: &[String]) -> Result<String, SlotError> {
        let mut c = Command::new("grub-editenv");
        c.arg(&self.cfg.envfile).args(args);
        run(&mut c, "grub-editenv")
    }

    fn var(&self, name: &str) -> Result<Option<String>, SlotError> {
        let list = self.editenv(&["list".into()])?;
        Ok(list
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string))
    }
}

impl SlotBackend for GrubBackend {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn booted(&self) -> Result<SlotId, SlotError> {
        booted_from_cmdline(&self.cfg.cmdline)
    }

    fn next_boot(&self) -> Result<Option<SlotId>, SlotError> {
        if let Some(e) = self.var("next_entry")?.filter(|e| !e.is_empty()) {
            return Ok([SlotId::A, SlotId::B].into_iter().find(|s| self.entry(*s) == e));
        }
        Ok(self.var("perch_slot")?.as_deref().and_then(SlotId::parse))
    }

    fn open_writer(
        &self,
        slot: SlotId,
        kind: PayloadKind,
        _keep: bool,
        _len: u64,
    ) -> Result<Box<dyn SlotWriter>, SlotError> {
        self.block.open_writer(slot, kind)
    }

    fn payload_path(&self, slot: SlotId) -> PathBuf {
        self.block.path(slot).to_path_buf()
    }

    fn finish(&self, _staged: &Staged) -> Result<(), SlotError> {
        Ok(())
    }

    fn activate(&self, slot: SlotId) -> Result<Switch, SlotError> {
        // grub-editenv writes the whole 1 KiB block in one go.
        self.editenv(&[
            "set".into(),
            format!("next_entry={}", self.entry(slot)),
            format!("perch_trial={slot}"),
        ])?;
        Ok(Switch::RebootRequired)
    }

    fn confirm(&self, slot: SlotId) -> Result<(), SlotError> {
        self.editenv(&[
            "set".into(),
            format!("saved_entry={}", self.entry(slot)),
            format!("perch_slot={slot}"),
        ])?;
        self.editenv(&["unset".into(), "perch_trial".into(), "next_entry".into()]).map(drop)
    }

    fn rollback(&self, to: SlotId) -> Result<Switch, SlotError> {
        // Drop the one-shot entry first: a crash between the two edits must
        // not boot the abandoned slot again.
        self.editenv(&["unset".into(), "next_entry".into(), "perch_trial".into()])?;
        self.editenv(&["set".into(), format!("saved_entry={}", self.entry(to)), format!("perch_slot={to}")])?;
        Ok(Switch::RebootRequired)
    }

    fn reboot(&self) -> Result<bool, SlotError> {
        reboot_with(self.cfg.reboot.as_deref())
    }
}
