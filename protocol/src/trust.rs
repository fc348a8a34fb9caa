//! The org trust document: which release keys sign bundles (k of n), which
//! provisioner keys issue credentials, signed by the org root key.
//!
//! ```text
//! header (magic "PERCHTRU", format 1, body len, signatures len)
//! body        postcard TrustBody
//! signatures  postcard TrustSignatures { root, rotation: [(key id, sig)] }
//! ```
//!
//! Version N+1 is accepted over version N only when the org root signed it
//! *and* a threshold of version N's release keys signed it too (rotation
//! signatures). A device never accepts a lower or equal version.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{self, FrameError, HEADER_LEN};
use crate::keys::{check_signatures, SignatureCheckError, SignatureEntry};
use crate::limits::{MAX_LABEL_LEN, MAX_SIGNATURES, MAX_SIGNATURES_LEN, MAX_TRUST_BODY_LEN, MAX_TRUST_KEYS};
use crate::{KeyId, PublicKey, SecretKey};

pub const TRUST_MAGIC: &[u8; 8] = b"PERCHTRU";
pub const TRUST_FORMAT_VERSION: u16 = 1;
/// Largest possible encoded trust document, for callers reading one from disk.
pub const MAX_TRUST_FILE_LEN: usize = HEADER_LEN + MAX_TRUST_BODY_LEN as usize + MAX_SIGNATURES_LEN as usize;
const CONTEXT: &[u8] = b"perch/trust-document/v1\0";

/// What the trust document says. Only reachable unchecked through
/// [`SignedTrust::unverified_body`]; checked code uses [`VerifiedTrust`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBody {
    pub org: String,
    pub version: u64,
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    pub root_key: PublicKey,
    pub release_keys: Vec<PublicKey>,
    pub threshold: u32,
    pub issuing_keys: Vec<PublicKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TrustSignatures {
    root: crate::keys::Signature,
    rotation: Vec<SignatureEntry>,
}

/// Why a trust document was refused. Every variant is a security rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("trust document truncated")]
    Truncated,
    #[error("not a perch trust document (bad magic)")]
    BadMagic,
    #[error("unsupported trust document format version {0} (this build reads {TRUST_FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("trust document header: reserved bytes are not zero")]
    Reserved,
    #[error("trust document {section} is {len} bytes, over the {max}-byte limit")]
    TooLarge { section: &'static str, len: u32, max: u32 },
    #[error("trust document {section} is malformed: {detail}")]
    Malformed { section: &'static str, detail: String },
    #[error("trust document has {0} unexpected trailing bytes")]
    TrailingData(usize),
    #[error("trust document is invalid: {0}")]
    Invalid(String),
    #[error("trust document root signature does not verify")]
    BadRootSignature,
    #[error("trust document root key {found} is not the pinned root key {pinned}")]
    RootMismatch { found: KeyId, pinned: KeyId },
    #[error("trust document expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("trust document version {new} is not newer than the current version {current}")]
    NotNewer { current: u64, new: u64 },
    #[error("trust document is for org '{new}', not '{current}'")]
    OrgMismatch { current: String, new: String },
    #[error("trust rotation: {0}")]
    Rotation(SignatureCheckError),
    #[error("root key does not match the trust document's root key")]
    WrongRootKey,
}

/// A parsed trust document whose signatures have not been checked yet.
#[derive(Debug, Clone)]
pub struct SignedTrust {
    body_bytes: Vec<u8>,
    body: TrustBody,
    sigs: TrustSignatures,
}

impl SignedTrust {
    /// Creates and root-signs a new document.
    pub fn create(body: TrustBody, root: &SecretKey) -> Result<Self, TrustError> {
        validate(&body)?;
        if root.public() != body.root_key {
            return Err(TrustError::WrongRootKey);
        }
        let body_bytes = codec::encode(&body);
        let sigs = TrustSignatures { root: root.sign(CONTEXT, &body_bytes), rotation: Vec::new() };
        Ok(Self { body_bytes, body, sigs })
    }

    /// Parses the encoded document. Checks structure only, not signatures.
    pub fn parse(bytes: &[u8]) -> Result<Self, TrustError> {
        let header: &[u8; HEADER_LEN] =
            bytes.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(TrustError::Truncated)?;
        let frame = codec::decode_header(TRUST_MAGIC, header).map_err(|e| match e {
            FrameError::BadMagic => TrustError::BadMagic,
            FrameError::Reserved => TrustError::Reserved,
        })?;
        if frame.version != TRUST_FORMAT_VERSION {
            return Err(TrustError::UnsupportedVersion(frame.version));
        }
        if frame.len_a > MAX_TRUST_BODY_LEN {
            return Err(TrustError::TooLarge { section: "body", len: frame.len_a, max: MAX_TRUST_BODY_LEN });
        }
        if frame.len_b > MAX_SIGNATURES_LEN {
            return Err(TrustError::TooLarge {
                section: "signatures",
                len: frame.len_b,
                max: MAX_SIGNATURES_LEN,
            });
        }
        let rest = &bytes[HEADER_LEN..];
        let (body_len, sigs_len) = (frame.len_a as usize, frame.len_b as usize);
        if rest.len() < body_len + sigs_len {
            return Err(TrustError::Truncated);
        }
        if rest.len() > body_len + sigs_len {
            return Err(TrustError::TrailingData(rest.len() - body_len - sigs_len));
        }
        let body_bytes = rest[..body_len].to_vec();
        let body: TrustBody = codec::decode_exact(&body_bytes)
            .map_err(|detail| TrustError::Malformed { section: "body", detail })?;
        let sigs: TrustSignatures = codec::decode_exact(&rest[body_len..])
            .map_err(|detail| TrustError::Malformed { section: "signatures", detail })?;
        if sigs.rotation.len() > MAX_SIGNATURES {
            return Err(TrustError::Invalid(format!("more than {MAX_SIGNATURES} rotation signatures")));
        }
        validate(&body)?;
        Ok(Self { body_bytes, body, sigs })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let sigs = codec::encode(&self.sigs);
        let mut out = Vec::with_capacity(HEADER_LEN + self.body_bytes.len() + sigs.len());
        out.extend_from_slice(&codec::encode_header(
            TRUST_MAGIC,
            TRUST_FORMAT_VERSION,
            len_u32(self.body_bytes.len()),
            len_u32(sigs.len()),
        ));
        out.extend_from_slice(&self.body_bytes);
        out.extend_from_slice(&sigs);
        out
    }

    /// What the document claims, before any signature has been checked.
    /// Fit for display only.
    pub fn unverified_body(&self) -> &TrustBody {
        &self.body
    }

    /// SHA-256 of the body: what tokens and devices pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.body_bytes).into()
    }

    /// Adds a rotation signature by one of the *previous* version's release
    /// keys. Signing twice with the same key changes nothing; returns whether
    /// a signature was added.
    pub fn add_rotation_signature(&mut self, key: &SecretKey) -> bool {
        let key_id = key.public().id();
        if self.sigs.rotation.iter().any(|e| e.key_id == key_id) {
            return false;
        }
        let signature = key.sign(CONTEXT, &self.body_bytes);
        self.sigs.rotation.push(SignatureEntry { key_id, signature });
        true
    }

    pub fn rotation_signers(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.sigs.rotation.iter().map(|e| e.key_id)
    }

    /// Accepts this document as a trust anchor: the root signature verifies,
    /// it has not expired, and (if given) its root key is the pinned one.
    pub fn verify_anchor(
        self,
        now: u64,
        pinned_root: Option<&PublicKey>,
    ) -> Result<VerifiedTrust, TrustError> {
        if let Some(pinned) = pinned_root {
            if *pinned != self.body.root_key {
                return Err(TrustError::RootMismatch { found: self.body.root_key.id(), pinned: pinned.id() });
            }
        }
        self.verify_root(now)
    }

    /// Accepts this document as the successor of `current`.
    pub fn verify_rotation(self, current: &VerifiedTrust, now: u64) -> Result<VerifiedTrust, TrustError> {
        let cur = current.body();
        if self.body.org != cur.org {
            return Err(TrustError::OrgMismatch { current: cur.org.clone(), new: self.body.org.clone() });
        }
        if self.body.version <= cur.version {
            return Err(TrustError::NotNewer { current: cur.version, new: self.body.version });
        }
        check_signatures(&self.sigs.rotation, &cur.release_keys, cur.threshold, CONTEXT, &self.body_bytes)
            .map_err(TrustError::Rotation)?;
        self.verify_root(now)
    }

    /// Accepts a document this device accepted before (its own record in
    /// its state directory): the root signature and, if given, the pinned
    /// root key. Not the expiry: an expired record still names the release
    /// keys a successor must be signed by; the document in use is checked
    /// for expiry on its own.
    pub fn verify_record(self, pinned_root: Option<&PublicKey>) -> Result<VerifiedTrust, TrustError> {
        let issued_at = self.body.issued_at;
        // At its own issue time no document has expired (validate() holds
        // expires_at > issued_at), so only the signature and the pin decide.
        self.verify_anchor(issued_at, pinned_root)
    }

    fn verify_root(self, now: u64) -> Result<VerifiedTrust, TrustError> {
        if !self.body.root_key.verify(CONTEXT, &self.body_bytes, &self.sigs.root) {
            return Err(TrustError::BadRootSignature);
        }
        if let Some(expires_at) = self.body.expires_at {
            if now >= expires_at {
                return Err(TrustError::Expired { expires_at, now });
            }
        }
        let fingerprint = self.fingerprint();
        Ok(VerifiedTrust { body: self.body, fingerprint })
    }
}

/// A trust document whose root signature (and rotation, where it applies)
/// has been checked. The only way to get one is through [`SignedTrust`].
#[derive(Debug, Clone)]
pub struct VerifiedTrust {
    body: TrustBody,
    fingerprint: [u8; 32],
}

impl VerifiedTrust {
    pub fn body(&self) -> &TrustBody {
        &self.body
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub fn release_keys(&self) -> &[PublicKey] {
        &self.body.release_keys
    }

    pub fn threshold(&self) -> u32 {
        self.body.threshold
    }
}

/// The highest trust version a device has accepted, as recorded in its
/// state directory next to a copy of that document (`STATE/trust-version`).
/// One line of text:
///
/// ```text
/// perch-trust-version 1 version=N fingerprint=<64 hex> root=<64 hex> check=<8 hex>
/// ```
///
/// `fingerprint` is the accepted document's; `root` is the id of its root
/// key, so a newer document can still be pinned to the org's root if the
/// copy of the document is lost. `check` is the first 4 bytes of the SHA-256
/// of the line before ` check=`: a flipped digit in the version would
/// otherwise read as another valid floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustFloor {
    pub version: u64,
    pub fingerprint: [u8; 32],
    pub root: KeyId,
}

const FLOOR_TAG: &str = "perch-trust-version 1";
/// Longest valid record: the tag, a u64, two 64-digit hex fields and the check.
pub const MAX_FLOOR_TEXT: usize = 256;

/// Why a trust-version record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FloorError {
    #[error("trust version record is over {MAX_FLOOR_TEXT} bytes")]
    TooLarge,
    #[error("trust version record is malformed: {0}")]
    Malformed(&'static str),
}

impl TrustFloor {
    pub fn of(trust: &VerifiedTrust) -> Self {
        Self {
            version: trust.body().version,
            fingerprint: trust.fingerprint(),
            root: trust.body().root_key.id(),
        }
    }

    pub fn to_text(&self) -> String {
        let line = format!(
            "{FLOOR_TAG} version={} fingerprint={} root={}",
            self.version,
            hex::encode(self.fingerprint),
            self.root.to_hex()
        );
        format!("{line} check={}\n", floor_check(&line))
    }

    /// Parses exactly what [`to_text`](Self::to_text) writes; anything else
    /// (a torn write, a flipped bit in the tag or a hex digit) is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, FloorError> {
        if bytes.len() > MAX_FLOOR_TEXT {
            return Err(FloorError::TooLarge);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| FloorError::Malformed("not UTF-8"))?;
        let text = text.strip_suffix('\n').ok_or(FloorError::Malformed("no final newline"))?;
        let (line, check) = text.rsplit_once(" check=").ok_or(FloorError::Malformed("check= missing"))?;
        if check != floor_check(line) {
            return Err(FloorError::Malformed("check does not match (damaged)"));
        }
        let rest =
            line.strip_prefix(FLOOR_TAG).ok_or(FloorError::Malformed("not a perch trust version record"))?;
        let mut fields = rest.split(' ');
        let (Some(""), Some(v), Some(f), Some(r), None) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(FloorError::Malformed("expected version=, fingerprint= and root="));
        };
        let v = v.strip_prefix("version=").ok_or(FloorError::Malformed("version= missing"))?;
        // u64's FromStr takes a leading '+': one byte string, one meaning.
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || (v.len() > 1 && v.starts_with('0')) {
            return Err(FloorError::Malformed("version is not a number"));
        }
        let version: u64 = v.parse().map_err(|_| FloorError::Malformed("version is not a number"))?;
        if version == 0 {
            return Err(FloorError::Malformed("version 0"));
        }
        let hex32 = |field: &str, name: &'static str| -> Result<[u8; 32], FloorError> {
            let h = field.strip_prefix(name).ok_or(FloorError::Malformed("fingerprint= or root= missing"))?;
            // Lower case only, as written.
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(FloorError::Malformed("hex in upper case"));
            }
            crate::digest_from_hex(h).ok_or(FloorError::Malformed("not 64 hex digits"))
        };
        let fingerprint = hex32(f, "fingerprint=")?;
        let root = KeyId(hex32(r, "root=")?);
        Ok(Self { version, fingerprint, root })
    }
}

fn floor_check(line: &str) -> String {
    hex::encode(&Sha256::digest(line.as_bytes())[..4])
}

fn validate(body: &TrustBody) -> Result<(), TrustError> {
    let invalid = |m: String| Err(TrustError::Invalid(m));
    if body.org.is_empty() || body.org.len() > MAX_LABEL_LEN || body.org.chars().any(char::is_control) {
        return invalid(format!("org name must be 1..={MAX_LABEL_LEN} printable characters"));
    }
    if body.version == 0 {
        return invalid("version must be at least 1".into());
    }
    for (field, keys) in [("release_keys", &body.release_keys), ("issuing_keys", &body.issuing_keys)] {
        if keys.len() > MAX_TRUST_KEYS {
            return invalid(format!("more than {MAX_TRUST_KEYS} {field}"));
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].contains(k) {
                return invalid(format!("{field} lists key {} twice", k.id()));
            }
        }
    }
    if body.release_keys.is_empty() {
        return invalid("no release keys".into());
    }
    if body.threshold == 0 || body.threshold as usize > body.release_keys.len() {
        return invalid(format!(
            "threshold {} must be between 1 and the number of release keys ({})",
            body.threshold,
            body.release_keys.len()
        ));
    }
    if matches!(body.expires_at, Some(e) if e <= body.issued_at) {
        return invalid("expires before it was issued".into());
    }
    Ok(())
}

fn len_u32(n: usize) -> u32 {
    // Lengths are bounded by validate() and MAX_SIGNATURES far below u32::MAX.
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn body(version: u64, root: &SecretKey, release: &[&SecretKey], threshold: u32) -> TrustBody {
        TrustBody {
            org: "acme".into(),
            version,
            issued_at: 1000,
            expires_at: Some(10_000),
            root_key: root.public(),
            release_keys: release.iter().map(|k| k.public()).collect(),
            threshold,
            issuing_keys: vec![],
        }
    }

    #[test]
    fn round_trip_and_anchor() {
        let root = key(1);
        let doc = SignedTrust::create(body(1, &root, &[&key(2), &key(3)], 2), &root).unwrap();
        let bytes = doc.to_bytes();
        let parsed = SignedTrust::parse(&bytes).unwrap();
        assert_eq!(parsed.to_bytes(), bytes);
        let v = parsed.clone().verify_anchor(2000, Some(&root.public())).unwrap();
        assert_eq!(v.threshold(), 2);
        assert!(matches!(parsed.clone().verify_anchor(10_000, None), Err(TrustError::Expired { .. })));
        assert!(matches!(
            parsed.verify_anchor(2000, Some(&key(9).public())),
            Err(TrustError::RootMismatch { .. })
        ));
    }

    #[test]
    fn rotation_needs_threshold_of_previous_keys() {
        let root = key(1);
        let (a, b, c) = (key(2), key(3), key(4));
        let v1 = SignedTrust::create(body(1, &root, &[&a, &b, &c], 2), &root)
            .unwrap()
            .verify_anchor(2000, None)
            .unwrap();
        let d = key(5);
        let mut v2 = SignedTrust::create(body(2, &root, &[&b, &c, &d], 2), &root).unwrap();
        assert!(matches!(
            v2.clone().verify_rotation(&v1, 2000),
            Err(TrustError::Rotation(SignatureCheckError::ThresholdNotMet { valid: 0, required: 2 }))
        ));
        assert!(v2.add_rotation_signature(&a));
        assert!(!v2.add_rotation_signature(&a), "same key twice adds nothing");
        assert!(v2.clone().verify_rotation(&v1, 2000).is_err());
        let mut stray = v2.clone();
        stray.add_rotation_signature(&d);
        assert!(matches!(
            stray.verify_rotation(&v1, 2000),
            Err(TrustError::Rotation(SignatureCheckError::UnknownKey(_)))
        ));
        v2.add_rotation_signature(&c);
        let v2 = SignedTrust::parse(&v2.to_bytes()).unwrap().verify_rotation(&v1, 2000).unwrap();
        assert_eq!(v2.body().version, 2);
        // Never back to an older or equal version.
        let again = SignedTrust::create(body(2, &root, &[&a], 1), &root).unwrap();
        assert!(matches!(again.verify_rotation(&v2, 2000), Err(TrustError::NotNewer { .. })));
    }

    #[test]
    fn rejects_bad_thresholds_and_duplicates() {
        let root = key(1);
        assert!(SignedTrust::create(body(1, &root, &[&key(2)], 2), &root).is_err());
        assert!(SignedTrust::create(body(1, &root, &[&key(2)], 0), &root).is_err());
        assert!(SignedTrust::create(body(1, &root, &[&key(2), &key(2)], 1), &root).is_err());
        assert!(matches!(
            SignedTrust::create(body(1, &root, &[&key(2)], 1), &key(7)),
            Err(TrustError::WrongRootKey)
        ));
    }

    #[test]
    fn an_expired_record_still_verifies_as_a_record_but_not_as_an_anchor() {
        let root = key(1);
        let doc = SignedTrust::create(body(1, &root, &[&key(2)], 1), &root).unwrap();
        assert!(doc.clone().verify_anchor(20_000, None).is_err());
        doc.clone().verify_record(Some(&root.public())).unwrap();
        assert!(matches!(doc.verify_record(Some(&key(9).public())), Err(TrustError::RootMismatch { .. })));
    }

    #[test]
    fn trust_floor_round_trips_and_refuses_every_flip_and_truncation() {
        let floor = TrustFloor { version: 42, fingerprint: [0xab; 32], root: KeyId([7; 32]) };
        let text = floor.to_text();
        assert_eq!(TrustFloor::parse(text.as_bytes()), Ok(floor));
        for n in 0..text.len() {
            assert!(TrustFloor::parse(&text.as_bytes()[..n]).is_err(), "truncation at {n} accepted");
        }
        for i in 0..text.len() {
            for bit in 0..8 {
                let mut b = text.clone().into_bytes();
                b[i] ^= 1 << bit;
                assert!(TrustFloor::parse(&b).is_err(), "flip of bit {bit} at {i} accepted");
            }
        }
        // Leading '+' or zeros, upper-case hex: refused even with a matching check.
        let with_check = |line: &str| format!("{line} check={}\n", floor_check(line));
        let fp = hex::encode([0xab; 32]);
        let root = hex::encode([7; 32]);
        for line in [
            format!("{FLOOR_TAG} version=+42 fingerprint={fp} root={root}"),
            format!("{FLOOR_TAG} version=042 fingerprint={fp} root={root}"),
            format!("{FLOOR_TAG} version=0 fingerprint={fp} root={root}"),
            format!("{FLOOR_TAG} version=42 fingerprint={} root={root}", fp.to_uppercase()),
            format!("{FLOOR_TAG} version=42 fingerprint={fp} root={root} extra=1"),
        ] {
            assert!(TrustFloor::parse(with_check(&line).as_bytes()).is_err(), "{line}");
        }
        assert!(TrustFloor::parse(
            with_check(&format!("{FLOOR_TAG} version=42 fingerprint={fp} root={root}")).as_bytes()
        )
        .is_ok());
    }

    proptest::proptest! {
        #[test]
        fn trust_floor_parse_never_panics_and_round_trips(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(f) = TrustFloor::parse(&data) {
                let text = f.to_text();
                proptest::prop_assert_eq!(text.as_bytes(), &data[..]);
            }
        }

        #[test]
        fn trust_floor_text_round_trips(version in 1u64.., fp: [u8; 32], root: [u8; 32]) {
            let f = TrustFloor { version, fingerprint: fp, root: KeyId(root) };
            proptest::prop_assert_eq!(TrustFloor::parse(f.to_text().as_bytes()), Ok(f));
        }
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_refused() {
        let root = key(1);
        let bytes = SignedTrust::create(body(1, &root, &[&key(2)], 1), &root).unwrap().to_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let r = SignedTrust::parse(&b).and_then(|d| d.verify_anchor(2000, None));
            assert!(r.is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(SignedTrust::parse(&bytes[..n]).is_err(), "truncation at {n} accepted");
        }
    }
}
