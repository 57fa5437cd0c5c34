//! The mark a rollout leaves on each Device it patches, in the same write as the change: a
//! label `rollout.edgesync.io/<rollout>` (for `kubectl get dev -l`) and an annotation of
//! the same key holding this JSON. Because mark and change are one write, the Devices say
//! exactly which of them a rollout has patched: a new leader patches none twice.
//!
//! Pure: building and reading the annotation.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The prefix of the label and annotation keys; the rollout's name follows.
pub const KEY_PREFIX: &str = "rollout.edgesync.io/";

/// The longest rollout name: a label key's name part is at most 63 characters.
pub const MAX_NAME: usize = 63;

/// The label and annotation key of rollout `name`.
pub fn key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// What a rollout wrote on one Device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// The rollout's uid: a mark of an earlier rollout of the same name is not this one's.
    pub uid: String,
    /// The wave (1-based step) the device was patched in.
    pub step: u32,
    /// The Device's `metadata.generation` after the patch: the device is updated once its
    /// agent has applied this generation and it is In-Sync.
    pub generation: i64,
    /// When it was patched (Unix seconds), for the progress deadline.
    pub time: i64,
    /// The merge patch that puts back the values the rollout changed.
    pub revert: Map<String, Value>,
    /// Whether the revert has been written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reverted: bool,
}

impl Mark {
    /// Reads the mark from a Device's annotation; `None` when absent or unreadable (a Device
    /// whose annotation someone garbled is not treated as patched by this rollout's uid).
    pub fn read(annotation: Option<&String>) -> Option<Self> {
        serde_json::from_str(annotation?).ok()
    }

    /// The annotation's text.
    pub fn text(&self) -> String {
        serde_json::to_string(self).expect("invariant: a mark serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_mark_reads_back_what_was_written() {
        let mark = Mark {
            uid: "u-1".into(),
            step: 2,
            generation: 7,
            time: 1_700_000_000,
            revert: json!({"speed": 1000, "mode": null})
                .as_object()
                .cloned()
                .unwrap(),
            reverted: false,
        };
        let text = mark.text();
        assert!(!text.contains("reverted"), "{text}");
        assert_eq!(Mark::read(Some(&text)), Some(mark));
        assert_eq!(Mark::read(Some(&"{garbled".to_owned())), None);
        assert_eq!(Mark::read(None), None);
        assert_eq!(key("press-speed"), "rollout.edgesync.io/press-speed");
    }
}
