//! `make bench` (rollout): a DeviceRollout over 10,000 simulated machines (`edgesync-sim`,
//! one state every 10 s each, through Mosquitto and the agent), every process real and
//! separate, the controller with the identity `deploy/` gives it.
//!
//! The rollouts select every Device of the bench's namespace (the machines only: labelling
//! 10,000 Devices one `kubectl label` at a time would take longer than the rollout).
//!
//! 1. A change every machine takes, in waves of 1%, 10%, 50% and 100%: the time each wave
//!    took (from its first patch to the last of its devices In-Sync) and in all, and the API
//!    writes per device (the rollout's patches, and the status writes of the reports that
//!    followed them).
//! 2. A change 5% of the machines refuse (`--max-speed`), with a 1% canary and no failure
//!    allowed: the time from the first refusal the API server holds (seen by a watch of the
//!    Devices) to the rollout's halt, and the devices patched beyond the canary.
//!
//! `EDGESYNC_BENCH_QUICK=1`: 300 machines, half of which refuse.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::{DeviceRollout, RolloutPhase};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::measure::{aim, scaled};
use edgesync_e2e::stack::{Stack, StackOptions};
use edgesync_e2e::{sim, wait};
use futures_util::StreamExt as _;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

fn apply(stack: &Stack<'_>, name: &str, spec: serde_json::Value) {
    let doc = json!({
        "apiVersion": "edgesync.io/v1alpha1", "kind": "DeviceRollout",
        "metadata": {"name": name, "namespace": stack.ns.name}, "spec": spec,
    });
    let out = stack
        .cp
        .kubectl_stdin(&["apply", "-f", "-"], &doc.to_string());
    assert!(out.status.success(), "kubectl apply: {out:?}");
}

/// Polls the rollout every 50 ms until it ends; returns each step's start instant (the
/// status naming it) and the end instant and phase.
async fn follow(
    api: &Api<DeviceRollout>,
    name: &str,
    within: Duration,
) -> (Vec<(u32, Instant)>, Instant, DeviceRollout) {
    let started = Instant::now();
    let mut steps: Vec<(u32, Instant)> = Vec::new();
    loop {
        assert!(
            started.elapsed() < within,
            "rollout {name} did not end within {within:?}"
        );
        if let Ok(r) = api.get(name).await {
            let status = r.status.clone().unwrap_or_default();
            if let Some(step) = status.current_step
                && steps.last().map(|s| s.0) != Some(step)
            {
                steps.push((step, Instant::now()));
            }
            if status.phase.is_some_and(RolloutPhase::ended) {
                return (steps, Instant::now(), r);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let machines: usize = scaled(10_000, 300);
    let cp = ControlPlane::shared();
    let stack = Stack::start(
        cp,
        "bench-rollout",
        StackOptions {
            node_spec: "  autoRegisterDevices: true".into(),
            deployed_identity: true,
            ..StackOptions::default()
        },
    )
    .await;
    let _sim = sim::spawn(
        stack.broker.port(),
        machines,
        10_000,
        // A smoke run's canary is 3 machines: half of them refuse, so it likely holds one.
        &[
            "--max-speed",
            "6000",
            "--max-speed-share",
            scaled("5", "50"),
        ],
    );
    let devices = stack.devices().await;
    let registering = Instant::now();
    sim::wait_in_sync(&devices, machines, Duration::from_secs(600)).await;
    eprintln!(
        "{machines} machines registered and In-Sync in {:.1?}",
        registering.elapsed()
    );
    let rollouts: Api<DeviceRollout> = Api::namespaced(cp.client().await, &stack.ns.name);

    // The fleet's usual status writes (each machine's state every 10 s), to tell the
    // rollout's own from them.
    let window = scaled(Duration::from_secs(20), Duration::from_secs(5));
    let usual_before = stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await;
    tokio::time::sleep(window).await;
    let usual_per_second = (stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await
        - usual_before)
        / window.as_secs_f64();

    // 1. Waves of 1/10/50/100%.
    let conditions_before = stack
        .controller
        .metric("edgesync_controller_condition_writes_total")
        .await;
    let patches_before = stack
        .controller
        .metric("edgesync_controller_rollout_device_writes_total")
        .await;
    let status_before = stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await;
    let t0 = Instant::now();
    apply(
        &stack,
        "speed-1500",
        json!({
            "selector": {},
            "desired": {"speed": 1500},
            "progressDeadlineSeconds": 600,
            "strategy": {"steps": [{"devices": "1%"}, {"devices": "10%"}, {"devices": "50%"}, {"devices": "100%"}]}
        }),
    );
    let (steps, end, done) = follow(&rollouts, "speed-1500", Duration::from_secs(1200)).await;
    let total = end - t0;
    let status = done.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Some(RolloutPhase::Complete),
        "{:?}",
        status.conditions
    );
    let patches = stack
        .controller
        .metric("edgesync_controller_rollout_device_writes_total")
        .await
        - patches_before;
    let status_writes = stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await
        - status_before;
    println!("### Waves of 1%, 10%, 50%, 100% over {machines} machines\n");
    println!("| step | devices patched by its end | wave took, s |\n|---|---|---|");
    let share = [1u64, 10, 50, 100];
    for (i, (step, at)) in steps.iter().enumerate() {
        let next = steps.get(i + 1).map_or(end, |s| s.1);
        let target = (machines as u64 * share[(*step as usize - 1).min(3)]).div_ceil(100);
        println!("| {step} | {target} | {:.1} |", (next - *at).as_secs_f64());
    }
    println!(
        "\nIn all: {:.1} s from `kubectl apply` to Complete; {} patched, {} In-Sync, {} failed.",
        total.as_secs_f64(),
        status.touched,
        status.updated,
        status.failed
    );
    let conditions = stack
        .controller
        .metric("edgesync_controller_condition_writes_total")
        .await
        - conditions_before;
    let usual = usual_per_second * total.as_secs_f64();
    println!(
        "API writes per device: {:.2} rollout patches, {:.2} condition writes of the liveness \
         loop (InSync=False for a new generation). Device status writes during the rollout: \
         {status_writes:.0}; at the fleet's usual {usual_per_second:.0}/s, {usual:.0} for the \
         time.\n",
        patches / machines as f64,
        conditions / machines as f64
    );
    aim(
        "one patch per device in a rollout",
        &format!("{:.2}", patches / machines as f64),
        (patches / machines as f64 - 1.0).abs() < 0.005,
    );

    // 2. A change 5% of the machines refuse, a 1% canary, no failure allowed.
    let first_refusal: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watch = {
        let first = first_refusal.clone();
        let api = devices.clone();
        tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(d)) = stream.next().await {
                let refused_now = d
                    .status
                    .as_ref()
                    .and_then(|s| s.desired_rejection.as_ref())
                    .is_some_and(|r| Some(r.generation) == d.metadata.generation);
                if refused_now {
                    first.lock().unwrap().get_or_insert_with(Instant::now);
                }
            }
        })
    };
    apply(
        &stack,
        "speed-9000",
        json!({
            "selector": {},
            "desired": {"speed": 9000},
            "progressDeadlineSeconds": 600,
            "strategy": {"steps": [{"devices": "1%"}, {"devices": "100%"}], "revertOnFailure": true}
        }),
    );
    let (_, halted_at, halted) = follow(&rollouts, "speed-9000", Duration::from_secs(300)).await;
    let status = halted.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Some(RolloutPhase::Halted),
        "{:?}",
        status.conditions
    );
    let first = first_refusal
        .lock()
        .unwrap()
        .expect("the watch saw the refusal");
    let to_halt = halted_at.saturating_duration_since(first);
    let canary = (machines as u64).div_ceil(100);
    let beyond = status.touched.saturating_sub(canary);
    let reverted = wait::until("the canary reverted", Duration::from_secs(120), || {
        let rollouts = rollouts.clone();
        async move { rollouts.get("speed-9000").await.ok()?.status?.reverted }
    })
    .await;
    watch.abort();
    println!("### A change 5% of the machines refuse; canary 1% ({canary}), maxFailures 0\n");
    println!(
        "First refusal in the API server to the halt: {:.2} s. Patched: {} (beyond the canary: \
         {beyond}), failed {}; reverted {reverted}.\n",
        to_halt.as_secs_f64(),
        status.touched,
        status.failed
    );
    aim(
        "refusal to halt < 10 s",
        &format!("{:.2} s", to_halt.as_secs_f64()),
        to_halt < Duration::from_secs(10),
    );
    aim(
        "0 devices patched beyond the canary",
        &beyond.to_string(),
        beyond == 0,
    );
}
