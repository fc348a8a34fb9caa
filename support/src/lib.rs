//! Host-side helpers shared by `perch`, `perch-agent` and `perch-bootstrap`.
//!
//! This crate is where the binaries' I/O conventions live, so that they are
//! written once: every state or key file goes through [`durable`], every key
//! file through [`keyfile`], and every process exit through [`exit`].
// Forbidden everywhere but `sigpipe`, which says why.
#![deny(unsafe_code)]

pub mod bundle_file;
#[cfg(feature = "clap")]
pub mod clap_help;
pub mod durable;
pub mod exit;
pub mod keyfile;
pub mod sigpipe;
pub mod trustfile;

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An error and every cause under it, `outer: inner: innermost`, on one
/// line: what a report or a log needs when only the text travels on.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    chain_line(std::iter::successors(Some(e), |e| e.source()))
}

/// An error chain (outermost first, as `anyhow::Error::chain` gives it) on
/// one line, each thing said once. Some errors repeat their source in their
/// own message (async-nats' do: `no responders: no responders`), so a
/// cause already at the end is skipped, and so is a part equal to the one
/// before it.
pub fn chain_line<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut out = String::new();
    for c in chain {
        let text = c.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    let mut parts: Vec<&str> = out.split(": ").collect();
    parts.dedup();
    parts.join(": ")
}

/// `12.3 MiB`, rounded down to a tenth.
pub fn mib(bytes: u64) -> String {
    let tenths = bytes / (1 << 20) * 10 + bytes % (1 << 20) * 10 / (1 << 20);
    format!("{}.{} MiB", tenths / 10, tenths % 10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chains_read_outer_to_inner() {
        let inner = std::io::Error::other("data budget used up");
        #[derive(Debug, thiserror::Error)]
        #[error("nats:perch.chunk.x.m")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(super::error_chain(&Outer(inner)), "nats:perch.chunk.x.m: data budget used up");
    }

    /// async-nats' errors print their source and also return it.
    #[test]
    fn a_cause_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("no responders")]
        struct Kind;
        #[derive(Debug, thiserror::Error)]
        #[error("no responders: {0}")]
        struct Request(#[source] Kind);
        #[derive(Debug, thiserror::Error)]
        #[error("reading the catalog")]
        struct Outer(#[source] Request);
        assert_eq!(super::error_chain(&Outer(Request(Kind))), "reading the catalog: no responders");
    }
}

/// A duration as people write it: `250ms`, `5s`, `2m30s`, `1h5m`; whole
/// seconds from a second up (`5.002162309s` says nothing more than `5s`).
pub fn duration(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs() + u64::from(d.subsec_millis() >= 500);
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod duration_tests {
    use std::time::Duration;

    #[test]
    fn durations_read_as_people_write_them() {
        let d = super::duration;
        assert_eq!(d(Duration::from_millis(250)), "250ms");
        assert_eq!(d(Duration::from_nanos(5_002_162_309)), "5s");
        assert_eq!(d(Duration::from_millis(149_600)), "2m30s");
        assert_eq!(d(Duration::from_secs(3900)), "1h5m");
        assert_eq!(d(Duration::from_secs(3600)), "1h");
    }
}
