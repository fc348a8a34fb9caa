//! `cargo xtask docs`: builds the Hugo site (warnings are errors), checks
//! that every internal link and asset reference resolves to a built file,
//! and then uses the site in a real browser (Debian's headless Chromium):
//! searches, follows a result, and checks the page layout at phone width.

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
    fresh_screenshots(&out)?;
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
    step("docs: in headless Chromium");
    browser_checks(&out)
}

/// The console's screenshots from this run's browser test
/// (`target/console-screenshots/`, written by tests/tests/console.rs) in
/// place of the committed copies, if the test ran.
fn fresh_screenshots(site: &Path) -> Result<()> {
    let from = root().join("target/console-screenshots");
    let Ok(entries) = fs::read_dir(&from) else {
        println!("console screenshots: the committed copies (the browser test did not run)");
        return Ok(());
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let to = site.join("console").join(&name);
        // Only pictures the page shows: a stray file is not published.
        if to.exists() {
            fs::copy(e.path(), &to).with_context(|| format!("copying {}", e.path().display()))?;
            n += 1;
        }
    }
    println!("console screenshots: {n} from this run's browser test");
    Ok(())
}

/// Loads `url` in headless Chromium and returns the DOM after its scripts ran.
fn dump_dom(url: &str) -> Result<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
            "--dump-dom",
            url,
        ])
        .output()
        .context("running chromium (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("chromium {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the first `attr="..."` after `marker` in `html`.
fn attr_after<'a>(html: &'a str, marker: &str, attr: &str) -> Option<&'a str> {
    let rest = &html[html.find(marker)?..];
    let rest = &rest[rest.find(&format!("{attr}=\""))? + attr.len() + 2..];
    Some(&rest[..rest.find('"')?])
}

fn browser_checks(site: &Path) -> Result<()> {
    let url = |rel: &str| format!("file://{}/{rel}", site.display());
    // Search finds the pages that mention a word, and a result opens one.
    let found = dump_dom(&url("search/index.html?q=rollback"))?;
    let first = attr_after(&found, "class=\"result\"", "href")
        .ok_or_else(|| anyhow::anyhow!("searching for 'rollback' found nothing:\n{found}"))?
        .to_string();
    let page = dump_dom(&first)?;
    for (what, needle) in [
        ("its title", "<h1>"),
        ("the word searched for", "rollback"),
        ("the current page marked in the navigation", "aria-current=\"page\""),
        ("previous/next links", "class=\"pager\""),
    ] {
        if !page.to_lowercase().contains(&needle.to_lowercase()) {
            bail!("the first result for 'rollback' ({first}) has no {what}");
        }
    }
    let none = dump_dom(&url("search/index.html?q=qwxzzy"))?;
    if !none.contains("No page mentions") || none.contains("class=\"result\"") {
        bail!("searching for a word no page has does not say so");
    }
    // A long page has its table of contents.
    let cli = dump_dom(&url("reference/cli/index.html"))?;
    if !cli.contains("class=\"toc\"") || !cli.contains("toc-inline") {
        bail!("the command line page has no table of contents");
    }
    // At phone width no page scrolls sideways and the menu folds away:
    // every page in a 390 px frame, measured from outside (file:// frames
    // are readable with --allow-file-access-from-files).
    let mut pages = Vec::new();
    collect_html(site, &mut pages)?;
    let frames: String = pages
        .iter()
        .map(|p| format!("<iframe src=\"file://{}\" width=390 height=600></iframe>", p.display()))
        .collect();
    let probe = site.parent().unwrap_or(site).join("docs-phone-probe.html");
    fs::write(
        &probe,
        format!(
            "<!doctype html><body>{frames}<script>window.onload=function(){{var worst=0,at='',menu='none';\
             document.querySelectorAll('iframe').forEach(function(f){{var d=f.contentDocument;\
             var w=d.documentElement.scrollWidth;if(w>worst){{worst=w;at=f.src;}}\
             var m=d.querySelector('.menu');if(m&&getComputedStyle(m).display!=='none'){{menu=f.src;}}}});\
             document.body.setAttribute('data-scroll-width',worst);document.body.setAttribute('data-widest',at);\
             document.body.setAttribute('data-menu',menu);}};</script></body>"
        ),
    )?;
    let measured = dump_dom(&format!("file://{}", probe.display()))?;
    let width: u32 = attr_after(&measured, "<body", "data-scroll-width")
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the phone-width probe measured nothing:\n{measured}"))?;
    let widest = attr_after(&measured, "<body", "data-widest").unwrap_or("?");
    let menu = attr_after(&measured, "<body", "data-menu").unwrap_or("?");
    if width > 390 || menu != "none" {
        bail!("at 390 px {widest} is {width} px wide (the menu is open on: {menu})");
    }
    println!(
        "search finds and opens pages ({first}); the current page is marked; long pages have contents; \
         at 390 px the {} pages are at most {width} px wide, the menu folded",
        pages.len()
    );
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
