//! The HTTP API: agent reports and desired-state streams, plus health and metrics.
//!
//! A report batch goes through, in order: node lookup and token check (401), an empty node
//! token bucket (429) and the global budget of bodies in memory (503), both before the body is
//! read; the body within its deadline (408), its size and gzip decoding (413), JSON parsing
//! (400), batch size (413), the node's token bucket for every report (429), then each report is
//! checked on its own (id, version, size, depth, ownership, existence; a bad report is
//! `rejected` with a reason and never stops its neighbours), applied to the live state and
//! queued for the status writer, and the batch is answered once every accepted report is
//! durable, or at once for an agent that takes live answers (it is told the durable versions
//! in later answers). A batch from a retired
//! agent epoch is refused with 409 before anything, heartbeat included, is written.
//!
//! | module | job |
//! |---|---|
//! | `body` | the budget of body bytes in memory, and reading a body |
//! | `reports` | report batches |
//! | `desired` | desired-state streams |
//! | `owner` | with shards: each node's requests served by its shard's owner |

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgesync_crds::EdgeNode;
use edgesync_protocol::rate::LogThrottle;
use edgesync_protocol::wire::ErrorBody;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::auth::{AuthError, Denied, TokenVerifier, UNAUTHORIZED_MESSAGE};
use crate::cache::Caches;
use crate::cli::RunOptions;
use crate::desired::DesiredHub;
use crate::epoch::NodeEpochs;
use crate::heartbeat::Heartbeats;
use crate::lookups::NodeLookups;
use crate::metrics::Metrics;
use crate::ratelimit::NodeLimiter;
use crate::writer::StatusWriter;

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
    /// The live state (`--live-listen`), which each accepted report reaches at once.
    pub live: Option<Arc<crate::live::state::Live>>,
    /// Durable versions owed to agents that take live answers.
    pub durable: Arc<crate::durable::DurableAcks>,
    /// This process's identity in live answers: agents resend what is not yet durable
    /// when it changes (a restart lost the reports waiting to be written).
    pub incarnation: String,
    /// EdgeNode heartbeats.
    pub heartbeats: Heartbeats,
    /// Kubernetes Events.
    pub events: crate::events::Events,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Ends desired streams on shutdown.
    pub shutdown: CancellationToken,
    /// Lookups of EdgeNodes missing from the cache.
    pub lookups: NodeLookups,
    /// Each node's agent epochs.
    pub epochs: NodeEpochs,
    /// Bytes of request bodies that may be held at once, overall and per node.
    pub bodies: BodyBudget,
    /// Desired-stream tasks, joined at shutdown.
    pub tasks: TaskTracker,
    /// Authentication failures are logged at most once per interval.
    pub auth_log: std::sync::Mutex<LogThrottle>,
    /// With `--shards`: the shards owned here and the way to the others' owners.
    pub sharding: Option<Sharding>,
}

/// The shards this replica owns, and the forwarder to the others' owners.
pub struct Sharding {
    /// Ownership, and the owners seen in the Leases.
    pub shards: Arc<crate::shard::leases::Shards>,
    /// Passes requests to other owners (and the live API's reads of their parts).
    pub forwarder: Arc<crate::shard::forward::Forwarder>,
}

mod body;
mod checks;
mod desired;
mod owner;

pub use body::BodyBudget;
mod reports;

type Shared = Arc<AppState>;

/// The agent API with `/healthz` and `/readyz`, and `/metrics` when `with_metrics`.
pub fn router(state: Shared, with_metrics: bool) -> Router {
    let api = Router::new()
        .route(
            "/v1/namespaces/{ns}/nodes/{node}/reports",
            post(reports::reports),
        )
        .route(
            "/v1/namespaces/{ns}/nodes/{node}/desired",
            get(desired::desired),
        )
        // After routing (the node is in the path), before the handlers' checks: the owner
        // makes them.
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            owner::to_owner,
        ))
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
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
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
    let unauthorized = |denied: Denied| {
        s.metrics.auth_failures.inc();
        // A flood of bad requests costs one log line per interval, with the count held back.
        let allowed = s
            .auth_log
            .lock()
            .map_or(None, |mut t| t.allow(Instant::now()));
        if let Some(repeated) = allowed {
            warn!(
                namespace = ns,
                node,
                reason = denied.label(),
                repeated,
                "Refused a request: authentication failed (see edgesync_controller_auth_failures_total; RUST_LOG=edgesync_controller=debug shows each cause)"
            );
        }
        debug!(
            namespace = ns,
            node,
            reason = denied.label(),
            detail = denied.detail(),
            "Authentication failed"
        );
        // The same answer for every cause (see UNAUTHORIZED_MESSAGE).
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            UNAUTHORIZED_MESSAGE,
        )
    };
    let unknown = || Denied::UnknownNode;
    let edge_node = match s
        .caches
        .node(ns, node)
        .or_else(|| s.lookups.found_earlier(ns, node))
    {
        Some(n) => n,
        // Not cached: almost always a node that does not exist. The API server is asked only
        // for one created a moment ago, once per name and interval and within a budget.
        None if !s.lookups.may_look_up(ns, node) => {
            s.metrics.unknown_node_lookups_skipped.inc();
            return Err(unauthorized(unknown()));
        }
        None => {
            let api: Api<EdgeNode> = Api::namespaced(s.client.clone(), ns);
            match api.get_opt(node).await {
                Ok(Some(n)) => {
                    let n = Arc::new(n);
                    s.lookups.found(ns, node, Arc::clone(&n));
                    n
                }
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
