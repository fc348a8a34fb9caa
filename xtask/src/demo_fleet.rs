//! The demo's second half: a fleet on this machine. A real nats-server (the
//! hub) and provisioner; a ground station (a field site: its own
//! nats-server, a leaf node of the hub behind an uplink the demo cuts); an
//! x86_64 desktop at the hub and two drones at the site whose agents are the
//! real aarch64 and armv7 release builds running under qemu-user; a release
//! installed while the uplink is down, a broken release that pauses its
//! rollout in waves and rolls back, a revocation, and the fleet's status.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::demo::{say, write_image, Demo};
use crate::drone::{Drone, Supervised, HEALTHY, SLOT};
use crate::site::{Site, Uplink};
use crate::util::wait_every;

fn wait_until(what: &str, limit: Duration, done: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_every(what, limit, Duration::from_millis(100), done)
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

/// How long the ground station's uplink stays down at least (step 21).
/// Under JetStream's 10 s source health check: after a longer cut,
/// nats-server 2.10 and later back off before the hub takes the site's
/// reports again (some 40 s more after a 15 s cut, seen with 2.15.1).
const OUTAGE: Duration = Duration::from_secs(8);
const SECOND: Duration = Duration::from_secs(1);

/// What the fleet half showed, for the demo's summary.
pub struct Outcome {
    /// Bytes down the uplink for the release, over its size.
    pub uplink_ratio: f64,
    pub site_drones: usize,
}

pub fn run(d: &Demo, arm: &[(&'static crate::cross::Target, PathBuf)]) -> Result<Outcome> {
    let target =
        |class: &str| arm.iter().find(|(t, _)| t.class == class).context(format!("no {class} agent built"));
    let (t64, bin64) = target("aarch64-drone")?;
    let (t32, bin32) = target("armv7-drone")?;

    say(14, "The fleet's hub. nats-server starts in operator mode with TLS (the fleet CA that `init` made), its JetStream in the domain `hub`, with a leafnode listener where field sites connect; a provisioner joins it as a NATS service.");
    let uplink = Uplink::new()?;
    let mut fleet = uplink.hub(&d.dir, &d.bin)?;
    fleet.provisioner()?;
    println!(
        "    nats-server on {} (log: nats-server.log), provisioner ready (log: provisioner-0.log)",
        fleet.url
    );
    let url = fleet.url.clone();

    say(15, "A ground station in the field, site `ridge`: its own nats-server, a leaf node of the hub with its own JetStream domain. The drones there connect to it; it reaches the hub over its uplink (a satellite link; here a proxy this demo cuts in step 21). `site init` writes its config; its daemon (`site run`) makes the site's streams: the drones' reports (the hub takes them from it), mirrors of the desired state and trust, and the bundles its drones want.");
    let site = Site::new("ridge")?;
    let init = site.init_args(&[uplink.url()]);
    d.sh("perch-bootstrap", &init.iter().map(String::as_str).collect::<Vec<_>>(), 0)?;
    site.start(&mut fleet)?;
    println!(
        "    site server on {} (log: ridge-nats-server.log), site daemon ready (log: ridge-site.log)",
        site.url
    );
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

    say(16, "Zero-touch desktop (x86_64, directory slots): its image holds only an enrollment token. At first boot `perch-agent run` enrolls it with nobody present, then joins FLEET.");
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

    // The drones fly from the ground station: they connect to its server.
    let at_site = format!("[link]\nurls = [\"{}\"]\n[reports]\nheartbeat = \"2s\"\n", site.url);
    say(17, "A drone in a technician's hands at the ground station: drone-07, the real aarch64 agent (static release build) under qemu-user, U-Boot slots in image files. A one-use token that needs approval, shown as a QR code for the drone's camera (here we pass the text). The token names the site's server: the enrollment request crosses the uplink to the provisioner at the hub, where it is approved.");
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
            &site.url,
            "--qr",
        ],
        0,
    )?;
    let text = token.lines().next().unwrap_or_default().to_string();
    fs::write(d.dir.join("drone.token"), &text)?;
    println!("    (the token is {} characters: it fits a QR code)", text.len());
    let trust = d.dir.join("org/trust.doc");
    let d07 = Drone::new("drone-07", &d.dir.join("drone-07"), t64, bin64, &trust, &at_site)?;
    let token_file = d.dir.join("drone.token").display().to_string();
    drone_agent(&d07, &["enroll", "--token-file", &token_file], 1)?;
    d.sh("perch-bootstrap", &["pending", "--dir", "org", "--url", &url], 0)?;
    d.sh("perch-bootstrap", &["approve", "--dir", "org", "--url", &url, "drone-07"], 0)?;
    drone_agent(&d07, &["enroll", "--token-file", &token_file], 0)?;

    say(18, "The token was for one device: a second drone is refused (exit 3).");
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

    say(19, "No network at all: drone-09, the real armv7 agent under qemu-user, writes a signed request to a file; the technician's laptop (which holds the org's issuing key) answers it, and the drone imports the answer, checked against the trust document in its image. Its fleet URL is the ground station's server.");
    let d09 = Drone::new("drone-09", &d.dir.join("drone-09"), t32, bin32, &trust, &at_site)?;
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
            &site.url,
        ],
        0,
    )?;
    drone_agent(&d09, &["enroll", "--import", &resp], 0)?;

    say(20, "Both drones boot and start their agents (under qemu), connected to the ground station. drone-09 is not in the registry yet: the provisioner at the hub learns of it when it first says hello. The hub hears the drones through the site: `perch status` shows each `@ridge`, and the site, last heard seconds ago.");
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
    wait_until("both drones reporting through the ground station", Duration::from_secs(60), || {
        let v = status_json()?;
        Ok(["drone-07", "drone-09"].iter().all(|id| {
            let x = device(&v, id);
            x["liveness"] == "online" && x["registry"] == "enrolled" && x["site"] == site.name.as_str()
        }))
    })?;
    perch(&["status"], &[], 0)?;

    say(21, "Release drone-os 2 for both drone CPUs, published at the hub and rolled out to the drones group. The ground station copies it across its uplink once, for both its drones; as they start installing it from the site, the uplink drops. Each drone installs it into its idle slot, reboots into it (U-Boot counts the boot), passes its health check and commits, all with the uplink down. Their reports wait at the site, and the rollout at the hub waits for them.");
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
    let (down0, up0) = uplink.bytes();
    let file = release(2, true)?;
    let size = fs::metadata(d.dir.join(&file))?.len();
    let digest = hex_of(d, &d.dir.join(&file))?;
    // A site copies a bundle as it is published (nats-server 2.9), or
    // once the desired state names it (later servers): which one is seen.
    let crossed = wait_until("drone-os 2 crossing the uplink", Duration::from_secs(3), || {
        Ok(uplink.bytes().0 - down0 >= size)
    })
    .is_ok();
    if crossed {
        println!("    -- drone-os 2 crossed the uplink to the site as it was published --");
    }
    // `perch deploy` drives the rollout while the demo works the uplink.
    let deploy = stream(d, &with(&["deploy", "start"], &["--bundle", "drone-os@2", "--group", "drones"]))?;
    // The uplink drops as the drones start installing the release from the
    // site: they are told at once, and try when the site has it whole.
    let told = |name: &str| {
        crate::site::logged(&d.dir.join(format!("{name}.log")), "desired state names a new bundle", &digest)
    };
    wait_until("the drones starting to install drone-os 2 from the site", Duration::from_secs(60), || {
        Ok(told("drone-07") && told("drone-09") && (crossed || site.has_whole(&fleet, &digest)))
    })?;
    uplink.cut();
    let cut = Instant::now();
    println!("    -- drone-os 2 is at the site and both drones are installing it: the ground station's uplink drops --");
    // Only the drones know now: ask their agents (under qemu, so not too often).
    let status = |drone: &Supervised| -> Result<serde_json::Value> {
        let out = drone.agent(&["status", "--json"]).output()?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    };
    let both = |f: &dyn Fn(&Supervised) -> Result<bool>| Ok(f(&drones[0])? && f(&drones[1])?);
    let on_2 = |drone: &Supervised| -> Result<bool> { Ok(crate::site::committed(&status(drone)?, 2)) };
    let limit = Duration::from_secs(180);
    wait_every("both drones committing drone-os 2 with the uplink down", limit, SECOND, || both(&on_2))?;
    println!(
        "    -- {} s into the outage, both drones have committed drone-os 2 --",
        cut.elapsed().as_secs()
    );
    // Long enough for the hub to see the site fall silent, and for the
    // drones' reports to have left their outboxes for the site.
    let sent = |drone: &Supervised| -> Result<bool> {
        let v = status(drone)?;
        Ok(v["link"]["state"] == "connected" && v["outbox"]["waiting"] == 0)
    };
    std::thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    wait_every("the drones sending their reports to the site", limit, SECOND, || both(&sent))?;
    println!(
        "    -- {} s into the outage: at a drone, its reports have gone to the site --",
        cut.elapsed().as_secs()
    );
    show(drones[1].agent(&["status"]), "(drone-09 under qemu) perch-agent status", 0)?;
    println!("    -- at the hub none of it has arrived: the rollout waits, and the site was last heard at the cut --");
    perch(&["status"], &[], 0)?;
    uplink.restore();
    println!(
        "    -- the uplink is back after {} s: the reports the site kept cross it, each once --",
        cut.elapsed().as_secs()
    );
    deploy.finish_within(0, Duration::from_secs(120))?;
    let (down, up) = uplink.bytes();
    let (down, up) = (down - down0, up - up0);
    let ratio = down as f64 / size as f64;
    println!(
        "    uplink: {down} bytes down for the {size}-byte release, {ratio:.2}x its size for the {n} drones at the site (each pulling it from the hub: {n}.00x); {up} bytes up (reports, acknowledgements)",
        n = drones.len(),
    );
    perch(&["status"], &[], 0)?;

    say(22, "Release drone-os 3 is broken: its image fails the health check. drone-07 (wave 1) installs it, reboots into it, fails its trial and rolls back by itself; the rollout pauses at once and drone-09 is never told (exit 1). Abort points drone-07 back at drone-os 2.");
    release(3, false)?;
    let paused = perch(
        &["deploy", "start"],
        &["--bundle", "drone-os@3", "--group", "drones", "--waves", "50%,100%"],
        1,
    )?;
    let id = paused.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(':').to_string();
    perch(&["deploy", "abort"], &[&id], 0)?;
    perch(&["desired", "list"], &[], 0)?;

    say(23, "desk-01 is reported stolen: revoking it pushes the FLEET account's revocation to the server, which cuts it off at once.");
    d.sh("perch-bootstrap", &["revoke", "--dir", "org", "--url", &url, "desk-01"], 0)?;
    std::thread::sleep(Duration::from_millis(500));

    say(24, "The fleet as the operator sees it, once the drones have settled: every device's true state, the rollouts, the ground station, and each drone's reports, every one of them stored exactly once through the uplink's outage.");
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
    for id in ["drone-07", "drone-09"] {
        let shown = perch(&["status"], &["--device", id], 0)?;
        if !shown.contains("each once, no gaps") {
            bail!("{id}'s reports at the hub are not each there once with no gap");
        }
    }
    let site_drones = drones.len();
    drop(drones);
    drop(fleet);
    println!("    (both nats-servers, the provisioner, the site daemon and every agent are stopped)");
    Ok(Outcome { uplink_ratio: ratio, site_drones })
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
    /// Waits for the end, at most `limit`; checks the exit code; what it printed.
    fn finish_within(mut self, expect: i32, limit: Duration) -> Result<String> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("`{}` did not end within {limit:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let code = status.code().unwrap_or(-1);
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
