//! The inhibit gate: "not now" while armed or in flight. It defers
//! activation, never staging.

use std::time::Duration;

use crate::config::Inhibit;

/// Returns why activation must wait, or `None` when it may go ahead.
/// A command that cannot run, fails or hangs counts as "not now": when in
/// doubt, a drone in the air stays on the software it is flying.
pub fn reason(cfg: &Inhibit) -> Option<String> {
    if let Some(f) = &cfg.file {
        if f.exists() {
            return Some(format!("inhibit file {} exists", f.display()));
        }
    }
    if let Some(cmd) = &cfg.command {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(cmd);
        if let Err(e) = crate::health::run_with_timeout(&mut c, Duration::from_secs(30)) {
            return Some(format!("inhibit command `{cmd}` {e}"));
        }
    }
    None
}
