//! `cargo xtask fuzz [--seconds N] [TARGET...]`: every cargo-fuzz target in
//! `fuzz/`, one after the other, for N seconds each (default 600), with a
//! table of executions, coverage and corpus size at the end. The scheduled
//! job (`.ci/fuzz`), not CI: ten minutes a target is two hours.
//!
//! The corpus in `fuzz/corpus/<target>` is kept between runs, so each run
//! starts where the last one stopped. A crash fails the run and names the
//! input libFuzzer saved in `fuzz/artifacts/<target>/`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{output, root, sh, step};

const DEFAULT_SECONDS: u64 = 600;

/// What one target's run left behind.
struct Outcome {
    target: String,
    execs: u64,
    execs_per_sec: u64,
    cov: String,
    corpus_files: usize,
    corpus_bytes: u64,
}

pub fn run(args: &[String]) -> Result<()> {
    let (seconds, only) = parse(args)?;
    ensure_tools()?;
    let fuzz = root().join("fuzz");
    let all = targets(&fuzz)?;
    for t in &only {
        if !all.contains(t) {
            bail!("no fuzz target {t} (targets: {})", all.join(", "));
        }
    }
    let chosen: Vec<String> = if only.is_empty() { all } else { only };

    step("fuzz: building every target (nightly, sanitizer=address)");
    sh(nightly_fuzz(&fuzz).arg("build"))?;

    let started = Instant::now();
    let mut outcomes = Vec::new();
    for t in &chosen {
        step(&format!("fuzz {t}: {seconds} s"));
        outcomes.push(run_one(&fuzz, t, seconds)?);
    }
    let table = render(&outcomes, seconds);
    println!("\n{table}");
    let report = root().join("target/fuzz-report.md");
    fs::create_dir_all(root().join("target"))?;
    fs::write(&report, &table).with_context(|| format!("writing {}", report.display()))?;
    step(&format!(
        "fuzz: {} targets clean in {:.0?}; table in {}",
        chosen.len(),
        started.elapsed(),
        report.display()
    ));
    Ok(())
}

fn parse(args: &[String]) -> Result<(u64, Vec<String>)> {
    let mut seconds = DEFAULT_SECONDS;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--seconds" {
            let n = it.next().context("--seconds takes a number")?;
            seconds = n.parse().with_context(|| format!("--seconds takes a number, not {n:?}"))?;
            if seconds == 0 {
                bail!("--seconds must be at least 1");
            }
        } else if a.starts_with('-') {
            bail!("usage: cargo xtask fuzz [--seconds N] [TARGET...]");
        } else {
            only.push(a.clone());
        }
    }
    Ok((seconds, only))
}

/// cargo-fuzz from crates.io, and the nightly toolchain it needs.
fn ensure_tools() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !String::from_utf8_lossy(&toolchains.stdout).lines().any(|l| l.starts_with("nightly")) {
        bail!("cargo-fuzz needs a nightly toolchain, and rustup lists none");
    }
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have_fuzz {
        step("fuzz: installing cargo-fuzz");
        sh(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn nightly_fuzz(fuzz: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"]).current_dir(fuzz);
    c
}

/// The `[[bin]]` names in `fuzz/Cargo.toml`, in file order.
fn targets(fuzz: &Path) -> Result<Vec<String>> {
    let manifest = fuzz.join("Cargo.toml");
    let text = fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(v) = line.strip_prefix("name").filter(|_| in_bin) {
            let name = v.trim_start().trim_start_matches('=').trim().trim_matches('"');
            names.push(name.to_string());
        }
    }
    if names.is_empty() {
        bail!("{} lists no [[bin]] targets", manifest.display());
    }
    Ok(names)
}

fn run_one(fuzz: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = fuzz.join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut c = nightly_fuzz(fuzz);
    // One job, and libFuzzer's own time limit; -print_final_stats gives the
    // execution count. A slow input (over 10 s) is a finding, as a crash is.
    c.args([
        "run",
        target,
        "--",
        &format!("-max_total_time={seconds}"),
        "-print_final_stats=1",
        "-timeout=10",
    ]);
    let out = output(&mut c)?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let log_path = root().join("target").join(format!("fuzz-{target}.log"));
    fs::write(&log_path, &log).with_context(|| format!("writing {}", log_path.display()))?;
    if !out.status.success() {
        let artifact = log
            .lines()
            .find_map(|l| l.split("Test unit written to ").nth(1))
            .unwrap_or("(no input saved; see the log)");
        bail!("fuzz target {target} failed ({}): input {artifact}; log {}", out.status, log_path.display());
    }
    let execs = stat(&log, "stat::number_of_executed_units:")
        .with_context(|| format!("{target}: libFuzzer printed no final stats; log {}", log_path.display()))?;
    let (corpus_files, corpus_bytes) = dir_size(&corpus)?;
    Ok(Outcome {
        target: target.to_string(),
        execs,
        execs_per_sec: stat(&log, "stat::average_exec_per_sec:").unwrap_or(0),
        cov: last_coverage(&log),
        corpus_files,
        corpus_bytes,
    })
}

fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

/// `cov: N ft: M` from libFuzzer's last status line.
fn last_coverage(log: &str) -> String {
    log.lines()
        .rev()
        .find_map(|l| {
            let cov = l.split("cov: ").nth(1)?.split_whitespace().next()?;
            let ft = l.split("ft: ").nth(1)?.split_whitespace().next()?;
            Some(format!("{cov} / {ft}"))
        })
        .unwrap_or_else(|| "-".into())
}

fn dir_size(dir: &Path) -> Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let m = e?.metadata()?;
        if m.is_file() {
            files += 1;
            bytes += m.len();
        }
    }
    Ok((files, bytes))
}

fn render(outcomes: &[Outcome], seconds: u64) -> String {
    let mut s = format!(
        "| target ({seconds} s each) | executions | execs/s | coverage (edges / features) | corpus files | corpus bytes |\n|---|---:|---:|---|---:|---:|\n"
    );
    for o in outcomes {
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            o.target,
            group(o.execs),
            group(o.execs_per_sec),
            o.cov,
            o.corpus_files,
            group(o.corpus_bytes)
        ));
    }
    s
}

/// 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_targets_are_read_from_the_manifest_in_order() {
        let t = targets(&root().join("fuzz")).unwrap();
        assert_eq!(t.first().map(String::as_str), Some("bundle_reader"));
        assert!(t.contains(&"outbox_segment".to_string()));
    }

    #[test]
    fn libfuzzer_final_stats_are_parsed() {
        let log = "#1234\tDONE   cov: 812 ft: 2301 corp: 140/9Kb lim: 4096 exec/s: 5000 rss: 60Mb\n\
                   stat::number_of_executed_units: 3000000\nstat::average_exec_per_sec:     5000\n";
        assert_eq!(stat(log, "stat::number_of_executed_units:"), Some(3_000_000));
        assert_eq!(last_coverage(log), "812 / 2301");
        assert_eq!(group(3_000_000), "3,000,000");
        assert_eq!(group(999), "999");
    }

    #[test]
    fn fuzz_seconds_must_be_a_positive_number() {
        assert!(parse(&["--seconds".into(), "0".into()]).is_err());
        assert!(parse(&["--seconds".into(), "x".into()]).is_err());
        assert_eq!(
            parse(&["--seconds".into(), "5".into(), "token".into()]).unwrap(),
            (5, vec!["token".into()])
        );
    }
}
