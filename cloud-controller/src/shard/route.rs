//! Where a node's requests are served: here, when this replica owns the node's shard; by the
//! owner named in the shard Leases, reached at the address its member Lease advertises; or
//! nowhere for the moment, while the shard has no live owner (a hand-over).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A shard's owner as last seen in the Leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner's identity.
    pub identity: Arc<str>,
    /// Where the owner takes forwarded requests (`host:port`), from its member Lease.
    pub address: Option<Arc<str>>,
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This replica owns the shard.
    Here,
    /// Another replica owns it and says where it listens.
    Peer(Owner),
    /// No replica can serve it now: the shard has no live owner, its owner advertises no
    /// address, or the last round named this replica while its deadline has passed.
    Moving,
}

/// Each shard's owner as last seen: set by every round of Leases, and kept current between
/// rounds from a watch of them, so a request follows a shard that moved within moments.
#[derive(Debug, Default)]
pub struct Owners {
    table: RwLock<Table>,
}

#[derive(Debug, Default)]
struct Table {
    holders: Vec<Option<Arc<str>>>,
    addresses: HashMap<Arc<str>, Arc<str>>,
}

impl Owners {
    /// A table of `count` shards, no owner known yet.
    pub fn new(count: u32) -> Self {
        Self {
            table: RwLock::new(Table {
                holders: vec![None; count as usize],
                addresses: HashMap::new(),
            }),
        }
    }

    /// Replaces the table with one round's view: each shard's live holder, and the live
    /// replicas' addresses.
    pub fn set(&self, holders: Vec<Option<Arc<str>>>, addresses: HashMap<Arc<str>, Arc<str>>) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Table { holders, addresses };
    }

    /// Records `shard`'s holder as a Lease now says; whether it changed.
    pub fn set_holder(&self, shard: u32, holder: Option<&str>) -> bool {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = t.holders.get_mut(shard as usize) else {
            return false;
        };
        if slot.as_deref() == holder {
            return false;
        }
        *slot = holder.map(Into::into);
        true
    }

    /// Records a replica's address as its member Lease now says (`None`: it left); whether
    /// the replica was not known before.
    pub fn set_address(&self, identity: &str, address: Option<&str>) -> bool {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        match address {
            Some(a) => t.addresses.insert(identity.into(), a.into()).is_none(),
            None => {
                t.addresses.remove(identity);
                false
            }
        }
    }

    /// The live replicas other than `me`, with their addresses.
    pub fn peers(&self, me: &str) -> Vec<(Arc<str>, Arc<str>)> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.addresses
            .iter()
            .filter(|(identity, _)| &***identity != me)
            .map(|(i, a)| (Arc::clone(i), Arc::clone(a)))
            .collect()
    }

    /// The route to `shard`, given whether this replica owns it now (`me`: its identity).
    pub fn route(&self, shard: u32, owned_here: bool, me: &str) -> Route {
        if owned_here {
            return Route::Here;
        }
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        match t.holders.get(shard as usize).cloned().flatten() {
            Some(identity) if &*identity != me => Route::Peer(Owner {
                address: t.addresses.get(&identity).cloned(),
                identity,
            })
            .with_address(),
            _ => Route::Moving,
        }
    }
}

impl Route {
    /// A peer without an address cannot be reached: moving.
    fn with_address(self) -> Self {
        match self {
            Route::Peer(Owner { address: None, .. }) => Route::Moving,
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str, address: Option<&str>) -> Option<Owner> {
        Some(Owner {
            identity: id.into(),
            address: address.map(Into::into),
        })
    }

    #[test]
    fn routes_follow_ownership_then_the_last_view() {
        let o = Owners::default();
        assert_eq!(o.route(0, false, "a"), Route::Moving, "nothing seen yet");
        o.set(
            vec![Some("a".into()), Some("b".into()), Some("c".into()), None],
            HashMap::from([
                ("a".into(), "10.0.0.1:8080".into()),
                ("b".into(), "10.0.0.2:8080".into()),
            ]),
        );
        assert_eq!(o.route(0, true, "a"), Route::Here);
        // Named as owner but past its own deadline (or not cached yet): not served anywhere.
        assert_eq!(o.route(0, false, "a"), Route::Moving);
        assert_eq!(
            o.route(1, false, "a"),
            Route::Peer(owner("b", Some("10.0.0.2:8080")).unwrap())
        );
        assert_eq!(
            o.route(2, false, "a"),
            Route::Moving,
            "no address advertised"
        );
        assert_eq!(o.route(3, false, "a"), Route::Moving, "no owner");
        assert_eq!(o.route(9, false, "a"), Route::Moving, "out of range");

        // Between rounds, from the watch: shard 3 taken by c, which then advertises itself.
        assert!(o.set_holder(3, Some("c")));
        assert!(!o.set_holder(3, Some("c")), "a renewal changes nothing");
        assert!(!o.set_holder(9, Some("c")), "out of range");
        assert!(o.set_address("c", Some("10.0.0.3:8080")), "a new replica");
        assert!(!o.set_address("c", Some("10.0.0.3:8080")));
        assert_eq!(
            o.route(3, false, "a"),
            Route::Peer(owner("c", Some("10.0.0.3:8080")).unwrap())
        );
        assert!(o.set_holder(1, None));
        assert_eq!(o.route(1, false, "a"), Route::Moving, "released");
        o.set_address("c", None);
        assert_eq!(o.route(3, false, "a"), Route::Moving, "its replica left");
    }
}
