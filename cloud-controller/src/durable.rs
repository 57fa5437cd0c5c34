//! Durable acknowledgements owed to agents that take live answers: for each node and agent
//! epoch, each device's newest version that became durable since the node was last told.
//!
//! A live batch is answered before its reports are written; the agent keeps them until a
//! later answer says a version covering each is durable. This is what those answers draw
//! from. At most one entry per device is held (the newest version covers the older ones),
//! and at most `capacity` in all: past it an acknowledgement is dropped and counted, and the
//! agent, never told, sends the report again after its timeout, which the controller then
//! answers from the Device's status. Losing an entry (a restart) costs the same resend,
//! never a report.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use edgesync_protocol::wire::Durable;

/// Namespace, node and agent epoch.
type Node = (String, String, String);

/// Acknowledgements owed, by node and epoch.
#[derive(Debug)]
pub struct DurableAcks {
    owed: Mutex<Owed>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Owed {
    by_node: HashMap<Node, HashMap<String, u64>>,
    entries: usize,
}

impl DurableAcks {
    /// An empty set holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            owed: Mutex::default(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Owed> {
        self.owed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Version `version` of `device`, reported by `node` in `epoch`, is durable. Returns
    /// `false` when it was dropped because the set is full.
    pub fn record(
        &self,
        (ns, node): (&str, &str),
        epoch: &str,
        device: &str,
        version: u64,
    ) -> bool {
        let mut owed = self.lock();
        let full = owed.entries >= self.capacity;
        let key = (ns.to_owned(), node.to_owned(), epoch.to_owned());
        let devices = owed.by_node.entry(key).or_default();
        match devices.get_mut(device) {
            Some(held) => {
                *held = (*held).max(version);
                true
            }
            None if full => false,
            None => {
                devices.insert(device.to_owned(), version);
                owed.entries += 1;
                true
            }
        }
    }

    /// Up to `max` acknowledgements owed to `node` in `epoch`, now told (removed). Entries
    /// of the node's other epochs go too: only the current epoch's agent asks, and a
    /// retired epoch's versions mean nothing to it.
    pub fn take(&self, (ns, node): (&str, &str), epoch: &str, max: usize) -> Vec<Durable> {
        let mut owed = self.lock();
        let Owed { by_node, entries } = &mut *owed;
        let mut told = Vec::new();
        by_node.retain(|(n, name, e), devices| {
            if n != ns || name != node {
                return true;
            }
            if e != epoch {
                *entries -= devices.len();
                return false;
            }
            let keys: Vec<String> = devices.keys().take(max).cloned().collect();
            for device in keys {
                if let Some(version) = devices.remove(&device) {
                    told.push(Durable { device, version });
                }
            }
            *entries -= told.len();
            !devices.is_empty()
        });
        told
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().entries
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(mut v: Vec<Durable>) -> Vec<(String, u64)> {
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v.into_iter().map(|d| (d.device, d.version)).collect()
    }

    #[test]
    fn the_newest_version_per_device_is_told_once_to_its_node_and_epoch() {
        let acks = DurableAcks::new(100);
        let n = ("plant-a", "edge-1");
        assert!(acks.record(n, "e1", "a", 3));
        assert!(acks.record(n, "e1", "a", 2));
        assert!(acks.record(n, "e1", "b", 1));
        assert!(acks.record(("plant-a", "edge-2"), "e9", "a", 7));
        assert_eq!(acks.len(), 3);
        assert_eq!(pairs(acks.take(n, "e1", 1)).len(), 1);
        assert_eq!(pairs(acks.take(n, "e1", 10)).len(), 1);
        assert!(acks.take(n, "e1", 10).is_empty());
        assert_eq!(acks.len(), 1);
        assert_eq!(
            pairs(acks.take(("plant-a", "edge-2"), "e9", 10)),
            [("a".to_owned(), 7)]
        );
        assert!(acks.is_empty());
    }

    #[test]
    fn a_new_epoch_drops_the_old_ones_and_the_set_is_bounded() {
        let acks = DurableAcks::new(2);
        let n = ("plant-a", "edge-1");
        assert!(acks.record(n, "old", "a", 900));
        assert!(acks.record(n, "old", "b", 901));
        // Full: a new device is dropped, a held one still moves up.
        assert!(!acks.record(n, "new", "a", 1));
        assert!(acks.record(n, "old", "a", 950));
        // The new epoch's agent asks: the old epoch's versions are never told to it.
        assert!(acks.take(n, "new", 10).is_empty());
        assert!(acks.is_empty());
        assert!(acks.record(n, "new", "a", 1));
        assert_eq!(pairs(acks.take(n, "new", 10)), [("a".to_owned(), 1)]);
    }
}
