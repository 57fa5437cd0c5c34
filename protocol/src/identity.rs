//! One namespace for device ids. Every dialect a device can speak (the shadow topics and
//! plain JSON ingest, Sparkplug B, KubeEdge's twin topics) names its devices its own way;
//! [`device_id`] is the one function that turns those names into edgesync device ids, and
//! [`Dialect`] records which dialect an id belongs to. The agent's store gives an id to the
//! first dialect that writes it and refuses the others ([`crate::ShadowError::IdentityTaken`]),
//! so a Sparkplug edge node `GW1` and a JSON client `gw1` never share the shadow `gw1`.

use crate::limits::{LimitError, validate_device_id};

/// Which dialect a device id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// The shadow topics and plain JSON ingest topics (one identity: a device may use both).
    #[default]
    Native,
    /// Sparkplug B edge nodes and their devices.
    Sparkplug,
    /// KubeEdge device twin topics.
    KubeEdge,
}

impl Dialect {
    /// The stored label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Sparkplug => "sparkplug-b",
            Self::KubeEdge => "kubeedge-twin",
        }
    }

    /// The dialect a stored label names.
    pub fn from_label(label: &str) -> Option<Self> {
        [Self::Native, Self::Sparkplug, Self::KubeEdge]
            .into_iter()
            .find(|d| d.label() == label)
    }

    /// Who speaks it, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Native => "a shadow-topic or JSON ingest client",
            Self::Sparkplug => "a Sparkplug B edge node or device",
            Self::KubeEdge => "a KubeEdge twin device",
        }
    }
}

/// A device's name as its dialect gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    /// The `{device}` level of a shadow or ingest topic.
    Native(&'a str),
    /// A Sparkplug B edge node, or one of its devices.
    Sparkplug {
        /// Edge node id.
        edge_node: &'a str,
        /// Device id; `None` for the edge node itself.
        device: Option<&'a str>,
    },
    /// The device name in a KubeEdge twin topic.
    KubeEdge(&'a str),
}

/// The edgesync device id for `name`, and its dialect. Native and KubeEdge names are used as
/// they are; Sparkplug names are normalised ([`crate::sparkplug::topic::device_id`]).
///
/// # Errors
/// When the result is not a valid device id (a Kubernetes object name).
pub fn device_id(name: Name<'_>) -> Result<(String, Dialect), LimitError> {
    match name {
        Name::Native(id) => {
            validate_device_id(id)?;
            Ok((id.to_owned(), Dialect::Native))
        }
        Name::Sparkplug { edge_node, device } => Ok((
            crate::sparkplug::topic::device_id(edge_node, device)?,
            Dialect::Sparkplug,
        )),
        Name::KubeEdge(id) => {
            validate_device_id(id)?;
            Ok((id.to_owned(), Dialect::KubeEdge))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_different_dialects_can_map_to_one_id_and_keep_their_dialect() {
        let sparkplug = Name::Sparkplug {
            edge_node: "GW1",
            device: None,
        };
        assert_eq!(
            device_id(sparkplug),
            Ok(("gw1".to_owned(), Dialect::Sparkplug))
        );
        assert_eq!(
            device_id(Name::Native("gw1")),
            Ok(("gw1".to_owned(), Dialect::Native))
        );
        let device = Name::Sparkplug {
            edge_node: "line",
            device: Some("press-9"),
        };
        assert_eq!(device_id(device).unwrap().0, "line.press-9");
        assert!(device_id(Name::KubeEdge("Press_1")).is_err());
        for d in [Dialect::Native, Dialect::Sparkplug, Dialect::KubeEdge] {
            assert_eq!(Dialect::from_label(d.label()), Some(d));
        }
    }
}
