//! The Device status writer: latest-wins coalescing per device, a global write budget toward
//! the API server, bounded concurrency, and never an older report over a newer one.
//!
//! Reports are ordered by their stamp, `(epoch generation, version)` (see `stamp`). A report
//! waits in `pending` (one entry per device, the newest stamp wins) until a worker picks the
//! device up, pays one token of the write budget and writes the status with the object's
//! `resourceVersion` as precondition. A conflict re-reads the object and re-checks its stamp,
//! so two replicas writing the same device cannot regress it. Every report submitted has a
//! waiter that learns when a stamp at least as new is durable: that is what lets a batch be
//! answered 2xx only once its reports are in the API server. A waiter also settles, before
//! any write, when the same node submits a newer report of its device: the node's agent keeps
//! that newer report until its own batch is answered, so the older one need not hold a batch
//! (and the agent's window of batches in flight) for a write that would be replaced anyway.

mod coalescer;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use edgesync_crds::Device;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::budget::{Signal, WriteBudget};
use crate::cache::Caches;
use crate::device_status::apply_report;
use crate::metrics::Metrics;
use crate::stamp::{CONFLICT, Stamp, Stamped, Verdict, conflict_message, judge};
use coalescer::{Answers, Coalescer, Pending};

/// Re-reads after resourceVersion conflicts before a write is given up (and retried by the
/// agent's next batch).
const MAX_CONFLICT_RETRIES: usize = 5;

/// `(namespace, name)` of a Device.
pub type DeviceKey = (String, String);

/// What became of a submitted report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This report, or the newer one stamped as given, is durable.
    Durable(Stamp),
    /// The same node submitted a newer report of the device (stamped as given), which is
    /// queued: its own waiter answers for it.
    Superseded(Stamp),
    /// The report can never be written (reason code, message).
    Rejected(&'static str, String),
    /// The API server could not be reached or refused for a transient reason.
    Unavailable(String),
}

/// The coalescing status writer.
pub struct StatusWriter {
    state: Mutex<Coalescer<oneshot::Sender<Outcome>>>,
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
        min_interval: std::time::Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Coalescer::new(min_interval)),
            wake: Notify::new(),
            budget,
            client,
            caches,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Coalescer<oneshot::Sender<Outcome>>> {
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
    /// `known_durable` is the stamp the cache shows as written, if any.
    pub fn submit(
        &self,
        key: DeviceKey,
        node: &str,
        report: Stamped,
        known_durable: Option<Stamp>,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let (answers, wake) = {
            let mut st = self.lock();
            let done = st.submit(key, node, report, known_durable, tx, Instant::now());
            self.metrics.writer_pending.set(st.pending() as i64);
            done
        };
        self.answer(answers, false);
        if wake {
            self.wake.notify_one();
        }
        rx
    }

    async fn work(&self) {
        loop {
            let (job, due) = {
                let mut st = self.lock();
                let job = st.take(Instant::now());
                self.metrics.writer_pending.set(st.pending() as i64);
                (job, st.next_due())
            };
            let Some((key, pending)) = job else {
                // Nothing to write now; a device held by --status-min-interval-seconds may
                // be due later.
                match due {
                    Some(at) => {
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep_until(at.into()) => {}
                        }
                    }
                    None => self.wake.notified().await,
                }
                continue;
            };
            let stamp = pending.report.stamp;
            let outcome = self.write(&key, pending).await;
            self.finish(key, stamp, outcome);
        }
    }

    /// Answers the waiters a write settled and wakes a worker if a newer report arrived
    /// while it was being written.
    fn finish(&self, key: DeviceKey, attempted: Stamp, outcome: Outcome) {
        let (answers, wake) = self.lock().finish(key, attempted, &outcome, Instant::now());
        self.answer(answers, true);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Sends each waiter its outcome (a receiver may be gone: its batch timed out);
    /// `written`: the answers of a write, whose durable latency is measured.
    fn answer(&self, answers: Answers<oneshot::Sender<Outcome>>, written: bool) {
        for (waiter, outcome) in answers {
            if written && matches!(outcome, Outcome::Durable(_)) {
                self.metrics
                    .observe_report_durable(waiter.arrived.elapsed());
            }
            let _ = waiter.handle.send(outcome);
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
            match judge(device.status.as_ref(), report.stamp, |held| {
                report.reported.same_as(held)
            }) {
                Verdict::Newer => {}
                // Written already (a duplicate batch, another replica, or a newer report).
                Verdict::Same => return Outcome::Durable(report.stamp),
                Verdict::Older(current) => return Outcome::Durable(current),
                Verdict::Conflict => return conflict(key, &report),
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
            let took = started.elapsed();
            self.metrics.observe_status_write(took);
            self.budget.record(match &result {
                Err(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => Signal::Overloaded,
                Err(kube::Error::Api(_)) | Ok(_) => Signal::Answered(took),
                // Transport errors and timeouts.
                Err(_) => Signal::Overloaded,
            });
            match result {
                Ok(_) => {
                    self.metrics.status_writes.inc();
                    self.metrics.kubernetes_up.set(1);
                    return Outcome::Durable(report.stamp);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.metrics.status_write_conflicts.inc();
                    debug!(namespace, name, "Status write conflict; re-reading");
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return gone(namespace, name),
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    self.metrics.status_write_errors.inc();
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
        self.metrics.status_write_errors.inc();
        self.metrics.kubernetes_up.set(0);
        warn!(error = %e, "Device status write failed");
        Outcome::Unavailable(e.to_string())
    }
}

/// The answer to a report whose stamp already holds another state.
fn conflict((namespace, name): &DeviceKey, report: &Stamped) -> Outcome {
    Outcome::Rejected(
        CONFLICT,
        conflict_message(namespace, name, report.version, &report.epoch),
    )
}

fn gone(namespace: &str, name: &str) -> Outcome {
    Outcome::Rejected(
        "unknown_device",
        format!("device {namespace}/{name} was deleted"),
    )
}
