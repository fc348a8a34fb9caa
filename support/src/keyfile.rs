//! Release, root and device key files: `NAME.key` (mode 0600) and `NAME.pub`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use perch_protocol::{KeyError, PublicKey, SecretKey};

use crate::durable::{self, read_bounded, Replace};

const MAX_KEY_FILE: usize = 4096;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(transparent)]
    Read(#[from] durable::ReadError),
    #[error(transparent)]
    Write(#[from] durable::WriteError),
    #[error("{}", path.display())]
    Parse { path: PathBuf, source: KeyError },
    #[error("{}: not UTF-8 text", .0.display())]
    NotText(PathBuf),
    #[error("{}: secret key is accessible by group or others (mode {mode:o}); run chmod 600", path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{}: this is a public key; give the secret key (the .key file made with it)", .0.display())]
    NotSecret(PathBuf),
}

/// Writes a new key pair as `PREFIX.key` and `PREFIX.pub`. Refuses to
/// overwrite either: losing a release or root key cannot be undone.
pub fn write_pair(prefix: &Path, key: &SecretKey) -> Result<(PathBuf, PathBuf), KeyFileError> {
    let (secret, public) = (with_ext(prefix, "key"), with_ext(prefix, "pub"));
    if let Some(parent) = prefix.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|source| durable::WriteError::Io { path: parent.into(), source })?;
    }
    if public.exists() {
        return Err(durable::WriteError::Exists(public).into());
    }
    durable::write_bytes(&secret, 0o600, Replace::Refuse, key.to_text().as_bytes())?;
    durable::write_bytes(&public, 0o644, Replace::Refuse, key.public().to_text().as_bytes())?;
    Ok((secret, public))
}

pub fn read_secret(path: &Path) -> Result<SecretKey, KeyFileError> {
    // What the file is comes first: a public key given as a secret one is
    // named as such, not refused for its (public) mode.
    let text = read_text(path)?;
    if PublicKey::from_text(&text).is_ok() {
        return Err(KeyFileError::NotSecret(path.to_path_buf()));
    }
    let mode = std::fs::metadata(path)
        .map_err(|source| durable::ReadError::Io { path: path.to_path_buf(), source })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen { path: path.to_path_buf(), mode: mode & 0o777 });
    }
    SecretKey::from_text(&text).map_err(|source| KeyFileError::Parse { path: path.to_path_buf(), source })
}

pub fn read_public(path: &Path) -> Result<PublicKey, KeyFileError> {
    let text = read_text(path)?;
    PublicKey::from_text(&text).map_err(|source| KeyFileError::Parse { path: path.to_path_buf(), source })
}

fn read_text(path: &Path) -> Result<String, KeyFileError> {
    String::from_utf8(read_bounded(path, MAX_KEY_FILE)?)
        .map_err(|_| KeyFileError::NotText(path.to_path_buf()))
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_key_given_as_the_secret_one_is_named_so() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = write_pair(&dir.path().join("k"), &SecretKey::from_seed(&[3; 32])).unwrap();
        let e = read_secret(&public).unwrap_err();
        assert!(matches!(e, KeyFileError::NotSecret(_)), "{e}");
        assert!(e.to_string().contains("this is a public key"), "{e}");
    }

    #[test]
    fn pair_round_trip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("rel");
        let key = SecretKey::from_seed(&[3; 32]);
        let (sk, pk) = write_pair(&prefix, &key).unwrap();
        assert_eq!(read_secret(&sk).unwrap().public(), key.public());
        assert_eq!(read_public(&pk).unwrap(), key.public());
        assert!(write_pair(&prefix, &key).is_err());
        std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_secret(&sk), Err(KeyFileError::TooOpen { .. })));
        assert!(matches!(read_public(&sk), Err(KeyFileError::Parse { .. })));
    }
}
