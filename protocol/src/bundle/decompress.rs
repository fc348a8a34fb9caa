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

/// A decoding context kept from chunk to chunk: making one per chunk
/// (about 160 KB, cleared) was 3.5 % of a compressed install's CPU.
pub struct Decoder(zstd::zstd_safe::DCtx<'static>);

impl Default for Decoder {
    fn default() -> Self {
        Decoder(zstd::zstd_safe::DCtx::create())
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

/// The first bytes of a zstd dictionary. Handed to libzstd as a
/// dictionary, a prefix starting with them would be parsed as one, not
/// taken as plain bytes.
const DICTIONARY_MAGIC: [u8; 4] = 0xEC30_A437u32.to_le_bytes();

impl Decoder {
    /// Decodes `stored` against `prefix` (plain bytes, as `chunk` takes
    /// them) into exactly `out`, or says why not.
    pub(super) fn decode(&mut self, stored: &[u8], prefix: &[u8], out: &mut [u8]) -> Result<(), String> {
        let n = if prefix.starts_with(&DICTIONARY_MAGIC) {
            // Rare: such a prefix goes the way `chunk` takes it, as a
            // reference that is never parsed.
            let mut d = zstd::zstd_safe::DCtx::create();
            d.ref_prefix(prefix).map_err(zstd_error)?;
            d.decompress(out, stored).map_err(zstd_error)?
        } else {
            // Bytes that do not start with the magic are taken as plain
            // content, exactly as a prefix is (`ZSTD_decompress_usingDict`).
            self.0.decompress_using_dict(out, stored, prefix).map_err(zstd_error)?
        };
        if n != out.len() {
            return Err(format!("{n} bytes, not {}", out.len()));
        }
        Ok(())
    }
}

/// Whether `stored` is exactly one zstd frame that carries a content
/// checksum (the XXH64 of what it decodes to, which libzstd compares while
/// decoding, failing the frame on a mismatch). `perch bundle build` sets it
/// on every frame and decodes each frame back to its chunk before signing,
/// so on a device such a frame's output is what the signer checked: an
/// installer need not hash it again.
pub(super) fn is_one_checksummed_frame(stored: &[u8]) -> bool {
    const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
    // The frame header descriptor's bit 2 is Content_Checksum_flag.
    stored.get(..4) == Some(&MAGIC[..])
        && stored.get(4).is_some_and(|descriptor| descriptor & 0x04 != 0)
        && zstd::zstd_safe::find_frame_compressed_size(stored) == Ok(stored.len())
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

    fn with_checksum(data: &[u8]) -> Vec<u8> {
        use zstd::zstd_safe::{CCtx, CParameter};
        let mut c = CCtx::create();
        c.set_parameter(CParameter::ChecksumFlag(true)).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        c.compress2(&mut out, data).unwrap();
        out
    }

    #[test]
    fn only_one_whole_frame_with_a_content_checksum_counts_as_checksummed() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let plain = zstd::bulk::compress(&data, 3).unwrap();
        let summed = with_checksum(&data);
        assert!(!is_one_checksummed_frame(&plain));
        assert!(is_one_checksummed_frame(&summed));
        // A second frame behind it (which the decoder would also decode).
        assert!(!is_one_checksummed_frame(&[summed.clone(), plain.clone()].concat()));
        assert!(!is_one_checksummed_frame(&summed[..summed.len() - 1]));
        assert!(!is_one_checksummed_frame(&[]));
        assert!(!is_one_checksummed_frame(&data));
    }

    #[test]
    fn a_kept_decoder_gives_what_a_fresh_one_does_whatever_the_prefix() {
        let data: Vec<u8> = (0..60_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let mut d = Decoder::default();
        // A prefix that starts like a dictionary, one that does not, and none.
        let mut magic = DICTIONARY_MAGIC.to_vec();
        magic.extend_from_slice(&data[..20_000]);
        for prefix in [&magic[..], &data[..30_000], &[][..]] {
            let mut c = zstd::zstd_safe::CCtx::create();
            let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
            if !prefix.is_empty() {
                c.ref_prefix(prefix).unwrap();
            }
            c.compress2(&mut frame, &data).unwrap();
            let mut out = vec![0; data.len()];
            d.decode(&frame, prefix, &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(chunk(&frame, data.len(), prefix).unwrap(), data);
            // One byte short, or one over: refused.
            assert!(d.decode(&frame, prefix, &mut out[..data.len() - 1]).is_err());
            let mut over = vec![0; data.len() + 1];
            assert!(d.decode(&frame, prefix, &mut over).is_err());
        }
    }

    #[test]
    fn a_damaged_checksum_fails_the_frame() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut summed = with_checksum(&data);
        assert_eq!(chunk(&summed, data.len(), &[]).unwrap(), data);
        let last = summed.len() - 1;
        summed[last] ^= 1;
        let e = chunk(&summed, data.len(), &[]).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
    }
}
