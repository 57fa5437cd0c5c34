//! Waiting on conditions with a deadline. The interval only bounds how often a condition is
//! re-checked; correctness never depends on it.

use std::future::Future;
use std::time::{Duration, Instant};

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Waits until `check` returns `Some`, or panics after `deadline` naming `what`.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether something accepts TCP connections on loopback `port` now.
pub async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Waits until something accepts TCP connections on loopback `port`.
pub async fn port_open(what: &str, port: u16, deadline: Duration) {
    until(what, deadline, || async {
        accepts(port).await.then_some(())
    })
    .await;
}

/// Blocking variant of [`until`] for code outside a runtime (process start-up).
pub fn until_blocking<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() >= deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}"));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
