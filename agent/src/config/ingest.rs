//! `[[ingest]]`: which topics beyond the shadow topics carry device state, and in what format.

use edgesync_protocol::mqtt::IngestPattern;
use edgesync_protocol::sparkplug::HostSettings;
use serde::Deserialize;

/// The payload format of an ingest mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Any JSON object, merged into the reported state (`topic` names the device).
    #[default]
    Json,
    /// Eclipse Sparkplug B 3.0: births, data and deaths of edge nodes and their devices.
    SparkplugB,
    /// KubeEdge's device twin topics (`$hw/events/device/...`), for devices and mappers
    /// written for KubeEdge.
    KubeedgeTwin,
}

/// `[[ingest]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Payload format.
    #[serde(default)]
    pub format: Format,
    /// `json`: topic with one `{device}` level, e.g. `factory/{device}/state`.
    pub topic: Option<String>,
    /// `sparkplug-b`: the one group to hear (all groups when absent).
    pub group: Option<String>,
    /// `sparkplug-b`: edge nodes remembered at once.
    pub max_edge_nodes: Option<usize>,
    /// `sparkplug-b`: aliases, metric names and devices remembered per edge node.
    pub max_metrics_per_node: Option<usize>,
    /// Bytes of metric, alias and device names remembered for all edge nodes together.
    pub max_name_bytes: Option<usize>,
    /// `sparkplug-b`: least time between two rebirth requests to one edge node.
    pub rebirth_interval_ms: Option<u64>,
}

/// A Sparkplug B mapping, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugSettings {
    /// The one group heard, or all.
    pub group: Option<String>,
    /// Bounds and pacing of the host application's memory.
    pub host: HostSettings,
}

/// All ingest mappings, validated.
#[derive(Debug, Clone, Default)]
pub struct IngestSettings {
    /// JSON topic mappings.
    pub json: Vec<IngestPattern>,
    /// The Sparkplug B mapping (at most one).
    pub sparkplug: Option<SparkplugSettings>,
    /// Whether KubeEdge's device twin topics are served.
    pub kubeedge_twin: bool,
}

impl IngestSettings {
    /// Topic templates whose `{device}` level names the publishing device, for the embedded
    /// broker's "own topics" ACL.
    pub fn device_topics(&self) -> Vec<String> {
        self.json.iter().map(IngestPattern::template).collect()
    }
}

/// Validates the mappings, pushing one message per problem to `errs`.
pub fn ingest_settings(raw: &[RawIngest], errs: &mut Vec<String>) -> IngestSettings {
    let mut out = IngestSettings::default();
    for (i, m) in raw.iter().enumerate() {
        let sparkplug_only = [
            ("group", m.group.is_some()),
            ("max_edge_nodes", m.max_edge_nodes.is_some()),
            ("max_metrics_per_node", m.max_metrics_per_node.is_some()),
            ("max_name_bytes", m.max_name_bytes.is_some()),
            ("rebirth_interval_ms", m.rebirth_interval_ms.is_some()),
        ];
        match m.format {
            Format::KubeedgeTwin => {
                let misplaced = sparkplug_only
                    .into_iter()
                    .chain([("topic", m.topic.is_some())])
                    .filter(|(_, set)| *set);
                for (key, _) in misplaced {
                    errs.push(format!(
                        "ingest[{i}].{key} does not apply to format = \"kubeedge-twin\" (its topics are KubeEdge's $hw/events/device/...)"
                    ));
                }
                if out.kubeedge_twin {
                    errs.push(format!(
                        "ingest[{i}]: only one kubeedge-twin mapping is allowed"
                    ));
                }
                out.kubeedge_twin = true;
            }
            Format::Json => {
                for (key, set) in sparkplug_only {
                    if set {
                        errs.push(format!(
                            "ingest[{i}].{key} applies to format = \"sparkplug-b\" only"
                        ));
                    }
                }
                match &m.topic {
                    None => errs.push(format!(
                        "ingest[{i}].topic is required for format = \"json\", e.g. \"factory/{{device}}/state\""
                    )),
                    Some(t) => match IngestPattern::parse(t) {
                        Ok(p) => out.json.push(p),
                        Err(e) => errs.push(format!("ingest[{i}].topic: {e}")),
                    },
                }
            }
            Format::SparkplugB => {
                if m.topic.is_some() {
                    errs.push(format!(
                        "ingest[{i}].topic does not apply to format = \"sparkplug-b\" (its topics are spBv1.0/...; use group to hear one group)"
                    ));
                }
                if out.sparkplug.is_some() {
                    errs.push(format!(
                        "ingest[{i}]: only one sparkplug-b mapping is allowed (leave group out to hear every group)"
                    ));
                }
                if let Some(g) = &m.group
                    && (g.is_empty() || g.contains(['/', '+', '#']))
                {
                    errs.push(format!(
                        "ingest[{i}].group must be a Sparkplug group id (not empty, no '/', '+' or '#')"
                    ));
                }
                let d = HostSettings::default();
                let host = HostSettings {
                    max_edge_nodes: m.max_edge_nodes.unwrap_or(d.max_edge_nodes),
                    max_metrics_per_node: m.max_metrics_per_node.unwrap_or(d.max_metrics_per_node),
                    rebirth_interval_ms: m.rebirth_interval_ms.unwrap_or(d.rebirth_interval_ms),
                    max_name_bytes: m.max_name_bytes.unwrap_or(d.max_name_bytes),
                };
                if host.max_edge_nodes == 0
                    || host.max_metrics_per_node == 0
                    || host.max_name_bytes == 0
                {
                    errs.push(format!(
                        "ingest[{i}]: max_edge_nodes, max_metrics_per_node and max_name_bytes must be at least 1"
                    ));
                }
                out.sparkplug = Some(SparkplugSettings {
                    group: m.group.clone(),
                    host,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> (IngestSettings, Vec<String>) {
        #[derive(Deserialize)]
        struct Doc {
            ingest: Vec<RawIngest>,
        }
        let doc: Doc = toml::from_str(toml_text).unwrap();
        let mut errs = Vec::new();
        (ingest_settings(&doc.ingest, &mut errs), errs)
    }

    #[test]
    fn json_and_sparkplug_mappings() {
        let (s, errs) = parse(
            "[[ingest]]\ntopic = \"f/{device}/s\"\n[[ingest]]\nformat = \"sparkplug-b\"\ngroup = \"Plant1\"\nrebirth_interval_ms = 100\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.json.len(), 1);
        let sp = s.sparkplug.unwrap();
        assert_eq!(sp.group.as_deref(), Some("Plant1"));
        assert_eq!(sp.host.rebirth_interval_ms, 100);
        assert_eq!(
            sp.host.max_edge_nodes,
            HostSettings::default().max_edge_nodes
        );
    }

    #[test]
    fn misplaced_keys_are_named() {
        let (_, errs) = parse("[[ingest]]\ngroup = \"g\"\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("ingest[0].group applies to format = \"sparkplug-b\""));
        assert!(errs[1].contains("ingest[0].topic is required"));
        let (_, errs) = parse(
            "[[ingest]]\nformat = \"sparkplug-b\"\ntopic = \"x/{device}\"\n[[ingest]]\nformat = \"sparkplug-b\"\ngroup = \"a/b\"\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        let bad: Result<toml::Value, _> = toml::from_str("[[ingest]]\nformat = \"xml\"\n");
        assert!(
            bad.is_ok(),
            "the unknown format is refused by the typed parse below"
        );
        #[derive(Deserialize, Debug)]
        struct Doc {
            #[allow(dead_code)]
            ingest: Vec<RawIngest>,
        }
        let (s, errs) = parse("[[ingest]]\nformat = \"kubeedge-twin\"\n");
        assert!(errs.is_empty() && s.kubeedge_twin, "{errs:?}");
        let (_, errs) = parse("[[ingest]]\nformat = \"kubeedge-twin\"\ntopic = \"a/{device}\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        let err = toml::from_str::<Doc>("[[ingest]]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("sparkplug-b"), "{err}");
    }
}
