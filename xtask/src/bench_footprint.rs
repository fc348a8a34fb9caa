//! `cargo xtask bench footprint [--seconds N]`: what the agent costs a device.
//!
//! - Size: the stripped static aarch64 `perch-agent` against `footprint-min`
//!   (the same tokio and async-nats features, nothing of perch), both built
//!   the same way (release profile, Debian's rustc 1.85). Goal: ≤ 3 MB.
//! - Memory: the x86_64 release agent, enrolled, connected to a local
//!   nats-server with TLS and idle for N seconds (default 60): VmRSS and
//!   VmHWM from /proc/<pid>/status, against `footprint-min` connected and
//!   idle as long. Goal: ≤ 6 MB.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cross::TARGETS;
use crate::fleet::LocalFleet;
use crate::util::{root, run_in, step};

const MB: f64 = 1_000_000.0;

pub fn run(args: &[String]) -> Result<()> {
    let seconds: u64 = match args {
        [] => 60,
        [flag, n] if flag == "--seconds" => n.parse().context("--seconds takes a number")?,
        _ => bail!("usage: cargo xtask bench footprint [--seconds N]"),
    };
    let class = |c: &str| TARGETS.iter().find(|t| t.class == c).context("unknown class");
    let (arm, x86) = (class("aarch64-drone")?, class("x86_64-desktop")?);

    let agent_arm = crate::cross::build_package(arm, "perch-agent", "perch-agent")?;
    let min_arm = crate::cross::build_package(arm, "perch-footprint", "footprint-min")?;
    let agent_x86 = crate::cross::build_package(x86, "perch-agent", "perch-agent")?;
    let min_x86 = crate::cross::build_package(x86, "perch-footprint", "footprint-min")?;
    let (a, m) = (fs::metadata(&agent_arm)?.len(), fs::metadata(&min_arm)?.len());

    step(&format!("bench footprint: idle memory after {seconds} s connected"));
    crate::util::build_host_tools()?;
    let host = root().join("target/debug");
    let dir = crate::util::fresh_dir("bench-footprint")?;
    run_in(&dir, &host.join("perch"), &["keygen", "--out", "k1"])?;
    run_in(
        &dir,
        &host.join("perch-bootstrap"),
        &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"],
    )?;
    let mut fleet = LocalFleet::start(&dir, &host)?;
    fleet.provisioner()?;
    let dev = dir.join("dev");
    fs::create_dir_all(dev.join("slots/a"))?;
    std::os::unix::fs::symlink("a", dev.join("slots/current"))?;
    fs::copy(dir.join("org/trust.doc"), dev.join("trust.doc"))?;
    fs::write(
        dev.join("agent.toml"),
        format!(
            "target = \"x86_64-desktop\"\ntrust = \"{}\"\n[device]\nid = \"bench-1\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n",
            dev.join("trust.doc").display(),
            dev.join("slots").display()
        ),
    )?;
    let agent = |args: &[&str]| -> Result<String> {
        let mut all = vec!["--config", "dev/agent.toml", "--state-dir", "dev/state"];
        all.extend_from_slice(args);
        run_in(&dir, &agent_x86, &all)
    };
    agent(&["enroll", "--request-out", "req"])?;
    run_in(
        &dir,
        &host.join("perch-bootstrap"),
        &[
            "sign-request",
            "--dir",
            "org",
            "req",
            "--out",
            "resp",
            "--group",
            "bench",
            "--fleet-url",
            &fleet.url,
        ],
    )?;
    agent(&["enroll", "--import", "resp"])?;
    let mut run = Command::new(&agent_x86)
        .args(["--config", "dev/agent.toml", "--state-dir", "dev/state", "run"])
        .current_dir(&dir)
        .env("PERCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    // The floor connects to a plain nats-server: it has no perch credential
    // to present. Without TLS it is a lower bound for the agent's memory.
    let plain = PlainServer::start(&dir)?;
    let mut min = Command::new(&min_x86)
        .args([plain.url.as_str(), &(seconds + 30).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(seconds));
    let agent_mem = memory(&run)?;
    let min_mem = memory(&min)?;
    let linked = fs::read_to_string(dev.join("state/link.json")).unwrap_or_default();
    for c in [&mut run, &mut min] {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(plain);
    drop(fleet);
    if !linked.contains("\"connected\"") {
        bail!("the agent was not connected when measured: {linked}");
    }

    println!();
    println!("size (stripped, static aarch64, release profile)");
    println!("  perch-agent    {:>10} bytes  {:.2} MB", a, a as f64 / MB);
    println!("  footprint-min  {:>10} bytes  {:.2} MB  (same tokio + async-nats features)", m, m as f64 / MB);
    println!(
        "  agent / floor  {:.2}x;  perch's own code and other deps: {:.2} MB",
        a as f64 / m as f64,
        (a - m) as f64 / MB
    );
    println!("  goal <= 3 MB:  {}", if a as f64 <= 3.0 * MB { "met" } else { "NOT met" });
    println!("idle memory after {seconds} s connected (x86_64 release)");
    println!(
        "  perch-agent    VmRSS {:.2} MB, VmHWM {:.2} MB",
        agent_mem.0 as f64 / MB,
        agent_mem.1 as f64 / MB
    );
    println!("  footprint-min  VmRSS {:.2} MB, VmHWM {:.2} MB", min_mem.0 as f64 / MB, min_mem.1 as f64 / MB);
    println!("  goal <= 6 MB:  {}", if agent_mem.0 as f64 <= 6.0 * MB { "met" } else { "NOT met" });
    fs::remove_dir_all(&dir)?;
    Ok(())
}

/// (VmRSS, VmHWM) in bytes.
fn memory(c: &Child) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{}/status", c.id()))?;
    let field = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).context(format!("no {name}"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A plain nats-server with JetStream, for the floor program.
struct PlainServer {
    child: Child,
    url: String,
}

impl PlainServer {
    fn start(dir: &Path) -> Result<PlainServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let store = dir.join("plain-js");
        let child = Command::new(crate::util::nats_server())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("plain nats-server did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(PlainServer { child, url: format!("nats://127.0.0.1:{port}") })
    }
}

impl Drop for PlainServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
