//! Deadlines for the benchmarks: a bench finishes or fails with a reason,
//! never hangs. Every tool a bench runs is given a limit and a description
//! of what it is waiting for, which the failure names.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::show;

/// Runs `program args` in `dir` and returns its stdout; fails if it fails,
/// or if it has not finished within `limit` (then it is killed, and the
/// error says what it was doing: `what`).
pub fn run_within(dir: &Path, program: &Path, args: &[&str], limit: Duration, what: &str) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {}", show(&cmd)))?;
    // Read both pipes while waiting, so a chatty child never blocks on them.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!("{what}: not done after {limit:?}, stopped ({}): {}", show(&cmd), stderr.trim());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if !status.success() {
        bail!("{what}: {} failed ({status}): {}", show(&cmd), stderr.trim());
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_hangs_is_stopped_and_named() {
        let t = Instant::now();
        let e =
            run_within(Path::new("."), Path::new("sleep"), &["30"], Duration::from_millis(300), "napping")
                .unwrap_err()
                .to_string();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.contains("napping: not done after"), "{e}");
        let ok =
            run_within(Path::new("."), Path::new("echo"), &["hi"], Duration::from_secs(5), "echo").unwrap();
        assert_eq!(ok.trim(), "hi");
        let e =
            run_within(Path::new("."), Path::new("false"), &[], Duration::from_secs(5), "lying").unwrap_err();
        assert!(e.to_string().contains("lying:"), "{e}");
    }
}
