//! `edgesync-sim`: a shop-floor simulator and load generator.
//!
//! Simulates `--devices` machines behind one MQTT gateway connection. Each publishes its state
//! as plain JSON to `factory/{device}/state` every `--interval-ms` (temperature drifting, a
//! counter of parts made, the speed it runs at), and obeys desired state: a `speed` in the
//! shadow delta (`{prefix}/{device}/shadow/update/delta`) is applied and reported back through
//! `{prefix}/{device}/shadow/update`, which is what turns a Device In-Sync. With `--max-speed`,
//! a machine refuses a faster speed over `{prefix}/{device}/shadow/desired/reject`, which the
//! Device shows as `DesiredAccepted=False`.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

/// Simulated shop-floor devices publishing JSON state over MQTT and applying desired state.
#[derive(Debug, Parser)]
#[command(name = "edgesync-sim", version)]
struct Args {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Number of devices.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Device id prefix: devices are `{name}-{i}`.
    #[arg(long, default_value = "machine")]
    name: String,
    /// Interval between two states of one device, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Shadow topic prefix of the agent.
    #[arg(long, default_value = "edgesync")]
    prefix: String,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration_secs: u64,
    /// The fastest speed a machine accepts: a desired speed above it is refused with code
    /// `out_of_range` (0: any speed is taken).
    #[arg(long, default_value_t = 0)]
    max_speed: u64,
    /// The share of machines, in percent, that have `--max-speed` (every n-th machine, spread
    /// over the ids); the others take any speed.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=100))]
    max_speed_share: u64,
}

struct Machine {
    temperature: f64,
    parts: u64,
    speed: u64,
    /// The fastest speed it accepts.
    max_speed: Option<u64>,
}

/// Whether machine `i` is among the `share` percent with a speed limit: spread over the ids
/// (i * share crosses a multiple of 100), so 5% is machines 19, 39, 59, ... rather than the
/// first five.
fn limited(i: usize, share: u64) -> bool {
    let i = i as u64;
    (i + 1) * share / 100 > i * share / 100
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let mut opts = MqttOptions::new(
        format!("edgesync-sim-{}", fastrand::u32(..)),
        &args.host,
        args.port,
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let machines: HashMap<String, Machine> = (0..args.devices)
        .map(|i| {
            (
                format!("{}-{i}", args.name),
                Machine {
                    temperature: 20.0 + i as f64 % 7.0,
                    parts: 0,
                    speed: 1000,
                    max_speed: (args.max_speed > 0 && limited(i, args.max_speed_share))
                        .then_some(args.max_speed),
                },
            )
        })
        .collect();
    let machines = Arc::new(Mutex::new(machines));
    let delta_filter = format!("{}/+/shadow/update/delta", args.prefix);
    let stop_at = (args.duration_secs > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs(args.duration_secs));
    println!(
        "edgesync-sim: {} devices -> {}:{} every {} ms",
        args.devices, args.host, args.port, args.interval_ms
    );
    // States go out from a task of their own, waiting for room in the client's queue: with
    // thousands of machines a tick fills it, and what is sent without waiting (the
    // subscription, the answers to deltas) would be dropped.
    let states = tokio::spawn(publish_states(
        client.clone(),
        Arc::clone(&machines),
        Duration::from_millis(args.interval_ms.max(1)),
    ));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = async { tokio::time::sleep_until(stop_at.unwrap_or_else(tokio::time::Instant::now)).await }, if stop_at.is_some() => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // After every connection: a new session has no subscription.
                    let client = client.clone();
                    let filter = delta_filter.clone();
                    tokio::spawn(async move { client.subscribe(filter, QoS::AtLeastOnce).await });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let device = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
                    let delta: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let Some(speed) = delta["state"]["speed"].as_u64() else { continue };
                    let (suffix, body) = {
                        let mut all = machines.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(m) = all.get_mut(&device) else { continue };
                        answer(&device, m, speed, &delta)
                    };
                    let topic = format!("{}/{device}/shadow/{suffix}", args.prefix);
                    let client = client.clone();
                    tokio::spawn(async move { client.publish(topic, QoS::AtLeastOnce, false, body).await });
                }
                Ok(_) => {}
                Err(e) => {
                    println!("edgesync-sim: broker connection: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    }
    states.abort();
}

/// What machine `m` answers to a desired `speed`: the topic suffix and the payload. Applies
/// the speed when it takes it.
fn answer(device: &str, m: &mut Machine, speed: u64, delta: &Value) -> (&'static str, String) {
    if let Some(max) = m.max_speed.filter(|max| speed > *max) {
        println!("edgesync-sim: {device} refuses desired speed {speed} (above {max})");
        let refusal = json!({
            "desiredGeneration": delta["desiredGeneration"],
            "code": "out_of_range",
            "message": format!("speed {speed} is above {max}"),
        });
        return ("desired/reject", refusal.to_string());
    }
    m.speed = speed;
    println!("edgesync-sim: {device} applies desired speed {speed}");
    let update = json!({"state": {"reported": {"speed": speed}}});
    ("update", update.to_string())
}

/// Every `interval`, each machine's state on `factory/{id}/state`.
async fn publish_states(
    client: AsyncClient,
    machines: Arc<Mutex<HashMap<String, Machine>>>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let states: Vec<(String, String)> = {
            let mut all = machines.lock().unwrap_or_else(|e| e.into_inner());
            all.iter_mut()
                .map(|(id, m)| {
                    m.temperature += (fastrand::f64() - 0.5) * 0.4;
                    m.parts += m.speed / 500;
                    let state = json!({
                        "temperature": (m.temperature * 10.0).round() / 10.0,
                        "parts": m.parts,
                        "speed": m.speed,
                        "status": "running",
                    });
                    (format!("factory/{id}/state"), state.to_string())
                })
                .collect()
        };
        for (topic, state) in states {
            if client
                .publish(topic, QoS::AtLeastOnce, false, state)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::limited;

    #[test]
    fn a_share_of_machines_is_spread_over_the_ids() {
        let pick = |n: usize, share| (0..n).filter(|i| limited(*i, share)).collect::<Vec<_>>();
        assert_eq!(pick(100, 5), [19, 39, 59, 79, 99]);
        assert_eq!(pick(10, 100).len(), 10);
        assert!(pick(10, 0).is_empty());
        assert_eq!(pick(1000, 5).len(), 50);
    }
}
