//! Starting the live API: the front proxy's settings from the cluster, the TLS
//! configuration, the listener and the routes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::api::{LiveApi, router};
use super::authn::RequestHeader;
use super::state::Live;
use super::tls;
use crate::cli::RunOptions;
use crate::metrics::Metrics;

/// Where every aggregated API server reads the front proxy's settings from.
const AUTHENTICATION_CONFIGMAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");

/// A bound live API, ready to serve.
pub struct Ready {
    /// Its listener.
    pub listener: TcpListener,
    /// TLS, verifying the front proxy's certificate.
    pub tls: Arc<rustls::ServerConfig>,
    /// Its routes.
    pub router: axum::Router,
}

/// What the live API serves, and with what.
pub struct Serving {
    /// This replica's live state.
    pub live: Arc<Live>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Ends watches.
    pub shutdown: CancellationToken,
    /// Whether the live state is whole (503 before).
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// `--live-max-watches`, shared with the other replicas' watches of this one.
    pub watches: Arc<tokio::sync::Semaphore>,
    /// With shards: reads merged from every replica.
    pub fleet: Option<Arc<super::fleet::Fleet>>,
}

/// Reads the front proxy's settings, makes or reads the certificate and binds `addr`.
/// The request-header CA is read once, at start: restart the controller after rotating it.
///
/// # Errors
/// When the ConfigMap cannot be read or lacks the settings, a certificate is unusable, or the
/// address cannot be bound; each message says what to do.
pub async fn prepare(
    addr: std::net::SocketAddr,
    opts: &RunOptions,
    client: Client,
    serving: Serving,
) -> anyhow::Result<Ready> {
    let Serving {
        live,
        metrics,
        shutdown,
        ready,
        watches,
        fleet,
    } = serving;
    let (ns, name) = AUTHENTICATION_CONFIGMAP;
    let configmap = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| {
            format!(
                "cannot read ConfigMap {ns}/{name}, which says whom to trust as the API server's front proxy: \
                 grant the controller the extension-apiserver-authentication-reader Role in {ns} (deploy/ does), \
                 or run without --live-listen"
            )
        })?;
    let request_header = RequestHeader::from_configmap(&configmap.data.unwrap_or_default())
        .context("--live-listen")?;
    let cert_key = opts
        .live_tls_cert_file
        .as_deref()
        .zip(opts.live_tls_key_file.as_deref());
    let tls = tls::server_config(cert_key, &request_header.client_ca_pem)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--live-listen)"))?;
    let api = LiveApi::new(
        live,
        client,
        request_header,
        Duration::from_secs(opts.live_authz_cache_seconds),
        watches,
        metrics,
        shutdown,
    )
    .serving_when(ready)
    .merging(fleet);
    Ok(Ready {
        listener,
        tls,
        router: router(Arc::new(api)),
    })
}
