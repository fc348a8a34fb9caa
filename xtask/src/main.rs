//! Developer automation for perch: `cargo xtask <command>` (the list is
//! `USAGE` below: setup, ci, demo, cross, package, qemu, bench, fuzz, docs).

mod bench;
mod bench_cluster;
mod bench_delta;
mod bench_enroll;
mod bench_fleet;
mod bench_footprint;
mod bench_link;
mod bench_site;
mod bench_smoke;
mod bench_wait;
mod ci;
mod cross;
mod demo;
mod demo_fleet;
mod docs;
mod drone;
mod fleet;
mod fuzz;
mod graph;
mod package;
mod setup;
mod site;
mod util;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup               install what perch needs on Debian (idempotent)
  ci                  the whole test suite, exactly as CI runs it
  demo [--nats current]  walk through the release flow on this machine (on Debian's
                      nats-server 2.9.10, or the current upstream release)
  cross [CLASS...]    (runs setup) release perch-agent per device class (aarch64-drone, armv7-drone,
                      x86_64-desktop) with Debian's rustc 1.85
  package [CLASS...]  cross, then a checked .deb per device class (target/package/)
  qemu [TARGET...]    cross, then run each ARM agent under qemu-user: --version, check, an A/B install
  bench verify [--size-mib N]   bundle verify throughput against sha256sum and openssl
  bench install [--size-mib N]  agent install into a uboot slot against dd conv=fsync
  bench enroll [--devices N]    enrollments per second, one and two provisioners
  bench link [--records N] [--bundle-mib N]
                                outbox drain rate, and chunk fetch against bare direct gets
  bench link --full             the link scenarios at full size (100 MiB, 10,000 reports)
  bench cluster [--records N] [--devices N]
                                report drain and enrollment rates, one server against a
                                three-server R3 cluster, and the ratio
  bench footprint [--seconds N] agent size (aarch64) and idle memory (x86_64) against the floor
  bench site [--drones N] [--bundle-mib M]
                                bytes across a field site's uplink for a bundle its N drones
                                install, against the bundle's size (goal <= 1.1)
  bench smoke                   verify, install, enroll, link, cluster, footprint, site at a small size (in CI)
  fuzz [--seconds N] [TARGET...]  every cargo-fuzz target for N seconds each (default 600;
                      the scheduled job, not CI), then executions and corpus sizes
  docs                build the Hugo site, check its links, and use it in headless Chromium
  graph               the crate graph is the one the architecture page draws; protocol does no I/O";

fn main() {
    forget_cargo_run_vars();
    if std::env::args().nth(1).as_deref() == Some("ci") {
        // A clean build has nothing to reuse, and incremental state is a
        // quarter of target/debug (1.7 of 7.2 GB): CI once ran out of disk.
        // Single-threaded still, as above.
        std::env::set_var("CARGO_INCREMENTAL", "0");
    }
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

/// `cargo run` gave xtask its package's CARGO_PKG_*, CARGO_MANIFEST_* and
/// the like. Every cargo xtask starts would inherit them, and ring's build
/// script watches some: cargo would rebuild ring and all above it, and the
/// next cargo started without them (a shell, perch-tests' own build) would
/// rebuild it back. In CI that cost minutes, several times over.
fn forget_cargo_run_vars() {
    let per_crate = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_BIN_",
        "CARGO_CRATE_",
        "CARGO_PRIMARY_",
        "CARGO_TARGET_TMPDIR",
    ];
    for (var, _) in std::env::vars_os() {
        if per_crate.iter().any(|p| var.to_string_lossy().starts_with(p)) {
            // Single-threaded still: nothing else reads the environment.
            std::env::remove_var(&var);
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("ci") => ci::run(),
        Some("demo") => demo::run(rest),
        // Each installs what it needs first (as demo and ci do).
        Some("cross") => setup::run().and_then(|()| cross::run(rest).map(drop)),
        Some("package") => setup::run().and_then(|()| package::run(rest).map(drop)),
        Some("qemu") => setup::run().and_then(|()| cross::qemu_all(rest)),
        Some("bench") => bench::run(rest),
        Some("docs") => docs::run(),
        Some("graph") => graph::run(),
        Some("fuzz") => fuzz::run(rest),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
