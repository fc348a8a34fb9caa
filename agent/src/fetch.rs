//! Bundles fetched over the link: the JetStream stream `PERCH_CHUNKS`, one
//! message per chunk, read with direct gets.
//!
//! [`ChunkSource`] presents a published bundle as the byte stream of a
//! bundle file (`Read + Seek`), so the deploy engine stages it exactly as it
//! stages a file: the head is verified before any payload is used, each
//! chunk is hashed before it is written, and a resumed deploy seeks to the
//! first chunk not intact on the slot. Only what the engine asks for is
//! fetched, with `window` direct gets in flight ahead of it.
//!
//! The head must be the head of the bundle asked for: its digest (the
//! SHA-256 of the signed manifest, which names the bundle, its counter and
//! every chunk hash) must equal the digest the desired state names, before
//! anything else is fetched. It is compared as the head's signature block
//! states it, before the manifest is hashed or decoded, so a head nobody
//! asked for costs no more than its header and signature block. Anyone who may publish to `PERCH_CHUNKS` can
//! put another validly signed bundle under a digest's subjects; that is a
//! security refusal ([`OpenError::WrongBundle`]), not an install.
//!
//! A lost link does not fail the fetch: requests wait for the link, and
//! those in flight when it dropped are sent again the moment it is back. What stops a fetch is the server saying a
//! chunk does not exist, or the bundle's data budget running out.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, StatusCode};
use perch_protocol::bundle::Manifest;
use perch_protocol::subjects::{self, CHUNKS_STREAM};
use perch_support::exit::{Class, Classify};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::debug;

/// How a fetch behaves.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Direct gets in flight ahead of the engine.
    pub window: usize,
    /// Bytes one bundle may pull over the link (0: no limit).
    pub budget: u64,
    /// How long a request may go unanswered on a link that stays up before
    /// it is sent again. A backstop only: requests whose link drops are
    /// sent again at once, and a slow radio link must not be flooded with
    /// repeats of answers that are still on their way.
    pub request_timeout: Duration,
    pub max_backoff: Duration,
    /// Where the bytes fetched per bundle are kept across restarts, so the
    /// budget holds for the bundle and not for each agent run.
    pub ledger: Option<PathBuf>,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            window: 4,
            budget: 0,
            request_timeout: Duration::from_secs(60),
            max_backoff: Duration::from_secs(10),
            ledger: None,
        }
    }
}

/// A published bundle, read as a file.
pub struct ChunkSource {
    rt: Handle,
    client: Client,
    digest: [u8; 32],
    settings: FetchSettings,
    head: Vec<u8>,
    /// The head's manifest, unverified: only where each chunk is in the
    /// bundle file is taken from it (the engine verifies it before any
    /// chunk is used).
    layout: Manifest,
    pos: u64,
    current: Option<(u32, Vec<u8>)>,
    ahead: VecDeque<(u32, JoinHandle<io::Result<Vec<u8>>>)>,
    /// The chunks staging will read, in the order it reads them, once it
    /// says; until then, every chunk in order.
    plan: Option<Plan>,
    /// Chunks taken, for how often the ledger is saved.
    loads: u32,
    fetched: Arc<AtomicU64>,
}

/// The order staging reads chunks in ([`BundleSource::plan`]), and each
/// one's place in it.
///
/// [`BundleSource::plan`]: crate::delta::BundleSource::plan
struct Plan {
    order: Vec<u32>,
    at: HashMap<u32, usize>,
}

/// Why [`ChunkSource::open`] gave no source.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The head published under the desired digest's subjects is another
    /// bundle's.
    #[error("refused for security: the head published for bundle {desired} is bundle {fetched}'s")]
    WrongBundle { desired: String, fetched: String },
    /// The server has no head for the bundle (yet): not published, or a
    /// field site still copying it from the hub. The head is published
    /// after every chunk, so its absence says the bundle is not complete.
    #[error("bundle {0} is not on the server yet (not published, or a field site still copying it)")]
    NotHere(String),
}

impl OpenError {
    /// True for a refusal of what was published, false for link trouble.
    pub fn is_security(&self) -> bool {
        matches!(self, OpenError::WrongBundle { .. })
    }
}

impl Classify for OpenError {
    fn class(&self) -> Option<Class> {
        perch_support::exit::security_if(self.is_security())
    }
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// Reads how the payload is cut (the unverified manifest) from the head of
/// bundle `digest`. The digest
/// the head claims is compared first, from its header and signature block
/// alone: a head for another bundle (or no bundle) is refused before a byte
/// of its manifest, which may be tens of MiB, is hashed or decoded.
fn layout(head: &[u8], digest: &[u8; 32]) -> Result<Manifest, OpenError> {
    use perch_protocol::bundle::{claimed_digest, BundleReader};
    let bad = |e| other(format!("bundle {} head: {e}", hex::encode(digest)));
    let claimed = claimed_digest(head).map_err(bad)?.0;
    if claimed != *digest {
        return Err(OpenError::WrongBundle { desired: hex::encode(digest), fetched: hex::encode(claimed) });
    }
    // Decoding checks the manifest hashes to the claimed (so the desired)
    // digest. It is verified by the engine before any chunk is used, so
    // reading it here unverified is safe.
    let reader = BundleReader::open(head).map_err(bad)?;
    Ok(reader.head().unverified_manifest().clone())
}

impl ChunkSource {
    /// Fetches the head of bundle `digest` and checks it is that bundle's.
    /// Call from a blocking thread.
    pub fn open(
        rt: Handle,
        client: Client,
        digest: [u8; 32],
        settings: FetchSettings,
    ) -> Result<Self, OpenError> {
        let before = settings.ledger.as_deref().map_or(0, |p| ledger::load(p, &digest));
        if before > 0 {
            debug!(bytes = before, "fetch: bytes already fetched for this bundle by earlier runs");
        }
        let fetched = Arc::new(AtomicU64::new(before));
        let head = rt
            .block_on(get(client.clone(), subjects::chunk(&digest, None), settings.clone(), fetched.clone()))
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => OpenError::NotHere(hex::encode(digest)),
                _ => OpenError::Io(e),
            })?;
        let layout = layout(&head, &digest)?;
        Ok(Self {
            rt,
            client,
            digest,
            settings,
            head,
            layout,
            pos: 0,
            current: None,
            ahead: VecDeque::new(),
            plan: None,
            loads: 0,
            fetched,
        })
    }

    /// The bundle file's length: head and payload.
    pub fn file_len(&self) -> u64 {
        self.head.len() as u64 + self.layout.stored_len()
    }

    /// The head as fetched (checked to be the desired bundle's, not yet
    /// verified: the engine does that).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Bytes received so far (head included).
    pub fn fetched(&self) -> Arc<AtomicU64> {
        self.fetched.clone()
    }

    fn save_ledger(&self) {
        if let Some(p) = &self.settings.ledger {
            ledger::save(p, &self.digest, self.fetched.load(Ordering::Relaxed));
        }
    }

    fn spawn(&self, index: u32) -> JoinHandle<io::Result<Vec<u8>>> {
        let subject = subjects::chunk(&self.digest, Some(index));
        self.rt.spawn(get(self.client.clone(), subject, self.settings.clone(), self.fetched.clone()))
    }

    /// The chunk fetched after `index`: the next in the plan (none after
    /// a chunk out of it), or the next.
    fn after(&self, index: u32) -> Option<u32> {
        match &self.plan {
            Some(plan) => plan.at.get(&index).and_then(|&at| plan.order.get(at + 1)).copied(),
            None => index.checked_add(1).filter(|&n| n < self.layout.chunk_count()),
        }
    }

    /// Whether chunk `a` is read before chunk `b`.
    fn before(&self, a: u32, b: u32) -> bool {
        match &self.plan {
            Some(plan) => match (plan.at.get(&a), plan.at.get(&b)) {
                (Some(a), Some(b)) => a < b,
                // A chunk out of the plan passes none of it.
                _ => false,
            },
            None => a < b,
        }
    }

    /// Makes chunk `index` current, fetching it (and the window after it).
    fn load(&mut self, index: u32) -> io::Result<()> {
        if self.current.as_ref().is_some_and(|(i, _)| *i == index) {
            return Ok(());
        }
        // Chunks fetched ahead of one now passed are of no use.
        while self.ahead.front().is_some_and(|(i, _)| self.before(*i, index)) {
            if let Some((_, h)) = self.ahead.pop_front() {
                h.abort();
            }
        }
        let count = self.layout.chunk_count();
        if index >= count {
            return Err(other(format!("chunk {index} is past the end ({count} chunks)")));
        }
        let h = match self.ahead.front() {
            Some((i, _)) if *i == index => self.ahead.pop_front().map(|(_, h)| h),
            _ => None,
        };
        // Not fetched ahead: the first chunk, or one out of the plan (a
        // chunk taken from the device that failed its check). Fetched
        // alone; what is ahead stays.
        let h = h.unwrap_or_else(|| self.spawn(index));
        let mut next = self.ahead.back().map_or(self.after(index), |(i, _)| self.after(*i));
        while self.ahead.len() < self.settings.window.max(1) {
            let Some(n) = next else { break };
            self.ahead.push_back((n, self.spawn(n)));
            next = self.after(n);
        }
        let data = self.rt.block_on(h).map_err(|e| other(format!("chunk {index} fetch stopped: {e}")))??;
        if self.settings.budget > 0 && self.fetched.load(Ordering::Relaxed) > self.settings.budget {
            return Err(other(format!(
                "data budget of {} bytes for bundle {} used up",
                self.settings.budget,
                hex::encode(&self.digest[..8])
            )));
        }
        self.current = Some((index, data));
        self.loads += 1;
        if self.loads % LEDGER_EVERY == 0 || self.after(index).is_none() {
            self.save_ledger();
        }
        Ok(())
    }
}

impl crate::delta::BundleSource for ChunkSource {
    fn plan(&mut self, chunks: &[u32]) {
        // What was fetched ahead on the old plan is dropped: none of it
        // was read yet (the plan is set before the first chunk).
        for (_, h) in self.ahead.drain(..) {
            h.abort();
        }
        let at = chunks.iter().enumerate().map(|(at, &i)| (i, at)).collect();
        self.plan = Some(Plan { order: chunks.to_vec(), at });
    }
}

impl Read for ChunkSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let head_len = self.head.len() as u64;
        if self.pos < head_len {
            let at = self.pos as usize;
            let n = buf.len().min(self.head.len() - at);
            buf[..n].copy_from_slice(&self.head[at..at + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        let offset = self.pos - head_len;
        // Past the payload's end: the end of the file.
        let Some(index) = self.layout.chunk_at_stored(offset) else { return Ok(0) };
        self.load(index)?;
        let Some((_, data)) = &self.current else { return Ok(0) };
        let within = (offset - self.layout.stored_offset(index)) as usize;
        if within >= data.len() {
            return Err(other(format!("chunk {index} is shorter than the manifest says")));
        }
        let n = buf.len().min(data.len() - within);
        buf[..n].copy_from_slice(&data[within..within + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ChunkSource {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let end = self.file_len();
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => end.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| other("seek out of range".into()))?;
        Ok(self.pos)
    }
}

impl Drop for ChunkSource {
    fn drop(&mut self) {
        for (_, h) in self.ahead.drain(..) {
            h.abort();
        }
        self.save_ledger();
    }
}

/// The ledger's file name in the state directory.
pub const LEDGER_FILE: &str = "fetch.json";

/// The ledger is written every this many chunks (and at the end): a crash
/// forgets at most these, plus the window in flight.
const LEDGER_EVERY: u32 = 4;

/// `STATE/fetch.json`: `{"bundle": "<digest hex>", "bytes": N}` for the
/// bundle being fetched. Another bundle starts from zero.
mod ledger {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Entry {
        bundle: String,
        bytes: u64,
    }

    /// Bytes fetched for `digest` so far; 0 if unknown or unreadable.
    pub fn load(path: &Path, digest: &[u8; 32]) -> u64 {
        perch_support::durable::read_bounded(path, 1024)
            .ok()
            .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
            .filter(|e| e.bundle == hex::encode(digest))
            .map_or(0, |e| e.bytes)
    }

    pub fn save(path: &Path, digest: &[u8; 32], bytes: u64) {
        let e = Entry { bundle: hex::encode(digest), bytes };
        let json = serde_json::to_vec(&e).unwrap_or_default();
        let replace = perch_support::durable::Replace::Allow;
        if let Err(err) = perch_support::durable::write_bytes(path, 0o644, replace, &json) {
            tracing::warn!("fetch ledger not saved: {err}");
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn counts_per_bundle_and_forgets_garbage() {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("fetch.json");
            assert_eq!(super::load(&p, &[1; 32]), 0);
            super::save(&p, &[1; 32], 12345);
            assert_eq!(super::load(&p, &[1; 32]), 12345);
            assert_eq!(super::load(&p, &[2; 32]), 0, "another bundle starts from zero");
            std::fs::write(&p, b"\xff{").unwrap();
            assert_eq!(super::load(&p, &[1; 32]), 0);
        }
    }
}

/// One direct get, retried until answered. A request is only sent on a
/// live link, and one whose link drops is sent again as soon as the link is
/// back: its answer went down with the old connection. A missing message
/// is an error (retried a few times: the publisher may still be at work).
async fn get(
    client: Client,
    subject: String,
    s: FetchSettings,
    fetched: Arc<AtomicU64>,
) -> io::Result<Vec<u8>> {
    let api = format!("$JS.API.DIRECT.GET.{CHUNKS_STREAM}.{subject}");
    let stats = client.statistics();
    let (mut attempt, mut missing) = (0u32, 0u32);
    loop {
        link_up(&client).await;
        let link = stats.connects.load(Ordering::Relaxed);
        let asked = tokio::time::timeout(s.request_timeout, client.request(api.clone(), Default::default()));
        let answer = tokio::select! {
            a = asked => a,
            _ = link_lost(&client, &stats, link) => {
                debug!("{subject}: the link dropped with the request in flight; asking again");
                continue;
            }
        };
        match answer {
            Ok(Ok(msg)) if msg.status.is_none() || msg.status == Some(StatusCode::OK) => {
                fetched.fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                return Ok(msg.payload.to_vec());
            }
            Ok(Ok(msg)) if msg.status == Some(StatusCode::NOT_FOUND) => {
                missing += 1;
                if missing >= 3 {
                    let e = format!("{subject} is not on the server (was the bundle published?)");
                    return Err(io::Error::new(io::ErrorKind::NotFound, e));
                }
            }
            Ok(Ok(msg)) => debug!("{subject}: status {:?}", msg.status),
            Ok(Err(e)) => debug!("{subject}: {e}"),
            Err(_) => debug!("{subject}: no answer in {:?}", s.request_timeout),
        }
        tokio::time::sleep(crate::enroll::backoff(attempt.min(4), s.max_backoff)).await;
        attempt += 1;
    }
}

/// How often a waiting request looks at the link.
const LINK_POLL: Duration = Duration::from_millis(50);

/// Returns once the client is connected.
async fn link_up(client: &Client) {
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(LINK_POLL).await;
    }
}

/// Returns once connection number `link` is gone (down, or replaced).
async fn link_lost(client: &Client, stats: &async_nats::Statistics, link: u64) {
    loop {
        tokio::time::sleep(LINK_POLL).await;
        if stats.connects.load(Ordering::Relaxed) != link
            || client.connection_state() != async_nats::connection::State::Connected
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use perch_protocol::bundle::{BundleHead, ManifestBuilder, ManifestParams, PayloadKind};

    use super::*;

    /// A signed head of a 3000-byte image in 1 KiB chunks, and where its
    /// manifest section starts and ends.
    fn head() -> (Vec<u8>, [u8; 32], std::ops::Range<usize>) {
        let mut b = ManifestBuilder::new(ManifestParams {
            name: "app".into(),
            counter: 1,
            version: "1".into(),
            targets: vec![],
            kind: PayloadKind::Image,
            chunk_size: 1024,
            created_at: 0,
            expires_at: None,
            min_agent_version: None,
            allow_downgrade: false,
            allow_setid: false,
            format: perch_protocol::bundle::Format::V3,
            zstd_level: None,
        })
        .unwrap();
        b.update(&[7; 3000]);
        let manifest = b.finish().unwrap();
        let mut h = BundleHead::new(manifest).unwrap();
        h.add_signature(&perch_protocol::SecretKey::from_seed(&[1; 32])).unwrap();
        let mut out = Vec::new();
        h.write_to(&mut out).unwrap();
        // The manifest is last; the header's bytes 12..16 hold its length.
        let manifest_len = u32::from_le_bytes(out[12..16].try_into().unwrap()) as usize;
        let len = out.len();
        (out, h.digest().0, len - manifest_len..len)
    }

    #[test]
    fn the_requested_head_gives_its_layout() {
        let (bytes, digest, _) = head();
        let l = layout(&bytes, &digest).unwrap();
        assert_eq!((l.chunk_count(), l.stored_len(), l.stored_offset(2)), (3, 3000, 2048));
    }

    #[test]
    fn an_unrequested_head_is_refused_before_its_manifest_is_decoded() {
        let (mut bytes, digest, manifest) = head();
        // Junk where the manifest is: decoding it would fail, so a refusal
        // for security shows the digest was compared first.
        bytes[manifest].fill(0xff);
        let e = layout(&bytes, &[9; 32]).unwrap_err();
        assert!(matches!(e, OpenError::WrongBundle { .. }), "{e}");
        assert!(e.is_security());
        assert!(e.to_string().contains(&hex::encode(digest)), "{e}");
        // Asked for, the same head is read and its junk found.
        let e = layout(&bytes, &digest).unwrap_err();
        assert!(!e.is_security(), "{e}");
    }
}
