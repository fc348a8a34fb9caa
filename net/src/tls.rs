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
use rustls::crypto::{CryptoProvider, KeyProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::SigningKey;
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

/// ring's TLS 1.3 suites, key exchanges and signature checks, without its
/// private-key loader: perch's clients authenticate with NATS credentials,
/// never with a TLS client certificate. Leaving the loader out drops ring's
/// RSA and ECDSA signing from the agent (rustls is built with
/// `custom-provider`, so nothing else links ring's whole default provider).
fn provider() -> Arc<CryptoProvider> {
    let provider =
        Arc::new(CryptoProvider { key_provider: &NoClientKeys, ..rustls::crypto::ring::default_provider() });
    // async-nats builds a config from the process default when it is not
    // handed one; perch always hands one, but never leave that path to panic.
    let _ = CryptoProvider::install_default(CryptoProvider::clone(&provider));
    provider
}

/// The key loader of [`provider`]: refuses every key.
#[derive(Debug)]
struct NoClientKeys;

impl KeyProvider for NoClientKeys {
    fn load_private_key(&self, _: PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General("perch does not use TLS client certificates".into()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::{ClientConnection, ServerConfig, ServerConnection};

    /// A fleet CA and a server certificate for `localhost`, both with keys
    /// of `alg`.
    fn fleet(alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, Vec<CertificateDer<'static>>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let server = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let ca_der = ca.der().to_vec();
        (ca_der.clone(), vec![server.der().clone(), ca_der.into()], key.serialize_der())
    }

    fn handshake(
        trust: &CaTrust,
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
    ) -> Result<(), rustls::Error> {
        let server_config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, PrivatePkcs8KeyDer::from(key).into())?;
        let mut server = ServerConnection::new(Arc::new(server_config))?;
        let config = client_config(trust).unwrap();
        let mut client = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn servers_with_the_usual_key_types_are_verified_against_the_fleet_ca() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let (ca, chain, key) = fleet(alg);
            handshake(&CaTrust::Certificate(ca.clone()), chain.clone(), key.clone()).unwrap();
            handshake(&CaTrust::Fingerprint(fingerprint(&ca)), chain, key).unwrap();
        }
    }

    #[test]
    fn another_ca_is_refused() {
        let (_, chain, key) = fleet(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (other, _, _) = fleet(&rcgen::PKCS_ECDSA_P256_SHA256);
        for trust in [CaTrust::Certificate(other.clone()), CaTrust::Fingerprint(fingerprint(&other))] {
            let err = handshake(&trust, chain.clone(), key.clone()).unwrap_err();
            assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
        }
    }

    #[test]
    fn client_keys_are_refused_and_the_process_default_is_perchs() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_der();
        let p = provider();
        let err = p.key_provider.load_private_key(PrivatePkcs8KeyDer::from(key).into()).unwrap_err();
        assert!(err.to_string().contains("TLS client certificates"), "{err}");
        let default = CryptoProvider::get_default().expect("installed by provider()");
        assert!(format!("{:?}", default.key_provider).contains("NoClientKeys"));
    }
}
