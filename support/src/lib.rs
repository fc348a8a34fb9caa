//! Host-side helpers shared by `perch`, `perch-agent` and `perch-bootstrap`.
//!
//! This crate is where the binaries' I/O conventions live, so that they are
//! written once: every state or key file goes through [`durable`], every key
//! file through [`keyfile`], and every process exit through [`exit`].
#![forbid(unsafe_code)]

pub mod durable;
pub mod exit;
pub mod keyfile;
pub mod trustfile;

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An error and every cause under it, `outer: inner: innermost`, on one
/// line: what a report or a log needs when only the text travels on.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some errors repeat their source in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
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
}
