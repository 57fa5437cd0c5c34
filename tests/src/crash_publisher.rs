//! A device-side QoS1 publisher that rides out its broker being killed (kill -9 of the agent
//! with its embedded broker): it records every PUBACK against the message it acknowledges, so
//! a test can check that nothing acknowledged was lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;

/// What the publisher has had acknowledged: per device, the highest counter; and a count
/// that wakes waiters at once (the kill must land while messages are in flight).
pub struct Acked {
    /// Per device, the highest acknowledged counter.
    pub max_by_device: Mutex<HashMap<String, u64>>,
    count: tokio::sync::watch::Sender<u64>,
}

impl Acked {
    /// Nothing acknowledged yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            max_by_device: Mutex::default(),
            count: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Records the acknowledgement of `device`'s counter `n`.
    pub fn record(&self, device: String, n: u64) {
        {
            let mut by_device = self.max_by_device.lock().expect("acked lock");
            let max = by_device.entry(device).or_default();
            *max = (*max).max(n);
        }
        self.count.send_modify(|c| *c += 1);
    }

    /// How many messages were acknowledged so far.
    pub fn count(&self) -> u64 {
        *self.count.borrow()
    }

    /// Waits until `n` messages were acknowledged; panics after 60 s naming `what`.
    pub async fn at_least(&self, n: u64, what: &str) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what} ({n} acknowledged)"))
            .expect("the publisher's counter lives as long as Acked");
    }
}

/// A device-side publisher with a persistent session that rides out the broker going away:
/// it reconnects and, told its session is present, sends its unacknowledged messages again.
/// Every PUBACK is recorded against the message it acknowledges. Publishes `messages` counters
/// `{"n": ..}` round-robin over `devices` devices (`factory/dev-{i}/state`); returns each
/// device's last counter once all are acknowledged.
pub async fn publish_through_crashes(
    port: u16,
    devices: u64,
    messages: u64,
    acked: Arc<Acked>,
) -> HashMap<String, u64> {
    let mut opts = MqttOptions::new("crash-publisher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    // Messages handed to the client, in order; the event loop sends them in that order.
    let queued: Arc<Mutex<VecDeque<(String, u64)>>> = Arc::default();
    let to_send = queued.clone();
    let record = acked.clone();
    let pump = tokio::spawn(async move {
        let mut in_flight: HashMap<u16, (String, u64)> = HashMap::new();
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    // A resend after a reconnect reuses its packet id.
                    in_flight.entry(pkid).or_insert_with(|| {
                        to_send
                            .lock()
                            .expect("queue lock")
                            .pop_front()
                            .expect("a publish the test queued")
                    });
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    // A packet id no longer in flight acknowledges nothing this publisher
                    // still waits for: a second acknowledgement of a message sent twice across
                    // reconnects (QoS1 allows the copy; seen once on emulated armv7 after a
                    // kill -9). The first was counted; it is not counted again.
                    if let Some((device, n)) = in_flight.remove(&ack.pkid) {
                        record.record(device, n);
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    // A lost session would make the client drop its unacknowledged messages.
                    assert!(
                        ack.session_present || *record.count.borrow() == 0,
                        "the broker forgot the publisher's session after a restart"
                    );
                }
                Ok(_) => {}
                // The agent was killed: its broker is gone until the restart (reconnect pace,
                // not synchronisation).
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    let mut last = HashMap::new();
    for i in 0..messages {
        let device = format!("dev-{}", i % devices);
        let n = i / devices;
        if i % devices == 0 && n > 0 {
            // One message per device in flight: rumqttc itself reorders its messages when
            // the connection drops again before its resends are out (resends are queued
            // behind newer messages still pending from the previous reconnect), which would
            // make a device's final state depend on the client library, not on us.
            acked.at_least(i, "the previous round").await;
        }
        queued
            .lock()
            .expect("queue lock")
            .push_back((device.clone(), n));
        client
            .publish(
                format!("factory/{device}/state"),
                QoS::AtLeastOnce,
                false,
                json!({"n": n, "pad": "x".repeat(200)}).to_string(),
            )
            .await
            .expect("the client's queue accepts the publish");
        last.insert(device, n);
    }
    acked.at_least(messages, "every publish").await;
    pump.abort();
    last
}
