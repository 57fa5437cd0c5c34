//! A simulated device for tests: an MQTT client that publishes and collects what the agent
//! sends back on its shadow topics.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

/// How long a test waits for one expected message.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(20);

/// A connected test device.
#[derive(Debug)]
pub struct TestDevice {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    pump: tokio::task::JoinHandle<()>,
}

impl TestDevice {
    /// Connects to the broker on `port` and subscribes to `subscription` (e.g.
    /// `edgesync/+/shadow/#`), returning once the subscription is acknowledged.
    pub async fn connect(id: &str, port: u16, subscription: &str) -> TestDevice {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 1000);
        client
            .subscribe(subscription, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let pump = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(MESSAGE_DEADLINE, ready_rx)
            .await
            .expect("SUBACK within deadline")
            .expect("pump alive");
        TestDevice { client, rx, pump }
    }

    /// Publishes at QoS1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue publish");
    }

    /// Waits for the next message on `topic`, skipping others; panics after the deadline.
    pub async fn expect(&mut self, topic: &str) -> Value {
        tokio::time::timeout(MESSAGE_DEADLINE, async {
            loop {
                let (t, payload) = self.rx.recv().await.expect("device pump running");
                if t == topic {
                    return serde_json::from_slice(&payload).unwrap_or(Value::Null);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no message on {topic} within {MESSAGE_DEADLINE:?}"))
    }

    /// Every message received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Ok((t, payload)) = self.rx.try_recv() {
            out.push((t, serde_json::from_slice(&payload).unwrap_or(Value::Null)));
        }
        out
    }

    /// Sends `shadow/get` for `probe` until any reply arrives: proves the agent is connected
    /// and subscribed. Returns the reply.
    pub async fn wait_for_agent(&mut self, prefix: &str, probe: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let accepted = format!("{prefix}/{probe}/shadow/get/accepted");
        let rejected = format!("{prefix}/{probe}/shadow/get/rejected");
        loop {
            self.publish(&format!("{prefix}/{probe}/shadow/get"), "{}")
                .await;
            let got = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    let (t, payload) = self.rx.recv().await.expect("device pump running");
                    if t == accepted || t == rejected {
                        return serde_json::from_slice::<Value>(&payload).unwrap_or(Value::Null);
                    }
                }
            })
            .await;
            if let Ok(v) = got {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent did not answer shadow/get within 30 s"
            );
        }
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// A device that reports `reported` once, then asks for its shadow nonstop at QoS1 with 100
/// requests in flight, until `stop`. Every `get/accepted` document must show `reported`
/// (the task panics otherwise, or when it loses its connection); `answers` counts them.
#[derive(Debug)]
pub struct GetLoop {
    /// `get/accepted` documents received so far.
    pub answers: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The device's task; it ends after `stop`.
    pub task: tokio::task::JoinHandle<()>,
}

impl GetLoop {
    /// Connects device `id` to the broker on `port` and starts asking.
    pub async fn start(
        port: u16,
        id: &str,
        reported: Value,
        stop: tokio_util::sync::CancellationToken,
    ) -> GetLoop {
        use std::sync::atomic::Ordering;
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60)).set_inflight(100);
        let (c, mut el) = AsyncClient::new(o, 1000);
        c.subscribe(
            format!("edgesync/{id}/shadow/get/accepted"),
            QoS::AtMostOnce,
        )
        .await
        .expect("queue SUBSCRIBE");
        let update = serde_json::json!({ "state": { "reported": reported } });
        c.publish(
            format!("edgesync/{id}/shadow/update"),
            QoS::AtLeastOnce,
            false,
            update.to_string(),
        )
        .await
        .expect("queue PUBLISH");
        let answers = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = answers.clone();
        let get = format!("edgesync/{id}/shadow/get");
        let task = tokio::spawn(async move {
            let asker = tokio::spawn(async move {
                while c.publish(&get, QoS::AtLeastOnce, false, "").await.is_ok() {}
            });
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    e = el.poll() => {
                        let e = e.expect("the looping device lost its connection");
                        if let Event::Incoming(Packet::Publish(p)) = e {
                            let doc: Value = serde_json::from_slice(&p.payload).expect("JSON document");
                            assert_eq!(doc["state"]["reported"], reported, "{doc}");
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
            asker.abort();
        });
        GetLoop { answers, task }
    }
}
