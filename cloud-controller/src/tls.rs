//! Optional TLS for the agent API (`--tls-cert`, `--tls-key`), with rustls and the ring
//! provider (no OpenSSL); ALPN offers h2 and HTTP/1.1. Handshakes run in the connection's own
//! task under the header timeout (see `server`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Reads a PEM certificate chain and private key into a server config.
///
/// # Errors
/// When a file cannot be read or holds no usable certificate or key; the message names it.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = read_pair((cert, "--tls-cert"), (key, "--tls-key"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the certificate (--tls-cert) and key (--tls-key) do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads a PEM certificate chain and private key, each given by the flag named beside it
/// (errors name the file and the flag).
///
/// # Errors
/// When a file cannot be read, or holds no certificate or no private key.
pub fn read_pair(
    (cert, cert_flag): (&Path, &str),
    (key, key_flag): (&Path, &str),
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the certificate chain in {} ({cert_flag})",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} ({cert_flag}) holds no PEM certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "cannot read a PEM private key from {} ({key_flag})",
            key.display()
        )
    })?;
    Ok((certs, key))
}
