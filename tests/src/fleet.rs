//! A whole enrollment setup for tests: an org, a real nats-server in
//! operator mode with TLS, one or more real provisioner processes, and
//! device directories for the real agent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nats::{org_ca_der, NatsServer, RawClient};
use crate::{bin, Run, Scratch};

pub struct Fleet {
    pub s: Scratch,
    pub server: NatsServer,
    pub url: String,
    provisioners: Vec<Running>,
}

impl Fleet {
    /// An org, a server, and `provisioners` provisioner instances.
    pub fn start(provisioners: usize) -> Fleet {
        let s = Scratch::new();
        s.org(1, 1);
        let server = NatsServer::start(s.dir.path(), "include \"org/nats/server.conf\"");
        Self::with_server(s, server, provisioners)
    }

    /// [`Fleet::start`] on a hub for field sites (JetStream domain `hub`,
    /// a leafnode listener: [`NatsServer::start_hub`]); also returns the
    /// leafnode port.
    pub fn start_hub(provisioners: usize) -> (Fleet, u16) {
        let s = Scratch::new();
        s.org(1, 1);
        let (server, leaf_port) = NatsServer::start_hub(s.dir.path(), "org");
        (Self::with_server(s, server, provisioners), leaf_port)
    }

    fn with_server(s: Scratch, server: NatsServer, provisioners: usize) -> Fleet {
        let url = format!("tls://127.0.0.1:{}", server.port);
        let mut f = Fleet { s, server, url, provisioners: vec![] };
        for _ in 0..provisioners {
            f.start_provisioner();
        }
        f
    }

    /// Starts one more provisioner and waits until it is ready.
    pub fn start_provisioner(&mut self) {
        let n = self.provisioners.len();
        let log = format!("provisioner-{n}.log");
        let args = ["run", "--dir", "org", "--url", &self.url];
        let child = spawn_ready(self.s.dir.path(), &args, &self.s.path(&log), "provisioner ready", "trace")
            .unwrap_or_else(|line| panic!("provisioner said {line:?}; {log}: {}", self.log(&log)));
        self.provisioners.push(child);
    }

    /// SIGTERMs provisioner `n`; its exit code, if it exited within `limit`.
    pub fn terminate_provisioner(&mut self, n: usize, limit: Duration) -> Option<i32> {
        self.provisioners[n].terminate(limit)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.s.path(name)).unwrap_or_default()
    }

    /// Every log of the run: provisioners, server, agents.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.s.dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                all.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        all
    }

    /// `perch-bootstrap token issue` against this fleet; returns the token.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "issue", "--dir", "org", "--url", &self.url];
        args.extend_from_slice(extra);
        let t = self.s.ok("perch-bootstrap", &args).stdout.trim().to_string();
        t
    }

    /// Writes a token to a file in the scratch dir and returns its path.
    pub fn token_file(&self, name: &str, extra: &[&str]) -> PathBuf {
        let p = self.s.path(name);
        std::fs::write(&p, self.token(extra)).unwrap();
        p
    }

    /// An operator command against this fleet (`--dir org --url URL` added).
    pub fn admin(&self, args: &[&str]) -> Run {
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["--dir", "org", "--url", &self.url]);
        self.s.run("perch-bootstrap", &a)
    }

    /// The registry as JSON.
    pub fn devices(&self) -> serde_json::Value {
        let r = self.admin(&["devices", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    }

    pub fn device_status(&self, id: &str) -> Option<String> {
        self.devices()["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .map(|d| d["status"].as_str().unwrap().to_string())
    }

    /// A device directory with an agent.toml (dir slots, no trust document yet).
    pub fn device(&self, name: &str) -> Device {
        let dir = self.s.path(name);
        std::fs::create_dir_all(dir.join("slots")).unwrap();
        let d = Device { dir: dir.clone(), name: name.into() };
        d.write_config("");
        d
    }

    /// A device in `group` with dir slots, enrolled offline to this
    /// server, that reports every second and judges each release by its
    /// `bin/check` (slot `a` holds one that passes).
    pub fn checked_device(&self, name: &str, group: &str) -> Device {
        let d = self.enrolled_device(
            name,
            &self.url,
            group,
            &format!(
                "[link]\nping_interval = \"1s\"\nmax_backoff = \"1s\"\n[reports]\nheartbeat = \"1s\"\n[health]\ncommands = [\"sh {}/slots/current/bin/check\"]\ntrial = \"1s\"\ninterval = \"200ms\"\n",
                self.s.path(name).display()
            ),
        );
        std::fs::create_dir_all(d.dir.join("slots/a/bin")).unwrap();
        std::fs::write(d.dir.join("slots/a/bin/check"), "exit 0\n").unwrap();
        std::os::unix::fs::symlink("a", d.dir.join("slots/current")).unwrap();
        d
    }

    /// A device with dir slots, enrolled offline (so its FLEET URL can be
    /// anything: the server, or a proxy in front of it) into `group`, and
    /// its agent.toml with `extra` appended.
    pub fn enrolled_device(&self, name: &str, fleet_url: &str, group: &str, extra: &str) -> Device {
        let d = self.device(name);
        std::fs::copy(self.s.path("org/trust.doc"), d.trust()).unwrap();
        std::fs::write(d.dir.join("boot_id"), "boot-1\n").unwrap();
        std::fs::write(
            d.config(),
            format!(
                "target = \"x86_64-desktop\"\ntrust = \"{}\"\nboot_id = \"{}\"\n[device]\nid = \"{name}\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n{extra}",
                d.trust().display(),
                d.dir.join("boot_id").display(),
                d.dir.join("slots").display()
            ),
        )
        .unwrap();
        let req = d.dir.join("req");
        let resp = d.dir.join("resp");
        assert_eq!(d.agent(&["enroll", "--request-out", req.to_str().unwrap()]).code, 0);
        self.s.ok(
            "perch-bootstrap",
            &[
                "sign-request",
                "--dir",
                "org",
                req.to_str().unwrap(),
                "--out",
                resp.to_str().unwrap(),
                "--group",
                group,
                "--fleet-url",
                fleet_url,
            ],
        );
        let r = d.agent(&["enroll", "--import", resp.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        d
    }

    pub fn ca_der(&self) -> Vec<u8> {
        org_ca_der(&self.s.path("org"))
    }

    /// Connects a raw client as an enrolled device.
    pub fn raw_as(&self, d: &Device) -> (RawClient, String) {
        self.raw_as_at(d, self.server.port)
    }

    /// Connects a raw client as an enrolled device to the server on `port`
    /// (a field site's).
    pub fn raw_as_at(&self, d: &Device, port: u16) -> (RawClient, String) {
        let e = d.enrollment();
        let key = d.key();
        RawClient::connect(port, &self.ca_der(), &e.user_jwt, |nonce| {
            data_encoding::BASE64URL_NOPAD.encode(&key.sign_nats_nonce(nonce).unwrap())
        })
    }
}

/// Starts `perch-bootstrap ARGS` in `dir`, its log (at `PERCH_LOG=level`)
/// in `log`, and waits for its first line on stdout: `ready`, or else
/// the line it said instead (the process is then killed).
pub fn spawn_ready(
    dir: &Path,
    args: &[&str],
    log: &Path,
    ready: &str,
    level: &str,
) -> Result<Running, String> {
    let log = std::fs::File::create(log).unwrap();
    let mut child = Command::new(bin("perch-bootstrap"))
        .args(args)
        .current_dir(dir)
        .env("PERCH_LOG", level)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let mut running = Running(child);
    if line.trim() != ready {
        running.kill();
        return Err(line);
    }
    // Keep draining stdout so the process never blocks on it.
    std::thread::spawn(move || for _ in out.lines() {});
    Ok(running)
}

/// A background process, SIGKILLed when dropped.
pub struct Running(pub Child);

impl Running {
    /// SIGTERM (what a service manager sends); the exit code, if it exited
    /// within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.0.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One device's config and state directory.
pub struct Device {
    pub dir: PathBuf,
    pub name: String,
}

impl Device {
    pub fn config(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn trust(&self) -> PathBuf {
        self.dir.join("trust.doc")
    }

    /// Rewrites agent.toml with `extra` appended (TOML tables).
    pub fn write_config(&self, extra: &str) {
        std::fs::write(
            self.config(),
            format!(
                "target = \"x86_64-desktop\"\ntrust = \"{}\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n{extra}",
                self.trust().display(),
                self.dir.join("slots").display()
            ),
        )
        .unwrap();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("perch-agent"));
        c.arg("--config").arg(self.config()).arg("--state-dir").arg(self.state()).args(args);
        c.env("PERCH_LOG", "trace");
        c
    }

    /// Runs the agent; its stderr is also appended to `<scratch>/<name>.log`.
    pub fn agent(&self, args: &[&str]) -> Run {
        let r: Run = self.cmd(args).output().unwrap().into();
        self.append_log(&r.stderr);
        crate::schema::check_cli_output("perch-agent", args, &r.stdout);
        r
    }

    fn append_log(&self, text: &str) {
        use std::io::Write;
        let log = self.dir.with_extension("log");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let _ = f.write_all(text.as_bytes());
    }

    /// Starts `perch-agent run` in the background, logging to
    /// `<scratch>/<name>-run.log` (appended: restarts keep the history).
    /// The agent is killed when the handle is dropped, even if a test fails.
    pub fn spawn_run(&self) -> Running {
        self.spawn_run_env(&[])
    }

    /// [`Device::spawn_run`] with extra environment variables.
    pub fn spawn_run_env(&self, env: &[(&str, &str)]) -> Running {
        self.spawn_agent(&["run"], env)
    }

    /// Starts `perch-agent ARGS` in the background, logging to
    /// `<scratch>/<name>-<first arg>.log` (appended).
    pub fn spawn_agent(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_file_name(format!("{}-{}.log", self.name, args.first().unwrap_or(&"agent"))))
            .unwrap();
        let mut c = self.cmd(args);
        c.envs(env.iter().copied());
        Running(c.stdout(Stdio::null()).stderr(log).spawn().unwrap())
    }

    pub fn enrollment(&self) -> perch_protocol::enroll::Enrollment {
        let text = std::fs::read_to_string(self.state().join("identity/enrollment")).unwrap();
        perch_protocol::enroll::Enrollment::from_text(&text).unwrap()
    }

    pub fn key(&self) -> perch_protocol::SecretKey {
        let text = std::fs::read_to_string(self.state().join("identity/device.key")).unwrap();
        perch_protocol::SecretKey::from_text(&text).unwrap()
    }

    pub fn is_enrolled(&self) -> bool {
        self.state().join("identity/enrollment").is_file()
    }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Files under `dir` with their permission bits.
pub fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(modes(&p));
            } else if let Ok(m) = std::fs::metadata(&p) {
                out.push((p, m.permissions().mode() & 0o777));
            }
        }
    }
    out
}

/// Reads `PERCH_REPORTS` as an operator would.
pub struct ReportsReader {
    rt: tokio::runtime::Runtime,
    js: async_nats::jetstream::Context,
}

impl Fleet {
    /// A FLEET service user that reads the reports stream.
    /// `perch status ARGS` as an operator with a FLEET credential.
    pub fn status(&self, args: &[&str]) -> crate::Run {
        self.operator(&["status"], args)
    }

    /// `perch COMMAND... --url .. --creds .. --ca .. ARGS` as an operator
    /// with a FLEET credential.
    pub fn operator(&self, command: &[&str], args: &[&str]) -> crate::Run {
        self.reader_creds();
        let mut all = command.to_vec();
        all.extend(["--url", &self.url, "--creds", "reader.creds", "--ca", "org/tls/ca.pem"]);
        all.extend_from_slice(args);
        self.s.run("perch", &all)
    }

    fn reader_creds(&self) -> std::path::PathBuf {
        self.s.fleet_creds("reader")
    }

    pub fn reports_reader(&self) -> ReportsReader {
        let (rt, js) = jetstream_client(&self.reader_creds(), self.ca_der(), self.url.clone());
        ReportsReader { rt, js }
    }
}

/// A subscription usable from a plain test thread (driven by its reader's
/// runtime: a current-thread runtime only runs under its own `block_on`).
pub struct Subscription<'a> {
    sub: Option<async_nats::Subscriber>,
    rt: &'a tokio::runtime::Runtime,
}

impl Subscription<'_> {
    /// The next message within `limit`.
    pub fn next(&mut self, limit: Duration) -> Option<async_nats::Message> {
        use futures_util::StreamExt;
        let sub = self.sub.as_mut()?;
        self.rt.block_on(async { tokio::time::timeout(limit, sub.next()).await.ok().flatten() })
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        // Unsubscribing needs the runtime.
        let _inside = self.rt.enter();
        self.sub.take();
    }
}

impl ReportsReader {
    fn stream(&self) -> Option<async_nats::jetstream::stream::Stream> {
        self.rt.block_on(self.js.get_stream(perch_protocol::subjects::REPORTS_STREAM)).ok()
    }

    /// Messages in the stream.
    pub fn count(&self) -> u64 {
        let Some(mut s) = self.stream() else { return 0 };
        self.rt.block_on(s.info()).map(|i| i.state.messages).unwrap_or(0)
    }

    /// Every report in the stream, in stream order.
    pub fn all(&self) -> Vec<perch_protocol::report::Report> {
        let Some(mut s) = self.stream() else { return vec![] };
        let info = self.rt.block_on(s.info()).unwrap();
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        (first..=last)
            .filter_map(|seq| self.rt.block_on(s.get_raw_message(seq)).ok())
            .map(|m| {
                let r = perch_protocol::report::Report::from_bytes(&m.payload).unwrap();
                // Every report a test reads matches schemas/wire/report.json.
                crate::schema::check("wire/report", &serde_json::to_value(&r).unwrap());
                r
            })
            .collect()
    }
}

impl Device {
    /// Replaces text in agent.toml.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        assert!(text.contains(from), "{from} is not in {}", self.config().display());
        std::fs::write(self.config(), text.replace(from, to)).unwrap();
    }
}

impl ReportsReader {
    /// A plain subscription (as the FLEET operator).
    pub fn subscribe(&self, subject: &str) -> Subscription<'_> {
        let client = self.js.client();
        let sub = self.rt.block_on(async move {
            let sub = client.subscribe(subject.to_string()).await.expect("subscribe");
            client.flush().await.expect("flush");
            sub
        });
        Subscription { sub: Some(sub), rt: &self.rt }
    }

    /// The last message on `subject` in `stream`, if any.
    pub fn last_by_subject(&self, stream: &str, subject: &str) -> Option<Vec<u8>> {
        let s = self.rt.block_on(self.js.get_stream(stream)).ok()?;
        self.rt.block_on(s.get_last_raw_message_by_subject(subject)).ok().map(|m| m.payload.to_vec())
    }
}

impl ReportsReader {
    /// Puts `value` at `key` in KV `bucket`, as an operator would.
    pub fn kv_put(&self, bucket: &str, key: &str, value: &str) {
        let kv = self.rt.block_on(self.js.get_key_value(bucket)).expect("bucket");
        self.rt.block_on(kv.put(key, value.to_string().into())).expect("kv put");
    }
}

impl Fleet {
    /// Builds and signs (with k1) an archive bundle of a directory holding
    /// `len` pseudo-random bytes; publishes it; returns (file, digest, payload length).
    pub fn published_bundle(
        &self,
        name: &str,
        counter: u32,
        len: usize,
        seed: u8,
    ) -> (String, [u8; 32], u64) {
        let made = self.bundle(name, counter, len, seed);
        self.publish(&made.0);
        made
    }

    /// Builds and signs (with k1) an archive bundle of a directory holding
    /// `len` pseudo-random bytes; returns (file, digest, payload length).
    pub fn bundle(&self, name: &str, counter: u32, len: usize, seed: u8) -> (String, [u8; 32], u64) {
        let dir = format!("{name}-{counter}");
        std::fs::create_dir_all(self.s.path(&dir)).unwrap();
        self.s.write_payload(&format!("{dir}/data.bin"), len, seed);
        self.bundle_of_dir(name, counter, &dir)
    }

    /// Builds and signs (with k1) an archive bundle of the scratch
    /// directory `dir`; returns (file, digest, payload length).
    pub fn bundle_of_dir(&self, name: &str, counter: u32, dir: &str) -> (String, [u8; 32], u64) {
        let file = format!("{name}-{counter}.perch");
        let (digest, len) = self.s.signed_archive(name, counter, dir, &file);
        (file, digest, len)
    }

    /// `perch publish` of a bundle file in the scratch dir.
    pub fn publish(&self, file: &str) {
        self.s.publish(&self.url, file);
    }
}

impl ReportsReader {
    /// Publishes `payload` on `subject` and waits for JetStream's ack: what
    /// any FLEET publisher can do, with no release key.
    pub fn js_publish(&self, subject: &str, payload: Vec<u8>) {
        self.js_publish_all(vec![(subject.to_string(), payload)]);
    }

    /// Publishes every `(subject, payload)` in order, waiting for
    /// JetStream's acks a thousand at a time (async-nats holds back a
    /// publish while too many acks are outstanding).
    pub fn js_publish_all(&self, messages: Vec<(String, Vec<u8>)>) {
        let js = &self.js;
        self.rt.block_on(async move {
            let mut acks = Vec::with_capacity(1000);
            for (subject, payload) in messages {
                acks.push(js.publish(subject, payload.into()).await.expect("publish"));
                if acks.len() == 1000 {
                    for ack in acks.drain(..) {
                        ack.await.expect("ack");
                    }
                }
            }
            for ack in acks {
                ack.await.expect("ack");
            }
        });
    }
}

/// A JetStream client of its own runtime, for reading from a plain test
/// thread: FLEET `creds`, TLS trusting only the fleet CA, at `addrs`.
pub fn jetstream_client(
    creds: &Path,
    ca_der: Vec<u8>,
    addrs: impl async_nats::ToServerAddrs,
) -> (tokio::runtime::Runtime, async_nats::jetstream::Context) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(ca_der)).unwrap();
    let creds = creds.to_path_buf();
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
    (rt, js)
}
