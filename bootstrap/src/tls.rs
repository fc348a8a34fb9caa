//! The fleet's TLS: a fleet CA and a nats-server certificate in `ORG/tls/`.
//!
//! `init` makes them with rcgen, or takes the operator's own. The server
//! certificate file holds the chain (server, then CA): devices that know
//! only the CA's fingerprint find the CA in the chain the server sends.
//!
//! Both certificates are valid from 1970: drones without a real-time clock
//! boot in 1970 and must still be able to enroll.

use std::path::{Path, PathBuf};

use perch_support::exit::{Class, Classify};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use perch_support::durable::{self, read_bounded, Replace, WriteError};

pub const CA_PEM: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_PEM: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
const MAX_PEM: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("making certificates")]
    Rcgen(#[from] rcgen::Error),
    #[error("{}: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error(transparent)]
    Read(#[from] durable::ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl Classify for TlsError {
    fn class(&self) -> Option<Class> {
        match self {
            // A name or address no certificate can carry, a CA file that is not one.
            TlsError::Rcgen(_) | TlsError::Pem { .. } => Some(Class::Usage),
            TlsError::Read(e) => e.class(),
            TlsError::Write(e) => e.class(),
        }
    }
}

/// Where an org's TLS files live: `ORG/tls/`.
pub fn tls_dir(org_dir: &Path) -> PathBuf {
    org_dir.join("tls")
}

/// The operator's own CA and server certificate, to use instead of new ones.
pub struct OwnCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files of `ORG/tls/`, made (or read) but not written yet, so that
/// `init` can check everything before it creates anything.
pub struct TlsFiles {
    ca_key: Option<String>,
    ca_pem: String,
    server_chain: String,
    server_key: String,
}

/// Creates `ORG/tls/` with a new fleet CA and a server certificate for
/// `names` (DNS names or IP addresses), or copies the operator's own.
pub fn create(org_dir: &Path, org: &str, names: &[String], own: Option<&OwnCerts>) -> Result<(), TlsError> {
    prepare(org, names, own)?.write(org_dir)
}

/// Makes a new fleet CA and server certificate, or reads and checks the
/// operator's own; writes nothing.
pub fn prepare(org: &str, names: &[String], own: Option<&OwnCerts>) -> Result<TlsFiles, TlsError> {
    let mut ca_key_pem = None;
    let (ca_pem, server_chain, server_key) = match own {
        Some(o) => {
            let ca = pem_text(&o.ca)?;
            let ca_der = first_cert(&o.ca, &ca)?;
            let mut chain = pem_text(&o.cert)?;
            let chain_has_ca = CertificateDer::pem_slice_iter(chain.as_bytes())
                .filter_map(Result::ok)
                .any(|c| c.as_ref() == ca_der.as_ref());
            if !chain_has_ca {
                // Devices pinned to the CA fingerprint look for it in the chain.
                chain.push_str(&ca);
            }
            (ca, chain, pem_text(&o.key)?)
        }
        None => {
            let ca_key = KeyPair::generate()?;
            let ca_cert = ca_params(org)?.self_signed(&ca_key)?;
            let server_key = KeyPair::generate()?;
            let mut server = CertificateParams::new(names.to_vec())?;
            server.distinguished_name.push(DnType::CommonName, format!("perch nats-server for {org}"));
            server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            server.not_before = rcgen::date_time_ymd(1970, 1, 1);
            let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;
            ca_key_pem = Some(ca_key.serialize_pem());
            (ca_cert.pem(), format!("{}{}", server_cert.pem(), ca_cert.pem()), server_key.serialize_pem())
        }
    };
    Ok(TlsFiles { ca_key: ca_key_pem, ca_pem, server_chain, server_key })
}

impl TlsFiles {
    /// Writes `ORG/tls/`; refuses to overwrite any file.
    pub fn write(&self, org_dir: &Path) -> Result<(), TlsError> {
        let dir = tls_dir(org_dir);
        std::fs::create_dir_all(&dir).map_err(|source| WriteError::Io { path: dir.clone(), source })?;
        if let Some(k) = &self.ca_key {
            durable::write_bytes(&dir.join(CA_KEY), 0o600, Replace::Refuse, k.as_bytes())?;
        }
        durable::write_bytes(&dir.join(SERVER_KEY), 0o600, Replace::Refuse, self.server_key.as_bytes())?;
        durable::write_bytes(&dir.join(SERVER_PEM), 0o644, Replace::Refuse, self.server_chain.as_bytes())?;
        durable::write_bytes(&dir.join(CA_PEM), 0o644, Replace::Refuse, self.ca_pem.as_bytes())?;
        Ok(())
    }
}

/// The fleet CA's parameters: [`cluster_member_cert`] rebuilds them to sign
/// with the CA key, so they must not depend on anything but the org name.
fn ca_params(org: &str) -> Result<CertificateParams, TlsError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, format!("perch fleet CA for {org}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = rcgen::date_time_ymd(1970, 1, 1);
    Ok(ca)
}

/// A certificate for one server of a cluster, signed by the fleet CA that
/// `init` made (`ORG/tls/ca.key`): `(chain PEM, key PEM)`. It serves
/// clients and routes, so it is good for both TLS server and client auth.
pub fn cluster_member_cert(
    org_dir: &Path,
    org: &str,
    server: &str,
    names: &[String],
) -> Result<(String, String), TlsError> {
    let dir = tls_dir(org_dir);
    let key_path = dir.join(CA_KEY);
    let ca_key_pem = pem_text(&key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| TlsError::Pem { path: key_path.clone(), detail: format!("not a CA key: {e}") })?;
    let ca_cert = ca_params(org)?.self_signed(&ca_key)?;
    // The rebuilt CA must be the one devices trust, or nothing verifies.
    let ca_path = dir.join(CA_PEM);
    let ca_pem = pem_text(&ca_path)?;
    let trusted = first_cert(&ca_path, &ca_pem)?;
    let cn = format!("perch fleet CA for {org}");
    if !contains(trusted.as_ref(), &key_raw(&ca_key)) || !contains(trusted.as_ref(), cn.as_bytes()) {
        return Err(TlsError::Pem {
            path: key_path,
            detail: format!("is not the key of {}", ca_path.display()),
        });
    }
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(DnType::CommonName, format!("perch nats-server {server} for {org}"));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = rcgen::date_time_ymd(1970, 1, 1);
    let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
    Ok((format!("{}{ca_pem}", cert.pem()), key.serialize_pem()))
}

fn key_raw(key: &KeyPair) -> Vec<u8> {
    key.public_key_raw().to_vec()
}

/// Whether `der` holds `part` (a public key, a name): a certificate check
/// that needs no X.509 parser.
fn contains(der: &[u8], part: &[u8]) -> bool {
    !part.is_empty() && der.windows(part.len()).any(|w| w == part)
}

/// Where an org keeps its fleet CA certificate (PEM).
pub fn ca_cert_path(org_dir: &Path) -> std::path::PathBuf {
    tls_dir(org_dir).join(CA_PEM)
}

/// The fleet CA certificate (DER) of an org.
pub fn ca_der(org_dir: &Path) -> Result<Vec<u8>, TlsError> {
    let path = ca_cert_path(org_dir);
    let text = pem_text(&path)?;
    Ok(first_cert(&path, &text)?.as_ref().to_vec())
}

/// The nats-server `tls {}` block for the include.
pub fn server_block(org_dir: &Path) -> String {
    let dir = tls_dir(org_dir);
    format!(
        "tls {{\n    cert_file: \"{}\"\n    key_file: \"{}\"\n    timeout: 5\n}}\n",
        dir.join(SERVER_PEM).display(),
        dir.join(SERVER_KEY).display()
    )
}

fn pem_text(path: &Path) -> Result<String, TlsError> {
    String::from_utf8(read_bounded(path, MAX_PEM)?)
        .map_err(|_| TlsError::Pem { path: path.into(), detail: "not PEM text".into() })
}

fn first_cert(path: &Path, text: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(text.as_bytes())
        .map_err(|e| TlsError::Pem { path: path.into(), detail: format!("no certificate: {e}") })
}
