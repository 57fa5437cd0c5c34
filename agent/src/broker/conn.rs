//! One client connection: read packets and hand them to the router in batches (one lock per
//! read, not per packet); a writer task coalesces outgoing packets into few socket writes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::access::{Login, Refusal};
use super::router::{Flow, Identity, Link, wire_cost};
use super::{ConnectionSlot, Entry, Shared, TlsAcceptor};
use crate::metrics::{BrokerDenial, BrokerLimit};
use edgesync_protocol::rate::TokenBucket;
/// Outgoing bytes gathered into one write.
const WRITE_CHUNK: usize = 64 * 1024;

/// How long closing a connection may wait to flush what is left (over TLS, the buffered
/// records and the close_notify): a client that stopped reading would otherwise hold the
/// connection, its slot and the broker's shutdown for as long as TCP keeps it open.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Why no CONNECT could be read.
enum ReadError {
    /// Beyond `broker.max_connect_bytes`.
    TooLarge,
    Other(String),
}

/// What the first packet of a connection was.
enum First {
    Connect(Connect),
    /// A CONNECT for another protocol version (MQTT 5, or 3.1 "MQIsdp").
    OtherVersion(u8),
    Other,
}

/// Reads the first packet. The protocol level is checked on the raw frame before parsing:
/// rumqttc's 3.1.1 parser would misread an MQTT 5 CONNECT (its properties) rather than fail.
async fn read_connect(
    rd: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Result<First, ReadError> {
    loop {
        match rumqttc::mqttbytes::check(buf.iter(), max) {
            Ok(_) => {
                if let Some(level) = connect_protocol_level(buf)
                    && level != 4
                {
                    return Ok(First::OtherVersion(level));
                }
                return match Packet::read(buf, max) {
                    Ok(Packet::Connect(c)) => Ok(First::Connect(c)),
                    Ok(_) => Ok(First::Other),
                    Err(e) => Err(ReadError::Other(e.to_string())),
                };
            }
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(CodecError::PayloadSizeLimitExceeded(_)) => return Err(ReadError::TooLarge),
            Err(e) => return Err(ReadError::Other(e.to_string())),
        }
        if buf.len() > max {
            return Err(ReadError::TooLarge);
        }
        // Never read more than the CONNECT may hold, whatever the peer sends.
        let room = max + 1 - buf.len();
        match (&mut *rd).take(room as u64).read_buf(buf).await {
            Ok(0) => return Err(ReadError::Other("connection closed".into())),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Other(e.to_string())),
        }
    }
}

/// The protocol level of a complete CONNECT frame at the start of `frame`.
fn connect_protocol_level(frame: &[u8]) -> Option<u8> {
    if frame.first()? >> 4 != 1 {
        return None;
    }
    // Remaining length: 1 to 4 bytes, the high bit marks continuation.
    let mut i = 1;
    while frame.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    let name = i + 1;
    let name_len = usize::from(u16::from_be_bytes([
        *frame.get(name)?,
        *frame.get(name + 1)?,
    ]));
    frame.get(name + 2 + name_len).copied()
}

/// A plain TCP client.
pub(super) async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    entry: Entry,
) {
    let deadline = Instant::now() + shared.limits.connect_timeout;
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let peer = Peer {
        addr: peer,
        certificate: None,
    };
    serve(rd, wr, peer, shared, entry, deadline).await;
}

/// Who is at the other end, as far as the transport tells.
struct Peer {
    addr: SocketAddr,
    /// The name in a verified client certificate.
    certificate: Option<String>,
}

/// A TLS client: the handshake and the CONNECT together must finish within
/// `broker.connect_timeout_secs`. On a listener that requires client certificates, the
/// certificate's name is the client's identity.
pub(super) async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    entry: Entry,
    tls: Arc<TlsAcceptor>,
) {
    let deadline = Instant::now() + shared.limits.connect_timeout;
    let _ = stream.set_nodelay(true);
    let evicted = entry.evicted();
    let handshake = tokio::select! {
        _ = evicted.cancelled() => {
            return debug!(%peer, "Closed before its TLS handshake ended, to make room (broker.max_pending_connections)");
        }
        h = tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)) => h,
    };
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = format!("TLS handshake failed: {e}");
            deny(&shared, BrokerDenial::Tls, peer, &why);
            return debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            shared.metrics.broker_limit(BrokerLimit::ConnectTimeout);
            return debug!(%peer, "No TLS handshake within broker.connect_timeout_secs; closing");
        }
    };
    let identity = match tls.identity {
        None => None,
        Some(which) => {
            let name = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| super::tls::identity(cert, which));
            let Some(name) = name else {
                let why = format!(
                    "the client certificate names no client ({which:?} per broker.tls_identity; names starting with $ are reserved)"
                );
                deny(&shared, BrokerDenial::Tls, peer, &why);
                return debug!(%peer, reason = why, "MQTT connection refused");
            };
            Some(name)
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    let peer = Peer {
        addr: peer,
        certificate: identity,
    };
    serve(rd, wr, peer, shared, entry, deadline).await;
}

/// Serves one client until it disconnects, fails, or `stop` is cancelled.
async fn serve<R, W>(
    mut rd: R,
    mut wr: W,
    from: Peer,
    shared: Arc<Shared>,
    entry: Entry,
    connect_deadline: Instant,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits;
    let peer = from.addr;
    let agent_only = matches!(entry, Entry::Agent(_));
    let evicted = entry.evicted();
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let first = tokio::select! {
        // A CONNECT still on its way when the broker stops would start a session (and, for
        // a persistent one, wait on a session writer that has already ended).
        _ = shared.stop.cancelled() => return debug!(%peer, "Broker stopping; closed before CONNECT"),
        _ = evicted.cancelled() => return debug!(%peer, "No CONNECT yet; closed to make room (broker.max_pending_connections)"),
        first = tokio::time::timeout_at(
            connect_deadline,
            read_connect(&mut rd, &mut buf, limits.max_connect_bytes),
        ) => first,
    };
    let connect = match first {
        Ok(Ok(First::Connect(c))) => c,
        Ok(Ok(First::OtherVersion(level))) => {
            warn!(%peer, level, "MQTT connection refused: the embedded broker speaks MQTT 3.1.1 (protocol level 4) only; use Mosquitto for other versions");
            // Answered in the client's own version: MQTT 5 reason code 0x84 (unsupported
            // protocol version, empty properties); 3.x return code 1 (unacceptable version).
            let refusal: &[u8] = if level == 5 {
                &[0x20, 3, 0, 0x84, 0]
            } else {
                &[0x20, 2, 0, 1]
            };
            let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                let _ = wr.write_all(refusal).await;
                let _ = wr.shutdown().await;
            })
            .await;
            return;
        }
        Ok(Ok(First::Other)) => return debug!(%peer, "First packet was not CONNECT; closing"),
        Ok(Err(ReadError::TooLarge)) => {
            shared.metrics.broker_limit(BrokerLimit::ConnectBytes);
            return debug!(%peer, "CONNECT beyond broker.max_connect_bytes; closing");
        }
        Ok(Err(ReadError::Other(e))) => return debug!(%peer, error = e, "Closed before CONNECT"),
        Err(_) => {
            shared.metrics.broker_limit(BrokerLimit::ConnectTimeout);
            return debug!(%peer, "No CONNECT within broker.connect_timeout_secs; closing");
        }
    };

    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    let resume = Arc::new(Notify::new());
    let closed = shared.stop.child_token();
    let writer = tokio::spawn(write_loop(wr, rx, backlog.clone(), closed.clone()));
    let client_id = connect.client_id.clone();
    let keep_alive = connect.keep_alive;

    // The CONNECT has come: a device connection trades its place among those without one
    // for a client's slot, held until the connection ends (the agent's own connection does
    // not count against broker.max_connections).
    let slot = match entry {
        Entry::Agent(slot) => Some(slot),
        Entry::Device(ticket) => {
            drop(ticket);
            ConnectionSlot::try_take(&shared.open, limits.max_connections)
        }
    };
    let Some(slot) = slot else {
        shared.metrics.broker_limit(BrokerLimit::Connections);
        debug!(%peer, "MQTT connection refused: broker.max_connections reached");
        return refuse(tx, writer, ConnectReturnCode::ServiceUnavailable).await;
    };
    let mut slot = Some(slot);
    let identified = match shared
        .access
        .identify(&connect, from.certificate.as_deref())
    {
        Ok(Login::Known(who)) => Ok(who),
        Ok(Login::Check(check)) => {
            let checked = tokio::select! {
                _ = shared.stop.cancelled() => Err(Refusal::Busy),
                c = check.run(&shared.password_checks, Instant::now() + limits.connect_timeout) => c,
            };
            if checked == Err(Refusal::Busy) {
                shared.metrics.broker_limit(BrokerLimit::PasswordChecks);
            }
            checked
        }
        Err(refusal) => Err(refusal),
    }
    .and_then(|who| {
        if agent_only && !who.is_agent {
            Err(Refusal::AgentIdentity)
        } else {
            Ok(who)
        }
    });
    let is_agent = identified.as_ref().is_ok_and(|who| who.is_agent);
    if is_agent {
        slot.take();
    }
    // The agent's own client is never paced: it drains what every device sent.
    // `broker.max_client_bytes_per_sec` with a burst of one second's worth: a client beyond it
    // is read more slowly, so TCP pushes back on it and one flooding client cannot starve
    // the others of CPU.
    let mut budget = (limits.max_client_bytes_per_sec > 0 && !is_agent).then(|| {
        let rate = limits.max_client_bytes_per_sec as f64;
        TokenBucket::new(rate, rate, Instant::now().into_std())
    });
    let accepted = match identified {
        Err(refusal) => {
            deny(&shared, BrokerDenial::Connect, peer, refusal.describe());
            Err((refusal.code(), refusal.describe()))
        }
        Ok(who) => match admit(&shared, &connect, &who).await {
            Err(e) => Err(e),
            Ok(()) => shared
                .router
                .lock()
                .map_err(|_| {
                    (
                        ConnectReturnCode::ServiceUnavailable,
                        "broker state poisoned",
                    )
                })
                .and_then(|mut r| {
                    r.connect(
                        connect,
                        who,
                        Link::new(tx.clone(), backlog.clone(), closed.clone(), resume.clone()),
                    )
                    .map_err(|code| (code, "refused by the session rules"))
                }),
        },
    };
    let (client, conn) = match accepted {
        Ok(ids) => ids,
        Err((code, why)) => {
            // Logged at debug: a client retrying bad credentials must not flood the log;
            // refusals are counted and summarised every 10 s.
            debug!(%peer, client = client_id, ?code, reason = why, "MQTT connection refused");
            return refuse(tx, writer, code).await;
        }
    };
    drop(tx); // the router's link is now the only sender
    debug!(%peer, client = &*client, keep_alive, "MQTT client connected");

    // MQTT 3.1.1, 3.1.2-24: silence for 1.5 keep-alive periods means the client is gone.
    let idle_limit = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let mut packets = Vec::new();
    let mut graceful = false;
    let end = 'conn: loop {
        loop {
            match Packet::read(&mut buf, limits.max_packet_bytes) {
                Ok(p) => packets.push(p),
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(CodecError::PayloadSizeLimitExceeded(n)) => {
                    shared.metrics.broker_limit(BrokerLimit::PacketSize);
                    break 'conn format!("packet of {n} bytes beyond broker.max_packet_bytes");
                }
                Err(e) => break 'conn format!("malformed packet: {e}"),
            }
        }
        if !packets.is_empty() {
            let charge = {
                let Ok(mut router) = shared.router.lock() else {
                    break 'conn "broker state poisoned".into();
                };
                for p in packets.drain(..) {
                    match router.handle(&client, conn, p) {
                        Flow::Continue => {}
                        Flow::Disconnect => {
                            graceful = true;
                            break 'conn "client disconnected".into();
                        }
                        Flow::Close(why) => break 'conn why.into(),
                    }
                }
                router.take_charge(&client)
            };
            // Work the packets caused beyond their bytes (retained topics examined) is paid
            // from the same read budget.
            if charge > 0
                && let Some(wait) = overdrawn(&mut budget, charge)
            {
                shared.metrics.broker_limit(BrokerLimit::ReadRate);
                tokio::select! {
                    _ = closed.cancelled() => break 'conn "closed by the broker".into(),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        // Backpressure: while this client's messages wait for the agent's commit beyond its
        // share, read nothing more from it (TCP holds the rest on the device).
        loop {
            let resumed = resume.notified();
            let pause = shared
                .router
                .lock()
                .map(|mut r| r.should_pause(&client))
                .unwrap_or(false);
            if !pause {
                break;
            }
            tokio::select! {
                _ = closed.cancelled() => break 'conn "closed by the broker".into(),
                _ = resumed => {}
            }
        }
        let read = async {
            match idle_limit {
                Some(limit) => tokio::time::timeout(limit, rd.read_buf(&mut buf))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
                None => rd.read_buf(&mut buf).await,
            }
        };
        tokio::select! {
            _ = closed.cancelled() => break "closed by the broker".into(),
            n = read => match n {
                Ok(0) => break "connection closed".into(),
                Ok(n) => {
                    if let Some(wait) = overdrawn(&mut budget, n)
                    {
                        shared.metrics.broker_limit(BrokerLimit::ReadRate);
                        tokio::select! {
                            _ = closed.cancelled() => break "closed by the broker".into(),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    break format!("no packet within 1.5 x keep-alive ({keep_alive} s)");
                }
                Err(e) => break e.to_string(),
            },
        }
    };
    if let Ok(mut router) = shared.router.lock() {
        router.disconnected(&client, conn, graceful, unix_now());
    }
    if graceful {
        debug!(%peer, client = &*client, "MQTT client disconnected");
    } else {
        info!(%peer, client = &*client, reason = end, "MQTT client connection ended");
    }
    closed.cancel();
    let _ = writer.await;
}

/// Answers a refused CONNECT and lets the writer send it (2 s at most) before closing.
async fn refuse(
    tx: mpsc::UnboundedSender<Packet>,
    writer: tokio::task::JoinHandle<()>,
    code: ConnectReturnCode,
) {
    let _ = tx.send(Packet::ConnAck(ConnAck::new(code, false)));
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Counts a refusal for the rate-limited summary in the log.
fn deny(shared: &Shared, action: BrokerDenial, peer: SocketAddr, why: &str) {
    if let Ok(mut router) = shared.router.lock() {
        router.deny(action, &peer.to_string(), why);
    }
}

/// Seconds since the Unix epoch (for session expiry).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router's admission checks, then a new persistent session is written to disk before
/// its CONNACK: a device told its session exists must find it again after an agent restart
/// (else it would discard the messages it has not had acknowledged yet).
async fn admit(
    shared: &Shared,
    connect: &Connect,
    who: &Identity,
) -> Result<(), (ConnectReturnCode, &'static str)> {
    const POISONED: (ConnectReturnCode, &str) = (
        ConnectReturnCode::ServiceUnavailable,
        "broker state poisoned",
    );
    let written = {
        let mut router = shared.router.lock().map_err(|_| POISONED)?;
        router.admit(connect, who).map_err(|code| {
            (
                code,
                "another user's client id, a will topic outside the ACL, or broker.max_sessions reached",
            )
        })?;
        if !router.needs_persisting(&connect.client_id, connect.clean_session) {
            return Ok(());
        }
        router.persist_new(&connect.client_id, who)
    };
    let written = match written {
        Some(rx) => tokio::select! {
            // The session writer makes its last pass at stop; a request after it is never
            // answered.
            _ = shared.stop.cancelled() => false,
            w = rx => w == Ok(true),
        },
        None => false,
    };
    if !written {
        return Err((
            ConnectReturnCode::ServiceUnavailable,
            "cannot record the persistent session in the database",
        ));
    }
    Ok(())
}

async fn write_loop(
    mut wr: impl AsyncWrite + Unpin,
    mut rx: mpsc::UnboundedReceiver<Packet>,
    backlog: Arc<AtomicUsize>,
    closed: CancellationToken,
) {
    let mut out = BytesMut::with_capacity(WRITE_CHUNK);
    loop {
        let first = tokio::select! {
            _ = closed.cancelled() => break,
            p = rx.recv() => match p {
                Some(p) => p,
                None => break,
            },
        };
        let mut bytes = wire_cost(&first);
        encode(&first, &mut out);
        while out.len() < WRITE_CHUNK {
            let Ok(p) = rx.try_recv() else { break };
            bytes += wire_cost(&p);
            encode(&p, &mut out);
        }
        backlog.fetch_sub(bytes, Ordering::Relaxed);
        let written = tokio::select! {
            _ = closed.cancelled() => break,
            r = wr.write_all(&out) => r,
        };
        if written.is_err() {
            closed.cancel();
            break;
        }
        out.clear();
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH, wr.shutdown()).await;
}

/// Spends `bytes` from a client's read budget; how long to wait when it is overdrawn.
fn overdrawn(budget: &mut Option<TokenBucket>, bytes: usize) -> Option<Duration> {
    let wait = budget
        .as_mut()?
        .take(bytes as f64, Instant::now().into_std());
    (!wait.is_zero()).then_some(wait)
}

fn encode(packet: &Packet, out: &mut BytesMut) {
    if let Err(e) = packet.write(out, usize::MAX) {
        warn!(error = %e, "Could not encode an MQTT packet; dropped");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    mod fuzz {
        use proptest::prelude::*;
        use rumqttc::{Publish, QoS, Subscribe};

        use super::*;
        use crate::broker::router::{Flow, Router};
        use crate::config::BrokerLimits;

        /// Valid packets, encoded, to mutate: the generator then reaches past the header.
        fn seeds() -> Vec<Vec<u8>> {
            let mut with_will = Connect::new("dev-1");
            with_will.set_login("user", "pw");
            with_will.last_will =
                Some(rumqttc::LastWill::new("w/t", "bye", QoS::AtLeastOnce, true));
            let mut p = Publish::new("factory/m1/state", QoS::AtLeastOnce, "{\"a\":1}");
            p.pkid = 3;
            let packets = [
                Packet::Connect(with_will),
                Packet::Publish(p),
                Packet::Subscribe(Subscribe::new("factory/+/state", QoS::AtLeastOnce)),
                Packet::PingReq,
            ];
            packets
                .iter()
                .map(|p| {
                    let mut b = BytesMut::new();
                    p.write(&mut b, 1 << 20).unwrap();
                    b.to_vec()
                })
                .collect()
        }

        fn stream() -> impl Strategy<Value = Vec<u8>> {
            let seeds = seeds();
            let mutated = (
                prop::collection::vec(0..seeds.len(), 1..6),
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            )
                .prop_map(move |(picks, edits)| {
                    let mut bytes: Vec<u8> = picks.iter().flat_map(|&i| seeds[i].clone()).collect();
                    for (at, b) in edits {
                        let i = at.index(bytes.len());
                        bytes[i] = b;
                    }
                    bytes
                });
            prop_oneof![prop::collection::vec(any::<u8>(), 0..512), mutated]
        }

        proptest! {
            /// Bytes as a client could send them, read as the connection task reads them
            /// and handed to the router as a device's: never a panic, and a decode error
            /// ends the connection instead of looping.
            #[test]
            fn fuzz_mqtt_packets(bytes in stream()) {
                let _ = connect_protocol_level(&bytes);
                let limits = BrokerLimits::default();
                let mut router = Router::new("agent", limits, None, Arc::default());
                let (tx, _rx) = mpsc::unbounded_channel();
                let link = Link::new(
                    tx,
                    Arc::default(),
                    CancellationToken::new(),
                    Arc::default(),
                );
                let (client, conn) = router
                    .connect(Connect::new("fuzzed"), Identity::default(), link)
                    .unwrap();
                let mut buf = BytesMut::from(&bytes[..]);
                for _ in 0..bytes.len() + 1 {
                    match Packet::read(&mut buf, 64 * 1024) {
                        Ok(p) => {
                            if router.handle(&client, conn, p) != Flow::Continue {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }

    #[test]
    fn protocol_level_is_read_from_the_raw_connect() {
        let mut v4 = BytesMut::new();
        Packet::Connect(Connect::new("c"))
            .write(&mut v4, 1024)
            .unwrap();
        assert_eq!(connect_protocol_level(&v4), Some(4));
        // MQTT 5: "MQTT", level 5, then properties the 3.1.1 parser would misread.
        let v5 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'c',
        ];
        assert_eq!(connect_protocol_level(&v5), Some(5));
        // MQTT 3.1: "MQIsdp", level 3.
        let v3 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 1, b'c',
        ];
        assert_eq!(connect_protocol_level(&v3), Some(3));
        assert_eq!(connect_protocol_level(&[0x30, 0]), None);
    }
}
