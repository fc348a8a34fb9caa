//! Issuing enrollment tokens: a PROVISIONING credential that may only ask
//! to enroll, wrapped in a token signed by the org's issuing key.

use std::path::Path;

use nkeys::KeyPairType;
use perch_protocol::token::{Approval, SignedToken, TokenBody, TokenError};
use perch_protocol::trust::SignedTrust;
use perch_support::exit::{Class, Classify};

use crate::nats::{self, NatsError, Permissions};

/// The subject devices send enrollment requests to.
pub const ENROLL_SUBJECT: &str = "perch.enroll.request";

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0}")]
    Trust(String),
    /// The org's trust document could not be read or parsed; its own
    /// error (after this one in the chain) says why and how to exit.
    #[error("{}", path.display())]
    TrustDoc {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Classify for IssueError {
    fn class(&self) -> Option<Class> {
        match self {
            IssueError::Nats(e) => e.class(),
            // Parameters no valid token can carry: the operator's to fix.
            IssueError::Token(TokenError::Invalid(_)) => Some(Class::Usage),
            IssueError::Token(_) | IssueError::Trust(_) => Some(Class::Security),
            IssueError::TrustDoc { .. } => None,
            IssueError::Tls(e) => e.class(),
        }
    }
}

/// What the operator asks for.
pub struct IssueParams {
    pub groups: Vec<String>,
    pub uses: u32,
    pub approval: Approval,
    pub id_pattern: Option<String>,
    pub urls: Vec<String>,
    pub ca_fingerprint: [u8; 32],
    pub now: u64,
    pub expires_at: u64,
}

/// What the operator asks for, the rest taken from the org directory.
#[derive(Debug, Clone)]
pub struct Ask {
    pub groups: Vec<String>,
    pub uses: u32,
    pub approval: Approval,
    pub id_pattern: Option<String>,
    /// The NATS URLs devices enroll through.
    pub urls: Vec<String>,
    /// How long it is good for (at least 1 s).
    pub ttl_secs: u64,
}

/// Issues a token for the org in `dir`, with its trust document and CA
/// (what `perch-bootstrap token issue` and `perch console` do).
pub fn issue_from_org(dir: &Path, ask: Ask, now: u64) -> Result<SignedToken, IssueError> {
    // The format needs expires_at > issued_at; never round 0 s up silently.
    if ask.ttl_secs == 0 {
        return Err(IssueError::Token(TokenError::Invalid("a token must be valid for at least 1s".into())));
    }
    let path = dir.join(crate::org::TRUST_DOC);
    let doc_err =
        |e: Box<dyn std::error::Error + Send + Sync>| IssueError::TrustDoc { path: path.clone(), source: e };
    let bytes = perch_support::durable::read_bounded(&path, perch_protocol::trust::MAX_TRUST_FILE_LEN)
        .map_err(|e| doc_err(e.into()))?;
    let trust = SignedTrust::parse(&bytes).map_err(|e| doc_err(e.into()))?;
    let ca = crate::tls::ca_der(dir)?;
    let params = IssueParams {
        groups: ask.groups,
        uses: ask.uses,
        approval: ask.approval,
        id_pattern: ask.id_pattern,
        urls: ask.urls,
        ca_fingerprint: perch_net::tls::fingerprint(&ca),
        now,
        expires_at: now.saturating_add(ask.ttl_secs),
    };
    issue(dir, &trust, params)
}

/// Issues a token for the org in `dir`.
pub fn issue(dir: &Path, trust: &SignedTrust, p: IssueParams) -> Result<SignedToken, IssueError> {
    let issuing = nats::issuing_key(dir)?;
    if !trust.unverified_body().issuing_keys.contains(&issuing.public()) {
        return Err(IssueError::Trust("the trust document does not list this org's issuing key".into()));
    }
    let signer = nats::read_seed(&nats::nats_dir(dir).join("provisioning-signing.nk"))?;
    let account = nats::account_public(dir, "provisioning")?;
    let user = nats::new_key(KeyPairType::User)?;
    let mut token_id = [0u8; 16];
    getrandom::getrandom(&mut token_id).map_err(|e| NatsError::Random(e.to_string()))?;
    // It may send the enrollment request and read the reply, nothing else.
    let grant = perch_protocol::subjects::token_grant(&token_id);
    let perms = Permissions {
        publish: grant.publish,
        subscribe: grant.subscribe,
        connection_types: vec![crate::nats::STANDARD],
        ..Permissions::default()
    };
    let jwt =
        nats::user_jwt(&signer, &account, &user.public_key(), "enroll", &perms, p.now, Some(p.expires_at))?;
    let (claims, sig) = split_jwt(&jwt)?;
    let (_, seed) = nkeys::decode_seed(&user.seed().map_err(|e| NatsError::Key(e.to_string()))?)
        .map_err(|e| NatsError::Key(e.to_string()))?;
    let body = TokenBody {
        token_id,
        org: trust.unverified_body().org.clone(),
        trust_fingerprint: trust.fingerprint(),
        urls: p.urls,
        ca_fingerprint: p.ca_fingerprint,
        provisioning_claims: claims,
        provisioning_sig: sig,
        provisioning_seed: seed,
        groups: p.groups,
        uses: p.uses,
        issued_at: p.now,
        expires_at: p.expires_at,
        id_pattern: p.id_pattern,
        approval: p.approval,
    };
    Ok(SignedToken::issue(body, &issuing)?)
}

/// The claims and signature of a JWT perch made (the header is fixed).
fn split_jwt(jwt: &str) -> Result<(Vec<u8>, perch_protocol::keys::Signature), NatsError> {
    use data_encoding::BASE64URL_NOPAD as B64;
    let bad = || NatsError::Key("malformed JWT".into());
    let mut parts = jwt.split('.');
    let (Some(_), Some(claims), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let claims = B64.decode(claims.as_bytes()).map_err(|_| bad())?;
    let sig: [u8; 64] = B64.decode(sig.as_bytes()).map_err(|_| bad())?.try_into().map_err(|_| bad())?;
    Ok((claims, perch_protocol::keys::Signature(sig)))
}
