//! A small server speaking the controller's HTTP contract (DESIGN.md: reports and desired
//! stream), for testing the agent's uplink and downlink before and apart from the real
//! controller. It checks the bearer token, decodes gzip, never regresses a device's version,
//! and can be told to fail (503) or rate-limit (429 with Retry-After).

use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgesync_protocol::wire::{
    DesiredEvent, ErrorBody, ReportBatch, ReportBatchResponse, ReportResult, ReportStatus,
};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// How the server answers report batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Accept (or mark stale) every report.
    Accept,
    /// 503 for every batch.
    Unavailable,
    /// 429 with `Retry-After: secs`.
    RateLimited(u64),
}

/// What the server has seen.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Latest accepted (version, reported state) per device.
    pub latest: HashMap<String, (u64, Map<String, Value>)>,
    /// Latest observed desired generation per device.
    pub observed_generation: HashMap<String, i64>,
    /// The refusal the latest accepted report of each device carried (`None`: none).
    pub rejection: HashMap<String, Option<edgesync_protocol::rejection::Rejection>>,
    /// Batches answered 2xx.
    pub batches: u64,
    /// Requests refused (401, 503, 429).
    pub refused: u64,
    /// Reports received in 2xx batches.
    pub reports: u64,
    /// Every seq received, in order.
    pub seqs: Vec<u64>,
    /// Largest batch seen.
    pub max_batch: usize,
    /// Version regressions attempted by the agent (a report older than one already accepted).
    pub stale: u64,
}

struct Inner {
    token: String,
    mode: Mode,
    seen: Seen,
    desired: HashMap<String, (i64, Map<String, Value>)>,
    revision: u64,
}

type Shared = Arc<(Mutex<Inner>, broadcast::Sender<DesiredEvent>)>;

/// A running contract server.
pub struct ContractServer {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ContractServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContractServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ContractServer {
    /// Starts on a free loopback port, accepting `token`.
    pub async fn start(token: &str) -> ContractServer {
        let (tx, _) = broadcast::channel(1024);
        let shared: Shared = Arc::new((
            Mutex::new(Inner {
                token: token.to_owned(),
                mode: Mode::Accept,
                seen: Seen::default(),
                desired: HashMap::new(),
                revision: 0,
            }),
            tx,
        ));
        let app = Router::new()
            .route("/v1/namespaces/{ns}/nodes/{node}/reports", post(reports))
            .route("/v1/namespaces/{ns}/nodes/{node}/desired", get(desired))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind contract server");
        let addr = listener.local_addr().expect("contract server address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ContractServer { addr, shared, task }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how batches are answered.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.0.lock().expect("contract lock").mode = mode;
    }

    /// A snapshot of what was seen.
    pub fn seen(&self) -> Seen {
        self.shared.0.lock().expect("contract lock").seen.clone()
    }

    /// Sets a device's desired state at a generation and streams it to connected agents.
    pub fn set_desired(&self, device: &str, generation: i64, desired: Map<String, Value>) {
        let (inner, tx) = &*self.shared;
        let mut inner = inner.lock().expect("contract lock");
        inner.revision += 1;
        inner
            .desired
            .insert(device.to_owned(), (generation, desired.clone()));
        let _ = tx.send(DesiredEvent::Desired {
            device: device.to_owned(),
            generation,
            desired,
            cursor: inner.revision.to_string(),
        });
    }
}

impl Drop for ContractServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(ErrorBody::new(code, message))).into_response()
}

fn authorized(inner: &Inner, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == inner.token)
}

async fn reports(
    State(shared): State<Shared>,
    Path((_ns, _node)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = shared.0.lock().expect("contract lock");
    if !authorized(&inner, &headers) {
        inner.seen.refused += 1;
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    match inner.mode {
        Mode::Accept => {}
        Mode::Unavailable => {
            inner.seen.refused += 1;
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "kubernetes_unavailable",
                "test: unavailable",
            );
        }
        Mode::RateLimited(secs) => {
            inner.seen.refused += 1;
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "test: slow down",
            );
            r.headers_mut().insert(
                "retry-after",
                secs.to_string().parse().expect("valid header"),
            );
            return r;
        }
    }
    let raw = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return error(StatusCode::BAD_REQUEST, "malformed", "bad gzip body");
        }
        out
    } else {
        body.to_vec()
    };
    let batch: ReportBatch = match serde_json::from_slice(&raw) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "malformed", &e.to_string()),
    };
    let seen = &mut inner.seen;
    seen.batches += 1;
    seen.reports += batch.reports.len() as u64;
    seen.seqs.push(batch.seq);
    seen.max_batch = seen.max_batch.max(batch.reports.len());
    let mut results = Vec::new();
    for r in batch.reports {
        let newer = seen
            .latest
            .get(&r.device)
            .is_none_or(|(v, _)| r.version > *v);
        let status = if newer {
            seen.rejection.insert(r.device.clone(), r.rejection);
            seen.latest
                .insert(r.device.clone(), (r.version, r.reported));
            ReportStatus::Accepted
        } else {
            seen.stale += 1;
            ReportStatus::Stale
        };
        let g = seen
            .observed_generation
            .entry(r.device.clone())
            .or_default();
        *g = (*g).max(r.observed_desired_version);
        results.push(ReportResult {
            device: r.device,
            version: r.version,
            status,
            reason: None,
        });
    }
    // Answered as a controller without live answers does: every accepted report durable.
    axum::Json(ReportBatchResponse {
        seq: batch.seq,
        results,
        live: None,
        durable: Vec::new(),
    })
    .into_response()
}

async fn desired(
    State(shared): State<Shared>,
    Path((_ns, _node)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (snapshot, rx) = {
        let inner = shared.0.lock().expect("contract lock");
        if !authorized(&inner, &headers) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            );
        }
        let cursor = inner.revision.to_string();
        let mut lines: Vec<DesiredEvent> = inner
            .desired
            .iter()
            .map(|(d, (g, m))| DesiredEvent::Desired {
                device: d.clone(),
                generation: *g,
                desired: m.clone(),
                cursor: cursor.clone(),
            })
            .collect();
        lines.push(DesiredEvent::SnapshotComplete { cursor });
        (lines, shared.1.subscribe())
    };
    let line = |e: &DesiredEvent| {
        Ok::<_, std::io::Error>(Bytes::from(format!(
            "{}\n",
            serde_json::to_string(e).unwrap_or_default()
        )))
    };
    let head = futures_util::stream::iter(snapshot.iter().map(line).collect::<Vec<_>>());
    let tail = futures_util::stream::unfold(rx, move |mut rx| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Ok(e)) => return Some((line(&e), rx)),
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                Err(_) => return Some((line(&DesiredEvent::Bookmark { cursor: "0".into() }), rx)),
            }
        }
    });
    use futures_util::StreamExt as _;
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(head.chain(tail)))
        .expect("valid response")
}
