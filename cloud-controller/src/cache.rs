//! In-memory views of the cluster: reflectors over every Device and EdgeNode (or, with
//! shards, those of the shards this replica owns), kept current by watches. Ownership checks, node lookups, the desired-state hub and the liveness loop read
//! these instead of calling the API server per request.

use std::collections::BTreeSet;
use std::sync::Arc;

use edgesync_crds::{Device, EdgeNode};
use futures_util::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A first list slower than this is logged.
const SLOW_LIST: std::time::Duration = std::time::Duration::from_secs(30);

use crate::desired::DesiredHub;
use crate::live::state::Live;
use crate::shard::labeller::Labeller;
use crate::shard::labels;
use crate::shard::leases::Shards;
use crate::shard::shard_of;

/// Which objects the caches hold.
#[derive(Clone)]
pub enum Scope {
    /// Every Device and EdgeNode (no shards).
    All,
    /// Those of the shards this replica owns (by their shard labels), following ownership:
    /// the watches start again with a new selector when the shards owned change, and each
    /// shard counts as cached once a watch including it has listed.
    Shards {
        /// Ownership.
        shards: Arc<Shards>,
        /// Devices seen with a shard label that no longer fits their node go here.
        labeller: Arc<Labeller>,
    },
}

/// Shared read-only caches of Devices and EdgeNodes.
#[derive(Clone)]
pub struct Caches {
    /// Every Device in the cluster, or in the shards owned here.
    pub devices: Store<Device>,
    /// Every EdgeNode in the cluster, or in the shards owned here.
    pub nodes: Store<EdgeNode>,
}

impl Caches {
    /// Starts the watches. Device events also feed the desired-state hub and the live state,
    /// so they and the cache see the same sequence of changes.
    pub fn start(
        client: &Client,
        scope: Scope,
        hub: Arc<DesiredHub>,
        live: Option<Arc<Live>>,
        shutdown: &CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (devices, device_writer) = reflector::store();
        let (nodes, node_writer) = reflector::store();
        let relabel = match &scope {
            Scope::Shards { labeller, .. } => Some(Arc::clone(labeller)),
            Scope::All => None,
        };
        let forget_in = Arc::clone(&hub);
        let live_forget = live.clone();
        let owner = match &scope {
            Scope::Shards { shards, .. } => Some(Arc::clone(shards)),
            Scope::All => None,
        };
        tasks.spawn(watch(
            Api::<Device>::all(client.clone()),
            device_writer,
            scope.clone(),
            "devices",
            shutdown.clone(),
            // Devices of shards gone to another replica are forgotten, not removed: their
            // agents must not hear of a deletion.
            move |count: u32, owned: &BTreeSet<u32>| {
                forget_in.forget_nodes(|ns, node| owned.contains(&shard_of(ns, node, count)));
                // Their live states too: the new owner serves them from now on.
                if let Some(live) = &live_forget {
                    live.forget(|key, state| owned.contains(&shard_of(&key.0, &state.node, count)));
                }
            },
            move |event: &watcher::Event<Device>| {
                hub.on_event(event);
                match (&live, &owner, event) {
                    // A Device that left this replica's watch for another replica's shard
                    // (its node changed) was not deleted: its new owner serves it.
                    (Some(live), Some(shards), watcher::Event::Delete(d))
                        if d.metadata
                            .namespace
                            .as_deref()
                            .is_some_and(|ns| !shards.owns_node(ns, &d.spec.node_name)) =>
                    {
                        live.forget_device(d);
                    }
                    (Some(live), _, _) => live.on_device_event(event),
                    (None, _, _) => {}
                }
                if let (Some(l), watcher::Event::Apply(d) | watcher::Event::InitApply(d)) =
                    (&relabel, event)
                {
                    l.check_device(d);
                }
            },
        ));
        tasks.spawn(watch(
            Api::<EdgeNode>::all(client.clone()),
            node_writer,
            scope,
            "nodes",
            shutdown.clone(),
            |_: u32, _: &BTreeSet<u32>| {},
            |_: &watcher::Event<EdgeNode>| {},
        ));
        Self { devices, nodes }
    }

    /// Whether both caches have completed their first list.
    pub fn is_ready(&self) -> bool {
        // `wait_until_ready` resolves once the first list is in; poll it without blocking.
        futures_util::FutureExt::now_or_never(self.devices.wait_until_ready())
            .is_some_and(|r| r.is_ok())
            && futures_util::FutureExt::now_or_never(self.nodes.wait_until_ready())
                .is_some_and(|r| r.is_ok())
    }

    /// Waits until both caches have completed their first list.
    pub async fn wait_ready(&self) {
        // Polled rather than awaiting `Store::wait_until_ready` directly: a task parked on it
        // from start-up was seen never to wake (kube-runtime 5.0), while polling is reliable.
        while !self.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The cached Device `namespace/name`.
    pub fn device(&self, namespace: &str, name: &str) -> Option<Arc<Device>> {
        self.devices.get(&ObjectRef::new(name).within(namespace))
    }

    /// The cached EdgeNode `namespace/name`.
    pub fn node(&self, namespace: &str, name: &str) -> Option<Arc<EdgeNode>> {
        self.nodes.get(&ObjectRef::new(name).within(namespace))
    }
}

/// Keeps `writer` (and `on_event`) current with a watch of the scope's objects, started again
/// whenever the shards owned change.
async fn watch<K>(
    api: Api<K>,
    mut writer: Writer<K>,
    scope: Scope,
    kind: &'static str,
    shutdown: CancellationToken,
    mut on_rescope: impl FnMut(u32, &BTreeSet<u32>) + Send,
    mut on_event: impl FnMut(&watcher::Event<K>) + Send,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let mut changes = match &scope {
        Scope::Shards { shards, .. } => Some(shards.subscribe()),
        Scope::All => None,
    };
    loop {
        // Which shards this watch covers; those no longer owned stop counting as cached at
        // once, the new ones once the watch has listed them.
        let covering = match &scope {
            Scope::All => None,
            Scope::Shards { shards, .. } => {
                if let Some(c) = changes.as_mut() {
                    c.mark_unchanged();
                }
                let owned: BTreeSet<u32> = shards.owned().into_iter().collect();
                let still: BTreeSet<u32> =
                    shards.cached(kind).intersection(&owned).copied().collect();
                shards.set_cached(kind, still);
                on_rescope(shards.count(), &owned);
                Some((Arc::clone(shards), owned))
            }
        };
        let config = match &covering {
            None => Some(watcher::Config::default()),
            Some((shards, owned)) => labels::selector(shards.count(), owned)
                .map(|s| watcher::Config::default().labels(&s)),
        };
        // managedFields are dropped from cached objects: they are never read and dominate the
        // memory of a large fleet's cache.
        let mut stream = match config {
            Some(config) => watcher(api.clone(), config)
                .default_backoff()
                .modify(|o: &mut K| o.meta_mut().managed_fields = None)
                .boxed(),
            // No shard owned: an empty list, so the cache empties and counts as listed.
            None => {
                futures_util::stream::iter([Ok(watcher::Event::Init), Ok(watcher::Event::InitDone)])
                    .chain(futures_util::stream::pending())
                    .boxed()
            }
        };
        let listing_since = tokio::time::Instant::now();
        let mut listed = false;
        let slow_list = tokio::time::sleep_until(listing_since + SLOW_LIST);
        tokio::pin!(slow_list);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                () = &mut slow_list, if !listed => {
                    listed = true;
                    warn!(kind, waited = ?SLOW_LIST, "The first list of this watch has not finished: the controller is not ready until it has (is the API server overloaded, or its watch cache still starting?)");
                    continue;
                }
                Ok(()) = changed(&mut changes) => {
                    debug!(kind, "Shards owned changed: watching again");
                    break;
                }
                next = stream.next() => next,
            };
            match next {
                Some(Ok(event)) => {
                    writer.apply_watcher_event(&event);
                    on_event(&event);
                    if matches!(event, watcher::Event::InitDone) {
                        listed = true;
                        info!(kind, took = ?listing_since.elapsed(), objects = writer.as_reader().state().len(), "Listed");
                    }
                    if let (watcher::Event::InitDone, Some((shards, owned))) = (&event, &covering) {
                        shards.set_cached(kind, owned.clone());
                    }
                }
                // The messages operators search for (docs/troubleshooting.md).
                Some(Err(e)) if kind == "devices" => {
                    warn!(error = %e, "Device watch failed; retrying");
                }
                Some(Err(e)) => warn!(error = %e, "EdgeNode watch failed; retrying"),
                None => return,
            }
        }
    }
}

/// Resolves when the shards owned change (never without shards).
async fn changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Result<(), ()> {
    match changes {
        Some(c) => c.changed().await.map_err(drop),
        None => std::future::pending().await,
    }
}
