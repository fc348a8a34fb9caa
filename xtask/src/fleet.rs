//! A local fleet for the demo and the benchmarks: an org, a nats-server in
//! operator mode with TLS on a free loopback port (or a cluster of them),
//! and provisioners. Every
//! process is killed when the `LocalFleet` is dropped, so nothing is left
//! running whatever happens.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct LocalFleet {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub url: String,
    /// Every server's URL (`url` is the first).
    pub urls: Vec<String>,
    /// A cluster's leafnode listeners, where field sites connect (none
    /// for a single server: a hub is started with its own, see
    /// `site::Uplink::hub`).
    pub leaf_urls: Vec<String>,
    children: Vec<(String, Child)>,
}

impl LocalFleet {
    /// Starts nats-server for the org in `dir/org` (which must exist).
    pub fn start(dir: &Path, bin: &Path) -> Result<LocalFleet> {
        LocalFleet::start_with(dir, bin, "", "")
    }

    /// The same, with `jetstream` added to the server's `jetstream` block
    /// and `extra` to its config (a hub's domain and leafnode listener).
    pub fn start_with(dir: &Path, bin: &Path, jetstream: &str, extra: &str) -> Result<LocalFleet> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.join("nats-server.conf");
        fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\"{jetstream} }}\ninclude \"org/nats/server.conf\"\n{extra}",
                dir.join("jetstream").display()
            ),
        )?;
        println!("  nats-server: {}", crate::util::nats_server_version(&crate::util::nats_server()));
        let mut f = LocalFleet {
            dir: dir.into(),
            bin: bin.into(),
            url: format!("tls://127.0.0.1:{port}"),
            urls: vec![format!("tls://127.0.0.1:{port}")],
            leaf_urls: vec![],
            children: vec![],
        };
        f.server("nats-server", &conf, port)?;
        Ok(f)
    }

    /// Starts a cluster of `n` servers `n1..` configured by `perch-bootstrap
    /// nats cluster` for the org in `dir/org`, each in
    /// `org/nats/cluster/nI/`; returns once they have routes to each other
    /// and a JetStream meta leader.
    pub fn start_cluster(dir: &Path, bin: &Path, n: usize) -> Result<LocalFleet> {
        // Client, route and leafnode ports: probe them all while holding
        // them, so no two are the same.
        let probes = (0..3 * n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
        let ports = probes.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<Vec<_>, _>>()?;
        drop(probes);
        let mut args: Vec<String> = ["nats", "cluster", "--dir", "org", "--bind", "127.0.0.1"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        for i in 0..n {
            let p = &ports[3 * i..3 * i + 3];
            args.extend(["--server".into(), format!("n{}=127.0.0.1:{}:{}:{}", i + 1, p[0], p[1], p[2])]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::util::run_in(dir, &bin.join("perch-bootstrap"), &args)?;
        println!(
            "  nats-server: {} (a cluster of {n})",
            crate::util::nats_server_version(&crate::util::nats_server())
        );
        let urls: Vec<String> = (0..n).map(|i| format!("tls://127.0.0.1:{}", ports[3 * i])).collect();
        let leaf_urls = (0..n).map(|i| format!("tls://127.0.0.1:{}", ports[3 * i + 2])).collect();
        let mut f = LocalFleet {
            dir: dir.into(),
            bin: bin.into(),
            url: urls[0].clone(),
            urls,
            leaf_urls,
            children: vec![],
        };
        let sdirs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("org/nats/cluster/n{i}"))).collect();
        for (i, sdir) in sdirs.iter().enumerate() {
            f.server(&format!("nats-server-n{}", i + 1), &sdir.join("nats-server.conf"), ports[3 * i])?;
        }
        let logs = || {
            (1..=n).map(|i| fs::read_to_string(dir.join(format!("nats-server-n{i}.log"))).unwrap_or_default())
        };
        let start = Instant::now();
        loop {
            let all: Vec<String> = logs().collect();
            let routed = all.iter().all(|l| l.matches("Route connection created").count() >= n - 1);
            if routed && all.iter().any(|l| l.contains("metadata leader")) {
                return Ok(f);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the cluster did not form in 30 s: {}", all.join("\n---\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts nats-server with `conf` (logging to `NAME.log`, stopped on
    /// drop) and waits until it listens on `port`.
    pub fn server(&mut self, name: &str, conf: &Path, port: u16) -> Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let child = Command::new(crate::util::nats_server())
            .arg("-c")
            .arg(conf)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path)?)
            .spawn()
            .context("starting nats-server (install it with `cargo xtask setup`)")?;
        self.children.push((name.into(), child));
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{name} did not start: {}", fs::read_to_string(&log_path)?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts a provisioner and waits for it to say it is ready.
    pub fn provisioner(&mut self) -> Result<()> {
        let n = self.children.iter().filter(|(name, _)| name.starts_with("provisioner")).count();
        let mut args = vec!["run".to_string(), "--dir".into(), "org".into()];
        for u in &self.urls {
            args.extend(["--url".into(), u.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ready(&format!("provisioner-{n}"), &args, "provisioner ready")
    }

    /// Starts `perch-bootstrap ARGS` (logging to `NAME.log`, stopped on
    /// drop) and waits for its first line to be `ready`.
    pub fn ready(&mut self, name: &str, args: &[&str], ready: &str) -> Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let mut child = Command::new(self.bin.join("perch-bootstrap"))
            .args(args)
            .current_dir(&self.dir)
            // What it logs at info is what the demo and the benches read.
            .env("PERCH_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log_path)?)
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("perch-bootstrap stdout")?);
        // Its first line, read aside so that a process that says nothing
        // cannot hang the caller.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            for _ in out.lines() {}
        });
        self.children.push((name.into(), child));
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| "(nothing in 30 s)".into());
        if line.trim() != ready {
            bail!(
                "{name} did not say {ready:?} (it said {:?}): {}",
                line.trim(),
                fs::read_to_string(&log_path)?
            );
        }
        Ok(())
    }

    /// The process ids of the nats-servers (field sites' too), by name.
    pub fn servers(&self) -> Vec<(String, u32)> {
        let servers = self.children.iter().filter(|(name, _)| name.contains("nats-server"));
        servers.map(|(name, c)| (name.clone(), c.id())).collect()
    }

    /// Keeps a background process to kill on drop.
    pub fn adopt(&mut self, name: &str, child: Child) {
        self.children.push((name.into(), child));
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        // Devices and provisioners first, the server last.
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
