//! The live state in memory: each Device's newest report, a resource version that orders
//! every change, a bounded window of recent changes for watches to resume from, and lists
//! in pages. Pure: no I/O and no clock (callers pass `received_at`).
//!
//! As the API server does: resource versions only grow; a watch resumed from a version still
//! in the window gets every change after it, in order; one from before the window gets
//! [`Gone`] (410) and must list again. A list page ends with a `continue` token naming the
//! last device returned, so the next page starts after it whatever changed meanwhile (a
//! device is never returned twice, and one that existed throughout is never skipped).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::query::{Candidate, Query};
use crate::doc::Doc;
use crate::stamp::Stamp;

/// Namespace and name.
pub type Key = (String, String);

/// Bits of a resource version that count changes (10^12: years at 20,000 changes/s).
const CHANGE_BITS: u32 = 40;
/// Bits of a resource version that name the store's incarnation (so it stays below 2^63).
pub const INCARNATION_BITS: u32 = 23;

/// The most devices one page holds, whatever `limit` a client asks for: a list of a large
/// fleet is never one response.
pub const MAX_PAGE: usize = 5_000;

/// A Device's labels, shared by its successive states while they do not change.
pub type Labels = Arc<BTreeMap<String, String>>;

/// One device's live state.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// The Device's labels (for label selectors).
    pub labels: Labels,
    /// The EdgeNode that reports it.
    pub node: Arc<str>,
    /// The newest accepted reported document (the one its status write holds too).
    pub reported: Doc,
    /// Its `(epoch generation, version)`.
    pub stamp: Stamp,
    /// When the agent took the device's message (RFC 3339, as the agent sent it).
    pub reported_at: String,
    /// The Device generation whose desired state the agent had applied.
    pub observed_desired_generation: i64,
    /// When the controller received it (ms since the epoch).
    pub received_at_ms: i64,
    /// Whether the device is connected, as its agent last said (`None`: not said).
    pub online: Option<bool>,
    /// Whether reported matches the Device's desired state (`None`: not known yet).
    pub in_sync: Option<bool>,
}

/// What happened to a device at a resource version.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Its state is new or newer.
    Applied {
        /// The state now.
        state: Arc<DeviceState>,
        /// The state before, if any: a filtered watch needs it to tell a device that stops
        /// matching (DELETED) from one that changes (MODIFIED) or starts matching (ADDED).
        previous: Option<Arc<DeviceState>>,
    },
    /// It is gone (its Device was deleted), with its last state.
    Deleted(Arc<DeviceState>),
}

/// One entry of the watch window.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The resource version of the change.
    pub resource_version: u64,
    /// Which device.
    pub key: Arc<Key>,
    /// What happened.
    pub change: Change,
}

/// A watch asked to resume from before the window (HTTP 410: list again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too old resource version: {asked} (the oldest this replica can resume from is {oldest})")]
pub struct Gone {
    /// The version asked for.
    pub asked: u64,
    /// The oldest one that can be resumed from.
    pub oldest: u64,
}

/// One page of a list. `R` is its resource versions: this store's, or (a page merged from
/// every replica's, see `live::merge`) each replica's position.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<R = u64> {
    /// The matching devices, in key order.
    pub items: Vec<(Arc<Key>, Arc<DeviceState>, R)>,
    /// The store's resource version when the page was read (a watch from it misses nothing).
    pub resource_version: R,
    /// Where the next page starts; `None` on the last page.
    pub continue_token: Option<String>,
}

/// A `continue` token that does not come from this store's list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid continue token: it must be one a previous page of this list returned")]
pub struct BadContinue;

/// The live states of every device, with their change window.
#[derive(Debug)]
pub struct LiveStore {
    states: BTreeMap<Arc<Key>, (Arc<DeviceState>, u64)>,
    resource_version: u64,
    window: VecDeque<(Event, usize)>,
    window_len: usize,
    window_max_bytes: usize,
    window_bytes: usize,
    state_bytes: usize,
    /// The resource version when devices were last dropped for a shard gone elsewhere.
    moved_at: u64,
}

/// About how many bytes a state holds in memory: its reported document (kept as its JSON
/// text), its report time, and the fixed fields with their allocations' overhead. Labels and
/// the node name are shared with the device's other states, so they are not counted.
pub fn state_bytes(state: &DeviceState) -> usize {
    state.reported.len() + state.reported_at.len() + 200
}

impl LiveStore {
    /// An empty store whose watch window keeps the last `window_len` changes, and fewer
    /// when the states they hold reach `window_max_bytes`.
    pub fn new(window_len: usize, window_max_bytes: usize) -> Self {
        Self::with_incarnation(window_len, window_max_bytes, 0)
    }

    /// As [`LiveStore::new`], with resource versions that carry `incarnation` (its low
    /// [`INCARNATION_BITS`] bits) above the change count. A resource version from another
    /// incarnation (a restarted controller, another replica) is then never mistaken for one
    /// of this store's: a watch from it gets [`Gone`] and lists again, instead of silently
    /// missing the changes its number skips.
    pub fn with_incarnation(window_len: usize, window_max_bytes: usize, incarnation: u64) -> Self {
        Self {
            states: BTreeMap::new(),
            resource_version: (incarnation & ((1 << INCARNATION_BITS) - 1)) << CHANGE_BITS,
            window: VecDeque::with_capacity(window_len.min(1 << 16)),
            window_len: window_len.max(1),
            window_max_bytes,
            window_bytes: 0,
            state_bytes: 0,
            moved_at: 0,
        }
    }

    /// About how many bytes the current states hold ([`state_bytes`] summed).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// About how many bytes the watch window holds beyond the current states.
    pub fn window_bytes(&self) -> usize {
        self.window_bytes
    }

    /// Changes in the watch window.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// Devices held.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no device is held.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// A device's state and the version it changed at.
    pub fn get(&self, key: &Key) -> Option<(Arc<DeviceState>, u64)> {
        self.states.get(key).cloned()
    }

    /// Takes `state` for `key` when it is newer than what is held (by stamp); returns the
    /// change's resource version, or `None` for an older or equal stamp (a resend or a
    /// reordered batch), which changes nothing.
    pub fn apply(&mut self, key: Key, state: DeviceState) -> Option<u64> {
        if self
            .states
            .get(&key)
            .is_some_and(|(held, _)| held.stamp >= state.stamp)
        {
            return None;
        }
        Some(self.put(key, state))
    }

    /// Changes a device's labels and in-sync view (its Device changed, not its report);
    /// returns the change's resource version, or `None` when it is not held or nothing
    /// differs.
    pub fn set_meta(
        &mut self,
        key: &Key,
        labels: &BTreeMap<String, String>,
        in_sync: Option<bool>,
    ) -> Option<u64> {
        let (held, _) = self.states.get(key)?;
        if *held.labels == *labels && held.in_sync == in_sync {
            return None;
        }
        let state = DeviceState {
            labels: Arc::new(labels.clone()),
            in_sync,
            ..DeviceState::clone(held)
        };
        Some(self.put(key.clone(), state))
    }

    fn put(&mut self, key: Key, mut state: DeviceState) -> u64 {
        let bytes = state_bytes(&state);
        let (key, previous) = match self.states.remove_entry(&key) {
            Some((key, (previous, _))) => {
                self.state_bytes -= state_bytes(&previous);
                // One copy of what did not change, however many states the window holds.
                if previous.labels == state.labels {
                    state.labels = Arc::clone(&previous.labels);
                }
                if previous.node == state.node {
                    state.node = Arc::clone(&previous.node);
                }
                (key, Some(previous))
            }
            None => (Arc::new(key), None),
        };
        let state = Arc::new(state);
        self.state_bytes += bytes;
        let change = Change::Applied {
            state: state.clone(),
            previous,
        };
        let rv = self.record(key.clone(), change, bytes);
        self.states.insert(key, (state, rv));
        rv
    }

    /// Drops, without a change a watch would see, every device `keep` refuses: those of shards
    /// gone to another replica, which will serve them from now on (a `DELETED` would tell
    /// watchers they are gone). Returns how many were dropped.
    pub fn forget(&mut self, mut keep: impl FnMut(&Key, &DeviceState) -> bool) -> usize {
        self.moved_at = self.resource_version;
        let before = self.states.len();
        let mut freed = 0;
        self.states.retain(|key, (state, _)| {
            let kept = keep(key, state);
            if !kept {
                freed += state_bytes(state);
            }
            kept
        });
        self.state_bytes -= freed;
        before - self.states.len()
    }

    /// The resource version when devices were last dropped for a shard gone elsewhere: a
    /// watch still behind it may have changes of theirs to send that no replica sends now.
    pub fn moved_at(&self) -> u64 {
        self.moved_at
    }

    /// Drops one device as [`LiveStore::forget`] does; whether it was held.
    pub fn forget_one(&mut self, key: &Key) -> bool {
        self.moved_at = self.resource_version;
        match self.states.remove(key) {
            Some((state, _)) => {
                self.state_bytes -= state_bytes(&state);
                true
            }
            None => false,
        }
    }

    /// Forgets a device (its Device was deleted); returns the change's resource version.
    pub fn remove(&mut self, key: &Key) -> Option<u64> {
        let (key, (state, _)) = self.states.remove_entry(key)?;
        let bytes = state_bytes(&state);
        self.state_bytes -= bytes;
        Some(self.record(key, Change::Deleted(state), bytes))
    }

    /// Appends a change to the window. `bytes` is what it keeps alive once its device
    /// changes again; the oldest changes leave past either bound.
    fn record(&mut self, key: Arc<Key>, change: Change, bytes: usize) -> u64 {
        self.resource_version += 1;
        self.window.push_back((
            Event {
                resource_version: self.resource_version,
                key,
                change,
            },
            bytes,
        ));
        self.window_bytes += bytes;
        while self.window.len() > self.window_len
            || (self.window_bytes > self.window_max_bytes && self.window.len() > 1)
        {
            if let Some((_, b)) = self.window.pop_front() {
                self.window_bytes -= b;
            }
        }
        self.resource_version
    }

    /// The oldest version a watch can resume from: every change after it is in the window.
    pub fn oldest_resumable(&self) -> u64 {
        self.window
            .front()
            .map_or(self.resource_version, |(e, _)| e.resource_version - 1)
    }

    /// Every change after `since` (a resource version a list or watch returned), oldest
    /// first, or [`Gone`] when some have left the window, or `since` is not this store's
    /// (another incarnation's, or ahead of it).
    pub fn changes_since(&self, since: u64) -> Result<impl Iterator<Item = &Event>, Gone> {
        let oldest = self.oldest_resumable();
        if since < oldest || since > self.resource_version {
            return Err(Gone {
                asked: since,
                oldest,
            });
        }
        // The window is in version order: skip what the caller has.
        let skip = self
            .window
            .partition_point(|(e, _)| e.resource_version <= since);
        Ok(self.window.iter().skip(skip).map(|(e, _)| e))
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) devices of `namespace` (all namespaces when
    /// `None`) that `query` selects, after the device `continue_token` names.
    pub fn list(
        &self,
        namespace: Option<&str>,
        query: &Query,
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<Page, BadContinue> {
        let after = continue_token.map(parse_continue).transpose()?;
        let start: std::ops::Bound<Key> = match (&after, namespace) {
            (Some(key), _) => std::ops::Bound::Excluded(key.clone()),
            (None, Some(ns)) => std::ops::Bound::Included((ns.to_owned(), String::new())),
            (None, None) => std::ops::Bound::Unbounded,
        };
        if let (Some((ns, _)), Some(want)) = (&after, namespace)
            && ns != want
        {
            return Err(BadContinue);
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let mut items = Vec::new();
        let mut more = false;
        for (key, (state, rv)) in self
            .states
            .range::<Key, _>((start, std::ops::Bound::Unbounded))
        {
            if namespace.is_some_and(|ns| key.0 != ns) {
                break;
            }
            if !query.matches(&candidate(key, state)) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push((key.clone(), state.clone(), *rv));
        }
        let continue_token = more
            .then(|| items.last().map(|(key, _, _)| encode_continue(key)))
            .flatten();
        Ok(Page {
            items,
            resource_version: self.resource_version,
            continue_token,
        })
    }
}

/// A device as a query sees it.
pub fn candidate<'a>(key: &'a Key, state: &'a DeviceState) -> Candidate<'a> {
    Candidate {
        name: &key.1,
        namespace: &key.0,
        labels: &state.labels,
        node: &state.node,
        reported: &state.reported,
    }
}

/// `namespace/name`: both are DNS names, so `/` cannot occur in either.
/// The `continue` token naming `key`: the next page starts after it.
pub fn encode_continue(key: &Key) -> String {
    format!("{}/{}", key.0, key.1)
}

/// Whether `s` can be a namespace or object name (a DNS subdomain).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The device a `continue` token names.
pub fn parse_continue(token: &str) -> Result<Key, BadContinue> {
    let (ns, name) = token.split_once('/').ok_or(BadContinue)?;
    (valid_name(ns) && valid_name(name))
        .then(|| (ns.to_owned(), name.to_owned()))
        .ok_or(BadContinue)
}

/// A state of node `edge-1`, label `line=a`, reporting `temperature` at `version` (epoch
/// generation 1), for the live modules' tests.
#[cfg(test)]
pub(crate) fn test_state(version: u64, temperature: f64) -> DeviceState {
    DeviceState {
        labels: Arc::new(BTreeMap::from([("line".to_owned(), "a".to_owned())])),
        node: "edge-1".into(),
        reported: Doc::of(
            serde_json::json!({"temperature": temperature})
                .as_object()
                .unwrap_or(&serde_json::Map::new()),
        ),
        stamp: Stamp::new(1, version),
        reported_at: "2026-12-07T08:00:00Z".into(),
        observed_desired_generation: 0,
        received_at_ms: 0,
        online: None,
        in_sync: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    use super::test_state as state;

    #[test]
    fn only_newer_stamps_change_a_device_and_each_change_gets_the_next_version() {
        let mut s = LiveStore::new(100, usize::MAX);
        assert_eq!(s.apply(key("a", "d1"), state(2, 20.0)), Some(1));
        // A resend and a reordered older report change nothing.
        assert_eq!(s.apply(key("a", "d1"), state(2, 20.0)), None);
        assert_eq!(s.apply(key("a", "d1"), state(1, 10.0)), None);
        assert_eq!(s.apply(key("a", "d2"), state(1, 5.0)), Some(2));
        assert_eq!(s.apply(key("a", "d1"), state(3, 30.0)), Some(3));
        let (d1, rv) = s.get(&key("a", "d1")).unwrap();
        assert_eq!((d1.stamp, rv), (Stamp::new(1, 3), 3));
        // A newer epoch supersedes whatever its version.
        let mut reinstalled = state(1, 1.0);
        reinstalled.stamp = Stamp::new(2, 1);
        assert_eq!(s.apply(key("a", "d1"), reinstalled), Some(4));
        assert_eq!(s.remove(&key("a", "d2")), Some(5));
        assert_eq!(s.remove(&key("a", "d2")), None);
        assert_eq!((s.len(), s.resource_version()), (1, 5));
    }

    #[test]
    fn a_watch_resumes_inside_the_window_and_is_gone_before_it() {
        let mut s = LiveStore::new(3, usize::MAX);
        for v in 1..=5 {
            s.apply(key("a", "d1"), state(v, v as f64));
        }
        // Versions 3, 4 and 5 are in the window: resuming from 2 on misses nothing.
        assert_eq!(s.oldest_resumable(), 2);
        let after: Vec<u64> = s
            .changes_since(3)
            .unwrap()
            .map(|e| e.resource_version)
            .collect();
        assert_eq!(after, [4, 5]);
        assert_eq!(s.changes_since(2).unwrap().count(), 3);
        assert_eq!(s.changes_since(5).unwrap().count(), 0);
        assert_eq!(
            s.changes_since(1).err(),
            Some(Gone {
                asked: 1,
                oldest: 2
            })
        );
        // An empty store can be watched from its current version.
        assert_eq!(
            LiveStore::new(3, usize::MAX)
                .changes_since(0)
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn pages_follow_key_order_within_a_namespace_and_never_repeat_a_device() {
        let mut s = LiveStore::new(100, usize::MAX);
        for ns in ["a", "b"] {
            for i in 0..5 {
                s.apply(key(ns, &format!("d{i}")), state(1, f64::from(i) * 10.0));
            }
        }
        let hot = Query::parse(None, None, Some("temperature>=10")).unwrap();
        let first = s.list(Some("a"), &hot, 2, None).unwrap();
        let names = |p: &Page| {
            p.items
                .iter()
                .map(|(k, _, _)| k.1.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&first), ["d1", "d2"]);
        assert_eq!(first.continue_token.as_deref(), Some("a/d2"));
        // A device added and one removed between pages: the next page starts after d2.
        s.apply(key("a", "d0a"), state(1, 99.0));
        s.remove(&key("a", "d3"));
        let second = s
            .list(Some("a"), &hot, 2, first.continue_token.as_deref())
            .unwrap();
        assert_eq!(names(&second), ["d4"]);
        assert_eq!(second.continue_token, None);
        // All namespaces, and a token from another namespace or made up.
        let all = s.list(None, &Query::default(), 100, None).unwrap();
        assert_eq!(all.items.len(), 10);
        // A page never exceeds MAX_PAGE, whatever the client asks.
        let mut big = LiveStore::new(1, usize::MAX);
        for i in 0..=MAX_PAGE {
            big.apply(key("a", &format!("d{i}")), state(1, 0.0));
        }
        let page = big.list(None, &Query::default(), usize::MAX, None).unwrap();
        assert_eq!(page.items.len(), MAX_PAGE);
        assert!(page.continue_token.is_some());
        assert_eq!(s.list(Some("b"), &hot, 2, Some("a/d2")), Err(BadContinue));
        assert_eq!(s.list(None, &hot, 2, Some("../etc")), Err(BadContinue));
    }

    #[test]
    fn the_window_is_bounded_in_bytes_and_remembers_what_each_change_replaced() {
        let one = state_bytes(&state(1, 1.0));
        let mut s = LiveStore::new(1_000, 3 * one);
        for v in 1..=10 {
            s.apply(key("a", "d1"), state(v, 1.0));
        }
        assert!(s.window_bytes() <= 3 * one, "{}", s.window_bytes());
        assert_eq!(s.window_len(), 3);
        assert_eq!(s.oldest_resumable(), 7);
        assert_eq!(s.state_bytes(), one);
        let last = s.changes_since(9).unwrap().next().unwrap().clone();
        let Change::Applied {
            state: now,
            previous,
        } = last.change
        else {
            panic!("{last:?}")
        };
        assert_eq!(now.stamp.version, 10);
        assert_eq!(previous.map(|p| p.stamp.version), Some(9));
        // Labels and the in-sync view change without a newer report; the same again does not.
        let labels = BTreeMap::from([("line".to_owned(), "b".to_owned())]);
        assert_eq!(s.set_meta(&key("a", "d1"), &labels, Some(true)), Some(11));
        assert_eq!(s.set_meta(&key("a", "d1"), &labels, Some(true)), None);
        assert_eq!(s.set_meta(&key("a", "nope"), &labels, None), None);
        let (held, _) = s.get(&key("a", "d1")).unwrap();
        assert_eq!(
            (held.labels["line"].as_str(), held.in_sync),
            ("b", Some(true))
        );
        assert_eq!(held.stamp.version, 10);
        s.remove(&key("a", "d1"));
        assert_eq!(s.state_bytes(), 0);
    }
}
