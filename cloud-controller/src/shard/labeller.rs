//! Keeps the shard labels (see [`labels`](super::labels)) right, so that each replica's
//! caches, which select by them, see every object of its shards:
//!
//! - the leader labels the objects not yet labelled for this shard count: new EdgeNodes and
//!   Devices, or all of them after `--shards` changed. It finds them with a watch of
//!   `edgesync.io/shards!=N`, which is empty in a settled fleet and costs nothing then;
//! - a shard's owner relabels a Device of its shard whose node changed (its caches see it,
//!   under its old label), and the Device moves to its new node's shard.
//!
//! Writes are paced by the global write budget, like every other write of the controller.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::{Device, EdgeNode};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::labels::{is_labelled, unlabelled, wanted};
use crate::budget::{Signal, WriteBudget};
use crate::lease::Leadership;
use crate::metrics::Metrics;

/// How often the leader looks for unlabelled objects.
const TICK: Duration = Duration::from_secs(1);
/// Label writes at once.
const CONCURRENCY: usize = 8;
/// Unlabelled objects the leader takes on per tick.
const MAX_PER_TICK: usize = 1000;

/// An object to label: its kind, namespace, name, and the node its shard follows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    device: bool,
    namespace: String,
    name: String,
    node: String,
}

/// Objects seen with a wrong shard label, waiting to be relabelled.
#[derive(Debug)]
pub struct Labeller {
    count: u32,
    moved: Mutex<BTreeSet<Pending>>,
    wake: Notify,
}

impl Labeller {
    /// A labeller for `count` shards.
    pub fn new(count: u32) -> Self {
        Self {
            count,
            moved: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
        }
    }

    /// Queues the Device for relabelling if its labels do not match its node.
    pub fn check_device(&self, d: &Device) {
        let ns = d.namespace().unwrap_or_default();
        if !is_labelled(d.meta().labels.as_ref(), &ns, &d.spec.node_name, self.count) {
            let fresh = self.queue(Pending {
                device: true,
                name: d.name_any(),
                node: d.spec.node_name.clone(),
                namespace: ns,
            });
            if fresh {
                self.wake.notify_one();
            }
        }
    }

    /// Queues a relabel; whether it was not queued already.
    fn queue(&self, p: Pending) -> bool {
        self.moved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p)
    }

    fn take_moved(&self) -> Vec<Pending> {
        std::mem::take(&mut *self.moved.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }
}

/// What the labeller works with.
pub struct Labelling {
    /// The queue of relabels.
    pub labeller: Arc<Labeller>,
    /// API client, for the label writes (short timeouts).
    pub client: Client,
    /// API client for the watches of unlabelled objects (no read timeout: a watch is quiet
    /// between changes, and one cut every few seconds lists 100,000 objects again).
    pub watch_client: Client,
    /// The global write budget.
    pub budget: Arc<WriteBudget>,
    /// Whether this replica leads (only the leader labels new objects).
    pub leader: Arc<Leadership>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Labelling {
    /// Runs until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let selector = unlabelled(self.labeller.count);
        let config = watcher::Config::default().labels(&selector);
        let (devices, device_writer) = reflector::store::<Device>();
        let (nodes, node_writer) = reflector::store::<EdgeNode>();
        let device_stream = reflector::reflector(
            device_writer,
            watcher(
                Api::<Device>::all(self.watch_client.clone()),
                config.clone(),
            )
            .default_backoff(),
        );
        let node_stream = reflector::reflector(
            node_writer,
            watcher(Api::<EdgeNode>::all(self.watch_client.clone()), config).default_backoff(),
        );
        let mut device_stream = std::pin::pin!(device_stream);
        let mut node_stream = std::pin::pin!(node_stream);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Objects labelled a moment ago, which the watch may not have dropped yet: a share
        // never takes them again (a share takes seconds, and the tick is due again when it
        // ends).
        let mut recent = Recent::default();
        // The share being written. The watches are read while it is: a reader that stops for
        // the seconds a share of writes takes falls behind the API server's events for those
        // very writes, and the API server closes a watch whose reader lags ("unresponsive"),
        // after which the watch lists every unlabelled object again, the store is stale for
        // as long, and objects labelled minutes ago were taken again: at 100,000 Devices the
        // fleet was never labelled.
        let mut writing: Option<BoxFuture<'_, ()>> = None;
        loop {
            // Biased: every watch event ready is read before anything else, so a share is
            // chosen from what is still unlabelled.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(r) = device_stream.next() => if let Err(e) = r {
                    warn!(error = %e, "Watch of unlabelled Devices failed; retrying");
                },
                Some(r) = node_stream.next() => if let Err(e) = r {
                    warn!(error = %e, "Watch of unlabelled EdgeNodes failed; retrying");
                },
                // Shutdown does not wait for a share of label writes: it is dropped.
                () = async { writing.as_mut().expect("polled only while writing").await }, if writing.is_some() => {
                    writing = None;
                }
                _ = self.labeller.wake.notified(), if writing.is_none() => {
                    writing = Some(Box::pin(self.write(self.labeller.take_moved())));
                }
                _ = tick.tick(), if writing.is_none() => {
                    let mut work = self.labeller.take_moved();
                    if self.leader.is_leader() {
                        // A share per tick: labelling a whole fleet takes minutes at the
                        // budget's pace.
                        recent.expire(Instant::now());
                        let share: Vec<Pending> = unlabelled_objects(&devices, &nodes)
                            .into_iter()
                            .filter(|p| !recent.has(p))
                            .take(MAX_PER_TICK)
                            .collect();
                        recent.add(&share, Instant::now());
                        work.extend(share);
                    }
                    writing = Some(Box::pin(self.write(work)));
                }
            }
        }
    }

    async fn write(&self, work: Vec<Pending>) {
        if work.is_empty() {
            return;
        }
        let count = self.labeller.count;
        let started = Instant::now();
        let total = work.len();
        let written = futures_util::stream::iter(work)
            .map(|p| async move {
                self.budget.acquire().await;
                let patch = Patch::Merge(serde_json::json!({
                    "metadata": { "labels": wanted(&p.namespace, &p.node, count) }
                }));
                let began = Instant::now();
                let params = PatchParams::default();
                let r = if p.device {
                    Api::<Device>::namespaced(self.client.clone(), &p.namespace)
                        .patch_metadata(&p.name, &params, &patch)
                        .await
                        .map(drop)
                } else {
                    Api::<EdgeNode>::namespaced(self.client.clone(), &p.namespace)
                        .patch_metadata(&p.name, &params, &patch)
                        .await
                        .map(drop)
                };
                match r {
                    Ok(()) => {
                        self.budget.record(Signal::Answered(began.elapsed()));
                        self.metrics.shard_labels_written.inc();
                        true
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => false,
                    Err(e) => {
                        self.budget.record(Signal::Overloaded);
                        debug!(namespace = %p.namespace, name = %p.name, error = %e, "Shard label not written; retried later");
                        // The leader finds it again; a relabel is queued again, for the next tick.
                        if p.device {
                            self.labeller.queue(p);
                        }
                        false
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        if total >= 100 {
            info!(written, total, took = ?started.elapsed(), "Shard labels written");
        }
    }
}

/// Objects the leader labelled within [`RECENT`]: not taken again while the watch of
/// unlabelled objects catches up with their new labels.
#[derive(Default)]
struct Recent {
    at: std::collections::HashMap<(bool, String, String), Instant>,
}

/// How long a labelled object is not taken again: longer than a relist of a large fleet's
/// unlabelled objects takes, during which the watch's store is not current.
const RECENT: Duration = Duration::from_secs(120);

impl Recent {
    fn key(p: &Pending) -> (bool, String, String) {
        (p.device, p.namespace.clone(), p.name.clone())
    }

    fn has(&self, p: &Pending) -> bool {
        self.at.contains_key(&Self::key(p))
    }

    fn add(&mut self, share: &[Pending], now: Instant) {
        for p in share {
            self.at.insert(Self::key(p), now);
        }
    }

    fn expire(&mut self, now: Instant) {
        self.at.retain(|_, t| now.duration_since(*t) < RECENT);
    }
}

/// Every unlabelled object the watches hold.
fn unlabelled_objects(devices: &Store<Device>, nodes: &Store<EdgeNode>) -> Vec<Pending> {
    let mut work: Vec<Pending> = nodes
        .state()
        .iter()
        .map(|n| Pending {
            device: false,
            namespace: n.namespace().unwrap_or_default(),
            name: n.name_any(),
            node: n.name_any(),
        })
        .collect();
    work.extend(devices.state().iter().map(|d| Pending {
        device: true,
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        node: d.spec.node_name.clone(),
    }));
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_labelled_a_moment_ago_is_not_taken_again_until_the_watch_has_caught_up() {
        let p = |name: &str| Pending {
            device: true,
            namespace: "a".into(),
            name: name.into(),
            node: "n".into(),
        };
        let mut recent = Recent::default();
        let t0 = Instant::now();
        recent.add(&[p("d1")], t0);
        assert!(recent.has(&p("d1")) && !recent.has(&p("d2")));
        recent.expire(t0 + RECENT);
        assert!(!recent.has(&p("d1")));
    }
}
