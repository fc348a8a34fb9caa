//! The org directory: `root.key` (0600), `root.pub` and `trust.doc`.

use std::path::{Path, PathBuf};

use perch_protocol::trust::{SignedTrust, TrustBody, TrustError};
use perch_protocol::{PublicKey, SecretKey};
use perch_support::durable::{self, Replace, WriteError};
use perch_support::exit::{Class, Classify};
use perch_support::keyfile::{self, KeyFileError};

pub const ROOT_KEY: &str = "root.key";
pub const ROOT_PUB: &str = "root.pub";
pub const TRUST_DOC: &str = "trust.doc";

/// Why an org could not be created or its trust document changed.
#[derive(Debug, thiserror::Error)]
pub enum OrgError {
    #[error("{} already holds an org ({}); refusing to overwrite it", dir.display(), found.display())]
    Exists { dir: PathBuf, found: PathBuf },
    #[error("creating {}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Nats(#[from] crate::nats::NatsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Classify for OrgError {
    fn class(&self) -> Option<Class> {
        match self {
            // An existing org, a threshold the keys cannot meet: the operator's to fix.
            OrgError::Exists { .. } | OrgError::Trust(_) => Some(Class::Usage),
            OrgError::CreateDir { .. } => Some(Class::Runtime),
            OrgError::Key(e) => e.class(),
            OrgError::Write(e) => e.class(),
            OrgError::Nats(e) => e.class(),
            OrgError::Tls(e) => e.class(),
        }
    }
}

/// What `init` is asked to create.
pub struct InitParams {
    pub org: String,
    pub release_keys: Vec<PublicKey>,
    pub threshold: u32,
    pub now: u64,
    pub expires_at: Option<u64>,
    /// DNS names and IP addresses for the nats-server certificate.
    pub tls_names: Vec<String>,
    /// The operator's own CA and server certificate, instead of new ones.
    pub own_tls: Option<crate::tls::OwnCerts>,
}

/// Creates a new org in `dir`: a fresh root key, a version-1 trust document
/// and the NATS side. The provisioner issuing key (from `issuing_seed`) is
/// listed in the trust document and is also the FLEET account's signing key,
/// so one key signs tokens, device credentials and device user JWTs.
pub fn init(
    dir: &Path,
    root_seed: &[u8; 32],
    issuing_seed: &[u8; 32],
    p: InitParams,
) -> Result<SignedTrust, OrgError> {
    for name in [ROOT_KEY, ROOT_PUB, TRUST_DOC, "nats", "tls"] {
        let found = dir.join(name);
        if found.exists() {
            return Err(OrgError::Exists { dir: dir.into(), found });
        }
    }
    // Everything is checked before the first directory or file exists, so a
    // bad threshold, TLS name or certificate leaves nothing behind.
    let root = SecretKey::from_seed(root_seed);
    let body = TrustBody {
        org: p.org,
        version: 1,
        issued_at: p.now,
        expires_at: p.expires_at,
        root_key: root.public(),
        release_keys: p.release_keys,
        threshold: p.threshold,
        issuing_keys: vec![SecretKey::from_seed(issuing_seed).public()],
    };
    let doc = SignedTrust::create(body, &root)?;
    let org = doc.unverified_body().org.clone();
    let tls = crate::tls::prepare(&org, &p.tls_names, p.own_tls.as_ref())?;
    std::fs::create_dir_all(dir).map_err(|source| OrgError::CreateDir { path: dir.into(), source })?;
    // nats-server resolves the paths in the include against its own working
    // directory, so they must be absolute.
    let dir = &dir.canonicalize().map_err(|source| OrgError::CreateDir { path: dir.into(), source })?;
    keyfile::write_pair(&dir.join("root"), &root)?;
    durable::write_bytes(&dir.join(TRUST_DOC), 0o644, Replace::Refuse, &doc.to_bytes())?;
    tls.write(dir)?;
    crate::nats::create(dir, &org, p.now, issuing_seed, &crate::tls::server_block(dir))?;
    Ok(doc)
}

/// Root-signs the next version of the org's trust document. It still needs
/// rotation signatures from a threshold of the current release keys.
pub fn rotate(dir: &Path, current: &SignedTrust, p: InitParams) -> Result<SignedTrust, OrgError> {
    let root = keyfile::read_secret(&dir.join(ROOT_KEY))?;
    let cur = current.unverified_body();
    let body = TrustBody {
        org: cur.org.clone(),
        version: cur.version + 1,
        issued_at: p.now,
        expires_at: p.expires_at,
        root_key: root.public(),
        release_keys: p.release_keys,
        threshold: p.threshold,
        issuing_keys: cur.issuing_keys.clone(),
    };
    Ok(SignedTrust::create(body, &root)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(keys: Vec<PublicKey>, threshold: u32) -> InitParams {
        InitParams {
            org: "acme".into(),
            release_keys: keys,
            threshold,
            now: 100,
            expires_at: None,
            tls_names: vec!["localhost".into()],
            own_tls: None,
        }
    }

    #[test]
    fn init_refuses_existing_org_and_bad_threshold_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("org");
        let rel = SecretKey::from_seed(&[2; 32]).public();
        let bad = init(&d, &[1; 32], &[3; 32], params(vec![rel], 2));
        assert!(matches!(bad, Err(OrgError::Trust(_))));
        assert!(!d.exists(), "a refused init created {}", d.display());
        let mut bad_name = params(vec![rel], 1);
        bad_name.tls_names = vec!["nö.example".into()];
        assert!(init(&d, &[1; 32], &[3; 32], bad_name).is_err());
        assert!(!d.exists(), "a refused init created {}", d.display());
        init(&d, &[1; 32], &[3; 32], params(vec![rel], 1)).unwrap();
        assert!(matches!(init(&d, &[9; 32], &[3; 32], params(vec![rel], 1)), Err(OrgError::Exists { .. })));
    }
}
