//! JSON merge patch (RFC 7386) and delta computation, the two pure operations a shadow is
//! built on.
//!
//! Merge rules: objects merge recursively, `null` deletes a key, arrays and scalars replace.
//! Delta: the desired leaves that reported lacks or differs on, recursively; arrays compare as
//! whole values. Both are total functions on any JSON: they never fail and never panic.

use std::cmp::Ordering;
use std::iter::Peekable;

use serde_json::{Map, Value};

/// Applies `patch` to `target` as an RFC 7386 merge patch. Returns whether `target` changed.
///
/// A non-object patch replaces the target entirely, as the RFC specifies.
pub fn merge_patch(target: &mut Value, patch: &Value) -> bool {
    match patch {
        Value::Object(patch_obj) => {
            let replaced = !target.is_object();
            if replaced {
                *target = Value::Object(Map::new());
            }
            let Value::Object(target_obj) = target else {
                unreachable!("target was made an object above")
            };
            merge_object(target_obj, patch_obj) || replaced
        }
        other => {
            if target == other {
                false
            } else {
                *target = other.clone();
                true
            }
        }
    }
}

/// Applies an object merge patch to an object. Returns whether `target` changed.
pub fn merge_object(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (key, value) in patch {
        if value.is_null() {
            changed |= target.remove(key).is_some();
        } else if let Some(existing) = target.get_mut(key) {
            changed |= merge_patch(existing, value);
        } else {
            // A fresh key: nulls inside the patch value mean "absent", so they are dropped
            // rather than stored (RFC 7386 section 2 applies the patch to an empty object).
            let mut fresh = Value::Null;
            merge_patch(&mut fresh, value);
            target.insert(key.clone(), fresh);
            changed = true;
        }
    }
    changed
}

/// How to take back an in-place merge: the previous values of the top-level keys it changed
/// (`None`: the key was absent), or the whole previous object.
#[derive(Debug)]
pub enum Undo<'p> {
    /// Changed keys (borrowed from the patch) and their previous values.
    Keys(Vec<(&'p str, Option<Value>)>),
    /// The object as it was before it was replaced wholesale (cleared).
    Whole(Map<String, Value>),
}

impl Undo<'_> {
    /// Whether the merge changed nothing.
    pub fn is_empty(&self) -> bool {
        match self {
            Undo::Keys(k) => k.is_empty(),
            Undo::Whole(m) => m.is_empty(),
        }
    }

    /// Restores `target` to what it was before the merge.
    pub fn revert(self, target: &mut Map<String, Value>) {
        match self {
            Undo::Keys(keys) => {
                for (key, old) in keys.into_iter().rev() {
                    match old {
                        Some(v) => {
                            target.insert(key.to_owned(), v);
                        }
                        None => {
                            target.remove(key);
                        }
                    }
                }
            }
            Undo::Whole(map) => *target = map,
        }
    }
}

/// [`merge_object`] in place, returning what it changed so it can be reverted. Replaced
/// values are moved into the undo list, not copied; only a nested object that is merged into
/// is copied first.
///
/// This runs for every message a device sends, so keys present on both sides (the steady
/// state: a device reports the same fields again) are found by one sorted walk over `target`
/// beside the patch instead of one search per key; only keys to add or remove change the
/// map's shape, after the walk.
pub fn merge_object_undoable<'p>(
    target: &mut Map<String, Value>,
    patch: &'p Map<String, Value>,
) -> Vec<(&'p str, Option<Value>)> {
    let mut undo = Vec::new();
    let mut reshape: Vec<(&'p String, &'p Value)> = Vec::new();
    let mut walk = target.iter_mut().peekable();
    for (key, value) in patch {
        let existing = match seek(&mut walk, key) {
            Some(existing) if !value.is_null() => existing,
            _ => {
                reshape.push((key, value));
                continue;
            }
        };
        if existing.is_object() && value.is_object() {
            let backup = existing.clone();
            if merge_patch(existing, value) {
                undo.push((key.as_str(), Some(backup)));
            }
        } else if existing != value {
            // A scalar or array patch replaces; an object patch onto a non-object replaces it
            // with the patch applied to an empty object.
            let mut fresh = Value::Null;
            merge_patch(&mut fresh, value);
            if *existing != fresh {
                let old = std::mem::replace(existing, fresh);
                undo.push((key.as_str(), Some(old)));
            }
        }
    }
    for (key, value) in reshape {
        if value.is_null() {
            if let Some(old) = target.remove(key) {
                undo.push((key.as_str(), Some(old)));
            }
        } else {
            let mut fresh = Value::Null;
            merge_patch(&mut fresh, value);
            target.insert(key.clone(), fresh);
            undo.push((key.as_str(), None));
        }
    }
    undo
}

/// Advances `walk`, an iteration over a map in key order, to `key`, and returns its value if
/// the map has it. Called with ascending keys (another map's), one walk serves them all with
/// one comparison per key on either side. serde_json's `Map` iterates in key order unless its
/// `preserve_order` feature is on; a test fails if it ever is.
pub(crate) fn seek<'t, I>(walk: &mut Peekable<I>, key: &str) -> Option<&'t mut Value>
where
    I: Iterator<Item = (&'t String, &'t mut Value)>,
{
    while let Some((k, _)) = walk.peek() {
        match k.as_str().cmp(key) {
            Ordering::Less => {
                walk.next();
            }
            Ordering::Equal => return walk.next().map(|(_, v)| v),
            Ordering::Greater => return None,
        }
    }
    None
}

/// Removes every `null` member from objects, recursively (not from arrays, whose elements are
/// values, not patch instructions). Desired state set as a whole document is normalised this
/// way so that `{"a": null}` and `{}` mean the same thing.
pub fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The part of `desired` that `reported` does not yet match: every desired leaf that reported
/// lacks or holds a different value for. Objects are compared recursively; arrays and scalars
/// as whole values. Empty when the device is in sync.
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, want) in desired {
        match (want, reported.get(key)) {
            (Value::Null, _) => {}
            (Value::Object(want_obj), Some(Value::Object(have_obj))) => {
                let inner = delta(want_obj, have_obj);
                if !inner.is_empty() {
                    out.insert(key.clone(), Value::Object(inner));
                }
            }
            (want, Some(have)) if want == have => {}
            (want, _) => {
                out.insert(key.clone(), want.clone());
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn maps_iterate_in_key_order_as_the_sorted_walk_needs() {
        // serde_json's `preserve_order` feature (which any crate in a build can turn on)
        // would make `Map` iterate in insertion order and break `seek`'s walks.
        let mut m = Map::new();
        for k in ["b", "c", "a"] {
            m.insert(k.to_owned(), Value::Null);
        }
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test fixture must be an object"),
        }
    }

    /// The examples from RFC 7386 appendix A, verbatim.
    #[test]
    fn rfc7386_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, expected, "patch {patch}");
        }
    }

    #[test]
    fn merge_reports_whether_anything_changed() {
        let mut t = json!({"temp": 21, "mode": "auto"});
        assert!(!merge_patch(&mut t, &json!({"temp": 21})));
        assert!(!merge_patch(&mut t, &json!({"gone": null})));
        assert!(merge_patch(&mut t, &json!({"temp": 22})));
        assert!(merge_patch(&mut t, &json!({"mode": null})));
        assert_eq!(t, json!({"temp": 22}));
    }

    #[test]
    fn delta_lists_what_reported_lacks_or_differs_on() {
        let desired = obj(
            json!({"speed": 1200, "mode": "auto", "pid": {"p": 1.5, "i": 0.2}, "tags": [1, 2]}),
        );
        let reported = obj(
            json!({"speed": 1000, "mode": "auto", "pid": {"p": 1.5}, "tags": [1], "extra": true}),
        );
        assert_eq!(
            Value::Object(delta(&desired, &reported)),
            json!({"speed": 1200, "pid": {"i": 0.2}, "tags": [1, 2]})
        );
    }

    #[test]
    fn delta_empty_when_in_sync_and_ignores_reported_only_keys() {
        let desired = obj(json!({"a": {"b": 1}}));
        let reported = obj(json!({"a": {"b": 1, "c": 2}, "d": 3}));
        assert!(delta(&desired, &reported).is_empty());
    }

    #[test]
    fn delta_object_versus_scalar_takes_desired_whole() {
        let desired = obj(json!({"a": {"b": 1}}));
        let reported = obj(json!({"a": 5}));
        assert_eq!(
            Value::Object(delta(&desired, &reported)),
            json!({"a": {"b": 1}})
        );
    }

    #[test]
    fn strip_nulls_keeps_array_elements() {
        let mut v = json!({"a": null, "b": {"c": null, "d": [null, {"e": null}]}});
        strip_nulls(&mut v);
        assert_eq!(v, json!({"b": {"d": [null, {}]}}));
    }

    pub(crate) fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-e]{1,2}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Collects every (path, leaf) pair of an object; objects are interior nodes.
    fn leaves(prefix: &str, m: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
        for (k, v) in m {
            let path = format!("{prefix}/{k}");
            match v {
                Value::Object(inner) => leaves(&path, inner, out),
                Value::Null => {}
                leaf => out.push((path, leaf.clone())),
            }
        }
    }

    fn lookup<'a>(m: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
        let mut parts = path.trim_start_matches('/').split('/');
        let mut cur = m.get(parts.next()?)?;
        for p in parts {
            cur = cur.as_object()?.get(p)?;
        }
        Some(cur)
    }

    proptest! {
        #[test]
        fn patch_is_idempotent(target in arb_json(), patch in arb_json()) {
            let mut once = target.clone();
            merge_patch(&mut once, &patch);
            let mut twice = once.clone();
            let changed = merge_patch(&mut twice, &patch);
            prop_assert_eq!(&once, &twice);
            prop_assert!(!changed);
        }

        #[test]
        fn undoable_merge_equals_merge_and_reverts_exactly(target in arb_json(), patch in arb_json()) {
            let (Value::Object(target), Value::Object(patch)) = (target, patch) else {
                return Ok(());
            };
            let mut expected = target.clone();
            let changed = merge_object(&mut expected, &patch);
            let mut merged = target.clone();
            let undo = Undo::Keys(merge_object_undoable(&mut merged, &patch));
            prop_assert_eq!(&merged, &expected);
            prop_assert_eq!(!undo.is_empty(), changed);
            undo.revert(&mut merged);
            prop_assert_eq!(merged, target);
        }

        #[test]
        fn changed_flag_is_truthful(target in arb_json(), patch in arb_json()) {
            let mut t = target.clone();
            let changed = merge_patch(&mut t, &patch);
            prop_assert_eq!(changed, t != target);
        }

        #[test]
        fn delta_empty_iff_every_desired_leaf_equals_reported(
            desired in arb_json(), reported in arb_json()
        ) {
            let (Value::Object(mut d), Value::Object(r)) = (desired, reported) else {
                return Ok(());
            };
            let mut dv = Value::Object(std::mem::take(&mut d));
            strip_nulls(&mut dv);
            let Value::Object(d) = dv else { unreachable!() };
            let mut ls = Vec::new();
            leaves("", &d, &mut ls);
            // Empty desired objects are leaves with nothing to match: ignore them.
            let all_equal = ls.iter().all(|(p, v)| lookup(&r, p) == Some(v));
            let dl = delta(&d, &r);
            // A desired empty object where reported holds a scalar is a structural mismatch
            // the leaf view cannot see; the delta reports it, so allow that one direction.
            if dl.is_empty() {
                prop_assert!(all_equal);
            } else if all_equal {
                let mut dls = Vec::new();
                leaves("", &dl, &mut dls);
                prop_assert!(dls.is_empty(), "delta has leaves {:?} though all leaves match", dls);
            }
        }

        #[test]
        fn applying_the_delta_to_reported_brings_it_in_sync(
            desired in arb_json(), reported in arb_json()
        ) {
            let (Value::Object(d), Value::Object(r)) = (desired, reported) else {
                return Ok(());
            };
            let mut dv = Value::Object(d);
            strip_nulls(&mut dv);
            let Value::Object(d) = dv else { unreachable!() };
            let dl = delta(&d, &r);
            let mut rv = Value::Object(r);
            merge_patch(&mut rv, &Value::Object(dl));
            let Value::Object(r2) = rv else { unreachable!() };
            prop_assert!(delta(&d, &r2).is_empty());
        }
    }
}
