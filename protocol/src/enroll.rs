//! Enrollment: the device's signed request, the provisioner's answer, and
//! the device credential it carries.
//!
//! - A [`SignedRequest`] is signed by the device key (proof of possession)
//!   and names the token it uses, so a captured request can neither be
//!   re-bound to another token nor to another key.
//! - A [`SignedCredential`] is signed by an issuing key listed in the trust
//!   document: device id, device key, groups, issued and expiry times.
//! - An [`Enrollment`] is everything the device needs to join the fleet. The
//!   device checks it with [`Enrollment::verify`] before storing any of it.
//!
//! Over NATS the messages are postcard. As files (the offline path) they are
//! text: a prefix and base32, like tokens, so they survive copy and paste.

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{KeyId, Signature};
use crate::subjects::is_token;
use crate::trust::{SignedTrust, TrustError, VerifiedTrust};
use crate::{PublicKey, SecretKey};

const REQUEST_CONTEXT: &[u8] = b"perch/enroll-request/v1\0";
const CREDENTIAL_CONTEXT: &[u8] = b"perch/device-credential/v1\0";
pub const REQUEST_PREFIX: &str = "PERCHREQ1-";
pub const ENROLLMENT_PREFIX: &str = "PERCHENR1-";
/// Largest request or response accepted, encoded (a request is ~1.3 KB).
pub const MAX_MESSAGE: usize = 64 * 1024;
const MAX_GROUPS: usize = 16;
const MAX_URLS: usize = 8;
const MAX_CERT: usize = 8 * 1024;
const MAX_JWT: usize = 8 * 1024;

/// What a device asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestBody {
    pub device_id: String,
    /// The device's own ed25519 key; it is also its NATS user nkey.
    pub device_key: PublicKey,
    /// Groups asked for; empty means every group the token allows.
    pub groups: Vec<String>,
    /// The device class (`aarch64-drone`), shown to operators.
    pub target: String,
    pub agent_version: String,
    /// Fresh for every attempt: the provisioner refuses a nonce it has seen.
    #[serde(with = "crate::readable")]
    pub nonce: [u8; 16],
    /// The device's clock when it asked; shown, never trusted.
    pub created_at: u64,
    /// The enrollment token text. None for the offline path, where a
    /// technician holding an issuing key answers instead.
    pub token: Option<String>,
}

/// Why a message was refused. Every variant is a security rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("{what} is too large ({len} bytes, limit {max})")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error("{what} is not a perch {what} (it must start with {prefix})")]
    BadPrefix { what: &'static str, prefix: &'static str },
    #[error("{what} is not valid base32")]
    BadEncoding { what: &'static str },
    #[error("{what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} is invalid: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("request signature does not verify with the device key it carries (no proof of possession)")]
    BadPossession,
    #[error("credential signed by key {0}, which is not an issuing key of this org")]
    UnknownIssuer(KeyId),
    #[error("credential signature does not verify")]
    BadCredentialSignature,
    #[error("credential expired at {expires_at} (now {now})")]
    CredentialExpired { expires_at: u64, now: u64 },
    #[error("enrollment trust document: {0}")]
    Trust(TrustError),
    #[error("enrollment is for trust document {found}, expected {expected}")]
    WrongTrust { found: String, expected: String },
    #[error("enrollment carries fleet CA {found}, expected {expected}")]
    WrongCa { found: String, expected: String },
    #[error("enrollment is for {found}, not for this device ({expected})")]
    NotForThisDevice { found: String, expected: String },
    #[error("enrollment user JWT {0}")]
    UserJwt(crate::jwt::JwtError),
}

fn invalid(what: &'static str, detail: impl Into<String>) -> EnrollError {
    EnrollError::Invalid { what, detail: detail.into() }
}

/// Checks groups: 1..=16 subject tokens (or, for a request, possibly none).
fn check_groups(what: &'static str, groups: &[String], allow_empty: bool) -> Result<(), EnrollError> {
    if (!allow_empty && groups.is_empty()) || groups.len() > MAX_GROUPS {
        return Err(invalid(what, format!("1 to {MAX_GROUPS} groups")));
    }
    if let Some(g) = groups.iter().find(|g| !is_token(g)) {
        return Err(invalid(what, format!("group '{}' (use A-Z a-z 0-9 - _)", g.escape_default())));
    }
    Ok(())
}

/// Checks a device id: a subject token of at most 64 characters.
pub fn check_device_id(id: &str) -> Result<(), EnrollError> {
    if is_token(id) {
        Ok(())
    } else {
        Err(invalid(
            "device id",
            format!(
                "'{}' (1 to 64 of A-Z a-z 0-9 - _)",
                id.chars().take(80).collect::<String>().escape_default()
            ),
        ))
    }
}

fn check_label(what: &'static str, s: &str) -> Result<(), EnrollError> {
    if s.len() > crate::limits::MAX_LABEL_LEN || s.chars().any(|c| c.is_control()) {
        return Err(invalid(what, "over 128 characters or control characters"));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct SignedWire {
    body: Vec<u8>,
    signature: Signature,
}

/// An enrollment request as received; its signature is not checked yet.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    body_bytes: Vec<u8>,
    body: RequestBody,
    signature: Signature,
}

impl SignedRequest {
    /// Signs a request with the device key it names.
    pub fn sign(body: RequestBody, device_key: &SecretKey) -> Result<Self, EnrollError> {
        if body.device_key != device_key.public() {
            return Err(invalid("request", "signed by a key other than the device key it names"));
        }
        validate_request(&body)?;
        let body_bytes = crate::codec::encode(&body);
        let signature = device_key.sign(REQUEST_CONTEXT, &body_bytes);
        Ok(Self { body_bytes, body, signature })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        crate::codec::encode(&SignedWire { body: self.body_bytes.clone(), signature: self.signature })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnrollError> {
        let what = "request";
        if bytes.len() > MAX_MESSAGE {
            return Err(EnrollError::TooLarge { what, len: bytes.len(), max: MAX_MESSAGE });
        }
        let malformed = |detail| EnrollError::Malformed { what, detail };
        let wire: SignedWire = crate::codec::decode_exact(bytes).map_err(malformed)?;
        let body: RequestBody = crate::codec::decode_exact(&wire.body).map_err(malformed)?;
        validate_request(&body)?;
        Ok(Self { body_bytes: wire.body, body, signature: wire.signature })
    }

    pub fn to_text(&self) -> String {
        to_text(REQUEST_PREFIX, &self.to_bytes())
    }

    pub fn from_text(text: &str) -> Result<Self, EnrollError> {
        Self::from_bytes(&from_text("request", REQUEST_PREFIX, text)?)
    }

    /// The request as JSON (`schemas/wire/enroll-request.json`): the
    /// body's fields and the signature in hex. For showing; what is signed
    /// is the postcard body.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"body": self.body, "signature": hex::encode(self.signature.0)})
    }

    /// What the request claims, before its signature was checked.
    pub fn unverified_body(&self) -> &RequestBody {
        &self.body
    }

    /// Checks the proof of possession: the request is signed by the key it names.
    pub fn verify_possession(self) -> Result<VerifiedRequest, EnrollError> {
        if !self.body.device_key.verify(REQUEST_CONTEXT, &self.body_bytes, &self.signature) {
            return Err(EnrollError::BadPossession);
        }
        Ok(VerifiedRequest { body: self.body })
    }
}

/// A request whose signer holds the device key it names.
#[derive(Debug, Clone)]
pub struct VerifiedRequest {
    body: RequestBody,
}

impl VerifiedRequest {
    pub fn body(&self) -> &RequestBody {
        &self.body
    }
}

fn validate_request(b: &RequestBody) -> Result<(), EnrollError> {
    check_device_id(&b.device_id)?;
    check_groups("request", &b.groups, true)?;
    check_label("target", &b.target)?;
    check_label("agent version", &b.agent_version)?;
    if let Some(t) = &b.token {
        if t.len() > crate::token::MAX_TOKEN_TEXT {
            return Err(invalid("request", "token text too long"));
        }
    }
    Ok(())
}

/// What a device credential says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialBody {
    pub org: String,
    pub device_id: String,
    pub device_key: PublicKey,
    pub groups: Vec<String>,
    /// SHA-256 of the fleet CA certificate: the issuer vouches for the CA,
    /// so an enrollment file carried by hand cannot have its CA swapped.
    pub ca_fingerprint: [u8; 32],
    pub issued_at: u64,
    pub expires_at: u64,
}

/// A device credential, signed by an issuing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCredential {
    body_bytes: Vec<u8>,
    body: CredentialBody,
    key_id: KeyId,
    signature: Signature,
}

#[derive(Serialize, Deserialize)]
struct CredentialWire {
    body: Vec<u8>,
    key_id: KeyId,
    signature: Signature,
}

impl SignedCredential {
    pub fn issue(body: CredentialBody, issuing: &SecretKey) -> Result<Self, EnrollError> {
        validate_credential(&body)?;
        let body_bytes = crate::codec::encode(&body);
        let signature = issuing.sign(CREDENTIAL_CONTEXT, &body_bytes);
        Ok(Self { body_bytes, body, key_id: issuing.public().id(), signature })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        crate::codec::encode(&CredentialWire {
            body: self.body_bytes.clone(),
            key_id: self.key_id,
            signature: self.signature,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnrollError> {
        let what = "credential";
        if bytes.len() > MAX_MESSAGE {
            return Err(EnrollError::TooLarge { what, len: bytes.len(), max: MAX_MESSAGE });
        }
        let malformed = |detail| EnrollError::Malformed { what, detail };
        let wire: CredentialWire = crate::codec::decode_exact(bytes).map_err(malformed)?;
        let body: CredentialBody = crate::codec::decode_exact(&wire.body).map_err(malformed)?;
        validate_credential(&body)?;
        Ok(Self { body_bytes: wire.body, body, key_id: wire.key_id, signature: wire.signature })
    }

    pub fn unverified_body(&self) -> &CredentialBody {
        &self.body
    }

    /// Checks the issuer against the org's issuing keys, and the expiry.
    pub fn verify(&self, trust: &VerifiedTrust, now: u64) -> Result<&CredentialBody, EnrollError> {
        let key = self.issuer(trust)?;
        if !key.verify(CREDENTIAL_CONTEXT, &self.body_bytes, &self.signature) {
            return Err(EnrollError::BadCredentialSignature);
        }
        if now >= self.body.expires_at {
            return Err(EnrollError::CredentialExpired { expires_at: self.body.expires_at, now });
        }
        Ok(&self.body)
    }
}

impl SignedCredential {
    /// The issuing key of `trust` this credential names as its signer.
    fn issuer<'t>(&self, trust: &'t VerifiedTrust) -> Result<&'t PublicKey, EnrollError> {
        trust
            .body()
            .issuing_keys
            .iter()
            .find(|k| k.id() == self.key_id)
            .ok_or(EnrollError::UnknownIssuer(self.key_id))
    }
}

fn validate_credential(b: &CredentialBody) -> Result<(), EnrollError> {
    check_device_id(&b.device_id)?;
    check_groups("credential", &b.groups, false)?;
    check_label("org", &b.org)?;
    if b.expires_at <= b.issued_at {
        return Err(invalid("credential", "expires before it was issued"));
    }
    Ok(())
}

/// Everything an enrolled device needs to join the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// [`SignedCredential`] bytes.
    #[serde(with = "crate::readable::base64")]
    pub credential: Vec<u8>,
    /// The device's NATS user JWT in the FLEET account.
    pub user_jwt: String,
    /// FLEET NATS URLs.
    pub fleet_urls: Vec<String>,
    /// The org trust document, encoded.
    #[serde(with = "crate::readable::base64")]
    pub trust: Vec<u8>,
    /// The fleet CA certificate (DER); the device trusts only servers it signed.
    #[serde(with = "crate::readable::base64")]
    pub ca_der: Vec<u8>,
}

/// What a device checks an enrollment against.
pub struct Expect<'a> {
    pub device_id: &'a str,
    pub device_key: PublicKey,
    /// The trust document fingerprint the device already believes (from
    /// the token, or from the trust document installed with its image).
    pub trust_fingerprint: [u8; 32],
    /// The fleet CA fingerprint from the token; None offline, where the CA
    /// is vouched for by the trust document's issuing key instead.
    pub ca_fingerprint: Option<[u8; 32]>,
    pub now: u64,
}

/// An enrollment the device checked: the trust document is the pinned one,
/// the credential is for this device and signed by an issuing key of it.
#[derive(Debug, Clone)]
pub struct VerifiedEnrollment {
    pub enrollment: Enrollment,
    pub trust: VerifiedTrust,
    pub credential: CredentialBody,
}

impl Enrollment {
    pub fn to_bytes(&self) -> Vec<u8> {
        crate::codec::encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnrollError> {
        let what = "enrollment";
        if bytes.len() > MAX_MESSAGE {
            return Err(EnrollError::TooLarge { what, len: bytes.len(), max: MAX_MESSAGE });
        }
        let e: Enrollment =
            crate::codec::decode_exact(bytes).map_err(|detail| EnrollError::Malformed { what, detail })?;
        if e.fleet_urls.is_empty() || e.fleet_urls.len() > MAX_URLS {
            return Err(invalid(what, format!("1 to {MAX_URLS} fleet URLs")));
        }
        if let Some(u) = e.fleet_urls.iter().find(|u| !crate::token::valid_url(u)) {
            return Err(invalid(what, format!("fleet URL '{}'", u.escape_default())));
        }
        if e.ca_der.is_empty() || e.ca_der.len() > MAX_CERT {
            return Err(invalid(what, "fleet CA certificate"));
        }
        if e.user_jwt.is_empty()
            || e.user_jwt.len() > MAX_JWT
            || !e.user_jwt.bytes().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid(what, "user JWT"));
        }
        Ok(e)
    }

    pub fn to_text(&self) -> String {
        to_text(ENROLLMENT_PREFIX, &self.to_bytes())
    }

    pub fn from_text(text: &str) -> Result<Self, EnrollError> {
        Self::from_bytes(&from_text("enrollment", ENROLLMENT_PREFIX, text)?)
    }

    /// SHA-256 of the CA certificate.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.ca_der).into()
    }

    /// Everything the device checks before it stores an enrollment.
    pub fn verify(self, expect: &Expect<'_>) -> Result<VerifiedEnrollment, EnrollError> {
        let now = expect.now;
        self.verify_with(expect, |signed| signed.verify_anchor(now, None))
    }

    /// [`verify`](Self::verify) for a stored enrollment whose own trust
    /// document the device has since rotated past: `current` is the
    /// document the device accepted (by a checked chain). The enrollment's
    /// document is an earlier version of the same org and root, checked by
    /// its root signature only: its expiry is the end of its use for
    /// bundles, not of the enrollment made under it.
    pub fn verify_superseded(
        self,
        expect: &Expect<'_>,
        current: &VerifiedTrust,
    ) -> Result<VerifiedEnrollment, EnrollError> {
        let cur = current.body();
        self.verify_with(expect, |signed| {
            let own = signed.unverified_body();
            if own.org != cur.org {
                return Err(TrustError::OrgMismatch { current: cur.org.clone(), new: own.org.clone() });
            }
            if own.version >= cur.version {
                return Err(TrustError::NotNewer { current: own.version, new: cur.version });
            }
            signed.verify_record(Some(&cur.root_key))
        })
    }

    fn verify_with(
        self,
        expect: &Expect<'_>,
        anchor: impl FnOnce(SignedTrust) -> Result<VerifiedTrust, TrustError>,
    ) -> Result<VerifiedEnrollment, EnrollError> {
        let signed = SignedTrust::parse(&self.trust).map_err(EnrollError::Trust)?;
        if signed.fingerprint() != expect.trust_fingerprint {
            return Err(EnrollError::WrongTrust {
                found: hex::encode(&signed.fingerprint()[..8]),
                expected: hex::encode(&expect.trust_fingerprint[..8]),
            });
        }
        let trust = anchor(signed).map_err(EnrollError::Trust)?;
        let signed_credential = SignedCredential::from_bytes(&self.credential)?;
        let credential = signed_credential.verify(&trust, expect.now)?.clone();
        // The issuing key that signed the credential is the FLEET account's
        // signing key: the user JWT must be its work too (see jwt.rs).
        let issuer = signed_credential.issuer(&trust)?;
        for ca in [Some(credential.ca_fingerprint), expect.ca_fingerprint].into_iter().flatten() {
            if self.ca_fingerprint() != ca {
                return Err(EnrollError::WrongCa {
                    found: hex::encode(&self.ca_fingerprint()[..8]),
                    expected: hex::encode(&ca[..8]),
                });
            }
        }
        if credential.device_id != expect.device_id || credential.device_key != expect.device_key {
            return Err(EnrollError::NotForThisDevice {
                found: format!("device '{}' key {}", credential.device_id, credential.device_key.id()),
                expected: format!("device '{}' key {}", expect.device_id, expect.device_key.id()),
            });
        }
        crate::jwt::check_user_jwt(&self.user_jwt, issuer, &credential.device_key, expect.now)
            .map_err(EnrollError::UserJwt)?;
        Ok(VerifiedEnrollment { enrollment: self, trust, credential })
    }
}

/// Why the provisioner refused a request. The device logs it and, for the
/// kinds a retry cannot fix, stops asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("no proof of possession: the request is not signed by the device key it names")]
    BadPossession,
    #[error("token refused: {0}")]
    Token(String),
    #[error("the token has no uses left")]
    TokenUsedUp,
    #[error("group '{0}' is not allowed by the token")]
    GroupNotAllowed(String),
    #[error("device id '{id}' does not match the token's pattern '{pattern}'")]
    IdNotAllowed { id: String, pattern: String },
    #[error("device id '{0}' is enrolled with another key; an operator must approve re-enrollment (`perch-bootstrap approve {0}`)")]
    KeyMismatch(String),
    #[error("replayed request (its nonce was already used)")]
    Replay,
    #[error("device '{0}' is revoked")]
    Revoked(String),
    #[error("an operator rejected device '{0}'")]
    RejectedByOperator(String),
    #[error("the provisioner failed: {0}")]
    Internal(String),
}

impl Rejection {
    /// Whether asking again (with a fresh nonce) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Rejection::Internal(_) | Rejection::Replay)
    }
}

/// The provisioner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled(Box<Enrollment>),
    /// Waiting for a technician's `approve`; ask again later.
    Pending(String),
    Rejected(Rejection),
}

impl EnrollResponse {
    pub fn to_bytes(&self) -> Vec<u8> {
        crate::codec::encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnrollError> {
        let what = "enrollment response";
        if bytes.len() > MAX_MESSAGE {
            return Err(EnrollError::TooLarge { what, len: bytes.len(), max: MAX_MESSAGE });
        }
        let r: EnrollResponse =
            crate::codec::decode_exact(bytes).map_err(|detail| EnrollError::Malformed { what, detail })?;
        if let EnrollResponse::Enrolled(e) = &r {
            // Re-run the field checks of a standalone enrollment.
            Enrollment::from_bytes(&e.to_bytes())?;
        }
        Ok(r)
    }
}

fn to_text(prefix: &str, bytes: &[u8]) -> String {
    let b32 = BASE32_NOPAD.encode(bytes);
    // 64-character lines, so the file reads and pastes well.
    let mut out = String::with_capacity(prefix.len() + b32.len() + b32.len() / 64 + 2);
    out.push_str(prefix);
    out.push('\n');
    for line in b32.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out
}

fn from_text(what: &'static str, prefix: &'static str, text: &str) -> Result<Vec<u8>, EnrollError> {
    let max = MAX_MESSAGE * 2;
    if text.len() > max {
        return Err(EnrollError::TooLarge { what, len: text.len(), max });
    }
    let rest = text.trim_start().strip_prefix(prefix).ok_or(EnrollError::BadPrefix { what, prefix })?;
    let b32: String = rest.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    BASE32_NOPAD.decode(b32.as_bytes()).map_err(|_| EnrollError::BadEncoding { what })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::org;

    fn request(key: &SecretKey) -> RequestBody {
        RequestBody {
            device_id: "drone-1".into(),
            device_key: key.public(),
            groups: vec![],
            target: "aarch64-drone".into(),
            agent_version: "0.1.0".into(),
            nonce: [5; 16],
            created_at: 100,
            token: Some("PERCH1-ABC".into()),
        }
    }

    #[test]
    fn request_round_trips_and_proves_possession() {
        let key = SecretKey::from_seed(&[9; 32]);
        let r = SignedRequest::sign(request(&key), &key).unwrap();
        let back = SignedRequest::from_text(&r.to_text()).unwrap();
        assert_eq!(back.unverified_body(), r.unverified_body());
        back.verify_possession().unwrap();
        // Someone else's key in the body: the signature no longer proves anything.
        let other = SecretKey::from_seed(&[8; 32]);
        let mut wire: SignedWire = crate::codec::decode_exact(&r.to_bytes()).unwrap();
        let mut body = request(&key);
        body.device_key = other.public();
        wire.body = crate::codec::encode(&body);
        let forged = SignedRequest::from_bytes(&crate::codec::encode(&wire)).unwrap();
        assert_eq!(forged.verify_possession().unwrap_err(), EnrollError::BadPossession);
        assert!(SignedRequest::sign(request(&key), &other).is_err());
    }

    fn enrollment(issuing: &SecretKey, device: &SecretKey, trust: &SignedTrust) -> Enrollment {
        let cred = SignedCredential::issue(
            CredentialBody {
                org: "acme".into(),
                device_id: "drone-1".into(),
                device_key: device.public(),
                groups: vec!["north".into()],
                ca_fingerprint: Sha256::digest([1u8, 2, 3]).into(),
                issued_at: 100,
                expires_at: 1000,
            },
            issuing,
        )
        .unwrap();
        Enrollment {
            credential: cred.to_bytes(),
            user_jwt: crate::jwt::test_user_jwt(issuing, &device.public(), Some(1000)),
            fleet_urls: vec!["tls://127.0.0.1:4222".into()],
            trust: trust.to_bytes(),
            ca_der: vec![1, 2, 3],
        }
    }

    #[test]
    fn enrollment_is_checked_against_the_pins() {
        let issuing = SecretKey::from_seed(&[3; 32]);
        let device = SecretKey::from_seed(&[4; 32]);
        let trust = org(&issuing);
        let e = enrollment(&issuing, &device, &trust);
        let ca: [u8; 32] = Sha256::digest([1u8, 2, 3]).into();
        let expect = Expect {
            device_id: "drone-1",
            device_key: device.public(),
            trust_fingerprint: trust.fingerprint(),
            ca_fingerprint: Some(ca),
            now: 200,
        };
        let back = Enrollment::from_text(&e.to_text()).unwrap();
        assert_eq!(back.clone().verify(&expect).unwrap().credential.groups, vec!["north".to_string()]);
        // Expired credential, wrong device, wrong CA, wrong trust, rogue issuer.
        assert!(matches!(
            back.clone().verify(&Expect { now: 1000, ..expect_copy(&expect) }),
            Err(EnrollError::CredentialExpired { .. })
        ));
        assert!(matches!(
            back.clone().verify(&Expect { device_id: "drone-2", ..expect_copy(&expect) }),
            Err(EnrollError::NotForThisDevice { .. })
        ));
        assert!(matches!(
            back.clone().verify(&Expect { ca_fingerprint: Some([0; 32]), ..expect_copy(&expect) }),
            Err(EnrollError::WrongCa { .. })
        ));
        assert!(matches!(
            back.clone().verify(&Expect { trust_fingerprint: [0; 32], ..expect_copy(&expect) }),
            Err(EnrollError::WrongTrust { .. })
        ));
        let rogue = enrollment(&SecretKey::from_seed(&[7; 32]), &device, &trust);
        assert!(matches!(rogue.verify(&expect), Err(EnrollError::UnknownIssuer(_))));
    }

    #[test]
    fn an_enrollment_with_a_damaged_or_foreign_user_jwt_is_refused() {
        let issuing = SecretKey::from_seed(&[3; 32]);
        let device = SecretKey::from_seed(&[4; 32]);
        let trust = org(&issuing);
        let expect = Expect {
            device_id: "drone-1",
            device_key: device.public(),
            trust_fingerprint: trust.fingerprint(),
            ca_fingerprint: None,
            now: 200,
        };
        let good = enrollment(&issuing, &device, &trust);
        good.clone().verify(&expect).unwrap();
        // One bit flipped anywhere in the JWT.
        for i in 0..good.user_jwt.len() {
            let mut e = good.clone();
            let mut b = e.user_jwt.into_bytes();
            b[i] ^= 0x01;
            e.user_jwt = String::from_utf8(b).unwrap();
            assert!(matches!(e.verify(&expect), Err(EnrollError::UserJwt(_))), "flip at {i} accepted");
        }
        // Signed by a key that did not sign the credential; for another device.
        let mut e = good.clone();
        e.user_jwt = crate::jwt::test_user_jwt(&SecretKey::from_seed(&[7; 32]), &device.public(), Some(1000));
        assert!(matches!(
            e.verify(&expect),
            Err(EnrollError::UserJwt(crate::jwt::JwtError::BadSignature(_)))
        ));
        let mut e = good;
        e.user_jwt =
            crate::jwt::test_user_jwt(&issuing, &SecretKey::from_seed(&[8; 32]).public(), Some(1000));
        assert!(matches!(
            e.verify(&expect),
            Err(EnrollError::UserJwt(crate::jwt::JwtError::WrongSubject { .. }))
        ));
    }

    #[test]
    fn an_enrollment_outlives_its_expired_trust_document_once_rotated_past() {
        let issuing = SecretKey::from_seed(&[3; 32]);
        let device = SecretKey::from_seed(&[4; 32]);
        let root = SecretKey::from_seed(&[1; 32]);
        let version = |v: u64, expires_at: Option<u64>, org: &str, root: &SecretKey| {
            let mut body = crate::testkit::org(&issuing).unverified_body().clone();
            (body.version, body.expires_at, body.org, body.root_key) =
                (v, expires_at, org.into(), root.public());
            SignedTrust::create(body, root).unwrap()
        };
        let v1 = version(1, Some(500), "acme", &root);
        let e = enrollment(&issuing, &device, &v1);
        let expect = Expect {
            device_id: "drone-1",
            device_key: device.public(),
            trust_fingerprint: v1.fingerprint(),
            ca_fingerprint: None,
            now: 600,
        };
        assert!(matches!(e.clone().verify(&expect), Err(EnrollError::Trust(TrustError::Expired { .. }))));
        let v2 = version(2, None, "acme", &root).verify_anchor(600, None).unwrap();
        e.clone().verify_superseded(&expect, &v2).unwrap();
        // Not superseded by another root or org, nor by its own version.
        for other in [
            version(2, None, "acme", &SecretKey::from_seed(&[9; 32])),
            version(2, None, "evil", &root),
            version(1, None, "acme", &root),
        ] {
            let other = other.verify_anchor(600, None).unwrap();
            assert!(matches!(e.clone().verify_superseded(&expect, &other), Err(EnrollError::Trust(_))));
        }
        // Still the rest of the checks: the credential's own expiry.
        assert!(matches!(
            e.verify_superseded(&Expect { now: 1000, ..expect_copy(&expect) }, &v2),
            Err(EnrollError::CredentialExpired { .. })
        ));
    }

    fn expect_copy<'a>(e: &Expect<'a>) -> Expect<'a> {
        Expect {
            device_id: e.device_id,
            device_key: e.device_key,
            trust_fingerprint: e.trust_fingerprint,
            ca_fingerprint: e.ca_fingerprint,
            now: e.now,
        }
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            EnrollResponse::Pending("waiting".into()),
            EnrollResponse::Rejected(Rejection::TokenUsedUp),
            EnrollResponse::Rejected(Rejection::KeyMismatch("d".into())),
        ] {
            assert_eq!(EnrollResponse::from_bytes(&r.to_bytes()).unwrap(), r);
        }
    }

    proptest::proptest! {
        #[test]
        fn hostile_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let _ = SignedRequest::from_bytes(&data);
            let _ = EnrollResponse::from_bytes(&data);
            let _ = Enrollment::from_bytes(&data);
            let _ = SignedCredential::from_bytes(&data);
            let _ = SignedRequest::from_text(&format!("{REQUEST_PREFIX}{}", BASE32_NOPAD.encode(&data)));
        }

        #[test]
        fn any_flipped_request_byte_is_refused_or_harmless(pos in 0usize..2000, mask in 1u8..=255) {
            let key = SecretKey::from_seed(&[9; 32]);
            let mut bytes = SignedRequest::sign(request(&key), &key).unwrap().to_bytes();
            let i = pos % bytes.len();
            bytes[i] ^= mask;
            if let Ok(r) = SignedRequest::from_bytes(&bytes) {
                proptest::prop_assert!(r.verify_possession().is_err());
            }
        }
    }
}
