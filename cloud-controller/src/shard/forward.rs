//! A request for a node of another replica's shard, passed to that replica (its owner) inside
//! the cluster, with the owner's answer passed back unchanged.
//!
//! Agents reach the controller through one Service, Ingress or load balancer, so they cannot
//! pick the owner themselves. The replica that took the request forwards it as it came (the
//! node's token included: the owner authenticates it, as for a request of its own) and
//! streams both bodies, so nothing is buffered here and desired streams pass through.
//!
//! Bounds: at most `--max-forwards` forwarded requests at once (a desired stream counts for
//! its whole life; more are answered 503 and counted), and the owner's answer must begin
//! within `--forward-timeout-seconds`. A forwarded request carries [`FORWARDED_BY`]: a
//! replica that takes one for a shard it no longer owns answers 503 rather than passing it on
//! again, so requests never circle while a shard moves.
//!
//! With TLS (`--tls-cert`), every replica serves the same certificate (one Secret), and a
//! forward trusts exactly that certificate: the owner's address is a pod address, which no
//! certificate for the agents' host name covers.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use edgesync_protocol::wire::ErrorBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::route::Owner;
use crate::metrics::Metrics;

/// Header naming the replica that forwarded a request.
pub const FORWARDED_BY: &str = "x-edgesync-forwarded-by";

/// Headers that belong to one connection, not to the request (RFC 9110, 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Passes requests to the owners of other replicas' shards.
pub struct Forwarder {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
    scheme: &'static str,
    identity: HeaderValue,
    slots: Arc<Semaphore>,
    /// The live API's reads of other replicas' parts, counted apart from the agents'
    /// requests: a crowd of `devicestates` watches never leaves a node's batch unforwarded.
    read_slots: Arc<Semaphore>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// How a forward went, as counted in `edgesync_controller_forwarded_requests_total`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// The owner answered (whatever its status).
    Answered,
    /// The owner could not be reached, or its connection failed before the answer began.
    Unreachable,
    /// The owner's answer did not begin in time.
    TimedOut,
    /// `--max-forwards` were in flight.
    Busy,
    /// No replica could serve the shard (a hand-over): not forwarded.
    Moving,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Unreachable => "unreachable",
            Self::TimedOut => "timed_out",
            Self::Busy => "busy",
            Self::Moving => "moving",
        }
    }
}

impl Forwarder {
    /// A forwarder for replica `identity`; `tls_cert`: the certificate every replica serves
    /// (`--tls-cert`), when the agent API uses TLS.
    ///
    /// # Errors
    /// When the certificate cannot be read.
    pub fn new(
        identity: &str,
        tls_cert: Option<(&Path, &Path)>,
        max_in_flight: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (config, scheme) = match tls_cert {
            Some((cert, key)) => {
                let (certs, _) = crate::tls::read_pair((cert, "--tls-cert"), (key, "--tls-key"))?;
                let pinned = certs.into_iter().next().context("--tls-cert is empty")?;
                let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                    .with_safe_default_protocol_versions()
                    .context("TLS protocol versions")?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SameCertificate {
                        certificate: pinned,
                        provider: Arc::clone(&provider),
                    }))
                    .with_no_client_auth();
                (config, "https")
            }
            None => {
                // Never used for a handshake (plain http), but the connector wants one.
                let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                    .with_safe_default_protocol_versions()
                    .context("TLS protocol versions")?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                (config, "http")
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            client,
            scheme,
            identity: HeaderValue::from_str(identity)
                .unwrap_or_else(|_| HeaderValue::from_static("unnamed")),
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            read_slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            timeout,
            metrics,
        })
    }

    /// Passes `request` to `owner` and its answer back (or a 503 saying why not).
    pub async fn forward(&self, owner: &Owner, request: Request<Body>) -> Response {
        let Some(address) = owner.address.as_deref() else {
            return moving(&self.metrics);
        };
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", axum::http::uri::PathAndQuery::as_str)
            .to_owned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        match self
            .send(parts.method, address, &path, parts.headers, body)
            .await
        {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(outcome) => {
                let message = match outcome {
                    Outcome::Busy => "the controller forwards as many requests to other replicas as --max-forwards allows; retry later".to_owned(),
                    Outcome::TimedOut => format!(
                        "the replica serving this node ({}) did not answer in time; retry later",
                        owner.identity
                    ),
                    _ => format!(
                        "the replica serving this node ({}) could not be reached; retry later",
                        owner.identity
                    ),
                };
                unavailable("shard_unavailable", message)
            }
        }
    }

    /// Sends a `method` request for `path` (with its query) and `headers` to the replica at
    /// `address`; its answer (whatever its status) holds a `--max-forwards` slot until its
    /// body is finished or dropped. Counted in `forwarded_requests_total` either way.
    ///
    /// # Errors
    /// Why no answer came: [`Outcome::Busy`], [`Outcome::Unreachable`] or
    /// [`Outcome::TimedOut`].
    pub async fn send(
        &self,
        method: axum::http::Method,
        address: &str,
        path: &str,
        headers: axum::http::HeaderMap,
        body: Body,
    ) -> Result<axum::http::Response<Body>, Outcome> {
        self.send_within(&self.slots, method, address, path, headers, body)
            .await
    }

    /// A GET of the live API's internal routes on another replica, as [`Forwarder::send`]
    /// but within its own `--max-forwards` slots.
    ///
    /// # Errors
    /// As [`Forwarder::send`].
    pub async fn read(
        &self,
        address: &str,
        path: &str,
        headers: axum::http::HeaderMap,
    ) -> Result<axum::http::Response<Body>, Outcome> {
        let get = axum::http::Method::GET;
        self.send_within(&self.read_slots, get, address, path, headers, Body::empty())
            .await
    }

    async fn send_within(
        &self,
        slots: &Arc<Semaphore>,
        method: axum::http::Method,
        address: &str,
        path: &str,
        mut headers: axum::http::HeaderMap,
        body: Body,
    ) -> Result<axum::http::Response<Body>, Outcome> {
        let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
            self.count(Outcome::Busy);
            return Err(Outcome::Busy);
        };
        let Ok(uri) = format!("{}://{address}{path}", self.scheme).parse::<Uri>() else {
            debug!(address, "A replica advertises an unusable address");
            self.count(Outcome::Unreachable);
            return Err(Outcome::Unreachable);
        };
        headers.insert(HeaderName::from_static(FORWARDED_BY), self.identity.clone());
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = axum::http::Version::HTTP_11;
        *request.headers_mut() = headers;
        let answer = tokio::time::timeout(self.timeout, self.client.request(request)).await;
        let outcome = match answer {
            Ok(Ok(response)) => {
                self.count(Outcome::Answered);
                let (parts, body) = response.into_parts();
                return Ok(axum::http::Response::from_parts(
                    parts,
                    Body::new(Held {
                        inner: body,
                        _permit: permit,
                    }),
                ));
            }
            Ok(Err(e)) => {
                debug!(address, error = %e, "A request to another replica failed");
                Outcome::Unreachable
            }
            Err(_) => Outcome::TimedOut,
        };
        self.count(outcome);
        Err(outcome)
    }

    fn count(&self, outcome: Outcome) {
        self.metrics.forwarded(outcome.label());
    }
}

/// The answer while a shard has no replica to serve it (counted as `moving`).
pub fn moving(metrics: &Metrics) -> Response {
    metrics.forwarded(Outcome::Moving.label());
    unavailable(
        "shard_moving",
        "this node's shard is moving between controller replicas; retry in a moment",
    )
}

fn unavailable(code: &'static str, message: impl Into<String>) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(ErrorBody::new(code, message)),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn strip_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    // Headers a Connection header names are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    for h in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(h);
    }
}

/// The owner's answer body, holding the forward's slot until it is finished or dropped.
struct Held {
    inner: hyper::body::Incoming,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Trusts exactly one certificate: the one every replica serves. Handshake signatures are
/// still checked, by the crypto provider.
#[derive(Debug)]
struct SameCertificate {
    certificate: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SameCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
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
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_not_passed_on() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["authorization", "content-encoding"]);
    }
}
