//! An operator's connection to the fleet's NATS from a creds file (a FLEET
//! user, `perch-bootstrap nats creds --account fleet`), TLS
//! trusting only the fleet CA.

use std::path::{Path, PathBuf};

use perch_support::exit::{Class, Classify};

/// Where and as whom the operator connects.
#[derive(Debug, Clone)]
pub struct Target {
    pub urls: Vec<String>,
    /// A FLEET user credential (`perch-bootstrap nats creds --account fleet`).
    pub creds: PathBuf,
    /// The fleet CA certificate (PEM), the only one trusted.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The creds or CA file: missing, unreadable, or not what it should be.
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    /// A bad --url.
    #[error("--url: {0}")]
    Url(String),
    /// The server did not accept the credential.
    #[error("{urls}: the server refused the credential in {}: {detail}", creds.display())]
    Refused { urls: String, creds: PathBuf, detail: String },
    /// TLS failed: not the fleet's server, or the wrong CA.
    #[error("{urls}: TLS failed (is {} the CA of this server's fleet?): {detail}", ca.display())]
    Tls { urls: String, ca: PathBuf, detail: String },
    #[error("cannot connect to {urls}: {detail}")]
    Unreachable { urls: String, detail: String },
}

impl Classify for ConnectError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            ConnectError::File { .. } | ConnectError::Url(_) => Class::Usage,
            ConnectError::Refused { .. } | ConnectError::Tls { .. } => Class::Security,
            ConnectError::Unreachable { .. } => Class::Runtime,
        })
    }
}

impl Target {
    /// Connects; `name` is what the server's monitoring shows.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectError> {
        let file = |path: &Path, detail: String| ConnectError::File { path: path.into(), detail };
        let tls = crate::tls::client_config(&crate::CaTrust::Certificate(read_ca(&self.ca)?))
            .map_err(|e| file(&self.ca, e.to_string()))?;
        let creds = String::from_utf8(read_small(&self.creds)?)
            .map_err(|_| file(&self.creds, "not a creds file (not UTF-8)".into()))?;
        let addrs = crate::server_addrs(&self.urls).map_err(|e| ConnectError::Url(e.to_string()))?;
        let urls = self.urls.join(",");
        async_nats::ConnectOptions::with_credentials(&creds)
            .map_err(|e| file(&self.creds, e.to_string()))?
            .require_tls(true)
            .tls_client_config(tls)
            .name(name)
            .connect(addrs)
            .await
            .map_err(|err| {
                let detail = err.to_string();
                let e = crate::LinkError::Connect { urls: urls.clone(), err };
                if e.is_auth_rejection() {
                    ConnectError::Refused { urls, creds: self.creds.clone(), detail }
                } else if e.is_tls_rejection() {
                    ConnectError::Tls { urls, ca: self.ca.clone(), detail }
                } else {
                    ConnectError::Unreachable { urls, detail }
                }
            })
    }
}

/// The largest creds or CA file read: both are a few KiB; a bound keeps a
/// wrong path (a disk image, /dev/zero) from costing the laptop its memory.
const MAX_FILE: usize = 256 * 1024;

fn read_small(path: &Path) -> Result<Vec<u8>, ConnectError> {
    use perch_support::durable::ReadError;
    perch_support::durable::read_bounded(path, MAX_FILE).map_err(|e| {
        let detail = match e {
            ReadError::Io { source, .. } => source.to_string(),
            ReadError::TooLarge { max, .. } => format!("larger than {max} bytes; not a creds or CA file"),
        };
        ConnectError::File { path: path.into(), detail }
    })
}

fn read_ca(path: &Path) -> Result<Vec<u8>, ConnectError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(&read_small(path)?)
        .map(|c| c.as_ref().to_vec())
        .map_err(|e| ConnectError::File { path: path.into(), detail: format!("no PEM certificate: {e}") })
}
