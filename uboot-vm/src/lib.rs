//! Real U-Boot running perch's shipped boot scripts: Debian's `u-boot-qemu`
//! builds for qemu's `virt` board, under `qemu-system-aarch64` and
//! `qemu-system-arm`.
//!
//! The board has a virtio disk laid out like a drone's (GPT, `rootfs-a` as
//! partition 2 and `rootfs-b` as partition 3, each ext4 with its own
//! `/boot` kernel), and its environment is the device's libubootenv file:
//! U-Boot imports it with its CRC checked, runs `boot.scr`, and when the
//! script saved the environment, the file is replaced by what U-Boot exports
//! (with its own CRC), as `saveenv` would have stored it. qemu's emulated
//! NOR flash cannot take U-Boot's buffered writes, so the env takes that
//! way round; everything the script decides is U-Boot's own.
//!
//! Each board also runs many scenarios in one session
//! ([`Board::run_scenarios`]), so the tests can compare every state the
//! agent can leave with the quick bootloader model the crash tests use.
//!
//! Needs Debian's `u-boot-qemu`, `qemu-system-arm`, `u-boot-tools`
//! (mkimage), `fdisk` (sfdisk) and `e2fsprogs`; `cargo xtask setup`
//! installs them.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Size of the env the devices use (`fw_env.config`: `ENV 0x0000 0x4000`).
pub const ENV_SIZE: usize = 0x4000;
const ENV_ADDR: &str = "0x41000000";
const EXPORT_ADDR: &str = "0x42000000";
const SCRIPT_ADDR: &str = "0x40200000";
const KERNEL_ADDR: &str = "0x40400000";

/// The variables a board's own environment provides (not perch's): where
/// the kernel and FDT load, and from which device.
pub const BOARD_ENV: &[(&str, &str)] =
    &[("devtype", "virtio"), ("devnum", "0"), ("fdt_addr_r", "0x44000000"), ("fdtfile", "perch-test.dtb")];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Aarch64,
    Armv7,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Aarch64, Arch::Armv7];

    fn qemu(self) -> &'static str {
        match self {
            Arch::Aarch64 => "qemu-system-aarch64",
            Arch::Armv7 => "qemu-system-arm",
        }
    }

    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Arch::Aarch64 => &["-M", "virt", "-cpu", "cortex-a57"],
            Arch::Armv7 => &["-M", "virt"],
        }
    }

    fn firmware(self) -> &'static str {
        match self {
            Arch::Aarch64 => "/usr/lib/u-boot/qemu_arm64/u-boot.bin",
            Arch::Armv7 => "/usr/lib/u-boot/qemu_arm/u-boot.bin",
        }
    }

    /// The drone class (`targets/<class>/`).
    pub fn target(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64-drone",
            Arch::Armv7 => "armv7-drone",
        }
    }

    fn mkimage_arch(self) -> &'static str {
        match self {
            Arch::Aarch64 => "arm64",
            Arch::Armv7 => "arm",
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            Arch::Aarch64 => "Image",
            Arch::Armv7 => "zImage",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("{tool}: {detail}")]
    Tool { tool: String, detail: String },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("U-Boot did not finish: {why}\n{console}")]
    Session { why: String, console: String },
    #[error("U-Boot {what}:\n{console}")]
    Boot { what: String, console: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BoardError + '_ {
    move |err| BoardError::Io { path: path.to_path_buf(), err }
}

/// What one boot did.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The kernel command line the script set.
    pub bootargs: String,
    /// The slot whose kernel was loaded (`a` or `b`), read back from memory.
    pub kernel: Option<char>,
    /// Whether the script saved the environment.
    pub saved: bool,
    pub console: String,
}

impl Boot {
    /// The slot the command line names (`perch.slot=`).
    pub fn slot(&self) -> Option<&str> {
        self.bootargs.split_whitespace().find_map(|w| w.strip_prefix("perch.slot="))
    }
}

/// A qemu `virt` board with U-Boot, perch's boot script and an A/B disk.
pub struct Board {
    pub arch: Arch,
    script: PathBuf,
    disk: PathBuf,
}

/// Runs a tool to completion, feeding it `input`.
fn run(cmd: &mut Command, input: &[u8]) -> Result<(), BoardError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let fail = |detail: String| BoardError::Tool { tool: tool.clone(), detail };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("{e} (cargo xtask setup installs it)")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

impl Board {
    /// Builds `boot.scr` from `boot_cmd` (a target's `boot.cmd`) and the A/B
    /// disk, in `dir`.
    pub fn new(arch: Arch, boot_cmd: &Path, dir: &Path) -> Result<Board, BoardError> {
        let dir = dir.join(format!("uboot-{}", arch.target()));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let script = dir.join("boot.scr");
        run(
            Command::new("mkimage")
                .args(["-A", arch.mkimage_arch(), "-T", "script", "-C", "none", "-n", "perch A/B boot", "-d"])
                .arg(boot_cmd)
                .arg(&script),
            b"",
        )?;
        let disk = dir.join("disk.img");
        fs::write(&disk, vec![0u8; 8 << 20]).map_err(io(&disk))?;
        let table = "label: gpt\nstart=2048, size=2048, name=boot\n\
                     start=4096, size=4096, name=rootfs-a\nstart=8192, size=4096, name=rootfs-b\n";
        run(Command::new("/usr/sbin/sfdisk").arg("-q").arg(&disk), table.as_bytes())?;
        for (slot, start) in [('a', 4096u64), ('b', 8192)] {
            let root = dir.join(format!("rootfs-{slot}"));
            let dtbs = root.join("boot/dtbs");
            fs::create_dir_all(&dtbs).map_err(io(&dtbs))?;
            let kernel = root.join("boot").join(arch.kernel());
            fs::write(&kernel, format!("perch kernel {slot}\n")).map_err(io(&kernel))?;
            let fdt = dtbs.join("perch-test.dtb");
            fs::write(&fdt, format!("fdt {slot}\n")).map_err(io(&fdt))?;
            run(
                Command::new("/usr/sbin/mkfs.ext4")
                    .args(["-q", "-F", "-E", &format!("offset={}", start * 512), "-d"])
                    .arg(&root)
                    .arg(&disk)
                    .arg("2048"),
                b"",
            )?;
        }
        Ok(Board { arch, script, disk })
    }

    /// Boots once from the libubootenv file `env`; see the module docs.
    pub fn boot(&self, env: &Path) -> Result<Boot, BoardError> {
        // Imported over U-Boot's defaults (no -d): a real board's saved
        // environment was made from its defaults by saveenv, and the
        // device's file holds only what fw_setenv wrote.
        let commands = [
            format!("env import -c {ENV_ADDR} {ENV_SIZE:#x} && echo PERCH-IMPORTED"),
            "virtio scan".into(),
            format!("source {SCRIPT_ADDR}"),
            "echo PERCH-BOOTARGS ${bootargs}".into(),
            format!("md.b {KERNEL_ADDR} 0x10"),
            // What the script sets after its saveenv is not stored.
            "setenv bootargs; setenv perch_part".into(),
            format!("env export -c -s {ENV_SIZE:#x} {EXPORT_ADDR}"),
            "echo PERCH-EXPORT".into(),
            format!("md.b {EXPORT_ADDR} {ENV_SIZE:#x}"),
        ];
        let console = self.session(Some(env), &commands)?;
        let refused = |what: &str| BoardError::Boot { what: what.into(), console: console.clone() };
        if !console.contains("\nPERCH-IMPORTED") {
            return Err(refused("refused the env file"));
        }
        let (before, after) =
            console.split_once("\nPERCH-EXPORT").ok_or_else(|| refused("did not export"))?;
        let saved = before.contains("Saving Environment to");
        let bootargs = line_after(before, "PERCH-BOOTARGS").unwrap_or_default();
        let kernel = kernel_loaded(before);
        if saved {
            let bytes = hex_dump(after.split("PERCH-DONE").next().unwrap_or_default());
            if bytes.len() != ENV_SIZE {
                return Err(refused(&format!("exported {} bytes of env, not {ENV_SIZE}", bytes.len())));
            }
            fs::write(env, bytes).map_err(io(env))?;
        }
        Ok(Boot { bootargs, kernel, saved, console })
    }

    /// Runs the script once per scenario in one U-Boot session, each from
    /// U-Boot's defaults, the board's variables and `vars`. Returns, per
    /// scenario, the variables named in `report` after the script (`None`
    /// when unset), its command line and the slot whose kernel it loaded.
    pub fn run_scenarios(
        &self,
        scenarios: &[Vec<(&str, &str)>],
        report: &[&str],
    ) -> Result<Vec<Scenario>, BoardError> {
        let mut commands = vec!["virtio scan".to_string()];
        for (i, vars) in scenarios.iter().enumerate() {
            commands.push("env default -a -f".into());
            commands.push(format!("mw.b {KERNEL_ADDR} 0 0x10"));
            for (k, v) in BOARD_ENV.iter().chain(vars.iter()) {
                commands.push(format!("setenv {k} {v}"));
            }
            commands.push(format!("source {SCRIPT_ADDR}"));
            commands.push(format!("echo PERCH-SCENARIO {i}"));
            commands.push("echo PERCH-BOOTARGS ${bootargs}".into());
            commands.push(format!("md.b {KERNEL_ADDR} 0x10"));
            for r in report {
                commands.push(format!("echo PERCH-VAR {r}=${{{r}}}"));
            }
        }
        let console = self.session(None, &commands)?;
        let mut out = Vec::new();
        for (i, part) in console.split("\nPERCH-SCENARIO ").skip(1).enumerate() {
            if part.split_whitespace().next() != Some(i.to_string().as_str()) {
                return Err(BoardError::Boot { what: format!("lost scenario {i}"), console: part.into() });
            }
            let vars = part
                .lines()
                .filter_map(|l| l.trim().strip_prefix("PERCH-VAR "))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), Some(v.trim().to_string()).filter(|v| !v.is_empty())))
                .collect();
            out.push(Scenario {
                vars,
                bootargs: line_after(part, "PERCH-BOOTARGS").unwrap_or_default(),
                kernel: kernel_loaded(part),
            });
        }
        if out.len() != scenarios.len() {
            let what = format!("ran {} of {} scenarios", out.len(), scenarios.len());
            return Err(BoardError::Boot { what, console });
        }
        Ok(out)
    }

    /// Starts U-Boot, stops its autoboot, types `commands` (one per line:
    /// U-Boot's line buffer is short) and returns what U-Boot printed, its
    /// echo of the typed lines left out.
    fn session(&self, env: Option<&Path>, commands: &[String]) -> Result<String, BoardError> {
        let mut cmd = Command::new(self.arch.qemu());
        cmd.args(self.arch.qemu_args())
            .args(["-m", "256", "-nographic", "-nic", "none", "-bios", self.arch.firmware()])
            .arg("-device")
            .arg(format!("loader,file={},addr={SCRIPT_ADDR},force-raw=on", self.script.display()))
            .arg("-drive")
            .arg(format!("if=none,format=raw,id=disk,file={}", self.disk.display()))
            .args(["-device", "virtio-blk-device,drive=disk"]);
        if let Some(env) = env {
            cmd.arg("-device").arg(format!("loader,file={},addr={ENV_ADDR},force-raw=on", env.display()));
        }
        let spawned = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
        let mut child = spawned.map_err(|e| BoardError::Tool {
            tool: self.arch.qemu().into(),
            detail: format!("{e} (Debian package qemu-system-arm)"),
        })?;
        let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            unreachable!("both are piped")
        };
        // The console so far, and how many prompts it holds.
        let console = Arc::new(Mutex::new((String::new(), 0usize)));
        let lock = || console.lock().unwrap_or_else(|e| e.into_inner());
        let sink = console.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut c = sink.lock().unwrap_or_else(|e| e.into_inner());
                // A prompt may straddle two reads: look back two bytes.
                let from = c.0.len().saturating_sub(2);
                let before = c.0.get(from..).map_or(0, |t| t.matches("=> ").count());
                c.0.push_str(&String::from_utf8_lossy(&buf[..n]));
                let after = c.0.get(from..).map_or(0, |t| t.matches("=> ").count());
                c.1 += after - before;
            }
        });
        let seen = |what: &str, timeout: Duration| {
            let t = Instant::now();
            while t.elapsed() < timeout {
                if lock().0.contains(what) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        };
        let prompts = || lock().1;
        let mut typed = seen("Hit any key to stop autoboot", Duration::from_secs(60))
            && stdin.write_all(b"\n").is_ok()
            && seen("=> ", Duration::from_secs(30));
        // A line at a time, each once U-Boot is back at its prompt: what is
        // typed while it is busy can be lost.
        for line in lines(commands.iter().map(String::as_str).chain(["echo PERCH-DONE"])) {
            let before = prompts();
            typed = typed && stdin.write_all(format!("{line}\n").as_bytes()).is_ok();
            let t = Instant::now();
            while typed && prompts() == before {
                typed = t.elapsed() < Duration::from_secs(120);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let done =
            typed && stdin.write_all(b"poweroff\n").is_ok() && seen("\nPERCH-DONE", Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        let console = lock().0.replace('\r', "");
        if !done {
            return Err(BoardError::Session { why: "no prompt or no end marker in time".into(), console });
        }
        Ok(console.lines().filter(|l| !l.trim_start().starts_with("=>")).map(|l| format!("{l}\n")).collect())
    }
}

/// One scenario's outcome from [`Board::run_scenarios`].
#[derive(Debug, Clone)]
pub struct Scenario {
    pub vars: BTreeMap<String, Option<String>>,
    pub bootargs: String,
    pub kernel: Option<char>,
}

impl Scenario {
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).and_then(|v| v.as_deref())
    }

    pub fn slot(&self) -> Option<&str> {
        self.bootargs.split_whitespace().find_map(|w| w.strip_prefix("perch.slot="))
    }
}

/// Commands joined into lines U-Boot's line buffer takes (256 bytes).
fn lines<'a>(commands: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for c in commands {
        match out.last_mut() {
            Some(l) if l.len() + c.len() + 2 <= 200 => {
                l.push_str("; ");
                l.push_str(c);
            }
            _ => out.push(c.to_string()),
        }
    }
    out
}

fn line_after(text: &str, marker: &str) -> Option<String> {
    text.lines().find_map(|l| l.trim().strip_prefix(marker).map(|r| r.trim().to_string()))
}

/// The slot named in the first `md.b` dump of the kernel address.
fn kernel_loaded(text: &str) -> Option<char> {
    let prefix = format!("{}:", KERNEL_ADDR.trim_start_matches("0x"));
    let line = text.lines().find(|l| l.trim_start().starts_with(&prefix))?;
    let bytes = hex_dump(line);
    let s = String::from_utf8_lossy(&bytes);
    s.strip_prefix("perch kernel ").and_then(|r| r.chars().next())
}

/// The bytes of `md.b` lines (`addr: xx xx ...  text`).
fn hex_dump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((addr, rest)) = line.trim().split_once(": ") else { continue };
        if addr.len() != 8 || !addr.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        for tok in rest.split(' ').take_while(|t| t.len() == 2) {
            match u8::from_str_radix(tok, 16) {
                Ok(b) => out.push(b),
                Err(_) => break,
            }
        }
    }
    out
}
