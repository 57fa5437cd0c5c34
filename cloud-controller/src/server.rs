//! The HTTP(S) server: accepts connections within a cap and serves the router on each with
//! hyper-util, closing sockets that are slow or idle.
//!
//! axum's `serve` runs hyper without a timer, so hyper's header timeout is off and nothing
//! ever closes a socket: 5,000 idle connections were held for good, and under the usual
//! 1,024 open-files limit 1,100 of them took the controller off the air. Here:
//! - at most `max_connections` connections are served; one more is accepted and closed at once
//!   (counted), so accepting never stops and the listen queue never fills with them;
//! - a TLS handshake must finish, and a request head must arrive, within `header_timeout` of
//!   the connection's start or of its last response: a socket that sends nothing, a slowloris
//!   client and an idle keep-alive connection are closed alike (hyper's own header timer,
//!   also set, starts only with the first byte);
//! - a connection serving a request (until its response body is finished, so desired streams
//!   count) is closed when no byte has moved either way for `idle_timeout`;
//! - request bodies and whole requests have their own deadlines in the handlers.
//!
//! On shutdown the listener closes, every connection is asked to finish (HTTP/1 after its
//! current response, HTTP/2 with GOAWAY), and those still open after `drain` are dropped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use edgesync_protocol::rate::LogThrottle;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// TLS handshake, and each request's headers (HTTP/1: also idle time between requests).
    pub header_timeout: Duration,
    /// No byte moving either way for this long closes the connection.
    pub idle_timeout: Duration,
    /// How long open connections may take to finish at shutdown.
    pub drain: Duration,
}

/// Serves `router` on `listener` until `shutdown`, then drains the connections.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tls = tls.map(TlsAcceptor::from);
    let mut connections = JoinSet::new();
    let mut accept_errors = LogThrottle::new(Duration::from_secs(10));
    let mut refusals = LogThrottle::new(Duration::from_secs(10));
    let epoch = Instant::now();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished connections as we go, so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                metrics.accept_errors.inc();
                if let Some(repeated) = accept_errors.allow(Instant::now()) {
                    warn!(error = %e, repeated, "Cannot accept connections (out of file descriptors? raise the open-files limit, or lower --max-connections)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.connections_refused.inc();
            if let Some(repeated) = refusals.allow(Instant::now()) {
                warn!(%peer, repeated, max_connections = limits.max_connections, "Connection refused: --max-connections reached");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, limits, tls, metrics) = (
            router.clone(),
            limits.clone(),
            tls.clone(),
            Arc::clone(&metrics),
        );
        let stop = shutdown.clone();
        connections.spawn(async move {
            metrics.connections_open.inc();
            serve_connection(stream, tls, router, &limits, &metrics, epoch, stop).await;
            metrics.connections_open.dec();
            drop(slot);
            tracing::trace!(%peer, "Connection closed");
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            open = connections.len(),
            "Dropping connections still open at the end of the drain"
        );
        connections.shutdown().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: &Limits,
    metrics: &Metrics,
    epoch: Instant,
    shutdown: CancellationToken,
) {
    let state = Arc::new(ConnState::new(epoch));
    let io = Tracked {
        inner: stream,
        state: Arc::clone(&state),
    };
    match tls {
        None => run_http(io, None, router, limits, metrics, &state, shutdown).await,
        Some(acceptor) => {
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(io)).await {
                Ok(Ok(tls)) => {
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(<[_]>::first)
                        .map(|c| ClientCertificate(Arc::new(c.clone().into_owned())));
                    run_http(tls, peer, router, limits, metrics, &state, shutdown).await;
                }
                Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                Err(_) => {
                    metrics.connections_timed_out.inc();
                    debug!("TLS handshake timed out");
                }
            }
        }
    }
}

/// The certificate a TLS client presented and the server's verifier accepted, in each
/// request's extensions (listeners that ask for one: the live API's front proxy).
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub Arc<rustls::pki_types::CertificateDer<'static>>);

/// What the watchdog of one connection knows: when bytes last moved, how many requests are
/// being served (until their response body is finished), and since when none is.
struct ConnState {
    epoch: Instant,
    last_activity_ms: AtomicU64,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl ConnState {
    fn new(epoch: Instant) -> Self {
        let now = epoch.elapsed().as_millis() as u64;
        Self {
            epoch,
            last_activity_ms: AtomicU64::new(now),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Why the connection should be closed now, if it should.
    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        let now = self.now_ms();
        if self.in_flight.load(Ordering::Acquire) == 0 {
            // No request being served: a client that has not sent a whole request head
            // within the header timeout (nothing at all, slowloris, idle keep-alive) goes.
            let since = self.idle_since_ms.load(Ordering::Acquire);
            if now.saturating_sub(since) >= limits.header_timeout.as_millis() as u64 {
                return Some("no request within the header timeout");
            }
        }
        let last = self.last_activity_ms.load(Ordering::Relaxed);
        (now.saturating_sub(last) >= limits.idle_timeout.as_millis() as u64)
            .then_some("no traffic within the idle timeout")
    }
}

/// Counts a request as in flight until its response body is finished (or dropped).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0
                .idle_since_ms
                .store(self.0.now_ms(), Ordering::Release);
        }
    }
}

/// A response body that keeps its request counted while it is being sent.
struct Guarded {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

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

async fn run_http<I>(
    io: I,
    peer: Option<ClientCertificate>,
    router: Router,
    limits: &Limits,
    metrics: &Metrics,
    state: &Arc<ConnState>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(limits.header_timeout);
    let inner = TowerToHyperService::new(router);
    let counted = Arc::clone(state);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        let in_flight = InFlight::start(&counted);
        let answer = hyper::service::Service::call(&inner, req);
        async move {
            let response = answer.await?;
            Ok::<_, std::convert::Infallible>(response.map(|inner| Guarded {
                inner,
                _in_flight: in_flight,
            }))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4).max(Duration::from_millis(100));
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if is_timeout(e.as_ref()) {
                        metrics.connections_timed_out.inc();
                    }
                    debug!(error = %e, "Connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(tick) => {
                if let Some(why) = state.expired(limits) {
                    metrics.connections_timed_out.inc();
                    tracing::trace!(why, "Closing a connection");
                    return;
                }
            }
        }
    }
}

/// Whether hyper ended the connection because of its header timer.
fn is_timeout(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

/// An I/O stream that records when bytes last moved, for the idle check.
struct Tracked<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T> Tracked<T> {
    fn touch(&self) {
        self.state
            .last_activity_ms
            .store(self.state.now_ms(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
