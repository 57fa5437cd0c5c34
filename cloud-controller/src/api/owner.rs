//! With `--shards`, a node's batches and desired stream are served by the replica that owns
//! its shard: this one, or the owner, to which the request is forwarded as it came. A request
//! already forwarded once is never passed on again: while its shard moves, it is answered 503
//! and the agent retries (see `shard::forward`).

use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::Shared;
use crate::shard::forward::{FORWARDED_BY, moving};
use crate::shard::route::Route;

/// Serves the request here or at its shard's owner.
pub(super) async fn to_owner(
    State(s): State<Shared>,
    Path((ns, node)): Path<(String, String)>,
    request: Request,
    next: Next,
) -> Response {
    let Some(sharding) = &s.sharding else {
        return next.run(request).await;
    };
    match sharding.shards.route(&ns, &node) {
        Route::Here => next.run(request).await,
        Route::Peer(owner) if !request.headers().contains_key(FORWARDED_BY) => {
            sharding.forwarder.forward(&owner, request).await
        }
        Route::Peer(_) | Route::Moving => moving(&s.metrics),
    }
}

/// Whether the node's requests are no longer served here (its shard moved).
pub(super) fn served_elsewhere(s: &super::AppState, ns: &str, node: &str) -> bool {
    s.sharding
        .as_ref()
        .is_some_and(|sh| sh.shards.route(ns, node) != Route::Here)
}

/// Returns once this replica no longer serves the node (its shard moved), never without
/// shards: a desired stream ends then, and the agent's next one reaches the new owner.
pub(super) async fn moved_away(s: &super::AppState, ns: &str, node: &str) {
    let Some(sharding) = &s.sharding else {
        return std::future::pending().await;
    };
    let mut changes = sharding.shards.subscribe();
    loop {
        if sharding.shards.route(ns, node) != Route::Here {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
