//! What `targets/` ships is checked by the tools that will read it: the
//! systemd units by `systemd-analyze verify`, the U-Boot boot scripts by
//! `mkimage`, the GRUB snippet by `grub-script-check`, and every agent.toml
//! template by the agent's own config parser.

use std::path::{Path, PathBuf};
use std::process::Command;

use perch_tests::{bin, Scratch};

const TARGETS: [&str; 3] = ["aarch64-drone", "armv7-drone", "x86_64-desktop"];

fn target(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets").join(name)
}

fn units_of(t: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(target(t))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .collect();
    v.sort();
    v
}

#[test]
fn units_verify() {
    let agent = bin("perch-agent");
    for t in TARGETS {
        let s = Scratch::new();
        let mut units = vec![];
        for src in units_of(t) {
            let text = std::fs::read_to_string(&src).unwrap();
            // verify checks that ExecStart= exists; point it at the built agent.
            let text = text.replace("/usr/bin/perch-agent", agent.to_str().unwrap());
            let path = s.path(src.file_name().unwrap().to_str().unwrap());
            std::fs::write(&path, text).unwrap();
            units.push(path);
        }
        assert!(!units.is_empty(), "{t} ships no unit");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&units)
            .env("SYSTEMD_LOG_LEVEL", "notice")
            .output()
            .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Lines about units perch does not ship (the host's own) are not ours to fix.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("perch-")).collect();
        assert!(out.status.success() && ours.is_empty(), "{t}: systemd-analyze verify:\n{stderr}");
        // The agent's unit is a notify service with a watchdog, hardened.
        let agent_unit = std::fs::read_to_string(target(t).join("perch-agent.service")).unwrap();
        for line in [
            "Type=notify",
            "WatchdogSec=",
            "NoNewPrivileges=yes",
            "ProtectSystem=",
            "MemoryDenyWriteExecute=yes",
        ] {
            assert!(agent_unit.contains(line), "{t}: perch-agent.service lacks {line}");
        }
    }
}

#[test]
fn a_broken_unit_fails_verification() {
    let s = Scratch::new();
    let text = std::fs::read_to_string(target("aarch64-drone").join("perch-agent.service")).unwrap();
    let text = text.replace("/usr/bin/perch-agent", bin("perch-agent").to_str().unwrap());
    let path = s.path("perch-agent.service");
    std::fs::write(&path, text.replace("Type=notify", "Type=notifyy")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("perch-agent.service") && stderr.contains("notifyy"), "{stderr}");
}

#[test]
fn uboot_boot_scripts_build_with_mkimage() {
    for (t, arch) in [("aarch64-drone", "arm64"), ("armv7-drone", "arm")] {
        let s = Scratch::new();
        let scr = s.path("boot.scr");
        let out = Command::new("mkimage")
            .args(["-A", arch, "-T", "script", "-C", "none", "-n", "perch A/B boot", "-d"])
            .arg(target(t).join("boot.cmd"))
            .arg(&scr)
            .output()
            .expect("mkimage (Debian package u-boot-tools; cargo xtask setup installs it)");
        assert!(out.status.success(), "{t}: {}", String::from_utf8_lossy(&out.stderr));
        let listed = Command::new("mkimage").arg("-l").arg(&scr).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout).to_string();
        assert!(listed.contains("Script"), "{t}: {listed}");
        // The script speaks the agent's variables.
        let cmd = std::fs::read_to_string(target(t).join("boot.cmd")).unwrap();
        for var in ["perch_slot", "upgrade_available", "bootcount", "bootlimit", "perch.slot="] {
            assert!(cmd.contains(var), "{t}: boot.cmd does not use {var}");
        }
    }
}

#[test]
fn the_grub_snippet_is_valid_grub_script() {
    let s = Scratch::new();
    let out = Command::new("sh").arg(target("x86_64-desktop").join("09_perch")).output().unwrap();
    assert!(out.status.success());
    let cfg = s.path("perch.cfg");
    std::fs::write(&cfg, &out.stdout).unwrap();
    let check =
        Command::new("grub-script-check").arg(&cfg).output().expect("grub-script-check (grub-common)");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in
        ["--id perch-a", "--id perch-b", "next_entry", "saved_entry", "perch.slot=a", "perch.slot=b"]
    {
        assert!(text.contains(needle), "09_perch lacks {needle}");
    }
}

#[test]
fn agent_config_templates_parse() {
    for t in TARGETS {
        let path = target(t).join("agent.toml");
        let cfg = perch_agent::config::Config::load(&path).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(cfg.target, t);
    }
}
