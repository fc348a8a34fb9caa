//! `perch watch`: the fleet's presence advisories, from one process.
//!
//! Every tick it reads the view `perch status` shows, works out with
//! [`crate::presence`] which advisories it calls for, publishes them
//! (`perch.advisories.<event>.<device>`, plain NATS as Choria's replicator
//! does) and records what it advised in the `PERCH_WATCH` bucket.
//!
//! Several may run (next to each provisioner, say); one is elected and
//! the others wait. The leader rewrites the `leader` key every tick, and
//! again during a long tick before it sends more; a watcher that sees the
//! same revision for the lease takes over by writing at that revision,
//! which only one can, and a leader whose rewrite fails stops sending. So
//! each advisory is sent by one process, and a new leader carries on from
//! the records, not from scratch.
//!
//! No clocks are compared across hosts: each watcher times the lease on
//! its own, and devices are judged by the server's clock (the time the
//! server stored the leader's rewrite), as their last-seen times are.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use perch_net::read::kv_entries;
use perch_protocol::advisory::AgeAdvisory;
use tracing::{info, warn};

use crate::presence::{self, Limits, Presence};
use crate::status::{self, Query};

pub const BUCKET: &str = "PERCH_WATCH";
const LEADER: &str = "leader";
const PRESENCE_PREFIX: &str = "presence.";

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Nats(String),
    #[error("no randomness for event ids: {0}")]
    Random(String),
}

impl perch_support::exit::Classify for WatchError {
    fn class(&self) -> Option<perch_support::exit::Class> {
        Some(perch_support::exit::Class::Runtime)
    }
}

fn nats(e: impl std::fmt::Display) -> WatchError {
    WatchError::Nats(e.to_string())
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// This watcher's name: the advisories' `replicator`, and who leads.
    pub name: String,
    pub limits: Limits,
    /// How often to look.
    pub every: Duration,
}

impl Settings {
    /// A leader silent this long is taken over from.
    fn lease(&self) -> Duration {
        self.every * 3
    }
}

/// Leadership by compare-and-set on one key.
struct Election {
    me: String,
    /// The revision this watcher last wrote, while it leads.
    mine: Option<u64>,
    /// Another's revision, and when this watcher first saw it.
    theirs: Option<(u64, Instant)>,
    /// When this watcher last rewrote the key.
    renewed: Instant,
}

impl Election {
    /// Whether this watcher leads now (taking over or renewing); if so, the
    /// server's time of the rewrite (Unix seconds).
    async fn lead(&mut self, kv: &jetstream::kv::Store, lease: Duration) -> Result<Option<u64>, WatchError> {
        let current = kv.entry(LEADER).await.map_err(nats)?;
        let me = self.me.clone().into_bytes();
        let won = match current {
            None => kv.create(LEADER, me.into()).await.ok(),
            Some(e) if Some(e.revision) == self.mine => kv.update(LEADER, me.into(), e.revision).await.ok(),
            Some(e) => match self.theirs {
                Some((rev, since)) if rev == e.revision && since.elapsed() >= lease => {
                    kv.update(LEADER, me.into(), e.revision).await.ok()
                }
                Some((rev, _)) if rev == e.revision => None,
                _ => {
                    self.theirs = Some((e.revision, Instant::now()));
                    None
                }
            },
        };
        let was = self.mine.is_some();
        self.mine = won;
        if won.is_some() && !was {
            info!(name = %self.me, "leading: this watcher sends the advisories");
        } else if won.is_none() && was {
            warn!(name = %self.me, "another watcher leads now");
        }
        let Some(rev) = won else { return Ok(None) };
        self.renewed = Instant::now();
        // The server's clock, from the entry just written.
        let written = kv.entry_for_revision(LEADER, rev).await.map_err(nats)?;
        let at = written.map_or(0, |e| e.created.unix_timestamp().max(0) as u64);
        Ok(Some(at))
    }

    /// Renews the lease if half of it has gone by since the last rewrite;
    /// false if another watcher took over meanwhile.
    async fn still_leads(&mut self, kv: &jetstream::kv::Store, lease: Duration) -> Result<bool, WatchError> {
        if self.renewed.elapsed() < lease / 2 {
            return Ok(true);
        }
        Ok(self.lead(kv, lease).await?.is_some())
    }
}

/// Runs until the future `stop` resolves.
pub async fn run(
    client: &async_nats::Client,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), WatchError> {
    let js = jetstream::new(client.clone());
    let kv = perch_net::ensure_kv(&js, BUCKET, "perch watch: its leader, and what it advised per device", 1)
        .await
        .map_err(WatchError::Nats)?;
    let mut election =
        Election { me: settings.name.clone(), mine: None, theirs: None, renewed: Instant::now() };
    tokio::pin!(stop);
    loop {
        // A lost connection or a busy server is a tick missed, not the end.
        if let Err(e) = tick(client, &js, &kv, &mut election, settings).await {
            warn!("watch: {e}");
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(settings.every) => {}
        }
    }
}

async fn tick(
    client: &async_nats::Client,
    js: &jetstream::Context,
    kv: &jetstream::kv::Store,
    election: &mut Election,
    settings: &Settings,
) -> Result<(), WatchError> {
    let Some(now) = election.lead(kv, settings.lease()).await? else {
        return Ok(());
    };
    let q = Query { device: None, stale_after_secs: settings.limits.stale_after };
    let read = status::read(client, &q, now).await.map_err(nats)?;
    // Since when an enrolled device that never reported has been silent:
    // its enrollment, or its record (an offline-enrolled device's is made
    // by its first hello, its credential maybe issued days before).
    let enrolled: BTreeMap<String, u64> = read
        .registry
        .iter()
        .filter_map(|r| r.enrolled_at.map(|t| (r.id.clone(), t.max(r.created_at))))
        .collect();
    let mut known = BTreeMap::new();
    for e in kv_entries(js, BUCKET, PRESENCE_PREFIX).await.map_err(WatchError::Nats)? {
        let device = e.key.trim_start_matches(PRESENCE_PREFIX).to_string();
        match serde_json::from_slice::<Presence>(&e.value) {
            Ok(p) => {
                known.insert(device, p);
            }
            // A damaged record is as good as none: the device is judged afresh.
            Err(err) => warn!(%device, "watch: record unreadable, judged afresh: {err}"),
        }
    }
    for c in presence::changes(&read.view, &enrolled, &known, settings.limits, now) {
        // A long tick (a whole site timing out at once) renews the lease
        // before it says more, and stops if another watcher took over.
        if !election.still_leads(kv, settings.lease()).await? {
            break;
        }
        let mut random = [0u8; 16];
        getrandom::getrandom(&mut random).map_err(|e| WatchError::Random(e.to_string()))?;
        let a = AgeAdvisory::new(c.event, &c.device, c.seen, now, &settings.name, random);
        // Advised, then recorded: a crash between the two says it again
        // rather than never.
        client.publish(a.subject(), a.to_bytes().into()).await.map_err(nats)?;
        let record = serde_json::to_vec(&c.record).map_err(nats)?;
        kv.put(format!("{PRESENCE_PREFIX}{}", c.device), record.into()).await.map_err(nats)?;
        info!(device = %c.device, event = c.event.as_str(), "advised");
    }
    client.flush().await.map_err(nats)?;
    Ok(())
}
