//! Where a node's requests are served: here, when this replica owns the node's shard; by the
//! owner named in the shard Leases, reached at the address its member Lease advertises; or
//! nowhere for the moment, while the shard has no live owner (a hand-over).

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

/// Each shard's owner as of the last round of Leases.
#[derive(Debug, Default)]
pub struct Owners {
    by_shard: RwLock<Vec<Option<Owner>>>,
}

impl Owners {
    /// Replaces the table with one round's view.
    pub fn set(&self, owners: Vec<Option<Owner>>) {
        *self.by_shard.write().unwrap_or_else(|e| e.into_inner()) = owners;
    }

    /// The route to `shard`, given whether this replica owns it now (`me`: its identity).
    pub fn route(&self, shard: u32, owned_here: bool, me: &str) -> Route {
        if owned_here {
            return Route::Here;
        }
        let table = self.by_shard.read().unwrap_or_else(|e| e.into_inner());
        match table.get(shard as usize).cloned().flatten() {
            Some(owner) if &*owner.identity != me && owner.address.is_some() => Route::Peer(owner),
            _ => Route::Moving,
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
    fn routes_follow_ownership_then_the_last_round() {
        let o = Owners::default();
        assert_eq!(o.route(0, false, "a"), Route::Moving, "nothing seen yet");
        o.set(vec![
            owner("a", Some("10.0.0.1:8080")),
            owner("b", Some("10.0.0.2:8080")),
            owner("c", None),
            None,
        ]);
        assert_eq!(o.route(0, true, "a"), Route::Here);
        // Named as owner in the last round but past its own deadline: not served anywhere.
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
    }
}
