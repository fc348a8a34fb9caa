//! The records of an outbox segment file, framed so that a damaged record
//! can be skipped without losing the ones after it:
//!
//! ```text
//! record = magic F5 70 72 01 | len u32 LE | crc32 u32 LE of body | body
//! body   = postcard (seq u64, index u32, payload bytes)
//! ```
//!
//! The magic marks where a record starts: after a damaged stretch the
//! reader resynchronises on the next magic whose record checks out, so a
//! flipped length byte cannot swallow the rest of the file. `index` counts
//! the records of the segment from 0, so a skipped stretch says how many
//! records it held. Records written before the magic existed (`len | crc |
//! postcard (seq, payload)`) are still read at the start of a file: their
//! length's high byte is always 0, the magic's never is.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::MAX_RECORD;

pub(super) const MAGIC: [u8; 4] = [0xF5, b'p', b'r', 0x01];
const HEADER: usize = 12;
const LEGACY_HEADER: usize = 8;
/// The largest body: a payload of [`MAX_RECORD`] and its postcard framing.
const MAX_BODY: usize = MAX_RECORD + 32;

#[derive(Serialize)]
struct BodyRef<'a> {
    seq: u64,
    index: u32,
    payload: &'a [u8],
}

#[derive(Deserialize)]
struct Body {
    seq: u64,
    index: u32,
    payload: Vec<u8>,
}

#[derive(Deserialize)]
struct LegacyBody {
    seq: u64,
    payload: Vec<u8>,
}

/// One record as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// A stretch of a segment that held no record that checks out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub bytes: u64,
    /// Records it cost: exact when a good record follows (from the
    /// indexes), else the record starts seen in it (at least 1).
    pub records: u64,
    /// Nothing good follows it in the file.
    pub tail: bool,
}

/// What a segment holds.
#[derive(Debug, Default)]
pub struct Scan {
    pub records: Vec<Record>,
    /// The good records' bytes, in order.
    pub kept: Vec<Range<usize>>,
    pub damage: Vec<Damage>,
    /// The index the next record appended gets.
    pub next_index: u32,
}

impl Scan {
    /// Whether the good records are all at the start (damage, if any, only
    /// at the end: cutting the file repairs it).
    pub fn is_prefix(&self) -> bool {
        self.damage.iter().all(|d| d.tail)
    }

    /// Bytes the good prefix covers.
    pub fn prefix_len(&self) -> u64 {
        self.kept.last().map_or(0, |r| r.end as u64)
    }
}

/// One record, framed.
pub fn frame(seq: u64, index: u32, payload: &[u8]) -> Result<Vec<u8>, postcard::Error> {
    let body = postcard::to_allocvec(&BodyRef { seq, index, payload })?;
    let mut frame = Vec::with_capacity(HEADER + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crate::checksum::crc32(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The body of the frame at `at` (header `header` bytes), if its length
/// and CRC check out; and where the frame ends.
fn body_at(bytes: &[u8], at: usize, header: usize) -> Option<(&[u8], usize)> {
    let len = u32_at(bytes, at + header - 8)? as usize;
    let crc = u32_at(bytes, at + header - 4)?;
    if len > MAX_BODY {
        return None;
    }
    let end = at + header + len;
    let body = bytes.get(at + header..end)?;
    (crate::checksum::crc32(body) == crc).then_some((body, end))
}

/// Decodes all of `body` (postcard alone would accept trailing bytes).
fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Some(v),
        _ => None,
    }
}

/// The record at `at` if it checks out and comes after `last` (seq, index):
/// (record, index, end of frame).
fn record_at(
    bytes: &[u8],
    at: usize,
    last: Option<(u64, u32)>,
    legacy: bool,
) -> Option<(Record, u32, usize)> {
    let after = |seq: u64, index: u32| last.is_none_or(|(s, i)| seq > s && index > i);
    if bytes.get(at..at + 4) == Some(&MAGIC[..]) {
        let (body, end) = body_at(bytes, at, HEADER)?;
        let b: Body = decode(body)?;
        return after(b.seq, b.index).then_some((Record { seq: b.seq, payload: b.payload }, b.index, end));
    }
    if !legacy {
        return None;
    }
    let (body, end) = body_at(bytes, at, LEGACY_HEADER)?;
    let b: LegacyBody = decode(body)?;
    // Legacy records are numbered by their position.
    let index = last.map_or(0, |(_, i)| i + 1);
    after(b.seq, index).then_some((Record { seq: b.seq, payload: b.payload }, index, end))
}

/// Reads every record that checks out, skipping damaged stretches.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut s = Scan::default();
    let mut last: Option<(u64, u32)> = None;
    // Legacy records only before anything else: at the start, unbroken.
    let mut legacy = true;
    let mut at = 0usize;
    while at < bytes.len() {
        if let Some((r, index, end)) = record_at(bytes, at, last, legacy) {
            legacy &= bytes.get(at..at + 4) != Some(&MAGIC[..]);
            last = Some((r.seq, index));
            s.records.push(r);
            s.kept.push(at..end);
            at = end;
            continue;
        }
        legacy = false;
        // Damage from `at`: resynchronise on the next record that checks out.
        let next = (at + 1..bytes.len())
            .filter(|&p| bytes[p..].starts_with(&MAGIC))
            .find_map(|p| record_at(bytes, p, last, false).map(|(_, index, _)| (p, index)));
        let to = next.map_or(bytes.len(), |(p, _)| p);
        let starts = bytes[at..to].windows(MAGIC.len()).filter(|w| *w == MAGIC).count() as u64;
        let expected = last.map_or(0, |(_, i)| u64::from(i) + 1);
        let records = match next {
            Some((_, index)) => u64::from(index).saturating_sub(expected),
            None => starts.max(1),
        };
        s.damage.push(Damage { bytes: (to - at) as u64, records, tail: next.is_none() });
        at = to;
    }
    s.next_index = last.map_or(0, |(_, i)| i.saturating_add(1));
    s
}

/// The good records of `s` framed afresh, indexes from 0: a segment's
/// content once its damage is removed.
pub(super) fn reframe(s: &mut Scan) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::new();
    s.kept.clear();
    for (index, r) in s.records.iter().enumerate() {
        let f = frame(r.seq, index as u32, &r.payload)?;
        s.kept.push(out.len()..out.len() + f.len());
        out.extend_from_slice(&f);
    }
    s.next_index = s.records.len() as u32;
    s.damage.clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_frame(seq: u64, payload: &[u8]) -> Vec<u8> {
        #[derive(Serialize)]
        struct B<'a> {
            seq: u64,
            payload: &'a [u8],
        }
        let body = postcard::to_allocvec(&B { seq, payload }).unwrap();
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&crate::checksum::crc32(&body).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn segments_written_before_the_magic_are_still_read_and_appended_to() {
        let mut bytes = legacy_frame(1, b"one");
        bytes.extend(legacy_frame(3, b"three"));
        bytes.extend(frame(4, 2, b"four").unwrap());
        let s = scan(&bytes);
        let seqs: Vec<u64> = s.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        assert!(s.damage.is_empty(), "{:?}", s.damage);
        assert_eq!(s.next_index, 3);
    }

    #[test]
    fn a_record_with_trailing_bytes_in_its_body_is_damage() {
        let body = postcard::to_allocvec(&BodyRef { seq: 1, index: 0, payload: b"x" }).unwrap();
        let mut body = body;
        body.push(0);
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&crate::checksum::crc32(&body).to_le_bytes());
        f.extend_from_slice(&body);
        assert!(scan(&f).records.is_empty());
    }
}
