//! `POST .../reports`: a batch from an agent, checked report by report and answered once
//! every accepted report is durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use edgesync_crds::{Device, DeviceSpec};
use edgesync_protocol::limits::{self, Limits};
use edgesync_protocol::wire::{
    Report, ReportBatch, ReportBatchResponse, ReportResult, ReportStatus,
};
use futures_util::StreamExt as _;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use serde_json::Map;
use tokio::sync::oneshot;
use tracing::{Instrument, debug, info, info_span};

use super::body::{read_body, reserve_body};
use super::{ApiError, AppState, Shared, authenticate, unavailable};
use crate::epoch::EpochError;
use crate::stamp::{CONFLICT, Stamp, Stamped, Verdict, conflict_message, judge};
use crate::writer::Outcome;

/// Unknown devices of one batch looked up or registered at once.
const REGISTER_CONCURRENCY: usize = 16;

fn rate_limited(ns: &str, node: &str, rate: u32, burst: u32, wait: Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("node {ns}/{node} exceeds its {rate} reports/s (burst {burst}); retry later"),
    )
    .retry_after(wait)
}

pub(super) async fn reports(
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
    let _body_budget = reserve_body(s, ns, node, headers)?;
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
    if let Err(e) = edgesync_protocol::wire::check_epoch(&batch.epoch) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("invalid epoch: {e}"),
        ));
    }
    // Before the heartbeat: a superseded agent must not overwrite the current one's health.
    let generation = match s.epochs.generation(&edge_node, &batch.epoch).await {
        Ok(g) => g,
        Err(EpochError::Superseded(m)) => {
            return Err(ApiError::new(StatusCode::CONFLICT, "epoch_superseded", m));
        }
        Err(EpochError::Unavailable(m)) => return Err(unavailable(m)),
        Err(EpochError::TooSoon(wait)) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "epoch_switch_too_soon",
                format!(
                    "node {ns}/{node} switched to a new agent epoch less than {} s ago; \
                     retry later (two agents with one node's token alternate epochs: stop one)",
                    s.opts.agent_epoch_switch_seconds
                ),
            )
            .retry_after(wait));
        }
    };
    let epoch: Arc<str> = batch.epoch.as_str().into();
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
    // Reports that passed the checks needing no lookup, with their place in `results`.
    let mut checked = Vec::with_capacity(batch.reports.len());
    let auto_register = edge_node.spec.auto_register_devices;
    for report in batch.reports {
        let result = |status, reason| result_for(&report, status, reason);
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
        let state_ok = limits::check_state(&report.reported, &doc_limits).and_then(|()| {
            edgesync_protocol::shadow::check_size(&Map::new(), &report.reported, &doc_limits)
        });
        if let Err(e) = state_ok {
            let code = if e.is_too_large() {
                "too_large"
            } else {
                "invalid_state"
            };
            s.metrics.reject(code);
            results.push(result(ReportStatus::Rejected, Some(format!("{code}: {e}"))));
            continue;
        }
        // Settled below.
        results.push(result(ReportStatus::Accepted, None));
        checked.push((results.len() - 1, report));
    }

    // Devices not yet known register concurrently: each costs the API server a create, and
    // one after another they held a first batch of a thousand new devices for many seconds.
    let found: Vec<_> = futures_util::stream::iter(checked)
        .map(|(i, report)| async move {
            let device = find_or_register(s, ns, node, &report.device, auto_register).await;
            (i, report, device)
        })
        .buffered(REGISTER_CONCURRENCY)
        .collect()
        .await;
    for (i, report, device) in found {
        let result = |status, reason| result_for(&report, status, reason);
        let device = match device {
            Ok(d) => d,
            Err(Refusal::Rejected(code, message)) => {
                s.metrics.reject(code);
                results[i] = result(ReportStatus::Rejected, Some(format!("{code}: {message}")));
                continue;
            }
            Err(Refusal::Unavailable(m)) => return Err(unavailable(m)),
        };
        if device.spec.node_name != node {
            s.metrics.reject("forbidden");
            s.events.emit(
                device.as_ref(),
                kube::runtime::events::EventType::Warning,
                "ReportRejected",
                format!(
                    "Edge node {node} reported this device, which belongs to node {}; its report was rejected",
                    device.spec.node_name
                ),
            );
            results[i] = result(
                ReportStatus::Rejected,
                Some(format!(
                    "forbidden: device {ns}/{} belongs to node {}, not {node}",
                    report.device, device.spec.node_name
                )),
            );
            continue;
        }
        let stamp = Stamp::new(generation, report.version);
        // What the cache holds settles retries and stale reports without a write; a stamp's
        // state never changes once written, so a lagging cache cannot mislead these.
        match judge(device.status.as_ref(), stamp, &report.reported) {
            Verdict::Newer => {}
            Verdict::Same => {
                results[i] = result(ReportStatus::Accepted, None);
                continue;
            }
            Verdict::Older(_) => {
                results[i] = result(
                    ReportStatus::Stale,
                    Some("a newer report is already durable".into()),
                );
                continue;
            }
            Verdict::Conflict => {
                s.metrics.reject(CONFLICT);
                let why = conflict_message(ns, &report.device, report.version, &epoch);
                results[i] = result(ReportStatus::Rejected, Some(format!("{CONFLICT}: {why}")));
                continue;
            }
        }
        let known = Stamp::of_status(device.status.as_ref());
        let key = (ns.to_owned(), report.device.clone());
        let stamped = Stamped {
            report,
            epoch: Arc::clone(&epoch),
            stamp,
        };
        waits.push((i, s.writer.submit(key, node, stamped, Some(known))));
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
            Outcome::Durable(d) if d == Stamp::new(generation, r.version) => {}
            Outcome::Durable(_) => {
                r.status = ReportStatus::Stale;
                r.reason = Some("a newer report is already durable".into());
            }
            // The agent keeps the newer report until that one's batch is answered.
            Outcome::Superseded(newer) => {
                s.metrics.reports_superseded.fetch_add(1, Ordering::Relaxed);
                r.status = ReportStatus::Stale;
                r.reason = Some(format!(
                    "superseded by version {} of the same device, queued for writing",
                    newer.version
                ));
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
    let rejected: Vec<&ReportResult> = results
        .iter()
        .filter(|r| r.status == ReportStatus::Rejected)
        .collect();
    if let Some(first) = rejected.first() {
        // One event on the EdgeNode per batch at most (paced per node): the agent drops
        // rejected reports, so the operator sees it here or not at all.
        s.events.emit(
            edge_node.as_ref(),
            kube::runtime::events::EventType::Warning,
            "ReportsRejected",
            format!(
                "{} report(s) of a batch rejected, first: device {}: {}",
                rejected.len(),
                first.device,
                first.reason.as_deref().unwrap_or_default()
            ),
        );
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

/// The answer for one report.
fn result_for(report: &Report, status: ReportStatus, reason: Option<String>) -> ReportResult {
    ReportResult {
        device: report.device.clone(),
        version: report.version,
        status,
        reason,
    }
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
    // Not in the cache: new, or created a moment ago. A node that registers its devices
    // creates at once (a conflict then reads it), which spares a new device a read.
    if !auto_register {
        return match api.get_opt(name).await {
            Ok(Some(d)) => Ok(Arc::new(d)),
            Ok(None) => Err(Refusal::Rejected(
                "unknown_device",
                format!(
                    "no Device {name} in namespace {ns}; create it with spec.nodeName: {node}, or set \
                 autoRegisterDevices on the EdgeNode"
                ),
            )),
            Err(e) => Err(Refusal::Unavailable(e.to_string())),
        };
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
            s.events.transition(
                &d,
                kube::runtime::events::EventType::Normal,
                "Registered",
                format!("Created for edge node {node}, which reported it (autoRegisterDevices)"),
            );
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
