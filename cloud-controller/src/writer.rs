//! The Device status writer: latest-wins coalescing per device, a global write budget toward
//! the API server, bounded concurrency, and never an older `reportedVersion` over a newer one.
//!
//! A report waits in `pending` (one entry per device, the newest version wins) until a worker
//! picks the device up, pays one token of the write budget and writes the status with the
//! object's `resourceVersion` as precondition. A conflict re-reads the object and re-checks its
//! version, so two replicas writing the same device cannot regress it. Every report submitted
//! has a waiter that learns when a version at least as new is durable: that is what lets a
//! batch be answered 2xx only once its reports are in the API server.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Instant;

use edgesync_crds::{CONDITION_IN_SYNC, CONDITION_ONLINE, Device, DeviceStatus, set_condition};
use edgesync_protocol::merge::delta;
use edgesync_protocol::rate::TokenBucket;
use edgesync_protocol::wire::Report;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cache::Caches;
use crate::metrics::Metrics;

/// Re-reads after resourceVersion conflicts before a write is given up (and retried by the
/// agent's next batch).
const MAX_CONFLICT_RETRIES: usize = 5;

/// `(namespace, name)` of a Device.
pub type DeviceKey = (String, String);

/// The global budget of writes per second toward the API server, shared by every writer of
/// this replica (device status, liveness conditions).
pub struct WriteBudget {
    bucket: Mutex<TokenBucket>,
}

impl WriteBudget {
    /// `qps` writes per second with bursts of `burst`.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(qps, f64::from(burst), Instant::now())),
        }
    }

    /// Waits until one more write is within budget.
    pub async fn acquire(&self) {
        let wait = self
            .bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(1.0, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What became of a submitted report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This version, or the newer one given, is durable.
    Durable(u64),
    /// The report can never be written (reason code, message).
    Rejected(&'static str, String),
    /// The API server could not be reached or refused for a transient reason.
    Unavailable(String),
}

struct Pending {
    node: String,
    report: Report,
}

struct Waiter {
    version: u64,
    arrived: Instant,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    pending: HashMap<DeviceKey, Pending>,
    waiters: HashMap<DeviceKey, Vec<Waiter>>,
    queue: VecDeque<DeviceKey>,
    queued: HashSet<DeviceKey>,
    busy: HashSet<DeviceKey>,
    /// Newest version this replica knows to be durable, per device.
    durable: HashMap<DeviceKey, u64>,
}

/// The coalescing status writer.
pub struct StatusWriter {
    state: Mutex<State>,
    wake: Notify,
    budget: Arc<WriteBudget>,
    client: Client,
    caches: Caches,
    metrics: Arc<Metrics>,
}

impl StatusWriter {
    /// A writer; call [`StatusWriter::spawn_workers`] to start writing.
    pub fn new(
        client: Client,
        caches: Caches,
        budget: Arc<WriteBudget>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            budget,
            client,
            caches,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `n` workers (the bound on writes in flight).
    pub fn spawn_workers(
        self: &Arc<Self>,
        n: u32,
        shutdown: &CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        for _ in 0..n {
            let me = Arc::clone(self);
            let token = shutdown.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = me.work() => {}
                }
            });
        }
    }

    /// Queues `report` for the device `key` of `node`; the receiver learns its fate.
    /// `known_durable` is the version the cache shows as written, if any.
    pub fn submit(
        &self,
        key: DeviceKey,
        node: &str,
        report: Report,
        known_durable: Option<u64>,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let version = report.version;
        let mut st = self.lock();
        let durable = st
            .durable
            .get(&key)
            .copied()
            .max(known_durable)
            .unwrap_or(0);
        if durable >= version {
            let _ = tx.send(Outcome::Durable(durable));
            return rx;
        }
        st.waiters.entry(key.clone()).or_default().push(Waiter {
            version,
            arrived: Instant::now(),
            tx,
        });
        let newer_pending = st
            .pending
            .get(&key)
            .is_some_and(|p| p.report.version >= version);
        if !newer_pending {
            st.pending.insert(
                key.clone(),
                Pending {
                    node: node.to_owned(),
                    report,
                },
            );
        }
        if !st.queued.contains(&key) && !st.busy.contains(&key) {
            st.queued.insert(key.clone());
            st.queue.push_back(key);
            self.wake.notify_one();
        }
        self.metrics
            .writer_pending
            .store(st.pending.len() as u64, Ordering::Relaxed);
        rx
    }

    async fn work(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                let mut job = None;
                while let Some(key) = st.queue.pop_front() {
                    st.queued.remove(&key);
                    if let Some(p) = st.pending.remove(&key) {
                        st.busy.insert(key.clone());
                        job = Some((key, p));
                        break;
                    }
                }
                self.metrics
                    .writer_pending
                    .store(st.pending.len() as u64, Ordering::Relaxed);
                job
            };
            let Some((key, pending)) = job else {
                self.wake.notified().await;
                continue;
            };
            let version = pending.report.version;
            let outcome = self.write(&key, pending).await;
            self.finish(key, version, outcome);
        }
    }

    /// Completes the waiters a write settled and re-queues the device if a newer report
    /// arrived while it was being written.
    fn finish(&self, key: DeviceKey, attempted: u64, outcome: Outcome) {
        let mut st = self.lock();
        st.busy.remove(&key);
        let settled_up_to = match &outcome {
            Outcome::Durable(v) => {
                let d = st.durable.entry(key.clone()).or_default();
                *d = (*d).max(*v);
                *v
            }
            _ => attempted,
        };
        if let Some(waiters) = st.waiters.get_mut(&key) {
            let mut keep = Vec::with_capacity(waiters.len());
            for w in waiters.drain(..) {
                if w.version <= settled_up_to {
                    if matches!(outcome, Outcome::Durable(_)) {
                        self.metrics
                            .report_durable_latency
                            .observe(w.arrived.elapsed());
                    }
                    let _ = w.tx.send(outcome.clone());
                } else if !w.tx.is_closed() {
                    keep.push(w);
                }
            }
            *waiters = keep;
            if waiters.is_empty() {
                st.waiters.remove(&key);
            }
        }
        if st.pending.contains_key(&key) && st.queued.insert(key.clone()) {
            st.queue.push_back(key);
            self.wake.notify_one();
        }
    }

    async fn write(&self, key: &DeviceKey, pending: Pending) -> Outcome {
        let (namespace, name) = key;
        let api: Api<Device> = Api::namespaced(self.client.clone(), namespace);
        let mut object = self.caches.device(namespace, name).map(|d| (*d).clone());
        let Pending { node, report } = pending;
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut device = match object.take() {
                Some(d) => d,
                None => match api.get_opt(name).await {
                    Ok(Some(d)) => d,
                    Ok(None) => return gone(namespace, name),
                    Err(e) => return self.unavailable(e),
                },
            };
            let current = device
                .status
                .as_ref()
                .and_then(|s| s.reported_version)
                .unwrap_or(0);
            if current >= report.version {
                // Written already (a duplicate batch, another replica, or a newer report).
                return Outcome::Durable(current);
            }
            if device.spec.node_name != node {
                return Outcome::Rejected(
                    "forbidden",
                    format!(
                        "device {name} now belongs to node {}, not {node}",
                        device.spec.node_name
                    ),
                );
            }
            apply_report(&mut device, &report);
            device.metadata.managed_fields = None;
            self.budget.acquire().await;
            let started = Instant::now();
            let result = api
                .replace_status(name, &PostParams::default(), &device)
                .await;
            self.metrics.status_write_latency.observe(started.elapsed());
            match result {
                Ok(_) => {
                    self.metrics.status_writes.fetch_add(1, Ordering::Relaxed);
                    self.metrics.kubernetes_up.store(true, Ordering::Relaxed);
                    return Outcome::Durable(report.version);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.metrics
                        .status_write_conflicts
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(namespace, name, "Status write conflict; re-reading");
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return gone(namespace, name),
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    self.metrics
                        .status_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(namespace, name, error = %s.message, "API server refused the device status");
                    return Outcome::Rejected("invalid", s.message);
                }
                Err(e) => return self.unavailable(e),
            }
        }
        Outcome::Unavailable(format!(
            "device {namespace}/{name} kept changing under {MAX_CONFLICT_RETRIES} writes; retry"
        ))
    }

    fn unavailable(&self, e: kube::Error) -> Outcome {
        self.metrics
            .status_write_errors
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.kubernetes_up.store(false, Ordering::Relaxed);
        warn!(error = %e, "Device status write failed");
        Outcome::Unavailable(e.to_string())
    }
}

fn gone(namespace: &str, name: &str) -> Outcome {
    Outcome::Rejected(
        "unknown_device",
        format!("device {namespace}/{name} was deleted"),
    )
}

/// Writes a report into a Device's status: reported state and version, report time, observed
/// desired generation, `Online=True` and `InSync` from the delta between desired and reported.
pub fn apply_report(device: &mut Device, report: &Report) {
    let now = Time(Timestamp::now());
    let generation = device.metadata.generation.unwrap_or(0);
    let desired = device.spec.desired.clone().unwrap_or_default();
    let status = device.status.get_or_insert_with(DeviceStatus::default);
    status.reported = Some(report.reported.clone());
    status.reported_version = Some(report.version);
    status.last_report_time = Some(
        report
            .reported_at
            .parse::<Timestamp>()
            .map(Time)
            .unwrap_or_else(|_| now.clone()),
    );
    status.observed_desired_generation = Some(report.observed_desired_version);
    set_condition(
        &mut status.conditions,
        CONDITION_ONLINE,
        true,
        "Reporting",
        "The device's edge node is reporting it",
        None,
        now.clone(),
    );
    let (in_sync, reason, message) = in_sync(
        generation,
        report.observed_desired_version,
        &desired,
        &report.reported,
    );
    set_condition(
        &mut status.conditions,
        CONDITION_IN_SYNC,
        in_sync,
        reason,
        &message,
        Some(generation),
        now,
    );
}

/// `InSync`: the agent has applied the current desired generation and the device reports
/// every desired value.
pub fn in_sync(
    generation: i64,
    observed: i64,
    desired: &serde_json::Map<String, serde_json::Value>,
    reported: &serde_json::Map<String, serde_json::Value>,
) -> (bool, &'static str, String) {
    if observed < generation {
        return (
            false,
            "DesiredNotObserved",
            format!(
                "The edge node has applied desired generation {observed}, not yet {generation}"
            ),
        );
    }
    let d = delta(desired, reported);
    if d.is_empty() {
        (
            true,
            "InSync",
            "The device reports every desired value".into(),
        )
    } else {
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.truncate(5);
        (
            false,
            "ReportedDiffers",
            format!(
                "Reported state differs from desired at: {}",
                keys.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgesync_crds::{DeviceSpec, condition_status};
    use serde_json::json;

    fn report(version: u64, reported: serde_json::Value, observed: i64) -> Report {
        Report {
            device: "d".into(),
            version,
            reported: reported.as_object().cloned().unwrap_or_default(),
            reported_at: "2026-11-28T10:00:00Z".into(),
            observed_desired_version: observed,
        }
    }

    #[test]
    fn report_sets_status_and_conditions() {
        let mut d = Device::new(
            "d",
            DeviceSpec {
                node_name: "n".into(),
                desired: json!({"speed": 5}).as_object().cloned(),
                reporting: None,
            },
        );
        d.metadata.generation = Some(2);
        apply_report(&mut d, &report(7, json!({"speed": 3}), 2));
        let s = d.status.as_ref().unwrap();
        assert_eq!(s.reported_version, Some(7));
        assert_eq!(condition_status(&s.conditions, "Online"), Some("True"));
        assert_eq!(condition_status(&s.conditions, "InSync"), Some("False"));
        apply_report(&mut d, &report(8, json!({"speed": 5, "temp": 1}), 2));
        let s = d.status.as_ref().unwrap();
        assert_eq!(condition_status(&s.conditions, "InSync"), Some("True"));
        assert_eq!(
            s.last_report_time.as_ref().unwrap().0.to_string(),
            "2026-11-28T10:00:00Z"
        );
        // A newer desired generation not yet observed is not in sync, whatever is reported.
        let (ok, reason, _) = in_sync(3, 2, &serde_json::Map::new(), &serde_json::Map::new());
        assert!(!ok);
        assert_eq!(reason, "DesiredNotObserved");
    }
}
