//! A real nats-server for tests: free loopback port, JetStream in a temp
//! dir, killed on drop. And a minimal NATS protocol client over TLS, so
//! tests can see the server's own permission errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use perch_net::CaTrust;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};

/// The org's fleet CA certificate (DER), from `ORG/tls/ca.pem`.
pub fn org_ca_der(org_dir: &Path) -> Vec<u8> {
    let path = org_dir.join("tls/ca.pem");
    CertificateDer::from_pem_file(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .as_ref()
        .to_vec()
}

/// Reads the server's plaintext `INFO {...}` line, one byte at a time so
/// nothing after it (the TLS handshake) is consumed.
pub fn read_info(s: &mut TcpStream) -> serde_json::Value {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).expect("INFO from nats-server"), 1, "nats-server closed before INFO");
        line.push(b[0]);
        assert!(line.len() < 64 * 1024, "INFO line too long");
    }
    let line = String::from_utf8(line).expect("INFO is text");
    let json = line.trim_end().strip_prefix("INFO ").unwrap_or_else(|| panic!("not an INFO line: {line}"));
    serde_json::from_str(json).expect("INFO JSON")
}

pub struct NatsServer {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl NatsServer {
    /// Starts nats-server with `extra` config (e.g. an `include`), storing
    /// JetStream data and the log under `dir`.
    pub fn start(dir: &Path, extra: &str) -> NatsServer {
        Self::start_with(dir, "", |_| extra.to_string())
    }

    /// A single hub for field sites: the org's include (`ORG/nats/server.conf`,
    /// with `org` relative to `dir`), JetStream domain `hub`, and a leafnode
    /// listener over TLS with the org's server certificate on a free
    /// loopback port (returned). What docs/content/operations/field-sites.md
    /// tells an operator to add to a single server.
    pub fn start_hub(dir: &Path, org: &str) -> (NatsServer, u16) {
        let leaf = std::cell::Cell::new(0);
        let s = Self::start_with(
            dir,
            &format!("domain: \"{}\"", perch_protocol::subjects::HUB_DOMAIN),
            |_| {
                leaf.set(free_port());
                let tls = |f: &str| dir.join(org).join("tls").join(f).display().to_string();
                format!(
                "leafnodes {{\n  listen: \"127.0.0.1:{}\"\n  tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", timeout: 5 }}\n}}\ninclude \"{org}/nats/server.conf\"",
                leaf.get(),
                tls("server.pem"),
                tls("server.key"),
                tls("ca.pem"),
            )
            },
        );
        (s, leaf.get())
    }

    /// Starts the server whose `nats-server.conf` is in `dir` already (a
    /// field site's, from `site init`), listening for clients on `port`.
    pub fn start_config(dir: &Path, port: u16) -> NatsServer {
        let mut s = NatsServer { child: spawn(dir), port, dir: dir.to_path_buf() };
        assert!(s.wait_ready(), "nats-server in {} did not start: {}", dir.display(), s.log());
        s
    }

    /// [`NatsServer::start`] with `jetstream` settings added after the
    /// store dir and `extra` made afresh for each try.
    pub fn start_with(dir: &Path, jetstream: &str, extra: impl Fn(u16) -> String) -> NatsServer {
        // A free port can be taken by another test between our probe and
        // nats-server's bind; then nats-server exits, and we try another.
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.join("nats-server.conf");
            std::fs::write(
                &conf,
                format!(
                    "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  {jetstream}\n}}\n{}\n",
                    dir.join("js").display(),
                    extra(port)
                ),
            )
            .unwrap();
            let child = spawn(dir);
            let mut s = NatsServer { child, port, dir: dir.to_path_buf() };
            if s.wait_ready() {
                return s;
            }
        }
        panic!(
            "nats-server did not start: {}",
            std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default()
        );
    }

    /// Waits until our server listens; false if it exited (port taken).
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Still ours a moment later: it did not lose the port.
                std::thread::sleep(Duration::from_millis(50));
                return matches!(self.child.try_wait(), Ok(None));
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server did not start: {}",
                std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` (`STOP`, `CONT`, ...) to the server: `STOP` makes a
    /// server that keeps its connections open and answers nothing.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
        assert!(st.is_ok_and(|s| s.success()), "kill -{sig} nats-server");
    }

    /// Kills the server hard (SIGKILL), for good.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server hard (SIGKILL) and starts it again on the same port
    /// with the same JetStream store: what a crash and a restart look like.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.dir);
        assert!(self.wait_ready(), "nats-server did not come back on port {}", self.port);
    }
}

/// A cluster of real nats-servers on free loopback ports, configured by
/// `perch-bootstrap nats cluster` from the org in `DIR/org` (routes over
/// TLS, operator mode, JetStream): each server's files, store and log are
/// in `org/nats/cluster/nI/`. Killed on drop.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    /// Each server's leafnode port, where field sites connect.
    pub leaf_ports: Vec<u16>,
}

impl NatsCluster {
    /// Writes the configs of `n` servers `n1..` and starts them all; waits
    /// until every one of them knows the JetStream meta leader.
    pub fn start(dir: &Path, n: usize) -> NatsCluster {
        let mut args: Vec<String> = ["nats", "cluster", "--dir", "org", "--bind", "127.0.0.1"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        // free_port never gives the same port twice.
        let ports: Vec<u16> = (0..3 * n).map(|_| free_port()).collect();
        for i in 0..n {
            // Client, route and leafnode port: all on one host.
            let p = &ports[3 * i..3 * i + 3];
            args.push("--server".into());
            args.push(format!("n{}=127.0.0.1:{}:{}:{}", i + 1, p[0], p[1], p[2]));
        }
        let out = Command::new(crate::bin("perch-bootstrap")).args(&args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "nats cluster: {}", String::from_utf8_lossy(&out.stderr));
        let servers = (0..n)
            .map(|i| {
                let sdir = dir.join(format!("org/nats/cluster/n{}", i + 1));
                let mut s = NatsServer { child: spawn(&sdir), port: ports[3 * i], dir: sdir };
                assert!(s.wait_ready(), "n{} did not start: {}", i + 1, s.log());
                s
            })
            .collect();
        let leaf_ports = (0..n).map(|i| ports[3 * i + 2]).collect();
        let c = NatsCluster { servers, leaf_ports };
        c.wait_meta_leader(Duration::from_secs(30));
        c
    }

    /// `tls://127.0.0.1:PORT` of every server.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| format!("tls://127.0.0.1:{}", s.port)).collect()
    }

    /// Kills server `i` hard (SIGKILL); it stays down.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts server `i` again (killed first if running) with its store.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].restart();
    }

    /// Waits until every server has routes to all the others and one of
    /// them has logged a JetStream meta leader ("JetStream cluster new
    /// metadata leader", or "Self is new ..."; followers may log neither).
    pub fn wait_meta_leader(&self, limit: Duration) {
        let start = Instant::now();
        let others = self.servers.len() - 1;
        loop {
            let logs: Vec<String> = self.servers.iter().map(NatsServer::log_since_start).collect();
            let routed = logs.iter().all(|l| l.matches("Route connection created").count() >= others);
            if routed && logs.iter().any(|l| l.contains("metadata leader")) {
                return;
            }
            assert!(start.elapsed() < limit, "the cluster did not form: {}", logs.join("\n---\n"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the server named `name` (`n1` is 0).
    pub fn index_of(&self, name: &str) -> usize {
        name.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()).filter(|&n| n >= 1).unwrap() - 1
    }
}

impl NatsServer {
    /// The server's log (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default()
    }

    /// The log of the server's current run.
    pub fn log_since_start(&self) -> String {
        let log = self.log();
        let last = log.rfind("Starting nats-server").unwrap_or(0);
        log[last..].to_string()
    }

    /// Where the server keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // Below Linux's ephemeral range (32768-60999): a port handed to a
    // server that starts a moment later must not be taken meanwhile by a
    // port-0 listener or an outgoing connection of a test running beside
    // it (a browser opens many). Never the same port twice in a process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(given.len());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// The nats-server the tests run: `$PERCH_NATS_SERVER` (a path or a name on
/// PATH), else Debian's `nats-server` (2.9.10, the embedded default).
/// `cargo xtask ci` runs the server tests a second time with the current
/// upstream release it installs under `target/nats-current/`.
pub fn server_binary() -> std::ffi::OsString {
    std::env::var_os("PERCH_NATS_SERVER").filter(|v| !v.is_empty()).unwrap_or_else(|| "nats-server".into())
}

fn spawn(dir: &Path) -> Child {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join("nats-server.log")).unwrap();
    Command::new(server_binary())
        .current_dir(dir)
        .arg("-c")
        .arg(dir.join("nats-server.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{:?}: {e} (install it with `cargo xtask setup`)", server_binary()))
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Protocol lines a server sends on its own, not in answer to anything.
#[derive(Debug, PartialEq)]
enum Async {
    Ping,
    Info,
}

fn asynchronous(line: &str) -> Option<Async> {
    // Protocol verbs are case-insensitive.
    let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
    match verb.as_str() {
        "PING" => Some(Async::Ping),
        "INFO" => Some(Async::Info),
        _ => None,
    }
}

/// A line-level NATS client: just enough protocol to authenticate with a
/// user JWT and see what the server allows. Speaks TLS like NATS clients do
/// with nats-server 2.9: plaintext `INFO`, then the TLS handshake on the
/// same socket, then everything else inside TLS.
pub struct RawClient {
    s: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl RawClient {
    /// Connects over TLS trusting only `ca_der` (the fleet CA certificate)
    /// and authenticates with `jwt`, signing the server's nonce with
    /// `sign`. Returns the client and the server's first answer to
    /// `CONNECT` + `PING` (`PONG`, or an `-ERR ...` line).
    pub fn connect(
        port: u16,
        ca_der: &[u8],
        jwt: &str,
        sign: impl Fn(&[u8]) -> String,
    ) -> (RawClient, String) {
        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let info = read_info(&mut sock);
        assert_eq!(info["tls_required"], true, "nats-server must require TLS: {info}");
        let nonce = info["nonce"].as_str().unwrap_or("").to_string();

        let config = perch_net::tls::client_config(&CaTrust::Certificate(ca_der.to_vec())).unwrap();
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        let conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake with nats-server");
        }
        let mut c = RawClient { s: BufReader::new(tls) };

        let connect = serde_json::json!({
            "jwt": jwt, "sig": sign(nonce.as_bytes()), "verbose": false, "pedantic": false,
            "tls_required": true, "protocol": 1, "headers": false, "name": "perch-test",
        });
        c.send(&format!("CONNECT {connect}\r\nPING\r\n"));
        let answer = c.line();
        (c, answer)
    }

    pub fn send(&mut self, s: &str) {
        let w = self.s.get_mut();
        w.write_all(s.as_bytes()).unwrap();
        w.flush().unwrap();
    }

    /// The next protocol line that answers us ("" on timeout). A server may
    /// send `PING` and `INFO` at any time: nats-server 2.10+ sends a second
    /// `INFO` right after `CONNECT` (`connect_info`), and every version sends
    /// one when the cluster changes. Both are handled here, as a real client
    /// must, and never taken for an answer.
    pub fn line(&mut self) -> String {
        loop {
            let mut l = String::new();
            if self.s.read_line(&mut l).unwrap_or(0) == 0 {
                return String::new();
            }
            let l = l.trim_end().to_string();
            match asynchronous(&l) {
                Some(Async::Ping) => self.send("PONG\r\n"),
                Some(Async::Info) => {}
                None => return l,
            }
        }
    }

    /// Publishes, then PINGs: returns `PONG` if the server took it, or its `-ERR`.
    pub fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &str) -> String {
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        self.send(&format!("PUB {subject}{reply} {}\r\n{payload}\r\nPING\r\n", payload.len()));
        let answer = self.line();
        if answer.starts_with("-ERR") {
            // The PING still gets its PONG after a refused PUB.
            let _ = self.line();
        }
        answer
    }

    /// Sends a request and returns the reply's payload (None on timeout).
    pub fn request(&mut self, subject: &str, inbox: &str, sid: u32) -> Option<String> {
        self.send(&format!("SUB {inbox} {sid}\r\nPUB {subject} {inbox} 0\r\n\r\n"));
        loop {
            let l = self.line();
            if l.is_empty() {
                return None;
            }
            if l.starts_with("MSG ") {
                return Some(self.line());
            }
        }
    }

    /// Subscribes, then PINGs: `PONG` if the server took it, or its `-ERR`.
    pub fn subscribe(&mut self, subject: &str, sid: u32) -> String {
        self.send(&format!("SUB {subject} {sid}\r\nPING\r\n"));
        let answer = self.line();
        if answer.starts_with("-ERR") {
            let _ = self.line();
        }
        answer
    }

    /// Sends a binary request and returns the reply's payload bytes (None
    /// on timeout or if the server refused it).
    pub fn request_bytes(&mut self, subject: &str, inbox: &str, sid: u32, payload: &[u8]) -> Option<Vec<u8>> {
        self.send(&format!("SUB {inbox} {sid}\r\nPUB {subject} {inbox} {}\r\n", payload.len()));
        let w = self.s.get_mut();
        w.write_all(payload).unwrap();
        w.write_all(b"\r\n").unwrap();
        w.flush().unwrap();
        loop {
            let l = self.line();
            if l.is_empty() || l.starts_with("-ERR") {
                return None;
            }
            if l.starts_with("MSG ") {
                let size: usize = l.split_whitespace().last()?.parse().ok()?;
                let mut buf = vec![0u8; size + 2];
                std::io::Read::read_exact(&mut self.s, &mut buf).ok()?;
                buf.truncate(size);
                self.send(&format!("UNSUB {sid}\r\n"));
                return Some(buf);
            }
        }
    }

    /// Reads the next MSG's payload.
    pub fn next_msg(&mut self) -> Option<(String, String)> {
        let head = self.line();
        if !head.starts_with("MSG ") {
            return None;
        }
        let subject = head.split_whitespace().nth(1)?.to_string();
        let payload = self.line();
        Some((subject, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_info_and_ping_are_never_taken_for_an_answer() {
        assert_eq!(asynchronous("PING"), Some(Async::Ping));
        assert_eq!(asynchronous("ping"), Some(Async::Ping));
        assert_eq!(asynchronous(r#"INFO {"server_id":"x","connect_info":true}"#), Some(Async::Info));
        assert_eq!(asynchronous("PONG"), None);
        assert_eq!(asynchronous("-ERR 'Authorization Violation'"), None);
        assert_eq!(asynchronous("MSG a 1 0"), None);
    }
}
