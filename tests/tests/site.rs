//! A field site: a hub nats-server, and a ground station's nats-server
//! configured by `perch-bootstrap site init` as a leaf node of it with its
//! own JetStream domain, its uplink through the `chaos` proxy; the site's
//! daemon (`perch-bootstrap site run`), the provisioner at the hub, and
//! real agents that connect to the site only.

use std::time::{Duration, Instant};

use perch_protocol::report::Report;
use perch_protocol::subjects;
use perch_tests::chaos::{Mode, Proxy};
use perch_tests::fleet::{wait_for, Device, Running};
use perch_tests::nats::{free_port, NatsServer};
use perch_tests::Scratch;

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
        // The uplink. The hub advertises it as its leafnode address, as a
        // real hub advertises the name sites reach it by: a site that
        // reconnects to an advertised address still goes through it.
        let uplink = Proxy::start(format!("127.0.0.1:{leaf_port}").parse().unwrap());
        let hub = NatsServer::start_with(s.dir.path(), "domain: hub", |_| {
            format!(
                "server_name: hub\ninclude \"org/nats/server.conf\"\n\
                 leafnodes {{\n  listen: \"127.0.0.1:{leaf_port}\"\n  advertise: \"127.0.0.1:{}\"\n  tls {{ cert_file: \"org/tls/server.pem\", key_file: \"org/tls/server.key\", ca_file: \"org/tls/ca.pem\", timeout: 5 }}\n}}\n",
                uplink.port,
            )
        });
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
        let site = NatsServer::start_config(&s.path(&format!("org/sites/{SITE}")), site_port);
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
        let log = self.s.path(&format!("{log}.log"));
        perch_tests::fleet::spawn_ready(self.s.dir.path(), args, &log, ready, "debug")
            .unwrap_or_else(|line| panic!("said {line:?} for {ready:?}\n{}", self.logs()))
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
        let (digest, _) = s.signed_archive(name, counter, name, &file);
        s.publish(&self.hub_url(), &file);
        (hex::encode(digest), std::fs::metadata(s.path(&file)).unwrap().len())
    }

    /// `perch desired set --group g --digest D` at the hub.
    fn desire(&self, digest: &str) {
        self.s.fleet_creds("operator");
        let url = self.hub_url();
        self.s.ok(
            "perch",
            &[
                "desired",
                "set",
                "--creds",
                "operator.creds",
                "--ca",
                "org/tls/ca.pem",
                "--url",
                &url,
                "--group",
                "g",
                "--digest",
                digest,
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
fn stored_reports(
    rt: &tokio::runtime::Runtime,
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<Report> {
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
    let (unwanted, _) = f.published_bundle("other", 7, 1 << 20);
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
    // A bundle nothing wants stays at the hub, where the site's server can
    // copy by bundle (2.10 and later); 2.9 copies every bundle.
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", f.site.port)).unwrap();
    let version = perch_tests::nats::read_info(&mut sock)["version"].as_str().unwrap().to_string();
    let by_bundle = perch_net::sites::filters_per_source(&version);
    assert!(at_site(&f, &digest));
    assert_eq!(at_site(&f, &unwanted), !by_bundle, "site server {version}: unwanted bundle at the site?");
}

/// How long the uplink is cut: the issue's two minutes, unless a developer
/// shortens it while iterating (`PERCH_SITE_CUT_SECS`).
fn cut_length() -> Duration {
    let secs = std::env::var("PERCH_SITE_CUT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    Duration::from_secs(secs)
}

/// Whether the site's server has bundle `digest`'s head (so all of it).
fn at_site(f: &Field, digest: &str) -> bool {
    let (rt, js) = f.js(&f.site_url());
    let Ok(s) = rt.block_on(js.get_stream(subjects::CHUNKS_STREAM)) else { return false };
    rt.block_on(s.get_last_raw_message_by_subject(&format!("perch.chunk.{digest}.m"))).is_ok()
}

/// Each device's reports in `reports`: stored exactly once, no gap from 1.
fn seqs_each_once(reports: &[Report], device: &str) -> Vec<(u64, u64)> {
    let mut ids: Vec<(u64, u64)> =
        reports.iter().filter(|r| r.device == device).map(|r| (r.epoch, r.seq)).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "{device}: {} reports stored twice", n - ids.len());
    let seqs: Vec<u64> = ids.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>(), "{device}: gaps in the sequence");
    ids
}

#[test]
fn an_uplink_cut_loses_no_report_and_a_bundle_crosses_the_uplink_once() {
    let f = Field::start();
    let devices: Vec<Device> = (1..=3).map(|i| f.enrolled_at_site(&format!("drone-{i}"), FAST)).collect();
    let mut agents: Vec<Running> = devices.iter().map(|d| d.spawn_run()).collect();
    let runs = |want: &str| devices.iter().all(|d| running_bundle(d).as_deref() == Some(want));

    // A 64 MiB bundle for three drones crosses the uplink once.
    let (down_before, _) = f.uplink.bytes();
    let (big, size) = f.published_bundle("app", 2, 64 << 20);
    f.desire(&big);
    assert!(wait_for(Duration::from_secs(300), || runs("app#2")), "app#2 not installed\n{}", f.logs());
    let down = f.uplink.bytes().0 - down_before;
    eprintln!(
        "uplink: {down} bytes down for a {size}-byte bundle installed by 3 drones ({:.3}x)",
        down as f64 / size as f64
    );
    assert!(down as f64 <= 1.1 * size as f64, "{down} bytes crossed the uplink for a {size}-byte bundle");

    // The uplink goes down just as a bundle the site has is installed.
    let (next, _) = f.published_bundle("app", 3, 2 << 20);
    let (later, _) = f.published_bundle("app", 4, 1 << 20);
    f.desire(&next);
    assert!(
        wait_for(Duration::from_secs(60), || at_site(&f, &next)),
        "app#3 never reached the site\n{}",
        f.logs()
    );
    f.uplink.set_mode(Mode::Blackhole);
    f.uplink.reset();
    let cut = Instant::now();
    let (rt, site_js) = f.js(&f.site_url());
    let site_count = || {
        rt.block_on(async {
            let mut s = site_js.get_stream(sites_reports()).await.ok()?;
            s.info().await.ok().map(|i| i.state.messages)
        })
        .unwrap_or(0)
    };
    let at_cut = site_count();
    // While it is down: the drones install from the site and keep
    // reporting there; a change of desired state waits at the hub.
    assert!(
        wait_for(cut_length(), || runs("app#3")),
        "app#3 not installed with the uplink down\n{}",
        f.logs()
    );
    f.desire(&later);
    std::thread::sleep(cut_length().saturating_sub(cut.elapsed()));
    assert!(site_count() > at_cut + 100, "the site stored no reports while the uplink was down");
    let now: Vec<Option<String>> = devices.iter().map(running_bundle).collect();
    assert!(runs("app#3"), "the hub's change crossed a cut uplink: {now:?}\n{}", f.logs());
    f.uplink.set_mode(Mode::Pass);
    f.uplink.reset();

    // Back up: the change made while it was down applies.
    let installed = wait_for(Duration::from_secs(120), || runs("app#4"));
    if !installed {
        let info = rt.block_on(async {
            let mut s = site_js.get_stream(subjects::CHUNKS_STREAM).await.ok()?;
            s.info().await.ok().map(|i| format!("{:?}\n{:?}", i.sources, i.state))
        });
        panic!("app#4 not installed after the uplink returned; site chunks: {info:?}\n{}", f.logs());
    }

    // Every report reaches the hub, exactly once: stop the agents, let
    // them flush their outboxes, and compare the hub with the site.
    for a in &mut agents {
        a.kill();
    }
    let mut flushers: Vec<Running> = devices
        .iter()
        .map(|d| {
            d.edit_config("heartbeat = \"200ms\"", "heartbeat = \"1h\"");
            d.spawn_run()
        })
        .collect();
    let (hub_rt, hub_js) = f.js(&f.hub_url());
    let settled = wait_for(Duration::from_secs(120), || {
        let site = stored_reports(&rt, &site_js, &sites_reports()).len();
        let hub = stored_reports(&hub_rt, &hub_js, subjects::REPORTS_STREAM).len();
        std::thread::sleep(Duration::from_secs(2));
        site > 0 && site == hub && site == stored_reports(&rt, &site_js, &sites_reports()).len()
    });
    for fl in &mut flushers {
        fl.kill();
    }
    assert!(settled, "the hub never caught up with the site\n{}", f.logs());
    let site = stored_reports(&rt, &site_js, &sites_reports());
    let hub = stored_reports(&hub_rt, &hub_js, subjects::REPORTS_STREAM);
    for d in &devices {
        let at_hub = seqs_each_once(&hub, &d.name);
        assert_eq!(
            at_hub,
            seqs_each_once(&site, &d.name),
            "{}: the hub's reports are not the site's",
            d.name
        );
        eprintln!("{}: {} reports, each once at the hub", d.name, at_hub.len());
    }
    let st = f.status();
    assert_eq!(st["sites"][0]["lag"], 0, "{st}");
}

fn sites_reports() -> String {
    perch_net::sites::reports_stream(SITE)
}

impl Field {
    /// A raw NATS connection to the site's server as device `d`: its
    /// answer to `CONNECT` + `PING` (`PONG`, or the server's refusal).
    fn connect_at_site_as(&self, d: &Device) -> String {
        let e = d.enrollment();
        let key = d.key();
        let ca = perch_tests::nats::org_ca_der(&self.s.path("org"));
        perch_tests::nats::RawClient::connect(self.site.port, &ca, &e.user_jwt, |nonce| {
            data_encoding::BASE64URL_NOPAD.encode(&key.sign_nats_nonce(nonce).unwrap())
        })
        .1
    }
}

#[test]
fn a_device_revoked_at_the_hub_while_the_uplink_is_down_is_cut_off_at_the_site_once_it_is_up() {
    let f = Field::start();
    let d = f.enrolled_at_site("drone-r", FAST);
    let kept = f.enrolled_at_site("drone-k", FAST);
    assert_eq!(f.connect_at_site_as(&d), "PONG");
    f.uplink.set_mode(Mode::Blackhole);
    f.uplink.reset();
    let r = f.s.run("perch-bootstrap", &["revoke", "--dir", "org", "--url", &f.hub_url(), "drone-r"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The site has not heard: it still lets the device in.
    assert_eq!(f.connect_at_site_as(&d), "PONG", "the revocation crossed a cut uplink");
    f.uplink.set_mode(Mode::Pass);
    f.uplink.reset();
    let refused =
        wait_for(Duration::from_secs(200), || f.connect_at_site_as(&d).contains("Authorization Violation"));
    assert!(refused, "the site still lets a device revoked at the hub in\n{}", f.logs());
    assert_eq!(f.connect_at_site_as(&kept), "PONG", "another device lost its place");
}

#[test]
fn a_sites_leaf_credential_is_no_use_to_a_client_and_a_drones_is_none_to_a_leaf() {
    let f = Field::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ca = perch_tests::nats::org_ca_der(&f.s.path("org"));
    let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(ca)).unwrap();
    let creds = f.s.path(&format!("org/sites/{SITE}/leaf-fleet.creds"));
    let tried = rt.block_on(async {
        async_nats::ConnectOptions::with_credentials_file(&creds)
            .await
            .unwrap()
            .require_tls(true)
            .tls_client_config(tls)
            .connect(perch_net::server_addrs(&[f.hub_url()]).unwrap())
            .await
    });
    let err = tried.expect_err("a leaf credential connected as a client");
    assert!(err.to_string().to_lowercase().contains("authorization"), "{err}");
    // The device JWTs the provisioner issues say the same the other way.
    let d = f.enrolled_at_site("drone-t", FAST);
    let jwt = d.enrollment().user_jwt;
    let claims = jwt.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&data_encoding::BASE64URL_NOPAD.decode(claims.as_bytes()).unwrap()).unwrap();
    assert_eq!(claims["nats"]["allowed_connection_types"], serde_json::json!(["STANDARD"]), "{claims}");
}

#[test]
fn a_ground_station_rebooted_with_the_uplink_down_keeps_serving_its_drones() {
    let mut f = Field::start();
    let d = f.enrolled_at_site("drone-s", FAST);
    let _agent = d.spawn_run();
    let (rt, site_js) = f.js(&f.site_url());
    let at_site = || stored_reports(&rt, &site_js, &sites_reports()).len();
    assert!(wait_for(Duration::from_secs(30), || at_site() > 10), "no reports at the site\n{}", f.logs());
    f.uplink.set_mode(Mode::Blackhole);
    f.uplink.reset();
    // The site's server dies and comes back with no uplink: it still
    // knows the accounts (its own resolver store) and its streams.
    f.site.restart();
    assert_eq!(f.connect_at_site_as(&d), "PONG", "the site no longer lets its drone in");
    let before = at_site();
    assert!(
        wait_for(Duration::from_secs(60), || at_site() > before + 20),
        "the drone's reports no longer reach the restarted site\n{}",
        f.logs()
    );
    f.uplink.set_mode(Mode::Pass);
    f.uplink.reset();
    // Everything it stored reaches the hub, each once.
    let (hub_rt, hub_js) = f.js(&f.hub_url());
    let caught_up = wait_for(Duration::from_secs(90), || {
        let site = stored_reports(&rt, &site_js, &sites_reports());
        let hub = stored_reports(&hub_rt, &hub_js, subjects::REPORTS_STREAM);
        let last = site.iter().map(|r| r.seq).max().unwrap_or(0);
        hub.iter().any(|r| r.seq == last) && hub.len() >= site.len()
    });
    assert!(caught_up, "the hub never caught up with the restarted site\n{}", f.logs());
    seqs_each_once(&stored_reports(&hub_rt, &hub_js, subjects::REPORTS_STREAM), "drone-s");
}
