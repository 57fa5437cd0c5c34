//! DeviceRollouts end to end: a real API server, the controller, Mosquitto, the agent and
//! simulated machines (`edgesync-sim`) that apply desired speeds or refuse them over MQTT.
//! Followed with `kubectl edgesync rollout status -w`, as an operator would.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use edgesync_crds::{Device, DeviceRollout, RolloutPhase, condition_status};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{Controller, create_devices, create_node};
use edgesync_e2e::device::TestDevice;
use edgesync_e2e::process::ManagedProcess;
use edgesync_e2e::sim::{self, in_sync};
use edgesync_e2e::stack::{Stack, StackOptions};
use edgesync_e2e::{release_binary, wait};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// The label every simulated machine of a test gets, for the rollouts' selectors.
const FLEET: &str = "fleet=sim";

fn options(identity: &str) -> StackOptions {
    StackOptions {
        node_spec: "  autoRegisterDevices: true\n  limits:\n    offlineAfterSeconds: 3".into(),
        // A fixed identity: a controller restarted after kill -9 holds its Lease again at
        // once instead of waiting for it to expire.
        controller_args: vec!["--identity".into(), identity.into()],
        ..StackOptions::default()
    }
}

/// `edgesync-sim` with `devices` machines on the stack's broker, every 2 s, and extra
/// arguments.
fn simulate(
    stack: &Stack<'_>,
    devices: usize,
    extra: &[&str],
) -> (ManagedProcess, tempfile::TempDir) {
    sim::spawn(stack.broker.port(), devices, 2000, extra)
}

/// The reported `speed` of a Device.
fn reported_speed(d: &Device) -> Option<&Value> {
    d.status.as_ref()?.reported.as_ref()?.get("speed")
}

/// Waits until `n` machines are registered and In-Sync, then labels them [`FLEET`].
async fn registered(stack: &Stack<'_>, n: usize) -> Api<Device> {
    let devices = stack.devices().await;
    sim::wait_in_sync(&devices, n, Duration::from_secs(120)).await;
    let mut args: Vec<String> = vec![
        "-n".into(),
        stack.ns.name.clone(),
        "label".into(),
        "devices".into(),
    ];
    args.extend((0..n).map(|i| format!("machine-{i}")));
    args.push(FLEET.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stack.cp.kubectl_ok(&args);
    devices
}

fn apply_rollout(cp: &ControlPlane, ns: &str, name: &str, spec: &Value) {
    let doc = json!({
        "apiVersion": "edgesync.io/v1alpha1",
        "kind": "DeviceRollout",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    });
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &doc.to_string());
    assert!(out.status.success(), "kubectl apply: {out:?}");
}

/// `kubectl edgesync ARGS` in the stack's namespace, found by kubectl on the PATH.
async fn plugin(cp: &ControlPlane, ns: &str, args: &[&str]) -> Output {
    let bin: PathBuf = release_binary("kubectl-edgesync", "kubectl-edgesync", "plugin");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    tokio::process::Command::new(cp.kubectl_path())
        .arg("edgesync")
        .args(["-n", ns])
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", cp.kubeconfig())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn rollout(cp: &ControlPlane, ns: &str, name: &str) -> DeviceRollout {
    let api: Api<DeviceRollout> = Api::namespaced(cp.client().await, ns);
    api.get(name).await.unwrap()
}

async fn wait_phase(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    phase: RolloutPhase,
    within: Duration,
) -> DeviceRollout {
    let api: Api<DeviceRollout> = Api::namespaced(cp.client().await, ns);
    wait::until(&format!("DeviceRollout {name} {phase:?}"), within, || {
        let api = api.clone();
        async move {
            let r = api.get(name).await.ok()?;
            (r.status.as_ref()?.phase? == phase).then_some(r)
        }
    })
    .await
}

/// The rollout's mark on each Device: (step, time, reverted), by Device name.
fn marks(list: &[Device], rollout: &str) -> BTreeMap<String, Value> {
    let key = format!("rollout.edgesync.io/{rollout}");
    list.iter()
        .filter_map(|d| {
            let mark = d.annotations().get(&key)?;
            Some((d.name_any(), serde_json::from_str(mark).unwrap()))
        })
        .collect()
}

/// 200 machines in four waves: each wave starts only once the one before is In-Sync, every
/// device is patched exactly once (its generation moves by one), and `rollout status -w`
/// follows it to Complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_waves_over_200_devices_complete_in_order() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(cp, "rollout-waves", options("rollout-waves")).await;
    let (_sim, _dir) = simulate(&stack, 200, &[]);
    let devices = registered(&stack, 200).await;
    let before: BTreeMap<String, i64> = devices
        .list(&ListParams::default().labels(FLEET))
        .await
        .unwrap()
        .items
        .iter()
        .map(|d| (d.name_any(), d.metadata.generation.unwrap()))
        .collect();
    apply_rollout(
        cp,
        &stack.ns.name,
        "speed-1500",
        &json!({
            "selector": {"matchLabels": {"fleet": "sim"}},
            "desired": {"speed": 1500},
            "progressDeadlineSeconds": 120,
            "strategy": {"steps": [{"devices": 2}, {"devices": "10%"}, {"devices": "50%"}, {"devices": "100%"}]}
        }),
    );
    let out = plugin(
        cp,
        &stack.ns.name,
        &["rollout", "status", "speed-1500", "-w", "--timeout", "240s"],
    )
    .await;
    if !out.status.success() {
        stack.dump_logs();
    }
    assert!(out.status.success(), "rollout status -w: {}", text(&out));
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        lines
            .lines()
            .last()
            .unwrap()
            .starts_with("Complete  step 4/4  selected 200  patched 200  in-sync 200  failed 0"),
        "{lines}"
    );

    let list = devices
        .list(&ListParams::default().labels(FLEET))
        .await
        .unwrap()
        .items;
    let marks = marks(&list, "speed-1500");
    assert_eq!(marks.len(), 200);
    let per_step = |k: u64| marks.values().filter(|m| m["step"] == k).count();
    assert_eq!(
        (per_step(1), per_step(2), per_step(3), per_step(4)),
        (2, 18, 80, 100)
    );
    // Waves in order: no device of a step was patched before every device of the step
    // before it (each wave waits for the last to be In-Sync).
    for k in 2..=4u64 {
        let latest_before = marks
            .values()
            .filter(|m| m["step"] == k - 1)
            .map(|m| m["time"].as_i64().unwrap())
            .max()
            .unwrap();
        let earliest = marks
            .values()
            .filter(|m| m["step"] == k)
            .map(|m| m["time"].as_i64().unwrap())
            .min()
            .unwrap();
        assert!(
            earliest >= latest_before,
            "step {k} started at {earliest}, before step {} ended at {latest_before}",
            k - 1
        );
    }
    for d in &list {
        assert_eq!(
            d.metadata.generation.unwrap(),
            before[&d.name_any()] + 1,
            "{} patched once",
            d.name_any()
        );
        assert_eq!(d.spec.desired.as_ref().unwrap()["speed"], json!(1500));
        assert_eq!(
            d.status.as_ref().unwrap().reported.as_ref().unwrap()["speed"],
            json!(1500)
        );
    }
    let described = cp.kubectl_ok(&[
        "-n",
        &stack.ns.name,
        "describe",
        "devicerollout",
        "speed-1500",
    ]);
    for reason in ["Started", "StepStarted", "Complete"] {
        assert!(
            described.contains(reason),
            "no {reason} Event:\n{described}"
        );
    }
}

/// Canary machines refuse the change over MQTT: the rollout halts, patches nothing beyond the
/// canary, and gives the canary its previous desired values back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_canary_halts_the_rollout_and_is_reverted() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(cp, "rollout-halt", options("rollout-halt")).await;
    // Every machine refuses a speed above 6000.
    let (_sim, _dir) = simulate(&stack, 20, &["--max-speed", "6000"]);
    let devices = registered(&stack, 20).await;
    // A previous value, to be put back.
    for i in 0..20 {
        cp.patch_device(
            &stack.ns.name,
            &format!("machine-{i}"),
            r#"{"spec":{"desired":{"speed":1000}}}"#,
        );
    }
    wait::until(
        "every machine In-Sync at speed 1000",
        Duration::from_secs(60),
        || {
            let devices = devices.clone();
            async move {
                let list = devices
                    .list(&ListParams::default().labels(FLEET))
                    .await
                    .ok()?;
                list.items
                    .iter()
                    .all(|d| in_sync(d) && reported_speed(d) == Some(&json!(1000)))
                    .then_some(())
            }
        },
    )
    .await;
    apply_rollout(
        cp,
        &stack.ns.name,
        "speed-9000",
        &json!({
            "selector": {"matchLabels": {"fleet": "sim"}},
            "desired": {"speed": 9000, "mode": "turbo"},
            "progressDeadlineSeconds": 120,
            "strategy": {"steps": [{"devices": 3}, {"devices": "100%"}], "revertOnFailure": true}
        }),
    );
    let out = plugin(
        cp,
        &stack.ns.name,
        &["rollout", "status", "speed-9000", "-w", "--timeout", "120s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Halted"),
        "{}",
        text(&out)
    );
    let halted = rollout(cp, &stack.ns.name, "speed-9000").await;
    let status = halted.status.clone().unwrap();
    assert!(status.touched <= 3 && status.touched >= 1, "{status:?}");
    assert_eq!(status.failures[0].code, "out_of_range", "{status:?}");

    let reverted = wait::until("the canary reverted", Duration::from_secs(30), || {
        let stack = &stack;
        async move {
            let r = rollout(stack.cp, &stack.ns.name, "speed-9000").await;
            r.status?.reverted
        }
    })
    .await;
    let list = devices
        .list(&ListParams::default().labels(FLEET))
        .await
        .unwrap()
        .items;
    let marks = marks(&list, "speed-9000");
    assert_eq!(
        marks.len() as u64,
        status.touched,
        "nothing beyond the canary was patched"
    );
    assert_eq!(reverted, status.touched);
    for d in &list {
        let desired = d.spec.desired.clone().unwrap();
        assert_eq!(
            desired.get("speed"),
            Some(&json!(1000)),
            "{}: {desired:?}",
            d.name_any()
        );
        assert_eq!(
            desired.get("mode"),
            None,
            "{}: a key the rollout added is removed",
            d.name_any()
        );
        if let Some(m) = marks.get(&d.name_any()) {
            assert_eq!(m["reverted"], json!(true));
        }
    }
    let described = cp.kubectl_ok(&[
        "-n",
        &stack.ns.name,
        "describe",
        "devicerollout",
        "speed-9000",
    ]);
    assert!(
        described.contains("Halted") && described.contains("Reverted"),
        "{described}"
    );
}

/// The controller killed with SIGKILL between two waves (at a pause step): once back, it goes
/// on from the rollout's status and the Devices' marks; no device is patched twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_between_waves_resumes_without_patching_twice() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(cp, "rollout-kill", options("rollout-kill")).await;
    let (_sim, _dir) = simulate(&stack, 40, &[]);
    let devices = registered(&stack, 40).await;
    apply_rollout(
        cp,
        &stack.ns.name,
        "speed-2000",
        &json!({
            "selector": {"matchLabels": {"fleet": "sim"}},
            "desired": {"speed": 2000},
            "progressDeadlineSeconds": 120,
            "strategy": {"steps": [{"devices": 10, "pause": true}, {"devices": "100%"}]}
        }),
    );
    let paused = wait_phase(
        cp,
        &stack.ns.name,
        "speed-2000",
        RolloutPhase::Paused,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(paused.status.as_ref().unwrap().touched, 10);
    assert!(paused.spec.paused, "a pause step sets spec.paused");
    stack.controller.process.kill9();
    stack.controller.process.restart();
    stack.controller.wait_ready();
    let out = plugin(cp, &stack.ns.name, &["rollout", "resume", "speed-2000"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = plugin(
        cp,
        &stack.ns.name,
        &["rollout", "status", "speed-2000", "-w", "--timeout", "120s"],
    )
    .await;
    if !out.status.success() {
        stack.dump_logs();
    }
    assert!(out.status.success(), "{}", text(&out));
    let list = devices
        .list(&ListParams::default().labels(FLEET))
        .await
        .unwrap()
        .items;
    let marks = marks(&list, "speed-2000");
    assert_eq!(marks.values().filter(|m| m["step"] == 1).count(), 10);
    assert_eq!(marks.values().filter(|m| m["step"] == 2).count(), 30);
    for d in &list {
        // Created at generation 1; the rollout's one patch made it 2.
        assert_eq!(
            d.metadata.generation,
            Some(2),
            "{} patched more than once",
            d.name_any()
        );
    }
}

/// A device whose edge node is offline through two rollouts (`offline: Wait`) receives only
/// the final desired state, once, when the node returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_only_the_final_state_once() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(cp, "rollout-offline", options("rollout-offline")).await;
    let port = stack.broker.port();
    let mut press =
        TestDevice::connect("press-1", port, "edgesync/press-1/shadow/update/delta").await;
    press
        .publish("factory/press-1/state", json!({"speed": 800}).to_string())
        .await;
    let devices = stack.devices().await;
    wait::until(
        "press-1 registered and In-Sync",
        Duration::from_secs(60),
        || {
            let devices = devices.clone();
            async move {
                devices
                    .get("press-1")
                    .await
                    .ok()
                    .filter(in_sync)
                    .map(|_| ())
            }
        },
    )
    .await;
    cp.kubectl_ok(&["-n", &stack.ns.name, "label", "device", "press-1", FLEET]);
    stack.agent.stop();
    wait::until("press-1 Online=False", Duration::from_secs(60), || {
        let devices = devices.clone();
        async move {
            let d = devices.get("press-1").await.ok()?;
            (condition_status(&d.status?.conditions, "Online") == Some("False")).then_some(())
        }
    })
    .await;
    for (name, speed) in [("speed-1200", 1200), ("speed-1800", 1800)] {
        apply_rollout(
            cp,
            &stack.ns.name,
            name,
            &json!({
                "selector": {"matchLabels": {"fleet": "sim"}},
                "desired": {"speed": speed},
                "strategy": {"offline": "Wait"}
            }),
        );
        let done = wait_phase(
            cp,
            &stack.ns.name,
            name,
            RolloutPhase::Complete,
            Duration::from_secs(60),
        )
        .await;
        let status = done.status.unwrap();
        assert_eq!(
            (status.touched, status.updated, status.failed),
            (1, 0, 0),
            "{name}"
        );
    }
    assert!(
        press.drain().is_empty(),
        "nothing reaches the device while its node is down"
    );
    stack.agent.restart();
    let delta = press.expect("edgesync/press-1/shadow/update/delta").await;
    assert_eq!(delta["state"]["speed"], json!(1800), "{delta}");
    press
        .publish(
            "edgesync/press-1/shadow/update",
            json!({"state": {"reported": {"speed": 1800}}}).to_string(),
        )
        .await;
    wait::until(
        "press-1 In-Sync at speed 1800",
        Duration::from_secs(60),
        || {
            let devices = devices.clone();
            async move {
                let d = devices.get("press-1").await.ok()?;
                (in_sync(&d) && reported_speed(&d) == Some(&json!(1800))).then_some(())
            }
        },
    )
    .await;
    let later: Vec<(String, Value)> = press.drain();
    assert!(
        later.is_empty(),
        "the device got one delta, then: {later:?}"
    );
}

/// Two rollouts that set the same key on the same Devices never interleave: the second waits
/// (`Blocked`, naming the first) and starts once the first is aborted; a rollout of other
/// keys runs beside it. A spec the controller cannot follow halts before patching anything.
/// No agent: the Devices never become In-Sync, so the first rollout holds its canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_rollouts_wait_and_bad_specs_halt() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("rollout-conflict");
    let ns = ns.name.as_str();
    create_node(cp, ns, "edge-1", "token-conflict", "");
    let names: Vec<String> = (0..6).map(|i| format!("press-{i}")).collect();
    create_devices(cp, ns, "edge-1", &names);
    let mut label = vec!["-n", ns, "label", "devices"];
    label.extend(names.iter().map(String::as_str));
    label.push(FLEET);
    cp.kubectl_ok(&label);
    let _controller = Controller::start(
        cp,
        &["--lease-name", "rollout-conflict", "--lease-namespace", ns],
    );
    let selector = json!({"matchLabels": {"fleet": "sim"}});
    apply_rollout(
        cp,
        ns,
        "first",
        &json!({"selector": selector, "desired": {"speed": 1, "motor": {"max": 3}},
                "progressDeadlineSeconds": 3600, "strategy": {"steps": [{"devices": 2}]}}),
    );
    let api: Api<DeviceRollout> = Api::namespaced(cp.client().await, ns);
    wait::until("first patches its canary", Duration::from_secs(30), || {
        let api = api.clone();
        async move { (api.get("first").await.ok()?.status?.touched == 2).then_some(()) }
    })
    .await;
    apply_rollout(
        cp,
        ns,
        "second",
        &json!({"selector": selector, "desired": {"motor": {"max": 4}}}),
    );
    apply_rollout(
        cp,
        ns,
        "beside",
        &json!({"selector": selector, "desired": {"lamp": "green"},
                "progressDeadlineSeconds": 3600, "strategy": {"steps": [{"devices": 1}]}}),
    );
    apply_rollout(
        cp,
        ns,
        "typo",
        &json!({"selector": selector, "desired": {"lamp": "red"},
                "strategy": {"steps": [{"devices": "ten"}]}}),
    );
    let second = wait_phase(
        cp,
        ns,
        "second",
        RolloutPhase::Pending,
        Duration::from_secs(30),
    )
    .await;
    let blocked = second.status.unwrap().conditions;
    let blocked = blocked.iter().find(|c| c.type_ == "Blocked").unwrap();
    assert_eq!(
        (blocked.status.as_str(), blocked.reason.as_str()),
        ("True", "ConflictsWith")
    );
    assert!(
        blocked.message.contains("first") && blocked.message.contains("motor"),
        "{}",
        blocked.message
    );
    let beside = wait::until("beside patches its canary", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            api.get("beside")
                .await
                .ok()
                .filter(|r| r.status.as_ref().is_some_and(|s| s.touched == 1))
        }
    })
    .await;
    assert_eq!(
        beside.status.unwrap().phase,
        Some(RolloutPhase::Progressing)
    );
    let typo = wait_phase(
        cp,
        ns,
        "typo",
        RolloutPhase::Halted,
        Duration::from_secs(30),
    )
    .await;
    let typo = typo.status.unwrap();
    assert_eq!(typo.touched, 0);
    let halted = typo
        .conditions
        .iter()
        .find(|c| c.type_ == "Halted")
        .unwrap();
    assert_eq!(halted.reason, "InvalidSpec");
    assert!(
        halted.message.contains("strategy.steps[0].devices"),
        "{}",
        halted.message
    );

    let devices: Api<Device> = Api::namespaced(cp.client().await, ns);
    let list = devices.list(&ListParams::default()).await.unwrap().items;
    assert!(
        marks(&list, "second").is_empty(),
        "second touched nothing while blocked"
    );
    let out = plugin(cp, ns, &["rollout", "abort", "first"]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait_phase(
        cp,
        ns,
        "first",
        RolloutPhase::Aborted,
        Duration::from_secs(30),
    )
    .await;
    let second = wait::until(
        "second starts once first is aborted",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let r = api.get("second").await.ok()?;
                (r.status.as_ref()?.touched > 0).then_some(r)
            }
        },
    )
    .await;
    let status = second.status.unwrap();
    assert_eq!(status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(
        edgesync_crds::condition_status(&status.conditions, "Blocked"),
        Some("False")
    );
    // Without revertOnFailure, the aborted rollout's devices keep its values.
    let list = devices.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(marks(&list, "first").len(), 2);
    let table = cp.kubectl_ok(&["-n", ns, "get", "dro"]);
    assert!(
        table.contains("Aborted") && table.contains("Halted"),
        "{table}"
    );
}
