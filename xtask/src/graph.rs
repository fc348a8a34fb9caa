//! `cargo xtask graph` (run by `ci`): the crate graph is the one
//! `docs/content/architecture` draws, and perch-protocol does no I/O.
//!
//! The drawing is the first `text` block under "## Crates": one line per
//! crate, `NAME (what) ──> DEP, DEP`, or no arrow for a crate with no
//! workspace dependency. Each workspace crate must be drawn, with exactly
//! its normal (not dev or build) dependencies on other workspace crates.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, root, step};

/// What protocol code must not name: files, sockets, processes, threads,
/// the environment, the clock, an async runtime.
const IO: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::env",
    "SystemTime::now",
    "Instant::now",
    "tokio",
];

pub fn run() -> Result<()> {
    step("graph: the crate graph against docs/content/architecture");
    let drawn = drawn(&fs::read_to_string(root().join("docs/content/architecture/_index.md"))?)?;
    let actual = actual()?;
    let mut wrong = Vec::new();
    for (name, deps) in &actual {
        match drawn.get(name) {
            None => wrong.push(format!("{name} is not drawn")),
            Some(d) if d != deps => wrong.push(format!("{name}: drawn ──> {d:?}, but depends on {deps:?}")),
            Some(_) => {}
        }
    }
    for name in drawn.keys().filter(|n| !actual.contains_key(*n)) {
        wrong.push(format!("{name} is drawn but is not a workspace crate"));
    }
    if !wrong.is_empty() {
        bail!("the crate graph is not the drawn one:\n  {}", wrong.join("\n  "));
    }
    println!("{} crates, as drawn", actual.len());
    step("graph: perch-protocol does no I/O");
    let mut found = Vec::new();
    io_in(&root().join("protocol/src"), &mut found)?;
    if !found.is_empty() {
        bail!(
            "perch-protocol does I/O (move it to perch-support or a binary crate):\n  {}",
            found.join("\n  ")
        );
    }
    println!("no file, socket, process, thread, environment or clock in protocol/src");
    Ok(())
}

/// Crate → workspace crates it depends on, from the drawing.
fn drawn(page: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let section = page.split("## Crates").nth(1).context("no '## Crates' section")?;
    let block =
        section.split("```text").nth(1).and_then(|b| b.split("```").next()).context("no text block")?;
    let mut out = BTreeMap::new();
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = line.split_whitespace().next().unwrap_or_default().to_string();
        let deps = match line.split_once("──>") {
            Some((_, deps)) => {
                deps.split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect()
            }
            None => BTreeSet::new(),
        };
        out.insert(name, deps);
    }
    Ok(out)
}

/// Crate → workspace crates it depends on (normal dependencies), from cargo.
fn actual() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let out = cargo().args(["metadata", "--format-version", "1", "--no-deps", "--locked"]).output()?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = meta["packages"].as_array().context("no packages")?;
    let members: BTreeSet<String> =
        packages.iter().filter_map(|p| p["name"].as_str()).map(String::from).collect();
    let mut graph = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default().to_string();
        let deps = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|d| members.contains(*d))
            .map(String::from)
            .collect();
        graph.insert(name, deps);
    }
    Ok(graph)
}

/// Lines of non-test code under `dir` that name I/O.
fn io_in(dir: &Path, found: &mut Vec<String>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.is_dir() {
            io_in(&path, found)?;
            continue;
        }
        let text = fs::read_to_string(&path)?;
        // Unit tests (at the end of a file, by convention) may use files.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if let Some(what) = IO.iter().find(|w| code.contains(*w)) {
                found.push(format!(
                    "{}:{}: {what}",
                    path.strip_prefix(root()).unwrap_or(&path).display(),
                    n + 1
                ));
            }
        }
    }
    Ok(())
}
