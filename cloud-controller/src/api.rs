//! The HTTP API: agent reports and desired-state streams, plus health and metrics.
//!
//! A report batch goes through, in order: node lookup and token check (401), an empty node
//! token bucket (429) and the global budget of bodies in memory (503), both before the body is
//! read; the body within its deadline (408), its size and gzip decoding (413), JSON parsing
//! (400), batch size (413), the node's token bucket for every report (429), then each report is
//! checked on its own (id, version, size, depth, ownership, existence; a bad report is
//! `rejected` with a reason and never stops its neighbours), queued for the status writer,
//! and the batch is answered once every accepted report is durable.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgesync_crds::{Device, DeviceSpec, EdgeNode};
use edgesync_protocol::limits::{self, Limits};
use edgesync_protocol::rate::LogThrottle;
use edgesync_protocol::wire::{
    DesiredEvent, ErrorBody, ReportBatch, ReportBatchResponse, ReportResult, ReportStatus,
};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Map;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::{AuthError, TokenVerifier};
use crate::cache::Caches;
use crate::cli::RunOptions;
use crate::desired::{DesiredHub, Poll};
use crate::heartbeat::Heartbeats;
use crate::lookups::NodeLookups;
use crate::metrics::Metrics;
use crate::ratelimit::NodeLimiter;
use crate::writer::{Outcome, StatusWriter};

/// Everything the handlers share.
pub struct AppState {
    /// Options the controller was started with.
    pub opts: RunOptions,
    /// API client (short timeouts).
    pub client: Client,
    /// Device and EdgeNode caches.
    pub caches: Caches,
    /// Token checks.
    pub verifier: TokenVerifier,
    /// Per-node admission.
    pub limiter: NodeLimiter,
    /// Device status writer.
    pub writer: Arc<StatusWriter>,
    /// Desired-state fan-out.
    pub hub: Arc<DesiredHub>,
    /// EdgeNode heartbeats.
    pub heartbeats: Heartbeats,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Ends desired streams on shutdown.
    pub shutdown: CancellationToken,
    /// Lookups of EdgeNodes missing from the cache.
    pub lookups: NodeLookups,
    /// Bytes of request bodies that may be held at once (`--max-body-bytes-in-flight`).
    pub bodies: Arc<Semaphore>,
    /// Desired-stream tasks, joined at shutdown.
    pub tasks: TaskTracker,
    /// Authentication failures are logged at most once per interval.
    pub auth_log: std::sync::Mutex<LogThrottle>,
}

type Shared = Arc<AppState>;

/// The agent API with `/healthz` and `/readyz`, and `/metrics` when `with_metrics`.
pub fn router(state: Shared, with_metrics: bool) -> Router {
    let api = Router::new()
        .route("/v1/namespaces/{ns}/nodes/{node}/reports", post(reports))
        .route("/v1/namespaces/{ns}/nodes/{node}/desired", get(desired))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let api = if with_metrics {
        api.route("/metrics", get(metrics))
    } else {
        api
    };
    api.with_state(state)
}

/// The operations listener (`--metrics-listen`): `/metrics`, `/healthz` and `/readyz`.
pub fn ops_router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(ErrorBody::new(self.code, self.message)),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

fn rate_limited(ns: &str, node: &str, rate: u32, burst: u32, wait: Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("node {ns}/{node} exceeds its {rate} reports/s (burst {burst}); retry later"),
    )
    .retry_after(wait)
}

/// Reserves room for the request's body in the global budget: its Content-Length, or the
/// largest body allowed when it is not declared. Released when the request is answered.
fn reserve_body(
    s: &AppState,
    headers: &HeaderMap,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let max = s.opts.max_body_bytes.min(s.opts.max_body_bytes_in_flight);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A declared length over the limit is refused by the read itself (413); reserve the cap.
    let bytes = declared.map_or(max, |n| n.min(max)).max(1);
    let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
    Arc::clone(&s.bodies)
        .try_acquire_many_owned(bytes)
        .map_err(|_| {
            s.metrics.shed("body_budget");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the controller holds as many request bodies as --max-body-bytes-in-flight allows; retry later",
            )
            .retry_after(Duration::from_secs(1))
        })
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "kubernetes_unavailable",
        message,
    )
    .retry_after(Duration::from_secs(2))
}

async fn readyz(State(s): State<Shared>) -> Response {
    if s.caches.is_ready() && s.hub.is_synced() {
        "ok\n".into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the Device and EdgeNode caches have not finished their first list",
        )
        .into_response()
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Finds the EdgeNode (cache first; the API on a miss, since a node created a moment ago may
/// not be cached yet) and checks the bearer token.
async fn authenticate(
    s: &AppState,
    ns: &str,
    node: &str,
    headers: &HeaderMap,
) -> Result<Arc<EdgeNode>, ApiError> {
    let unauthorized = |message: String| {
        s.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        // A flood of bad requests costs one log line per interval, with the count held back.
        let allowed = s
            .auth_log
            .lock()
            .map_or(None, |mut t| t.allow(Instant::now()));
        if let Some(repeated) = allowed {
            warn!(namespace = ns, node, reason = %message, repeated, "Refused a request: authentication failed (see edgesync_controller_auth_failures_total)");
        }
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    };
    let unknown = || {
        format!(
            "no EdgeNode {node} in namespace {ns}: create it (with a tokenSecretRef) before its \
             agent connects"
        )
    };
    let edge_node = match s.caches.node(ns, node) {
        Some(n) => n,
        // Not cached: almost always a node that does not exist. The API server is asked only
        // for one created a moment ago, once per name and interval and within a budget.
        None if !s.lookups.may_look_up(ns, node) => {
            s.metrics
                .unknown_node_lookups_skipped
                .fetch_add(1, Ordering::Relaxed);
            return Err(unauthorized(unknown()));
        }
        None => {
            let api: Api<EdgeNode> = Api::namespaced(s.client.clone(), ns);
            match api.get_opt(node).await {
                Ok(Some(n)) => Arc::new(n),
                Ok(None) => {
                    s.lookups.missing(ns, node);
                    return Err(unauthorized(unknown()));
                }
                Err(e) => {
                    return Err(unavailable(format!(
                        "cannot read EdgeNode {ns}/{node}: {e}"
                    )));
                }
            }
        }
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match s.verifier.verify(&edge_node, presented).await {
        Ok(()) => Ok(edge_node),
        Err(AuthError::Unauthorized(m)) => Err(unauthorized(m)),
        Err(AuthError::Unavailable(m)) => Err(unavailable(m)),
    }
}

/// Reads the body (gzip-decoded when so marked) within `deadline`, refusing more than `max`
/// bytes either way.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    max: usize,
    deadline: Duration,
) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is larger than {max} bytes: send fewer reports per batch"),
        )
    };
    let raw = match tokio::time::timeout(deadline, axum::body::to_bytes(body, max)).await {
        Ok(read) => read.map_err(|_| too_large())?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            ));
        }
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(&raw[..])
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("bad gzip body: {e}"),
            )
        })?;
    if out.len() > max {
        return Err(too_large());
    }
    Ok(out)
}

async fn reports(
    State(s): State<Shared>,
    Path((ns, node)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = info_span!("batch", namespace = %ns, node = %node, seq = tracing::field::Empty, reports = tracing::field::Empty, traceparent = tracing::field::Empty);
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        span.record("traceparent", tp);
    }
    let result = handle_reports(&s, &ns, &node, &headers, body)
        .instrument(span)
        .await;
    let response = match result {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    };
    s.metrics.batch(response.status().as_u16());
    response
}

async fn handle_reports(
    s: &AppState,
    ns: &str,
    node: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<ReportBatchResponse, ApiError> {
    let edge_node = authenticate(s, ns, node, headers).await?;
    let limits = edge_node.spec.limits.clone().unwrap_or_default();
    let rate = limits
        .reports_per_second
        .unwrap_or(s.opts.node_reports_per_second);
    let burst = limits.burst.unwrap_or(s.opts.node_burst);
    // Refusals that cost nothing to send come before the body is read: 8 concurrent 14.7 MiB
    // batches used to be read and parsed (295 MB) only to be answered 429.
    if let Err(wait) = s.limiter.precheck((ns, node), rate, burst) {
        s.metrics.node_rate_limited.fetch_add(1, Ordering::Relaxed);
        s.metrics.shed("node_rate");
        return Err(rate_limited(ns, node, rate, burst, wait));
    }
    let _body_budget = reserve_body(s, headers)?;
    let raw = read_body(
        body,
        headers,
        s.opts.max_body_bytes,
        Duration::from_secs(s.opts.http_body_timeout_seconds),
    )
    .await
    .inspect_err(|e| {
        if e.code == "body_timeout" {
            s.metrics.body_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    })?;
    let batch: ReportBatch = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("not a report batch: {e}"),
        )
    })?;
    drop(raw);
    let span = tracing::Span::current();
    span.record("seq", batch.seq);
    span.record("reports", batch.reports.len());

    let max_reports = limits
        .max_reports_per_batch
        .unwrap_or(s.opts.max_reports_per_batch);
    if batch.reports.len() > max_reports as usize {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_reports",
            format!(
                "{} reports in one batch; this node may send at most {max_reports}",
                batch.reports.len()
            ),
        ));
    }
    if let Err(wait) = s
        .limiter
        .admit((ns, node), rate, burst, batch.reports.len() as u32)
    {
        s.metrics.node_rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err(rate_limited(ns, node, rate, burst, wait));
    }
    s.heartbeats.beat(&edge_node, &batch.agent);
    s.metrics
        .reports_received
        .fetch_add(batch.reports.len() as u64, Ordering::Relaxed);

    let doc_limits = Limits {
        max_state_bytes: s.opts.max_reported_bytes,
        max_depth: s.opts.max_depth,
        ..Limits::default()
    };
    // The newest version of each device in this batch; an older duplicate is stale.
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for r in &batch.reports {
        let v = newest.entry(r.device.as_str()).or_default();
        *v = (*v).max(r.version);
    }
    let newest: HashMap<String, u64> = newest.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();

    let mut results: Vec<ReportResult> = Vec::with_capacity(batch.reports.len());
    let mut waits: Vec<(usize, oneshot::Receiver<Outcome>)> = Vec::new();
    let auto_register = edge_node.spec.auto_register_devices;
    for report in batch.reports {
        let result = |status, reason: Option<String>| ReportResult {
            device: report.device.clone(),
            version: report.version,
            status,
            reason,
        };
        if newest
            .get(&report.device)
            .is_some_and(|v| *v > report.version)
        {
            results.push(result(
                ReportStatus::Stale,
                Some("a newer version of this device is in the same batch".into()),
            ));
            continue;
        }
        if report.version == 0 || report.version > i64::MAX as u64 {
            // Checked before auto-registration: a report that can never be written must not
            // create its Device either.
            s.metrics.reject("invalid_version");
            results.push(result(
                ReportStatus::Rejected,
                Some(format!(
                    "invalid_version: {} is outside 1..={} (a Kubernetes int64)",
                    report.version,
                    i64::MAX
                )),
            ));
            continue;
        }
        if let Err(e) = limits::validate_device_id(&report.device) {
            s.metrics.reject("invalid_device_id");
            results.push(result(
                ReportStatus::Rejected,
                Some(format!("invalid_device_id: {e}")),
            ));
            continue;
        }
        let checked = limits::check_state(&report.reported, &doc_limits).and_then(|()| {
            edgesync_protocol::shadow::check_size(&Map::new(), &report.reported, &doc_limits)
        });
        if let Err(e) = checked {
            let code = if e.is_too_large() {
                "too_large"
            } else {
                "invalid_state"
            };
            s.metrics.reject(code);
            results.push(result(ReportStatus::Rejected, Some(format!("{code}: {e}"))));
            continue;
        }
        let device = match find_or_register(s, ns, node, &report.device, auto_register).await {
            Ok(d) => d,
            Err(Refusal::Rejected(code, message)) => {
                s.metrics.reject(code);
                results.push(result(
                    ReportStatus::Rejected,
                    Some(format!("{code}: {message}")),
                ));
                continue;
            }
            Err(Refusal::Unavailable(m)) => return Err(unavailable(m)),
        };
        if device.spec.node_name != node {
            s.metrics.reject("forbidden");
            results.push(result(
                ReportStatus::Rejected,
                Some(format!(
                    "forbidden: device {ns}/{} belongs to node {}, not {node}",
                    report.device, device.spec.node_name
                )),
            ));
            continue;
        }
        let known = device.status.as_ref().and_then(|st| st.reported_version);
        let key = (ns.to_owned(), report.device.clone());
        results.push(result(ReportStatus::Accepted, None));
        waits.push((results.len() - 1, s.writer.submit(key, node, report, known)));
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(s.opts.durable_wait_seconds);
    let mut unavailable_reason = None;
    let mut timed_out = false;
    for (i, rx) in waits {
        let outcome = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::Unavailable("the status writer stopped".into()),
            Err(_) => {
                timed_out = true;
                continue;
            }
        };
        let r = &mut results[i];
        match outcome {
            Outcome::Durable(v) if v == r.version => {}
            Outcome::Durable(_) => {
                r.status = ReportStatus::Stale;
                r.reason = Some("a newer version is already durable".into());
            }
            Outcome::Rejected(code, message) => {
                s.metrics.reject(code);
                r.status = ReportStatus::Rejected;
                r.reason = Some(format!("{code}: {message}"));
            }
            Outcome::Unavailable(m) => unavailable_reason = Some(m),
        }
    }
    if let Some(m) = unavailable_reason {
        return Err(unavailable(format!("cannot write device status: {m}")));
    }
    if timed_out {
        s.metrics
            .write_backlog_refusals
            .fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "write_backlog",
            "the Kubernetes write budget is saturated; the reports are queued and will be \
             written, retry the batch later",
        )
        .retry_after(Duration::from_secs(2)));
    }
    for r in &results {
        match r.status {
            ReportStatus::Accepted => s.metrics.reports_accepted.fetch_add(1, Ordering::Relaxed),
            ReportStatus::Stale => s.metrics.reports_stale.fetch_add(1, Ordering::Relaxed),
            ReportStatus::Rejected => 0,
        };
    }
    debug!(results = results.len(), "Batch durable");
    Ok(ReportBatchResponse {
        seq: batch.seq,
        results,
    })
}

enum Refusal {
    Rejected(&'static str, String),
    Unavailable(String),
}

/// The Device for a report: cached, read from the API (created a moment ago), or created when
/// the node may auto-register devices.
async fn find_or_register(
    s: &AppState,
    ns: &str,
    node: &str,
    name: &str,
    auto_register: bool,
) -> Result<Arc<Device>, Refusal> {
    if let Some(d) = s.caches.device(ns, name) {
        return Ok(d);
    }
    let api: Api<Device> = Api::namespaced(s.client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(d)) => return Ok(Arc::new(d)),
        Ok(None) => {}
        Err(e) => return Err(Refusal::Unavailable(e.to_string())),
    }
    if !auto_register {
        return Err(Refusal::Rejected(
            "unknown_device",
            format!(
                "no Device {name} in namespace {ns}; create it with spec.nodeName: {node}, or set \
                 autoRegisterDevices on the EdgeNode"
            ),
        ));
    }
    let device = Device {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some([("edgesync.io/node".to_owned(), node.to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: DeviceSpec {
            node_name: node.to_owned(),
            desired: None,
            reporting: None,
        },
        status: None,
    };
    match api.create(&PostParams::default(), &device).await {
        Ok(d) => {
            s.metrics.devices_registered.fetch_add(1, Ordering::Relaxed);
            info!(
                namespace = ns,
                node,
                device = name,
                "Registered a new device"
            );
            Ok(Arc::new(d))
        }
        // Created meanwhile by another batch or replica.
        Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(name).await {
            Ok(Some(d)) => Ok(Arc::new(d)),
            Ok(None) => Err(Refusal::Unavailable(format!(
                "device {name} vanished while registering"
            ))),
            Err(e) => Err(Refusal::Unavailable(e.to_string())),
        },
        Err(kube::Error::Api(e)) if e.code == 422 => {
            Err(Refusal::Rejected("invalid_device_id", e.message))
        }
        Err(e) => Err(Refusal::Unavailable(e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct DesiredQuery {
    since: Option<String>,
}

async fn desired(
    State(s): State<Shared>,
    Path((ns, node)): Path<(String, String)>,
    Query(q): Query<DesiredQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authenticate(&s, &ns, &node, &headers).await {
        return e.into_response();
    }
    // A snapshot from a half-filled cache would look like a node with fewer devices.
    let ready_by = Instant::now() + Duration::from_secs(10);
    while !s.hub.is_synced() {
        if Instant::now() > ready_by {
            return unavailable("the Device cache is not ready yet").into_response();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sub = s.hub.subscribe(&ns, &node, q.since.as_deref());
    info!(namespace = %ns, node = %node, resumed = q.since.is_some(), initial = sub.initial.len(), "Desired-state stream opened");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let state = Arc::clone(&s);
    s.tasks.spawn(async move {
        state
            .metrics
            .desired_streams
            .fetch_add(1, Ordering::Relaxed);
        stream_desired(&state, &ns, &node, sub, tx).await;
        state
            .metrics
            .desired_streams
            .fetch_sub(1, Ordering::Relaxed);
        debug!(namespace = %ns, node = %node, "Desired-state stream closed");
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn stream_desired(
    s: &AppState,
    ns: &str,
    node: &str,
    sub: crate::desired::Subscription,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let send = |e: &DesiredEvent| {
        let mut line = serde_json::to_vec(e).unwrap_or_default();
        line.push(b'\n');
        s.metrics.desired_events.fetch_add(1, Ordering::Relaxed);
        tx.send(Bytes::from(line))
    };
    for e in &sub.initial {
        if send(e).await.is_err() {
            return;
        }
    }
    let mut position = sub.position;
    let mut changes = sub.changes;
    let bookmark_every = Duration::from_secs(s.opts.bookmark_seconds);
    // An interval, not a sleep per wake-up: changes elsewhere in the hub wake this loop and
    // must not postpone the bookmarks the agent relies on to see that the stream is alive.
    let mut bookmarks =
        tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
    loop {
        tokio::select! {
            _ = s.shutdown.cancelled() => return,
            _ = tx.closed() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                match s.hub.poll(ns, node, position) {
                    Poll::Events(events, now) => {
                        position = now;
                        for e in &events {
                            if send(e).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Ending the stream makes the agent resubscribe from its last cursor,
                    // which is then too old and gets a snapshot.
                    Poll::Lagged => return,
                }
            }
            _ = bookmarks.tick() => {
                if send(&s.hub.bookmark(position)).await.is_err() {
                    return;
                }
            }
        }
    }
}
