//! A field site on this machine, for the demo and `bench site`: a hub
//! whose leafnode listener sits behind an uplink (the `chaos` proxy, so it
//! can be cut and its bytes counted), and a ground station: its config
//! from `perch-bootstrap site init`, its nats-server and `site run`.
//!
//! The hub advertises the uplink as its leafnode address, as a real hub
//! advertises the name sites reach it by: otherwise a site that reconnects
//! would learn the listener's own address and go around the uplink.

use std::net::TcpListener;
use std::path::Path;

use anyhow::Result;
use perch_chaos::{Mode, Proxy};

use crate::fleet::LocalFleet;

/// The hub's JetStream domain (`site init`'s default).
const HUB_DOMAIN: &str = "hub";

/// The link between the hub and a ground station.
pub struct Uplink {
    proxy: Proxy,
    leaf_port: u16,
}

impl Uplink {
    /// A proxy in front of a leafnode port the hub does not listen on yet.
    pub fn new() -> Result<Uplink> {
        let leaf_port = free_port()?;
        Ok(Uplink { proxy: Proxy::start(([127, 0, 0, 1], leaf_port).into()), leaf_port })
    }

    /// Starts the hub: the org's nats-server (see [`LocalFleet`]) with a
    /// JetStream domain and a leafnode listener over the fleet's TLS,
    /// advertising this uplink.
    pub fn hub(&self, dir: &Path, bin: &Path) -> Result<LocalFleet> {
        let tls = dir.join("org/tls");
        let f = |name: &str| tls.join(name).display().to_string();
        let leafnodes = format!(
            "server_name: {HUB_DOMAIN}\nleafnodes {{\n  listen: \"127.0.0.1:{}\"\n  advertise: \"127.0.0.1:{}\"\n  tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", timeout: 5 }}\n}}\n",
            self.leaf_port,
            self.proxy.port,
            f("server.pem"),
            f("server.key"),
            f("ca.pem"),
        );
        LocalFleet::start_with(dir, bin, &format!(", domain: {HUB_DOMAIN}"), &leafnodes)
    }

    /// Where the site connects: the proxy.
    pub fn url(&self) -> String {
        self.proxy.url()
    }

    /// Bytes that crossed it so far: (hub → site, site → hub).
    pub fn bytes(&self) -> (u64, u64) {
        self.proxy.bytes()
    }

    /// The uplink drops: bytes stop moving and every connection across it
    /// is cut, so the site notices now rather than at its next ping.
    pub fn cut(&self) {
        self.proxy.set_mode(Mode::Blackhole);
        self.proxy.reset();
    }

    /// It returns; the connections held while it was down are closed, so
    /// the site connects again at once.
    pub fn restore(&self) {
        self.proxy.set_mode(Mode::Pass);
        self.proxy.reset();
    }
}

/// A ground station's server on this machine.
pub struct Site {
    pub name: String,
    /// Where its drones connect: `tls://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
}

impl Site {
    /// A site on a free loopback port; nothing written yet.
    pub fn new(name: &str) -> Result<Site> {
        let port = free_port()?;
        Ok(Site { name: name.into(), url: format!("tls://127.0.0.1:{port}"), port })
    }

    /// The `perch-bootstrap` arguments that write it (`site init`, in
    /// `org/sites/NAME/`), connecting to the hub at `hubs` (leafnode URLs).
    pub fn init_args(&self, hubs: &[String]) -> Vec<String> {
        let port = self.port.to_string();
        let mut args: Vec<String> =
            ["site", "init", "--dir", "org", "--name", &self.name].map(String::from).to_vec();
        for h in hubs {
            args.extend(["--hub".into(), h.clone()]);
        }
        args.extend(
            ["--host", "127.0.0.1", "--bind", "127.0.0.1", "--client-port", &port, "--max-store", "1G"]
                .map(String::from),
        );
        args
    }

    /// Starts its nats-server and its daemon (`site run`, which prints
    /// `site NAME ready` once the site's streams are made), both stopped
    /// with the fleet. Logs: `NAME-nats-server.log`, `NAME-site.log`.
    pub fn start(&self, fleet: &mut LocalFleet) -> Result<()> {
        let dir = format!("org/sites/{}", self.name);
        let conf = fleet.dir.join(&dir).join("nats-server.conf");
        fleet.server(&format!("{}-nats-server", self.name), &conf, self.port)?;
        fleet.ready(
            &format!("{}-site", self.name),
            &["site", "run", "--dir", &dir],
            &format!("site {} ready", self.name),
        )
    }

    /// Whether the site's daemon has said that the bundle `digest` (hex)
    /// has arrived whole at the site, for a device that wants it.
    pub fn has_whole(&self, fleet: &LocalFleet, digest: &str) -> bool {
        let log = fleet.dir.join(format!("{}-site.log", self.name));
        logged(&log, "bundle arrived whole at the site", digest)
    }
}

/// Whether the log at `path` has a line with `message` about the bundle
/// `digest` (hex; perch logs its first 16 digits).
pub fn logged(path: &Path, message: &str, digest: &str) -> bool {
    let short = digest.get(..16).unwrap_or(digest);
    let log = std::fs::read_to_string(path).unwrap_or_default();
    log.lines().any(|l| l.contains(message) && l.contains(short))
}

/// Whether an agent's `perch-agent status --json` says its last deploy
/// committed the bundle with this counter.
pub fn committed(status: &serde_json::Value, counter: u64) -> bool {
    let last = &status["last_outcome"];
    last["outcome"] == "committed" && last["bundle"]["counter"] == counter
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
