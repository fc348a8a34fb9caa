//! `cargo xtask bench enroll`: N simulated devices (default 2,000), each on
//! its own TLS connection from one load process, enroll against one
//! provisioner and then against two, on a real nats-server with JetStream.
//! Prints enrollments per second. Choria's published rate is about 1,000
//! nodes per minute (~17/s).

use std::fs;

use anyhow::{bail, Context, Result};

use crate::fleet::LocalFleet;
use crate::util::step;

const CHORIA_PER_SECOND: f64 = 1000.0 / 60.0;

pub fn run(args: &[String]) -> Result<()> {
    let (devices, concurrency) = match args {
        [] => (2000, 200),
        [f, n] if f == "--devices" => (n.parse().context("--devices takes a number")?, 200),
        _ => bail!("usage: cargo xtask bench enroll [--devices N]"),
    };
    // The provisioner as shipped (release); the load generator as light as it can be.
    let bin = crate::util::release_bins("enroll", &["perch-fleet", "perch-bootstrap"])?;
    let load = crate::util::bench_tools(&["enroll-load"])?.join("enroll-load");
    let dir = crate::util::fresh_dir("bench-enroll")?;
    let quiet = |program: &str, args: &[&str]| crate::util::run_in(&dir, &bin.join(program), args);
    quiet("perch", &["keygen", "--out", "k1"])?;
    quiet("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"])?;
    let mut fleet = LocalFleet::start(&dir, &bin)?;
    let mut rows = vec![];
    for instances in 1..=2 {
        fleet.provisioner()?;
        let token = quiet(
            "perch-bootstrap",
            &[
                "token",
                "issue",
                "--dir",
                "org",
                "--group",
                "bench",
                "--uses",
                &devices.to_string(),
                "--url",
                &fleet.url,
            ],
        )?;
        let token_file = dir.join(format!("token-{instances}"));
        fs::write(&token_file, token)?;
        step(&format!(
            "bench enroll: {devices} devices, {concurrency} at a time, {instances} provisioner(s)"
        ));
        let token_arg = token_file.display().to_string();
        let out = crate::bench_wait::run_within(
            &dir,
            &load,
            &[&token_arg, &devices.to_string(), &concurrency.to_string(), &format!("sim{instances}")],
            std::time::Duration::from_secs(60 + devices as u64 / 20),
            &format!("enrolling {devices} devices with {instances} provisioner(s)"),
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("enroll-load output")?;
        println!("{v}");
        if v["enrolled"].as_u64() != Some(devices as u64) {
            bail!("only {} of {devices} devices enrolled: {v}", v["enrolled"]);
        }
        rows.push((instances, v["seconds"].as_f64().unwrap_or(0.0), v["per_second"].as_f64().unwrap_or(0.0)));
    }
    println!();
    println!("{:<14} {:>9} {:>10} {:>16}", "provisioners", "seconds", "enroll/s", "vs Choria (~17/s)");
    for (n, secs, rate) in rows {
        println!("{n:<14} {secs:>9.2} {rate:>10.0} {:>15.0}x", rate / CHORIA_PER_SECOND);
    }
    println!("(goal: >= 1000/s; each enrollment is a TLS connect, a signed request, token and registry");
    println!(" compare-and-swap writes in JetStream, and a credential the device verifies)");
    drop(fleet);
    if std::env::var_os("PERCH_BENCH_KEEP").is_none() {
        fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
