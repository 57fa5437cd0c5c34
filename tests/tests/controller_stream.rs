//! The controller's desired-state stream, node liveness and conditions, and two replicas
//! writing the same devices, against a real kube-apiserver.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use edgesync_crds::{Device, EdgeNode, condition_status};
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, DesiredStream, batch, create_devices, create_node, post_batch, report,
};
use edgesync_e2e::wait;
use edgesync_protocol::wire::DesiredEvent;
use futures_util::StreamExt as _;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

const STEP: Duration = Duration::from_secs(15);

fn desired_of(e: &DesiredEvent) -> (String, i64, serde_json::Value) {
    match e {
        DesiredEvent::Desired {
            device,
            generation,
            desired,
            ..
        } => (
            device.clone(),
            *generation,
            serde_json::Value::Object(desired.clone()),
        ),
        other => panic!("expected a desired event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_edits_stream_to_the_node_with_snapshot_and_resume() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("desired");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    create_node(cp, &ns.name, "edge-2", "t2", "");
    create_devices(cp, &ns.name, "edge-1", &["a".into(), "b".into()]);
    create_devices(cp, &ns.name, "edge-2", &["elsewhere".into()]);
    cp.patch_device(&ns.name, "a", r#"{"spec":{"desired":{"speed":1}}}"#);
    let c = Controller::start(cp, &["--bookmark-seconds", "1"]);
    let url = c.url();

    assert_eq!(
        DesiredStream::open(&url, &ns.name, "edge-1", "wrong", None)
            .await
            .err(),
        Some(401)
    );

    let mut s = DesiredStream::open(&url, &ns.name, "edge-1", "t1", None)
        .await
        .unwrap();
    let first = s.next_change(STEP).await;
    let second = s.next_change(STEP).await;
    assert_eq!(desired_of(&first), ("a".into(), 2, json!({"speed": 1})));
    assert_eq!(desired_of(&second), ("b".into(), 1, json!({})));
    let done = s.next_change(STEP).await;
    assert!(
        matches!(done, DesiredEvent::SnapshotComplete { .. }),
        "{done:?}"
    );

    // An operator edit arrives as a change; a status write does not produce one.
    let a = post_batch(
        &url,
        &ns.name,
        "edge-1",
        "t1",
        &batch(1, vec![report("a", 1, json!({"speed": 0}))]),
    )
    .await;
    assert_eq!(a.status, 200);
    cp.patch_device(&ns.name, "a", r#"{"spec":{"desired":{"speed":2}}}"#);
    let e = s.next_change(STEP).await;
    assert_eq!(desired_of(&e), ("a".into(), 3, json!({"speed": 2})));
    let cursor = e.cursor().to_owned();
    // Idle streams carry bookmarks so the agent knows the stream is alive.
    assert!(matches!(
        s.next(Duration::from_secs(5)).await,
        DesiredEvent::Bookmark { .. }
    ));
    drop(s);

    // Changes while disconnected: resuming from the cursor replays exactly those.
    cp.patch_device(&ns.name, "b", r#"{"spec":{"desired":{"mode":"auto"}}}"#);
    cp.patch_device(&ns.name, "elsewhere", r#"{"spec":{"desired":{"x":1}}}"#);
    cp.patch_device(&ns.name, "a", r#"{"spec":{"nodeName":"edge-2"}}"#);
    let mut s = DesiredStream::open(&url, &ns.name, "edge-1", "t1", Some(&cursor))
        .await
        .unwrap();
    let e = s.next_change(STEP).await;
    assert_eq!(desired_of(&e), ("b".into(), 2, json!({"mode": "auto"})));
    let e = s.next_change(STEP).await;
    assert!(
        matches!(&e, DesiredEvent::Removed { device, .. } if device == "a"),
        "{e:?}"
    );
    drop(s);

    // A cursor from another controller process (or garbage) gets a snapshot, not a wrong resume.
    let mut s = DesiredStream::open(&url, &ns.name, "edge-1", "t1", Some("0000000000000000.5"))
        .await
        .unwrap();
    assert_eq!(desired_of(&s.next_change(STEP).await).0, "b");
    assert!(matches!(
        s.next_change(STEP).await,
        DesiredEvent::SnapshotComplete { .. }
    ));
    // edge-2 sees its own devices only.
    let mut s2 = DesiredStream::open(&url, &ns.name, "edge-2", "t2", None)
        .await
        .unwrap();
    let mut names = vec![
        desired_of(&s2.next_change(STEP).await).0,
        desired_of(&s2.next_change(STEP).await).0,
    ];
    names.sort();
    assert_eq!(names, ["a", "elsewhere"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_marks_offline_and_recovers_and_in_sync_follows_desired() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("liveness");
    create_node(
        cp,
        &ns.name,
        "edge-1",
        "t1",
        "  limits:\n    offlineAfterSeconds: 3",
    );
    create_devices(cp, &ns.name, "edge-1", &["m1".into(), "m2".into()]);
    let lease = format!("liveness-{}", ns.name);
    let c = Controller::start(cp, &["--lease-name", &lease, "--lease-namespace", &ns.name]);
    let url = c.url();
    let client = cp.client().await;
    let nodes: Api<EdgeNode> = Api::namespaced(client.clone(), &ns.name);
    let devices: Api<Device> = Api::namespaced(client, &ns.name);
    let ready = |n: EdgeNode| {
        n.status
            .and_then(|s| condition_status(&s.conditions, "Ready").map(str::to_owned))
    };
    let cond = |d: &Device, t: &str| {
        d.status
            .as_ref()
            .and_then(|s| condition_status(&s.conditions, t).map(str::to_owned))
    };

    let mut health = batch(1, vec![report("m1", 1, json!({"speed": 0}))]);
    health.agent.pending_devices = 7;
    assert_eq!(
        post_batch(&url, &ns.name, "edge-1", "t1", &health)
            .await
            .status,
        200
    );
    wait::until("EdgeNode Ready=True with agent health", STEP, || async {
        let n = nodes.get("edge-1").await.unwrap();
        (n.status.as_ref().and_then(|s| s.pending_devices) == Some(7)
            && ready(n).as_deref() == Some("True"))
        .then_some(())
    })
    .await;
    // The device's status is written by the status writer, after the node's heartbeat.
    wait::until("Device m1 Online=True", STEP, || async {
        let d = devices.get("m1").await.unwrap();
        (cond(&d, "Online").as_deref() == Some("True")).then_some(())
    })
    .await;

    // Silence longer than the node's offline timeout: node and devices go offline.
    wait::until(
        "EdgeNode Ready=False after silence",
        Duration::from_secs(20),
        || async {
            (ready(nodes.get("edge-1").await.unwrap()).as_deref() == Some("False")).then_some(())
        },
    )
    .await;
    wait::until("both devices Online=False", STEP, || async {
        let m1 = cond(&devices.get("m1").await.unwrap(), "Online");
        let m2 = cond(&devices.get("m2").await.unwrap(), "Online");
        (m1.as_deref() == Some("False") && m2.as_deref() == Some("False")).then_some(())
    })
    .await;
    let n = nodes.get("edge-1").await.unwrap();
    let r = n
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(r.reason, "HeartbeatMissed");

    // A heartbeat (empty batch) brings the node and its devices back.
    assert_eq!(
        post_batch(&url, &ns.name, "edge-1", "t1", &batch(2, vec![]))
            .await
            .status,
        200
    );
    wait::until("node and devices online again", STEP, || async {
        let n = ready(nodes.get("edge-1").await.unwrap());
        let m2 = cond(&devices.get("m2").await.unwrap(), "Online");
        (n.as_deref() == Some("True") && m2.as_deref() == Some("True")).then_some(())
    })
    .await;

    // A new desired generation turns InSync false until the agent reports having applied it.
    cp.patch_device(&ns.name, "m1", r#"{"spec":{"desired":{"speed":5}}}"#);
    let generation = devices
        .get("m1")
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap();
    wait::until("InSync=False after a desired edit", STEP, || async {
        (cond(&devices.get("m1").await.unwrap(), "InSync").as_deref() == Some("False"))
            .then_some(())
    })
    .await;
    let mut r = report("m1", 2, json!({"speed": 5}));
    r.observed_desired_version = generation;
    let a = post_batch(&url, &ns.name, "edge-1", "t1", &batch(3, vec![r])).await;
    assert_eq!((a.status, a.result(0)), (200, "accepted"));
    let d = devices.get("m1").await.unwrap();
    assert_eq!(cond(&d, "InSync").as_deref(), Some("True"));
    assert_eq!(
        d.status.unwrap().observed_desired_generation,
        Some(generation)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_regress_a_device() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("replicas");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    let names: Vec<String> = (0..10).map(|i| format!("r-{i}")).collect();
    create_devices(cp, &ns.name, "edge-1", &names);
    let c1 = Controller::start(cp, &[]);
    let c2 = Controller::start(cp, &[]);
    let urls = [c1.url(), c2.url()];
    let devices: Api<Device> = Api::namespaced(cp.client().await, &ns.name);

    // Record every status version the API server ever shows, per device.
    let watch_api = devices.clone();
    let observer = tokio::spawn(async move {
        let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
        let stream = watcher(watch_api, watcher::Config::default()).applied_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(Ok(d)) = stream.next().await {
            if let Some(v) = d.status.and_then(|s| s.reported_version) {
                let name = d.metadata.name.unwrap();
                let list = seen.entry(name).or_default();
                if list.last() != Some(&v) {
                    list.push(v);
                }
                if seen.len() == 10 && seen.values().all(|l| l.last() == Some(&40)) {
                    return seen;
                }
            }
        }
        seen
    });

    // Four senders share versions 1..=40 of every device, each sending an interleaved,
    // out-of-order slice to alternating replicas, concurrently.
    let mut tasks = Vec::new();
    for sender in 0..4u64 {
        let urls = urls.clone();
        let names = names.clone();
        let ns = ns.name.clone();
        tasks.push(tokio::spawn(async move {
            let mut versions: Vec<u64> = (1..=40).filter(|v| v % 4 == sender).collect();
            versions.reverse();
            let n = versions.len();
            versions.rotate_left(sender as usize % n);
            for (i, v) in versions.into_iter().enumerate() {
                let reports = names
                    .iter()
                    .map(|d| report(d, v, json!({"v": v})))
                    .collect();
                let url = &urls[(i + sender as usize) % 2];
                let a = post_batch(url, &ns, "edge-1", "t1", &batch(v, reports)).await;
                assert_eq!(a.status, 200, "{a:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), observer)
        .await
        .expect("every device reaches version 40")
        .unwrap();
    for (device, versions) in &seen {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{device} regressed: {versions:?}"
        );
    }
    for d in &names {
        let st = devices.get(d).await.unwrap().status.unwrap();
        assert_eq!(
            (st.reported_version, st.reported.unwrap()["v"].clone()),
            (Some(40), json!(40))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_store_health_becomes_edgenode_conditions() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("storecond");
    create_node(cp, &ns.name, "edge-1", "t1", "");
    let c = Controller::start(cp, &["--heartbeat-write-seconds", "60"]);
    let url = c.url();
    let nodes: Api<EdgeNode> = Api::namespaced(cp.client().await, &ns.name);
    let condition = |n: &EdgeNode, t: &str| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == t).cloned())
            .map(|c| (c.status, c.reason, c.message))
    };

    let mut sick = batch(0, vec![]);
    sick.agent.store_error = Some("database or disk is full".into());
    sick.agent.lost_commits = 40;
    sick.agent.lost_commits_detail = Some("edgesync-agent.db is 40 commits behind".into());
    sick.agent.devices = 50;
    sick.agent.max_devices = 50;
    sick.agent.device_limit_rejections = 7;
    assert_eq!(
        post_batch(&url, &ns.name, "edge-1", "t1", &sick)
            .await
            .status,
        200
    );
    let n = wait::until("the store's conditions False", STEP, || async {
        let n = nodes.get("edge-1").await.unwrap();
        (condition(&n, "StoreWritable").is_some_and(|c| c.0 == "False")
            && condition(&n, "StoreIntact").is_some_and(|c| c.0 == "False")
            && condition(&n, "DeviceCapacity").is_some_and(|c| c.0 == "False"))
        .then_some(n)
    })
    .await;
    let (_, reason, message) = condition(&n, "StoreWritable").unwrap();
    assert_eq!(reason, "CommitFailing");
    assert!(message.contains("database or disk is full"), "{message}");
    let (_, reason, message) = condition(&n, "StoreIntact").unwrap();
    assert_eq!(reason, "CommitsLost");
    assert!(message.contains("40 commits lost"), "{message}");
    let (_, reason, message) = condition(&n, "DeviceCapacity").unwrap();
    assert_eq!(reason, "LimitReached");
    assert!(
        message.contains("50 of at most 50") && message.contains("(7 since"),
        "{message}"
    );
    assert_eq!(
        condition(&n, "Ready").map(|c| c.0).as_deref(),
        Some("True"),
        "a node whose store fails still reports"
    );

    // Recovery is written within a second (a status change), not at the heartbeat
    // interval (a minute here), as the agent keeps sending heartbeats.
    let mut well = batch(1, vec![]);
    well.agent.devices = 49;
    well.agent.max_devices = 50;
    wait::until("the store's conditions True again", STEP, || async {
        assert_eq!(
            post_batch(&url, &ns.name, "edge-1", "t1", &well)
                .await
                .status,
            200
        );
        let n = nodes.get("edge-1").await.unwrap();
        (condition(&n, "StoreWritable").is_some_and(|c| c.0 == "True")
            && condition(&n, "StoreIntact").is_some_and(|c| c.0 == "True")
            && condition(&n, "DeviceCapacity").is_some_and(|c| c.0 == "True"))
        .then_some(())
    })
    .await;
}

/// Two replicas on one Lease; the leader is frozen (SIGSTOP) longer than the Lease: the other
/// takes over, and the frozen one, thawed, no longer counts itself leader from its very first
/// moment back, without needing an API call to find out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_replaced_and_stops_leading_the_moment_it_thaws() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("frozen");
    let args = ["--lease-name", "frozen", "--lease-namespace", &ns.name];
    let mut a = Controller::start(cp, &args);
    let mut b = Controller::start(cp, &args);
    let leads = |c: &Controller| {
        let c = c.url();
        async move {
            let text = edgesync_e2e::controller::client()
                .get(format!("{c}/metrics"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            Some(edgesync_e2e::controller::metric_value(&text, "edgesync_controller_leader") == 1.0)
        }
    };
    let first_is_a = wait::until("one leader", STEP, || async {
        match (leads(&a).await?, leads(&b).await?) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, other) = if first_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let pid = leader.process.pid().unwrap().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let frozen_at = std::time::Instant::now();
    wait::until(
        "the other replica to take over",
        Duration::from_secs(40),
        || async { leads(other).await?.then_some(()) },
    )
    .await;
    let took_over = frozen_at.elapsed();
    signal("-CONT");
    // Its very first answer after thawing already says it does not lead.
    assert_eq!(
        leads(leader).await,
        Some(false),
        "the thawed replica still claims leadership"
    );
    assert_eq!(leads(other).await, Some(true));
    wait::until("the thawed replica to log it", STEP, || async {
        leader
            .process
            .log_tail(50)
            .contains("No longer leader")
            .then_some(())
    })
    .await;
    eprintln!(
        "takeover {} ms after the leader froze",
        took_over.as_millis()
    );
    assert!(
        took_over >= Duration::from_secs(10),
        "took over before the Lease could expire: {took_over:?}"
    );

    // A clean stop (SIGTERM) drains, releases the Lease and ends every task.
    let stopping = std::time::Instant::now();
    other.process.stop();
    let log = other.process.log_tail(40);
    assert!(
        log.contains("Leader Lease released") && log.contains("Stopped"),
        "{log}"
    );
    assert!(stopping.elapsed() < Duration::from_secs(10), "{log}");
}
