//! The console's picture of the fleet, kept current by the same reads
//! `perch status` makes, left open: the last report of every device and
//! lane (`PERCH_REPORTS`, last per subject, then each new one), the
//! registry and the rollouts (their KV buckets, likewise). A page is
//! rendered from this picture, not from a read of the whole fleet; each
//! change is announced to the browsers as an [`Event`] naming what changed.
//!
//! A consumer lost with its server is made again and delivers the current
//! messages again: every record is kept by its stream sequence, so a
//! message seen twice changes nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream;
use perch_net::read::{self, Followed, Which};
use perch_protocol::registry::DeviceRecord;
use perch_protocol::subjects::{REGISTRY_BUCKET, REPORTS_ALL, REPORTS_STREAM, ROLLOUTS_BUCKET};
use tokio::sync::broadcast;

use crate::rollout::Rollout;
use crate::view::{self, DeviceView, FleetView, Stored};

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A device's reports or registry record.
    Device(String),
    /// A rollout's record.
    Rollout(String),
}

/// The fleet as last heard, and who to tell of changes.
pub struct Live {
    picture: RwLock<Picture>,
    events: broadcast::Sender<Event>,
}

#[derive(Default)]
struct Picture {
    /// The registry's device records, by device id.
    registry: Keys<DeviceRecord>,
    /// By device id, then report subject (lane): the last report stored.
    lanes: BTreeMap<String, BTreeMap<String, Stored>>,
    /// The rollouts, by id.
    rollouts: Keys<Rollout>,
    /// Which of the three feeds delivered what was stored when it began.
    caught_up: [bool; 3],
}

/// A KV bucket's keys with the revision last seen of each, and its value
/// (None: deleted). A deleted key keeps its revision, so an older put
/// delivered again (a consumer made again) does not bring it back.
type Keys<T> = BTreeMap<String, (u64, Option<T>)>;

/// Takes KV message `m` (subject `prefix` + key) into `keys`; the key if
/// it changed anything.
fn take_kv<T>(
    keys: &mut Keys<T>,
    m: &jetstream::Message,
    prefix: &str,
    parse: impl FnOnce(&str, &[u8]) -> Result<T, String>,
) -> Option<String> {
    let revision = m.info().ok()?.stream_sequence;
    let key = m.subject.strip_prefix(prefix)?;
    if keys.get(key).is_some_and(|(r, _)| *r >= revision) {
        return None;
    }
    let value = if read::is_kv_delete(m) {
        None
    } else {
        match parse(key, &m.payload) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!("console: {e}");
                return None;
            }
        }
    };
    keys.insert(key.to_string(), (revision, value));
    Some(key.to_string())
}

/// How many events a slow browser may fall behind by before it is told
/// to reload instead.
const EVENT_BACKLOG: usize = 4096;

impl Live {
    pub fn new() -> Arc<Live> {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Arc::new(Live { picture: RwLock::default(), events })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Starts the three feeds on `client`; they run as long as the runtime.
    pub fn start(self: &Arc<Self>, client: &async_nats::Client) {
        let js = jetstream::new(client.clone());
        let feeds = [
            (REPORTS_STREAM.to_string(), REPORTS_ALL.to_string(), Feed::Reports),
            (format!("KV_{REGISTRY_BUCKET}"), format!("$KV.{REGISTRY_BUCKET}.device.>"), Feed::Registry),
            (format!("KV_{ROLLOUTS_BUCKET}"), format!("$KV.{ROLLOUTS_BUCKET}.>"), Feed::Rollouts),
        ];
        for (stream, filter, feed) in feeds {
            let (live, js) = (self.clone(), js.clone());
            tokio::spawn(async move {
                read::follow(&js, &stream, &filter, Which::LastPerSubject, |f| {
                    live.take(feed, f);
                    true
                })
                .await
            });
        }
    }

    fn take(&self, feed: Feed, f: Followed) {
        let m = match f {
            Followed::CaughtUp => {
                self.write().caught_up[feed as usize] = true;
                return;
            }
            Followed::Message(m) => m,
        };
        let event = match feed {
            Feed::Reports => self.take_report(&m),
            Feed::Registry => self.take_record(&m),
            Feed::Rollouts => self.take_rollout(&m),
        };
        if let Some(e) = event {
            // No browser listening is not an error.
            let _ = self.events.send(e);
        }
    }

    fn take_report(&self, m: &jetstream::Message) -> Option<Event> {
        let s = match crate::status::stored(m) {
            Ok(Ok(s)) => s,
            Ok(Err(why)) | Err(why) => {
                tracing::debug!("console: report set aside: {why}");
                return None;
            }
        };
        let id = s.report.device.clone();
        let mut p = self.write();
        let lane = p.lanes.entry(id.clone()).or_default().entry(m.subject.to_string());
        match lane {
            std::collections::btree_map::Entry::Occupied(mut o) if o.get().stream_seq < s.stream_seq => {
                o.insert(s);
            }
            std::collections::btree_map::Entry::Occupied(_) => return None,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(s);
            }
        }
        Some(Event::Device(id))
    }

    fn take_record(&self, m: &jetstream::Message) -> Option<Event> {
        let prefix = format!("$KV.{REGISTRY_BUCKET}.device.");
        let id = take_kv(&mut self.write().registry, m, &prefix, |id, bytes| {
            serde_json::from_slice::<DeviceRecord>(bytes)
                .map_err(|e| format!("registry record {id} is not readable: {e}"))
        })?;
        Some(Event::Device(id))
    }

    fn take_rollout(&self, m: &jetstream::Message) -> Option<Event> {
        let prefix = format!("$KV.{ROLLOUTS_BUCKET}.");
        let id = take_kv(&mut self.write().rollouts, m, &prefix, |id, bytes| {
            crate::rollout_store::parse(id, bytes).map_err(|e| e.to_string())
        })?;
        Some(Event::Rollout(id))
    }

    // A panic while holding the lock cannot leave the picture half
    // changed in a way that matters (each change is one insert), so a
    // poisoned lock is used as it is.
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Picture> {
        self.picture.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Picture> {
        self.picture.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every feed has delivered what was stored when it began.
    pub fn ready(&self) -> bool {
        self.read().caught_up.iter().all(|c| *c)
    }

    /// The whole fleet, as `perch status` would show it now.
    pub fn fleet(&self, now: u64, stale_after_secs: u64) -> FleetView {
        let p = self.read();
        let registry: Vec<DeviceRecord> = p.registry.values().filter_map(|(_, r)| r.clone()).collect();
        let reports = p.lanes.values().flat_map(|l| l.values().cloned());
        view::build(&registry, reports, now, stale_after_secs, false)
    }

    /// Some devices (those on a page), as the fleet view shows them.
    pub fn devices(&self, ids: &[String], now: u64, stale_after_secs: u64) -> Vec<DeviceView> {
        let p = self.read();
        let registry: Vec<DeviceRecord> =
            ids.iter().filter_map(|id| p.registry.get(id)).filter_map(|(_, r)| r.clone()).collect();
        let reports = ids.iter().filter_map(|id| p.lanes.get(id)).flat_map(|l| l.values().cloned());
        view::build(&registry, reports, now, stale_after_secs, false).devices
    }

    /// One device's registry record.
    pub fn record(&self, id: &str) -> Option<DeviceRecord> {
        self.read().registry.get(id).and_then(|(_, r)| r.clone())
    }

    /// Every registry record, by id.
    pub fn registry(&self) -> Vec<DeviceRecord> {
        self.read().registry.values().filter_map(|(_, r)| r.clone()).collect()
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Vec<Rollout> {
        let mut all: Vec<Rollout> = self.read().rollouts.values().filter_map(|(_, r)| r.clone()).collect();
        all.sort_by_key(|r| (r.created_at, r.id.clone()));
        all
    }
}

#[derive(Debug, Clone, Copy)]
enum Feed {
    Reports = 0,
    Registry = 1,
    Rollouts = 2,
}
