//! Shards (`--shards`): controller replicas share the fleet's shards through Leases on the
//! real API server, none above its fair share; a killed replica's shards are taken over once
//! its Leases expire, and a stopped replica's at once (it releases them).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::Controller;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::ListParams;

const SHARDS: u32 = 8;

/// Each shard's holder, from the shard Leases of group `sh`.
async fn holders(api: &Api<Lease>) -> BTreeMap<u32, String> {
    let list = api
        .list(
            &ListParams::default()
                .labels("edgesync.io/lease-group=sh,edgesync.io/lease-kind=shard"),
        )
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

/// Waits up to `deadline` until every shard is held by one of `live`, none above
/// `max_each`, and the live replicas' own metrics own every shard between them.
async fn wait_settled(
    api: &Api<Lease>,
    replicas: &[(&str, &Controller)],
    max_each: usize,
    deadline: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let h = holders(api).await;
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
    let shards = SHARDS.to_string();
    let start = |id: &str| {
        Controller::start(
            cp,
            &[
                "--shards",
                &shards,
                "--lease-namespace",
                &ns.name,
                "--lease-name",
                "sh",
                "--identity",
                id,
            ],
        )
    };
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
}
