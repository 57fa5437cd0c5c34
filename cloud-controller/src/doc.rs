//! A reported document kept as its compact JSON text, shared by everything that holds a
//! report between its batch and its status write: the live state, the live watch window and
//! the status writer's pending report all point at one copy.
//!
//! Why not a `serde_json::Map`: a parsed map costs about ten times its JSON text in memory
//! (a B-tree node allocates room for eleven entries; every key and string is an allocation
//! of its own), and a large fleet keeps several reports per device in memory at once (the
//! newest, the ones its watch window still holds, the one waiting for its status write).
//! Text is parsed again only where a value is read: a selector on reported values, the
//! status write, a desired state compared with it.

use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A reported JSON object as compact text, cheap to clone.
#[derive(Debug, Clone)]
pub struct Doc(Arc<RawValue>);

impl Doc {
    /// The compact text of `map`. Its keys are sorted (a `Map` is ordered), so two equal
    /// maps give the same text.
    pub fn of(map: &Map<String, Value>) -> Self {
        // Writing a map of JSON values to text cannot fail: its keys are strings and
        // `Value` holds no non-finite number.
        let raw = serde_json::value::to_raw_value(map).unwrap_or_else(|_| empty());
        Self(Arc::from(raw))
    }

    /// A JSON object's text as another replica sent it (`None` when it is not an object).
    pub fn from_raw(raw: Box<RawValue>) -> Option<Self> {
        raw.get().starts_with('{').then(|| Self(Arc::from(raw)))
    }

    /// The JSON text, to be written as the JSON it is.
    pub fn raw(&self) -> &RawValue {
        &self.0
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The text's length in bytes (the unit the document limits are written in).
    pub fn len(&self) -> usize {
        self.as_str().len()
    }

    /// Whether it is the empty object.
    pub fn is_empty(&self) -> bool {
        self.as_str() == "{}"
    }

    /// The document as a map.
    pub fn parse(&self) -> Map<String, Value> {
        // The text was written from a map by `Doc::of`, so it reads back as one.
        serde_json::from_str(self.as_str()).unwrap_or_default()
    }

    /// Whether it holds the same document as `map`.
    pub fn same_as(&self, map: &Map<String, Value>) -> bool {
        self.parse() == *map
    }
}

fn empty() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("{} is JSON")
}

impl PartialEq for Doc {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Doc {}

impl Serialize for Doc {
    /// Written as the JSON object it is, not as a string.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (*self.0).serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn keeps_the_document_compact_and_reads_it_back() {
        let m = map(json!({"b": {"x": [1, 2.5, "s"]}, "a": true, "c": null}));
        let d = Doc::of(&m);
        assert_eq!(d.as_str(), r#"{"a":true,"b":{"x":[1,2.5,"s"]},"c":null}"#);
        assert_eq!(d.len(), d.as_str().len());
        assert_eq!(d.parse(), m);
        assert!(d.same_as(&m));
        assert!(!d.same_as(&map(json!({"a": true}))));
        // Equal maps, whatever order they were built in, give equal documents.
        assert_eq!(
            d,
            Doc::of(&map(
                json!({"c": null, "a": true, "b": {"x": [1, 2.5, "s"]}})
            ))
        );
        assert!(Doc::of(&Map::new()).is_empty());
    }

    #[test]
    fn serializes_as_the_object_itself() {
        let d = Doc::of(&map(json!({"speed": 3})));
        assert_eq!(
            serde_json::to_string(&json!({"reported": d})).unwrap(),
            r#"{"reported":{"speed":3}}"#
        );
        assert_eq!(serde_json::to_value(&d).unwrap(), json!({"speed": 3}));
    }
}
