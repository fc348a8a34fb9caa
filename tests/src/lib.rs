//! Helpers for perch's end-to-end tests: locate the real binaries and run
//! them in a scratch directory.
#![forbid(unsafe_code)]

/// The fault-injecting proxy (its own crate: the demo uses it too).
pub use perch_chaos as chaos;
pub mod browser;
pub mod device;
pub mod fleet;
pub mod hub;
pub mod nats;
pub mod schema;
pub mod sim;
/// Real U-Boot on qemu's virt board (its own crate: the demo uses it too).
pub use perch_uboot_vm as uboot;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary (`perch`, `perch-agent`, `perch-bootstrap`)
/// built next to this test executable. The first call in a test process
/// runs `cargo build --workspace --bins` for this profile, so that `cargo
/// test --workspace` in a fresh clone, or after a change, runs the
/// binaries of the code as it is (cargo does not build other packages'
/// binaries for a test; when they are current this takes a moment).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Err(e) = BUILT.get_or_init(|| build_bins(dir)) {
        panic!("building the binaries for the tests: {e}");
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} is not built", path.display());
    path
}

/// `cargo build --workspace --bins` into the target directory `dir` (its
/// profile) from the workspace root.
fn build_bins(dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?;
    let target = dir.parent().ok_or("no target dir")?;
    let mut c = Command::new(cargo);
    // What cargo set for this test crate is not the build's to see: a
    // build script that watches CARGO_MANIFEST_DIR (ring's) would rebuild.
    for (var, _) in std::env::vars_os() {
        let v = var.to_string_lossy();
        let per_crate = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
        ];
        if per_crate.iter().any(|p| v.starts_with(p)) {
            c.env_remove(&var);
        }
    }
    c.current_dir(root).args(["build", "--workspace", "--bins", "--quiet", "--target-dir"]).arg(target);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            c.arg("--release");
        }
        Some(other) => {
            c.args(["--profile", other]);
        }
        None => return Err(format!("{}: not a profile directory", dir.display())),
    }
    let out = c.output().map_err(|e| format!("running cargo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Result of one CLI run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A scratch directory where commands run.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// Builds and signs (with k1) an archive bundle of the scratch
    /// directory `dir` into `file`; returns its digest and payload length.
    pub fn signed_archive(&self, name: &str, counter: u32, dir: &str, file: &str) -> ([u8; 32], u64) {
        self.signed_archive_with(name, counter, dir, file, &[])
    }

    /// [`signed_archive`](Self::signed_archive) with more `perch bundle build` arguments.
    pub fn signed_archive_with(
        &self,
        name: &str,
        counter: u32,
        dir: &str,
        file: &str,
        extra: &[&str],
    ) -> ([u8; 32], u64) {
        let input = self.path(dir);
        let counter = counter.to_string();
        let build =
            ["bundle", "build", "--name", name, "--counter", &counter, "--kind", "archive", "--input"];
        let mut args = build.to_vec();
        args.extend([input.to_str().unwrap(), "--out", file]);
        args.extend_from_slice(extra);
        self.ok("perch", &args);
        self.ok("perch", &["bundle", "sign", "--key", "k1.key", file]);
        let v: serde_json::Value =
            serde_json::from_str(&self.ok("perch", &["bundle", "inspect", "--json", file]).stdout).unwrap();
        let hexd = v["digest"].as_str().unwrap();
        let mut digest = [0u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hexd[2 * i..2 * i + 2], 16).unwrap();
        }
        (digest, v["payload_len"].as_u64().unwrap_or(0))
    }

    /// `perch publish FILE` (a file in the scratch dir) to the server at
    /// `url`, with a release credential of the org.
    pub fn publish(&self, url: &str, file: &str) {
        self.fleet_creds("release");
        let creds = ["--creds", "release.creds", "--ca", "org/tls/ca.pem"];
        let mut args = vec!["publish", "--trust", "org/trust.doc", "--url", url];
        args.extend(creds);
        args.push(file);
        self.ok("perch", &args);
    }

    pub fn new() -> Self {
        Scratch { dir: tempfile::tempdir().expect("tempdir") }
    }

    /// `NAME.creds`: a FLEET user made with `perch-bootstrap nats creds`
    /// from the org in `org/` (made once; later calls reuse it).
    pub fn fleet_creds(&self, name: &str) -> PathBuf {
        let file = format!("{name}.creds");
        let creds = self.path(&file);
        if !creds.exists() {
            let args =
                ["nats", "creds", "--dir", "org", "--account", "fleet", "--name", name, "--out", &file];
            self.ok("perch-bootstrap", &args);
        }
        creds
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `program args...` in the scratch directory.
    /// What it prints with `--json` is checked against its schema.
    pub fn run(&self, program: &str, args: &[&str]) -> Run {
        let r: Run = Command::new(bin(program))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("spawn")
            .into();
        schema::check_cli_output(program, args, &r.stdout);
        r
    }

    /// Runs and asserts the exit code, returning the output.
    pub fn ok(&self, program: &str, args: &[&str]) -> Run {
        let r = self.run(program, args);
        assert_eq!(r.code, 0, "{program} {args:?} failed: {}", r.stderr);
        r
    }

    /// An org with `n` release keys `k1..kn` and the given threshold, in `org/`.
    pub fn org(&self, n: usize, threshold: u32) {
        let mut args = vec!["init".to_string(), "--dir".into(), "org".into()];
        for i in 1..=n {
            self.ok("perch", &["keygen", "--out", &format!("k{i}")]);
            args.push("--release-key".into());
            args.push(format!("k{i}.pub"));
        }
        args.push("--threshold".into());
        args.push(threshold.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok("perch-bootstrap", &args);
    }

    /// Writes `len` pseudo-random bytes to `rel`.
    pub fn write_payload(&self, rel: &str, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len).map(|i| ((i * 7919) as u8) ^ seed ^ ((i >> 8) as u8)).collect();
        std::fs::write(self.path(rel), &data).expect("write payload");
        data
    }
}
