//! TLS for the live API: the server's certificate (given, or made at start as metrics-server
//! does), and the client certificate the API server's front proxy presents, verified against
//! the request-header CA and named by its common name.
//!
//! A client without a certificate still completes the handshake, so it gets a clear 401
//! instead of a TLS alert; one with a certificate the CA did not sign fails the handshake.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use x509_cert::der::Decode as _;
use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
use x509_cert::der::oid::ObjectIdentifier;

/// Names the certificate made at start is valid for: the Service deploy/ creates, and
/// loopback (an ExternalName Service pointing at `localhost`, as in tests).
const SELF_SIGNED_NAMES: [&str; 4] = [
    "localhost",
    "edgesync-live",
    "edgesync-live.edgesync-system",
    "edgesync-live.edgesync-system.svc",
];

/// The server configuration: `cert_key` (`--live-tls-cert-file`, `--live-tls-key-file`) or
/// a self-signed certificate, and client certificates verified against `client_ca_pem`.
///
/// # Errors
/// When a file cannot be read, the CA holds no usable certificate, or the pair does not fit.
pub fn server_config(
    cert_key: Option<(&Path, &Path)>,
    client_ca_pem: &str,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        let cert = cert.context("requestheader-client-ca-file holds an unreadable PEM block")?;
        roots
            .add(cert)
            .context("requestheader-client-ca-file holds a certificate that is not a usable CA")?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "kube-system/extension-apiserver-authentication: requestheader-client-ca-file holds no certificate"
    );
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("building the front-proxy certificate verifier")?;
    let (certs, key) = match cert_key {
        Some((cert, key)) => {
            crate::tls::read_pair((cert, "--live-tls-cert-file"), (key, "--live-tls-key-file"))?
        }
        None => self_signed()?,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the live API's certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn self_signed() -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let made = rcgen::generate_simple_self_signed(SELF_SIGNED_NAMES.map(String::from).to_vec())
        .context("making a self-signed certificate for the live API")?;
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    Ok((vec![made.cert.der().clone()], key.into()))
}

/// The subject common name of a DER certificate (the first, as the API server reads it).
pub fn common_name(der: &[u8]) -> Option<String> {
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .and_then(|atv| {
            atv.value
                .decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_owned())
                .or_else(|_| {
                    atv.value
                        .decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_owned())
                })
                .ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_certificate_serves_and_names_are_read_from_certificates() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "front-proxy-client");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        assert_eq!(common_name(ca.der()).as_deref(), Some("front-proxy-client"));
        assert_eq!(common_name(b"not a certificate"), None);
        // A self-signed serving certificate, trusting that CA for clients.
        assert!(server_config(None, &ca.pem()).is_ok());
        let e = server_config(None, "").unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
    }
}
