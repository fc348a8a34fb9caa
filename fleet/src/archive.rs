//! Deterministic tar archives of a directory tree.
//!
//! The same tree always gives the same bytes, so the same release built on two
//! machines gives the same chunk hashes: entries are sorted by name, and
//! owners and times are left out (tar's `HeaderMode::Deterministic`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

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
}

/// Writes a deterministic tar of everything under `root` to `out`.
pub fn write_tar<W: Write>(root: &Path, out: W) -> Result<W, ArchiveError> {
    let meta = fs::symlink_metadata(root).map_err(|source| ArchiveError::Io { path: root.into(), source })?;
    if !meta.is_dir() {
        return Err(ArchiveError::NotADirectory(root.into()));
    }
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    add_dir(&mut builder, root, Path::new(""))?;
    builder.into_inner().map_err(|source| ArchiveError::Io { path: root.into(), source })
}

fn add_dir<W: Write>(b: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> Result<(), ArchiveError> {
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
        let ft = entry.file_type().map_err(io(&path))?;
        if ft.is_dir() {
            b.append_dir(&name, &path).map_err(io(&path))?;
            add_dir(b, &path, &name)?;
        } else if ft.is_file() || ft.is_symlink() {
            b.append_path_with_name(&path, &name).map_err(io(&path))?;
        } else {
            return Err(ArchiveError::Unsupported(path));
        }
    }
    Ok(())
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
        let ta = write_tar(a.path(), Vec::new()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        fs::write(b.path().join("bin"), "#!/bin/sh\n").unwrap(); // newer mtime
        let tb = write_tar(b.path(), Vec::new()).unwrap();
        assert_eq!(ta, tb);
        let mut ar = tar::Archive::new(&ta[..]);
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["bin", "etc", "etc/app", "etc/app/conf", "run"]);
    }

    #[test]
    fn refuses_a_file_as_root() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, "x").unwrap();
        assert!(matches!(write_tar(&f, Vec::new()), Err(ArchiveError::NotADirectory(_))));
    }
}
