//! The Getting started page runs as written: its `sh` blocks after "Your
//! first signed release", in order, in an empty directory, with the
//! workspace's binaries on PATH. A page that drifts from the code fails here.

use std::process::Command;

#[test]
fn the_getting_started_page_runs_as_written() {
    let page = include_str!("../../docs/content/getting-started/_index.md");
    let tutorial = page.split("## Your first signed release").nth(1).expect("the tutorial section");
    let mut script = String::from("set -eu\n");
    let mut blocks = 0;
    let mut lines = tutorial.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            blocks += 1;
            // The page indents blocks inside list items; the heredoc's EOF
            // must start its line.
            for l in lines.by_ref().take_while(|l| l.trim() != "```") {
                script.push_str(l.strip_prefix("   ").unwrap_or(l));
                script.push('\n');
            }
        }
    }
    assert!(blocks >= 6, "only {blocks} sh blocks found");
    let bin_dir = perch_tests::bin("perch").parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let dir = tempfile::tempdir().unwrap();
    let out =
        Command::new("sh").arg("-c").arg(&script).current_dir(dir.path()).env("PATH", path).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the page's commands failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for said in [
        "committed desk-app #1",
        "hello from desk-app 1.0.0",
        "committed desk-app #2",
        "hello from desk-app 1.1.0",
    ] {
        assert!(stdout.contains(said), "no '{said}' in:\n{stdout}");
    }
}
