//! Enrollment tokens: what a device needs to ask the provisioner to enroll
//! it, signed by an issuing key listed in the org trust document.
//!
//! Text form: `PERCH1-` followed by RFC 4648 base32 (no padding) of a
//! postcard `(body bytes, key id, signature)`. Base32 uses only characters
//! of the QR code's alphanumeric mode, so a token fits a QR code.
//!
//! A token lets its holder *ask* to enroll, no more: the provisioner still
//! checks the use count, groups, id pattern and the device's proof of
//! possession, and the PROVISIONING credential inside it can only send an
//! enrollment request and receive the reply.

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{KeyId, Signature};
use crate::limits::MAX_LABEL_LEN;
use crate::trust::VerifiedTrust;
use crate::SecretKey;

pub const TOKEN_PREFIX: &str = "PERCH1-";
/// Longest token text accepted (the target is 1.5 KB; this leaves room).
pub const MAX_TOKEN_TEXT: usize = 4096;
const CONTEXT: &[u8] = b"perch/enrollment-token/v1\0";
const MAX_URLS: usize = 8;
const MAX_GROUPS: usize = 16;
const MAX_CREDENTIAL: usize = 2048;

/// Whether an enrollment with this token waits for a technician.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Approval {
    Auto,
    Manual,
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// Unique per token: the provisioner counts uses against it.
    pub token_id: [u8; 16],
    pub org: String,
    /// Fingerprint of the trust document the device must end up with.
    pub trust_fingerprint: [u8; 32],
    /// The provisioner's NATS URLs.
    pub urls: Vec<String>,
    /// SHA-256 of the fleet CA certificate (DER). The device accepts a
    /// server only if its chain carries this CA and the CA signed it; the
    /// whole certificate would not fit a QR code.
    pub ca_fingerprint: [u8; 32],
    /// A PROVISIONING-account user JWT allowed only to request enrollment,
    /// stored compactly: its claims JSON and its signature (the JWT header
    /// is always the same). See [`TokenBody::provisioning_jwt`].
    pub provisioning_claims: Vec<u8>,
    pub provisioning_sig: crate::keys::Signature,
    /// The raw ed25519 seed of that user's nkey.
    pub provisioning_seed: [u8; 32],
    /// Groups a device enrolled with this token may join.
    pub groups: Vec<String>,
    /// How many devices may enroll with it.
    pub uses: u32,
    pub issued_at: u64,
    pub expires_at: u64,
    /// Optional glob the device id must match (`drone-*`).
    pub id_pattern: Option<String>,
    pub approval: Approval,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    body: Vec<u8>,
    key_id: KeyId,
    signature: Signature,
}

/// The header every NATS JWT perch issues carries.
pub const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

impl TokenBody {
    /// Rebuilds the PROVISIONING user JWT text.
    pub fn provisioning_jwt(&self) -> String {
        use data_encoding::BASE64URL_NOPAD as B64;
        format!(
            "{}.{}.{}",
            B64.encode(JWT_HEADER.as_bytes()),
            B64.encode(&self.provisioning_claims),
            B64.encode(&self.provisioning_sig.0)
        )
    }
}

/// Why a token was refused. Every variant is a security rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {MAX_TOKEN_TEXT} characters")]
    TooLong,
    #[error("not a perch enrollment token (it must start with {TOKEN_PREFIX})")]
    BadPrefix,
    #[error("token is not valid base32")]
    BadEncoding,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("token signed by key {0}, which is not an issuing key of this org")]
    UnknownKey(KeyId),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token is for another trust document (fingerprint {found}, expected {expected})")]
    WrongTrust { found: String, expected: String },
    #[error("token expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
}

/// A parsed token whose signature has not been checked.
#[derive(Debug, Clone)]
pub struct SignedToken {
    body_bytes: Vec<u8>,
    body: TokenBody,
    key_id: KeyId,
    signature: Signature,
}

impl SignedToken {
    /// Signs a new token with an issuing key.
    pub fn issue(body: TokenBody, key: &SecretKey) -> Result<Self, TokenError> {
        validate(&body)?;
        let body_bytes = crate::codec::encode(&body);
        let signature = key.sign(CONTEXT, &body_bytes);
        Ok(Self { body_bytes, body, key_id: key.public().id(), signature })
    }

    pub fn to_text(&self) -> String {
        let wire = Wire { body: self.body_bytes.clone(), key_id: self.key_id, signature: self.signature };
        format!("{TOKEN_PREFIX}{}", BASE32_NOPAD.encode(&crate::codec::encode(&wire)))
    }

    /// Parses the text form (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_TEXT {
            return Err(TokenError::TooLong);
        }
        let b32 = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::BadPrefix)?;
        let raw = BASE32_NOPAD.decode(b32.as_bytes()).map_err(|_| TokenError::BadEncoding)?;
        let wire: Wire = crate::codec::decode_exact(&raw).map_err(TokenError::Malformed)?;
        let body: TokenBody = crate::codec::decode_exact(&wire.body).map_err(TokenError::Malformed)?;
        validate(&body)?;
        Ok(Self { body_bytes: wire.body, body, key_id: wire.key_id, signature: wire.signature })
    }

    /// What the token claims, before its signature was checked. Display only.
    pub fn unverified_body(&self) -> &TokenBody {
        &self.body
    }

    /// Checks the signature against the org's issuing keys, the trust
    /// document fingerprint and the expiry.
    pub fn verify(self, trust: &VerifiedTrust, now: u64) -> Result<VerifiedToken, TokenError> {
        let key = trust
            .body()
            .issuing_keys
            .iter()
            .find(|k| k.id() == self.key_id)
            .ok_or(TokenError::UnknownKey(self.key_id))?;
        if !key.verify(CONTEXT, &self.body_bytes, &self.signature) {
            return Err(TokenError::BadSignature);
        }
        if self.body.trust_fingerprint != trust.fingerprint() {
            return Err(TokenError::WrongTrust {
                found: hex::encode(&self.body.trust_fingerprint[..8]),
                expected: hex::encode(&trust.fingerprint()[..8]),
            });
        }
        if now >= self.body.expires_at {
            return Err(TokenError::Expired { expires_at: self.body.expires_at, now });
        }
        let digest: [u8; 32] = Sha256::digest(&self.body_bytes).into();
        Ok(VerifiedToken { body: self.body, digest })
    }
}

/// A token whose signature, trust fingerprint and expiry checked out.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    body: TokenBody,
    digest: [u8; 32],
}

impl VerifiedToken {
    pub fn body(&self) -> &TokenBody {
        &self.body
    }

    /// SHA-256 of the signed body.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
}

/// A NATS URL perch accepts: `tls://` or `nats://`, no spaces, at most 256 bytes.
pub fn valid_url(u: &str) -> bool {
    let ok_scheme = u.starts_with("nats://") || u.starts_with("tls://");
    ok_scheme && u.len() <= 256 && !u.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn validate(b: &TokenBody) -> Result<(), TokenError> {
    let invalid = |m: String| Err(TokenError::Invalid(m));
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_LABEL_LEN
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !label(&b.org) {
        return invalid("org name".into());
    }
    if b.urls.is_empty() || b.urls.len() > MAX_URLS {
        return invalid(format!("1 to {MAX_URLS} provisioner URLs"));
    }
    if let Some(u) = b.urls.iter().find(|u| !valid_url(u)) {
        return invalid(format!("provisioner URL '{}'", u.escape_default()));
    }
    if b.groups.is_empty()
        || b.groups.len() > MAX_GROUPS
        || !b.groups.iter().all(|g| crate::subjects::is_token(g))
    {
        return invalid(format!("1 to {MAX_GROUPS} groups of A-Z a-z 0-9 - _"));
    }
    if b.uses == 0 {
        return invalid("uses must be at least 1".into());
    }
    if b.expires_at <= b.issued_at {
        return invalid("expires before it was issued".into());
    }
    if b.provisioning_claims.is_empty() || b.provisioning_claims.len() > MAX_CREDENTIAL {
        return invalid("provisioning credential".into());
    }
    if let Some(p) = &b.id_pattern {
        if p.is_empty()
            || p.len() > MAX_LABEL_LEN
            || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c))
        {
            return invalid(format!("id pattern '{}'", p.escape_default()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(issuing: &SecretKey) -> VerifiedTrust {
        crate::testkit::org(issuing).verify_anchor(100, None).unwrap()
    }

    fn body(trust: &VerifiedTrust) -> TokenBody {
        TokenBody {
            token_id: [7; 16],
            org: "acme".into(),
            trust_fingerprint: trust.fingerprint(),
            urls: vec!["tls://prov.example:4222".into()],
            ca_fingerprint: [6; 32],
            // Real PROVISIONING user claims are about 420 bytes.
            provisioning_claims: vec![b'c'; 440],
            provisioning_sig: crate::keys::Signature([9; 64]),
            provisioning_seed: [8; 32],
            groups: vec!["drones".into()],
            uses: 5,
            issued_at: 100,
            expires_at: 200,
            id_pattern: Some("drone-*".into()),
            approval: Approval::Manual,
        }
    }

    #[test]
    fn round_trip_fits_a_qr_code_and_verifies() {
        let issuing = SecretKey::from_seed(&[3; 32]);
        let trust = org(&issuing);
        let text = SignedToken::issue(body(&trust), &issuing).unwrap().to_text();
        assert!(text.len() <= 1536, "{} characters", text.len());
        assert!(text.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-'));
        let v = SignedToken::parse(&format!("  {text}\n")).unwrap().verify(&trust, 150).unwrap();
        assert_eq!(v.body().uses, 5);
        assert!(matches!(
            SignedToken::parse(&text).unwrap().verify(&trust, 200),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn forged_tokens_are_refused() {
        let issuing = SecretKey::from_seed(&[3; 32]);
        let trust = org(&issuing);
        let rogue = SecretKey::from_seed(&[4; 32]);
        let forged = SignedToken::issue(body(&trust), &rogue).unwrap().to_text();
        assert!(matches!(
            SignedToken::parse(&forged).unwrap().verify(&trust, 150),
            Err(TokenError::UnknownKey(_))
        ));
        let other = org(&SecretKey::from_seed(&[5; 32]));
        let mut b = body(&other);
        b.trust_fingerprint = other.fingerprint();
        let wrong = SignedToken::issue(b, &issuing).unwrap().to_text();
        assert!(matches!(
            SignedToken::parse(&wrong).unwrap().verify(&trust, 150),
            Err(TokenError::WrongTrust { .. })
        ));
        let text = SignedToken::issue(body(&trust), &issuing).unwrap().to_text();
        for i in TOKEN_PREFIX.len()..text.len() {
            let mut t = text.clone().into_bytes();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            assert!(
                SignedToken::parse(&t).and_then(|s| s.verify(&trust, 150)).is_err(),
                "change at {i} accepted"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
            let _ = SignedToken::parse(&s);
            let _ = SignedToken::parse(&format!("{TOKEN_PREFIX}{s}"));
        }

        #[test]
        fn arbitrary_bytes_behind_the_prefix_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = SignedToken::parse(&format!("{TOKEN_PREFIX}{}", BASE32_NOPAD.encode(&data)));
        }
    }
}
