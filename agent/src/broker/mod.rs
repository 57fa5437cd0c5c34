//! The embedded MQTT broker (`[mqtt] embedded = true`): a node with no broker of its own,
//! and the demo, work out of the box.
//!
//! MQTT 3.1.1 over TCP: QoS 0 and 1 (QoS 2 publishes are accepted and delivered at QoS 1),
//! `+`/`#` wildcards, persistent sessions, retained messages, wills, keep-alive,
//! optional username/password. Packets are encoded and decoded with rumqttc's codec.
//!
//! Its durability differs from a standalone broker's in one deliberate way: a device's QoS1
//! message for the agent is acknowledged to the device only after the agent has committed it
//! (see [`router`]). So messages need not be written to disk by the broker: each one is
//! either committed in SQLite or still unacknowledged on the device. What the broker does
//! write, to the agent's database, is its persistent sessions (client id, subscriptions):
//! after an agent restart a device is told its session is present and sends its
//! unacknowledged messages again (a compliant client discards them when told the session is
//! gone). An agent crash loses what lives only in memory: QoS0 messages in flight, retained
//! messages, and QoS1 messages queued *to* devices (replies and deltas; a device gets its
//! desired state again with `shadow/get`).

mod conn;
mod router;
mod trie;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::store::Store;
use router::{Router, SessionChange};

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
    /// Restores the persistent sessions recorded in `store` and binds the listen address.
    ///
    /// # Errors
    /// When the sessions cannot be read or the address cannot be bound (in use, not local,
    /// no permission).
    pub async fn bind(
        settings: &BrokerSettings,
        store: Store,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let mut router = Router::new(&settings.agent_client_id, metrics);
        let sessions = store
            .load_broker_sessions()
            .await
            .context("reading the embedded broker's sessions")?;
        for (client, filters) in &sessions {
            router.restore(client, filters);
        }
        let (tx, mut changes) = mpsc::unbounded_channel::<SessionChange>();
        router.persist_to(tx);
        // Session changes are written in order, off the router's lock; a new session is
        // written before its CONNACK (conn.rs waits for `written`).
        let writer = store.clone();
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                let result = writer
                    .save_broker_session(change.client.clone(), change.filters)
                    .await;
                if let Err(e) = &result {
                    warn!(client = change.client, error = %e, "Could not record an MQTT session");
                }
                if let Some(written) = change.written {
                    let _ = written.send(result.is_ok());
                }
            }
        });
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        if !sessions.is_empty() {
            info!(
                sessions = sessions.len(),
                "Embedded broker restored persistent sessions"
            );
        }
        let shared = Arc::new(Shared {
            router: Mutex::new(router),
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
