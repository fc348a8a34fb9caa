//! A fleet hub on a three-server JetStream cluster, for the tests that
//! need one: an org, three real nats-servers (`perch-bootstrap nats
//! cluster`), a provisioner that knows every server, and a reader of the
//! streams.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use perch_protocol::report::Report;
use perch_protocol::subjects;

use crate::fleet::{Device, Running};
use crate::nats::NatsCluster;
use crate::{bin, Scratch};

/// An org, a three-server cluster and a provisioner that knows every server.
pub struct Hub {
    pub s: Scratch,
    pub cluster: NatsCluster,
    pub provisioner: Option<Running>,
    /// Dropped last, once the servers are gone.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// One cluster at a time: three servers and their agents per test fill the
/// 2-core CI machine, and failover timings stretch past any sane limit
/// when six clusters compete for it.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Hub {
    pub fn start() -> Hub {
        // A test that failed while holding it poisons it; the next may go.
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let s = Scratch::new();
        s.org(1, 1);
        let cluster = NatsCluster::start(s.dir.path(), 3);
        let mut h = Hub { s, cluster, provisioner: None, _one_at_a_time: guard };
        h.start_provisioner(&[]);
        h
    }

    /// `--url U1 --url U2 --url U3`.
    pub fn url_args(&self) -> Vec<String> {
        self.cluster.urls().into_iter().flat_map(|u| ["--url".to_string(), u]).collect()
    }

    /// Starts the provisioner (`extra` arguments added), replacing any running one.
    pub fn start_provisioner(&mut self, extra: &[&str]) {
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

    pub fn logs(&self) -> String {
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
    pub fn enrolled(&self, name: &str, extra: &str) -> Device {
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

    /// A device enrolled offline whose enrollment names `fleet_urls`,
    /// with dir slots (slot a running) and its agent.toml with `extra`.
    pub fn enrolled_offline(&self, name: &str, fleet_urls: &[String], extra: &str) -> Device {
        let d = Device { dir: self.s.path(name), name: name.into() };
        std::fs::create_dir_all(d.dir.join("slots/a")).unwrap();
        std::os::unix::fs::symlink("a", d.dir.join("slots/current")).unwrap();
        std::fs::copy(self.s.path("org/trust.doc"), d.trust()).unwrap();
        d.write_config(&format!("[device]\nid = \"{name}\"\n{extra}"));
        let (req, resp) = (d.dir.join("req"), d.dir.join("resp"));
        assert_eq!(d.agent(&["enroll", "--request-out", req.to_str().unwrap()]).code, 0);
        let mut args: Vec<&str> =
            vec!["sign-request", "--dir", "org", req.to_str().unwrap(), "--out", resp.to_str().unwrap()];
        args.extend(["--group", "g"]);
        for u in fleet_urls {
            args.extend(["--fleet-url", u.as_str()]);
        }
        self.s.ok("perch-bootstrap", &args);
        let r = d.agent(&["enroll", "--import", resp.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        d
    }

    /// Builds, signs (k1) and publishes through the cluster an archive
    /// bundle of `len` pseudo-random bytes; returns its digest in hex.
    pub fn published_bundle(&self, name: &str, len: usize) -> String {
        let s = &self.s;
        std::fs::create_dir_all(s.path(name)).unwrap();
        s.write_payload(&format!("{name}/data.bin"), len, 7);
        let file = format!("{name}.perch");
        let input = s.path(name);
        let build = ["bundle", "build", "--name", name, "--counter", "2", "--kind", "archive", "--input"];
        let mut args: Vec<&str> = build.to_vec();
        args.extend([input.to_str().unwrap(), "--out", &file]);
        s.ok("perch", &args);
        s.ok("perch", &["bundle", "sign", "--key", "k1.key", &file]);
        s.fleet_creds("release");
        let urls = self.url_args();
        let mut args =
            vec!["publish", "--trust", "org/trust.doc", "--creds", "release.creds", "--ca", "org/tls/ca.pem"];
        args.extend(urls.iter().map(String::as_str));
        args.push(&file);
        s.ok("perch", &args);
        let v: serde_json::Value =
            serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", &file]).stdout).unwrap();
        v["digest"].as_str().unwrap().to_string()
    }

    pub fn reader(&self) -> Reader {
        let creds = self.s.fleet_creds("reader");
        let ca = crate::nats::org_ca_der(&self.s.path("org"));
        let addrs = perch_net::server_addrs(&self.cluster.urls()).unwrap();
        let (rt, js) = crate::fleet::jetstream_client(&creds, ca, addrs);
        Reader { rt, js }
    }
}

/// A FLEET operator's view of the streams, over all three URLs.
pub struct Reader {
    pub rt: tokio::runtime::Runtime,
    pub js: async_nats::jetstream::Context,
}

impl Reader {
    pub fn info(&self, stream: &str) -> Option<async_nats::jetstream::stream::Info> {
        let mut s = self.rt.block_on(self.js.get_stream(stream)).ok()?;
        self.rt.block_on(s.info()).ok().cloned()
    }

    /// Messages in `PERCH_REPORTS` (0 while the stream has no leader).
    pub fn count(&self) -> u64 {
        self.info(subjects::REPORTS_STREAM).map_or(0, |i| i.state.messages)
    }

    /// The name of the server that leads `stream`.
    pub fn leader(&self, stream: &str) -> String {
        self.info(stream).and_then(|i| i.cluster).and_then(|c| c.leader).unwrap_or_default()
    }

    /// Asks the leader of `stream` to step down (another peer takes over).
    pub fn step_down(&self, stream: &str) {
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        let c = self.js.client();
        let answer = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), c.request(subject, "".into())).await
        });
        eprintln!(
            "step down {stream}: {:?}",
            answer.map(|r| r.map(|m| String::from_utf8_lossy(&m.payload).to_string()))
        );
    }

    /// Message `seq` of `s`. A missing one fails the test (a gap); an
    /// error getting it (a timeout while the stream's leader moves) is
    /// said and tried again.
    pub fn message(
        &self,
        s: &async_nats::jetstream::stream::Stream,
        seq: u64,
    ) -> async_nats::jetstream::message::StreamMessage {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.rt.block_on(s.get_raw_message(seq)) {
                Ok(m) => return m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                    panic!("a gap in the stream: no message {seq}")
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("getting message {seq}: {e}; again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("getting message {seq}: {e}"),
            }
        }
    }

    /// Every device report in `PERCH_REPORTS`, in stream order.
    pub fn reports(&self) -> Vec<Report> {
        let s = self.rt.block_on(self.js.get_stream(subjects::REPORTS_STREAM)).unwrap();
        let info = self.info(subjects::REPORTS_STREAM).unwrap();
        (info.state.first_sequence..=info.state.last_sequence)
            .map(|seq| self.message(&s, seq))
            .filter(|m| m.subject.starts_with("perch.report.") && !m.subject.ends_with(".probe"))
            .map(|m| Report::from_bytes(&m.payload).unwrap())
            .collect()
    }

    /// Publishes `payload` to `PERCH_REPORTS` with message id `id`; true
    /// if the stream took it as a duplicate.
    pub fn publish_with_id(&self, id: &str, payload: &str) -> bool {
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
