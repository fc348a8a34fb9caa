//! The device's identity in its state directory, `STATE/identity/`:
//!
//! - `device.key` (0600): the ed25519 device key, made at first use. It
//!   never leaves the device; it is also the device's NATS user nkey.
//! - `enrollment`: the enrollment the provisioner (or a technician) issued,
//!   as text. It is checked again every time it is loaded.
//!
//! Both are written atomically (temp, fsync, rename, fsync dir).

use std::path::{Path, PathBuf};

use perch_protocol::enroll::{EnrollError, Enrollment, Expect, VerifiedEnrollment, MAX_MESSAGE};
use perch_protocol::trust::{SignedTrust, MAX_TRUST_FILE_LEN};
use perch_protocol::SecretKey;
use perch_support::durable::{self, read_bounded, Replace, WriteError};
use perch_support::exit::{Class, Classify};
use perch_support::keyfile::{self, KeyFileError};

use crate::config::Config;
use crate::trust_store::{self, TrustStoreError};

const KEY_FILE: &str = "device.key";
const ENROLLMENT_FILE: &str = "enrollment";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Read(#[from] durable::ReadError),
    #[error("reading OS randomness: {0}")]
    Random(String),
    // `err`, not `source`: shown here once, not again as a cause.
    #[error("{}: {err}", path.display())]
    Enrollment { path: PathBuf, err: EnrollError },
    #[error("{}: {err}", path.display())]
    Trust { path: PathBuf, err: perch_protocol::trust::TrustError },
    #[error("{}", .0)]
    DeviceId(String),
    #[error("{} is missing: an offline enrollment is checked against the org's trust document; install it first", .0.display())]
    NoTrust(PathBuf),
    #[error("{} holds trust document {found}, but the enrollment is for {expected}; refusing to replace it", path.display())]
    TrustConflict { path: PathBuf, found: String, expected: String },
    /// The installed trust document against the device's trust records.
    #[error(transparent)]
    TrustStore(#[from] TrustStoreError),
}

impl IdentityError {
    /// Enrollment and trust errors are security refusals.
    pub fn is_security(&self) -> bool {
        match self {
            IdentityError::TrustStore(e) => e.is_security(),
            e => matches!(
                e,
                IdentityError::Enrollment { .. }
                    | IdentityError::Trust { .. }
                    | IdentityError::TrustConflict { .. }
            ),
        }
    }
}

impl Classify for IdentityError {
    fn class(&self) -> Option<Class> {
        match self {
            _ if self.is_security() => Some(Class::Security),
            IdentityError::DeviceId(_) | IdentityError::NoTrust(_) => Some(Class::Usage),
            // Transparent wrappers, which their chain skips.
            IdentityError::Key(e) => e.class(),
            IdentityError::Write(e) => e.class(),
            IdentityError::Read(e) => e.class(),
            IdentityError::TrustStore(e) => e.class(),
            _ => Some(Class::Runtime),
        }
    }
}

/// The identity files of one state directory.
pub struct Identity {
    dir: PathBuf,
    state_dir: PathBuf,
}

impl Identity {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("identity"), state_dir: state_dir.into() }
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    pub fn enrollment_path(&self) -> PathBuf {
        self.dir.join(ENROLLMENT_FILE)
    }

    /// The device key, made from OS randomness the first time.
    pub fn key(&self) -> Result<SecretKey, IdentityError> {
        let path = self.key_path();
        if path.exists() {
            return Ok(keyfile::read_secret(&path)?);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| WriteError::Io { path: self.dir.clone(), source })?;
        std::fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|source| WriteError::Io { path: self.dir.clone(), source })?;
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        let key = SecretKey::from_seed(&seed);
        match durable::write_bytes(&path, 0o600, Replace::Refuse, key.to_text().as_bytes()) {
            Ok(()) => Ok(key),
            // Another agent process made it first: use that one.
            Err(WriteError::Exists(_)) => Ok(keyfile::read_secret(&path)?),
            Err(e) => Err(e.into()),
        }
    }

    /// The stored enrollment, checked against the device key and the
    /// configured trust document. None if the device is not enrolled.
    pub fn enrollment(&self, cfg: &Config, now: u64) -> Result<Option<VerifiedEnrollment>, IdentityError> {
        let path = self.enrollment_path();
        if !path.exists() {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&read_bounded(&path, MAX_MESSAGE * 2)?).into_owned();
        let enrollment = Enrollment::from_text(&text)
            .map_err(|err| IdentityError::Enrollment { path: path.clone(), err })?;
        let key = self.key()?;
        let id = credential_id(&enrollment)
            .map_err(|err| IdentityError::Enrollment { path: path.clone(), err })?;
        let own = SignedTrust::parse(&enrollment.trust).ok();
        let configured = configured_trust(cfg)?;
        let fingerprint = match (&configured, &own) {
            (Some(c), Some(o)) if follows(c, o) => o.fingerprint(),
            (Some(c), _) => c.fingerprint(),
            (None, o) => o.as_ref().map_or([0; 32], SignedTrust::fingerprint),
        };
        let expect = Expect {
            device_id: &id,
            device_key: key.public(),
            trust_fingerprint: fingerprint,
            ca_fingerprint: None,
            now,
        };
        let verified = match (&configured, &own) {
            // The org rotated its trust document since this device enrolled.
            // The installed one must be the accepted one (trust_store: its
            // chain from the floor the enrollment seeded was checked); then
            // the enrollment's own is checked by signature, not expiry, or
            // every device would lose its link when the old one expires.
            (Some(c), Some(o)) if follows(c, o) => {
                // Read-only: `status` loads the enrollment too.
                let current = trust_store::peek(&cfg.trust, &self.state_dir, now)?.trust;
                enrollment.verify_superseded(&expect, &current)
            }
            _ => enrollment.verify(&expect),
        };
        verified.map(Some).map_err(|err| IdentityError::Enrollment { path, err })
    }

    /// Stores a checked enrollment, and the trust document at the
    /// configured path if none is there yet. The enrollment's document
    /// seeds the trust records (the floor pushes are checked against).
    pub fn store(&self, cfg: &Config, v: &VerifiedEnrollment, now: u64) -> Result<(), IdentityError> {
        match configured_trust(cfg)? {
            Some(t) if t.fingerprint() != v.trust.fingerprint() => {
                return Err(IdentityError::TrustConflict {
                    path: cfg.trust.clone(),
                    found: hex::encode(&t.fingerprint()[..8]),
                    expected: hex::encode(&v.trust.fingerprint()[..8]),
                })
            }
            _ => {}
        }
        // Installs and records the enrollment's document (the floor pushes
        // are checked against); refused, writing nothing, if the device
        // already accepted a later version.
        let c = trust_store::install_enrolled(&cfg.trust, &v.enrollment.trust, &self.state_dir, now)?;
        trust_store::say(&c.warnings);
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| WriteError::Io { path: self.dir.clone(), source })?;
        durable::write_bytes(
            &self.enrollment_path(),
            0o600,
            Replace::Allow,
            v.enrollment.to_text().as_bytes(),
        )?;
        Ok(())
    }
}

/// Whether `configured` is a later version of the org and root of `own`.
fn follows(configured: &SignedTrust, own: &SignedTrust) -> bool {
    let (c, o) = (configured.unverified_body(), own.unverified_body());
    c.org == o.org && c.root_key == o.root_key && c.version > o.version
}

/// The device id a credential names (not yet verified).
fn credential_id(e: &Enrollment) -> Result<String, EnrollError> {
    Ok(perch_protocol::enroll::SignedCredential::from_bytes(&e.credential)?
        .unverified_body()
        .device_id
        .clone())
}

/// The trust document at the configured path, if there is one.
pub fn configured_trust(cfg: &Config) -> Result<Option<SignedTrust>, IdentityError> {
    if !cfg.trust.exists() {
        return Ok(None);
    }
    let bytes = read_bounded(&cfg.trust, MAX_TRUST_FILE_LEN)?;
    SignedTrust::parse(&bytes).map(Some).map_err(|err| IdentityError::Trust { path: cfg.trust.clone(), err })
}

/// The id this device's reports carry: the enrolled credential's (the one
/// its link may publish as), else the configured one. They differ after
/// `enroll --device-id` overrode the config; reports under the configured
/// id would be refused by the server, and wait in the outbox for ever.
pub fn reporting_id(cfg: &Config, state_dir: &Path) -> Result<String, IdentityError> {
    let path = Identity::new(state_dir).enrollment_path();
    if !path.exists() {
        return device_id(cfg, None);
    }
    let enrolled = read_bounded(&path, MAX_MESSAGE * 2)
        .map_err(|e| e.to_string())
        .and_then(|b| Enrollment::from_text(&String::from_utf8_lossy(&b)).map_err(|e| e.to_string()))
        .and_then(|e| credential_id(&e).map_err(|e| e.to_string()));
    match enrolled {
        Ok(id) => Ok(id),
        Err(why) => {
            // The link cannot start either; the reports wait under the
            // configured id, which is all there is to go by.
            tracing::warn!(path = %path.display(), "enrollment unreadable ({why}): reports carry the configured id");
            device_id(cfg, None)
        }
    }
}

/// This device's id: `override_id`, else `device.id`, else the first line
/// of `device.id_file`, else the hostname's first label.
pub fn device_id(cfg: &Config, override_id: Option<&str>) -> Result<String, IdentityError> {
    let bad = |id: &str, from: &str| {
        IdentityError::DeviceId(format!(
            "device id '{}' (from {from}) must be 1 to 64 of A-Z a-z 0-9 - _",
            id.escape_default()
        ))
    };
    if let Some(id) = override_id.or(cfg.device.id.as_deref()) {
        return if perch_protocol::subjects::is_token(id) {
            Ok(id.into())
        } else {
            Err(bad(id, "the command line or device.id"))
        };
    }
    let (text, from) = match &cfg.device.id_file {
        Some(f) => (String::from_utf8_lossy(&read_bounded(f, 4096)?).into_owned(), f.display().to_string()),
        None => {
            let f = Path::new("/proc/sys/kernel/hostname");
            let t = String::from_utf8_lossy(&read_bounded(f, 4096)?).into_owned();
            (t.split('.').next().unwrap_or_default().to_string(), "the hostname".into())
        }
    };
    let id = text.lines().next().unwrap_or_default().trim().to_string();
    if perch_protocol::subjects::is_token(&id) {
        Ok(id)
    } else {
        Err(bad(&id, &from))
    }
}
