//! Fault injection for the crash tests, driven by environment variables so
//! the tests run the real release binary.
//!
//! - `PERCH_FAILPOINT=NAME:N` sends the agent SIGKILL at the N-th time the
//!   failpoint NAME is reached (`any` counts every failpoint).
//! - `PERCH_TRACE=FILE` appends one line per slot write (`write <chunk>`),
//!   so tests can prove a resumed install never rewrote a recorded chunk.
//!
//! Unset, each call costs one atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Spec {
    name: String,
    at: u64,
}

fn spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var("PERCH_FAILPOINT").ok()?;
        let (name, at) = v.rsplit_once(':')?;
        Some(Spec { name: name.to_string(), at: at.parse().ok()? })
    })
    .as_ref()
}

static HITS: AtomicU64 = AtomicU64::new(0);

/// Marks a point where a crash must be survivable.
pub fn hit(name: &str) {
    let Some(spec) = spec() else { return };
    if spec.name != "any" && spec.name != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == spec.at {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Records a slot write for the tests (see module docs).
pub fn trace(event: std::fmt::Arguments<'_>) {
    static PATH: OnceLock<Option<String>> = OnceLock::new();
    let Some(path) = PATH.get_or_init(|| std::env::var("PERCH_TRACE").ok()) else { return };
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{event}");
    }
}
