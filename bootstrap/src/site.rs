//! The configuration of a field site: a ground station running its own
//! nats-server, a leaf node of the fleet's hub with its own JetStream
//! domain. Drones connect to the site's server; its uplink to the hub
//! comes and goes. `site init` writes `ORG/sites/NAME/`:
//!
//! - `nats-server.conf`: client listener over TLS, JetStream in domain
//!   NAME, the operator with its own full resolver and preload (the site
//!   authenticates devices with no uplink, also after a restart), and one
//!   leaf remote per account (FLEET, PROVISIONING, SYS) to the hub;
//! - `leaf-fleet.creds`, `leaf-provisioning.creds`, `leaf-sys.creds`: the
//!   remotes' credentials, user `site-NAME` in each account;
//! - `site.creds`: FLEET user `site-NAME-daemon`, for `site run`;
//! - `ca.pem`, `server.pem`, `server.key`: the fleet CA, and the site
//!   server's certificate for its `--host` names, signed by it;
//! - `site.json`: [`SiteConfig`], what `site run` reads.

use std::path::{Path, PathBuf};

use nkeys::KeyPairType;
use perch_support::exit::{Class, Classify};
use serde::{Deserialize, Serialize};

use perch_protocol::subjects::SITE_LEAF_DENY;
use perch_support::durable::{self, Replace, WriteError};

use crate::server_conf::{check_domain, check_host};
use crate::{nats, tls};

/// The site's file `site run` reads.
pub const SITE_JSON: &str = "site.json";
/// Longer than any real `site.json`: hostile input, not a typo.
const MAX_SITE_JSON: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
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

impl Classify for SiteError {
    fn class(&self) -> Option<Class> {
        match self {
            SiteError::Invalid(_) | SiteError::Exists(_) => Some(Class::Usage),
            SiteError::Nats(e) => e.class(),
            SiteError::Tls(e) => e.class(),
            SiteError::Write(e) => e.class(),
        }
    }
}

/// What `site init` is asked to write.
pub struct SiteParams {
    pub org: String,
    /// The site's name: its JetStream domain, part of its server name.
    pub name: String,
    /// The hub's leafnode URLs, `tls://HOST:PORT`.
    pub hub_urls: Vec<String>,
    /// The hub's JetStream domain.
    pub hub_domain: String,
    /// DNS names or IPv4 addresses drones reach the site's server by; the
    /// first is in `client_url`.
    pub hosts: Vec<String>,
    pub client_port: u16,
    /// The address the site's server listens on.
    pub bind: String,
    /// Where the site's files are on the ground station (default: where written).
    pub config_dir: Option<PathBuf>,
    /// Where it keeps JetStream and account JWTs (default: CONFIG_DIR/data).
    pub store_dir: Option<PathBuf>,
    /// The most JetStream may keep on disk, in bytes (`max_file_store`).
    pub max_store: u64,
}

impl SiteParams {
    fn check(&self) -> Result<(), SiteError> {
        let bad = |m: String| Err(SiteError::Invalid(m));
        check_domain("site name", &self.name).map_err(SiteError::Invalid)?;
        check_domain("hub domain", &self.hub_domain).map_err(SiteError::Invalid)?;
        if self.name == self.hub_domain {
            return bad(format!(
                "site name '{}' is the hub's JetStream domain; a site needs a domain of its own",
                self.name
            ));
        }
        if self.hub_urls.is_empty() {
            return bad("give the hub's leafnode URL (--hub tls://HOST:7422)".into());
        }
        for u in &self.hub_urls {
            check_hub_url(u).map_err(SiteError::Invalid)?;
        }
        if self.hosts.is_empty() {
            return bad("give the name or address drones reach the site by (--host)".into());
        }
        for h in self.hosts.iter().chain([&self.bind]) {
            check_host(h).map_err(SiteError::Invalid)?;
        }
        if self.client_port == 0 {
            return bad("--client-port must be 1-65535".into());
        }
        if self.max_store == 0 {
            return bad("--max-store must be more than 0 bytes".into());
        }
        Ok(())
    }
}

/// A hub leafnode URL: `tls://HOST:PORT`, nothing else (the leaf always
/// uses TLS, and the host goes into the config between quotes).
fn check_hub_url(u: &str) -> Result<(), String> {
    let bad = || format!("--hub '{u}' is not tls://HOST:PORT");
    let rest = u.strip_prefix("tls://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    check_host(host).map_err(|_| bad())?;
    port.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad)?;
    Ok(())
}

/// Parses a disk size: bytes, or a number with K, M, G or T (powers of
/// 1024), e.g. `8G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("'{s}' is not a size like 8G, 512M or 1073741824");
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).filter(|&b| b > 0 && b <= i64::MAX as u64).ok_or_else(bad)
}

/// What `perch-bootstrap site run` needs to know about its site
/// (`site.json`). Paths are where the files are on the ground station.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    /// The site's JetStream domain (its name).
    pub domain: String,
    /// The hub's JetStream domain: the site reaches the hub's streams at
    /// `$JS.<hub_domain>.API`.
    pub hub_domain: String,
    /// The hub's leafnode URLs.
    pub hub_urls: Vec<String>,
    /// Where clients at the site reach its server: `tls://FIRST_HOST:PORT`.
    pub client_url: String,
    /// The most the site's JetStream keeps on disk, in bytes.
    pub store_limit: u64,
    /// The daemon's FLEET credentials (`site.creds`).
    pub creds: PathBuf,
    /// The fleet CA (`ca.pem`).
    pub ca: PathBuf,
}

/// Why `site.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SiteConfigError {
    #[error(transparent)]
    Read(#[from] durable::ReadError),
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
}

impl Classify for SiteConfigError {
    fn class(&self) -> Option<Class> {
        Some(Class::Usage)
    }
}

impl SiteConfig {
    /// Reads and checks `site.json`.
    pub fn load(path: &Path) -> Result<SiteConfig, SiteConfigError> {
        let bytes = durable::read_bounded(path, MAX_SITE_JSON)?;
        Self::parse(&bytes, path)
    }

    /// Checks `bytes` as the `site.json` at `path` (named in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<SiteConfig, SiteConfigError> {
        let invalid = |detail: String| SiteConfigError::Invalid { path: path.into(), detail };
        // serde quotes an unknown field's name, which may hold a newline.
        let c: SiteConfig =
            serde_json::from_slice(bytes).map_err(|e| invalid(controls_escaped(&e.to_string())))?;
        check_domain("name", &c.name).map_err(invalid)?;
        check_domain("domain", &c.domain).map_err(invalid)?;
        check_domain("hub_domain", &c.hub_domain).map_err(invalid)?;
        if c.domain == c.hub_domain {
            return Err(invalid(format!("domain '{}' is also the hub's domain", c.domain)));
        }
        for u in &c.hub_urls {
            check_hub_url(u).map_err(invalid)?;
        }
        if c.hub_urls.is_empty() || c.client_url.is_empty() || c.store_limit == 0 {
            return Err(invalid("hub_urls, client_url and store_limit must not be empty".into()));
        }
        Ok(c)
    }

    /// Writes it (mode 0644).
    pub fn save(&self, path: &Path, replace: Replace) -> Result<(), WriteError> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| WriteError::Io {
            path: path.into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        text.push('\n');
        durable::write_bytes(path, 0o644, replace, text.as_bytes())
    }
}

/// `s` with its control characters escaped (`\n`): one line, whatever it quotes.
fn controls_escaped(s: &str) -> String {
    s.chars().fold(String::with_capacity(s.len()), |mut out, c| {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        out
    })
}

/// The directory of a site's files in the org.
pub fn site_dir(org_dir: &Path, name: &str) -> PathBuf {
    org_dir.join("sites").join(name)
}

/// The site server's name (`server_name`): unique next to the hub's.
pub fn server_name(site: &str) -> String {
    format!("site-{site}")
}

/// One account's leaf remote: its credentials file and the NATS user in it.
struct Leaf {
    account: &'static str,
    file: &'static str,
    /// The org's key that signs the user: the account's signing key, or
    /// the account itself where it has none.
    signer: &'static str,
}

const LEAVES: [Leaf; 3] = [
    Leaf { account: "FLEET", file: "leaf-fleet.creds", signer: "fleet-signing.nk" },
    Leaf { account: "PROVISIONING", file: "leaf-provisioning.creds", signer: "provisioning-signing.nk" },
    Leaf { account: "SYS", file: "leaf-sys.creds", signer: "sys.nk" },
];

/// A leaf connection's permissions: a leaf node only, so the credential is
/// no use to a client. (Putting the plain-message deny list here too, so
/// the hub enforces it, stopped the JetStream copies from flowing on 2.9:
/// the list stays in the site's config only.)
fn leaf_perms() -> nats::Permissions {
    nats::Permissions { connection_types: vec![nats::LEAFNODE], ..Default::default() }
}

/// The site daemon's: a client only.
fn daemon_perms() -> nats::Permissions {
    nats::Permissions { connection_types: vec![nats::STANDARD], ..Default::default() }
}

/// A user credential in `account` signed by `signer` (a seed file in
/// `ORG/nats/`), with `perms`.
fn user_creds(
    org_dir: &Path,
    account: &str,
    signer: &str,
    name: &str,
    perms: &nats::Permissions,
    now: u64,
) -> Result<String, SiteError> {
    let signer = nats::read_seed(&nats::nats_dir(org_dir).join(signer))?;
    let account_pub = nats::account_public(org_dir, account)?;
    let user = nats::new_key(KeyPairType::User)?;
    let jwt = nats::user_jwt(&signer, &account_pub, &user.public_key(), name, perms, now, None)?;
    Ok(nats::creds(&jwt, &user)?)
}

/// Writes `ORG/sites/NAME/`; returns the directory. Refuses to overwrite:
/// nothing is written if it exists, or if anything is missing.
pub fn write(org_dir: &Path, p: &SiteParams, now: u64) -> Result<PathBuf, SiteError> {
    p.check()?;
    let dir = site_dir(org_dir, &p.name);
    if dir.exists() {
        return Err(SiteError::Exists(dir));
    }
    let home = match &p.config_dir {
        Some(d) => d.clone(),
        None => std::path::absolute(&dir).map_err(|source| WriteError::Io { path: dir.clone(), source })?,
    };
    // Everything is made before anything is written.
    let ca = tls::tls_dir(org_dir).join(tls::CA_PEM);
    let ca_pem = std::fs::read(&ca).map_err(|source| WriteError::Io { path: ca, source })?;
    let server = server_name(&p.name);
    let (chain, key) = tls::cluster_member_cert(org_dir, &p.org, &server, &p.hosts)?;
    let mut files: Vec<(&str, u32, Vec<u8>)> = Vec::new();
    for l in &LEAVES {
        files.push((
            l.file,
            0o600,
            user_creds(org_dir, l.account, l.signer, &server, &leaf_perms(), now)?.into_bytes(),
        ));
    }
    let daemon = format!("{server}-daemon");
    files.push((
        "site.creds",
        0o600,
        user_creds(org_dir, "FLEET", "fleet-signing.nk", &daemon, &daemon_perms(), now)?.into_bytes(),
    ));
    files.push(("server.key", 0o600, key.into_bytes()));
    files.push(("server.pem", 0o644, chain.into_bytes()));
    files.push(("ca.pem", 0o644, ca_pem));
    files.push(("nats-server.conf", 0o644, config(org_dir, p, &home)?.into_bytes()));
    let site = SiteConfig {
        name: p.name.clone(),
        domain: p.name.clone(),
        hub_domain: p.hub_domain.clone(),
        hub_urls: p.hub_urls.clone(),
        client_url: format!("tls://{}:{}", p.hosts[0], p.client_port),
        store_limit: p.max_store,
        creds: home.join("site.creds"),
        ca: home.join("ca.pem"),
    };

    std::fs::create_dir_all(&dir).map_err(|source| WriteError::Io { path: dir.clone(), source })?;
    for (name, mode, bytes) in files {
        durable::write_bytes(&dir.join(name), mode, Replace::Refuse, &bytes)?;
    }
    site.save(&dir.join(SITE_JSON), Replace::Refuse)?;
    Ok(dir)
}

/// The site server's `nats-server.conf`, naming its files under `home`.
fn config(org_dir: &Path, p: &SiteParams, home: &Path) -> Result<String, SiteError> {
    let store = p.store_dir.clone().unwrap_or_else(|| home.join("data"));
    let file = |f: &str| home.join(f).display().to_string();
    let quoted = |items: &[&str]| items.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let urls: Vec<&str> = p.hub_urls.iter().map(String::as_str).collect();
    let mut remotes = Vec::new();
    for l in &LEAVES {
        // FLEET only: the other accounts hold no perch streams.
        let deny = if l.account == "FLEET" {
            let d = quoted(&SITE_LEAF_DENY);
            format!("            deny_imports: [{d}]\n            deny_exports: [{d}]\n")
        } else {
            String::new()
        };
        remotes.push(format!(
            "        {{\n            # {account}\n            urls: [{urls}]\n            account: \"{public}\"\n\
             \x20           credentials: \"{creds}\"\n            tls {{\n                ca_file: \"{ca}\"\n                timeout: 5\n            }}\n\
             {deny}        }}",
            account = l.account,
            urls = quoted(&urls),
            public = nats::account_public(org_dir, l.account)?,
            creds = file(l.file),
            ca = file("ca.pem"),
        ));
    }
    Ok(format!(
        "# perch: field site '{name}' of org '{org}', a leaf node of the hub (JetStream domain '{hub}').\n\
         # Start it with `nats-server -c {conf}`.\n\
         server_name: \"{server}\"\n\
         listen: \"{bind}:{port}\"\n\
         jetstream {{\n    store_dir: \"{js}\"\n    domain: \"{name}\"\n    max_file_store: {max}\n}}\n\
         # One leaf connection per account. Reports reach the hub only through a JetStream\n\
         # source, desired state and trust reach the site only through mirrors: never as\n\
         # plain messages over the leaf (exactly once, and no loops).\n\
         leafnodes {{\n    remotes: [\n{remotes}\n    ]\n}}\n\
         {operator}\
         tls {{\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n    timeout: 5\n}}\n",
        name = p.name,
        org = p.org,
        hub = p.hub_domain,
        conf = file("nats-server.conf"),
        server = server_name(&p.name),
        bind = p.bind,
        port = p.client_port,
        js = store.display(),
        max = p.max_store,
        remotes = remotes.join("\n"),
        operator = nats::operator_block_of(org_dir, &store.join("jwt"), nats::SITE_RESOLVER_SYNC)?,
        cert = file("server.pem"),
        key = file("server.key"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bytes_or_binary_units() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        for bad in ["", "0", "G", "8X", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_urls_are_tls_host_port() {
        assert!(check_hub_url("tls://hub.example:7422").is_ok());
        assert!(check_hub_url("tls://10.0.0.1:7422").is_ok());
        for bad in ["hub:7422", "nats://h:7422", "tls://h", "tls://h:0", "tls://h\":1", "tls://:7422"] {
            assert!(check_hub_url(bad).is_err(), "{bad}");
        }
    }

    fn params() -> SiteParams {
        SiteParams {
            org: "o".into(),
            name: "field-1".into(),
            hub_urls: vec!["tls://hub:7422".into()],
            hub_domain: "hub".into(),
            hosts: vec!["ground.example".into()],
            client_port: 4222,
            bind: "0.0.0.0".into(),
            config_dir: None,
            store_dir: None,
            max_store: 1 << 30,
        }
    }

    #[test]
    fn a_site_needs_its_own_domain_a_hub_and_a_host() {
        assert!(params().check().is_ok());
        let mut p = params();
        p.name = "hub".into();
        assert!(p.check().is_err());
        let mut p = params();
        p.name = "Field".into();
        assert!(p.check().is_err());
        let mut p = params();
        p.hub_urls.clear();
        assert!(p.check().is_err());
        let mut p = params();
        p.hosts = vec!["a b".into()];
        assert!(p.check().is_err());
    }

    #[test]
    fn site_json_round_trips_and_refuses_unknown_fields() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(SITE_JSON);
        let c = SiteConfig {
            name: "f".into(),
            domain: "f".into(),
            hub_domain: "hub".into(),
            hub_urls: vec!["tls://h:7422".into()],
            client_url: "tls://g:4222".into(),
            store_limit: 10,
            creds: "/etc/perch-site/site.creds".into(),
            ca: "/etc/perch-site/ca.pem".into(),
        };
        c.save(&path, Replace::Refuse).unwrap();
        assert_eq!(SiteConfig::load(&path).unwrap(), c);
        let text = std::fs::read_to_string(&path).unwrap().replace("\"name\"", "\"extra\": 1, \"name\"");
        std::fs::write(&path, text).unwrap();
        let e = SiteConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("unknown field") && !e.contains('\n'), "{e}");
        // Found by the fuzzer: a field's name with a newline in it.
        let e = SiteConfig::parse(br#"{"n\n x": 1}"#, Path::new("site.json")).unwrap_err().to_string();
        assert!(e.contains("n\\n x") && !e.contains('\n'), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn hostile_site_json_is_refused_in_one_line(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Err(e) = SiteConfig::parse(&data, Path::new("site.json")) {
                proptest::prop_assert!(!e.to_string().contains('\n'));
            }
        }

        #[test]
        fn a_site_json_with_any_field_mangled_is_refused_or_still_valid(
            name in "[a-z0-9-]{0,40}", hub in "[a-z0-9-]{0,40}", url in "\\PC{0,40}", limit in 0u64..4,
        ) {
            let doc = serde_json::json!({
                "name": name, "domain": name, "hub_domain": hub, "hub_urls": [url],
                "client_url": "tls://g:4222", "store_limit": limit, "creds": "c", "ca": "a",
            });
            if let Ok(c) = SiteConfig::parse(doc.to_string().as_bytes(), Path::new("site.json")) {
                proptest::prop_assert!(perch_net::sites::is_site_name(&c.name) && c.name != c.hub_domain && c.store_limit > 0);
            }
        }
    }
}
