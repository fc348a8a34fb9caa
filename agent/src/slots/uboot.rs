//! U-Boot block slots, switched through the U-Boot environment with
//! `fw_printenv` / `fw_setenv` from libubootenv (`-c fw_env.config`).
//!
//! Variables (names configurable): `perch_slot` (a|b, what U-Boot boots),
//! `upgrade_available`, `bootcount`, `bootlimit`. While `upgrade_available`
//! is 1, U-Boot counts boots; past `bootlimit` its `altbootcmd` switches
//! `perch_slot` back. The kernel command line carries `perch.slot=` so the
//! agent knows what really booted.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use perch_protocol::bundle::PayloadKind;

use super::block::BlockSlots;
use super::{booted_from_cmdline, reboot_with, run, SlotBackend, SlotError, SlotWriter, Staged, Switch};
use crate::config::UbootSlots;
use crate::journal::SlotId;

pub struct UbootBackend {
    cfg: UbootSlots,
    block: BlockSlots,
}

impl UbootBackend {
    pub fn new(cfg: UbootSlots) -> Self {
        let block = BlockSlots::new(cfg.devices.clone());
        Self { cfg, block }
    }

    fn printenv(&self, var: &str) -> Result<Option<String>, SlotError> {
        let mut c = Command::new("fw_printenv");
        c.arg("-c").arg(&self.cfg.fw_env_config).arg("-n").arg(var);
        let v = run(&mut c, "fw_printenv")?.trim().to_string();
        Ok(if v.is_empty() { None } else { Some(v) })
    }

    /// Sets several variables in one environment write (`fw_setenv -s`), so
    /// a power cut leaves either all of them or none.
    fn setenv(&self, vars: &[(&str, String)]) -> Result<(), SlotError> {
        let mut script = tempfile::NamedTempFile::new().map_err(|e| SlotError::Command {
            command: "fw_setenv".into(),
            detail: format!("script file: {e}"),
        })?;
        for (k, v) in vars {
            writeln!(script, "{k}={v}").map_err(|e| SlotError::Command {
                command: "fw_setenv".into(),
                detail: format!("script file: {e}"),
            })?;
        }
        let mut c = Command::new("fw_setenv");
        c.arg("-c").arg(&self.cfg.fw_env_config).arg("-s").arg(script.path());
        run(&mut c, "fw_setenv").map(drop)
    }
}

impl SlotBackend for UbootBackend {
    fn name(&self) -> &'static str {
        "uboot"
    }

    fn booted(&self) -> Result<SlotId, SlotError> {
        booted_from_cmdline(&self.cfg.cmdline)
    }

    fn next_boot(&self) -> Result<Option<SlotId>, SlotError> {
        Ok(self.printenv(&self.cfg.vars.slot)?.as_deref().and_then(SlotId::parse))
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
        let v = &self.cfg.vars;
        self.setenv(&[
            (&v.slot, slot.as_str().into()),
            (&v.upgrade_available, "1".into()),
            (&v.bootcount, "0".into()),
            (&v.bootlimit, self.cfg.bootlimit.to_string()),
        ])?;
        Ok(Switch::RebootRequired)
    }

    fn confirm(&self, slot: SlotId) -> Result<(), SlotError> {
        let v = &self.cfg.vars;
        self.setenv(&[
            (&v.slot, slot.as_str().into()),
            (&v.upgrade_available, "0".into()),
            (&v.bootcount, "0".into()),
        ])
    }

    fn rollback(&self, to: SlotId) -> Result<Switch, SlotError> {
        let v = &self.cfg.vars;
        self.setenv(&[
            (&v.slot, to.as_str().into()),
            (&v.upgrade_available, "0".into()),
            (&v.bootcount, "0".into()),
        ])?;
        Ok(Switch::RebootRequired)
    }

    fn reboot(&self) -> Result<bool, SlotError> {
        reboot_with(self.cfg.reboot.as_deref())
    }
}
