//! Slot backends: where payloads are written and how the device switches
//! between slot a and slot b. All four share [`SlotBackend`].

mod block;
mod dir;
mod grub;
mod hook;
mod staged;
mod uboot;

pub use staged::Staged;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use perch_protocol::bundle::{ArchiveError, PayloadKind};
use perch_support::exit::{Class, Classify};

use crate::config::Slots;
use crate::journal::SlotId;

/// Why a slot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    // `err` rather than `source`: it is shown here, not again as a cause.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot tell which slot is running: {0}")]
    Booted(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("unpacking the archive into slot {slot}: {detail}")]
    Unpack { slot: SlotId, detail: String },
    /// The signed archive holds what the builder never produces.
    #[error("refusing the archive for slot {slot}: {err}")]
    Archive { slot: SlotId, err: ArchiveError },
}

impl SlotError {
    /// True when the payload itself was refused, not the device failing.
    pub fn is_security(&self) -> bool {
        matches!(self, SlotError::Archive { err, .. } if err.is_security())
    }
}

impl Classify for SlotError {
    fn class(&self) -> Option<Class> {
        perch_support::exit::security_if(self.is_security())
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SlotError + '_ {
    move |err| SlotError::Io { path: path.to_path_buf(), err }
}

/// What happens after the bootloader (or symlink) was switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// The new slot is running now.
    Running,
    /// The device must reboot for the switch to take effect.
    RebootRequired,
}

/// Receives verified chunks for one slot.
pub trait SlotWriter: Send {
    /// Writes `data` at byte `offset` of the payload.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), SlotError>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), SlotError>;
    /// A second handle on the same slot, for another thread: its writes
    /// land where this one's would, and its `sync` covers every write, by
    /// any handle, that returned before it started. So the device never
    /// waits for the writer, and each lane of linked chunks writes what it
    /// decodes on its own core.
    fn handle(&self) -> Result<Box<dyn SlotWriter>, SlotError>;
}

pub trait SlotBackend {
    fn name(&self) -> &'static str;

    /// The slot the device is running from now.
    fn booted(&self) -> Result<SlotId, SlotError>;

    /// Which slot the bootloader (or symlink) will run next, if it says.
    fn next_boot(&self) -> Result<Option<SlotId>, SlotError>;

    /// Opens `slot` for a payload of `len` bytes. With `keep`, the bytes
    /// already there stay (a resumed install, or chunks in place from an
    /// interrupted one); a staging file is then cut or grown to `len`.
    fn open_writer(
        &self,
        slot: SlotId,
        kind: PayloadKind,
        keep: bool,
        len: u64,
    ) -> Result<Box<dyn SlotWriter>, SlotError>;

    /// The file whose first bytes are the payload last written to `slot`:
    /// the slot's block device, or the staged archive or hook payload,
    /// which stays after staging as the source of the next delta install.
    fn payload_path(&self, slot: SlotId) -> PathBuf;

    /// Reads back the first `len` payload bytes written to `slot`.
    fn read_back(&self, slot: SlotId, len: u64) -> Result<Box<dyn Read>, SlotError> {
        read_prefix(&self.payload_path(slot), len)
    }

    /// Turns the staged payload into a usable slot (unpack an archive, hand
    /// the payload to a hook). An archive in `staged` has passed the archive
    /// check already. Must be safe to repeat after a crash.
    fn finish(&self, staged: &Staged) -> Result<(), SlotError>;

    /// Points the bootloader (or symlink) at `slot` for one trial.
    fn activate(&self, slot: SlotId) -> Result<Switch, SlotError>;

    /// The trial passed: make `slot` the permanent choice.
    fn confirm(&self, slot: SlotId) -> Result<(), SlotError>;

    /// Points back at `to` for good.
    fn rollback(&self, to: SlotId) -> Result<Switch, SlotError>;

    /// Reboots the device, if a reboot command is configured. Returns false if not.
    fn reboot(&self) -> Result<bool, SlotError>;
}

/// Builds the backend the config names.
pub fn from_config(slots: &Slots, state_dir: &Path) -> Box<dyn SlotBackend> {
    match slots {
        Slots::Dir(c) => Box::new(dir::DirBackend::new(c.clone())),
        Slots::Uboot(c) => Box::new(uboot::UbootBackend::new(c.clone())),
        Slots::Grub(c) => Box::new(grub::GrubBackend::new(c.clone())),
        Slots::Hook(c) => Box::new(hook::HookBackend::new(c.clone(), state_dir.to_path_buf())),
    }
}

/// Runs `sh -c COMMAND` with extra environment, failing on a non-zero exit.
pub(crate) fn shell(command: &str, env: &[(&str, &str)]) -> Result<String, SlotError> {
    let mut c = Command::new("sh");
    c.arg("-c").arg(command);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c, command)
}

/// Runs a command, returning stdout, or an error with its stderr.
pub(crate) fn run(c: &mut Command, shown: &str) -> Result<String, SlotError> {
    let out = c.output().map_err(|e| SlotError::Command { command: shown.into(), detail: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(SlotError::Command {
            command: shown.into(),
            detail: format!("{}: {}", out.status, stderr.trim().lines().last().unwrap_or("")),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A slot (or a staging file for one) that is a plain file or block device.
pub(crate) struct FileWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl FileWriter {
    /// Opens a device as it is (never created, never truncated).
    pub(crate) fn open_device(path: &Path) -> Result<Box<dyn SlotWriter>, SlotError> {
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
        Ok(Box::new(FileWriter { file, path: path.to_path_buf() }))
    }

    /// Opens a staging file for a payload of `len` bytes: created if
    /// missing, emptied unless `keep`, and then exactly `len` bytes long, so
    /// that what a hook or `tar` reads ends where the payload does.
    pub(crate) fn open_staging(path: &Path, keep: bool, len: u64) -> Result<Box<dyn SlotWriter>, SlotError> {
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(!keep)
            .open(path)
            .map_err(io_err(path))?;
        file.set_len(len).map_err(io_err(path))?;
        if !existed {
            // A new staging file must survive a power cut as well as its data.
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            perch_support::durable::sync_dir(dir).map_err(io_err(dir))?;
        }
        Ok(Box::new(FileWriter { file, path: path.to_path_buf() }))
    }
}

impl SlotWriter for FileWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), SlotError> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset).map_err(io_err(&self.path))
    }

    fn sync(&mut self) -> Result<(), SlotError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }

    fn handle(&self) -> Result<Box<dyn SlotWriter>, SlotError> {
        let file = self.file.try_clone().map_err(io_err(&self.path))?;
        Ok(Box::new(FileWriter { file, path: self.path.clone() }))
    }
}

/// The first `len` bytes of a file.
pub(crate) fn read_prefix(path: &Path, len: u64) -> Result<Box<dyn Read>, SlotError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    Ok(Box::new(f.take(len)))
}

/// Runs the configured reboot command, if there is one.
pub(crate) fn reboot_with(command: Option<&str>) -> Result<bool, SlotError> {
    match command {
        Some(cmd) => shell(cmd, &[]).map(|_| true),
        None => Ok(false),
    }
}

/// Reads `perch.slot=a|b` from a kernel command line file.
pub(crate) fn booted_from_cmdline(path: &Path) -> Result<SlotId, SlotError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.split_whitespace()
        .find_map(|t| t.strip_prefix("perch.slot="))
        .and_then(SlotId::parse)
        .ok_or_else(|| SlotError::Booted(format!("{} has no perch.slot=a|b", path.display())))
}
