//! TLS client configs that trust the fleet CA and nothing else: never the
//! system store.
//!
//! Before enrollment a device knows only the CA's SHA-256 fingerprint (from
//! its token; the whole certificate would not fit a QR code). The server
//! sends the CA in its chain, so [`CaTrust::Fingerprint`] picks the chain
//! certificate with that fingerprint and then verifies the server against it
//! exactly as it would against a configured root. After enrollment the
//! device holds the CA certificate itself ([`CaTrust::Certificate`]).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// What a device trusts a server's certificate by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaTrust {
    /// SHA-256 of the fleet CA certificate (DER).
    Fingerprint([u8; 32]),
    /// The fleet CA certificate (DER).
    Certificate(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("fleet CA certificate: {0}")]
    BadCa(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config that accepts only servers the fleet CA signed.
pub fn client_config(ca: &CaTrust) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let config = match ca {
        CaTrust::Certificate(der) => {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(der.clone())).map_err(|e| TlsError::BadCa(e.to_string()))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        CaTrust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: *fp, provider }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// SHA-256 of a certificate's DER bytes.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Verifies the server against the chain certificate whose fingerprint is
/// pinned; refuses the server if its chain does not carry that CA.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c.as_ref()) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
