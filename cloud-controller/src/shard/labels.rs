//! The shard labels on EdgeNodes and Devices, which let each replica watch only its own
//! shards' objects with a label selector.
//!
//! - `edgesync.io/shard`: the object's shard (an EdgeNode's own, a Device's node's);
//! - `edgesync.io/shards`: the shard count it was computed for, so a changed `--shards` finds
//!   every object to relabel with one selector (`!=` matches objects without the label too).

use std::collections::{BTreeMap, BTreeSet};

use super::shard_of;

/// An object's shard.
pub const SHARD: &str = "edgesync.io/shard";
/// The shard count the object's shard was computed for.
pub const SHARDS: &str = "edgesync.io/shards";

/// The labels an object of node `namespace/node` carries with `count` shards.
pub fn wanted(namespace: &str, node: &str, count: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            SHARD.to_owned(),
            shard_of(namespace, node, count).to_string(),
        ),
        (SHARDS.to_owned(), count.to_string()),
    ])
}

/// Whether `labels` already say what [`wanted`] says.
pub fn is_labelled(
    labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
    node: &str,
    count: u32,
) -> bool {
    let Some(labels) = labels else {
        return false;
    };
    wanted(namespace, node, count)
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// The selector of the objects of `shards` (`None`: no shard, nothing to watch).
pub fn selector(count: u32, shards: &BTreeSet<u32>) -> Option<String> {
    if shards.is_empty() {
        return None;
    }
    let list: Vec<String> = shards.iter().map(u32::to_string).collect();
    Some(format!("{SHARDS}={count},{SHARD} in ({})", list.join(",")))
}

/// The selector of the objects not yet labelled for `count` shards.
pub fn unlabelled(count: u32) -> String {
    format!("{SHARDS}!={count}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_selectors() {
        let w = wanted("plant-a", "edge-1", 64);
        assert_eq!(w[SHARD], "10");
        assert_eq!(w[SHARDS], "64");
        assert!(is_labelled(Some(&w), "plant-a", "edge-1", 64));
        assert!(
            !is_labelled(Some(&w), "plant-a", "edge-1", 32),
            "count changed"
        );
        assert!(!is_labelled(None, "plant-a", "edge-1", 64));
        let mut moved = w.clone();
        moved.insert(SHARD.into(), "11".into());
        assert!(!is_labelled(Some(&moved), "plant-a", "edge-1", 64));
        assert_eq!(selector(8, &BTreeSet::new()), None);
        assert_eq!(
            selector(8, &BTreeSet::from([5, 1])).unwrap(),
            "edgesync.io/shards=8,edgesync.io/shard in (1,5)"
        );
        assert_eq!(unlabelled(8), "edgesync.io/shards!=8");
    }
}
