//! The replicas' reads of each other's live state, on the agent API's listener (where
//! requests for a shard are forwarded already): one replica's page, device or watch of
//! the devices of the shards it serves, which the replica a client asked merges with its
//! own (`fleet`, `merge`).
//!
//! Only replicas may ask: a request carries the peer token, a random value the first
//! replica stored in a Secret next to the Leases (`shard::peer_token`), compared in constant
//! time. A replica trusts another's answer as it trusts its own: the client was authorised
//! by the replica it asked.
//!
//! The answers are this module's JSON, not Kubernetes objects: each state with its stamp
//! and resource version, which the merging replica renders.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use edgesync_protocol::secret::Secret;
use edgesync_protocol::wire::ErrorBody;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::api::Params;
use super::query::Query;
use super::source::{self, Step};
use super::state::Live;
use super::store::{BadContinue, DeviceState, Key, MAX_PAGE, encode_continue, state_bytes};
use super::watch::{Cursor, Kind};
use crate::metrics::Metrics;
use crate::shard::leases::Shards;
use crate::shard::shard_of;
use crate::stamp::Stamp;

/// Where the internal routes start.
pub const PREFIX: &str = "/internal/v1";
/// States one replica's page holds at most, in bytes (about): a merged page holds one page
/// of every replica at once.
pub const PAGE_BYTES: usize = 8 << 20;
/// The longest a replica's watch for another runs (the merged watch ends with it, and the
/// client watches again from its last version).
const MAX_WATCH: Duration = Duration::from_secs(1800);

/// One device's state as replicas pass it (a borrowed view to send, an owned one read).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item<L, N, R, S> {
    /// Namespace.
    pub namespace: N,
    /// Name.
    pub name: N,
    /// Its resource version on the replica that sent it.
    pub resource_version: u64,
    /// The Device's labels.
    pub labels: L,
    /// Its EdgeNode.
    pub node: N,
    /// The reported document.
    pub reported: R,
    /// Epoch generation of the stamp.
    pub generation: u64,
    /// Version of the stamp.
    pub version: u64,
    /// When the device reported it.
    pub reported_at: S,
    /// The desired generation the agent had applied.
    pub observed_desired_generation: i64,
    /// When the controller received it (ms since the epoch).
    pub received_at_ms: i64,
    /// Connected, as its agent said.
    pub online: Option<bool>,
    /// Reported matches desired.
    pub in_sync: Option<bool>,
}

/// An item to send.
type Sent<'a> = Item<&'a BTreeMap<String, String>, &'a str, &'a RawValue, &'a str>;
/// An item read.
pub type Received = Item<BTreeMap<String, String>, String, Box<RawValue>, String>;

fn sent<'a>(key: &'a Key, state: &'a DeviceState, rv: u64) -> Sent<'a> {
    Item {
        namespace: &key.0,
        name: &key.1,
        resource_version: rv,
        labels: &state.labels,
        node: &state.node,
        reported: state.reported.raw(),
        generation: state.stamp.generation,
        version: state.stamp.version,
        reported_at: &state.reported_at,
        observed_desired_generation: state.observed_desired_generation,
        received_at_ms: state.received_at_ms,
        online: state.online,
        in_sync: state.in_sync,
    }
}

impl Received {
    /// The device, its state and resource version (`None` when the document is not an
    /// object).
    pub fn into_state(self) -> Option<(Arc<Key>, Arc<DeviceState>, u64)> {
        let reported = crate::doc::Doc::from_raw(self.reported)?;
        let state = DeviceState {
            labels: Arc::new(self.labels),
            node: self.node.into(),
            reported,
            stamp: Stamp::new(self.generation, self.version),
            reported_at: self.reported_at,
            observed_desired_generation: self.observed_desired_generation,
            received_at_ms: self.received_at_ms,
            online: self.online,
            in_sync: self.in_sync,
        };
        Some((
            Arc::new((self.namespace, self.name)),
            Arc::new(state),
            self.resource_version,
        ))
    }
}

/// One replica's page.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PageOf<I> {
    /// The shards it serves.
    pub served: Vec<u32>,
    /// Its resource version when read.
    pub resource_version: u64,
    /// Its devices of those shards, in key order.
    pub items: Vec<I>,
    /// Where it stopped, when it has more (a `continue` token).
    pub next: Option<String>,
}

/// One replica's answer for one device.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OneOf<I> {
    /// The shards it serves.
    pub served: Vec<u32>,
    /// The device, when it holds it for a shard it serves.
    pub item: Option<I>,
}

/// A line of a replica's watch (externally tagged, `{"ADDED": {...}}`: an internally
/// tagged enum is buffered before it is read, which a document kept as raw JSON cannot be).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventOf<I> {
    /// Newly selected.
    #[serde(rename_all = "camelCase")]
    Added {
        /// The device.
        item: I,
        /// While the replica lists: the version its list was read at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listed_at: Option<u64>,
    },
    /// Changed.
    Modified {
        /// The device.
        item: I,
    },
    /// Deleted, or no longer selected.
    Deleted {
        /// The device, as it last was.
        item: I,
    },
    /// Every change up to `resource_version` read.
    #[serde(rename_all = "camelCase")]
    Progress {
        /// The replica's resource version.
        resource_version: u64,
    },
    /// Resumed from before the replica's window (410).
    Gone {
        /// Why.
        message: String,
    },
}

/// The devices of `namespace` selected by `query` after `after`, of the shards `served`
/// (bytes and count bounded): the page a replica gives the others, and its own part of a
/// merged page.
pub fn served_page(
    live: &Live,
    served: &[u32],
    count: u32,
    namespace: Option<&str>,
    query: &Query,
    limit: usize,
    after: Option<&str>,
) -> Result<ServedPage, BadContinue> {
    let served: BTreeSet<u32> = served.iter().copied().collect();
    let page = live.read().list(namespace, query, limit, after)?;
    let mut next = page
        .continue_token
        .as_deref()
        .map(super::store::parse_continue)
        .transpose()?
        .map(Arc::new);
    let mut bytes = 0;
    let mut items = Vec::with_capacity(page.items.len());
    for (key, state, rv) in page.items {
        if bytes >= PAGE_BYTES {
            // Cut here: the next page starts after the last device kept.
            next = items
                .last()
                .map(|(k, _, _): &(Arc<Key>, _, _)| Arc::clone(k));
            break;
        }
        if !served.contains(&shard_of(&key.0, &state.node, count)) {
            continue;
        }
        bytes += sent_bytes(&key, &state);
        items.push((key, state, rv));
    }
    Ok(ServedPage {
        resource_version: page.resource_version,
        items,
        next,
    })
}

/// A page of the devices of the shards a replica serves.
pub struct ServedPage {
    /// The store's resource version when read.
    pub resource_version: u64,
    /// The devices, in key order, each at its resource version.
    pub items: Vec<(Arc<Key>, Arc<DeviceState>, u64)>,
    /// Where the page stopped, when there are more.
    pub next: Option<Arc<Key>>,
}

/// About how many bytes a device takes in a replica's answer: its state, its labels and
/// names, and the fields' names.
fn sent_bytes(key: &Key, state: &DeviceState) -> usize {
    let labels: usize = state
        .labels
        .iter()
        .map(|(k, v)| k.len() + v.len() + 6)
        .sum();
    state_bytes(state) + labels + key.0.len() + key.1.len() + state.node.len() + 200
}

/// What the internal routes share.
pub struct PeerApi {
    /// This replica's live state.
    pub live: Arc<Live>,
    /// Its shards.
    pub shards: Arc<Shards>,
    /// The value a replica's request must carry.
    pub token: Secret,
    /// The live API's watches (`--live-max-watches`): another replica's counts too.
    pub watches: Arc<Semaphore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Ends watches at shutdown.
    pub shutdown: CancellationToken,
}

type Shared = Arc<PeerApi>;

/// The internal routes.
pub fn router(api: Shared) -> Router {
    Router::new()
        .route(&format!("{PREFIX}/devicestates"), get(all))
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/devicestates"),
            get(in_namespace),
        )
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/devicestates/{{name}}"),
            get(one),
        )
        .with_state(api)
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (status, axum::Json(ErrorBody::new(code, message))).into_response()
}

/// Whether the request carries the peer token (the refusal when not).
fn check(api: &PeerApi, headers: &HeaderMap) -> Option<Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if api.token.matches(p.as_bytes()) => None,
        _ => {
            api.metrics.auth_failures.inc();
            Some(refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the internal live API serves the other controller replicas only (they send the token of the peer Secret)",
            ))
        }
    }
}

async fn all(State(api): State<Shared>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    list_or_watch(&api, &headers, raw.as_deref(), None)
}

async fn in_namespace(
    State(api): State<Shared>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    list_or_watch(&api, &headers, raw.as_deref(), Some(ns))
}

fn list_or_watch(
    api: &Shared,
    headers: &HeaderMap,
    raw: Option<&str>,
    namespace: Option<String>,
) -> Response {
    if let Some(r) = check(api, headers) {
        return r;
    }
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "bad_request", m);
    let params = match Params::parse(raw) {
        Ok(p) => p,
        Err(m) => return bad(m),
    };
    let query = match Query::parse(
        params.label_selector.as_deref(),
        params.field_selector.as_deref(),
        params.where_.as_deref(),
    ) {
        Ok(q) => q,
        Err(e) => return bad(e.to_string()),
    };
    if params.watch {
        return watch(api, namespace, query, params.resource_version.as_deref());
    }
    let served = api.shards.served_shards();
    let page = served_page(
        &api.live,
        &served,
        api.shards.count(),
        namespace.as_deref(),
        &query,
        params.limit.filter(|l| *l > 0).unwrap_or(MAX_PAGE),
        params.continue_.as_deref(),
    );
    match page {
        Ok(ServedPage {
            resource_version,
            items,
            next,
        }) => json(&PageOf {
            served,
            resource_version,
            items: items.iter().map(|(k, s, rv)| sent(k, s, *rv)).collect(),
            next: next.map(|k| encode_continue(&k)),
        }),
        Err(e) => bad(e.to_string()),
    }
}

async fn one(
    State(api): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = check(&api, &headers) {
        return r;
    }
    let served = api.shards.served_shards();
    let key = (ns, name);
    let held = api.live.read().get(&key);
    let item = held
        .filter(|(state, _)| served.contains(&shard_of(&key.0, &state.node, api.shards.count())));
    json(&OneOf {
        served,
        item: item.as_ref().map(|(s, rv)| sent(&key, s, *rv)),
    })
}

fn json(body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// This replica's changes of the shards it serves, from `resource_version` (a list first
/// without one), as lines of [`EventOf`].
fn watch(
    api: &Shared,
    namespace: Option<String>,
    query: Query,
    resource_version: Option<&str>,
) -> Response {
    let cursor = match resource_version {
        None | Some("0") => Cursor::listing(namespace, query),
        Some(rv) => match rv.parse() {
            Ok(rv) => Cursor::resuming(namespace, query, rv),
            Err(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("resourceVersion {rv:?} is not one of this replica's"),
                );
            }
        },
    };
    let Ok(permit) = Arc::clone(&api.watches).try_acquire_owned() else {
        api.metrics.live_refused("too_many_watches");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_watches",
            "too many watches of devicestates are open on this replica (--live-max-watches)",
        );
    };
    let steps = source::local(Arc::clone(&api.live), cursor, Some(Arc::clone(&api.shards)));
    let ends = {
        let shutdown = api.shutdown.clone();
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(MAX_WATCH) => {}
            }
        }
    };
    let lines = steps.take_until(ends).map(move |step| {
        // The watch's slot is held for as long as its stream is.
        let _held = &permit;
        let mut out = Vec::new();
        match step {
            Step::Items(items, listed_at) => {
                for (kind, key, state, rv) in &items {
                    let item = sent(key, state, *rv);
                    let event = match kind {
                        Kind::Added => EventOf::Added { item, listed_at },
                        Kind::Modified => EventOf::Modified { item },
                        Kind::Deleted => EventOf::Deleted { item },
                    };
                    line(&mut out, &event);
                }
            }
            Step::Progress(resource_version) => {
                line(
                    &mut out,
                    &EventOf::<Sent<'_>>::Progress { resource_version },
                );
            }
            Step::Gone(message) => line(&mut out, &EventOf::<Sent<'_>>::Gone { message }),
        }
        Ok::<_, std::convert::Infallible>(Bytes::from(out))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(lines),
    )
        .into_response()
}

fn line(out: &mut Vec<u8>, event: &impl Serialize) {
    if serde_json::to_writer(&mut *out, event).is_ok() {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::store::test_state;

    #[test]
    fn events_and_pages_read_back_as_they_were_sent() {
        let key: Key = ("plant-a".into(), "press-1".into());
        let state = test_state(7, 21.5);
        let mut text = Vec::new();
        line(
            &mut text,
            &EventOf::Modified {
                item: sent(&key, &state, 42),
            },
        );
        line(
            &mut text,
            &EventOf::<Sent<'_>>::Progress {
                resource_version: 43,
            },
        );
        let mut lines = text.split(|b| *b == b'\n');
        let event: EventOf<Received> = serde_json::from_slice(lines.next().unwrap()).unwrap();
        let EventOf::Modified { item } = event else {
            panic!("{event:?}")
        };
        let (k, s, rv) = item.into_state().unwrap();
        assert_eq!((&*k, &*s, rv), (&key, &state, 42));
        let event: EventOf<Received> = serde_json::from_slice(lines.next().unwrap()).unwrap();
        assert!(matches!(
            event,
            EventOf::Progress {
                resource_version: 43
            }
        ));

        let page = PageOf {
            served: vec![1, 3],
            resource_version: 9,
            items: vec![sent(&key, &state, 42)],
            next: Some("plant-a/press-1".to_owned()),
        };
        let read: PageOf<Received> =
            serde_json::from_slice(&serde_json::to_vec(&page).unwrap()).unwrap();
        assert_eq!(read.served, [1, 3]);
        let (_, s, _) = read.items.into_iter().next().unwrap().into_state().unwrap();
        assert_eq!(*s, state);
    }
}
