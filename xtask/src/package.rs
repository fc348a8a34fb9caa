//! `cargo xtask package [CLASS...]`: a `.deb` per device class, with
//! `dpkg-deb` (on every Debian machine; no cargo-deb to install). It holds
//! the release agent from `cargo xtask cross`, the class's systemd units, its
//! agent.toml as a conffile, and its bootloader files for the integrator.
//! Every package is checked after it is built: its fields, and that it holds
//! exactly the files it should, with the right modes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cross::Target;
use crate::util::{root, sh, step};

/// A file in the package: where it goes, where it comes from, its mode.
struct Entry {
    dest: String,
    src: Source,
    mode: u32,
}

enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
    /// A symbolic link to this path.
    Symlink(&'static str),
}

/// Where the Choria agent goes: the operator adds this directory to the
/// Choria server's `plugin.choria.agent_provider.mcorpc.libdir`.
const CHORIA_LIBDIR: &str = "usr/lib/perch/choria";

fn entries(t: &Target, agent: &Path, work: &Path) -> Result<Vec<Entry>> {
    let dir = root().join("targets").join(t.class);
    let file = |dest: &str, name: &str, mode: u32| Entry {
        dest: dest.into(),
        src: Source::File(dir.join(name)),
        mode,
    };
    let mut v = vec![
        Entry { dest: "usr/bin/perch-agent".into(), src: Source::File(agent.into()), mode: 0o755 },
        file("etc/perch/agent.toml", "agent.toml", 0o644),
        file("lib/systemd/system/perch-agent.service", "perch-agent.service", 0o644),
    ];
    if dir.join("perch-enroll.service").exists() {
        v.push(file("lib/systemd/system/perch-enroll.service", "perch-enroll.service", 0o644));
    }
    let share = "usr/share/perch";
    if dir.join("boot.cmd").exists() {
        // The boot script, as source and as the image U-Boot loads.
        let scr = work.join("boot.scr");
        let arch = if t.arch == "arm64" { "arm64" } else { "arm" };
        sh(Command::new("mkimage")
            .args(["-A", arch, "-T", "script", "-C", "none", "-n", "perch A/B boot", "-d"])
            .arg(dir.join("boot.cmd"))
            .arg(&scr))?;
        v.push(file(&format!("{share}/uboot/boot.cmd"), "boot.cmd", 0o644));
        v.push(Entry { dest: format!("{share}/uboot/boot.scr"), src: Source::File(scr), mode: 0o644 });
        v.push(file(&format!("{share}/uboot/fw_env.config"), "fw_env.config", 0o644));
    }
    if dir.join("09_perch").exists() {
        v.push(file(&format!("{share}/grub/09_perch"), "09_perch", 0o755));
    }
    // The classes whose devices run a Choria server (desktops) ship the
    // external agent: its DDL, and `perch` calling perch-agent by that name.
    if dir.join("choria-plugin.conf").exists() {
        let agent_dir = format!("{CHORIA_LIBDIR}/mcollective/agent");
        v.push(Entry {
            dest: format!("{agent_dir}/perch.json"),
            src: Source::File(root().join("agent/choria/perch.json")),
            mode: 0o644,
        });
        v.push(Entry {
            dest: format!("{agent_dir}/perch"),
            src: Source::Symlink("/usr/bin/perch-agent"),
            mode: 0o777,
        });
        v.push(file(&format!("{share}/choria/plugin.d-perch"), "choria-plugin.conf", 0o644));
    }
    let readme = format!(
        "perch-agent for {class}\n\nThe agent is at /usr/bin/perch-agent, its config at /etc/perch/agent.toml\n(kept across upgrades), its state in /var/lib/perch. Enroll the device\n(`perch-agent enroll`, see the provisioning docs), then\n`systemctl enable --now perch-agent`.\n\nBootloader files for the image builder are under /usr/share/perch/.\n{choria}",
        class = t.class,
        choria = if dir.join("choria-plugin.conf").exists() {
            format!("\nThe Choria agent (`choria req perch ...`) is in /{CHORIA_LIBDIR}: add that\ndirectory to the Choria server's plugin.choria.agent_provider.mcorpc.libdir.\n")
        } else {
            String::new()
        }
    );
    v.push(Entry {
        dest: "usr/share/doc/perch-agent/README".into(),
        src: Source::Bytes(readme.into()),
        mode: 0o644,
    });
    Ok(v)
}

fn control(t: &Target, installed_kib: u64) -> String {
    let depends = match (t.class, t.static_crt) {
        ("x86_64-desktop", _) => "libc6 (>= 2.36), grub-common",
        (_, true) => "libubootenv-tool",
        (_, false) => "libc6 (>= 2.36), libubootenv-tool",
    };
    format!(
        "Package: perch-agent\nVersion: {version}\nArchitecture: {arch}\nMaintainer: perch developers <perch@example.invalid>\nInstalled-Size: {installed_kib}\nDepends: {depends}\nSection: admin\nPriority: optional\nHomepage: https://example.invalid/perch\nDescription: perch device agent ({class})\n perch delivers signed software to fleets of devices: it verifies\n threshold-signed bundles, installs them A/B with a trial boot and\n automatic rollback, and reports over links that come and go.\n",
        version = env!("CARGO_PKG_VERSION"),
        arch = t.arch,
        class = t.class,
    )
}

const POSTINST: &str = "#!/bin/sh
set -e
# Enable the agent like any Debian service; start it when systemd runs.
if [ \"$1\" = configure ]; then
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper enable perch-agent.service >/dev/null || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        systemctl start perch-agent.service >/dev/null || true
    fi
fi
";

const PRERM: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then
    systemctl stop perch-agent.service >/dev/null || true
fi
";

/// Builds and checks the package of each class named (all by default).
pub fn run(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut debs = vec![];
    for (t, agent) in crate::cross::run(args)? {
        step(&format!("package: perch-agent for {}", t.class));
        let work = root().join("target/package").join(t.class);
        if work.exists() {
            fs::remove_dir_all(&work)?;
        }
        let stage = work.join("root");
        fs::create_dir_all(stage.join("DEBIAN"))?;
        let files = entries(t, &agent, &work)?;
        let mut bytes = 0u64;
        for e in &files {
            let dest = stage.join(&e.dest);
            fs::create_dir_all(dest.parent().context("no parent")?)?;
            match &e.src {
                Source::File(p) => {
                    fs::copy(p, &dest).with_context(|| p.display().to_string())?;
                }
                Source::Bytes(b) => fs::write(&dest, b)?,
                Source::Symlink(to) => {
                    std::os::unix::fs::symlink(to, &dest)?;
                    continue;
                }
            }
            fs::set_permissions(&dest, fs::Permissions::from_mode(e.mode))?;
            bytes += fs::metadata(&dest)?.len();
        }
        let debian = stage.join("DEBIAN");
        fs::write(debian.join("control"), control(t, bytes.div_ceil(1024)))?;
        fs::write(debian.join("conffiles"), "/etc/perch/agent.toml\n")?;
        for (name, text) in [("postinst", POSTINST), ("prerm", PRERM)] {
            fs::write(debian.join(name), text)?;
            fs::set_permissions(debian.join(name), fs::Permissions::from_mode(0o755))?;
        }
        let deb = root().join("target/package").join(format!(
            "perch-agent_{}_{}_{}.deb",
            env!("CARGO_PKG_VERSION"),
            t.class,
            t.arch
        ));
        sh(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
        check(t, &deb, &files)?;
        println!("{} ({} bytes)", deb.display(), fs::metadata(&deb)?.len());
        debs.push(deb);
    }
    Ok(debs)
}

/// The package's fields and contents are what they should be.
fn check(t: &Target, deb: &Path, files: &[Entry]) -> Result<()> {
    let field = |name: &str| -> Result<String> {
        let out = Command::new("dpkg-deb").arg("--field").arg(deb).arg(name).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if field("Package")? != "perch-agent" || field("Architecture")? != t.arch {
        bail!("{}: wrong Package or Architecture", deb.display());
    }
    let listing = Command::new("dpkg-deb").arg("--contents").arg(deb).output()?;
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    // Lines: mode owner/group size date time ./path [-> target]
    let mut found: Vec<(String, String, String)> = listing
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let path = match cols.iter().position(|c| *c == "->") {
                Some(arrow) => {
                    format!("{} -> {}", cols.get(arrow - 1)?.trim_start_matches("./"), cols.get(arrow + 1)?)
                }
                None => cols.last()?.trim_start_matches("./").to_string(),
            };
            (!cols[0].starts_with('d')).then(|| (path, cols[0].to_string(), cols[1].to_string()))
        })
        .collect();
    found.sort();
    let mut want: Vec<(String, String, String)> = files
        .iter()
        .map(|e| match e.src {
            Source::Symlink(to) => {
                (format!("{} -> {to}", e.dest), "lrwxrwxrwx".to_string(), "root/root".to_string())
            }
            _ => {
                let mode = if e.mode == 0o755 { "-rwxr-xr-x" } else { "-rw-r--r--" };
                (e.dest.clone(), mode.to_string(), "root/root".to_string())
            }
        })
        .collect();
    want.sort();
    if found != want {
        bail!("{}: contents differ\nfound: {found:#?}\nwanted: {want:#?}", deb.display());
    }
    let conffiles = Command::new("dpkg-deb").arg("--ctrl-tarfile").arg(deb).output()?;
    if conffiles.stdout.is_empty() {
        bail!("{}: no control archive", deb.display());
    }
    println!("checked {}: {} files, owned by root, modes as shipped", deb.display(), found.len());
    Ok(())
}
