//! Lookups of EdgeNodes missing from the cache: a negative cache per name and a global budget,
//! so requests naming unknown nodes do not turn into API server traffic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::EdgeNode;
use edgesync_protocol::rate::TokenBucket;

/// Namespace and name.
type Name = (String, String);

/// EdgeNodes missing from the cache, and how often the API server may be asked about them.
///
/// A request naming an unknown node would otherwise cost one API GET each: 2,000 requests for
/// random names made 2,000 GETs in 2.9 s. The cache is complete once synced, so a miss is
/// almost always a node that does not exist; the GET only covers one created a moment ago.
/// A miss is remembered for `ttl`, and all lookups together are held to a small budget.
///
/// A node found is remembered for `ttl` too: with shards, a node created a moment ago is in
/// no cache until the leader has labelled it (a second or so, longer for a fleet labelled
/// for the first time), and its agent's every request would otherwise need a lookup of its
/// own, past the budget (answered 401 as an unknown node).
pub struct NodeLookups {
    ttl: Duration,
    misses: Mutex<HashMap<(String, String), Instant>>,
    found: Mutex<HashMap<Name, (Instant, Arc<EdgeNode>)>>,
    budget: Mutex<TokenBucket>,
}

/// Misses remembered at most (past it, expired ones are dropped, then all).
const MAX_REMEMBERED_MISSES: usize = 10_000;
/// API lookups of uncached nodes per second, all names together, and their burst.
const LOOKUPS_PER_SECOND: f64 = 5.0;
const LOOKUP_BURST: f64 = 20.0;

impl NodeLookups {
    /// Misses remembered for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            misses: Mutex::new(HashMap::new()),
            found: Mutex::new(HashMap::new()),
            budget: Mutex::new(TokenBucket::new(
                LOOKUPS_PER_SECOND,
                LOOKUP_BURST,
                Instant::now(),
            )),
        }
    }

    /// Whether the API server may be asked for this node now.
    pub fn may_look_up(&self, namespace: &str, node: &str) -> bool {
        let now = Instant::now();
        {
            let misses = self.misses.lock().unwrap_or_else(|e| e.into_inner());
            if misses
                .get(&(namespace.to_owned(), node.to_owned()))
                .is_some_and(|t| now.duration_since(*t) < self.ttl)
            {
                return false;
            }
        }
        let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        budget.try_take(1.0, now).is_ok()
    }

    /// The node as a lookup found it less than `ttl` ago.
    pub fn found_earlier(&self, namespace: &str, node: &str) -> Option<Arc<EdgeNode>> {
        let found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        found
            .get(&(namespace.to_owned(), node.to_owned()))
            .filter(|(t, _)| t.elapsed() < self.ttl)
            .map(|(_, n)| Arc::clone(n))
    }

    /// Records a node the API server knows that the cache does not hold yet.
    pub fn found(&self, namespace: &str, node: &str, edge_node: Arc<EdgeNode>) {
        let now = Instant::now();
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        if found.len() >= MAX_REMEMBERED_MISSES {
            found.retain(|_, (t, _)| now.duration_since(*t) < self.ttl);
            if found.len() >= MAX_REMEMBERED_MISSES {
                found.clear();
            }
        }
        found.insert((namespace.to_owned(), node.to_owned()), (now, edge_node));
    }

    /// Records that the API server does not know this node.
    pub fn missing(&self, namespace: &str, node: &str) {
        let now = Instant::now();
        let mut misses = self.misses.lock().unwrap_or_else(|e| e.into_inner());
        if misses.len() >= MAX_REMEMBERED_MISSES {
            misses.retain(|_, t| now.duration_since(*t) < self.ttl);
            if misses.len() >= MAX_REMEMBERED_MISSES {
                misses.clear();
            }
        }
        misses.insert((namespace.to_owned(), node.to_owned()), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_nodes_are_looked_up_once_per_interval_and_within_a_budget() {
        let l = NodeLookups::new(Duration::from_secs(60));
        assert!(l.may_look_up("ns", "ghost"));
        l.missing("ns", "ghost");
        assert!(!l.may_look_up("ns", "ghost"), "remembered");
        // Random names: the budget's burst, then nothing until it refills.
        let allowed = (0..1000)
            .filter(|i| l.may_look_up("ns", &format!("random-{i}")))
            .count();
        assert!(allowed < LOOKUP_BURST as usize, "{allowed}");
    }

    #[test]
    fn a_node_found_is_served_from_memory_for_the_interval() {
        let l = NodeLookups::new(Duration::from_millis(200));
        assert!(l.found_earlier("ns", "edge-1").is_none());
        let spec =
            serde_json::from_value(serde_json::json!({"tokenSecretRef": {"name": "t"}})).unwrap();
        l.found("ns", "edge-1", Arc::new(EdgeNode::new("edge-1", spec)));
        assert!(l.found_earlier("ns", "edge-1").is_some());
        assert!(l.found_earlier("ns", "edge-2").is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            l.found_earlier("ns", "edge-1").is_none(),
            "forgotten after the interval"
        );
    }
}
