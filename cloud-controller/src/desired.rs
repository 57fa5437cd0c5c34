//! The desired-state hub: per-node fan-out of `spec.desired` changes, fed by the Device watch.
//!
//! Each node has the current desired state of its devices and a bounded log of recent changes.
//! A stream starts with a snapshot when the agent has no usable cursor, or replays the log after
//! its cursor, then follows live changes with periodic bookmarks.
//!
//! Cursors are `{epoch}.{revision}`: the epoch is random per controller process, so a cursor
//! from another replica or an earlier process is not usable and costs a snapshot (the node's
//! devices, once), never a wrong resume. Events inside a snapshot carry an empty cursor: an agent
//! that stops mid-snapshot starts over instead of resuming past devices it never received.
//! Status writes do not produce events: only a changed generation, desired document or node.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use edgesync_crds::Device;
use edgesync_protocol::wire::DesiredEvent;
use kube::ResourceExt;
use kube::runtime::watcher;
use serde_json::{Map, Value};
use tokio::sync::watch;

/// Changes kept per node for resuming streams; older cursors get a snapshot.
const LOG_CAPACITY: usize = 4096;

type DeviceKey = (String, String);
type NodeKey = (String, String);

#[derive(Default)]
struct NodeDesired {
    devices: BTreeMap<String, (i64, Map<String, Value>)>,
    /// `(revision, event)` in revision order.
    log: VecDeque<(u64, DesiredEvent)>,
    /// Highest revision dropped from the log; cursors below it cannot resume.
    trimmed_to: u64,
}

struct HubState {
    revision: u64,
    nodes: HashMap<NodeKey, NodeDesired>,
    device_node: HashMap<DeviceKey, String>,
    /// Devices seen during a re-list, to find the ones deleted while the watch was down.
    relisting: Option<HashSet<DeviceKey>>,
    synced: bool,
}

/// What a new stream starts with.
pub struct Subscription {
    /// Lines to send first (snapshot or replay).
    pub initial: Vec<DesiredEvent>,
    /// Revision the stream is at after `initial`.
    pub position: u64,
    /// Wakes when the hub's revision moves.
    pub changes: watch::Receiver<u64>,
}

/// Result of polling a node's log from a position.
pub enum Poll {
    /// New events (possibly none) and the new position.
    Events(Vec<DesiredEvent>, u64),
    /// The stream fell behind the log; it must end so the agent resubscribes.
    Lagged,
}

/// Per-node desired state and change log.
pub struct DesiredHub {
    epoch: String,
    state: Mutex<HubState>,
    changes: watch::Sender<u64>,
}

impl Default for DesiredHub {
    fn default() -> Self {
        Self::new()
    }
}

impl DesiredHub {
    /// An empty hub with a fresh epoch.
    pub fn new() -> Self {
        Self {
            epoch: format!("{:016x}", fastrand::u64(..)),
            state: Mutex::new(HubState {
                revision: 0,
                nodes: HashMap::new(),
                device_node: HashMap::new(),
                relisting: None,
                synced: false,
            }),
            changes: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the first full list of Devices has been applied.
    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    fn cursor(&self, revision: u64) -> String {
        format!("{}.{revision}", self.epoch)
    }

    /// Applies one Device watch event.
    pub fn on_event(&self, event: &watcher::Event<Device>) {
        let mut st = self.lock();
        let before = st.revision;
        match event {
            watcher::Event::Init => st.relisting = Some(HashSet::new()),
            watcher::Event::InitApply(d) => {
                if let Some(seen) = st.relisting.as_mut() {
                    seen.insert((d.namespace().unwrap_or_default(), d.name_any()));
                }
                self.apply(&mut st, d);
            }
            watcher::Event::InitDone => {
                if let Some(seen) = st.relisting.take() {
                    let gone: Vec<DeviceKey> = st
                        .device_node
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.remove(&mut st, &key);
                    }
                }
                st.synced = true;
            }
            watcher::Event::Apply(d) => self.apply(&mut st, d),
            watcher::Event::Delete(d) => {
                let key = (d.namespace().unwrap_or_default(), d.name_any());
                self.remove(&mut st, &key);
            }
        }
        if st.revision != before {
            let revision = st.revision;
            drop(st);
            self.changes.send_replace(revision);
        }
    }

    fn push(&self, st: &mut HubState, node: NodeKey, event: impl FnOnce(String) -> DesiredEvent) {
        st.revision += 1;
        let revision = st.revision;
        let cursor = self.cursor(revision);
        let entry = st.nodes.entry(node).or_default();
        entry.log.push_back((revision, event(cursor)));
        while entry.log.len() > LOG_CAPACITY {
            if let Some((r, _)) = entry.log.pop_front() {
                entry.trimmed_to = r;
            }
        }
    }

    fn apply(&self, st: &mut HubState, device: &Device) {
        let ns = device.namespace().unwrap_or_default();
        let name = device.name_any();
        let key = (ns.clone(), name.clone());
        let node = device.spec.node_name.clone();
        let generation = device.metadata.generation.unwrap_or(0);
        let desired = device.spec.desired.clone().unwrap_or_default();
        if let Some(previous) = st.device_node.get(&key).cloned()
            && previous != node
        {
            self.remove(st, &key);
        }
        st.device_node.insert(key, node.clone());
        let node_key = (ns, node);
        let slot = st.nodes.entry(node_key.clone()).or_default();
        let unchanged = slot
            .devices
            .get(&name)
            .is_some_and(|(g, d)| *g == generation && *d == desired);
        if unchanged {
            return;
        }
        slot.devices
            .insert(name.clone(), (generation, desired.clone()));
        self.push(st, node_key, |cursor| DesiredEvent::Desired {
            device: name,
            generation,
            desired,
            cursor,
        });
    }

    fn remove(&self, st: &mut HubState, key: &DeviceKey) {
        let Some(node) = st.device_node.remove(key) else {
            return;
        };
        let node_key = (key.0.clone(), node);
        if let Some(slot) = st.nodes.get_mut(&node_key) {
            slot.devices.remove(&key.1);
        }
        let device = key.1.clone();
        self.push(st, node_key, |cursor| DesiredEvent::Removed {
            device,
            cursor,
        });
    }

    /// Forgets the nodes `keep` refuses (their shard moved to another replica), without
    /// telling their streams anything: their devices are not removed, only served elsewhere.
    /// A cursor from before cannot resume here (a snapshot instead), since changes made
    /// meanwhile were never seen.
    pub fn forget_nodes(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut st = self.lock();
        let st = &mut *st;
        let after = st.revision + 1;
        let mut forgotten = 0;
        for ((ns, node), slot) in &mut st.nodes {
            if !keep(ns, node) && (!slot.devices.is_empty() || slot.trimmed_to < after) {
                slot.devices.clear();
                slot.log.clear();
                slot.trimmed_to = after;
                forgotten += 1;
            }
        }
        if forgotten > 0 {
            st.device_node.retain(|(ns, _), node| keep(ns, node));
        }
    }

    /// Starts a stream for a node: a replay after `since` when that cursor is usable, else a
    /// snapshot of the node's devices followed by `snapshotComplete`.
    pub fn subscribe(&self, namespace: &str, node: &str, since: Option<&str>) -> Subscription {
        let changes = self.changes.subscribe();
        let mut st = self.lock();
        let revision = st.revision;
        let cursor_now = self.cursor(revision);
        let slot = st
            .nodes
            .entry((namespace.to_owned(), node.to_owned()))
            .or_default();
        let resume_from = since
            .and_then(|c| c.strip_prefix(&self.epoch))
            .and_then(|c| c.strip_prefix('.'))
            .and_then(|r| r.parse::<u64>().ok())
            .filter(|r| *r >= slot.trimmed_to && *r <= revision);
        let initial = match resume_from {
            Some(from) => newest_after(&slot.log, from),
            None => {
                let mut lines: Vec<DesiredEvent> = slot
                    .devices
                    .iter()
                    .map(|(device, (generation, desired))| DesiredEvent::Desired {
                        device: device.clone(),
                        generation: *generation,
                        desired: desired.clone(),
                        cursor: String::new(),
                    })
                    .collect();
                lines.push(DesiredEvent::SnapshotComplete { cursor: cursor_now });
                lines
            }
        };
        Subscription {
            initial,
            position: revision,
            changes,
        }
    }

    /// Events for a node after `position`.
    pub fn poll(&self, namespace: &str, node: &str, position: u64) -> Poll {
        let st = self.lock();
        let revision = st.revision;
        let Some(slot) = st.nodes.get(&(namespace.to_owned(), node.to_owned())) else {
            return Poll::Events(Vec::new(), revision);
        };
        if position < slot.trimmed_to {
            return Poll::Lagged;
        }
        Poll::Events(newest_after(&slot.log, position), revision)
    }

    /// A bookmark at the hub's current revision.
    pub fn bookmark(&self, position: u64) -> DesiredEvent {
        DesiredEvent::Bookmark {
            cursor: self.cursor(position),
        }
    }
}

/// The log's events after revision `from`, keeping each device's newest only, in revision
/// order. A device changed several times while its agent was away (or between two polls)
/// gets its current desired state once, not the history: a machine never runs through
/// values already replaced (a staged rollout's earlier steps, an operator's corrected typo).
/// Resuming from any of these events' cursors stays correct: every device's newest event
/// after that cursor is still ahead.
fn newest_after(log: &VecDeque<(u64, DesiredEvent)>, from: u64) -> Vec<DesiredEvent> {
    fn device_of(event: &DesiredEvent) -> Option<&str> {
        match event {
            DesiredEvent::Desired { device, .. } | DesiredEvent::Removed { device, .. } => {
                Some(device)
            }
            DesiredEvent::SnapshotComplete { .. } | DesiredEvent::Bookmark { .. } => None,
        }
    }
    let after = || log.iter().filter(move |(r, _)| *r > from);
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (r, e) in after() {
        if let Some(d) = device_of(e) {
            newest.insert(d, *r);
        }
    }
    after()
        .filter(|(r, e)| device_of(e).is_none_or(|d| newest.get(d) == Some(r)))
        .map(|(_, e)| e.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgesync_crds::DeviceSpec;
    use serde_json::json;

    fn device(ns: &str, name: &str, node: &str, generation: i64, desired: Value) -> Device {
        let mut d = Device::new(
            name,
            DeviceSpec {
                node_name: node.into(),
                desired: desired.as_object().cloned(),
                reporting: None,
            },
        );
        d.metadata.namespace = Some(ns.into());
        d.metadata.generation = Some(generation);
        d
    }

    fn names(events: &[DesiredEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                DesiredEvent::Desired {
                    device, generation, ..
                } => format!("{device}@{generation}"),
                DesiredEvent::Removed { device, .. } => format!("-{device}"),
                DesiredEvent::SnapshotComplete { .. } => "done".into(),
                DesiredEvent::Bookmark { .. } => "bookmark".into(),
            })
            .collect()
    }

    #[test]
    fn snapshot_then_resume_after_cursor() {
        let hub = DesiredHub::new();
        hub.on_event(&watcher::Event::Init);
        hub.on_event(&watcher::Event::InitApply(device(
            "ns",
            "a",
            "n1",
            1,
            json!({"x":1}),
        )));
        hub.on_event(&watcher::Event::InitApply(device(
            "ns",
            "b",
            "n2",
            1,
            json!({}),
        )));
        hub.on_event(&watcher::Event::InitDone);
        let sub = hub.subscribe("ns", "n1", None);
        assert_eq!(names(&sub.initial), ["a@1", "done"]);
        // Snapshot lines carry no cursor: stopping mid-snapshot must restart it.
        assert_eq!(sub.initial[0].cursor(), "");
        let cursor = sub.initial[1].cursor().to_owned();

        // A status-only change (same generation and desired) is not an event.
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "a",
            "n1",
            1,
            json!({"x":1}),
        )));
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "a",
            "n1",
            2,
            json!({"x":2}),
        )));
        // Moving a device to another node removes it here.
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "b",
            "n1",
            1,
            json!({}),
        )));
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "b",
            "n2",
            1,
            json!({}),
        )));
        // Each device's newest event only: b came and went, so only its removal.
        let resumed = hub.subscribe("ns", "n1", Some(&cursor));
        assert_eq!(names(&resumed.initial), ["a@2", "-b"]);
        let Poll::Events(tail, _) = hub.poll("ns", "n1", sub.position) else {
            panic!("not lagged")
        };
        assert_eq!(names(&tail), ["a@2", "-b"]);
        // A device changed three times while its agent was away gets the last, once.
        for (generation, x) in [(3, 3), (4, 4), (5, 5)] {
            hub.on_event(&watcher::Event::Apply(device(
                "ns",
                "a",
                "n1",
                generation,
                json!({ "x": x }),
            )));
        }
        let away = hub.subscribe("ns", "n1", Some(resumed.initial[1].cursor()));
        assert_eq!(names(&away.initial), ["a@5"]);
        // Another node's namespace twin is separate.
        assert!(names(&hub.subscribe("other", "n1", None).initial) == ["done"]);
    }

    #[test]
    fn nodes_of_a_shard_gone_elsewhere_are_forgotten_not_removed() {
        let hub = DesiredHub::new();
        hub.on_event(&watcher::Event::Init);
        for (d, node) in [("a", "n1"), ("b", "n2")] {
            hub.on_event(&watcher::Event::InitApply(device(
                "ns",
                d,
                node,
                1,
                json!({}),
            )));
        }
        hub.on_event(&watcher::Event::InitDone);
        let n2 = hub.subscribe("ns", "n2", None);
        let cursor = n2.initial[1].cursor().to_owned();
        let n1 = hub.subscribe("ns", "n1", None);

        hub.forget_nodes(|_, node| node == "n1");
        // The next list (of the shards still owned) no longer holds b: nothing is removed.
        hub.on_event(&watcher::Event::Init);
        hub.on_event(&watcher::Event::InitApply(device(
            "ns",
            "a",
            "n1",
            1,
            json!({}),
        )));
        hub.on_event(&watcher::Event::InitDone);
        // A stream of n2 still open here ends (its agent reconnects to the new owner).
        assert!(matches!(hub.poll("ns", "n2", n2.position), Poll::Lagged));
        let Poll::Events(tail, _) = hub.poll("ns", "n1", n1.position) else {
            panic!("not lagged")
        };
        assert!(tail.is_empty(), "{:?}", names(&tail));
        // A cursor from before cannot resume n2 here: changes were made while elsewhere.
        assert_eq!(
            names(&hub.subscribe("ns", "n2", Some(&cursor)).initial),
            ["done"]
        );
        // The shard comes back: its devices again, by snapshot.
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "b",
            "n2",
            3,
            json!({}),
        )));
        assert_eq!(
            names(&hub.subscribe("ns", "n2", Some(&cursor)).initial),
            ["b@3", "done"]
        );
    }

    #[test]
    fn foreign_or_stale_cursor_gets_a_snapshot() {
        let hub = DesiredHub::new();
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "a",
            "n1",
            3,
            json!({}),
        )));
        for bad in ["", "garbage", "0123456789abcdef.1", "x.y"] {
            let sub = hub.subscribe("ns", "n1", Some(bad));
            assert_eq!(names(&sub.initial), ["a@3", "done"], "cursor {bad:?}");
        }
        for i in 0..(LOG_CAPACITY as i64 + 10) {
            hub.on_event(&watcher::Event::Apply(device(
                "ns",
                "a",
                "n1",
                4 + i,
                json!({}),
            )));
        }
        let old = format!("{}.1", hub.epoch);
        assert_eq!(hub.subscribe("ns", "n1", Some(&old)).initial.len(), 2);
        assert!(matches!(hub.poll("ns", "n1", 1), Poll::Lagged));
    }

    #[test]
    fn relist_removes_devices_deleted_while_the_watch_was_down() {
        let hub = DesiredHub::new();
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "a",
            "n1",
            1,
            json!({}),
        )));
        hub.on_event(&watcher::Event::Apply(device(
            "ns",
            "b",
            "n1",
            1,
            json!({}),
        )));
        let pos = hub.subscribe("ns", "n1", None).position;
        hub.on_event(&watcher::Event::Init);
        hub.on_event(&watcher::Event::InitApply(device(
            "ns",
            "a",
            "n1",
            1,
            json!({}),
        )));
        hub.on_event(&watcher::Event::InitDone);
        let Poll::Events(tail, _) = hub.poll("ns", "n1", pos) else {
            panic!("not lagged")
        };
        assert_eq!(names(&tail), ["-b"]);
        assert!(hub.is_synced());
    }
}
