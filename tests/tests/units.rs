//! The systemd units shipped in `targets/` pass `systemd-analyze verify`.

use std::path::Path;
use std::process::Command;

use perch_tests::{bin, Scratch};

#[test]
fn desktop_units_verify() {
    let s = Scratch::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/x86_64-desktop");
    let agent = bin("perch-agent");
    let mut units = vec![];
    for name in ["perch-enroll.service", "perch-agent.service"] {
        let text = std::fs::read_to_string(src.join(name)).unwrap();
        // verify checks that ExecStart= exists; point it at the built agent.
        let text = text.replace("/usr/bin/perch-agent", agent.to_str().unwrap());
        let path = s.path(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about units perch does not ship (the host's own) are not ours to fix.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("perch-")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{stderr}");
}
