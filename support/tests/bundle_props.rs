//! Property tests for the bundle format: round trips, and rejection of every
//! kind of damage (flipped bytes, truncation, arbitrary input).

use std::io::{Cursor, Read};

use perch_protocol::bundle::{
    build_linked_chunk, check_archive_payload, verify_stream, BundleError, BundleHead, BundleReader,
    ChunkEntry, Chunking, Format, Manifest, ManifestBuilder, ManifestParams, PayloadKind, Release, Window,
    MAX_WINDOW,
};
use perch_protocol::trust::{SignedTrust, TrustBody, VerifiedTrust};
use perch_protocol::SecretKey;
use perch_support::bundle_file::verify_file;
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

fn trust(n: u8, threshold: u32) -> VerifiedTrust {
    let root = key(200);
    let body = TrustBody {
        org: "acme".into(),
        version: 1,
        issued_at: NOW - 10,
        expires_at: None,
        root_key: root.public(),
        release_keys: (1..=n).map(|i| key(i).public()).collect(),
        threshold,
        issuing_keys: vec![],
    };
    SignedTrust::create(body, &root).unwrap().verify_anchor(NOW, None).unwrap()
}

fn params(chunk_size: u32) -> ManifestParams {
    ManifestParams {
        name: "app".into(),
        counter: 3,
        version: "1.0".into(),
        targets: vec!["aarch64-drone".into()],
        kind: PayloadKind::Image,
        chunk_size,
        created_at: NOW - 5,
        expires_at: None,
        min_agent_version: None,
        allow_downgrade: false,
        allow_setid: false,
        // The format agents in the field read: every test below must keep
        // passing for it. (Format 3 has its own tests.)
        format: Format::V2,
        zstd_level: None,
    }
}

fn build(payload: &[u8], chunk_size: u32, signers: &[u8]) -> Vec<u8> {
    let mut b = ManifestBuilder::new(params(chunk_size)).unwrap();
    b.update(payload);
    let mut head = BundleHead::new(b.finish().unwrap()).unwrap();
    for s in signers {
        head.add_signature(&key(*s)).unwrap();
    }
    let mut out = Vec::new();
    head.write_to(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

/// Verifies `bytes` as a stream (what the device stages from) and as a
/// file on several threads (`perch bundle verify`, `perch-agent check`):
/// the two must agree on every input.
fn verify(bytes: &[u8], trust: &VerifiedTrust) -> Result<Vec<u8>, BundleError> {
    let mut got = Vec::new();
    let streamed = verify_stream(Cursor::new(bytes), trust, NOW, |_, c| {
        got.extend_from_slice(c);
        Ok(())
    });
    let file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut &file, bytes).unwrap();
    let parallel = verify_file(&file, trust, NOW, 3);
    match (&streamed, &parallel) {
        (Ok(a), Ok(b)) => assert_eq!(a.digest(), b.digest()),
        (Err(a), Err(b)) => assert!(b.is_security() == a.is_security(), "stream: {a}; file: {b}"),
        _ => {
            panic!("stream and file verification disagree: {:?} vs {:?}", streamed.is_ok(), parallel.is_ok())
        }
    }
    streamed?;
    Ok(got)
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn every_single_byte_flip_and_every_truncation_is_refused() {
    let t = trust(3, 2);
    let bytes = build(&payload(5000, 1), 1024, &[1, 2, 3]);
    assert_eq!(verify(&bytes, &t).unwrap(), payload(5000, 1));
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            let e = verify(&b, &t).expect_err(&format!("flip {mask:#x} at {i} accepted"));
            assert!(e.is_security(), "flip at {i}: {e}");
        }
    }
    for n in 0..bytes.len() {
        let e = verify(&bytes[..n], &t).expect_err(&format!("truncation to {n} accepted"));
        assert!(e.is_security());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(verify(&longer, &t), Err(BundleError::TrailingData)));
}

#[test]
fn named_failures() {
    let t = trust(3, 2);
    let bytes = build(&payload(5000, 1), 1024, &[1, 2]);
    let head_len = bytes.len() - 5000;
    let mut b = bytes.clone();
    b[head_len + 3 * 1024 + 7] ^= 1;
    assert_eq!(verify(&b, &t).unwrap_err().to_string(), "chunk 3 of 5: sha256 mismatch");
    let mut b = bytes.clone();
    b[8] = 9;
    assert_eq!(
        verify(&b, &t).unwrap_err().to_string(),
        "unsupported bundle format version 9 (this build reads 2 and 3)"
    );
    let one = build(&payload(5000, 1), 1024, &[1]);
    assert_eq!(
        verify(&one, &t).unwrap_err().to_string(),
        "threshold not met: 1 valid signature(s), 2 required"
    );
    let stray = build(&payload(5000, 1), 1024, &[1, 2, 9]);
    assert!(verify(&stray, &t).unwrap_err().to_string().starts_with("signature by unknown key"));
    assert!(verify(b"PERCHXXX", &t).unwrap_err().to_string().contains("bad magic"));
}

/// Counts the bytes a reader takes, to pin how much of a bundle is read
/// before it is refused.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Header + a signature block of `sigs`, claiming a manifest of `manifest_len`.
fn head_claiming(manifest_len: u32, sigs: &[u8]) -> Vec<u8> {
    let mut b = b"PERCHBDL\x02\x00\x00\x00".to_vec();
    b.extend_from_slice(&manifest_len.to_le_bytes());
    b.extend_from_slice(&(sigs.len() as u32).to_le_bytes());
    b.extend_from_slice(sigs);
    b
}

#[test]
fn unsigned_bundle_is_refused_before_its_manifest_is_read() {
    // A bundle claiming the largest manifest, followed by an endless stream:
    // the reader must refuse it having read only the header and signatures.
    let t = trust(1, 1);
    let mut sigs = vec![0x11u8; 32]; // the claimed manifest digest
    sigs.push(0); // no signatures
    let head = head_claiming(perch_protocol::limits::MAX_MANIFEST_LEN, &sigs);
    let mut r = Counting { inner: Cursor::new(head.clone()).chain(std::io::repeat(7)), read: 0 };
    let e = BundleReader::open_verified(&mut r, &t, NOW).err().expect("unsigned bundle accepted");
    assert!(matches!(e, BundleError::Signatures(_)), "{e}");
    assert_eq!(r.read, head.len() as u64);

    // Signed, but by a key the trust document does not list.
    let stranger = build(&payload(100_000, 3), 1024, &[9]);
    let mut r = Counting { inner: Cursor::new(&stranger), read: 0 };
    let e = BundleReader::open_verified(&mut r, &t, NOW).err().expect("stranger's bundle accepted");
    assert!(matches!(e, BundleError::Signatures(_)), "{e}");
    let manifest_len = u32::from_le_bytes(stranger[12..16].try_into().unwrap());
    let sigs_len = u32::from_le_bytes(stranger[16..20].try_into().unwrap());
    assert!(manifest_len > 3000, "the manifest should be the bulk of the head");
    assert_eq!(r.read, 20 + u64::from(sigs_len));
}

#[test]
fn header_claiming_a_longer_manifest_fails_the_signatures() {
    // The manifest length is signed: a validly signed bundle whose header
    // was edited to claim more is refused before the manifest is read.
    let t = trust(1, 1);
    let mut bytes = build(&payload(5000, 1), 1024, &[1]);
    bytes[12..16].copy_from_slice(&perch_protocol::limits::MAX_MANIFEST_LEN.to_le_bytes());
    let sigs_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    let mut r = Counting { inner: Cursor::new(&bytes), read: 0 };
    let e = BundleReader::open_verified(&mut r, &t, NOW).err().expect("edited header accepted");
    assert!(matches!(e, BundleError::Signatures(_)), "{e}");
    assert_eq!(r.read, 20 + u64::from(sigs_len));
}

#[test]
fn manifest_not_matching_its_signed_digest_is_refused() {
    let t = trust(1, 1);
    let bytes = build(&payload(5000, 1), 1024, &[1]);
    let sigs_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let mut b = bytes.clone();
    b[20 + sigs_len + 2] ^= 1;
    assert!(matches!(verify(&b, &t), Err(BundleError::ManifestDigest)));
    // Tools reading the head unverified refuse it too.
    assert!(matches!(BundleReader::open(Cursor::new(&b)).err(), Some(BundleError::ManifestDigest)));
}

#[test]
fn format_1_bundles_are_refused_by_version() {
    let t = trust(1, 1);
    let mut b = build(&payload(5000, 1), 1024, &[1]);
    b[8] = 1;
    let e = verify(&b, &t).unwrap_err();
    assert!(matches!(e, BundleError::UnsupportedVersion(1)), "{e}");
    assert!(e.is_security());
}

/// A signed archive bundle of one 3000-byte file, in 1 KiB chunks.
fn archive_bundle(mode: u32, allow_setid: bool) -> (Vec<u8>, usize) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_size(3000);
    b.append_data(&mut h, "app", &[7u8; 3000][..]).unwrap();
    let tar = b.into_inner().unwrap();
    let mut p = params(1024);
    p.kind = PayloadKind::Archive;
    p.allow_setid = allow_setid;
    let mut m = ManifestBuilder::new(p).unwrap();
    m.update(&tar);
    let mut head = BundleHead::new(m.finish().unwrap()).unwrap();
    head.add_signature(&key(1)).unwrap();
    let mut out = Vec::new();
    head.write_to(&mut out).unwrap();
    let payload_at = out.len();
    out.extend_from_slice(&tar);
    (out, payload_at)
}

#[test]
fn archive_payload_check_uses_the_signed_policy_and_names_bad_chunks() {
    let t = trust(1, 1);
    let check = |bytes: &[u8]| {
        BundleReader::open_verified(Cursor::new(bytes), &t, NOW).and_then(check_archive_payload)
    };
    let (good, _) = archive_bundle(0o755, false);
    check(&good).unwrap();
    let (setid, _) = archive_bundle(0o4755, false);
    let e = check(&setid).unwrap_err();
    assert!(e.is_security() && e.to_string().contains("archive entry `app`: mode 4755"), "{e}");
    let (setid_signed, _) = archive_bundle(0o4755, true);
    check(&setid_signed).unwrap();
    // A damaged chunk is reported as that, not as a malformed archive.
    let (mut bad, at) = archive_bundle(0o755, false);
    bad[at + 1024 + 5] ^= 1;
    assert!(matches!(check(&bad), Err(BundleError::ChunkMismatch { index: 1, .. })));
}

#[test]
fn setid_on_an_image_is_an_invalid_manifest() {
    let mut p = params(1024);
    p.allow_setid = true;
    let mut b = ManifestBuilder::new(p).unwrap();
    b.update(&[1; 10]);
    assert!(matches!(b.finish(), Err(BundleError::InvalidManifest(_))));
}

#[test]
fn expired_bundles_are_refused() {
    let t = trust(1, 1);
    let mut p = params(1024);
    p.expires_at = Some(NOW);
    let mut b = ManifestBuilder::new(p).unwrap();
    b.update(&[1; 10]);
    let mut head = BundleHead::new(b.finish().unwrap()).unwrap();
    head.add_signature(&key(1)).unwrap();
    let mut out = Vec::new();
    head.write_to(&mut out).unwrap();
    out.extend_from_slice(&[1; 10]);
    assert!(matches!(verify(&out, &t), Err(BundleError::Expired { .. })));
}

#[test]
fn signing_twice_adds_nothing() {
    let mut b = ManifestBuilder::new(params(1024)).unwrap();
    b.update(&[0; 100]);
    let mut head = BundleHead::new(b.finish().unwrap()).unwrap();
    assert!(head.add_signature(&key(1)).unwrap());
    assert!(!head.add_signature(&key(1)).unwrap());
    assert_eq!(head.signatures().len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn round_trip(len in 1usize..20_000, chunk in prop::sample::select(vec![1024u32, 1500, 4096]), seed: u8) {
        let t = trust(2, 2);
        let p = payload(len, seed);
        let bytes = build(&p, chunk, &[2, 1]);
        prop_assert_eq!(verify(&bytes, &t).unwrap(), p);
        let reader = BundleReader::open(Cursor::new(&bytes)).unwrap();
        let m = reader.head().unverified_manifest();
        prop_assert_eq!(m.payload_len(), len as u64);
        prop_assert_eq!(m.chunk_count() as usize, len.div_ceil(chunk as usize));
    }

    #[test]
    fn any_corruption_is_refused(len in 1usize..6000, at: prop::sample::Index, mask in 1u8..=255, cut: prop::sample::Index) {
        let t = trust(2, 1);
        let bytes = build(&payload(len, 7), 1024, &[1]);
        let mut flipped = bytes.clone();
        let i = at.index(bytes.len());
        flipped[i] ^= mask;
        prop_assert!(verify(&flipped, &t).is_err());
        let n = cut.index(bytes.len());
        prop_assert!(verify(&bytes[..n], &t).is_err());
    }

    #[test]
    fn arbitrary_input_never_panics(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let t = trust(1, 1);
        let _ = verify(&data, &t);
        let mut with_magic = b"PERCHBDL\x02\x00\x00\x00".to_vec();
        with_magic.extend_from_slice(&data);
        let _ = verify(&with_magic, &t);
        let _ = SignedTrust::parse(&data);
        let mut trust_magic = b"PERCHTRU\x01\x00\x00\x00".to_vec();
        trust_magic.extend_from_slice(&data);
        let _ = SignedTrust::parse(&trust_magic);
    }

    #[test]
    fn hostile_lengths_are_bounded(a: u32, b: u32) {
        // Huge declared section lengths with nothing behind them must fail
        // fast, without allocating what they claim.
        let mut bytes = b"PERCHBDL\x02\x00\x00\x00".to_vec();
        bytes.extend_from_slice(&a.to_le_bytes());
        bytes.extend_from_slice(&b.to_le_bytes());
        let e = verify(&bytes, &trust(1, 1)).unwrap_err();
        prop_assert!(e.is_security());
    }
}

/// A reader that fails on any read past `limit` bytes.
struct Fence<'a> {
    bytes: &'a [u8],
    pos: usize,
    limit: usize,
}

impl Read for Fence<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.bytes.len() - self.pos);
        if n > 0 && self.pos + n > self.limit {
            return Err(std::io::Error::other(format!("read past the fence at {}", self.limit)));
        }
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn claimed_digest_reads_no_byte_of_the_manifest() {
    let payload = payload(3000, 4);
    let bytes = build(&payload, 1024, &[1]);
    let head = BundleReader::open(&bytes[..]).unwrap().verify(&trust(1, 1), NOW).unwrap().into_manifest();
    let before_manifest = bytes.len() - payload.len() - head.manifest_bytes().len();
    let fence = Fence { bytes: &bytes, pos: 0, limit: before_manifest };
    assert_eq!(perch_protocol::bundle::claimed_digest(fence).unwrap(), head.digest());
    // A manifest section of junk (it would not decode) is never looked at.
    let mut junk = bytes.clone();
    junk[before_manifest..bytes.len() - payload.len()].fill(0xff);
    assert_eq!(perch_protocol::bundle::claimed_digest(&junk[..]).unwrap(), head.digest());
    assert!(BundleReader::open(&junk[..]).is_err());
}

/// A format-3 bundle of `payload`, each chunk zstd-compressed at `level`
/// where that makes it smaller, signed by `signers`.
fn build_v3(payload: &[u8], chunk_size: u32, signers: &[u8], level: Option<i32>) -> Vec<u8> {
    let mut b =
        ManifestBuilder::new(ManifestParams { format: Format::V3, zstd_level: level, ..params(chunk_size) })
            .unwrap();
    b.update(payload);
    let mut stored = b.take_stored();
    let (m, last) = b.finish_stored().unwrap();
    stored.extend_from_slice(&last);
    signed(m, signers, &stored)
}

fn signed(m: Manifest, signers: &[u8], stored: &[u8]) -> Vec<u8> {
    let mut head = BundleHead::new(m).unwrap();
    for s in signers {
        head.add_signature(&key(*s)).unwrap();
    }
    let mut out = Vec::new();
    head.write_to(&mut out).unwrap();
    out.extend_from_slice(stored);
    out
}

fn release() -> Release {
    Release {
        name: "app".into(),
        counter: 3,
        version: "1.0".into(),
        targets: vec![],
        kind: PayloadKind::Image,
        created_at: NOW - 5,
        expires_at: None,
        min_agent_version: None,
        allow_downgrade: false,
        allow_setid: false,
    }
}

#[test]
fn a_compressed_bundle_is_smaller_and_gives_back_its_payload() {
    let t = trust(1, 1);
    // Compressible: a few distinct runs.
    let p: Vec<u8> = (0..100_000u32).map(|i| (i / 1000) as u8).collect();
    let bytes = build_v3(&p, 4096, &[1], Some(3));
    assert!(bytes.len() < p.len() / 4, "{} bytes for {}", bytes.len(), p.len());
    assert_eq!(verify(&bytes, &t).unwrap(), p);
    let m = BundleReader::open(Cursor::new(&bytes)).unwrap().head().unverified_manifest().clone();
    assert_eq!((m.format(), m.payload_len()), (Format::V3, 100_000));
    assert!(m.chunks().iter().all(ChunkEntry::is_compressed));
    assert_eq!(m.payload_sha256(), None);
}

#[test]
fn a_format_2_signature_does_not_verify_as_format_3() {
    let t = trust(1, 1);
    let mut bytes = build(&payload(3000, 1), 1024, &[1]);
    bytes[8] = 3;
    assert!(verify(&bytes, &t).unwrap_err().is_security());
}

/// A signed compressed chunk whose signed sizes lie: refused, for security,
/// before any byte of it reaches the sink (the slot).
#[test]
fn compressed_chunks_whose_signed_sizes_lie_are_refused_before_a_write() {
    let t = trust(1, 1);
    let data = vec![5u8; 8192];
    let frame = zstd::bulk::compress(&data, 3).unwrap();
    let sha = |b: &[u8]| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(b).into()
    };
    let fixed = Chunking::Fixed { size: 8192 };
    let cases: Vec<(&str, ChunkEntry, Vec<u8>)> = vec![
        // Decompresses to more than it says.
        (
            "longer",
            ChunkEntry::Zstd {
                stored_hash: sha(&frame),
                stored_len: frame.len() as u32,
                hash: sha(&data[..8000]),
                len: 8000,
            },
            frame.clone(),
        ),
        // To less.
        (
            "shorter",
            ChunkEntry::Zstd {
                stored_hash: sha(&frame),
                stored_len: frame.len() as u32,
                hash: sha(&data),
                len: 8192 + 1,
            },
            frame.clone(),
        ),
        // Two frames, each the right size.
        (
            "two frames",
            ChunkEntry::Zstd {
                stored_hash: sha(&[frame.clone(), frame.clone()].concat()),
                stored_len: 2 * frame.len() as u32,
                hash: sha(&data),
                len: 8192,
            },
            [frame.clone(), frame.clone()].concat(),
        ),
        // Not zstd at all.
        (
            "not a frame",
            ChunkEntry::Zstd { stored_hash: sha(&data[..100]), stored_len: 100, hash: sha(&data), len: 8192 },
            data[..100].to_vec(),
        ),
    ];
    for (what, entry, stored) in cases {
        let chunking = if entry.len() == 8192 { fixed } else { Chunking::Fixed { size: entry.len() } };
        let m = Manifest::from_parts(release(), Format::V3, chunking, vec![entry], None).unwrap();
        let bytes = signed(m, &[1], &stored);
        let mut written = 0;
        let e = verify_stream(Cursor::new(&bytes), &t, NOW, |_, _| {
            written += 1;
            Ok(())
        })
        .expect_err(what);
        assert!(e.is_security(), "{what}: {e}");
        assert_eq!(written, 0, "{what}: a chunk reached the sink");
        assert!(verify(&bytes, &t).unwrap_err().is_security(), "{what}: the file check");
    }
}

/// Random bytes from a seed (xorshift): incompressible by themselves.
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `payload` in `chunk`-byte chunks, each built with [`build_linked_chunk`]
/// against the `window` bytes before it (0: independent frames): the
/// manifest's chunks and the stored bytes.
fn linked_parts(payload: &[u8], chunk: usize, window: u32) -> (Vec<ChunkEntry>, Vec<u8>) {
    chained_parts(payload, chunk, window, usize::MAX)
}

/// [`linked_parts`], with linking starting afresh every `chain` bytes (as
/// `perch bundle build --compress-chain` does).
fn chained_parts(payload: &[u8], chunk: usize, window: u32, chain: usize) -> (Vec<ChunkEntry>, Vec<u8>) {
    let (mut entries, mut stored) = (Vec::new(), Vec::new());
    for (i, raw) in payload.chunks(chunk).enumerate() {
        let start = i * chunk;
        let from = start.saturating_sub(window as usize).max(start / chain * chain);
        let prefix = &payload[from..start];
        let window = if from == start / chain * chain && from > 0 { prefix.len() as u32 } else { window };
        let (entry, z) = build_linked_chunk(raw, Some(3), window, prefix).unwrap();
        entries.push(entry);
        stored.extend_from_slice(z.as_deref().unwrap_or(raw));
    }
    (entries, stored)
}

fn linked_bundle(entries: Vec<ChunkEntry>, stored: &[u8], chunk: u32) -> Vec<u8> {
    let m =
        Manifest::from_parts(release(), Format::V3, Chunking::Fixed { size: chunk }, entries, None).unwrap();
    signed(m, &[1], stored)
}

/// What linking is for: a chunk that repeats bytes from before it (another
/// copy of a library in an image, say) costs almost nothing, where an
/// independent frame cannot see the first copy.
#[test]
fn linked_chunks_refer_back_and_give_back_their_payload() {
    let t = trust(1, 1);
    let block = noise(64 * 1024, 7);
    let p: Vec<u8> = block.iter().cycle().take(8 * block.len()).copied().collect();
    let (alone, alone_stored) = linked_parts(&p, 16 * 1024, 0);
    let (linked, linked_stored) = linked_parts(&p, 16 * 1024, 128 * 1024);
    assert!(alone.iter().all(|c| c.window() == 0));
    // The first copy is noise either way; every later chunk refers back.
    assert!(linked[4..].iter().all(|c| c.window() == 128 * 1024), "{linked:?}");
    assert!(
        linked_stored.len() * 4 < alone_stored.len(),
        "{} vs {}",
        linked_stored.len(),
        alone_stored.len()
    );
    let bytes = linked_bundle(linked, &linked_stored, 16 * 1024);
    assert_eq!(verify(&bytes, &t).unwrap(), p);
}

/// A payload in several chains verifies the same on a stream (in order)
/// and as a file (each chain on its own worker), and a damaged chunk in
/// any chain is refused by both.
#[test]
fn a_bundle_in_chains_verifies_a_chain_per_worker() {
    let t = trust(1, 1);
    let block = noise(64 * 1024, 11);
    let p: Vec<u8> = block.iter().cycle().take(8 * block.len()).copied().collect();
    let (entries, stored) = chained_parts(&p, 16 * 1024, 128 * 1024, 128 * 1024);
    let bytes = linked_bundle(entries.clone(), &stored, 16 * 1024);
    let m = BundleReader::open(Cursor::new(&bytes)).unwrap().head().unverified_manifest().clone();
    assert_eq!(m.chain_starts(), [0, 8, 16, 24]);
    assert_eq!(verify(&bytes, &t).unwrap(), p);
    // One byte of each chain's last chunk: refused, whichever worker has it.
    let head = bytes.len() - stored.len();
    for chain_end in [7u32, 15, 23, 31] {
        let mut b = bytes.clone();
        b[head + m.stored_offset(chain_end) as usize + 3] ^= 0x20;
        let e = verify(&b, &t).expect_err("a damaged chunk");
        assert!(e.is_security(), "chunk {chain_end}: {e}");
    }
}

/// A linked chunk decoded against anything but the checked chunks just
/// before it is refused, and nothing reaches the sink.
#[test]
fn a_linked_chunk_is_decoded_only_against_the_checked_chunks_before_it() {
    let t = trust(1, 1);
    let block = noise(32 * 1024, 9);
    let p: Vec<u8> = [block.clone(), block.clone()].concat();
    // Chunk 1 was compressed against a prefix that is not chunk 0: its
    // stored hash is signed, the bytes it decodes to are not chunk 1.
    let (mut entries, mut stored) = linked_parts(&p, 32 * 1024, 32 * 1024);
    let mut other = block.clone();
    other.rotate_left(1000);
    let (entry, z) = build_linked_chunk(&block, Some(3), 32 * 1024, &other).unwrap();
    let z = z.unwrap();
    let ChunkEntry::ZstdLinked { stored_hash, stored_len, window, .. } = entry else { panic!("{entry:?}") };
    entries[1] =
        ChunkEntry::ZstdLinked { window, stored_hash, stored_len, hash: *entries[1].hash(), len: 32 * 1024 };
    stored.truncate(32 * 1024);
    stored.extend_from_slice(&z);
    let bytes = linked_bundle(entries, &stored, 32 * 1024);
    let mut written = Vec::new();
    let e = verify_stream(Cursor::new(&bytes), &t, NOW, |i, _| {
        written.push(i);
        Ok(())
    })
    .unwrap_err();
    assert!(e.is_security(), "{e}");
    assert_eq!(written, [0], "only chunk 0 was checked");
    assert!(verify(&bytes, &t).unwrap_err().is_security());

    // Through the API: a window that does not reach back far enough, or
    // is fed out of order, is an error, never a decode without its bytes.
    let (entries, stored) = linked_parts(&p, 32 * 1024, 32 * 1024);
    let bytes = linked_bundle(entries, &stored, 32 * 1024);
    let mut b = BundleReader::open(Cursor::new(&bytes)).unwrap().verify(&t, NOW).unwrap();
    let m = b.manifest().clone();
    let _ = b.read_unchecked(Vec::new()).unwrap().unwrap();
    let one = b.read_unchecked(Vec::new()).unwrap().unwrap();
    let perch_protocol::bundle::Checked::Linked(one) = m.check(one).unwrap() else { panic!("not linked") };
    let mut late = Window::starting_at(m.manifest(), 1);
    let mut decoder = perch_protocol::bundle::Decoder::default();
    assert!(matches!(
        m.decode_linked(one, &mut late, &mut decoder),
        Err(BundleError::NoWindow { index: 1, .. })
    ));
    let mut w = Window::starting_at(m.manifest(), 0);
    let c1 = m.check_written(1, block.clone()).ok().unwrap();
    assert!(matches!(w.push(&c1), Err(BundleError::NoWindow { index: 1, .. })));
}

#[test]
fn a_linked_chunk_names_a_window_within_bounds() {
    let z = |window| ChunkEntry::ZstdLinked {
        window,
        stored_hash: [1; 32],
        stored_len: 10,
        hash: [2; 32],
        len: 4096,
    };
    let fixed = Chunking::Fixed { size: 4096 };
    for bad in [0, MAX_WINDOW + 1, u32::MAX] {
        let e = Manifest::from_parts(release(), Format::V3, fixed, vec![z(bad)], None).unwrap_err();
        assert!(e.contains("window"), "{e}");
    }
    assert!(Manifest::from_parts(release(), Format::V3, fixed, vec![z(MAX_WINDOW)], None).is_ok());
    assert!(Manifest::from_parts(release(), Format::V2, fixed, vec![z(1)], Some([0; 32])).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn format_3_round_trips_and_refuses_any_flip(
        len in 1usize..20_000,
        runs in 1u32..64,
        level in prop::option::of(1i32..6),
        at: prop::sample::Index,
        mask in 1u8..=255,
    ) {
        let t = trust(1, 1);
        let p: Vec<u8> = (0..len as u32).map(|i| (i / runs) as u8).collect();
        let bytes = build_v3(&p, 1024, &[1], level);
        prop_assert_eq!(verify(&bytes, &t).unwrap(), p);
        let mut b = bytes.clone();
        let i = at.index(b.len());
        b[i] ^= mask;
        prop_assert!(verify(&b, &t).unwrap_err().is_security());
    }

    /// Linked chunks: any payload of repeated noise, chunk size and window
    /// round-trips through both readers, and any flipped byte is refused.
    #[test]
    fn linked_chunks_round_trip_and_refuse_any_flip(
        block in 64usize..4096,
        copies in 1usize..8,
        chunk in 1024usize..4096,
        window in 1u32..16_384,
        at: prop::sample::Index,
        mask in 1u8..=255,
    ) {
        let t = trust(1, 1);
        let p: Vec<u8> = noise(block, 3).into_iter().cycle().take(block * copies + 1).collect();
        let (entries, stored) = linked_parts(&p, chunk, window);
        let bytes = linked_bundle(entries, &stored, chunk as u32);
        prop_assert_eq!(verify(&bytes, &t).unwrap(), p);
        let mut b = bytes.clone();
        let i = at.index(b.len());
        b[i] ^= mask;
        prop_assert!(verify(&b, &t).unwrap_err().is_security());
    }
}
