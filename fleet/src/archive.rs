//! Deterministic tar archives of a directory tree.
//!
//! The same tree always gives the same bytes, so the same release built on two
//! machines gives the same chunk hashes: entries are sorted by name, owners
//! are root, and times are one fixed value. Permission bits are kept exactly
//! (a 0600 file stays 0600 on the device). What a device would refuse is
//! refused here first: other file types, world-writable files and
//! directories, and setuid/setgid without `--allow-setid`.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use perch_protocol::bundle::ArchivePolicy;
use perch_support::exit::{Class, Classify};

/// Why a directory could not be archived.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{}: unsupported file type (only files, directories and symlinks go into a bundle)", .0.display())]
    Unsupported(PathBuf),
    #[error("{}: file name is not UTF-8", .0.display())]
    NonUtf8(PathBuf),
    #[error("{}: mode {mode:o} is setuid/setgid (pass --allow-setid to sign that it may be)", path.display())]
    Setid { path: PathBuf, mode: u32 },
    #[error("{}: mode {mode:o} is world-writable; a device refuses that", path.display())]
    WorldWritable { path: PathBuf, mode: u32 },
}

impl Classify for ArchiveError {
    fn class(&self) -> Option<Class> {
        match self {
            ArchiveError::Io { source, .. } if !perch_support::exit::is_missing(source) => {
                Some(Class::Runtime)
            }
            // What the input holds, or that it is not there: the operator's to fix.
            _ => Some(Class::Usage),
        }
    }
}

/// Writes a deterministic tar of everything under `root` to `out`.
pub fn write_tar<W: Write>(root: &Path, out: W, policy: ArchivePolicy) -> Result<W, ArchiveError> {
    let meta = fs::symlink_metadata(root).map_err(|source| ArchiveError::Io { path: root.into(), source })?;
    if !meta.is_dir() {
        return Err(ArchiveError::NotADirectory(root.into()));
    }
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    add_dir(&mut builder, root, Path::new(""), policy)?;
    builder.into_inner().map_err(|source| ArchiveError::Io { path: root.into(), source })
}

fn add_dir<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    policy: ArchivePolicy,
) -> Result<(), ArchiveError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Io { path, source }
    };
    let mut entries = fs::read_dir(dir).map_err(io(dir))?.collect::<Result<Vec<_>, _>>().map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = rel.join(entry.file_name());
        if name.to_str().is_none() {
            return Err(ArchiveError::NonUtf8(path));
        }
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io(&path))?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, &name, &target).map_err(io(&path))?;
        } else if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, mode(&path, &meta, policy)?, 0);
            b.append_data(&mut h, &name, io::empty()).map_err(io(&path))?;
            add_dir(b, &path, &name, policy)?;
        } else if ft.is_file() {
            let mut h = header(tar::EntryType::Regular, mode(&path, &meta, policy)?, meta.len());
            let file = File::open(&path).map_err(io(&path))?;
            b.append_data(&mut h, &name, Exact::new(file, meta.len())).map_err(io(&path))?;
        } else {
            return Err(ArchiveError::Unsupported(path));
        }
    }
    Ok(())
}

/// Yields exactly the `left` bytes a header announced, and fails if its
/// source has fewer or more: `tar::Builder` copies whatever the reader
/// gives and pads after it, so a file that grew or shrank between `stat` and
/// reading would make a corrupt archive instead of an error.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, len: u64) -> Self {
        Self { inner, left: len }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // The end the header announced: anything more means it grew.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other("the file grew while it was archived")),
            };
        }
        let max = usize::try_from(self.left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank while it was archived ({} bytes short)", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The permission bits to record for `path`, or why it may not go in.
fn mode(path: &Path, meta: &Metadata, policy: ArchivePolicy) -> Result<u32, ArchiveError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o6000 != 0 && !policy.allow_setid {
        return Err(ArchiveError::Setid { path: path.into(), mode });
    }
    if mode & 0o002 != 0 {
        return Err(ArchiveError::WorldWritable { path: path.into(), mode });
    }
    Ok(mode)
}

/// A header with only what identifies the entry: type, mode and size; owner
/// root, and the fixed time tar's deterministic mode uses.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(tar::DETERMINISTIC_TIMESTAMP);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn same_tree_same_bytes() {
        let make = || {
            let d = tempfile::tempdir().unwrap();
            fs::create_dir_all(d.path().join("etc/app")).unwrap();
            fs::write(d.path().join("etc/app/conf"), "x=1\n").unwrap();
            fs::write(d.path().join("bin"), "#!/bin/sh\n").unwrap();
            symlink("bin", d.path().join("run")).unwrap();
            d
        };
        let (a, b) = (make(), make());
        let ta = write_tar(a.path(), Vec::new(), ArchivePolicy::default()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        fs::write(b.path().join("bin"), "#!/bin/sh\n").unwrap(); // newer mtime
        let tb = write_tar(b.path(), Vec::new(), ArchivePolicy::default()).unwrap();
        assert_eq!(ta, tb);
        let mut ar = tar::Archive::new(&ta[..]);
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["bin", "etc", "etc/app", "etc/app/conf", "run"]);
    }

    /// Appends `data` as a file whose header says `size` bytes.
    fn append(data: &[u8], size: u64) -> io::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0o644, size);
        b.append_data(&mut h, "f", Exact::new(data, size))?;
        b.into_inner()
    }

    #[test]
    fn a_file_that_changed_size_after_stat_is_an_error_not_a_corrupt_tar() {
        let e = append(b"0123456789", 4).unwrap_err();
        assert!(e.to_string().contains("grew while it was archived"), "{e}");
        let e = append(b"01", 4).unwrap_err();
        assert!(e.to_string().contains("shrank while it was archived (2 bytes short)"), "{e}");
        // The size it was stat'ed at goes in whole, and reads back.
        let t = append(b"0123", 4).unwrap();
        let mut ar = tar::Archive::new(&t[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let mut got = String::new();
        e.read_to_string(&mut got).unwrap();
        assert_eq!(got, "0123");
    }

    #[test]
    fn a_tree_whose_files_read_longer_than_their_stat_size_is_refused() {
        // procfs files stat as 0 bytes and read as more: the same as a file
        // appended to between stat and read.
        let root = Path::new("/proc/sys/kernel/random");
        if !root.join("boot_id").exists() {
            return; // no procfs here
        }
        let e = write_tar(root, Vec::new(), ArchivePolicy::default()).unwrap_err();
        let chain = perch_support::error_chain(&e);
        assert!(chain.contains("boot_id") && chain.contains("grew while it was archived"), "{chain}");
    }

    #[test]
    fn refuses_a_file_as_root() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, "x").unwrap();
        assert!(matches!(
            write_tar(&f, Vec::new(), ArchivePolicy::default()),
            Err(ArchiveError::NotADirectory(_))
        ));
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn modes_in(tar_bytes: &[u8]) -> Vec<(String, u32)> {
        let mut ar = tar::Archive::new(tar_bytes);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap())
            })
            .collect()
    }

    #[test]
    fn permission_bits_are_kept_exactly() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("private")).unwrap();
        fs::write(d.path().join("private/key"), "secret").unwrap();
        fs::write(d.path().join("tool"), "#!/bin/sh\n").unwrap();
        fs::write(d.path().join("readme"), "hi").unwrap();
        set_mode(&d.path().join("private/key"), 0o600);
        set_mode(&d.path().join("private"), 0o700);
        set_mode(&d.path().join("tool"), 0o750);
        set_mode(&d.path().join("readme"), 0o444);
        let t = write_tar(d.path(), Vec::new(), ArchivePolicy::default()).unwrap();
        let modes = modes_in(&t);
        assert_eq!(
            modes,
            [
                ("private".to_string(), 0o700),
                ("private/key".to_string(), 0o600),
                ("readme".to_string(), 0o444),
                ("tool".to_string(), 0o750)
            ]
        );
        let mut ar = tar::Archive::new(&t[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!((e.header().uid().unwrap(), e.header().gid().unwrap()), (0, 0));
        }
    }

    #[test]
    fn setid_input_is_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("su"), "x").unwrap();
        set_mode(&d.path().join("su"), 0o4755);
        let e = write_tar(d.path(), Vec::new(), ArchivePolicy::default()).unwrap_err();
        assert!(matches!(e, ArchiveError::Setid { mode: 0o4755, .. }), "{e}");
        let t = write_tar(d.path(), Vec::new(), ArchivePolicy { allow_setid: true }).unwrap();
        assert_eq!(modes_in(&t), [("su".to_string(), 0o4755)]);
    }

    #[test]
    fn world_writable_input_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("drop")).unwrap();
        set_mode(&d.path().join("drop"), 0o777);
        let e = write_tar(d.path(), Vec::new(), ArchivePolicy { allow_setid: true }).unwrap_err();
        assert!(matches!(e, ArchiveError::WorldWritable { mode: 0o777, .. }), "{e}");
    }

    #[test]
    fn builder_output_passes_the_device_check() {
        let d = tempfile::tempdir().unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(d.path().join(&long).join("etc")).unwrap();
        fs::write(d.path().join(&long).join("etc").join("f".repeat(150)), "x").unwrap();
        symlink("/usr/bin/env", d.path().join("env")).unwrap();
        symlink("l".repeat(200), d.path().join("long-link")).unwrap();
        fs::write(d.path().join("empty"), "").unwrap();
        let t = write_tar(d.path(), Vec::new(), ArchivePolicy::default()).unwrap();
        let n = perch_protocol::bundle::check_archive(&t[..], ArchivePolicy::default()).unwrap();
        assert_eq!(n, 6);
    }
}
