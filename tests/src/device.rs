//! A simulated device for end-to-end deploy tests: real slot files, a real
//! file-backed U-Boot environment (fw_setenv/fw_printenv) or grubenv
//! (grub-editenv), and a bootloader that plays the firmware's part on
//! "reboot": real U-Boot under qemu running the shipped boot script
//! ([`crate::uboot`]), or for tests that reboot hundreds of times, a model
//! of that script ([`uboot_model`], checked against real U-Boot).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{bin, Run, Scratch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Dir,
    Uboot,
    Grub,
    Hook,
}

/// Size of each block slot file.
pub const SLOT_SIZE: usize = 4 << 20;

pub struct Device {
    pub s: Scratch,
    pub backend: Backend,
    boots: u32,
    /// U-Boot devices: reboot through [`uboot_model`] instead of real U-Boot.
    pub boot_model: bool,
    board: Option<crate::uboot::Board>,
    /// Extra `[health]` lines.
    pub health: String,
    pub inhibit: String,
    pub target: String,
    pub checkpoint_bytes: u64,
}

impl Device {
    /// A device with an org (2 release keys, threshold 2), running slot a,
    /// which holds `old` (for block slots) or the tree made by `old_tree`.
    pub fn new(backend: Backend) -> Device {
        let s = Scratch::new();
        s.org(2, 2);
        fs::create_dir_all(s.path("state")).unwrap();
        let d = Device {
            s,
            backend,
            boots: 0,
            boot_model: false,
            board: None,
            health: "commands = [\"true\"]\ntrial = \"20s\"\ninterval = \"100ms\"\ntimeout = \"5s\"\n".into(),
            inhibit: String::new(),
            target: "test-board".into(),
            checkpoint_bytes: 64 * 1024,
        };
        match backend {
            Backend::Dir => {
                fs::create_dir_all(d.path("root/a")).unwrap();
                fs::write(d.path("root/a/app"), "old app\n").unwrap();
                std::os::unix::fs::symlink("a", d.path("root/current")).unwrap();
            }
            Backend::Uboot | Backend::Grub | Backend::Hook => {
                fs::write(d.path("a.img"), old_image()).unwrap();
                fs::write(d.path("b.img"), vec![0u8; SLOT_SIZE]).unwrap();
            }
        }
        match backend {
            Backend::Uboot => {
                fs::write(d.path("env"), vec![0u8; 0x4000]).unwrap();
                fs::write(d.path("fw_env.config"), format!("{} 0x0000 0x4000\n", d.path("env").display()))
                    .unwrap();
                // perch's defaults, and the board's own variables.
                let mut defenv = "perch_slot=a\nbootlimit=3\n".to_string();
                for (k, v) in crate::uboot::BOARD_ENV {
                    defenv.push_str(&format!("{k}={v}\n"));
                }
                fs::write(d.path("defenv"), defenv).unwrap();
                let st = Command::new("fw_setenv")
                    .arg("-c")
                    .arg(d.path("fw_env.config"))
                    .arg("-f")
                    .arg(d.path("defenv"))
                    .args(["perch_slot", "a"])
                    .output()
                    .unwrap();
                assert!(st.status.success(), "fw_setenv init: {}", String::from_utf8_lossy(&st.stderr));
            }
            Backend::Grub => {
                let env = d.path("grubenv");
                assert!(Command::new("grub-editenv").arg(&env).arg("create").status().unwrap().success());
                assert!(Command::new("grub-editenv")
                    .arg(&env)
                    .args(["set", "saved_entry=perch-a", "perch_slot=a"])
                    .status()
                    .unwrap()
                    .success());
            }
            Backend::Hook => fs::write(d.path("hook-booted"), "a\n").unwrap(),
            Backend::Dir => {}
        }
        fs::write(d.path("cmdline"), "console=ttyS0 perch.slot=a quiet\n").unwrap();
        fs::write(d.path("boot_id"), "boot-0\n").unwrap();
        d.write_config();
        d
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.s.path(rel)
    }

    /// (Re)writes agent.toml from the current settings.
    pub fn write_config(&self) {
        let p = |r: &str| self.path(r).display().to_string();
        let slots = match self.backend {
            Backend::Dir => format!("backend = \"dir\"\nroot = \"{}\"\n", p("root")),
            Backend::Uboot => format!(
                "backend = \"uboot\"\ndevices = {{ a = \"{}\", b = \"{}\" }}\nfw_env_config = \"{}\"\ncmdline = \"{}\"\nbootlimit = 2\n",
                p("a.img"),
                p("b.img"),
                p("fw_env.config"),
                p("cmdline")
            ),
            Backend::Grub => format!(
                "backend = \"grub\"\ndevices = {{ a = \"{}\", b = \"{}\" }}\nenvfile = \"{}\"\ncmdline = \"{}\"\n",
                p("a.img"),
                p("b.img"),
                p("grubenv"),
                p("cmdline")
            ),
            Backend::Hook => {
                let log = p("hook.log");
                format!(
                    "backend = \"hook\"\n\
                     write = 'echo write $PERCH_SLOT $PERCH_KIND >> {log}; dd if=\"$PERCH_PAYLOAD\" of={dir}/$PERCH_SLOT.img conv=notrunc,fsync status=none'\n\
                     activate = 'echo activate $PERCH_SLOT >> {log}; echo $PERCH_SLOT > {dir}/hook-booted'\n\
                     confirm = 'echo confirm $PERCH_SLOT >> {log}'\n\
                     rollback = 'echo rollback $PERCH_SLOT >> {log}; echo $PERCH_SLOT > {dir}/hook-booted'\n\
                     booted = 'cat {dir}/hook-booted'\n",
                    dir = self.s.dir.path().display()
                )
            }
        };
        let cfg = format!(
            "target = \"{}\"\ntrust = \"{}\"\nboot_id = \"{}\"\ncheckpoint_bytes = {}\n\n[slots]\n{slots}\n[health]\n{}\n[inhibit]\npoll = \"100ms\"\n{}\n",
            self.target,
            p("org/trust.doc"),
            p("boot_id"),
            self.checkpoint_bytes,
            self.health,
            self.inhibit
        );
        fs::write(self.path("agent.toml"), cfg).unwrap();
    }

    /// Runs perch-agent with this device's config and state dir.
    pub fn agent(&self, args: &[&str]) -> Run {
        self.agent_env(args, &[])
    }

    pub fn agent_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = Command::new(bin("perch-agent"));
        c.arg("--config").arg(self.path("agent.toml")).arg("--state-dir").arg(self.path("state"));
        c.args(args).current_dir(self.s.dir.path());
        for (k, v) in env {
            c.env(k, v);
        }
        let r: Run = c.output().expect("spawn perch-agent").into();
        crate::schema::check_cli_output("perch-agent", args, &r.stdout);
        r
    }

    pub fn status(&self) -> serde_json::Value {
        let r = self.agent(&["status", "--json"]);
        assert_eq!(r.code, 0, "status: {}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("status json: {e}: {}", r.stdout))
    }

    pub fn state(&self) -> String {
        self.status()["deploy"]["state"].as_str().unwrap_or("").to_string()
    }

    /// Builds and signs (with both keys) an image bundle, returning its payload.
    pub fn image_bundle(&self, out: &str, counter: u64, seed: u8, len: usize, chunk: u32) -> Vec<u8> {
        let payload = new_image(seed, len);
        fs::write(self.path(&format!("{out}.payload")), &payload).unwrap();
        self.build(out, counter, "image", &format!("{out}.payload"), chunk, &[]);
        payload
    }

    /// Builds and signs an archive bundle of `tree/` files `(name, content)`.
    pub fn archive_bundle(&self, out: &str, counter: u64, files: &[(&str, &str)]) {
        let tree = self.path(&format!("{out}.tree"));
        fs::create_dir_all(&tree).unwrap();
        for (name, content) in files {
            fs::write(tree.join(name), content).unwrap();
        }
        self.build(out, counter, "archive", &format!("{out}.tree"), 1024, &[]);
    }

    /// Signs (with both keys) an archive bundle whose payload is `tar` as
    /// given, byte for byte: for archives `perch bundle build` would never
    /// make.
    pub fn signed_tar_bundle(&self, out: &str, counter: u64, tar: &[u8], allow_setid: bool) {
        use perch_protocol::bundle::{BundleHead, ManifestBuilder, ManifestParams, PayloadKind};
        let mut b = ManifestBuilder::new(ManifestParams {
            name: "os".into(),
            counter,
            version: counter.to_string(),
            targets: vec![self.target.clone()],
            kind: PayloadKind::Archive,
            chunk_size: 1024,
            created_at: 1,
            expires_at: None,
            min_agent_version: None,
            allow_downgrade: false,
            allow_setid,
            format: perch_protocol::bundle::Format::V3,
            zstd_level: None,
        })
        .unwrap();
        b.update(tar);
        let mut head = BundleHead::new(b.finish().unwrap()).unwrap();
        for k in ["k1.key", "k2.key"] {
            let text = fs::read_to_string(self.path(k)).unwrap();
            head.add_signature(&perch_protocol::SecretKey::from_text(&text).unwrap()).unwrap();
        }
        let mut bytes = Vec::new();
        head.write_to(&mut bytes).unwrap();
        bytes.extend_from_slice(tar);
        fs::write(self.path(out), bytes).unwrap();
    }

    /// Signs (with both keys) an image bundle whose chunk table and stored
    /// payload are given as they are: for manifests `perch bundle build`
    /// would never make (sizes that lie, say).
    pub fn signed_chunks_bundle(
        &self,
        out: &str,
        counter: u64,
        chunking: perch_protocol::bundle::Chunking,
        chunks: Vec<perch_protocol::bundle::ChunkEntry>,
        stored: &[u8],
    ) {
        use perch_protocol::bundle::{BundleHead, Format, Manifest, PayloadKind, Release};
        let release = Release {
            name: "os".into(),
            counter,
            version: counter.to_string(),
            targets: vec![self.target.clone()],
            kind: PayloadKind::Image,
            created_at: 1,
            expires_at: None,
            min_agent_version: None,
            allow_downgrade: false,
            allow_setid: false,
        };
        let m = Manifest::from_parts(release, Format::V3, chunking, chunks, None).unwrap();
        let mut head = BundleHead::new(m).unwrap();
        for k in ["k1.key", "k2.key"] {
            let text = fs::read_to_string(self.path(k)).unwrap();
            head.add_signature(&perch_protocol::SecretKey::from_text(&text).unwrap()).unwrap();
        }
        let mut bytes = Vec::new();
        head.write_to(&mut bytes).unwrap();
        bytes.extend_from_slice(stored);
        fs::write(self.path(out), bytes).unwrap();
    }

    pub fn build(&self, out: &str, counter: u64, kind: &str, input: &str, chunk: u32, extra: &[&str]) {
        let counter = counter.to_string();
        let chunk = chunk.to_string();
        let mut args = vec![
            "bundle",
            "build",
            "--name",
            "os",
            "--counter",
            &counter,
            "--kind",
            kind,
            "--input",
            input,
            "--out",
            out,
            "--chunk-size",
            &chunk,
            "--target",
            &self.target,
        ];
        args.extend_from_slice(extra);
        self.s.ok("perch", &args);
        self.s.ok("perch", &["bundle", "sign", "--key", "k1.key", out]);
        self.s.ok("perch", &["bundle", "sign", "--key", "k2.key", out]);
    }

    /// The bootloader's part of a reboot, with the real env tools: U-Boot's
    /// boot counting and altbootcmd fallback, or GRUB's one-shot next_entry.
    /// Writes the booted slot into the kernel command line and a new boot id.
    pub fn reboot(&mut self) -> &'static str {
        self.boots += 1;
        let slot = match self.backend {
            Backend::Uboot if self.boot_model => {
                let get = |v: &str| -> Option<String> {
                    let o = Command::new("fw_printenv")
                        .arg("-c")
                        .arg(self.path("fw_env.config"))
                        .args(["-n", v])
                        .output()
                        .unwrap();
                    Some(String::from_utf8_lossy(&o.stdout).trim().to_string()).filter(|s| !s.is_empty())
                };
                let vars = ["perch_slot", "upgrade_available", "bootcount", "bootlimit"].map(get);
                let [slot, upgrade, count, limit] = vars.each_ref().map(Option::as_deref);
                let b = uboot_model(slot, upgrade, count, limit);
                if b.saved {
                    let script = self.path("bootsim.script");
                    let mut saved = format!(
                        "perch_slot={}\nbootcount={}\nbootlimit={}\n",
                        b.slot, b.bootcount, b.bootlimit
                    );
                    saved.push_str(&format!("upgrade_available={}\n", b.upgrade_available));
                    fs::write(&script, saved).unwrap();
                    let st = Command::new("fw_setenv")
                        .arg("-c")
                        .arg(self.path("fw_env.config"))
                        .arg("-s")
                        .arg(&script)
                        .status();
                    assert!(st.unwrap().success());
                }
                b.slot
            }
            Backend::Uboot => {
                let (dir, env) = (self.path(""), self.path("env"));
                let board = self.board.get_or_insert_with(|| {
                    crate::uboot::Board::new(
                        crate::uboot::Arch::Aarch64,
                        &boot_cmd(crate::uboot::Arch::Aarch64),
                        &dir,
                    )
                    .unwrap()
                });
                let boot = board.boot(&env).unwrap();
                let slot = boot
                    .slot()
                    .unwrap_or_else(|| panic!("no perch.slot= from U-Boot:\n{}", boot.console))
                    .to_string();
                assert_eq!(
                    boot.kernel.map(String::from),
                    Some(slot.clone()),
                    "U-Boot loaded another slot's kernel:\n{}",
                    boot.console
                );
                fs::write(self.path("cmdline"), format!("{}\n", boot.bootargs)).unwrap();
                fs::write(self.path("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
                return if slot == "a" { "a" } else { "b" };
            }
            Backend::Grub => {
                let env = self.path("grubenv");
                let list = Command::new("grub-editenv").arg(&env).arg("list").output().unwrap();
                let list = String::from_utf8_lossy(&list.stdout).into_owned();
                let var =
                    |n: &str| list.lines().find_map(|l| l.strip_prefix(&format!("{n}="))).map(str::to_string);
                let entry = match var("next_entry").filter(|e| !e.is_empty()) {
                    Some(e) => {
                        assert!(Command::new("grub-editenv")
                            .arg(&env)
                            .args(["unset", "next_entry"])
                            .status()
                            .unwrap()
                            .success());
                        e
                    }
                    None => var("saved_entry").unwrap_or_else(|| "perch-a".into()),
                };
                entry.trim_start_matches("perch-").to_string()
            }
            Backend::Hook => fs::read_to_string(self.path("hook-booted")).unwrap().trim().to_string(),
            Backend::Dir => fs::read_link(self.path("root/current")).unwrap().display().to_string(),
        };
        fs::write(self.path("cmdline"), format!("console=ttyS0 perch.slot={slot} quiet\n")).unwrap();
        fs::write(self.path("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        if slot == "a" {
            "a"
        } else {
            "b"
        }
    }

    /// Files that make up the device's persistent state.
    fn persistent(&self) -> Vec<&'static str> {
        let mut v = vec!["cmdline", "boot_id", "state"];
        match self.backend {
            Backend::Dir => v.push("root"),
            Backend::Uboot => v.extend(["a.img", "b.img", "env"]),
            Backend::Grub => v.extend(["a.img", "b.img", "grubenv"]),
            Backend::Hook => v.extend(["a.img", "b.img", "hook-booted"]),
        }
        v
    }

    /// Saves the device's disks and firmware state (to roll many crash runs
    /// back to the same starting point).
    pub fn snapshot(&self) {
        let snap = self.path("snap");
        let _ = fs::remove_dir_all(&snap);
        fs::create_dir_all(&snap).unwrap();
        for f in self.persistent() {
            copy(&self.path(f), &snap.join(f));
        }
    }

    pub fn restore(&mut self) {
        let snap = self.path("snap");
        for f in self.persistent() {
            let p = self.path(f);
            if p.is_dir() {
                fs::remove_dir_all(&p).unwrap();
            } else if p.exists() {
                fs::remove_file(&p).unwrap();
            }
            copy(&snap.join(f), &p);
        }
    }

    /// The slot the bootloader (or symlink) will run next, read directly
    /// from the firmware state rather than through the agent.
    pub fn firmware_next(&self) -> String {
        match self.backend {
            Backend::Uboot => {
                let o = Command::new("fw_printenv")
                    .arg("-c")
                    .arg(self.path("fw_env.config"))
                    .args(["-n", "perch_slot"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).trim().to_string()
            }
            Backend::Dir => fs::read_link(self.path("root/current")).unwrap().display().to_string(),
            _ => self.next_boot(),
        }
    }

    /// What the bootloader (or symlink) will run next.
    pub fn next_boot(&self) -> String {
        self.status()["next_boot_slot"].as_str().unwrap_or("").to_string()
    }

    /// Contents of a block slot, first `len` bytes.
    pub fn slot_bytes(&self, slot: &str, len: usize) -> Vec<u8> {
        let mut b = fs::read(self.path(&format!("{slot}.img"))).unwrap();
        b.truncate(len);
        b
    }
}

/// Copies a file or a tree (symlinks as symlinks).
fn copy(from: &Path, to: &Path) {
    if !from.exists() && fs::symlink_metadata(from).is_err() {
        return;
    }
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// The image slot a starts with.
pub fn old_image() -> Vec<u8> {
    let mut v = new_image(200, SLOT_SIZE);
    v.truncate(SLOT_SIZE);
    v
}

/// A reproducible image of `len` bytes.
pub fn new_image(seed: u8, len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678 ^ (u32::from(seed) * 0x0101_0101);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// `len` bytes of one `block`-byte noise block, repeated: incompressible
/// chunk by chunk, but each repeat is cheap for a chunk linked to the
/// bytes before it (`--compress-window`).
pub fn repeating_image(seed: u8, len: usize, block: usize) -> Vec<u8> {
    new_image(seed, block).into_iter().cycle().take(len).collect()
}

/// SHA-256 of a directory tree's files (sorted paths and contents), via sha256sum.
pub fn tree_digest(root: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum")
        .current_dir(root)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the shipped U-Boot boot script decides on one boot, given the
/// variables it reads (`None`: unset). U-Boot's `setexpr` and `itest` read
/// numbers as hex, and so does this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UbootDecision {
    pub slot: String,
    pub upgrade_available: String,
    pub bootcount: String,
    pub bootlimit: String,
    /// The script ran `saveenv` (only while `upgrade_available` is 1).
    pub saved: bool,
}

/// The model of `targets/*-drone/boot.cmd`; `tests/uboot.rs` checks it
/// against real U-Boot for every state the agent can leave.
pub fn uboot_model(
    slot: Option<&str>,
    upgrade: Option<&str>,
    count: Option<&str>,
    limit: Option<&str>,
) -> UbootDecision {
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or(0);
    let mut d = UbootDecision {
        slot: slot.unwrap_or("a").to_string(),
        upgrade_available: upgrade.unwrap_or_default().to_string(),
        bootcount: count.unwrap_or_default().to_string(),
        bootlimit: limit.unwrap_or("3").to_string(),
        saved: false,
    };
    if upgrade == Some("1") {
        let n = hex(count.unwrap_or("0")) + 1;
        d.bootcount = format!("{n:x}");
        if n > hex(&d.bootlimit) {
            d.slot = if d.slot == "a" { "b" } else { "a" }.into();
            d.upgrade_available = "0".into();
            d.bootcount = "0".into();
        }
        d.saved = true;
    }
    d
}

/// The shipped boot script of a drone class (`targets/<class>/boot.cmd`).
pub fn boot_cmd(arch: crate::uboot::Arch) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets").join(arch.target()).join("boot.cmd")
}

/// Appends one raw tar entry, byte for byte, for hostile archives.
pub use perch_protocol::bundle::raw_entry as raw_tar_entry;
