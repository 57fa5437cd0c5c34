//! Reads of `devicestates` merged from every replica's live state, when replicas share the
//! fleet by shard (docs/design/scale-out.md). Pure: the fan-out is `fleet`'s.
//!
//! - **Pages.** Every replica lists in the same key order, and a `continue` token names the
//!   last device returned, so one token serves every replica: each returns its first devices
//!   after it, the pages are merged in key order and cut at the limit, and the next token is
//!   the last device kept. A replica's devices after its own page are after the cut, so none
//!   is skipped, and none is returned twice.
//! - **One device, the newest.** During a hand-over two replicas may hold the same device:
//!   the state with the newest `(epoch, version)` stamp wins.
//! - **Resource versions name each replica's position**: a [`Vector`] of identity and
//!   resource version, which a watch resumes every replica from. Replicas are told apart
//!   by identity; a replica absent from the vector (it joined since) is watched from a
//!   fresh list, one whose resource version is no longer its own (it restarted) answers 410
//!   and the client lists again, as with one replica.
//! - **Nothing silently missing.** Each replica says which shards it serves; a list, or a
//!   get that finds nothing, while some shard is served by nobody (a hand-over) is refused
//!   with 503 rather than answered without that shard's devices.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use super::store::{DeviceState, Key};

/// Each replica's resource version: where a merged list or watch stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vector(BTreeMap<Arc<str>, u64>);

impl Vector {
    /// Records `identity` at `rv`.
    pub fn set(&mut self, identity: &Arc<str>, rv: u64) {
        self.0.insert(Arc::clone(identity), rv);
    }

    /// Where `identity` stands, if it is in the vector.
    pub fn get(&self, identity: &str) -> Option<u64> {
        self.0.get(identity).copied()
    }

    /// A vector of one replica's version (a single object's resource version).
    pub fn one(identity: &Arc<str>, rv: u64) -> Self {
        let mut v = Self::default();
        v.set(identity, rv);
        v
    }

    /// Reads a vector this API returned; `None` for anything else (a version from before
    /// the fleet was sharded, or made up): the client must list again.
    pub fn parse(text: &str) -> Option<Self> {
        let mut v = BTreeMap::new();
        for part in text.split(',') {
            let (identity, rv) = part.split_once('=')?;
            if identity.is_empty() || identity.len() > 253 {
                return None;
            }
            v.insert(Arc::from(identity), rv.parse().ok()?);
        }
        Some(Self(v))
    }
}

/// As it is sent: `identity=rv,...` in identity order (replica identities are pod names,
/// without `,` or `=`).
impl fmt::Display for Vector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (identity, rv)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{identity}={rv}")?;
        }
        Ok(())
    }
}

/// One replica's page of a list.
#[derive(Debug, Clone)]
pub struct SourcePage {
    /// Its identity.
    pub identity: Arc<str>,
    /// Its devices, in key order, each at its resource version.
    pub items: Vec<(Arc<Key>, Arc<DeviceState>, u64)>,
    /// Its store's resource version when read.
    pub resource_version: u64,
    /// Where it stopped, when it has more devices after it (its `continue` position: its
    /// last device, or one past it that it left out).
    pub next: Option<Arc<Key>>,
}

/// A device from a replica: its key, state, the replica, and its version there.
pub type FromReplica = (Arc<Key>, Arc<DeviceState>, Arc<str>, u64);

/// A merged page: devices in key order, each with the replica it came from and its version
/// there.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The devices.
    pub items: Vec<FromReplica>,
    /// Every replica's resource version when read.
    pub resource_version: Vector,
    /// Where the next page starts (the last device's key), when there is one.
    pub after: Option<Arc<Key>>,
}

/// Merges the replicas' pages (each of at most `limit` devices after the same key) into
/// the first `limit` devices overall, the newest state of each.
pub fn merge_pages(pages: Vec<SourcePage>, limit: usize) -> Merged {
    let limit = limit.max(1);
    let mut resource_version = Vector::default();
    // The end of the keys every replica has returned in full: a replica with more stops
    // being complete after its last device.
    let mut bound: Option<Arc<Key>> = None;
    let mut by_key: BTreeMap<Arc<Key>, (Arc<DeviceState>, Arc<str>, u64)> = BTreeMap::new();
    for page in pages {
        resource_version.set(&page.identity, page.resource_version);
        if let Some(next) = page.next
            && bound.as_ref().is_none_or(|b| next < *b)
        {
            bound = Some(next);
        }
        for (key, state, rv) in page.items {
            match by_key.get(&key) {
                Some((held, _, _)) if held.stamp >= state.stamp => {}
                _ => {
                    by_key.insert(key, (state, Arc::clone(&page.identity), rv));
                }
            }
        }
    }
    let mut items = Vec::new();
    let mut after = None;
    for (key, (state, identity, rv)) in by_key {
        // Past a replica's last device, that replica may hold devices not returned yet.
        if items.len() == limit || bound.as_ref().is_some_and(|b| key > *b) {
            after = items
                .last()
                .map(|(k, _, _, _): &(Arc<Key>, _, _, _)| Arc::clone(k));
            break;
        }
        items.push((key, state, identity, rv));
    }
    // Every device up to the bound was taken: the next page starts after it (a replica
    // may have stopped past its last device returned).
    if after.is_none() && bound.is_some() {
        after = bound;
    }
    Merged {
        items,
        resource_version,
        after,
    }
}

/// The newest of the states the replicas hold for one device.
pub fn newest(
    found: impl IntoIterator<Item = (Arc<DeviceState>, Arc<str>, u64)>,
) -> Option<(Arc<DeviceState>, Arc<str>, u64)> {
    found.into_iter().max_by_key(|(state, _, _)| state.stamp)
}

/// The shards of `count` no replica serves, from what each said it serves.
pub fn unserved<'a>(count: u32, served: impl IntoIterator<Item = &'a [u32]>) -> Vec<u32> {
    let all: BTreeSet<u32> = served.into_iter().flatten().copied().collect();
    (0..count).filter(|s| !all.contains(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::query::Query;
    use crate::live::store::{LiveStore, test_state as state};
    use proptest::prelude::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn vectors_read_back_and_anything_else_is_refused() {
        let mut v = Vector::default();
        v.set(&id("r1"), 8);
        v.set(&id("r0"), 1 << 41);
        let text = v.to_string();
        assert_eq!(text, format!("r0={},r1=8", 1u64 << 41));
        assert_eq!(Vector::parse(&text), Some(v));
        for bad in ["", "12345", "r0=", "=4", "r0=4,", "r0=x"] {
            assert_eq!(Vector::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn coverage_names_the_shards_nobody_serves() {
        assert_eq!(unserved(4, [&[0, 1][..], &[3][..]]), [2]);
        assert!(unserved(2, [&[1][..], &[0, 1][..]]).is_empty());
    }

    /// Pages through replicas' stores with one token; what comes out is every device once,
    /// in key order, at its newest stamp.
    fn page_through(stores: &[(Arc<str>, LiveStore)], limit: usize) -> Vec<(Key, u64)> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..10_000 {
            let pages = stores
                .iter()
                .map(|(identity, s)| {
                    let p = s
                        .list(None, &Query::default(), limit, after.as_deref())
                        .unwrap();
                    SourcePage {
                        identity: Arc::clone(identity),
                        next: p
                            .continue_token
                            .map(|t| Arc::new(crate::live::store::parse_continue(&t).unwrap())),
                        items: p.items,
                        resource_version: p.resource_version,
                    }
                })
                .collect();
            let merged = merge_pages(pages, limit);
            assert!(merged.items.len() <= limit);
            out.extend(
                merged
                    .items
                    .iter()
                    .map(|(k, s, _, _)| (Key::clone(k), s.stamp.version)),
            );
            match merged.after {
                Some(k) => after = Some(format!("{}/{}", k.0, k.1)),
                None => return out,
            }
        }
        panic!("paging did not end");
    }

    proptest! {
        #[test]
        fn paging_any_split_of_devices_returns_each_once_in_order_at_its_newest(
            devices in proptest::collection::vec((0u8..40, 0usize..3, 1u64..5), 0..80),
            limit in 1usize..7,
        ) {
            let mut stores: Vec<(Arc<str>, LiveStore)> = ["r0", "r1", "r2"]
                .into_iter()
                .map(|i| (id(i), LiveStore::new(1000, usize::MAX)))
                .collect();
            let mut want: BTreeMap<Key, u64> = BTreeMap::new();
            for (name, replica, version) in devices {
                let key = ("a".to_owned(), format!("d{name:02}"));
                stores[replica].1.apply(key.clone(), state(version, 1.0));
                let newest = want.entry(key).or_default();
                *newest = (*newest).max(version);
            }
            let got = page_through(&stores, limit);
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_short_page_from_one_replica_cuts_the_merge_at_its_last_device() {
        let mk = |identity: &str, names: &[&str], more: bool| SourcePage {
            identity: id(identity),
            next: more
                .then(|| {
                    names
                        .last()
                        .map(|n| Arc::new(("a".to_owned(), (*n).to_owned())))
                })
                .flatten(),
            items: names
                .iter()
                .map(|n| {
                    (
                        Arc::new(("a".to_owned(), (*n).to_owned())),
                        Arc::new(state(1, 1.0)),
                        1,
                    )
                })
                .collect(),
            resource_version: 9,
        };
        // r1 stopped at d2 (its page was cut by bytes): d3 of r0 must wait for the next page,
        // since r1 may hold a device between d2 and d3.
        let merged = merge_pages(
            vec![mk("r0", &["d1", "d3"], false), mk("r1", &["d2"], true)],
            5,
        );
        let names: Vec<&str> = merged.items.iter().map(|(k, ..)| k.1.as_str()).collect();
        assert_eq!(names, ["d1", "d2"]);
        assert_eq!(merged.after.as_deref().map(|k| k.1.as_str()), Some("d2"));
        assert_eq!(merged.resource_version.to_string(), "r0=9,r1=9");
    }
}
