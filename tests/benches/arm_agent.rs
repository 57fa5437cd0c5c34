//! `make bench`: the agent as it ships for ARM (release-small profile, cross-built on its own
//! by `make arm`) on emulated aarch64 and armv7 machines (qemu-system, software emulation).
//!
//! Per target: the stripped binary's size, the guest's boot time, the agent's time from start
//! to ready, its RSS idle and after a QoS1 load through its embedded broker, and that load's
//! durable rate. Emulation runs the guest many times slower than hardware, so the rate says
//! only that the path works under load; sizes and RSS are what a real box would see.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use edgesync_e2e::agent::{AgentConfig, http_get};
use edgesync_e2e::measure::scaled;
use edgesync_e2e::vm::{Vm, arm_agent_binary};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::block_in_place;

const TARGETS: [&str; 2] = ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];
const GUEST_MQTT: u16 = 1883;
const GUEST_HTTP: u16 = 9100;
const DEVICES: usize = 100;

fn messages() -> usize {
    scaled(20_000, 2_000)
}

/// The guest agent's resident set, in KiB.
fn guest_rss_kib(vm: &mut Vm) -> u64 {
    let out = vm.sh("grep VmRSS /proc/$(pidof edgesync-agent)/status");
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {out:?}"))
}

/// Publishes `n` QoS1 messages over [`DEVICES`] devices with 100 in flight; returns the
/// acknowledged (committed) rate.
async fn qos1_rate(port: u16, n: usize) -> f64 {
    let mut opts = MqttOptions::new("arm-bench", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            let body = format!(r#"{{"seq":{i},"temperatureC":21.5,"line":"L{}"}}"#, i % 4);
            client
                .publish(
                    format!("factory/dev-{}/state", i % DEVICES),
                    QoS::AtLeastOnce,
                    false,
                    body,
                )
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(600), async {
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await
    .expect("every message acknowledged within 10 minutes");
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(publisher.await.unwrap());
    rate
}

struct Row {
    target: &'static str,
    size: u64,
    boot: Duration,
    ready: Duration,
    idle_kib: u64,
    rate: f64,
    loaded_kib: u64,
}

async fn measure(target: &'static str) -> Row {
    let bin = arm_agent_binary(target);
    let size = std::fs::metadata(&bin)
        .unwrap_or_else(|e| panic!("{} ({e}): run `make arm` first", bin.display()))
        .len();
    let mut config = AgentConfig::embedded(Path::new("/var/lib/edgesync"), GUEST_MQTT);
    config.listen_host = "0.0.0.0".into();
    config.http_port = Some(GUEST_HTTP);
    // The guest's ports are reachable only through the host's loopback forwards.
    config.extra = "[broker]\nallow_anonymous = true\n".into();
    let toml = config.to_toml();
    let booting = Instant::now();
    let mut vm = block_in_place(|| {
        Vm::boot(
            target,
            &[("/etc/edgesync/agent.toml", &toml)],
            &[GUEST_MQTT, GUEST_HTTP],
        )
    });
    let boot = booting.elapsed();
    let (mqtt, http) = (vm.host_port(GUEST_MQTT), vm.host_port(GUEST_HTTP));
    let starting = Instant::now();
    block_in_place(|| {
        vm.sh("edgesync-agent run --config /etc/edgesync/agent.toml >/var/log/agent.log 2>&1 &")
    });
    while !http_get(http, "/readyz").starts_with("HTTP/1.1 200") {
        assert!(
            starting.elapsed() < Duration::from_secs(120),
            "{target}: agent not ready: {}",
            block_in_place(|| vm.sh("cat /var/log/agent.log"))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = starting.elapsed();
    // Idle means settled: a second after ready, nothing connected.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kib = block_in_place(|| guest_rss_kib(&mut vm));
    let rate = qos1_rate(mqtt, messages()).await;
    let loaded_kib = block_in_place(|| guest_rss_kib(&mut vm));
    eprintln!("arm_agent: {target} done");
    Row {
        target,
        size,
        boot,
        ready,
        idle_kib,
        rate,
        loaded_kib,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut rows = Vec::new();
    for target in TARGETS {
        rows.push(measure(target).await);
    }
    println!(
        "The agent built alone with the release-small profile (`make arm`), booted in qemu-system \
         (`-M virt`, 2 vCPUs, 512 MiB, software emulation on this machine), with its embedded \
         broker; {} QoS1 messages over {DEVICES} devices, 100 in flight, from the host through \
         a forwarded port.\n",
        messages()
    );
    println!(
        "| target | binary (stripped), MB | boot, s | agent start -> ready, s | RSS idle, MiB | QoS1 durable under emulation, msg/s | RSS after the load, MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.1} | {:.2} | {:.1} | {:.0} | {:.1} |",
            r.target,
            r.size as f64 / 1e6,
            r.boot.as_secs_f64(),
            r.ready.as_secs_f64(),
            r.idle_kib as f64 / 1024.0,
            r.rate,
            r.loaded_kib as f64 / 1024.0,
        );
    }
    println!(
        "\nThe durable rate is bound by the emulator (every guest instruction is translated on \
         the host's two cores), not by the agent; the x86 figures are in agent_ingest."
    );
}
