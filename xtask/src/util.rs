use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Prints a section heading.
pub fn step(title: &str) {
    // The time since xtask started, so a slow CI shows where it went.
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let at = START.get_or_init(std::time::Instant::now).elapsed().as_secs();
    // And the disk left, so a run that fills it shows what filled it.
    let free = disk_free_gib().map(|g| format!(" {g:.1} GiB free")).unwrap_or_default();
    println!("\n==> [{}:{:02}{free}] {title}", at / 60, at % 60);
}

/// Free space on the filesystem holding the workspace, from `df`.
fn disk_free_gib() -> Option<f64> {
    let out = Command::new("df").args(["-Pk"]).arg(root()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: f64 = text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// Runs a command, echoing it, and fails if it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    println!("$ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("starting {}", show(cmd)))
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The `cargo` that is running us.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// An empty `target/<name>`, for a benchmark's files.
pub fn fresh_dir(name: &str) -> Result<PathBuf> {
    let dir = root().join("target").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs `program args` in `dir`; returns its stdout, or fails with its stderr.
pub fn run_in(dir: &Path, program: &Path, args: &[&str]) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args).current_dir(dir);
    let out = output(&mut c)?;
    if !out.status.success() {
        bail!("{}: {}", show(&c), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Set by `bench smoke`: the benches build in the dev profile, which the
/// tests built already, not in release. The smoke checks that every bench
/// finishes, not its numbers, and the release builds (of perch and of the
/// load generators) cost CI about 8 minutes.
static SMOKE_BUILDS: AtomicBool = AtomicBool::new(false);

/// From now on, benches use debug builds (see `SMOKE_BUILDS`).
pub fn use_smoke_builds() {
    SMOKE_BUILDS.store(true, Ordering::Relaxed);
}

fn smoke_builds() -> bool {
    SMOKE_BUILDS.load(Ordering::Relaxed)
}

/// `bench NAME`: builds `packages` in release; where their binaries are.
pub fn release_bins(name: &str, packages: &[&str]) -> Result<PathBuf> {
    if smoke_builds() {
        step(&format!("bench {name}: the debug binaries (a smoke run: its numbers measure nothing)"));
        return smoke_bins();
    }
    step(&format!("bench {name}: building release binaries"));
    let mut build = cargo();
    build.args(["build", "--release", "--locked"]);
    for p in packages {
        build.args(["-p", p]);
    }
    sh(&mut build)?;
    Ok(root().join("target/release"))
}

/// Every binary of the workspace in the dev profile, built as the tests
/// build them (`--workspace`, so with the same features: a build of a few
/// packages would rebuild their dependencies).
fn smoke_bins() -> Result<PathBuf> {
    sh(cargo().args(["build", "--locked", "--workspace", "--bins"]))?;
    Ok(root().join("target/debug"))
}

/// `--flag value` pairs; `usage` when one has no value.
/// Builds the load generators `bins` of perch-tests in the `bench-tool`
/// profile (optimised, quick to link); the directory they are in.
/// (Debug builds in a smoke run, see `SMOKE_BUILDS`.)
pub fn bench_tools(bins: &[&str]) -> Result<PathBuf> {
    if smoke_builds() {
        return smoke_bins();
    }
    let mut c = cargo();
    c.args(["build", "--profile", "bench-tool", "--locked", "-p", "perch-tests"]);
    for b in bins {
        c.args(["--bin", b]);
    }
    sh(&mut c)?;
    Ok(root().join("target/bench-tool"))
}

pub fn flag_pairs<'a>(args: &'a [String], usage: &str) -> Result<Vec<(&'a str, &'a str)>> {
    args.chunks(2)
        .map(|p| match p {
            [flag, value] => Ok((flag.as_str(), value.as_str())),
            _ => bail!("{usage}"),
        })
        .collect()
}

/// Builds the host tools that set up test fixtures (`perch`,
/// `perch-bootstrap`, debug profile) into `target/debug`.
pub fn build_host_tools() -> Result<()> {
    sh(cargo().args(["build", "-q", "--bins", "-p", "perch-fleet", "-p", "perch-bootstrap"]))
}

/// The benches' install target in `dir`: `agent.toml` for a U-Boot device
/// whose slots are the files `a.img` and `b.img` there, trusting
/// `org/trust.doc`, running slot a.
pub fn bench_uboot_device(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("cmdline"), "perch.slot=a\n")?;
    std::fs::write(dir.join("boot_id"), "bench\n")?;
    let p = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "target = \"bench\"\ntrust = \"{}\"\nboot_id = \"{}\"\n[slots]\nbackend = \"uboot\"\ndevices = {{ a = \"{}\", b = \"{}\" }}\nfw_env_config = \"{}\"\ncmdline = \"{}\"\n",
            p("org/trust.doc"), p("boot_id"), p("a.img"), p("b.img"), p("fw_env.config"), p("cmdline")
        ),
    )?;
    Ok(())
}

/// Puts the bench device back before an install: no state, a fresh U-Boot
/// environment booting slot a.
pub fn reset_bench_uboot_device(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir.join("state"));
    fresh_uboot_env(dir, "perch_slot=a\nbootlimit=3\n")
}

/// A fresh file-backed U-Boot environment in `dir` (`env`, described by
/// `fw_env.config`), set by the real `fw_setenv` from `defenv` with
/// `perch_slot=a`.
pub fn fresh_uboot_env(dir: &Path, defenv: &str) -> Result<()> {
    std::fs::write(dir.join("env"), vec![0u8; 0x4000])?;
    std::fs::write(dir.join("fw_env.config"), format!("{} 0x0000 0x4000\n", dir.join("env").display()))?;
    std::fs::write(dir.join("defenv"), defenv)?;
    let st = Command::new("fw_setenv")
        .arg("-c")
        .arg(dir.join("fw_env.config"))
        .arg("-f")
        .arg(dir.join("defenv"))
        .args(["perch_slot", "a"])
        .output()?;
    if !st.status.success() {
        bail!("fw_setenv: {}", String::from_utf8_lossy(&st.stderr));
    }
    Ok(())
}

/// The nats-server the demo and the benchmarks start: `$PERCH_NATS_SERVER`
/// (as in the tests), else Debian's `nats-server`.
pub fn nats_server() -> std::ffi::OsString {
    std::env::var_os("PERCH_NATS_SERVER").filter(|v| !v.is_empty()).unwrap_or_else(|| "nats-server".into())
}

/// What `server --version` prints, for the log.
pub fn nats_server_version(server: &std::ffi::OsStr) -> String {
    match output(Command::new(server).arg("--version")) {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(e) => format!("{server:?} ({e})"),
    }
}

/// Asks `done` every `every` until it says yes; fails naming `what` if it
/// has not within `limit`.
pub fn wait_every(
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        std::thread::sleep(every);
    }
    Ok(())
}
