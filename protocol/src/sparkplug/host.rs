//! What a Sparkplug B *host application* remembers about the edge nodes it hears (spec 5.x):
//! each node's birth/death sequence (`bdSeq`), its message sequence (`seq`), and the metric
//! aliases and datatypes its births declared. From a decoded message it produces the state
//! updates for edgesync devices, and says when to ask the node for a rebirth.
//!
//! Nothing is guessed: a metric whose alias no birth declared is left out, and a sequence
//! gap, a data message from a node not born since the agent started, or a missing `seq` ask
//! for a rebirth (at most one per node per [`HostSettings::rebirth_interval_ms`]). Values are
//! absolute, so the metrics a message does resolve are still applied.
//!
//! Memory is bounded: at most [`HostSettings::max_edge_nodes`] nodes and
//! [`HostSettings::max_metrics_per_node`] aliases, metric names and devices per node.

use std::collections::{BTreeSet, HashMap};

use prost::Message as _;
use serde_json::{Map, Value};

use super::proto::{Metric, MetricValue, Payload, datatype};
use super::topic::{self, Kind, Topic};
use super::value;
use crate::limits::LimitError;

/// The metric every NBIRTH and NDEATH carries: the birth/death sequence number.
pub const BD_SEQ: &str = "bdSeq";
/// The node command asking for a rebirth.
pub const REBIRTH: &str = "Node Control/Rebirth";

/// Bounds and pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSettings {
    /// Edge nodes remembered at once; births from more are refused.
    pub max_edge_nodes: usize,
    /// Aliases, metric names and devices remembered per edge node; a birth beyond is refused.
    pub max_metrics_per_node: usize,
    /// Least time between two rebirth requests to one node.
    pub rebirth_interval_ms: u64,
    /// Bytes of names (metric, alias and device names) remembered for all nodes together;
    /// a birth or a new device beyond is refused.
    pub max_name_bytes: usize,
}

/// The longest metric name a birth may declare: a name is a path of state keys, each at
/// most 128 bytes, so anything longer could not be stored anyway.
pub const MAX_METRIC_NAME_BYTES: usize = 1024;

impl Default for HostSettings {
    fn default() -> Self {
        Self {
            max_edge_nodes: 1024,
            max_metrics_per_node: 65_536,
            rebirth_interval_ms: 5_000,
            max_name_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Where a device id comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Group id.
    pub group: String,
    /// Edge node id.
    pub edge_node: String,
    /// Device id; `None` for the edge node's own metrics.
    pub device: Option<String>,
}

/// A message refused as a whole; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a Sparkplug B protobuf payload.
    #[error("not a Sparkplug B payload: {0}")]
    Decode(String),
    /// The edge node or device id makes no valid device id.
    #[error("Sparkplug id does not make a device id: {0}")]
    InvalidId(#[from] LimitError),
    /// Another Sparkplug edge node or device already maps to this device id.
    #[error(
        "device id '{id}' is already used by Sparkplug edge node '{edge_node}' in group '{group}'"
    )]
    IdConflict {
        /// The contested id.
        id: String,
        /// Its current owner's group.
        group: String,
        /// Its current owner's edge node.
        edge_node: String,
    },
    /// Too many edge nodes.
    #[error("more than {0} Sparkplug edge nodes (raise max_edge_nodes)")]
    NodeLimit(usize),
    /// A birth declares more than the node may hold.
    #[error(
        "Sparkplug edge node declares more than {0} metrics and devices (raise max_metrics_per_node)"
    )]
    MetricLimit(usize),
    /// The names every node declared together would pass `max_name_bytes`, or one metric
    /// name is longer than [`MAX_METRIC_NAME_BYTES`].
    #[error(
        "Sparkplug names beyond {0} bytes (metric names over 1024 bytes, or all nodes' names past max_name_bytes)"
    )]
    NameBytes(usize),
}

impl Refused {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(_) => "sparkplug_decode",
            Self::InvalidId(_) => "invalid_device_id",
            Self::IdConflict { .. } => "sparkplug_id_conflict",
            Self::NodeLimit(_) => "sparkplug_node_limit",
            Self::MetricLimit(_) => "sparkplug_metric_limit",
            Self::NameBytes(_) => "sparkplug_name_bytes",
        }
    }
}

/// Something wrong with an accepted message, for counting and logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issue {
    /// `seq` is not the one expected: messages were lost or reordered.
    SeqGap {
        /// Expected seq.
        expected: u8,
        /// The message's seq.
        got: u64,
    },
    /// A data message carries no `seq`.
    MissingSeq,
    /// A message from a node not born since the agent started.
    NotBorn,
    /// A metric's alias was declared by no birth (the metric was left out).
    UnknownAlias(u64),
    /// A metric's value has no JSON form (left out).
    Unmapped {
        /// Metric name.
        name: String,
        /// Why.
        reason: value::Unmapped,
    },
    /// An NDEATH whose bdSeq belongs to an earlier session of the node (ignored).
    StaleDeath,
}

impl Issue {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SeqGap { .. } => "seq_gap",
            Self::MissingSeq => "missing_seq",
            Self::NotBorn => "not_born",
            Self::UnknownAlias(_) => "unknown_alias",
            Self::Unmapped { .. } => "unmapped_metric",
            Self::StaleDeath => "stale_death",
        }
    }
}

/// A device's new state from one message.
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    /// The edgesync device id.
    pub device: String,
    /// Merge patch for the reported state (metric names as paths, `/` nesting objects).
    pub reported: Map<String, Value>,
    /// Whether the device is connected (births and data: true; deaths: false).
    pub connected: bool,
}

/// A command to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// NCMD or DCMD topic.
    pub topic: String,
    /// Encoded Sparkplug B payload.
    pub payload: Vec<u8>,
}

/// What one message did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// State updates, in order.
    pub updates: Vec<StateUpdate>,
    /// A rebirth request to publish.
    pub rebirth: Option<Command>,
    /// What was wrong, without refusing the message.
    pub issues: Vec<Issue>,
}

/// What the host knows of one metric.
#[derive(Debug, Clone)]
struct Known {
    device: Option<String>,
    name: String,
    datatype: u32,
}

#[derive(Debug, Default)]
struct Node {
    born: bool,
    bd_seq: Option<u64>,
    next_seq: Option<u8>,
    aliases: HashMap<u64, Known>,
    /// Datatypes by device (None: the node itself) and metric name.
    metrics: HashMap<Option<String>, HashMap<String, u32>>,
    devices: BTreeSet<String>,
    /// Whether the node's own birth carried state (then the node is a device too).
    has_state: bool,
    last_rebirth_ms: Option<u64>,
    /// Bytes of the names above, as last counted ([`Node::count_bytes`]).
    bytes: usize,
}

/// What remembering a name costs beyond its bytes (map entry, string header).
const NAME_OVERHEAD: usize = 48;

impl Node {
    fn entries(&self) -> usize {
        self.aliases.len()
            + self.metrics.values().map(HashMap::len).sum::<usize>()
            + self.devices.len()
    }

    fn count_bytes(&self) -> usize {
        let device = |d: &Option<String>| d.as_ref().map_or(0, String::len);
        let metrics: usize = self
            .metrics
            .iter()
            .map(|(d, m)| device(d) + m.keys().map(|n| n.len() + NAME_OVERHEAD).sum::<usize>())
            .sum();
        let aliases: usize = self
            .aliases
            .values()
            .map(|k| k.name.len() + device(&k.device) + NAME_OVERHEAD)
            .sum();
        let devices: usize = self.devices.iter().map(|d| d.len() + NAME_OVERHEAD).sum();
        metrics + aliases + devices
    }

    /// What a device's (or, for `None`, the node's own) metrics and aliases cost now.
    fn bytes_of(&self, device: &Option<String>) -> usize {
        let own = |d: &Option<String>| d == device;
        let metrics = self.metrics.get(device).map_or(0, |m| {
            m.keys().map(|n| n.len() + NAME_OVERHEAD).sum::<usize>()
        });
        let aliases: usize = self
            .aliases
            .values()
            .filter(|k| own(&k.device))
            .map(|k| k.name.len() + NAME_OVERHEAD)
            .sum();
        metrics + aliases
    }
}

/// The host application's memory of its edge nodes.
#[derive(Debug, Default)]
pub struct Host {
    settings: HostSettings,
    nodes: HashMap<(String, String), Node>,
    owners: HashMap<String, Identity>,
    /// Bytes of all nodes' names ([`HostSettings::max_name_bytes`]).
    bytes: usize,
}

impl Host {
    /// An empty host.
    pub fn new(settings: HostSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// Edge nodes remembered.
    pub fn edge_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Whether `device_id` is a Sparkplug edge node or device heard since the start.
    pub fn knows(&self, device_id: &str) -> bool {
        self.owners.contains_key(device_id)
    }

    /// Handles one message from `topic` (already parsed) with its raw payload, at `now_ms`
    /// (Unix milliseconds, for rebirth pacing and command timestamps).
    ///
    /// # Errors
    /// [`Refused`] when the message cannot be used at all; then nothing changed.
    pub fn handle(
        &mut self,
        topic: &Topic<'_>,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Outcome, Refused> {
        let payload = Payload::decode(payload).map_err(|e| Refused::Decode(e.to_string()))?;
        let id = sparkplug_id(topic.edge_node, topic.device)?;
        let identity = Identity {
            group: topic.group.to_owned(),
            edge_node: topic.edge_node.to_owned(),
            device: topic.device.map(str::to_owned),
        };
        if let Some(owner) = self.owners.get(&id)
            && *owner != identity
        {
            return Err(Refused::IdConflict {
                id,
                group: owner.group.clone(),
                edge_node: owner.edge_node.clone(),
            });
        }
        let key = (identity.group.clone(), identity.edge_node.clone());
        if !self.nodes.contains_key(&key) && self.nodes.len() >= self.settings.max_edge_nodes {
            // A birth may take the place of a node never born: a client sending data under
            // many made-up node ids must not lock out a real edge node.
            if topic.kind != Kind::NBirth || !self.forget_an_unborn_node() {
                return Err(Refused::NodeLimit(self.settings.max_edge_nodes));
            }
        }
        let max_entries = self.settings.max_metrics_per_node;
        let max_bytes = self.settings.max_name_bytes;
        let host_bytes = self.bytes;
        let node = self.nodes.entry(key).or_default();
        // Checked before anything is learned, so a refused message changes nothing.
        if matches!(topic.kind, Kind::NBirth | Kind::DBirth) {
            let (replaced, replaced_bytes) = match topic.kind {
                Kind::NBirth => (node.entries(), node.bytes),
                _ => (
                    node.metrics.get(&identity.device).map_or(0, HashMap::len),
                    node.bytes_of(&identity.device),
                ),
            };
            if node.entries() - replaced + 2 * payload.metrics.len() + 1 > max_entries {
                return Err(Refused::MetricLimit(max_entries));
            }
            let mut declared = 0;
            for m in &payload.metrics {
                let n = m.name.as_ref().map_or(0, String::len);
                if n > MAX_METRIC_NAME_BYTES {
                    return Err(Refused::NameBytes(MAX_METRIC_NAME_BYTES));
                }
                declared +=
                    2 * (n + NAME_OVERHEAD + identity.device.as_ref().map_or(0, String::len));
            }
            let after = host_bytes - replaced_bytes.min(host_bytes) + declared;
            if after > max_bytes {
                return Err(Refused::NameBytes(max_bytes));
            }
        } else if let Some(d) = &identity.device
            && !node.devices.contains(d)
        {
            // A device first heard in a data or death message is remembered too: bounded
            // like the devices a birth declares.
            if node.entries() + 1 > max_entries {
                return Err(Refused::MetricLimit(max_entries));
            }
            if host_bytes + d.len() + NAME_OVERHEAD > max_bytes {
                return Err(Refused::NameBytes(max_bytes));
            }
        }
        let recount = matches!(topic.kind, Kind::NBirth | Kind::DBirth | Kind::NDeath)
            || identity
                .device
                .as_ref()
                .is_some_and(|d| !node.devices.contains(d));
        if topic.kind == Kind::DBirth {
            // A device's new birth replaces its aliases: the old ones would otherwise
            // accumulate, birth after birth.
            let device = &identity.device;
            node.aliases.retain(|_, k| k.device != *device);
        }
        let mut out = Outcome::default();
        let mut rebirth = false;
        match topic.kind {
            Kind::NBirth => {
                node.born = true;
                node.bd_seq = bd_seq(&payload);
                node.next_seq = payload.seq.map(|s| (s as u8).wrapping_add(1));
                node.aliases.clear();
                node.metrics.clear();
                let reported = learn(node, None, &payload.metrics, &mut out.issues);
                node.has_state = !reported.is_empty();
                // A born node owns its id whether or not it reports state: the same node id
                // born in another group is refused (IdConflict), so one client cannot hold
                // the node table with births of one name in every group.
                self.owners.insert(id.clone(), identity);
                if node.has_state {
                    out.updates.push(StateUpdate {
                        device: id,
                        reported,
                        connected: true,
                    });
                }
            }
            Kind::NDeath => {
                // The death must name the session it ends (spec: the NDEATH's bdSeq equals
                // its NBIRTH's): one without, or with another, ends nothing.
                let death = bd_seq(&payload);
                if node.born && node.bd_seq.is_some() && death != node.bd_seq {
                    out.issues.push(Issue::StaleDeath);
                    return Ok(out);
                }
                node.born = false;
                node.next_seq = None;
                node.aliases.clear();
                if node.has_state {
                    out.updates.push(StateUpdate {
                        device: id,
                        reported: Map::new(),
                        connected: false,
                    });
                }
                for d in &node.devices {
                    if let Ok(device) = sparkplug_id(topic.edge_node, Some(d)) {
                        out.updates.push(StateUpdate {
                            device,
                            reported: Map::new(),
                            connected: false,
                        });
                    }
                }
            }
            Kind::NData | Kind::DBirth | Kind::DData | Kind::DDeath => {
                rebirth |= check_seq(node, payload.seq, &mut out.issues);
                let device = identity.device.clone();
                let reported = match topic.kind {
                    Kind::DBirth => learn(node, device.clone(), &payload.metrics, &mut out.issues),
                    Kind::DDeath => Map::new(),
                    _ => resolve(node, device.as_ref(), &payload.metrics, &mut out.issues),
                };
                if out
                    .issues
                    .iter()
                    .any(|i| matches!(i, Issue::UnknownAlias(_)))
                {
                    rebirth = true;
                }
                if let Some(d) = &device {
                    node.devices.insert(d.clone());
                } else if reported.is_empty() && !node.has_state {
                    // An NDATA with nothing to report for a node that is not a device.
                    if recount {
                        recount_bytes(&mut self.bytes, node);
                    }
                    return Ok(finish(node, out, rebirth, topic, now_ms, self.settings));
                } else {
                    node.has_state = true;
                }
                self.owners.insert(id.clone(), identity);
                out.updates.push(StateUpdate {
                    device: id,
                    reported,
                    connected: topic.kind != Kind::DDeath,
                });
            }
            Kind::NCmd | Kind::DCmd => {}
        }
        if recount {
            recount_bytes(&mut self.bytes, node);
        }
        Ok(finish(node, out, rebirth, topic, now_ms, self.settings))
    }

    /// Forgets one node that was never born (heard only in data messages), with the device
    /// ids it claimed; false when every node remembered is born.
    fn forget_an_unborn_node(&mut self) -> bool {
        let Some(key) = self
            .nodes
            .iter()
            .find(|(_, n)| !n.born)
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        if let Some(node) = self.nodes.remove(&key) {
            self.bytes -= node.bytes.min(self.bytes);
        }
        self.owners
            .retain(|_, who| (who.group.as_str(), who.edge_node.as_str()) != (&key.0, &key.1));
        true
    }

    /// The command that writes `delta` (desired minus reported) to a Sparkplug device:
    /// a DCMD (an NCMD for the edge node's own metrics) carrying each leaf whose path names a
    /// metric the birth declared, converted to that metric's datatype. `None` when the device
    /// is not a Sparkplug device heard since the agent started, or nothing in `delta` is
    /// writable; the paths left out are pushed to `skipped`.
    pub fn command(
        &self,
        device_id: &str,
        delta: &Map<String, Value>,
        now_ms: u64,
        skipped: &mut Vec<String>,
    ) -> Option<Command> {
        let identity = self.owners.get(device_id)?;
        let node = self
            .nodes
            .get(&(identity.group.clone(), identity.edge_node.clone()))?;
        let declared = node.metrics.get(&identity.device);
        let mut leaves = Vec::new();
        flatten(delta, &mut String::new(), &mut leaves);
        let mut metrics = Vec::new();
        for (path, v) in leaves {
            let found = declared
                .and_then(|m| m.get(&path))
                .and_then(|&datatype| Some((datatype, value::from_json(v, datatype)?)));
            match found {
                Some((datatype, value)) => metrics.push(Metric {
                    name: Some(path),
                    timestamp: Some(now_ms),
                    datatype: Some(datatype),
                    value: Some(value),
                    ..Metric::default()
                }),
                None => skipped.push(path),
            }
        }
        if metrics.is_empty() {
            return None;
        }
        Some(Command {
            topic: topic::command_topic(
                &identity.group,
                &identity.edge_node,
                identity.device.as_deref(),
            ),
            payload: Payload {
                timestamp: Some(now_ms),
                metrics,
                ..Payload::default()
            }
            .encode_to_vec(),
        })
    }
}

/// A Sparkplug name's device id, through the one mapping every dialect uses.
fn sparkplug_id(edge_node: &str, device: Option<&str>) -> Result<String, LimitError> {
    crate::identity::device_id(crate::identity::Name::Sparkplug { edge_node, device })
        .map(|(id, _)| id)
}

/// Counts a node's names again after a message that may have changed them.
fn recount_bytes(host_bytes: &mut usize, node: &mut Node) {
    let before = node.bytes;
    node.bytes = node.count_bytes();
    *host_bytes = *host_bytes - before.min(*host_bytes) + node.bytes;
}

/// Adds the rebirth request, paced per node.
fn finish(
    node: &mut Node,
    mut out: Outcome,
    mut rebirth: bool,
    topic: &Topic<'_>,
    now_ms: u64,
    settings: HostSettings,
) -> Outcome {
    if !node.born && topic.kind != Kind::NDeath {
        out.issues.push(Issue::NotBorn);
        rebirth = true;
    }
    let due = node
        .last_rebirth_ms
        .is_none_or(|last| now_ms.saturating_sub(last) >= settings.rebirth_interval_ms);
    if rebirth && due {
        node.last_rebirth_ms = Some(now_ms);
        out.rebirth = Some(rebirth_command(topic.group, topic.edge_node, now_ms));
    }
    out
}

/// The NCMD asking an edge node to publish its births again.
pub fn rebirth_command(group: &str, edge_node: &str, now_ms: u64) -> Command {
    Command {
        topic: topic::command_topic(group, edge_node, None),
        payload: Payload {
            timestamp: Some(now_ms),
            metrics: vec![Metric {
                name: Some(REBIRTH.to_owned()),
                timestamp: Some(now_ms),
                datatype: Some(datatype::BOOLEAN),
                value: Some(MetricValue::BooleanValue(true)),
                ..Metric::default()
            }],
            ..Payload::default()
        }
        .encode_to_vec(),
    }
}

/// Checks and advances the node's seq; true when a rebirth is needed.
fn check_seq(node: &mut Node, seq: Option<u64>, issues: &mut Vec<Issue>) -> bool {
    let Some(seq) = seq else {
        issues.push(Issue::MissingSeq);
        return true;
    };
    let gap = match node.next_seq {
        Some(expected) if u64::from(expected) != seq => {
            issues.push(Issue::SeqGap { expected, got: seq });
            true
        }
        _ => false,
    };
    node.next_seq = Some((seq as u8).wrapping_add(1));
    gap || seq > 255
}

fn bd_seq(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(BD_SEQ))
        .and_then(|m| match m.value {
            Some(MetricValue::LongValue(v)) => Some(v),
            Some(MetricValue::IntValue(v)) => Some(v.into()),
            _ => None,
        })
}

/// Metrics that are protocol, not state: bdSeq and the node and device control commands.
fn is_control(name: &str) -> bool {
    name == BD_SEQ || name.starts_with("Node Control/") || name.starts_with("Device Control/")
}

/// Learns a birth's aliases and datatypes for `device`, and returns its state.
fn learn(
    node: &mut Node,
    device: Option<String>,
    metrics: &[Metric],
    issues: &mut Vec<Issue>,
) -> Map<String, Value> {
    let declared = node.metrics.entry(device.clone()).or_default();
    declared.clear();
    let mut reported = Map::new();
    for m in metrics {
        let (Some(name), Some(dt)) = (&m.name, m.datatype) else {
            continue;
        };
        declared.insert(name.clone(), dt);
        if let Some(alias) = m.alias {
            node.aliases.insert(
                alias,
                Known {
                    device: device.clone(),
                    name: name.clone(),
                    datatype: dt,
                },
            );
        }
        if !is_control(name) && m.is_historical != Some(true) {
            put(&mut reported, name, m, dt, issues);
        }
    }
    reported
}

/// Resolves a data message's metrics by alias or name into the device's state.
fn resolve(
    node: &Node,
    device: Option<&String>,
    metrics: &[Metric],
    issues: &mut Vec<Issue>,
) -> Map<String, Value> {
    let declared = node.metrics.get(&device.cloned());
    let mut reported = Map::new();
    for m in metrics {
        if m.is_historical == Some(true) {
            continue;
        }
        let (name, dt) = match (&m.name, m.alias) {
            (Some(name), _) => {
                let dt = m
                    .datatype
                    .or_else(|| declared.and_then(|d| d.get(name).copied()));
                (name.as_str(), dt)
            }
            (None, Some(alias)) => match node.aliases.get(&alias) {
                Some(k) if k.device.as_ref() == device => {
                    (k.name.as_str(), Some(m.datatype.unwrap_or(k.datatype)))
                }
                _ => {
                    issues.push(Issue::UnknownAlias(alias));
                    continue;
                }
            },
            (None, None) => continue,
        };
        let Some(dt) = dt else {
            issues.push(Issue::Unmapped {
                name: name.to_owned(),
                reason: value::Unmapped::Mismatch(0),
            });
            continue;
        };
        if !is_control(name) {
            put(&mut reported, name, m, dt, issues);
        }
    }
    reported
}

/// Puts a metric's value at its name's path (`Inputs/Temperature` -> `{"Inputs":{"Temperature":..}}`).
fn put(
    reported: &mut Map<String, Value>,
    name: &str,
    m: &Metric,
    dt: u32,
    issues: &mut Vec<Issue>,
) {
    let v = match value::to_json(m, dt) {
        Ok(v) => v,
        Err(reason) => {
            issues.push(Issue::Unmapped {
                name: name.to_owned(),
                reason,
            });
            return;
        }
    };
    let mut segments: Vec<&str> = name.split('/').filter(|s| !s.is_empty()).collect();
    let Some(last) = segments.pop() else {
        return;
    };
    let mut at = reported;
    for s in segments {
        let slot = at
            .entry(s.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            // A metric named like a folder of others: the later one wins.
            *slot = Value::Object(Map::new());
        }
        at = slot.as_object_mut().expect("made an object above");
    }
    at.insert(last.to_owned(), v);
}

/// The leaves of a JSON object with their `/`-joined paths.
fn flatten<'a>(
    obj: &'a Map<String, Value>,
    prefix: &mut String,
    out: &mut Vec<(String, &'a Value)>,
) {
    for (k, v) in obj {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(k);
        match v {
            Value::Object(inner) if !inner.is_empty() => flatten(inner, prefix, out),
            _ => out.push((prefix.clone(), v)),
        }
        prefix.truncate(len);
    }
}

#[cfg(test)]
mod tests;
