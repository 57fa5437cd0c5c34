//! A TCP fault proxy: sits between two of our processes (agent and controller) and can pass
//! traffic, cut it (close every connection and refuse new ones), black-hole it (accept and hold
//! connections, swallow bytes), or delay it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Close every connection at once and refuse new ones (accepted, then closed).
    Cut,
    /// Keep connections open but forward nothing, like a dead route.
    BlackHole,
    /// Forward after a delay per chunk.
    Delay(Duration),
}

/// A running proxy. Stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault_tx: watch::Sender<Fault>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        Self::start_balanced(vec![upstream]).await
    }

    /// Like [`FaultProxy::start`], spreading new connections round-robin over `upstreams`, as
    /// a Kubernetes Service does over its endpoints. A connection to an upstream that is down
    /// is closed at once, so the client retries.
    pub async fn start_balanced(upstreams: Vec<SocketAddr>) -> FaultProxy {
        assert!(!upstreams.is_empty(), "a proxy needs an upstream");
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (fault_tx, fault_rx) = watch::channel(Fault::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                let fault_rx = fault_rx.clone();
                if *fault_rx.borrow() == Fault::Cut {
                    drop(client);
                    continue;
                }
                let upstream = upstreams[next % upstreams.len()];
                next += 1;
                tokio::spawn(connection(client, upstream, fault_rx));
            }
        });
        FaultProxy {
            addr,
            fault_tx,
            accepted,
            task,
        }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the fault mode; existing connections follow it immediately.
    pub fn set(&self, fault: Fault) {
        self.fault_tx.send_replace(fault);
    }

    /// Connections accepted so far (including ones refused while cut).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.fault_tx.send_replace(Fault::Cut);
        self.task.abort();
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, fault_rx: watch::Receiver<Fault>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Either direction ending (EOF, error or cut) ends the connection: dropping all halves
    // closes both sockets.
    tokio::select! {
        _ = pipe(cr, sw, fault_rx.clone()) => {}
        _ = pipe(sr, cw, fault_rx) => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault_rx: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = fault_rx.changed() => {
                if changed.is_err() || *fault_rx.borrow() == Fault::Cut {
                    return;
                }
                continue;
            }
        };
        let fault = *fault_rx.borrow();
        match fault {
            Fault::Cut => return,
            Fault::BlackHole => continue,
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Pass => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
