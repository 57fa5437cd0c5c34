//! The HTTP client the uplink and downlink use to reach the controller.
//!
//! TLS trusts the system's CA certificates plus `cloud.ca_file` (with `cloud.ca_file`, a box
//! without system certificates trusts that file alone). Minimal edge images often ship no CA
//! store at all, and the platform verifier refuses to start without one, so a plain `http://`
//! controller URL is given no roots: it needs none, and a redirect to https:// then fails
//! verification, as it should.

use reqwest::{Certificate, Client, ClientBuilder};

use crate::config::CloudSettings;

/// Builds a client for `cloud`, with `configure` applied (timeouts).
///
/// # Errors
/// When TLS cannot be set up: an `https://` URL on a system without CA certificates and no
/// `cloud.ca_file`.
pub fn http_client(
    cloud: &CloudSettings,
    configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
) -> reqwest::Result<Client> {
    if !cloud.url.starts_with("https://") {
        return configure(Client::builder().tls_certs_only(Vec::new())).build();
    }
    let extra = cloud
        .ca_pem
        .as_deref()
        // Validated when the config was read.
        .map(|pem| Certificate::from_pem_bundle(pem).unwrap_or_default())
        .unwrap_or_default();
    configure(Client::builder().tls_certs_merge(extra)).build()
}
