//! The live API's HTTP handlers: discovery, and get, list and watch of `devicestates`, as
//! the API server's aggregation layer proxies them.
//!
//! Every request but the health probes must come through the front proxy (its client
//! certificate, checked by the TLS layer, then its name and the user headers, see
//! [`authn`](super::authn)); every read is authorised with a SubjectAccessReview on
//! `devicestates.live.edgesync.io`, answers kept briefly. Errors are `Status` objects with
//! the API server's reasons, so kubectl prints them as it prints its own.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIGroup, GroupVersionForDiscovery, Status};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::authn::{Decisions, RequestHeader, User, access_review};
use super::fleet::{Fleet, Refused, Selection};
use super::merge::Vector;
use super::query::Query;
use super::source::{self, Step, Steps};
use super::state::Live;
use super::store::{MAX_PAGE, Page, encode_continue};
use super::watch::Cursor;
use super::{tls, wire};
use crate::metrics::Metrics;
use crate::server::ClientCertificate;

/// The longest a watch runs before it ends (the client watches again from its last
/// version), as the API server's `--min-request-timeout` does.
const MAX_WATCH: Duration = Duration::from_secs(1800);
/// Interval of bookmarks on a watch that asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(60);
/// Answers the SubjectAccessReview cache keeps at most.
const DECISIONS_CAPACITY: usize = 8192;

/// What the handlers share.
pub struct LiveApi {
    live: Arc<Live>,
    client: Client,
    request_header: RequestHeader,
    decisions: Mutex<Decisions>,
    watches: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Whether the live state is whole: the Device watch has listed every Device (and so
    /// every status the state is rebuilt from). Until then nothing is served: a list would
    /// silently miss devices.
    ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// With shards: reads merged from every replica's live state.
    fleet: Option<Arc<Fleet>>,
}

impl LiveApi {
    /// The handlers' state.
    pub fn new(
        live: Arc<Live>,
        client: Client,
        request_header: RequestHeader,
        authz_ttl: Duration,
        watches: Arc<Semaphore>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            live,
            client,
            request_header,
            decisions: Mutex::new(Decisions::new(authz_ttl, DECISIONS_CAPACITY)),
            watches,
            metrics,
            shutdown,
            ready: Box::new(|| true),
            fleet: None,
        }
    }

    /// Reads through `fleet`: every replica's devices, not only this one's.
    pub fn merging(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Serves only while `ready` says the live state is whole (503 before).
    pub fn serving_when(mut self, ready: Box<dyn Fn() -> bool + Send + Sync>) -> Self {
        self.ready = ready;
        self
    }
}

type Shared = Arc<LiveApi>;

/// The live API's routes.
pub fn router(api: Shared) -> Router {
    let base = format!("/apis/{}", wire::GROUP);
    let version = format!("{base}/{}", wire::VERSION);
    Router::new()
        .route(&base, get(group))
        .route(&version, get(resources))
        .route(
            &format!("{version}/{}", wire::RESOURCE),
            get(collection_all),
        )
        .route(
            &format!("{version}/namespaces/{{ns}}/{}", wire::RESOURCE),
            get(collection),
        )
        .route(
            &format!("{version}/namespaces/{{ns}}/{}/{{name}}", wire::RESOURCE),
            get(one),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(api): State<Shared>| async move {
                match not_ready(&api) {
                    None => "ok\n".into_response(),
                    Some(refusal) => refusal.into_response(),
                }
            }),
        )
        .fallback(|| async {
            failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the live API serves devicestates only",
            )
        })
        .with_state(api)
}

/// A request refused: the `Status` it is answered with.
#[derive(Debug)]
struct Refusal {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        failure(self.code, self.reason, &self.message)
    }
}

/// A `Status` answer.
fn failure(code: StatusCode, reason: &str, message: &str) -> Response {
    json(code, &wire::status(code.as_u16(), reason, message))
}

fn json(code: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            code,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "Cannot encode a live API answer");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The request's user, when it came through the front proxy.
fn authenticate(
    api: &LiveApi,
    peer: Option<&ClientCertificate>,
    headers: &HeaderMap,
) -> Result<User, Refusal> {
    let refuse = |why: &str| {
        api.metrics.live_refused("unauthenticated");
        debug!(why, "Live API request refused: not authenticated");
        Refusal {
            code: StatusCode::UNAUTHORIZED,
            reason: "Unauthorized",
            message: format!(
                "the live API serves the Kubernetes API server's front proxy only ({why}): ask through the API server, e.g. kubectl get devicestates"
            ),
        }
    };
    let peer = peer.ok_or_else(|| refuse("no client certificate"))?;
    let name = tls::common_name(&peer.0).ok_or_else(|| refuse("no certificate name"))?;
    api.request_header
        .user(&name, headers)
        .map_err(|e| refuse(&e.to_string()))
}

/// 503 while the live state is being rebuilt (see `LiveApi::ready`).
fn not_ready(api: &LiveApi) -> Option<Refusal> {
    if (api.ready)() {
        return None;
    }
    api.metrics.live_refused("unavailable");
    Some(Refusal {
        code: StatusCode::SERVICE_UNAVAILABLE,
        reason: "ServiceUnavailable",
        message: "the live state is being rebuilt from the Device statuses after a start; retry in a few seconds".to_owned(),
    })
}

/// Authenticates, then asks whether the user may `verb` in `namespace` (`name`); refuses
/// while the live state is not whole.
async fn authorize(
    api: &LiveApi,
    peer: Option<&ClientCertificate>,
    headers: &HeaderMap,
    verb: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<User, Refusal> {
    let user = authenticate(api, peer, headers)?;
    if let Some(refusal) = not_ready(api) {
        return Err(refusal);
    }
    let question = (
        user.clone(),
        verb.to_owned(),
        namespace.map(str::to_owned),
        name.map(str::to_owned),
    );
    let cached = api
        .decisions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&question, Instant::now());
    let allowed = match cached {
        Some(a) => a,
        None => {
            let review = access_review(&user, verb, namespace, name);
            let answer = Api::<SubjectAccessReview>::all(api.client.clone())
                .create(&PostParams::default(), &review)
                .await;
            let allowed = match answer {
                Ok(r) => r.status.is_some_and(|s| s.allowed),
                Err(e) => {
                    api.metrics.live_refused("unavailable");
                    warn!(error = %e, "Cannot ask the API server whether a live API request is allowed");
                    return Err(Refusal {
                        code: StatusCode::SERVICE_UNAVAILABLE,
                        reason: "ServiceUnavailable",
                        message: format!(
                            "cannot authorise the request (SubjectAccessReview failed): {e}"
                        ),
                    });
                }
            };
            api.decisions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .put(question, allowed, Instant::now());
            allowed
        }
    };
    if allowed {
        return Ok(user);
    }
    api.metrics.live_refused("forbidden");
    let scope = namespace.map_or_else(
        || "at the cluster scope".to_owned(),
        |ns| format!("in the namespace {ns:?}"),
    );
    Err(Refusal {
        code: StatusCode::FORBIDDEN,
        reason: "Forbidden",
        message: format!(
            "{}.{} is forbidden: User {:?} cannot {verb} resource {:?} in API group {:?} {scope}",
            wire::RESOURCE,
            wire::GROUP,
            user.name,
            wire::RESOURCE,
            wire::GROUP
        ),
    })
}

/// Discovery: `/apis/live.edgesync.io` (the group) or its version (the resources). Any user
/// the front proxy names may read it, as the API server's own discovery.
async fn discovery(
    api: &LiveApi,
    peer: Option<Extension<ClientCertificate>>,
    headers: &HeaderMap,
    body: &impl serde::Serialize,
) -> Response {
    if let Err(r) = authenticate(api, peer.as_deref(), headers) {
        return r.into_response();
    }
    api.metrics.live_request("discovery");
    json(StatusCode::OK, body)
}

async fn group(
    State(api): State<Shared>,
    peer: Option<Extension<ClientCertificate>>,
    headers: HeaderMap,
) -> Response {
    let version = GroupVersionForDiscovery {
        group_version: wire::API_VERSION.into(),
        version: wire::VERSION.into(),
    };
    let group = APIGroup {
        name: wire::GROUP.into(),
        versions: vec![version.clone()],
        preferred_version: Some(version),
        server_address_by_client_cidrs: None,
    };
    discovery(&api, peer, &headers, &group).await
}

async fn resources(
    State(api): State<Shared>,
    peer: Option<Extension<ClientCertificate>>,
    headers: HeaderMap,
) -> Response {
    discovery(&api, peer, &headers, &wire::resources()).await
}

/// The query parameters of a list or watch.
#[derive(Debug, Default)]
pub(super) struct Params {
    pub(super) label_selector: Option<String>,
    pub(super) field_selector: Option<String>,
    pub(super) where_: Option<String>,
    pub(super) limit: Option<usize>,
    pub(super) continue_: Option<String>,
    pub(super) watch: bool,
    pub(super) resource_version: Option<String>,
    pub(super) bookmarks: bool,
    pub(super) timeout: Option<Duration>,
    pub(super) include_object: bool,
}

impl Params {
    pub(super) fn parse(raw: Option<&str>) -> Result<Self, String> {
        let mut p = Self::default();
        let truthy = |v: &str| matches!(v, "true" | "1");
        for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let v = v.into_owned();
            match k.as_ref() {
                "labelSelector" => p.label_selector = Some(v),
                "fieldSelector" => p.field_selector = Some(v),
                "where" => p.where_ = Some(v),
                "limit" => {
                    p.limit = Some(
                        v.parse()
                            .map_err(|_| format!("limit {v:?} is not a count"))?,
                    );
                }
                "continue" => p.continue_ = Some(v).filter(|c| !c.is_empty()),
                "watch" => p.watch = truthy(&v),
                "resourceVersion" => p.resource_version = Some(v).filter(|r| !r.is_empty()),
                "allowWatchBookmarks" => p.bookmarks = truthy(&v),
                "timeoutSeconds" => {
                    let s: u64 = v
                        .parse()
                        .map_err(|_| format!("timeoutSeconds {v:?} is not a number of seconds"))?;
                    p.timeout = Some(Duration::from_secs(s));
                }
                "includeObject" => p.include_object = v == "Object",
                // Parameters kubectl and client-go send that change nothing here.
                _ => {}
            }
        }
        Ok(p)
    }
}

fn bad_request(api: &LiveApi, message: &str) -> Response {
    api.metrics.live_refused("bad_request");
    failure(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// Whether the client asked for a Table (`kubectl get`).
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn collection_all(
    State(api): State<Shared>,
    peer: Option<Extension<ClientCertificate>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    list_or_watch(api, peer, headers, raw, None).await
}

async fn collection(
    State(api): State<Shared>,
    Path(ns): Path<String>,
    peer: Option<Extension<ClientCertificate>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    list_or_watch(api, peer, headers, raw, Some(ns)).await
}

async fn list_or_watch(
    api: Shared,
    peer: Option<Extension<ClientCertificate>>,
    headers: HeaderMap,
    raw: Option<String>,
    namespace: Option<String>,
) -> Response {
    let params = match Params::parse(raw.as_deref()) {
        Ok(p) => p,
        Err(m) => return bad_request(&api, &m),
    };
    let verb = if params.watch { "watch" } else { "list" };
    if let Err(r) = authorize(
        &api,
        peer.as_deref(),
        &headers,
        verb,
        namespace.as_deref(),
        None,
    )
    .await
    {
        return r.into_response();
    }
    let query = match Query::parse(
        params.label_selector.as_deref(),
        params.field_selector.as_deref(),
        params.where_.as_deref(),
    ) {
        Ok(q) => q,
        Err(e) => return bad_request(&api, &e.to_string()),
    };
    api.metrics.live_request(verb);
    let table = wants_table(&headers);
    let limit = params.limit.filter(|l| *l > 0).unwrap_or(MAX_PAGE);
    if let Some(fleet) = api.fleet.clone() {
        let selection = Selection {
            namespace: namespace.as_deref(),
            query: &query,
            label_selector: params.label_selector.as_deref(),
            field_selector: params.field_selector.as_deref(),
            where_: params.where_.as_deref(),
        };
        if params.watch {
            return merged_watch(&api, &fleet, &selection, &params, table).await;
        }
        let merged = match fleet
            .list(&selection, limit.min(MAX_PAGE), params.continue_.as_deref())
            .await
        {
            Ok(m) => m,
            Err(r) => return refused(&api, r),
        };
        let page = Page {
            items: merged
                .items
                .into_iter()
                .map(|(key, state, identity, rv)| (key, state, Vector::one(&identity, rv)))
                .collect(),
            resource_version: merged.resource_version,
            continue_token: merged.after.map(|k| encode_continue(&k)),
        };
        return answer_page(&page, table, params.include_object);
    }
    if params.watch {
        let cursor = match params.resource_version.as_deref() {
            None | Some("0") => Cursor::listing(namespace, query),
            Some(rv) => match rv.parse() {
                Ok(rv) => Cursor::resuming(namespace, query, rv),
                Err(_) => {
                    return bad_request(
                        &api,
                        &format!("resourceVersion {rv:?} is not one this API returned"),
                    );
                }
            },
        };
        let Ok(permit) = Arc::clone(&api.watches).try_acquire_owned() else {
            return too_many_watches(&api);
        };
        let start = Position::Single(cursor.resource_version());
        let steps = source::local(Arc::clone(&api.live), cursor, None);
        let sources = vec![(Arc::from(""), steps)];
        return watch(&api, permit, sources, start, &params, table);
    }
    let page = api.live.read().list(
        namespace.as_deref(),
        &query,
        limit,
        params.continue_.as_deref(),
    );
    match page {
        Ok(page) => answer_page(&page, table, params.include_object),
        Err(e) => bad_request(&api, &e.to_string()),
    }
}

fn answer_page<R: std::fmt::Display>(
    page: &Page<R>,
    table: bool,
    include_object: bool,
) -> Response {
    if table {
        json(StatusCode::OK, &wire::table(page, now_ms(), include_object))
    } else {
        json(StatusCode::OK, &wire::list(page))
    }
}

/// A merged read that cannot be answered.
fn refused(api: &LiveApi, refused: Refused) -> Response {
    match refused {
        Refused::BadRequest(m) => bad_request(api, &m),
        Refused::Unavailable(m) | Refused::Unreachable(m) => {
            api.metrics.live_refused("unavailable");
            let mut r = failure(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &m);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// A watch of every replica's changes, resumed from a merged resource version.
async fn merged_watch(
    api: &Shared,
    fleet: &Fleet,
    selection: &Selection<'_>,
    params: &Params,
    table: bool,
) -> Response {
    let from = match params.resource_version.as_deref() {
        None | Some("0") => None,
        Some(rv) => match Vector::parse(rv) {
            Some(v) => Some(v),
            // Not a version of the merged API (one from before shards, or made up): list
            // again, as for one too old.
            None => {
                api.metrics.live_watches_expired.inc();
                return failure(
                    StatusCode::GONE,
                    "Expired",
                    &format!(
                        "resourceVersion {rv:?} is not one of this API's merged versions: list again"
                    ),
                );
            }
        },
    };
    // The slot first: a replica at --live-max-watches asks nothing of the others.
    let Ok(permit) = Arc::clone(&api.watches).try_acquire_owned() else {
        return too_many_watches(api);
    };
    let sources = match fleet.watch(selection, from.as_ref()).await {
        Ok(s) => s,
        Err(r) => return refused(api, r),
    };
    // Only the replicas read now stay in the position: a vector does not grow with every
    // replica that ever was (pod names change at each rolling update).
    let mut position = Vector::default();
    if let Some(from) = &from {
        for (identity, _) in &sources {
            if let Some(rv) = from.get(identity) {
                position.set(identity, rv);
            }
        }
    }
    watch(
        api,
        permit,
        sources,
        Position::Merged(position),
        params,
        table,
    )
}

async fn one(
    State(api): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    peer: Option<Extension<ClientCertificate>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Err(r) = authorize(
        &api,
        peer.as_deref(),
        &headers,
        "get",
        Some(&ns),
        Some(&name),
    )
    .await
    {
        return r.into_response();
    }
    api.metrics.live_request("get");
    let include_object = Params::parse(raw.as_deref()).is_ok_and(|p| p.include_object);
    let key = (ns, name);
    let found = match &api.fleet {
        Some(fleet) => match fleet.get(&key).await {
            Ok(found) => {
                found.map(|(state, identity, rv)| (state, Vector::one(&identity, rv).to_string()))
            }
            Err(r) => return refused(&api, r),
        },
        None => api
            .live
            .read()
            .get(&key)
            .map(|(state, rv)| (state, rv.to_string())),
    };
    let Some((state, rv)) = found else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "{}.{} {:?} not found (no report of this Device since the controller started, and none in its status)",
                wire::RESOURCE,
                wire::GROUP,
                key.1
            ),
        );
    };
    if wants_table(&headers) {
        let page = Page {
            resource_version: rv.clone(),
            items: vec![(Arc::new(key), state, rv)],
            continue_token: None,
        };
        return json(
            StatusCode::OK,
            &wire::table(&page, now_ms(), include_object),
        );
    }
    json(StatusCode::OK, &wire::object(&key, &state, rv))
}

/// Where a watch stands: one store's resource version, or every replica's.
#[derive(Debug, Clone)]
enum Position {
    Single(u64),
    Merged(Vector),
}

impl Position {
    /// Records that `source` has read up to `rv`.
    fn advance(&mut self, source: &Arc<str>, rv: u64) {
        match self {
            Self::Single(at) => *at = rv,
            Self::Merged(v) => v.set(source, rv),
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(rv) => write!(f, "{rv}"),
            Self::Merged(v) => write!(f, "{v}"),
        }
    }
}

/// The 429 answer when every `--live-max-watches` slot is taken.
fn too_many_watches(api: &Shared) -> Response {
    api.metrics.live_refused("too_many_watches");
    let mut r = failure(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "too many watches of devicestates are open (--live-max-watches); retry later",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A watch: a stream of event lines, as the API server sends them, from the `sources`'
/// steps.
fn watch(
    api: &Shared,
    permit: OwnedSemaphorePermit,
    sources: Vec<(Arc<str>, Steps)>,
    position: Position,
    params: &Params,
    table: bool,
) -> Response {
    // Each source's steps tagged with its identity; the watch ends when any source ends
    // (the client watches again from the position reached, reaching every replica again).
    let tagged = sources.into_iter().map(|(identity, steps)| {
        steps
            .map(move |step| Some((Arc::clone(&identity), step)))
            .chain(futures_util::stream::once(async { None }))
            .boxed()
    });
    let steps = futures_util::stream::select_all(tagged)
        .take_while(|s| std::future::ready(s.is_some()))
        .filter_map(std::future::ready)
        .boxed();
    let timeout = params.timeout.unwrap_or(MAX_WATCH).min(MAX_WATCH);
    let now = tokio::time::Instant::now();
    let watch = Watch {
        steps,
        position,
        table,
        include_object: params.include_object,
        bookmarks: params.bookmarks,
        next_bookmark: now + BOOKMARK_EVERY,
        deadline: now + timeout,
        done: false,
        _open: OpenWatch::new(permit, &api.metrics),
        api: Arc::clone(api),
    };
    let stream = futures_util::stream::unfold(watch, Watch::next_chunk);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Counts an open watch and holds its slot until it ends.
struct OpenWatch {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl OpenWatch {
    fn new(permit: OwnedSemaphorePermit, metrics: &Arc<Metrics>) -> Self {
        metrics.live_watches.inc();
        Self {
            _permit: permit,
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.metrics.live_watches.dec();
    }
}

/// One watch in progress.
struct Watch {
    api: Shared,
    steps: futures_util::stream::BoxStream<'static, (Arc<str>, Step)>,
    position: Position,
    table: bool,
    include_object: bool,
    bookmarks: bool,
    next_bookmark: tokio::time::Instant,
    deadline: tokio::time::Instant,
    done: bool,
    _open: OpenWatch,
}

impl Watch {
    /// The next chunk of event lines; `None` ends the watch. Sources are polled only as
    /// fast as the client reads, so a slow client holds nothing but its place in each
    /// window.
    async fn next_chunk(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Self)> {
        loop {
            if self.done {
                return None;
            }
            tokio::select! {
                first = self.steps.next() => {
                    // This step and whatever else is ready, up to a chunk's events: one
                    // chunk is bounded whatever the number of sources.
                    let mut steps = vec![first?];
                    let mut events = steps[0].1.len();
                    while events < source::CHUNK {
                        match self.steps.next().now_or_never() {
                            Some(Some(step)) => {
                                events += step.1.len();
                                steps.push(step);
                            }
                            Some(None) => {
                                self.done = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    let chunk = self.encode(steps);
                    if !chunk.is_empty() {
                        return Some((Ok(chunk), self));
                    }
                }
                () = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    self.next_bookmark += BOOKMARK_EVERY;
                    let bookmark = wire::bookmark(&self.position);
                    return Some((Ok(line(&bookmark)), self));
                }
                () = tokio::time::sleep_until(self.deadline) => return None,
                () = self.api.shutdown.cancelled() => return None,
            }
        }
    }

    /// The lines for `steps`, each event at the position reached with it.
    fn encode(&mut self, steps: Vec<(Arc<str>, Step)>) -> Bytes {
        let now = now_ms();
        let mut out = Vec::new();
        for (source, step) in steps {
            match step {
                Step::Items(items, listed_at) => {
                    for (kind, key, state, rv) in items {
                        // While a source lists, its position is the list's version: a device
                        // listed at a later version does not vouch for the changes between.
                        self.position.advance(&source, listed_at.unwrap_or(rv));
                        let object = if self.table {
                            let page = Page {
                                resource_version: self.position.to_string(),
                                items: vec![(
                                    key.clone(),
                                    state.clone(),
                                    self.position.to_string(),
                                )],
                                continue_token: None,
                            };
                            wire::table(&page, now, self.include_object)
                        } else {
                            wire::object(&key, &state, &self.position)
                        };
                        out.extend_from_slice(&line(&wire::watch_event(kind.as_str(), object)));
                    }
                }
                Step::Progress(rv) => self.position.advance(&source, rv),
                Step::Gone(message) => {
                    self.done = true;
                    self.api.metrics.live_watches_expired.inc();
                    let status = wire::status(410, "Expired", &message);
                    out.extend_from_slice(&line(&wire::watch_event(
                        "ERROR",
                        status_value(&status),
                    )));
                    break;
                }
            }
        }
        Bytes::from(out)
    }
}

fn status_value(status: &Status) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), "Status".into());
        o.insert("apiVersion".into(), "v1".into());
    }
    v
}

/// One JSON value and a newline.
fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}
