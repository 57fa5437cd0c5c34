//! Kubernetes Events for what an operator should see in `kubectl describe`: an edge node going
//! offline and coming back, a device out of sync for longer than `--out-of-sync-event-seconds`,
//! reports rejected, and devices registered by their node.
//!
//! Emitting never blocks the path that noticed: events go through a bounded queue to one
//! task that publishes them with kube's event recorder (which aggregates repeats into a
//! series). Each object gets at most one event per reason per [`MIN_INTERVAL`], so a node
//! sending rejected reports in a loop costs one API write a minute, not one per batch; what
//! the queue or the pacing drops is counted in `edgesync_controller_events_dropped_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tokio::sync::mpsc;
use tracing::debug;

use crate::metrics::Metrics;

/// Least time between two events of one reason on one object.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);
/// Events waiting to be published at most.
const QUEUE: usize = 1024;
/// Objects whose last event time is remembered; past it, the memory starts over.
const REMEMBERED: usize = 100_000;

/// An object (kind, namespace, name) and an event reason.
type Key = (String, String, String, String);

/// A handle to emit events; cheap to clone.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    last: Arc<Mutex<HashMap<Key, Instant>>>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// The handle and the publishing task's future (run it until the handle and its clones
    /// are dropped; it then ends).
    pub fn new(
        client: Client,
        instance: Option<String>,
        metrics: Arc<Metrics>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "edgesync-controller".into(),
                instance,
            },
        );
        let task = async move {
            while let Some((event, reference)) = rx.recv().await {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    debug!(error = %e, reason = event.reason, "Cannot publish an event");
                }
            }
        };
        let events = Self {
            tx,
            last: Arc::default(),
            metrics,
        };
        (events, task)
    }

    /// Emits an event about `object` for a transition (a node going offline or coming
    /// back, a device registered or falling out of sync): these happen once per change, so
    /// they are not paced.
    pub fn transition<K>(&self, object: &K, type_: EventType, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.send(object.object_ref(&()), type_, reason, note);
    }

    /// Emits an event about `object`, unless one of the same reason was emitted for it within
    /// [`MIN_INTERVAL`]: for what can repeat with every request (rejected reports).
    pub fn emit<K>(&self, object: &K, type_: EventType, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let reference = object.object_ref(&());
        let key = (
            reference.kind.clone().unwrap_or_default(),
            reference.namespace.clone().unwrap_or_default(),
            reference.name.clone().unwrap_or_default(),
            reason.to_owned(),
        );
        {
            let now = Instant::now();
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < MIN_INTERVAL)
            {
                self.metrics.events_dropped.inc();
                return;
            }
            if last.len() >= REMEMBERED {
                last.clear();
            }
            last.insert(key, now);
        }
        self.send(reference, type_, reason, note);
    }

    fn send(&self, reference: ObjectReference, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            // The API server refuses notes over 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_owned(),
            secondary: None,
        };
        if self.tx.try_send((event, reference)).is_ok() {
            self.metrics.events_emitted.inc();
        } else {
            self.metrics.events_dropped.inc();
        }
    }
}
