//! The uplink: turns the outbox into report batches for the controller.
//!
//! Outermost first: a change goes out at once on an idle link, and gathers into the next
//! batch while one is in flight (for at most the batch window); batch size limits, token
//! buckets on reports/s and bytes/s, a bound on batches in flight, then one HTTP request per
//! batch (gzip, bearer token, W3C
//! `traceparent`). A device whose state changes while a batch carries it goes out again in
//! the next batch rather than after that one is answered: the controller then answers the
//! older report as superseded without writing it, so a change waits for at most one write of
//! its device. A failed batch is not retried as-is: its devices stay pending and the next
//! batch, after an exponential backoff with full jitter (schedule from `backon`, `Retry-After`
//! honoured), carries their *latest* state. Rows leave the outbox only when a 2xx answer
//! covers their version (accepted, stale, or rejected for good).

mod answer;
mod schedule;

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgesync_protocol::wire::{self, AgentHealth, ReportBatch, ReportBatchResponse, ReportStatus};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::full_jitter;
use crate::config::{CloudSettings, UplinkSettings};
use crate::metrics::Metrics;
use crate::store::{PendingBatch, Store};
use answer::{Outcome, classify, sort};
use schedule::Schedule;

/// Bodies up to this size are sent uncompressed.
const GZIP_MIN_BYTES: usize = 1024;

/// The uplink's clock: tokio's, so a test with paused time moves it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The uplink task.
pub struct Uplink {
    settings: UplinkSettings,
    cloud: CloudSettings,
    reports_url: String,
    store: Store,
    metrics: Arc<Metrics>,
    notify: Arc<Notify>,
    http: reqwest::Client,
    started: Instant,
}

impl Uplink {
    /// Builds the uplink (no I/O).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS setup).
    pub fn new(
        settings: UplinkSettings,
        cloud: CloudSettings,
        namespace: &str,
        node: &str,
        store: Store,
        metrics: Arc<Metrics>,
        notify: Arc<Notify>,
    ) -> reqwest::Result<Self> {
        let http = crate::cloud_client::http_client(&cloud, |b| b.timeout(cloud.request_timeout))?;
        let reports_url = format!("{}{}", cloud.url, wire::reports_path(namespace, node));
        Ok(Self {
            settings,
            cloud,
            reports_url,
            store,
            metrics,
            notify,
            http,
            started: now(),
        })
    }

    /// Runs until `shutdown`, then makes one bounded attempt to deliver what is pending.
    pub async fn run(self, shutdown: CancellationToken, shutdown_timeout: Duration) {
        let this = Arc::new(self);
        let mut schedule = Schedule::new(this.settings.clone(), now(), full_jitter);
        let mut in_flight: JoinSet<Outcome> = JoinSet::new();
        // What each batch in flight carries, by task: a task that panicked still gives its
        // devices back to the schedule.
        let mut carrying: HashMap<tokio::task::Id, Vec<(String, u64)>> = HashMap::new();
        while !shutdown.is_cancelled() {
            // Start every batch the schedule allows now.
            while let Some(read) = schedule.next(now()) {
                let Some(batch) = this.read(read.max_reports, read.skip, read.heartbeat).await
                else {
                    break;
                };
                let bytes = if schedule.counts_bytes() {
                    serde_json::to_vec(&batch.reports).map_or(0, |v| v.len())
                } else {
                    0
                };
                let wait = schedule.admit(batch.reports.len(), bytes, now());
                if !wait.is_zero() {
                    this.metrics.rate_limited_seconds.inc_by(wait.as_secs_f64());
                    debug!(wait_ms = wait.as_millis() as u64, "Rate limited");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                let covered = batch.covered();
                schedule.sent(&covered, now());
                let me = this.clone();
                let span = info_span!("batch", seq = batch.seq, reports = batch.reports.len());
                let sent = covered.clone();
                let task =
                    in_flight.spawn(async move { me.send(batch, &sent).await }.instrument(span));
                carrying.insert(task.id(), covered);
            }
            // A signal seen while starting batches (waiting on the rate limit or the store)
            // ends the loop here: below, nothing but a timer would wake it.
            if shutdown.is_cancelled() {
                break;
            }
            let change_delay = schedule.change_delay();
            let wake_at = schedule.wake_at(now()).map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                done = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let (id, outcome) = match done {
                        Some(Ok((id, outcome))) => (id, outcome),
                        Some(Err(e)) => (e.id(), Outcome::Retry {
                            after: None,
                            reason: format!("the batch's task failed: {e}"),
                        }),
                        None => continue,
                    };
                    let covered = carrying.remove(&id).unwrap_or_default();
                    let delay = schedule.settle(&covered, &outcome, now());
                    this.metrics.awaiting_durable.set(schedule.awaiting_durable() as i64);
                    this.metrics.live_resends.inc_by(schedule.take_resent());
                    this.log(&outcome, delay, schedule.batch_max());
                }
                // An idle link sends a change at once (after `linger`, 0 by default). While a
                // batch is in flight, changes gather (as in group commit) until it is
                // answered, which fills the next batch, or until the window has passed,
                // which sends them alongside.
                _ = async {
                    this.notify.notified().await;
                    tokio::time::sleep(change_delay.unwrap_or_default()).await;
                }, if change_delay.is_some() => {}
                _ = async {
                    match wake_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }

        // Shutdown: let in-flight batches finish and make one more attempt, within the deadline.
        let deadline = tokio::time::sleep(shutdown_timeout);
        tokio::pin!(deadline);
        let final_attempt = async {
            while in_flight.join_next().await.is_some() {}
            if let Ok(Some(batch)) = this
                .store
                .next_batch(
                    this.settings.batch_max_reports,
                    this.settings.batch_max_bytes,
                    Arc::default(),
                )
                .await
            {
                let covered = batch.covered();
                let _ = this.send(batch, &covered).await;
            }
        };
        tokio::select! {
            _ = &mut deadline => info!("Shutdown deadline reached; pending reports stay in the outbox"),
            _ = final_attempt => {}
        }
    }

    /// The next batch from the outbox, or a heartbeat when it has none and `heartbeat` is
    /// due; `None` when there is nothing to send.
    async fn read(
        &self,
        max_reports: usize,
        skip: Arc<crate::store::InFlight>,
        heartbeat: bool,
    ) -> Option<PendingBatch> {
        match self
            .store
            .next_batch(max_reports, self.settings.batch_max_bytes, skip)
            .await
        {
            Ok(Some(batch)) => Some(batch),
            Ok(None) if heartbeat => match self.store.heartbeat_seq().await {
                Ok(seq) => Some(PendingBatch {
                    seq,
                    reports: Vec::new(),
                    pending_since_ms: Vec::new(),
                }),
                Err(e) => {
                    warn!(error = %e, "Cannot allocate a heartbeat seq; sending a health-only heartbeat");
                    Some(PendingBatch::health_only())
                }
            },
            Ok(None) => None,
            Err(e) if heartbeat => {
                // The store cannot commit (a seq is allocated with a write): the heartbeat
                // still goes out, so the EdgeNode shows why.
                warn!(error = %e, "Cannot read the outbox; sending a health-only heartbeat");
                Some(PendingBatch::health_only())
            }
            Err(e) => {
                error!(error = %e, "Cannot read the outbox");
                None
            }
        }
    }

    /// Logs a batch's outcome and counts retries; `delay` is the wait the schedule chose.
    fn log(&self, outcome: &Outcome, delay: Duration, batch_max: usize) {
        let retry_in_ms = delay.as_millis() as u64;
        match outcome {
            Outcome::Acked { covered, live, .. } => debug!(
                covered,
                live = live.as_ref().map_or(0, |l| l.accepted.len()),
                "Batch acknowledged"
            ),
            Outcome::Retry { reason, .. } => {
                warn!(reason, retry_in_ms, "Uplink failed, retrying");
            }
            Outcome::TooLarge => warn!(
                batch_max,
                "Controller said the batch was too large; sending smaller batches"
            ),
            Outcome::Refused { status, body } => error!(
                status,
                body,
                hint = Outcome::hint(*status),
                retry_in_ms,
                "Controller refused the batch"
            ),
        }
        if !matches!(outcome, Outcome::Acked { .. }) {
            self.metrics.batches_retried.inc();
        }
    }

    async fn send(&self, batch: PendingBatch, covered: &[(String, u64)]) -> Outcome {
        let sent_ms = crate::store::now_ms();
        for since in &batch.pending_since_ms {
            let waited = u64::try_from(sent_ms - since).unwrap_or(0);
            self.metrics
                .observe_report_wait(Duration::from_millis(waited));
        }
        let store = self.store.health();
        let (pending_devices, oldest_pending_age_seconds) = store.outbox();
        let (lost_commits, lost_commits_detail) = store
            .lost_commits()
            .map_or((0, None), |(n, detail)| (n, Some(detail)));
        let (devices, max_devices) = store.devices();
        let body = ReportBatch {
            seq: batch.seq,
            epoch: self.store.epoch().to_owned(),
            agent: AgentHealth {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pending_devices,
                oldest_pending_age_seconds,
                mqtt_connected: self.metrics.mqtt_connected.get() == 1,
                uptime_seconds: now().saturating_duration_since(self.started).as_secs(),
                store_error: store.problem(),
                lost_commits,
                lost_commits_detail,
                devices,
                max_devices,
                device_limit_rejections: self.metrics.rejections("device_limit"),
            },
            reports: batch.reports,
            live: self.settings.live_answers,
        };
        let started = now();
        let outcome = self.post(&body).await;
        self.metrics
            .observe_batch_latency(now().saturating_duration_since(started));
        self.metrics.batches_sent.inc();
        match outcome {
            Ok(resp) => self.apply_results(body.seq, covered, resp).await,
            Err(o) => o,
        }
    }

    async fn post(&self, body: &ReportBatch) -> Result<ReportBatchResponse, Outcome> {
        let json = serde_json::to_vec(body).map_err(|e| Outcome::Refused {
            status: 0,
            body: e.to_string(),
        })?;
        let mut req = self
            .http
            .post(&self.reports_url)
            .bearer_auth(self.cloud.token.expose())
            .header("content-type", "application/json")
            .header("traceparent", traceparent());
        // A small body (a change sent at once on an idle link) costs more to compress than
        // it saves on the wire.
        req = if self.settings.gzip && json.len() > GZIP_MIN_BYTES {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(json.len() / 4),
                flate2::Compression::fast(),
            );
            let _ = enc.write_all(&json);
            let gz = enc.finish().unwrap_or_default();
            req.header("content-encoding", "gzip").body(gz)
        } else {
            req.body(json)
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.cloud_connected.set(0);
                return Err(Outcome::Retry {
                    after: None,
                    reason: format!("request failed: {e}"),
                });
            }
        };
        self.metrics.cloud_connected.set(1);
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await.unwrap_or_default();
        classify(status, retry_after.as_deref(), &bytes)
    }

    async fn apply_results(
        &self,
        seq: u64,
        sent: &[(String, u64)],
        resp: ReportBatchResponse,
    ) -> Outcome {
        let sorted = sort(sent, resp);
        let mut done = Vec::with_capacity(sorted.done.len() + sorted.durable.len());
        if let Some(live) = &sorted.live {
            self.metrics
                .reports_accepted
                .inc_by(live.accepted.len() as u64);
        }
        for r in sorted.done {
            let counter = match r.status {
                ReportStatus::Accepted => &self.metrics.reports_accepted,
                ReportStatus::Stale => &self.metrics.reports_stale,
                ReportStatus::Rejected => {
                    warn!(
                        device = r.device,
                        version = r.version,
                        reason = r.reason.as_deref().unwrap_or(""),
                        "Controller rejected report; dropping it"
                    );
                    &self.metrics.reports_rejected
                }
            };
            counter.inc();
            done.push((r.device, r.version));
        }
        self.metrics
            .durable_acks
            .inc_by(sorted.durable.len() as u64);
        done.extend(sorted.durable.iter().cloned());
        let covered = done.len();
        let acked = Outcome::Acked {
            covered,
            live: sorted.live,
            durable: sorted.durable,
        };
        if seq == PendingBatch::HEALTH_ONLY_SEQ && done.is_empty() {
            return acked;
        }
        // Not awaited (see `queue_ack`): should its commit fail, these reports are simply
        // sent again.
        match self.store.queue_ack(seq, done).await {
            Ok(()) => acked,
            Err(e) => Outcome::Retry {
                after: None,
                reason: format!("cannot record acknowledgement: {e}"),
            },
        }
    }
}

/// A fresh W3C trace context for one batch.
fn traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-01",
        fastrand::u64(1..),
        fastrand::u64(..),
        fastrand::u64(1..)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped() {
        let t = traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}
