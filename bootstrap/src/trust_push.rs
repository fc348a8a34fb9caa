//! `perch-bootstrap trust push`: the org's trust document into the KV bucket
//! `PERCH_TRUST` (key `doc`), which every enrolled device watches. A device
//! takes it only if it follows the version it accepted by a valid rotation
//! chain; the check here (root-signed by this org's root key, not expired)
//! only keeps an operator from pushing the wrong file.

use std::path::Path;

use perch_protocol::subjects::{TRUST_BUCKET, TRUST_KEY};
use perch_protocol::trust::{SignedTrust, TrustError, VerifiedTrust};
use perch_support::exit::{Class, Classify};
use perch_support::keyfile::{self, KeyFileError};

use crate::admin::{self, Account, AdminError};
use crate::org::ROOT_PUB;

/// Why a trust document was not pushed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("{path}: {err}")]
    Trust { path: String, err: TrustError },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("{0}")]
    Kv(String),
}

impl Classify for PushError {
    fn class(&self) -> Option<Class> {
        match self {
            PushError::Key(e) => e.class(),
            PushError::Trust { .. } => Some(Class::Security),
            PushError::Admin(e) => e.class(),
            PushError::Kv(_) => Some(Class::Runtime),
        }
    }
}

/// Checks `bytes` against the org in `org_dir`.
pub fn check(org_dir: &Path, path: &Path, bytes: &[u8], now: u64) -> Result<VerifiedTrust, PushError> {
    let root = keyfile::read_public(&org_dir.join(ROOT_PUB))?;
    SignedTrust::parse(bytes)
        .and_then(|t| t.verify_anchor(now, Some(&root)))
        .map_err(|err| PushError::Trust { path: path.display().to_string(), err })
}

/// Puts `bytes` under `PERCH_TRUST.doc`; the bucket is made on first use.
pub async fn push(org_dir: &Path, urls: &[String], bytes: Vec<u8>, now: u64) -> Result<u64, PushError> {
    let client = admin::connect(org_dir, urls, Account::Fleet, "perch-bootstrap trust push", now).await?;
    let js = async_nats::jetstream::new(client.clone());
    // One revision: devices only ever need the newest.
    let kv = perch_net::ensure_kv(&js, TRUST_BUCKET, "perch: the org's current trust document", 1)
        .await
        .map_err(PushError::Kv)?;
    let rev =
        kv.put(TRUST_KEY, bytes.into()).await.map_err(|e| PushError::Kv(format!("{TRUST_BUCKET}: {e}")))?;
    client.flush().await.map_err(|e| PushError::Kv(e.to_string()))?;
    Ok(rev)
}
