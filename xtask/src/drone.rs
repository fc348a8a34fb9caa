//! A drone on this machine, for the demo: the real ARM agent under
//! qemu-user, with U-Boot slots in two image files and a file-backed U-Boot
//! environment edited by the real `fw_setenv` / `fw_printenv`.
//!
//! When the agent asks for a reboot (its `reboot` command leaves a mark),
//! the supervisor stops the agent and boots the drone's board: real U-Boot
//! on qemu's virt board of the drone's architecture runs the shipped
//! `targets/<class>/boot.cmd` on the drone's environment file (counting the
//! boot while `upgrade_available` is 1, falling back past `bootlimit`). The
//! kernel command line it sets (`perch.slot=`) and a new boot id are what the
//! agent finds when it starts again. See the `perch-uboot-vm` crate.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Result};
use perch_uboot_vm::{Arch, Board, BOARD_ENV};

use crate::cross::Target;

/// Slot image size.
pub const SLOT: usize = 4 << 20;
/// What the health check looks for in the booted slot's image.
pub const HEALTHY: &[u8] = b"PERCH-HEALTHY";

pub struct Drone {
    pub name: String,
    pub dir: PathBuf,
    target: &'static Target,
    bin: PathBuf,
    board: Board,
    pub boots: u32,
}

impl Drone {
    /// Lays out the drone in `dir`: slot images (a holds a healthy factory
    /// image), the environment, the command line, agent.toml (with `extra`).
    pub fn new(
        name: &str,
        dir: &Path,
        target: &'static Target,
        bin: &Path,
        trust: &Path,
        extra: &str,
    ) -> Result<Drone> {
        fs::create_dir_all(dir)?;
        let mut factory = vec![0u8; SLOT];
        factory[..HEALTHY.len()].copy_from_slice(HEALTHY);
        fs::write(dir.join("a.img"), &factory)?;
        fs::write(dir.join("b.img"), vec![0u8; SLOT])?;
        // perch's defaults and the board's own variables.
        let board_env: String = BOARD_ENV.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        crate::util::fresh_uboot_env(dir, &format!("perch_slot=a\nbootlimit=2\n{board_env}"))?;
        let arch = match target.arch {
            "arm64" => Arch::Aarch64,
            "armhf" => Arch::Armv7,
            other => return Err(anyhow!("{name}: no U-Boot board for {other}")),
        };
        let boot_cmd = crate::util::root().join("targets").join(target.class).join("boot.cmd");
        let board = Board::new(arch, &boot_cmd, dir)?;
        fs::write(dir.join("cmdline"), "console=ttyAMA0 perch.slot=a quiet\n")?;
        fs::write(dir.join("boot_id"), "boot-0\n")?;
        // The health check: the booted slot's image must carry the mark.
        fs::write(
            dir.join("health.sh"),
            format!(
                "slot=$(sed -n 's/.*perch\\.slot=\\([ab]\\).*/\\1/p' {d}/cmdline)\nhead -c {n} {d}/$slot.img | grep -q {mark}\n",
                d = dir.display(),
                n = HEALTHY.len(),
                mark = String::from_utf8_lossy(HEALTHY)
            ),
        )?;
        let p = |r: &str| dir.join(r).display().to_string();
        fs::write(
            dir.join("agent.toml"),
            format!(
                "target = \"{class}\"\ntrust = \"{trust}\"\nboot_id = \"{boot_id}\"\n[device]\nid = \"{name}\"\n[slots]\nbackend = \"uboot\"\ndevices = {{ a = \"{a}\", b = \"{b}\" }}\nfw_env_config = \"{env}\"\ncmdline = \"{cmdline}\"\nbootlimit = 2\nreboot = \"touch {mark}\"\n[health]\ncommands = [\"sh {health}\"]\ntrial = \"3s\"\ninterval = \"300ms\"\n{extra}",
                class = target.class,
                trust = trust.display(),
                boot_id = p("boot_id"),
                a = p("a.img"),
                b = p("b.img"),
                env = p("fw_env.config"),
                cmdline = p("cmdline"),
                mark = p("reboot-requested"),
                health = p("health.sh"),
            ),
        )?;
        Ok(Drone { name: name.into(), dir: dir.into(), target, bin: bin.into(), board, boots: 0 })
    }

    /// `perch-agent --config .. --state-dir .. ARGS` under qemu-user.
    pub fn agent(&self, args: &[&str]) -> Command {
        agent_command(self.target, &self.bin, &self.dir, args)
    }

    /// Starts `perch-agent run`, logging to `<dir>.log`.
    pub fn start(&self) -> Result<Child> {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("log"))?;
        Ok(self.agent(&["run"]).stdout(Stdio::null()).stderr(log).spawn()?)
    }

    /// A reboot: U-Boot boots the drone. Returns the slot it booted and
    /// what the boot script said.
    pub fn boot(&mut self) -> Result<(String, Vec<String>)> {
        self.boots += 1;
        let boot = self.board.boot(&self.dir.join("env"))?;
        let slot =
            boot.slot().ok_or_else(|| anyhow!("{}: U-Boot set no perch.slot=", self.name))?.to_string();
        fs::write(self.dir.join("cmdline"), format!("{}\n", boot.bootargs))?;
        fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots))?;
        let said = boot.console.lines().filter(|l| l.starts_with("perch: ")).map(str::to_string).collect();
        Ok((slot, said))
    }
}

fn agent_command(target: &Target, bin: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut c = crate::cross::qemu(target, bin);
    c.arg("--config").arg(dir.join("agent.toml")).arg("--state-dir").arg(dir.join("state"));
    c.args(args).env("PERCH_LOG", "info");
    c
}

/// A drone's agent running, rebooted whenever it asks; stopped on drop.
pub struct Supervised {
    target: &'static Target,
    bin: PathBuf,
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervised {
    /// `perch-agent ARGS` on the drone, next to the running agent (as
    /// [`Drone::agent`]).
    pub fn agent(&self, args: &[&str]) -> Command {
        agent_command(self.target, &self.bin, &self.dir, args)
    }

    pub fn start(mut drone: Drone) -> Result<Supervised> {
        let (target, bin, dir) = (drone.target, drone.bin.clone(), drone.dir.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let mut child = drone.start()?;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mark = drone.dir.join("reboot-requested");
            while !flag.load(Ordering::Relaxed) {
                if mark.exists() {
                    let _ = fs::remove_file(&mark);
                    let _ = child.kill();
                    let _ = child.wait();
                    match drone.boot() {
                        Ok((slot, said)) => {
                            for line in said {
                                println!("    [{} U-Boot: {line}]", drone.name);
                            }
                            println!("    [{} reboots into slot {slot}]", drone.name);
                        }
                        Err(e) => eprintln!("    [{}: {e}]", drone.name),
                    }
                    match drone.start() {
                        Ok(c) => child = c,
                        Err(e) => {
                            eprintln!("    [{}: agent did not start: {e}]", drone.name);
                            return;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        });
        Ok(Supervised { target, bin, dir, stop, thread: Some(thread) })
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
