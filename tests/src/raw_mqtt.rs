//! A raw MQTT 3.1.1 client: packets written and read as the test says, with none of a real
//! client's manners (no keep-alive, no flow control, no retries). For tests that act as an
//! attacker on the embedded broker: pipelining, half-sent packets, clients that never read.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest packet this client reads.
const MAX_READ: usize = 16 * 1024 * 1024;

/// One raw connection.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
}

/// A CONNECT with `id`, clean or persistent, with optional credentials and will.
pub fn connect_packet(
    id: &str,
    clean: bool,
    login: Option<(&str, &str)>,
    will: Option<LastWill>,
) -> Packet {
    Packet::Connect(Connect {
        protocol: Protocol::V4,
        keep_alive: 0,
        client_id: id.to_owned(),
        clean_session: clean,
        last_will: will,
        login: login.map(|(u, p)| Login::new(u, p)),
    })
}

/// Connects with `connect` once the broker on loopback `port` accepts it, retrying while
/// the broker starts; panics after `deadline`.
pub async fn connect_when_up(port: u16, connect: Packet, deadline: Duration) -> RawClient {
    crate::wait::until(
        &format!("the broker on port {port} accepting a client"),
        deadline,
        || async {
            crate::wait::accepts(port).await.then_some(())?;
            let (c, code) = RawClient::connect(port, connect.clone()).await;
            (code == ConnectReturnCode::Success).then_some(c)
        },
    )
    .await
}

/// Encodes `packet`.
///
/// # Panics
/// When rumqttc cannot encode it.
pub fn encode(packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, usize::MAX)
        .expect("encode an MQTT packet");
    out
}

impl RawClient {
    /// Opens a TCP connection to the broker on loopback `port`.
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn open(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connect to the broker on {port}: {e}"));
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Opens a connection and sends `connect`; returns the client and the CONNACK's code.
    ///
    /// # Panics
    /// When no CONNACK comes within 10 s.
    pub async fn connect(port: u16, connect: Packet) -> (Self, ConnectReturnCode) {
        let mut c = Self::open(port).await;
        c.send(&connect).await;
        match c.recv(Duration::from_secs(10)).await {
            Some(Packet::ConnAck(ConnAck { code, .. })) => (c, code),
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }

    /// Writes `packet`.
    ///
    /// # Panics
    /// When the write fails.
    pub async fn send(&mut self, packet: &Packet) {
        self.stream
            .write_all(&encode(packet))
            .await
            .expect("write to the broker");
    }

    /// Writes raw bytes; returns whether the broker still took them.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// The next packet, or `None` when the connection closed or nothing came in `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Packet::read(&mut self.buf, MAX_READ) {
                Ok(p) => return Some(p),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => panic!("malformed packet from the broker: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Whether the broker closed the connection within `wait` (reading and discarding what
    /// it sends meanwhile).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut scratch = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

/// Resident memory of process `pid` in KiB (Linux `/proc`).
///
/// # Panics
/// When `/proc/<pid>/status` cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A PUBLISH with packet id `pkid`.
pub fn publish(topic: &str, qos: rumqttc::QoS, pkid: u16, payload: impl Into<Vec<u8>>) -> Packet {
    let mut p = rumqttc::Publish::new(topic, qos, payload.into());
    p.pkid = pkid;
    Packet::Publish(p)
}

/// Peak resident memory (KiB) of process `pid` while `attack` runs, sampled every 20 ms.
///
/// # Panics
/// When `/proc/<pid>/status` cannot be read.
pub async fn peak_rss_during<F: std::future::Future<Output = ()>>(pid: u32, attack: F) -> u64 {
    let stop = tokio::sync::watch::Sender::new(false);
    let mut stopped = stop.subscribe();
    let sampler = tokio::spawn(async move {
        let mut peak = rss_kib(pid);
        loop {
            peak = peak.max(rss_kib(pid));
            tokio::select! {
                _ = stopped.changed() => return peak.max(rss_kib(pid)),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    attack.await;
    let _ = stop.send(true);
    sampler.await.expect("the RSS sampler")
}
