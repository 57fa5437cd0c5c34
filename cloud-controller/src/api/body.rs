//! Request bodies: the budgets of bytes held at once, overall and per node (reserved before
//! reading), and the read itself with its deadline, size limit and gzip decoding.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, AppState};

/// Bytes of request bodies held at once: all nodes together (`--max-body-bytes-in-flight`),
/// and each node on its own (`--max-body-bytes-in-flight-per-node`), so that one node, with
/// slow or large bodies, cannot hold the whole budget and have every other node's batches
/// refused.
pub struct BodyBudget {
    all: Arc<Semaphore>,
    per_node: usize,
    nodes: Mutex<HashMap<(String, String), Arc<Semaphore>>>,
}

/// Room reserved for one body, given back when dropped.
pub(super) struct BodyPermit {
    _all: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

impl BodyBudget {
    /// A budget of `all` bytes, `per_node` of them at most for one node.
    pub fn new(all: usize, per_node: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(all.min(Semaphore::MAX_PERMITS))),
            per_node: per_node.min(Semaphore::MAX_PERMITS),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// The node's own budget (nodes are authenticated before this, so the map holds only
    /// existing nodes).
    fn node(&self, ns: &str, node: &str) -> Arc<Semaphore> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            nodes
                .entry((ns.to_owned(), node.to_owned()))
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_node))),
        )
    }
}

/// Reserves room for the request's body in the node's and the global budget: its
/// Content-Length, or the largest body allowed when it is not declared. Released when the
/// request is answered.
pub(super) fn reserve_body(
    s: &AppState,
    ns: &str,
    node: &str,
    headers: &HeaderMap,
) -> Result<BodyPermit, ApiError> {
    let max = s
        .opts
        .max_body_bytes
        .min(s.opts.max_body_bytes_in_flight)
        .min(s.opts.max_body_bytes_in_flight_per_node);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A declared length over the limit is refused by the read itself (413); reserve the cap.
    let bytes = declared.map_or(max, |n| n.min(max)).max(1);
    let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
    let busy = |reason: &'static str, option: &str| {
        s.metrics.shed(reason);
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("the controller holds as many request bodies as {option} allows; retry later"),
        )
        .retry_after(Duration::from_secs(1))
    };
    let node_permit = s
        .bodies
        .node(ns, node)
        .try_acquire_many_owned(bytes)
        .map_err(|_| busy("node_body_budget", "--max-body-bytes-in-flight-per-node"))?;
    let all_permit = Arc::clone(&s.bodies.all)
        .try_acquire_many_owned(bytes)
        .map_err(|_| busy("body_budget", "--max-body-bytes-in-flight"))?;
    Ok(BodyPermit {
        _all: all_permit,
        _node: node_permit,
    })
}

/// Reads the body (gzip-decoded when so marked) within `deadline`, refusing more than `max`
/// bytes either way.
pub(super) async fn read_body(
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
