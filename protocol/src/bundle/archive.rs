//! What an archive payload may contain: exactly what `perch bundle build`
//! produces, checked entry by entry before a device writes any of it.
//!
//! Allowed: regular files, directories, symlinks, and hardlinks to a regular
//! file earlier in the archive. Every path is relative, made of normal
//! components only, named once, and its parent is a directory entry that came
//! before it, so nothing is written through a symlink or over another entry.
//! Permission bits are kept as they are, except that nothing may be
//! world-writable, and setuid/setgid only with the manifest's signed
//! [`ArchivePolicy::allow_setid`].

use std::collections::HashMap;
use std::io::{self, Read};

use super::{Manifest, PayloadKind};

/// Longest path an entry may have (Linux's `PATH_MAX`).
pub const MAX_ENTRY_PATH: usize = 4096;

/// Mode bits an entry may carry: permissions, sticky, setuid and setgid.
const MODE_BITS: u32 = 0o7777;
const SETID_BITS: u32 = 0o6000;
const WORLD_WRITABLE: u32 = 0o002;

/// The signed options an archive is checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchivePolicy {
    /// Setuid and setgid bits are allowed.
    pub allow_setid: bool,
}

impl Manifest {
    /// The archive options this manifest signs; `None` for an image.
    pub fn archive_policy(&self) -> Option<ArchivePolicy> {
        (self.kind == PayloadKind::Archive).then_some(ArchivePolicy { allow_setid: self.allow_setid })
    }
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} entries are not allowed (only files, directories, symlinks and hardlinks)")]
    EntryType(String),
    #[error("absolute path")]
    Absolute,
    #[error("path has a `{0}` component")]
    Component(String),
    #[error("path is not UTF-8")]
    NotUtf8,
    /// No file system name holds one; the unpacker would fail half-way.
    #[error("path has a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_ENTRY_PATH} bytes")]
    TooLong,
    #[error("named twice in the archive")]
    Duplicate,
    #[error("its parent `{0}` is not a directory earlier in the archive")]
    Parent(String),
    #[error("mode {0:o} is setuid/setgid, and the manifest does not allow it (build with --allow-setid)")]
    Setid(u32),
    #[error("mode {0:o} is world-writable")]
    WorldWritable(u32),
    #[error("mode {0:o} has bits beyond 7777")]
    ModeBits(u32),
    #[error("hardlink target `{0}` is not a regular file earlier in the archive")]
    LinkTarget(String),
    #[error("symlink has no target")]
    EmptySymlink,
    #[error("a {0} entry carries {1} bytes of data")]
    Data(String, u64),
}

/// Why an archive was refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive entry `{entry}`: {reason}")]
    Refused { entry: String, reason: Refusal },
    #[error("archive is malformed: {0}")]
    Malformed(String),
    #[error("reading the archive")]
    Io(#[source] io::Error),
}

impl ArchiveError {
    /// True for archives refused for what they contain, false for I/O trouble.
    pub fn is_security(&self) -> bool {
        !matches!(self, ArchiveError::Io(_))
    }
}

/// What kind of thing an accepted path is, for the checks of later entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File,
    Dir,
    Symlink,
}

/// Reads the whole archive and checks every entry. Writes nothing.
/// Returns the number of entries.
pub fn check_archive<R: Read>(r: R, policy: ArchivePolicy) -> Result<u64, ArchiveError> {
    // The tar reader reports malformed headers and read failures alike as
    // io::Error; this wrapper tells them apart.
    let mut source = Watched { inner: r, failed: None };
    let result = check_entries(&mut source, policy);
    match (result, source.failed) {
        (Err(_), Some(e)) => Err(ArchiveError::Io(e)),
        (other, _) => other,
    }
}

fn check_entries<R: Read>(r: &mut Watched<R>, policy: ArchivePolicy) -> Result<u64, ArchiveError> {
    let malformed = |e: io::Error| ArchiveError::Malformed(e.to_string());
    let mut archive = tar::Archive::new(r);
    let mut seen: HashMap<String, Node> = HashMap::new();
    let mut count = 0u64;
    for entry in archive.entries().map_err(malformed)? {
        let entry = entry.map_err(malformed)?;
        let raw = entry.path_bytes();
        let shown = String::from_utf8_lossy(&raw).escape_debug().to_string();
        let refuse = |reason| ArchiveError::Refused { entry: shown.clone(), reason };
        let header = entry.header();
        let kind = header.entry_type();
        let node = match kind {
            tar::EntryType::Regular => Node::File,
            tar::EntryType::Directory => Node::Dir,
            tar::EntryType::Symlink => Node::Symlink,
            tar::EntryType::Link => Node::File,
            other => return Err(refuse(Refusal::EntryType(type_name(other)))),
        };
        let path = normal_path(&raw, node == Node::Dir).map_err(refuse)?;
        if seen.contains_key(&path) {
            return Err(refuse(Refusal::Duplicate));
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if seen.get(parent) != Some(&Node::Dir) {
                return Err(refuse(Refusal::Parent(parent.to_string())));
            }
        }
        // The size the reader will really skip (a pax header may override the header's).
        let size = entry.size();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Directory => {
                let mode = header.mode().map_err(malformed)?;
                check_mode(mode, policy).map_err(refuse)?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default();
                if target.is_empty() {
                    return Err(refuse(Refusal::EmptySymlink));
                }
                if target.contains(&0) {
                    return Err(refuse(Refusal::Nul));
                }
            }
            _ => {
                // A hardlink: to a regular file already in the tree.
                let raw_target = entry.link_name_bytes().unwrap_or_default();
                let target = normal_path(&raw_target, false).ok();
                if target.as_ref().and_then(|t| seen.get(t)) != Some(&Node::File) {
                    let shown = String::from_utf8_lossy(&raw_target).escape_debug().to_string();
                    return Err(refuse(Refusal::LinkTarget(shown)));
                }
            }
        }
        if kind != tar::EntryType::Regular && size != 0 {
            return Err(refuse(Refusal::Data(type_name(kind), size)));
        }
        seen.insert(path, node);
        count += 1;
    }
    // Like every decoder here, refuse trailing bytes: after the end marker
    // only zero padding may follow (a tar reader that skips zero blocks
    // would otherwise find entries this check never saw).
    let rest = archive.into_inner();
    let mut buf = [0u8; 8192];
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => return Ok(count),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(malformed(e)),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(ArchiveError::Malformed("data after the end of the archive".into()));
        }
    }
}

/// Checks the permission bits of a file or directory.
fn check_mode(mode: u32, policy: ArchivePolicy) -> Result<(), Refusal> {
    if mode & !MODE_BITS != 0 {
        return Err(Refusal::ModeBits(mode));
    }
    if mode & SETID_BITS != 0 && !policy.allow_setid {
        return Err(Refusal::Setid(mode));
    }
    if mode & WORLD_WRITABLE != 0 {
        return Err(Refusal::WorldWritable(mode));
    }
    Ok(())
}

/// A relative path of normal components (a directory may end in one `/`).
fn normal_path(raw: &[u8], dir: bool) -> Result<String, Refusal> {
    if raw.len() > MAX_ENTRY_PATH {
        return Err(Refusal::TooLong);
    }
    // A GNU long name or pax path may embed one; the header's own name cannot.
    if raw.contains(&0) {
        return Err(Refusal::Nul);
    }
    let s = std::str::from_utf8(raw).map_err(|_| Refusal::NotUtf8)?;
    if s.starts_with('/') {
        return Err(Refusal::Absolute);
    }
    let s = if dir { s.strip_suffix('/').unwrap_or(s) } else { s };
    for c in s.split('/') {
        match c {
            "" => return Err(Refusal::Component("".into())),
            "." | ".." => return Err(Refusal::Component(c.into())),
            _ => {}
        }
    }
    Ok(s.to_string())
}

fn type_name(t: tar::EntryType) -> String {
    match t {
        tar::EntryType::Regular => "regular file".into(),
        tar::EntryType::Directory => "directory".into(),
        tar::EntryType::Symlink => "symlink".into(),
        tar::EntryType::Link => "hardlink".into(),
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Fifo => "FIFO".into(),
        tar::EntryType::Continuous => "contiguous file".into(),
        tar::EntryType::GNUSparse => "sparse file".into(),
        tar::EntryType::XGlobalHeader => "pax global header".into(),
        other => format!("type {:?}", other.as_byte() as char),
    }
}

/// A reader that remembers the first error of the reader it wraps.
struct Watched<R> {
    inner: R,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if self.failed.is_none() && e.kind() != io::ErrorKind::Interrupted {
                self.failed = Some(io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}

/// Appends one tar entry byte for byte, with no sanitising (unlike
/// `tar::Builder`), so that tests and fuzzers can make the hostile
/// archives [`check_archive`] must refuse. Bundles are never built with it.
#[doc(hidden)]
pub fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, mode: u32, link: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_old();
    let n = name.len().min(h.as_old().name.len());
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    let l = link.len().min(h.as_old().linkname.len());
    h.as_old_mut().linkname[..l].copy_from_slice(&link[..l]);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}
