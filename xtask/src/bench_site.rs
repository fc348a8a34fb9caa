//! `cargo xtask bench site`: what a bundle costs a field site's uplink. A
//! hub and one site whose uplink goes through the `chaos` proxy (which
//! counts the bytes each way), N real agents at the site (default 3), and a
//! bundle of M MiB (default 64) published at the hub and desired for the
//! drones. It counts the bytes that cross the uplink from the publish until
//! every drone runs the bundle, against the bundle's size: the goal is at
//! most 1.1 whatever N, since the site copies a bundle once and its drones
//! fetch it there. Straight from the hub, N drones would pull N bundles.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::site::{committed, Site, Uplink};
use crate::util::{step, wait_every};

const USAGE: &str = "usage: cargo xtask bench site [--drones N] [--bundle-mib M]";

pub fn run(args: &[String]) -> Result<()> {
    let (mut drones, mut bundle_mib) = (3usize, 64usize);
    for (flag, value) in crate::util::flag_pairs(args, USAGE)? {
        match flag {
            "--drones" => drones = value.parse().context("--drones takes a number")?,
            "--bundle-mib" => bundle_mib = value.parse().context("--bundle-mib takes a number")?,
            _ => bail!(USAGE),
        }
    }
    if drones == 0 || bundle_mib == 0 {
        bail!("--drones and --bundle-mib must be at least 1");
    }
    let bin = crate::util::release_bins("site", &["perch-fleet", "perch-bootstrap", "perch-agent"])?;
    let dir = crate::util::fresh_dir("bench-site")?;
    let quiet = |program: &str, args: &[&str]| crate::util::run_in(&dir, &bin.join(program), args);
    quiet("perch", &["keygen", "--out", "k1"])?;
    quiet("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"])?;
    let uplink = Uplink::new()?;
    let mut fleet = uplink.hub(&dir, &bin)?;
    fleet.provisioner()?;
    let site = Site::new("bench")?;
    quiet(
        "perch-bootstrap",
        &site.init_args(&[uplink.url()]).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    site.start(&mut fleet)?;
    quiet(
        "perch-bootstrap",
        &["nats", "creds", "--dir", "org", "--account", "fleet", "--name", "bench", "--out", "bench.creds"],
    )?;
    let url = fleet.url.clone();
    let conn = ["--url", url.as_str(), "--creds", "bench.creds", "--ca", "org/tls/ca.pem"];
    let perch = |head: &[&str], tail: &[&str]| {
        let args: Vec<&str> = head.iter().chain(&conn).chain(tail).copied().collect();
        quiet("perch", &args)
    };

    step(&format!("bench site: {drones} drones enroll through the site and report through it"));
    let uses = drones.to_string();
    let token = quiet(
        "perch-bootstrap",
        &["token", "issue", "--dir", "org", "--group", "bench", "--uses", &uses, "--url", &site.url],
    )?;
    fs::write(dir.join("drones.token"), token.trim())?;
    let names: Vec<String> = (1..=drones).map(|i| format!("drone-{i}")).collect();
    let agent_args = |name: &str, rest: &[&str]| -> Vec<String> {
        let head = [
            "--config".to_string(),
            format!("{name}/agent.toml"),
            "--state-dir".into(),
            format!("{name}/state"),
        ];
        head.into_iter().chain(rest.iter().map(|s| s.to_string())).collect()
    };
    for name in &names {
        let d = dir.join(name);
        fs::create_dir_all(d.join("slots"))?;
        fs::copy(dir.join("org/trust.doc"), d.join("trust.doc"))?;
        fs::write(
            d.join("agent.toml"),
            format!(
                "target = \"bench\"\ntrust = \"{}\"\n[device]\nid = \"{name}\"\n[link]\nurls = [\"{}\"]\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n[reports]\nheartbeat = \"2s\"\n",
                d.join("trust.doc").display(),
                site.url,
                d.join("slots").display()
            ),
        )?;
        let enroll = agent_args(name, &["enroll", "--token-file", "drones.token"]);
        quiet("perch-agent", &enroll.iter().map(String::as_str).collect::<Vec<_>>())?;
        let child = Command::new(bin.join("perch-agent"))
            .args(agent_args(name, &["run"]))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join(format!("{name}.log")))?)
            .spawn()?;
        fleet.adopt(name, child);
    }
    // Measured from a steady state: the hub already takes the site's reports.
    wait_every(
        "the hub hearing every drone through the site",
        Duration::from_secs(90),
        Duration::from_secs(1),
        || {
            let v: serde_json::Value = serde_json::from_str(&perch(&["status"], &["--json"])?)?;
            let at_site =
                v["devices"].as_array().map_or(0, |a| a.iter().filter(|d| d["site"] == "bench").count());
            Ok(at_site == drones)
        },
    )?;

    step(&format!("bench site: a {bundle_mib} MiB bundle published at the hub and desired for the drones"));
    fs::create_dir_all(dir.join("payload"))?;
    crate::demo::write_image(&dir.join("payload/data.bin"), bundle_mib << 20)?;
    let build =
        "bundle build --name bench --counter 1 --kind archive --input payload --out b.perch --target bench";
    quiet("perch", &build.split(' ').collect::<Vec<_>>())?;
    quiet("perch", &["bundle", "sign", "--key", "k1.key", "b.perch"])?;
    let size = fs::metadata(dir.join("b.perch"))?.len();
    let inspect: serde_json::Value =
        serde_json::from_str(&quiet("perch", &["bundle", "inspect", "--json", "b.perch"])?)?;
    let digest = inspect["digest"].as_str().context("bundle inspect gave no digest")?.to_string();
    let (down0, up0) = uplink.bytes();
    let started = Instant::now();
    perch(&["publish"], &["--trust", "org/trust.doc", "b.perch"])?;
    perch(&["desired", "set"], &["--group", "bench", "--digest", &digest])?;
    let limit = Duration::from_secs(120 + 3 * bundle_mib as u64);
    wait_every(
        &format!("every drone running the bundle (logs: {})", dir.display()),
        limit,
        Duration::from_millis(500),
        || {
            for name in &names {
                let status = agent_args(name, &["status", "--json"]);
                let out = Command::new(bin.join("perch-agent")).args(&status).current_dir(&dir).output()?;
                if !committed(&serde_json::from_slice(&out.stdout).unwrap_or_default(), 1) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let secs = started.elapsed().as_secs_f64();
    let (down1, up1) = uplink.bytes();
    drop(fleet);
    let (down, up) = (down1 - down0, up1 - up0);
    let ratio = |b: u64| b as f64 / size as f64;

    println!();
    println!("bundle: {size} bytes ({bundle_mib} MiB archive), {drones} drones at the site, all running it in {secs:.1} s");
    println!("{:<34} {:>14} {:>10}", "", "bytes", "/ bundle");
    println!("{:<34} {:>14} {:>9.3}x", "uplink, hub -> site", down, ratio(down));
    println!("{:<34} {:>14} {:>9.3}x", "uplink, site -> hub (reports)", up, ratio(up));
    println!(
        "{:<34} {:>14} {:>9.3}x  (goal <= 1.1, any number of drones)",
        "uplink, both ways",
        down + up,
        ratio(down + up)
    );
    let direct = drones as u64 * size;
    println!(
        "{:<34} {:>14} {:>9.3}x",
        format!("{drones} drones straight from the hub"),
        direct,
        ratio(direct)
    );
    if std::env::var_os("PERCH_BENCH_KEEP").is_none() {
        fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
