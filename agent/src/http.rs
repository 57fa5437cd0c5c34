//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.
//!
//! A deliberately tiny server (one request per connection, GET only, bounded reads with a
//! timeout) instead of a web framework: these endpoints are scraped by Prometheus and probed
//! by systemd or an operator, and the agent binary must stay small.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::StoreHealth;

const MAX_REQUEST_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the listener (so start-up fails early on a busy port).
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown`.
pub async fn run(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<StoreHealth>,
    shutdown: CancellationToken,
) {
    // Connections are short-lived (bounded by REQUEST_TIMEOUT); they are tracked so none
    // outlives shutdown and a panic in one is seen.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::warn!(error = %e, "HTTP connection task failed");
                }
                continue;
            }
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        let (metrics, store) = (metrics.clone(), store.clone());
        connections.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(stream, &metrics, &store)).await;
        });
    }
    connections.shutdown().await;
}

async fn serve(
    mut stream: TcpStream,
    metrics: &Metrics,
    store: &StoreHealth,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST_BYTES {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") => {
            if let Some(problem) = store.problem() {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!(
                        "the database cannot commit ({problem}): nothing is acknowledged until it can; free space on the data_dir's filesystem\n"
                    ),
                )
            } else if metrics.mqtt_connected.get() == 1 {
                ("200 OK", "text/plain", "ok\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not connected to the MQTT broker\n".to_owned(),
                )
            }
        }
        ("GET", "/metrics") => ("200 OK", crate::metrics::CONTENT_TYPE, metrics.render()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /healthz, /readyz or /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let store = Arc::new(StoreHealth::default());
        let server = tokio::spawn(run(
            listener,
            metrics.clone(),
            store.clone(),
            shutdown.clone(),
        ));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.mqtt_connected.set(1);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get(addr, "/metrics")
                .await
                .contains("edgesync_agent_mqtt_connected 1")
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
