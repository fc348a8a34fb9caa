//! Framing shared by every perch file: a fixed 20-byte header followed by two
//! length-delimited sections, and canonical postcard decoding.
//!
//! ```text
//! magic [8] | format version u16 LE | reserved u16 (0) | len A u32 LE | len B u32 LE
//! ```

use serde::de::DeserializeOwned;

pub(crate) const HEADER_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub version: u16,
    pub len_a: u32,
    pub len_b: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    BadMagic,
    Reserved,
}

pub(crate) fn encode_header(magic: &[u8; 8], version: u16, len_a: u32, len_b: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&len_a.to_le_bytes());
    h[16..20].copy_from_slice(&len_b.to_le_bytes());
    h
}

pub(crate) fn decode_header(magic: &[u8; 8], h: &[u8; HEADER_LEN]) -> Result<Frame, FrameError> {
    if &h[..8] != magic {
        return Err(FrameError::BadMagic);
    }
    if h[10..12] != [0, 0] {
        return Err(FrameError::Reserved);
    }
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Ok(Frame { version: u16::from_le_bytes([h[8], h[9]]), len_a: u32_at(12), len_b: u32_at(16) })
}

/// Decodes exactly one value; trailing bytes are an error, so every value has
/// one encoding and a signature over the bytes is a signature over the value.
pub(crate) fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(format!("{} unexpected trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding of an in-memory struct is infallible")
}
