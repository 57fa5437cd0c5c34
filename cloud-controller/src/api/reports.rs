//! `POST .../reports`: a batch from an agent, checked report by report and answered once
//! every accepted report is durable, or, for an agent that takes live answers, once they are
//! applied to the live state, with the durable versions owed to its node.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use edgesync_crds::EdgeNode;
use edgesync_crds::{Device, DeviceSpec};
use edgesync_protocol::limits::Limits;
use edgesync_protocol::wire::{
    Durable, Report, ReportBatch, ReportBatchResponse, ReportResult, ReportStatus,
};
use futures_util::StreamExt as _;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::oneshot;
use tracing::{Instrument, debug, info, info_span};

use super::body::{read_body, reserve_body};
use super::checks;
use super::{ApiError, AppState, Shared, authenticate, unavailable};
use crate::durable::DurableAcks;
use crate::epoch::EpochError;
use crate::stamp::{Stamp, Stamped};
use crate::writer::Outcome;

/// Durable acknowledgements one answer carries at most (about 60 bytes each); the rest
/// follow in the next answers.
const MAX_DURABLE_PER_ANSWER: usize = 10_000;

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
        s.metrics.node_rate_limited.inc();
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
            s.metrics.body_timeouts.inc();
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
        s.metrics.node_rate_limited.inc();
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
        .inc_by(batch.reports.len() as u64);

    let doc_limits = Limits {
        max_state_bytes: s.opts.max_reported_bytes,
        max_depth: s.opts.max_depth,
        ..Limits::default()
    };
    // A live agent is answered once its reports are in the live state (see `durable`).
    let live = batch.live.then(|| s.incarnation.clone());
    let mut durable_now = Vec::new();
    let newest = checks::newest_versions(&batch.reports);
    let received_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut results: Vec<ReportResult> = Vec::with_capacity(batch.reports.len());
    let mut waits: Vec<(usize, Stamp, u64, oneshot::Receiver<Outcome>)> = Vec::new();
    // Reports that passed the checks needing no lookup, with their place in `results`.
    let mut checked = Vec::with_capacity(batch.reports.len());
    let auto_register = edge_node.spec.auto_register_devices;
    for report in batch.reports {
        let mut result = result_for(&report, ReportStatus::Accepted, None);
        match checks::precheck(&report, &newest, &doc_limits) {
            Some(settled) => settle(s, &mut result, settled),
            // Settled below.
            None => checked.push((results.len(), report)),
        }
        results.push(result);
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
        let stamp = Stamp::new(generation, report.version);
        let owner = (device.spec.node_name.as_str(), device.status.as_ref());
        if let Some(settled) = checks::against_device(&report, stamp, &epoch, (ns, node), owner) {
            if settled.code == Some("forbidden") {
                s.events.emit(
                    device.as_ref(),
                    kube::runtime::events::EventType::Warning,
                    "ReportRejected",
                    format!(
                        "Edge node {node} reported this device, which belongs to node {}; its report was rejected",
                        device.spec.node_name
                    ),
                );
            }
            // Already durable (a resend): a live agent is told so in this very answer.
            if live.is_some() && settled.status == ReportStatus::Accepted {
                durable_now.push(Durable {
                    device: report.device.clone(),
                    version: report.version,
                });
            }
            settle(s, &mut results[i], settled);
            continue;
        }
        if let Some(note) = checks::refusal_news(&report, &device) {
            s.events.emit(
                device.as_ref(),
                kube::runtime::events::EventType::Warning,
                "DesiredRefused",
                note,
            );
        }
        let known = Stamp::of_status(device.status.as_ref());
        let key = (ns.to_owned(), report.device.clone());
        let stamped = Stamped::new(&report, Arc::clone(&epoch), stamp);
        if let Some(live) = &s.live {
            live.apply_report(&device, &report.reported, &stamped, received_at_ms);
        }
        let version = stamped.version;
        let rx = s.writer.submit(key, node, stamped, Some(known));
        waits.push((i, stamp, version, rx));
    }

    if let Some(live) = live {
        // Answered now: the writes go on, and each durable one is owed to the node.
        if !waits.is_empty() {
            let owed = waits
                .into_iter()
                .map(|(i, _, version, rx)| (results[i].device.clone(), version, rx))
                .collect();
            s.tasks.spawn(owe_when_durable(
                Arc::clone(&s.durable),
                (ns.to_owned(), node.to_owned()),
                Arc::clone(&epoch),
                owed,
                Arc::clone(&s.metrics),
            ));
        }
        let mut durable = durable_now;
        durable.extend(s.durable.take((ns, node), &epoch, MAX_DURABLE_PER_ANSWER));
        s.metrics.durable_acks_told.inc_by(durable.len() as u64);
        count_results(s, &edge_node, &results);
        debug!(
            results = results.len(),
            durable = durable.len(),
            "Batch live"
        );
        return Ok(ReportBatchResponse {
            seq: batch.seq,
            results,
            live: Some(live),
            durable,
        });
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(s.opts.durable_wait_seconds);
    let mut unavailable_reason = None;
    let mut timed_out = false;
    for (i, stamp, _, rx) in waits {
        let outcome = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::Unavailable("the status writer stopped".into()),
            Err(_) => {
                timed_out = true;
                continue;
            }
        };
        if matches!(outcome, Outcome::Superseded(_)) {
            s.metrics.reports_superseded.inc();
        }
        match checks::written(stamp, outcome) {
            Ok(None) => {}
            Ok(Some(settled)) => settle(s, &mut results[i], settled),
            Err(m) => unavailable_reason = Some(m),
        }
    }
    if let Some(m) = unavailable_reason {
        return Err(unavailable(format!("cannot write device status: {m}")));
    }
    if timed_out {
        s.metrics.write_backlog_refusals.inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "write_backlog",
            "the Kubernetes write budget is saturated; the reports are queued and will be \
             written, retry the batch later",
        )
        .retry_after(Duration::from_secs(2)));
    }
    count_results(s, &edge_node, &results);
    debug!(results = results.len(), "Batch durable");
    Ok(ReportBatchResponse {
        seq: batch.seq,
        results,
        live: None,
        durable: Vec::new(),
    })
}

/// Counts a batch's results, and raises one event on the EdgeNode when some were rejected.
fn count_results(s: &AppState, edge_node: &EdgeNode, results: &[ReportResult]) {
    let rejected: Vec<&ReportResult> = results
        .iter()
        .filter(|r| r.status == ReportStatus::Rejected)
        .collect();
    if let Some(first) = rejected.first() {
        // One event on the EdgeNode per batch at most (paced per node): the agent drops
        // rejected reports, so the operator sees it here or not at all.
        s.events.emit(
            edge_node,
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
    for r in results {
        match r.status {
            ReportStatus::Accepted => s.metrics.reports_accepted.inc(),
            ReportStatus::Stale => s.metrics.reports_stale.inc(),
            ReportStatus::Rejected => 0,
        };
    }
}

/// Waits for the writes of a live batch's reports and owes each durable one to the node.
/// A write that fails is owed nothing: the agent, never told, sends the report again.
async fn owe_when_durable(
    acks: Arc<DurableAcks>,
    (ns, node): (String, String),
    epoch: Arc<str>,
    owed: Vec<(String, u64, oneshot::Receiver<Outcome>)>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    for (device, version, rx) in owed {
        match rx.await {
            Ok(Outcome::Durable(_)) => {
                if !acks.record((&ns, &node), &epoch, &device, version) {
                    metrics.durable_acks_dropped.inc();
                }
            }
            Ok(Outcome::Superseded(_)) => {
                metrics.reports_superseded.inc();
            }
            // The writer stopped, the API server failed or refused: the agent resends.
            Ok(Outcome::Rejected(..) | Outcome::Unavailable(_)) | Err(_) => {}
        }
    }
}

/// Puts a settled report into its answer, counting a rejection under its reason.
fn settle(s: &AppState, result: &mut ReportResult, settled: checks::Settled) {
    if let Some(code) = settled.code {
        s.metrics.reject(code);
    }
    result.status = settled.status;
    result.reason = (!settled.reason.is_empty()).then_some(settled.reason);
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
            labels: Some({
                let mut labels = std::collections::BTreeMap::from([(
                    "edgesync.io/node".to_owned(),
                    node.to_owned(),
                )]);
                // With shards, born in its node's shard: the owner's cache sees it at once.
                if let Some(sh) = &s.sharding {
                    labels.extend(crate::shard::labels::wanted(ns, node, sh.shards.count()));
                }
                labels
            }),
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
            s.metrics.devices_registered.inc();
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
