//! Shards: the fleet's EdgeNodes split into a fixed number of shards (`--shards`), each owned
//! by one controller replica at a time through a Lease of its own, so replicas can share a
//! fleet with nothing but what Kubernetes provides for coordination.
//!
//! - [`shard_of`]: an EdgeNode's shard, a stable hash of `namespace/name` (the same in every
//!   replica and every release: it decides which replica serves a node).
//! - [`plan`]: what a replica does with the shard Leases in a round (fair share, rendezvous
//!   preference), pure.
//! - [`leases`]: the rounds against the API server, and which shards this replica owns.
//! - [`route`]: where a node's requests are served (here, a peer, or nowhere during a
//!   hand-over).
//! - [`forward`]: a request for another replica's shard passed to it, and its answer back.
//! - [`labels`]: the shard labels on EdgeNodes and Devices, and the selectors of a replica's
//!   caches; [`labeller`] keeps them right.
//! - [`peer_token`]: the token replicas present to read each other's live state.
//!
//! See docs/design/scale-out.md.

pub mod forward;
pub mod labeller;
pub mod labels;
pub mod leases;
pub mod peer_token;
pub mod plan;
pub mod route;

/// The shard of EdgeNode `namespace/name` among `shards` (at least 1).
pub fn shard_of(namespace: &str, name: &str, shards: u32) -> u32 {
    (fnv1a(&[namespace.as_bytes(), b"/", name.as_bytes()]) % u64::from(shards.max(1))) as u32
}

/// 64-bit FNV-1a over the concatenated `parts`.
///
/// Written here rather than taken from std or a crate: the value decides which replica serves
/// a node, so it must never change between builds or releases; std's hasher makes no such
/// promise, and FNV-1a is a fixed, published function of a few lines (not for security: node
/// names are chosen by the cluster's administrators, not by the nodes).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of the FNV reference (draft-eastlake-fnv).
        assert_eq!(fnv1a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foobar"]), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a(&[b"foo", b"bar"]), fnv1a(&[b"foobar"]));
    }

    #[test]
    fn nodes_spread_over_the_shards_and_keep_their_shard() {
        let mut counts = [0u32; 16];
        for i in 0..1600 {
            counts[shard_of("plant-a", &format!("edge-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (60..=140).contains(c)), "{counts:?}");
        // Fixed forever: a change would move every node to another replica on upgrade.
        assert_eq!(fnv1a(&[b"plant-a/edge-1"]), 0x790a_8f34_f17a_2b0a);
        assert_eq!(shard_of("plant-a", "edge-1", 64), 10);
        assert_eq!(shard_of("ns", "n", 0), 0);
    }
}
