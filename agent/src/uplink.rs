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

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use edgesync_protocol::wire::{self, AgentHealth, ReportBatch, ReportBatchResponse, ReportStatus};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::full_jitter;
use crate::config::{CloudSettings, UplinkSettings};
use crate::metrics::Metrics;
use crate::store::{InFlight, PendingBatch, Store};
use edgesync_protocol::rate::TokenBucket;

/// Bodies up to this size are sent uncompressed.
const GZIP_MIN_BYTES: usize = 1024;

/// What became of one batch.
#[derive(Debug)]
enum Outcome {
    /// 2xx: these (device, version) pairs are done.
    Acked { covered: usize },
    /// Transport error, timeout, 408, 429 or 5xx: try again later.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// 413: the batch was too large; send smaller ones.
    TooLarge,
    /// 401/403, 409 (a superseded epoch), other 4xx: a person must fix something; retry
    /// slowly.
    Refused { status: u16, body: String },
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
            started: Instant::now(),
        })
    }

    /// Runs until `shutdown`, then makes one bounded attempt to deliver what is pending.
    pub async fn run(self, shutdown: CancellationToken, shutdown_timeout: Duration) {
        let this = Arc::new(self);
        let mut backoff = this.backoff();
        let mut not_before = Instant::now();
        let mut batch_max = this.settings.batch_max_reports;
        let mut in_flight: JoinSet<(Vec<(String, u64)>, Outcome)> = JoinSet::new();
        // The newest version of each device that a batch in flight carries.
        // Shared with the store's batch read, which drops its reference before answering: the
        // updates below then change the map in place instead of copying it.
        let mut in_flight_devices: Arc<InFlight> = Arc::default();
        let mut last_sent: HashMap<String, Instant> = HashMap::new();
        let mut last_activity = Instant::now() - this.settings.heartbeat;
        let now = Instant::now();
        let mut reports_bucket = this
            .settings
            .reports_per_second
            .map(|r| TokenBucket::new(f64::from(r), f64::from(r), now));
        let mut bytes_bucket = this
            .settings
            .bytes_per_second
            .map(|b| TokenBucket::new(b as f64, b as f64, now));

        loop {
            // Fill the in-flight window with fresh batches.
            while !shutdown.is_cancelled()
                && in_flight.len() < this.settings.max_in_flight
                && Instant::now() >= not_before
            {
                let mut skip = Arc::clone(&in_flight_devices);
                let min = this.settings.device_min_interval;
                if !min.is_zero() {
                    last_sent.retain(|_, t| t.elapsed() < min);
                    Arc::make_mut(&mut skip)
                        .extend(last_sent.keys().map(|d| (d.clone(), u64::MAX)));
                }
                let batch = match this
                    .store
                    .next_batch(batch_max, this.settings.batch_max_bytes, skip)
                    .await
                {
                    Ok(Some(b)) => b,
                    Ok(None)
                        if heartbeat_due(last_activity, this.settings.heartbeat, &in_flight) =>
                    {
                        match this.store.heartbeat_seq().await {
                            Ok(seq) => PendingBatch {
                                seq,
                                reports: Vec::new(),
                            },
                            Err(e) => {
                                warn!(error = %e, "Cannot allocate a heartbeat seq; sending a health-only heartbeat");
                                PendingBatch::health_only()
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) if heartbeat_due(last_activity, this.settings.heartbeat, &in_flight) => {
                        // The store cannot commit (a seq is allocated with a write): the
                        // heartbeat still goes out, so the EdgeNode shows why.
                        warn!(error = %e, "Cannot read the outbox; sending a health-only heartbeat");
                        PendingBatch::health_only()
                    }
                    Err(e) => {
                        error!(error = %e, "Cannot read the outbox");
                        break;
                    }
                };
                let bytes = if bytes_bucket.is_some() {
                    serde_json::to_vec(&batch.reports).map_or(0, |v| v.len())
                } else {
                    0
                };
                let mut wait = Duration::ZERO;
                let now = Instant::now();
                if let Some(b) = reports_bucket.as_mut() {
                    wait = wait.max(b.take(batch.reports.len() as f64, now));
                }
                if let Some(b) = bytes_bucket.as_mut() {
                    wait = wait.max(b.take(bytes as f64, now));
                }
                if !wait.is_zero() {
                    this.metrics
                        .rate_limited_micros
                        .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
                    debug!(wait_ms = wait.as_millis() as u64, "Rate limited");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                let covered = batch.covered();
                let in_flight_now = Arc::make_mut(&mut in_flight_devices);
                for (d, v) in &covered {
                    let newest = in_flight_now.entry(d.clone()).or_default();
                    *newest = (*newest).max(*v);
                    if !min.is_zero() {
                        last_sent.insert(d.clone(), Instant::now());
                    }
                }
                last_activity = Instant::now();
                let me = this.clone();
                let span = info_span!("batch", seq = batch.seq, reports = batch.reports.len());
                in_flight.spawn(async move { me.send(batch, covered).await }.instrument(span));
            }

            // A signal seen in the fill loop (waiting on the rate limit or the store) ends the
            // loop here: below, nothing but a heartbeat or retry timer would wake it.
            if shutdown.is_cancelled() {
                break;
            }
            let window = this.settings.batch_window;
            let idle = in_flight.is_empty();
            let heartbeat_in = this
                .settings
                .heartbeat
                .saturating_sub(last_activity.elapsed());
            let retry_in = not_before.saturating_duration_since(Instant::now());
            let interval_tick = if this.settings.device_min_interval.is_zero() {
                Duration::MAX
            } else {
                this.settings.device_min_interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                done = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Some(Ok((covered, outcome))) = done {
                        let in_flight_now = Arc::make_mut(&mut in_flight_devices);
                        for (d, v) in &covered {
                            // A newer batch may carry the device too.
                            if in_flight_now.get(d) == Some(v) {
                                in_flight_now.remove(d);
                            }
                        }
                        match outcome {
                            Outcome::Acked { covered } => {
                                debug!(covered, "Batch acknowledged");
                                backoff = this.backoff();
                                not_before = Instant::now();
                                batch_max = (batch_max * 2).min(this.settings.batch_max_reports);
                            }
                            Outcome::Retry { after, reason } => {
                                let delay = after.unwrap_or_else(|| full_jitter(backoff.next().unwrap_or(this.settings.retry_max)));
                                warn!(reason, retry_in_ms = delay.as_millis() as u64, "Uplink failed, retrying");
                                this.metrics.batches_retried.fetch_add(1, Ordering::Relaxed);
                                not_before = Instant::now() + delay;
                            }
                            Outcome::TooLarge => {
                                batch_max = (batch_max / 2).max(1);
                                warn!(batch_max, "Controller said the batch was too large; sending smaller batches");
                                this.metrics.batches_retried.fetch_add(1, Ordering::Relaxed);
                            }
                            Outcome::Refused { status, body } => {
                                let delay = full_jitter(this.settings.retry_max);
                                let hint = match status {
                                    401 | 403 => "check cloud.url, cloud.token_file and the EdgeNode's tokenSecretRef",
                                    409 => "another agent database reports for this node now (the message says what to do); nothing pending here is dropped",
                                    _ => "the message says why",
                                };
                                error!(status, body, hint, retry_in_ms = delay.as_millis() as u64, "Controller refused the batch");
                                this.metrics.batches_retried.fetch_add(1, Ordering::Relaxed);
                                not_before = Instant::now() + delay;
                            }
                        }
                    }
                    this.refresh_gauges();
                }
                // An idle link sends a change at once (after `linger`, 0 by default). While a
                // batch is in flight, changes gather (as in group commit) until it is
                // answered, which fills the next batch, or until the window has passed,
                // which sends them alongside.
                _ = async {
                    this.notify.notified().await;
                    tokio::time::sleep(if idle { this.settings.linger } else { window }).await;
                }, if in_flight.len() < this.settings.max_in_flight => {}
                _ = tokio::time::sleep(heartbeat_in.max(Duration::from_millis(10))) => {}
                _ = tokio::time::sleep(retry_in), if !retry_in.is_zero() => {}
                _ = tokio::time::sleep(interval_tick) => {}
            }
            if shutdown.is_cancelled() {
                break;
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
                let _ = this.send(batch, covered).await;
            }
        };
        tokio::select! {
            _ = &mut deadline => info!("Shutdown deadline reached; pending reports stay in the outbox"),
            _ = final_attempt => {}
        }
        this.refresh_gauges();
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_initial)
            .with_max_delay(self.settings.retry_max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    fn refresh_gauges(&self) {
        let (pending, oldest_age) = self.store.health().outbox();
        self.metrics
            .outbox_pending
            .store(pending, Ordering::Relaxed);
        self.metrics
            .outbox_oldest_age_seconds
            .store(oldest_age, Ordering::Relaxed);
    }

    async fn send(
        &self,
        batch: PendingBatch,
        covered: Vec<(String, u64)>,
    ) -> (Vec<(String, u64)>, Outcome) {
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
                mqtt_connected: self.metrics.mqtt_connected.load(Ordering::Relaxed),
                uptime_seconds: self.started.elapsed().as_secs(),
                store_error: store.problem(),
                lost_commits,
                lost_commits_detail,
                devices,
                max_devices,
                device_limit_rejections: self.metrics.rejections("device_limit"),
            },
            reports: batch.reports,
        };
        let started = Instant::now();
        let outcome = self.post(&body).await;
        self.metrics.batch_latency.observe(started.elapsed());
        self.metrics.batches_sent.fetch_add(1, Ordering::Relaxed);
        let outcome = match outcome {
            Ok(resp) => self.apply_results(body.seq, &covered, resp).await,
            Err(o) => o,
        };
        (covered, outcome)
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
                self.metrics.cloud_connected.store(false, Ordering::Relaxed);
                return Err(Outcome::Retry {
                    after: None,
                    reason: format!("request failed: {e}"),
                });
            }
        };
        self.metrics.cloud_connected.store(true, Ordering::Relaxed);
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.unwrap_or_default();
        match status {
            200..=299 => serde_json::from_slice(&bytes).map_err(|e| Outcome::Retry {
                after: None,
                reason: format!("unreadable 2xx answer: {e}"),
            }),
            408 | 429 | 500..=599 => Err(Outcome::Retry {
                after: retry_after,
                reason: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                ),
            }),
            413 => Err(Outcome::TooLarge),
            _ => Err(Outcome::Refused {
                status,
                body: String::from_utf8_lossy(&bytes[..bytes.len().min(1024)]).into_owned(),
            }),
        }
    }

    async fn apply_results(
        &self,
        seq: u64,
        sent: &[(String, u64)],
        resp: ReportBatchResponse,
    ) -> Outcome {
        let sent: HashMap<&str, u64> = sent.iter().map(|(d, v)| (d.as_str(), *v)).collect();
        let mut done = Vec::with_capacity(resp.results.len());
        for r in resp.results {
            // Only results for what we sent count, and never for a newer version than sent.
            let Some(&v) = sent.get(r.device.as_str()) else {
                continue;
            };
            let version = r.version.min(v);
            match r.status {
                ReportStatus::Accepted => self
                    .metrics
                    .reports_accepted
                    .fetch_add(1, Ordering::Relaxed),
                ReportStatus::Stale => self.metrics.reports_stale.fetch_add(1, Ordering::Relaxed),
                ReportStatus::Rejected => {
                    warn!(
                        device = r.device,
                        version,
                        reason = r.reason.as_deref().unwrap_or(""),
                        "Controller rejected report; dropping it"
                    );
                    self.metrics
                        .reports_rejected
                        .fetch_add(1, Ordering::Relaxed)
                }
            };
            done.push((r.device, version));
        }
        let covered = done.len();
        if seq == PendingBatch::HEALTH_ONLY_SEQ && done.is_empty() {
            return Outcome::Acked { covered };
        }
        // Not awaited (see `queue_ack`): should its commit fail, these reports are simply
        // sent again.
        match self.store.queue_ack(seq, done).await {
            Ok(()) => Outcome::Acked { covered },
            Err(e) => Outcome::Retry {
                after: None,
                reason: format!("cannot record acknowledgement: {e}"),
            },
        }
    }
}

/// Whether a heartbeat is due: nothing sent for a heartbeat interval and nothing in flight.
fn heartbeat_due<T: 'static>(
    last_activity: Instant,
    interval: Duration,
    in_flight: &JoinSet<T>,
) -> bool {
    last_activity.elapsed() >= interval && in_flight.is_empty()
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

    #[test]
    fn backoff_schedule_is_capped() {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times()
            .build();
        let delays: Vec<Duration> = (0..6).map(|_| b.next().unwrap()).collect();
        let near =
            |d: Duration, ms: u64| d.abs_diff(Duration::from_millis(ms)) < Duration::from_millis(1);
        assert!(near(delays[0], 100) && near(delays[1], 200), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
    }
}
