//! The provisioner: a NATS service that answers enrollment requests.
//!
//! It subscribes to `perch.enroll.request` in the queue group
//! `perch-provisioner` (PROVISIONING account), so any number of instances
//! can run and each request is answered once. All state is in the registry
//! (JetStream KV in FLEET), changed only by compare-and-swap: an N-use token
//! enrolls exactly N devices however many instances race.
//!
//! It also listens on `perch.hello.*` (FLEET) to register devices that were
//! enrolled offline, when they first connect, and on `perch.site.*` to make
//! the hub's `PERCH_REPORTS` take the reports of each field site that
//! announces itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use perch_protocol::enroll::{EnrollResponse, Rejection, SignedCredential, SignedRequest, VerifiedRequest};
use perch_protocol::lifecycle;
use perch_protocol::subjects::{
    self, ENROLL_QUEUE, ENROLL_REQUEST, HELLO_ALL, LIFECYCLE_ALL, SITE_HELLO_ALL,
};
use perch_protocol::token::{Approval, SignedToken, VerifiedToken};
use perch_protocol::PublicKey;
use perch_support::exit::{Class, Classify};
use perch_support::now_unix;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::admin::{self, Account, AdminError};
use crate::drop_log::{DropKind, DropLog};
use crate::issue::{Issuer, IssuerError};
use crate::registry::{Cas, DeviceRecord, Registry, RegistryError, Rekey, Status};

/// How the provisioner runs.
pub struct Settings {
    pub org_dir: PathBuf,
    /// Where this instance connects (PROVISIONING and FLEET live on one server or cluster).
    pub urls: Vec<String>,
    /// What enrolled devices are told to connect to; default `urls`.
    pub fleet_urls: Vec<String>,
    pub credential_ttl: Duration,
    /// Requests handled at once.
    pub concurrency: usize,
    /// Copies of each stream and bucket the provisioner makes or scales to.
    pub replicas: perch_net::Replicas,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionerError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("subscribing to {subject}: {detail}")]
    Subscribe { subject: &'static str, detail: String },
}

impl Classify for ProvisionerError {
    fn class(&self) -> Option<Class> {
        match self {
            ProvisionerError::Admin(e) => e.class(),
            ProvisionerError::Issuer(e) => e.class(),
            ProvisionerError::Registry(e) => e.class(),
            ProvisionerError::Subscribe { .. } => Some(Class::Runtime),
        }
    }
}

struct Service {
    settings: Settings,
    issuer: Issuer,
    registry: Registry,
    fleet: async_nats::Client,
    drops: DropLog,
    /// Sites whose reports the hub takes, and when that was last checked.
    sites: std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
    /// Devices whose hello found (or made) their registry record: a fleet
    /// reconnecting after a server restart says 10,000 hellos, and each
    /// needs its record read only once per provisioner.
    known: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A site's hello is acted on at most this often: the stream's sources
/// are checked again, in case another instance's update raced ours.
const SITE_CHECK_EVERY: Duration = Duration::from_secs(60);

/// How long a stopping provisioner waits for answers in flight. It never
/// waits longer on a server that stopped answering.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// At most one line per kind of dropped garbage per this long.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// A connected, subscribed provisioner.
struct Ready {
    service: Arc<Service>,
    prov: async_nats::Client,
    requests: async_nats::Subscriber,
    hellos: async_nats::Subscriber,
    events: async_nats::Subscriber,
    sites: async_nats::Subscriber,
}

/// Runs until `shutdown` resolves, which it watches from the start (also
/// while connecting). Then it gives in-flight requests up to
/// [`DRAIN_LIMIT`] and returns, whatever the server does.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProvisionerError> {
    tokio::pin!(shutdown);
    let ready = tokio::select! {
        r = start(settings) => r?,
        _ = &mut shutdown => {
            info!("provisioner stopped before it was ready");
            return Ok(());
        }
    };
    let Ready { service, prov, mut requests, mut hellos, mut events, mut sites } = ready;
    let fleet = service.fleet.clone();
    announce(&fleet, lifecycle::Kind::Startup).await;
    let concurrency = service.settings.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut summary = tokio::time::interval_at(
        tokio::time::Instant::now() + service.drops.interval(),
        service.drops.interval(),
    );
    loop {
        // A free slot first, then a message: both wait on the signal too, so
        // a provisioner saturated by a hung server still stops.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = summary.tick() => service.drops.summary(),
            msg = requests.next() => {
                let Some(msg) = msg else { break };
                let Some(reply) = msg.reply.clone() else {
                    service.drops.note(DropKind::Request, "?", &"no reply subject");
                    continue;
                };
                let (svc, client) = (service.clone(), prov.clone());
                tokio::spawn(async move {
                    let answer = svc.answer(&msg.payload).await;
                    if let Err(e) = client.publish(reply, answer.to_bytes().into()).await {
                        warn!(error = %e, "could not send an enrollment answer");
                    }
                    drop(permit);
                });
            }
            msg = hellos.next() => {
                let Some(msg) = msg else { break };
                let svc = service.clone();
                tokio::spawn(async move {
                    svc.hello(&msg.subject, &msg.payload).await;
                    drop(permit);
                });
            }
            msg = events.next() => {
                let Some(msg) = msg else { break };
                let svc = service.clone();
                tokio::spawn(async move {
                    svc.lifecycle(&msg.subject, &msg.payload).await;
                    drop(permit);
                });
            }
            msg = sites.next() => {
                let Some(msg) = msg else { break };
                let svc = service.clone();
                tokio::spawn(async move {
                    svc.site_hello(&msg.subject).await;
                    drop(permit);
                });
            }
        }
    }
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        let _ = slots.acquire_many(concurrency as u32).await;
        let _ = prov.flush().await;
        let _ = fleet.flush().await;
    })
    .await
    .is_ok();
    if !drained {
        warn!("stopping with requests still in flight: the server did not answer within {DRAIN_LIMIT:?}");
    }
    announce(&fleet, lifecycle::Kind::Shutdown).await;
    service.drops.summary();
    let [(_, requests), (_, hellos), (_, events)] = service.drops.totals();
    info!(
        dropped_requests = requests,
        dropped_hellos = hellos,
        dropped_lifecycle_events = events,
        "provisioner stopped"
    );
    Ok(())
}

/// The provisioner's own Choria lifecycle event (component
/// `perch-provisioner`, identity this host's name), best effort and brief,
/// as Choria's own are.
async fn announce(fleet: &async_nats::Client, kind: lifecycle::Kind) {
    let mut id = [0u8; 16];
    if getrandom::getrandom(&mut id).is_err() {
        return;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let identity = if host.trim().is_empty() { "perch-provisioner" } else { host.trim() };
    let event = lifecycle::Event::new(kind, identity, env!("CARGO_PKG_VERSION"), id, now_unix())
        .from_component(lifecycle::PROVISIONER);
    let sent = async {
        fleet
            .publish(lifecycle::subject_of(kind, lifecycle::PROVISIONER), event.to_json().into())
            .await
            .ok()?;
        fleet.flush().await.ok()
    };
    if !matches!(tokio::time::timeout(Duration::from_secs(2), sent).await, Ok(Some(()))) {
        warn!("Choria {} event not sent", kind.as_str());
    }
}

/// Connects, opens the registry and streams, and subscribes.
async fn start(settings: Settings) -> Result<Ready, ProvisionerError> {
    let now = now_unix();
    let issuer = Issuer::load(&settings.org_dir, now)?;
    let fleet =
        admin::connect(&settings.org_dir, &settings.urls, Account::Fleet, "perch-provisioner", now).await?;
    let prov =
        admin::connect(&settings.org_dir, &settings.urls, Account::Provisioning, "perch-provisioner", now)
            .await?;
    let js = async_nats::jetstream::new(fleet.clone());
    ensure_fleet_streams(&js, settings.replicas).await?;
    let registry = Registry::open(&js).await?;
    let requests = prov
        .queue_subscribe(ENROLL_REQUEST, ENROLL_QUEUE.into())
        .await
        .map_err(|e| ProvisionerError::Subscribe { subject: ENROLL_REQUEST, detail: e.to_string() })?;
    let hellos = fleet
        .queue_subscribe(HELLO_ALL, ENROLL_QUEUE.into())
        .await
        .map_err(|e| ProvisionerError::Subscribe { subject: HELLO_ALL, detail: e.to_string() })?;
    // One instance of the queue group republishes each event.
    let events = fleet
        .queue_subscribe(LIFECYCLE_ALL, ENROLL_QUEUE.into())
        .await
        .map_err(|e| ProvisionerError::Subscribe { subject: LIFECYCLE_ALL, detail: e.to_string() })?;
    let sites = fleet
        .queue_subscribe(SITE_HELLO_ALL, ENROLL_QUEUE.into())
        .await
        .map_err(|e| ProvisionerError::Subscribe { subject: SITE_HELLO_ALL, detail: e.to_string() })?;
    // Make sure the server has the subscriptions before we say we are ready.
    let _ = prov.flush().await;
    let _ = fleet.flush().await;
    info!(org = %issuer.trust.body().org, urls = %settings.urls.join(","), "provisioner ready");
    println!("provisioner ready");
    let drops = DropLog::new(DROP_LOG_INTERVAL);
    let service = Arc::new(Service {
        settings,
        issuer,
        registry,
        fleet,
        drops,
        sites: Default::default(),
        known: Default::default(),
    });
    Ok(Ready { service, prov, requests, hellos, events, sites })
}

/// The fleet's streams and buckets: the provisioner makes them on first
/// start, so a fresh org works with no other setup, and scales them to
/// `replicas` (a single-server fleet moved to a cluster grows in place).
pub async fn ensure_fleet_streams(
    js: &async_nats::jetstream::Context,
    replicas: perch_net::Replicas,
) -> Result<(), ProvisionerError> {
    use perch_net::streams;
    let kv = |e: String| ProvisionerError::Registry(RegistryError::Kv(e));
    perch_net::ensure_stream_with(js, streams::reports(), replicas).await.map_err(kv)?;
    perch_net::ensure_stream_with(js, streams::chunks(), replicas).await.map_err(kv)?;
    for b in streams::BUCKETS {
        perch_net::ensure_kv_with(js, b.name, b.description, b.history, replicas).await.map_err(kv)?;
    }
    Ok(())
}

/// Adds field site `site`'s reports to the hub's `PERCH_REPORTS` sources,
/// unless they are there; whether it added them. JetStream copies each
/// report once and deduplicates by `Nats-Msg-Id` as for a direct publish.
pub async fn add_site_source(js: &async_nats::jetstream::Context, site: &str) -> Result<bool, String> {
    let source = perch_net::sites::hub_reports_source(site);
    let mut stream =
        js.get_stream(subjects::REPORTS_STREAM).await.map_err(|e| format!("opening PERCH_REPORTS: {e}"))?;
    let mut config = stream.info().await.map_err(|e| format!("reading PERCH_REPORTS: {e}"))?.config.clone();
    let sources = config.sources.get_or_insert_with(Vec::new);
    if sources.iter().any(|s| s.name == source.name) {
        return Ok(false);
    }
    sources.push(source);
    js.update_stream(config).await.map_err(|e| format!("updating PERCH_REPORTS: {e}"))?;
    Ok(true)
}

/// Loads the org and checks that it can issue, without connecting.
pub fn preflight(org_dir: &Path) -> Result<(), ProvisionerError> {
    Issuer::load(org_dir, now_unix())?;
    Ok(())
}

impl Service {
    /// A field site announced itself: make sure the hub's `PERCH_REPORTS`
    /// sources its reports. Only the subject is read: the server lets a
    /// site publish only its own hello.
    async fn site_hello(&self, subject: &str) {
        let Some(site) = subject.strip_prefix("perch.site.").filter(|s| perch_net::sites::is_site_name(s))
        else {
            self.drops.note(DropKind::Hello, subject, &"not a site name");
            return;
        };
        {
            let Ok(mut seen) = self.sites.lock() else { return };
            let now = tokio::time::Instant::now();
            if seen.get(site).is_some_and(|t| now.duration_since(*t) < SITE_CHECK_EVERY) {
                return;
            }
            seen.insert(site.to_string(), now);
        }
        let js = async_nats::jetstream::new(self.fleet.clone());
        match add_site_source(&js, site).await {
            Ok(true) => info!(site, "the hub now takes the reports of field site {site}"),
            Ok(false) => debug!(site, "field site already sourced"),
            Err(e) => {
                warn!(site, "field site's reports not sourced (tried again on its next hello): {e}");
                if let Ok(mut seen) = self.sites.lock() {
                    seen.remove(site);
                }
            }
        }
    }

    async fn answer(&self, payload: &[u8]) -> EnrollResponse {
        // Garbage is answered, but logged within a budget (see drop_log).
        let request = match SignedRequest::from_bytes(payload) {
            Ok(r) => r,
            Err(e) => {
                self.drops.note(DropKind::Request, "?", &e);
                return EnrollResponse::Rejected(Rejection::Malformed(e.to_string()));
            }
        };
        let id = request.unverified_body().device_id.clone();
        let request = match request.verify_possession() {
            Ok(r) => r,
            Err(_) => {
                self.drops.note(DropKind::Request, &id, &Rejection::BadPossession);
                return EnrollResponse::Rejected(Rejection::BadPossession);
            }
        };
        match self.enroll(&request).await {
            Ok(r) => r,
            Err(e) => {
                warn!(device = %id, error = %e, "enrollment failed inside the provisioner");
                EnrollResponse::Rejected(Rejection::Internal(e.to_string()))
            }
        }
    }

    async fn enroll(&self, req: &VerifiedRequest) -> Result<EnrollResponse, ProvisionerError> {
        let b = req.body();
        let id = b.device_id.as_str();
        let now = now_unix();
        let Some(text) = &b.token else {
            return Ok(reject(id, Rejection::Token("the request carries no token".into())));
        };
        let token = match SignedToken::parse(text).and_then(|t| t.verify(&self.issuer.trust, now)) {
            Ok(t) => t,
            Err(e) => return Ok(reject(id, Rejection::Token(e.to_string()))),
        };
        let tb = token.body();
        if let Some(g) = b.groups.iter().find(|g| !tb.groups.contains(g)) {
            return Ok(reject(id, Rejection::GroupNotAllowed(g.clone())));
        }
        if let Some(p) = &tb.id_pattern {
            if !glob_match(p, id) {
                return Ok(reject(id, Rejection::IdNotAllowed { id: id.into(), pattern: p.clone() }));
            }
        }
        let groups = if b.groups.is_empty() { tb.groups.clone() } else { b.groups.clone() };
        let key_hex = hex::encode(b.device_key.to_bytes());
        loop {
            let Some((mut rec, rev)) = self.registry.device(id).await? else {
                match self.first_request(req, &token, &groups, now).await? {
                    Some(answer) => return Ok(answer),
                    None => continue, // lost a race for the same id; look again
                }
            };
            if rec.has_nonce(&b.nonce) {
                return Ok(reject(id, Rejection::Replay));
            }
            rec.remember_nonce(&b.nonce);
            rec.updated_at = now;
            let mut revoke_old = None;
            let answer = if rec.key == key_hex {
                match rec.status {
                    Status::Enrolled => None,
                    Status::Approved => {
                        rec.status = Status::Enrolled;
                        rec.enrolled_at = Some(now);
                        None
                    }
                    Status::Pending => Some(pending(id)),
                    Status::Rejected => Some(reject(id, Rejection::RejectedByOperator(id.into()))),
                    Status::Revoked => Some(reject(id, Rejection::Revoked(id.into()))),
                }
            } else {
                match &rec.rekey {
                    Some(Rekey { key, approved: true, .. }) if *key == key_hex => {
                        info!(device = %id, "re-enrollment with a new key, approved by an operator");
                        revoke_old = Some(rec.nats_user.clone());
                        rec.key = key_hex.clone();
                        rec.nats_user = b.device_key.nats_user();
                        rec.rekey = None;
                        rec.status = Status::Enrolled;
                        rec.enrolled_at = Some(now);
                        rec.groups = groups.clone();
                        None
                    }
                    _ => {
                        rec.rekey = Some(Rekey { key: key_hex.clone(), requested_at: now, approved: false });
                        Some(reject(id, Rejection::KeyMismatch(id.into())))
                    }
                }
            };
            // Cut off the old key before the new one is recorded: if the push
            // fails, the record is unchanged and the device asks again.
            if let Some(old) = revoke_old {
                admin::revoke_users(&self.settings.org_dir, &self.settings.urls, &self.registry, &[old], now)
                    .await?;
            }
            if let Cas::Conflict = self.registry.put_device(&rec, Some(rev)).await? {
                continue;
            }
            return Ok(match answer {
                Some(a) => a,
                None => self.enrolled(&rec, b.device_key, now)?,
            });
        }
    }

    /// A device id the registry has never seen. None if another request for
    /// the same id got there first.
    async fn first_request(
        &self,
        req: &VerifiedRequest,
        token: &VerifiedToken,
        groups: &[String],
        now: u64,
    ) -> Result<Option<EnrollResponse>, ProvisionerError> {
        let b = req.body();
        let token_id = hex::encode(token.body().token_id);
        if !self.registry.claim_token_use(&token_id, token.body().uses).await? {
            return Ok(Some(reject(&b.device_id, Rejection::TokenUsedUp)));
        }
        let manual = token.body().approval == Approval::Manual;
        let mut rec = DeviceRecord {
            id: b.device_id.clone(),
            status: if manual { Status::Pending } else { Status::Enrolled },
            key: hex::encode(b.device_key.to_bytes()),
            nats_user: b.device_key.nats_user(),
            groups: groups.to_vec(),
            target: b.target.clone(),
            agent_version: b.agent_version.clone(),
            token: Some(token_id.clone()),
            via: "token".into(),
            created_at: now,
            updated_at: now,
            enrolled_at: (!manual).then_some(now),
            rekey: None,
            nonces: vec![],
        };
        rec.remember_nonce(&b.nonce);
        if let Cas::Conflict = self.registry.put_device(&rec, None).await? {
            self.registry.release_token_use(&token_id).await?;
            return Ok(None);
        }
        if manual {
            info!(device = %rec.id, "enrollment pending approval");
            return Ok(Some(pending(&rec.id)));
        }
        Ok(Some(self.enrolled(&rec, b.device_key, now)?))
    }

    fn enrolled(
        &self,
        rec: &DeviceRecord,
        key: PublicKey,
        now: u64,
    ) -> Result<EnrollResponse, ProvisionerError> {
        let expires = now + self.settings.credential_ttl.as_secs().max(1);
        let e = self.issuer.enrollment(&rec.id, key, &rec.groups, &self.settings.fleet_urls, now, expires)?;
        info!(device = %rec.id, groups = %rec.groups.join(","), "device enrolled");
        Ok(EnrollResponse::Enrolled(Box::new(e)))
    }

    /// A device enrolled offline says hello with its credential: register it.
    async fn hello(&self, subject: &str, payload: &[u8]) {
        let Some(id) = subject.strip_prefix("perch.hello.") else { return };
        let now = now_unix();
        let cred = match SignedCredential::from_bytes(payload) {
            Ok(c) => c,
            Err(e) => return self.drops.note(DropKind::Hello, id, &format_args!("unreadable: {e}")),
        };
        let body = match cred.verify(&self.issuer.trust, now) {
            Ok(b) if b.device_id == id => b.clone(),
            Ok(_) => return self.drops.note(DropKind::Hello, id, &"carries another device's credential"),
            Err(e) => return self.drops.note(DropKind::Hello, id, &format_args!("credential: {e}")),
        };
        let known = |s: &Self| s.known.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string());
        if self.known.lock().unwrap_or_else(|e| e.into_inner()).contains(id) {
            return debug!(device = %id, "hello from a known device");
        }
        match self.registry.device(id).await {
            Ok(Some(_)) => {
                known(self);
                debug!(device = %id, "hello from a known device")
            }
            Ok(None) => {
                let rec = DeviceRecord {
                    id: id.into(),
                    status: Status::Enrolled,
                    key: hex::encode(body.device_key.to_bytes()),
                    nats_user: body.device_key.nats_user(),
                    groups: body.groups.clone(),
                    target: String::new(),
                    agent_version: String::new(),
                    token: None,
                    via: "offline".into(),
                    created_at: now,
                    updated_at: now,
                    enrolled_at: Some(body.issued_at),
                    rekey: None,
                    nonces: vec![],
                };
                match self.registry.put_device(&rec, None).await {
                    Ok(_) => {
                        known(self);
                        info!(device = %id, "registered a device enrolled offline")
                    }
                    Err(e) => warn!(device = %id, error = %e, "could not register an offline device"),
                }
            }
            Err(e) => warn!(device = %id, error = %e, "registry read failed"),
        }
    }
}

impl Service {
    /// A device's lifecycle event: republished for Choria tooling if it is
    /// well formed and about the device whose subject it came on.
    async fn lifecycle(&self, subject: &str, payload: &[u8]) {
        let Some(id) = subject.strip_prefix("perch.lifecycle.") else { return };
        match lifecycle::Event::from_device(payload, id) {
            Ok((kind, event)) => {
                let out = lifecycle::subject(kind);
                if let Err(e) = self.fleet.publish(out, event.to_json().into()).await {
                    warn!(device = %id, error = %e, "could not republish a lifecycle event");
                }
            }
            Err(e) => self.drops.note(DropKind::Lifecycle, id, &e),
        }
    }
}

fn reject(id: &str, why: Rejection) -> EnrollResponse {
    info!(device = %id, reason = %why, "enrollment refused");
    EnrollResponse::Rejected(why)
}

fn pending(id: &str) -> EnrollResponse {
    EnrollResponse::Pending(format!("waiting for a technician: `perch-bootstrap approve {id}`"))
}

/// `*` matches any run of characters, `?` one character; nothing else is special.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The subject-safe id check, for the CLI.
pub fn valid_device_id(id: &str) -> bool {
    subjects::is_token(id)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("drone-*", "drone-7"));
        assert!(glob_match("drone-?", "drone-7"));
        assert!(!glob_match("drone-?", "drone-17"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("desk-*", "drone-1"));
        assert!(glob_match("a*b*c", "aXbYc"));
    }
}
