//! MQTT: the broker connection and the device-facing shadow protocol.
//!
//! Three tasks, connected by bounded channels:
//! 1. the **driver** owns rumqttc's `EventLoop`; it only polls, forwards publishes, and
//!    re-subscribes on every connect (no database work, so keep-alives never starve);
//! 2. the **processor** parses each message, validates it against the limits, and queues it
//!    to the store without waiting for the commit, so many messages share one commit;
//! 3. the **responder** takes messages in arrival order, waits for each one's commit, then
//!    publishes the replies and only then acks the message to the broker.
//!
//! Each device dialect is one module with the same parts: its subscriptions (`filters`),
//! what the processor queues for a message on its topics, how the responder answers it, and
//! how a desired change goes out to its devices: `shadow` (the native shadow topics),
//! `plain` (JSON ingest mappings), `sparkplug` (Sparkplug B) and `twin` (KubeEdge device
//! twins). The embedded broker's ACL for each dialect's topics is in `broker::auth`.
//!
//! So a QoS1 message is acknowledged only after its effect is durable in SQLite; if the agent
//! dies first, the broker redelivers it on the persistent session, and re-applying a merge
//! patch that is already applied changes nothing.

use std::sync::Arc;

use edgesync_protocol::Limits;
use edgesync_protocol::mqtt::IngestPattern;
use edgesync_protocol::shadow::ShadowDocument;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, Publish, QoS, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{Broker, IngestSettings, MqttSettings};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

mod driver;
mod plain;
mod processor;
mod responder;
mod shadow;
mod sparkplug;
mod twin;

pub use sparkplug::Sparkplug;
pub use twin::Twins;

use driver::{Recovery, drive};
use processor::Processor;
use responder::Responder;

/// Messages between the driver and the processor. Bounds the memory held for messages the
/// broker has sent but the store has not seen yet.
const INTAKE_CAPACITY: usize = 4096;
/// Messages queued to the store and waiting for their commit, in arrival order.
const RESPONDER_CAPACITY: usize = 8192;
/// rumqttc's request channel carries our acks and replies to the event loop. The event loop
/// drains it one request per poll while it reads incoming packets in bulk, so under a flood
/// it fills up; and the driver stops polling while the intake is full. Nothing in the
/// pipeline therefore ever *waits* for room in it (`try_ack`/`try_publish`): a full channel
/// drops a reply (counted) or leaves a message unacked, which the broker redelivers after a
/// reconnect and the agent re-applies harmlessly. With the broker's in-flight window bounded
/// (Mosquitto `max_inflight_messages`, see README) pending acks stay far below this size.
const REQUEST_CHANNEL_CAPACITY: usize = 64 * 1024;
/// Largest packet accepted from the broker. Oversized *payloads* are rejected by our own
/// limit with a reply; a packet over rumqttc's limit would instead kill the connection and
/// be redelivered forever, so this is the MQTT maximum.
const MAX_INCOMING_PACKET: usize = 268_435_455;

/// The store's answer to a queued request.
type StoreReply<T> = oneshot::Receiver<Result<T, StoreError>>;

/// A message queued to the store by its dialect, for the responder to await and answer.
enum Waiting {
    Shadow(shadow::Waiting),
    Plain(plain::Waiting),
    Sparkplug(sparkplug::Waiting),
    Twin(twin::Waiting),
    /// On no dialect's topic: acked, nothing else.
    Nothing,
}

struct Job {
    publish: Publish,
    waiting: Waiting,
    /// When the driver took the message from the broker.
    received: tokio::time::Instant,
}

/// Counts a refused message under `reason` and warns about it at its 1st, 2nd, 4th, 8th...
/// occurrence (debug otherwise), so a flood of bad input cannot fill the log.
fn refused(metrics: &Metrics, reason: &'static str, topic: &str, message: &str) {
    metrics.reject(reason);
    let n = metrics.rejections(reason);
    if n.is_power_of_two() {
        warn!(
            topic,
            reason,
            occurrences = n,
            "Message refused, nothing stored: {message}"
        );
    } else {
        tracing::debug!(topic, reason, "Message refused: {message}");
    }
}

/// Handle for publishing to devices from other components (desired-state deltas).
#[derive(Clone, Debug)]
pub struct DevicePublisher {
    client: AsyncClient,
    prefix: String,
    metrics: Arc<Metrics>,
    sparkplug: Option<Arc<Sparkplug>>,
    twins: Option<Arc<Twins>>,
}

impl DevicePublisher {
    /// Sends a desired change to `device` in its dialect: `twin/update/delta` to a KubeEdge
    /// twin, a DCMD (NCMD for an edge node) to a Sparkplug B device, `update/delta` on the
    /// shadow topics to anyone else.
    pub async fn publish_delta(&self, device: &str, doc: &ShadowDocument) {
        let delta = doc.delta();
        if delta.is_empty()
            || self.publish_twin_delta(device, doc)
            || self.publish_sparkplug_delta(device, &delta)
        {
            return;
        }
        self.publish_shadow_delta(device, doc, delta);
    }

    /// Queues a publish without waiting (nothing in the pipeline may wait on rumqttc's request
    /// channel), counting it in `counter`, or in `replies_dropped` when the channel is full.
    fn publish_counted(
        &self,
        topic: String,
        qos: QoS,
        payload: Vec<u8>,
        counter: &prometheus_client::metrics::counter::Counter,
    ) {
        if self.client.try_publish(topic, qos, false, payload).is_ok() {
            counter.inc();
        } else {
            self.metrics.replies_dropped.inc();
        }
    }
}

/// The MQTT side of the agent, ready to run.
pub struct Mqtt {
    client: AsyncClient,
    eventloop: EventLoop,
    settings: MqttSettings,
    ingest: Vec<IngestPattern>,
    sparkplug: Option<Arc<Sparkplug>>,
    twins: Option<Arc<Twins>>,
    limits: Limits,
    /// What the agent's client subscribes to (see [`agent_filters`]).
    filters: Vec<String>,
}

/// Every filter the agent's own client subscribes to: each dialect's topics. The embedded
/// broker holds these for the agent's session before it accepts any device, so no device
/// message the agent takes can be acknowledged before the agent holds it.
pub fn agent_filters(prefix: &str, ingest: &IngestSettings) -> Vec<String> {
    let mut filters = Vec::from(shadow::filters(prefix));
    filters.extend(plain::filters(&ingest.json));
    if let Some(s) = &ingest.sparkplug {
        filters.extend(sparkplug::filters(s));
    }
    if ingest.kubeedge_twin {
        filters.extend(twin::filters());
    }
    filters
}

impl Mqtt {
    /// Builds the client for the configured broker (no I/O yet).
    ///
    /// # Errors
    /// When the TLS CA file cannot be read.
    pub fn new(
        settings: &MqttSettings,
        ingest: &IngestSettings,
        limits: Limits,
        metrics: &Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (host, port, tls) = match &settings.broker {
            Broker::External { host, port, tls } => (host.clone(), *port, *tls),
            Broker::Embedded { listen } => (listen.ip().to_string(), listen.port(), false),
        };
        let mut opts = MqttOptions::new(settings.client_id.clone(), host, port);
        // A persistent session makes the broker keep our subscriptions and queue QoS1
        // messages while we are away; manual acks let us ack only after commit.
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(settings.keep_alive)
            .set_max_packet_size(
                MAX_INCOMING_PACKET,
                limits.max_payload_bytes * 2 + 64 * 1024,
            )
            .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY)
            .set_inflight(1000);
        if let Some((user, pass)) = &settings.credentials {
            opts.set_credentials(user.clone(), pass.expose().to_owned());
        }
        if tls {
            let transport = match &settings.ca_file {
                Some(ca) => Transport::tls(std::fs::read(ca)?, None, None),
                None => Transport::tls_with_default_config(),
            };
            opts.set_transport(transport);
        }
        let (client, eventloop) = AsyncClient::new(opts, REQUEST_CHANNEL_CAPACITY);
        Ok(Self {
            client,
            eventloop,
            settings: settings.clone(),
            ingest: ingest.json.clone(),
            sparkplug: ingest
                .sparkplug
                .as_ref()
                .map(|s| Arc::new(Sparkplug::new(s, metrics.clone()))),
            twins: ingest.kubeedge_twin.then(|| Arc::new(Twins::default())),
            limits,
            filters: agent_filters(&settings.topic_prefix, ingest),
        })
    }

    /// A publisher for other components.
    pub fn publisher(&self, metrics: Arc<Metrics>) -> DevicePublisher {
        DevicePublisher {
            client: self.client.clone(),
            prefix: self.settings.topic_prefix.clone(),
            metrics,
            sparkplug: self.sparkplug.clone(),
            twins: self.twins.clone(),
        }
    }

    /// Runs the driver, processor and responder until `shutdown`; on shutdown, messages
    /// already received are committed but, with the connection gone, not acked: the broker
    /// redelivers them and re-applying them is harmless.
    pub async fn run(
        self,
        store: Store,
        metrics: Arc<Metrics>,
        on_change: Arc<tokio::sync::Notify>,
        shutdown: CancellationToken,
    ) {
        let (intake_tx, intake_rx) = mpsc::channel(INTAKE_CAPACITY);
        let (job_tx, job_rx) = mpsc::channel(RESPONDER_CAPACITY);
        let prefix = self.settings.topic_prefix.clone();
        let filters = self.filters.clone();
        let redeliver = Arc::new(tokio::sync::Notify::new());
        let publisher = self.publisher(metrics.clone());
        let processor = Processor {
            prefix: prefix.clone(),
            ingest: self.ingest,
            sparkplug: self.sparkplug.clone(),
            twins: self.twins.clone(),
            limits: self.limits,
            store: store.clone(),
            metrics: metrics.clone(),
        };
        let responder = Responder {
            client: self.client.clone(),
            publisher,
            prefix,
            metrics: metrics.clone(),
            on_change,
            redeliver: redeliver.clone(),
            started: std::time::Instant::now(),
            device_cap_warned_ms: std::sync::atomic::AtomicU64::new(0),
        };
        let client = self.client.clone();
        // Three tasks, not one joined future: parsing, committing replies and polling the
        // socket then run on different worker threads instead of taking turns on one.
        let mut stages = tokio::task::JoinSet::new();
        stages.spawn(processor.run(intake_rx, job_tx));
        stages.spawn(responder.run(job_rx));
        drive(
            self.eventloop,
            client,
            filters,
            intake_tx,
            Recovery { store, redeliver },
            metrics,
            shutdown.clone(),
        )
        .await;
        // The driver dropped the intake sender: the processor drains and ends, then the
        // responder. Both finish what they hold before the connection is closed.
        while let Some(done) = stages.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "MQTT pipeline stage failed");
            }
        }
        let _ = self.client.disconnect().await;
    }
}
