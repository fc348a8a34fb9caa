//! A field site configured by `perch-bootstrap site init`: a real
//! nats-server as a leaf node of a real hub (one server with JetStream
//! domain `hub` and a leafnode listener), each with its own JetStream
//! domain. Each account's leaf connection comes up with its own
//! credentials; JetStream is reachable across the domains; reports and
//! desired state never cross the leaf as plain messages.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use perch_protocol::subjects;
use perch_tests::fleet::{wait_for, Fleet};
use perch_tests::nats::{org_ca_der, server_binary, NatsCluster, NatsServer};
use perch_tests::Scratch;

const SITE: &str = "field-1";

fn check_config(conf: &Path) {
    let out = Command::new(server_binary()).arg("-t").arg("-c").arg(conf).output().unwrap();
    assert!(out.status.success(), "{}: {}", conf.display(), String::from_utf8_lossy(&out.stderr));
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generated_hub_and_site_configs_pass_nats_server_config_check() {
    let s = Scratch::new();
    s.org(1, 1);
    // The hub: a cluster whose servers have the domain and a leafnode listener.
    let mut args = vec!["nats", "cluster", "--dir", "org", "--config-dir", "/etc/nats"];
    args.extend([
        "--server",
        "a=hub-a.example",
        "--server",
        "b=hub-b.example",
        "--server",
        "c=10.0.0.3:4223:6223:7423",
    ]);
    let out = s.ok("perch-bootstrap", &args);
    assert!(
        out.stdout.contains(
            "--hub tls://hub-a.example:7422 --hub tls://hub-b.example:7422 --hub tls://10.0.0.3:7423"
        ),
        "{}",
        out.stdout
    );
    for n in ["a", "b", "c"] {
        let conf = s.path(&format!("org/nats/cluster/{n}/nats-server.conf"));
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(text.contains("domain: \"hub\""), "{text}");
        let leaf = if n == "c" { "7423" } else { "7422" };
        assert!(text.contains(&format!("leafnodes {{\n    listen: \"0.0.0.0:{leaf}\"")), "{text}");
        let local = text.replace("/etc/nats", conf.parent().unwrap().to_str().unwrap());
        let checked = s.path(&format!("{n}.conf"));
        std::fs::write(&checked, local).unwrap();
        check_config(&checked);
    }

    let mut args = vec!["site", "init", "--dir", "org", "--name", SITE, "--host", "ground.example"];
    args.extend(["--hub", "tls://hub-a.example:7422", "--hub", "tls://hub-b.example:7422"]);
    args.extend([
        "--config-dir",
        "/etc/perch-site",
        "--store-dir",
        "/var/lib/perch-site",
        "--max-store",
        "2G",
    ]);
    s.ok("perch-bootstrap", &args);
    let dir = s.path(&format!("org/sites/{SITE}"));
    let text = std::fs::read_to_string(dir.join("nats-server.conf")).unwrap();
    assert!(text.contains(&format!("server_name: \"site-{SITE}\"")), "{text}");
    assert!(text.contains(&format!("domain: \"{SITE}\"")) && text.contains("max_file_store: 2147483648"));
    assert_eq!(text.matches("credentials: ").count(), 3, "one remote per account: {text}");
    assert_eq!(text.matches("tls://hub-b.example:7422").count(), 3, "{text}");
    // The FLEET remote alone denies the plain copies, both ways.
    for subject in subjects::SITE_LEAF_DENY {
        assert_eq!(text.matches(&format!("\"{subject}\"")).count(), 2, "{subject}: {text}");
    }
    for f in ["leaf-fleet.creds", "leaf-provisioning.creds", "leaf-sys.creds", "site.creds", "server.key"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let site: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("site.json")).unwrap()).unwrap();
    assert_eq!(site["domain"], SITE);
    assert_eq!(site["hub_domain"], "hub");
    assert_eq!(site["client_url"], "tls://ground.example:4222");
    assert_eq!(site["store_limit"], 2u64 << 30);
    assert_eq!(site["creds"], "/etc/perch-site/site.creds");
    let local = text.replace("/etc/perch-site", dir.to_str().unwrap());
    let checked = s.path("site.conf");
    std::fs::write(&checked, local).unwrap();
    check_config(&checked);

    // Bad input: exit 2, one line, nothing written.
    let base = ["site", "init", "--dir", "org", "--host", "g", "--hub", "tls://h:7422"];
    for (extra, says) in [
        (vec!["--name", "Field"], "a-z 0-9"),
        (vec!["--name", "hub"], "hub's JetStream domain"),
        (vec!["--name", "a.b"], "a-z 0-9"),
        (vec!["--name", "ok", "--hub", "nats://h:7422"], "tls://HOST:PORT"),
        (vec!["--name", "ok", "--host", "bad host"], "DNS name"),
        (vec!["--name", "ok", "--max-store", "lots"], "size"),
        (vec!["--name", SITE], "already exists"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra.iter());
        let r = s.run("perch-bootstrap", &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
        if says != "size" {
            // clap's own errors say more; ours are one line.
            assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        }
    }
    assert!(!s.path("org/sites/ok").exists());
}

/// A hub, and a site from `site init` connected to it as a leaf node.
struct HubAndSite {
    s: Scratch,
    hub: NatsServer,
    site: NatsServer,
}

impl HubAndSite {
    fn start() -> HubAndSite {
        let s = Scratch::new();
        s.org(1, 1);
        let (hub, leaf_port) = NatsServer::start_hub(s.dir.path(), "org");
        let site = start_site(&s, &[format!("tls://127.0.0.1:{leaf_port}")]);
        let h = HubAndSite { s, hub, site };
        wait_for_leaves(&h.site, 3, &h.logs());
        h
    }

    fn logs(&self) -> String {
        format!("--- hub ---\n{}\n--- site ---\n{}", self.hub.log(), self.site.log())
    }

    fn hub_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.hub.port)
    }

    fn site_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.site.port)
    }

    /// A user of `account` (fleet or provisioning) made by `nats creds`.
    fn creds(&self, account: &str, name: &str) -> std::path::PathBuf {
        let file = format!("{name}.creds");
        let args = ["nats", "creds", "--dir", "org", "--account", account, "--name", name, "--out", &file];
        self.s.ok("perch-bootstrap", &args);
        self.s.path(&file)
    }
}

/// Writes site `SITE` with `site init` for `hubs` and starts its server on
/// a free loopback port.
fn start_site(s: &Scratch, hubs: &[String]) -> NatsServer {
    let client_port = perch_tests::nats::free_port();
    let port = client_port.to_string();
    let mut args = vec!["site", "init", "--dir", "org", "--name", SITE];
    for h in hubs {
        args.extend(["--hub", h.as_str()]);
    }
    args.extend(["--host", "127.0.0.1", "--bind", "127.0.0.1", "--client-port", &port]);
    s.ok("perch-bootstrap", &args);
    NatsServer::start_config(&s.path(&format!("org/sites/{SITE}")), client_port)
}

/// Waits until the site has made `n` leaf connections in all (three per
/// connect: FLEET, PROVISIONING, SYS, each with its own credentials).
fn wait_for_leaves(site: &NatsServer, n: usize, logs: &str) {
    let start = Instant::now();
    while site.log().matches("Leafnode connection created for account").count() < n {
        assert!(start.elapsed() < Duration::from_secs(30), "no leaf connections: {logs}\n{}", site.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    for account in ["FLEET", "PROVISIONING", "SYS"] {
        assert!(site.log().contains(&format!("/{account}")), "{account}: {}", site.log());
    }
}

/// The hub leafnode port the site's last FLEET leaf connection went to
/// (its log: `127.0.0.1:PORT - lid:N - Leafnode connection created for
/// account: KEY/FLEET`).
fn fleet_leaf_port(site: &NatsServer) -> u16 {
    let log = site.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("Leafnode connection created") && l.trim_end().ends_with("/FLEET"))
        .unwrap_or_else(|| panic!("no FLEET leaf connection: {log}"));
    let addr = line.split(" - ").next().unwrap().rsplit(' ').next().unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap_or_else(|_| panic!("no port in {line}"))
}

async fn connect(creds: &Path, ca: &[u8], url: &str) -> async_nats::Client {
    let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(ca.to_vec())).unwrap();
    async_nats::ConnectOptions::with_credentials_file(creds.to_path_buf())
        .await
        .unwrap()
        .require_tls(true)
        .tls_client_config(tls)
        .connect(url)
        .await
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn stream_config(name: &str, subject: &str) -> stream::Config {
    stream::Config { name: name.into(), subjects: vec![subject.into()], ..Default::default() }
}

/// Publishes `subject` on `from` until `sub` hears it (interest crosses
/// the leaf a moment after the subscription is made); every subject
/// `sub` heard before it is returned.
async fn publish_until_heard(
    from: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    subject: &str,
) -> Vec<String> {
    let start = Instant::now();
    let mut heard = Vec::new();
    loop {
        from.publish(subject.to_string(), "x".into()).await.unwrap();
        from.flush().await.unwrap();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            if m.subject.as_str() == subject {
                return heard;
            }
            heard.push(m.subject.to_string());
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{subject} never arrived; heard {heard:?}");
    }
}

#[test]
fn a_site_is_a_leaf_node_with_its_own_jetstream_domain() {
    let h = HubAndSite::start();
    let ca = org_ca_der(&h.s.path("org"));
    let site_creds = h.s.path(&format!("org/sites/{SITE}/site.creds"));
    let hub_creds = h.creds("fleet", "hub-user");
    let rt = runtime();
    rt.block_on(async {
        let at_site = connect(&site_creds, &ca, &h.site_url()).await;
        let at_hub = connect(&hub_creds, &ca, &h.hub_url()).await;

        // The site's own JetStream, in its own domain.
        jetstream::new(at_site.clone())
            .create_stream(stream_config("SITE_LOCAL", "site.local.>"))
            .await
            .unwrap();
        assert!(
            jetstream::new(at_hub.clone()).get_stream("SITE_LOCAL").await.is_err(),
            "the hub's domain is not the site's"
        );
        // The hub reaches the site's domain, and the site the hub's.
        let seen = jetstream::with_domain(at_hub.clone(), SITE).get_stream("SITE_LOCAL").await;
        assert!(seen.is_ok(), "hub -> $JS.{SITE}.API: {:?}\n{}", seen.err(), h.logs());
        let made = jetstream::with_domain(at_site.clone(), subjects::HUB_DOMAIN)
            .create_stream(stream_config("AT_HUB", "at.hub.>"))
            .await;
        assert!(made.is_ok(), "site -> $JS.hub.API: {:?}\n{}", made.err(), h.logs());
        assert!(jetstream::new(at_hub.clone()).get_stream("AT_HUB").await.is_ok(), "made at the hub");
        assert!(jetstream::new(at_site.clone()).get_stream("AT_HUB").await.is_err(), "not at the site");
    });
}

#[test]
fn reports_and_desired_state_never_cross_the_leaf_as_plain_messages() {
    let h = HubAndSite::start();
    let ca = org_ca_der(&h.s.path("org"));
    let site_creds = h.s.path(&format!("org/sites/{SITE}/site.creds"));
    let hub_creds = h.creds("fleet", "hub-user");
    let rt = runtime();
    rt.block_on(async {
        let at_site = connect(&site_creds, &ca, &h.site_url()).await;
        let at_hub = connect(&hub_creds, &ca, &h.hub_url()).await;

        // Up: a report published at the site is not heard at the hub; a
        // hello is. Messages on one leaf connection keep their order, so
        // a hello heard after the reports means they were dropped.
        let mut hub_sub = at_hub.subscribe("perch.>").await.unwrap();
        publish_until_heard(&at_site, &mut hub_sub, "perch.hello.warmup").await;
        for i in 0..5 {
            at_site.publish(format!("perch.report.drone-1.r{i}"), "r".into()).await.unwrap();
            at_site.publish(format!("perch.chunk.ab.{i}"), "c".into()).await.unwrap();
        }
        let heard = publish_until_heard(&at_site, &mut hub_sub, "perch.hello.drone-1").await;
        assert!(heard.iter().all(|s| s == "perch.hello.warmup"), "crossed the leaf: {heard:?}");

        // Down: desired state and trust put at the hub as plain messages
        // are not heard at the site.
        let mut site_sub = at_site.subscribe(">").await.unwrap();
        publish_until_heard(&at_hub, &mut site_sub, "perch.hello.down-warmup").await;
        for subject in [
            format!("$KV.{}.device.drone-1", subjects::DESIRED_BUCKET),
            subjects::trust_doc(),
            "perch.chunk.ab.m".to_string(),
            "perch.report.drone-1.x".to_string(),
        ] {
            at_hub.publish(subject, "d".into()).await.unwrap();
        }
        let heard = publish_until_heard(&at_hub, &mut site_sub, "perch.hello.down").await;
        assert!(heard.iter().all(|s| s == "perch.hello.down-warmup"), "crossed the leaf: {heard:?}");
    });
}

#[test]
fn an_enrollment_request_at_the_site_reaches_the_hub_in_provisioning() {
    let h = HubAndSite::start();
    let ca = org_ca_der(&h.s.path("org"));
    let prov = h.creds("provisioning", "enroll");
    let rt = runtime();
    rt.block_on(async {
        let at_site = connect(&prov, &ca, &h.site_url()).await;
        let at_hub = connect(&prov, &ca, &h.hub_url()).await;
        let mut hub_sub = at_hub.subscribe(subjects::ENROLL_REQUEST).await.unwrap();
        publish_until_heard(&at_site, &mut hub_sub, subjects::ENROLL_REQUEST).await;
        // And a FLEET subscriber at the hub hears nothing of PROVISIONING.
        let fleet = connect(&h.creds("fleet", "f"), &ca, &h.hub_url()).await;
        let mut fleet_sub = fleet.subscribe(subjects::ENROLL_REQUEST).await.unwrap();
        fleet.flush().await.unwrap();
        publish_until_heard(&at_site, &mut hub_sub, subjects::ENROLL_REQUEST).await;
        let crossed = tokio::time::timeout(Duration::from_millis(500), fleet_sub.next()).await;
        assert!(crossed.is_err(), "an enrollment request reached FLEET");
    });
}

#[test]
fn a_single_server_given_the_hub_domain_keeps_its_streams() {
    let s = Scratch::new();
    s.org(1, 1);
    let creds = s.fleet_creds("before");
    let ca = org_ca_der(&s.path("org"));
    let rt = runtime();
    let server = NatsServer::start(s.dir.path(), "include \"org/nats/server.conf\"");
    let url = format!("tls://127.0.0.1:{}", server.port);
    rt.block_on(async {
        let js = jetstream::new(connect(&creds, &ca, &url).await);
        js.create_stream(stream_config("KEPT", "kept.>")).await.unwrap();
        js.publish("kept.a", "1".into()).await.unwrap().await.unwrap();
    });
    drop(server);
    // The same store, now a hub: domain `hub` and a leafnode listener.
    let (hub, _) = NatsServer::start_hub(s.dir.path(), "org");
    let url = format!("tls://127.0.0.1:{}", hub.port);
    rt.block_on(async {
        let client = connect(&creds, &ca, &url).await;
        for js in [jetstream::new(client.clone()), jetstream::with_domain(client, subjects::HUB_DOMAIN)] {
            let mut kept = js.get_stream("KEPT").await.unwrap_or_else(|e| panic!("{e}: {}", hub.log()));
            assert_eq!(kept.info().await.unwrap().state.messages, 1);
        }
    });
}

#[test]
fn a_site_of_a_three_server_hub_moves_to_another_server_when_its_own_dies() {
    let s = Scratch::new();
    s.org(1, 1);
    let mut hub = NatsCluster::start(s.dir.path(), 3);
    let hubs: Vec<String> = hub.leaf_ports.iter().map(|p| format!("tls://127.0.0.1:{p}")).collect();
    let site = start_site(&s, &hubs);
    let logs = |hub: &NatsCluster| hub.servers.iter().map(|x| x.log()).collect::<Vec<_>>().join("\n---\n");
    wait_for_leaves(&site, 3, &logs(&hub));
    let ca = org_ca_der(&s.path("org"));
    let site_creds = s.path(&format!("org/sites/{SITE}/site.creds"));
    let site_url = format!("tls://127.0.0.1:{}", site.port);
    let rt = runtime();
    // A JetStream context spawns a task when made: inside the runtime.
    let _inside = rt.enter();
    let at_site = rt.block_on(connect(&site_creds, &ca, &site_url));
    let r3 = |name: &str| stream::Config {
        num_replicas: 3,
        ..stream_config(name, &format!("{}.>", name.to_lowercase()))
    };
    // Through $JS.hub.API; a cluster that just formed (or lost a server)
    // takes a few seconds before it can place an R3 stream.
    let create_at_hub = |hub: &NatsCluster, name: &str| {
        let start = Instant::now();
        loop {
            let js = jetstream::with_domain(at_site.clone(), subjects::HUB_DOMAIN);
            match rt.block_on(js.create_stream(r3(name))) {
                Ok(_) => return,
                Err(e) => {
                    let waited = start.elapsed();
                    assert!(waited < Duration::from_secs(30), "site -> $JS.hub.API: {e}\n{}", logs(hub));
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    create_at_hub(&hub, "AT_HUB");

    // Kill the hub server the site's FLEET leaf uses: it reconnects to another.
    let port = fleet_leaf_port(&site);
    let i = hub.leaf_ports.iter().position(|&p| p == port).unwrap_or_else(|| panic!("{port} is no hub's"));
    let before = site.log().matches("Leafnode connection created for account").count();
    hub.kill(i);
    let start = Instant::now();
    while fleet_leaf_port(&site) == port {
        assert!(start.elapsed() < Duration::from_secs(30), "the site stayed on a dead hub: {}", site.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(site.log().matches("Leafnode connection created for account").count() > before);
    create_at_hub(&hub, "AFTER");
}

#[test]
fn a_device_enrolls_through_the_site_and_its_revocation_at_the_hub_reaches_the_site() {
    let (f, leaf_port) = Fleet::start_hub(1);
    let site = start_site(&f.s, &[format!("tls://127.0.0.1:{leaf_port}")]);
    wait_for_leaves(&site, 3, &f.all_logs());
    // The token sends the device to the site; its request crosses the
    // leaf (PROVISIONING) to the hub's provisioner, the answer comes back.
    let site_url = format!("tls://127.0.0.1:{}", site.port);
    let token =
        f.s.ok("perch-bootstrap", &["token", "issue", "--dir", "org", "--group", "g", "--url", &site_url]);
    let token_file = f.s.path("site.token");
    std::fs::write(&token_file, token.stdout.trim()).unwrap();
    let d = f.device("rover-1");
    let r = d.agent(&["enroll", "--device-id", "rover-1", "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}\n{}", r.stderr, f.all_logs(), site.log());
    // The site authenticates the device itself (its own resolver).
    let (mut c, hello) = f.raw_as_at(&d, site.port);
    assert_eq!(hello, "PONG", "{}", site.log());
    // A revocation pushed at the hub reaches the site (SYS leaf, full
    // resolver): the site cuts the device off and refuses it from then on.
    let r = f.admin(&["revoke", "rover-1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(wait_for(Duration::from_secs(10), || c.line().is_empty()), "still connected: {}", site.log());
    let (_, answer) = f.raw_as_at(&d, site.port);
    assert!(answer.contains("Authorization Violation"), "{answer}");
}

#[test]
fn the_hub_sources_the_sites_reports_and_the_site_mirrors_the_hubs_desired_state_through_the_deny_list() {
    let h = HubAndSite::start();
    let ca = org_ca_der(&h.s.path("org"));
    let site_creds = h.s.path(&format!("org/sites/{SITE}/site.creds"));
    let hub_creds = h.creds("fleet", "hub-user");
    let rt = runtime();
    rt.block_on(async {
        let site_js = jetstream::new(connect(&site_creds, &ca, &h.site_url()).await);
        let hub_js = jetstream::new(connect(&hub_creds, &ca, &h.hub_url()).await);
        // Up: the site's reports stream, sourced by the hub's (which takes
        // the same subjects from devices connected to the hub itself).
        site_js.create_stream(stream_config("SITE_REPORTS", subjects::REPORTS_ALL)).await.unwrap();
        let source =
            stream::Source { name: "SITE_REPORTS".into(), external: Some(api(SITE)), ..Default::default() };
        let hub_reports = stream::Config {
            sources: Some(vec![source]),
            ..stream_config("HUB_REPORTS", subjects::REPORTS_ALL)
        };
        hub_js.create_stream(hub_reports).await.unwrap();
        for i in 0..3 {
            site_js.publish(format!("perch.report.drone-1.r{i}"), "r".into()).await.unwrap().await.unwrap();
        }
        wait_for_count(&hub_js, "HUB_REPORTS", 3, &h).await;

        // Down: the hub's desired state, mirrored at the site.
        hub_js.create_stream(stream_config("DESIRED", "$KV.PERCH_DESIRED.>")).await.unwrap();
        let mirror = stream::Source {
            name: "DESIRED".into(),
            external: Some(api(subjects::HUB_DOMAIN)),
            ..Default::default()
        };
        site_js
            .create_stream(stream::Config {
                name: "DESIRED_MIRROR".into(),
                mirror: Some(mirror),
                ..Default::default()
            })
            .await
            .unwrap();
        for i in 0..2 {
            hub_js
                .publish(format!("$KV.PERCH_DESIRED.device.d{i}"), "v".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        wait_for_count(&site_js, "DESIRED_MIRROR", 2, &h).await;

        // Each report once at the hub: the source's copy, no plain copy.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count(&hub_js, "HUB_REPORTS").await, 3);
        let first = hub_js.get_stream("HUB_REPORTS").await.unwrap().get_raw_message(1).await.unwrap();
        assert_eq!(first.subject.as_str(), "perch.report.drone-1.r0");
    });
}

/// Where a stream of another JetStream domain is: `$JS.<domain>.API`.
/// (Not `Source::domain`: async-nats 0.46 sends the field along, and
/// nats-server 2.15.1 refuses a stream config with it: "unknown field".)
fn api(domain: &str) -> stream::External {
    stream::External { api_prefix: format!("$JS.{domain}.API"), delivery_prefix: None }
}

async fn count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().info().await.unwrap().state.messages
}

async fn wait_for_count(js: &jetstream::Context, name: &str, n: u64, h: &HubAndSite) {
    let start = Instant::now();
    while count(js, name).await < n {
        assert!(start.elapsed() < Duration::from_secs(20), "{name} never had {n}: {}", h.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
