//! Pieces shared by the nats-server configs perch-bootstrap writes (the
//! servers of a cluster, a field site's server): the checks that make a
//! name or host safe to put between quotes in a config and into a
//! certificate, and the hub's leafnode listener.

use std::path::Path;

/// Where hub servers take leaf node connections (the IANA leafnode port).
pub const LEAF_PORT: u16 = 7422;
/// Longest JetStream domain (and site name) perch accepts.
pub const MAX_DOMAIN: usize = perch_net::sites::MAX_SITE_NAME;

/// A server name (`server_name`): 1-64 of `A-Z a-z 0-9 - _`.
pub fn check_server_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("server name '{name}' must be 1-64 of A-Z a-z 0-9 - _"))
    }
}

/// A host clients and servers reach a server by: a DNS name or an IPv4
/// address (letters, digits, `-` and `.`).
pub fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("host '{host}' must be a DNS name or IPv4 address"))
    }
}

/// A JetStream domain (the hub's, or a site's, which is also the site's
/// name): 1-32 of `a-z 0-9 -`. nats-server refuses `.`, `*`, `>` and
/// anything that makes `$JS.<domain>.API.>` an invalid subject; perch
/// also puts a site's name into stream names and a server name, so it
/// keeps to lower-case letters, digits and `-`.
/// The rule is [`perch_net::sites::is_site_name`]: the site daemon and the
/// provisioner check the same.
pub fn check_domain(what: &str, d: &str) -> Result<(), String> {
    if perch_net::sites::is_site_name(d) {
        Ok(())
    } else {
        Err(format!("{what} '{d}' must be 1-{MAX_DOMAIN} of a-z 0-9 -, not starting or ending with -"))
    }
}

/// A hub server's `leafnodes {}` block: field sites connect here over TLS
/// (the server's certificate, signed by the fleet CA). No client
/// certificate is asked for: a site authenticates with its credentials
/// (a user JWT in operator mode), like every other client. `advertise`
/// (`HOST:PORT`) is what the server tells sites to reach it by: in a
/// cluster, sites learn the other servers from it, by names their
/// certificates carry.
pub fn leaf_listener(
    bind: &str,
    port: u16,
    advertise: Option<&str>,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> String {
    let advertise = advertise.map(|a| format!("    advertise: \"{a}\"\n")).unwrap_or_default();
    format!(
        "leafnodes {{\n    listen: \"{bind}:{port}\"\n{advertise}    tls {{\n        cert_file: \"{}\"\n        key_file: \"{}\"\n        ca_file: \"{}\"\n        timeout: 5\n    }}\n}}\n",
        cert.display(),
        key.display(),
        ca.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_short_lower_case_names() {
        for ok in ["hub", "a", "field-7", "0", &"x".repeat(32)] {
            assert!(check_domain("d", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hub", "a.b", "a*", "a>", "a b", "a_b", &"x".repeat(33), "é", "-a", "a-"] {
            assert!(check_domain("d", bad).is_err(), "{bad}");
        }
    }
}
