//! `perch-bootstrap site run`: the daemon of a field site, next to the
//! ground station's nats-server. It is what makes the site's server look
//! like the hub to its drones while the uplink comes and goes; JetStream
//! does the copying, this only sets it up and keeps it pointed at the right
//! bundles:
//!
//! - makes the site's streams ([`perch_net::sites`]): its reports, the
//!   mirrors of the desired state and the trust document, the chunks;
//! - follows the mirrored desired state: the bundles the fleet wants are
//!   the ones the site copies (nats-server 2.10 and later; 2.9 copies all);
//!   those no longer wanted stay until their space is needed;
//! - wakes the site's drones when a desired-state change or a trust
//!   document has arrived from the hub, and when a wanted bundle has
//!   arrived whole, by publishing on the key's subject locally (the hub's
//!   own `$KV` messages never cross a leaf node to another domain);
//! - announces the site to the hub every [`HELLO_EVERY`], so the
//!   provisioner makes the hub's `PERCH_REPORTS` source the site's reports.
//!
//! Invariant: it writes nothing that the hub has, and nothing a drone reads
//! comes from it except wake-ups, which carry no authority (a drone reads
//! the desired state again and verifies every bundle).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use async_nats::{Client, StatusCode};
use futures_util::StreamExt;
use perch_net::sites::{self, ChunkSources};
use perch_net::streams;
use perch_protocol::subjects;
use perch_support::exit::{Class, Classify};
use tracing::{debug, info, warn};

/// How often the site announces itself to the hub.
pub const HELLO_EVERY: Duration = Duration::from_secs(10);

/// How often the site looks whether a wanted bundle has arrived whole.
const ARRIVAL_POLL: Duration = Duration::from_secs(1);

/// What `site run` needs.
#[derive(Debug, Clone)]
pub struct SiteRun {
    /// The site's name: its JetStream domain too.
    pub name: String,
    /// The hub's JetStream domain.
    pub hub_domain: String,
    /// The site's own server.
    pub urls: Vec<String>,
    /// A FLEET user of the site (`site.creds`).
    pub creds: PathBuf,
    /// The fleet CA (PEM).
    pub ca: PathBuf,
    /// Bytes of reports kept at the site.
    pub reports_bytes: i64,
    /// Bytes of bundle chunks kept at the site; -1 for no limit.
    pub chunks_bytes: i64,
}

impl SiteRun {
    /// From the site's `site.json` in `dir`. Its paths are where `site
    /// init` said the files would be; a relative one is taken from `dir`,
    /// and so is one that is not there (the directory was copied elsewhere).
    pub fn from_config(
        c: &crate::site::SiteConfig,
        dir: &std::path::Path,
        reports_limit: Option<u64>,
    ) -> Result<SiteRun, SiteError> {
        let locate = |p: &PathBuf| {
            if p.is_relative() {
                return dir.join(p);
            }
            match p.file_name() {
                Some(f) if !p.exists() => dir.join(f),
                _ => p.clone(),
            }
        };
        let store = i64::try_from(c.store_limit).unwrap_or(i64::MAX);
        let reports = match reports_limit {
            Some(r) => i64::try_from(r).unwrap_or(i64::MAX),
            None => (store / 8).min(sites::DEFAULT_REPORTS_BYTES),
        };
        // Room for the mirrored desired state and trust document.
        let margin = (store / 16).min(64 << 20);
        if reports.saturating_add(margin) >= store {
            return Err(SiteError::Streams(format!(
                "the reports limit ({reports} bytes) leaves nothing of the site's store ({store} bytes) for bundles"
            )));
        }
        Ok(SiteRun {
            name: c.name.clone(),
            hub_domain: c.hub_domain.clone(),
            urls: vec![c.client_url.clone()],
            creds: locate(&c.creds),
            ca: locate(&c.ca),
            reports_bytes: reports,
            chunks_bytes: store - reports - margin,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("connecting to the site's server {urls}: {detail}")]
    Connect { urls: String, detail: String },
    #[error("setting up the site's streams: {0}")]
    Streams(String),
}

impl Classify for SiteError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            SiteError::File { .. } => Class::Usage,
            SiteError::Connect { .. } | SiteError::Streams(_) => Class::Runtime,
        })
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(p: SiteRun, shutdown: impl std::future::Future<Output = ()>) -> Result<(), SiteError> {
    tokio::pin!(shutdown);
    let client = tokio::select! {
        c = connect(&p) => c?,
        _ = &mut shutdown => return Ok(()),
    };
    let js = async_nats::jetstream::new(client.clone());
    // The client returns before it has connected (it waits for the
    // server); the server's version decides how bundles are copied.
    let version = tokio::select! {
        v = server_version(&client) => v,
        _ = &mut shutdown => return Ok(()),
    };
    tokio::select! {
        r = ensure_streams(&js, &p, &version) => r?,
        _ = &mut shutdown => return Ok(()),
    }
    info!(site = %p.name, hub = %p.hub_domain, server = %version, "field site ready");
    println!("site {} ready", p.name);
    let keeper = Keeper { js: js.clone(), client: client.clone(), p: p.clone(), version };
    tokio::select! {
        _ = hello_loop(client.clone(), p.name.clone()) => {}
        _ = keeper.desired() => {}
        _ = trust_loop(js.clone(), client.clone()) => {}
        _ = &mut shutdown => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    info!(site = %p.name, "field site daemon stopped");
    Ok(())
}

async fn server_version(client: &Client) -> String {
    loop {
        let v = client.server_info().version;
        if client.connection_state() == async_nats::connection::State::Connected && !v.is_empty() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(p: &SiteRun) -> Result<Client, SiteError> {
    use rustls::pki_types::pem::PemObject;
    let file = |path: &PathBuf, detail: String| SiteError::File { path: path.clone(), detail };
    let ca = rustls::pki_types::CertificateDer::from_pem_file(&p.ca)
        .map_err(|e| file(&p.ca, format!("no PEM certificate: {e}")))?;
    let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(ca.as_ref().to_vec()))
        .map_err(|e| file(&p.ca, e.to_string()))?;
    let addrs = perch_net::server_addrs(&p.urls)
        .map_err(|e| SiteError::Connect { urls: p.urls.join(","), detail: e.to_string() })?;
    async_nats::ConnectOptions::with_credentials_file(&p.creds)
        .await
        .map_err(|e| file(&p.creds, e.to_string()))?
        .require_tls(true)
        .tls_client_config(tls)
        .name(format!("perch-site {}", p.name))
        // The site's server may start after us (or restart): wait for it.
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .map_err(|e| SiteError::Connect { urls: p.urls.join(","), detail: e.to_string() })
}

/// Makes the site's streams: the reports, the mirrors, the chunks (copying
/// every bundle until the desired state says which are wanted).
async fn ensure_streams(
    js: &async_nats::jetstream::Context,
    p: &SiteRun,
    version: &str,
) -> Result<(), SiteError> {
    let e = SiteError::Streams;
    perch_net::ensure_stream(js, sites::site_reports(&p.name, p.reports_bytes)).await.map_err(e)?;
    for b in [streams::DESIRED, sites::TRUST] {
        perch_net::ensure_stream(js, sites::bucket_mirror(b, &p.hub_domain)).await.map_err(e)?;
    }
    // A fresh site copies no bundle on 2.10+ until it knows what is wanted.
    let initial = ChunkSources::for_server(version, vec![]);
    perch_net::ensure_stream(js, sites::site_chunks(&p.hub_domain, &initial, p.chunks_bytes))
        .await
        .map_err(e)?;
    Ok(())
}

/// Announces the site to the hub for as long as it runs.
async fn hello_loop(client: Client, name: String) {
    let mut tick = tokio::time::interval(HELLO_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = client.publish(subjects::site_hello(&name), name.clone().into()).await {
            debug!("site hello not sent: {e}");
        }
    }
}

struct Keeper {
    js: async_nats::jetstream::Context,
    client: Client,
    p: SiteRun,
    version: String,
}

/// What the mirrored desired state asks of the site.
#[derive(Default)]
struct Wanted {
    /// Desired-state key → the bundle it names.
    keys: BTreeMap<String, [u8; 32]>,
    /// Wanted bundles whose head has arrived (the head is published after
    /// every chunk, and sources keep the hub's order: the bundle is whole).
    arrived: BTreeSet<[u8; 32]>,
    /// The bundles the chunk stream was last set to copy.
    copying: Option<ChunkSources>,
    /// Why the last retarget failed, so a lasting failure is said once.
    failed: Option<String>,
}

impl Wanted {
    fn bundles(&self) -> Vec<[u8; 32]> {
        self.keys.values().copied().collect::<BTreeSet<_>>().into_iter().collect()
    }
}

impl Keeper {
    /// Follows the mirrored desired state for as long as the daemon runs
    /// (again after any break of the watch).
    async fn desired(&self) {
        let mut wanted = Wanted::default();
        loop {
            if let Err(e) = self.follow_desired(&mut wanted).await {
                warn!("desired state at the site: {e}; watching again");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn follow_desired(&self, wanted: &mut Wanted) -> Result<(), String> {
        let kv = self.js.get_key_value(subjects::DESIRED_BUCKET).await.map_err(|e| e.to_string())?;
        let mut watch = kv.watch_all().await.map_err(|e| e.to_string())?;
        // Rebuilt from the watch's first pass; wakes only for what comes after.
        let mut seen: BTreeMap<String, [u8; 32]> = BTreeMap::new();
        let mut current = false;
        let mut poll = tokio::time::interval(ARRIVAL_POLL);
        // An empty mirror sends no first pass: it is current at once.
        if kv.status().await.map(|s| s.values() == 0).unwrap_or(false) {
            current = true;
            wanted.keys.clear();
            self.retarget(wanted).await;
        }
        loop {
            tokio::select! {
                entry = watch.next() => {
                    let entry = match entry {
                        Some(Ok(e)) => e,
                        Some(Err(e)) => return Err(e.to_string()),
                        None => return Err("the watch ended".into()),
                    };
                    let was_current = current;
                    let map = if current { &mut wanted.keys } else { &mut seen };
                    match (&entry.operation, perch_protocol::desired::decode(&entry.value)) {
                        (Operation::Put, Ok(digest)) => {
                            map.insert(entry.key.clone(), digest);
                        }
                        (Operation::Put, Err(e)) => {
                            warn!(key = %entry.key, "desired state value not understood: {e}");
                            map.remove(&entry.key);
                        }
                        _ => {
                            map.remove(&entry.key);
                        }
                    }
                    if !current && entry.seen_current {
                        current = true;
                        wanted.keys = std::mem::take(&mut seen);
                    }
                    if current {
                        self.retarget(wanted).await;
                    }
                    // A change that arrived from the hub: the drones read it now.
                    if was_current {
                        self.wake(&format!("$KV.{}.{}", subjects::DESIRED_BUCKET, entry.key)).await;
                    }
                }
                _ = poll.tick() => {
                    if current {
                        // Again, in case an update failed (the server was busy).
                        self.retarget(wanted).await;
                        self.look_for_arrivals(wanted).await;
                    }
                }
            }
        }
    }

    /// Points the chunk stream at the wanted bundles (on 2.9, at all), if
    /// it is not already.
    async fn retarget(&self, wanted: &mut Wanted) {
        let want = ChunkSources::for_server(&self.version, wanted.bundles());
        if wanted.copying.as_ref() == Some(&want) {
            return;
        }
        let config = sites::site_chunks(&self.p.hub_domain, &want, self.p.chunks_bytes);
        match self.js.update_stream(config).await {
            // A bundle no longer wanted stays until its space is needed
            // (the stream drops the oldest first). It is not purged: after
            // a purge, nats-server 2.15 recovers its sources' positions
            // wrongly, and a source added next starts past its bundle.
            Ok(_) => {
                info!(bundles = ?describe(&want), "site copies these bundles from the hub");
                wanted
                    .arrived
                    .retain(|d| matches!(&want, ChunkSources::All) || wanted.keys.values().any(|k| k == d));
                wanted.copying = Some(want);
                wanted.failed = None;
            }
            Err(e) => {
                let e = e.to_string();
                if wanted.failed.as_ref() != Some(&e) {
                    warn!("site chunk stream not retargeted (tried again every second): {e}");
                }
                wanted.failed = Some(e);
            }
        }
    }

    /// Wakes the drones of every key whose bundle has just arrived whole.
    async fn look_for_arrivals(&self, wanted: &mut Wanted) {
        for digest in wanted.bundles() {
            if wanted.arrived.contains(&digest) || !self.head_here(&digest).await {
                continue;
            }
            info!(bundle = %hex::encode(&digest[..8]), "bundle arrived whole at the site");
            wanted.arrived.insert(digest);
            let keys: Vec<String> =
                wanted.keys.iter().filter(|(_, d)| **d == digest).map(|(k, _)| k.clone()).collect();
            for k in keys {
                self.wake(&format!("$KV.{}.{k}", subjects::DESIRED_BUCKET)).await;
            }
        }
    }

    async fn head_here(&self, digest: &[u8; 32]) -> bool {
        let api = format!("$JS.API.DIRECT.GET.{}.{}", subjects::CHUNKS_STREAM, subjects::chunk(digest, None));
        let asked = self.client.request(api, Default::default());
        matches!(tokio::time::timeout(Duration::from_secs(5), asked).await,
            Ok(Ok(m)) if m.status.is_none() || m.status == Some(StatusCode::OK))
    }

    /// An empty message on a key's subject: the agent reads its keys, and
    /// takes it for a wake-up, not the change itself (which it would then
    /// wait to see stored).
    async fn wake(&self, subject: &str) {
        if let Err(e) = self.client.publish(subject.to_string(), Default::default()).await {
            debug!("wake-up on {subject} not sent: {e}");
        }
    }
}

fn describe(s: &ChunkSources) -> Vec<String> {
    match s {
        ChunkSources::All => vec!["all (nats-server before 2.10)".into()],
        ChunkSources::Bundles(ds) => ds.iter().map(|d| hex::encode(&d[..8])).collect(),
    }
}

/// Passes each new trust document from the mirror to the site's drones,
/// as the hub's bucket would (they take it from the message).
async fn trust_loop(js: async_nats::jetstream::Context, client: Client) {
    loop {
        if let Err(e) = follow_trust(&js, &client).await {
            debug!("trust document at the site: {e}; watching again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow_trust(js: &async_nats::jetstream::Context, client: &Client) -> Result<(), String> {
    let kv = js.get_key_value(subjects::TRUST_BUCKET).await.map_err(|e| e.to_string())?;
    let mut watch = kv.watch(subjects::TRUST_KEY).await.map_err(|e| e.to_string())?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.operation != Operation::Put {
            continue;
        }
        if let Err(e) = client.publish(subjects::trust_doc(), entry.value.clone()).await {
            debug!("trust document not passed on: {e}");
        }
    }
    Err("the watch ended".into())
}
