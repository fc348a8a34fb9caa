//! A local fleet for the demo and the benchmarks: an org, a nats-server in
//! operator mode with TLS on a free loopback port, and provisioners. Every
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
            children: vec![],
        };
        f.server("nats-server", &conf, port)?;
        Ok(f)
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
        let url = self.url.clone();
        self.ready(&format!("provisioner-{n}"), &["run", "--dir", "org", "--url", &url], "provisioner ready")
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
