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
//! So a QoS1 message is acknowledged only after its effect is durable in SQLite; if the agent
//! dies first, the broker redelivers it on the persistent session, and re-applying a merge
//! patch that is already applied changes nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use edgesync_protocol::Limits;
use edgesync_protocol::mqtt::{DeltaMessage, IngestPattern, Rejected, ShadowOp, reply_topic};
use edgesync_protocol::shadow::ShadowDocument;
use edgesync_protocol::sparkplug::Command;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, Publish, QoS, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{Broker, IngestSettings, MqttSettings};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, UpdateOutcome};

mod driver;
mod processor;
mod responder;
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

/// What a message is.
#[derive(Debug)]
enum Route {
    Shadow {
        device: String,
        op: ShadowOp,
    },
    Ingest {
        device: String,
    },
    /// Sparkplug B: which devices it concerns is known only once it is decoded.
    Sparkplug,
    /// A KubeEdge device twin request.
    Twin(edgesync_protocol::kubeedge::TwinTopic),
    Unknown,
}

/// What the responder waits for before replying and acking.
enum Pending {
    /// Nothing to wait for (rejected before reaching the store, or unknown topic).
    Done,
    /// A rejection to send.
    Reject(Rejected),
    /// A committed (or failed) update.
    Update(oneshot::Receiver<Result<UpdateOutcome, StoreError>>),
    /// A shadow read, answered once the group it was read in has committed.
    Get(oneshot::Receiver<Result<Option<ShadowDocument>, StoreError>>),
    /// A shadow read's answer.
    Got(Result<Option<ShadowDocument>, StoreError>),
    /// Updates of several devices from one message (Sparkplug B), then a command to publish.
    Many(Box<Many>),
}

/// The updates one message made, each awaited before the message is acked.
struct Many {
    updates: Vec<(String, oneshot::Receiver<Result<UpdateOutcome, StoreError>>)>,
    /// An update could not even be queued (store closed): do not ack.
    unqueued: bool,
    /// Published once the updates are committed.
    command: Option<Command>,
}

struct Job {
    publish: Publish,
    route: Route,
    client_token: Option<String>,
    pending: Pending,
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
    /// Publishes `update/delta` (QoS1: desired state must reach the device); to a Sparkplug B
    /// device, a DCMD (NCMD for an edge node) with the metrics its birth declared instead.
    pub async fn publish_delta(&self, device: &str, doc: &ShadowDocument) {
        let delta = doc.delta();
        if delta.is_empty() || self.publish_twin_delta(device, doc) {
            return;
        }
        if let Some(sparkplug) = &self.sparkplug
            && let Some(command) = sparkplug.command(device, &delta)
        {
            if let Some(c) = command {
                self.publish_command(c, &self.metrics.sparkplug_writes);
            }
            return;
        }
        let msg = DeltaMessage {
            state: delta,
            version: doc.version,
            timestamp: doc.timestamp,
        };
        let topic = reply_topic(&self.prefix, device, ShadowOp::Update, "delta");
        let Ok(payload) = serde_json::to_vec(&msg) else {
            return;
        };
        // Dropped when the request queue is full: the device still gets it from shadow/get or
        // with its next accepted update.
        self.publish_counted(
            topic,
            QoS::AtLeastOnce,
            payload,
            &self.metrics.deltas_published,
        );
    }
}

impl DevicePublisher {
    /// Publishes a Sparkplug B command at QoS 0, as the specification requires of commands
    /// (a lost one is sent again with the next change or birth), and counts it in `counter`.
    fn publish_command(&self, c: Command, counter: &std::sync::atomic::AtomicU64) {
        self.publish_counted(c.topic, QoS::AtMostOnce, c.payload, counter);
    }

    /// Queues a publish without waiting (nothing in the pipeline may wait on rumqttc's request
    /// channel), counting it in `counter`, or in `replies_dropped` when the channel is full.
    fn publish_counted(
        &self,
        topic: String,
        qos: QoS,
        payload: Vec<u8>,
        counter: &std::sync::atomic::AtomicU64,
    ) {
        if self.client.try_publish(topic, qos, false, payload).is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.replies_dropped.fetch_add(1, Ordering::Relaxed);
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
    let mut filters = vec![
        format!("{prefix}/+/shadow/update"),
        format!("{prefix}/+/shadow/get"),
    ];
    filters.extend(ingest.json.iter().map(IngestPattern::filter));
    if let Some(s) = &ingest.sparkplug {
        filters.extend(edgesync_protocol::sparkplug::topic::subscriptions(
            s.group.as_deref(),
        ));
    }
    if ingest.kubeedge_twin {
        filters.extend(edgesync_protocol::kubeedge::subscriptions());
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
