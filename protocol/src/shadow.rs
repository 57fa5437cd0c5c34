//! The device shadow: desired and reported state, their per-leaf metadata timestamps, and one
//! version number that every accepted change bumps by exactly one.
//!
//! Devices write `reported` (through [`ShadowDocument::apply_reported`]); the cloud owns
//! `desired` (through [`ShadowDocument::set_desired`]). Both check limits *before* changing
//! anything, so a rejected update leaves the document exactly as it was.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identity::Dialect;
use crate::limits::{self, LimitError, Limits};
use crate::merge;
use crate::rejection::Rejection;

/// Seconds since the Unix epoch; shadow metadata uses whole seconds like AWS IoT shadows.
pub type EpochSeconds = u64;

/// A device shadow document as stored by the agent and returned by `shadow/get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShadowDocument {
    /// Desired and reported state.
    pub state: ShadowState,
    /// Per-leaf timestamps mirroring `state` (`{"temp": {"timestamp": 1700000000}}`).
    pub metadata: ShadowMetadata,
    /// Bumped by one on every accepted change to desired or reported.
    pub version: u64,
    /// `metadata.generation` of the `Device` whose `spec.desired` is stored here (0 = none yet).
    #[serde(default)]
    pub desired_generation: i64,
    /// Time of the last accepted change.
    pub timestamp: EpochSeconds,
    /// Whether the device itself is connected, where its protocol says so (Sparkplug B
    /// births and deaths); absent for devices that only publish state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// The device's refusal of the desired generation it holds (`shadow/desired/reject`),
    /// until a newer generation replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Rejection>,
}

/// The two halves of a shadow's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ShadowState {
    /// What the cloud wants the device to be (owned by `Device.spec.desired`).
    #[serde(default)]
    pub desired: Map<String, Value>,
    /// What the device last said it is.
    #[serde(default)]
    pub reported: Map<String, Value>,
}

/// Per-leaf last-update timestamps for `desired` and `reported`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ShadowMetadata {
    /// Timestamps for desired leaves.
    #[serde(default)]
    pub desired: Map<String, Value>,
    /// Timestamps for reported leaves.
    #[serde(default)]
    pub reported: Map<String, Value>,
}

/// Why a shadow update was refused. Each maps to an HTTP-style code for MQTT `rejected`
/// replies and HTTP errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// The payload is not the expected JSON shape.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A limit was exceeded or a name is invalid.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The request named a version that is not the current one.
    #[error("version conflict: request has version {requested}, shadow is at version {current}")]
    VersionConflict {
        /// Version the request expected.
        requested: u64,
        /// Version the shadow is at.
        current: u64,
    },
    /// Devices may not write desired state; it belongs to the cloud.
    #[error(
        "desired state is owned by the cloud and cannot be written by a device; change the Device's spec.desired instead"
    )]
    DesiredIsReadOnly,
    /// The device id belongs to a device of another dialect (see [`crate::identity`]).
    #[error(
        "device id '{device}' belongs to {} and cannot be used by {} (two identities never share a device; give one of them another name)",
        owner.describe(),
        by.describe()
    )]
    IdentityTaken {
        /// The contested id.
        device: String,
        /// The dialect it belongs to.
        owner: Dialect,
        /// The dialect that asked for it.
        by: Dialect,
    },
    /// A refusal of a desired generation older than the one the shadow holds.
    #[error(
        "desired generation {rejected} was already replaced by generation {held}; refuse only the newest desired state (shadow/get shows it)"
    )]
    GenerationReplaced {
        /// The generation refused.
        rejected: i64,
        /// The generation held.
        held: i64,
    },
    /// A refusal of a desired generation the shadow does not hold (newer, or none yet).
    #[error(
        "desired generation {rejected} is not held here (the shadow holds generation {held}; 0: no desired state yet); refuse the desiredGeneration a delta or shadow/get carried"
    )]
    GenerationNotHeld {
        /// The generation refused.
        rejected: i64,
        /// The generation held.
        held: i64,
    },
}

impl ShadowError {
    /// The HTTP-style status code: 400 malformed, 409 version conflict, 413 too large.
    pub fn code(&self) -> u16 {
        match self {
            ShadowError::VersionConflict { .. }
            | ShadowError::IdentityTaken { .. }
            | ShadowError::GenerationReplaced { .. } => 409,
            ShadowError::Limit(e) if e.is_too_large() => 413,
            ShadowError::Malformed(_)
            | ShadowError::Limit(_)
            | ShadowError::DesiredIsReadOnly
            | ShadowError::GenerationNotHeld { .. } => 400,
        }
    }

    /// A short, stable label for metrics (`reason` label on reject counters).
    pub fn reason(&self) -> &'static str {
        match self {
            ShadowError::Malformed(_) => "malformed",
            ShadowError::VersionConflict { .. } => "version_conflict",
            ShadowError::DesiredIsReadOnly => "desired_read_only",
            ShadowError::IdentityTaken { .. } => "identity_taken",
            ShadowError::GenerationReplaced { .. } => "generation_replaced",
            ShadowError::GenerationNotHeld { .. } => "generation_not_held",
            ShadowError::Limit(e) => match e {
                LimitError::PayloadTooLarge { .. } => "payload_too_large",
                LimitError::StateTooLarge { .. } => "state_too_large",
                LimitError::TooDeep { .. } => "too_deep",
                LimitError::KeyTooLong { .. }
                | LimitError::ReservedKey { .. }
                | LimitError::EmptyKey { .. } => "invalid_key",
                LimitError::ClientTokenTooLong { .. } => "client_token_too_long",
                LimitError::InvalidDeviceId { .. } => "invalid_device_id",
            },
        }
    }
}

/// A parsed, limit-checked `shadow/update` request (or a plain ingest message, which is a bare
/// reported patch with no envelope).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    /// Merge patch for `reported`; `None` means "delete all reported state" (`"reported": null`).
    pub reported: Option<Map<String, Value>>,
    /// Echoed back in replies so the device can match them to requests.
    pub client_token: Option<String>,
    /// Optimistic concurrency: when set, must equal the shadow's current version.
    pub version: Option<u64>,
    /// The device's connection state, when its protocol tells it (Sparkplug B births and
    /// deaths); `None` leaves it as it is.
    pub connected: Option<bool>,
    /// The dialect the device spoke: a device id belongs to the first that writes it.
    pub dialect: Dialect,
}

impl UpdateRequest {
    /// Parses a `shadow/update` payload: `{"state":{"reported":{...}},"clientToken":"..","version":N}`.
    ///
    /// # Errors
    /// [`ShadowError::Malformed`] for bad JSON or shape, [`ShadowError::DesiredIsReadOnly`] when
    /// `state.desired` is present, and [`ShadowError::Limit`] for any exceeded limit.
    pub fn parse(payload: &[u8], limits: &Limits) -> Result<Self, ShadowError> {
        let mut root = parse_object(payload, limits)?;
        let client_token = take_client_token(&mut root, limits)?;
        let version = match root.remove("version") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ShadowError::Malformed("version must be a non-negative integer".into())
            })?),
        };
        let mut state = match root.remove("state") {
            Some(Value::Object(state)) => state,
            Some(_) => return Err(ShadowError::Malformed("state must be a JSON object".into())),
            None => {
                return Err(ShadowError::Malformed(
                    "missing \"state\": expected {\"state\":{\"reported\":{...}}}".into(),
                ));
            }
        };
        if let Some(key) = root.keys().next() {
            return Err(ShadowError::Malformed(format!(
                "unknown top-level field '{key}'; allowed: state, clientToken, version"
            )));
        }
        if state.get("desired").is_some_and(|d| !d.is_null()) {
            return Err(ShadowError::DesiredIsReadOnly);
        }
        state.remove("desired");
        let reported = match state.remove("reported") {
            Some(Value::Object(r)) => {
                limits::check_state(&r, limits)?;
                Some(r)
            }
            Some(Value::Null) => None,
            Some(_) => {
                return Err(ShadowError::Malformed(
                    "state.reported must be a JSON object or null".into(),
                ));
            }
            None => {
                return Err(ShadowError::Malformed(
                    "missing state.reported: devices update reported state only".into(),
                ));
            }
        };
        if let Some(key) = state.keys().next() {
            return Err(ShadowError::Malformed(format!(
                "unknown field 'state.{key}'; allowed: reported"
            )));
        }
        Ok(Self {
            reported,
            client_token,
            version,
            connected: None,
            dialect: Dialect::Native,
        })
    }

    /// Parses a plain ingest payload: any JSON object, merged into reported as it is.
    ///
    /// # Errors
    /// [`ShadowError::Malformed`] for bad JSON or a non-object, [`ShadowError::Limit`] for any
    /// exceeded limit.
    pub fn parse_plain(payload: &[u8], limits: &Limits) -> Result<Self, ShadowError> {
        let reported = parse_object(payload, limits)?;
        limits::check_state(&reported, limits)?;
        Ok(Self {
            reported: Some(reported),
            client_token: None,
            version: None,
            connected: None,
            dialect: Dialect::Native,
        })
    }
}

/// Takes a request's optional `clientToken` out of it, checked against the limits.
pub(crate) fn take_client_token(
    root: &mut Map<String, Value>,
    limits: &Limits,
) -> Result<Option<String>, ShadowError> {
    match root.remove("clientToken") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) => {
            limits::check_client_token(&t, limits)?;
            Ok(Some(t))
        }
        Some(_) => Err(ShadowError::Malformed(
            "clientToken must be a string".into(),
        )),
    }
}

pub(crate) fn parse_object(
    payload: &[u8],
    limits: &Limits,
) -> Result<Map<String, Value>, ShadowError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(LimitError::PayloadTooLarge {
            size: payload.len(),
            max: limits.max_payload_bytes,
        }
        .into());
    }
    // serde_json stops at 128 levels of nesting with an error, so hostile depth cannot
    // overflow the stack here; the configured depth limit is checked afterwards.
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ShadowError::Malformed(
            "payload must be a JSON object".into(),
        )),
        Err(e) => Err(ShadowError::Malformed(format!("invalid JSON: {e}"))),
    }
}

/// What an accepted update did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Whether the state changed (and so the version was bumped).
    pub changed: bool,
    /// The document before the update (for `update/documents`); `None` when nothing changed.
    pub previous: Option<ShadowDocument>,
}

impl ShadowDocument {
    /// Applies a device's update to `reported`. An update that changes nothing is accepted
    /// without bumping the version, so periodic republishing of the same state costs no
    /// upstream traffic.
    ///
    /// # Errors
    /// [`ShadowError::VersionConflict`] when `req.version` is set and differs from the current
    /// version; [`LimitError::StateTooLarge`] when the result would exceed the size limit. On
    /// error the document is unchanged.
    pub fn apply_reported(
        &mut self,
        req: &UpdateRequest,
        limits: &Limits,
        now: EpochSeconds,
    ) -> Result<Applied, ShadowError> {
        self.apply_reported_with(req, limits, now, true)
    }

    /// [`Self::apply_reported`], keeping a copy of the previous document only when
    /// `keep_previous` (a device's plain state messages need none, and copying every document
    /// on every message dominated the ingest path). The merge happens in place; on a size
    /// error only the top-level values it touched are put back.
    ///
    /// # Errors
    /// As [`Self::apply_reported`]; on error the document is unchanged.
    pub fn apply_reported_with(
        &mut self,
        req: &UpdateRequest,
        limits: &Limits,
        now: EpochSeconds,
        keep_previous: bool,
    ) -> Result<Applied, ShadowError> {
        if let Some(requested) = req.version
            && requested != self.version
        {
            return Err(ShadowError::VersionConflict {
                requested,
                current: self.version,
            });
        }
        let previous = keep_previous.then(|| self.clone());
        let undo = match &req.reported {
            Some(patch) => merge::Undo::Keys(merge::merge_object_undoable(
                &mut self.state.reported,
                patch,
            )),
            None => merge::Undo::Whole(std::mem::take(&mut self.state.reported)),
        };
        let reconnected = req.connected.is_some() && req.connected != self.connected;
        if undo.is_empty() && !reconnected {
            return Ok(Applied {
                changed: false,
                previous: None,
            });
        }
        if let Err(e) = check_size(&self.state.desired, &self.state.reported, limits) {
            undo.revert(&mut self.state.reported);
            return Err(e.into());
        }
        match &req.reported {
            Some(patch) => stamp_metadata(&mut self.metadata.reported, patch, now),
            None => self.metadata.reported.clear(),
        }
        if reconnected {
            self.connected = req.connected;
        }
        self.bump(now);
        Ok(Applied {
            changed: true,
            previous,
        })
    }

    /// Replaces desired state with the cloud's `spec.desired` at `generation`. Nulls are
    /// removed (a null desired field means "no opinion"). Returns whether the desired document
    /// changed; the version is bumped when it did or when `generation` is new.
    ///
    /// # Errors
    /// [`ShadowError::Limit`] if the desired document breaks a limit. The document is unchanged.
    pub fn set_desired(
        &mut self,
        desired: Map<String, Value>,
        generation: i64,
        limits: &Limits,
        now: EpochSeconds,
    ) -> Result<bool, ShadowError> {
        let mut value = Value::Object(desired);
        merge::strip_nulls(&mut value);
        let Value::Object(desired) = value else {
            unreachable!("strip_nulls keeps an object an object")
        };
        limits::check_state(&desired, limits)?;
        check_size(&desired, &self.state.reported, limits)?;
        let changed = desired != self.state.desired;
        let new_generation = generation != self.desired_generation;
        self.desired_generation = generation;
        if new_generation {
            // A refusal answers one generation; a newer one is a new question.
            self.rejection = None;
        }
        if changed {
            let patch = diff_as_patch(&self.state.desired, &desired);
            stamp_metadata(&mut self.metadata.desired, &patch, now);
            self.state.desired = desired;
        }
        // Observing a new generation is a change too: it must reach the controller (as
        // `observedDesiredVersion`) even when the desired document itself is the same.
        if changed || new_generation {
            self.bump(now);
        }
        Ok(changed)
    }

    /// Desired leaves that reported does not match yet.
    pub fn delta(&self) -> Map<String, Value> {
        merge::delta(&self.state.desired, &self.state.reported)
    }

    fn bump(&mut self, now: EpochSeconds) {
        self.version += 1;
        self.timestamp = now;
    }
}

/// Checks that `desired` + `reported`, serialized, fit `limits.max_state_bytes`.
///
/// # Errors
/// [`LimitError::StateTooLarge`] with the size it would have.
pub fn check_size(
    desired: &Map<String, Value>,
    reported: &Map<String, Value>,
    limits: &Limits,
) -> Result<(), LimitError> {
    let size = json_len(desired) + json_len(reported);
    if size > limits.max_state_bytes {
        return Err(LimitError::StateTooLarge {
            size,
            max: limits.max_state_bytes,
        });
    }
    Ok(())
}

fn json_len(map: &Map<String, Value>) -> usize {
    encoded_object_len(map)
}

/// The length of `value` as serde_json writes it (compact), computed without writing it:
/// this runs for every message, and serializing through a counting writer cost more than the
/// merge itself.
pub fn encoded_len(value: &Value) -> usize {
    match value {
        Value::Null => 4,
        Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => number_len(n),
        Value::String(s) => encoded_str_len(s),
        Value::Array(items) => {
            2 + items.iter().map(encoded_len).sum::<usize>() + items.len().saturating_sub(1)
        }
        Value::Object(map) => encoded_object_len(map),
    }
}

/// [`encoded_len`] of an object.
pub fn encoded_object_len(map: &Map<String, Value>) -> usize {
    // Braces, a colon per member, commas between members.
    2 + map
        .iter()
        .map(|(k, v)| encoded_str_len(k) + 1 + encoded_len(v))
        .sum::<usize>()
        + map.len().saturating_sub(1)
}

fn encoded_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn number_len(n: &serde_json::Number) -> usize {
    if let Some(u) = n.as_u64() {
        u.checked_ilog10().map_or(1, |d| d as usize + 1)
    } else if let Some(i) = n.as_i64() {
        // Negative (non-negative ones are u64 above).
        1 + i
            .unsigned_abs()
            .checked_ilog10()
            .map_or(1, |d| d as usize + 1)
    } else {
        // Floats: rare in size-critical paths; let serde_json say.
        struct Counter(usize);
        impl std::io::Write for Counter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Counter(0);
        let _ = serde_json::to_writer(&mut c, n);
        c.0
    }
}

/// Sets `{"timestamp": now}` on every leaf the patch touches and removes deleted keys, keeping
/// metadata the same shape as the state it describes. Like the merge, it runs for every
/// message: leaves seen before are restamped in place during one sorted walk over `meta`
/// ([`merge::seek`]); only keys that change the shape are handled after it.
fn stamp_metadata(meta: &mut Map<String, Value>, patch: &Map<String, Value>, now: EpochSeconds) {
    let mut reshape: Vec<(&String, &Value)> = Vec::new();
    let mut walk = meta.iter_mut().peekable();
    for (key, value) in patch {
        let entry = if value.is_null() {
            None
        } else {
            merge::seek(&mut walk, key)
        };
        match (value, entry) {
            (Value::Object(inner), Some(entry)) if !inner.is_empty() => {
                // A former leaf's {"timestamp":..} turns into an interior node.
                if !entry.is_object() || entry.get("timestamp").is_some_and(Value::is_u64) {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(m) = entry {
                    stamp_metadata(m, inner, now);
                }
            }
            (Value::Object(inner), _) if !inner.is_empty() => reshape.push((key, value)),
            (Value::Null, _) => reshape.push((key, value)),
            (_, Some(Value::Object(leaf))) if leaf.len() == 1 => match leaf.iter_mut().next() {
                Some((k, ts)) if k == "timestamp" => *ts = Value::from(now),
                _ => reshape.push((key, value)),
            },
            _ => reshape.push((key, value)),
        }
    }
    for (key, value) in reshape {
        match value {
            Value::Null => {
                meta.remove(key);
            }
            Value::Object(inner) if !inner.is_empty() => {
                let mut m = Map::new();
                stamp_metadata(&mut m, inner, now);
                meta.insert(key.clone(), Value::Object(m));
            }
            // An empty object is a leaf, as in the state it describes.
            _ => {
                let mut leaf = Map::new();
                leaf.insert("timestamp".into(), Value::from(now));
                meta.insert(key.clone(), Value::Object(leaf));
            }
        }
    }
}

/// A merge patch that turns `old` into `new`, so desired metadata is stamped only where the
/// desired document actually changed.
fn diff_as_patch(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in new {
        match (old.get(key), value) {
            (Some(Value::Object(o)), Value::Object(n)) => {
                let inner = diff_as_patch(o, n);
                if !inner.is_empty() {
                    patch.insert(key.clone(), Value::Object(inner));
                }
            }
            (Some(o), n) if o == n => {}
            _ => {
                patch.insert(key.clone(), value.clone());
            }
        }
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: EpochSeconds = 1_700_000_000;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test fixture must be an object"),
        }
    }

    fn update(payload: Value) -> Result<UpdateRequest, ShadowError> {
        UpdateRequest::parse(payload.to_string().as_bytes(), &Limits::default())
    }

    #[test]
    fn a_connection_change_is_a_change_and_a_repeat_is_not() {
        let limits = Limits::default();
        let mut doc = ShadowDocument::default();
        let death = UpdateRequest {
            reported: Some(Map::new()),
            client_token: None,
            version: None,
            connected: Some(false),
            dialect: Dialect::Native,
        };
        assert!(doc.apply_reported(&death, &limits, NOW).unwrap().changed);
        assert_eq!((doc.version, doc.connected), (1, Some(false)));
        assert!(!doc.apply_reported(&death, &limits, NOW).unwrap().changed);
        let plain = UpdateRequest {
            connected: None,
            ..death.clone()
        };
        assert!(!doc.apply_reported(&plain, &limits, NOW).unwrap().changed);
        assert_eq!(doc.connected, Some(false), "a plain message leaves it");
        let text = serde_json::to_string(&ShadowDocument::default()).unwrap();
        assert!(
            !text.contains("connected"),
            "absent unless a protocol set it"
        );
    }

    #[test]
    fn design_example_update_round_trip() {
        let mut doc = ShadowDocument::default();
        let req = update(
            json!({"state":{"reported":{"temp":21.5,"motor":{"rpm":1200}}},"clientToken":"abc"}),
        )
        .unwrap();
        assert_eq!(req.client_token.as_deref(), Some("abc"));
        let applied = doc.apply_reported(&req, &Limits::default(), NOW).unwrap();
        assert!(applied.changed);
        assert_eq!(applied.previous.map(|p| p.version), Some(0));
        assert_eq!(doc.version, 1);
        assert_eq!(
            Value::Object(doc.state.reported.clone()),
            json!({"temp":21.5,"motor":{"rpm":1200}})
        );
        assert_eq!(
            Value::Object(doc.metadata.reported.clone()),
            json!({"temp":{"timestamp":NOW},"motor":{"rpm":{"timestamp":NOW}}})
        );

        // Merge: objects merge, null deletes, scalars replace.
        let req = update(json!({"state":{"reported":{"temp":null,"motor":{"dir":"cw"}}}})).unwrap();
        doc.apply_reported(&req, &Limits::default(), NOW + 1)
            .unwrap();
        assert_eq!(
            Value::Object(doc.state.reported.clone()),
            json!({"motor":{"rpm":1200,"dir":"cw"}})
        );
        assert_eq!(doc.version, 2);
        assert!(!doc.metadata.reported.contains_key("temp"));
    }

    #[test]
    fn same_state_again_is_accepted_without_a_version_bump() {
        let mut doc = ShadowDocument::default();
        let req = update(json!({"state":{"reported":{"a":1}}})).unwrap();
        doc.apply_reported(&req, &Limits::default(), NOW).unwrap();
        let applied = doc
            .apply_reported(&req, &Limits::default(), NOW + 5)
            .unwrap();
        assert!(!applied.changed);
        assert_eq!(doc.version, 1);
        assert_eq!(doc.timestamp, NOW);
    }

    #[test]
    fn version_conflict_is_409_and_changes_nothing() {
        let mut doc = ShadowDocument::default();
        doc.apply_reported(
            &update(json!({"state":{"reported":{"a":1}}})).unwrap(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        let before = doc.clone();
        let err = doc
            .apply_reported(
                &update(json!({"state":{"reported":{"a":2}},"version":7})).unwrap(),
                &Limits::default(),
                NOW,
            )
            .unwrap_err();
        assert_eq!(
            err,
            ShadowError::VersionConflict {
                requested: 7,
                current: 1
            }
        );
        assert_eq!(err.code(), 409);
        assert_eq!(doc, before);
        // The matching version is accepted.
        doc.apply_reported(
            &update(json!({"state":{"reported":{"a":2}},"version":1})).unwrap(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(doc.version, 2);
    }

    #[test]
    fn malformed_requests_are_400_with_a_useful_message() {
        let limits = Limits::default();
        let cases: [(&[u8], &str); 9] = [
            (b"not json", "invalid JSON"),
            (b"[1,2]", "payload must be a JSON object"),
            (b"{}", "missing \"state\""),
            (br#"{"state":5}"#, "state must be a JSON object"),
            (br#"{"state":{}}"#, "missing state.reported"),
            (
                br#"{"state":{"reported":[1]}}"#,
                "state.reported must be a JSON object or null",
            ),
            (
                br#"{"state":{"reported":{}},"clientToken":5}"#,
                "clientToken must be a string",
            ),
            (
                br#"{"state":{"reported":{}},"version":-1}"#,
                "version must be a non-negative integer",
            ),
            (
                br#"{"state":{"reported":{}},"colour":"red"}"#,
                "unknown top-level field 'colour'",
            ),
        ];
        for (payload, expected) in cases {
            let err = UpdateRequest::parse(payload, &limits).unwrap_err();
            assert_eq!(err.code(), 400, "{err}");
            assert!(
                err.to_string().contains(expected),
                "{err} should mention {expected}"
            );
        }
    }

    #[test]
    fn devices_cannot_write_desired() {
        let err = update(json!({"state":{"desired":{"a":1},"reported":{}}})).unwrap_err();
        assert_eq!(err, ShadowError::DesiredIsReadOnly);
        assert_eq!(err.code(), 400);
    }

    #[test]
    fn too_large_is_413_and_changes_nothing() {
        let limits = Limits::default();
        let big = "x".repeat(limits.max_payload_bytes + 1);
        let err = UpdateRequest::parse(big.as_bytes(), &limits).unwrap_err();
        assert_eq!(err.code(), 413);
        assert_eq!(err.reason(), "payload_too_large");

        let mut doc = ShadowDocument::default();
        let before = doc.clone();
        let req = update(json!({"state":{"reported":{"blob":"y".repeat(9000)}}})).unwrap();
        let err = doc.apply_reported(&req, &limits, NOW).unwrap_err();
        assert_eq!(err.code(), 413);
        assert!(
            err.to_string()
                .contains("larger than the limit of 8192 bytes"),
            "{err}"
        );
        assert_eq!(doc, before);
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            UpdateRequest::parse(
                deep.as_bytes(),
                &Limits {
                    max_payload_bytes: 1 << 20,
                    ..Limits::default()
                }
            )
            .unwrap_err()
            .code(),
            400
        );
        let seven = json!({"state":{"reported":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}});
        assert_eq!(update(seven).unwrap_err().reason(), "too_deep");
    }

    #[test]
    fn reported_null_clears_reported() {
        let mut doc = ShadowDocument::default();
        doc.apply_reported(
            &update(json!({"state":{"reported":{"a":1}}})).unwrap(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        doc.apply_reported(
            &update(json!({"state":{"reported":null}})).unwrap(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert!(doc.state.reported.is_empty());
        assert!(doc.metadata.reported.is_empty());
        assert_eq!(doc.version, 2);
    }

    #[test]
    fn plain_ingest_is_a_bare_reported_patch() {
        let req = UpdateRequest::parse_plain(br#"{"temp":20,"state":"run"}"#, &Limits::default())
            .unwrap();
        assert_eq!(req.reported, Some(obj(json!({"temp":20,"state":"run"}))));
        assert!(UpdateRequest::parse_plain(b"42", &Limits::default()).is_err());
    }

    #[test]
    fn desired_from_cloud_bumps_version_and_yields_delta() {
        let limits = Limits::default();
        let mut doc = ShadowDocument::default();
        doc.apply_reported(
            &update(json!({"state":{"reported":{"speed":1000,"mode":"auto"}}})).unwrap(),
            &limits,
            NOW,
        )
        .unwrap();
        assert!(
            doc.set_desired(
                obj(json!({"speed":1200,"mode":"auto","unset":null})),
                3,
                &limits,
                NOW + 1
            )
            .unwrap()
        );
        assert_eq!(doc.version, 2);
        assert_eq!(doc.desired_generation, 3);
        assert_eq!(Value::Object(doc.delta()), json!({"speed":1200}));
        assert_eq!(
            Value::Object(doc.metadata.desired.clone()),
            json!({"speed":{"timestamp":NOW+1},"mode":{"timestamp":NOW+1}})
        );
        // Same desired again at a new generation: recorded, and the version bumps so the
        // observation is reported. The same generation again changes nothing.
        let same = || obj(json!({"speed":1200,"mode":"auto"}));
        assert!(!doc.set_desired(same(), 4, &limits, NOW + 2).unwrap());
        assert_eq!((doc.version, doc.desired_generation), (3, 4));
        assert!(!doc.set_desired(same(), 4, &limits, NOW + 2).unwrap());
        assert_eq!(doc.version, 3);
        // The device catches up: delta empties.
        doc.apply_reported(
            &update(json!({"state":{"reported":{"speed":1200}}})).unwrap(),
            &limits,
            NOW + 3,
        )
        .unwrap();
        assert!(doc.delta().is_empty());
    }

    #[test]
    fn document_serializes_like_the_mqtt_contract() {
        let mut doc = ShadowDocument::default();
        doc.apply_reported(
            &update(json!({"state":{"reported":{"a":1}}})).unwrap(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        let v = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            v,
            json!({"state":{"desired":{},"reported":{"a":1}},"metadata":{"desired":{},"reported":{"a":{"timestamp":NOW}}},"version":1,"desiredGeneration":0,"timestamp":NOW})
        );
        let back: ShadowDocument = serde_json::from_value(v).unwrap();
        assert_eq!(back, doc);
    }

    /// Metadata stamping as first written: one map lookup per key. The sorted-walk version
    /// must give the same metadata for any history of patches.
    fn stamp_metadata_by_lookup(
        meta: &mut Map<String, Value>,
        patch: &Map<String, Value>,
        now: u64,
    ) {
        for (key, value) in patch {
            match value {
                Value::Null => {
                    meta.remove(key);
                }
                Value::Object(inner) if !inner.is_empty() => {
                    if !meta.contains_key(key) {
                        meta.insert(key.clone(), Value::Object(Map::new()));
                    }
                    let Some(entry) = meta.get_mut(key) else {
                        continue;
                    };
                    if !entry.is_object() || entry.get("timestamp").is_some_and(Value::is_u64) {
                        *entry = Value::Object(Map::new());
                    }
                    if let Value::Object(m) = entry {
                        stamp_metadata_by_lookup(m, inner, now);
                    }
                }
                _ => {
                    let mut leaf = Map::new();
                    leaf.insert("timestamp".into(), Value::from(now));
                    meta.insert(key.clone(), Value::Object(leaf));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn stamping_by_sorted_walk_equals_stamping_by_lookup(
            patches in prop::collection::vec(crate::merge::tests::arb_json(), 1..8),
        ) {
            let (mut walked, mut looked_up) = (Map::new(), Map::new());
            for (i, patch) in patches.iter().enumerate() {
                let Value::Object(patch) = patch else { continue };
                stamp_metadata(&mut walked, patch, i as u64);
                stamp_metadata_by_lookup(&mut looked_up, patch, i as u64);
                prop_assert_eq!(&walked, &looked_up);
            }
        }

        /// Fuzz-style: arbitrary bytes never panic the parsers.
        #[test]
        fn parsers_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = UpdateRequest::parse(&bytes, &Limits::default());
            let _ = UpdateRequest::parse_plain(&bytes, &Limits::default());
        }

        /// Arbitrary JSON documents (in and out of the envelope) never panic, and whatever is
        /// accepted and applied stays within every limit.
        #[test]
        fn merge_never_exceeds_limits_without_an_error(
            patches in prop::collection::vec(crate::merge::tests::arb_json(), 1..6),
            max_state_bytes in 16usize..400,
            max_depth in 1usize..4,
        ) {
            let limits = Limits { max_state_bytes, max_depth, ..Limits::default() };
            let mut doc = ShadowDocument::default();
            for (i, p) in patches.iter().enumerate() {
                let payload = serde_json::json!({"state": {"reported": p}}).to_string();
                let before = doc.clone();
                match UpdateRequest::parse(payload.as_bytes(), &limits)
                    .and_then(|req| doc.apply_reported(&req, &limits, i as u64))
                {
                    Ok(applied) => {
                        prop_assert_eq!(doc.version, before.version + u64::from(applied.changed));
                    }
                    Err(_) => prop_assert_eq!(&doc, &before),
                }
                let size = serde_json::to_string(&doc.state.reported).unwrap().len()
                    + serde_json::to_string(&doc.state.desired).unwrap().len();
                prop_assert!(size <= limits.max_state_bytes);
                prop_assert!(crate::limits::check_state(&doc.state.reported, &limits).is_ok());
            }
        }

        #[test]
        fn encoded_len_is_the_serialized_length(value in crate::merge::tests::arb_json(), text in ".*", n in any::<i64>(), f in any::<f64>()) {
            prop_assert_eq!(encoded_len(&value), serde_json::to_string(&value).unwrap().len());
            let s = Value::String(text);
            prop_assert_eq!(encoded_len(&s), serde_json::to_string(&s).unwrap().len());
            let n = Value::from(n);
            prop_assert_eq!(encoded_len(&n), serde_json::to_string(&n).unwrap().len());
            let f = Value::from(f);
            prop_assert_eq!(encoded_len(&f), serde_json::to_string(&f).unwrap().len());
        }

        #[test]
        fn document_serde_round_trips(patch in crate::merge::tests::arb_json()) {
            let mut doc = ShadowDocument::default();
            if let Value::Object(p) = patch {
                let req = UpdateRequest { reported: Some(p), client_token: None, version: None, connected: None, dialect: Dialect::Native };
                let _ = doc.apply_reported(&req, &Limits { max_depth: 16, ..Limits::default() }, NOW);
            }
            let text = serde_json::to_string(&doc).unwrap();
            let back: ShadowDocument = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(back, doc);
        }
    }
}
