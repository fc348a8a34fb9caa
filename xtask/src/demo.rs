//! `cargo xtask demo`: the release flow, narrated, on this machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::fleet::LocalFleet;
use crate::util::{cargo, root, sh};

struct Demo {
    dir: PathBuf,
    bin: PathBuf,
}

impl Demo {
    /// Runs a perch binary in the demo directory, prints what it said, and
    /// checks the exit code is the one the story expects.
    fn sh(&self, program: &str, args: &[&str], expect: i32) -> Result<String> {
        println!("  $ {program} {}", args.join(" "));
        let out = Command::new(self.bin.join(program)).args(args).current_dir(&self.dir).output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for line in text.lines() {
            println!("    {line}");
        }
        let code = out.status.code().unwrap_or(-1);
        if code != expect {
            bail!("`{program} {}` exited {code}, expected {expect}", args.join(" "));
        }
        if expect != 0 {
            println!("    (exit code {code})");
        }
        Ok(text)
    }
}

fn say(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

pub fn run() -> Result<()> {
    println!("perch demo: signed bundles from key to device check\n(building the binaries first)");
    sh(cargo().args([
        "build",
        "-q",
        "--bins",
        "-p",
        "perch-fleet",
        "-p",
        "perch-bootstrap",
        "-p",
        "perch-agent",
    ]))?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let dir = target_dir.join("demo");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let d = Demo { dir: dir.clone(), bin: target_dir.join("debug") };
    println!("working in {}", dir.display());

    say(1, "Three release engineers each make a release key. Secret keys stay with them (mode 0600).");
    for who in ["alice", "bob", "carol"] {
        d.sh("perch", &["keygen", "--out", who], 0)?;
    }

    say(2, "The org is created offline: a root key signs a trust document that says any 2 of the 3 release keys may sign a release.");
    d.sh(
        "perch-bootstrap",
        &[
            "init",
            "--dir",
            "org",
            "--org",
            "demo",
            "--release-key",
            "alice.pub",
            "--release-key",
            "bob.pub",
            "--release-key",
            "carol.pub",
            "--threshold",
            "2",
        ],
        0,
    )?;

    say(3, "A release: a 4 MiB root filesystem image for the aarch64 drones, in 256 KiB chunks.");
    write_image(&dir.join("rootfs.img"), 4 << 20)?;
    d.sh(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "drone-os",
            "--counter",
            "7",
            "--release-version",
            "2.4.1",
            "--kind",
            "image",
            "--input",
            "rootfs.img",
            "--out",
            "drone-os.perch",
            "--target",
            "aarch64-drone",
        ],
        0,
    )?;

    say(4, "Alice signs. One signature is below the threshold, so the bundle is refused (exit 3).");
    d.sh("perch", &["bundle", "sign", "--key", "alice.key", "drone-os.perch"], 0)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "drone-os.perch"], 3)?;

    say(5, "Alice signing again adds nothing; Bob's signature makes two of three.");
    d.sh("perch", &["bundle", "sign", "--key", "alice.key", "drone-os.perch"], 0)?;
    d.sh("perch", &["bundle", "sign", "--key", "bob.key", "drone-os.perch"], 0)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "drone-os.perch"], 0)?;

    say(6, "Anyone can inspect a bundle; inspect says plainly that it has not checked anything.");
    d.sh("perch", &["bundle", "inspect", "drone-os.perch"], 0)?;

    say(7, "A tampered copy: one bit flipped in the middle of the payload. Verification names the chunk.");
    let good = fs::read(dir.join("drone-os.perch"))?;
    let mut bad = good.clone();
    let at = good.len() - (2 << 20);
    bad[at] ^= 0x01;
    fs::write(dir.join("tampered.perch"), &bad)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "tampered.perch"], 3)?;

    say(8, "A copy cut short in transfer, and one with a flipped bit in the signed manifest.");
    fs::write(dir.join("truncated.perch"), &good[..good.len() - 1000])?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "truncated.perch"], 3)?;
    let mut bad = good.clone();
    bad[40] ^= 0x01;
    fs::write(dir.join("forged.perch"), &bad)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "forged.perch"], 3)?;

    say(9, "A desktop release from a directory tree: a deterministic tar, so the same tree always gives the same chunks.");
    fs::create_dir_all(dir.join("app/bin"))?;
    fs::write(dir.join("app/bin/hello"), "#!/bin/sh\necho hello from perch\n")?;
    fs::write(dir.join("app/VERSION"), "1.0.0\n")?;
    d.sh(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "desk-app",
            "--counter",
            "1",
            "--kind",
            "archive",
            "--input",
            "app",
            "--out",
            "desk-app.perch",
            "--target",
            "x86_64-desktop",
        ],
        0,
    )?;
    d.sh("perch", &["bundle", "sign", "--key", "bob.key", "desk-app.perch"], 0)?;
    d.sh("perch", &["bundle", "sign", "--key", "carol.key", "desk-app.perch"], 0)?;

    say(10, "On a device, the agent runs the same checks offline, including the device's target.");
    d.sh(
        "perch-agent",
        &["check", "--trust", "org/trust.doc", "--target", "x86_64-desktop", "desk-app.perch"],
        0,
    )?;
    d.sh(
        "perch-agent",
        &["check", "--trust", "org/trust.doc", "--target", "x86_64-desktop", "drone-os.perch"],
        3,
    )?;

    desktop(&d)?;
    enrollment(&d)?;

    println!("\nDemo complete: good bundles verified and committed, a broken release rolled back by its health check,");
    println!(
        "every damaged, under-signed, misdirected or replayed bundle refused with exit 3, and three devices"
    );
    println!(
        "enrolled three ways (zero-touch, technician approval, offline files); a drone that lost its link"
    );
    println!("mid-download resumed, committed and lost no report; a stolen desktop revoked live.");
    println!("Files are in {}; nothing is left running.", dir.display());
    Ok(())
}

/// A desktop with directory slots: install, a failing release rolled back,
/// a replayed old release refused.
fn desktop(d: &Demo) -> Result<()> {
    let root = d.dir.join("desktop");
    fs::create_dir_all(root.join("slots/a/bin"))?;
    fs::write(root.join("slots/a/bin/hello"), "echo hello from the factory image\n")?;
    std::os::unix::fs::symlink("a", root.join("slots/current"))?;
    fs::write(root.join("boot_id"), "demo\n")?;
    let p = |rel: &str| d.dir.join(rel).display().to_string();
    fs::write(
        root.join("agent.toml"),
        format!(
            "target = \"x86_64-desktop\"\ntrust = \"{}\"\nboot_id = \"{}\"\n\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n\n[health]\ncommands = [\"sh {}/current/bin/hello\"]\ntrial = \"3s\"\ninterval = \"500ms\"\n",
            p("org/trust.doc"),
            p("desktop/boot_id"),
            p("desktop/slots"),
            p("desktop/slots"),
        ),
    )?;
    let run = |rest: &[&str], expect: i32| -> Result<String> {
        let mut args = vec!["--config", "desktop/agent.toml", "--state-dir", "desktop/state"];
        args.extend_from_slice(rest);
        d.sh("perch-agent", &args, expect)
    };
    let release = |counter: &str, hello: &str, signers: [&str; 2]| -> Result<String> {
        fs::write(d.dir.join("app/bin/hello"), hello)?;
        let out = format!("desk-app-{counter}.perch");
        d.sh(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "desk-app",
                "--counter",
                counter,
                "--kind",
                "archive",
                "--input",
                "app",
                "--out",
                &out,
                "--target",
                "x86_64-desktop",
            ],
            0,
        )?;
        for k in signers {
            d.sh("perch", &["bundle", "sign", "--key", k, &out], 0)?;
        }
        Ok(out)
    };

    say(11, "A desktop with directory slots a and b runs slot a. The agent installs the desktop release into slot b, switches `current` to it, runs the health check (`sh current/bin/hello`) and commits.");
    run(&["install", "desk-app.perch"], 0)?;
    run(&["status"], 0)?;

    say(12, "Release 2 is broken: its hello exits 1. It installs into the idle slot, fails its trial, and the agent rolls back by itself (exit 1).");
    let broken = release("2", "echo this release is broken >&2; exit 1\n", ["alice.key", "carol.key"])?;
    run(&["install", &broken], 1)?;
    run(&["status"], 0)?;

    say(13, "Release 3 fixes it and commits. Then someone replays the old release 1: it is validly signed, but its counter is below the committed one, so it is refused (exit 3).");
    let fixed = release("3", "echo hello from release 3\n", ["alice.key", "bob.key"])?;
    run(&["install", &fixed], 0)?;
    run(&["install", "desk-app.perch"], 3)?;
    run(&["status"], 0)?;
    Ok(())
}

/// Enrollment, three ways in, against a real nats-server and provisioner.
fn enrollment(d: &Demo) -> Result<()> {
    say(14, "Enrollment. nats-server starts in operator mode with TLS (the fleet CA that `init` made), and a provisioner joins it as a NATS service.");
    let mut fleet = LocalFleet::start(&d.dir, &d.bin)?;
    fleet.provisioner()?;
    println!(
        "    nats-server on {} (log: nats-server.log), provisioner ready (log: provisioner-0.log)",
        fleet.url
    );
    let url = fleet.url.clone();
    // drone-09's radio: a proxy that can cut the link (step 20).
    let radio = perch_chaos::Proxy::start(([127, 0, 0, 1], fleet.port).into());
    let device = |name: &str, extra: &str| -> Result<PathBuf> {
        let dev = d.dir.join(name);
        fs::create_dir_all(dev.join("slots"))?;
        fs::write(
            dev.join("agent.toml"),
            format!(
                "target = \"x86_64-desktop\"\ntrust = \"{}\"\n[device]\nid = \"{name}\"\n{extra}[slots]\nbackend = \"dir\"\nroot = \"{}\"\n",
                dev.join("trust.doc").display(),
                dev.join("slots").display()
            ),
        )?;
        Ok(dev)
    };
    let agent = |name: &str, rest: &[&str], expect: i32| -> Result<String> {
        let mut args = vec![
            "--config".to_string(),
            format!("{name}/agent.toml"),
            "--state-dir".into(),
            format!("{name}/state"),
        ];
        args.extend(rest.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        d.sh("perch-agent", &args, expect)
    };

    say(15, "Zero-touch desktop: its image holds only an enrollment token. At first boot `perch-agent run` enrolls it with nobody present, then joins FLEET.");
    d.sh(
        "perch-bootstrap",
        &[
            "token", "issue", "--dir", "org", "--group", "desktops", "--uses", "100", "--ttl", "30d",
            "--url", &url, "--json",
        ],
        0,
    )
    .and_then(|json| {
        let v: serde_json::Value = serde_json::from_str(json.trim())?;
        fs::write(d.dir.join("desktops.token"), v["token"].as_str().unwrap_or_default())?;
        Ok(())
    })?;
    let desk = device(
        "desk-01",
        &format!(
            "[enroll]\ntoken_file = \"{}\"\n[reports]\nheartbeat = \"2s\"\n",
            d.dir.join("desktops.token").display()
        ),
    )?;
    let child = Command::new(d.bin.join("perch-agent"))
        .args(["--config", "desk-01/agent.toml", "--state-dir", "desk-01/state", "run"])
        .current_dir(&d.dir)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(d.dir.join("desk-01.log"))?)
        .spawn()?;
    fleet.adopt("desk-01", child);
    let start = std::time::Instant::now();
    while !desk.join("state/identity/enrollment").exists() {
        if start.elapsed() > std::time::Duration::from_secs(30) {
            bail!("desk-01 did not enroll: {}", fs::read_to_string(d.dir.join("desk-01.log"))?);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    agent("desk-01", &["status"], 0)?;

    say(16, "A drone in a technician's hands: a one-use token that needs approval, shown as a QR code for the drone's camera (here we pass the text).");
    let token = d.sh(
        "perch-bootstrap",
        &[
            "token",
            "issue",
            "--dir",
            "org",
            "--group",
            "drones",
            "--uses",
            "1",
            "--approval",
            "manual",
            "--id-pattern",
            "drone-*",
            "--url",
            &url,
            "--qr",
        ],
        0,
    )?;
    let text = token.lines().next().unwrap_or_default().to_string();
    fs::write(d.dir.join("drone.token"), &text)?;
    println!("    (the token is {} characters: it fits a QR code)", text.len());
    device("drone-07", "")?;
    agent("drone-07", &["enroll", "--token-file", "drone.token"], 1)?;
    d.sh("perch-bootstrap", &["pending", "--dir", "org", "--url", &url], 0)?;
    d.sh("perch-bootstrap", &["approve", "--dir", "org", "--url", &url, "drone-07"], 0)?;
    agent("drone-07", &["enroll", "--token-file", "drone.token"], 0)?;
    say(17, "The token was for one device: a second drone is refused (exit 3).");
    device("drone-08", "")?;
    agent("drone-08", &["enroll", "--token-file", "drone.token"], 3)?;

    say(18, "No network at all: the drone writes a signed request to a file, the technician's laptop (which holds the org's issuing key) answers it, and the drone imports the answer. The drone's image carries the trust document it checks the answer against. (Its fleet URL is its radio link: a proxy this demo can cut.)");
    let off = device("drone-09", &drone_config(&d.dir.join("drone-09")))?;
    fs::create_dir_all(off.join("slots/a/bin"))?;
    fs::write(off.join("slots/a/bin/hello"), "echo hello from the factory image\n")?;
    std::os::unix::fs::symlink("a", off.join("slots/current"))?;
    fs::copy(d.dir.join("org/trust.doc"), off.join("trust.doc"))?;
    agent("drone-09", &["enroll", "--request-out", "drone-09.req"], 0)?;
    d.sh(
        "perch-bootstrap",
        &[
            "sign-request",
            "--dir",
            "org",
            "drone-09.req",
            "--out",
            "drone-09.resp",
            "--group",
            "drones",
            "--fleet-url",
            &radio.url(),
        ],
        0,
    )?;
    agent("drone-09", &["enroll", "--import", "drone-09.resp"], 0)?;

    say(19, "The registry (JetStream KV). drone-09 is not in it yet: the provisioner learns of it when it first connects.");
    d.sh("perch-bootstrap", &["devices", "--dir", "org", "--url", &url], 0)?;
    let child = Command::new(d.bin.join("perch-agent"))
        .args(["--config", "drone-09/agent.toml", "--state-dir", "drone-09/state", "run"])
        .current_dir(&d.dir)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(d.dir.join("drone-09.log"))?)
        .spawn()?;
    fleet.adopt("drone-09", child);
    let start = std::time::Instant::now();
    loop {
        let out = Command::new(d.bin.join("perch-bootstrap"))
            .args(["devices", "--dir", "org", "--url", &url, "--json"])
            .current_dir(&d.dir)
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("\"drone-09\"") {
            break;
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            bail!("drone-09 never said hello: {}", fs::read_to_string(d.dir.join("drone-09.log"))?);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    println!("    drone-09's agent connected to FLEET with its own credential and said hello:");
    d.sh("perch-bootstrap", &["devices", "--dir", "org", "--url", &url], 0)?;

    outage(d, &url, &radio)?;

    say(21, "desk-01 is reported stolen: revoking it pushes the FLEET account's revocation to the server, which cuts it off at once.");
    d.sh("perch-bootstrap", &["revoke", "--dir", "org", "--url", &url, "desk-01"], 0)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = fs::read_to_string(d.dir.join("desk-01.log"))?;
    if let Some(line) = log.lines().find(|l| l.contains("authorization violation") || l.contains("link down"))
    {
        println!("    desk-01's agent log: {}", line.trim());
    }
    d.sh("perch-bootstrap", &["devices", "--dir", "org", "--url", &url], 0)?;
    drop(fleet);
    println!("    (nats-server, the provisioner and desk-01's agent are stopped)");
    Ok(())
}

/// drone-09's agent.toml additions: a radio link's settings, and a health
/// check for its releases.
fn drone_config(dev: &Path) -> String {
    format!(
        "[link]\nping_interval = \"1s\"\nmax_backoff = \"2s\"\n[reports]\nheartbeat = \"2s\"\n[health]\ncommands = [\"sh {}/slots/current/bin/hello\"]\ntrial = \"2s\"\ninterval = \"500ms\"\n",
        dev.display()
    )
}

/// The drones' group is told to run a release; drone-09 flies out of range
/// in the middle of the download and comes back.
fn outage(d: &Demo, url: &str, radio: &perch_chaos::Proxy) -> Result<()> {
    use std::time::{Duration, Instant};
    say(20, "A release for the drones group, published to the fleet. drone-09's radio does 1 MB/s; halfway through the download it flies out of range (the link goes silent: no reset, no error) and comes back 8 s later.");
    fs::create_dir_all(d.dir.join("drone-app/bin"))?;
    fs::write(d.dir.join("drone-app/bin/hello"), "echo hello from drone-app 1\n")?;
    write_image(&d.dir.join("drone-app/maps.bin"), 8 << 20)?;
    d.sh(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "drone-app",
            "--counter",
            "1",
            "--kind",
            "archive",
            "--input",
            "drone-app",
            "--out",
            "drone-app-1.perch",
            "--target",
            "x86_64-desktop",
        ],
        0,
    )?;
    for k in ["alice.key", "bob.key"] {
        d.sh("perch", &["bundle", "sign", "--key", k, "drone-app-1.perch"], 0)?;
    }
    d.sh(
        "perch-bootstrap",
        &[
            "nats",
            "creds",
            "--dir",
            "org",
            "--account",
            "fleet",
            "--name",
            "operator",
            "--out",
            "operator.creds",
        ],
        0,
    )?;
    let conn = ["--url", url, "--creds", "operator.creds", "--ca", "org/tls/ca.pem"];
    let with = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter().chain(conn.iter()).chain(tail).map(|s| s.to_string()).collect()
    };
    let perch = |head: &[&str], tail: &[&str], expect: i32| -> Result<String> {
        let args = with(head, tail);
        d.sh("perch", &args.iter().map(String::as_str).collect::<Vec<_>>(), expect)
    };
    perch(&["publish"], &["--trust", "org/trust.doc", "drone-app-1.perch"], 0)?;
    radio.set_shape(perch_chaos::Shape { latency: Duration::ZERO, bandwidth: 1_000_000 });
    perch(&["desired", "set"], &["--group", "drones", "--bundle", "drone-app-1.perch"], 0)?;
    let agent_status = || -> Result<serde_json::Value> {
        let out = Command::new(d.bin.join("perch-agent"))
            .args(["--config", "drone-09/agent.toml", "--state-dir", "drone-09/state", "status", "--json"])
            .current_dir(&d.dir)
            .output()?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    };
    let wait = |what: &str, limit: u64, done: &dyn Fn(&serde_json::Value) -> bool| -> Result<()> {
        let start = Instant::now();
        loop {
            if done(&agent_status()?) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(limit) {
                bail!("drone-09: {what} did not happen: {}", fs::read_to_string(d.dir.join("drone-09.log"))?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let start = Instant::now();
    while radio.bytes().0 < 3 << 20 {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("drone-09 is not downloading: {}", fs::read_to_string(d.dir.join("drone-09.log"))?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    radio.set_mode(perch_chaos::Mode::Blackhole);
    let cut = Instant::now();
    println!("    -- link cut: drone-09 is out of range --");
    wait("noticing the dead link", 10, &|v| v["link"]["state"] == "disconnected")?;
    println!(
        "    drone-09 noticed the silent link after {:.1} s (pings every 1 s)",
        cut.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(8).saturating_sub(cut.elapsed()));
    println!("    drone-09 meanwhile (its own view; its reports wait on its disk):");
    d.sh("perch-agent", &["--config", "drone-09/agent.toml", "--state-dir", "drone-09/state", "status"], 0)?;
    println!("    the fleet's view (a device silent for 5 s is shown as stale here):");
    perch(&["status"], &["--stale-after", "5s"], 0)?;
    radio.set_mode(perch_chaos::Mode::Pass);
    println!("    -- link back --");
    wait("committing drone-app 1", 60, &|v| {
        v["deploy"]["state"] == "committed" && v["outbox"]["waiting"].as_u64() == Some(0)
    })?;
    let (down, _) = radio.bytes();
    let payload = fs::metadata(d.dir.join("drone-app-1.perch"))?.len();
    println!(
        "    the download resumed at the first missing chunk: {down} bytes crossed the radio for a {payload}-byte bundle"
    );
    println!("    nothing lost: every report drone-09 made, before, during and after the outage, is stored exactly once:");
    perch(&["status"], &["--device", "drone-09"], 0)?;
    perch(&["status"], &[], 0)?;
    Ok(())
}

/// A reproducible pseudo-random image (xorshift), so the demo needs no input.
pub fn write_image(path: &Path, len: usize) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}
