//! `cargo xtask docs`: builds the Hugo site (warnings are errors) and checks
//! that every internal link and asset reference resolves to a built file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{root, sh, step};

pub fn run() -> Result<()> {
    step("docs: hugo build");
    let out = root().join("target/docs-public");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    sh(Command::new("hugo")
        .current_dir(root().join("docs"))
        .args(["--panicOnWarning", "--printPathWarnings", "--quiet", "--destination"])
        .arg(&out))?;
    step("docs: link check");
    let mut pages = Vec::new();
    collect_html(&out, &mut pages)?;
    let mut broken = Vec::new();
    for page in &pages {
        let html = fs::read_to_string(page)?;
        for link in links(&html) {
            if !resolves(&out, page, &link) {
                broken.push(format!("{}: {link}", page.strip_prefix(&out).unwrap_or(page).display()));
            }
        }
    }
    if !broken.is_empty() {
        bail!("broken links in the docs:\n  {}", broken.join("\n  "));
    }
    println!("{} pages, all internal links resolve", pages.len());
    Ok(())
}

fn collect_html(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let p = e?.path();
        if p.is_dir() {
            collect_html(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "html") {
            out.push(p);
        }
    }
    Ok(())
}

/// href/src values that point inside the site.
fn links(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attr in ["href=\"", "src=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let Some(end) = rest.find('"') else { break };
            let v = &rest[..end];
            let external =
                v.contains("://") || v.starts_with("mailto:") || v.starts_with('#') || v.is_empty();
            if !external {
                found.push(v.to_string());
            }
        }
    }
    found
}

fn resolves(site: &Path, page: &Path, link: &str) -> bool {
    let path = link.split(['#', '?']).next().unwrap_or("");
    let base = if let Some(abs) = path.strip_prefix('/') {
        site.join(abs)
    } else {
        page.parent().unwrap_or(site).join(path)
    };
    base.is_file() || base.join("index.html").is_file()
}
