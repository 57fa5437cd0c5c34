//! The driver: owns rumqttc's event loop, forwards publishes to the processor, subscribes on
//! every connect, and gets uncommitted messages redelivered once the store commits again.
//! It does no database work, so keep-alives never starve.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::store::Store;

/// Reconnect backoff bounds (full jitter in between).
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often a store that failed to commit is probed (backoff bounds).
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(5);

/// Getting messages that were not committed delivered again.
///
/// MQTT 3.1.1 resends an unacknowledged message only when the client reconnects, so a
/// message whose commit failed (disk full) would hold a slot of the broker's in-flight window
/// for good, and after a window's worth of them nothing would flow even with space back.
/// When the responder reports one, the driver probes the store with backoff and, once it
/// commits again, reconnects: the broker then resends every unacknowledged message.
pub(super) struct Recovery {
    pub(super) store: Store,
    pub(super) redeliver: Arc<tokio::sync::Notify>,
}

pub(super) async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    intake: mpsc::Sender<(Publish, Instant)>,
    recovery: Recovery,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut reconnect = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    // Set while messages wait for the store to commit again: when to probe it next.
    let mut probe_at: Option<tokio::time::Instant> = None;
    let mut probe_backoff = Backoff::new(PROBE_MIN, PROBE_MAX);
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
                        metrics.mqtt_redeliveries.inc();
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
                metrics.mqtt_received.inc();
                trace!(topic = %p.topic, bytes = p.payload.len(), "Message received");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    sent = intake.send((p, Instant::now())) => if sent.is_err() { break },
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                reconnect.reset();
                metrics.mqtt_connected.set(1);
                info!(
                    session_present = ack.session_present,
                    "Connected to MQTT broker"
                );
                subscribe_pending = true;
            }
            Ok(_) => {}
            Err(e) => {
                metrics.mqtt_connected.set(0);
                metrics.mqtt_connection_errors.inc();
                let delay = reconnect.failed();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed, reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    metrics.mqtt_connected.set(0);
    debug!("MQTT driver stopped");
}
