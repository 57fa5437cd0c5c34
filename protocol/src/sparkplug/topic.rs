//! Sparkplug B topics (`spBv1.0/{group}/{type}/{edge_node}[/{device}]`, spec 4.1) and the
//! edgesync device ids they map to.

use crate::limits::{LimitError, validate_device_id};

/// The Sparkplug B topic namespace.
pub const NAMESPACE: &str = "spBv1.0";

/// The message types a host application receives from edge nodes, and the commands it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Edge node birth certificate.
    NBirth,
    /// Edge node death certificate (usually the MQTT will).
    NDeath,
    /// Edge node data.
    NData,
    /// Command to an edge node.
    NCmd,
    /// Device birth certificate.
    DBirth,
    /// Device death certificate.
    DDeath,
    /// Device data.
    DData,
    /// Command to a device.
    DCmd,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "NBIRTH" => Self::NBirth,
            "NDEATH" => Self::NDeath,
            "NDATA" => Self::NData,
            "NCMD" => Self::NCmd,
            "DBIRTH" => Self::DBirth,
            "DDEATH" => Self::DDeath,
            "DDATA" => Self::DData,
            "DCMD" => Self::DCmd,
            _ => return None,
        })
    }

    /// The type as it appears in topics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NDeath => "NDEATH",
            Self::NData => "NDATA",
            Self::NCmd => "NCMD",
            Self::DBirth => "DBIRTH",
            Self::DDeath => "DDEATH",
            Self::DData => "DDATA",
            Self::DCmd => "DCMD",
        }
    }

    /// Whether messages of this type are about one device (and their topic names it).
    pub fn is_device(self) -> bool {
        matches!(self, Self::DBirth | Self::DDeath | Self::DData | Self::DCmd)
    }
}

/// A parsed Sparkplug B topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    /// Group id.
    pub group: &'a str,
    /// Message type.
    pub kind: Kind,
    /// Edge node id.
    pub edge_node: &'a str,
    /// Device id, for device messages.
    pub device: Option<&'a str>,
}

/// Parses a Sparkplug B topic; `None` for anything else (including `STATE`, and a device
/// message without a device or a node message with one).
pub fn parse(topic: &str) -> Option<Topic<'_>> {
    let mut levels = topic.split('/');
    if levels.next()? != NAMESPACE {
        return None;
    }
    let group = levels.next()?;
    let kind = Kind::parse(levels.next()?)?;
    let edge_node = levels.next()?;
    let device = levels.next();
    if levels.next().is_some()
        || group.is_empty()
        || edge_node.is_empty()
        || device.is_some_and(str::is_empty)
        || device.is_some() != kind.is_device()
    {
        return None;
    }
    Some(Topic {
        group,
        kind,
        edge_node,
        device,
    })
}

/// The subscriptions a host application needs: births, deaths and data of every edge node in
/// `group` (all groups when `None`), and not the commands it sends itself.
pub fn subscriptions(group: Option<&str>) -> Vec<String> {
    let g = group.unwrap_or("+");
    let mut out = Vec::with_capacity(6);
    for kind in [Kind::NBirth, Kind::NDeath, Kind::NData] {
        out.push(format!("{NAMESPACE}/{g}/{}/+", kind.as_str()));
    }
    for kind in [Kind::DBirth, Kind::DDeath, Kind::DData] {
        out.push(format!("{NAMESPACE}/{g}/{}/+/+", kind.as_str()));
    }
    out
}

/// The topic of a command to an edge node (`device: None`, NCMD) or one of its devices (DCMD).
pub fn command_topic(group: &str, edge_node: &str, device: Option<&str>) -> String {
    match device {
        None => format!("{NAMESPACE}/{group}/NCMD/{edge_node}"),
        Some(d) => format!("{NAMESPACE}/{group}/DCMD/{edge_node}/{d}"),
    }
}

/// The edgesync device id for an edge node (`device: None`) or one of its devices:
/// `{edge_node}` and `{edge_node}.{device}`, lowercased, with every character a Kubernetes
/// name cannot hold replaced by `-`.
///
/// Sparkplug device ids are unique only within their edge node, so the edge node is part of
/// the id; the group is not, because one agent usually serves one plant's group and shorter
/// names read better in `kubectl get devices`. Ids that two Sparkplug identities would share
/// are refused by the host ([`super::host`]), never merged.
///
/// # Errors
/// When the result is not a valid device id (empty, too long, or starting or ending with `-`).
pub fn device_id(edge_node: &str, device: Option<&str>) -> Result<String, LimitError> {
    let mut id = String::with_capacity(edge_node.len() + device.map_or(0, |d| d.len() + 1));
    push_normalized(&mut id, edge_node);
    if let Some(d) = device {
        id.push('.');
        push_normalized(&mut id, d);
    }
    validate_device_id(&id)?;
    Ok(id)
}

fn push_normalized(out: &mut String, s: &str) {
    out.extend(s.chars().map(|c| match c {
        'a'..='z' | '0'..='9' | '-' | '.' => c,
        'A'..='Z' => c.to_ascii_lowercase(),
        _ => '-',
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_and_device_topics() {
        assert_eq!(
            parse("spBv1.0/Plant1/DDATA/Gateway_1/Press 1"),
            Some(Topic {
                group: "Plant1",
                kind: Kind::DData,
                edge_node: "Gateway_1",
                device: Some("Press 1"),
            })
        );
        assert_eq!(
            parse("spBv1.0/g/NBIRTH/n"),
            Some(Topic {
                group: "g",
                kind: Kind::NBirth,
                edge_node: "n",
                device: None,
            })
        );
        for bad in [
            "spBv1.0/STATE/host",
            "spBv1.0/g/NBIRTH/n/d",
            "spBv1.0/g/DDATA/n",
            "spBv1.0/g/DDATA/n/d/x",
            "spBv1.0//NDATA/n",
            "spBv1.0/g/NDATA/",
            "spAv1.0/g/NDATA/n",
            "spBv1.0/g/NOPE/n",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn device_ids_are_kubernetes_names() {
        assert_eq!(
            device_id("Gateway_1", Some("Press 1")).unwrap(),
            "gateway-1.press-1"
        );
        assert_eq!(device_id("gw", None).unwrap(), "gw");
        assert!(device_id("_gw", None).is_err());
        assert!(device_id("gw", Some("")).is_err());
    }

    #[test]
    fn subscriptions_cover_births_deaths_and_data_only() {
        let subs = subscriptions(Some("Plant1"));
        assert_eq!(subs.len(), 6);
        assert!(subs.contains(&"spBv1.0/Plant1/DDATA/+/+".to_owned()));
        assert!(!subs.iter().any(|s| s.contains("CMD")));
        assert!(subscriptions(None)[0].starts_with("spBv1.0/+/"));
    }
}
