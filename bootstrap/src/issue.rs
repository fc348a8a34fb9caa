//! What an enrolled device gets: a credential signed by the issuing key, a
//! FLEET user JWT signed by the same key (in its role as the FLEET account
//! signing key), the fleet URLs, the trust document and the fleet CA.
//!
//! Used by the provisioner (online) and by `sign-request` (offline).

use std::path::Path;

use nkeys::KeyPair;
use perch_protocol::enroll::{CredentialBody, EnrollError, Enrollment, SignedCredential};
use perch_protocol::subjects::device_grant;
use perch_protocol::trust::{SignedTrust, VerifiedTrust, MAX_TRUST_FILE_LEN};
use perch_protocol::{PublicKey, SecretKey};
use perch_support::durable::read_bounded;
use perch_support::exit::{Class, Classify};

use crate::nats::{self, NatsError, Permissions};
use crate::org::TRUST_DOC;

/// Why an org's issuing material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Read(#[from] perch_support::durable::ReadError),
    #[error("{}: {err}", path.display())]
    Trust { path: std::path::PathBuf, err: perch_protocol::trust::TrustError },
    #[error("the trust document does not list this org's issuing key")]
    NotListed,
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

impl Classify for IssuerError {
    fn class(&self) -> Option<Class> {
        match self {
            IssuerError::Nats(e) => e.class(),
            IssuerError::Tls(e) => e.class(),
            IssuerError::Read(e) => e.class(),
            IssuerError::Trust { .. } => Some(Class::Security),
            IssuerError::NotListed => Some(Class::Usage),
            IssuerError::Enroll(_) => Some(Class::Runtime),
        }
    }
}

/// An org's issuing key and everything that goes into an enrollment.
pub struct Issuer {
    pub trust: VerifiedTrust,
    trust_bytes: Vec<u8>,
    issuing: SecretKey,
    fleet_signing: KeyPair,
    fleet_account: String,
    pub ca_der: Vec<u8>,
    ca_fingerprint: [u8; 32],
}

impl Issuer {
    /// Loads the issuing material from an org directory.
    pub fn load(org_dir: &Path, now: u64) -> Result<Self, IssuerError> {
        let path = org_dir.join(TRUST_DOC);
        let trust_bytes = read_bounded(&path, MAX_TRUST_FILE_LEN)?;
        let trust = SignedTrust::parse(&trust_bytes)
            .and_then(|t| t.verify_anchor(now, None))
            .map_err(|err| IssuerError::Trust { path: path.clone(), err })?;
        let issuing = nats::issuing_key(org_dir)?;
        if !trust.body().issuing_keys.contains(&issuing.public()) {
            return Err(IssuerError::NotListed);
        }
        let ndir = nats::nats_dir(org_dir);
        let ca_der = crate::tls::ca_der(org_dir)?;
        Ok(Self {
            trust,
            trust_bytes,
            issuing,
            fleet_signing: nats::read_seed(&ndir.join("fleet-signing.nk"))?,
            fleet_account: nats::account_public(org_dir, "fleet")?,
            ca_fingerprint: perch_net::tls::fingerprint(&ca_der),
            ca_der,
        })
    }

    /// Issues the enrollment of `device_id` with `device_key` in `groups`.
    pub fn enrollment(
        &self,
        device_id: &str,
        device_key: PublicKey,
        groups: &[String],
        fleet_urls: &[String],
        now: u64,
        expires_at: u64,
    ) -> Result<Enrollment, IssuerError> {
        let credential = SignedCredential::issue(
            CredentialBody {
                org: self.trust.body().org.clone(),
                device_id: device_id.into(),
                device_key,
                groups: groups.to_vec(),
                ca_fingerprint: self.ca_fingerprint,
                issued_at: now,
                expires_at,
            },
            &self.issuing,
        )?;
        let grant = device_grant(device_id, groups);
        let perms = Permissions {
            publish: grant.publish,
            subscribe: grant.subscribe,
            connection_types: vec![nats::STANDARD],
            ..Permissions::default()
        };
        let user_jwt = nats::user_jwt(
            &self.fleet_signing,
            &self.fleet_account,
            &device_key.nats_user(),
            device_id,
            &perms,
            now,
            Some(expires_at),
        )?;
        Ok(Enrollment {
            credential: credential.to_bytes(),
            user_jwt,
            fleet_urls: fleet_urls.to_vec(),
            trust: self.trust_bytes.clone(),
            ca_der: self.ca_der.clone(),
        })
    }
}
