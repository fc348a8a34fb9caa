//! `cargo xtask bench link`: on a real nats-server with JetStream, on this
//! machine:
//! - the drain rate of a 100k-record outbox into PERCH_REPORTS by the real
//!   agent (records/s, and JetStream ack round trips);
//! - the agent's chunk fetch (direct gets, a window ahead) against the raw
//!   stream read rate (one ordered consumer over the same messages).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::fleet::LocalFleet;
use crate::util::{cargo, sh, step};

const USAGE: &str = "usage: cargo xtask bench link [--records N] [--bundle-mib N] | --full";

pub fn run(args: &[String]) -> Result<()> {
    if matches!(args, [f] if f == "--full") {
        return full_scenarios();
    }
    let (mut records, mut bundle_mib) = (100_000u64, 64usize);
    for (flag, value) in crate::util::flag_pairs(args, USAGE)? {
        match flag {
            "--records" => records = value.parse().context("--records takes a number")?,
            "--bundle-mib" => bundle_mib = value.parse().context("--bundle-mib takes a number")?,
            _ => bail!(USAGE),
        }
    }
    let bin = crate::util::release_bins("link", &["perch-fleet", "perch-bootstrap", "perch-agent"])?;
    let tool = crate::util::bench_tools(&["link-bench"])?.join("link-bench");
    let dir = crate::util::fresh_dir("bench-link")?;
    let quiet = |program: &std::path::Path, args: &[&str]| crate::util::run_in(&dir, program, args);
    let within = |program: &std::path::Path, args: &[&str], limit: u64, what: &str| {
        crate::bench_wait::run_within(&dir, program, args, Duration::from_secs(limit), what)
    };
    let (perch, boot) = (bin.join("perch"), bin.join("perch-bootstrap"));
    quiet(&perch, &["keygen", "--out", "k1"])?;
    quiet(&boot, &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"])?;
    let mut fleet = LocalFleet::start(&dir, &bin)?;
    fleet.provisioner()?;
    let url = fleet.url.clone();
    quiet(
        &boot,
        &["nats", "creds", "--dir", "org", "--account", "fleet", "--name", "bench", "--out", "bench.creds"],
    )?;

    let secs = drain(&dir, &bin, &tool, &mut fleet, "bench.creds", records)?;
    let drain_rate = records as f64 / secs;

    step(&format!("bench link: a {bundle_mib} MiB bundle, fetched the agent's way and read raw"));
    crate::demo::write_image(&dir.join("payload.img"), bundle_mib << 20)?;
    quiet(
        &perch,
        &[
            "bundle",
            "build",
            "--name",
            "bench",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "payload.img",
            "--out",
            "b.perch",
        ],
    )?;
    quiet(&perch, &["bundle", "sign", "--key", "k1.key", "b.perch"])?;
    quiet(
        &perch,
        &[
            "publish",
            "--trust",
            "org/trust.doc",
            "--url",
            &url,
            "--creds",
            "bench.creds",
            "--ca",
            "org/tls/ca.pem",
            "b.perch",
        ],
    )?;
    let inspect: serde_json::Value =
        serde_json::from_str(&quiet(&perch, &["bundle", "inspect", "--json", "b.perch"])?)?;
    let digest = inspect["digest"].as_str().context("digest")?.to_string();
    let mut fetches = vec![];
    for window in ["1", "4", "16"] {
        let out = within(
            &tool,
            &["fetch", &url, "bench.creds", "org/tls/ca.pem", &digest, window],
            60 + bundle_mib as u64,
            &format!("fetching the {bundle_mib} MiB bundle with window {window}"),
        )?;
        println!("{}", out.trim());
        fetches.push(serde_json::from_str::<serde_json::Value>(out.trim())?);
    }
    drop(fleet);

    println!();
    println!("outbox drain: {records} records in {secs:.2} s = {drain_rate:.0} records/s");
    println!(
        "  ({} ack round trips of up to 64 records; every record fsynced before it was sent)",
        records.div_ceil(64)
    );
    println!("{:<8} {:>14} {:>14} {:>8}", "window", "agent MB/s", "raw MB/s", "ratio");
    for f in &fetches {
        let mb = |b: &serde_json::Value, s: &serde_json::Value| {
            b.as_f64().unwrap_or(0.0) / s.as_f64().unwrap_or(1.0) / 1e6
        };
        let (a, r) = (mb(&f["agent_bytes"], &f["agent_seconds"]), mb(&f["raw_bytes"], &f["raw_seconds"]));
        println!("{:<8} {:>14.0} {:>14.0} {:>7.2}x", f["window"], a, r, a / r);
    }
    if std::env::var_os("PERCH_BENCH_KEEP").is_none() {
        fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// A device enrolled offline in `dir/dev` (its enrollment names every
/// server of `fleet`) fills its outbox with `records` reports while off,
/// then its agent drains them into PERCH_REPORTS: the seconds from the
/// agent's start until the stream holds them all, as the FLEET user
/// `creds` sees it. The agent is left running in `fleet`.
pub fn drain(
    dir: &Path,
    bin: &Path,
    tool: &Path,
    fleet: &mut LocalFleet,
    creds: &str,
    records: u64,
) -> Result<f64> {
    let quiet = |program: &Path, args: &[&str]| crate::util::run_in(dir, program, args);
    let within = |program: &Path, args: &[&str], limit: u64, what: &str| {
        crate::bench_wait::run_within(dir, program, args, Duration::from_secs(limit), what)
    };
    let boot = bin.join("perch-bootstrap");
    let url = fleet.url.clone();
    // A device enrolled offline, whose outbox is filled while it is off.
    let dev = dir.join("dev");
    fs::create_dir_all(dev.join("slots"))?;
    fs::copy(dir.join("org/trust.doc"), dev.join("trust.doc"))?;
    fs::write(dev.join("boot_id"), "bench\n")?;
    // The telemetry budget is set to hold every record filled: this bench
    // measures the drain, and a record dropped to stay in budget would
    // never arrive.
    let config = |telemetry_budget: u64| {
        fs::write(
            dev.join("agent.toml"),
            format!(
                "target = \"bench\"\ntrust = \"{}\"\nboot_id = \"{}\"\n[device]\nid = \"bench-1\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n[reports]\nheartbeat = \"1h\"\ntelemetry_budget = {telemetry_budget}\n",
                dev.join("trust.doc").display(),
                dev.join("boot_id").display(),
                dev.join("slots").display()
            ),
        )
    };
    config(4 << 20)?;
    let agent = |args: &[&str]| -> Result<String> {
        let mut a = vec!["--config", "dev/agent.toml", "--state-dir", "dev/state"];
        a.extend_from_slice(args);
        quiet(&bin.join("perch-agent"), &a)
    };
    agent(&["enroll", "--request-out", "dev.req"])?;
    let mut sign = vec!["sign-request", "--dir", "org", "dev.req", "--out", "dev.resp", "--group", "bench"];
    for u in &fleet.urls {
        sign.extend(["--fleet-url", u.as_str()]);
    }
    quiet(&boot, &sign)?;
    agent(&["enroll", "--import", "dev.resp"])?;
    step(&format!("drain: {records} reports queued in the outbox while offline"));
    let filled = within(
        tool,
        &["fill", "dev/state", "bench-1", &records.to_string()],
        120 + records / 500,
        "filling the outbox",
    )?;
    println!("{}", filled.trim());
    let bytes = serde_json::from_str::<serde_json::Value>(filled.trim())?["bytes"]
        .as_u64()
        .context("link-bench fill printed no byte count")?;
    let budget = (bytes + (1 << 20)).max(4 << 20);
    config(budget)?;
    println!("telemetry_budget = {budget} (the {bytes} bytes queued, and room for the agent's own reports)");

    step("drain: the agent starts and drains its outbox into PERCH_REPORTS");
    let child = Command::new(bin.join("perch-agent"))
        .args(["--config", "dev/agent.toml", "--state-dir", "dev/state", "run"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    fleet.adopt("agent", child);
    // The tool fails by itself if reports stop arriving; this is the backstop.
    let waited = within(
        tool,
        &["wait", &url, creds, "org/tls/ca.pem", &records.to_string()],
        660,
        &format!(
            "waiting for {records} reports in PERCH_REPORTS (agent log: {})",
            dir.join("agent.log").display()
        ),
    )?;
    let v: serde_json::Value = serde_json::from_str(waited.trim())?;
    let secs = v["seconds"].as_f64().unwrap_or(0.0);
    println!("{}", waited.trim());
    Ok(secs)
}

/// The link scenarios at the sizes the issue names (CI runs them scaled
/// down): a 100 MiB bundle over a flapping 2 MB/s link, and 10,000 reports
/// through a 2-minute outage with a crash and a reboot.
fn full_scenarios() -> Result<()> {
    step("bench link --full: the link scenarios at full size (several minutes)");
    sh(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    sh(cargo().env("PERCH_FULL_SIZE", "1").args([
        "test",
        "--locked",
        "-p",
        "perch-tests",
        "--test",
        "link",
        "--",
        "--test-threads",
        "1",
        "--nocapture",
    ]))
}
