//! Decompressing a chunk whose stored bytes already matched their signed
//! hash, into a buffer of exactly its signed length: a frame that would
//! produce more fails in the decoder (it never writes past the buffer), one
//! that produces less fails here. Only signed bytes reach the decoder.
//!
//! zstd (libzstd through the `zstd` crate, no legacy formats): see the
//! architecture notes for why this one and what it costs the agent.

/// The `len` bytes `stored` decompresses to, with `prefix` as its zstd
/// prefix (for a linked chunk, the written bytes before it, from a
/// [`Window`](super::Window); else empty), or why it does not.
pub(super) fn chunk(stored: &[u8], len: usize, prefix: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(len);
    let mut d = zstd::zstd_safe::DCtx::create();
    if !prefix.is_empty() {
        d.ref_prefix(prefix).map_err(zstd_error)?;
    }
    let n = d.decompress(&mut out, stored).map_err(zstd_error)?;
    if n != len || out.len() != len {
        return Err(format!("{n} bytes, not {len}"));
    }
    Ok(out)
}

fn zstd_error(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_accepted_only_at_exactly_its_signed_length() {
        let data = vec![7u8; 10_000];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(chunk(&frame, 10_000, &[]).unwrap(), data);
        // Says less than it produces: the decoder stops at the buffer.
        assert!(chunk(&frame, 9_999, &[]).is_err());
        // Says more than it produces.
        assert!(chunk(&frame, 10_001, &[]).is_err());
        // Two frames back to back make 20,000 bytes: over the buffer.
        let two = [frame.clone(), frame.clone()].concat();
        assert!(chunk(&two, 10_000, &[]).is_err());
        // Not a frame at all, and a cut one.
        assert!(chunk(&data, 10_000, &[]).is_err());
        assert!(chunk(&frame[..frame.len() - 1], 10_000, &[]).is_err());
    }
}
