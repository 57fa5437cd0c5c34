//! What one watch of DeviceStates sends next, read from the store in bounded chunks. Pure:
//! the handler holds the lock for one [`Cursor::next`] call and streams what it returns.
//!
//! As the API server's watch cache does:
//! - a watch without a resource version (or `0`) first sends every selected device as
//!   `ADDED` (read page by page), then the changes after the first page's version; a device
//!   that changed while later pages were read is sent once per change, never older than what
//!   its page showed;
//! - a watch from a version gets every change after it, or [`Gone`] when the window no
//!   longer holds them;
//! - with a selector, a device that starts matching is `ADDED`, one that stops is `DELETED`.

use std::collections::HashMap;
use std::sync::Arc;

use super::query::Query;
use super::store::{Change, DeviceState, Event, Gone, Key, LiveStore, candidate};

/// A watch event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Newly selected.
    Added,
    /// Changed, selected before and after.
    Modified,
    /// Gone, or no longer selected.
    Deleted,
}

impl Kind {
    /// As the API server writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One event to send: its type, the device, its state and resource version.
pub type Item = (Kind, Arc<Key>, Arc<DeviceState>, u64);

/// What a watch of `namespace` (all when `None`) selecting `query` makes of a change.
pub fn seen(event: &Event, namespace: Option<&str>, query: &Query) -> Option<Item> {
    let key = &event.key;
    if namespace.is_some_and(|ns| key.0 != ns) {
        return None;
    }
    let selects = |s: &DeviceState| query.matches(&candidate(key, s));
    let (kind, state) = match &event.change {
        Change::Applied { state, previous } => {
            let before = previous.as_deref().is_some_and(selects);
            match (before, selects(state)) {
                (true, true) => (Kind::Modified, state),
                (false, true) => (Kind::Added, state),
                (true, false) => (Kind::Deleted, state),
                (false, false) => return None,
            }
        }
        Change::Deleted(state) if selects(state) => (Kind::Deleted, state),
        Change::Deleted(_) => return None,
    };
    Some((kind, key.clone(), state.clone(), event.resource_version))
}

/// Where a watch is.
#[derive(Debug)]
pub struct Cursor {
    namespace: Option<String>,
    query: Query,
    /// Every change up to this version has been sent (or skipped).
    rv: u64,
    /// While listing: where the next page starts (`Some(None)`: the first page).
    listing: Option<Option<String>>,
    /// Devices a later page showed at a version after `rv`: their changes up to it were
    /// already sent with the page.
    listed: HashMap<Arc<Key>, u64>,
}

impl Cursor {
    /// A watch that first lists every selected device.
    pub fn listing(namespace: Option<String>, query: Query) -> Self {
        Self {
            namespace,
            query,
            rv: 0,
            listing: Some(None),
            listed: HashMap::new(),
        }
    }

    /// A watch resuming after version `rv`.
    pub fn resuming(namespace: Option<String>, query: Query, rv: u64) -> Self {
        Self {
            namespace,
            query,
            rv,
            listing: None,
            listed: HashMap::new(),
        }
    }

    /// Whether the next call sends a page of the initial list (whose devices may have
    /// changed after [`Cursor::resource_version`], the version the list was read at).
    pub fn is_listing(&self) -> bool {
        self.listing.is_some()
    }

    /// Every change up to this version has been sent: a bookmark here misses nothing.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Up to `max` events to send next (empty: nothing new), or [`Gone`] when the watch
    /// fell behind the window. Reads at most `4 * max` changes, so one call holds the store
    /// briefly however selective the query is.
    pub fn next(&mut self, store: &LiveStore, max: usize) -> Result<Vec<Item>, Gone> {
        let max = max.max(1);
        if let Some(after) = self.listing.take() {
            // Continue tokens are made by the same store, so they always parse.
            let Ok(page) = store.list(
                self.namespace.as_deref(),
                &self.query,
                max,
                after.as_deref(),
            ) else {
                return Ok(Vec::new());
            };
            if after.is_none() {
                self.rv = page.resource_version;
            }
            let first = self.rv;
            self.listing = page.continue_token.map(Some);
            let items = page
                .items
                .into_iter()
                .map(|(key, state, rv)| {
                    if rv > first {
                        self.listed.insert(key.clone(), rv);
                    }
                    (Kind::Added, key, state, rv)
                })
                .collect();
            return Ok(items);
        }
        let mut items = Vec::new();
        for event in store.changes_since(self.rv)?.take(4 * max) {
            self.rv = event.resource_version;
            if self
                .listed
                .get(&event.key)
                .is_some_and(|shown| *shown >= event.resource_version)
            {
                continue;
            }
            if let Some(item) = seen(event, self.namespace.as_deref(), &self.query) {
                items.push(item);
                if items.len() == max {
                    break;
                }
            }
        }
        if self.listed.values().all(|shown| *shown <= self.rv) {
            self.listed.clear();
        }
        Ok(items)
    }

    /// Whether there is more to read now: the initial list is still being sent, or changes
    /// in `store` after [`Cursor::resource_version`] have not been looked at yet (a call
    /// reads a bounded number). A watch waits for the next change only when there is not.
    pub fn has_more(&self, store: &LiveStore) -> bool {
        self.listing.is_some() || self.rv < store.resource_version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::store::test_state as state;

    fn key(name: &str) -> Key {
        ("a".to_owned(), name.to_owned())
    }

    fn kinds(items: &[Item]) -> Vec<(&'static str, String, u64)> {
        items
            .iter()
            .map(|(k, key, s, _)| (k.as_str(), key.1.clone(), s.stamp.version))
            .collect()
    }

    #[test]
    fn a_selective_watch_reads_a_bounded_number_of_changes_per_call_and_says_there_are_more() {
        let mut s = LiveStore::new(100, usize::MAX);
        let hot = Query::parse(None, None, Some("temperature>5")).unwrap();
        let mut selective = Cursor::resuming(None, hot, 0);
        for v in 1..=9 {
            s.apply(key("d1"), state(v, 1.0));
        }
        assert!(selective.next(&s, 1).unwrap().is_empty());
        assert_eq!(selective.resource_version(), 4, "4 x max changes read");
        assert!(selective.has_more(&s));
        while selective.has_more(&s) {
            assert!(selective.next(&s, 1).unwrap().is_empty());
        }
        assert_eq!(selective.resource_version(), s.resource_version());
    }

    #[test]
    fn a_selector_turns_entering_and_leaving_into_added_and_deleted() {
        let mut s = LiveStore::new(100, usize::MAX);
        let hot = Query::parse(None, None, Some("temperature>50")).unwrap();
        let mut c = Cursor::resuming(Some("a".into()), hot, 0);
        s.apply(key("d1"), state(1, 10.0));
        s.apply(key("d1"), state(2, 60.0));
        s.apply(key("d1"), state(3, 70.0));
        s.apply(key("d1"), state(4, 20.0));
        s.apply(("b".into(), "d1".into()), state(1, 99.0));
        s.apply(key("d2"), state(1, 99.0));
        s.remove(&key("d2"));
        s.apply(key("d3"), state(1, 1.0));
        s.remove(&key("d3"));
        let items = c.next(&s, 100).unwrap();
        assert_eq!(
            kinds(&items),
            [
                ("ADDED", "d1".into(), 2),
                ("MODIFIED", "d1".into(), 3),
                ("DELETED", "d1".into(), 4),
                ("ADDED", "d2".into(), 1),
                ("DELETED", "d2".into(), 1),
            ]
        );
        assert_eq!(c.resource_version(), s.resource_version());
        assert!(c.next(&s, 100).unwrap().is_empty());
    }

    #[test]
    fn a_listing_watch_sends_each_device_once_then_only_newer_changes() {
        let mut s = LiveStore::new(100, usize::MAX);
        for name in ["d1", "d2", "d3"] {
            s.apply(key(name), state(1, 1.0));
        }
        let mut c = Cursor::listing(Some("a".into()), Query::default());
        let first = c.next(&s, 2).unwrap();
        assert_eq!(
            kinds(&first),
            [("ADDED", "d1".into(), 1), ("ADDED", "d2".into(), 1)]
        );
        assert!(c.has_more(&s));
        // d1 (already sent) and d3 (not yet) change between pages.
        s.apply(key("d1"), state(2, 1.0));
        s.apply(key("d3"), state(2, 1.0));
        let second = c.next(&s, 2).unwrap();
        assert_eq!(kinds(&second), [("ADDED", "d3".into(), 2)]);
        assert!(c.has_more(&s), "the changes made while listing");
        // d1's change follows; d3's is not sent again.
        let rest = c.next(&s, 10).unwrap();
        assert_eq!(kinds(&rest), [("MODIFIED", "d1".into(), 2)]);
        assert!(c.listed.is_empty());
    }

    #[test]
    fn chunks_are_bounded_and_a_watch_behind_the_window_is_gone() {
        let mut s = LiveStore::new(5, usize::MAX);
        let mut c = Cursor::resuming(None, Query::default(), 0);
        for v in 1..=3 {
            s.apply(key("d1"), state(v, 1.0));
        }
        assert_eq!(c.next(&s, 2).unwrap().len(), 2);
        assert_eq!(c.next(&s, 2).unwrap().len(), 1);
        assert!(!c.has_more(&s));
        for v in 4..=20 {
            s.apply(key("d1"), state(v, 1.0));
        }
        assert!(c.next(&s, 2).is_err());
    }
}
