//! Shards (`--shards`): controller replicas share the fleet's shards through Leases on the
//! real API server, none above its fair share; a killed replica's shards are taken over once
//! its Leases expire, and a stopped replica's at once (it releases them). Any replica takes
//! any node's requests and forwards them to the shard's owner; each replica caches only its
//! shards' objects (labelled by the controller); scaling out under load refuses a node only
//! for the moment its shard moves.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_controller::shard::shard_of;
use edgesync_crds::Device;
use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{
    Controller, DesiredStream, batch, create_devices, create_node, post_batch, report,
};
use edgesync_e2e::wait::until;
use edgesync_protocol::wire::DesiredEvent;
use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{DynamicObject, ListParams, WatchEvent};
use serde_json::json;

const SHARDS: u32 = 8;

/// Held by the tests that create EdgeNodes and Devices, one at a time: every group of
/// replicas watches (and counts in its cache metrics) the objects of every namespace, as a
/// deployment does, so two such tests at once would see each other's.
static FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A replica of Lease group `group` in namespace `ns` (`--shards SHARDS`), named `id`, with
/// `extra` options, once ready.
fn replica(cp: &ControlPlane, ns: &str, group: &str, id: &str, extra: &[&str]) -> Controller {
    let shards = SHARDS.to_string();
    let mut args = vec![
        "--shards",
        &shards,
        "--lease-namespace",
        ns,
        "--lease-name",
        group,
        "--identity",
        id,
    ];
    args.extend_from_slice(extra);
    Controller::start(cp, &args)
}

/// Every Device and EdgeNode in the cluster (each group of replicas caches those of every
/// namespace, earlier tests' included).
async fn cluster_totals(cp: &ControlPlane) -> (f64, f64) {
    let client = cp.client().await;
    let devices = Api::<Device>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .unwrap();
    let nodes = Api::<edgesync_crds::EdgeNode>::all(client)
        .list_metadata(&ListParams::default())
        .await
        .unwrap();
    (devices.items.len() as f64, nodes.items.len() as f64)
}

/// Each shard's holder, from the shard Leases of group `group`.
async fn holders_in(api: &Api<Lease>, group: &str) -> BTreeMap<u32, String> {
    let list = api
        .list(&ListParams::default().labels(&format!(
            "edgesync.io/lease-group={group},edgesync.io/lease-kind=shard"
        )))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter_map(|l| {
            let shard = l.metadata.labels?.get("edgesync.io/shard")?.parse().ok()?;
            let holder = l.spec?.holder_identity.filter(|h| !h.is_empty())?;
            Some((shard, holder))
        })
        .collect()
}

/// Waits up to `deadline` until every shard of group `sh` is held by one of `live`, none
/// above `max_each`, and the live replicas' own metrics own every shard between them.
async fn wait_settled(
    api: &Api<Lease>,
    replicas: &[(&str, &Controller)],
    max_each: usize,
    deadline: Duration,
) -> Duration {
    wait_settled_in(api, "sh", replicas, max_each, deadline).await
}

async fn wait_settled_in(
    api: &Api<Lease>,
    group: &str,
    replicas: &[(&str, &Controller)],
    max_each: usize,
    deadline: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let h = holders_in(api, group).await;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for holder in h.values() {
            *counts.entry(holder.as_str()).or_default() += 1;
        }
        let mut owned = 0.0;
        for (_, c) in replicas {
            owned += c.metric("edgesync_controller_shards_owned").await;
        }
        let by_live = h
            .values()
            .all(|holder| replicas.iter().any(|(id, _)| id == holder));
        if h.len() == SHARDS as usize
            && by_live
            && counts.values().all(|n| *n <= max_each)
            && owned == f64::from(SHARDS)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "shards not settled in {deadline:?} over {:?}: holders {h:?}, owned by the replicas' metrics {owned}",
            replicas.iter().map(|(id, _)| *id).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_shards_and_take_over_a_killed_or_stopped_replicas() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("shards");
    let start = |id: &str| replica(cp, &ns.name, "sh", id, &[]);
    let (r0, r1, mut r2) = (start("r0"), start("r1"), start("r2"));
    let api: Api<Lease> = Api::namespaced(cp.client().await, &ns.name);

    // Three replicas: 8 shards, at most ceil(8 / 3) = 3 each.
    wait_settled(
        &api,
        &[("r0", &r0), ("r1", &r1), ("r2", &r2)],
        3,
        Duration::from_secs(30),
    )
    .await;

    // kill -9: its Leases are honoured until unchanged for the Lease duration (15 s), then
    // the others take them, at most 4 each.
    r2.process.kill9();
    let killed = Instant::now();
    let took = wait_settled(
        &api,
        &[("r0", &r0), ("r1", &r1)],
        4,
        Duration::from_secs(45),
    )
    .await;
    eprintln!("a killed replica's shards taken over in {took:?}");

    // A stopped replica releases its shards and its member Lease: the other takes them all
    // at its next rounds, without waiting for any Lease to expire.
    let mut r1 = r1;
    r1.process.stop();
    let took = wait_settled(&api, &[("r0", &r0)], 8, Duration::from_secs(10)).await;
    eprintln!("a stopped replica's shards taken over in {took:?}");

    // The killed replica's member Lease is deleted once it has gone unrenewed for a minute
    // (the stopped one deleted its own).
    until(
        "no member Lease but r0's",
        Duration::from_secs(90),
        || async {
            let members = api
                .list(&ListParams::default().labels("edgesync.io/lease-kind=member"))
                .await
                .unwrap();
            let holders: Vec<String> = members
                .items
                .iter()
                .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
                .collect();
            (holders == ["r0"]).then_some(())
        },
    )
    .await;
    eprintln!(
        "member Leases cleaned up {:?} after the kill",
        killed.elapsed()
    );
}

/// Posts version `version` of every node's device through `via`; returns the nodes whose
/// batch was answered with the report durable, and the other answers' statuses.
async fn round_through(
    via: &Controller,
    ns: &str,
    nodes: &[String],
    version: u64,
) -> (Vec<usize>, Vec<u16>) {
    let answers = futures_util::future::join_all(nodes.iter().enumerate().map(|(i, node)| {
        let b = batch(
            version,
            vec![report(
                &format!("{node}-dev"),
                version,
                json!({"v": version}),
            )],
        );
        let url = via.url();
        async move { (i, post_batch(&url, ns, node, TOKEN, &b).await) }
    }))
    .await;
    let mut durable = Vec::new();
    let mut other = Vec::new();
    for (i, a) in answers {
        if a.status == 200 && a.result(0) == "accepted" {
            durable.push(i);
        } else {
            assert_eq!(a.status, 503, "only a moving shard may refuse: {a:?}");
            other.push(a.status);
        }
    }
    (durable, other)
}

const TOKEN: &str = "shard-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_takes_any_nodes_requests_and_a_killed_owners_nodes_move_on() {
    let _fleet = FLEET.lock().await;
    let cp = ControlPlane::shared();
    let ns = cp.namespace("shard-fwd");
    let start = |id: &str| replica(cp, &ns.name, "fw", id, &[]);
    let (r0, r1, mut r2) = (start("r0"), start("r1"), start("r2"));
    let api: Api<Lease> = Api::namespaced(cp.client().await, &ns.name);
    wait_settled_in(
        &api,
        "fw",
        &[("r0", &r0), ("r1", &r1), ("r2", &r2)],
        3,
        Duration::from_secs(30),
    )
    .await;
    let owners = holders_in(&api, "fw").await;

    // Nodes in every shard; every request goes to r0, which serves about a third itself.
    let nodes: Vec<String> = (0..16).map(|i| format!("edge-{i}")).collect();
    for node in &nodes {
        create_node(cp, &ns.name, node, TOKEN, "");
        create_devices(cp, &ns.name, node, &[format!("{node}-dev")]);
    }
    let owner_of = |node: &str| owners[&shard_of(&ns.name, node, SHARDS)].clone();

    // The leader labels every object with its shard; each replica then caches only its own
    // shards' objects: every Device and EdgeNode of the namespace in exactly one cache.
    let devices: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let replicas = [&r0, &r1, &r2];
    let cached = |series: &'static str| async move {
        let mut sum = 0.0;
        for r in replicas {
            sum += r.metric(series).await;
        }
        sum
    };
    until(
        "every Device and EdgeNode of the cluster cached by its shard's owner only",
        Duration::from_secs(30),
        || async {
            let d = cached("edgesync_controller_cached_devices").await;
            let n = cached("edgesync_controller_cached_nodes").await;
            (cluster_totals(cp).await == (d, n)).then_some(())
        },
    )
    .await;
    for node in &nodes {
        let d = devices.get(&format!("{node}-dev")).await.unwrap();
        let labels = d.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("edgesync.io/shard").map(String::as_str),
            Some(shard_of(&ns.name, node, SHARDS).to_string().as_str()),
            "{node}-dev"
        );
    }
    assert!(
        nodes.iter().any(|n| owner_of(n) == "r2") && nodes.iter().any(|n| owner_of(n) != "r0"),
        "the nodes should spread over the replicas: {owners:?}"
    );

    // Every status write, in order, to check that none goes back in version.
    let seen = Arc::new(Mutex::new(BTreeMap::<String, Vec<u64>>::new()));
    let recorder = {
        let seen = Arc::clone(&seen);
        let stream =
            kube::runtime::watcher(devices.clone(), kube::runtime::watcher::Config::default());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(event)) = stream.next().await {
                let objects = match event {
                    kube::runtime::watcher::Event::Apply(d)
                    | kube::runtime::watcher::Event::InitApply(d) => vec![d],
                    _ => continue,
                };
                for d in objects {
                    if let Some(v) = d.status.as_ref().and_then(|s| s.reported_version) {
                        seen.lock()
                            .unwrap()
                            .entry(d.metadata.name.clone().unwrap_or_default())
                            .or_default()
                            .push(v);
                    }
                }
            }
        })
    };

    let (durable, refused) = round_through(&r0, &ns.name, &nodes, 1).await;
    assert_eq!(durable.len(), nodes.len(), "refused: {refused:?}");
    let forwarded = r0
        .metric(r#"edgesync_controller_forwarded_requests_total{result="answered"}"#)
        .await;
    let expected = nodes.iter().filter(|n| owner_of(n) != "r0").count() as f64;
    assert_eq!(
        forwarded, expected,
        "batches for the other replicas' nodes are forwarded"
    );

    // A desired stream opened through r0 for a node of r2 is served by r2 and carries changes.
    let far = nodes.iter().find(|n| owner_of(n) == "r2").unwrap().clone();
    let mut stream = DesiredStream::open(&r0.url(), &ns.name, &far, TOKEN, None)
        .await
        .unwrap();
    match stream.next_change(Duration::from_secs(10)).await {
        DesiredEvent::Desired { device, .. } => assert_eq!(device, format!("{far}-dev")),
        e => panic!("expected the device's desired state first, got {e:?}"),
    }
    cp.patch_device(
        &ns.name,
        &format!("{far}-dev"),
        r#"{"spec":{"desired":{"rate":5}}}"#,
    );
    loop {
        match stream.next_change(Duration::from_secs(10)).await {
            DesiredEvent::Desired { desired, .. } if desired.get("rate") == Some(&json!(5)) => {
                break;
            }
            _ => {}
        }
    }

    // A Device moved to a node of another shard is relabelled by its old shard's owner.
    let (from, to) = (
        &nodes[0],
        nodes
            .iter()
            .find(|n| shard_of(&ns.name, n, SHARDS) != shard_of(&ns.name, &nodes[0], SHARDS))
            .unwrap(),
    );
    let mover = format!("{from}-dev");
    cp.patch_device(
        &ns.name,
        &mover,
        &format!(r#"{{"spec":{{"nodeName":"{to}"}}}}"#),
    );
    let labelled_for = |node: &str| {
        let wanted = shard_of(&ns.name, node, SHARDS).to_string();
        let (devices, mover) = (devices.clone(), mover.clone());
        async move {
            let d = devices.get(&mover).await.unwrap();
            (d.metadata
                .labels
                .unwrap_or_default()
                .get("edgesync.io/shard")
                == Some(&wanted))
            .then_some(())
        }
    };
    until(
        "the moved Device relabelled",
        Duration::from_secs(20),
        || labelled_for(to),
    )
    .await;
    cp.patch_device(
        &ns.name,
        &mover,
        &format!(r#"{{"spec":{{"nodeName":"{from}"}}}}"#),
    );
    until(
        "the Device moved back relabelled",
        Duration::from_secs(20),
        || labelled_for(from),
    )
    .await;

    // kill -9 r2: its nodes are refused 503 (never anything else) until their shards have a
    // new owner, then served again; versions told durable stay durable.
    let mut acked = vec![1u64; nodes.len()];
    r2.process.kill9();
    let killed = Instant::now();
    let mut version = 1;
    let recovered = loop {
        version += 1;
        let (durable, _) = round_through(&r0, &ns.name, &nodes, version).await;
        for i in &durable {
            acked[*i] = version;
        }
        if durable.len() == nodes.len() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(45),
            "a killed owner's nodes not served again within 45 s (served: {durable:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("a killed owner's nodes answered again after {recovered:?}");
    assert!(
        r0.metric(r#"edgesync_controller_forwarded_requests_total{result="moving"}"#)
            .await
            + r0.metric(r#"edgesync_controller_forwarded_requests_total{result="unreachable"}"#)
                .await
            > 0.0,
        "the killed owner's nodes were refused while their shards moved"
    );
    // The stream through the killed owner ended; a new one is served by the new owner.
    assert!(
        stream.ends_within(Duration::from_secs(10)).await,
        "the desired stream of a killed owner's node did not end"
    );
    let mut again = DesiredStream::open(&r0.url(), &ns.name, &far, TOKEN, None)
        .await
        .unwrap();
    match again.next_change(Duration::from_secs(10)).await {
        DesiredEvent::Desired { desired, .. } => assert_eq!(desired.get("rate"), Some(&json!(5))),
        e => panic!("expected the device's desired state first, got {e:?}"),
    }

    for (i, node) in nodes.iter().enumerate() {
        let d = devices.get(&format!("{node}-dev")).await.unwrap();
        let v = d.status.and_then(|s| s.reported_version).unwrap_or(0);
        assert!(
            v >= acked[i],
            "{node}: told durable at {} but {v} in etcd",
            acked[i]
        );
    }
    recorder.abort();
    for (device, versions) in seen.lock().unwrap().iter() {
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "{device}'s status went back in version: {versions:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_out_under_load_refuses_a_node_no_longer_than_a_hand_over() {
    let _fleet = FLEET.lock().await;
    let cp = ControlPlane::shared();
    let ns = cp.namespace("shard-up");
    let start = |id: &str| replica(cp, &ns.name, "up", id, &[]);
    let nodes: Vec<String> = (0..12).map(|i| format!("line-{i}")).collect();
    for node in &nodes {
        create_node(cp, &ns.name, node, TOKEN, "");
        create_devices(cp, &ns.name, node, &[format!("{node}-dev")]);
    }
    let r0 = start("r0");
    let api: Api<Lease> = Api::namespaced(cp.client().await, &ns.name);
    wait_settled_in(&api, "up", &[("r0", &r0)], 8, Duration::from_secs(30)).await;

    // Every node reports through r0 every 100 ms while replicas join; each refusal's time is
    // kept per node.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, url, ns, nodes) = (Arc::clone(&stop), r0.url(), ns.name.clone(), nodes.clone());
        tokio::spawn(async move {
            let mut refused: Vec<Vec<Instant>> = vec![Vec::new(); nodes.len()];
            let mut acked = vec![0u64; nodes.len()];
            let mut version = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                version += 1;
                let answers = futures_util::future::join_all(nodes.iter().map(|node| {
                    let b = batch(
                        version,
                        vec![report(
                            &format!("{node}-dev"),
                            version,
                            json!({"v": version}),
                        )],
                    );
                    let (url, ns) = (url.clone(), ns.clone());
                    async move { post_batch(&url, &ns, node, TOKEN, &b).await }
                }))
                .await;
                for (i, a) in answers.into_iter().enumerate() {
                    if a.status == 200 && a.result(0) == "accepted" {
                        acked[i] = version;
                    } else {
                        assert_eq!(a.status, 503, "only a moving shard may refuse: {a:?}");
                        refused[i].push(Instant::now());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (refused, acked)
        })
    };

    let r1 = start("r1");
    wait_settled_in(
        &api,
        "up",
        &[("r0", &r0), ("r1", &r1)],
        4,
        Duration::from_secs(30),
    )
    .await;
    let r2 = start("r2");
    wait_settled_in(
        &api,
        "up",
        &[("r0", &r0), ("r1", &r1), ("r2", &r2)],
        3,
        Duration::from_secs(30),
    )
    .await;
    // A few more rounds once settled.
    let settled_forwards = r0
        .metric(r#"edgesync_controller_forwarded_requests_total{result="answered"}"#)
        .await;
    until(
        "batches forwarded after scaling out",
        Duration::from_secs(10),
        || async {
            (r0.metric(r#"edgesync_controller_forwarded_requests_total{result="answered"}"#)
                .await
                > settled_forwards)
                .then_some(())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (refused, acked) = load.await.unwrap();

    // A node's refusals, if any, fall within one hand-over (a shard moved between live
    // replicas: released, taken, listed), never spread over the whole scale-out.
    for (i, times) in refused.iter().enumerate() {
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            assert!(
                last.duration_since(*first) < Duration::from_secs(5),
                "{} refused over {:?} ({} times)",
                nodes[i],
                last.duration_since(*first),
                times.len()
            );
        }
    }
    eprintln!(
        "refusals while scaling from 1 to 3 replicas: {} batches of {} nodes",
        refused.iter().map(Vec::len).sum::<usize>(),
        nodes.len()
    );
    let devices: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    for (i, node) in nodes.iter().enumerate() {
        let d = devices.get(&format!("{node}-dev")).await.unwrap();
        let v = d.status.and_then(|s| s.reported_version).unwrap_or(0);
        assert!(
            v >= acked[i],
            "{node}: told durable at {} but {v} in etcd",
            acked[i]
        );
    }
}

/// Every DeviceState of `ns` read through the API server, page by page (`limit` each):
/// each device's reported `v`, by name; panics if a device comes twice.
async fn read_all(api: &Api<DynamicObject>, limit: u32) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut params = ListParams::default().limit(limit);
    loop {
        let page = api.list(&params).await.unwrap();
        assert!(page.items.len() <= limit as usize);
        for o in &page.items {
            let name = o.metadata.name.clone().unwrap();
            let v = o.data["reported"]["v"].as_i64().unwrap();
            assert!(out.insert(name.clone(), v).is_none(), "{name} listed twice");
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => return out,
        }
    }
}

/// Posts `version` of every node's device through `via` until each is answered durable.
async fn report_all(via: &Controller, ns: &str, nodes: &[String], version: u64) {
    until(
        &format!("version {version} of every device durable"),
        Duration::from_secs(45),
        || async {
            let (durable, _) = round_through(via, ns, nodes, version).await;
            (durable.len() == nodes.len()).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devicestate_read_through_the_api_server_is_the_newest_whichever_replica_took_the_report()
{
    let _fleet = FLEET.lock().await;
    let cp = ControlPlane::shared();
    let ns = cp.namespace("shard-live");
    let ports: Vec<u16> = (0..3).map(|_| edgesync_e2e::free_port()).collect();
    let start = |i: usize| {
        let listen = format!("127.0.0.1:{}", ports[i]);
        replica(
            cp,
            &ns.name,
            "lv",
            &format!("r{i}"),
            &["--live-listen", &listen],
        )
    };
    let (r0, mut r1, r2) = (start(0), start(1), start(2));
    let leases: Api<Lease> = Api::namespaced(cp.client().await, &ns.name);
    wait_settled_in(
        &leases,
        "lv",
        &[("r0", &r0), ("r1", &r1), ("r2", &r2)],
        3,
        Duration::from_secs(30),
    )
    .await;
    let nodes: Vec<String> = (0..16).map(|i| format!("edge-{i}")).collect();
    for node in &nodes {
        create_node(cp, &ns.name, node, TOKEN, "");
        create_devices(cp, &ns.name, node, &[format!("{node}-dev")]);
    }
    let replicas = [&r0, &r1, &r2];
    until(
        "every Device of the cluster cached by its shard's owner only",
        Duration::from_secs(30),
        || async {
            let mut sum = 0.0;
            for r in replicas {
                sum += r.metric("edgesync_controller_cached_devices").await;
            }
            (sum == cluster_totals(cp).await.0).then_some(())
        },
    )
    .await;
    let owners = holders_in(&leases, "lv").await;
    let by_r1: Vec<&String> = nodes
        .iter()
        .filter(|n| owners[&shard_of(&ns.name, n, SHARDS)] == "r1")
        .collect();
    assert!(!by_r1.is_empty(), "r1 should own some nodes: {owners:?}");

    // The internal routes serve the other replicas only: no token, or a wrong one, is 401.
    let http = edgesync_e2e::controller::client();
    for token in [None, Some("not-the-peer-token")] {
        let mut req = http.get(format!("{}/internal/v1/devicestates", r0.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let status = req.send().await.unwrap().status().as_u16();
        assert_eq!(status, 401, "internal read with token {token:?}");
    }

    // The API server reaches r0 only; reports go through r1 (forwarded to each owner).
    edgesync_e2e::live::register(cp, ports[0]);
    let states = edgesync_e2e::live::devicestates(cp.client().await, &ns.name);
    report_all(&r1, &ns.name, &nodes, 1).await;
    report_all(&r2, &ns.name, &nodes, 2).await;
    let want = |v: i64| -> BTreeMap<String, i64> {
        nodes.iter().map(|n| (format!("{n}-dev"), v)).collect()
    };
    // Pages of 5 over three replicas' parts: every device once, at its newest.
    assert_eq!(read_all(&states, 5).await, want(2));
    for node in &nodes {
        let one = states.get(&format!("{node}-dev")).await.unwrap();
        assert_eq!(one.data["reported"]["v"], 2, "{node}");
    }

    // A watch from the list's version sees every replica's next reports.
    let listed = states.list(&ListParams::default()).await.unwrap();
    let from = listed.metadata.resource_version.unwrap();
    let mut events = states
        .watch(&kube::api::WatchParams::default(), &from)
        .await
        .unwrap()
        .boxed();
    report_all(&r0, &ns.name, &nodes, 3).await;
    let mut seen = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen != want(3) {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("version 3 of every device watched within 30 s: {seen:?}"))
            .expect("the watch goes on")
            .unwrap();
        match event {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                let v = o.data["reported"]["v"].as_i64().unwrap();
                seen.insert(o.metadata.name.unwrap(), v);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    drop(events);

    // The API server now reaches r2: the same answers.
    edgesync_e2e::live::register(cp, ports[2]);
    let asked = || async {
        r2.metric(r#"edgesync_controller_live_requests_total{verb="list"}"#)
            .await
    };
    let before = asked().await;
    until(
        "the API server to reach r2",
        Duration::from_secs(30),
        || async {
            assert_eq!(read_all(&states, 7).await, want(3));
            (asked().await > before).then_some(())
        },
    )
    .await;

    // kill -9 of r1: reads are refused (503) rather than missing its shards' devices, until
    // its shards are taken over; then every device is read at its durable version.
    r1.process.kill9();
    let killed = Instant::now();
    until(
        "r1's shards taken over and read again through the API server",
        Duration::from_secs(60),
        || async {
            match states.list(&ListParams::default()).await {
                Ok(list) => {
                    let got: BTreeMap<String, i64> = list
                        .items
                        .iter()
                        .map(|o| {
                            (
                                o.metadata.name.clone().unwrap(),
                                o.data["reported"]["v"].as_i64().unwrap(),
                            )
                        })
                        .collect();
                    assert_eq!(got, want(3), "a list is whole or refused");
                    eprintln!("reads whole again {:?} after kill -9", killed.elapsed());
                    Some(())
                }
                Err(kube::Error::Api(e)) => {
                    assert_eq!(e.code, 503, "{e:?}");
                    None
                }
                Err(e) => panic!("{e}"),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_larger_than_a_labelling_share_is_labelled_once_each() {
    let _fleet = FLEET.lock().await;
    let cp = ControlPlane::shared();
    let ns = cp.namespace("shard-many");
    // Created unlabelled, more than the 1,000 objects the leader labels per tick.
    const MANY: usize = 2500;
    create_node(cp, &ns.name, "edge-1", TOKEN, "");
    let devices: Api<Device> = Api::namespaced(cp.client().await, &ns.name);
    let created = futures_util::stream::iter(0..MANY)
        .map(|i| {
            let devices = devices.clone();
            async move {
                let d = Device::new(
                    &format!("d{i}"),
                    edgesync_crds::DeviceSpec {
                        node_name: "edge-1".into(),
                        desired: None,
                        reporting: None,
                    },
                );
                devices.create(&Default::default(), &d).await.map(drop)
            }
        })
        .buffer_unordered(32)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    assert_eq!(created, MANY);
    let (total, _) = cluster_totals(cp).await;
    let r0 = replica(cp, &ns.name, "many", "r0", &[]);
    let started = Instant::now();
    until(
        "every Device labelled and cached",
        Duration::from_secs(90),
        || async { (r0.metric("edgesync_controller_cached_devices").await == total).then_some(()) },
    )
    .await;
    let written = r0
        .metric("edgesync_controller_shard_labels_written_total")
        .await;
    eprintln!(
        "{MANY} Devices labelled in {:?}, {written} label writes",
        started.elapsed()
    );
    // Each unlabelled object once (the node and the Devices), not share after share.
    assert!(
        written <= (MANY + 1) as f64 * 1.1,
        "{written} label writes for {} objects",
        MANY + 1
    );
}
