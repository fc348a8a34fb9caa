use serde::{Deserialize, Serialize};

use crate::limits::{MAX_CHUNK_SIZE, MAX_LABEL_LEN, MAX_TARGETS, MIN_CHUNK_SIZE};

/// What the payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadKind {
    /// Raw bytes for a block slot.
    Image,
    /// A deterministic tar of a directory tree, for a directory slot.
    Archive,
}

impl PayloadKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PayloadKind::Image => "image",
            PayloadKind::Archive => "archive",
        }
    }
}

/// The signed description of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bundle name; the release counter is monotonic per name.
    pub name: String,
    /// Release counter. A device refuses a counter not above its highest committed one.
    pub counter: u64,
    /// Free-form display version ("2.4.1-rc2").
    pub version: String,
    /// Device targets this bundle may be installed on. Empty means any.
    pub targets: Vec<String>,
    pub kind: PayloadKind,
    pub payload_len: u64,
    pub chunk_size: u32,
    pub chunk_hashes: Vec<[u8; 32]>,
    /// SHA-256 of the whole payload, as `sha256sum` would print it.
    pub payload_sha256: [u8; 32],
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which the bundle is refused.
    pub expires_at: Option<u64>,
    /// Lowest agent version able to install this bundle.
    pub min_agent_version: Option<String>,
    /// Signed permission to install below the device's highest committed counter.
    pub allow_downgrade: bool,
    /// Signed permission for setuid and setgid files in an archive. Without
    /// it, the builder refuses such inputs and the device such entries.
    pub allow_setid: bool,
}

impl Manifest {
    pub fn chunk_count(&self) -> u32 {
        // validate() guarantees this fits.
        u32::try_from(self.chunk_hashes.len()).unwrap_or(u32::MAX)
    }

    /// Length of chunk `index`: `chunk_size`, except a shorter last chunk.
    pub fn chunk_len(&self, index: u32) -> usize {
        let start = u64::from(index) * u64::from(self.chunk_size);
        let len = self.payload_len.saturating_sub(start).min(u64::from(self.chunk_size));
        len as usize
    }

    /// Whether this bundle may be installed on `target`.
    pub fn allows_target(&self, target: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == target)
    }

    /// Checks everything a manifest must satisfy beyond decoding.
    pub fn validate(&self) -> Result<(), String> {
        label("name", &self.name, true)?;
        if self.version.len() > MAX_LABEL_LEN || self.version.chars().any(char::is_control) {
            return Err(format!("version must be at most {MAX_LABEL_LEN} printable characters"));
        }
        if self.targets.len() > MAX_TARGETS {
            return Err(format!("more than {MAX_TARGETS} targets"));
        }
        for t in &self.targets {
            label("target", t, false)?;
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if self.payload_len == 0 {
            return Err("payload is empty".into());
        }
        let expected = self.payload_len.div_ceil(u64::from(self.chunk_size));
        if expected != self.chunk_hashes.len() as u64 {
            return Err(format!(
                "{} chunk hashes for a {}-byte payload in {}-byte chunks (expected {expected})",
                self.chunk_hashes.len(),
                self.payload_len,
                self.chunk_size
            ));
        }
        if matches!(self.expires_at, Some(e) if e <= self.created_at) {
            return Err("expires before it was created".into());
        }
        if let Some(v) = &self.min_agent_version {
            label("min_agent_version", v, false)?;
        }
        if self.allow_setid && self.kind != PayloadKind::Archive {
            return Err("allow_setid is for archive bundles only".into());
        }
        Ok(())
    }
}

/// Names, targets and versions: short, and safe to use in file names and NATS subjects.
fn label(field: &str, s: &str, strict: bool) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_') || (!strict && c == '.');
    if s.is_empty() || s.len() > MAX_LABEL_LEN || !s.chars().all(ok_char) {
        let allowed = if strict { "A-Z a-z 0-9 - _" } else { "A-Z a-z 0-9 - _ ." };
        return Err(format!("{field} '{}' must be 1..={MAX_LABEL_LEN} of {allowed}", s.escape_default()));
    }
    Ok(())
}

impl Manifest {
    /// Compares one chunk with its listed hash (and length).
    pub(crate) fn check_chunk(&self, index: u32, data: &[u8]) -> Result<(), super::BundleError> {
        use sha2::{Digest, Sha256};
        let count = self.chunk_count();
        let expected_hash = self
            .chunk_hashes
            .get(index as usize)
            .ok_or(super::BundleError::ChunkOutOfRange { index, count })?;
        let expected = self.chunk_len(index);
        if data.len() != expected {
            return Err(super::BundleError::ChunkLength { index, count, got: data.len(), expected });
        }
        if Sha256::digest(data).as_slice() != expected_hash {
            return Err(super::BundleError::ChunkMismatch { index, count });
        }
        Ok(())
    }
}
