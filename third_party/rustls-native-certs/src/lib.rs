//! perch's stand-in for `rustls-native-certs` 0.7: there is no system store.
//!
//! async-nats calls `load_native_certs()` on every connect, even when it is
//! handed a complete rustls config, and perch always hands it one that
//! trusts the fleet CA only (see `perch-net`). The real crate parses every
//! certificate under /etc/ssl/certs each time: about 5 ms of CPU per
//! connect on a desktop core (measured by `cargo xtask bench enroll`), much
//! more on a drone, for roots perch must never use. This crate is wired in
//! with `[patch.crates-io]` in the workspace Cargo.toml; it keeps the one
//! function async-nats calls, and returns no certificates.
#![forbid(unsafe_code)]

use pki_types::CertificateDer;

/// No system roots: perch trusts the fleet CA and nothing else.
pub fn load_native_certs() -> Result<Vec<CertificateDer<'static>>, std::io::Error> {
    Ok(Vec::new())
}
