//! The device's NATS user JWT, checked before an enrollment is stored or used.
//!
//! A NATS JWT is `base64url(header) "." base64url(claims) "." base64url(sig)`,
//! the signature plain ed25519 (no perch domain separation) over the first
//! two parts. Which key must have signed it: `perch-bootstrap init` makes the
//! org's issuing key the FLEET account's signing key, and the device
//! credential names the issuing key that signed it (one the root-signed trust
//! document lists). So the JWT's issuer must be that same key; nothing the
//! device has not already verified decides who may sign its NATS identity.

use data_encoding::BASE64URL_NOPAD;
use serde::Deserialize;

use crate::keys::Signature;
use crate::PublicKey;

/// The only algorithm NATS and perch sign user JWTs with.
const ALGORITHM: &str = "ed25519-nkey";

/// Why a user JWT was refused. Every variant is a security rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("algorithm '{0}' (expected {ALGORITHM})")]
    Algorithm(String),
    #[error("signature does not verify with the issuing key {0} that signed the credential")]
    BadSignature(String),
    #[error("issuer is {found}, not the issuing key {expected} that signed the credential")]
    WrongIssuer { found: String, expected: String },
    #[error("is for NATS user {found}, not this device's key {expected}")]
    WrongSubject { found: String, expected: String },
    #[error("is a '{0}' JWT, not a user JWT")]
    NotUser(String),
    #[error("has no expiry")]
    NoExpiry,
    #[error("expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    nats: NatsClaims,
}

#[derive(Deserialize)]
struct NatsClaims {
    #[serde(rename = "type")]
    kind: String,
}

/// Checks that `jwt` is a user JWT for `device` (its subject), signed by
/// `issuer` (and naming it as issuer), and not expired at `now`. The
/// signature is checked before the claims are read.
pub fn check_user_jwt(jwt: &str, issuer: &PublicKey, device: &PublicKey, now: u64) -> Result<(), JwtError> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(claims), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    // What NATS signed: the header and claims text, as received.
    let signed = &jwt[..header.len() + 1 + claims.len()];
    let decode =
        |part: &str, what| BASE64URL_NOPAD.decode(part.as_bytes()).map_err(|_| JwtError::Malformed(what));
    let header: Header = serde_json::from_slice(&decode(header, "header is not base64url")?)
        .map_err(|_| JwtError::Malformed("header is not a JWT header"))?;
    if header.alg != ALGORITHM {
        return Err(JwtError::Algorithm(
            header.alg.chars().take(32).collect::<String>().escape_default().to_string(),
        ));
    }
    let sig: [u8; 64] = decode(sig, "signature is not base64url")?
        .try_into()
        .map_err(|_| JwtError::Malformed("signature is not 64 bytes"))?;
    // An empty context: NATS signs the bare text, not a perch message.
    if !issuer.verify(b"", signed.as_bytes(), &Signature(sig)) {
        return Err(JwtError::BadSignature(issuer.nats_account()));
    }
    let claims: Claims = serde_json::from_slice(&decode(claims, "claims are not base64url")?)
        .map_err(|_| JwtError::Malformed("claims are not NATS JWT claims"))?;
    let short = |s: &str| s.chars().take(64).collect::<String>().escape_default().to_string();
    if claims.iss != issuer.nats_account() {
        return Err(JwtError::WrongIssuer { found: short(&claims.iss), expected: issuer.nats_account() });
    }
    if claims.sub != device.nats_user() {
        return Err(JwtError::WrongSubject { found: short(&claims.sub), expected: device.nats_user() });
    }
    if claims.nats.kind != "user" {
        return Err(JwtError::NotUser(short(&claims.nats.kind)));
    }
    let exp = claims.exp.ok_or(JwtError::NoExpiry)?;
    if now >= exp {
        return Err(JwtError::Expired { exp, now });
    }
    Ok(())
}

/// A user JWT as `perch-bootstrap` issues it, for tests.
#[cfg(test)]
pub(crate) fn test_user_jwt(issuer: &crate::SecretKey, device: &PublicKey, exp: Option<u64>) -> String {
    let mut claims = serde_json::json!({
        "jti": "X", "iat": 1, "iss": issuer.public().nats_account(), "sub": device.nats_user(), "name": "drone-1",
        "nats": { "type": "user", "version": 2, "pub": { "allow": ["a"] }, "sub": { "allow": ["b"] } },
    });
    if let Some(e) = exp {
        claims["exp"] = serde_json::json!(e);
    }
    let b64 = |b: &[u8]| BASE64URL_NOPAD.encode(b);
    let input =
        format!("{}.{}", b64(crate::token::JWT_HEADER.as_bytes()), b64(claims.to_string().as_bytes()));
    // An empty context signs the bare text, as nkeys does.
    let sig = issuer.sign(b"", input.as_bytes());
    format!("{input}.{}", b64(&sig.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    const ISSUER: [u8; 32] = [3; 32];

    fn keys() -> (PublicKey, PublicKey) {
        (SecretKey::from_seed(&ISSUER).public(), SecretKey::from_seed(&[4; 32]).public())
    }

    fn issuer_key() -> SecretKey {
        SecretKey::from_seed(&ISSUER)
    }

    #[test]
    fn account_nkey_matches_nkeys() {
        let kp = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::Account, ISSUER).unwrap();
        assert_eq!(keys().0.nats_account(), kp.public_key());
    }

    #[test]
    fn a_user_jwt_checks_issuer_signature_subject_and_expiry() {
        let (issuer, device) = keys();
        let jwt = test_user_jwt(&issuer_key(), &device, Some(1000));
        check_user_jwt(&jwt, &issuer, &device, 999).unwrap();
        assert_eq!(
            check_user_jwt(&jwt, &issuer, &device, 1000),
            Err(JwtError::Expired { exp: 1000, now: 1000 })
        );
        let other = SecretKey::from_seed(&[7; 32]).public();
        assert!(matches!(check_user_jwt(&jwt, &other, &device, 1), Err(JwtError::BadSignature(_))));
        assert!(matches!(check_user_jwt(&jwt, &issuer, &other, 1), Err(JwtError::WrongSubject { .. })));
        let forever = test_user_jwt(&issuer_key(), &device, None);
        assert_eq!(check_user_jwt(&forever, &issuer, &device, 1), Err(JwtError::NoExpiry));
        // Signed by the right key, but claiming another issuer.
        let kp = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::Account, ISSUER).unwrap();
        let claims = serde_json::json!({ "iss": other.nats_account(), "sub": device.nats_user(), "exp": 9, "nats": { "type": "user" } });
        let input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(crate::token::JWT_HEADER.as_bytes()),
            BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let forged = format!("{input}.{}", BASE64URL_NOPAD.encode(&kp.sign(input.as_bytes()).unwrap()));
        assert!(matches!(check_user_jwt(&forged, &issuer, &device, 1), Err(JwtError::WrongIssuer { .. })));
    }

    #[test]
    fn every_flipped_bit_of_a_user_jwt_is_refused() {
        let (issuer, device) = keys();
        let jwt = test_user_jwt(&issuer_key(), &device, Some(1000)).into_bytes();
        for i in 0..jwt.len() {
            for bit in 0..8 {
                let mut b = jwt.clone();
                b[i] ^= 1 << bit;
                let Ok(text) = std::str::from_utf8(&b) else { continue };
                let r = check_user_jwt(text, &issuer, &device, 1);
                assert!(r.is_err(), "flip of bit {bit} at {i} accepted");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn hostile_jwt_text_never_panics(s in "[A-Za-z0-9_.-]{0,400}") {
            let (issuer, device) = keys();
            proptest::prop_assert!(check_user_jwt(&s, &issuer, &device, 1).is_err());
        }
    }
}
