//! Directory slots: `ROOT/a` and `ROOT/b`, and `ROOT/current`, a symlink to
//! the running one, swapped atomically (symlink + rename). An archive
//! payload is staged as `ROOT/.staging-<slot>.tar`, checked entry by entry
//! by the engine (a [`Staged`] archive), then unpacked into `ROOT/.<slot>.new`, fsynced, and
//! renamed over `ROOT/<slot>`. The staged archive stays, as the source of the next delta
//! install (its chunks are read back and checked against the new manifest).

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use perch_protocol::bundle::PayloadKind;
use perch_support::durable::sync_dir;

use super::{io_err, shell, FileWriter, SlotBackend, SlotError, SlotWriter, Staged, Switch};
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
        keep: bool,
        len: u64,
    ) -> Result<Box<dyn SlotWriter>, SlotError> {
        if kind != PayloadKind::Archive {
            return Err(SlotError::Unsupported("directory slots take archive bundles, not images".into()));
        }
        fs::create_dir_all(&self.cfg.root).map_err(io_err(&self.cfg.root))?;
        FileWriter::open_staging(&self.staging(slot), keep, len)
    }

    fn payload_path(&self, slot: SlotId) -> PathBuf {
        self.staging(slot)
    }

    /// Unpacks exactly the bytes the engine's archive check read (the same
    /// staging file, the same length): a refused archive never gets here,
    /// so both slots stay as they were.
    fn finish(&self, staged: &Staged) -> Result<(), SlotError> {
        if staged.kind() != PayloadKind::Archive {
            return Err(SlotError::Unsupported("directory slots take archive bundles".into()));
        }
        let (slot, len) = (staged.slot(), staged.payload_len());
        let tar_path = self.staging(slot);
        let fresh = self.cfg.root.join(format!(".{slot}.new"));
        if fresh.exists() {
            fs::remove_dir_all(&fresh).map_err(io_err(&fresh))?;
        }
        fs::create_dir_all(&fresh).map_err(io_err(&fresh))?;
        if let Err(e) = unpack(&tar_path, len, &fresh) {
            // Do not leave a half-written tree (or a full disk) behind.
            let _ = fs::remove_dir_all(&fresh);
            return Err(SlotError::Unpack { slot, detail: e });
        }
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

/// Unpacks a checked archive into the empty directory `into`, keeping the
/// permission bits (owner: the agent, root on a device). The error keeps its
/// causes, so a full disk says "No space left on device".
fn unpack(tar_path: &Path, len: u64, into: &Path) -> Result<(), String> {
    let tar_file = File::open(tar_path).map_err(|e| format!("{}: {e}", tar_path.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(tar_file).take(len));
    archive.set_preserve_permissions(true);
    // Nothing is named twice (checked), so nothing may be overwritten.
    archive.set_overwrite(false);
    archive.unpack(into).map_err(|e| with_causes(&e))
}

/// An error and its causes on one line: tar names the entry, the cause the
/// OS error.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use perch_protocol::bundle::ArchivePolicy;

    fn backend(root: &Path) -> DirBackend {
        DirBackend::new(DirSlots { root: root.to_path_buf(), restart: None })
    }

    /// A tar with a 0700 directory holding a 0600 file, then `extra`.
    fn tar_with(extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o700);
        h.set_size(0);
        b.append_data(&mut h, "etc", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(6);
        b.append_data(&mut h, "etc/key", &b"secret"[..]).unwrap();
        extra(&mut b);
        b.into_inner().unwrap()
    }

    fn stage(root: &Path, slot: SlotId, tar: &[u8]) -> u64 {
        fs::create_dir_all(root).unwrap();
        fs::write(root.join(format!(".staging-{slot}.tar")), tar).unwrap();
        tar.len() as u64
    }

    /// The engine's path: the archive check on what the slot holds, then `finish`.
    fn check_and_finish(root: &Path, len: u64, policy: Option<ArchivePolicy>) -> Result<(), SlotError> {
        let b = backend(root);
        b.finish(&Staged::check(&b, SlotId::B, len, policy)?)
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    const PLAIN: Option<ArchivePolicy> = Some(ArchivePolicy { allow_setid: false });

    #[test]
    fn permission_bits_survive_unpacking() {
        let d = tempfile::tempdir().unwrap();
        let len = stage(d.path(), SlotId::B, &tar_with(|_| {}));
        check_and_finish(d.path(), len, PLAIN).unwrap();
        assert_eq!(mode(&d.path().join("b/etc")), 0o700);
        assert_eq!(mode(&d.path().join("b/etc/key")), 0o600);
    }

    #[test]
    fn a_refused_archive_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("b")).unwrap();
        fs::write(d.path().join("b/old"), "old").unwrap();
        let tar = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_mode(0o600);
            h.set_size(0);
            b.append_data(&mut h, "etc/pipe", std::io::empty()).unwrap();
        });
        let len = stage(d.path(), SlotId::B, &tar);
        let e = check_and_finish(d.path(), len, PLAIN).unwrap_err();
        assert!(e.is_security(), "{e}");
        assert!(e.to_string().contains("`etc/pipe`"), "{e}");
        assert!(!d.path().join(".b.new").exists());
        assert_eq!(fs::read_to_string(d.path().join("b/old")).unwrap(), "old");
    }

    #[test]
    fn unpack_errors_keep_the_os_error() {
        let d = tempfile::tempdir().unwrap();
        let tar = tar_with(|_| {});
        fs::write(d.path().join("t.tar"), &tar).unwrap();
        fs::write(d.path().join("file"), "").unwrap();
        // Unpacking under a regular file fails in the OS, as a full disk would.
        let e = unpack(&d.path().join("t.tar"), tar.len() as u64, &d.path().join("file/into")).unwrap_err();
        assert!(e.contains("Not a directory (os error 20)"), "{e}");
    }

    /// Every path under `dir` (not following symlinks), with its mode and kind.
    fn listing(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    todo.push(p.clone());
                }
                out.push((p, m.permissions().mode(), m.file_type().is_symlink()));
            }
        }
        out.sort();
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Hostile archives against the real unpacker: whatever happens,
        /// nothing outside the slot root changes; a refusal leaves no new
        /// slot; an accepted archive holds only files, directories and
        /// symlinks with allowed modes.
        #[test]
        fn hostile_archives_never_reach_outside_the_slot(
            entries in proptest::collection::vec(
                (proptest::sample::select(vec![
                    &b"a"[..], b"a/", b"a/f", b"l", b"l/f", b"../x", b"/abs", b"a/../f", b"./f", b"b//f", b"f",
                ]),
                 proptest::sample::select(vec![b'0', b'1', b'2', b'3', b'5', b'6']),
                 proptest::sample::select(vec![0o644u32, 0o600, 0o4755, 0o777, 0o700]),
                 proptest::sample::select(vec![&b""[..], b"../../outside", b"/tmp", b"a", b"f", b"a/f"])),
                0..8),
            allow_setid: bool,
        ) {
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("root");
            fs::create_dir_all(d.path().join("outside")).unwrap();
            fs::write(d.path().join("outside/keep"), "keep").unwrap();
            let mut tar = Vec::new();
            for (name, kind, mode, link) in &entries {
                perch_protocol::bundle::raw_entry(&mut tar, name, *kind, *mode, link, if *kind == b'0' { b"data" } else { b"" });
            }
            tar.extend_from_slice(&[0; 1024]);
            let len = stage(&root, SlotId::B, &tar);
            let before = listing(&d.path().join("outside"));
            let policy = Some(ArchivePolicy { allow_setid });
            let result = check_and_finish(&root, len, policy);
            proptest::prop_assert_eq!(listing(&d.path().join("outside")), before);
            let mut top: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            top.sort();
            proptest::prop_assert_eq!(top, ["outside", "root"]);
            match result {
                Err(e) => {
                    proptest::prop_assert!(e.is_security(), "{}", e);
                    proptest::prop_assert!(!root.join("b").exists() && !root.join(".b.new").exists());
                }
                Ok(()) => {
                    for (p, mode, symlink) in listing(&root.join("b")) {
                        let ft = fs::symlink_metadata(&p).unwrap().file_type();
                        proptest::prop_assert!(ft.is_file() || ft.is_dir() || symlink, "{}", p.display());
                        if !symlink {
                            proptest::prop_assert_eq!(mode & 0o002, 0, "{}", p.display());
                            proptest::prop_assert!(allow_setid || mode & 0o6000 == 0, "{}", p.display());
                        }
                    }
                }
            }
        }
    }
}
