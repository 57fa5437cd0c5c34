//! In-memory views of the cluster: reflectors over every Device and EdgeNode, kept current by
//! watches. Ownership checks, node lookups, the desired-state hub and the liveness loop read
//! these instead of calling the API server per request.

use std::sync::Arc;

use edgesync_crds::{Device, EdgeNode};
use futures_util::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::desired::DesiredHub;
use crate::live::state::Live;

/// Shared read-only caches of Devices and EdgeNodes.
#[derive(Clone)]
pub struct Caches {
    /// Every Device in the cluster.
    pub devices: Store<Device>,
    /// Every EdgeNode in the cluster.
    pub nodes: Store<EdgeNode>,
}

impl Caches {
    /// Starts the watches. Device events also feed the desired-state hub and the live state,
    /// so they and the cache see the same sequence of changes.
    pub fn start(
        client: &Client,
        hub: Arc<DesiredHub>,
        live: Option<Arc<Live>>,
        shutdown: &CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (devices, device_writer) = reflector::store();
        let (nodes, node_writer) = reflector::store();

        // managedFields are dropped from cached objects: they are never read and dominate the
        // memory of a large fleet's cache.
        let device_stream = reflector::reflector(
            device_writer,
            watcher(
                Api::<Device>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(|d: &mut Device| d.metadata.managed_fields = None),
        );
        let token = shutdown.clone();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(device_stream);
            loop {
                let next = tokio::select! {
                    _ = token.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(event)) => {
                        hub.on_event(&event);
                        if let Some(live) = &live {
                            live.on_device_event(&event);
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "Device watch failed; retrying"),
                    None => return,
                }
            }
        });

        let node_stream = reflector::reflector(
            node_writer,
            watcher(
                Api::<EdgeNode>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(|n: &mut EdgeNode| n.metadata.managed_fields = None),
        );
        let token = shutdown.clone();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(node_stream);
            loop {
                let next = tokio::select! {
                    _ = token.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "EdgeNode watch failed; retrying"),
                    None => return,
                }
            }
        });
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
