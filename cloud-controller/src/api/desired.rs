//! `GET .../desired`: the node's desired-state stream (NDJSON), a snapshot or a resumed
//! position first, then changes and periodic bookmarks.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgesync_protocol::wire::DesiredEvent;
use serde::Deserialize;
use tracing::{debug, info};

use super::{AppState, Shared, authenticate, unavailable};
use crate::desired::Poll;

#[derive(Debug, Deserialize)]
pub(super) struct DesiredQuery {
    since: Option<String>,
}

pub(super) async fn desired(
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
        state.metrics.desired_streams.inc();
        stream_desired(&state, &ns, &node, sub, tx).await;
        state.metrics.desired_streams.dec();
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
        s.metrics.desired_events.inc();
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
    // The node's shard moving to another replica ends the stream: the agent reconnects and
    // its next stream, resumed from its cursor, is served by the new owner.
    let moved = super::owner::moved_away(s, ns, node);
    tokio::pin!(moved);
    loop {
        tokio::select! {
            _ = s.shutdown.cancelled() => return,
            _ = &mut moved => {
                debug!(namespace = %ns, node = %node, "Desired-state stream ended: the node's shard moved to another replica");
                return;
            }
            _ = tx.closed() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                // A shard just lost: its Devices leave the cache, which must not reach the
                // agent as removals.
                if super::owner::served_elsewhere(s, ns, node) {
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
