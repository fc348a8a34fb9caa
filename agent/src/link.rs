//! The device's FLEET link: its own NATS user (the device key signs the
//! server's nonce), TLS trusted by the fleet CA from its enrollment only,
//! and its private inbox prefix. On every (re)connect it says hello with
//! its credential, so the provisioner learns of devices enrolled offline.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Event;
use perch_net::{CaTrust, LinkOptions, Signer, User};
use perch_protocol::enroll::VerifiedEnrollment;
use perch_protocol::lifecycle::{self, Kind};
use perch_protocol::subjects;
use perch_protocol::SecretKey;
use tracing::{info, warn};

/// How the device's link behaves.
pub fn link_options(device_id: &str) -> LinkOptions {
    LinkOptions {
        name: format!("perch-agent {device_id}"),
        inbox_prefix: Some(subjects::inbox_prefix(device_id)),
        ..LinkOptions::default()
    }
}

fn user(v: &VerifiedEnrollment, key: Arc<SecretKey>) -> User {
    User { jwt: v.enrollment.user_jwt.clone(), signer: Signer::Device(key) }
}

/// The URLs the FLEET link uses: the configured ones (`link.urls`, a field
/// site's server) or else the enrollment's.
pub fn fleet_urls<'a>(v: &'a VerifiedEnrollment, configured: &'a [String]) -> &'a [String] {
    if configured.is_empty() {
        &v.enrollment.fleet_urls
    } else {
        configured
    }
}

/// One connection attempt to FLEET (at `urls`, see [`fleet_urls`]), then hello.
pub async fn connect_once(
    v: &VerifiedEnrollment,
    urls: &[String],
    key: Arc<SecretKey>,
) -> Result<async_nats::Client, perch_net::LinkError> {
    let id = &v.credential.device_id;
    let client = perch_net::connect(
        urls,
        &user(v, key),
        &CaTrust::Certificate(v.enrollment.ca_der.clone()),
        &link_options(id),
    )
    .await?;
    hello(&client, v).await;
    Ok(client)
}

async fn hello(client: &async_nats::Client, v: &VerifiedEnrollment) {
    let id = &v.credential.device_id;
    if let Err(e) = client.publish(subjects::hello(id), v.enrollment.credential.clone().into()).await {
        warn!(device = %id, error = %e, "hello not sent");
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        warn!(device = %id, error = %e, "hello not flushed");
    }
}

/// How the FLEET link behaves.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub ping_interval: Duration,
    pub max_backoff: Duration,
    /// How often a Choria `alive` event goes out while the link is up
    /// (the report heartbeat's interval).
    pub alive_every: Duration,
    /// `link.urls`: empty for the enrollment's URLs.
    pub urls: Vec<String>,
}

/// The FLEET link of a running agent.
pub struct Link {
    pub client: async_nats::Client,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    /// Notified on every (re)connect: whoever must catch up after an
    /// outage (the desired state) waits on it.
    pub connected: Arc<tokio::sync::Notify>,
    v: VerifiedEnrollment,
    urls: Vec<String>,
    state_dir: std::path::PathBuf,
    state_file: std::path::PathBuf,
    alive_every: Duration,
}

/// The events this process has sent of those `announce` owes.
#[derive(Default)]
struct Sent {
    provisioned: bool,
    upgrade: Option<crate::announce::Upgrade>,
}

/// What `status` shows of the link: written by the running agent.
pub const STATE_FILE: &str = "link.json";

/// The link's state as the running agent last wrote it ([`STATE_FILE`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinkState {
    /// `connecting`, `connected` or `disconnected`.
    pub state: String,
    /// Unix seconds.
    pub since: u64,
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub last_event: Option<String>,
}

impl LinkState {
    /// What the running agent wrote, if anything readable. Bounded: a
    /// damaged file must not cost the device its memory.
    pub fn read(state_dir: &std::path::Path) -> Option<LinkState> {
        let bytes = perch_support::durable::read_bounded(&state_dir.join(STATE_FILE), 64 * 1024).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Starts the link: returns at once, connected or not. The client connects
/// in the background (the agent works with no link at all), pings every
/// `ping_interval` so a dead link is noticed after two missed pongs, and
/// reconnects with exponential backoff and jitter.
pub async fn start(
    v: VerifiedEnrollment,
    key: Arc<SecretKey>,
    settings: &LinkSettings,
    state_dir: &std::path::Path,
) -> Result<Link, perch_net::LinkError> {
    let id = v.credential.device_id.clone();
    let (tx, events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let mut opts = link_options(&id);
    opts.ping_interval = settings.ping_interval;
    let max = settings.max_backoff;
    let nats = perch_net::options(&user(&v, key), &CaTrust::Certificate(v.enrollment.ca_der.clone()), &opts)?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| crate::enroll::backoff(attempts.min(16) as u32, max))
        .event_callback(move |ev| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ev);
            }
        });
    let urls = fleet_urls(&v, &settings.urls).to_vec();
    let client = nats
        .connect(perch_net::server_addrs(&urls)?)
        .await
        .map_err(|err| perch_net::LinkError::Connect { urls: urls.join(","), err })?;
    let link = Link {
        client,
        events,
        connected: Arc::default(),
        v,
        urls,
        state_dir: state_dir.to_path_buf(),
        state_file: state_dir.join(STATE_FILE),
        alive_every: settings.alive_every,
    };
    link.record("connecting", None);
    Ok(link)
}

impl Link {
    /// Follows the link's events until `stop` is notified: hello on every
    /// connect, a Choria startup event on the first, the state written for
    /// `status`; while up, `alive` at its interval and the `provisioned` and
    /// `upgraded` events owed (see [`crate::announce`]); on `stop`, a Choria
    /// shutdown event (if the link is up).
    pub async fn watch(mut self, stop: Arc<tokio::sync::Notify>) {
        let id = self.v.credential.device_id.clone();
        let mut announced = false;
        // Up once hello and startup went out: nothing else goes before them.
        let mut up = false;
        let mut sent = Sent::default();
        let mut alive = tokio::time::interval(self.alive_every.max(Duration::from_millis(100)));
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        alive.tick().await;
        // A commit is announced within a couple of seconds of the journal
        // saying so, whoever's engine made it.
        crate::announce::baseline(&self.state_dir);
        let mut owed = tokio::time::interval(Duration::from_secs(2));
        owed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ev = tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = alive.tick() => {
                    if up {
                        self.lifecycle(Kind::Alive).await;
                    }
                    continue;
                }
                _ = owed.tick() => {
                    if up {
                        self.send_owed(&mut sent).await;
                    }
                    continue;
                }
                _ = stop.notified() => {
                    self.lifecycle(Kind::Shutdown).await;
                    return;
                }
            };
            match ev {
                Event::Connected => {
                    info!(device = %id, "FLEET link up");
                    self.record("connected", None);
                    hello(&self.client, &self.v).await;
                    if !announced {
                        announced = self.lifecycle(Kind::Startup).await;
                    }
                    up = true;
                    self.send_owed(&mut sent).await;
                    self.connected.notify_one();
                }
                Event::Disconnected => {
                    up = false;
                    warn!(device = %id, "FLEET link down");
                    self.record("disconnected", None);
                }
                other => {
                    warn!(device = %id, "FLEET link: {other}");
                    self.record_event(&other.to_string());
                }
            }
        }
    }

    /// `provisioned` and `upgraded`, if owed; each marked sent only once
    /// the server has it, and remembered here too, so a record that cannot
    /// be written (a full disk) does not repeat the event every tick.
    async fn send_owed(&self, sent: &mut Sent) {
        if !sent.provisioned
            && crate::announce::provisioned_owed(&self.state_dir)
            && self.lifecycle(Kind::Provisioned).await
        {
            sent.provisioned = true;
            crate::announce::provisioned_sent(&self.state_dir);
        }
        let owed =
            crate::announce::upgrade_owed(&self.state_dir).filter(|u| sent.upgrade.as_ref() != Some(u));
        if let Some(u) = owed {
            let ev =
                lifecycle::Event::upgraded(&self.v.credential.device_id, &u.before, &u.after, [0; 16], 0);
            if self.send(Kind::Upgraded, ev).await {
                crate::announce::upgraded_sent(&self.state_dir, &u);
                sent.upgrade = Some(u);
            }
        }
    }

    /// Publishes a Choria lifecycle event of `kind` and waits (briefly) for
    /// it to be written; whether it was.
    async fn lifecycle(&self, kind: Kind) -> bool {
        let ev =
            lifecycle::Event::new(kind, &self.v.credential.device_id, env!("CARGO_PKG_VERSION"), [0; 16], 0);
        self.send(kind, ev).await
    }

    /// Sends `ev` with a fresh id and the time now.
    async fn send(&self, kind: Kind, ev: lifecycle::Event) -> bool {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return false;
        }
        let mut uuid = [0u8; 16];
        if getrandom::getrandom(&mut uuid).is_err() {
            return false;
        }
        let id = &self.v.credential.device_id;
        let ev = ev.stamped(uuid, perch_support::now_unix());
        let sent = async {
            // Its own subject: the provisioner republishes it for Choria.
            self.client.publish(subjects::lifecycle(id), ev.to_json().into()).await.ok()?;
            self.client.flush().await.ok()
        };
        let ok = matches!(tokio::time::timeout(Duration::from_secs(2), sent).await, Ok(Some(())));
        if !ok {
            warn!(device = %id, "Choria {} event not sent", kind.as_str());
        }
        ok
    }

    fn record(&self, state: &str, event: Option<&str>) {
        let doc = LinkState {
            state: state.to_string(),
            since: perch_support::now_unix(),
            urls: self.urls.clone(),
            last_event: event.map(str::to_string),
        };
        // Best effort: status is informative, the link does not depend on it.
        let Ok(bytes) = serde_json::to_vec(&doc) else { return };
        let _ = perch_support::durable::write_bytes(
            &self.state_file,
            0o644,
            perch_support::durable::Replace::Allow,
            &bytes,
        );
    }

    fn record_event(&self, event: &str) {
        let state = match self.client.connection_state() {
            async_nats::connection::State::Connected => "connected",
            async_nats::connection::State::Disconnected => "disconnected",
            async_nats::connection::State::Pending => "connecting",
        };
        self.record(state, Some(event));
    }
}
