//! A field site: a hub nats-server, and a ground station's nats-server
//! configured by `perch-bootstrap site init` as a leaf node of it with its
//! own JetStream domain, its uplink through the `chaos` proxy; the site's
//! daemon (`perch-bootstrap site run`), the provisioner at the hub, and
//! real agents that connect to the site only.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use perch_protocol::report::Report;
use perch_protocol::subjects;
use perch_tests::chaos::{Mode, Proxy};
use perch_tests::fleet::{wait_for, Device, Running};
use perch_tests::nats::{free_port, NatsServer};
use perch_tests::{bin, Scratch};

const SITE: &str = "alpha";

/// A hub, a field site behind an uplink, a provisioner and the site daemon.
struct Field {
    s: Scratch,
    hub: NatsServer,
    uplink: Proxy,
    site: NatsServer,
    provisioner: Option<Running>,
    daemon: Option<Running>,
}

impl Field {
    fn start() -> Field {
        let s = Scratch::new();
        s.org(1, 1);
        let leaf_port = free_port();
        let hub_js = s.path("hub-js");
        let hub = NatsServer::start_with(s.dir.path(), |port| {
            format!(
                "server_name: hub\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ store_dir: \"{}\", domain: hub }}\n\
                 include \"org/nats/server.conf\"\n\
                 leafnodes {{\n  listen: \"127.0.0.1:{leaf_port}\"\n  tls {{ cert_file: \"org/tls/server.pem\", key_file: \"org/tls/server.key\", ca_file: \"org/tls/ca.pem\", timeout: 5 }}\n}}\n",
                hub_js.display()
            )
        });
        let uplink = Proxy::start(format!("127.0.0.1:{leaf_port}").parse().unwrap());
        let site_port = free_port();
        s.ok(
            "perch-bootstrap",
            &[
                "site",
                "init",
                "--dir",
                "org",
                "--name",
                SITE,
                "--hub",
                &uplink.url(),
                "--host",
                "127.0.0.1",
                "--bind",
                "127.0.0.1",
                "--client-port",
                &site_port.to_string(),
                "--max-store",
                "1G",
            ],
        );
        let site = NatsServer::start_configured(&s.path(&format!("org/sites/{SITE}")), site_port);
        let mut f = Field { s, hub, uplink, site, provisioner: None, daemon: None };
        f.provisioner = Some(f.spawn_ready(
            "provisioner",
            &["run", "--dir", "org", "--url", &f.hub_url()],
            "provisioner ready",
        ));
        f.daemon = Some(f.spawn_ready(
            "site",
            &["site", "run", "--dir", &format!("org/sites/{SITE}")],
            &format!("site {SITE} ready"),
        ));
        f
    }

    fn hub_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.hub.port)
    }

    fn site_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.site.port)
    }

    /// A perch-bootstrap process that prints `ready` once it is.
    fn spawn_ready(&self, log: &str, args: &[&str], ready: &str) -> Running {
        let log_file = std::fs::File::create(self.s.path(&format!("{log}.log"))).unwrap();
        let mut child = Command::new(bin("perch-bootstrap"))
            .args(args)
            .current_dir(self.s.dir.path())
            .env("PERCH_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), ready, "{}", self.logs());
        std::thread::spawn(move || for _ in out.lines() {});
        Running(child)
    }

    fn logs(&self) -> String {
        let mut all = format!("--- hub ---\n{}\n--- site ---\n{}", self.hub.log(), self.site.log());
        for e in std::fs::read_dir(self.s.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") && e.file_name() != "nats-server.log" {
                all.push_str(&format!("\n--- {} ---\n", e.file_name().to_string_lossy()));
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }

    /// A device enrolled online through the site (its token names the
    /// site's server: the request crosses the uplink to the provisioner),
    /// told to connect to the site (`link.urls`).
    fn enrolled_at_site(&self, name: &str, extra: &str) -> Device {
        let url = self.site_url();
        let token = self
            .s
            .ok("perch-bootstrap", &["token", "issue", "--dir", "org", "--url", &url, "--group", "g"])
            .stdout;
        let token_file = self.s.path(&format!("{name}.token"));
        std::fs::write(&token_file, token.trim()).unwrap();
        let d = Device { dir: self.s.path(name), name: name.into() };
        std::fs::create_dir_all(d.dir.join("slots")).unwrap();
        d.write_config(&format!("[device]\nid = \"{name}\"\n[link]\nurls = [\"{url}\"]\n{extra}"));
        let r = d.agent(&["enroll", "--device-id", name, "--token-file", token_file.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}\n{}", r.stderr, self.logs());
        d
    }

    /// Builds, signs and publishes at the hub an archive bundle of `len`
    /// pseudo-random bytes; its digest (hex) and file size.
    fn published_bundle(&self, name: &str, counter: u32, len: usize) -> (String, u64) {
        let s = &self.s;
        std::fs::create_dir_all(s.path(name)).unwrap();
        s.write_payload(&format!("{name}/data.bin"), len, counter as u8);
        let file = format!("{name}.perch");
        let input = s.path(name);
        let counter = counter.to_string();
        s.ok(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                name,
                "--counter",
                &counter,
                "--kind",
                "archive",
                "--input",
                input.to_str().unwrap(),
                "--out",
                &file,
            ],
        );
        s.ok("perch", &["bundle", "sign", "--key", "k1.key", &file]);
        s.fleet_creds("release");
        let url = self.hub_url();
        s.ok(
            "perch",
            &[
                "publish",
                "--trust",
                "org/trust.doc",
                "--creds",
                "release.creds",
                "--ca",
                "org/tls/ca.pem",
                "--url",
                &url,
                &file,
            ],
        );
        let v: serde_json::Value =
            serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", &file]).stdout).unwrap();
        let size = std::fs::metadata(s.path(&file)).unwrap().len();
        (v["digest"].as_str().unwrap().to_string(), size)
    }

    /// `perch desired set --group g --digest D` at the hub.
    fn desire(&self, digest: &str) {
        self.s.fleet_creds("operator");
        let url = self.hub_url();
        self.s.ok(
            "perch",
            &[
                "desired", "set", "--creds", "operator.creds", "--ca", "org/tls/ca.pem", "--url", &url, "--group",
                "g", "--digest", digest,
            ],
        );
    }

    /// `perch status --json` at the hub.
    fn status(&self) -> serde_json::Value {
        self.s.fleet_creds("operator");
        let url = self.hub_url();
        let r = self.s.ok(
            "perch",
            &["status", "--json", "--creds", "operator.creds", "--ca", "org/tls/ca.pem", "--url", &url],
        );
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// A JetStream client as a FLEET user at `url`.
    fn js(&self, url: &str) -> (tokio::runtime::Runtime, async_nats::jetstream::Context) {
        let creds = self.s.fleet_creds("reader");
        let ca = perch_tests::nats::org_ca_der(&self.s.path("org"));
        perch_tests::fleet::jetstream_client(&creds, ca, perch_net::server_addrs(&[url.to_string()]).unwrap())
    }
}

/// What a device's agent says it runs, from `perch-agent status --json`.
fn running_bundle(d: &Device) -> Option<String> {
    let r = d.agent(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
    let b = &v["slots"][v["booted_slot"].as_str()?];
    Some(format!("{}#{}", b["name"].as_str()?, b["counter"]))
}

/// Every report in `stream` (at the server `js` talks to), in order.
fn stored_reports(rt: &tokio::runtime::Runtime, js: &async_nats::jetstream::Context, stream: &str) -> Vec<Report> {
    let Ok(mut s) = rt.block_on(js.get_stream(stream)) else { return vec![] };
    let info = rt.block_on(s.info()).unwrap().clone();
    if info.state.messages == 0 {
        return vec![];
    }
    (info.state.first_sequence..=info.state.last_sequence)
        .filter_map(|seq| rt.block_on(s.get_raw_message(seq)).ok())
        .map(|m| Report::from_bytes(&m.payload).unwrap())
        .collect()
}

const FAST: &str = "[reports]\nheartbeat = \"200ms\"\nack_timeout = \"2s\"\n[fetch]\nresync = \"5s\"\n";

#[test]
fn drones_enroll_report_and_install_through_a_field_site() {
    let f = Field::start();
    let devices: Vec<Device> = (1..=3).map(|i| f.enrolled_at_site(&format!("drone-{i}"), FAST)).collect();
    let _agents: Vec<Running> = devices.iter().map(|d| d.spawn_run()).collect();
    let (digest, _size) = f.published_bundle("app", 2, 1 << 20);
    f.desire(&digest);
    let all_run = wait_for(Duration::from_secs(90), || {
        devices.iter().all(|d| running_bundle(d).as_deref() == Some("app#2"))
    });
    assert!(all_run, "not every drone installed app#2 through the site\n{}", f.logs());
    // The hub has their reports, and knows they came through the site.
    let seen = wait_for(Duration::from_secs(60), || {
        let st = f.status();
        st["devices"].as_array().unwrap().iter().filter(|d| d["site"] == SITE).count() == 3
    });
    assert!(seen, "the hub does not show the drones at the site: {}\n{}", f.status(), f.logs());
    let st = f.status();
    assert_eq!(st["sites"][0]["name"], SITE, "{st}");
    let _ = (Instant::now(), Mode::Pass, subjects::REPORTS_STREAM, stored_reports);
}
