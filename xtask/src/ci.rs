//! `cargo xtask ci`: every check, in the order a failure is cheapest to see.

use std::time::Instant;

use anyhow::Result;

use crate::util::{cargo, root, sh, step};

pub fn run() -> Result<()> {
    let started = Instant::now();
    crate::setup::run()?;

    step("format");
    sh(cargo().args(["fmt", "--all", "--check"]))?;

    step("clippy");
    sh(cargo().args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;

    step("tests");
    // The end-to-end tests run the real binaries; build them first.
    sh(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    sh(cargo().args(["test", "--workspace", "--locked"]))?;

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
    crate::demo::run()?;

    step(&format!("ci passed in {:.0?}", started.elapsed()));
    Ok(())
}
