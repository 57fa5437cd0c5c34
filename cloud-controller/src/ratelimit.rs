//! Per-node admission: a token bucket on reports per second (EdgeNode `spec.limits` or the
//! controller's defaults), answered with 429 and `Retry-After` when empty.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgesync_protocol::rate::TokenBucket;

/// A node's bucket and the `(rate, burst)` it was built for.
type NodeBucket = ((u32, u32), TokenBucket);

/// Token buckets per node, rebuilt when the node's limits change.
#[derive(Default)]
pub struct NodeLimiter {
    buckets: Mutex<HashMap<(String, String), NodeBucket>>,
}

impl NodeLimiter {
    /// Admits `cost` reports for a node with `rate`/`burst`, or says how long to wait.
    pub fn admit(
        &self,
        node: (&str, &str),
        rate: u32,
        burst: u32,
        cost: u32,
    ) -> Result<(), Duration> {
        self.with_bucket(node, rate, burst, |b, now| {
            b.try_take(f64::from(cost.max(1)), now)
        })
    }

    /// Whether the node's bucket holds at least one token, taking nothing: checked before a
    /// batch's body is read, so a node over its rate costs a header read, not a parse.
    pub fn precheck(&self, node: (&str, &str), rate: u32, burst: u32) -> Result<(), Duration> {
        self.with_bucket(node, rate, burst, |b, now| {
            let wait = b.wait_for(1.0, now);
            if wait.is_zero() { Ok(()) } else { Err(wait) }
        })
    }

    fn with_bucket<T>(
        &self,
        node: (&str, &str),
        rate: u32,
        burst: u32,
        f: impl FnOnce(&mut TokenBucket, Instant) -> T,
    ) -> T {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let key = (node.0.to_owned(), node.1.to_owned());
        let entry = buckets
            .entry(key)
            .or_insert_with(|| ((rate, burst), new_bucket(rate, burst, now)));
        if entry.0 != (rate, burst) {
            *entry = ((rate, burst), new_bucket(rate, burst, now));
        }
        f(&mut entry.1, now)
    }
}

fn new_bucket(rate: u32, burst: u32, now: Instant) -> TokenBucket {
    TokenBucket::new(f64::from(rate), f64::from(burst.max(1)), now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_have_separate_buckets() {
        let l = NodeLimiter::default();
        assert!(l.admit(("ns", "a"), 1, 10, 10).is_ok());
        let wait = l.admit(("ns", "a"), 1, 10, 1).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert!(l.admit(("ns", "b"), 1, 10, 10).is_ok());
        assert!(l.precheck(("ns", "a"), 1, 10).is_err(), "empty bucket");
        assert!(
            l.precheck(("ns", "b"), 1, 10).is_err(),
            "b spent its burst too"
        );
        // Raising the node's limits takes effect at once.
        assert!(l.admit(("ns", "a"), 1, 20, 15).is_ok());
    }
}
