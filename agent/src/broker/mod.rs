//! The embedded MQTT broker (`[mqtt] embedded = true`): a node with no broker of its own,
//! and the demo, work out of the box.
//!
//! MQTT 3.1.1 over TCP: QoS 0 and 1 (QoS 2 publishes are accepted and delivered at QoS 1),
//! `+`/`#` wildcards, persistent sessions (in memory), retained messages, wills, keep-alive,
//! optional username/password. Packets are encoded and decoded with rumqttc's codec.
//!
//! Its durability differs from a standalone broker's in one deliberate way: a device's QoS1
//! message for the agent is acknowledged to the device only after the agent has committed it
//! (see [`router`]). Nothing is written to disk by the broker, and nothing needs to be: a
//! message is either committed in SQLite or still unacknowledged on the device. What an
//! agent crash does lose is what any in-memory broker loses: QoS0 messages in flight,
//! retained messages, and other clients' persistent sessions (devices subscribe again when
//! the broker answers `session present = 0`).

mod conn;
mod router;
mod trie;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
pub use router::MAX_QUEUED;
use router::Router;

/// What the embedded broker needs to know.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Required username and password, if any.
    pub credentials: Option<(String, String)>,
    /// The agent's client id: its acknowledgements gate the devices'.
    pub agent_client_id: String,
    /// Largest packet accepted from a client; larger ones close the connection.
    pub max_packet: usize,
}

/// State shared by the connection tasks.
struct Shared {
    router: Mutex<Router>,
    credentials: Option<(String, String)>,
    max_packet: usize,
    stop: CancellationToken,
}

/// A bound, not yet serving, embedded broker.
pub struct EmbeddedBroker {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl EmbeddedBroker {
    /// Binds the listen address.
    ///
    /// # Errors
    /// When the address cannot be bound (in use, not local, no permission).
    pub async fn bind(
        settings: &BrokerSettings,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(settings.listen).await?;
        let shared = Arc::new(Shared {
            router: Mutex::new(Router::new(&settings.agent_client_id, metrics)),
            credentials: settings.credentials.clone(),
            max_packet: settings.max_packet,
            stop,
        });
        Ok(Self { listener, shared })
    }

    /// The bound address (the port, when `listen` asked for port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the stop token is cancelled; then closes every connection.
    pub async fn run(self) {
        let addr = self.listener.local_addr().ok();
        info!(listen = ?addr, "Embedded MQTT broker listening");
        let stop = self.shared.stop.clone();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(conn::serve(stream, peer, self.shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving existing clients.
                    warn!(error = %e, "Embedded broker could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        info!("Embedded MQTT broker stopped");
    }
}
