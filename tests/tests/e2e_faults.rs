//! End to end under faults, every process real and separate: the agent killed with SIGKILL
//! while QoS1 publishers run, the agent<->controller link cut under load (with desired state
//! changed meanwhile), the controller killed and restarted, and a device flooding at 1 kHz
//! against a small write budget and node limit. Each ends with every Device equal to its last
//! published state and no reportedVersion ever observed going backwards.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgesync_crds::{EdgeNode, condition_status};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::device::TestDevice;
use edgesync_e2e::proxy::Fault;
use edgesync_e2e::stack::{Stack, StackOptions, VersionObserver, publish_acked, wait_reported};
use edgesync_e2e::wait;
use kube::Api;
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(90);

fn auto_register() -> StackOptions {
    StackOptions {
        node_spec: "  autoRegisterDevices: true\n  limits:\n    offlineAfterSeconds: 3".into(),
        ..StackOptions::default()
    }
}

/// `rounds` plain-JSON states for `devices` devices, round-robin; returns the messages and the
/// last `n` of each device.
fn workload(
    devices: usize,
    rounds: u64,
    from: u64,
) -> (Vec<(String, String)>, HashMap<String, Value>) {
    let mut msgs = Vec::new();
    let mut last = HashMap::new();
    for n in from..from + rounds {
        for d in 0..devices {
            let name = format!("dev-{d}");
            msgs.push((
                format!("factory/{name}/state"),
                json!({"n": n, "pad": "x".repeat(100)}).to_string(),
            ));
            last.insert(name, json!(n));
        }
    }
    (msgs, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_ten_times_loses_nothing() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(cp, "e2e-kill", auto_register()).await;
    let devices = stack.devices().await;
    let observer = VersionObserver::start(devices.clone());
    let (msgs, last) = workload(40, 100, 0);
    let port = stack.broker.port();
    let publisher = tokio::spawn(publish_acked(port, "kill-publisher", msgs));
    let started = Instant::now();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..700))).await;
        stack.agent.kill9();
        stack.agent.restart();
    }
    publisher.await.unwrap();
    wait_reported(&devices, "n", &last, CONVERGE).await;
    let versions = observer.assert_never_regressed();
    println!(
        "agent kill -9 x10 during 4000 QoS1 messages: converged in {:?}, {versions} versions observed, none regressed",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_outage_coalesces_then_converges_and_desired_waits_for_the_link() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(cp, "e2e-outage", auto_register()).await;
    let devices = stack.devices().await;
    let nodes: Api<EdgeNode> = Api::namespaced(cp.client().await, &stack.ns.name);
    let observer = VersionObserver::start(devices.clone());
    let port = stack.broker.port();
    let (msgs, last) = workload(50, 1, 0);
    publish_acked(port, "outage-publisher", msgs).await;
    wait_reported(&devices, "n", &last, CONVERGE).await;

    // Desired state set while connected reaches the agent, which keeps it.
    let mut dev1 = TestDevice::connect("dev-1-client", port, "edgesync/dev-1/shadow/#").await;
    cp.patch_device(
        &stack.ns.name,
        "dev-1",
        r#"{"spec":{"desired":{"speed":10}}}"#,
    );
    let delta = dev1.expect("edgesync/dev-1/shadow/update/delta").await;
    assert_eq!(delta["state"]["speed"], 10);
    drop(dev1);

    stack.proxy.set(Fault::Cut);
    let cut_at = Instant::now();
    let (msgs, last) = workload(50, 20, 1);
    publish_acked(port, "outage-publisher", msgs).await;
    // 1000 messages while offline: the outbox holds one row per device, not per message.
    let outbox = wait::until(
        "outbox to hold all 50 devices",
        Duration::from_secs(30),
        || async {
            let o = edgesync_agent::cli::outbox(&stack.agent_db()).ok()?;
            (o["pendingDevices"] == 50).then_some(o)
        },
    )
    .await;
    assert_eq!(outbox["pending"].as_array().unwrap().len(), 50, "{outbox}");
    // The cloud notices the silent node.
    wait::until(
        "EdgeNode Ready=False during the outage",
        Duration::from_secs(30),
        || async {
            let n = nodes.get("edge-1").await.ok()?;
            (condition_status(&n.status?.conditions, "Ready") == Some("False")).then_some(())
        },
    )
    .await;
    // A device reconnecting while the uplink is down still gets its desired state from the edge.
    let mut dev1 = TestDevice::connect("dev-1-again", port, "edgesync/dev-1/shadow/#").await;
    dev1.publish("edgesync/dev-1/shadow/get", "{}").await;
    let doc = dev1.expect("edgesync/dev-1/shadow/get/accepted").await;
    assert_eq!(doc["state"]["desired"]["speed"], 10, "{doc}");
    // Desired changed in Kubernetes while the link is down: delivered once it returns.
    cp.patch_device(
        &stack.ns.name,
        "dev-2",
        r#"{"spec":{"desired":{"speed":20}}}"#,
    );
    let mut dev2 = TestDevice::connect("dev-2-client", port, "edgesync/dev-2/shadow/#").await;

    stack.proxy.set(Fault::Pass);
    let restored = Instant::now();
    wait_reported(&devices, "n", &last, CONVERGE).await;
    let caught_up = restored.elapsed();
    let delta = dev2.expect("edgesync/dev-2/shadow/update/delta").await;
    assert_eq!(delta["state"]["speed"], 20);
    wait::until(
        "EdgeNode Ready=True after recovery",
        Duration::from_secs(30),
        || async {
            let n = nodes.get("edge-1").await.ok()?;
            (condition_status(&n.status?.conditions, "Ready") == Some("True")).then_some(())
        },
    )
    .await;
    observer.assert_never_regressed();
    println!(
        "uplink cut for {:?} with 1000 messages: outbox 50 rows; caught up {caught_up:?} after restore",
        restored - cut_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_and_restarted_under_load_loses_nothing() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(cp, "e2e-ctl-crash", auto_register()).await;
    let devices = stack.devices().await;
    let observer = VersionObserver::start(devices.clone());
    let port = stack.broker.port();
    let (msgs, last) = workload(40, 50, 0);
    let publisher = tokio::spawn(publish_acked(port, "ctl-crash-publisher", msgs));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..1000))).await;
        stack.controller.process.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stack.controller.process.restart();
        stack.controller.wait_ready();
    }
    publisher.await.unwrap();
    wait_reported(&devices, "n", &last, CONVERGE).await;
    observer.assert_never_regressed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1khz_device_is_coalesced_within_the_write_budget_and_429_is_honoured() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(
        cp,
        "e2e-flood",
        StackOptions {
            node_spec:
                "  autoRegisterDevices: true\n  limits:\n    reportsPerSecond: 5\n    burst: 5"
                    .into(),
            // A fixed budget of 10 writes/s (min = max).
            controller_args: vec![
                "--write-qps".into(),
                "10".into(),
                "--write-qps-min".into(),
                "10".into(),
                "--write-qps-max".into(),
                "10".into(),
                "--write-burst".into(),
                "10".into(),
            ],
            ..StackOptions::default()
        },
    )
    .await;
    let devices = stack.devices().await;
    let port = stack.broker.port();
    let started = Instant::now();
    // One device at 1 kHz for 3 s, and 30 quiet neighbours reporting once.
    let mut msgs: Vec<(String, String)> = (0..30)
        .map(|d| {
            (
                format!("factory/quiet-{d}/state"),
                json!({"n": 0}).to_string(),
            )
        })
        .collect();
    let mut last: HashMap<String, Value> =
        (0..30).map(|d| (format!("quiet-{d}"), json!(0))).collect();
    let pace = tokio::time::Instant::now();
    let (client, mut el) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("flood", "127.0.0.1", port), 100);
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    for i in 0..3000u64 {
        tokio::time::sleep_until(pace + Duration::from_millis(i)).await;
        client
            .publish(
                "factory/hot/state",
                rumqttc::QoS::AtMostOnce,
                false,
                json!({"n": i}).to_string(),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    pump.abort();
    msgs.push(("factory/hot/state".into(), json!({"n": 3000}).to_string()));
    last.insert("hot".into(), json!(3000));
    publish_acked(port, "flood-final", msgs).await;
    wait_reported(&devices, "n", &last, CONVERGE).await;
    let elapsed = started.elapsed().as_secs_f64();
    let writes = stack
        .controller
        .metric("edgesync_controller_status_writes_total")
        .await
        + stack
            .controller
            .metric("edgesync_controller_condition_writes_total")
            .await;
    let limited = stack
        .controller
        .metric("edgesync_controller_node_rate_limited_total")
        .await;
    println!(
        "1 kHz device: 3031 messages -> {writes} API writes in {elapsed:.1} s; {limited} batches answered 429"
    );
    assert!(
        writes <= 10.0 * elapsed + 10.0,
        "{writes} writes in {elapsed:.1} s exceed 10/s + burst 10"
    );
    assert!(
        writes < 300.0,
        "{writes} writes for 3031 messages: not coalesced"
    );
    assert!(
        limited >= 1.0,
        "the node limit of 5 reports/s was never hit"
    );
    let hot = devices.get("hot").await.unwrap().status.unwrap();
    assert_eq!(hot.reported.unwrap()["n"], 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_a_service_one_killed_and_restarted() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(
        cp,
        "e2e-replicas",
        StackOptions {
            two_replicas: true,
            ..auto_register()
        },
    )
    .await;
    let devices = stack.devices().await;
    let observer = VersionObserver::start(devices.clone());
    let port = stack.broker.port();
    let (msgs, last) = workload(40, 50, 0);
    let publisher = tokio::spawn(publish_acked(port, "replicas-publisher", msgs));
    // Desired edits while replicas come and go still reach the device.
    let mut dev0 = TestDevice::connect("dev-0-client", port, "edgesync/dev-0/shadow/#").await;
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..900))).await;
        let victim = if round == 0 {
            &mut stack.controller
        } else {
            stack.second.as_mut().unwrap()
        };
        victim.process.kill9();
        // An outage of a set length (not a wait for anything): agents retry meanwhile.
        tokio::time::sleep(Duration::from_millis(700)).await;
        victim.process.restart();
        victim.wait_ready();
    }
    publisher.await.unwrap();
    wait_reported(&devices, "n", &last, CONVERGE).await;
    cp.patch_device(
        &stack.ns.name,
        "dev-0",
        r#"{"spec":{"desired":{"speed":3}}}"#,
    );
    let delta = dev0.expect("edgesync/dev-0/shadow/update/delta").await;
    assert_eq!(delta["state"]["speed"], 3);
    observer.assert_never_regressed();
    // No duplicate side effects: each auto-registered Device was created exactly once
    // (generation 1 before the desired edit) and there are exactly 40 of them.
    let list = devices.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 40);
    for d in list
        .items
        .iter()
        .filter(|d| d.metadata.name.as_deref() != Some("dev-0"))
    {
        assert_eq!(
            d.metadata.generation,
            Some(1),
            "{:?} was rewritten",
            d.metadata.name
        );
    }
    let both = stack
        .controller
        .metric("edgesync_controller_devices_registered_total")
        .await
        + stack
            .second
            .as_ref()
            .unwrap()
            .metric("edgesync_controller_devices_registered_total")
            .await;
    assert!(both <= 40.0, "{both} registrations for 40 devices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_wal_is_detected_reported_on_the_edgenode_and_cleared_by_the_operator() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(cp, "e2e-wal", auto_register()).await;
    let devices = stack.devices().await;
    let nodes: Api<EdgeNode> = Api::namespaced(cp.client().await, &stack.ns.name);
    let intact = |n: EdgeNode| {
        n.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "StoreIntact")
            .map(|c| (c.status, c.message))
    };
    // Few enough commits that SQLite has not checkpointed them into the main file yet
    // (autocheckpoint at 1,000 WAL pages): they live only in the -wal file.
    let (msgs, last) = workload(10, 5, 0);
    publish_acked(stack.broker.port(), "wal-publisher", msgs).await;
    wait_reported(&devices, "n", &last, CONVERGE).await;
    wait::until("StoreIntact=True", CONVERGE, || async {
        let (status, _) = intact(nodes.get("edge-1").await.ok()?)?;
        (status == "True").then_some(())
    })
    .await;

    // A crash, then someone "cleans up" the -wal file before the restart.
    stack.agent.kill9();
    let wal = stack.agent_db().with_extension("db-wal");
    assert!(wal.exists(), "{} after kill -9", wal.display());
    std::fs::remove_file(&wal).unwrap();
    let http = edgesync_e2e::free_port();
    stack.agent_config.http_port = Some(http);
    stack.agent = edgesync_e2e::agent::spawn_agent(&stack.agent_config);

    let metric = wait::until("the agent to export its lost commits", CONVERGE, || async {
        let text = edgesync_e2e::agent::metrics(http);
        let v = edgesync_e2e::controller::metric_value(&text, "edgesync_agent_store_lost_commits");
        (v > 0.0).then_some(v)
    })
    .await;
    assert!(
        stack
            .agent
            .log_tail(200)
            .contains("The database has lost commits"),
        "{}",
        stack.agent.log_tail(50)
    );
    let message = wait::until("StoreIntact=False on the EdgeNode", CONVERGE, || async {
        let (status, message) = intact(nodes.get("edge-1").await.ok()?)?;
        (status == "False").then_some(message)
    })
    .await;
    assert!(
        message.contains(&format!("{metric} commits lost"))
            && message.contains("clear-lost-commits"),
        "{message}"
    );

    // Clearing needs the agent stopped (it takes the data_dir lock), then the alarm is gone.
    let config = stack.agent_config.write();
    let clear = || {
        std::process::Command::new(edgesync_e2e::agent::agent_binary())
            .args(["store", "clear-lost-commits", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = clear();
    assert!(
        !out.status.success(),
        "clearing while the agent runs must fail"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pid"),
        "{out:?}"
    );
    stack.agent.stop();
    let out = clear();
    assert!(out.status.success(), "{out:?}");
    let cleared: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        cleared["clearedLostCommits"].as_f64(),
        Some(metric),
        "{cleared}"
    );
    stack.agent.restart();
    wait::until("StoreIntact=True after clearing", CONVERGE, || async {
        let (status, _) = intact(nodes.get("edge-1").await.ok()?)?;
        (status == "True").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinstalled_agent_supersedes_its_old_reports_at_once() {
    let cp = ControlPlane::shared();
    let mut stack = Stack::start(cp, "e2e-reinstall", auto_register()).await;
    let devices = stack.devices().await;
    let nodes: Api<EdgeNode> = Api::namespaced(cp.client().await, &stack.ns.name);
    let (msgs, last) = workload(5, 20, 0);
    publish_acked(stack.broker.port(), "old-install", msgs).await;
    wait_reported(&devices, "n", &last, CONVERGE).await;
    let old = devices.get("dev-0").await.unwrap().status.unwrap();
    let old_epoch = old
        .reported_epoch
        .clone()
        .expect("the agent sends its epoch");
    // 20 updates, plus the version the desired snapshot may add.
    assert!(old.reported_version.unwrap() >= 20, "{old:?}");
    let outbox = |config: &std::path::Path| -> Value {
        let out = std::process::Command::new(edgesync_e2e::agent::agent_binary())
            .args(["outbox", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let config = stack.agent_config.write();
    assert_eq!(outbox(&config)["epoch"], json!(old_epoch));

    // Reinstalled: the agent's files in data_dir are gone (its config stays), so versions
    // start again at 1 under a new epoch.
    stack.agent.stop();
    for entry in std::fs::read_dir(&stack.agent_config.data_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("edgesync-agent.") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    stack.agent.restart();
    let (msgs, last) = workload(5, 1, 1000);
    publish_acked(stack.broker.port(), "new-install", msgs).await;
    wait_reported(&devices, "n", &last, CONVERGE).await;
    let new = devices.get("dev-0").await.unwrap().status.unwrap();
    let new_epoch = new.reported_epoch.clone().unwrap();
    assert_ne!(new_epoch, old_epoch);
    // Written although its version is far below the old database's.
    assert!(new.reported_version.unwrap() < 5, "{new:?} after {old:?}");
    assert_eq!(
        new.reported_epoch_generation,
        Some(old.reported_epoch_generation.unwrap() + 1)
    );
    assert_eq!(outbox(&config)["epoch"], json!(new_epoch));
    let en = nodes.get("edge-1").await.unwrap().status.unwrap();
    assert_eq!(en.agent_epoch, Some(new_epoch));
    assert_eq!(en.retired_agent_epochs, vec![old_epoch]);
}
