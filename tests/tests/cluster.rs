//! A fleet on a three-server JetStream cluster configured by
//! `perch-bootstrap nats cluster`: real nats-servers with routes over TLS,
//! a real provisioner and real agents that know all three URLs. Streams
//! are R3; reports stay exactly once when the stream leader dies and
//! through a rolling restart, because the duplicate window is replicated.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use perch_protocol::report::Report;
use perch_protocol::subjects;
use perch_tests::fleet::{wait_for, Device, Running};
use perch_tests::nats::{server_binary, NatsCluster};
use perch_tests::{bin, Scratch};

/// An org, a three-server cluster and a provisioner that knows every server.
struct Hub {
    s: Scratch,
    cluster: NatsCluster,
    provisioner: Option<Running>,
}

impl Hub {
    fn start() -> Hub {
        let s = Scratch::new();
        s.org(1, 1);
        let cluster = NatsCluster::start(s.dir.path(), 3);
        let mut h = Hub { s, cluster, provisioner: None };
        h.start_provisioner(&[]);
        h
    }

    /// `--url U1 --url U2 --url U3`.
    fn url_args(&self) -> Vec<String> {
        self.cluster.urls().into_iter().flat_map(|u| ["--url".to_string(), u]).collect()
    }

    /// Starts the provisioner (`extra` arguments added), replacing any running one.
    fn start_provisioner(&mut self, extra: &[&str]) {
        if let Some(mut p) = self.provisioner.take() {
            p.kill();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.s.path("provisioner.log"))
            .unwrap();
        let mut args = vec!["run".to_string(), "--dir".into(), "org".into()];
        args.extend(self.url_args());
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut child = Command::new(bin("perch-bootstrap"))
            .args(&args)
            .current_dir(self.s.dir.path())
            .env("PERCH_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "provisioner ready", "{}", self.logs());
        std::thread::spawn(move || for _ in std::io::BufRead::lines(out) {});
        self.provisioner = Some(Running(child));
    }

    fn logs(&self) -> String {
        let mut all = std::fs::read_to_string(self.s.path("provisioner.log")).unwrap_or_default();
        for (i, s) in self.cluster.servers.iter().enumerate() {
            all.push_str(&format!("\n--- n{} ---\n{}", i + 1, s.log()));
        }
        for e in std::fs::read_dir(self.s.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }

    /// A device enrolled online with a token that names every server, its
    /// agent.toml with `extra` appended.
    fn enrolled(&self, name: &str, extra: &str) -> Device {
        let mut args = vec!["token".to_string(), "issue".into(), "--dir".into(), "org".into()];
        args.extend(self.url_args());
        args.extend(["--group".into(), "g".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let token = self.s.ok("perch-bootstrap", &args).stdout;
        let token_file = self.s.path(&format!("{name}.token"));
        std::fs::write(&token_file, token.trim()).unwrap();
        let d = Device { dir: self.s.path(name), name: name.into() };
        std::fs::create_dir_all(d.dir.join("slots")).unwrap();
        d.write_config(&format!("[device]\nid = \"{name}\"\n{extra}"));
        let r = d.agent(&["enroll", "--device-id", name, "--token-file", token_file.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}\n{}", r.stderr, self.logs());
        d
    }

    fn reader(&self) -> Reader {
        let creds = self.s.fleet_creds("reader");
        let ca = perch_tests::nats::org_ca_der(&self.s.path("org"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(ca)).unwrap();
        let addrs = perch_net::server_addrs(&self.cluster.urls()).unwrap();
        let js = rt.block_on(async move {
            let client = async_nats::ConnectOptions::with_credentials_file(creds)
                .await
                .unwrap()
                .require_tls(true)
                .tls_client_config(tls)
                .connect(addrs)
                .await
                .unwrap();
            async_nats::jetstream::new(client)
        });
        Reader { rt, js }
    }
}

/// A FLEET operator's view of the streams, over all three URLs.
struct Reader {
    rt: tokio::runtime::Runtime,
    js: async_nats::jetstream::Context,
}

impl Reader {
    fn info(&self, stream: &str) -> Option<async_nats::jetstream::stream::Info> {
        let mut s = self.rt.block_on(self.js.get_stream(stream)).ok()?;
        self.rt.block_on(s.info()).ok().cloned()
    }

    /// Messages in `PERCH_REPORTS` (0 while the stream has no leader).
    fn count(&self) -> u64 {
        self.info(subjects::REPORTS_STREAM).map_or(0, |i| i.state.messages)
    }

    /// The name of the server that leads `stream`.
    fn leader(&self, stream: &str) -> String {
        self.info(stream).and_then(|i| i.cluster).and_then(|c| c.leader).unwrap_or_default()
    }

    /// Every device report in `PERCH_REPORTS`, in stream order.
    fn reports(&self) -> Vec<Report> {
        let s = self.rt.block_on(self.js.get_stream(subjects::REPORTS_STREAM)).unwrap();
        let info = self.info(subjects::REPORTS_STREAM).unwrap();
        (info.state.first_sequence..=info.state.last_sequence)
            .map(|seq| self.rt.block_on(s.get_raw_message(seq)).expect("no gap in the stream"))
            .filter(|m| m.subject.starts_with("perch.report.") && !m.subject.ends_with(".probe"))
            .map(|m| Report::from_bytes(&m.payload).unwrap())
            .collect()
    }

    /// Publishes `payload` to `PERCH_REPORTS` with message id `id`; true
    /// if the stream took it as a duplicate.
    fn publish_with_id(&self, id: &str, payload: &str) -> bool {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let js = &self.js;
        let ack = self.rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                // The stream may be electing a leader: try until it answers.
                let r = async {
                    js.publish_with_headers(
                        "perch.report.x.probe",
                        headers.clone(),
                        payload.to_string().into(),
                    )
                    .await?
                    .await
                    .map_err(async_nats::Error::from)
                }
                .await;
                match r {
                    Ok(ack) => return ack,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("publish {id}: {e}; again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("publish {id}: {e}"),
                }
            }
        });
        ack.duplicate
    }
}

/// Waits until `PERCH_REPORTS` has stopped growing for 3 s.
fn settle(r: &Reader) {
    let mut last = (u64::MAX, Instant::now());
    let settled = wait_for(Duration::from_secs(60), || {
        let n = r.count();
        if n != last.0 {
            last = (n, Instant::now());
        }
        last.1.elapsed() > Duration::from_secs(3)
    });
    assert!(settled, "the stream never settled");
}

/// Each device's reports, stored exactly once with no gap: (device, count).
fn assert_each_once_no_gap(reports: &[Report], devices: &[&Device]) -> Vec<(String, u64)> {
    devices
        .iter()
        .map(|d| {
            let mut seqs: Vec<u64> = reports.iter().filter(|r| r.device == d.name).map(|r| r.seq).collect();
            seqs.sort();
            let n = seqs.len() as u64;
            let dupes = seqs.windows(2).filter(|w| w[0] == w[1]).count();
            assert_eq!(dupes, 0, "{}: {dupes} reports stored twice", d.name);
            assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{}: gaps in the sequence", d.name);
            (d.name.clone(), n)
        })
        .collect()
}

const FAST: &str = "[link]\nping_interval = \"500ms\"\nmax_backoff = \"500ms\"\n\
                    [reports]\nheartbeat = \"10ms\"\nack_timeout = \"2s\"\n";

/// Stops the agents making reports, then lets each drain its outbox.
fn drain(h: &Hub, agents: &mut [Running], devices: &[&Device], r: &Reader) {
    for a in agents.iter_mut() {
        a.kill();
    }
    let mut drains: Vec<Running> = devices
        .iter()
        .map(|d| {
            d.edit_config("heartbeat = \"10ms\"", "heartbeat = \"1h\"");
            d.spawn_run()
        })
        .collect();
    settle(r);
    for d in &mut drains {
        d.kill();
    }
    let _ = h;
}

#[test]
fn generated_cluster_configs_pass_nats_server_config_check() {
    let s = Scratch::new();
    s.org(1, 1);
    let mut args = vec!["nats", "cluster", "--dir", "org"];
    args.extend(["--server", "a=nats-a.example", "--server", "b=10.0.0.2", "--server", "c=nats-c.example"]);
    args.extend(["--config-dir", "/etc/nats", "--store-dir", "/var/lib/nats"]);
    s.ok("perch-bootstrap", &args);
    for n in ["a", "b", "c"] {
        let conf = s.path(&format!("org/nats/cluster/{n}/nats-server.conf"));
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(text.contains(&format!("server_name: \"{n}\"")), "{text}");
        assert!(text.contains("store_dir: \"/var/lib/nats\"") && text.contains("dir: \"/var/lib/nats/jwt\""));
        assert!(text.contains("verify: true") && text.contains("cert_file: \"/etc/nats/server.pem\""));
        assert_eq!(text.matches("nats-route://").count(), 2, "routes to the two others: {text}");
        // The config refers to its files where they will be: put them there.
        let local = text.replace("/etc/nats", conf.parent().unwrap().to_str().unwrap());
        let checked = s.path(&format!("{n}.conf"));
        std::fs::write(&checked, local).unwrap();
        let out = Command::new(server_binary()).arg("-t").arg("-c").arg(&checked).output().unwrap();
        assert!(out.status.success(), "{n}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A cluster of two is refused (exit 2), and nothing is overwritten.
    let two = s
        .run("perch-bootstrap", &["nats", "cluster", "--dir", "org", "--server", "x=h1", "--server", "y=h2"]);
    assert_eq!(two.code, 2, "{}", two.stderr);
    assert_eq!(two.stderr.lines().count(), 1, "{}", two.stderr);
    let again = s.run("perch-bootstrap", &args);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
}

#[test]
fn a_fleet_enrolls_and_reports_through_a_three_server_cluster_with_r3_streams() {
    let h = Hub::start();
    let d = h.enrolled("drone-1", FAST);
    assert_eq!(d.enrollment().fleet_urls, h.cluster.urls(), "the enrollment carries every server");
    let r = h.reader();
    let mut agent = d.spawn_run();
    assert!(wait_for(Duration::from_secs(20), || r.count() >= 20), "{}", h.logs());
    for stream in [subjects::REPORTS_STREAM, subjects::CHUNKS_STREAM, "KV_PERCH_DESIRED", "KV_PERCH_REGISTRY"]
    {
        let info = r.info(stream).unwrap_or_else(|| panic!("{stream} missing"));
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let cluster = info.cluster.unwrap();
        assert_eq!(cluster.replicas.len(), 2, "{stream} has two followers: {cluster:?}");
    }
    agent.kill();
}

#[test]
fn reports_stay_exactly_once_when_the_reports_stream_leader_is_killed() {
    let mut h = Hub::start();
    let devices: Vec<Device> = (1..=3).map(|i| h.enrolled(&format!("drone-{i}"), FAST)).collect();
    let r = h.reader();
    // The stream's duplicate window lives in the stream's replicated
    // state: an id the old leader took is a duplicate to the new one.
    assert!(!r.publish_with_id("probe-1", "before"), "a fresh id is not a duplicate");
    let mut agents: Vec<Running> = devices.iter().map(|d| d.spawn_run()).collect();
    assert!(wait_for(Duration::from_secs(30), || r.count() >= 500), "{}", h.logs());
    let leader = r.leader(subjects::REPORTS_STREAM);
    let i = h.cluster.index_of(&leader);
    h.cluster.kill(i);
    let r = h.reader();
    let moved = wait_for(Duration::from_secs(30), || {
        let l = r.leader(subjects::REPORTS_STREAM);
        !l.is_empty() && l != leader
    });
    assert!(moved, "no new leader for PERCH_REPORTS: {}", h.logs());
    assert!(r.publish_with_id("probe-1", "after"), "the new leader forgot the old leader's message ids");
    let before = r.count();
    assert!(wait_for(Duration::from_secs(30), || r.count() >= before + 300), "{}", h.logs());
    let refs: Vec<&Device> = devices.iter().collect();
    drain(&h, &mut agents, &refs, &r);
    let reports = r.reports();
    let counts = assert_each_once_no_gap(&reports, &refs);
    eprintln!("leader {leader} killed; stored once each, no gaps: {counts:?}");
    assert!(reports.len() >= 800, "only {} reports", reports.len());
}

#[test]
fn a_rolling_restart_of_all_three_servers_loses_no_report() {
    let mut h = Hub::start();
    let devices: Vec<Device> = (1..=3).map(|i| h.enrolled(&format!("rover-{i}"), FAST)).collect();
    let r = h.reader();
    let mut agents: Vec<Running> = devices.iter().map(|d| d.spawn_run()).collect();
    assert!(wait_for(Duration::from_secs(30), || r.count() >= 200), "{}", h.logs());
    for i in 0..3 {
        h.cluster.restart(i);
        h.cluster.wait_meta_leader(Duration::from_secs(30));
        // Back in the stream's peer set and current before the next goes down.
        let r = h.reader();
        let caught_up = wait_for(Duration::from_secs(30), || {
            r.info(subjects::REPORTS_STREAM)
                .and_then(|info| info.cluster)
                .is_some_and(|c| c.replicas.len() == 2 && c.replicas.iter().all(|p| p.current))
        });
        assert!(caught_up, "n{} did not catch up: {}", i + 1, h.logs());
        let before = r.count();
        assert!(wait_for(Duration::from_secs(20), || r.count() >= before + 50), "reports stopped");
    }
    let r = h.reader();
    let refs: Vec<&Device> = devices.iter().collect();
    drain(&h, &mut agents, &refs, &r);
    let reports = r.reports();
    let counts = assert_each_once_no_gap(&reports, &refs);
    eprintln!("rolling restart: stored once each, no gaps: {counts:?}");
}

#[test]
fn streams_made_with_one_replica_are_scaled_up_to_three_in_place_with_their_data() {
    let mut h = Hub::start();
    h.start_provisioner(&["--replicas", "1"]);
    let d = h.enrolled("drone-1", FAST);
    let r = h.reader();
    let mut agent = d.spawn_run();
    assert!(wait_for(Duration::from_secs(20), || r.count() >= 100), "{}", h.logs());
    agent.kill();
    settle(&r);
    // `--replicas 1` scaled what the first provisioner made down to R1:
    // a fleet whose streams have one copy, on a cluster.
    for stream in [subjects::REPORTS_STREAM, "KV_PERCH_REGISTRY"] {
        assert_eq!(r.info(stream).unwrap().config.num_replicas, 1, "{stream}");
    }
    let stored = r.count();
    // The provisioner with the default (auto) scales them up when it starts.
    h.start_provisioner(&[]);
    for stream in [subjects::REPORTS_STREAM, "KV_PERCH_REGISTRY"] {
        let grown = wait_for(Duration::from_secs(30), || {
            r.info(stream).is_some_and(|i| {
                i.config.num_replicas == 3
                    && i.cluster
                        .is_some_and(|c| c.replicas.len() == 2 && c.replicas.iter().all(|p| p.current))
            })
        });
        assert!(grown, "{stream} not at R3: {:?}", r.info(stream));
    }
    assert_eq!(r.count(), stored, "scaling up lost or added reports");
    assert_each_once_no_gap(&r.reports(), &[&d]);
    // Auto never scales down; an explicit count does.
    h.start_provisioner(&["--replicas", "1"]);
    assert_eq!(r.info(subjects::REPORTS_STREAM).unwrap().config.num_replicas, 1);
}
