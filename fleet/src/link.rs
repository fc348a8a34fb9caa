//! The operator's connection to the fleet's NATS: a FLEET credential, TLS
//! trusting only the fleet CA.

use std::path::{Path, PathBuf};

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
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("NATS: {0}")]
    Nats(String),
}

impl Target {
    /// Connects; `name` is what the server's monitoring shows.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectError> {
        let nats = |e: &dyn std::fmt::Display| ConnectError::Nats(e.to_string());
        let tls = perch_net::tls::client_config(&perch_net::CaTrust::Certificate(read_ca(&self.ca)?))
            .map_err(|e| nats(&e))?;
        async_nats::ConnectOptions::with_credentials_file(&self.creds)
            .await
            .map_err(|e| ConnectError::File { path: self.creds.clone(), detail: e.to_string() })?
            .require_tls(true)
            .tls_client_config(tls)
            .name(name)
            .connect(perch_net::server_addrs(&self.urls).map_err(|e| nats(&e))?)
            .await
            .map_err(|e| nats(&e))
    }
}

fn read_ca(path: &Path) -> Result<Vec<u8>, ConnectError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .map(|c| c.as_ref().to_vec())
        .map_err(|e| ConnectError::File { path: path.into(), detail: format!("no PEM certificate: {e}") })
}
