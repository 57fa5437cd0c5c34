//! `make demo`: the whole system on this machine, end to end, in about a minute.
//!
//! Starts a local control plane (etcd + kube-apiserver, CRDs applied), the controller, the
//! agent with its embedded MQTT broker, and the shop-floor simulator; shows the devices arriving in
//! `kubectl get devices` and their live state in `kubectl get devicestates`; then plays the operator: sets a desired speed on one machine and
//! shows it travel down to the device and the Device turn In-Sync, then a speed the machine
//! refuses, shown in the Device's `status.desiredRejection`. Everything it starts stops
//! when it exits. `DEMO_KEEP=1` keeps it running until Ctrl-C, printing the kubectl commands to
//! try.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use edgesync_crds::{Device, DeviceRollout, DeviceStatus, condition_status};
use edgesync_e2e::agent::{AgentConfig, spawn_agent};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::Controller;
use edgesync_e2e::process::{ManagedProcess, ProcessSpec};
use edgesync_e2e::{release_binary, wait, workspace_root};
use kube::Api;

const NAMESPACE: &str = "plant-a";
const MACHINES: usize = 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let started = Instant::now();
    println!("== edgesync demo ==");
    println!("[1/6] local Kubernetes control plane (etcd + kube-apiserver, CRDs applied)");
    let cp = ControlPlane::start();
    println!("      ready in {:.1?} at {}", cp.started_in(), cp.server());

    println!(
        "[2/6] namespace {NAMESPACE}, EdgeNode edge-1 and its token Secret (examples/edgenode.yaml)"
    );
    cp.kubectl_ok(&["create", "namespace", NAMESPACE]);
    let examples = workspace_root().join("examples");
    cp.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "apply",
        "-f",
        &examples.join("edgenode.yaml").display().to_string(),
    ]);

    println!("[3/6] edgesync-controller (release build), with the live API");
    let live_port = edgesync_e2e::free_port();
    let live_listen = format!("127.0.0.1:{live_port}");
    let controller = Controller::start(&cp, &["--live-listen", &live_listen]);
    edgesync_e2e::live::register(&cp, live_port);
    println!(
        "      serving agents on {}, devicestates.live.edgesync.io through the API server",
        controller.url()
    );

    println!("[4/6] edgesync-agent (release build) with its embedded MQTT broker");
    let mqtt_port = edgesync_e2e::free_port();
    let dir = tempfile::tempdir().expect("demo temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "change-me-to-a-long-random-token\n").unwrap();
    let mut config = AgentConfig::embedded(&dir.path().join("agent"), mqtt_port);
    config.node = "edge-1".into();
    config.namespace = NAMESPACE.into();
    config.cloud = Some((controller.url(), token_file));
    let agent = spawn_agent(&config);
    println!(
        "      MQTT on 127.0.0.1:{mqtt_port}, agent data in {}",
        config.data_dir.display()
    );

    println!("[5/6] edgesync-sim: {MACHINES} machines publishing JSON state every second");
    let sim_bin = release_binary("edgesync-examples", "edgesync-sim", "examples");
    let sim_started = Instant::now();
    let sim = ManagedProcess::spawn(
        ProcessSpec::new("edgesync-sim", sim_bin)
            .arg("--port")
            .arg(mqtt_port.to_string())
            .arg("--devices")
            .arg(MACHINES.to_string())
            .arg("--max-speed")
            .arg("6000"),
        dir.path(),
    );

    let devices: Api<Device> = Api::namespaced(cp.client().await, NAMESPACE);
    edgesync_e2e::sim::wait_in_sync(&devices, MACHINES, Duration::from_secs(120)).await;
    println!("\n$ kubectl get devices -n {NAMESPACE}");
    println!("{}", cp.kubectl_ok(&["-n", NAMESPACE, "get", "devices"]));
    println!(
        "$ kubectl get devicestates -n {NAMESPACE}    # the live state, from the controller's memory"
    );
    println!(
        "{}",
        cp.kubectl_ok(&["-n", NAMESPACE, "get", "devicestates"])
    );

    println!("[6/6] the operator sets spec.desired.speed=1500 on machine-3");
    let patched = Instant::now();
    set_speed(
        &cp,
        &devices,
        1500,
        "machine-3 reports speed 1500 and is In-Sync",
        |st| {
            condition_status(&st.conditions, "InSync") == Some("True")
                && st.reported.as_ref().is_some_and(|r| r["speed"] == 1500)
        },
    )
    .await;
    println!(
        "      delta delivered, applied by the machine, reported back and In-Sync in {:.1?}",
        patched.elapsed()
    );
    show(&cp, "{.status.reported}");
    println!("      the operator asks for speed 9000, above what the machines run (6000)");
    set_speed(&cp, &devices, 9000, "machine-3 refuses speed 9000", |st| {
        condition_status(&st.conditions, "DesiredAccepted") == Some("False")
    })
    .await;
    show(&cp, "{.status.desiredRejection}");
    rollout(&cp).await;
    println!("\n$ kubectl get edgenodes -n {NAMESPACE} -o wide");
    println!(
        "{}",
        cp.kubectl_ok(&["-n", NAMESPACE, "get", "edgenodes", "-o", "wide"])
    );
    let agent_bin = edgesync_e2e::agent::agent_binary();
    let outbox = std::process::Command::new(&agent_bin)
        .args(["outbox", "--config"])
        .arg(config.data_dir.join("agent.toml"))
        .output()
        .expect("run edgesync-agent outbox");
    println!("$ edgesync-agent outbox --config agent.toml");
    println!("{}", String::from_utf8_lossy(&outbox.stdout));
    println!(
        "Device status writes so far: {} for about {} MQTT messages (latest state wins).",
        controller
            .metric("edgesync_controller_status_writes_total")
            .await,
        MACHINES as u64 * (sim_started.elapsed().as_secs() + 1)
    );

    if std::env::var_os("DEMO_KEEP").is_some() {
        println!("\nRunning until Ctrl-C. Try:");
        println!(
            "  KUBECONFIG={} kubectl get devices -n {NAMESPACE} -w",
            cp.kubeconfig().display()
        );
        println!(
            "  KUBECONFIG={} kubectl get devicestates -n {NAMESPACE} -w",
            cp.kubeconfig().display()
        );
        println!("  curl -s {}/metrics | grep edgesync_", controller.url());
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(sim);
    drop(agent);
    drop(controller);
    println!(
        "demo finished in {:.1?}; everything it started is stopped",
        started.elapsed()
    );
}

/// Rolls speed 2400 out to every machine in waves (a DeviceRollout), and shows it.
async fn rollout(cp: &ControlPlane) {
    println!(
        "      the operator rolls speed 2400 out to all {MACHINES} machines: a canary of 2, then half, then all"
    );
    let doc = format!(
        "apiVersion: edgesync.io/v1alpha1
kind: DeviceRollout
metadata:
  name: speed-2400
  namespace: {NAMESPACE}
spec:
  selector: {{}}
  desired: {{speed: 2400}}
  progressDeadlineSeconds: 60
  strategy:
    steps: [{{devices: 2}}, {{devices: \"50%\"}}]
    revertOnFailure: true
"
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &doc);
    assert!(out.status.success(), "kubectl apply: {out:?}");
    let started = Instant::now();
    let rollouts: Api<DeviceRollout> = Api::namespaced(cp.client().await, NAMESPACE);
    wait::until("the rollout Complete", Duration::from_secs(120), || {
        let rollouts = rollouts.clone();
        async move {
            let phase = rollouts.get("speed-2400").await.ok()?.status?.phase?;
            assert_ne!(
                phase,
                edgesync_crds::RolloutPhase::Halted,
                "the demo's rollout halted; see kubectl describe dro speed-2400"
            );
            (phase == edgesync_crds::RolloutPhase::Complete).then_some(())
        }
    })
    .await;
    println!(
        "      three waves, each In-Sync before the next, in {:.1?}",
        started.elapsed()
    );
    println!("\n$ kubectl get devicerollouts -n {NAMESPACE}");
    println!(
        "{}",
        cp.kubectl_ok(&["-n", NAMESPACE, "get", "devicerollouts"])
    );
}

/// Sets machine-3's desired speed and waits until its status is `done`.
async fn set_speed(
    cp: &ControlPlane,
    devices: &Api<Device>,
    speed: u64,
    what: &str,
    done: fn(&DeviceStatus) -> bool,
) {
    cp.patch_device(
        NAMESPACE,
        "machine-3",
        &format!(r#"{{"spec":{{"desired":{{"speed":{speed}}}}}}}"#),
    );
    wait::until(what, Duration::from_secs(60), || {
        let devices = devices.clone();
        async move {
            let st = devices.get("machine-3").await.ok()?.status?;
            done(&st).then_some(())
        }
    })
    .await;
}

/// Prints machine-3's field at `path`, with the kubectl command that shows it.
fn show(cp: &ControlPlane, path: &str) {
    println!("\n$ kubectl get device machine-3 -n {NAMESPACE} -o jsonpath='{path}'");
    println!(
        "{}",
        cp.kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "device",
            "machine-3",
            "-o",
            &format!("jsonpath={path}"),
        ])
    );
}
