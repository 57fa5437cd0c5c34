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
use std::time::Duration;

use edgesync_protocol::Limits;
use edgesync_protocol::limits::validate_device_id;
use edgesync_protocol::mqtt::{
    DeltaMessage, DocumentsMessage, IngestPattern, Rejected, ShadowOp, UpdateAccepted,
    parse_shadow_topic, reply_topic,
};
use edgesync_protocol::shadow::{ShadowDocument, ShadowError, UpdateRequest};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Transport};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::backoff::Reconnect;
use crate::config::{Broker, MqttSettings};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, UpdateOutcome};

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
/// Reconnect backoff bounds (full jitter in between).
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// At most one device-cap warning per this interval.
const DEVICE_CAP_WARN_INTERVAL_MS: u64 = 10_000;
/// How often a store that failed to commit is probed (backoff bounds).
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(5);

/// What a message is.
#[derive(Debug)]
enum Route {
    Shadow { device: String, op: ShadowOp },
    Ingest { device: String },
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
    /// A shadow read.
    Get(Result<Option<ShadowDocument>, StoreError>),
}

struct Job {
    publish: Publish,
    route: Route,
    client_token: Option<String>,
    pending: Pending,
}

/// Handle for publishing to devices from other components (desired-state deltas).
#[derive(Clone, Debug)]
pub struct DevicePublisher {
    client: AsyncClient,
    prefix: String,
    metrics: Arc<Metrics>,
}

impl DevicePublisher {
    /// Publishes `update/delta` (QoS1: desired state must reach the device).
    pub async fn publish_delta(&self, device: &str, doc: &ShadowDocument) {
        let delta = doc.delta();
        if delta.is_empty() {
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
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
        {
            self.metrics
                .deltas_published
                .fetch_add(1, Ordering::Relaxed);
        } else {
            // The device still gets it from shadow/get or with its next accepted update.
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
    limits: Limits,
}

impl Mqtt {
    /// Builds the client for the configured broker (no I/O yet).
    ///
    /// # Errors
    /// When the TLS CA file cannot be read.
    pub fn new(
        settings: &MqttSettings,
        ingest: Vec<IngestPattern>,
        limits: Limits,
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
            opts.set_credentials(user.clone(), pass.clone());
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
            ingest,
            limits,
        })
    }

    /// A publisher for other components.
    pub fn publisher(&self, metrics: Arc<Metrics>) -> DevicePublisher {
        DevicePublisher {
            client: self.client.clone(),
            prefix: self.settings.topic_prefix.clone(),
            metrics,
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
        let mut filters = vec![
            format!("{prefix}/+/shadow/update"),
            format!("{prefix}/+/shadow/get"),
        ];
        filters.extend(self.ingest.iter().map(IngestPattern::filter));
        let redeliver = Arc::new(tokio::sync::Notify::new());
        let processor = Processor {
            prefix: prefix.clone(),
            ingest: self.ingest,
            limits: self.limits,
            store: store.clone(),
            metrics: metrics.clone(),
        };
        let responder = Responder {
            client: self.client.clone(),
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

/// Getting messages that were not committed delivered again.
///
/// MQTT 3.1.1 resends an unacknowledged message only when the client reconnects, so a
/// message whose commit failed (disk full) would hold a slot of the broker's in-flight window
/// for good, and after a window's worth of them nothing would flow even with space back.
/// When the responder reports one, the driver probes the store with backoff and, once it
/// commits again, reconnects: the broker then resends every unacknowledged message.
struct Recovery {
    store: Store,
    redeliver: Arc<tokio::sync::Notify>,
}

async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    intake: mpsc::Sender<Publish>,
    recovery: Recovery,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut reconnect = Reconnect::new(RECONNECT_MIN, RECONNECT_MAX);
    // Set while messages wait for the store to commit again: when to probe it next.
    let mut probe_at: Option<tokio::time::Instant> = None;
    let mut probe_backoff = Reconnect::new(PROBE_MIN, PROBE_MAX);
    // Subscriptions still to be queued after a (re)connect.
    let mut subscribe_pending = false;
    loop {
        // Only this loop drains the client's request channel, so it must never wait for room
        // in it: when the channel is full (acks queued by the responder), try again after
        // the next event has made room.
        if subscribe_pending {
            let subs = filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            match client.try_subscribe_many(subs) {
                Ok(()) => subscribe_pending = false,
                Err(rumqttc::ClientError::TryRequest(_)) => {
                    debug!("MQTT request channel full; subscribing after the next event");
                }
                Err(e) => {
                    warn!(error = %e, "Cannot queue MQTT subscriptions");
                    subscribe_pending = false;
                }
            }
        }
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = recovery.redeliver.notified(), if probe_at.is_none() => {
                probe_at = Some(tokio::time::Instant::now() + probe_backoff.failed());
                continue;
            }
            _ = tokio::time::sleep_until(probe_at.unwrap_or_else(tokio::time::Instant::now)), if probe_at.is_some() => {
                match recovery.store.probe().await {
                    Ok(()) => {
                        probe_at = None;
                        probe_backoff.reset();
                        metrics.mqtt_redeliveries.fetch_add(1, Ordering::Relaxed);
                        info!("The store commits again; reconnecting so the broker resends the messages not yet committed");
                        if client.try_disconnect().is_err() {
                            warn!("Cannot queue the MQTT disconnect; unacknowledged messages come back at the next reconnect");
                        }
                    }
                    Err(e) => {
                        let delay = probe_backoff.failed();
                        debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "The store still cannot commit");
                        probe_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                metrics.mqtt_received.fetch_add(1, Ordering::Relaxed);
                trace!(topic = %p.topic, bytes = p.payload.len(), "Message received");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    sent = intake.send(p) => if sent.is_err() { break },
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                reconnect.reset();
                metrics.mqtt_connected.store(true, Ordering::Relaxed);
                info!(
                    session_present = ack.session_present,
                    "Connected to MQTT broker"
                );
                subscribe_pending = true;
            }
            Ok(_) => {}
            Err(e) => {
                metrics.mqtt_connected.store(false, Ordering::Relaxed);
                metrics
                    .mqtt_connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                let delay = reconnect.failed();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed, reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    metrics.mqtt_connected.store(false, Ordering::Relaxed);
    debug!("MQTT driver stopped");
}

struct Processor {
    prefix: String,
    ingest: Vec<IngestPattern>,
    limits: Limits,
    store: Store,
    metrics: Arc<Metrics>,
}

impl Processor {
    fn route(&self, topic: &str) -> Route {
        if let Some((device, op)) = parse_shadow_topic(&self.prefix, topic) {
            return Route::Shadow {
                device: device.to_owned(),
                op,
            };
        }
        for p in &self.ingest {
            if let Some(device) = p.device(topic) {
                return Route::Ingest {
                    device: device.to_owned(),
                };
            }
        }
        Route::Unknown
    }

    async fn run(self, mut intake: mpsc::Receiver<Publish>, jobs: mpsc::Sender<Job>) {
        while let Some(publish) = intake.recv().await {
            let route = self.route(&publish.topic);
            let (pending, client_token) = self.process(&route, &publish).await;
            if jobs
                .send(Job {
                    publish,
                    route,
                    client_token,
                    pending,
                })
                .await
                .is_err()
            {
                break;
            }
        }
    }

    async fn process(&self, route: &Route, publish: &Publish) -> (Pending, Option<String>) {
        let (device, parsed) = match route {
            Route::Unknown => return (Pending::Done, None),
            Route::Shadow {
                device,
                op: ShadowOp::Get,
            } => {
                if let Err(e) = validate_device_id(device) {
                    return (self.reject(&ShadowError::from(e), None), None);
                }
                return (Pending::Get(self.store.get(device.clone()).await), None);
            }
            Route::Shadow {
                device,
                op: ShadowOp::Update,
            } => (device, UpdateRequest::parse(&publish.payload, &self.limits)),
            Route::Ingest { device } => (
                device,
                UpdateRequest::parse_plain(&publish.payload, &self.limits),
            ),
        };
        if let Err(e) = validate_device_id(device) {
            let token = parsed.ok().and_then(|r| r.client_token);
            return (self.reject(&ShadowError::from(e), token.clone()), token);
        }
        match parsed {
            Err(e) => (self.reject(&e, None), None),
            Ok(req) => {
                let token = req.client_token.clone();
                let full_reply = matches!(route, Route::Shadow { .. });
                match self
                    .store
                    .submit_update(device.clone(), req, full_reply)
                    .await
                {
                    Ok(rx) => (Pending::Update(rx), token),
                    Err(_) => (Pending::Reject(store_unavailable(token.clone())), token),
                }
            }
        }
    }

    fn reject(&self, err: &ShadowError, client_token: Option<String>) -> Pending {
        self.metrics.reject(err.reason());
        Pending::Reject(Rejected::from_error(err, client_token))
    }
}

fn store_unavailable(client_token: Option<String>) -> Rejected {
    Rejected {
        code: 503,
        message: "shadow store unavailable; retry later".to_owned(),
        client_token,
    }
}

struct Responder {
    client: AsyncClient,
    prefix: String,
    metrics: Arc<Metrics>,
    on_change: Arc<tokio::sync::Notify>,
    /// Told when a message was left unacknowledged because its commit failed.
    redeliver: Arc<tokio::sync::Notify>,
    /// For rate-limited warnings.
    started: std::time::Instant,
    /// When the device-cap warning was last logged (ms since `started`; 0: never).
    device_cap_warned_ms: std::sync::atomic::AtomicU64,
}

impl Responder {
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(mut job) = jobs.recv().await {
            if self.run_job(&mut job).await {
                // After commit (or for messages that are rejected and never stored): ack.
                if self.client.try_ack(&job.publish).is_err() {
                    self.metrics.acks_deferred.fetch_add(1, Ordering::Relaxed);
                    warn_unbounded_window(&self.metrics);
                }
            }
        }
    }

    /// Sends replies; returns whether the message may be acked.
    async fn respond(&self, job: &Job) -> bool {
        let (device, op) = match &job.route {
            Route::Shadow { device, op } => (device.as_str(), Some(*op)),
            Route::Ingest { device } => (device.as_str(), None),
            Route::Unknown => return true,
        };
        match &job.pending {
            Pending::Done => true,
            Pending::Reject(r) => {
                if let Some(op) = op {
                    self.reply(device, op, "rejected", r, QoS::AtMostOnce).await;
                } else {
                    debug!(device, code = r.code, message = %r.message, "Plain ingest message rejected");
                }
                true
            }
            Pending::Get(Ok(Some(doc))) => {
                self.reply(
                    device,
                    ShadowOp::Get,
                    "accepted",
                    &get_document(doc),
                    QoS::AtMostOnce,
                )
                .await;
                true
            }
            Pending::Get(Ok(None)) => {
                let r = Rejected {
                    code: 404,
                    message: format!("no shadow for device {device}"),
                    client_token: None,
                };
                self.reply(device, ShadowOp::Get, "rejected", &r, QoS::AtMostOnce)
                    .await;
                true
            }
            Pending::Get(Err(_)) => {
                self.reply(
                    device,
                    ShadowOp::Get,
                    "rejected",
                    &store_unavailable(None),
                    QoS::AtMostOnce,
                )
                .await;
                true
            }
            Pending::Update(_) => unreachable!("updates are resolved by the caller"),
        }
    }

    async fn reply<T: serde::Serialize>(
        &self,
        device: &str,
        op: ShadowOp,
        suffix: &str,
        body: &T,
        qos: QoS,
    ) {
        let topic = reply_topic(&self.prefix, device, op, suffix);
        if let Ok(payload) = serde_json::to_vec(body)
            && self.client.try_publish(topic, qos, false, payload).is_err()
        {
            self.metrics.replies_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Responder {
    /// Waits for the job's outcome and replies; returns whether the message may be acked.
    async fn run_job(&self, job: &mut Job) -> bool {
        let rx = match std::mem::replace(&mut job.pending, Pending::Done) {
            Pending::Update(rx) => rx,
            other => {
                job.pending = other;
                return self.respond(job).await;
            }
        };
        let (device, op) = match &job.route {
            Route::Shadow { device, op } => (device.clone(), Some(*op)),
            Route::Ingest { device } => (device.clone(), None),
            Route::Unknown => return true,
        };
        let token = job.client_token.clone();
        match rx.await {
            Ok(Ok(UpdateOutcome::Accepted { applied, current })) => {
                self.metrics
                    .updates_accepted
                    .fetch_add(1, Ordering::Relaxed);
                if applied.changed {
                    self.on_change.notify_one();
                }
                if op.is_some()
                    && let Some(current) = &current
                {
                    let accepted = UpdateAccepted {
                        state: reported_state(&job.publish.payload),
                        version: current.version,
                        timestamp: current.timestamp,
                        client_token: token,
                    };
                    self.reply(
                        &device,
                        ShadowOp::Update,
                        "accepted",
                        &accepted,
                        QoS::AtMostOnce,
                    )
                    .await;
                    if applied.changed {
                        let docs = DocumentsMessage {
                            previous: applied.previous.unwrap_or_default(),
                            current: current.clone(),
                            timestamp: current.timestamp,
                        };
                        self.reply(
                            &device,
                            ShadowOp::Update,
                            "documents",
                            &docs,
                            QoS::AtMostOnce,
                        )
                        .await;
                    }
                }
                if applied.changed
                    && let Some(current) = &current
                    && !current.state.desired.is_empty()
                    && !current.delta().is_empty()
                {
                    DevicePublisher {
                        client: self.client.clone(),
                        prefix: self.prefix.clone(),
                        metrics: self.metrics.clone(),
                    }
                    .publish_delta(&device, current)
                    .await;
                }
                true
            }
            Ok(Ok(UpdateOutcome::Rejected(e))) => {
                self.metrics.reject(e.reason());
                if op.is_some() {
                    self.reply(
                        &device,
                        ShadowOp::Update,
                        "rejected",
                        &Rejected::from_error(&e, token),
                        QoS::AtMostOnce,
                    )
                    .await;
                }
                true
            }
            Ok(Ok(UpdateOutcome::DeviceLimit)) => {
                self.metrics.reject("device_limit");
                // Once per interval, not per message: a plant past the cap sends many.
                let now_ms = self.started.elapsed().as_millis() as u64;
                let last = self.device_cap_warned_ms.load(Ordering::Relaxed);
                if last == 0 || now_ms.saturating_sub(last) >= DEVICE_CAP_WARN_INTERVAL_MS {
                    self.device_cap_warned_ms
                        .store(now_ms.max(1), Ordering::Relaxed);
                    warn!(
                        device,
                        "Device limit reached (store.max_devices): updates for new devices are rejected and not stored; raise store.max_devices (see edgesync_agent_updates_rejected_total{{reason=\"device_limit\"}})"
                    );
                }
                if op.is_some() {
                    let r = Rejected {
                        code: 503,
                        message: "agent device limit reached (store.max_devices)".into(),
                        client_token: token,
                    };
                    self.reply(&device, ShadowOp::Update, "rejected", &r, QoS::AtMostOnce)
                        .await;
                }
                true
            }
            Ok(Err(e)) => {
                // Not committed: do not ack; the driver reconnects once the store commits
                // again, and the broker resends it.
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                self.redeliver.notify_one();
                warn!(device, error = %e, "Update not committed; leaving it unacknowledged for redelivery");
                if op.is_some() {
                    self.reply(
                        &device,
                        ShadowOp::Update,
                        "rejected",
                        &store_unavailable(token),
                        QoS::AtMostOnce,
                    )
                    .await;
                }
                false
            }
            Err(_) => {
                // The store dropped the reply (its transaction failed before this one was
                // applied): the same as not committed.
                self.redeliver.notify_one();
                false
            }
        }
    }
}

/// Logs (once per 10 000 occurrences) that acks could not be queued: the broker sends faster
/// than rumqttc flushes acks, which means its in-flight window is unbounded.
fn warn_unbounded_window(metrics: &Metrics) {
    let n = metrics.acks_deferred.load(Ordering::Relaxed);
    if n % 10_000 == 1 {
        warn!(
            deferred = n,
            "MQTT acks are backing up; those messages will be redelivered after a reconnect. Bound the broker's in-flight window (Mosquitto: max_inflight_messages 1000)"
        );
    }
}

/// `{"reported": ...}` echoed from the request for `update/accepted`.
fn reported_state(payload: &[u8]) -> Map<String, Value> {
    let mut out = Map::new();
    if let Ok(Value::Object(mut root)) = serde_json::from_slice::<Value>(payload)
        && let Some(Value::Object(mut state)) = root.remove("state")
        && let Some(reported) = state.remove("reported")
    {
        out.insert("reported".into(), reported);
    }
    out
}

/// The `get/accepted` document: the shadow plus its current delta.
fn get_document(doc: &ShadowDocument) -> Value {
    let mut v = serde_json::to_value(doc).unwrap_or(Value::Null);
    let delta = doc.delta();
    if !delta.is_empty()
        && let Some(state) = v.get_mut("state").and_then(Value::as_object_mut)
    {
        state.insert("delta".into(), Value::Object(delta));
    }
    v
}
