//! Enrolling this device.
//!
//! - Online: connect to the token's provisioner URLs with the token's
//!   PROVISIONING credential, over TLS pinned to the token's CA
//!   fingerprint; send a request signed by the device key; retry with
//!   backoff and jitter until an answer comes. Every attempt carries a fresh
//!   nonce, and asking again after success returns the same enrollment, so
//!   retries are idempotent.
//! - Offline: write the signed request to a file for a technician, and
//!   import the enrollment file they send back.
//!
//! Nothing is stored until the enrollment checked out (trust fingerprint,
//! CA, issuer, device id and key).

use std::sync::Arc;
use std::time::Duration;

use perch_net::{CaTrust, LinkOptions, Signer, User};
use perch_protocol::enroll::{
    EnrollResponse, Enrollment, Expect, Rejection, RequestBody, SignedRequest, VerifiedEnrollment,
};
use perch_protocol::subjects::ENROLL_REQUEST;
use perch_protocol::token::SignedToken;
use perch_protocol::SecretKey;
use perch_support::exit::{Class, Classify};
use perch_support::now_unix;
use tracing::{info, warn};

use crate::config::Config;
use crate::identity::{configured_trust, Identity, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum EnrollFailure {
    #[error(transparent)]
    Token(#[from] perch_protocol::token::TokenError),
    #[error("the token is for trust document {token}, but {path} holds {configured}")]
    TokenForOtherOrg { token: String, path: String, configured: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("provisioner refused: {0}")]
    Rejected(Rejection),
    #[error("the provisioner's server failed the fleet CA check: {0}")]
    Tls(perch_net::LinkError),
    #[error("the token's credential was refused by the server (expired or revoked token?): {0}")]
    Auth(perch_net::LinkError),
    #[error(transparent)]
    Link(#[from] perch_net::LinkError),
    #[error("the enrollment answer does not check out: {0}")]
    BadAnswer(perch_protocol::enroll::EnrollError),
    #[error("still pending approval after {waited}; run again (or use --wait)", waited = perch_support::duration(*.0))]
    StillPending(Duration),
    #[error("no answer from the provisioner after {waited}; last problem: {1}", waited = perch_support::duration(*.0))]
    GaveUp(Duration, String),
    #[error("{0}")]
    Transient(String),
    #[error("reading OS randomness: {0}")]
    Random(String),
}

impl EnrollFailure {
    /// Refusals that asking again cannot fix (exit 3).
    pub fn is_security(&self) -> bool {
        match self {
            EnrollFailure::Token(_)
            | EnrollFailure::TokenForOtherOrg { .. }
            | EnrollFailure::Rejected(_)
            | EnrollFailure::Tls(_)
            | EnrollFailure::Auth(_)
            | EnrollFailure::BadAnswer(_) => true,
            EnrollFailure::Identity(i) => i.is_security(),
            _ => false,
        }
    }
}

impl Classify for EnrollFailure {
    fn class(&self) -> Option<Class> {
        match self {
            _ if self.is_security() => Some(Class::Security),
            EnrollFailure::Identity(i) => i.class(),
            _ => Some(Class::Runtime),
        }
    }
}

/// What to enroll as, and how patiently.
pub struct Plan {
    pub device_id: String,
    pub groups: Vec<String>,
    pub target: String,
    /// Keep asking forever (through pending approval and outages).
    pub wait: bool,
    /// Without `wait`, give up after this long.
    pub timeout: Duration,
    pub max_backoff: Duration,
}

fn random<const N: usize>() -> Result<[u8; N], EnrollFailure> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| EnrollFailure::Random(e.to_string()))?;
    Ok(b)
}

/// A signed request with a fresh nonce.
pub fn request(key: &SecretKey, plan: &Plan, token: Option<&str>) -> Result<SignedRequest, EnrollFailure> {
    let body = RequestBody {
        device_id: plan.device_id.clone(),
        device_key: key.public(),
        groups: plan.groups.clone(),
        target: plan.target.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        nonce: random()?,
        created_at: now_unix(),
        token: token.map(str::to_string),
    };
    SignedRequest::sign(body, key).map_err(EnrollFailure::BadAnswer)
}

/// Exponential backoff with full jitter: 0.5–1.0 × min(max, 1 s × 2^attempt).
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter = random::<2>().map(u16::from_le_bytes).unwrap_or(u16::MAX / 2);
    base.mul_f64(0.5 + 0.5 * f64::from(jitter) / f64::from(u16::MAX))
}

/// Enrolls online with `token_text`; stores and returns the enrollment.
pub async fn online(
    cfg: &Config,
    state_dir: &std::path::Path,
    token_text: &str,
    plan: &Plan,
) -> Result<VerifiedEnrollment, EnrollFailure> {
    let token_text = token_text.trim();
    let identity = Identity::new(state_dir);
    let key = Arc::new(identity.key()?);
    let token = SignedToken::parse(token_text)?;
    let tb = token.unverified_body().clone();
    // A device that already believes a trust document only takes tokens for it.
    if let Some(t) = configured_trust(cfg)? {
        let trust = t
            .verify_anchor(now_unix(), None)
            .map_err(|err| IdentityError::Trust { path: cfg.trust.clone(), err })?;
        if trust.fingerprint() != tb.trust_fingerprint {
            return Err(EnrollFailure::TokenForOtherOrg {
                token: hex::encode(&tb.trust_fingerprint[..8]),
                path: cfg.trust.display().to_string(),
                configured: hex::encode(&trust.fingerprint()[..8]),
            });
        }
        token.clone().verify(&trust, now_unix())?;
    }
    let seed = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, tb.provisioning_seed).map_err(|e| {
        EnrollFailure::BadAnswer(perch_protocol::enroll::EnrollError::Invalid {
            what: "token",
            detail: e.to_string(),
        })
    })?;
    let user = User { jwt: tb.provisioning_jwt(), signer: Signer::Nkey(Arc::new(seed)) };
    let ca = CaTrust::Fingerprint(tb.ca_fingerprint);
    let link = LinkOptions {
        name: format!("perch-agent {} (enrolling)", plan.device_id),
        inbox_prefix: Some(perch_protocol::subjects::token_inbox_prefix(&tb.token_id)),
        ..LinkOptions::default()
    };
    let started = tokio::time::Instant::now();
    let mut attempt = 0u32;
    let mut client: Option<async_nats::Client> = None;
    loop {
        let problem = match ask(&mut client, &tb.urls, &user, &ca, &link, &key, plan, token_text).await {
            Ok(EnrollResponse::Enrolled(e)) => {
                let expect = Expect {
                    device_id: &plan.device_id,
                    device_key: key.public(),
                    trust_fingerprint: tb.trust_fingerprint,
                    ca_fingerprint: Some(tb.ca_fingerprint),
                    now: now_unix(),
                };
                let v = (*e).verify(&expect).map_err(EnrollFailure::BadAnswer)?;
                identity.store(cfg, &v, now_unix())?;
                crate::announce::owe_provisioned(state_dir);
                info!(device = %plan.device_id, groups = %v.credential.groups.join(","), "enrolled");
                return Ok(v);
            }
            Ok(EnrollResponse::Pending(msg)) => {
                if !plan.wait {
                    return Err(EnrollFailure::StillPending(started.elapsed()));
                }
                info!(device = %plan.device_id, "{msg}");
                // Pending is not an outage: poll at a steady pace.
                attempt = attempt.min(3);
                msg
            }
            Ok(EnrollResponse::Rejected(r)) if r.is_retryable() => r.to_string(),
            Ok(EnrollResponse::Rejected(r)) => return Err(EnrollFailure::Rejected(r)),
            Err(e) if e.is_security() => return Err(e),
            Err(e) => e.to_string(),
        };
        if !plan.wait && started.elapsed() >= plan.timeout {
            return Err(EnrollFailure::GaveUp(started.elapsed(), problem));
        }
        let mut pause = backoff(attempt, plan.max_backoff);
        if !plan.wait {
            pause = pause.min(plan.timeout.saturating_sub(started.elapsed()));
        }
        warn!(device = %plan.device_id, attempt, retry_in = ?pause, "enrollment not done yet: {problem}");
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(pause).await;
    }
}

/// One attempt: (re)connect if needed and ask.
#[allow(clippy::too_many_arguments)]
async fn ask(
    client: &mut Option<async_nats::Client>,
    urls: &[String],
    user: &User,
    ca: &CaTrust,
    link: &LinkOptions,
    key: &SecretKey,
    plan: &Plan,
    token_text: &str,
) -> Result<EnrollResponse, EnrollFailure> {
    if client.as_ref().is_none_or(|c| c.connection_state() != async_nats::connection::State::Connected) {
        *client = None;
        let c = perch_net::connect(urls, user, ca, link).await.map_err(|e| {
            if e.is_tls_rejection() {
                EnrollFailure::Tls(e)
            } else if e.is_auth_rejection() {
                EnrollFailure::Auth(e)
            } else {
                EnrollFailure::Link(e)
            }
        })?;
        *client = Some(c);
    }
    let Some(c) = client.as_ref() else { unreachable!("connected above") };
    let req = request(key, plan, Some(token_text))?;
    match tokio::time::timeout(link.request_timeout, c.request(ENROLL_REQUEST, req.to_bytes().into())).await {
        Ok(Ok(msg)) => EnrollResponse::from_bytes(&msg.payload).map_err(EnrollFailure::BadAnswer),
        Ok(Err(e)) => Err(EnrollFailure::Transient(format!("request failed: {e}"))),
        Err(_) => Err(EnrollFailure::Transient("request timed out".into())),
    }
}

/// Offline, step 1: the signed request, as text for a file.
pub fn request_text(
    state_dir: &std::path::Path,
    plan: &Plan,
    token: Option<&str>,
) -> Result<String, EnrollFailure> {
    let key = Identity::new(state_dir).key()?;
    Ok(request(&key, plan, token)?.to_text())
}

/// Offline, step 3: check and store the enrollment a technician signed.
/// The device must already hold the org's trust document (installed with
/// its image): that is what the enrollment is checked against.
pub fn import(
    cfg: &Config,
    state_dir: &std::path::Path,
    text: &str,
    device_id: &str,
) -> Result<VerifiedEnrollment, EnrollFailure> {
    let identity = Identity::new(state_dir);
    let key = identity.key()?;
    let trust = configured_trust(cfg)?.ok_or_else(|| IdentityError::NoTrust(cfg.trust.clone()))?;
    let e = Enrollment::from_text(text).map_err(EnrollFailure::BadAnswer)?;
    let expect = Expect {
        device_id,
        device_key: key.public(),
        trust_fingerprint: trust.fingerprint(),
        ca_fingerprint: None,
        now: now_unix(),
    };
    let v = e.verify(&expect).map_err(EnrollFailure::BadAnswer)?;
    identity.store(cfg, &v, now_unix())?;
    crate::announce::owe_provisioned(state_dir);
    Ok(v)
}
