//! The demo's second half: a fleet on this machine. A real nats-server and
//! provisioner; an x86_64 desktop and two drones whose agents are the real
//! aarch64 and armv7 release builds running under qemu-user; rollouts in
//! waves, a broken release that pauses its rollout and rolls back, a radio
//! link cut mid-download, a revocation, and the fleet's status.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::demo::{say, write_image, Demo};
use crate::drone::{Drone, Supervised, HEALTHY, SLOT};
use crate::fleet::LocalFleet;

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs a command, shows what it printed, checks its exit code.
fn show(mut c: Command, label: &str, expect: i32) -> Result<String> {
    println!("  $ {label}");
    let out = c.output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for line in text.lines() {
        println!("    {line}");
    }
    let code = out.status.code().unwrap_or(-1);
    if code != expect {
        bail!("`{label}` exited {code}, expected {expect}");
    }
    Ok(text)
}

pub fn run(d: &Demo, arm: &[(&'static crate::cross::Target, PathBuf)]) -> Result<()> {
    let target =
        |class: &str| arm.iter().find(|(t, _)| t.class == class).context(format!("no {class} agent built"));
    let (t64, bin64) = target("aarch64-drone")?;
    let (t32, bin32) = target("armv7-drone")?;

    say(14, "The fleet. nats-server starts in operator mode with TLS (the fleet CA that `init` made), and a provisioner joins it as a NATS service.");
    let mut fleet = LocalFleet::start(&d.dir, &d.bin)?;
    fleet.provisioner()?;
    println!(
        "    nats-server on {} (log: nats-server.log), provisioner ready (log: provisioner-0.log)",
        fleet.url
    );
    let url = fleet.url.clone();
    // drone-09's radio: a proxy the demo can cut (step 20).
    let radio = perch_chaos::Proxy::start(([127, 0, 0, 1], fleet.port).into());
    let host_agent = |name: &str, rest: &[&str], expect: i32| -> Result<String> {
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
    let drone_agent = |drone: &Drone, rest: &[&str], expect: i32| -> Result<String> {
        let c = drone.agent(rest);
        show(c, &format!("({} under qemu) perch-agent {}", drone.name, rest.join(" ")), expect)
    };

    say(15, "Zero-touch desktop (x86_64, directory slots): its image holds only an enrollment token. At first boot `perch-agent run` enrolls it with nobody present, then joins FLEET.");
    let json = d.sh(
        "perch-bootstrap",
        &[
            "token", "issue", "--dir", "org", "--group", "desktops", "--uses", "100", "--ttl", "30d",
            "--url", &url, "--json",
        ],
        0,
    )?;
    let v: serde_json::Value = serde_json::from_str(json.trim())?;
    fs::write(d.dir.join("desktops.token"), v["token"].as_str().unwrap_or_default())?;
    let desk = d.dir.join("desk-01");
    fs::create_dir_all(desk.join("slots/a"))?;
    std::os::unix::fs::symlink("a", desk.join("slots/current"))?;
    fs::write(
        desk.join("agent.toml"),
        format!(
            "target = \"x86_64-desktop\"\ntrust = \"{}\"\n[device]\nid = \"desk-01\"\n[enroll]\ntoken_file = \"{}\"\n[reports]\nheartbeat = \"2s\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n",
            desk.join("trust.doc").display(),
            d.dir.join("desktops.token").display(),
            desk.join("slots").display()
        ),
    )?;
    let child = Command::new(d.bin.join("perch-agent"))
        .args(["--config", "desk-01/agent.toml", "--state-dir", "desk-01/state", "run"])
        .current_dir(&d.dir)
        .stdout(Stdio::null())
        .stderr(fs::File::create(d.dir.join("desk-01.log"))?)
        .spawn()?;
    fleet.adopt("desk-01", child);
    wait_until("desk-01 enrolling", Duration::from_secs(30), || {
        Ok(desk.join("state/identity/enrollment").exists())
    })?;
    host_agent("desk-01", &["status"], 0)?;

    let radio_cfg = "[link]\nping_interval = \"1s\"\nmax_backoff = \"2s\"\n[reports]\nheartbeat = \"2s\"\n";
    say(16, "A drone in a technician's hands: drone-07, the real aarch64 agent (static release build) under qemu-user, U-Boot slots in image files. A one-use token that needs approval, shown as a QR code for the drone's camera (here we pass the text).");
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
    let trust = d.dir.join("org/trust.doc");
    let d07 = Drone::new("drone-07", &d.dir.join("drone-07"), t64, bin64, &trust, radio_cfg)?;
    let token_file = d.dir.join("drone.token").display().to_string();
    drone_agent(&d07, &["enroll", "--token-file", &token_file], 1)?;
    d.sh("perch-bootstrap", &["pending", "--dir", "org", "--url", &url], 0)?;
    d.sh("perch-bootstrap", &["approve", "--dir", "org", "--url", &url, "drone-07"], 0)?;
    drone_agent(&d07, &["enroll", "--token-file", &token_file], 0)?;

    say(17, "The token was for one device: a second drone is refused (exit 3).");
    let d08 = d.dir.join("drone-08");
    fs::create_dir_all(d08.join("slots"))?;
    fs::write(
        d08.join("agent.toml"),
        format!(
            "target = \"aarch64-drone\"\ntrust = \"{}\"\n[device]\nid = \"drone-08\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n",
            d08.join("trust.doc").display(),
            d08.join("slots").display()
        ),
    )?;
    host_agent("drone-08", &["enroll", "--token-file", "drone.token"], 3)?;

    say(18, "No network at all: drone-09, the real armv7 agent under qemu-user, writes a signed request to a file; the technician's laptop (which holds the org's issuing key) answers it, and the drone imports the answer, checked against the trust document in its image. Its fleet URL is its radio link: a proxy this demo can cut.");
    let d09 = Drone::new("drone-09", &d.dir.join("drone-09"), t32, bin32, &trust, radio_cfg)?;
    let req = d.dir.join("drone-09.req").display().to_string();
    let resp = d.dir.join("drone-09.resp").display().to_string();
    drone_agent(&d09, &["enroll", "--request-out", &req], 0)?;
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
    drone_agent(&d09, &["enroll", "--import", &resp], 0)?;

    say(19, "Both drones boot and start their agents (under qemu). drone-09 is not in the registry yet: the provisioner learns of it when it first says hello.");
    let drones = [Supervised::start(d07)?, Supervised::start(d09)?];
    let creds = d.sh(
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
    drop(creds);
    let conn = ["--url", url.as_str(), "--creds", "operator.creds", "--ca", "org/tls/ca.pem"];
    let with = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter().chain(conn.iter()).chain(tail).map(|s| s.to_string()).collect()
    };
    let perch = |head: &[&str], tail: &[&str], expect: i32| -> Result<String> {
        let args = with(head, tail);
        d.sh("perch", &args.iter().map(String::as_str).collect::<Vec<_>>(), expect)
    };
    let status_json = || -> Result<serde_json::Value> {
        let out = Command::new(d.bin.join("perch"))
            .arg("status")
            .args(conn)
            .arg("--json")
            .current_dir(&d.dir)
            .output()?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    };
    let device = |v: &serde_json::Value, id: &str| -> serde_json::Value {
        v["devices"].as_array().and_then(|a| a.iter().find(|x| x["id"] == id).cloned()).unwrap_or_default()
    };
    wait_until("both drones reporting", Duration::from_secs(60), || {
        let v = status_json()?;
        Ok(["drone-07", "drone-09"].iter().all(|id| {
            let x = device(&v, id);
            x["liveness"] == "online" && x["registry"] == "enrolled"
        }))
    })?;
    perch(&["status"], &[], 0)?;

    say(20, "Release drone-os 2 for both drone CPUs, published, then rolled out to the drones group in two waves (50%, 100%). Each drone installs into its idle slot, reboots into it (U-Boot counts the boot), passes its health check and commits; only then does the next wave start. drone-09's radio does 1 MB/s and cuts out in the middle of its download for 6 s.");
    let release = |counter: u32, healthy: bool| -> Result<String> {
        let img = d.dir.join(format!("drone-os-{counter}.img"));
        write_image(&img, 2 << 20)?;
        if healthy {
            let mut bytes = fs::read(&img)?;
            bytes[..HEALTHY.len()].copy_from_slice(HEALTHY);
            fs::write(&img, bytes)?;
        }
        let file = format!("drone-os-{counter}.perch");
        let c = counter.to_string();
        let img_arg = img.display().to_string();
        d.sh(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "drone-os",
                "--counter",
                &c,
                "--kind",
                "image",
                "--input",
                &img_arg,
                "--out",
                &file,
                "--target",
                "aarch64-drone",
                "--target",
                "armv7-drone",
            ],
            0,
        )?;
        for k in ["alice.key", "bob.key"] {
            d.sh("perch", &["bundle", "sign", "--key", k, &file], 0)?;
        }
        perch(&["publish"], &["--trust", "org/trust.doc", &file], 0)?;
        Ok(file)
    };
    const { assert!(2 << 20 < SLOT) };
    release(2, true)?;
    radio.set_shape(perch_chaos::Shape { latency: Duration::ZERO, bandwidth: 1_000_000 });
    let base = radio.bytes().0;
    // `perch deploy` drives the rollout while the demo works the radio.
    let deploy = stream(
        d,
        &with(&["deploy"], &["--bundle", "drone-os@2", "--group", "drones", "--waves", "50%,100%"]),
    )?;
    wait_until("drone-09 downloading", Duration::from_secs(120), || Ok(radio.bytes().0 > base + 600_000))?;
    radio.set_mode(perch_chaos::Mode::Blackhole);
    println!("    -- drone-09 flies out of range mid-download --");
    std::thread::sleep(Duration::from_secs(6));
    radio.set_mode(perch_chaos::Mode::Pass);
    println!("    -- drone-09 is back in range: the download resumes at the first missing chunk --");
    deploy.finish(0)?;
    let down = radio.bytes().0 - base;
    println!("    {down} bytes crossed drone-09's radio for a 2 MiB release (plus its reports)");

    say(21, "Release drone-os 3 is broken: its image fails the health check. drone-07 (wave 1) installs it, reboots into it, fails its trial and rolls back by itself; the rollout pauses at once and drone-09 is never told (exit 1). Abort points drone-07 back at drone-os 2.");
    release(3, false)?;
    let paused =
        perch(&["deploy"], &["--bundle", "drone-os@3", "--group", "drones", "--waves", "50%,100%"], 1)?;
    let id = paused.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(':').to_string();
    perch(&["deploy", "abort"], &[&id], 0)?;
    perch(&["desired", "list"], &[], 0)?;

    say(22, "desk-01 is reported stolen: revoking it pushes the FLEET account's revocation to the server, which cuts it off at once.");
    d.sh("perch-bootstrap", &["revoke", "--dir", "org", "--url", &url, "desk-01"], 0)?;
    std::thread::sleep(Duration::from_millis(500));

    say(23, "The fleet as the operator sees it, once the drones have settled: every device's true state, the rollouts, and drone-09's reports, every one of them stored exactly once through the outage.");
    // What the story claims, checked (once the drones have settled: a
    // rollback ends with one more reboot).
    let broken = hex_of(d, &d.dir.join("drone-os-3.perch"))?;
    wait_until("the drones settling on drone-os 2", Duration::from_secs(90), || {
        let v = status_json()?;
        let (d07, d09) = (device(&v, "drone-07"), device(&v, "drone-09"));
        let on_2 = |x: &serde_json::Value| x["running_bundle"]["counter"] == 2;
        let settled =
            |x: &serde_json::Value| matches!(x["journal_state"].as_str(), Some("committed" | "rolled_back"));
        Ok(on_2(&d07)
            && on_2(&d09)
            && settled(&d07)
            && settled(&d09)
            && d07["last_deploy"]["state"] == "rolled_back"
            && !d09["last_deploy"]["bundle"].as_str().is_some_and(|b| b.starts_with(&broken)))
    })?;
    perch(&["status"], &["--stale-after", "30s"], 0)?;
    perch(&["status"], &["--device", "drone-09"], 0)?;
    drop(drones);
    drop(fleet);
    println!("    (nats-server, the provisioner and every agent are stopped)");
    Ok(())
}

/// `perch ARGS` running in the background, its output shown as it comes
/// (so it interleaves with what the drones do meanwhile).
struct Streamed {
    child: std::process::Child,
    printer: std::thread::JoinHandle<String>,
    label: String,
}

fn stream(d: &Demo, args: &[String]) -> Result<Streamed> {
    let label = format!("perch {}", args.join(" "));
    println!("  $ {label}");
    let mut child = Command::new(d.bin.join("perch"))
        .args(args)
        .current_dir(&d.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (out, err) = (child.stdout.take().context("stdout")?, child.stderr.take().context("stderr")?);
    let printer = std::thread::spawn(move || {
        let err = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                println!("    {line}");
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let mut text = String::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("    {line}");
            text.push_str(&line);
            text.push('\n');
        }
        text + &err.join().unwrap_or_default()
    });
    Ok(Streamed { child, printer, label })
}

impl Streamed {
    /// Waits for the end; checks the exit code; what it printed.
    fn finish(mut self, expect: i32) -> Result<String> {
        let code = self.child.wait()?.code().unwrap_or(-1);
        let text = self.printer.join().unwrap_or_default();
        if code != expect {
            bail!("`{}` exited {code}, expected {expect}", self.label);
        }
        if expect != 0 {
            println!("    (exit code {code})");
        }
        Ok(text)
    }
}

/// The first 16 hex digits of a bundle's digest.
fn hex_of(d: &Demo, file: &std::path::Path) -> Result<String> {
    let out = Command::new(d.bin.join("perch")).args(["bundle", "inspect", "--json"]).arg(file).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["digest"].as_str().unwrap_or_default().chars().take(16).collect())
}
