//! The liveness loop (the leader's; with shards each owner's, over its shards): marks EdgeNodes `Ready=False` when their agent has been
//! silent longer than the offline timeout, keeps each Device's `Online` condition equal to its
//! node's state, and turns `InSync` false as soon as a new desired generation exists that the
//! agent has not observed (the agent's report turns it true again).
//!
//! Level-triggered over the caches every few seconds: it converges from any state, including
//! after a leader change. Writes only what differs, through the same global write budget as
//! device status, with the object's resourceVersion as precondition (a conflict is simply
//! re-evaluated next round).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgesync_crds::{
    CONDITION_IN_SYNC, CONDITION_ONLINE, CONDITION_READY, Device, EdgeNode, condition_status,
    set_condition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::budget::WriteBudget;
use crate::cache::Caches;
use crate::metrics::Metrics;

/// How often the loop runs.
const TICK: Duration = Duration::from_secs(2);
/// Device condition writes per round at most, so one round stays short.
const MAX_WRITES_PER_ROUND: usize = 500;

/// Everything the loop needs.
pub struct Liveness {
    /// API client.
    pub client: Client,
    /// Caches.
    pub caches: Caches,
    /// Shared write budget.
    pub budget: Arc<WriteBudget>,
    /// Whether this replica is the leader.
    pub leader: Arc<crate::lease::Leadership>,
    /// With shards: the loop runs on every replica, for the nodes of its own shards (its
    /// caches hold only those), instead of on the leader.
    pub shards: Option<Arc<crate::shard::leases::Shards>>,
    /// Default offline timeout.
    pub offline_after: Duration,
    /// A Device out of sync this long gets an OutOfSync event.
    pub out_of_sync_after: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Kubernetes Events.
    pub events: crate::events::Events,
    /// The InSync=False transition each Device last had an OutOfSync event for, so it gets
    /// one per time it falls out of sync (by namespace and name; bounded by the caches).
    pub out_of_sync_seen: std::sync::Mutex<HashMap<(String, String), String>>,
}

impl Liveness {
    /// Runs until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        // The caches never fill while the API server is unreachable: shutdown must not wait
        // on them (this task holds an Events handle, so the events task would wait too).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.caches.wait_ready() => {}
        }
        debug!("Liveness loop started");
        loop {
            if self.shards.is_some() || self.leader.is_leader() {
                self.round().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn round(&self) {
        let now = Timestamp::now();
        let mut online: HashMap<(String, String), bool> = HashMap::new();
        for node in self.caches.nodes.state() {
            let ns = node.namespace().unwrap_or_default();
            let name = node.name_any();
            let timeout = node
                .spec
                .limits
                .as_ref()
                .and_then(|l| l.offline_after_seconds)
                .map_or(self.offline_after, |s| Duration::from_secs(u64::from(s)));
            let status = node.status.clone().unwrap_or_default();
            let silent_for = status
                .last_heartbeat_time
                .as_ref()
                .map(|t| (now.as_second() - t.0.as_second()).max(0) as u64);
            let is_online = silent_for.is_some_and(|s| s <= timeout.as_secs());
            debug!(
                namespace = ns,
                node = name,
                ?silent_for,
                is_online,
                "Liveness of edge node"
            );
            online.insert((ns.clone(), name.clone()), is_online);
            let ready = condition_status(&status.conditions, CONDITION_READY);
            // Leadership can end mid-round (its deadline passes): stop writing at once.
            if !is_online && ready != Some("False") && self.acts_for(&ns, &name) {
                self.mark_node_offline(&node, silent_for, timeout).await;
            }
        }
        let mut writes = 0;
        for device in self.caches.devices.state() {
            if writes >= MAX_WRITES_PER_ROUND {
                break;
            }
            let ns = device.namespace().unwrap_or_default();
            if !self.acts_for(&ns, &device.spec.node_name) {
                continue;
            }
            let node_online = online
                .get(&(ns, device.spec.node_name.clone()))
                .copied()
                .unwrap_or(false);
            self.out_of_sync_event(&device, now);
            if self.fix_device(&device, node_online).await {
                writes += 1;
            }
        }
    }

    /// Whether this replica may write for node `namespace/name` now: it leads, or with
    /// shards, it owns the node's shard (the cache can hold a shard a moment after losing it).
    fn acts_for(&self, namespace: &str, name: &str) -> bool {
        match &self.shards {
            Some(shards) => shards.owns_node(namespace, name),
            None => self.leader.is_leader(),
        }
    }

    async fn mark_node_offline(&self, node: &EdgeNode, silent_for: Option<u64>, timeout: Duration) {
        let ns = node.namespace().unwrap_or_default();
        let name = node.name_any();
        let mut status = node.status.clone().unwrap_or_default();
        let message = match silent_for {
            Some(s) => format!(
                "No batch from the agent for {s} s (offline after {} s)",
                timeout.as_secs()
            ),
            None => "The agent has never sent a batch".to_owned(),
        };
        set_condition(
            &mut status.conditions,
            CONDITION_READY,
            false,
            if silent_for.is_some() {
                "HeartbeatMissed"
            } else {
                "NeverConnected"
            },
            &message,
            None,
            Time(Timestamp::now()),
        );
        let api: Api<EdgeNode> = Api::namespaced(self.client.clone(), &ns);
        match crate::heartbeat::write_status(&api, &name, &status).await {
            Ok(()) => {
                self.metrics.node_status_writes.inc();
                if silent_for.is_some() {
                    info!(namespace = ns, node = name, message, "Edge node is offline");
                    self.events.transition(
                        node,
                        kube::runtime::events::EventType::Warning,
                        "NodeOffline",
                        format!("{message}; its Devices are Online=False"),
                    );
                }
            }
            Err(e) => {
                warn!(namespace = ns, node = name, error = %e, "Cannot mark edge node offline")
            }
        }
    }

    /// Emits OutOfSync once per transition for a Device whose InSync has been False longer
    /// than `out_of_sync_after`.
    fn out_of_sync_event(&self, device: &Device, now: Timestamp) {
        let Some(c) = device.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == CONDITION_IN_SYNC && c.status == "False")
        }) else {
            return;
        };
        let for_secs = (now.as_second() - c.last_transition_time.0.as_second()).max(0) as u64;
        if for_secs < self.out_of_sync_after.as_secs() {
            return;
        }
        let key = (device.namespace().unwrap_or_default(), device.name_any());
        let since = c.last_transition_time.0.to_string();
        {
            let mut seen = self
                .out_of_sync_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if seen.get(&key) == Some(&since) {
                return;
            }
            if seen.len() >= 100_000 {
                seen.clear();
            }
            seen.insert(key, since);
        }
        self.events.transition(
            device,
            kube::runtime::events::EventType::Warning,
            "OutOfSync",
            format!("Out of sync for {for_secs} s: {}", c.message),
        );
    }

    /// Brings one Device's Online/InSync conditions in line; true when it wrote.
    async fn fix_device(&self, device: &Device, node_online: bool) -> bool {
        let mut status = device.status.clone().unwrap_or_default();
        let now = Time(Timestamp::now());
        let mut changed = false;
        let online_now = condition_status(&status.conditions, CONDITION_ONLINE);
        // A device its node reported disconnected stays offline while the node is up.
        let device_down = online_now == Some("False")
            && status.conditions.iter().any(|c| {
                c.type_ == CONDITION_ONLINE
                    && c.reason == crate::device_status::REASON_DEVICE_DISCONNECTED
            });
        let want = if node_online && !device_down {
            "True"
        } else {
            "False"
        };
        if online_now != Some(want) {
            let (reason, message) = if node_online {
                ("NodeReady", "The device's edge node is reporting")
            } else {
                ("NodeOffline", "The device's edge node is not reporting")
            };
            changed |= set_condition(
                &mut status.conditions,
                CONDITION_ONLINE,
                node_online,
                reason,
                message,
                None,
                now.clone(),
            );
        }
        let generation = device.metadata.generation.unwrap_or(0);
        let observed = status.observed_desired_generation.unwrap_or(0);
        if observed < generation
            && condition_status(&status.conditions, CONDITION_IN_SYNC) != Some("False")
            || condition_status(&status.conditions, CONDITION_IN_SYNC).is_none()
        {
            let (ok, reason, message) = crate::device_status::in_sync(
                generation,
                observed,
                &device.spec.desired.clone().unwrap_or_default(),
                &status.reported.clone().unwrap_or_default(),
            );
            changed |= set_condition(
                &mut status.conditions,
                CONDITION_IN_SYNC,
                ok && status.reported_version.is_some(),
                if status.reported_version.is_some() {
                    reason
                } else {
                    "NeverReported"
                },
                &message,
                Some(generation),
                now,
            );
        }
        if !changed {
            return false;
        }
        self.budget.acquire().await;
        let api: Api<Device> =
            Api::namespaced(self.client.clone(), &device.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": device.resource_version() },
            "status": { "conditions": status.conditions },
        });
        match api
            .patch_status(
                &device.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                self.metrics.condition_writes.inc();
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
            Err(e) => {
                warn!(device = device.name_any(), error = %e, "Cannot update device conditions")
            }
        }
        true
    }
}
