//! `cargo xtask bench delta`: what a release costs over the radio, on
//! real payloads built here, not random bytes:
//!
//! - an ext4 root image made with `mkfs.ext4 -d` from a copy of real files
//!   (`/usr/share`, `/usr/lib`), reproducibly (fixed UUID, hash seed and
//!   time), and release N+1 with one 1-MiB file changed;
//! - an archive of a tree of real files, and release N+1 with a file
//!   inserted in the middle of the tree.
//!
//! It prints, each in the same run on the same machine:
//! - the compressed bundle's size ÷ `zstd -19` of the same image;
//! - the bytes a device running N fetches for N+1 (`perch bundle diff`),
//!   image and archive, ÷ the payload;
//! - `perch-agent install` of the compressed image bundle ÷ `dd
//!   conv=fsync` of the uncompressed image, natively, and for the static
//!   aarch64 agent under qemu-user when it was built (`cargo xtask cross`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{flag_pairs, run_in, step};

const USAGE: &str = "usage: cargo xtask bench delta [--image-mib N] (N >= 16) | --install-only";
/// The changed file: 1 MiB, as the measure says.
const CHANGED: usize = 1 << 20;
const RUNS: usize = 3;

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--install-only") {
        return install_only(args);
    }
    let mut image_mib = 256usize;
    for (flag, value) in flag_pairs(args, USAGE)? {
        match flag {
            "--image-mib" => image_mib = value.parse().context("--image-mib takes a number")?,
            _ => bail!("{USAGE}"),
        }
    }
    if image_mib < 16 {
        bail!("{USAGE}");
    }
    for tool in ["mkfs.ext4", "zstd", "dd"] {
        if !crate::util::have(tool) {
            bail!("bench delta needs `{tool}` (cargo xtask setup installs it)");
        }
    }
    let bin = crate::util::release_bins("delta", &["perch-fleet", "perch-bootstrap", "perch-agent"])?;
    let dir = crate::util::fresh_dir("bench-delta")?;
    let perch = bin.join("perch");
    let quiet = |program: &Path, args: &[&str]| run_in(&dir, program, args).map(drop);
    quiet(&perch, &["keygen", "--out", "k1"])?;
    quiet(
        &bin.join("perch-bootstrap"),
        &["init", "--dir", "org", "--threshold", "1", "--release-key", "k1.pub"],
    )?;

    // ---------------------------------------------------------------- image
    step(&format!(
        "bench delta: a {image_mib} MiB ext4 image of real files, and N+1 with one 1-MiB file changed"
    ));
    let tree = dir.join("tree");
    // 55 %: the rest is inode tables (one per 4 KiB), the journal and slack.
    let copied = copy_real_files(&tree, (image_mib << 20) * 55 / 100)?;
    println!("copied {} MiB (in 4-KiB blocks) of files from /usr/share and /usr/lib", copied >> 20);
    fs::create_dir_all(tree.join("opt/app"))?;
    fs::write(tree.join("opt/app/data.bin"), noise(1, CHANGED))?;
    mkfs(&tree, &dir.join("n.ext4"), image_mib)?;
    fs::write(tree.join("opt/app/data.bin"), noise(2, CHANGED))?;
    mkfs(&tree, &dir.join("n1.ext4"), image_mib)?;
    let image_len = (image_mib << 20) as u64;
    for (input, out, counter) in [("n.ext4", "n.perch", "1"), ("n1.ext4", "n1.perch", "2")] {
        build(
            &dir,
            &perch,
            &["--kind", "image", "--input", input, "--out", out, "--counter", counter, "--compress", "zstd"],
        )?;
    }
    quiet(&perch, &["bundle", "sign", "--key", "k1.key", "n.perch"])?;
    // One chunk of the image: what an install costs beyond its payload.
    fs::write(dir.join("one.img"), &fs::read(dir.join("n.ext4"))?[..256 << 10])?;
    build(
        &dir,
        &perch,
        &[
            "--kind",
            "image",
            "--input",
            "one.img",
            "--out",
            "one.perch",
            "--counter",
            "1",
            "--compress",
            "zstd",
        ],
    )?;
    quiet(&perch, &["bundle", "sign", "--key", "k1.key", "one.perch"])?;
    let zstd19 = zstd_size(&dir, "n.ext4")?;
    let bundle = fs::metadata(dir.join("n.perch"))?.len();
    let image_diff = diff(&dir, &perch, "n.perch", "n1.perch")?;

    // -------------------------------------------------------------- archive
    step("bench delta: an archive of real files, and N+1 with a file inserted in the middle");
    let middle = middle_dir(&tree)?;
    let mut fetched_share = vec![];
    for chunking in ["cdc", "fixed"] {
        let _ = fs::remove_file(middle.join("zz-inserted.bin"));
        build(
            &dir,
            &perch,
            &[
                "--kind",
                "archive",
                "--input",
                "tree",
                "--out",
                "a.perch",
                "--counter",
                "1",
                "--chunking",
                chunking,
            ],
        )?;
        fs::write(middle.join("zz-inserted.bin"), noise(3, 100 * 1024))?;
        build(
            &dir,
            &perch,
            &[
                "--kind",
                "archive",
                "--input",
                "tree",
                "--out",
                "a1.perch",
                "--counter",
                "2",
                "--chunking",
                chunking,
            ],
        )?;
        let d = diff(&dir, &perch, "a.perch", "a1.perch")?;
        fetched_share.push((chunking, d.fetched as f64 / d.full as f64, d.full));
    }

    // -------------------------------------------------------------- install
    let (native, emulated) = installs(&dir, &bin)?;

    println!();
    println!("{:<64} {:>10} {:>8}", "measure", "value", "goal");
    let line = |what: &str, value: f64, goal: &str| println!("{what:<64} {value:>10.3} {goal:>8}");
    println!(
        "image {image_mib} MiB: bundle {bundle} bytes, zstd -19 {zstd19} bytes; image delta fetches {} bytes",
        image_diff.fetched
    );
    line("compressed bundle ÷ zstd -19 of the image", bundle as f64 / zstd19 as f64, "<= 1.05");
    line(
        "image N+1, one 1-MiB file changed: fetched ÷ image",
        image_diff.fetched as f64 / image_len as f64,
        "<= 0.05",
    );
    for (chunking, share, full) in &fetched_share {
        line(
            &format!("archive ({full} bytes) + inserted file, {chunking}: fetched ÷ bundle"),
            *share,
            if *chunking == "cdc" { "<= 0.10" } else { "" },
        );
    }
    install_lines(&native, emulated.as_ref());
    if std::env::var_os("PERCH_BENCH_KEEP").is_none() {
        fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// `--install-only`: times the installs again on the bundles a run with
/// `PERCH_BENCH_KEEP=1` kept (building them takes most of the bench), for
/// work on the installer. The bundle was built by the binaries of that run.
fn install_only(args: &[String]) -> Result<()> {
    if args.len() != 1 {
        bail!("{USAGE}");
    }
    let dir = crate::util::root().join("target/bench-delta");
    if !dir.join("n.perch").is_file() || !dir.join("n.ext4").is_file() {
        bail!("--install-only needs the bundles of a kept run: `PERCH_BENCH_KEEP=1 cargo xtask bench delta` first");
    }
    let bin = crate::util::release_bins("delta", &["perch-agent"])?;
    let (native, emulated) = installs(&dir, &bin)?;
    install_lines(&native, emulated.as_ref());
    Ok(())
}

/// The install of `n.perch` against `dd`, natively and, if `cargo xtask
/// cross` built it, for the aarch64 agent under qemu.
fn installs(dir: &Path, bin: &Path) -> Result<(Timed, Option<Timed>)> {
    step(&format!("bench delta: install of the compressed image bundle vs dd conv=fsync, best of {RUNS}"));
    let native = install_vs_dd(dir, &bin.join("perch-agent"), None)?;
    let aarch64 = crate::util::root().join("target/cross/aarch64-unknown-linux-gnu/release/perch-agent");
    let emulated = if aarch64.exists() && crate::util::have("qemu-aarch64-static") {
        Some(install_vs_dd(dir, &aarch64, Some("qemu-aarch64-static"))?)
    } else {
        println!("(no aarch64 agent: run `cargo xtask cross` first to measure it under qemu)");
        None
    };
    Ok((native, emulated))
}

fn install_lines(native: &Timed, emulated: Option<&Timed>) {
    let line = |what: &str, value: f64, goal: &str| println!("{what:<64} {value:>10.3} {goal:>8}");
    line("install compressed image ÷ dd conv=fsync (x86_64)", native.ratio(), ">= 0.90");
    if let Some(floor) = native.floor {
        line(
            "  ceiling here: dd ÷ ((zstd -d + sha256 + dd) CPU ÷ cores + fixed)",
            native.dd.as_secs_f64() / floor.as_secs_f64(),
            "",
        );
    }
    if let Some(e) = emulated {
        line("install compressed image ÷ dd conv=fsync (aarch64 under qemu)", e.ratio(), "ratio");
    }
}

/// Copies regular files from `/usr/share` then `/usr/lib`, in name order,
/// into `to` until `budget` bytes: the same machine gives the same tree.
fn copy_real_files(to: &Path, budget: usize) -> Result<usize> {
    let mut copied = 0usize;
    for root in ["/usr/share", "/usr/lib"] {
        walk(Path::new(root), &mut |path| {
            let Ok(meta) = fs::symlink_metadata(path) else { return Ok(true) };
            if !meta.is_file() || meta.len() > 8 << 20 {
                return Ok(true);
            }
            let Ok(data) = fs::read(path) else { return Ok(true) };
            let rel = path.strip_prefix("/").unwrap_or(path);
            let dest = to.join(rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&dest, &data)?;
            // What it takes in the image: whole 4 KiB blocks.
            copied += data.len().div_ceil(4096) * 4096;
            Ok(copied < budget)
        })?;
        if copied >= budget {
            break;
        }
    }
    Ok(copied)
}

/// Visits files under `dir` in name order while `f` says to go on.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path) -> Result<bool>) -> Result<bool> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(true) };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let go_on = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => walk(&p, f)?,
            _ => f(&p)?,
        };
        if !go_on {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A directory halfway through the tree's sorted directories.
fn middle_dir(tree: &Path) -> Result<PathBuf> {
    let mut dirs = vec![];
    walk(tree, &mut |p| {
        if let Some(parent) = p.parent() {
            if dirs.last() != Some(&parent.to_path_buf()) {
                dirs.push(parent.to_path_buf());
            }
        }
        Ok(true)
    })?;
    dirs.get(dirs.len() / 2).cloned().context("the tree has no files")
}

/// `len` bytes of reproducible noise (incompressible, like a changed binary).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `mkfs.ext4 -d`, reproducibly: the same tree gives the same image, and a
/// tree with one file's content changed changes only that file's blocks.
fn mkfs(tree: &Path, image: &Path, mib: usize) -> Result<()> {
    let _ = fs::remove_file(image);
    let uuid = "6f1c2c55-8d3e-4d6b-9a57-3b2f0c1d9e01";
    let mut c = Command::new("mkfs.ext4");
    c.env("E2FSPROGS_FAKE_TIME", "1700000000")
        // One inode per 4 KiB: a tree of many small files never runs out.
        .args(["-q", "-F", "-b", "4096", "-i", "4096", "-U", uuid, "-E"])
        .arg(format!("hash_seed={uuid},root_owner=0:0,lazy_itable_init=0"))
        .arg("-d")
        .arg(tree)
        .arg(image)
        .arg(format!("{mib}M"));
    let out = c.output()?;
    if !out.status.success() {
        bail!("{}: {}", crate::util::show(&c), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn build(dir: &Path, perch: &Path, args: &[&str]) -> Result<()> {
    let mut all = vec!["bundle", "build", "--name", "rootfs", "--target", "bench"];
    all.extend_from_slice(args);
    run_in(dir, perch, &all).map(drop)
}

fn zstd_size(dir: &Path, file: &str) -> Result<u64> {
    let mut c = Command::new("zstd");
    c.current_dir(dir).args(["-19", "-q", "-f", "-T0", file, "-o", "ref.zst"]);
    let out = c.output()?;
    if !out.status.success() {
        bail!("zstd -19: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(fs::metadata(dir.join("ref.zst"))?.len())
}

struct Diff {
    fetched: u64,
    full: u64,
}

fn diff(dir: &Path, perch: &Path, old: &str, new: &str) -> Result<Diff> {
    let out = run_in(dir, perch, &["bundle", "diff", "--json", old, new])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("perch bundle diff --json")?;
    let n = |k: &str| v[k].as_u64().with_context(|| format!("diff has no {k}"));
    Ok(Diff { fetched: n("fetched_bytes")?, full: n("full_bytes")? })
}

struct Timed {
    dd: Duration,
    install: Duration,
    /// Natively: what decoding and hashing alone take on this machine
    /// (see [`decode_and_hash_floor`]).
    floor: Option<Duration>,
}

impl Timed {
    /// Install throughput ÷ dd's, both over the same uncompressed bytes.
    fn ratio(&self) -> f64 {
        self.dd.as_secs_f64() / self.install.as_secs_f64()
    }
}

/// `perch-agent install n.perch` into a file-backed U-Boot slot (a fresh
/// state each time: the whole bundle is read and decompressed), against
/// `dd conv=fsync` of the uncompressed image onto a file of the same disk.
fn install_vs_dd(dir: &Path, agent: &Path, qemu: Option<&str>) -> Result<Timed> {
    let len = fs::metadata(dir.join("n.ext4"))?.len();
    for slot in ["a.img", "b.img", "dd.img"] {
        fs::write(dir.join(slot), b"")?;
        fs::File::options().write(true).open(dir.join(slot))?.set_len(len)?;
    }
    crate::util::bench_uboot_device(dir)?;
    let mut install = match qemu {
        Some(q) => {
            let mut c = Command::new(q);
            c.arg(agent);
            c
        }
        None => Command::new(agent),
    };
    install.args(["--config", "agent.toml", "--state-dir", "state", "install", "n.perch"]);
    let mut dd = Command::new("dd");
    dd.args(["if=n.ext4", "of=dd.img", "bs=1M", "conv=notrunc,fsync", "status=none"]);
    let (mut best_dd, mut best_install) = (Duration::MAX, Duration::MAX);
    for round in 0..=RUNS {
        let timed = |c: &mut Command| -> Result<Duration> {
            Command::new("sync").status()?;
            let t = Instant::now();
            let out = c.current_dir(dir).output()?;
            let took = t.elapsed();
            if !out.status.success() {
                bail!("{}: {}", crate::util::show(c), String::from_utf8_lossy(&out.stderr));
            }
            Ok(took)
        };
        let a = timed(&mut dd)?;
        crate::util::reset_bench_uboot_device(dir)?;
        let b = timed(&mut install)?;
        if round > 0 {
            best_dd = best_dd.min(a);
            best_install = best_install.min(b);
        }
    }
    let rate = |d: Duration| len as f64 / d.as_secs_f64() / 1e6;
    let who = if qemu.is_some() { "aarch64 agent under qemu" } else { "perch-agent" };
    println!(
        "dd conv=fsync {:.0} MB/s; {who} install of the compressed bundle {:.0} MB/s (of the uncompressed image)",
        rate(best_dd),
        rate(best_install)
    );
    let floor = match qemu {
        None => Some(install_floor(dir, len)? + fixed_cost(dir, agent)?),
        Some(_) => None,
    };
    Ok(Timed { dd: best_dd, install: best_install, floor })
}

/// What an install takes beyond its payload: `one.perch` (one chunk of
/// the image), best of [`RUNS`]. It starts `fw_printenv` and `fw_setenv`
/// and syncs the journal at each step, one thing after another. Zero if
/// the kept bundles are from before `one.perch` was made.
fn fixed_cost(dir: &Path, agent: &Path) -> Result<Duration> {
    if !dir.join("one.perch").is_file() {
        println!("(no one.perch: the ceiling leaves out an install's fixed cost)");
        return Ok(Duration::ZERO);
    }
    let mut best = Duration::MAX;
    for _ in 0..=RUNS {
        crate::util::reset_bench_uboot_device(dir)?;
        let t = Instant::now();
        let out = Command::new(agent)
            .current_dir(dir)
            .args(["--config", "agent.toml", "--state-dir", "state", "install", "one.perch"])
            .output()?;
        best = best.min(t.elapsed());
        if !out.status.success() {
            bail!("install one.perch: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    crate::util::reset_bench_uboot_device(dir)?;
    println!("an install's fixed cost (one.perch, one chunk): {:.3} s", best.as_secs_f64());
    Ok(best)
}

/// The least wall time an installer of `n.perch` could take here if every
/// core were busy all along, beyond its fixed cost: the CPU time of `zstd -d` of the image as one
/// `zstd -19` frame (with a content checksum, as perch's frames have),
/// `openssl dgst -sha256` of the bundle (the stored bytes an install must
/// hash) and of writing `len` bytes as `dd conv=fsync` does (the copy
/// into the page cache and the writeback; read from `/dev/zero`, which
/// costs less than a copy), over the cores. `dd` ÷ this is about the most
/// an install ÷ `dd` can reach on this machine.
fn install_floor(dir: &Path, len: u64) -> Result<Duration> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let cpu = |c: &mut Command| crate::bench::best_cpu(dir, c).map(|(_, cpu)| cpu);
    let zstd = cpu(Command::new("zstd").args(["-d", "-q", "-c", "ref.zst"]))?;
    let sha = cpu(Command::new("openssl").args(["dgst", "-sha256", "n.perch"]))?;
    let count = format!("count={len}");
    let write = cpu(Command::new("dd").args([
        "if=/dev/zero",
        "of=dd.img",
        "bs=1M",
        &count,
        "iflag=count_bytes",
        "conv=notrunc,fsync",
        "status=none",
    ]))?;
    let floor = (zstd + sha + write) / cores;
    println!(
        "CPU: zstd -d {:.3} s + openssl dgst -sha256 {:.3} s + dd from /dev/zero {:.3} s, ÷ {cores} cores = {:.3} s",
        zstd.as_secs_f64(),
        sha.as_secs_f64(),
        write.as_secs_f64(),
        floor.as_secs_f64()
    );
    Ok(floor)
}
