//! `cargo xtask ci`: every check, in the order a failure is cheapest to see.

use std::time::Instant;

use anyhow::Result;

use crate::util::{cargo, root, sh, step};

/// The end-to-end test files that start a nats-server. The whole suite runs
/// on Debian's 2.9.10 (the embedded default); these run again on the
/// current upstream release. `server_tests_are_listed` keeps the list whole.
const SERVER_TESTS: &[&str] = &[
    "choria_external",
    "cluster",
    "console",
    "enroll",
    "exit_codes",
    "fleet_scale",
    "json_output",
    "link",
    "nats_operator",
    "provisioner",
    "publish",
    "rollout",
    "service",
    "site",
    "site_config",
    "tokens",
    "trust_rotation",
    "watch",
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    crate::setup::run()?;

    step("format");
    sh(cargo().args(["fmt", "--all", "--check"]))?;

    crate::graph::run()?;

    step("clippy");
    sh(cargo().args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;

    step("tests");
    // The end-to-end tests run the real binaries; build them first.
    sh(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    sh(cargo().args(["test", "--workspace", "--locked"]))?;

    step(&format!(
        "tests against the current upstream nats-server {}: every test that starts a server",
        crate::setup::CURRENT_NATS
    ));
    let mut current = cargo();
    // The uplink cut is the two minutes on the first run; here it
    // is the server version under test, not the cut's length.
    current.env("PERCH_SITE_CUT_SECS", "30");
    current.env("PERCH_NATS_SERVER", crate::setup::current_nats_server()).args([
        "test",
        "-p",
        "perch-tests",
        "--locked",
    ]);
    for t in SERVER_TESTS {
        current.args(["--test", t]);
    }
    sh(&mut current)?;

    crate::docs::run()?;

    step("msrv: the whole workspace with Debian's rustc 1.85");
    sh(crate::cross::debian_cargo(&root().join("target/msrv")).args([
        "check",
        "--workspace",
        "--all-targets",
        "--locked",
    ]))?;

    crate::cross::qemu_all(&[])?;
    crate::package::run(&[])?;

    // Every bench at a small size, so that none can rot into a hang
    // (footprint reuses the ARM release agents built above).
    step("bench smoke: every benchmark at a small size");
    crate::bench_smoke::run()?;

    // Last: it reuses the ARM release agents built above.
    step("demo: the README's main command, end to end, checking every outcome it narrates");
    crate::demo::run(&[])?;

    step(&format!("ci passed in {:.0?}", started.elapsed()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new test file that starts a nats-server must run on both servers.
    #[test]
    fn server_tests_are_listed() {
        let dir = root().join("tests/tests");
        let mut starting = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            if ["Fleet::start", "NatsServer::start", "NatsCluster::start", "Hub::start"]
                .iter()
                .any(|s| text.contains(s))
            {
                starting.push(path.file_stem().unwrap().to_string_lossy().into_owned());
            }
        }
        starting.sort();
        let mut listed: Vec<String> = SERVER_TESTS.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(starting, listed);
    }
}
