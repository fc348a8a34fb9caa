//! The configuration of an N-server nats-server cluster for an org:
//! one directory per server in `ORG/nats/cluster/<name>/` with its
//! `nats-server.conf`, its certificate (`server.pem`, `server.key`, signed
//! by the fleet CA, for clients and routes) and the fleet CA (`ca.pem`).
//!
//! Every server names itself (`server_name`), runs JetStream, routes to all
//! the others over TLS verified both ways by the fleet CA, and carries the
//! operator, the system account and a full resolver of its own, so an
//! account update (a revocation) pushed to any server reaches all.
//!
//! The cluster is the fleet's hub: its JetStream has a domain (`hub`, the
//! same on every server) and every server takes leaf node connections
//! from field sites (see [`crate::site`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use perch_support::durable::{self, Replace, WriteError};
use perch_support::exit::{Class, Classify};

use crate::server_conf::{check_domain, check_host, check_server_name, leaf_listener};
use crate::{nats, tls};

/// The smallest cluster that keeps a quorum with one server down.
pub const MIN_SERVERS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Invalid(String),
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl Classify for ClusterError {
    fn class(&self) -> Option<Class> {
        match self {
            ClusterError::Invalid(_) | ClusterError::Exists(_) => Some(Class::Usage),
            ClusterError::Nats(e) => e.class(),
            ClusterError::Tls(e) => e.class(),
            ClusterError::Write(e) => e.class(),
        }
    }
}

/// One server: `NAME=HOST`, `NAME=HOST:CLIENT_PORT:ROUTE_PORT` or
/// `NAME=HOST:CLIENT_PORT:ROUTE_PORT:LEAF_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// The DNS name or IPv4 address clients and the other servers reach it by.
    pub host: String,
    /// Ports, when not the cluster's defaults.
    pub ports: Option<(u16, u16)>,
    /// The leafnode port, when not the cluster's default.
    pub leaf_port: Option<u16>,
}

impl FromStr for Member {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let syntax = || format!("'{s}' is not NAME=HOST[:CLIENT_PORT:ROUTE_PORT[:LEAF_PORT]]");
        let (name, addr) = s.split_once('=').ok_or_else(syntax)?;
        check_server_name(name)?;
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|&n| n > 0).ok_or_else(|| format!("bad port '{p}' in '{s}'"))
        };
        let parts: Vec<&str> = addr.split(':').collect();
        let (host, ports, leaf_port) = match parts.as_slice() {
            [h] => (*h, None, None),
            [h, c, r] => (*h, Some((port(c)?, port(r)?)), None),
            [h, c, r, l] => (*h, Some((port(c)?, port(r)?)), Some(port(l)?)),
            _ => return Err(syntax()),
        };
        check_host(host)?;
        Ok(Member { name: name.into(), host: host.into(), ports, leaf_port })
    }
}

/// What `nats cluster` is asked to write.
pub struct ClusterParams {
    pub org: String,
    /// The cluster's name (`cluster { name }`): the same on every server.
    pub name: String,
    pub members: Vec<Member>,
    /// The address every server listens on (`0.0.0.0`: all interfaces).
    pub bind: String,
    pub client_port: u16,
    pub route_port: u16,
    /// Where sites connect, unless a member gives its own.
    pub leaf_port: u16,
    /// The hub's JetStream domain, the same on every server.
    pub domain: String,
    /// Extra DNS names or addresses in every server's certificate.
    pub tls_names: Vec<String>,
    /// Where the server's files are on its host (default: where written).
    pub config_dir: Option<PathBuf>,
    /// Where each server keeps JetStream and account JWTs (default:
    /// `data/` in its config dir).
    pub store_dir: Option<PathBuf>,
}

impl ClusterParams {
    fn ports(&self, m: &Member) -> (u16, u16) {
        m.ports.unwrap_or((self.client_port, self.route_port))
    }

    fn leaf_port(&self, m: &Member) -> u16 {
        m.leaf_port.unwrap_or(self.leaf_port)
    }

    /// Every port a member listens on: client, route, leafnode.
    fn all_ports(&self, m: &Member) -> [u16; 3] {
        let (c, r) = self.ports(m);
        [c, r, self.leaf_port(m)]
    }

    fn check(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::Invalid(m));
        if self.members.len() < MIN_SERVERS {
            return bad(format!(
                "a cluster needs at least {MIN_SERVERS} servers (--server), to keep going with one down; got {}",
                self.members.len()
            ));
        }
        if !self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || self.name.is_empty()
        {
            return bad(format!("cluster name '{}' must be A-Z a-z 0-9 - _", self.name));
        }
        check_domain("JetStream domain", &self.domain).map_err(ClusterError::Invalid)?;
        for (i, a) in self.members.iter().enumerate() {
            for b in &self.members[i + 1..] {
                if a.name == b.name {
                    return bad(format!("server name '{}' is given twice", a.name));
                }
                let shared = self.all_ports(a).iter().any(|p| self.all_ports(b).contains(p));
                if a.host == b.host && shared {
                    return bad(format!("servers '{}' and '{}' share a port on {}", a.name, b.name, a.host));
                }
            }
            let [c, r, l] = self.all_ports(a);
            if c == r || c == l || r == l {
                return bad(format!(
                    "server '{}' uses one port twice (client {c}, route {r}, leafnode {l})",
                    a.name
                ));
            }
        }
        Ok(())
    }
}

/// The directory of one server's files in the org.
pub fn member_dir(org_dir: &Path, name: &str) -> PathBuf {
    nats::nats_dir(org_dir).join("cluster").join(name)
}

/// Writes every server's directory; returns their config files. Refuses
/// to overwrite: nothing is written if any of them exists.
pub fn write(org_dir: &Path, p: &ClusterParams) -> Result<Vec<PathBuf>, ClusterError> {
    p.check()?;
    for m in &p.members {
        let dir = member_dir(org_dir, &m.name);
        if dir.exists() {
            return Err(ClusterError::Exists(dir));
        }
    }
    let ca = tls::tls_dir(org_dir).join(tls::CA_PEM);
    let ca_pem = std::fs::read(&ca).map_err(|source| WriteError::Io { path: ca, source })?;
    // Everything is made before anything is written: a missing CA key or
    // org file leaves no half-written cluster behind.
    let mut made = Vec::new();
    for m in &p.members {
        let dir = member_dir(org_dir, &m.name);
        let mut names = vec![m.host.clone()];
        names.extend(p.tls_names.iter().filter(|n| **n != m.host).cloned());
        let (chain, key) = tls::cluster_member_cert(org_dir, &p.org, &m.name, &names)?;
        let conf = config(org_dir, p, m, &dir)?;
        made.push((dir, chain, key, conf));
    }
    let mut written = Vec::new();
    for (dir, chain, key, conf) in made {
        std::fs::create_dir_all(&dir).map_err(|source| WriteError::Io { path: dir.clone(), source })?;
        durable::write_bytes(&dir.join("server.key"), 0o600, Replace::Refuse, key.as_bytes())?;
        durable::write_bytes(&dir.join("server.pem"), 0o644, Replace::Refuse, chain.as_bytes())?;
        durable::write_bytes(&dir.join("ca.pem"), 0o644, Replace::Refuse, &ca_pem)?;
        let conf_path = dir.join("nats-server.conf");
        durable::write_bytes(&conf_path, 0o644, Replace::Refuse, conf.as_bytes())?;
        written.push(conf_path);
    }
    Ok(written)
}

/// One server's `nats-server.conf`.
fn config(org_dir: &Path, p: &ClusterParams, m: &Member, written_to: &Path) -> Result<String, ClusterError> {
    let home = match &p.config_dir {
        Some(d) => d.clone(),
        None => std::path::absolute(written_to)
            .map_err(|source| WriteError::Io { path: written_to.into(), source })?,
    };
    let store = p.store_dir.clone().unwrap_or_else(|| home.join("data"));
    let (client, route) = p.ports(m);
    let routes: Vec<String> = p
        .members
        .iter()
        .filter(|o| o.name != m.name)
        .map(|o| format!("        \"nats-route://{}:{}\"", o.host, p.ports(o).1))
        .collect();
    let file = |f: &str| home.join(f).display().to_string();
    Ok(format!(
        "# perch: server '{name}' of cluster '{cluster}' for org '{org}'.\n\
         # Start it with `nats-server -c {conf}`.\n\
         server_name: \"{name}\"\n\
         listen: \"{bind}:{client}\"\n\
         # Clients learn the other servers from this: their certificates name these hosts.\n\
         client_advertise: \"{host}:{client}\"\n\
         jetstream {{\n    store_dir: \"{js}\"\n    domain: \"{domain}\"\n}}\n\
         cluster {{\n    name: \"{cluster}\"\n    listen: \"{bind}:{route}\"\n    advertise: \"{host}:{route}\"\n\
         \x20   routes: [\n{routes}\n    ]\n\
         \x20   tls {{\n        cert_file: \"{cert}\"\n        key_file: \"{key}\"\n        ca_file: \"{ca}\"\n        verify: true\n        timeout: 5\n    }}\n}}\n\
         {leaf}\
         {operator}\
         tls {{\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n    timeout: 5\n}}\n",
        name = m.name,
        cluster = p.name,
        org = p.org,
        conf = file("nats-server.conf"),
        bind = p.bind,
        host = m.host,
        // nats-server keeps its streams in `jetstream/` under this.
        js = store.display(),
        domain = p.domain,
        leaf = leaf_listener(
            &p.bind,
            p.leaf_port(m),
            Some(&format!("{}:{}", m.host, p.leaf_port(m))),
            &home.join("server.pem"), &home.join("server.key"), &home.join("ca.pem")),
        routes = routes.join("\n"),
        cert = file("server.pem"),
        key = file("server.key"),
        ca = file("ca.pem"),
        operator = nats::operator_block_of(org_dir, &store.join("jwt"), nats::HUB_RESOLVER_SYNC)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_syntax_is_name_host_and_optional_ports() {
        let m: Member = "n1=10.0.0.1".parse().unwrap();
        assert_eq!((m.name.as_str(), m.host.as_str(), m.ports), ("n1", "10.0.0.1", None));
        let m: Member = "n-2=nats2.example:4223:6223".parse().unwrap();
        assert_eq!((m.ports, m.leaf_port), (Some((4223, 6223)), None));
        let m: Member = "n3=h:1:2:3".parse().unwrap();
        assert_eq!((m.ports, m.leaf_port), (Some((1, 2)), Some(3)));
        for bad in [
            "n1",
            "=h",
            "n 1=h",
            "n1=",
            "n1=h:1",
            "n1=h:0:2",
            "n1=h:1:x",
            "n1=[::1]",
            "n1=h\"x",
            "n1=h:1:2:0",
            "n1=h:1:2:3:4",
        ] {
            assert!(bad.parse::<Member>().is_err(), "{bad} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn a_parsed_server_is_safe_to_write_into_a_config(s in "\\PC{0,80}") {
            // Whatever is accepted can go between quotes in nats-server's
            // config and into a certificate name unescaped.
            if let Ok(m) = s.parse::<Member>() {
                let safe = |t: &str| t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                proptest::prop_assert!(safe(&m.name) && safe(&m.host) && !m.host.is_empty());
                proptest::prop_assert!(m.ports.is_none_or(|(c, r)| c > 0 && r > 0));
                proptest::prop_assert!(m.leaf_port.is_none_or(|l| l > 0 && m.ports.is_some()));
            }
        }
    }

    fn params(members: &[&str]) -> ClusterParams {
        ClusterParams {
            org: "o".into(),
            name: "perch".into(),
            members: members.iter().map(|m| m.parse().unwrap()).collect(),
            bind: "0.0.0.0".into(),
            client_port: 4222,
            route_port: 6222,
            leaf_port: 7422,
            domain: "hub".into(),
            tls_names: vec![],
            config_dir: None,
            store_dir: None,
        }
    }

    #[test]
    fn clusters_need_three_distinct_servers_without_port_clashes() {
        assert!(params(&["a=h1", "b=h2"]).check().is_err());
        assert!(params(&["a=h1", "a=h2", "c=h3"]).check().is_err());
        assert!(params(&["a=h", "b=h", "c=h"]).check().is_err());
        assert!(params(&["a=h:1:2", "b=h:3:4", "c=h:5:1"]).check().is_err());
        assert!(params(&["a=h:1:1", "b=h:3:4", "c=h:5:6"]).check().is_err());
        assert!(params(&["a=h1", "b=h2", "c=h3"]).check().is_ok());
        // One host needs a leafnode port per server too.
        assert!(params(&["a=h:1:2", "b=h:3:4", "c=h:5:6"]).check().is_err());
        assert!(params(&["a=h:1:2:7", "b=h:3:4:7", "c=h:5:6:9"]).check().is_err());
        assert!(params(&["a=h:1:2:2", "b=h:3:4:8", "c=h:5:6:9"]).check().is_err());
        assert!(params(&["a=h:1:2:7", "b=h:3:4:8", "c=h:5:6:9"]).check().is_ok());
        let mut p = params(&["a=h1", "b=h2", "c=h3"]);
        p.domain = "a.b".into();
        assert!(p.check().is_err());
    }
}
