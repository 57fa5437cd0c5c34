//! Pins the broker behaviour the agent's crash safety rests on, against Debian's Mosquitto:
//! a QoS1 message received on a persistent session but not acked before the client dies is
//! redelivered after reconnect; once acked, it is not.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use edgesync_e2e::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};

const DEADLINE: Duration = Duration::from_secs(20);

fn options(id: &str, port: u16, persistent: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(!persistent);
    o.set_manual_acks(true);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Connects and returns the client, event loop and the ConnAck's session-present flag.
async fn connect(opts: MqttOptions) -> (AsyncClient, EventLoop, bool) {
    let (client, mut el) = AsyncClient::new(opts, 100);
    let present = tokio::time::timeout(DEADLINE, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return ack.session_present,
                Ok(_) => {}
                Err(e) => panic!("connect failed: {e}"),
            }
        }
    })
    .await
    .expect("ConnAck within deadline");
    (client, el, present)
}

async fn until_packet<T>(
    el: &mut EventLoop,
    what: &str,
    mut f: impl FnMut(&Event) -> Option<T>,
) -> T {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let ev = el
                .poll()
                .await
                .unwrap_or_else(|e| panic!("event loop failed waiting for {what}: {e}"));
            if let Some(v) = f(&ev) {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn next_publish(el: &mut EventLoop) -> Publish {
    until_packet(el, "a PUBLISH", |ev| match ev {
        Event::Incoming(Packet::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await
}

async fn ack(client: &AsyncClient, el: &mut EventLoop, p: &Publish) {
    client.ack(p).await.expect("queue PUBACK");
    let pkid = p.pkid;
    until_packet(el, "our PUBACK on the wire", |ev| {
        matches!(ev, Event::Outgoing(Outgoing::PubAck(id)) if *id == pkid).then_some(())
    })
    .await;
}

async fn publish(port: u16, topic: &str, payload: &str) {
    let (client, mut el, _) = connect(options("publisher", port, false)).await;
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .expect("queue publish");
    until_packet(&mut el, "PUBACK from broker", |ev| {
        matches!(ev, Event::Incoming(Packet::PubAck(_))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn unacked_qos1_message_is_redelivered_after_a_crash_and_acked_one_is_not() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let topic = "factory/press-1/state";

    // First life: subscribe on a persistent session.
    let (client, mut el, _) = connect(options("agent-1", port, true)).await;
    client
        .subscribe("factory/+/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    until_packet(&mut el, "SUBACK", |ev| {
        matches!(ev, Event::Incoming(Packet::SubAck(_))).then_some(())
    })
    .await;

    publish(port, topic, r#"{"n":1}"#).await;
    let first = next_publish(&mut el).await;
    assert_eq!(&first.payload[..], br#"{"n":1}"#);
    // Crash: the socket closes without DISCONNECT and without our PUBACK.
    drop(client);
    drop(el);

    // Second life: the session is still there and the message comes again.
    let (client, mut el, present) = connect(options("agent-1", port, true)).await;
    assert!(present, "broker must keep the persistent session");
    let again = next_publish(&mut el).await;
    assert_eq!(
        &again.payload[..],
        br#"{"n":1}"#,
        "unacked message must be redelivered"
    );
    ack(&client, &mut el, &again).await;

    publish(port, topic, r#"{"n":2}"#).await;
    let second = next_publish(&mut el).await;
    assert_eq!(&second.payload[..], br#"{"n":2}"#);
    ack(&client, &mut el, &second).await;
    drop(client);
    drop(el);

    // Third life: both were acked, so the next message seen is a new one.
    let (_client, mut el, present) = connect(options("agent-1", port, true)).await;
    assert!(present);
    publish(port, topic, r#"{"n":3}"#).await;
    let third = next_publish(&mut el).await;
    assert_eq!(
        &third.payload[..],
        br#"{"n":3}"#,
        "acked messages must not come back"
    );
}

#[tokio::test]
async fn queued_messages_for_an_offline_persistent_subscriber_survive_a_broker_restart() {
    let mut broker = Mosquitto::start();
    let port = broker.port();
    {
        let (client, mut el, _) = connect(options("agent-2", port, true)).await;
        client
            .subscribe("factory/+/state", QoS::AtLeastOnce)
            .await
            .unwrap();
        until_packet(&mut el, "SUBACK", |ev| {
            matches!(ev, Event::Incoming(Packet::SubAck(_))).then_some(())
        })
        .await;
        client.disconnect().await.unwrap();
        until_packet(&mut el, "DISCONNECT sent", |ev| {
            matches!(ev, Event::Outgoing(Outgoing::Disconnect)).then_some(())
        })
        .await;
    }
    // More than Mosquitto's default max_queued_messages (1000): none may be dropped.
    let (client, mut el, _) = connect(options("bulk-publisher", port, false)).await;
    let total = 1500u32;
    let driver = tokio::spawn(async move {
        let mut acked = 0u32;
        while acked < total {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = el.poll().await {
                acked += 1;
            }
        }
    });
    for n in 0..total {
        client
            .publish(
                "factory/press-2/state",
                QoS::AtLeastOnce,
                false,
                format!("{{\"n\":{n}}}"),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(DEADLINE, driver)
        .await
        .expect("all publishes acked")
        .unwrap();

    // A clean broker restart writes and reloads its persistence file.
    broker.restart();

    let (client, mut el, present) = connect(options("agent-2", port, true)).await;
    assert!(present);
    // One task drives the event loop and only forwards, as the agent does: acks queued by
    // the consumer are written by the driver, so neither can starve the other.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber event loop failed: {e}"),
            }
        }
    });
    for n in 0..total {
        let p = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("message {n} of {total} not redelivered within {DEADLINE:?}")
            })
            .expect("pump running");
        assert_eq!(
            String::from_utf8_lossy(&p.payload),
            format!("{{\"n\":{n}}}")
        );
        client.ack(&p).await.unwrap();
    }
    pump.abort();
}
