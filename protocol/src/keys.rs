//! Ed25519 keys, key ids and their text encodings.
//!
//! Key files are one line of text so they can be pasted, diffed and checked
//! by eye: `perch-ed25519-public <64 hex>` and `perch-ed25519-secret <64 hex>`.

use core::fmt;

use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PUBLIC_TAG: &str = "perch-ed25519-public";
const SECRET_TAG: &str = "perch-ed25519-secret";

/// Errors from parsing key text or key bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("expected a '{expected}' line")]
    WrongTag { expected: &'static str },
    #[error("key is not 64 hex digits")]
    BadHex,
    #[error("bytes are not a valid ed25519 public key")]
    InvalidPoint,
}

/// SHA-256 of the 32 public key bytes. Shown shortened (16 hex digits), stored in full.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// The full id as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// An ed25519 public key. In JSON (a message's readable form) it is 64
/// hex digits; in postcard, the key's 32 bytes as before.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.to_bytes()))
        } else {
            s.serialize_newtype_struct("PublicKey", &self.0)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            let bytes =
                crate::digest_from_hex(&text).ok_or_else(|| D::Error::custom("expected 64 hex digits"))?;
            PublicKey::from_bytes(&bytes).map_err(D::Error::custom)
        } else {
            #[derive(Deserialize)]
            struct Raw(ed25519_dalek::VerifyingKey);
            Raw::deserialize(d).map(|r| PublicKey(r.0))
        }
    }
}

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes).map(Self).map_err(|_| KeyError::InvalidPoint)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn id(&self) -> KeyId {
        KeyId(Sha256::digest(self.0.as_bytes()).into())
    }

    /// Strict verification (rejects small-order keys and malleable signatures).
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &Signature) -> bool {
        let signed = domain_separated(context, message);
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(&signed, &sig).is_ok()
    }

    /// The one-line text form written to `.pub` files.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", hex::encode(self.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = parse_tagged(text, PUBLIC_TAG)?;
        Self::from_bytes(&bytes)
    }
}

impl PublicKey {
    /// The key in NATS's nkey text form for a user (`U...`): the device key
    /// is also the device's NATS user nkey.
    pub fn nats_user(&self) -> String {
        self.nkey(20 << 3)
    }

    /// The key in nkey text form for an account (`A...`): the org's issuing
    /// key is also the FLEET account's signing key, the issuer of device JWTs.
    pub fn nats_account(&self) -> String {
        self.nkey(0)
    }

    fn nkey(&self, prefix: u8) -> String {
        // nkeys: base32(prefix byte | 32 key bytes | CRC-16/XMODEM little-endian).
        let mut raw = Vec::with_capacity(35);
        raw.push(prefix);
        raw.extend_from_slice(&self.to_bytes());
        let crc = crc16_xmodem(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        data_encoding::BASE32_NOPAD.encode(&raw)
    }
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

/// A 64-byte ed25519 signature, kept as plain bytes so that a malformed one
/// is a verification failure rather than a parse failure.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                <[u8; 64]>::try_from(v).map(Signature).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..8]))
    }
}

/// One signature in a signature list, with the id of the key that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub key_id: KeyId,
    pub signature: Signature,
}

/// Checks a signature list against a set of listed keys.
///
/// Every entry must come from a listed key, verify, and appear once: a stray,
/// broken or repeated signature is an error even when enough good ones exist,
/// so that any damage to a signed file is noticed. Returns the signers.
pub fn check_signatures(
    entries: &[SignatureEntry],
    listed: &[PublicKey],
    threshold: u32,
    context: &[u8],
    message: &[u8],
) -> Result<Vec<KeyId>, SignatureCheckError> {
    let mut signers: Vec<KeyId> = Vec::with_capacity(entries.len());
    for entry in entries {
        if signers.contains(&entry.key_id) {
            return Err(SignatureCheckError::Duplicate(entry.key_id));
        }
        let key = listed
            .iter()
            .find(|k| k.id() == entry.key_id)
            .ok_or(SignatureCheckError::UnknownKey(entry.key_id))?;
        if !key.verify(context, message, &entry.signature) {
            return Err(SignatureCheckError::BadSignature(entry.key_id));
        }
        signers.push(entry.key_id);
    }
    if signers.len() < threshold as usize {
        return Err(SignatureCheckError::ThresholdNotMet { valid: signers.len(), required: threshold });
    }
    Ok(signers)
}

/// Why a signature list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureCheckError {
    #[error("signature by unknown key {0}")]
    UnknownKey(KeyId),
    #[error("bad signature by key {0}")]
    BadSignature(KeyId),
    #[error("two signatures by key {0}")]
    Duplicate(KeyId),
    #[error("threshold not met: {valid} valid signature(s), {required} required")]
    ThresholdNotMet { valid: usize, required: u32 },
}

/// An ed25519 secret key. Never serialized except to its own key file.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// Builds a key from 32 bytes of OS randomness supplied by the caller
    /// (this crate does no I/O, so it cannot ask the OS itself).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, context: &[u8], message: &[u8]) -> Signature {
        Signature(self.0.sign(&domain_separated(context, message)).to_bytes())
    }

    /// Signs a NATS server's connect nonce, raw (without a perch context),
    /// as NATS requires of the device key in its role as user nkey. Only a
    /// nonce that looks like one (at most 64 base64url characters) is signed,
    /// so a hostile server cannot get a perch-context message signed this
    /// way: every perch context contains '/'.
    pub fn sign_nats_nonce(&self, nonce: &[u8]) -> Option<[u8; 64]> {
        let plausible = !nonce.is_empty()
            && nonce.len() <= 64
            && nonce.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_' || *c == b'=');
        plausible.then(|| self.0.sign(nonce).to_bytes())
    }

    /// The one-line text form written to `.key` files (mode 0600).
    pub fn to_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        parse_tagged(text, SECRET_TAG).map(|seed| Self::from_seed(&seed))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().id())
    }
}

/// Signatures cover `context || message`, so a signature made for one kind of
/// document can never be replayed as another kind.
fn domain_separated(context: &[u8], message: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(context.len() + message.len());
    v.extend_from_slice(context);
    v.extend_from_slice(message);
    v
}

fn parse_tagged(text: &str, tag: &'static str) -> Result<[u8; 32], KeyError> {
    let mut words = text.split_whitespace();
    if words.next() != Some(tag) {
        return Err(KeyError::WrongTag { expected: tag });
    }
    let hex_part = words.next().ok_or(KeyError::BadHex)?;
    if words.next().is_some() {
        return Err(KeyError::BadHex);
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| KeyError::BadHex)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_key_is_its_32_bytes_in_postcard_and_hex_in_json() {
        let pk = SecretKey::from_seed(&[7; 32]).public();
        let wire = postcard::to_allocvec(&pk).unwrap();
        // What the derived impl wrote: a byte string (length, then bytes).
        assert_eq!(wire, [&[32u8][..], &pk.to_bytes()].concat());
        assert_eq!(postcard::from_bytes::<PublicKey>(&wire).unwrap(), pk);
        let json = serde_json::to_value(pk).unwrap();
        assert_eq!(json, hex::encode(pk.to_bytes()));
        assert_eq!(serde_json::from_value::<PublicKey>(json).unwrap(), pk);
        assert!(serde_json::from_value::<PublicKey>("ab".into()).is_err());
    }

    #[test]
    fn text_round_trip_and_sign() {
        let sk = SecretKey::from_seed(&[7; 32]);
        let back = SecretKey::from_text(&sk.to_text()).unwrap();
        assert_eq!(back.public(), sk.public());
        let pk = PublicKey::from_text(&sk.public().to_text()).unwrap();
        let sig = sk.sign(b"ctx", b"msg");
        assert!(pk.verify(b"ctx", b"msg", &sig));
        assert!(!pk.verify(b"ctx2", b"msg", &sig));
        assert!(!pk.verify(b"ctx", b"msh", &sig));
        assert_eq!(pk.id().to_string().len(), 16);
    }

    proptest::proptest! {
        #[test]
        fn key_text_never_panics(s in "\\PC{0,200}") {
            let _ = PublicKey::from_text(&s);
            let _ = SecretKey::from_text(&s);
        }

        #[test]
        fn key_text_round_trips(seed: [u8; 32]) {
            let sk = SecretKey::from_seed(&seed);
            proptest::prop_assert_eq!(PublicKey::from_text(&sk.public().to_text()).unwrap(), sk.public());
        }
    }

    #[test]
    fn nats_user_key_matches_nkeys() {
        let seed = [11u8; 32];
        let nk = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, seed).unwrap();
        let sk = SecretKey::from_seed(&seed);
        assert_eq!(sk.public().nats_user(), nk.public_key());
        let sig = sk.sign_nats_nonce(b"abcDEF-_12").unwrap();
        nk.verify(b"abcDEF-_12", &sig).unwrap();
        assert!(sk.sign_nats_nonce(b"perch/enroll-request/v1\0x").is_none());
        assert!(sk.sign_nats_nonce(b"").is_none());
    }

    #[test]
    fn rejects_swapped_and_garbled_files() {
        let sk = SecretKey::from_seed(&[1; 32]);
        assert!(PublicKey::from_text(&sk.to_text()).is_err());
        assert!(SecretKey::from_text(&sk.public().to_text()).is_err());
        assert_eq!(PublicKey::from_text("perch-ed25519-public zz").unwrap_err(), KeyError::BadHex);
    }
}
