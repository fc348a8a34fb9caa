//! `cargo xtask bench cluster`: the same fleet on one nats-server and on a
//! three-server cluster with R3 streams (`perch-bootstrap nats cluster`),
//! one after the other on this machine, in one run:
//! - report drain: one agent drains N queued reports into PERCH_REPORTS
//!   (each published with its message id, deduplicated by JetStream, and
//!   on the cluster confirmed only once two of three servers have it);
//! - enrollment: D simulated devices enroll through one provisioner.
//!
//! Prints both rates for each and the ratio cluster / single.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::fleet::LocalFleet;
use crate::util::step;

const USAGE: &str = "usage: cargo xtask bench cluster [--records N] [--devices N]";
/// Devices enrolling at a time, as in `bench enroll`.
const CONCURRENCY: usize = 200;

/// One fleet's results.
struct Rates {
    drain_secs: f64,
    drain_per_s: f64,
    enroll_secs: f64,
    enroll_per_s: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    let (mut records, mut devices) = (100_000u64, 2000usize);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().context(USAGE)?;
        match flag.as_str() {
            "--records" => records = value.parse().context("--records takes a number")?,
            "--devices" => devices = value.parse().context("--devices takes a number")?,
            _ => bail!(USAGE),
        }
    }
    let bin = crate::util::release_bins("cluster", &["perch-fleet", "perch-bootstrap", "perch-agent"])?;
    let tools = crate::util::bench_tools(&["link-bench", "enroll-load"])?;
    let top = crate::util::fresh_dir("bench-cluster")?;
    let mut rows = vec![];
    // One after the other: the two never compete for the machine.
    for (label, servers) in [("single server", 1), ("3-server cluster, R3", 3)] {
        let dir = top.join(if servers == 1 { "single" } else { "cluster" });
        fs::create_dir_all(&dir)?;
        step(&format!("bench cluster: {label}"));
        rows.push((label, one(&dir, &bin, &tools, servers, records, devices)?));
    }
    let (single, cluster) = (&rows[0].1, &rows[1].1);
    println!();
    println!("{:<22} {:>12} {:>12} {:>14} {:>12}", "fleet", "drain s", "reports/s", "enroll s", "enroll/s");
    for (label, r) in &rows {
        println!(
            "{label:<22} {:>12.2} {:>12.0} {:>14.2} {:>12.0}",
            r.drain_secs, r.drain_per_s, r.enroll_secs, r.enroll_per_s
        );
    }
    println!();
    println!(
        "cluster / single: report drain {:.2}x, enrollment {:.2}x",
        cluster.drain_per_s / single.drain_per_s,
        cluster.enroll_per_s / single.enroll_per_s
    );
    println!("({records} queued reports drained by one agent; {devices} devices enrolling, {CONCURRENCY} at a time,");
    println!(" through one provisioner; every write on the cluster waits for two of three servers)");
    if std::env::var_os("PERCH_BENCH_KEEP").is_none() {
        fs::remove_dir_all(&top)?;
    }
    Ok(())
}

/// An org and a fleet of `servers` servers in `dir`; measures both rates.
fn one(dir: &Path, bin: &Path, tools: &Path, servers: usize, records: u64, devices: usize) -> Result<Rates> {
    let quiet = |program: &str, args: &[&str]| crate::util::run_in(dir, &bin.join(program), args);
    quiet("perch", &["keygen", "--out", "k1"])?;
    quiet("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"])?;
    let mut fleet = if servers == 1 {
        LocalFleet::start(dir, bin)?
    } else {
        LocalFleet::start_cluster(dir, bin, servers)?
    };
    fleet.provisioner()?;
    quiet(
        "perch-bootstrap",
        &["nats", "creds", "--dir", "org", "--account", "fleet", "--name", "bench", "--out", "bench.creds"],
    )?;
    let drain_secs =
        crate::bench_link::drain(dir, bin, &tools.join("link-bench"), &mut fleet, "bench.creds", records)?;

    let mut issue = vec!["token", "issue", "--dir", "org", "--group", "bench"];
    let uses = devices.to_string();
    issue.extend(["--uses", &uses]);
    for u in &fleet.urls {
        issue.extend(["--url", u.as_str()]);
    }
    fs::write(dir.join("token"), quiet("perch-bootstrap", &issue)?)?;
    step(&format!("enroll: {devices} devices, {CONCURRENCY} at a time, one provisioner"));
    let out = crate::bench_wait::run_within(
        dir,
        &tools.join("enroll-load"),
        &["token", &uses, &CONCURRENCY.to_string(), "sim"],
        Duration::from_secs(60 + devices as u64 / 20),
        &format!("enrolling {devices} devices"),
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("enroll-load output")?;
    println!("{v}");
    if v["enrolled"].as_u64() != Some(devices as u64) {
        bail!("only {} of {devices} devices enrolled: {v}", v["enrolled"]);
    }
    let enroll_secs = v["seconds"].as_f64().unwrap_or(0.0);
    drop(fleet);
    Ok(Rates {
        drain_secs,
        drain_per_s: records as f64 / drain_secs,
        enroll_secs,
        enroll_per_s: devices as f64 / enroll_secs,
    })
}
