//! `devicestates` read through any replica when replicas share the fleet by shard: this
//! replica's part and every other live replica's (asked on their internal routes, `peer`),
//! merged (`merge`). The other replicas are those whose member Lease is live, at the
//! address it advertises; requests to them are bounded by `--max-forwards` and
//! `--forward-timeout-seconds`, as forwarded agent requests are.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use edgesync_protocol::secret::Secret;
use edgesync_protocol::wire::ErrorBody;
use futures_util::{StreamExt as _, TryStreamExt as _};
use serde::de::DeserializeOwned;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;
use tracing::{debug, warn};

use super::merge::{Merged, SourcePage, Vector, merge_pages, newest, unserved};
use super::peer::{self, EventOf, OneOf, PageOf, Received};
use super::query::Query;
use super::source::{self, Step, Steps};
use super::state::Live;
use super::store::{DeviceState, Key, parse_continue, valid_name};
use super::watch::{Cursor, Kind};
use crate::shard::forward::{Forwarder, Outcome};
use crate::shard::leases::Shards;
use crate::shard::shard_of;

/// The most bytes of one replica's answer read (its pages are cut at
/// [`peer::PAGE_BYTES`]; one device's state is far smaller).
const MAX_ANSWER: usize = 4 * peer::PAGE_BYTES;

/// Why a merged read is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A replica could not answer, or some shard is served by none (a hand-over): 503.
    Unavailable(String),
    /// The request itself is wrong (a `continue` token or version not from this API): 400.
    BadRequest(String),
    /// A replica could not be reached at all (killed a moment ago, most often): 503, unless
    /// the others serve every shard.
    Unreachable(String),
}

/// The replicas' live states, read as one.
pub struct Fleet {
    live: Arc<Live>,
    shards: Arc<Shards>,
    forwarder: Arc<Forwarder>,
    auth: HeaderValue,
    me: Arc<str>,
}

/// What a list or watch selects, as passed on to the other replicas.
pub struct Selection<'a> {
    /// The namespace (all when `None`).
    pub namespace: Option<&'a str>,
    /// The parsed selectors.
    pub query: &'a Query,
    /// The selectors as the client sent them.
    pub label_selector: Option<&'a str>,
    /// The field selector as sent.
    pub field_selector: Option<&'a str>,
    /// The `where` comparisons as sent.
    pub where_: Option<&'a str>,
}

impl Selection<'_> {
    /// A namespace that is no DNS name is refused before it is put in a path.
    fn check(&self) -> Result<(), Refused> {
        match self.namespace {
            Some(ns) if !valid_name(ns) => Err(Refused::BadRequest(format!(
                "{ns:?} is not a namespace name"
            ))),
            _ => Ok(()),
        }
    }

    /// The internal path and query for this selection with `extra` parameters.
    fn path(&self, extra: &[(&str, &str)]) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("labelSelector", self.label_selector),
            ("fieldSelector", self.field_selector),
            ("where", self.where_),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        for (k, v) in extra {
            q.append_pair(k, v);
        }
        let base = match self.namespace {
            Some(ns) => format!("{}/namespaces/{ns}/devicestates", peer::PREFIX),
            None => format!("{}/devicestates", peer::PREFIX),
        };
        format!("{base}?{}", q.finish())
    }
}

impl Fleet {
    /// Reads through `forwarder`, presenting `token` to the other replicas.
    pub fn new(
        live: Arc<Live>,
        shards: Arc<Shards>,
        forwarder: Arc<Forwarder>,
        token: &Secret,
    ) -> Self {
        // `peer_token` accepts only tokens that make a header value.
        let auth = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer -"));
        Self {
            me: Arc::from(shards.identity()),
            live,
            shards,
            forwarder,
            auth,
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut auth = self.auth.clone();
        auth.set_sensitive(true);
        h.insert(header::AUTHORIZATION, auth);
        h
    }

    /// Asks replica `identity` at `address` for `path`: its answer, with its status checked.
    async fn ask(&self, identity: &str, address: &str, path: &str) -> Result<Body, Refused> {
        let response = self
            .forwarder
            .read(address, path, self.headers())
            .await
            .map_err(|outcome| {
                let message = format!(
                    "controller replica {identity} could not be asked ({}); retry in a moment",
                    outcome.label()
                );
                match outcome {
                    Outcome::Unreachable => Refused::Unreachable(message),
                    _ => Refused::Unavailable(message),
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.into_body());
        }
        let body = axum::body::to_bytes(response.into_body(), 64 << 10)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map_or_else(|_| status.to_string(), |e| e.error.message);
        Err(if status == StatusCode::BAD_REQUEST {
            Refused::BadRequest(message)
        } else {
            Refused::Unavailable(format!(
                "controller replica {identity} answered {status}: {message}"
            ))
        })
    }

    async fn fetch<T: DeserializeOwned>(
        &self,
        identity: &str,
        address: &str,
        path: &str,
    ) -> Result<T, Refused> {
        let body = self.ask(identity, address, path).await?;
        let bytes = axum::body::to_bytes(body, MAX_ANSWER).await.map_err(|e| {
            Refused::Unavailable(format!(
                "reading controller replica {identity}'s answer: {e}"
            ))
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Refused::Unavailable(format!(
                "controller replica {identity} answered what this replica cannot read (a different version?): {e}"
            ))
        })
    }

    /// `path` asked of every other live replica at once, each answer with its replica.
    async fn fetch_all<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Vec<(Arc<str>, Result<T, Refused>)> {
        let peers = self.shards.peers();
        let answers = futures_util::future::join_all(
            peers
                .iter()
                .map(|(id, address)| self.fetch::<T>(id, address, path)),
        )
        .await;
        peers.into_iter().map(|(id, _)| id).zip(answers).collect()
    }

    fn covered<'a>(&self, served: impl IntoIterator<Item = &'a [u32]>) -> Result<(), Refused> {
        let missing = unserved(self.shards.count(), served);
        if missing.is_empty() {
            return Ok(());
        }
        Err(Refused::Unavailable(format!(
            "shards {missing:?} are moving between controller replicas (no replica serves them yet); retry in a moment"
        )))
    }

    /// Up to `limit` devices of the selection after `after` (a `continue` token), merged
    /// from every replica.
    ///
    /// # Errors
    /// See [`Refused`].
    pub async fn list(
        &self,
        selection: &Selection<'_>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Merged, Refused> {
        selection.check()?;
        let limit_text = limit.to_string();
        let mut extra = vec![("limit", limit_text.as_str())];
        if let Some(a) = after {
            extra.push(("continue", a));
        }
        let path = selection.path(&extra);
        let answers = self.fetch_all::<PageOf<Received>>(&path).await;
        let here = self.shards.served_shards();
        let peer::ServedPage {
            resource_version,
            items,
            next,
        } = peer::served_page(
            &self.live,
            &here,
            self.shards.count(),
            selection.namespace,
            selection.query,
            limit,
            after,
        )
        .map_err(|e| Refused::BadRequest(e.to_string()))?;
        let mut served = vec![here];
        let mut pages = vec![SourcePage {
            identity: Arc::clone(&self.me),
            items,
            resource_version,
            next,
        }];
        let mut failed = None;
        for (identity, answer) in answers {
            let page = match answer {
                Ok(page) => page,
                Err(r @ Refused::BadRequest(_)) => return Err(r),
                // Not needed if the others serve every shard (a replica killed a moment ago
                // whose shards were taken over): checked below.
                Err(r) => {
                    failed = Some(r);
                    continue;
                }
            };
            let next = match page.next.as_deref().map(parse_continue).transpose() {
                Ok(n) => n.map(Arc::new),
                Err(e) => return Err(Refused::Unavailable(e.to_string())),
            };
            served.push(page.served);
            pages.push(SourcePage {
                identity,
                items: page
                    .items
                    .into_iter()
                    .filter_map(Received::into_state)
                    .collect(),
                resource_version: page.resource_version,
                next,
            });
        }
        self.covered(served.iter().map(Vec::as_slice))
            .map_err(|r| failed.unwrap_or(r))?;
        Ok(merge_pages(pages, limit))
    }

    /// Device `key`'s newest state among the replicas, with the replica and its version
    /// there.
    ///
    /// # Errors
    /// See [`Refused`].
    pub async fn get(
        &self,
        key: &Key,
    ) -> Result<Option<(Arc<DeviceState>, Arc<str>, u64)>, Refused> {
        if !valid_name(&key.0) || !valid_name(&key.1) {
            return Ok(None);
        }
        // Held here for a shard served here: this replica takes its reports, so it holds the
        // newest.
        let here = self.shards.served_shards();
        if let Some((state, rv)) = self.live.read().get(key)
            && here.contains(&shard_of(&key.0, &state.node, self.shards.count()))
        {
            return Ok(Some((state, Arc::clone(&self.me), rv)));
        }
        let path = format!(
            "{}/namespaces/{}/devicestates/{}",
            peer::PREFIX,
            key.0,
            key.1
        );
        let answers = self.fetch_all::<OneOf<Received>>(&path).await;
        let mut served = vec![here];
        let mut found = Vec::new();
        let mut failed = None;
        for (identity, answer) in answers {
            let one = match answer {
                Ok(one) => one,
                Err(r) => {
                    failed = Some(r);
                    continue;
                }
            };
            served.push(one.served);
            if let Some((_, state, rv)) = one.item.and_then(Received::into_state) {
                found.push((state, identity, rv));
            }
        }
        // Found or not, the answer stands only if every shard was asked: a replica that did
        // not answer may hold a newer state.
        self.covered(served.iter().map(Vec::as_slice))
            .map_err(|r| failed.unwrap_or(r))?;
        Ok(newest(found))
    }

    /// Every replica's changes of the selection, each from where `from` says it stands (a
    /// replica not in it first lists).
    ///
    /// # Errors
    /// [`Refused::Unavailable`] when a replica does not begin its watch.
    pub async fn watch(
        &self,
        selection: &Selection<'_>,
        from: Option<&Vector>,
    ) -> Result<Vec<(Arc<str>, Steps)>, Refused> {
        selection.check()?;
        let cursor = |rv: Option<u64>| {
            let ns = selection.namespace.map(str::to_owned);
            match rv {
                Some(rv) => Cursor::resuming(ns, selection.query.clone(), rv),
                None => Cursor::listing(ns, selection.query.clone()),
            }
        };
        let mut sources = vec![(
            Arc::clone(&self.me),
            source::local(
                Arc::clone(&self.live),
                cursor(from.and_then(|v| v.get(&self.me))),
                Some(Arc::clone(&self.shards)),
            ),
        )];
        let peers = self.shards.peers();
        let opened = futures_util::future::join_all(peers.iter().map(|(id, address)| {
            let rv = from.and_then(|v| v.get(id)).map(|rv| rv.to_string());
            let mut extra = vec![("watch", "1")];
            if let Some(rv) = rv.as_deref() {
                extra.push(("resourceVersion", rv));
            }
            let path = selection.path(&extra);
            async move { self.ask(id, address, &path).await }
        }))
        .await;
        for ((identity, _), body) in peers.iter().zip(opened) {
            match body {
                Ok(body) => sources.push((Arc::clone(identity), steps(body))),
                // A replica that cannot be reached at all is most often one killed a moment
                // ago: it takes no reports, and its shards' new owners speak for them. The
                // watch ends when the live replicas change, so a replica that comes back
                // is read again.
                Err(Refused::Unreachable(m)) => {
                    debug!(replica = %identity, reason = m, "A replica is left out of a watch")
                }
                Err(r) => return Err(r),
            }
        }
        let members: BTreeSet<Arc<str>> = peers.into_iter().map(|(i, _)| i).collect();
        sources.push((
            Arc::from(""),
            until_members_change(Arc::clone(&self.shards), members),
        ));
        Ok(sources)
    }
}

/// A source that says nothing and ends once the live replicas are no longer `members` (the
/// merged watch ends with it; the client watches again, from every live replica).
fn until_members_change(shards: Arc<Shards>, members: BTreeSet<Arc<str>>) -> Steps {
    futures_util::stream::unfold((), move |()| {
        let (shards, members) = (Arc::clone(&shards), members.clone());
        async move {
            loop {
                tokio::time::sleep(source::PROGRESS_EVERY).await;
                let now: BTreeSet<Arc<str>> = shards.peers().into_iter().map(|(i, _)| i).collect();
                if now != members {
                    return None::<(Step, ())>;
                }
            }
        }
    })
    .boxed()
}

/// A replica's watch answer as steps; it ends at the first line that cannot be read.
fn steps(body: Body) -> Steps {
    let bytes = body.into_data_stream().map_err(std::io::Error::other);
    let lines = FramedRead::new(
        StreamReader::new(bytes),
        LinesCodec::new_with_max_length(MAX_ANSWER),
    );
    // A replica says how far it has read every `PROGRESS_EVERY`: one silent for three of
    // them is stuck (its connection gone without a reset), and the watch ends.
    futures_util::stream::unfold(lines, |mut lines| async move {
        let line = tokio::time::timeout(3 * source::PROGRESS_EVERY, lines.next())
            .await
            .ok()??;
        Some((line, lines))
    })
    .map(|line| {
        let event: EventOf<Received> = match line.map(|l| serde_json::from_str(&l)) {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => {
                warn!(error = %e, "A replica's watch sent a line this replica cannot read (a different version?); the watch ends");
                return None;
            }
            Err(e) => {
                debug!(error = %e, "A replica's watch ended");
                return None;
            }
        };
        let item = |kind: Kind, item: Received, listed_at: Option<u64>| {
            let (key, state, rv) = item.into_state()?;
            Some(Step::Items(vec![(kind, key, state, rv)], listed_at))
        };
        match event {
            EventOf::Added { item: i, listed_at } => item(Kind::Added, i, listed_at),
            EventOf::Modified { item: i } => item(Kind::Modified, i, None),
            EventOf::Deleted { item: i } => item(Kind::Deleted, i, None),
            EventOf::Progress { resource_version } => Some(Step::Progress(resource_version)),
            EventOf::Gone { message } => Some(Step::Gone(message)),
        }
    })
    .take_while(|step| std::future::ready(step.is_some()))
    .filter_map(std::future::ready)
    .boxed()
}
