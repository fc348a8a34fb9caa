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
