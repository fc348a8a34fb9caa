//! `cargo xtask cross`: release `perch-agent` for each device class with
//! Debian's rustc 1.85 (the MSRV); the ARM ones linked by the Debian cross gcc.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::setup::{sysroot, ARM_ARCHES};
use crate::util::{root, sh, step};

pub struct Target {
    /// The device class (`targets/<class>/`, the agent's `target`).
    pub class: &'static str,
    pub triple: &'static str,
    /// The Debian architecture.
    pub arch: &'static str,
    /// qemu-user binary (none for the host) and its `-L` prefix for dynamic builds.
    pub qemu: Option<&'static str>,
    pub qemu_prefix: Option<&'static str>,
    pub static_crt: bool,
    /// For static builds: the binutils `objcopy` that takes the unwind
    /// tables out (see [`UNWIND_SECTIONS`]).
    pub objcopy: Option<&'static str>,
}

pub const TARGETS: &[Target] = &[
    Target {
        class: "aarch64-drone",
        triple: "aarch64-unknown-linux-gnu",
        arch: "arm64",
        qemu: Some("qemu-aarch64-static"),
        qemu_prefix: None,
        static_crt: true,
        objcopy: Some("aarch64-linux-gnu-objcopy"),
    },
    Target {
        class: "armv7-drone",
        triple: "armv7-unknown-linux-gnueabihf",
        arch: "armhf",
        qemu: Some("qemu-arm-static"),
        qemu_prefix: Some("/usr/arm-linux-gnueabihf"),
        static_crt: false,
        objcopy: None,
    },
    Target {
        class: "x86_64-desktop",
        triple: "x86_64-unknown-linux-gnu",
        arch: "amd64",
        qemu: None,
        qemu_prefix: None,
        static_crt: false,
        objcopy: None,
    },
];

/// The targets named by class or triple (all if none are named).
pub fn select(args: &[String]) -> Result<Vec<&'static Target>> {
    let picked: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| args.is_empty() || args.iter().any(|a| a == t.triple || a == t.class))
        .collect();
    if picked.is_empty() || picked.len() < args.len() {
        let known: Vec<_> = TARGETS.iter().map(|t| t.class).collect();
        bail!("unknown target in {args:?}; known: {}", known.join(", "));
    }
    Ok(picked)
}

/// Builds the agent for each requested target (all by default); returns the binaries.
pub fn run(args: &[String]) -> Result<Vec<(&'static Target, PathBuf)>> {
    select(args)?.into_iter().map(|t| Ok((t, build(t)?))).collect()
}

fn build(t: &Target) -> Result<PathBuf> {
    build_package(t, "perch-agent", "perch-agent")
}

/// Builds `package`'s binary `bin` for `t` the way the agent is built
/// (release profile, Debian's rustc, static on aarch64); its path.
/// For static builds: no `.eh_frame_hdr` (about 90 KB of the aarch64 agent).
/// It is only a lookup table for the unwinder; with `panic = "abort"`
/// nothing unwinds. Dynamic builds keep it: there the unwinder finds frames
/// only through it.
pub const STATIC_LINK_ARGS: &str = " -C link-arg=-Wl,--no-eh-frame-hdr";

/// Taken out of static builds after the link: the unwind tables
/// (`.eh_frame`, 370 KB of the aarch64 agent, and the landing-pad tables
/// they point to). With `panic = "abort"` nothing in the agent unwinds: a
/// panic prints its message and location and aborts (the agent's panic
/// hook never asks for a backtrace, which in a stripped binary has no
/// names anyway); no thread is cancelled or `pthread_exit`s. rustc 1.85
/// gives every function a personality routine and unwind table even with
/// `panic = "abort"`, and `-C force-unwind-tables=no` does not remove
/// them from std, so they go after the link. The startup code only records
/// where the section was; it is read when unwinding, which never happens.
/// A debugger unwinds a core dump of the unstripped build
/// (`CARGO_PROFILE_RELEASE_STRIP=false`).
pub const UNWIND_SECTIONS: [&str; 2] = [".eh_frame", ".gcc_except_table"];

pub fn build_package(t: &Target, package: &str, bin: &str) -> Result<PathBuf> {
    step(&format!("cross: {bin} for {} ({}) with Debian's rustc 1.85", t.class, t.triple));
    let mut rustflags = String::new();
    if t.qemu.is_some() {
        debug_assert!(ARM_ARCHES.iter().any(|(a, _)| *a == t.arch));
        let sysroot = sysroot(t.arch);
        if !sysroot.join("lib/rustlib").join(t.triple).is_dir() {
            bail!("{} is missing: `cargo xtask setup` did not install it", sysroot.display());
        }
        rustflags = format!("--sysroot={}", sysroot.display());
    }
    if t.static_crt {
        rustflags.push_str(" -C target-feature=+crt-static");
        rustflags.push_str(STATIC_LINK_ARGS);
    }
    for (from, to) in remapped_paths() {
        rustflags.push_str(&format!(" --remap-path-prefix={from}={to}"));
    }
    let target_dir = root().join("target/cross");
    let mut c = Command::new("/usr/bin/cargo");
    // Debian's cargo and rustc, not rustup's: this build is the MSRV check.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c.current_dir(root())
        .env("RUSTC", "/usr/bin/rustc")
        .env("CARGO_TARGET_DIR", &target_dir)
        .env(format!("CARGO_TARGET_{}_RUSTFLAGS", t.triple.to_uppercase().replace('-', "_")), &rustflags)
        .args(["build", "--locked", "--release", "-p", package, "--bin", bin, "--target", t.triple]);
    sh(&mut c)?;
    let bin = target_dir.join(t.triple).join("release").join(bin);
    if let Some(objcopy) = t.objcopy {
        let mut strip = Command::new(objcopy);
        for section in UNWIND_SECTIONS {
            strip.arg(format!("--remove-section={section}"));
        }
        sh(strip.arg(&bin))?;
    }
    let size = std::fs::metadata(&bin)?.len();
    println!("built {} ({} bytes, {:.2} MiB)", bin.display(), size, size as f64 / 1048576.0);
    Ok(bin)
}

/// Build-machine paths that end up in panic messages, shortened: shipped
/// binaries should not carry the builder's home directory, and the agent
/// saves about 12 KB.
fn remapped_paths() -> Vec<(String, String)> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut out = vec![(root().display().to_string(), "perch".to_string())];
    if let Some(Ok(dirs)) = home.map(|h| std::fs::read_dir(h.join("registry/src"))) {
        out.extend(dirs.flatten().map(|d| (d.path().display().to_string(), "crates".to_string())));
    }
    // RUSTFLAGS is split on whitespace.
    out.retain(|(from, _)| !from.contains(char::is_whitespace));
    out
}

/// Builds the ARM agents and runs each under qemu-user. The host binaries
/// that make the test bundles must be built (`cargo build --bins`).
pub fn qemu_all(args: &[String]) -> Result<()> {
    crate::util::build_host_tools()?;
    let arm: Vec<String> = match args {
        [] => TARGETS.iter().filter(|t| t.qemu.is_some()).map(|t| t.class.to_string()).collect(),
        named => named.to_vec(),
    };
    for (target, bin) in run(&arm)? {
        if target.qemu.is_none() {
            continue;
        }
        step(&format!("qemu: {} perch-agent", target.triple));
        qemu_version(target, &bin)?;
        qemu_check(target, &bin)?;
    }
    Ok(())
}

/// Debian's cargo and rustc 1.85 (not rustup's): builds with it prove the MSRV.
pub fn debian_cargo(target_dir: &Path) -> Command {
    let mut c = Command::new("/usr/bin/cargo");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c.current_dir(root()).env("RUSTC", "/usr/bin/rustc").env("CARGO_TARGET_DIR", target_dir);
    c
}

pub fn qemu(t: &Target, bin: &Path) -> Command {
    let Some(q) = t.qemu else { return Command::new(bin) };
    let mut c = Command::new(q);
    if let Some(prefix) = t.qemu_prefix {
        c.args(["-L", prefix]);
    }
    c.arg(bin);
    c
}

/// Runs the ARM agent's offline bundle check under qemu-user on a bundle the
/// host `perch` built and signed: a good one must pass, a tampered one exit 3.
pub fn qemu_check(t: &Target, bin: &Path) -> Result<()> {
    let host = root().join("target/debug");
    let dir = root().join("target/qemu-check").join(t.triple);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let host_run = |program: &str, args: &[&str]| -> Result<()> {
        let out = Command::new(host.join(program)).args(args).current_dir(&dir).output()?;
        if !out.status.success() {
            bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    host_run("perch", &["keygen", "--out", "k"])?;
    host_run("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k.pub", "--threshold", "1"])?;
    crate::demo::write_image(&dir.join("img"), 3 << 20)?;
    host_run(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "os",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
            "--target",
            "drone",
        ],
    )?;
    host_run("perch", &["bundle", "sign", "--key", "k.key", "b.perch"])?;
    let mut bytes = std::fs::read(dir.join("b.perch"))?;
    let n = bytes.len();
    bytes[n - 1000] ^= 0x01;
    std::fs::write(dir.join("bad.perch"), bytes)?;
    let agent = |args: &[&str], expect: i32| -> Result<()> {
        let mut c = qemu(t, bin);
        c.current_dir(&dir).args(args);
        println!("$ {}", crate::util::show(&c));
        let out = c.output()?;
        print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.code() != Some(expect) {
            bail!("{}: `{}` exited {:?}, expected {expect}", t.triple, args.join(" "), out.status.code());
        }
        Ok(())
    };
    agent(&["check", "--trust", "org/trust.doc", "--target", "drone", "b.perch"], 0)?;
    agent(&["check", "--trust", "org/trust.doc", "--target", "drone", "bad.perch"], 3)?;
    // A whole A/B install by the ARM agent: stage, switch, trial, commit.
    std::fs::create_dir_all(dir.join("slots/a"))?;
    std::os::unix::fs::symlink("a", dir.join("slots/current"))?;
    std::fs::create_dir_all(dir.join("tree"))?;
    std::fs::write(dir.join("tree/app"), "built on x86_64, installed by an ARM agent\n")?;
    // Two copies of one library: compressed, the second copy's chunks are
    // linked to the first, so the ARM agent decodes linked chunks in order.
    crate::demo::write_image(&dir.join("tree/lib1.so"), 300 << 10)?;
    std::fs::copy(dir.join("tree/lib1.so"), dir.join("tree/lib2.so"))?;
    host_run(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "1",
            "--kind",
            "archive",
            "--input",
            "tree",
            "--out",
            "app.perch",
            "--target",
            "drone",
            "--compress",
            "zstd:3",
        ],
    )?;
    host_run("perch", &["bundle", "sign", "--key", "k.key", "app.perch"])?;
    std::fs::write(
        dir.join("agent.toml"),
        "target = \"drone\"\ntrust = \"org/trust.doc\"\n[slots]\nbackend = \"dir\"\nroot = \"slots\"\n[health]\ncommands = [\"test -f slots/current/app\"]\ntrial = \"30s\"\n",
    )?;
    agent(&["--config", "agent.toml", "--state-dir", "state", "install", "app.perch"], 0)?;
    if std::fs::read_link(dir.join("slots/current"))? != Path::new("b") {
        bail!("{}: the ARM agent did not switch to slot b", t.triple);
    }
    for lib in ["lib1.so", "lib2.so"] {
        if std::fs::read(dir.join("slots/b").join(lib))? != std::fs::read(dir.join("tree").join(lib))? {
            bail!("{}: the ARM agent installed {lib} wrong", t.triple);
        }
    }
    agent(&["--config", "agent.toml", "--state-dir", "state", "status", "--json"], 0)?;
    Ok(())
}

/// Runs `perch-agent --version` under qemu-user and checks the answer.
pub fn qemu_version(t: &Target, bin: &Path) -> Result<()> {
    let mut c = qemu(t, bin);
    c.arg("--version");
    println!("$ {}", crate::util::show(&c));
    let out = c.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    if !out.status.success() || !text.starts_with("perch-agent ") {
        bail!("{} --version under {:?} failed: {}", t.triple, t.qemu, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
