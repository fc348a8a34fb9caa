//! Reading the agent's own state files when any of them may be damaged
//! (bad media, a hand edit, a directory where a file should be), and
//! moving a damaged one aside so the agent can go on from a safe state.
//!
//! Damage is a property of the file, not a passing I/O error: a damaged
//! file is kept as `NAME.corrupt-<unix time>` for inspection, never read
//! again, and never makes a command fail forever.

use std::io;
use std::path::{Path, PathBuf};

use perch_support::durable::{self, read_bounded, ReadError};

/// What is at a state file's path.
#[derive(Debug)]
pub enum StateFile {
    Missing,
    Bytes(Vec<u8>),
    /// Not a readable file of at most the allowed size: why.
    Damaged(String),
}

/// Reads `path`, at most `max` bytes. Only I/O failures that are not the
/// file's own fault (permissions, a failing disk) are errors.
pub fn read(path: &Path, max: usize) -> Result<StateFile, ReadError> {
    let io = |source| ReadError::Io { path: path.to_path_buf(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StateFile::Missing),
        Err(e) => return Err(io(e)),
    };
    // Checked before opening: a FIFO would block the open forever.
    if let Some(what) = not_a_file(&meta) {
        return Ok(StateFile::Damaged(what.into()));
    }
    match read_bounded(path, max) {
        Ok(bytes) => Ok(StateFile::Bytes(bytes)),
        Err(ReadError::TooLarge { .. }) => Ok(StateFile::Damaged(format!("larger than {max} bytes"))),
        Err(e) if e.is_not_found() => Ok(StateFile::Missing),
        Err(e) => Err(e),
    }
}

/// Why `meta` is not a regular file, if it is not one.
pub fn not_a_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory, not a file")
    } else if t.is_symlink() {
        Some("a symbolic link, not a file")
    } else {
        Some("not a regular file")
    }
}

/// Renames `path` to `path.corrupt-<now>` (or `-<now>-<n>` if that is
/// taken) and syncs the directory. Atomic: after a crash the file is at
/// one name or the other, and both are handled on the next start.
pub fn move_aside(path: &Path, now: u64) -> io::Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut aside = path.with_file_name(format!("{name}.corrupt-{now}"));
    let mut n = 1;
    // rename(2) would replace an empty directory of that name: never reuse one.
    while std::fs::symlink_metadata(&aside).is_ok() {
        aside = path.with_file_name(format!("{name}.corrupt-{now}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside)?;
    durable::sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_oversize_files_and_fifos_are_damaged_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(matches!(read(&p, 8).unwrap(), StateFile::Missing));
        std::fs::create_dir(&p).unwrap();
        assert!(matches!(read(&p, 8).unwrap(), StateFile::Damaged(d) if d.contains("directory")));
        std::fs::remove_dir(&p).unwrap();
        std::fs::write(&p, [0u8; 9]).unwrap();
        assert!(matches!(read(&p, 8).unwrap(), StateFile::Damaged(d) if d.contains("larger than 8")));
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(read(&p, 8).unwrap(), StateFile::Damaged(_)));
    }

    #[test]
    fn moving_aside_never_replaces_an_earlier_copy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        std::fs::create_dir(&p).unwrap();
        let first = move_aside(&p, 7).unwrap();
        assert_eq!(first.file_name().unwrap(), "journal.corrupt-7");
        std::fs::create_dir(&p).unwrap();
        let second = move_aside(&p, 7).unwrap();
        assert_eq!(second.file_name().unwrap(), "journal.corrupt-7-1");
        assert!(first.is_dir() && second.is_dir() && !p.exists());
    }
}
