//! `cargo xtask demo`: the release flow, narrated, on this machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{cargo, root, sh};

pub struct Demo {
    pub dir: PathBuf,
    pub bin: PathBuf,
}

impl Demo {
    /// Runs a perch binary in the demo directory, prints what it said, and
    /// checks the exit code is the one the story expects.
    pub fn sh(&self, program: &str, args: &[&str], expect: i32) -> Result<String> {
        println!("  $ {program} {}", args.join(" "));
        let out = Command::new(self.bin.join(program)).args(args).current_dir(&self.dir).output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for line in text.lines() {
            println!("    {line}");
        }
        let code = out.status.code().unwrap_or(-1);
        if code != expect {
            bail!("`{program} {}` exited {code}, expected {expect}", args.join(" "));
        }
        if expect != 0 {
            println!("    (exit code {code})");
        }
        Ok(text)
    }
}

pub fn say(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

pub fn run(args: &[String]) -> Result<()> {
    let nats = match args {
        [] => None,
        [flag, which] if flag == "--nats" => Some(which.as_str()),
        _ => bail!("usage: cargo xtask demo [--nats debian|current]"),
    };
    // A fresh machine has none of nats-server, the env tools, qemu or the
    // ARM sysroots yet; on a prepared one this only checks.
    crate::setup::run()?;
    match nats {
        None | Some("debian") => std::env::remove_var("PERCH_NATS_SERVER"),
        Some("current") => std::env::set_var("PERCH_NATS_SERVER", crate::setup::current_nats_server()),
        Some(other) => bail!("--nats takes debian or current, not {other:?}"),
    }
    println!("perch demo: signed bundles from key to device check, then a fleet of three and a field site on this machine\n(building the binaries first: the host tools, and the release agents for aarch64 and armv7)");
    sh(cargo().args([
        "build",
        "-q",
        "--bins",
        "-p",
        "perch-fleet",
        "-p",
        "perch-bootstrap",
        "-p",
        "perch-agent",
    ]))?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let dir = target_dir.join("demo");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let d = Demo { dir: dir.clone(), bin: target_dir.join("debug") };
    println!("working in {}", dir.display());

    say(1, "Three release engineers each make a release key. Secret keys stay with them (mode 0600).");
    for who in ["alice", "bob", "carol"] {
        d.sh("perch", &["keygen", "--out", who], 0)?;
    }

    say(2, "The org is created offline: a root key signs a trust document that says any 2 of the 3 release keys may sign a release.");
    d.sh(
        "perch-bootstrap",
        &[
            "init",
            "--dir",
            "org",
            "--org",
            "demo",
            "--release-key",
            "alice.pub",
            "--release-key",
            "bob.pub",
            "--release-key",
            "carol.pub",
            "--threshold",
            "2",
        ],
        0,
    )?;

    say(3, "A release: a 4 MiB root filesystem image for the aarch64 drones, in 256 KiB chunks.");
    write_image(&dir.join("rootfs.img"), 4 << 20)?;
    d.sh(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "drone-os",
            "--counter",
            "7",
            "--release-version",
            "2.4.1",
            "--kind",
            "image",
            "--input",
            "rootfs.img",
            "--out",
            "drone-os.perch",
            "--target",
            "aarch64-drone",
        ],
        0,
    )?;

    say(4, "Alice signs. One signature is below the threshold, so the bundle is refused (exit 3).");
    d.sh("perch", &["bundle", "sign", "--key", "alice.key", "drone-os.perch"], 0)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "drone-os.perch"], 3)?;

    say(5, "Alice signing again adds nothing; Bob's signature makes two of three.");
    d.sh("perch", &["bundle", "sign", "--key", "alice.key", "drone-os.perch"], 0)?;
    d.sh("perch", &["bundle", "sign", "--key", "bob.key", "drone-os.perch"], 0)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "drone-os.perch"], 0)?;

    say(6, "Anyone can inspect a bundle; inspect says plainly that it has not checked anything.");
    d.sh("perch", &["bundle", "inspect", "drone-os.perch"], 0)?;

    say(7, "A tampered copy: one bit flipped in the middle of the payload. Verification names the chunk.");
    let good = fs::read(dir.join("drone-os.perch"))?;
    let mut bad = good.clone();
    let at = good.len() - (2 << 20);
    bad[at] ^= 0x01;
    fs::write(dir.join("tampered.perch"), &bad)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "tampered.perch"], 3)?;

    say(8, "A copy cut short in transfer, and one with a flipped bit in the signed manifest.");
    fs::write(dir.join("truncated.perch"), &good[..good.len() - 1000])?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "truncated.perch"], 3)?;
    let mut bad = good.clone();
    bad[40] ^= 0x01;
    fs::write(dir.join("forged.perch"), &bad)?;
    d.sh("perch", &["bundle", "verify", "--trust", "org/trust.doc", "forged.perch"], 3)?;

    say(9, "A desktop release from a directory tree: a deterministic tar, so the same tree always gives the same chunks.");
    fs::create_dir_all(dir.join("app/bin"))?;
    fs::write(dir.join("app/bin/hello"), "#!/bin/sh\necho hello from perch\n")?;
    fs::write(dir.join("app/VERSION"), "1.0.0\n")?;
    d.sh(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "desk-app",
            "--counter",
            "1",
            "--kind",
            "archive",
            "--input",
            "app",
            "--out",
            "desk-app.perch",
            "--target",
            "x86_64-desktop",
        ],
        0,
    )?;
    d.sh("perch", &["bundle", "sign", "--key", "bob.key", "desk-app.perch"], 0)?;
    d.sh("perch", &["bundle", "sign", "--key", "carol.key", "desk-app.perch"], 0)?;

    say(10, "On a device, the agent runs the same checks offline, including the device's target.");
    d.sh(
        "perch-agent",
        &["check", "--trust", "org/trust.doc", "--target", "x86_64-desktop", "desk-app.perch"],
        0,
    )?;
    d.sh(
        "perch-agent",
        &["check", "--trust", "org/trust.doc", "--target", "x86_64-desktop", "drone-os.perch"],
        3,
    )?;

    // The drones run the real ARM release agents under qemu-user.
    let arm = crate::cross::run(&["aarch64-drone".to_string(), "armv7-drone".to_string()])?;
    desktop(&d)?;
    let fleet = crate::demo_fleet::run(&d, &arm)?;

    println!("\nDemo complete: good bundles verified and committed, a broken release rolled back by its health check,");
    println!("every damaged, under-signed, misdirected or replayed bundle refused with exit 3; three devices (x86_64,");
    println!("and aarch64 and armv7 agents under qemu) enrolled three ways, the drones through a ground station (a");
    println!("field site); a release installed and committed by the site's {} drones while its uplink was down, their", fleet.site_drones);
    println!(
        "reports kept at the site and each stored once at the hub when it returned, the release crossing the"
    );
    println!(
        "uplink once ({:.2}x its size); a broken release paused its rollout and rolled back by itself; a stolen",
        fleet.uplink_ratio
    );
    println!("desktop revoked live.");
    println!("Files are in {}; nothing is left running.", dir.display());
    Ok(())
}

/// A desktop with directory slots: install, a failing release rolled back,
/// a replayed old release refused.
fn desktop(d: &Demo) -> Result<()> {
    let root = d.dir.join("desktop");
    fs::create_dir_all(root.join("slots/a/bin"))?;
    fs::write(root.join("slots/a/bin/hello"), "echo hello from the factory image\n")?;
    std::os::unix::fs::symlink("a", root.join("slots/current"))?;
    fs::write(root.join("boot_id"), "demo\n")?;
    let p = |rel: &str| d.dir.join(rel).display().to_string();
    fs::write(
        root.join("agent.toml"),
        format!(
            "target = \"x86_64-desktop\"\ntrust = \"{}\"\nboot_id = \"{}\"\n\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n\n[health]\ncommands = [\"sh {}/current/bin/hello\"]\ntrial = \"3s\"\ninterval = \"500ms\"\n",
            p("org/trust.doc"),
            p("desktop/boot_id"),
            p("desktop/slots"),
            p("desktop/slots"),
        ),
    )?;
    let run = |rest: &[&str], expect: i32| -> Result<String> {
        let mut args = vec!["--config", "desktop/agent.toml", "--state-dir", "desktop/state"];
        args.extend_from_slice(rest);
        d.sh("perch-agent", &args, expect)
    };
    let release = |counter: &str, hello: &str, signers: [&str; 2]| -> Result<String> {
        fs::write(d.dir.join("app/bin/hello"), hello)?;
        let out = format!("desk-app-{counter}.perch");
        d.sh(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "desk-app",
                "--counter",
                counter,
                "--kind",
                "archive",
                "--input",
                "app",
                "--out",
                &out,
                "--target",
                "x86_64-desktop",
            ],
            0,
        )?;
        for k in signers {
            d.sh("perch", &["bundle", "sign", "--key", k, &out], 0)?;
        }
        Ok(out)
    };

    say(11, "A desktop with directory slots a and b runs slot a. The agent installs the desktop release into slot b, switches `current` to it, runs the health check (`sh current/bin/hello`) and commits.");
    run(&["install", "desk-app.perch"], 0)?;
    run(&["status"], 0)?;

    say(12, "Release 2 is broken: its hello exits 1. It installs into the idle slot, fails its trial, and the agent rolls back by itself (exit 1).");
    let broken = release("2", "echo this release is broken >&2; exit 1\n", ["alice.key", "carol.key"])?;
    run(&["install", &broken], 1)?;
    run(&["status"], 0)?;

    say(13, "Release 3 fixes it and commits. Then someone replays the old release 1: it is validly signed, but its counter is below the committed one, so it is refused (exit 3).");
    let fixed = release("3", "echo hello from release 3\n", ["alice.key", "bob.key"])?;
    run(&["install", &fixed], 0)?;
    run(&["install", "desk-app.perch"], 3)?;
    run(&["status"], 0)?;
    Ok(())
}

/// A reproducible pseudo-random image (xorshift), so the demo needs no input.
pub fn write_image(path: &Path, len: usize) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}
