//! Bytes that read as text in JSON and stay raw bytes in postcard.
//!
//! The wire messages are postcard, where a digest is 32 bytes. Their JSON
//! form (what `schemas/wire` describes, and what a person or a Choria-side
//! tool reads) shows the same digest as 64 hex digits, and a byte string
//! as base64. Serde's `is_human_readable` tells the two apart, so the
//! postcard bytes are exactly those of the plain types: no format change
//! on the wire.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `#[serde(with = "crate::readable")]` for `[u8; N]` (N ≤ 32): hex.
pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error>
where
    [u8; N]: Serialize,
{
    if s.is_human_readable() {
        s.serialize_str(&hex::encode(bytes))
    } else {
        bytes.serialize(s)
    }
}

pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error>
where
    [u8; N]: Deserialize<'de>,
{
    if d.is_human_readable() {
        let text = String::deserialize(d)?;
        let mut out = [0u8; N];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| D::Error::custom(format!("expected {} hex digits", 2 * N)))?;
        Ok(out)
    } else {
        <[u8; N]>::deserialize(d)
    }
}

/// The same for `Option<[u8; 32]>`.
pub mod option {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct Hex(#[serde(with = "super")] [u8; 32]);

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        v.map(Hex).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        Ok(Option::<Hex>::deserialize(d)?.map(|h| h.0))
    }
}

/// `#[serde(with = "crate::readable::base64")]` for `Vec<u8>`: standard
/// base64 in JSON.
pub mod base64 {
    use data_encoding::BASE64;

    use super::*;

    pub fn serialize<S: Serializer>(v: &Vec<u8>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&BASE64.encode(v))
        } else {
            v.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            BASE64.decode(text.as_bytes()).map_err(|_| D::Error::custom("expected base64"))
        } else {
            Vec::<u8>::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        a: [u8; 32],
        b: Option<[u8; 32]>,
        c: [u8; 16],
        d: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Hexed {
        #[serde(with = "super")]
        a: [u8; 32],
        #[serde(with = "super::option")]
        b: Option<[u8; 32]>,
        #[serde(with = "super")]
        c: [u8; 16],
        #[serde(with = "super::base64")]
        d: Vec<u8>,
    }

    #[test]
    fn postcard_bytes_are_unchanged_and_json_is_hex() {
        for b in [None, Some([9u8; 32])] {
            let plain = Plain { a: [1; 32], b, c: [2; 16], d: vec![0, 255, 7] };
            let hexed = Hexed { a: [1; 32], b, c: [2; 16], d: vec![0, 255, 7] };
            let wire = postcard::to_allocvec(&hexed).unwrap();
            assert_eq!(wire, postcard::to_allocvec(&plain).unwrap());
            assert_eq!(postcard::from_bytes::<Hexed>(&wire).unwrap(), hexed);
            let json = serde_json::to_value(&hexed).unwrap();
            assert_eq!(json["a"], hex::encode([1u8; 32]));
            assert_eq!(json["c"], hex::encode([2u8; 16]));
            assert_eq!(json["d"], "AP8H");
            assert_eq!(json["b"], b.map(hex::encode).map_or(serde_json::Value::Null, Into::into));
            assert_eq!(serde_json::from_value::<Hexed>(json).unwrap(), hexed);
        }
        let bad = serde_json::json!({"a": "zz", "b": null, "c": hex::encode([2u8; 16]), "d": ""});
        assert!(serde_json::from_value::<Hexed>(bad).is_err());
    }
}
