//! The fault proxy does what tests will rely on: pass, cut, black-hole, delay, restore.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]
use std::time::{Duration, Instant};

use edgesync_e2e::proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a free port.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn pass_cut_blackhole_delay_restore() {
    let proxy = FaultProxy::start(echo_server().await).await;

    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(roundtrip(&mut conn, b"hello").await.unwrap(), b"hello");

    // Cut: the open connection is closed and new ones are refused.
    proxy.set(Fault::Cut);
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("cut closes open connections promptly");
    assert!(matches!(n, Ok(0) | Err(_)));
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut fresh, b"x")).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "a cut link must not carry data: {r:?}"
    );

    // Restore: new connections work again.
    proxy.set(Fault::Pass);
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(roundtrip(&mut conn, b"back").await.unwrap(), b"back");

    // Black hole: the connection stays open, nothing comes back.
    proxy.set(Fault::BlackHole);
    conn.write_all(b"lost").await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await;
    assert!(r.is_err(), "black-holed link must stay silent, got {r:?}");

    // Delay: data flows, late.
    proxy.set(Fault::Delay(Duration::from_millis(300)));
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let start = Instant::now();
    assert_eq!(roundtrip(&mut conn, b"slow").await.unwrap(), b"slow");
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "two delayed hops: {:?}",
        start.elapsed()
    );
    assert!(proxy.accepted() >= 4);
}
