//! The TLS listener's configuration (rustls with the ring provider, as everywhere in the
//! agent) and the identity a client certificate carries.
//!
//! With `broker.tls_client_ca_file`, a client must present a certificate signed by that CA
//! (rustls verifies chain, validity and the client-auth usage); the certificate then names
//! the client, as Mosquitto's `use_identity_as_username`: the username the ACL sees is its
//! common name or first DNS name, and the CONNECT's username and password are ignored.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{CertIdentity, TlsListener};

/// The rustls server configuration for `listener`.
///
/// # Errors
/// When a file cannot be read or holds no usable certificate or key; the message names the
/// key.
pub fn server_config(listener: &TlsListener) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("broker.tls_cert_file", &listener.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&listener.key_file).with_context(|| {
        format!(
            "broker.tls_key_file {}: no PEM private key could be read",
            listener.key_file.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &listener.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("broker.tls_client_ca_file", path)? {
                roots.add(ca).with_context(|| {
                    format!(
                        "broker.tls_client_ca_file {}: not a usable CA certificate",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("broker.tls_client_ca_file: building the client verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "broker.tls_cert_file {} and broker.tls_key_file {} do not make a usable pair",
            listener.cert_file.display(),
            listener.key_file.display()
        )
    })?;
    Ok(Arc::new(config))
}

fn read_certs(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("{key} {}: cannot read PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("{key} {}: no certificate in the file", path.display());
    }
    Ok(certs)
}

/// The client's name in its (already verified) certificate, or `None` when the certificate
/// has no such name, has several (ambiguous), or names one of the broker's reserved `$`
/// identities.
pub fn identity(cert: &CertificateDer<'_>, which: CertIdentity) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = match which {
        CertIdentity::DnsName => parsed.valid_dns_names().next().map(str::to_owned),
        CertIdentity::CommonName => common_name(parsed.subject()),
    }?;
    (!name.is_empty() && !name.starts_with('$')).then_some(name)
}

/// OID 2.5.4.3 (id-at-commonName), DER-encoded.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

/// The one common name in a DER-encoded X.501 Name's content (the RDN SETs, as webpki
/// returns it); `None` when there is none, more than one, or it is not a text string.
///
/// Written here rather than pulled from an X.509 crate: webpki (already in the binary)
/// parses and verifies the certificate but does not expose the subject's attributes, and
/// this walk over an already-verified certificate is three flat loops over definite lengths.
fn common_name(subject: &[u8]) -> Option<String> {
    let mut found = None;
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, set, rest) = tlv(rdns)?;
        rdns = rest;
        if tag != 0x31 {
            return None;
        }
        let mut attrs = set;
        while !attrs.is_empty() {
            let (tag, attr, rest) = tlv(attrs)?;
            attrs = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = tlv(attr)?;
            if oid_tag != 0x06 || oid != CN_OID {
                continue;
            }
            let (value_tag, text, _) = tlv(value)?;
            // UTF8String, PrintableString, IA5String.
            if !matches!(value_tag, 0x0c | 0x13 | 0x16) || found.is_some() {
                return None;
            }
            found = Some(std::str::from_utf8(text).ok()?.to_owned());
        }
    }
    found
}

/// One DER tag-length-value: (tag, value, what follows). Single-byte tags and lengths up
/// to 64 KiB, which is all a certificate's name uses.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    let value = rest.get(..len)?;
    Some((tag, value, rest.get(len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SET { SEQUENCE { OID, value } } for one attribute.
    fn rdn(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        let mut attr = vec![0x06, oid.len() as u8];
        attr.extend_from_slice(oid);
        attr.extend([tag, value.len() as u8]);
        attr.extend_from_slice(value);
        let mut seq = vec![0x30, attr.len() as u8];
        seq.extend(attr);
        let mut set = vec![0x31, seq.len() as u8];
        set.extend(seq);
        set
    }

    const O_OID: &[u8] = &[0x55, 0x04, 0x0a];

    #[test]
    fn common_name_is_read_from_the_subject() {
        let mut subject = rdn(O_OID, 0x0c, b"Plant 4");
        subject.extend(rdn(CN_OID, 0x0c, b"press-7"));
        assert_eq!(common_name(&subject).as_deref(), Some("press-7"));
        assert_eq!(
            common_name(&rdn(CN_OID, 0x13, b"lathe-1")).as_deref(),
            Some("lathe-1")
        );
    }

    #[test]
    fn missing_ambiguous_or_odd_common_names_name_nobody() {
        assert_eq!(common_name(&rdn(O_OID, 0x0c, b"Plant 4")), None);
        let mut two = rdn(CN_OID, 0x0c, b"a");
        two.extend(rdn(CN_OID, 0x0c, b"b"));
        assert_eq!(common_name(&two), None);
        // BMPString: not taken as text.
        assert_eq!(common_name(&rdn(CN_OID, 0x1e, b"\0a")), None);
        // Truncated input.
        let whole = rdn(CN_OID, 0x0c, b"press-7");
        assert_eq!(common_name(&whole[..whole.len() - 1]), None);
        assert_eq!(common_name(&[0x31, 0x84, 0, 0, 0, 1]), None);
    }
}
