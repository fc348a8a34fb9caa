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
    pub port: u16,
    children: Vec<(String, Child)>,
}

impl LocalFleet {
    /// Starts nats-server for the org in `dir/org` (which must exist).
    pub fn start(dir: &Path, bin: &Path) -> Result<LocalFleet> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.join("nats-server.conf");
        fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ninclude \"org/nats/server.conf\"\n",
                dir.join("jetstream").display()
            ),
        )?;
        let log = fs::File::create(dir.join("nats-server.log"))?;
        let server = crate::util::nats_server();
        println!("  nats-server: {}", crate::util::nats_server_version(&server));
        let child = Command::new(&server)
            .arg("-c")
            .arg(&conf)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server (install it with `cargo xtask setup`)")?;
        let f = LocalFleet {
            dir: dir.into(),
            bin: bin.into(),
            url: format!("tls://127.0.0.1:{port}"),
            port,
            children: vec![("nats-server".into(), child)],
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("nats-server did not start: {}", fs::read_to_string(dir.join("nats-server.log"))?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(f)
    }

    /// Starts a provisioner and waits for it to say it is ready.
    pub fn provisioner(&mut self) -> Result<()> {
        let n = self.children.iter().filter(|(name, _)| name.starts_with("provisioner")).count();
        let log = fs::File::create(self.dir.join(format!("provisioner-{n}.log")))?;
        let mut child = Command::new(self.bin.join("perch-bootstrap"))
            .args(["run", "--dir", "org", "--url", &self.url])
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("provisioner stdout")?);
        // Its first line, read aside so that a provisioner that says
        // nothing cannot hang the caller.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            for _ in out.lines() {}
        });
        self.children.push((format!("provisioner-{n}"), child));
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| "(nothing in 30 s)".into());
        if line.trim() != "provisioner ready" {
            bail!(
                "provisioner did not say it was ready (it said {:?}): {}",
                line.trim(),
                fs::read_to_string(self.dir.join(format!("provisioner-{n}.log")))?
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
