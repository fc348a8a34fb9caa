//! One deploy engine per state directory, across processes.
//!
//! The daemon (installing what the fleet asks for) and a technician's
//! `perch-agent install`, `commit`, `rollback` or `run --once` must never
//! drive the journal and the slots at the same time: two engines would
//! stage into the same slot and overwrite each other's journal. Every
//! [`crate::deploy::Engine`] holds an exclusive `flock` on
//! `STATE/engine.lock` for as long as it lives. The kernel drops the lock
//! when the process dies, SIGKILL and power loss included, so a crash never
//! leaves a stale lock behind. Readers (`status`) take no lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::statefile;

pub const LOCK_FILE: &str = "engine.lock";

/// Held while an engine works; released on drop.
pub struct EngineLock {
    _file: Flock<File>,
    existed: bool,
    moved_aside: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{holder} is using the deploy engine in {dir}; try again when it has finished")]
    Held { dir: String, holder: String },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
}

impl LockError {
    /// Whether another engine holds the lock (as opposed to an I/O failure).
    pub fn is_held(&self) -> bool {
        matches!(self, LockError::Held { .. })
    }
}

impl EngineLock {
    /// Takes the lock, or says who holds it. Never waits. Whatever is at
    /// the lock's path that is not a regular file (a directory, say) is
    /// moved aside first: it would otherwise stop every engine forever.
    pub fn acquire(state_dir: &Path) -> Result<EngineLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |err| LockError::Io { path: path.clone(), err };
        let (existed, moved_aside) = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => (true, None),
            Ok(_) => match statefile::move_aside(&path, perch_support::now_unix()) {
                Ok(to) => (true, Some(to)),
                // Another process moved it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (true, None),
                Err(e) => return Err(io(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (false, None),
            Err(e) => return Err(io(e)),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut file) => {
                // Who holds it, for the message another process prints.
                // Informational only: the lock is the flock, not this text.
                // A full disk must not stop the engine over it.
                let me = format!("perch-agent (pid {}: {})", std::process::id(), command_line());
                let _ = file.set_len(0).and_then(|()| file.write_all(me.as_bytes()));
                Ok(EngineLock { _file: file, existed, moved_aside })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = (&mut file).take(512).read_to_string(&mut holder);
                if holder.trim().is_empty() {
                    holder = "another perch-agent".into();
                }
                Err(LockError::Held {
                    dir: state_dir.display().to_string(),
                    holder: holder.trim().to_string(),
                })
            }
            Err((_, errno)) => Err(io(errno.into())),
        }
    }
}

impl EngineLock {
    /// Whether an engine had used this state directory before (its lock
    /// file was there): evidence that the device has deploy state to lose.
    pub fn existed(&self) -> bool {
        self.existed
    }

    /// Where a lock path that was not a regular file was moved.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
    }
}

/// `perch-agent install v2.perch`, without the global options' paths.
fn command_line() -> String {
    let mut words = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--config" || a == "--state-dir" {
            args.next();
        } else if !a.starts_with("--config=") && !a.starts_with("--state-dir=") {
            words.push(a);
        }
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_engine_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = EngineLock::acquire(dir.path()).unwrap();
        // A second open file description conflicts even in one process.
        let e = EngineLock::acquire(dir.path()).err().unwrap();
        assert!(e.is_held());
        let msg = e.to_string();
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        assert!(msg.ends_with("try again when it has finished"), "{msg}");
        drop(first);
        let again = EngineLock::acquire(dir.path()).unwrap();
        assert!(again.existed());
        drop(again);
    }

    #[test]
    fn a_lock_path_that_is_a_directory_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = EngineLock::acquire(dir.path()).unwrap();
        assert!(!fresh.existed() && fresh.moved_aside().is_none());
        drop(fresh);
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        std::fs::create_dir(dir.path().join(LOCK_FILE)).unwrap();
        let lock = EngineLock::acquire(dir.path()).unwrap();
        assert!(lock.existed());
        let moved = lock.moved_aside().unwrap();
        assert!(moved.is_dir(), "{}", moved.display());
        assert!(dir.path().join(LOCK_FILE).is_file());
    }
}
