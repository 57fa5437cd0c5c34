//! Device-facing MQTT topics and reply payloads.
//!
//! Topics, under a configurable prefix (default `edgesync`):
//! `{prefix}/{device}/shadow/update` (in) with replies on `.../update/accepted`,
//! `.../update/rejected`, `.../update/delta`, `.../update/documents`; and
//! `{prefix}/{device}/shadow/get` (in) with replies on `.../get/accepted` and `.../get/rejected`;
//! `{prefix}/{device}/shadow/desired/reject` (in) with replies on `.../reject/accepted` and
//! `.../reject/rejected`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::shadow::{EpochSeconds, ShadowDocument, ShadowError};

/// Default topic prefix.
pub const DEFAULT_TOPIC_PREFIX: &str = "edgesync";

/// Which shadow operation an inbound topic asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    /// `shadow/update`
    Update,
    /// `shadow/get`
    Get,
    /// `shadow/desired/reject`: the device refuses its desired state.
    Reject,
}

/// Splits `{prefix}/{device}/shadow/{update|get|desired/reject}` into the device id and operation. Returns
/// `None` for any other topic (including our own reply topics). The device id is returned
/// unvalidated: the caller must reject invalid ids with a reply.
pub fn parse_shadow_topic<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, ShadowOp)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (device, op) = rest.split_once('/')?;
    let op = match op {
        "shadow/update" => ShadowOp::Update,
        "shadow/get" => ShadowOp::Get,
        "shadow/desired/reject" => ShadowOp::Reject,
        _ => return None,
    };
    Some((device, op))
}

/// Builds a reply topic such as `edgesync/press-1/shadow/update/accepted`.
pub fn reply_topic(prefix: &str, device: &str, op: ShadowOp, suffix: &str) -> String {
    let op = match op {
        ShadowOp::Update => "update",
        ShadowOp::Get => "get",
        ShadowOp::Reject => "desired/reject",
    };
    format!("{prefix}/{device}/shadow/{op}/{suffix}")
}

/// A plain-publisher topic mapping such as `factory/{device}/state`: any JSON object published
/// on a matching topic is merged into that device's reported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestPattern {
    before: String,
    after: String,
}

/// Why an ingest pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern lacks `{device}` or has it more than once.
    #[error("ingest topic '{0}' must contain '{{device}}' exactly once, as a whole topic level")]
    DevicePlaceholder(String),
    /// The pattern contains MQTT wildcards.
    #[error("ingest topic '{0}' must not contain the MQTT wildcards '+' or '#'")]
    Wildcard(String),
}

impl IngestPattern {
    /// Parses a pattern with exactly one `{device}` placeholder spanning one topic level.
    ///
    /// # Errors
    /// [`PatternError`] naming what is wrong.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        if pattern.contains('+') || pattern.contains('#') {
            return Err(PatternError::Wildcard(pattern.to_owned()));
        }
        let placeholder = "{device}";
        let Some((before, after)) = pattern.split_once(placeholder) else {
            return Err(PatternError::DevicePlaceholder(pattern.to_owned()));
        };
        let whole_level = (before.is_empty() || before.ends_with('/'))
            && (after.is_empty() || after.starts_with('/'));
        if after.contains(placeholder) || !whole_level {
            return Err(PatternError::DevicePlaceholder(pattern.to_owned()));
        }
        Ok(Self {
            before: before.to_owned(),
            after: after.to_owned(),
        })
    }

    /// The pattern as written (`factory/{device}/state`).
    pub fn template(&self) -> String {
        format!("{}{{device}}{}", self.before, self.after)
    }

    /// The MQTT subscription filter (`factory/+/state`).
    pub fn filter(&self) -> String {
        format!("{}+{}", self.before, self.after)
    }

    /// The device id in `topic`, if the topic matches (unvalidated).
    pub fn device<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let device = topic
            .strip_prefix(&self.before)?
            .strip_suffix(&self.after)?;
        (!device.is_empty() && !device.contains('/')).then_some(device)
    }
}

/// Payload of `update/rejected` and `get/rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    /// HTTP-style code: 400, 404, 409, 413, 429 or 503.
    pub code: u16,
    /// What was wrong, for a person.
    pub message: String,
    /// The request's `clientToken`, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

impl Rejected {
    /// A rejection for a shadow error.
    pub fn from_error(err: &ShadowError, client_token: Option<String>) -> Self {
        Self {
            code: err.code(),
            message: err.to_string(),
            client_token,
        }
    }
}

/// Payload of `update/accepted`: the reported state that was applied and the new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateAccepted {
    /// `{"reported": {...}}` as the device sent it.
    pub state: Map<String, Value>,
    /// Shadow version after the update.
    pub version: u64,
    /// Time the update was applied.
    pub timestamp: EpochSeconds,
    /// The request's `clientToken`, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// Payload of `desired/reject/accepted`: the refusal is stored and will reach the Device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectAccepted {
    /// The generation refused.
    pub desired_generation: i64,
    /// Shadow version after the refusal was stored.
    pub version: u64,
    /// The request's `clientToken`, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// Payload of `update/delta`: desired state the device does not match yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeltaMessage {
    /// Desired leaves that reported lacks or differs on.
    pub state: Map<String, Value>,
    /// Shadow version the delta was computed at.
    pub version: u64,
    /// The `Device` generation of the desired state: what a device names when it refuses it
    /// (`shadow/desired/reject`).
    #[serde(default)]
    pub desired_generation: i64,
    /// Time of computation.
    pub timestamp: EpochSeconds,
}

/// Payload of `update/documents`: the document before and after an accepted change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentsMessage {
    /// Before the change.
    pub previous: ShadowDocument,
    /// After the change.
    pub current: ShadowDocument,
    /// Time of the change.
    pub timestamp: EpochSeconds,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_topics_parse_and_replies_do_not() {
        assert_eq!(
            parse_shadow_topic("edgesync", "edgesync/press-1/shadow/update"),
            Some(("press-1", ShadowOp::Update))
        );
        assert_eq!(
            parse_shadow_topic("edgesync", "edgesync/press-1/shadow/get"),
            Some(("press-1", ShadowOp::Get))
        );
        assert_eq!(
            parse_shadow_topic("edgesync", "edgesync/press-1/shadow/update/accepted"),
            None
        );
        assert_eq!(
            parse_shadow_topic("edgesync", "other/press-1/shadow/update"),
            None
        );
        assert_eq!(
            parse_shadow_topic("edgesync", "edgesyncx/press-1/shadow/update"),
            None
        );
        assert_eq!(
            reply_topic("edgesync", "press-1", ShadowOp::Update, "delta"),
            "edgesync/press-1/shadow/update/delta"
        );
        assert_eq!(
            parse_shadow_topic("edgesync", "edgesync/press-1/shadow/desired/reject"),
            Some(("press-1", ShadowOp::Reject))
        );
        assert_eq!(
            parse_shadow_topic(
                "edgesync",
                "edgesync/press-1/shadow/desired/reject/accepted"
            ),
            None
        );
        assert_eq!(
            reply_topic("edgesync", "press-1", ShadowOp::Reject, "rejected"),
            "edgesync/press-1/shadow/desired/reject/rejected"
        );
    }

    #[test]
    fn ingest_patterns() {
        let p = IngestPattern::parse("factory/{device}/state").unwrap();
        assert_eq!(p.filter(), "factory/+/state");
        assert_eq!(p.device("factory/press-1/state"), Some("press-1"));
        assert_eq!(p.device("factory/a/b/state"), None);
        assert_eq!(p.device("factory//state"), None);
        assert_eq!(p.device("factory/press-1/other"), None);
        assert_eq!(IngestPattern::parse("{device}").unwrap().filter(), "+");
        assert!(IngestPattern::parse("factory/state").is_err());
        assert!(IngestPattern::parse("factory/x{device}/state").is_err());
        assert!(IngestPattern::parse("factory/{device}/{device}").is_err());
        assert!(IngestPattern::parse("factory/+/{device}").is_err());
    }

    #[test]
    fn rejected_reply_shape() {
        let r = Rejected::from_error(
            &ShadowError::VersionConflict {
                requested: 1,
                current: 2,
            },
            Some("t1".into()),
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"code":409,"message":"version conflict: request has version 1, shadow is at version 2","clientToken":"t1"})
        );
    }
}
