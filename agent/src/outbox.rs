//! The durable outbox: reports wait here, on disk, until JetStream acked them.
//!
//! Layout, under `STATE/outbox/`:
//! - `events/` and `telemetry/`: append-only segment files
//!   `<first seq, 20 digits>.seg`, each a run of records framed with a
//!   magic, a length and a CRC-32 (see `segment.rs`);
//! - `acked`: per lane, the highest sequence number that is done (acked by
//!   JetStream, or dropped from the telemetry lane), written atomically;
//! - `epoch`: 16 hex digits drawn at random when the outbox is created.
//!   Sequence numbers count within it: a wiped outbox starts again at 1 in
//!   a new epoch, and the fleet tells its reports from the old ones.
//!
//! Invariants:
//! - a record is on disk (events: fsynced) before `append` returns, and is
//!   removed only once it is done: nothing lives only in a client buffer;
//! - sequence numbers are per device, across both lanes, and never reused:
//!   the next one is one above the highest found in the segments or `acked`;
//! - a torn tail (power loss mid-append: damage at the end of the last
//!   segment, nothing good after it) is cut off at `open`, never fatal;
//! - any other damage is corruption (the storage, not a power cut): the
//!   damaged records are skipped, the ones after them kept, the segment
//!   rewritten without them, and their sequence numbers stay unused, so
//!   the fleet sees the gap;
//! - the telemetry lane stays under its byte budget by dropping its oldest
//!   records, and says so with a `Dropped` event; events are never dropped.
//!
//! Done records are forgotten in memory at once and on disk a segment at a
//! time; `acked` is written at most every [`Outbox::checkpoint`]. After a
//! crash some done records may be sent again: their `Nats-Msg-Id` makes
//! JetStream store them once.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use perch_protocol::report::Lane;
use perch_support::durable::{self, Replace};

use crate::statefile::{self, StateFile};
use serde::{Deserialize, Serialize};

pub mod segment;

const SEGMENT_EXT: &str = "seg";
/// Largest record payload (a report is far smaller).
pub const MAX_RECORD: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("outbox record is {0} bytes, over the {MAX_RECORD}-byte limit")]
    TooLarge(usize),
    #[error(transparent)]
    Write(#[from] durable::WriteError),
    #[error("outbox epoch: no randomness from the OS: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |err| OutboxError::Io { path: path.to_path_buf(), err }
}

/// How the outbox behaves.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Bytes of telemetry kept while the link is down; the oldest go first.
    pub telemetry_budget: u64,
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { telemetry_budget: 4 << 20, segment_bytes: 256 << 10 }
    }
}

/// A record waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub lane: Lane,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Acked {
    events: u64,
    telemetry: u64,
}

impl Acked {
    fn get(&self, lane: Lane) -> u64 {
        match lane {
            Lane::Events => self.events,
            Lane::Telemetry => self.telemetry,
        }
    }

    fn set(&mut self, lane: Lane, v: u64) {
        match lane {
            Lane::Events => self.events = v,
            Lane::Telemetry => self.telemetry = v,
        }
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: u64,
    len: u64,
    /// The index the next record appended to it gets.
    next_index: u32,
}

struct LaneState {
    lane: Lane,
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Records not yet done, oldest first.
    pending: VecDeque<Stored>,
    pending_bytes: u64,
    /// The open last segment, for appends.
    active: Option<File>,
    /// Appended since the last fsync (telemetry is synced in groups).
    dirty: bool,
}

/// Telemetry records dropped to stay in budget: `first..=last`, `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub first: u64,
    pub last: u64,
    pub count: u64,
}

/// What `open` had to repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// A torn tail (power loss mid-append) cut off the last segment.
    Cut {
        file: PathBuf,
        /// Bytes cut off the end.
        bytes: u64,
    },
    /// Damaged records (corruption, not a power cut) skipped; the records
    /// after them were kept and the segment rewritten without them.
    Corrupt {
        file: PathBuf,
        /// Records lost.
        records: u64,
        /// Damaged bytes removed.
        bytes: u64,
    },
    /// The epoch file was unreadable; a new epoch was drawn.
    NewEpoch { file: PathBuf, why: String },
    /// A file that is not one the agent writes (a directory, a FIFO, a
    /// segment larger than any it writes) was moved aside, not read.
    MovedAside { file: PathBuf, to: PathBuf, why: String },
}

/// The outbox of one state directory.
pub struct Outbox {
    dir: PathBuf,
    cfg: OutboxConfig,
    lanes: [LaneState; 2],
    acked: Acked,
    acked_on_disk: Acked,
    epoch: u64,
    next_seq: u64,
}

fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Events => 0,
        Lane::Telemetry => 1,
    }
}

impl Outbox {
    /// Opens (or creates) the outbox, cutting off torn tails.
    pub fn open(state_dir: &Path, cfg: OutboxConfig) -> Result<(Outbox, Vec<Repair>), OutboxError> {
        let dir = state_dir.join("outbox");
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            // The new directory's entry must survive a power cut too.
            durable::sync_dir(state_dir).map_err(io(state_dir))?;
        }
        let mut repairs = Vec::new();
        let acked = read_acked(&dir.join("acked"), Some(&mut repairs))?;
        let mut max_seq = acked.events.max(acked.telemetry);
        let mut lanes = Vec::with_capacity(2);
        for lane in Lane::ALL {
            let ldir = dir.join(lane.as_str());
            fs::create_dir_all(&ldir).map_err(io(&ldir))?;
            let mut state = LaneState {
                lane,
                dir: ldir.clone(),
                segments: vec![],
                pending: VecDeque::new(),
                pending_bytes: 0,
                active: None,
                dirty: false,
            };
            let mut files: Vec<PathBuf> = fs::read_dir(&ldir)
                .map_err(io(&ldir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == SEGMENT_EXT))
                .collect();
            files.sort();
            let done = acked.get(lane);
            let last_file = files.len().saturating_sub(1);
            for (n, path) in files.into_iter().enumerate() {
                let Some(bytes) = read_segment(&path, &cfg, Some(&mut repairs))? else { continue };
                let mut scan = segment::scan(&bytes);
                let last_seq = scan.records.last().map(|r| r.seq).unwrap_or(0);
                // Damage before a record JetStream already acked cost nothing
                // that was not sent: such a segment is deleted below, unreported.
                let all_sent = last_seq > 0 && last_seq <= done && scan.damage.last().is_none_or(|d| !d.tail);
                let good_len = if all_sent && n < last_file {
                    scan.prefix_len()
                } else {
                    repair_segment(&path, &mut scan, n == last_file, &mut repairs)?
                };
                let records = scan.records;
                max_seq = max_seq.max(last_seq);
                if (records.is_empty() || last_seq <= done) && n < last_file {
                    // Nothing left to send in it.
                    fs::remove_file(&path).map_err(io(&path))?;
                    continue;
                }
                for r in records.into_iter().filter(|r| r.seq > done) {
                    state.pending_bytes += r.payload.len() as u64;
                    state.pending.push_back(Stored { seq: r.seq, lane, payload: r.payload });
                }
                state.segments.push(Segment { path, last_seq, len: good_len, next_index: scan.next_index });
            }
            lanes.push(state);
        }
        durable::sync_dir(&dir).map_err(io(&dir))?;
        let epoch = open_epoch(&dir, max_seq > 0, &mut repairs)?;
        let lanes: [LaneState; 2] = match lanes.try_into() {
            Ok(l) => l,
            Err(_) => unreachable!("two lanes"),
        };
        let ob = Outbox { dir, cfg, lanes, acked, acked_on_disk: acked, epoch, next_seq: max_seq + 1 };
        Ok((ob, repairs))
    }

    /// The epoch this outbox's sequence numbers count within.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number of the last record appended in this epoch (0:
    /// none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// Appends a record whose payload `make` builds from its sequence
    /// number. Events are fsynced before this returns. Returns the sequence
    /// number, and the range of telemetry records dropped to stay in
    /// budget, if any (the caller reports it as an event).
    pub fn append(
        &mut self,
        lane: Lane,
        make: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<(u64, Option<Dropped>), OutboxError> {
        let seq = self.next_seq;
        let payload = make(seq);
        if payload.len() > MAX_RECORD {
            return Err(OutboxError::TooLarge(payload.len()));
        }
        let seg_bytes = self.cfg.segment_bytes;
        let st = &mut self.lanes[lane_index(lane)];
        let roll = st.segments.last().is_none_or(|s| s.len >= seg_bytes) || st.active.is_none();
        if roll {
            let (path, new_file) = match st.segments.last() {
                Some(s) if s.len < seg_bytes => (s.path.clone(), false),
                _ => (st.dir.join(format!("{seq:020}.{SEGMENT_EXT}")), true),
            };
            let f = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            if st.dirty {
                // The segment being closed must be durable before it is let go.
                if let (Some(old), Some(seg)) = (st.active.as_ref(), st.segments.last()) {
                    old.sync_data().map_err(io(&seg.path))?;
                }
                st.dirty = false;
            }
            if new_file {
                durable::sync_dir(&st.dir).map_err(io(&st.dir))?;
                st.segments.push(Segment { path: path.clone(), last_seq: seq, len: 0, next_index: 0 });
            }
            st.active = Some(f);
        }
        let (Some(f), Some(seg)) = (st.active.as_mut(), st.segments.last_mut()) else {
            unreachable!("an active segment was opened above")
        };
        let frame = segment::frame(seq, seg.next_index, &payload).map_err(|e| OutboxError::Io {
            path: seg.path.clone(),
            err: std::io::Error::other(e.to_string()),
        })?;
        f.write_all(&frame).map_err(io(&seg.path))?;
        if lane == Lane::Events {
            f.sync_data().map_err(io(&seg.path))?;
        } else {
            st.dirty = true;
        }
        crate::failpoint::hit("outbox-appended");
        seg.len += frame.len() as u64;
        seg.last_seq = seq;
        seg.next_index = seg.next_index.saturating_add(1);
        st.pending_bytes += payload.len() as u64;
        st.pending.push_back(Stored { seq, lane, payload });
        self.next_seq = seq + 1;
        let dropped = if lane == Lane::Telemetry { self.enforce_budget()? } else { None };
        Ok((seq, dropped))
    }

    /// Drops the oldest telemetry until the lane is within budget.
    fn enforce_budget(&mut self) -> Result<Option<Dropped>, OutboxError> {
        let budget = self.cfg.telemetry_budget;
        let st = &mut self.lanes[lane_index(Lane::Telemetry)];
        let mut dropped: Option<Dropped> = None;
        while st.pending_bytes > budget && st.pending.len() > 1 {
            let Some(r) = st.pending.pop_front() else { break };
            st.pending_bytes -= r.payload.len() as u64;
            dropped = Some(match dropped {
                None => Dropped { first: r.seq, last: r.seq, count: 1 },
                Some(d) => Dropped { last: r.seq, count: d.count + 1, ..d },
            });
        }
        if let Some(d) = dropped {
            self.mark_done(Lane::Telemetry, d.last)?;
        }
        Ok(dropped)
    }

    /// Makes every appended record durable. The sender calls this before
    /// it sends anything: a record that reached JetStream must never be
    /// lost to a power cut, or its sequence number could be given to
    /// another record, which JetStream would then take for a duplicate.
    pub fn flush(&mut self) -> Result<(), OutboxError> {
        for st in &mut self.lanes {
            if st.dirty {
                if let (Some(f), Some(seg)) = (st.active.as_ref(), st.segments.last()) {
                    f.sync_data().map_err(io(&seg.path))?;
                }
                st.dirty = false;
            }
        }
        Ok(())
    }

    /// The records waiting in `lane`, oldest first.
    pub fn pending(&self, lane: Lane) -> impl Iterator<Item = &Stored> {
        self.lanes[lane_index(lane)].pending.iter()
    }

    /// How many records, and payload bytes, are waiting.
    pub fn backlog(&self) -> (usize, u64) {
        self.lanes.iter().fold((0, 0), |(n, b), l| (n + l.pending.len(), b + l.pending_bytes))
    }

    /// The highest sequence number done in `lane`.
    pub fn done(&self, lane: Lane) -> u64 {
        self.acked.get(lane)
    }

    /// Marks every record of `lane` up to `seq` done (JetStream acked it).
    /// Acks must come in order within a lane; an old one is ignored.
    pub fn ack(&mut self, lane: Lane, seq: u64) -> Result<(), OutboxError> {
        self.mark_done(lane, seq)
    }

    fn mark_done(&mut self, lane: Lane, seq: u64) -> Result<(), OutboxError> {
        if seq <= self.acked.get(lane) {
            return Ok(());
        }
        self.acked.set(lane, seq);
        let st = &mut self.lanes[lane_index(lane)];
        while st.pending.front().is_some_and(|r| r.seq <= seq) {
            if let Some(r) = st.pending.pop_front() {
                st.pending_bytes -= r.payload.len() as u64;
            }
        }
        Ok(())
    }

    /// Persists the done marks and deletes segments with nothing left to send.
    pub fn checkpoint(&mut self) -> Result<(), OutboxError> {
        if self.acked == self.acked_on_disk {
            return Ok(());
        }
        let path = self.dir.join("acked");
        let bytes = postcard::to_allocvec(&self.acked)
            .map_err(|e| OutboxError::Io { path: path.clone(), err: std::io::Error::other(e.to_string()) })?;
        durable::write_bytes(&path, 0o600, Replace::Allow, &bytes)?;
        self.acked_on_disk = self.acked;
        for st in &mut self.lanes {
            let done = self.acked.get(st.lane);
            // The last segment always stays: it is appended to, and it keeps
            // the highest sequence number on disk even if `acked` were lost,
            // so a number is never handed out twice.
            let keep_last = st.segments.len().saturating_sub(1);
            // Segments are in sequence order: the done ones are a prefix.
            let n_done = st.segments[..keep_last].iter().take_while(|seg| seg.last_seq <= done).count();
            let removed = n_done > 0;
            for seg in st.segments.drain(..n_done) {
                fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            }
            if removed {
                durable::sync_dir(&st.dir).map_err(io(&st.dir))?;
            }
        }
        Ok(())
    }
}

/// Reports waiting to be sent (records, payload bytes), read without
/// changing anything: `status` runs next to a live agent.
pub fn peek(state_dir: &Path) -> Result<(usize, u64), OutboxError> {
    let dir = state_dir.join("outbox");
    let acked = read_acked(&dir.join("acked"), None)?;
    let (mut n, mut bytes) = (0usize, 0u64);
    for lane in Lane::ALL {
        let ldir = dir.join(lane.as_str());
        let Ok(entries) = fs::read_dir(&ldir) else { continue };
        let done = acked.get(lane);
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.extension().is_none_or(|x| x != SEGMENT_EXT) {
                continue;
            }
            // A segment deleted by the agent meanwhile was fully sent.
            let Ok(Some(file)) = read_segment(&path, &OutboxConfig::default(), None) else { continue };
            for r in segment::scan(&file).records.iter().filter(|r| r.seq > done) {
                n += 1;
                bytes += r.payload.len() as u64;
            }
        }
    }
    Ok((n, bytes))
}

/// Reads the outbox's epoch; draws and stores a new one for a new outbox,
/// or in place of one lost or unreadable while the outbox has `history`.
/// Then its sequence numbers go on from the segments in the new epoch, and
/// the fleet's count shows the numbers before as a gap: the device lost
/// track of them. (Records already on disk keep the epoch they were made
/// with; the reporter sends them under it.)
fn open_epoch(dir: &Path, history: bool, repairs: &mut Vec<Repair>) -> Result<u64, OutboxError> {
    let path = dir.join(EPOCH_FILE);
    // A directory or FIFO in its place is moved aside first (a rename could
    // not replace it), then a new epoch is drawn.
    let before = repairs.len();
    match read_state(&path, 64, Some(repairs))? {
        Some(bytes) => match parse_epoch(&bytes) {
            Ok(e) => return Ok(e),
            Err(why) => repairs.push(Repair::NewEpoch { file: path.clone(), why }),
        },
        None if repairs.len() > before || history => {
            let why =
                if repairs.len() > before { "not a readable file" } else { "missing, with reports on disk" };
            repairs.push(Repair::NewEpoch { file: path.clone(), why: why.into() })
        }
        None => {}
    }
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| OutboxError::Random(e.to_string()))?;
    let epoch = u64::from_le_bytes(b);
    durable::write_bytes(&path, 0o600, Replace::Allow, format_epoch(epoch).as_bytes())?;
    Ok(epoch)
}

const EPOCH_FILE: &str = "epoch";

fn format_epoch(epoch: u64) -> String {
    format!("{epoch:016x}\n")
}

/// `epoch`'s content: exactly 16 lowercase hex digits and a newline.
fn parse_epoch(bytes: &[u8]) -> Result<u64, String> {
    let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if text.len() != 16 || !text.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("not 16 hex digits ({} bytes)", bytes.len()));
    }
    let text = std::str::from_utf8(text).map_err(|_| "not text".to_string())?;
    u64::from_str_radix(text, 16).map_err(|e| e.to_string())
}

/// The largest segment file the agent writes: it starts a new segment once
/// one passes `segment_bytes`, so at most one framed record more.
fn segment_limit(cfg: &OutboxConfig) -> usize {
    (cfg.segment_bytes as usize).saturating_add(MAX_RECORD + 64)
}

/// Reads a state file of the outbox. One that is not a file the agent
/// wrote (a directory, a FIFO, over `max` bytes) is moved aside and said
/// so in `repairs`; with no `repairs` (`peek`, which changes nothing) it
/// is only skipped. `None`: nothing to read.
fn read_state(
    path: &Path,
    max: usize,
    repairs: Option<&mut Vec<Repair>>,
) -> Result<Option<Vec<u8>>, OutboxError> {
    let read_err = |e: durable::ReadError| OutboxError::Io {
        path: path.to_path_buf(),
        err: std::io::Error::other(e.to_string()),
    };
    match statefile::read(path, max).map_err(read_err)? {
        StateFile::Missing => Ok(None),
        StateFile::Bytes(b) => Ok(Some(b)),
        StateFile::Damaged(why) => {
            if let Some(repairs) = repairs {
                let to = statefile::move_aside(path, perch_support::now_unix()).map_err(io(path))?;
                repairs.push(Repair::MovedAside { file: path.to_path_buf(), to, why });
            }
            Ok(None)
        }
    }
}

fn read_acked(path: &Path, repairs: Option<&mut Vec<Repair>>) -> Result<Acked, OutboxError> {
    // Lost done marks cost only resends, which JetStream drops by message id.
    Ok(read_state(path, 4096, repairs)?.and_then(|b| postcard::from_bytes(&b).ok()).unwrap_or_default())
}

fn read_segment(
    path: &Path,
    cfg: &OutboxConfig,
    repairs: Option<&mut Vec<Repair>>,
) -> Result<Option<Vec<u8>>, OutboxError> {
    read_state(path, segment_limit(cfg), repairs)
}

/// Repairs a segment that `scan` found damage in, and says what was lost:
/// a torn tail of the last segment is cut off; anything else is
/// corruption, and the segment is rewritten with only its good records.
/// Returns the segment's length after.
fn repair_segment(
    path: &Path,
    scan: &mut segment::Scan,
    last_segment: bool,
    repairs: &mut Vec<Repair>,
) -> Result<u64, OutboxError> {
    let Some(end) = scan.damage.last().cloned() else { return Ok(scan.prefix_len()) };
    // Only the end of the last segment can be torn: the others were synced
    // before the next one was started.
    let torn = end.tail && last_segment && scan.damage.len() == 1;
    if torn {
        repairs.push(Repair::Cut { file: path.to_path_buf(), bytes: end.bytes });
    } else {
        let (records, bytes) = scan.damage.iter().fold((0, 0), |(r, b), d| (r + d.records, b + d.bytes));
        repairs.push(Repair::Corrupt { file: path.to_path_buf(), records, bytes });
    }
    if scan.is_prefix() {
        let good_len = scan.prefix_len();
        let f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
        f.set_len(good_len).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
        scan.damage.clear();
        return Ok(good_len);
    }
    let bytes = segment::reframe(scan).map_err(|e| OutboxError::Io {
        path: path.to_path_buf(),
        err: std::io::Error::other(e.to_string()),
    })?;
    durable::write_bytes(path, 0o644, Replace::Allow, &bytes)?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutboxConfig {
        OutboxConfig { telemetry_budget: 1000, segment_bytes: 300 }
    }

    fn payload(seq: u64) -> Vec<u8> {
        format!("report {seq}").into_bytes()
    }

    #[test]
    fn records_survive_reopen_until_acked() {
        let d = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        for _ in 0..50 {
            ob.append(Lane::Events, payload).unwrap();
        }
        ob.ack(Lane::Events, 20).unwrap();
        ob.checkpoint().unwrap();
        drop(ob);
        let (mut ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
        assert!(repairs.is_empty());
        let seqs: Vec<u64> = ob.pending(Lane::Events).map(|r| r.seq).collect();
        assert_eq!(seqs, (21..=50).collect::<Vec<_>>());
        assert_eq!(ob.pending(Lane::Events).next().unwrap().payload, payload(21));
        // Sequence numbers continue, never reused.
        assert_eq!(ob.append(Lane::Events, payload).unwrap().0, 51);
        ob.ack(Lane::Events, 51).unwrap();
        ob.checkpoint().unwrap();
        drop(ob);
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        assert_eq!(ob.backlog().0, 0);
        assert_eq!(ob.append(Lane::Events, payload).unwrap().0, 52);
        // Fully done segments are gone from disk.
        let files = fs::read_dir(d.path().join("outbox/events")).unwrap().count();
        assert_eq!(files, 1);
    }

    #[test]
    fn sequence_numbers_are_not_reused_even_if_the_done_marks_are_lost() {
        let d = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        for _ in 0..40 {
            ob.append(Lane::Events, payload).unwrap();
        }
        ob.ack(Lane::Events, 40).unwrap();
        ob.checkpoint().unwrap();
        drop(ob);
        fs::remove_file(d.path().join("outbox/acked")).unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        // Some records may be sent again (JetStream drops them by id), but
        // no new record may take a number JetStream has already seen.
        assert_eq!(ob.append(Lane::Events, payload).unwrap().0, 41);
    }

    #[test]
    fn peek_counts_what_waits_without_touching_anything() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(peek(dir.path()).unwrap(), (0, 0));
        let (mut ob, _) = Outbox::open(dir.path(), cfg()).unwrap();
        for _ in 0..5 {
            ob.append(Lane::Events, payload).unwrap();
        }
        ob.flush().unwrap();
        let (n, bytes) = ob.backlog();
        assert_eq!(peek(dir.path()).unwrap(), (n, bytes));
        ob.ack(Lane::Events, 3).unwrap();
        ob.checkpoint().unwrap();
        assert_eq!(peek(dir.path()).unwrap().0, 2);
    }

    fn big() -> OutboxConfig {
        OutboxConfig { telemetry_budget: 1 << 20, segment_bytes: 200 }
    }

    /// An outbox with telemetry records 1..=n over several segments; the
    /// segments (path, bytes) in order.
    fn filled(dir: &Path, n: u64) -> Vec<(PathBuf, Vec<u8>)> {
        let (mut ob, _) = Outbox::open(dir, big()).unwrap();
        for _ in 0..n {
            ob.append(Lane::Telemetry, payload).unwrap();
        }
        ob.flush().unwrap();
        drop(ob);
        let mut files: Vec<PathBuf> =
            fs::read_dir(dir.join("outbox/telemetry")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.into_iter().map(|p| (p.clone(), fs::read(&p).unwrap())).collect()
    }

    #[test]
    fn a_flipped_record_mid_segment_is_corruption_and_the_later_ones_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let segs = filled(d.path(), 5);
        assert_eq!(segs.len(), 1);
        let (file, mut bytes) = segs.into_iter().next().unwrap();
        // A length byte of record 2: without a resync it would swallow the rest.
        let second = segment::scan(&bytes).kept[1].clone();
        bytes[second.start + 4] ^= 0x40;
        fs::write(&file, &bytes).unwrap();
        let (ob, repairs) = Outbox::open(d.path(), big()).unwrap();
        assert!(matches!(&repairs[..], [Repair::Corrupt { records: 1, .. }]), "{repairs:?}");
        assert_eq!(ob.pending(Lane::Telemetry).map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3, 4, 5]);
        assert_eq!(peek(d.path()).unwrap().0, 4);
    }

    #[test]
    fn damage_in_a_segment_already_sent_is_not_reported_as_a_loss() {
        let d = tempfile::tempdir().unwrap();
        let segs = filled(d.path(), 30);
        assert!(segs.len() >= 3);
        // Everything in the first segment was acked, but the agent stopped
        // before it deleted the segment; then a bit flipped in it.
        let (file, mut bytes) = segs[0].clone();
        let scan = segment::scan(&bytes);
        let sent = scan.records.last().unwrap().seq;
        let acked = Acked { events: 0, telemetry: sent };
        fs::write(d.path().join("outbox/acked"), postcard::to_allocvec(&acked).unwrap()).unwrap();
        bytes[scan.kept[0].start + 14] ^= 1;
        fs::write(&file, &bytes).unwrap();
        let (ob, repairs) = Outbox::open(d.path(), big()).unwrap();
        assert!(repairs.is_empty(), "{repairs:?}");
        assert!(!file.exists());
        assert_eq!(ob.pending(Lane::Telemetry).next().map(|r| r.seq), Some(sent + 1));
    }

    #[test]
    fn outbox_files_that_are_not_files_are_moved_aside_and_the_outbox_opens() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
            for _ in 1..=3 {
                ob.append(Lane::Events, payload).unwrap();
            }
            ob.flush().unwrap();
        }
        let dir = d.path().join("outbox");
        // The done marks and the epoch as directories, and a segment far
        // larger than any the agent writes.
        fs::create_dir(dir.join("acked")).unwrap();
        fs::remove_file(dir.join(EPOCH_FILE)).unwrap();
        fs::create_dir(dir.join(EPOCH_FILE)).unwrap();
        let huge = dir.join("events").join(format!("{:020}.{SEGMENT_EXT}", 999));
        fs::write(&huge, vec![0u8; segment_limit(&cfg()) + 1]).unwrap();
        let (ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
        let moved: Vec<&PathBuf> = repairs
            .iter()
            .filter_map(|r| if let Repair::MovedAside { file, .. } = r { Some(file) } else { None })
            .collect();
        assert_eq!(moved, [&dir.join("acked"), &huge, &dir.join(EPOCH_FILE)], "{repairs:?}");
        assert!(repairs.iter().any(|r| matches!(r, Repair::NewEpoch { .. })));
        // Nothing that was good is lost.
        assert_eq!(ob.pending(Lane::Events).map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(dir.join(EPOCH_FILE).is_file());
        // `status` reads the same directory without changing it.
        fs::create_dir(dir.join("acked")).unwrap();
        assert_eq!(peek(d.path()).unwrap().0, 3);
        assert!(dir.join("acked").is_dir());
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let d = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        for _ in 0..3 {
            ob.append(Lane::Events, payload).unwrap();
        }
        drop(ob);
        let seg = fs::read_dir(d.path().join("outbox/events")).unwrap().next().unwrap().unwrap().path();
        let len = fs::metadata(&seg).unwrap().len();
        // Power loss halfway through the third record.
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 5).unwrap();
        let (mut ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
        assert_eq!(repairs.len(), 1);
        let seqs: Vec<u64> = ob.pending(Lane::Events).map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        // The lost record's number is taken again: it never reached JetStream.
        assert_eq!(ob.append(Lane::Events, payload).unwrap().0, 3);
        drop(ob);
        // Garbage appended after good records is cut too.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0xff; 40]).unwrap();
        let (ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
        assert!(matches!(&repairs[..], [Repair::Cut { bytes: 40, .. }]), "{repairs:?}");
        assert_eq!(ob.backlog().0, 3);
    }

    #[test]
    fn the_epoch_is_kept_and_a_wiped_outbox_starts_a_new_one() {
        let d = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        let epoch = ob.epoch();
        ob.append(Lane::Events, payload).unwrap();
        drop(ob);
        let (ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
        assert!(repairs.is_empty());
        assert_eq!(ob.epoch(), epoch);
        drop(ob);
        // A reflash or a re-provisioning wipes the state directory.
        fs::remove_dir_all(d.path().join("outbox")).unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        assert_ne!(ob.epoch(), epoch);
        assert_eq!(ob.append(Lane::Events, payload).unwrap().0, 1);
    }

    #[test]
    fn a_damaged_epoch_is_replaced_and_said_so() {
        let d = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        let (epoch, file) = (ob.epoch(), d.path().join("outbox/epoch"));
        drop(ob);
        for bad in [&b""[..], b"0123", b"0123456789ABCDEF\n", b"0123456789abcdefg", &[b'0'; 100]] {
            fs::write(&file, bad).unwrap();
            let (ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
            // Oversize, it is also moved aside first.
            let said = match &repairs[..] {
                [Repair::NewEpoch { .. }] => true,
                [Repair::MovedAside { .. }, Repair::NewEpoch { .. }] => bad.len() > 64,
                _ => false,
            };
            assert!(said, "{bad:?}: {repairs:?}");
            assert_ne!(ob.epoch(), epoch);
            drop(ob);
            // What was drawn is stored: the next open keeps it.
            let (again, repairs) = Outbox::open(d.path(), cfg()).unwrap();
            assert!(repairs.is_empty());
            assert_ne!(again.epoch(), epoch);
        }
        // Lost while reports wait on disk: said so, and they still wait,
        // and numbering goes on (never reusing a number JetStream saw).
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        ob.append(Lane::Events, payload).unwrap();
        drop(ob);
        fs::remove_file(&file).unwrap();
        let (mut ob, repairs) = Outbox::open(d.path(), cfg()).unwrap();
        assert!(
            matches!(&repairs[..], [Repair::NewEpoch { why, .. }] if why.contains("missing")),
            "{repairs:?}"
        );
        assert_eq!(ob.pending(Lane::Events).map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(ob.append(Lane::Events, payload).unwrap().0, 2);
    }

    #[test]
    fn telemetry_drops_its_oldest_over_budget_and_events_never() {
        let d = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        let mut dropped_total = 0;
        for i in 0..200u64 {
            let lane = if i % 10 == 0 { Lane::Events } else { Lane::Telemetry };
            let (_, dropped) = ob.append(lane, payload).unwrap();
            if let Some(d) = dropped {
                assert!(d.first <= d.last);
                dropped_total += d.count;
            }
        }
        let events = ob.pending(Lane::Events).count();
        assert_eq!(events, 20);
        let tele_bytes: usize = ob.pending(Lane::Telemetry).map(|r| r.payload.len()).sum();
        assert!(tele_bytes <= 1000, "{tele_bytes}");
        assert_eq!(dropped_total as usize + ob.pending(Lane::Telemetry).count(), 180);
        let kept: Vec<u64> = ob.pending(Lane::Telemetry).map(|r| r.seq).collect();
        ob.checkpoint().unwrap();
        drop(ob);
        let (ob, _) = Outbox::open(d.path(), cfg()).unwrap();
        assert_eq!(ob.pending(Lane::Events).count(), 20);
        // What was dropped stays dropped after a restart.
        let after: Vec<u64> = ob.pending(Lane::Telemetry).map(|r| r.seq).collect();
        assert_eq!(after, kept);
    }

    proptest::proptest! {
        #[test]
        fn a_bit_flip_in_any_record_costs_only_that_record(n in 2u64..40, pick in 0usize..10_000, bit in 0u8..8) {
            let d = tempfile::tempdir().unwrap();
            let segs = filled(d.path(), n);
            // Any byte of any segment: the record it lies in is the only one lost.
            let (file, pristine) = &segs[pick % segs.len()];
            let scan = segment::scan(pristine);
            let at = pick % pristine.len();
            let hit = scan.kept.iter().position(|r| r.contains(&at)).unwrap();
            let lost = scan.records[hit].seq;
            let mut bytes = pristine.clone();
            bytes[at] ^= 1 << bit;
            fs::write(file, &bytes).unwrap();
            let (mut ob, repairs) = Outbox::open(d.path(), big()).unwrap();
            let seqs: Vec<u64> = ob.pending(Lane::Telemetry).map(|r| r.seq).collect();
            let want: Vec<u64> = (1..=n).filter(|s| *s != lost).collect();
            proptest::prop_assert_eq!(&seqs, &want);
            for r in ob.pending(Lane::Telemetry) {
                proptest::prop_assert_eq!(&r.payload, &payload(r.seq));
            }
            // Only the very end of the outbox can be a torn write; anything
            // else is corruption, one record's worth.
            if lost == n {
                proptest::prop_assert!(matches!(&repairs[..], [Repair::Cut { .. }]), "{:?}", repairs);
            } else {
                proptest::prop_assert!(matches!(&repairs[..], [Repair::Corrupt { records: 1, .. }]), "{:?}", repairs);
                // The lost number is not handed out again.
                proptest::prop_assert_eq!(ob.append(Lane::Telemetry, payload).unwrap().0, n + 1);
            }
            drop(ob);
            // Repaired on disk: the next open finds nothing to repair.
            let (ob, repairs) = Outbox::open(d.path(), big()).unwrap();
            proptest::prop_assert!(repairs.is_empty(), "{:?}", repairs);
            proptest::prop_assert!(ob.pending(Lane::Telemetry).all(|r| r.seq != lost));
        }

        #[test]
        fn truncation_anywhere_loses_only_the_tail_of_that_segment(n in 2u64..40, pick in 0usize..10_000) {
            let d = tempfile::tempdir().unwrap();
            let segs = filled(d.path(), n);
            let (file, pristine) = &segs[pick % segs.len()];
            let scan = segment::scan(pristine);
            let cut = pick % pristine.len();
            fs::write(file, &pristine[..cut]).unwrap();
            let gone: Vec<u64> =
                scan.kept.iter().zip(&scan.records).filter(|(r, _)| r.end > cut).map(|(_, rec)| rec.seq).collect();
            let (ob, _) = Outbox::open(d.path(), big()).unwrap();
            let seqs: Vec<u64> = ob.pending(Lane::Telemetry).map(|r| r.seq).collect();
            let want: Vec<u64> = (1..=n).filter(|s| !gone.contains(s)).collect();
            proptest::prop_assert_eq!(seqs, want);
        }

        #[test]
        fn epoch_text_round_trips_and_nothing_else_parses(
            epoch: u64,
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            near in "[0-9a-fA-F]{15,17}\n{0,2}",
        ) {
            proptest::prop_assert_eq!(parse_epoch(format_epoch(epoch).as_bytes()), Ok(epoch));
            // Near misses: only 16 lowercase digits, with at most one newline, parse.
            let digits = near.trim_end_matches('\n');
            let good = digits.len() == 16
                && !digits.chars().any(|c| c.is_ascii_uppercase())
                && near.len() - digits.len() <= 1;
            proptest::prop_assert_eq!(parse_epoch(near.as_bytes()).is_ok(), good, "{:?}", near);
            if let Ok(e) = parse_epoch(&junk) {
                let shown = format_epoch(e);
                proptest::prop_assert_eq!(shown.trim_end().as_bytes(), junk.strip_suffix(b"\n").unwrap_or(&junk));
            }
        }
    }
}
