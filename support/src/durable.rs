//! Crash-safe file writes: write a temp file in the same directory, fsync
//! it, rename it over the target, fsync the directory. A reader (or a device
//! rebooted mid-write) sees the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a durable write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("writing {}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    move |source| WriteError::Io { path: path.to_path_buf(), source }
}

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    Allow,
    Refuse,
}

/// Writes `path` atomically with permission bits `mode`; `fill` writes the content.
pub fn write_atomic<E: From<WriteError>>(
    path: &Path,
    mode: u32,
    replace: Replace,
    fill: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new().prefix(".perch-tmp-").tempfile_in(dir).map_err(io_err(path))?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut().flush().map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    match replace {
        Replace::Allow => tmp.persist(path).map(drop).map_err(|e| io_err(path)(e.error))?,
        Replace::Refuse => tmp.persist_noclobber(path).map(drop).map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                WriteError::Exists(path.to_path_buf())
            } else {
                io_err(path)(e.error)
            }
        })?,
    }
    sync_dir(dir).map_err(io_err(path))?;
    Ok(())
}

/// [`write_atomic`] for content already in memory.
pub fn write_bytes(path: &Path, mode: u32, replace: Replace, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic(path, mode, replace, |f| f.write_all(bytes).map_err(io_err(path)))
}

/// Makes a rename or create in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Reads a whole file, refusing one larger than `max` bytes (untrusted
/// files never get an allocation bigger than the format allows).
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, ReadError> {
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|source| ReadError::Io { path: path.to_path_buf(), source })?;
    let mut buf = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|source| ReadError::Io { path: path.to_path_buf(), source })?;
    if buf.len() > max {
        return Err(ReadError::TooLarge { path: path.to_path_buf(), max });
    }
    Ok(buf)
}

/// Why [`read_bounded`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is larger than {max} bytes", path.display())]
    TooLarge { path: PathBuf, max: usize },
}

impl ReadError {
    /// Whether the file simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_or_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_bytes(&p, 0o600, Replace::Refuse, b"one").unwrap();
        assert!(matches!(write_bytes(&p, 0o600, Replace::Refuse, b"two"), Err(WriteError::Exists(_))));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_bytes(&p, 0o644, Replace::Allow, b"three").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_fill_leaves_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_bytes(&p, 0o600, Replace::Allow, b"old").unwrap();
        let r: Result<(), WriteError> = write_atomic(&p, 0o600, Replace::Allow, |f| {
            f.write_all(b"partial").unwrap();
            Err(WriteError::Exists(PathBuf::from("x")))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bounded_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, [0u8; 10]).unwrap();
        assert_eq!(read_bounded(&p, 10).unwrap().len(), 10);
        assert!(matches!(read_bounded(&p, 9), Err(ReadError::TooLarge { .. })));
    }
}
